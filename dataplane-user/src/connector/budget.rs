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

/// One identity's use of its budget.
#[derive(Debug)]
pub(super) struct PeerUse {
    /// The `peers` entry that admitted it: the metrics label.
    pub name: Arc<str>,
    pub streams: AtomicUsize,
    pub dials: AtomicUsize,
    /// Woken when a dial slot comes free.
    dial_freed: Notify,
}

/// Budgets by exact identity: a `peers` pattern admits any number of
/// nodes, and each has a budget of its own (one node of a fleet cannot take
/// the others' share). An identity has an entry only while it holds a
/// permit, so the table is never larger than the streams being served.
#[derive(Debug)]
pub(super) struct PeerBudgets {
    in_use: Mutex<HashMap<Arc<str>, Arc<PeerUse>>>,
    /// The configured peers' names, for the metrics' first scrape (a
    /// reload replaces them).
    names: Mutex<Vec<Arc<str>>>,
    caps: Mutex<PeerCaps>,
}

/// A unit of an identity's budget, given back on drop (waking a waiter,
/// for dials); the last one gone takes the identity's entry with it.
#[derive(Debug)]
pub(super) struct Permit {
    budgets: Arc<PeerBudgets>,
    identity: Arc<str>,
    of: Arc<PeerUse>,
    dial: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.dial {
            self.of.dials.fetch_sub(1, Ordering::AcqRel);
            self.of.dial_freed.notify_one();
        } else {
            self.of.streams.fetch_sub(1, Ordering::AcqRel);
        }
        // Permits are taken under the lock, so an entry seen idle here
        // stays idle until removed.
        let mut in_use = crate::lock(&self.budgets.in_use);
        if self.of.streams.load(Ordering::Acquire) == 0
            && self.of.dials.load(Ordering::Acquire) == 0
            && in_use.get(&self.identity).is_some_and(|u| Arc::ptr_eq(u, &self.of))
        {
            in_use.remove(&self.identity);
        }
    }
}

/// Who a permit is for: the exact identity and the entry that admitted it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Holder<'a> {
    pub name: &'a Arc<str>,
    pub identity: &'a Arc<str>,
}

