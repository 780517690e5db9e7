//! Route actions follow the peers: a route through a peer with no live
//! tunnel connection is set to refuse in the kernel (`on_no_peer: reject`,
//! the default) or to pass (`on_no_peer: pass`), and back to redirect as
//! soon as a connection is up. A routed connect then fails at once with
//! ECONNREFUSED instead of reaching the agent only to be reset, and nothing
//! it sends leaves the node by its default route.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use dataplane_common::{ACTION_REDIRECT, ACTION_REJECT};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use crate::{
    lock,
    routes::{RouteEntry, Upstream},
    tunnel::Tunnel,
};

/// Action written for routes that pass while their peer is down: any value
/// the programs do not act on.
const ACTION_PASS: u32 = 0;

/// How often the owner of pinned steering checks that the redirect target
/// is still its own (an agent stopping just as this one took over may
/// write its refusal after this agent's target).
const KEEP_TARGET_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The kernel action for `entry` given the tunnel's live connections now.
pub(super) fn action(entry: &RouteEntry, tunnel: Option<&Tunnel>) -> u32 {
    match &entry.upstream {
        Upstream::Direct => ACTION_REDIRECT,
        Upstream::Peer(p) if tunnel.is_some_and(|t| t.live_connections(p) > 0) => ACTION_REDIRECT,
        Upstream::Peer(_) if entry.pass_without_peer => ACTION_PASS,
        Upstream::Peer(_) => ACTION_REJECT,
    }
}

/// Re-syncs the route actions whenever a tunnel connection comes up or
/// goes, and keeps the redirect target this agent's, until `stop`.
pub(super) async fn follow_peers(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(steering) = shared.steering.clone() else { return };
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
                steering.keep_target();
                continue;
            }
            () = stop.cancelled() => return,
        }
        let (Some(changes), Some(tunnel)) = (changes.as_mut(), tunnel.as_deref()) else { continue };
        let seen = *changes.borrow_and_update();
        let table = lock(&shared.routes);
        match steering.sync(&table, |e| action(e, Some(tunnel))) {
            Ok(()) => debug!("route actions follow the peers"),
            Err(e) => warn!(error = %e, "updating route actions failed; the tries keep their last state"),
        }
        shared.routes_synced.store(seen, Relaxed);
    }
}
