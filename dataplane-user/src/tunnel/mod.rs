//! The QUIC tunnel: one endpoint per agent that both accepts and dials,
//! mutual TLS against the private CA, and a pool of live connections per peer.
//! It carries streams and knows nothing of what they are for: streams a
//! peer opens go to the [`StreamHandler`] it was given (the connector role,
//! a relay later), and the steered side opens its own with [`Tunnel::open`].
//!
//! Which side dialled does not decide which side opens streams: every
//! connection, dialled or accepted, serves the streams its peer opens and can
//! carry streams this agent opens. So a connector behind a firewall that
//! allows no inbound traffic dials out to the agents that use it and still
//! receives their flows, the way cloudflared serves its edge.
//!
//! Besides the flows' streams, each connection carries a control stream
//! each way (`control`): what the peer's handler advertises (the routes a
//! connector serves this node) and its draining notice. The tunnel keeps
//! them per connection and opens streams by them ([`Tunnel::open_to`]);
//! what they mean for routing is the caller's business.
//!
//! Inside: `transport` (socket and QUIC settings), `handshake` (welcome,
//! failure reasons), `dial` (reconnecting with backoff), `peers` (the
//! configured peers, replaced whole by a reload), `pool` (live connections
//! per peer), `control`, `metrics`, and `splice` (a stream to and from a
//! TCP socket).

pub mod admission;
mod candidates;
mod control;
mod dial;
pub mod failover;
mod handshake;
pub mod metrics;
mod peers;
mod pool;
pub mod splice;
mod transport;

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use quinn::{
    ClientConfig, ConnectionError, Endpoint, RecvStream, SendStream, ServerConfig,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use tokio::{sync::watch, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use admission::{Admission, Verdict};
pub use candidates::{Candidate, Via};
pub use control::Advert;
pub use handshake::{HANDSHAKE_REASONS, failure_reason};
use metrics::{BufferLabels, PeerDirectionLabels, PeerLabels, TunnelCollector, TunnelMetrics};
use peers::PeerSet;
pub use peers::{PeersChange, PeersUpdate};
use pool::PeerSlot;
pub use transport::{endpoint_config, open_stream_limits, transport, udp_socket};

use crate::{
    config::{Limits, Peer, TunnelSettings},
    identity::IdentityPattern,
    tls::{TlsError, TlsMaterial},
};

/// The server side's and every peer's client side's QUIC crypto from `tls`,
/// with the tunnel's transport settings.
fn crypto_configs<'a>(
    tls: &TlsMaterial,
    peers: impl IntoIterator<Item = (&'a str, &'a IdentityPattern)>,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<(ServerConfig, HashMap<Arc<str>, ClientConfig>), TunnelError> {
    let quic = |e: &dyn std::fmt::Display| TunnelError::Quic(e.to_string());
    let server_crypto = QuicServerConfig::try_from(tls.server_config()?).map_err(|e| quic(&e))?;
    let mut server = ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    // Attempts waiting for the accept loop, and the packets buffered for
    // them: quinn's defaults (65,536 attempts, 100 MiB) are sized for a web
    // server, not for a tunnel endpoint any stranger can reach.
    server
        .max_incoming(admission::MAX_HANDSHAKES * 4)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(8 << 20);
    let mut clients = HashMap::new();
    for (name, identity) in peers {
        let crypto = QuicClientConfig::try_from(tls.client_config(identity)?).map_err(|e| quic(&e))?;
        let mut client = ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport.clone());
        clients.insert(Arc::from(name), client);
    }
    Ok((server, clients))
}

/// Who opened a stream: the `peers` entry that admitted its connection and
/// the exact identity the connection's certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerId {
    /// The entry's name: the bounded label for metrics.
    pub name: Arc<str>,
    /// What logs and policy go by.
    pub identity: Arc<str>,
    /// Admitted by an exact identity, not a pattern.
    pub exact: bool,
}

/// Takes the streams peers open. Implemented by the roles that serve them
/// (the connector; a relay next); the tunnel holds one and never learns
/// which.
pub trait StreamHandler: Send + Sync {
    /// A stream `peer` opened. Called on the connection's task, so it must
    /// not wait: spawn the work (and track it, for the drain).
    fn accept_stream(self: Arc<Self>, peer: &PeerId, send: SendStream, recv: RecvStream);

