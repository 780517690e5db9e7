//! What one peer identity may make the connector hold at once: streams being
//! served and dials in flight. A peer at its caps gets refusals at once;
//! every other peer keeps its own budget, so one noisy (or hostile) peer
//! cannot take another's share.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::config::Limits;

/// The caps in force; a reload replaces them (streams already held keep
/// their permits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCaps {
    pub streams: usize,
    pub dials: usize,
    pub header_timeout: Duration,
}

impl From<&Limits> for PeerCaps {
    fn from(l: &Limits) -> Self {
        PeerCaps {
            streams: l.streams_per_peer,
            dials: l.dials_per_peer,
            header_timeout: l.stream_header_timeout,
        }
    }
}

/// One peer's use of its budget.
#[derive(Debug, Default)]
pub(super) struct PeerUse {
    pub streams: Arc<AtomicUsize>,
    pub dials: Arc<AtomicUsize>,
}

/// Budgets of the configured peers (peers change only on restart, so the
/// set is fixed and no peer can add to it).
#[derive(Debug)]
pub(super) struct PeerBudgets {
    pub peers: HashMap<Arc<str>, PeerUse>,
    caps: Mutex<PeerCaps>,
}

/// A unit of a peer's budget, given back on drop.
#[derive(Debug)]
pub(super) struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PeerBudgets {
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a str>, caps: PeerCaps) -> PeerBudgets {
        let peers = peers.into_iter().map(|p| (Arc::from(p), PeerUse::default())).collect();
        PeerBudgets { peers, caps: Mutex::new(caps) }
    }

    pub fn caps(&self) -> PeerCaps {
        *crate::lock(&self.caps)
    }

    pub fn set_caps(&self, caps: PeerCaps) {
        *crate::lock(&self.caps) = caps;
    }

    /// A stream permit for `peer`, unless it is at its cap (or unknown).
    pub fn stream(&self, peer: &str, caps: &PeerCaps) -> Option<Permit> {
        take(&self.peers.get(peer)?.streams, caps.streams)
    }

    /// A dial permit for `peer`, unless it is at its cap (or unknown).
    pub fn dial(&self, peer: &str, caps: &PeerCaps) -> Option<Permit> {
        take(&self.peers.get(peer)?.dials, caps.dials)
    }
}

fn take(count: &Arc<AtomicUsize>, cap: usize) -> Option<Permit> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
        .ok()
        .map(|_| Permit(count.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_at_its_cap_is_refused_and_others_are_not() {
        let caps = PeerCaps { streams: 2, dials: 1, header_timeout: Duration::from_secs(1) };
        let b = PeerBudgets::new(["noisy", "quiet"], caps);
        let held: Vec<Permit> = (0..2).map(|_| b.stream("noisy", &caps).expect("within the cap")).collect();
        assert!(b.stream("noisy", &caps).is_none(), "the third stream is over the cap");
        assert!(b.stream("quiet", &caps).is_some(), "another peer has its own budget");
        assert!(b.stream("stranger", &caps).is_none(), "a name not configured has no budget");
        let dial = b.dial("noisy", &caps).expect("dials are budgeted apart from streams");
        assert!(b.dial("noisy", &caps).is_none());
        drop(dial);
        assert!(b.dial("noisy", &caps).is_some(), "a permit comes back when dropped");
        drop(held);
        assert_eq!(b.peers["noisy"].streams.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_lower_cap_applies_to_new_permits() {
        let caps = PeerCaps { streams: 3, dials: 3, header_timeout: Duration::from_secs(1) };
        let b = PeerBudgets::new(["p"], caps);
        let _held: Vec<Permit> = (0..2).map(|_| b.stream("p", &caps).expect("within")).collect();
        let lower = PeerCaps { streams: 1, ..caps };
        b.set_caps(lower);
        assert!(b.stream("p", &b.caps()).is_none(), "two held, the cap is now one");
    }
}
