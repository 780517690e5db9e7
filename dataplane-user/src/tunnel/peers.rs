//! The configured peers as the tunnel holds them: a slot per `peers` entry,
//! the order accepted connections are matched in, and each peer's client
//! TLS. A reload replaces the set whole, in two steps: [`Tunnel::prepare_peers`]
//! builds the next set beside the running one (the only step that can
//! fail) and [`Tunnel::commit_peers`] swaps it in, so a refused reload
//! changes nothing and an applied one is never half done.
//!
//! An entry whose name and [`PeerSpec`] stay the same keeps its slot, its
//! connections and its counters. One removed or changed is retired: its
//! dialers stop and its connections close with [`CLOSE_RECONFIGURED`],
//! so the peer reconnects at once and is matched against the entries now
//! in force (or refused, if none admits it any more).

use std::{collections::HashMap, sync::Arc};

use quinn::{ClientConfig, VarInt};
use tracing::info;

use super::{
    Tunnel, TunnelError, crypto_configs,
    pool::{PeerSlot, PeerSpec},
};
use crate::{config::Peer, identity::IdentityPattern};

/// Close code for a connection whose `peers` entry a reload removed or
/// changed (or that an entry added by the reload now admits).
pub(super) const CLOSE_RECONFIGURED: VarInt = VarInt::from_u32(8);

/// The peers in force.
#[derive(Debug, Default)]
pub(super) struct PeerSet {
    pub by_name: HashMap<Arc<str>, Arc<PeerSlot>>,
    /// What admits an accepted connection: exact identities first, then
    /// patterns in file order.
    admits: Vec<Arc<PeerSlot>>,
    /// Per peer, the client side's TLS.
    pub clients: HashMap<Arc<str>, ClientConfig>,
}

impl PeerSet {
    /// The slots for `peers`, reusing those of `old` whose spec is the same.
    fn build(
        old: &PeerSet,
        peers: &[(&Peer, &IdentityPattern)],
        clients: HashMap<Arc<str>, ClientConfig>,
    ) -> PeerSet {
        let mut by_name = HashMap::new();
        let mut admits = Vec::new();
        for (p, identity) in peers {
            let spec = PeerSpec {
                identity: (*identity).clone(),
                dialers: if p.dial.is_empty() { 0 } else { p.connections },
                dial: p.dial.clone(),
                learns: !p.learn.is_empty(),
                relay: p.relay,
            };
            let slot = match old.by_name.get(p.name.as_str()) {
                Some(s) if s.spec == spec => s.clone(),
                Some(s) => Arc::new(PeerSlot::new(&p.name, spec, Some(s.closed.clone()))),
                None => Arc::new(PeerSlot::new(&p.name, spec, None)),
            };
            admits.push(slot.clone());
            by_name.insert(slot.name.clone(), slot);
        }
        // Stable: patterns keep their file order behind the exact entries.
        admits.sort_by_key(|s| !s.spec.identity.is_exact());
        PeerSet { by_name, admits, clients }
    }

    /// The slot that admits a connection from `identity`.
    pub fn admitting(&self, identity: &str) -> Option<&Arc<PeerSlot>> {
        self.admits.iter().find(|s| s.spec.identity.matches(identity))
    }

    /// The set with the same slots and new client configurations.
    fn with_clients(&self, clients: HashMap<Arc<str>, ClientConfig>) -> PeerSet {
        PeerSet { by_name: self.by_name.clone(), admits: self.admits.clone(), clients }
    }
}

/// The next peer set, built and not yet in force. It holds the tunnel's
/// reconfiguration lock: TLS material cannot change under it (the set's
/// client configurations were built from the material in force).
#[derive(Debug)]
pub struct PeersUpdate<'a> {
    next: PeerSet,
    _reconfiguring: std::sync::MutexGuard<'a, ()>,
}

/// What a committed update did, by entry name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeersChange {
    pub added: Vec<Arc<str>>,
    pub removed: Vec<Arc<str>>,
    /// Entries whose identity, dial addresses, connections or learning changed.
    pub replaced: Vec<Arc<str>>,
    /// Accepted connections closed because an added entry now admits them.
    pub moved_connections: usize,
}

impl PeersChange {
    pub fn is_empty(&self) -> bool {
        *self == PeersChange::default()
    }
}

impl Tunnel {
    /// The peers in force now.
    pub(super) fn peer_set(&self) -> Arc<PeerSet> {
        crate::lock(&self.peers).clone()
    }

