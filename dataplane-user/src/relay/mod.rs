//! The relay role: client agents and connectors both dial the relay (both
//! sides outbound-only, as cloudflared's edge); the relay forwards each
//! client stream to a connector that advertises its destination, stream to
//! stream, never looking past the header (the application's TLS stays end
//! to end). It checks its own policy first and attests the client's exact
//! identity in the header it forwards, which a connector believes only from
//! a peer it configured as a relay (so the connector's policy, budgets and
//! audit lines go by the client, not by the relay).
//!
//! What it may forward to is what its connectors advertise inside their
//! `peers[].learn` (merged like a client's learned routes, by the app);
//! what it advertises to each client is that, as the relay's policy grants
//! it to the client's identity. `metrics` counts the relayed streams.

mod metrics;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use dataplane_proto::stream::{
    self, Decoded, MAX_REQUEST, META_CLIENT_IDENTITY, Metadata, Request, Response, Status,
};
use ipnet::IpNet;
use prometheus_client::registry::Registry;
use quinn::{RecvStream, SendStream};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

pub use metrics::RelayMetrics;

use crate::{
    config::{ValidRule, ValidServe},
    connector::{Denial, ServePolicy},
    log_budget::KeyedLogBudget,
    tunnel::{Advert, PeerId, StreamHandler, Tunnel, Via, failover, splice},
};

/// Why the relay itself answered a stream (it never reached a connector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No policy rule grants the destination to the client's identity.
    NotAllowed,
    /// No connector advertises the destination, or none took the stream.
    NoConnector,
    /// The header was malformed, late, or could not carry the attestation.
    BadHeader,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::NotAllowed, Refusal::NoConnector, Refusal::BadHeader];

    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::NoConnector => "no_connector",
            Refusal::BadHeader => "bad_header",
        }
    }
}

/// What the relay forwards, for whom.
#[derive(Debug)]
struct Forwarding {
    /// The served routes (what the trusted connectors advertise, in the
    /// learned routes) with the policy rules: `check_for` and `granted_to`
    /// decide for a client as a connector would.
    policy: ServePolicy,
    routes: Vec<Advert>,
}

pub struct Relay {
    forwarding: Mutex<Arc<Forwarding>>,
    rules: Mutex<Vec<ValidRule>>,
    /// The tunnel the streams arrive on and leave by (set once it exists:
    /// the tunnel holds the relay as its stream handler).
    tunnel: OnceLock<Weak<Tunnel>>,
    /// The peers it learns from: its connectors (nothing is advertised to them).
    sources: Mutex<std::collections::HashSet<Arc<str>>>,
    header_timeout: Mutex<Duration>,
    open_timeout: Mutex<Duration>,
    streams: TaskTracker,
    identity: Mutex<Arc<str>>,
    audit_logs: KeyedLogBudget,
    pub metrics: RelayMetrics,
}

