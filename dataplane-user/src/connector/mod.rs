//! The connector role: take a flow's stream from the tunnel, check its
//! destination against the serve policy (`policy`), dial with a timeout,
//! answer with a status, splice. Each peer identity has its own budget of
//! streams and dials (`budget`); `metrics` counts what it answered.

mod budget;
pub mod kubernetes;
mod metrics;
mod own;
pub mod policy;

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use dataplane_proto::stream::{self, Decoded, MAX_REQUEST, META_CLIENT_IDENTITY, Response, Status};
use prometheus_client::registry::Registry;
use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

pub use budget::PeerCaps;
use budget::{Holder, PeerBudgets, Permit};
pub use metrics::ConnectorMetrics;
use metrics::ReasonLabels;
use own::OwnAddrs;
pub use policy::{Denial, ServePolicy};

use crate::{
    config::ValidServe,
    log_budget::KeyedLogBudget,
    tunnel::{PeerId, StreamHandler, splice},
};

/// Stop code for the peer's side of a stream refused at a cap: it need not
/// send anything more.
const STOP_REFUSED: quinn::VarInt = quinn::VarInt::from_u32(6);

/// The connector: shared by all streams of all connections.
pub struct Connector {
    policy: Mutex<Arc<ServePolicy>>,
    dial_timeout: Duration,
    budgets: Arc<PeerBudgets>,
    own: Arc<OwnAddrs>,
    /// Every stream being served, so the drain waits for them.
    streams: TaskTracker,
    /// The most streams served at once since [`Connector::take_peak`].
    peak: std::sync::atomic::AtomicUsize,
    /// This connector's own identity, for the audit lines.
    identity: Mutex<Arc<str>>,
    /// Audit lines rationed per client identity.
    audit_logs: KeyedLogBudget,
    /// The `peers` entries that are relays: their streams' attested client
    /// identities are believed (nobody else's are).
    relays: Mutex<std::collections::HashMap<Arc<str>, Arc<str>>>,
    pub metrics: ConnectorMetrics,
}

