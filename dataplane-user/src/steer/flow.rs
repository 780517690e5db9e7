//! Serving one steered connection: recover its original destination from the
//! kernel, find its route, hand it to the route's upstream, and record how it
//! ended exactly once.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, info};

use super::{
    FlowServer, direct,
    metrics::{FlowMetrics, FlowResult, UNKNOWN_ROUTE},
    via_peer,
    workloads::WorkloadSlot,
};
use crate::{
    lock,
    routes::{RouteTable, Upstream},
    sockopt,
};

/// Records a flow's end exactly once, also when its task is cut off at the
/// end of the shutdown grace period (then as `failed`).
pub(super) struct FlowRecord<'a> {
    metrics: &'a FlowMetrics,
    pub route: String,
    pub result: FlowResult,
}

impl<'a> FlowRecord<'a> {
    fn open(metrics: &'a FlowMetrics, route: String) -> Self {
        metrics.opened(&route);
        FlowRecord { metrics, route, result: FlowResult::failed }
    }
}

impl Drop for FlowRecord<'_> {
    fn drop(&mut self) {
        self.metrics.closed(&self.route, self.result);
    }
}

/// Serves one steered connection. Every failure resets the client so the
/// application sees an error at once. The flow's record (a local) is dropped,
/// and so counted, before the client socket (a parameter) closes: whoever
/// sees the close finds the metrics already updated.
pub(super) async fn serve(
    server: Arc<FlowServer>,
    mut client: TcpStream,
    peer: SocketAddr,
    id: u64,
    _slot: WorkloadSlot,
) {
    let accepted = Instant::now();
    let metrics = &*server.metrics;
    let Some(flow) = server.steering.lookup_flow(peer) else {
        let mut record = FlowRecord::open(metrics, UNKNOWN_ROUTE.to_owned());
        // Usually a client that reset before we accepted (its entry is gone
        // with it); otherwise something connected to the listener directly.
        record.result = FlowResult::unrecovered;
        debug!("no original destination recorded for this peer; resetting");
        return reset(&client);
    };
    let route = route_of(&lock(&server.routes), flow.route_id, flow.dst);
    let (route, upstream) = match route {
        Ok(r) => r,
        Err(result) => {
            let mut record = FlowRecord::open(metrics, UNKNOWN_ROUTE.to_owned());
            record.result = result;
            info!(dst = %flow.dst, route = flow.route_id, ?result, "no route for the recorded destination; resetting");
            return reset(&client);
        }
    };
    let span = tracing::Span::current();
    span.record("route", route.as_str());
    let mut record = FlowRecord::open(metrics, route);
    record.result = match upstream {
        Upstream::Direct => {
            span.record("via", "direct");
            direct::serve(&server, &mut client, flow.dst, accepted, &record.route).await
        }
        Upstream::Peer(name) => {
            span.record("via", &*name);
            let to =
                via_peer::Target { peer: Some(&name), dst: flow.dst, id, accepted, route: &record.route };
            via_peer::serve(&server, &mut client, peer, to).await
        }
        Upstream::Advertised => {
            span.record("via", "advertised");
            let to = via_peer::Target { peer: None, dst: flow.dst, id, accepted, route: &record.route };
            via_peer::serve(&server, &mut client, peer, to).await
        }
    };
}

/// The route a flow was steered by, as (CIDR, upstream): it must still
/// exist, and must contain the destination the kernel recorded (a record
/// that names a route not covering its destination is refused, never
/// dialled).
fn route_of(table: &RouteTable, id: u32, dst: SocketAddr) -> Result<(String, Upstream), FlowResult> {
    let entry = table.get(id).ok_or(FlowResult::route_gone)?;
    if !entry.net.contains(&dst.ip()) {
        return Err(FlowResult::route_mismatch);
    }
    Ok((entry.net.to_string(), entry.upstream.clone()))
}

pub(super) fn reset(stream: &TcpStream) {
    let _ = sockopt::reset_on_close(stream);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValidRoute;

    #[test]
    fn a_flow_must_lie_inside_the_route_that_steered_it() {
        let routes = [ValidRoute {
            net: "198.51.100.101/32".parse().expect("net"),
            via: "direct".into(),
            on_no_peer: Default::default(),
        }];
        let table = RouteTable::build(&routes, &RouteTable::default());
        let id = table.entries()[0].id;
        let inside: SocketAddr = "198.51.100.101:6443".parse().expect("addr");
        let outside: SocketAddr = "127.0.0.1:22".parse().expect("addr");
        assert_eq!(route_of(&table, id, inside).map(|r| r.0), Ok("198.51.100.101/32".to_owned()));
        assert_eq!(route_of(&table, id, outside).err(), Some(FlowResult::route_mismatch));
        assert_eq!(route_of(&table, id + 1, inside).err(), Some(FlowResult::route_gone));
    }
}