    /// Builds the peer set for `peers` with the TLS material in force:
    /// nothing changes until [`Tunnel::commit_peers`] (or the update is
    /// dropped). [`Tunnel::set_tls`] waits for either.
    pub fn prepare_peers(&self, peers: &[(&Peer, &IdentityPattern)]) -> Result<PeersUpdate<'_>, TunnelError> {
        let guard = crate::lock(&self.reconfiguring);
        let tls = crate::lock(&self.tls).clone();
        let (_, clients) =
            crypto_configs(&tls, peers.iter().map(|(p, id)| (p.name.as_str(), *id)), &self.transport)?;
        Ok(PeersUpdate { next: PeerSet::build(&self.peer_set(), peers, clients), _reconfiguring: guard })
    }

    /// Puts `update` in force: new entries start dialling, removed and
    /// changed ones are retired, and an accepted connection that a new entry
    /// would now admit instead is closed (its peer reconnects under it).
    pub fn commit_peers(self: &Arc<Self>, update: PeersUpdate<'_>) -> PeersChange {
        let PeersUpdate { next, _reconfiguring } = update;
        let next = Arc::new(next);
        let old = std::mem::replace(&mut *crate::lock(&self.peers), next.clone());
        let mut change = PeersChange::default();
        for (name, slot) in &old.by_name {
            match next.by_name.get(name) {
                Some(s) if Arc::ptr_eq(s, slot) => {
                    let keep =
                        |identity: &str| next.admitting(identity).is_some_and(|a| Arc::ptr_eq(a, slot));
                    change.moved_connections +=
                        slot.close_accepted_unless(keep, CLOSE_RECONFIGURED, b"peers changed; reconnect");
                }
                Some(_) => {
                    change.replaced.push(name.clone());
                    slot.retire(CLOSE_RECONFIGURED, b"peer entry changed; reconnect");
                }
                None => {
                    change.removed.push(name.clone());
                    slot.retire(CLOSE_RECONFIGURED, b"peer entry removed");
                    self.metrics.forget_peer(name);
                }
            }
        }
        for (name, slot) in &next.by_name {
            if old.by_name.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                continue;
            }
            if !old.by_name.contains_key(name) {
                change.added.push(name.clone());
            }
            self.spawn_dialers(slot);
        }
        change.added.sort();
        change.removed.sort();
        change.replaced.sort();
        if !change.is_empty() {
            info!(
                added = ?change.added,
                removed = ?change.removed,
                replaced = ?change.replaced,
                moved = change.moved_connections,
                "tunnel peers changed"
            );
            self.liveness.send_modify(|n| *n += 1);
        }
        change
    }

    /// Takes new TLS material for the client side of every peer in force
    /// (built by `build` for the set in force, under the reconfiguration
    /// lock, so no commit comes between).
    pub(super) fn set_client_tls<E>(
        &self,
        build: impl FnOnce(&PeerSet) -> Result<HashMap<Arc<str>, ClientConfig>, E>,
    ) -> Result<(), E> {
        let _reconfiguring = crate::lock(&self.reconfiguring);
        let set = self.peer_set();
        let clients = build(&set)?;
        *crate::lock(&self.peers) = Arc::new(set.with_clients(clients));
        Ok(())
    }

    /// Whether the accepted connection from `identity` on `slot` belongs
    /// there under the peers in force now (a commit may have come while
    /// its handshake ran).
    pub(super) fn still_admits(&self, slot: &Arc<PeerSlot>, identity: &str) -> bool {
        self.peer_set().admitting(identity).is_some_and(|s| Arc::ptr_eq(s, slot))
    }

    /// The first set, at bind.
    pub(super) fn first_peer_set(
        peers: &[(&Peer, &IdentityPattern)],
        clients: HashMap<Arc<str>, ClientConfig>,
    ) -> PeerSet {
        PeerSet::build(&PeerSet::default(), peers, clients)
    }

    /// Starts `slot`'s dialers (none for a peer that dials us).
    pub(super) fn spawn_dialers(self: &Arc<Self>, slot: &Arc<PeerSlot>) {
        let mut tasks = crate::lock(&self.tasks);
        // Reap dialers of retired slots, so the set holds only live ones.
        while tasks.try_join_next().is_some() {}
        for i in 0..slot.spec.dialers {
            let dialer = self.clone().dial_loop(slot.clone(), slot.spec.dial.clone(), i as usize);
            tasks.spawn_on(dialer, &self.runtime);
        }
    }
}