impl Relay {
    /// A relay for `rules`, learning from the `peers` entries `sources`.
    pub fn new<'a>(
        rules: Vec<ValidRule>,
        sources: impl IntoIterator<Item = &'a str>,
        timeouts: (Duration, Duration),
        identity: &str,
        registry: &mut Registry,
    ) -> Relay {
        let forwarding =
            Forwarding { policy: ServePolicy::new(Vec::new(), rules.clone()), routes: Vec::new() };
        Relay {
            forwarding: Mutex::new(Arc::new(forwarding)),
            rules: Mutex::new(rules),
            tunnel: OnceLock::new(),
            sources: Mutex::new(sources.into_iter().map(Arc::from).collect()),
            header_timeout: Mutex::new(timeouts.0),
            open_timeout: Mutex::new(timeouts.1),
            streams: TaskTracker::new(),
            identity: Mutex::new(Arc::from(identity)),
            audit_logs: KeyedLogBudget::default(),
            metrics: RelayMetrics::register(registry),
        }
    }

    /// The tunnel to forward on (once, after it is bound).
    pub fn attach(&self, tunnel: &Arc<Tunnel>) {
        let _ = self.tunnel.set(Arc::downgrade(tunnel));
    }

    /// What the trusted connectors serve now (the app's merge of their
    /// advertisements). Returns whether it changed.
    pub fn set_routes(&self, routes: Vec<Advert>) -> bool {
        if self.forwarding().routes == routes {
            return false;
        }
        let rules = crate::lock(&self.rules).clone();
        self.metrics.routes.set(routes.len() as i64);
        *crate::lock(&self.forwarding) = Arc::new(build(routes, rules));
        true
    }

    /// The `peers` entries it learns from, after a reload.
    pub fn set_sources<'a>(&self, sources: impl IntoIterator<Item = &'a str>) {
        *crate::lock(&self.sources) = sources.into_iter().map(Arc::from).collect();
    }

    /// New policy rules and timeouts (config reload).
    pub fn set_policy(&self, rules: Vec<ValidRule>, header_timeout: Duration, open_timeout: Duration) {
        *crate::lock(&self.rules) = rules.clone();
        *crate::lock(&self.header_timeout) = header_timeout;
        *crate::lock(&self.open_timeout) = open_timeout;
        let routes = self.forwarding().routes.clone();
        *crate::lock(&self.forwarding) = Arc::new(build(routes, rules));
    }

    /// Takes the identity of rotated TLS material, for the audit lines.
    pub fn set_identity(&self, identity: &str) {
        *crate::lock(&self.identity) = Arc::from(identity);
    }

    /// Routes some connector serves now.
    pub fn routes(&self) -> usize {
        self.forwarding().routes.len()
    }

    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// Waits until every stream being forwarded has finished.
    pub async fn drained(&self) {
        self.streams.close();
        self.streams.wait().await;
        self.streams.reopen();
    }

    fn forwarding(&self) -> Arc<Forwarding> {
        crate::lock(&self.forwarding).clone()
    }

    async fn forward(self: Arc<Self>, client: PeerId, mut send: SendStream, mut recv: RecvStream) {
        let mut buf = Vec::with_capacity(MAX_REQUEST);
        let within = *crate::lock(&self.header_timeout);
        let header = tokio::time::timeout(within, splice::read_request(&mut recv, &mut buf)).await;
        let Ok(Ok((dst, flow_id, used))) = header else {
            debug!(client = %client.identity, "no valid stream header in time");
            return self.answer(&mut send, None, Refusal::BadHeader).await;
        };
        let forwarding = self.forwarding();
        let route =
            forwarding.routes.iter().find(|a| a.net.contains(&dst.ip().to_canonical())).map(|a| a.net);
        let span = info_span!("relay", id = flow_id, client = %client.identity, %dst);
        async move {
            match forwarding.policy.check_for(&client, dst, |_| false) {
                Ok(_) => {}
                // Nothing serves it: no connector advertises it now.
                Err(Denial::NotServed | Denial::PortNotServed) => {
                    return self.answer(&mut send, route, Refusal::NoConnector).await;
                }
                Err(why) => return self.deny(&mut send, &client, dst, route, why).await,
            }
            let Some(forwarded) = attest(&buf[..used], &client.identity) else {
                return self.answer(&mut send, route, Refusal::BadHeader).await;
            };
            let Some(tunnel) = self.tunnel.get().and_then(Weak::upgrade) else {
                return self.answer(&mut send, route, Refusal::NoConnector).await;
            };
            let within = *crate::lock(&self.open_timeout);
            // The connector dials with its own timeout; allow for the round trip.
            let deadline = tokio::time::Instant::now() + within + Duration::from_secs(1);
            let candidates = tunnel.candidates(Via::Advertised(dst));
            let tries = candidates.len().min(failover::ATTEMPTS);
            let mut answered = None;
            for (i, c) in candidates.iter().take(tries).enumerate() {
                let Ok((mut up_send, mut up_recv)) = tunnel.open_on(c, within).await else { continue };
                // The header with the attestation, then what the client sent
                // behind its header: all a retry needs to replay.
                if up_send.write_all(&forwarded).await.is_err()
                    || up_send.write_all(&buf[used..]).await.is_err()
                {
                    c.suspect();
                    continue;
                }
                let sent_rx = c.received();
                match failover::await_status(&mut up_recv, c, sent_rx, i + 1 < tries, deadline).await {
                    Ok(status) => {
                        if i > 0 {
                            self.metrics.failed_over(i);
                        }
                        answered = Some((c.peer.clone(), status, up_send, up_recv));
                        break;
                    }
                    Err(u) => {
                        debug!(connector = %c.peer, reason = %u, "no answer from the connector");
                        let _ = up_send.reset(splice::RESET_TCP_FAILED);
                        let _ = up_recv.stop(splice::RESET_TCP_FAILED);
                        c.suspect();
                    }
                }
            }
            let Some((connector, status, mut up_send, mut up_recv)) = answered else {
                return self.answer(&mut send, route, Refusal::NoConnector).await;
            };
            self.metrics.relayed(route, status.as_str());
            if send.write_all(&Response { status }.encode()).await.is_err() || status != Status::Ok {
                let _ = send.finish();
                return;
            }
            debug!(%connector, "stream forwarded");
            let (up, down) =
                splice::splice_streams((&mut send, &mut recv), (&mut up_send, &mut up_recv)).await;
            // Held until both ends have every byte (a draining relay closes
            // its connections once its streams end).
            let _ = tokio::join!(send.stopped(), up_send.stopped());
            debug!(up, down, "relayed stream closed");
        }
        .instrument(span)
        .await
    }

    /// Answers `denied`, counts it, and writes the audit line (rationed per
    /// client identity, like a connector's).
    async fn deny(
        &self,
        send: &mut SendStream,
        client: &PeerId,
        dst: SocketAddr,
        route: Option<IpNet>,
        why: Denial,
    ) {
        if let Some(suppressed) = self.audit_logs.allow(&client.identity, std::time::Instant::now()) {
            let relay = crate::lock(&self.identity).clone();
            info!(
                target: "dataplane::audit",
                client = %client.identity,
                peer = %client.name,
                %relay,
                %dst,
                reason = why.as_str(),
                suppressed,
                "flow denied"
            );
        }
        self.answer(send, route, Refusal::NotAllowed).await
    }

    async fn answer(&self, send: &mut SendStream, route: Option<IpNet>, why: Refusal) {
        let status = match why {
            Refusal::NotAllowed => Status::Denied,
            Refusal::NoConnector => Status::Unreachable,
            Refusal::BadHeader => Status::ProtocolError,
        };
        self.metrics.refused(why);
        self.metrics.relayed(route, status.as_str());
        let _ = send.write_all(&Response { status }.encode()).await;
        let _ = send.finish();
    }
}

