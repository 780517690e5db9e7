//! How full the per-socket maps are, and what the LRU ones evicted.

use dataplane_common::Counter;

use super::Steering;
use crate::lock;

impl Steering {
    /// Entries in the per-socket maps and what the LRU maps evicted,
    /// counted at most every [`ENTRIES_EVERY`] (a scrape in between gets
    /// the last count): counting walks the maps.
    ///
    /// Evicted is what went in, less what the programs removed at close,
    /// less what is there. Inserts are read before the walk and removals
    /// after it, so an entry that comes or goes during the walk can only
    /// make the figure low, never invent an eviction; it is kept monotonic.
    /// The counters live as long as the maps, so this holds across agent
    /// restarts. An entry FLOWS overwrote (a client's address and port
    /// reused while a missed close left the old one) counts as evicted.
    pub fn map_stats(&self) -> MapStats {
        let mut cached = lock(&self.map_stats);
        if let Some((at, stats)) = *cached
            && at.elapsed() < ENTRIES_EVERY
        {
            return stats;
        }
        let before = self.counters().unwrap_or_default();
        // One map at a time (the flow path waits on these locks), and at
        // most a little past capacity: under churn a walk whose cursor key
        // is deleted starts over.
        let walk = |cap: u32| cap as usize + 1024;
        let orig_dst = lock(&self.orig_dst).keys().take(walk(self.capacity.flows)).count() as u64;
        let flows = lock(&self.flows).keys().take(walk(self.capacity.flows)).count() as u64;
        let bypass = lock(&self.bypass).keys().take(walk(self.capacity.bypass)).count() as u64;
        let after = self.counters().unwrap_or_default();
        let gone = |inserted: Counter, removed: Counter, present: u64| {
            before.get(inserted).saturating_sub(after.get(removed)).saturating_sub(present)
        };
        let previous = cached.map(|(_, s)| s).unwrap_or_default();
        let stats = MapStats {
            orig_dst,
            flows,
            bypass,
            orig_dst_evicted: previous.orig_dst_evicted.max(gone(
                Counter::ConnectRedirected,
                Counter::SockOpsClosed,
                orig_dst,
            )),
            flows_evicted: previous.flows_evicted.max(gone(
                Counter::SockOpsFlowRecorded,
                Counter::SockOpsFlowForgotten,
                flows,
            )),
        };
        *cached = Some((std::time::Instant::now(), stats));
        stats
    }
}

/// How often [`Steering::map_stats`] walks the maps.
const ENTRIES_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Entries in the per-socket maps, and what the LRU ones evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    pub orig_dst: u64,
    pub flows: u64,
    pub bypass: u64,
    pub orig_dst_evicted: u64,
    pub flows_evicted: u64,
}