impl Connector {
    /// A connector with the identity `identity` for the configured `peers`
    /// (by name, and whether each is a relay), each identity they admit
    /// with `caps`.
    pub fn new<'a>(
        policy: ServePolicy,
        dial_timeout: Duration,
        peers: impl IntoIterator<Item = PeerEntry<'a>>,
        caps: PeerCaps,
        identity: &str,
        registry: &mut Registry,
    ) -> Connector {
        let peers: Vec<PeerEntry<'_>> = peers.into_iter().collect();
        let relays = Mutex::new(relays_of(&peers));
        let budgets = Arc::new(PeerBudgets::new(peers.iter().map(|p| p.name), caps));
        Connector {
            policy: Mutex::new(Arc::new(policy)),
            dial_timeout,
            metrics: ConnectorMetrics::register(registry, &budgets),
            budgets,
            own: OwnAddrs::load(),
            streams: TaskTracker::new(),
            peak: std::sync::atomic::AtomicUsize::new(0),
            identity: Mutex::new(Arc::from(identity)),
            audit_logs: KeyedLogBudget::default(),
            relays,
        }
    }

    /// Takes the `peers` of a reload: streams from now on go by them.
    pub fn set_peers<'a>(&self, peers: impl IntoIterator<Item = PeerEntry<'a>>) {
        let peers: Vec<PeerEntry<'_>> = peers.into_iter().collect();
        let names: Vec<Arc<str>> = peers.iter().map(|p| Arc::from(p.name)).collect();
        for old in self.budgets.names() {
            if !names.contains(&old) {
                self.metrics.forget_peer(&old);
            }
        }
        for name in &names {
            self.metrics.known_peer(name);
        }
        self.budgets.set_names(names);
        *crate::lock(&self.relays) = relays_of(&peers);
    }

    /// Whether `peer` is a relay: its entry is marked so, and the
    /// connection is the relay's exact identity (an entry a reload changed
    /// into a relay's does not make a connection admitted before it one).
    fn is_relay(&self, peer: &PeerId) -> bool {
        crate::lock(&self.relays).get(&peer.name).is_some_and(|id| *id == peer.identity)
    }

    /// Takes the identity of rotated TLS material, for the audit lines.
    pub fn set_identity(&self, identity: &str) {
        *crate::lock(&self.identity) = Arc::from(identity);
    }

    /// Keeps the connector's own addresses (never dialled) current until
    /// `stop`.
    pub async fn watch_own_addresses(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        self.own.clone().keep_current(stop).await;
    }

    /// Whether `ip` is one of this node's addresses, as the connector knows
    /// them now.
    pub fn is_own_address(&self, ip: std::net::IpAddr) -> bool {
        self.own.contains(ip)
    }

    /// Streams served now for the identities the `peers` entry `peer`
    /// admitted, and their dials in flight.
    pub fn peer_use(&self, peer: &str) -> (usize, usize) {
        self.budgets.use_by_name().get(peer).copied().unwrap_or_default()
    }

    /// Streams served now for one exact identity, and its dials in flight.
    pub fn identity_use(&self, identity: &str) -> (usize, usize) {
        self.budgets.use_of(identity)
    }

    /// Replaces the per-peer caps (config reload); permits already held stay.
    pub fn set_caps(&self, caps: PeerCaps) {
        self.budgets.set_caps(caps);
    }

    /// Streams being served now.
    pub fn streams_open(&self) -> usize {
        self.streams.len()
    }

    /// The most streams served at once since the last call.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(0, std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until every stream being served has finished (new ones are
    /// still taken until the tunnel closes: a peer may yet send flows).
    pub async fn drained(&self) {
        self.streams.close();
        self.streams.wait().await;
        self.streams.reopen();
    }

    /// Replaces the policy (config reload), keeping the endpoints
    /// discovered; streams in flight keep theirs.
    pub fn set_policy(&self, policy: ServePolicy) {
        let mut current = crate::lock(&self.policy);
        *current = Arc::new(policy.with_discovered(current.discovered().to_vec()));
    }

    /// Serves `endpoints` as the API server's (`serve[].kubernetes`), in
    /// place of those discovered before.
    pub fn set_discovered(&self, endpoints: Vec<ValidServe>) {
        let mut current = crate::lock(&self.policy);
        *current = Arc::new(current.with_discovered(endpoints));
    }

    fn policy(&self) -> Arc<ServePolicy> {
        crate::lock(&self.policy).clone()
    }

    /// Serves one stream opened by `peer`, holding one of its stream
    /// permits; for a relay's stream (`permit` none) the permit is taken
    /// once the header said whose stream it is.
    async fn serve(
        self: Arc<Self>,
        peer: PeerId,
        caps: PeerCaps,
        permit: Option<Permit>,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        let mut buf = Vec::with_capacity(MAX_REQUEST);
        let header =
            tokio::time::timeout(caps.header_timeout, splice::read_request(&mut recv, &mut buf)).await;
        let (dst, flow_id, used) = match header {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                debug!(peer = %peer.identity, error = %e, "bad stream header");
                return self.answer(&mut send, Status::ProtocolError).await;
            }
            Err(_) => {
                debug!(peer = %peer.identity, "no stream header in time");
                return self.answer(&mut send, Status::ProtocolError).await;
            }
        };
        let (peer, _stream) = match permit {
            Some(p) => (peer, p),
            None => {
                let Some(peer) = attested(&peer, &buf[..used]) else {
                    debug!(relay = %peer.identity, "a relay's stream without a valid client attestation");
                    return self.answer(&mut send, Status::ProtocolError).await;
                };
                match self.budgets.stream(Holder { name: &peer.name, identity: &peer.identity }, &caps) {
                    Some(p) => (peer, p),
                    None => return self.refuse(&peer.name, Status::OverStreamCap, send, recv).await,
                }
            }
        };
        let span = info_span!("flow", id = flow_id, peer = %peer.identity, %dst);
        async move {
            let target = match self.policy().check_for(&peer, dst, |ip| self.own.contains(ip)) {
                Ok(t) => t,
                Err(why) => return self.deny(&mut send, &peer, dst, why).await,
            };
            let holder = Holder { name: &peer.name, identity: &peer.identity };
            let Some(dial) = self.budgets.dial(holder, &caps, budget::DIAL_QUEUE).await else {
                return self.refuse(&peer.name, Status::OverDialCap, send, recv).await;
            };
            let dialled = tokio::time::timeout(self.dial_timeout, TcpStream::connect(target.addr)).await;
            drop(dial);
            let mut tcp = match dialled {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(error = %e, "dial failed");
                    return self.answer(&mut send, dial_status(&e)).await;
                }
                Err(_) => return self.answer(&mut send, Status::Timeout).await,
            };
            // An address the node gained since the last refresh: the kernel
            // answered from the node itself, source and destination alike.
            if !target.own_node
                && tcp.local_addr().ok().map(|a| a.ip()) == tcp.peer_addr().ok().map(|a| a.ip())
            {
                let _ = crate::sockopt::reset_on_close(&tcp);
                self.own.refresh();
                return self.deny(&mut send, &peer, dst, Denial::OwnAddress).await;
            }
            let _ = tcp.set_nodelay(true);
            // A destination that vanishes mid-flow is noticed, not held forever.
            let _ = crate::sockopt::keepalive(&tcp);
            if send.write_all(&Response { status: Status::Ok }.encode()).await.is_err() {
                return;
            }
            self.metrics.count_status(Status::Ok);
            let ((up, down), result) = splice::splice(&mut tcp, &mut send, &mut recv, &buf[used..]).await;
            match result {
                Ok(()) => {
                    // Held until the peer has every byte: a draining
                    // connector closes its connections once its streams
                    // end, and bytes still in flight then would be lost.
                    let _ = send.stopped().await;
                    debug!(up, down, "flow closed");
                }
                Err(e) => debug!(up, down, error = %e, "flow failed"),
            }
        }
        .instrument(span)
        .await
    }

    /// Answers `denied`, counts why, and writes the audit line: who asked
    /// (the exact identity), who refused, for what and why. Lines are
    /// rationed per identity (a peer can send refused streams as fast as it
    /// likes, and must not crowd out the lines about others); the counter
    /// has them all.
    async fn deny(&self, send: &mut SendStream, peer: &PeerId, dst: SocketAddr, why: Denial) {
        self.metrics.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).inc();
        if let Some(suppressed) = self.audit_logs.allow(&peer.identity, std::time::Instant::now()) {
            let connector = crate::lock(&self.identity).clone();
            info!(
                target: "dataplane::audit",
                client = %peer.identity,
                peer = %peer.name,
                %connector,
                %dst,
                reason = why.as_str(),
                suppressed,
                "flow denied"
            );
        }
        self.answer(send, Status::Denied).await
    }

    /// Refuses a stream at one of `peer`'s caps: its status at once, and the
    /// peer told to stop sending (nothing will read it).
    async fn refuse(&self, peer: &str, status: Status, mut send: SendStream, mut recv: RecvStream) {
        self.metrics.at_cap(peer, status);
        debug!(%peer, status = status.as_str(), "stream refused at the peer's cap");
        let _ = recv.stop(STOP_REFUSED);
        self.answer(&mut send, status).await;
    }

    async fn answer(&self, send: &mut SendStream, status: Status) {
        self.metrics.count_status(status);
        let _ = send.write_all(&Response { status }.encode()).await;
        let _ = send.finish();
    }
}