    /// What to advertise to `peer` on its control stream: the destinations
    /// it may send streams for. Asked again on [`Tunnel::readvertise`].
    fn advertised_to(&self, _peer: &PeerId) -> Vec<Advert> {
        Vec::new()
    }
}

/// Per connection id: the advertisement judged, and its routes taken.
pub type Trust = std::collections::HashMap<usize, (Arc<[Advert]>, Vec<Advert>)>;

/// One live connection's advertisement.
#[derive(Clone, Debug)]
pub struct Advertisement {
    /// The `peers` entry that admitted the connection.
    pub peer: Arc<str>,
    /// The connection's id, for [`Tunnel::trust_advertisements`].
    pub connection: usize,
    pub routes: Arc<[Advert]>,
}

/// This side's end of a new connection's control stream.
enum Control {
    /// Accepted: the stream the welcome went out on (the peer opens its own).
    Accepted(SendStream),
    /// Dialled: the stream the welcome came in on (this side opens its own).
    Dialed(RecvStream),
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel.listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("building the QUIC configuration: {0}")]
    Quic(String),
    /// No live connection to the peer: the flow fails at once.
    #[error("no live tunnel connection to peer `{0}`")]
    NoConnection(String),
    #[error("opening a stream to peer `{peer}`: {source}")]
    Open { peer: String, source: ConnectionError },
    /// The peer allowed no new stream in time (its stream budget is used).
    #[error("peer `{peer}` allowed no new stream within {within:?}")]
    OpenTimeout { peer: String, within: Duration },
}

pub struct Tunnel {
    endpoint: Endpoint,
    /// The peers in force (replaced whole by a reload, see `peers`); the
    /// metrics collector reads the same.
    peers: Arc<std::sync::Mutex<Arc<PeerSet>>>,
    /// The TLS material in force, for the client side of peers added later.
    tls: std::sync::Mutex<TlsMaterial>,
    /// Held while a peer set is prepared and committed, and while TLS
    /// material changes: the two never interleave.
    reconfiguring: std::sync::Mutex<()>,
    /// The accept loop and every dialer, on the runtime the tunnel was
    /// bound on (a reload may come from any thread).
    tasks: std::sync::Mutex<JoinSet<()>>,
    runtime: tokio::runtime::Handle,
    /// What a TLS change rebuilds the configurations with.
    transport: Arc<quinn::TransportConfig>,
    accepting: bool,
    handler: Option<Arc<dyn StreamHandler>>,
    /// How long a dialer waits for the acceptor's welcome: the idle timeout,
    /// which is how long any silent connection is given anyway.
    welcome_timeout: Duration,
    admission: Arc<Admission>,
    handshake_logs: crate::log_budget::LogBudget,
    /// `limits.connections_per_peer` and `limits.streams_per_peer`, for
    /// connections that start from now on.
    connections_per_peer: AtomicUsize,
    streams_per_peer: AtomicUsize,
    stop: watch::Sender<bool>,
    /// Bumped whenever a connection comes up or goes, or a peer advertises
    /// or drains: routes follow it.
    liveness: watch::Sender<u64>,
    /// Bumped to make every connection's advertisement be asked again.
    readvertise: watch::Sender<u64>,
    /// Set once this agent drains: every peer is told.
    draining: watch::Sender<bool>,
    /// Round-robin over the connections that advertise a destination.
    next_covering: AtomicUsize,
    pub metrics: TunnelMetrics,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("local", &self.local_addr()).finish_non_exhaustive()
    }
}

impl Tunnel {
    /// Binds the endpoint (at `tunnel.listen`, or an ephemeral port to only
    /// dial) with forced socket buffers. Nothing runs until [`Tunnel::start`].
    pub fn bind(
        settings: &TunnelSettings,
        limits: &Limits,
        node: &str,
        peers: &[(&Peer, &IdentityPattern)],
        tls: &TlsMaterial,
        handler: Option<Arc<dyn StreamHandler>>,
        registry: &mut Registry,
    ) -> Result<Arc<Tunnel>, TunnelError> {
        let transport = Arc::new(transport(settings)?);
        let (server, client_configs) =
            crypto_configs(tls, peers.iter().map(|(p, id)| (p.name.as_str(), *id)), &transport)?;

        let (addr, accept) = match settings.listen {
            Some(a) => (a, true),
            None => (SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0), false),
        };
        let (socket, buffers) = udp_socket(addr, settings.udp_buffer_bytes)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let endpoint = Endpoint::new(
            transport::endpoint_config(tls, node),
            accept.then_some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TunnelError::Bind { addr, source })?;

