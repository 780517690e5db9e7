//! The pool of live connections to each peer: registered when a connection
//! comes up, removed when it closes; `candidates` orders them for new
//! streams.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::control::ConnState;
use crate::identity::IdentityPattern;

/// Totals of connections that closed, so per-peer counters stay monotonic.
#[derive(Debug, Default)]
pub(super) struct Retired {
    pub lost_packets: u64,
    pub sent: u64,
    pub received: u64,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
}

/// Live connections to one peer (a `peers` entry: with a pattern, every
/// identity it admits).
#[derive(Debug)]
pub(super) struct PeerSlot {
    pub name: Arc<str>,
    pub identity: IdentityPattern,
    conns: Mutex<Vec<(quinn::Connection, Arc<ConnState>)>>,
    /// Connections this agent keeps dialled to the peer (0: it dials us).
    pub dialers: u32,
    /// Routes the peer advertises may be learned (`peers[].learn`): only
    /// then are its advertisements kept.
    pub learns: bool,
    /// Connections this agent accepted and holds now, per exact identity
    /// (an entry exists only while it holds one, so a pattern admitting
    /// any number of identities keeps no more entries than connections).
    accepted: Mutex<HashMap<Arc<str>, usize>>,
    pub retired: Mutex<Retired>,
}

/// One of an identity's accepted connections, counted against
/// `limits.connections_per_peer` until dropped.
#[derive(Debug)]
pub(super) struct Accepted(Arc<PeerSlot>, Arc<str>);

impl Accepted {
    /// The exact identity this connection is counted for.
    pub fn identity(&self) -> Arc<str> {
        self.1.clone()
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        let mut held = crate::lock(&self.0.accepted);
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

impl PeerSlot {
    pub fn new(name: &str, identity: &IdentityPattern, dialers: u32, learns: bool) -> PeerSlot {
        PeerSlot {
            name: Arc::from(name),
            identity: identity.clone(),
            conns: Mutex::new(Vec::new()),
            dialers,
            learns,
            accepted: Mutex::default(),
            retired: Mutex::default(),
        }
    }

    /// Counts one more accepted connection from `identity`, unless it
    /// holds `cap` already.
    pub fn try_accept(self: &Arc<Self>, identity: &Arc<str>, cap: usize) -> Option<Accepted> {
        let mut held = crate::lock(&self.accepted);
        let n = held.entry(identity.clone()).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Accepted(self.clone(), identity.clone()))
    }

    pub fn add(&self, c: &quinn::Connection, state: Arc<ConnState>) {
        crate::lock(&self.conns).push((c.clone(), state));
    }

    pub fn remove(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).retain(|(x, _)| x.stable_id() != c.stable_id());
        let st = c.stats();
        let mut r = crate::lock(&self.retired);
        r.lost_packets += st.path.lost_packets;
        r.sent += st.udp_tx.bytes;
        r.received += st.udp_rx.bytes;
        r.datagrams_sent += st.udp_tx.datagrams;
        r.datagrams_received += st.udp_rx.datagrams;
    }

    pub fn live(&self) -> Vec<quinn::Connection> {
        let conns = crate::lock(&self.conns);
        conns.iter().filter(|(c, _)| c.close_reason().is_none()).map(|(c, _)| c.clone()).collect()
    }

    /// The live connections with what their peer said on them.
    pub fn live_states(&self) -> Vec<(quinn::Connection, Arc<ConnState>)> {
        let conns = crate::lock(&self.conns);
        conns.iter().filter(|(c, _)| c.close_reason().is_none()).cloned().collect()
    }
}
