//! Admission of connection attempts before anyone is authenticated: each
//! Initial a stranger sends costs a handshake (TLS state, a connection, its
//! timers), so how many run at once is capped, in all and per source
//! address, and beyond a threshold a source must first prove it owns its
//! address (a QUIC Retry round trip) so spoofed floods get no handshake.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Unvalidated attempts are answered with a Retry once this many handshakes
/// are in flight. Below it, a handshake costs no extra round trip.
pub const RETRY_ABOVE: usize = 32;
/// Handshakes in flight at most; attempts beyond are dropped unanswered.
/// Tunnel connections are few and long-lived (a node keeps two per peer), so
/// even a relay for hundreds of nodes reconnecting at once stays below it.
pub const MAX_HANDSHAKES: usize = 256;
/// Handshakes in flight from one IP address at most. Generous, because many
/// nodes may share one egress address (a NAT in front of a cluster).
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 64;

/// What to do with a connection attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Ask the source to prove its address first.
    Retry,
    /// Too many handshakes in flight: drop the attempt unanswered (an answer
    /// to a spoofed address would make us a reflector).
    Busy,
    /// Too many handshakes in flight from this source.
    PerSource,
}

impl Verdict {
    /// The metric label of a refusal.
    pub const fn reason(self) -> &'static str {
        match self {
            Verdict::Admit => "admitted",
            Verdict::Retry => "retry",
            Verdict::Busy => "busy",
            Verdict::PerSource => "per_source",
        }
    }
}

/// The decision alone, for tests: `in_flight` handshakes in all, `from_source`
/// of them from this attempt's address, whether the address is validated
/// (the attempt carries our Retry token), and whether a Retry is possible
/// (not once the attempt already answered one).
pub fn decide(in_flight: usize, from_source: usize, validated: bool, may_retry: bool) -> Verdict {
    if !validated && may_retry && in_flight >= RETRY_ABOVE {
        Verdict::Retry
    } else if in_flight >= MAX_HANDSHAKES {
        Verdict::Busy
    } else if from_source >= MAX_HANDSHAKES_PER_SOURCE {
        Verdict::PerSource
    } else {
        Verdict::Admit
    }
}

/// Handshakes in flight, in all and per source address. Only admitted
/// attempts are counted, so the map holds at most [`MAX_HANDSHAKES`] keys
/// however many addresses a flood spoofs.
#[derive(Debug, Default)]
pub struct Admission {
    in_flight: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Held while an admitted handshake runs; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    /// Decides on an attempt from `source`; an admitted one holds its slot
    /// until the returned guard is dropped.
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        validated: bool,
        may_retry: bool,
    ) -> Result<Slot, Verdict> {
        let source = source.to_canonical();
        let mut state = crate::lock(&self.in_flight);
        let (total, per_source) = &mut *state;
        let from_source = per_source.get(&source).copied().unwrap_or(0);
        match decide(*total, from_source, validated, may_retry) {
            Verdict::Admit => {
                *total += 1;
                *per_source.entry(source).or_default() += 1;
                Ok(Slot { admission: self.clone(), source })
            }
            refused => Err(refused),
        }
    }

    /// Handshakes in flight now.
    pub fn in_flight(&self) -> usize {
        crate::lock(&self.in_flight).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = crate::lock(&self.admission.in_flight);
        let (total, per_source) = &mut *state;
        *total = total.saturating_sub(1);
        if let Some(n) = per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_comes_first_then_the_caps() {
        assert_eq!(decide(0, 0, false, true), Verdict::Admit);
        assert_eq!(decide(RETRY_ABOVE - 1, 0, false, true), Verdict::Admit);
        assert_eq!(decide(RETRY_ABOVE, 0, false, true), Verdict::Retry);
        // A validated source (or one that already answered a Retry) is not
        // asked again.
        assert_eq!(decide(RETRY_ABOVE, 0, true, true), Verdict::Admit);
        assert_eq!(decide(RETRY_ABOVE, 0, false, false), Verdict::Admit);
        assert_eq!(decide(MAX_HANDSHAKES, 0, true, false), Verdict::Busy);
        assert_eq!(decide(100, MAX_HANDSHAKES_PER_SOURCE, true, false), Verdict::PerSource);
    }

    #[test]
    fn slots_are_counted_per_source_and_freed_on_drop() {
        let a = Arc::new(Admission::default());
        let one: IpAddr = "192.0.2.1".parse().expect("ip");
        let two: IpAddr = "::ffff:192.0.2.2".parse().expect("ip");
        let mut held: Vec<Slot> =
            (0..MAX_HANDSHAKES_PER_SOURCE).map(|_| a.admit(one, true, false).expect("admitted")).collect();
        assert_eq!(a.admit(one, true, false).err(), Some(Verdict::PerSource));
        // Another source is unaffected; a mapped address counts as its IPv4 self.
        let other = a.admit(two, true, false).expect("another source");
        assert_eq!(other.source, "192.0.2.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(a.in_flight(), MAX_HANDSHAKES_PER_SOURCE + 1);
        held.pop();
        assert!(a.admit(one, true, false).is_ok(), "a freed slot is reusable");
        drop(held);
        drop(other);
        assert_eq!(a.in_flight(), 0);
        assert!(crate::lock(&a.in_flight).1.is_empty(), "no per-source entry outlives its handshakes");
    }
}