        let peers = Arc::new(std::sync::Mutex::new(Arc::new(Tunnel::first_peer_set(peers, client_configs))));
        let metrics = TunnelMetrics::register(registry);
        metrics.udp_buffer.get_or_create(&BufferLabels { direction: "receive" }).set(buffers.0 as i64);
        metrics.udp_buffer.get_or_create(&BufferLabels { direction: "send" }).set(buffers.1 as i64);
        registry.register_collector(Box::new(TunnelCollector { peers: peers.clone() }));
        info!(
            local = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            accepting = accept,
            rcvbuf = buffers.0,
            sndbuf = buffers.1,
            "tunnel endpoint bound"
        );
        Ok(Arc::new(Tunnel {
            endpoint,
            peers,
            tls: std::sync::Mutex::new(tls.clone()),
            reconfiguring: std::sync::Mutex::new(()),
            tasks: std::sync::Mutex::new(JoinSet::new()),
            runtime: tokio::runtime::Handle::current(),
            transport,
            accepting: accept,
            handler,
            welcome_timeout: settings.idle_timeout,
            admission: Arc::default(),
            handshake_logs: crate::log_budget::LogBudget::default(),
            connections_per_peer: AtomicUsize::new(limits.connections_per_peer),
            streams_per_peer: AtomicUsize::new(limits.streams_per_peer),
            stop: watch::channel(false).0,
            liveness: watch::channel(0).0,
            readvertise: watch::channel(0).0,
            draining: watch::channel(false).0,
            next_covering: AtomicUsize::new(0),
            metrics,
        }))
    }

    /// Takes new TLS material (a rotated certificate, key or CA bundle):
    /// new handshakes use it, both accepted and dialled; connections up
    /// keep theirs. Both sides' configurations are built before either is
    /// swapped, so a failure changes nothing.
    pub fn set_tls(&self, tls: &TlsMaterial) -> Result<(), TunnelError> {
        let mut server = None;
        self.set_client_tls(|set| {
            let peers = set.by_name.values().map(|s| (&*s.name, &s.spec.identity));
            let (s, clients) = crypto_configs(tls, peers, &self.transport)?;
            server = Some(s);
            *crate::lock(&self.tls) = tls.clone();
            Ok::<_, TunnelError>(clients)
        })?;
        if self.accepting {
            self.endpoint.set_server_config(server);
        }
        Ok(())
    }

    /// The client configuration dials to `peer` use now.
    pub(super) fn client_config(&self, peer: &str) -> Option<ClientConfig> {
        self.peer_set().clients.get(peer).cloned()
    }

    /// When the certificates the live connections to `peer` were opened
    /// with (the peer's) stop being valid.
    pub fn peer_certificate_expiries(&self, peer: &str) -> Vec<std::time::SystemTime> {
        let live = self.peer_set().by_name.get(peer).map(|s| s.live()).unwrap_or_default();
        live.iter().filter_map(handshake::peer_certificate_expiry).collect()
    }

    /// Takes new per-peer limits (config reload); connections already up
    /// keep the stream limit they were given.
    pub fn set_limits(&self, limits: &Limits) {
        self.connections_per_peer.store(limits.connections_per_peer, Relaxed);
        self.streams_per_peer.store(limits.streams_per_peer, Relaxed);
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Starts accepting (if listening) and the dialers; [`Tunnel::close`]
    /// ends them.
    pub fn start(self: &Arc<Self>) {
        crate::lock(&self.tasks).spawn_on(self.clone().accept_loop(), &self.runtime);
        for slot in self.peer_set().by_name.values() {
            self.spawn_dialers(slot);
        }
    }

    /// Changes whenever a connection to any peer comes up or goes.
    pub fn liveness(&self) -> watch::Receiver<u64> {
        self.liveness.subscribe()
    }

    /// The `peers` entries in force, sorted.
    pub fn peer_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.peer_set().by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// Live connections to `peer`.
    pub fn live_connections(&self, peer: &str) -> usize {
        self.peer_set().by_name.get(peer).map_or(0, |s| s.live().len())
    }

    /// Smoothed RTT of the best live connection to `peer`.
    pub fn best_rtt(&self, peer: &str) -> Option<Duration> {
        self.peer_set().by_name.get(peer)?.live().iter().map(|c| c.rtt()).min()
    }

    /// The live connections a new stream to `via` may go to, best first
    /// (see `candidates`): try the next when one fails.
    pub fn candidates(&self, via: Via<'_>) -> Vec<Candidate> {
        let mut all = Vec::new();
        let set = self.peer_set();
        let slots: Vec<&Arc<PeerSlot>> = match via {
            Via::Peer(p) => set.by_name.get(p).into_iter().collect(),
            Via::Advertised(_) => set.by_name.values().collect(),
        };
        for slot in slots {
            for (conn, state) in slot.live_states() {
                if let Via::Advertised(dst) = via
                    && !state.covers(dst)
                {
                    continue;
                }
                all.push(Candidate { conn, state, peer: slot.name.clone() });
            }
        }
        candidates::order(all, &self.next_covering)
    }

    /// Opens a stream to `peer` on one of its live connections.
    /// Waits at most `within` for the peer to allow one more stream: once a
    /// connection's stream budget is used up, `open_bi` would wait for as
    /// long as it takes a stream to end, and a new flow would hang.
    pub async fn open(&self, peer: &str, within: Duration) -> Result<(SendStream, RecvStream), TunnelError> {
        let c = self.candidates(Via::Peer(peer)).into_iter().next();
        let c = c.ok_or_else(|| TunnelError::NoConnection(peer.to_owned()))?;
        self.open_on(&c, within).await
    }

    /// Opens a stream on the candidate connection `c`, waiting at most
    /// `within` for the peer's stream credit.
    pub async fn open_on(
        &self,
        c: &Candidate,
        within: Duration,
    ) -> Result<(SendStream, RecvStream), TunnelError> {
        let peer = &*c.peer;
        let streams = tokio::time::timeout(within, c.conn.open_bi())
            .await
            .map_err(|_| TunnelError::OpenTimeout { peer: peer.to_owned(), within })?
            .map_err(|source| TunnelError::Open { peer: peer.to_owned(), source })?;
        self.metrics.streams_opened.get_or_create(&PeerLabels { peer: peer.to_owned() }).inc();
        Ok(streams)
    }

    /// What each live connection's peer advertises now: the peer's name,
    /// the connection's id and the routes (the very ones held: trusting
    /// them later applies only if they are still what the connection holds).
    pub fn advertisements(&self) -> Vec<Advertisement> {
        let mut out = Vec::new();
        for slot in self.peer_set().by_name.values() {
            for (conn, state) in slot.live_states() {
                out.push(Advertisement {
                    peer: slot.name.clone(),
                    connection: conn.stable_id(),
                    routes: lock_advertised(&state),
                });
            }
        }
        out
    }

    /// Sets, per connection (ids from [`Tunnel::advertisements`], with the
    /// advertisement they were judged on), the advertised routes streams
    /// may be opened by; a connection not in `accepted` gets none. An entry
    /// applies only to the connection still holding that very
    /// advertisement: an id can be reused once its connection is gone, and
    /// an advertisement that changed since is judged at the next sync.
    pub fn trust_advertisements(&self, accepted: &Trust) {
        for slot in self.peer_set().by_name.values() {
            for (conn, state) in slot.live_states() {
                let held = lock_advertised(&state);
                let routes = match accepted.get(&conn.stable_id()) {
                    Some((judged, routes)) if Arc::ptr_eq(judged, &held) => routes.clone(),
                    Some(_) => continue,
                    None => Vec::new(),
                };
                *crate::lock(&state.trusted) = Arc::from(routes);
            }
        }
    }

    /// Live connections with a trusted advertisement of exactly `net`, and
    /// of those the ones draining.
    pub fn advertisers(&self, net: &ipnet::IpNet) -> (usize, usize) {
        let mut n = (0, 0);
        for slot in self.peer_set().by_name.values() {
            for (_, state) in slot.live_states() {
                if crate::lock(&state.trusted).iter().any(|a| a.net == *net) {
                    n.0 += 1;
                    n.1 += usize::from(state.draining.load(Relaxed));
                }
            }
        }
        n
    }

    /// Asks every connection's handler for its advertisement again (the
    /// served destinations or the policy changed); changed ones are sent.
    pub fn readvertise(&self) {
        self.readvertise.send_modify(|n| *n += 1);
    }

    /// Tells every peer this agent takes no new streams (it drains); open
    /// streams go on.
    pub fn announce_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Stops the accept loop and every dialer at once, without a word to
    /// the peers (an agent dropped without running).
    pub fn abort_tasks(&self) {
        crate::lock(&self.tasks).abort_all();
    }

    /// Closes every connection and the endpoint, waiting briefly for peers to
    /// learn of it (so they fail over at once instead of timing out).
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        self.endpoint.close(handshake::CLOSE_SHUTDOWN, b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        let mut tasks = std::mem::take(&mut *crate::lock(&self.tasks));
        tasks.shutdown().await;
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let remote = incoming.remote_address();
            let admitted =
                self.admission.admit(remote.ip(), incoming.remote_address_validated(), incoming.may_retry());
            let handshake_slot = match admitted {
                Ok(slot) => slot,
                Err(verdict) => {
                    self.metrics.refused(verdict.reason());
                    match verdict {
                        Verdict::Retry => {
                            if incoming.retry().is_err() {
                                debug!(%remote, "a Retry was not possible; dropping the attempt");
                            }
                        }
                        _ => incoming.ignore(),
                    }
                    continue;
                }
            };
            self.metrics.handshakes_in_flight.set(self.admission.in_flight() as i64);
            let this = self.clone();
            tokio::spawn(async move {
                let welcomed = this.handshake(incoming).await;
                drop(handshake_slot);
                this.metrics.handshakes_in_flight.set(this.admission.in_flight() as i64);
                if let Some((slot, conn, held, control)) = welcomed {
                    let identity = held.identity();
                    this.run_connection(slot, conn, identity, "accepted", Control::Accepted(control)).await;
                    drop(held);
                }
            });
        }
    }

    /// Runs an admitted attempt's handshake: TLS, then the identity check,
    /// the peer's connection cap and the welcome. Failures are counted;
    /// their log lines are rationed.
    async fn handshake(
        &self,
        incoming: quinn::Incoming,
    ) -> Option<(Arc<PeerSlot>, quinn::Connection, pool::Accepted, SendStream)> {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                let reason = handshake::failure_reason(&e);
                self.metrics.failed(reason);
                if let Some(suppressed) = self.handshake_logs.allow(std::time::Instant::now()) {
                    warn!(%remote, %reason, error = %e, suppressed, "incoming tunnel handshake failed");
                }
                return None;
            }
        };
        let identity = handshake::peer_identity(&conn);
        let set = self.peer_set();
        let admitted = identity.as_deref().and_then(|id| set.admitting(id));
        let (Some(slot), Some(identity)) = (admitted.cloned(), identity.clone()) else {
            self.metrics.failed("unknown_identity");
            if let Some(suppressed) = self.handshake_logs.allow(std::time::Instant::now()) {
                warn!(%remote, ?identity, suppressed, "peer identity is not configured; closing");
            }
            conn.close(handshake::CLOSE_UNKNOWN_PEER, b"identity not configured");
            return None;
        };
        let cap = self.connections_per_peer.load(Relaxed);
        let identity: Arc<str> = Arc::from(identity);
        let Some(held) = slot.try_accept(&identity, cap) else {
            self.metrics.failed("over_connection_cap");
            if let Some(suppressed) = self.handshake_logs.allow(std::time::Instant::now()) {
                warn!(%remote, peer = %slot.name, %identity, cap, suppressed, "peer holds limits.connections_per_peer connections; closing");
            }
            conn.close(handshake::CLOSE_OVER_CAP, b"limits.connections_per_peer reached");
            return None;
        };
        match handshake::send_welcome(&conn).await {
            Ok(control) => Some((slot, conn, held, control)),
            Err(e) => {
                debug!(%remote, error = %e, "could not welcome the peer");
                None
            }
        }
    }

    /// Registers a live connection and serves the streams the peer opens on it
    /// until it closes.
    async fn run_connection(
        &self,
        slot: Arc<PeerSlot>,
        conn: quinn::Connection,
        identity: Arc<str>,
        direction: &'static str,
        control: Control,
    ) {
        let accepted_from = matches!(control, Control::Accepted(_)).then(|| identity.clone());
        let peer = PeerId { name: slot.name.clone(), exact: slot.spec.identity.is_exact(), identity };
        let state = Arc::new(control::ConnState { accepted_from, ..Default::default() });
        // Authenticated now (the welcome was sent or received): lift the
        // stream limit the handshake ran under to the working one.
        transport::open_stream_limits(&conn, self.streams_per_peer.load(Relaxed));
        if !slot.add(&conn, state.clone()) {
            // A reload retired the entry while the handshake ran.
            conn.close(peers::CLOSE_RECONFIGURED, b"peer entry changed; reconnect");
            return;
        }
        // Or added one that admits this identity first: the commit swapped
        // the set before it looked at this slot's connections, so one of the
        // two sees the other.
        if state.accepted_from.as_deref().is_some_and(|id| !self.still_admits(&slot, id)) {
            conn.close(peers::CLOSE_RECONFIGURED, b"peers changed; reconnect");
            slot.remove(&conn);
            return;
        }
        let labels = PeerDirectionLabels { peer: slot.name.to_string(), direction };
        self.metrics.connections_opened.get_or_create(&labels).inc();
        self.liveness.send_modify(|n| *n += 1);
        let span = info_span!("tunnel", peer = %slot.name, remote = %conn.remote_address());
        // The peer's certificate was checked once, at the handshake: the
        // connection must not outlive it.
        let expires_in = handshake::peer_certificate_expiry(&conn)
            .map_or(Duration::MAX, |t| t.duration_since(std::time::SystemTime::now()).unwrap_or_default());
        async {
            info!(identity = %peer.identity, ?expires_in, "tunnel connection up");
            let mut stop = self.stop.subscribe();
            let expiry = tokio::time::sleep(expires_in.min(Duration::from_secs(100 * 365 * 86_400)));
            tokio::pin!(expiry);
            // Both halves of the control stream run beside the stream
            // accept loop, on this task, and end with the connection.
            let control = async {
                let (send, recv) = match control {
                    Control::Accepted(send) => (Some(send), conn.accept_uni().await.ok()),
                    Control::Dialed(recv) => (conn.open_uni().await.ok(), Some(recv)),
                };
                let write = async {
                    if let Some(send) = send {
                        self.write_control(send, &peer).await;
                    }
                };
                let read = async {
                    if let Some(recv) = recv {
                        self.read_control(&conn, recv, &peer, &state, slot.spec.learns).await;
                    }
                };
                tokio::join!(write, read);
                // Past here: the connection is going (or the peer has no
                // control stream and never will advertise).
                std::future::pending::<()>().await;
            };
            tokio::pin!(control);
            loop {
                let accepted = tokio::select! {
                    a = conn.accept_bi() => a,
                    () = &mut control => break,
                    _ = stop.changed() => break,
                    _ = &mut expiry => {
                        info!("the peer's certificate expired; closing the connection");
                        conn.close(handshake::CLOSE_CERT_EXPIRED, b"certificate expired");
                        break;
                    }
                };
                match accepted {
                    Ok((mut send, recv)) => match &self.handler {
                        Some(h) => h.clone().accept_stream(&peer, send, recv),
                        None => {
                            debug!("stream from a peer, but this agent serves nothing; resetting");
                            let _ = send.reset(handshake::RESET_NOT_SERVED);
                        }
                    },
                    Err(e) => {
                        info!(reason = %e, "tunnel connection closed");
                        break;
                    }
                }
            }
        }
        .instrument(span)
        .await;
        slot.remove(&conn);
        self.liveness.send_modify(|n| *n += 1);
    }
}

fn lock_advertised(state: &control::ConnState) -> Arc<[Advert]> {
    crate::lock(&state.advertised).clone()
}
