//! The agent: starts steering (interface, listeners, programs, routes) when it
//! routes something, the tunnel when it has peers, the connector role when it
//! serves something; serves steered flows; applies reloads; and shuts down in
//! an order that never leaves a connect pointing at a dead listener.

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use dataplane_common::protocol::{self, MAX_REQUEST, META_SOURCE_NODE, META_WORKLOAD, Metadata, Request};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    admin::{self, AdminError},
    cgroup::{self, CgroupError},
    config::{Config, ConfigError},
    connector::{Connector, ServePolicy},
    direct,
    ebpf::{KernelCounters, Recovered, Steering, SteeringError},
    flow_metrics::{FlowMetrics, FlowResult, FlowSnapshot, UNKNOWN_ROUTE},
    kernel::{self, KernelError},
    lock, metrics,
    netlink::{NetlinkError, RedirectInterface},
    routes::{RouteTable, Upstream},
    sockopt, splice,
    steer::{self, BindError},
    tls::{TlsError, TlsMaterial},
    tunnel::{Tunnel, TunnelError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("setting up the redirect interface: {0}")]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// Why a reload was not applied. Nothing of a refused reload takes effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reload changes {0:?}, which only take effect on restart; nothing was applied")]
    RestartRequired(Vec<&'static str>),
    #[error("the agent is shutting down")]
    Stopped,
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

/// After detaching, how long the listeners keep accepting connects that were
/// redirected before the detach and are still completing their handshake.
const SETTLE_AFTER_DETACH: Duration = Duration::from_millis(250);

/// State shared by the accept loops, flows and handles.
struct Shared {
    node: String,
    steering: Option<Arc<Steering>>,
    registry: Registry,
    tunnel: Option<Arc<Tunnel>>,
    connector: Option<Arc<Connector>>,
    config: Mutex<Config>,
    routes: Arc<Mutex<RouteTable>>,
    flows: FlowMetrics,
    next_flow_id: AtomicU64,
    stopping: std::sync::atomic::AtomicBool,
}

/// Kernel-side steering set up at start.
struct SteeringParts {
    listeners: Vec<TcpListener>,
    iface: RedirectInterface,
}

/// A started agent, ready to [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
    steering: Option<SteeringParts>,
    tunnel_tasks: JoinSet<()>,
    admin: Option<TcpListener>,
}

/// A cheap handle to a running agent, for reloads and inspection.
#[derive(Clone)]
pub struct AgentHandle(Arc<Shared>);

/// What the agent reports when it stops.
#[derive(Clone, Debug)]
pub struct Summary {
    pub kernel: KernelCounters,
    pub flows: FlowSnapshot,
}