/// The relay's view for `rules` over `routes`: served as a connector's
/// `serve` (own addresses allowed: the relay dials nothing itself).
fn build(routes: Vec<Advert>, rules: Vec<ValidRule>) -> Forwarding {
    let serve =
        routes.iter().map(|a| ValidServe { net: a.net, ports: a.ports.clone(), own_node: true }).collect();
    Forwarding { policy: ServePolicy::new(serve, rules), routes }
}

/// The request header re-encoded with `identity` attested (and any
/// attestation the client wrote itself dropped); `None` if it cannot carry
/// it (an identity over 255 bytes, or no room left in the metadata).
fn attest(header: &[u8], identity: &str) -> Option<Vec<u8>> {
    let Ok(Decoded::Complete(req, _)) = stream::decode_request(header) else { return None };
    let mut meta = [0u8; stream::MAX_METADATA];
    let mut end = 0;
    for (kind, value) in req.metadata.iter().filter(|(k, _)| *k != META_CLIENT_IDENTITY) {
        end = stream::put_metadata(&mut meta, end, kind, value).ok()?;
    }
    end = stream::put_metadata(&mut meta, end, META_CLIENT_IDENTITY, identity.as_bytes()).ok()?;
    let metadata = Metadata::new(&meta[..end]).ok()?;
    let mut out = vec![0u8; MAX_REQUEST];
    let n = Request { dst: req.dst, flow_id: req.flow_id, metadata }.encode(&mut out).ok()?;
    out.truncate(n);
    Some(out)
}

