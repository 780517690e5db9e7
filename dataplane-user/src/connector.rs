//! The connector role: accept a flow's stream, check its destination against
//! what this agent serves (and never anything in `config::NEVER_SERVED`),
//! dial with a timeout, answer with a status, splice.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use dataplane_common::protocol::{self, Decoded, MAX_REQUEST, Response, Status};
use ipnet::IpNet;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span};

use crate::{
    config::{NEVER_SERVED, ValidServe},
    splice,
};

/// How long a peer has to send a complete request header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a destination was refused, for logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Denial {
    /// In a range no connector ever dials (loopback, link-local, metadata, ...).
    NeverServed,
    /// Outside every served CIDR.
    NotServed,
    /// In a served CIDR, but not on a served port.
    PortNotServed,
}

impl Denial {
    pub const fn as_str(self) -> &'static str {
        match self {
            Denial::NeverServed => "never_served",
            Denial::NotServed => "not_served",
            Denial::PortNotServed => "port_not_served",
        }
    }
}

/// What this connector may dial.
#[derive(Clone, Debug)]
pub struct ServePolicy {
    serve: Vec<ValidServe>,
    never: Vec<IpNet>,
}

impl ServePolicy {
    pub fn new(serve: Vec<ValidServe>) -> ServePolicy {
        let never = NEVER_SERVED.iter().map(|(c, _)| c.parse().expect("static CIDR")).collect();
        ServePolicy { serve, never }
    }

    /// Default deny: allowed only inside a served CIDR on a served port, and
    /// never in the ranges no connector dials, however the address is spelled
    /// (`::ffff:127.0.0.1` is loopback).
    pub fn check(&self, dst: SocketAddr) -> Result<SocketAddr, Denial> {
        let ip: IpAddr = dst.ip().to_canonical();
        if self.never.iter().any(|n| n.contains(&ip)) || ip.is_multicast() || ip.is_unspecified() {
            return Err(Denial::NeverServed);
        }
        let mut in_cidr = false;
        for s in self.serve.iter().filter(|s| s.net.contains(&ip)) {
            in_cidr = true;
            if s.ports.contains(&dst.port()) {
                return Ok(SocketAddr::new(ip, dst.port()));
            }
        }
        Err(if in_cidr { Denial::PortNotServed } else { Denial::NotServed })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Metrics of the connector role.
#[derive(Debug)]
pub struct ConnectorMetrics {
    statuses: Family<StatusLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
}

impl ConnectorMetrics {
    pub fn register(registry: &mut Registry) -> ConnectorMetrics {
        let m = ConnectorMetrics { statuses: Family::default(), refusals: Family::default() };
        registry.register(
            "connector_streams",
            "Streams answered by the connector, by status",
            m.statuses.clone(),
        );
        registry.register(
            "connector_refusals",
            "Destinations the connector refused, by reason",
            m.refusals.clone(),
        );
        // Known label values start at zero, so rates and alerts have series
        // from the first scrape on.
        for status in Status::ALL {
            let _ = m.statuses.get_or_create_owned(&StatusLabels { status: status.as_str() });
        }
        for d in [Denial::NeverServed, Denial::NotServed, Denial::PortNotServed] {
            let _ = m.refusals.get_or_create_owned(&ReasonLabels { reason: d.as_str() });
        }
        m
    }

    fn count_status(&self, status: Status) {
        self.statuses.get_or_create(&StatusLabels { status: status.as_str() }).inc();
    }

    /// Streams answered with `status` (e.g. "ok", "denied").
    pub fn status(&self, status: &str) -> u64 {
        Status::ALL
            .iter()
            .find(|s| s.as_str() == status)
            .and_then(|s| self.statuses.get(&StatusLabels { status: s.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }

    /// Refusals for `reason` (e.g. "not_served").
    pub fn denials(&self, reason: &str) -> u64 {
        [Denial::NeverServed, Denial::NotServed, Denial::PortNotServed]
            .iter()
            .find(|d| d.as_str() == reason)
            .and_then(|d| self.refusals.get(&ReasonLabels { reason: d.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }
}

/// The connector: shared by all streams of all connections.
pub struct Connector {
    policy: Mutex<Arc<ServePolicy>>,
    dial_timeout: Duration,
    pub metrics: ConnectorMetrics,
}

impl Connector {
    pub fn new(policy: ServePolicy, dial_timeout: Duration, registry: &mut Registry) -> Connector {
        Connector {
            policy: Mutex::new(Arc::new(policy)),
            dial_timeout,
            metrics: ConnectorMetrics::register(registry),
        }
    }

    /// Replaces the policy (config reload); streams in flight keep theirs.
    pub fn set_policy(&self, policy: ServePolicy) {
        *crate::lock(&self.policy) = Arc::new(policy);
    }

    fn policy(&self) -> Arc<ServePolicy> {
        crate::lock(&self.policy).clone()
    }

    /// Serves one stream opened by `peer`.
    pub async fn serve(self: Arc<Self>, peer: Arc<str>, mut send: SendStream, mut recv: RecvStream) {
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
            if send.write_all(&Response { status: Status::Ok }.encode()).await.is_err() {
                return;
            }
            self.metrics.count_status(Status::Ok);
            match splice::splice(&mut tcp, &mut send, &mut recv, &buf[used..]).await {
                Ok((up, down)) => debug!(up, down, "flow closed"),
                Err(e) => debug!(error = %e, "flow failed"),
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
        match protocol::decode_request(buf).map_err(|e| e.to_string())? {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ServePolicy {
        ServePolicy::new(vec![
            ValidServe { net: "198.51.100.101/32".parse().expect("net"), ports: vec![6443] },
            ValidServe { net: "2001:db8::/64".parse().expect("net"), ports: vec![443, 6443] },
        ])
    }

    fn check(s: &str) -> Result<SocketAddr, Denial> {
        policy().check(s.parse().expect("addr"))
    }

    #[test]
    fn serves_only_what_is_configured() {
        assert!(check("198.51.100.101:6443").is_ok());
        assert!(check("[2001:db8::5]:443").is_ok());
        assert_eq!(check("198.51.100.101:22"), Err(Denial::PortNotServed));
        assert_eq!(check("198.51.100.102:6443"), Err(Denial::NotServed));
        assert_eq!(check("[2001:db8:1::5]:443"), Err(Denial::NotServed));
    }

    #[test]
    fn never_dials_loopback_link_local_or_metadata_however_spelled() {
        for dst in [
            "127.0.0.1:6443",
            "[::1]:6443",
            "169.254.169.254:80",
            "[fe80::1]:443",
            "[fd00:ec2::254]:80",
            "0.0.0.0:6443",
            "[::]:6443",
            "224.0.0.1:6443",
            "[::ffff:127.0.0.1]:6443",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert_eq!(check(dst), Err(Denial::NeverServed), "{dst}");
        }
        // A mapped form of a served address is served, dialled as IPv4.
        assert_eq!(check("[::ffff:198.51.100.101]:6443"), Ok("198.51.100.101:6443".parse().expect("addr")));
    }

    #[test]
    fn dial_errors_map_to_statuses() {
        assert_eq!(dial_status(&io::ErrorKind::ConnectionRefused.into()), Status::Refused);
        assert_eq!(dial_status(&io::ErrorKind::TimedOut.into()), Status::Timeout);
        assert_eq!(dial_status(&io::ErrorKind::HostUnreachable.into()), Status::Unreachable);
    }
}
