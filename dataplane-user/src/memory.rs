//! Giving memory back after a burst. glibc's allocator keeps the heap a
//! burst grew (its per-thread arenas trim only from their top), so an agent
//! that once held 10,000 flows would stay at that size for good; measured,
//! it did (`cargo xtask bench --only burst` compares glibc with and
//! without this, jemalloc and mimalloc). When the load (flows and streams
//! being served) has fallen to half of a peak of at least [`MIN_BURST`],
//! the agent asks glibc to return its free pages (`malloc_trim`), at most
//! once per [`TICK`]. `DATAPLANE_MALLOC_TRIM=0` turns it off.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A peak smaller than this is not worth a trim.
pub const MIN_BURST: u64 = 256;
/// How often the load is looked at.
pub const TICK: Duration = Duration::from_secs(5);

/// Decides when a trim is due from the load seen at each tick.
#[derive(Debug, Default)]
pub struct Trimmer {
    /// The highest load since the last trim.
    peak: u64,
}

impl Trimmer {
    /// Whether to trim now, given the load now and the most it was since
    /// the last tick (a burst shorter than a tick is still seen).
    pub fn due(&mut self, load: u64, peak_since_tick: u64) -> bool {
        self.peak = self.peak.max(load).max(peak_since_tick);
        if self.peak >= MIN_BURST && load <= self.peak / 2 {
            self.peak = load;
            return true;
        }
        false
    }
}

/// Returns free heap pages to the kernel (glibc); nothing elsewhere.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether trimming is on (`DATAPLANE_MALLOC_TRIM` unset, or anything but `0`).
pub fn enabled() -> bool {
    std::env::var_os("DATAPLANE_MALLOC_TRIM").is_none_or(|v| v != "0")
}

/// Trims after bursts until `stop`; `load` (now, and the peak since it was
/// last read) is read once per [`TICK`].
pub async fn trim_after_bursts(load: impl Fn() -> (u64, u64), stop: CancellationToken) {
    let mut trimmer = Trimmer::default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = stop.cancelled() => return,
        }
        let (now, peak) = load();
        if trimmer.due(now, peak) {
            // A trim walks the free lists and takes milliseconds on a
            // large heap: off the runtime's workers.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_a_burst_once_the_load_halved() {
        let mut t = Trimmer::default();
        assert!(!t.due(100, 100), "small loads never trim");
        assert!(!t.due(10, 10));
        assert!(!t.due(10_000, 10_000), "at the peak: not yet");
        assert!(!t.due(6_000, 10_000), "more than half the peak still held");
        assert!(t.due(4_000, 6_000), "half gone: trim");
        assert!(!t.due(3_000, 4_000), "the peak is now 4,000; 3,000 is more than half of it");
        assert!(t.due(0, 3_000), "and trims again when the rest goes");
        assert!(!t.due(0, 0), "nothing more to give back");
        // A burst between two ticks: never seen as the load, seen as a peak.
        let mut t = Trimmer::default();
        assert!(t.due(0, 10_000), "a burst that came and went within a tick");
    }
}