/// The routes in `served` that `granted` covers, each cut to the part of it
/// both allow: a network inside the other, the ports both list.
fn intersect(served: &[Advert], granted: &[Advert]) -> Vec<Advert> {
    let mut out = Vec::new();
    for s in served {
        for g in granted {
            let net = if g.net.contains(&s.net) {
                s.net
            } else if s.net.contains(&g.net) {
                g.net
            } else {
                continue;
            };
            let ports: Vec<u16> = s.ports.iter().copied().filter(|p| g.ports.contains(p)).collect();
            if !ports.is_empty() {
                out.push(Advert { net, ports });
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

impl StreamHandler for Relay {
    fn accept_stream(self: Arc<Self>, peer: &PeerId, send: SendStream, recv: RecvStream) {
        let tracker = self.streams.clone();
        tracker.spawn(self.forward(peer.clone(), send, recv));
    }

    /// What the client may reach through this relay: what the connectors
    /// serve, as the policy grants it (without rules: all of it to a peer
    /// listed by exact identity, nothing to one admitted by a pattern).
    /// The relay's own connectors are advertised nothing.
    fn advertised_to(&self, peer: &PeerId) -> Vec<Advert> {
        if crate::lock(&self.sources).contains(&peer.name) {
            return Vec::new();
        }
        let f = self.forwarding();
        intersect(&f.routes, &f.policy.granted_to(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(net: &str, ports: &[u16]) -> Advert {
        Advert { net: net.parse().expect("net"), ports: ports.to_vec() }
    }

    #[test]
    fn clients_are_advertised_what_is_served_and_granted() {
        let served = [advert("198.51.100.0/24", &[443, 6443]), advert("2001:db8::101/128", &[6443])];
        let granted = [advert("198.51.100.101/32", &[6443, 22]), advert("2001:db8::/64", &[6443])];
        assert_eq!(
            intersect(&served, &granted),
            [advert("198.51.100.101/32", &[6443]), advert("2001:db8::101/128", &[6443])]
        );
        assert!(intersect(&served, &[advert("203.0.113.0/24", &[6443])]).is_empty());
        assert!(intersect(&served, &[advert("198.51.100.0/24", &[22])]).is_empty(), "no port in common");
    }

    #[test]
    fn the_attestation_replaces_whatever_the_client_wrote() {
        let mut meta = [0u8; 64];
        let end = stream::put_metadata(&mut meta, 0, stream::META_SOURCE_NODE, b"worker-1").expect("fits");
        let end =
            stream::put_metadata(&mut meta, end, META_CLIENT_IDENTITY, b"spiffe://t/forged").expect("fits");
        let req = Request {
            dst: "198.51.100.101:6443".parse().expect("addr"),
            flow_id: 7,
            metadata: Metadata::new(&meta[..end]).expect("valid"),
        };
        let mut buf = [0u8; MAX_REQUEST];
        let n = req.encode(&mut buf).expect("encodes");
        let out = attest(&buf[..n], "spiffe://t/node/worker-1").expect("attested");
        let Ok(Decoded::Complete(back, _)) = stream::decode_request(&out) else { panic!("decodes") };
        assert_eq!((back.dst, back.flow_id), (req.dst, 7));
        let ids: Vec<&[u8]> =
            back.metadata.iter().filter(|(k, _)| *k == META_CLIENT_IDENTITY).map(|(_, v)| v).collect();
        assert_eq!(ids, [&b"spiffe://t/node/worker-1"[..]], "one attestation, the relay's");
        assert_eq!(back.metadata.get(stream::META_SOURCE_NODE), Some(&b"worker-1"[..]));
        assert!(attest(&buf[..n], &"x".repeat(256)).is_none(), "an identity too long to attest");
    }
}
