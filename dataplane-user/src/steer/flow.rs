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
};
use crate::{lock, routes::Upstream, sockopt};

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
pub(super) async fn serve(server: Arc<FlowServer>, mut client: TcpStream, peer: SocketAddr, id: u64) {
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
    let route = lock(&server.routes).get(flow.route_id).map(|r| (r.net.to_string(), r.upstream.clone()));
    let Some((route, upstream)) = route else {
        let mut record = FlowRecord::open(metrics, UNKNOWN_ROUTE.to_owned());
        record.result = FlowResult::route_gone;
        info!(dst = %flow.dst, route = flow.route_id, "route removed since the connect; resetting");
        return reset(&client);
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
            let to = via_peer::Target { peer: &name, dst: flow.dst, id, accepted, route: &record.route };
            via_peer::serve(&server, &mut client, peer, to).await
        }
    };
}

pub(super) fn reset(stream: &TcpStream) {
    let _ = sockopt::reset_on_close(stream);
}