impl PeerBudgets {
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a str>, caps: PeerCaps) -> PeerBudgets {
        PeerBudgets {
            in_use: Mutex::default(),
            names: Mutex::new(peers.into_iter().map(Arc::from).collect()),
            caps: Mutex::new(caps),
        }
    }

    pub fn names(&self) -> Vec<Arc<str>> {
        crate::lock(&self.names).clone()
    }

    pub fn set_names(&self, names: Vec<Arc<str>>) {
        *crate::lock(&self.names) = names;
    }

    pub fn caps(&self) -> PeerCaps {
        *crate::lock(&self.caps)
    }

    pub fn set_caps(&self, caps: PeerCaps) {
        *crate::lock(&self.caps) = caps;
    }

    /// Streams being served and dials in flight now, by `peers` entry.
    pub fn use_by_name(&self) -> HashMap<Arc<str>, (usize, usize)> {
        let mut out: HashMap<Arc<str>, (usize, usize)> =
            self.names().into_iter().map(|n| (n, (0, 0))).collect();
        for u in crate::lock(&self.in_use).values() {
            let e = out.entry(u.name.clone()).or_default();
            e.0 += u.streams.load(Ordering::Acquire);
            e.1 += u.dials.load(Ordering::Acquire);
        }
        out
    }

    /// Streams being served and dials in flight for one exact identity.
    pub fn use_of(&self, identity: &str) -> (usize, usize) {
        crate::lock(&self.in_use)
            .get(identity)
            .map_or((0, 0), |u| (u.streams.load(Ordering::Acquire), u.dials.load(Ordering::Acquire)))
    }

    /// A stream permit for `holder`, unless it is at its cap.
    pub fn stream(self: &Arc<Self>, holder: Holder<'_>, caps: &PeerCaps) -> Option<Permit> {
        self.take(holder, caps.streams, false).ok()
    }

    /// A dial permit for `holder`, waiting up to `within` for one to come
    /// free; `None` if none did.
    pub async fn dial(
        self: &Arc<Self>,
        holder: Holder<'_>,
        caps: &PeerCaps,
        within: Duration,
    ) -> Option<Permit> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let of = match self.take(holder, caps.dials, true) {
                Ok(p) => return Some(p),
                Err(of) => of,
            };
            // Registered before the second check, so a slot freed in
            // between is not missed. The entry cannot go while its holder
            // waits: the waiting stream holds a stream permit of its own.
            let freed = of.dial_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Ok(p) = self.take(holder, caps.dials, true) {
                return Some(p);
            }
            tokio::time::timeout_at(deadline, freed).await.ok()?;
        }
    }

    /// One more of `holder`'s streams or dials, under `cap`; at the cap,
    /// the entry (to wait on).
    fn take(self: &Arc<Self>, holder: Holder<'_>, cap: usize, dial: bool) -> Result<Permit, Arc<PeerUse>> {
        let mut in_use = crate::lock(&self.in_use);
        let of = in_use
            .entry(holder.identity.clone())
            .or_insert_with(|| {
                Arc::new(PeerUse {
                    name: holder.name.clone(),
                    streams: AtomicUsize::new(0),
                    dials: AtomicUsize::new(0),
                    dial_freed: Notify::new(),
                })
            })
            .clone();
        let count = if dial { &of.dials } else { &of.streams };
        // An atomic step, not a load and a store: a permit dropping
        // meanwhile decrements outside the lock, and its decrement must
        // not be overwritten.
        if count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).is_err() {
            // Not left behind empty: a refused stream holds nothing.
            if of.streams.load(Ordering::Acquire) == 0 && of.dials.load(Ordering::Acquire) == 0 {
                in_use.remove(holder.identity);
            }
            return Err(of);
        }
        drop(in_use);
        Ok(Permit { budgets: self.clone(), identity: holder.identity.clone(), of, dial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder<'a>(name: &'a Arc<str>, identity: &'a Arc<str>) -> Holder<'a> {
        Holder { name, identity }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dial_waits_for_a_slot_then_gives_up() {
        let caps = PeerCaps { streams: 8, dials: 1, header_timeout: Duration::from_secs(1) };
        let b = Arc::new(PeerBudgets::new(["p"], caps));
        let (name, id): (Arc<str>, Arc<str>) = ("p".into(), "spiffe://t/p".into());
        let _stream = b.stream(holder(&name, &id), &caps).expect("a stream");
        let held = b.dial(holder(&name, &id), &caps, DIAL_QUEUE).await.expect("a free slot");
        let waiter = tokio::spawn({
            let (b, name, id) = (b.clone(), name.clone(), id.clone());
            async move { b.dial(holder(&name, &id), &caps, DIAL_QUEUE).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        assert!(waiter.await.expect("task"), "a slot freed within the wait is taken");
        let _held = b.dial(holder(&name, &id), &caps, DIAL_QUEUE).await.expect("free again");
        let start = tokio::time::Instant::now();
        assert!(b.dial(holder(&name, &id), &caps, DIAL_QUEUE).await.is_none(), "none frees: refused");
        assert_eq!(start.elapsed(), DIAL_QUEUE, "after waiting the whole queue time");
    }

    #[tokio::test]
    async fn each_identity_has_its_own_budget_and_leaves_nothing_behind() {
        let caps = PeerCaps { streams: 2, dials: 1, header_timeout: Duration::from_secs(1) };
        let b = Arc::new(PeerBudgets::new(["nodes"], caps));
        let name: Arc<str> = "nodes".into();
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("spiffe://t/node/a".into(), "spiffe://t/node/b".into());
        let held: Vec<Permit> =
            (0..2).map(|_| b.stream(holder(&name, &noisy), &caps).expect("within the cap")).collect();
        assert!(b.stream(holder(&name, &noisy), &caps).is_none(), "the third stream is over the cap");
        let other = b.stream(holder(&name, &quiet), &caps).expect("another identity of the same pattern");
        let dial = b
            .dial(holder(&name, &noisy), &caps, Duration::ZERO)
            .await
            .expect("dials are budgeted apart from streams");
        assert!(b.dial(holder(&name, &noisy), &caps, Duration::ZERO).await.is_none());
        assert_eq!(b.use_by_name()[&name], (3, 1), "summed by entry for the metrics");
        drop(dial);
        assert!(
            b.dial(holder(&name, &noisy), &caps, Duration::ZERO).await.is_some(),
            "given back when dropped"
        );
        drop(held);
        drop(other);
        assert_eq!(b.use_of(&noisy), (0, 0));
        assert!(crate::lock(&b.in_use).is_empty(), "no entry outlives its permits");
        // A refusal leaves nothing either.
        let zero = PeerCaps { streams: 0, ..caps };
        assert!(b.stream(holder(&name, &noisy), &zero).is_none());
        assert!(crate::lock(&b.in_use).is_empty());
    }

    /// Permits taken and dropped from many threads at once: every count
    /// returns to zero and no entry is left (a lost decrement would leave
    /// one, and shrink the identity's cap for good).
    #[test]
    fn concurrent_permits_leave_exact_counts() {
        let caps = PeerCaps { streams: 4, dials: 4, header_timeout: Duration::from_secs(1) };
        let b = Arc::new(PeerBudgets::new(["p"], caps));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let name: Arc<str> = "p".into();
                    let id: Arc<str> = format!("spiffe://t/node/{}", t % 2).into();
                    let mut granted = 0;
                    for _ in 0..20_000 {
                        if let Some(p) = b.stream(holder(&name, &id), &caps) {
                            granted += 1;
                            drop(p);
                        }
                    }
                    granted
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert!(granted > 0);
        assert!(crate::lock(&b.in_use).is_empty(), "every count back to zero, every entry gone");
    }

    #[test]
    fn a_lower_cap_applies_to_new_permits() {
        let caps = PeerCaps { streams: 3, dials: 3, header_timeout: Duration::from_secs(1) };
        let b = Arc::new(PeerBudgets::new(["p"], caps));
        let (name, id): (Arc<str>, Arc<str>) = ("p".into(), "spiffe://t/p".into());
        let _held: Vec<Permit> =
            (0..2).map(|_| b.stream(holder(&name, &id), &caps).expect("within")).collect();
        let lower = PeerCaps { streams: 1, ..caps };
        b.set_caps(lower);
        assert!(b.stream(holder(&name, &id), &b.caps()).is_none(), "two held, the cap is now one");
    }
}
