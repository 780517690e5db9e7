//! Which live connections a new stream may go to, best first: those whose
//! peer is neither draining nor suspected dead, in round-robin order (so
//! new flows spread over a peer's connections and over replicas), then the
//! suspected ones, then the draining ones (still serving until their grace
//! ends). A caller tries them in order: a stream that cannot be opened or
//! answered on one goes to the next.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use super::control::ConnState;

/// Where a new stream goes.
#[derive(Clone, Copy, Debug)]
pub enum Via<'a> {
    /// Any connection of this `peers` entry.
    Peer(&'a str),
    /// Any connection with a trusted advertisement covering the destination.
    Advertised(SocketAddr),
}

/// A live connection a stream may be opened on.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub(super) conn: quinn::Connection,
    pub(super) state: Arc<ConnState>,
    /// The `peers` entry that admitted it.
    pub peer: Arc<str>,
}

impl Candidate {
    /// Datagrams received on the connection so far: a peer that is alive
    /// acknowledges what it is sent, so a count that does not move after a
    /// send means a peer that is gone (or a path that is).
    pub fn received(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Marks the connection suspected dead: new streams prefer others
    /// until it receives anything again.
    pub fn suspect(&self) {
        self.state.suspect_at.store(self.received().saturating_add(1), Relaxed);
    }

    fn is_suspect(&self) -> bool {
        let at = self.state.suspect_at.load(Relaxed);
        at != 0 && at == self.received().saturating_add(1)
    }

    fn draining(&self) -> bool {
        self.state.draining.load(Relaxed)
    }
}

/// `all` ordered best first, the best class rotated by `next`.
pub(super) fn order(all: Vec<Candidate>, next: &AtomicUsize) -> Vec<Candidate> {
    // Each key read once (they are live counters, and a sort must see a
    // fixed order); stable, so the rotation below is over a fixed order.
    let mut keyed: Vec<((bool, bool), Candidate)> =
        all.into_iter().map(|c| ((c.draining(), c.is_suspect()), c)).collect();
    keyed.sort_by_key(|(k, _)| *k);
    let best = keyed.iter().take_while(|(k, _)| *k == (false, false)).count().max(1).min(keyed.len());
    let mut all: Vec<Candidate> = keyed.into_iter().map(|(_, c)| c).collect();
    if best > 0 {
        let turn = next.fetch_add(1, Relaxed) % best;
        all[..best].rotate_left(turn);
    }
    all
}