/// Whose stream a relay forwarded: the client identity the relay attests
/// in the header, admitted as by a pattern (policy rules must grant it
/// something). A relay's stream without a valid one is refused: served as
/// the relay's own, it would get all a listed relay may reach.
fn attested(relay: &PeerId, header: &[u8]) -> Option<PeerId> {
    let Ok(Decoded::Complete(req, _)) = stream::decode_request(header) else { return None };
    let identity = std::str::from_utf8(req.metadata.get(META_CLIENT_IDENTITY)?).ok()?;
    if identity.is_empty() || identity.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return None;
    }
    Some(PeerId { name: relay.name.clone(), identity: Arc::from(identity), exact: false })
}

fn dial_status(e: &io::Error) -> Status {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Status::Refused,
        io::ErrorKind::TimedOut => Status::Timeout,
        _ => Status::Unreachable,
    }
}

/// A `peers` entry as the connector sees it.
#[derive(Clone, Copy, Debug)]
pub struct PeerEntry<'a> {
    pub name: &'a str,
    pub identity: &'a str,
    pub relay: bool,
}

impl<'a> From<&'a crate::config::Peer> for PeerEntry<'a> {
    fn from(p: &'a crate::config::Peer) -> Self {
        PeerEntry { name: &p.name, identity: &p.identity, relay: p.relay }
    }
}

