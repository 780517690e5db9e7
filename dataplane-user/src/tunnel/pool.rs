//! The pool of live connections to each peer: registered when a connection
//! comes up, removed when it closes, picked round-robin for new streams.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering::Relaxed},
};

/// Totals of connections that closed, so per-peer counters stay monotonic.
#[derive(Debug, Default)]
pub(super) struct Retired {
    pub lost_packets: u64,
    pub sent: u64,
    pub received: u64,
}

/// Live connections to one peer.
#[derive(Debug)]
pub(super) struct PeerSlot {
    pub name: Arc<str>,
    pub identity: String,
    conns: Mutex<Vec<quinn::Connection>>,
    next: AtomicUsize,
    /// Connections this agent keeps dialled to the peer (0: it dials us).
    pub dialers: u32,
    /// Connections this agent accepted from the peer and holds now.
    accepted: AtomicUsize,
    pub retired: Mutex<Retired>,
}

/// One of a peer's accepted connections, counted against
/// `limits.connections_per_peer` until dropped.
#[derive(Debug)]
pub(super) struct Accepted(Arc<PeerSlot>);

impl Drop for Accepted {
    fn drop(&mut self) {
        self.0.accepted.fetch_sub(1, Relaxed);
    }
}

impl PeerSlot {
    pub fn new(name: &str, identity: &str, dialers: u32) -> PeerSlot {
        PeerSlot {
            name: Arc::from(name),
            identity: identity.to_owned(),
            conns: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            dialers,
            accepted: AtomicUsize::new(0),
            retired: Mutex::default(),
        }
    }

    /// Counts one more accepted connection, unless the peer holds `cap`.
    pub fn try_accept(self: &Arc<Self>, cap: usize) -> Option<Accepted> {
        self.accepted.fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(Accepted(self.clone()))
    }

    pub fn add(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).push(c.clone());
    }

    pub fn remove(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).retain(|x| x.stable_id() != c.stable_id());
        let st = c.stats();
        let mut r = crate::lock(&self.retired);
        r.lost_packets += st.path.lost_packets;
        r.sent += st.udp_tx.bytes;
        r.received += st.udp_rx.bytes;
    }

    pub fn live(&self) -> Vec<quinn::Connection> {
        let conns = crate::lock(&self.conns);
        conns.iter().filter(|c| c.close_reason().is_none()).cloned().collect()
    }

    /// Round-robin over the live connections.
    pub fn pick(&self) -> Option<quinn::Connection> {
        let conns = crate::lock(&self.conns);
        let live: Vec<&quinn::Connection> = conns.iter().filter(|c| c.close_reason().is_none()).collect();
        if live.is_empty() {
            return None;
        }
        Some(live[self.next.fetch_add(1, Relaxed) % live.len()].clone())
    }
}