impl Agent {
    /// Starts the parts the config asks for. Steering: the redirect interface
    /// and listeners first, then the programs (so no connect is redirected
    /// before its listener exists), then the routes. On failure everything
    /// created so far is removed again.
    pub async fn start(config: Config) -> Result<Agent, AgentError> {
        config.validate()?;
        let routes = config.valid_routes()?;
        let serve = config.valid_serve()?;
        // First, so a taken admin port fails before anything is set up.
        let admin = match config.admin {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };

        let mut registry = Registry::with_prefix("dataplane");
        let flows = FlowMetrics::register(&mut registry);
        let connector = (!serve.is_empty()).then(|| {
            Arc::new(Connector::new(ServePolicy::new(serve), config.timeouts.connect, &mut registry))
        });
        let tunnel = match &config.tls {
            Some(files) => {
                let tls = TlsMaterial::load(files)?;
                info!(identity = %tls.identity, "tunnel identity loaded");
                Some(Tunnel::bind(&config.tunnel, &config.peers, &tls, connector.clone(), &mut registry)?)
            }
            None => None,
        };

        let table = RouteTable::build(&routes, &RouteTable::default());
        let (steering, parts) = if routes.is_empty() {
            (None, None)
        } else {
            let (steering, parts) = start_steering(&config, &table).await?;
            let steering = Arc::new(steering);
            registry.register_collector(Box::new(metrics::SteeringCollector(steering.clone())));
            (Some(steering), Some(parts))
        };
        metrics::register_common(&mut registry);
        let routes = Arc::new(Mutex::new(table));
        registry
            .register_collector(Box::new(RouteReadiness { routes: routes.clone(), tunnel: tunnel.clone() }));
        let shared = Arc::new(Shared {
            node: config.node.clone(),
            steering,
            registry,
            tunnel,
            connector,
            config: Mutex::new(config),
            routes,
            flows,
            next_flow_id: AtomicU64::new(1),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        let tunnel_tasks = shared.tunnel.as_ref().map(|t| t.start()).unwrap_or_default();
        Ok(Agent { shared, steering: parts, tunnel_tasks, admin })
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle(self.shared.clone())
    }

    /// The admin server's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The addresses the redirect listeners are bound to.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        let listeners = self.steering.iter().flat_map(|s| &s.listeners);
        listeners.filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown` resolves, then: detaches the programs, accepts
    /// what was already redirected, closes the listeners, gives open flows the
    /// grace period, closes the tunnel (peers learn at once), and removes the
    /// interface.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Summary {
        let Agent { shared, steering, mut tunnel_tasks, admin } = self;
        let admin_task = admin.map(|l| tokio::spawn(admin::serve(l, AgentHandle(shared.clone()))));
        let (listeners, iface) = match steering {
            Some(p) => (p.listeners, Some(p.iface)),
            None => (Vec::new(), None),
        };
        let (accepted_tx, accepted_rx) = tokio::sync::mpsc::channel::<Accepted>(1024);
        let mut acceptors = JoinSet::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for listener in listeners {
            let tx = accepted_tx.clone();
            let mut stop = stop_rx.clone();
            acceptors.spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => return listener,
                        res = listener.accept() => match res {
                            Ok(conn) => {
                                if tx.send(conn).await.is_err() {
                                    return listener;
                                }
                            }
                            // A connection that died in the queue: next one.
                            Err(e) if steer::is_per_connection(&e) => {}
                            // EMFILE and friends: back off instead of spinning.
                            Err(e) => {
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                    }
                }
            });
        }
        drop(accepted_tx);

        let (dispatch_stop, stopped) = tokio::sync::oneshot::channel();
        let dispatcher = tokio::spawn(dispatch(shared.clone(), accepted_rx, stopped));
        shutdown.await;
        let _ = dispatch_stop.send(());
        let (mut flows, mut accepted_rx) = match dispatcher.await {
            Ok(parts) => parts,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };

        shared.stopping.store(true, Relaxed);
        if let Some(s) = &shared.steering {
            info!("shutting down: detaching steering");
            s.stop_redirecting();
            // A connect redirected just before may still be in its handshake;
            // under load that can outlast a drain of the accept queue, and
            // closing the listener then would reset it. Keep accepting, with
            // sock_ops still recording flows, until such stragglers have
            // landed; then detach the rest.
            let settle = tokio::time::sleep(SETTLE_AFTER_DETACH);
            tokio::pin!(settle);
            loop {
                tokio::select! {
                    _ = &mut settle => break,
                    Some((stream, peer)) = accepted_rx.recv() => spawn_flow(&shared, &mut flows, stream, peer),
                }
            }
            s.detach();
        }
        let _ = stop_tx.send(true);
        while let Some(Ok(listener)) = acceptors.join_next().await {
            for (stream, peer) in steer::drain_queued(listener) {
                spawn_flow(&shared, &mut flows, stream, peer);
            }
        }
        while let Ok((stream, peer)) = accepted_rx.try_recv() {
            spawn_flow(&shared, &mut flows, stream, peer);
        }
        let grace = lock(&shared.config).timeouts.shutdown_grace;
        if !flows.is_empty() {
            info!(flows = flows.len(), ?grace, "waiting for open flows");
            let drained =
                tokio::time::timeout(grace, async { while flows.join_next().await.is_some() {} }).await;
            if drained.is_err() {
                warn!(flows = flows.len(), "grace period over; closing the remaining flows");
                flows.shutdown().await;
            }
        }
        if let Some(t) = &shared.tunnel {
            t.close().await;
        }
        tunnel_tasks.shutdown().await;
        if let Some(iface) = iface {
            iface.remove().await;
        }
        if let Some(t) = admin_task {
            t.abort();
        }
        let summary = AgentHandle(shared).summary();
        info!(kernel = ?summary.kernel, flows = ?summary.flows, "agent stopped");
        summary
    }
}

async fn start_steering(
    config: &Config,
    table: &RouteTable,
) -> Result<(Steering, SteeringParts), AgentError> {
    let features = kernel::probe()?;
    info!(kernel = %features.release, btf = features.btf, ring_buf = features.ring_buf, "kernel features probed");
    if !features.ring_buf {
        warn!("no BPF ring buffer (Linux < 5.8): eBPF programs' logs are unavailable");
    }
    let cgroup = cgroup::resolve(config.steering.cgroup.as_deref())?;
    let redirect = &config.steering.redirect;
    let addrs: Vec<_> = redirect.v4.iter().chain(&redirect.v6).map(|a| a.ip()).collect();
    let iface = RedirectInterface::create(&redirect.interface, &addrs).await?;
    info!(interface = %iface.name, kind = ?iface.kind, "redirect interface ready");
    let setup = async {
        let mut listeners = Vec::new();
        for (field, addr) in [("steering.redirect.v4", redirect.v4), ("steering.redirect.v6", redirect.v6)] {
            if let Some(addr) = addr {
                listeners.push(steer::bind(field, addr)?);
            }
        }
        let steering = Steering::load(&cgroup, redirect.v4, redirect.v6)?;
        steering.apply(&RouteTable::default().diff(table))?;
        Ok::<_, AgentError>((listeners, steering))
    };
    match setup.await {
        Ok((listeners, steering)) => {
            info!(cgroup = %cgroup.display(), routes = table.entries().len(), "steering attached");
            Ok((steering, SteeringParts { listeners, iface }))
        }
        Err(e) => {
            iface.remove().await;
            Err(e)
        }
    }
}

/// `dataplane_route_ready{route, via}`: 1 while a route can be served (a
/// direct route always; a peer route while the peer has a live connection).
#[derive(Debug)]
struct RouteReadiness {
    routes: Arc<Mutex<RouteTable>>,
    tunnel: Option<Arc<Tunnel>>,
}

impl prometheus_client::collector::Collector for RouteReadiness {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let rows: Vec<(String, String, bool)> = lock(&self.routes)
            .entries()
            .iter()
            .map(|r| match &r.upstream {
                Upstream::Direct => (r.net.to_string(), "direct".to_owned(), true),
                Upstream::Peer(p) => (
                    r.net.to_string(),
                    p.to_string(),
                    self.tunnel.as_ref().is_some_and(|t| t.live_connections(p) > 0),
                ),
            })
            .collect();
        let mut m = encoder.encode_descriptor(
            "route_ready",
            "1 while the route can be served (its peer has a live tunnel connection)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (route, via, ready) in &rows {
            m.encode_family(&[("route", route.as_str()), ("via", via.as_str())])?
                .encode_gauge(&i64::from(*ready))?;
        }
        Ok(())
    }
}

/// A connection accepted on a redirect listener, with its peer address.
type Accepted = (TcpStream, SocketAddr);

/// Spawns a flow for each accepted connection and reaps finished ones until
/// `stop`, then hands both back for the shutdown sequence. A task of its own,
/// so it runs on a runtime worker: polled by `run`'s caller (the thread in
/// `block_on`, which is no worker), every new flow waited for that thread to
/// be woken and scheduled, measured at up to hundreds of microseconds per
/// flow on a busy 2-core node.
async fn dispatch(
    shared: Arc<Shared>,
    mut accepted: tokio::sync::mpsc::Receiver<Accepted>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (JoinSet<()>, tokio::sync::mpsc::Receiver<Accepted>) {
    let mut flows = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some((stream, peer)) = accepted.recv() => spawn_flow(&shared, &mut flows, stream, peer),
            Some(_) = flows.join_next(), if !flows.is_empty() => {}
        }
    }
    (flows, accepted)
}

fn spawn_flow(shared: &Arc<Shared>, flows: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
    let id = shared.next_flow_id.fetch_add(1, Relaxed);
    let span = info_span!("flow", id, %peer, route = tracing::field::Empty, via = tracing::field::Empty);
    flows.spawn(serve_flow(shared.clone(), stream, peer, id).instrument(span));
}

/// Records a flow's end exactly once, also when its task is cut off at the
/// end of the shutdown grace period (then as `failed`).
struct FlowRecord<'a> {
    metrics: &'a FlowMetrics,
    route: String,
    result: FlowResult,
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

/// Serves one steered connection: recover its destination, reach it through
/// the route's upstream, splice. Every failure resets the client so the
/// application sees an error at once. The flow's record (a local) is dropped,
/// and so counted, before the client socket (a parameter) closes: whoever
/// sees the close finds the metrics already updated.
async fn serve_flow(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, id: u64) {
    let accepted = Instant::now();
    let Some(flow) = shared.steering.as_ref().and_then(|s| s.lookup_flow(peer)) else {
        let mut record = FlowRecord::open(&shared.flows, UNKNOWN_ROUTE.to_owned());
        // Usually a client that reset before we accepted (its entry is gone
        // with it); otherwise something connected to the listener directly.
        record.result = FlowResult::unrecovered;
        debug!("no original destination recorded for this peer; resetting");
        return reset(&client);
    };
    let route = lock(&shared.routes).get(flow.route_id).map(|r| (r.net.to_string(), r.upstream.clone()));
    let Some((route, upstream)) = route else {
        let mut record = FlowRecord::open(&shared.flows, UNKNOWN_ROUTE.to_owned());
        record.result = FlowResult::route_gone;
        info!(dst = %flow.dst, route = flow.route_id, "route removed since the connect; resetting");
        return reset(&client);
    };
    let span = tracing::Span::current();
    span.record("route", route.as_str());
    let mut record = FlowRecord::open(&shared.flows, route);
    record.result = match upstream {
        Upstream::Direct => {
            span.record("via", "direct");
            direct_flow(&shared, &mut client, flow, accepted, &record.route).await
        }
        Upstream::Peer(name) => {
            span.record("via", &*name);
            let to = Target { peer: &name, flow, id, accepted, route: &record.route };
            tunnel_flow(&shared, &mut client, peer, to).await
        }
    };
}

async fn direct_flow(
    shared: &Shared,
    client: &mut TcpStream,
    flow: Recovered,
    accepted: Instant,
    route: &str,
) -> FlowResult {
    let timeout = lock(&shared.config).timeouts.connect;
    let Some(steering) = &shared.steering else {
        reset(client);
        return FlowResult::failed;
    };
    let mut server = match direct::dial(steering, flow.dst, timeout).await {
        Ok(s) => s,
        Err(e) => {
            info!(dst = %flow.dst, error = %e, "upstream dial failed; resetting");
            reset(client);
            return FlowResult::dial_failed;
        }
    };
    shared.flows.setup("direct", accepted.elapsed());
    debug!(dst = %flow.dst, "flow open (direct)");
    match tokio::io::copy_bidirectional(client, &mut server).await {
        Ok((up, down)) => {
            shared.flows.bytes(route, up, down);
            debug!(up, down, "flow closed");
            FlowResult::completed
        }
        // One side reset or failed: pass the failure on rather than a clean FIN.
        Err(e) => {
            debug!(error = %e, "flow failed");
            reset(client);
            reset(&server);
            FlowResult::failed
        }
    }
}

/// Where a tunnelled flow goes, and what to record about it.
struct Target<'a> {
    peer: &'a str,
    flow: Recovered,
    id: u64,
    accepted: Instant,
    route: &'a str,
}

/// Sends the flow through the tunnel: a request header on a new stream, the
/// connector's status, then the payload.
async fn tunnel_flow(
    shared: &Shared,
    client: &mut TcpStream,
    workload: SocketAddr,
    to: Target<'_>,
) -> FlowResult {
    let Some(tunnel) = &shared.tunnel else {
        reset(client);
        return FlowResult::failed;
    };
    let dst = to.flow.dst;
    let (mut send, mut recv) = match tunnel.open(to.peer).await {
        Ok(s) => s,
        Err(e) => {
            info!(%dst, error = %e, "no tunnel to the route's peer; resetting");
            reset(client);
            return FlowResult::no_tunnel;
        }
    };
    let mut meta = [0u8; 2 * (2 + 255)];
    let node = &shared.node.as_bytes()[..shared.node.len().min(255)];
    let workload = workload.to_string();
    let end = protocol::put_metadata(&mut meta, 0, META_SOURCE_NODE, node)
        .and_then(|end| protocol::put_metadata(&mut meta, end, META_WORKLOAD, workload.as_bytes()))
        .expect("two entries of at most 255 bytes fit");
    let metadata = Metadata::new(&meta[..end]).expect("entries written by put_metadata are valid");
    let mut header = [0u8; MAX_REQUEST];
    let len = match (Request { dst, flow_id: to.id, metadata }).encode(&mut header) {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "cannot encode the stream header; resetting");
            reset(client);
            return FlowResult::failed;
        }
    };
    // The connector dials with its own timeout; allow for the round trip.
    let wait = lock(&shared.config).timeouts.connect + Duration::from_secs(1);
    if let Err(e) = send.write_all(&header[..len]).await {
        info!(%dst, error = %e, "tunnel stream failed before the header; resetting");
        reset(client);
        return FlowResult::failed;
    }
    let accepted = to.accepted;
    let on_ok = || {
        shared.flows.setup("tunnel", accepted.elapsed());
        debug!(%dst, "flow open (tunnel)");
    };
    match splice::splice_after_status(client, &mut send, &mut recv, wait, on_ok).await {
        Ok((up, down)) => {
            shared.flows.bytes(to.route, up, down);
            debug!(up, down, "flow closed");
            FlowResult::completed
        }
        Err(splice::SpliceError::Refused(status)) => {
            info!(%dst, %status, "connector did not connect the flow; reset");
            FlowResult::refused_by_peer
        }
        Err(e) => {
            debug!(error = %e, "flow failed");
            FlowResult::failed
        }
    }
}

fn reset(stream: &TcpStream) {
    let _ = sockopt::reset_on_close(stream);
}

impl AgentHandle {
    /// Applies a new configuration: routes and what this agent serves change
    /// at runtime; a config that changes anything else is refused whole.
    pub fn reload(&self, next: Config) -> Result<(), ReloadError> {
        let shared = &self.0;
        if shared.stopping.load(Relaxed) {
            return Err(ReloadError::Stopped);
        }
        next.validate()?;
        let mut config = lock(&shared.config);
        let mut restart = config.restart_only_changes(&next);
        let serve = next.valid_serve()?;
        if shared.connector.is_none() && !serve.is_empty() {
            restart.push("serve (the connector role is set up at start)");
        }
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        let routes = next.valid_routes()?;
        let mut table = lock(&shared.routes);
        let new_table = RouteTable::build(&routes, &table);
        let diff = table.diff(&new_table);
        if let Some(s) = &shared.steering {
            s.apply(&diff)?;
        }
        if let Some(c) = &shared.connector {
            c.set_policy(ServePolicy::new(serve));
        }
        info!(added = diff.upsert.len(), removed = diff.remove.len(), "configuration reloaded");
        *table = new_table;
        *config = next;
        Ok(())
    }

    /// Kernel counters summed over CPUs (zero for an agent without steering).
    pub fn kernel_counters(&self) -> Result<KernelCounters, SteeringError> {
        self.0.steering.as_ref().map_or(Ok(KernelCounters::default()), |s| s.counters())
    }

    pub fn flow_stats(&self) -> FlowSnapshot {
        self.0.flows.snapshot()
    }

    /// Route trie sizes (v4, v6) as the kernel holds them.
    pub fn route_entries(&self) -> (usize, usize) {
        self.0.steering.as_ref().map_or((0, 0), |s| s.route_entries())
    }

    pub fn cgroup(&self) -> Option<PathBuf> {
        self.0.steering.as_ref().map(|s| s.cgroup().to_owned())
    }

    pub fn tunnel(&self) -> Option<&Arc<Tunnel>> {
        self.0.tunnel.as_ref()
    }

    pub fn connector(&self) -> Option<&Arc<Connector>> {
        self.0.connector.as_ref()
    }

    /// The Prometheus text of every metric this agent exports.
    pub fn encode_metrics(&self) -> String {
        metrics::encode(&self.0.registry)
    }

    /// Whether this agent can serve: steering attached (if it routes), and a
    /// live tunnel connection for every route through a peer and every peer
    /// it dials.
    pub fn readiness(&self) -> admin::Readiness {
        let s = &self.0;
        let mut missing = Vec::new();
        if s.stopping.load(Relaxed) {
            missing.push(admin::Missing { what: "agent".into(), peer: None, reason: "shutting down".into() });
        }
        if let Some(st) = &s.steering
            && !st.attached()
        {
            missing.push(admin::Missing {
                what: "steering".into(),
                peer: None,
                reason: "programs detached".into(),
            });
        }
        let live = |peer: &str| s.tunnel.as_ref().map_or(0, |t| t.live_connections(peer));
        for r in lock(&s.routes).entries() {
            if let Upstream::Peer(p) = &r.upstream
                && live(p) == 0
            {
                missing.push(admin::Missing {
                    what: r.net.to_string(),
                    peer: Some(p.to_string()),
                    reason: "no live tunnel connection".into(),
                });
            }
        }
        let config = lock(&s.config);
        for p in config.peers.iter().filter(|p| !p.dial.is_empty()) {
            if live(&p.name) == 0 && !missing.iter().any(|m| m.peer.as_deref() == Some(&p.name)) {
                missing.push(admin::Missing {
                    what: format!("peer:{}", p.name),
                    peer: Some(p.name.clone()),
                    reason: "no live tunnel connection to a peer this agent dials".into(),
                });
            }
        }
        admin::Readiness { ready: missing.is_empty(), missing }
    }

    /// The state `dataplane status` shows.
    pub fn status(&self) -> admin::Status {
        let s = &self.0;
        let readiness = self.readiness();
        let config = lock(&s.config).clone();
        let tunnel = s.tunnel.as_ref();
        let routes = lock(&s.routes)
            .entries()
            .iter()
            .map(|r| {
                let (via, ready) = match &r.upstream {
                    Upstream::Direct => ("direct".to_owned(), true),
                    Upstream::Peer(p) => (p.to_string(), tunnel.is_some_and(|t| t.live_connections(p) > 0)),
                };
                admin::RouteStatus { cidr: r.net.to_string(), via, ready }
            })
            .collect();
        let peers = config
            .peers
            .iter()
            .map(|p| admin::PeerStatus {
                name: p.name.clone(),
                identity: p.identity.clone(),
                dialed: !p.dial.is_empty(),
                live_connections: tunnel.map_or(0, |t| t.live_connections(&p.name)),
                rtt_ms: tunnel.and_then(|t| t.best_rtt(&p.name)).map(|d| d.as_secs_f64() * 1e3),
                streams_opened: tunnel.map_or(0, |t| t.metrics.streams_opened(&p.name)),
            })
            .collect();
        let steering = s.steering.as_ref().map(|st| {
            let (v4, v6) = st.route_entries();
            admin::SteeringStatus {
                attached: st.attached(),
                cgroup: st.cgroup().display().to_string(),
                route_entries_v4: v4,
                route_entries_v6: v6,
            }
        });
        admin::Status {
            node: s.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            readiness,
            steering,
            routes,
            peers,
            serves: config.serve.iter().map(|v| format!("{} ports {:?}", v.cidr, v.ports)).collect(),
            flows: self.flow_stats(),
            process: metrics::ProcessStats::read(),
        }
    }

    pub fn summary(&self) -> Summary {
        Summary { kernel: self.kernel_counters().unwrap_or_default(), flows: self.flow_stats() }
    }
}