/// The relays among `peers`, by name, with the exact identity each has
/// (a relay entry is never a pattern).
fn relays_of(peers: &[PeerEntry<'_>]) -> std::collections::HashMap<Arc<str>, Arc<str>> {
    peers.iter().filter(|p| p.relay).map(|p| (Arc::from(p.name), Arc::from(p.identity))).collect()
}

impl StreamHandler for Connector {
    fn accept_stream(self: Arc<Self>, peer: &PeerId, send: SendStream, recv: RecvStream) {
        let caps = self.budgets.caps();
        let tracker = self.streams.clone();
        self.peak.fetch_max(tracker.len() + 1, std::sync::atomic::Ordering::Relaxed);
        if self.is_relay(peer) {
            // The budget is the attested client's, known after the header;
            // QUIC's stream credit bounds the relay's streams meanwhile.
            tracker.spawn(self.serve(peer.clone(), caps, None, send, recv));
            return;
        }
        match self.budgets.stream(Holder { name: &peer.name, identity: &peer.identity }, &caps) {
            Some(permit) => tracker.spawn(self.serve(peer.clone(), caps, Some(permit), send, recv)),
            // The refusal is a two-byte write: its task ends as soon as the
            // peer's credit allows it, and QUIC's own stream credit bounds
            // how many can be in flight.
            None => {
                let peer = peer.name.clone();
                tracker.spawn(async move { self.refuse(&peer, Status::OverStreamCap, send, recv).await })
            }
        };
    }

    fn advertised_to(&self, peer: &PeerId) -> Vec<crate::tunnel::Advert> {
        if self.is_relay(peer) {
            // A relay forwards for many identities; each stream is checked
            // against the one it attests.
            return self.policy().served();
        }
        self.policy().granted_to(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_attestation_names_a_relayed_client() {
        let relay = PeerId { name: "relay-1".into(), identity: "spiffe://t/relay/1".into(), exact: true };
        let header = |meta: &[(u8, &[u8])]| {
            let mut block = [0u8; 512];
            let mut end = 0;
            for (k, v) in meta {
                end = stream::put_metadata(&mut block, end, *k, v).expect("fits");
            }
            let req = stream::Request {
                dst: "198.51.100.101:6443".parse().expect("addr"),
                flow_id: 1,
                metadata: stream::Metadata::new(&block[..end]).expect("valid"),
            };
            let mut out = vec![0u8; MAX_REQUEST];
            let n = req.encode(&mut out).expect("encodes");
            out.truncate(n);
            out
        };
        let client =
            attested(&relay, &header(&[(META_CLIENT_IDENTITY, b"spiffe://t/node/w-1")])).expect("attested");
        assert_eq!(
            (&*client.name, &*client.identity, client.exact),
            ("relay-1", "spiffe://t/node/w-1", false)
        );
        assert!(attested(&relay, &header(&[])).is_none(), "no attestation: refused, not the relay's own");
        assert!(attested(&relay, &header(&[(META_CLIENT_IDENTITY, b"")])).is_none());
        assert!(attested(&relay, &header(&[(META_CLIENT_IDENTITY, b"spiffe://t/node/a b")])).is_none());
        assert!(attested(&relay, &header(&[(META_CLIENT_IDENTITY, &[0xff, 0xfe])])).is_none(), "not UTF-8");
        assert!(attested(&relay, b"garbage").is_none());
    }

    #[test]
    fn dial_errors_map_to_statuses() {
        assert_eq!(dial_status(&io::ErrorKind::ConnectionRefused.into()), Status::Refused);
        assert_eq!(dial_status(&io::ErrorKind::TimedOut.into()), Status::Timeout);
        assert_eq!(dial_status(&io::ErrorKind::HostUnreachable.into()), Status::Unreachable);
    }
}
