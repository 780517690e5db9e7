//! What one peer identity may make the connector hold at once: streams being
//! served and dials in flight. A stream over its peer's stream cap is
//! refused at once; one that finds every dial slot taken waits up to
//! [`DIAL_QUEUE`] for one (a burst of new flows is smoothed, not refused)
//! and is refused after. Every other peer keeps its own budget, so one noisy
//! (or hostile) peer cannot take another's share.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::config::Limits;

/// How long a stream waits for one of its peer's dial slots.
pub const DIAL_QUEUE: Duration = Duration::from_secs(1);

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
    /// Woken when a dial slot comes free.
    dial_freed: Arc<Notify>,
}

/// Budgets of the configured peers (peers change only on restart, so the
/// set is fixed and no peer can add to it).
#[derive(Debug)]
pub(super) struct PeerBudgets {
    pub peers: HashMap<Arc<str>, PeerUse>,
    caps: Mutex<PeerCaps>,
}

/// A unit of a peer's budget, given back on drop (waking a waiter, for
/// dials).
#[derive(Debug)]
pub(super) struct Permit(Arc<AtomicUsize>, Option<Arc<Notify>>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        if let Some(n) = &self.1 {
            n.notify_one();
        }
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
        take(&self.peers.get(peer)?.streams, caps.streams, None)
    }

    /// A dial permit for `peer`, waiting up to `within` for one to come
    /// free; `None` if none did (or the peer is unknown).
    pub async fn dial(&self, peer: &str, caps: &PeerCaps, within: Duration) -> Option<Permit> {
        let u = self.peers.get(peer)?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Registered before the check, so a slot freed in between is
            // not missed.
            let freed = u.dial_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(p) = take(&u.dials, caps.dials, Some(u.dial_freed.clone())) {
                return Some(p);
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }
}

fn take(count: &Arc<AtomicUsize>, cap: usize, wake: Option<Arc<Notify>>) -> Option<Permit> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
        .ok()
        .map(|_| Permit(count.clone(), wake))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dial_waits_for_a_slot_then_gives_up() {
        let caps = PeerCaps { streams: 8, dials: 1, header_timeout: Duration::from_secs(1) };
        let b = Arc::new(PeerBudgets::new(["p"], caps));
        let held = b.dial("p", &caps, DIAL_QUEUE).await.expect("a free slot");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.dial("p", &caps, DIAL_QUEUE).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        assert!(waiter.await.expect("task"), "a slot freed within the wait is taken");
        let _held = b.dial("p", &caps, DIAL_QUEUE).await.expect("free again");
        let start = tokio::time::Instant::now();
        assert!(b.dial("p", &caps, DIAL_QUEUE).await.is_none(), "none frees: refused");
        assert_eq!(start.elapsed(), DIAL_QUEUE, "after waiting the whole queue time");
    }

    #[tokio::test]
    async fn a_peer_at_its_cap_is_refused_and_others_are_not() {
        let caps = PeerCaps { streams: 2, dials: 1, header_timeout: Duration::from_secs(1) };
        let b = PeerBudgets::new(["noisy", "quiet"], caps);
        let held: Vec<Permit> = (0..2).map(|_| b.stream("noisy", &caps).expect("within the cap")).collect();
        assert!(b.stream("noisy", &caps).is_none(), "the third stream is over the cap");
        assert!(b.stream("quiet", &caps).is_some(), "another peer has its own budget");
        assert!(b.stream("stranger", &caps).is_none(), "a name not configured has no budget");
        let dial =
            b.dial("noisy", &caps, Duration::ZERO).await.expect("dials are budgeted apart from streams");
        assert!(b.dial("noisy", &caps, Duration::ZERO).await.is_none());
        drop(dial);
        assert!(b.dial("noisy", &caps, Duration::ZERO).await.is_some(), "a permit comes back when dropped");
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
