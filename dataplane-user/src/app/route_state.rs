//! Routes follow the peers. A route through a peer with no live tunnel
//! connection is set to refuse in the kernel (`on_no_peer: reject`, the
//! default) or to pass (`on_no_peer: pass`), and back to redirect as soon
//! as a connection is up; learned routes come and go with the peers that
//! advertise them. A routed connect then fails at once with ECONNREFUSED
//! instead of reaching the agent only to be reset, and nothing it sends
//! leaves the node by its default route.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use dataplane_common::{ACTION_REDIRECT, ACTION_REJECT};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Shared, learned};
use crate::{
    config::ValidConfig,
    kernel::SteeringError,
    lock,
    routes::{RouteDiff, RouteEntry, RouteTable, Upstream},
    tunnel::Tunnel,
};

/// Action written for routes that pass while their peer is down: any value
/// the programs do not act on.
const ACTION_PASS: u32 = 0;

/// How often the owner of pinned steering checks that the redirect target
/// is still its own (an agent stopping just as this one took over may
/// write its refusal after this agent's target).
const KEEP_TARGET_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `entry` can be served now: a direct route always, a route via a
/// peer while the peer has a live connection, a learned route while a live
/// connection advertises it.
pub(super) fn serving(entry: &RouteEntry, tunnel: Option<&Tunnel>) -> bool {
    match &entry.upstream {
        Upstream::Direct => true,
        Upstream::Peer(p) => tunnel.is_some_and(|t| t.live_connections(p) > 0),
        Upstream::Advertised => tunnel.is_some_and(|t| t.advertisers(&entry.net).0 > 0),
    }
}

/// The kernel action for `entry` given the tunnel's live connections now.
pub(super) fn action(entry: &RouteEntry, tunnel: Option<&Tunnel>) -> u32 {
    if serving(entry, tunnel) {
        ACTION_REDIRECT
    } else if entry.pass_without_peer {
        ACTION_PASS
    } else {
        ACTION_REJECT
    }
}

/// The table for `config`'s routes and what the peers advertise now,
/// synced into the kernel (all of it or, on failure, none: the tries keep
/// their state and `table` stays as it was). Returns what changed.
pub(super) fn resync(
    shared: &Shared,
    config: &ValidConfig,
    table: &mut RouteTable,
) -> Result<RouteDiff, SteeringError> {
    let tunnel = shared.tunnel.as_deref();
    let learned = learned::learned_routes(config, tunnel);
    // Before the kernel steers a new learned route: its flows need a
    // connection to go to. A failed sync puts the last trust back, with
    // the table the kernel keeps.
    if let Some(t) = tunnel {
        t.trust_advertisements(&learned.trusted);
    }
    let next = RouteTable::with_learned(config.valid_routes(), &learned.nets, table);
    if let Some(s) = &shared.steering
        && let Err(e) = s.sync(&next, |e| action(e, tunnel))
    {
        if let Some(t) = tunnel {
            t.trust_advertisements(&lock(&shared.trusted));
        }
        return Err(e);
    }
    *lock(&shared.trusted) = learned.trusted.clone();
    let diff = table.diff(&next);
    *table = next;
    // A relay advertises what its connectors serve on to its clients.
    if let Some(r) = &shared.relay
        && r.set_routes(learned.served.clone())
        && let Some(t) = tunnel
    {
        t.readvertise();
    }
    let mut refused = lock(&shared.learned_refused);
    if *refused != learned.refused {
        for (what, why) in learned.refused.iter().filter(|(k, v)| refused.get(*k) != Some(*v)) {
            warn!(route = %what, reason = %why, "learned route refused");
        }
        *refused = learned.refused;
    }
    let learned_changes = diff.upsert.iter().filter(|e| e.upstream == Upstream::Advertised).count();
    if learned_changes > 0 || !diff.remove.is_empty() {
        info!(
            learned = learned.nets.len(),
            added = diff.upsert.len(),
            removed = diff.remove.len(),
            "routes follow the peers' advertisements"
        );
    }
    Ok(diff)
}

/// Re-syncs the routes whenever a tunnel connection comes up or goes or a
/// peer advertises or drains, and keeps the redirect target this agent's,
/// until `stop`.
pub(super) async fn follow_peers(shared: Arc<Shared>, stop: CancellationToken) {
    let steering = shared.steering.clone();
    if steering.is_none() && shared.relay.is_none() {
        return;
    }
    let tunnel = shared.tunnel.clone();
    let mut changes = tunnel.as_ref().map(|t| t.liveness());
    let mut keep = tokio::time::interval(KEEP_TARGET_EVERY);
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(c) => c.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            alive = changed => if !alive { return },
            _ = keep.tick() => {
                if let Some(s) = &steering {
                    s.keep_target();
                }
                continue;
            }
            () = stop.cancelled() => return,
        }
        let Some(changes) = changes.as_mut() else { continue };
        let seen = *changes.borrow_and_update();
        let config = lock(&shared.config);
        let mut table = lock(&shared.routes);
        match resync(&shared, &config, &mut table) {
            Ok(_) => debug!("route actions follow the peers"),
            Err(e) => warn!(error = %e, "updating routes failed; the tries keep their last state"),
        }
        shared.routes_synced.store(seen, Relaxed);
    }
}
