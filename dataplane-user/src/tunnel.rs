//! The QUIC tunnel: one endpoint per agent that both accepts and dials,
//! mutual TLS against the private CA, and a pool of live connections per peer.
//!
//! Which side dialled does not decide which side opens streams: every
//! connection, dialled or accepted, serves the streams its peer opens (if this
//! agent is a connector) and can carry streams this agent opens. So a
//! connector behind a firewall that allows no inbound traffic dials out to
//! the agents that use it and still receives their flows, the way cloudflared
//! serves its edge.

use std::{
    collections::HashMap,
    net::{Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};
use quinn::{
    ClientConfig, ConnectionError, Endpoint, EndpointConfig, IdleTimeout, RecvStream, SendStream,
    ServerConfig, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use rustls_pki_types::CertificateDer;
use tokio::{sync::watch, task::JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    config::{Peer, TunnelSettings},
    connector::Connector,
    tls::{TlsError, TlsMaterial, uri_san},
};

/// Close code when this agent shuts down.
const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Close code for a peer whose identity is not configured.
const CLOSE_UNKNOWN_PEER: VarInt = VarInt::from_u32(2);
/// Close code for a stream this agent does not serve.
const RESET_NOT_SERVED: VarInt = VarInt::from_u32(3);
/// Close code for a dialled peer that never confirmed it accepted us.
const CLOSE_NO_WELCOME: VarInt = VarInt::from_u32(4);
/// The acceptor's first message: "your certificate and identity are accepted".
/// In TLS 1.3 a client finishes its handshake before the server has checked
/// the client certificate, so without this a dialer would count a connection
/// the peer is about to refuse as live.
const WELCOME: u8 = 1;

/// Streams in flight per connection; quinn's default of 100 would cap a
/// node's concurrent flows per connection far too low.
const MAX_STREAMS: u32 = 65_536;
/// Per-stream and per-connection receive windows, which are also what a peer
/// can make us hold per connection. 4 MiB carries a stream at 6 Gbit/s over
/// a 5 ms path (650 Mbit/s at 50 ms), 16 MiB a connection at 25 Gbit/s (2.7
/// at 50 ms): ample for API-server traffic. Twice these measured the same on
/// the benchmark, and left the agents 20-50 MiB larger after a burst.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDirectionLabels {
    peer: String,
    /// `dialed` or `accepted`.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BufferLabels {
    /// `receive` or `send`.
    direction: &'static str,
}

/// Metrics of the tunnel; per-connection QUIC statistics are read at scrape
/// time by [`TunnelCollector`].
#[derive(Debug)]
pub struct TunnelMetrics {
    handshake_failures: Family<ReasonLabels, Counter>,
    connections_opened: Family<PeerDirectionLabels, Counter>,
    streams_opened: Family<PeerLabels, Counter>,
    udp_buffer: Family<BufferLabels, Gauge>,
}

impl TunnelMetrics {
    fn register(registry: &mut Registry) -> TunnelMetrics {
        let m = TunnelMetrics {
            handshake_failures: Family::default(),
            connections_opened: Family::default(),
            streams_opened: Family::default(),
            udp_buffer: Family::default(),
        };
        registry.register(
            "tunnel_handshake_failures",
            "Failed tunnel handshakes in either direction, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "tunnel_connections_opened",
            "Tunnel connections established, by peer and direction",
            m.connections_opened.clone(),
        );
        registry.register(
            "tunnel_streams_opened",
            "Flow streams this agent opened, by peer",
            m.streams_opened.clone(),
        );
        // The reasons operators alert on start at zero, so the series exist
        // from the first scrape on (other reasons appear when they happen).
        for reason in [
            "unknown_ca",
            "bad_certificate",
            "peer_unknown_ca",
            "peer_bad_certificate",
            "unknown_identity",
            "timeout",
        ] {
            let _ = m.handshake_failures.get_or_create_owned(&ReasonLabels { reason: reason.to_owned() });
        }
        registry.register_with_unit(
            "tunnel_udp_socket_buffer",
            "UDP socket buffer size the kernel granted",
            Unit::Bytes,
            m.udp_buffer.clone(),
        );
        m
    }

    fn failed(&self, reason: String) {
        self.handshake_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Handshake failures counted for `reason`.
    pub fn handshake_failures(&self, reason: &str) -> u64 {
        self.handshake_failures.get(&ReasonLabels { reason: reason.to_owned() }).map_or(0, |c| c.get())
    }

    /// Connections established with `peer`, both directions.
    pub fn connections_opened(&self, peer: &str) -> u64 {
        ["dialed", "accepted"]
            .iter()
            .filter_map(|d| {
                self.connections_opened
                    .get(&PeerDirectionLabels { peer: peer.to_owned(), direction: d })
                    .map(|c| c.get())
            })
            .sum()
    }

    /// Streams this agent opened to `peer`.
    pub fn streams_opened(&self, peer: &str) -> u64 {
        self.streams_opened.get(&PeerLabels { peer: peer.to_owned() }).map_or(0, |c| c.get())
    }
}

/// Totals of connections that closed, so per-peer counters stay monotonic.
#[derive(Debug, Default)]
struct Retired {
    lost_packets: u64,
    sent: u64,
    received: u64,
}

/// Live connections to one peer.
#[derive(Debug)]
struct PeerSlot {
    name: Arc<str>,
    identity: String,
    conns: Mutex<Vec<quinn::Connection>>,
    next: AtomicUsize,
    /// Connections this agent keeps dialled to the peer (0: it dials us).
    dialers: u32,
    retired: Mutex<Retired>,
}

impl PeerSlot {
    fn add(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).push(c.clone());
    }

    fn remove(&self, c: &quinn::Connection) {
        crate::lock(&self.conns).retain(|x| x.stable_id() != c.stable_id());
        let st = c.stats();
        let mut r = crate::lock(&self.retired);
        r.lost_packets += st.path.lost_packets;
        r.sent += st.udp_tx.bytes;
        r.received += st.udp_rx.bytes;
    }

    fn live(&self) -> Vec<quinn::Connection> {
        let conns = crate::lock(&self.conns);
        conns.iter().filter(|c| c.close_reason().is_none()).cloned().collect()
    }

    /// Round-robin over the live connections.
    fn pick(&self) -> Option<quinn::Connection> {
        let conns = crate::lock(&self.conns);
        let live: Vec<&quinn::Connection> = conns.iter().filter(|c| c.close_reason().is_none()).collect();
        if live.is_empty() {
            return None;
        }
        Some(live[self.next.fetch_add(1, Relaxed) % live.len()].clone())
    }
}

pub struct Tunnel {
    endpoint: Endpoint,
    peers: HashMap<Arc<str>, Arc<PeerSlot>>,
    by_identity: HashMap<String, Arc<PeerSlot>>,
    dial: Vec<(Arc<PeerSlot>, Vec<SocketAddr>, u32)>,
    client_configs: HashMap<Arc<str>, ClientConfig>,
    connector: Option<Arc<Connector>>,
    handshake_timeout: Duration,
    stop: watch::Sender<bool>,
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
        peers: &[Peer],
        tls: &TlsMaterial,
        connector: Option<Arc<Connector>>,
        registry: &mut Registry,
    ) -> Result<Arc<Tunnel>, TunnelError> {
        let transport = Arc::new(transport(settings)?);
        let quic = |e: &dyn std::fmt::Display| TunnelError::Quic(e.to_string());
        let server_crypto = QuicServerConfig::try_from(tls.server_config()?).map_err(|e| quic(&e))?;
        let mut server = ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());

        let (addr, accept) = match settings.listen {
            Some(a) => (a, true),
            None => (SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0), false),
        };
        let (socket, buffers) = udp_socket(addr, settings.udp_buffer_bytes)
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let endpoint = Endpoint::new(
            EndpointConfig::default(),
            accept.then_some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| TunnelError::Bind { addr, source })?;

        let mut slots = HashMap::new();
        let mut by_identity = HashMap::new();
        let mut dial = Vec::new();
        let mut client_configs = HashMap::new();
        for p in peers {
            let slot = Arc::new(PeerSlot {
                name: Arc::from(p.name.as_str()),
                identity: p.identity.clone(),
                conns: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
                dialers: if p.dial.is_empty() { 0 } else { p.connections },
                retired: Mutex::default(),
            });
            let crypto = QuicClientConfig::try_from(tls.client_config(&p.identity)?).map_err(|e| quic(&e))?;
            let mut client = ClientConfig::new(Arc::new(crypto));
            client.transport_config(transport.clone());
            client_configs.insert(slot.name.clone(), client);
            if !p.dial.is_empty() {
                dial.push((slot.clone(), p.dial.clone(), p.connections));
            }
            by_identity.insert(p.identity.clone(), slot.clone());
            slots.insert(slot.name.clone(), slot);
        }
        let metrics = TunnelMetrics::register(registry);
        metrics.udp_buffer.get_or_create(&BufferLabels { direction: "receive" }).set(buffers.0 as i64);
        metrics.udp_buffer.get_or_create(&BufferLabels { direction: "send" }).set(buffers.1 as i64);
        registry.register_collector(Box::new(TunnelCollector { peers: slots.values().cloned().collect() }));
        info!(
            local = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            accepting = accept,
            rcvbuf = buffers.0,
            sndbuf = buffers.1,
            "tunnel endpoint bound"
        );
        Ok(Arc::new(Tunnel {
            endpoint,
            peers: slots,
            by_identity,
            dial,
            client_configs,
            connector,
            handshake_timeout: settings.idle_timeout,
            stop: watch::channel(false).0,
            metrics,
        }))
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Starts accepting (if listening) and the dialers.
    pub fn start(self: &Arc<Self>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().accept_loop());
        for (slot, addrs, n) in &self.dial {
            for i in 0..*n {
                tasks.spawn(self.clone().dial_loop(slot.clone(), addrs.clone(), i as usize));
            }
        }
        tasks
    }

    /// Live connections to `peer`.
    pub fn live_connections(&self, peer: &str) -> usize {
        self.peers.get(peer).map_or(0, |s| s.live().len())
    }

    /// Smoothed RTT of the best live connection to `peer`.
    pub fn best_rtt(&self, peer: &str) -> Option<Duration> {
        self.peers.get(peer)?.live().iter().map(|c| c.rtt()).min()
    }

    /// Opens a stream to `peer` on one of its live connections.
    pub async fn open(&self, peer: &str) -> Result<(SendStream, RecvStream), TunnelError> {
        let slot = self.peers.get(peer).ok_or_else(|| TunnelError::NoConnection(peer.to_owned()))?;
        let conn = slot.pick().ok_or_else(|| TunnelError::NoConnection(peer.to_owned()))?;
        let streams =
            conn.open_bi().await.map_err(|source| TunnelError::Open { peer: peer.to_owned(), source })?;
        self.metrics.streams_opened.get_or_create(&PeerLabels { peer: peer.to_owned() }).inc();
        Ok(streams)
    }

    /// Closes every connection and the endpoint, waiting briefly for peers to
    /// learn of it (so they fail over at once instead of timing out).
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        self.endpoint.close(CLOSE_SHUTDOWN, b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        let reason = failure_reason(&e);
                        warn!(%remote, %reason, error = %e, "incoming tunnel handshake failed");
                        return this.metrics.failed(reason);
                    }
                };
                let identity = peer_identity(&conn);
                let Some(slot) = identity.as_deref().and_then(|id| this.by_identity.get(id)).cloned() else {
                    warn!(%remote, ?identity, "peer identity is not configured; closing");
                    this.metrics.failed("unknown_identity".into());
                    return conn.close(CLOSE_UNKNOWN_PEER, b"identity not configured");
                };
                let welcomed = async {
                    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
                    s.write_all(&[WELCOME]).await.map_err(|e| e.to_string())?;
                    s.finish().map_err(|e| e.to_string())
                };
                if let Err(e) = welcomed.await {
                    debug!(%remote, error = %e, "could not welcome the peer");
                    return;
                }
                this.run_connection(slot, conn, "accepted").await;
            });
        }
    }

    async fn dial_loop(self: Arc<Self>, slot: Arc<PeerSlot>, addrs: Vec<SocketAddr>, index: usize) {
        let mut stop = self.stop.subscribe();
        let mut backoff = BACKOFF_MIN;
        let mut attempt = index;
        let config = self.client_configs[&slot.name].clone();
        loop {
            if *stop.borrow() {
                return;
            }
            let addr = addrs[attempt % addrs.len()];
            attempt += 1;
            // The SNI name is unused: the verifier goes by the URI SAN.
            let connecting = self.endpoint.connect_with(config.clone(), addr, "dataplane.peer");
            let result = match connecting {
                Ok(c) => c.await,
                Err(e) => {
                    warn!(peer = %slot.name, %addr, error = %e, "cannot dial");
                    Err(ConnectionError::LocallyClosed)
                }
            };
            let result = match result {
                Ok(conn) => self.await_welcome(conn).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(conn) => {
                    backoff = BACKOFF_MIN;
                    self.run_connection(slot.clone(), conn, "dialed").await;
                }
                Err(_) if *stop.borrow() => return,
                Err(e) => {
                    let reason = failure_reason(&e);
                    warn!(peer = %slot.name, %addr, %reason, error = %e, "tunnel handshake failed");
                    self.metrics.failed(reason);
                }
            }
            // Exponential backoff with jitter (50-150%), so a fleet of agents
            // does not reconnect in lockstep after a connector restart.
            let delay = backoff.mul_f64(0.5 + jitter());
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Waits for the acceptor's welcome: only then did it accept our
    /// certificate and identity. A refusal surfaces as its close reason.
    async fn await_welcome(&self, conn: quinn::Connection) -> Result<quinn::Connection, ConnectionError> {
        let welcome = async {
            let mut r = conn.accept_uni().await?;
            let mut b = [0u8; 1];
            r.read_exact(&mut b).await.map_err(|_| ConnectionError::Reset)?;
            Ok::<_, ConnectionError>(b[0])
        };
        match tokio::time::timeout(self.handshake_timeout, welcome).await {
            Ok(Ok(WELCOME)) => Ok(conn),
            Ok(Ok(_)) => {
                conn.close(CLOSE_NO_WELCOME, b"unexpected welcome");
                Err(ConnectionError::Reset)
            }
            Ok(Err(e)) => Err(conn.close_reason().unwrap_or(e)),
            Err(_) => {
                conn.close(CLOSE_NO_WELCOME, b"no welcome");
                Err(ConnectionError::TimedOut)
            }
        }
    }

    /// Registers a live connection and serves the streams the peer opens on it
    /// until it closes.
    async fn run_connection(&self, slot: Arc<PeerSlot>, conn: quinn::Connection, direction: &'static str) {
        let labels = PeerDirectionLabels { peer: slot.name.to_string(), direction };
        self.metrics.connections_opened.get_or_create(&labels).inc();
        slot.add(&conn);
        let span = info_span!("tunnel", peer = %slot.name, remote = %conn.remote_address());
        async {
            info!(identity = %slot.identity, "tunnel connection up");
            let mut stop = self.stop.subscribe();
            loop {
                let accepted = tokio::select! {
                    a = conn.accept_bi() => a,
                    _ = stop.changed() => break,
                };
                match accepted {
                    Ok((mut send, recv)) => match &self.connector {
                        Some(c) => {
                            tokio::spawn(c.clone().serve(slot.name.clone(), send, recv));
                        }
                        None => {
                            debug!("stream from a peer, but this agent serves nothing; resetting");
                            let _ = send.reset(RESET_NOT_SERVED);
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
    }
}

/// Reads every peer's live connections at scrape time: connection states,
/// RTT, congestion window, lost packets and bytes on the wire (quinn's stats).
#[derive(Debug)]
struct TunnelCollector {
    peers: Vec<Arc<PeerSlot>>,
}

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        struct Row {
            peer: Arc<str>,
            up: u64,
            down: u64,
            rtt: Option<f64>,
            cwnd: u64,
            lost: u64,
            sent: u64,
            received: u64,
        }
        let rows: Vec<Row> = self
            .peers
            .iter()
            .map(|p| {
                let live = p.live();
                let stats: Vec<quinn::ConnectionStats> = live.iter().map(|c| c.stats()).collect();
                let r = crate::lock(&p.retired);
                Row {
                    peer: p.name.clone(),
                    up: live.len() as u64,
                    down: u64::from(p.dialers).saturating_sub(live.len() as u64),
                    rtt: live.iter().map(|c| c.rtt().as_secs_f64()).reduce(f64::min),
                    cwnd: stats.iter().map(|s| s.path.cwnd).sum(),
                    lost: r.lost_packets + stats.iter().map(|s| s.path.lost_packets).sum::<u64>(),
                    sent: r.sent + stats.iter().map(|s| s.udp_tx.bytes).sum::<u64>(),
                    received: r.received + stats.iter().map(|s| s.udp_rx.bytes).sum::<u64>(),
                }
            })
            .collect();
        let mut m = encoder.encode_descriptor(
            "tunnel_connections",
            "Tunnel connections by peer and state (down: dialled connections not up)",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            for (state, n) in [("up", r.up), ("down", r.down)] {
                m.encode_family(&[("peer", &*r.peer), ("state", state)])?.encode_gauge(&(n as i64))?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_rtt",
            "Smoothed RTT of the best live connection to the peer",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for r in &rows {
            if let Some(rtt) = r.rtt {
                m.encode_family(&[("peer", &*r.peer)])?.encode_gauge(&rtt)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_congestion_window",
            "Congestion windows of the live connections to the peer, summed",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for r in &rows {
            m.encode_family(&[("peer", &*r.peer)])?.encode_gauge(&(r.cwnd as i64))?;
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_lost_packets",
            "Packets declared lost on connections to the peer",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            m.encode_family(&[("peer", &*r.peer)])?.encode_counter::<NoLabelSet, _, u64>(&r.lost, None)?;
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_udp",
            "UDP payload bytes on connections to the peer, by direction",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for r in &rows {
            for (direction, n) in [("sent", r.sent), ("received", r.received)] {
                m.encode_family(&[("peer", &*r.peer), ("direction", direction)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}

/// The transport settings every tunnel connection uses (public for the
/// benchmark's raw-QUIC baseline, which must match them).
pub fn transport(settings: &TunnelSettings) -> Result<TransportConfig, TunnelError> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        // One for the welcome; no other unidirectional streams are used.
        .max_concurrent_uni_streams(VarInt::from_u32(1))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(settings.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(settings.idle_timeout).map_err(|e| TunnelError::Quic(e.to_string()))?,
        ));
    Ok(t)
}

/// A UDP socket with the buffers forced to `size` (the agent is privileged:
/// SO_*BUFFORCE ignores net.core.*mem_max), falling back to the unforced
/// options. Returns the sizes the kernel actually granted. GSO/GRO stay on:
/// quinn enables them on the socket it is given.
pub fn udp_socket(addr: SocketAddr, size: usize) -> std::io::Result<(std::net::UdpSocket, (usize, usize))> {
    use std::os::fd::AsRawFd;

    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // [::] serves IPv4 peers too.
        socket.set_only_v6(false)?;
    }
    let force = |opt: libc::c_int| {
        let v = size as libc::c_int;
        // SAFETY: v outlives the call; the size passed is its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !force(libc::SO_RCVBUFFORCE) {
        socket.set_recv_buffer_size(size)?;
    }
    if !force(libc::SO_SNDBUFFORCE) {
        socket.set_send_buffer_size(size)?;
    }
    socket.bind(&addr.into())?;
    let granted = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    Ok((socket.into(), granted))
}

/// The URI SAN of the certificate a connection's peer presented.
fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    uri_san(certs.first()?)
}

/// A short, stable label for why a handshake failed.
pub fn failure_reason(e: &ConnectionError) -> String {
    fn tls_alert(code: u64) -> Option<String> {
        // QUIC carries TLS alerts as CRYPTO_ERROR 0x100 + alert.
        let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff)?;
        Some(
            match alert {
                42 => "bad_certificate",
                43 => "unsupported_certificate",
                45 => "certificate_expired",
                46 => "certificate_unknown",
                48 => "unknown_ca",
                116 => "certificate_required",
                120 => "no_application_protocol",
                a => return Some(format!("tls_alert_{a}")),
            }
            .to_owned(),
        )
    }
    match e {
        ConnectionError::TransportError(t) => {
            tls_alert(u64::from(t.code)).unwrap_or_else(|| format!("transport_{:#x}", u64::from(t.code)))
        }
        ConnectionError::ConnectionClosed(c) => match u64::from(c.error_code) {
            // CONNECTION_REFUSED: the peer is not accepting (shutting down).
            0x2 => "peer_refused".into(),
            code => tls_alert(code).map_or_else(|| format!("peer_closed_{code:#x}"), |a| format!("peer_{a}")),
        },
        ConnectionError::ApplicationClosed(a) if a.error_code == CLOSE_UNKNOWN_PEER => {
            "peer_unknown_identity".into()
        }
        ConnectionError::ApplicationClosed(_) => "peer_closed".into(),
        ConnectionError::TimedOut => "timeout".into(),
        ConnectionError::Reset => "reset".into(),
        ConnectionError::VersionMismatch => "version_mismatch".into(),
        ConnectionError::LocallyClosed => "locally_closed".into(),
        ConnectionError::CidsExhausted => "cids_exhausted".into(),
    }
}

/// A number in [0, 1) that differs between calls and processes; enough for
/// backoff jitter without a random number generator dependency.
fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed) ^ seed ^ u64::from(std::process::id());
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let v: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn forced_udp_buffers_are_granted() {
        let (_s, (rcv, snd)) = udp_socket("127.0.0.1:0".parse().expect("addr"), 4 << 20).expect("socket");
        // Linux reports double the requested size (bookkeeping overhead).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(rcv >= 4 << 20 && snd >= 4 << 20, "forced as root: {rcv} {snd}");
        }
    }
}
