//! The tunnel upstream of a steered flow: a new stream to the route's peer
//! (or to a peer advertising the destination), the request header (the
//! original destination and who asks), then the application's bytes right
//! behind it while the way back waits for the connector's status; if no
//! answer comes from that connection, the flow fails over to the next
//! (`tunnel::failover`).

use std::{net::SocketAddr, time::Duration};

use dataplane_proto::stream::{self, MAX_REQUEST, META_SOURCE_NODE, META_WORKLOAD, Metadata, Request};
use tokio::{net::TcpStream, time::Instant};
use tracing::{debug, info, warn};

use super::{FlowServer, flow::reset, metrics::FlowResult};
use crate::tunnel::{Via, failover, splice::SpliceError};

/// Where a tunnelled flow goes, and what to record about it.
pub(super) struct Target<'a> {
    /// The route's peer; `None`: any peer advertising the destination.
    pub peer: Option<&'a str>,
    pub dst: SocketAddr,
    pub id: u64,
    pub accepted: Instant,
    pub route: &'a str,
}

pub(super) async fn serve(
    server: &FlowServer,
    client: &mut TcpStream,
    workload: SocketAddr,
    to: Target<'_>,
) -> FlowResult {
    let Some(tunnel) = &server.tunnel else {
        reset(client);
        return FlowResult::failed;
    };
    let dst = to.dst;
    let via = match to.peer {
        Some(peer) => Via::Peer(peer),
        None => Via::Advertised(dst),
    };
    let candidates = tunnel.candidates(via);
    if candidates.is_empty() {
        info!(%dst, "no tunnel connection for the route; resetting");
        reset(client);
        return FlowResult::no_tunnel;
    }
    let mut header = [0u8; MAX_REQUEST];
    let len = match encode_header(&mut header, dst, to.id, &server.node, workload) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot encode the stream header; resetting");
            reset(client);
            return FlowResult::failed;
        }
    };
    // The connector dials with its own timeout; allow for the round trip.
    let wait = server.connect_timeout() + Duration::from_secs(1);
    let accepted = to.accepted;
    let on_ok = || {
        server.metrics.setup("tunnel", accepted.elapsed());
        debug!(%dst, "flow open (tunnel)");
    };
    let idle = server.flow_idle_timeout();
    let within = server.connect_timeout();
    let served =
        failover::splice_failover(client, tunnel, &candidates, &header[..len], within, wait, idle, on_ok)
            .await;
    if served.attempts > 1 {
        server.metrics.failed_over(served.attempts - 1);
        info!(%dst, attempts = served.attempts, ok = served.result.is_ok(), "flow failed over to another connection");
    }
    let moved = served.moved;
    server.metrics.bytes(to.route, moved.0, moved.1);
    match served.result {
        Ok(()) => {
            debug!(up = moved.0, down = moved.1, "flow closed");
            FlowResult::completed
        }
        Err(SpliceError::Refused(reason)) if !served.opened => {
            info!(%dst, %reason, "no stream could be opened for the flow; reset");
            FlowResult::no_tunnel
        }
        Err(SpliceError::Refused(status)) => {
            info!(%dst, %status, "connector did not connect the flow; reset");
            FlowResult::refused_by_peer
        }
        Err(SpliceError::Idle(after)) => {
            info!(%dst, ?after, "flow idle past limits.flow_idle_timeout; reset");
            FlowResult::idle
        }
        Err(e) if e.is_client_reset() => {
            debug!(up = moved.0, down = moved.1, "the application reset its connection");
            FlowResult::client_reset
        }
        Err(e) => {
            debug!(error = %e, "flow failed");
            FlowResult::failed
        }
    }
}

/// The request header: destination, flow id, and metadata naming this node
/// and the workload (its address as the agent saw it).
fn encode_header(
    out: &mut [u8; MAX_REQUEST],
    dst: SocketAddr,
    flow_id: u64,
    node: &str,
    workload: SocketAddr,
) -> Result<usize, stream::ProtocolError> {
    let mut meta = [0u8; 2 * (2 + 255)];
    let node = &node.as_bytes()[..node.len().min(255)];
    let workload = workload.to_string();
    let end = stream::put_metadata(&mut meta, 0, META_SOURCE_NODE, node)
        .and_then(|end| stream::put_metadata(&mut meta, end, META_WORKLOAD, workload.as_bytes()))?;
    let metadata = Metadata::new(&meta[..end])?;
    Request { dst, flow_id, metadata }.encode(out)
}

#[cfg(test)]
mod tests {
    use dataplane_proto::stream::{Decoded, decode_request};

    use super::*;

    #[test]
    fn the_header_names_the_destination_node_and_workload() {
        let mut out = [0u8; MAX_REQUEST];
        let long_node = "n".repeat(300);
        let workload: SocketAddr = "[fd00:200::2]:40000".parse().expect("addr");
        let dst: SocketAddr = "198.51.100.101:6443".parse().expect("addr");
        let n = encode_header(&mut out, dst, 9, &long_node, workload).expect("encodes");
        let Ok(Decoded::Complete(req, used)) = decode_request(&out[..n]) else { panic!("decodes") };
        assert_eq!((req.dst, req.flow_id, used), (dst, 9, n));
        assert_eq!(req.metadata.get(META_SOURCE_NODE).map(<[u8]>::len), Some(255), "node name capped");
        assert_eq!(req.metadata.get(META_WORKLOAD), Some(&b"[fd00:200::2]:40000"[..]));
    }
}
