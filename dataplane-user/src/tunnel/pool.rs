//! The pool of live connections to each peer: registered when a connection
//! comes up, removed when it closes; `candidates` orders them for new
//! streams.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

use super::control::ConnState;
use crate::identity::IdentityPattern;

/// What a `peers` entry asks of the tunnel. An entry whose spec is the same
/// after a reload keeps its slot and connections; one whose spec changed
/// gets a new slot (its connections are replaced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PeerSpec {
    pub identity: IdentityPattern,
    pub dial: Vec<SocketAddr>,
    /// Connections this agent keeps dialled to the peer (0: it dials us).
    pub dialers: u32,
    /// Routes the peer advertises may be learned (`peers[].learn`): only
    /// then are its advertisements kept.
    pub learns: bool,
    /// The handler treats the peer's streams as a relay's (`peers[].relay`):
    /// a change must not apply to connections admitted before it.
    pub relay: bool,
}

/// Totals of connections that closed, so per-peer counters stay monotonic.
#[derive(Debug, Default)]
pub(super) struct ClosedTotals {
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
    /// What the entry asks for: its identity, dialers, learning.
    pub spec: PeerSpec,
    conns: Mutex<Vec<(quinn::Connection, Arc<ConnState>)>>,
    /// Cancelled when a reload removes or replaces the entry: its dialers
    /// stop and no connection is added to it any more.
    pub retired: CancellationToken,
    /// Connections this agent accepted and holds now, per exact identity
    /// (an entry exists only while it holds one, so a pattern admitting
    /// any number of identities keeps no more entries than connections).
    accepted: Mutex<HashMap<Arc<str>, usize>>,
    /// Shared with the slot that replaces this one under the same name, so
    /// the peer's counters stay monotonic across a reload.
    pub closed: Arc<Mutex<ClosedTotals>>,
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
    /// A slot for the entry `name`, continuing the counters `closed` of the
    /// one it replaces (if any).
    pub fn new(name: &str, spec: PeerSpec, closed: Option<Arc<Mutex<ClosedTotals>>>) -> PeerSlot {
        PeerSlot {
            name: Arc::from(name),
            spec,
            conns: Mutex::new(Vec::new()),
            retired: CancellationToken::new(),
            accepted: Mutex::default(),
            closed: closed.unwrap_or_default(),
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

    /// Registers a live connection, unless the slot is retired (the caller
    /// closes it then: the peer reconnects to the entry now in force).
    #[must_use]
    pub fn add(&self, c: &quinn::Connection, state: Arc<ConnState>) -> bool {
        let mut conns = crate::lock(&self.conns);
        // Checked under the lock `retire` closes the connections under, so
        // none is added after it looked.
        if self.retired.is_cancelled() {
            return false;
        }
        conns.push((c.clone(), state));
        true
    }

    /// Takes the slot out of service (a reload removed or replaced its
    /// entry): dialers stop and every connection is closed with `code`.
    pub fn retire(&self, code: quinn::VarInt, reason: &[u8]) {
        let conns = crate::lock(&self.conns);
        self.retired.cancel();
        for (c, _) in conns.iter() {
            c.close(code, reason);
        }
    }

    /// Closes the connections accepted from identities `keep` no longer
    /// gives this slot (a reload added an entry that admits them first).
    pub fn close_accepted_unless(
        &self,
        keep: impl Fn(&str) -> bool,
        code: quinn::VarInt,
        reason: &[u8],
    ) -> usize {
        let conns = crate::lock(&self.conns);
        let mut n = 0;
        for (c, state) in conns.iter() {
            if let Some(identity) = &state.accepted_from
                && !keep(identity)
            {
                c.close(code, reason);
                n += 1;
            }
        }
        n
    }

    pub fn remove(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).retain(|(x, _)| x.stable_id() != c.stable_id());
        let st = c.stats();
        let mut r = crate::lock(&self.closed);
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
