//! The connector role: take a flow's stream from the tunnel, check its
//! destination against the serve policy (`policy`), dial with a timeout,
//! answer with a status, splice. `metrics` counts what it answered.

mod metrics;
pub mod policy;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use dataplane_proto::stream::{self, Decoded, MAX_REQUEST, Response, Status};
use prometheus_client::registry::Registry;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

pub use metrics::ConnectorMetrics;
use metrics::ReasonLabels;
pub use policy::{Denial, ServePolicy};

use crate::tunnel::{StreamHandler, splice};

/// How long a peer has to send a complete request header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The connector: shared by all streams of all connections.
pub struct Connector {
    policy: Mutex<Arc<ServePolicy>>,
    dial_timeout: Duration,
    /// Every stream being served, so the drain waits for them.
    streams: TaskTracker,
    pub metrics: ConnectorMetrics,
}

impl Connector {
    pub fn new(policy: ServePolicy, dial_timeout: Duration, registry: &mut Registry) -> Connector {
        Connector {
            policy: Mutex::new(Arc::new(policy)),
            dial_timeout,
            streams: TaskTracker::new(),
            metrics: ConnectorMetrics::register(registry),
        }
    }

    /// Streams being served now.
    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// Waits until every stream being served has finished (new ones are
    /// still taken until the tunnel closes: a peer may yet send flows).
    pub async fn drained(&self) {
        self.streams.close();
        self.streams.wait().await;
        self.streams.reopen();
    }

    /// Replaces the policy (config reload); streams in flight keep theirs.
    pub fn set_policy(&self, policy: ServePolicy) {
        *crate::lock(&self.policy) = Arc::new(policy);
    }

    fn policy(&self) -> Arc<ServePolicy> {
        crate::lock(&self.policy).clone()
    }

    /// Serves one stream opened by `peer`.
    async fn serve(self: Arc<Self>, peer: Arc<str>, mut send: SendStream, mut recv: RecvStream) {
        let mut buf = Vec::with_capacity(MAX_REQUEST);
        let header = tokio::time::timeout(HEADER_TIMEOUT, read_request(&mut recv, &mut buf)).await;
        let (dst, flow_id, used) = match header {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "bad stream header");
                return self.answer(&mut send, Status::ProtocolError).await;
            }
            Err(_) => {
                debug!(%peer, "no stream header in time");
                return self.answer(&mut send, Status::ProtocolError).await;
            }
        };
        let span = info_span!("flow", id = flow_id, %peer, %dst);
        async move {
            let target = match self.policy().check(dst) {
                Ok(t) => t,
                Err(why) => {
                    self.metrics.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).inc();
                    info!(reason = why.as_str(), "destination refused");
                    return self.answer(&mut send, Status::Denied).await;
                }
            };
            let mut tcp = match tokio::time::timeout(self.dial_timeout, TcpStream::connect(target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(error = %e, "dial failed");
                    return self.answer(&mut send, dial_status(&e)).await;
                }
                Err(_) => return self.answer(&mut send, Status::Timeout).await,
            };
            let _ = tcp.set_nodelay(true);
            // A destination that vanishes mid-flow is noticed, not held forever.
            let _ = crate::sockopt::keepalive(&tcp);
            if send.write_all(&Response { status: Status::Ok }.encode()).await.is_err() {
                return;
            }
            self.metrics.count_status(Status::Ok);
            let ((up, down), result) = splice::splice(&mut tcp, &mut send, &mut recv, &buf[used..]).await;
            match result {
                Ok(()) => debug!(up, down, "flow closed"),
                Err(e) => debug!(up, down, error = %e, "flow failed"),
            }
        }
        .instrument(span)
        .await
    }

    async fn answer(&self, send: &mut SendStream, status: Status) {
        self.metrics.count_status(status);
        let _ = send.write_all(&Response { status }.encode()).await;
        let _ = send.finish();
    }
}

/// Reads until a complete request is buffered; returns its destination, flow
/// id and length (bytes after it are payload).
async fn read_request(recv: &mut RecvStream, buf: &mut Vec<u8>) -> Result<(SocketAddr, u64, usize), String> {
    let mut chunk = [0u8; 2048];
    loop {
        match stream::decode_request(buf).map_err(|e| e.to_string())? {
            Decoded::Complete(req, n) => return Ok((req.dst, req.flow_id, n)),
            Decoded::Incomplete(_) => {}
        }
        let n = recv
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream ended inside the header")?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dial_status(e: &io::Error) -> Status {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Status::Refused,
        io::ErrorKind::TimedOut => Status::Timeout,
        _ => Status::Unreachable,
    }
}

impl StreamHandler for Connector {
    fn accept_stream(self: Arc<Self>, peer: &Arc<str>, send: SendStream, recv: RecvStream) {
        self.streams.clone().spawn(self.serve(peer.clone(), send, recv));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_errors_map_to_statuses() {
        assert_eq!(dial_status(&io::ErrorKind::ConnectionRefused.into()), Status::Refused);
        assert_eq!(dial_status(&io::ErrorKind::TimedOut.into()), Status::Timeout);
        assert_eq!(dial_status(&io::ErrorKind::HostUnreachable.into()), Status::Unreachable);
    }
}
