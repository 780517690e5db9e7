//! The bytes a flow moves, counted where they move (one relaxed add per
//! chunk) and watched for silence: `limits.flow_idle_timeout` ends a flow
//! that moved nothing in either direction for that long.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use tokio::time::Instant;

/// Bytes moved so far: up (application to destination) and down.
#[derive(Debug, Default)]
pub struct Traffic {
    up: AtomicU64,
    down: AtomicU64,
}

impl Traffic {
    pub fn up(&self, n: u64) {
        self.up.fetch_add(n, Relaxed);
    }

    pub fn down(&self, n: u64) {
        self.down.fetch_add(n, Relaxed);
    }

    /// (up, down).
    pub fn totals(&self) -> (u64, u64) {
        (self.up.load(Relaxed), self.down.load(Relaxed))
    }

    /// Resolves once nothing moved for `limit`; never, without one. Looks
    /// eight times per `limit` (at most every 100 ms), so a flow is ended
    /// between `limit` and an eighth more after its last byte, at a timer
    /// per flow and no work per byte beyond the count.
    pub async fn silent_for(&self, limit: Option<Duration>) {
        let Some(limit) = limit else { return std::future::pending().await };
        let tick = (limit / 8).max(Duration::from_millis(100));
        let (mut seen, mut since) = (self.totals(), Instant::now());
        loop {
            tokio::time::sleep(tick).await;
            let now = self.totals();
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= limit {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_ends_only_after_the_limit_since_the_last_byte() {
        let t = Traffic::default();
        let limit = Duration::from_secs(8);
        let start = Instant::now();
        let watch = t.silent_for(Some(limit));
        tokio::pin!(watch);
        // Bytes at 5 s push the end out to 13 s or a tick after it.
        tokio::select! {
            _ = &mut watch => panic!("ended while bytes moved"),
            _ = tokio::time::sleep(Duration::from_secs(5)) => t.down(1),
        }
        watch.await;
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(13) && took <= Duration::from_secs(15), "{took:?}");
        assert_eq!(t.totals(), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_it_never_ends() {
        let t = Traffic::default();
        let ended = tokio::time::timeout(Duration::from_secs(86_400), t.silent_for(None)).await;
        assert!(ended.is_err());
    }
}
