//! The composition root: starts the roles a config asks for (steering when it
//! routes something, the tunnel when it has peers, the connector when it
//! serves something), hands them one drain signal, and shuts them down in an
//! order that never leaves a connect pointing at a dead listener. Reloads
//! are in `reload`, what the admin API reads in `report`, file watching in
//! `watch`.

mod learned;
mod reload;
mod report;
mod route_state;
pub mod watch;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use reload::ReloadError;

use crate::{
    admin::{self, AdminError},
    config::{ConfigError, ValidConfig},
    connector::{
        Connector, PeerCaps, ServePolicy,
        kubernetes::{Discovery, DiscoveryError},
    },
    kernel::{
        Capacity, KernelCounters, Steering, SteeringError,
        cgroup::{self, CgroupError},
        metrics::SteeringCollector,
        netlink::{NetlinkError, RedirectInterface},
        pins::{PinDir, PinError},
        probe::{self, KernelError},
    },
    lock, memory, process,
    relay::Relay,
    routes::RouteTable,
    steer::{
        FlowServer,
        listener::{self, BindError},
        metrics::{FlowMetrics, FlowSnapshot},
    },
    tls::{TlsError, TlsMaterial},
    tunnel::{StreamHandler, Tunnel, TunnelError},
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
    Pin(#[from] PinError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Capabilities(#[from] crate::kernel::caps::Missing),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// State shared by the roles and handles.
struct Shared {
    node: String,
    registry: Registry,
    steering: Option<Arc<Steering>>,
    flow_server: Option<Arc<FlowServer>>,
    tunnel: Option<Arc<Tunnel>>,
    connector: Option<Arc<Connector>>,
    /// The connector's `serve[].kubernetes`: its API server, discovered.
    discovery: Option<Arc<Discovery>>,
    relay: Option<Arc<Relay>>,
    config: Mutex<ValidConfig>,
    routes: Arc<Mutex<RouteTable>>,
    flows: Arc<FlowMetrics>,
    reloads: reload::ReloadLog,
    /// The tunnel liveness generation the route actions were last synced to.
    routes_synced: std::sync::atomic::AtomicU64,
    /// Learned routes refused at the last sync, and why (logged on change).
    learned_refused: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
    /// The trust the last successful sync gave the tunnel's connections.
    trusted: Mutex<crate::tunnel::Trust>,
    /// The one drain signal: fired when shutdown begins, obeyed by every
    /// role (steering detaches and stops accepting, reloads are refused,
    /// readiness turns false); the grace period that follows is the same for
    /// steered flows and connector streams.
    drain: CancellationToken,
}

/// Kernel-side steering set up at start.
struct SteeringParts {
    listeners: Vec<TcpListener>,
    /// Removed when the agent stops, unless steering is pinned: the pinned
    /// programs still send routed connects to its address, which must stay
    /// local to be refused (not routed off the node).
    iface: Option<RedirectInterface>,
    /// Pinned, with another agent's programs attached and its listeners
    /// alive: take over once this agent can serve (the addresses bound).
    deferred: Option<(Option<SocketAddr>, Option<SocketAddr>)>,
}

/// A started agent, ready to [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
    steering: Option<SteeringParts>,
    admin: Option<TcpListener>,
    _tunnel_tasks: TunnelTasks,
}

/// Ends the tunnel's accept loop and dialers when dropped: an agent dropped
/// without running leaves nothing dialling (after [`Agent::run`] they are
/// already ended, by the tunnel's close).
struct TunnelTasks(Option<Arc<Tunnel>>);

impl Drop for TunnelTasks {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort_tasks();
        }
    }
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
    pub async fn start(config: ValidConfig) -> Result<Agent, AgentError> {
        // First, so a taken admin port fails before anything is set up.
        let admin = match config.admin {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };

        let mut registry = Registry::with_prefix("dataplane");
        let flows = Arc::new(FlowMetrics::register(&mut registry));
        let tls = config.tls.as_ref().map(TlsMaterial::load).transpose()?;
        let serve = config.valid_serve();
        let discovery = match config.kubernetes_serve() {
            Some(entry) => Some(Arc::new(Discovery::connect(entry, &mut registry).await?)),
            None => None,
        };
        let connector = config.serves().then(|| {
            Arc::new(Connector::new(
                ServePolicy::new(serve.to_vec(), config.valid_policy().to_vec()),
                config.timeouts.connect,
                config.peers.iter().map(crate::connector::PeerEntry::from),
                PeerCaps::from(&config.limits),
                tls.as_ref().map_or("", |t| t.identity.as_str()),
                &mut registry,
            ))
        });
        let relay = config.relay.as_ref().map(|_| {
            let sources = config.peers.iter().filter(|p| !p.learn.is_empty()).map(|p| p.name.as_str());
            Arc::new(Relay::new(
                config.valid_policy().to_vec(),
                sources,
                (config.limits.stream_header_timeout, config.timeouts.connect),
                tls.as_ref().map_or("", |t| t.identity.as_str()),
                &mut registry,
            ))
        });
        let tunnel = match &tls {
            Some(tls) => {
                info!(identity = %tls.identity, "tunnel identity loaded");
                let handler = match (&connector, &relay) {
                    (Some(c), _) => Some(c.clone() as Arc<dyn StreamHandler>),
                    (None, Some(r)) => Some(r.clone() as Arc<dyn StreamHandler>),
                    (None, None) => None,
                };
                Some(Tunnel::bind(
                    &config.tunnel,
                    &config.limits,
                    &config.node,
                    &config.valid_peers(),
                    tls,
                    handler,
                    &mut registry,
                )?)
            }
            None => None,
        };
        if let (Some(r), Some(t)) = (&relay, &tunnel) {
            r.attach(t);
        }

        let table = RouteTable::build(config.valid_routes(), &RouteTable::default());
        // A node that only learns routes steers too (they arrive later); a
        // relay never does.
        let (steering, parts) = if !config.steers() {
            (None, None)
        } else {
            let (steering, parts) = start_steering(&config, &table).await?;
            let steering = Arc::new(steering);
            registry.register_collector(Box::new(SteeringCollector(steering.clone())));
            (Some(steering), Some(parts))
        };
        process::register_common(&mut registry);
        let reloads = reload::ReloadLog::register(&mut registry);
        if let Some(tls) = &tls {
            reloads.tls_in_force(tls);
        }
        let routes = Arc::new(Mutex::new(table));
        let learned_refused = Arc::default();
        registry.register_collector(Box::new(report::RouteReadiness {
            routes: routes.clone(),
            tunnel: tunnel.clone(),
            refused: Arc::clone(&learned_refused),
        }));
        let flow_server = steering.as_ref().map(|s| {
            let f = Arc::new(FlowServer::new(
                config.node.clone(),
                s.clone(),
                tunnel.clone(),
                routes.clone(),
                config.timeouts.connect,
                config.limits.flows_per_workload,
                flows.clone(),
            ));
            f.set_flow_idle_timeout(config.limits.flow_idle_timeout);
            f.set_handover_wait(config.steering.pin_dir.is_some().then_some(config.steering.handover_wait));
            f
        });
        let shared = Arc::new(Shared {
            node: config.node.clone(),
            registry,
            steering,
            flow_server,
            tunnel,
            connector,
            discovery,
            relay,
            config: Mutex::new(config),
            routes,
            flows,
            reloads,
            routes_synced: std::sync::atomic::AtomicU64::new(0),
            learned_refused,
            trusted: Mutex::default(),
            drain: CancellationToken::new(),
        });
        let tunnel_tasks = TunnelTasks(shared.tunnel.clone());
        if let Some(t) = &shared.tunnel {
            t.start();
        }
        Ok(Agent { shared, steering: parts, admin, _tunnel_tasks: tunnel_tasks })
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

    /// Serves until `shutdown` resolves, then drains: steering detaches and
    /// takes what was already redirected, open flows and connector streams
    /// get the grace period, the tunnel closes (peers learn at once), and
    /// the interface goes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Summary {
        let Agent { shared, steering, admin, _tunnel_tasks } = self;
        let admin_task = admin.map(|l| {
            let source: Arc<dyn admin::AdminSource> = Arc::new(AgentHandle(shared.clone()));
            tokio::spawn(admin::serve(l, source))
        });
        let (listeners, iface, deferred) = match steering {
            Some(p) => (p.listeners, p.iface, p.deferred),
            None => (Vec::new(), None, None),
        };
        let take_over = deferred.map(|(v4, v6)| tokio::spawn(take_over_when_ready(shared.clone(), v4, v6)));
        let steered =
            shared.flow_server.clone().map(|f| tokio::spawn(f.run(listeners, shared.drain.clone())));
        let own_addresses =
            shared.connector.clone().map(|c| tokio::spawn(c.watch_own_addresses(shared.drain.clone())));
        let route_states = tokio::spawn(route_state::follow_peers(shared.clone(), shared.drain.clone()));
        let discovery = shared.discovery.clone().map(|d| {
            let s = shared.clone();
            // New endpoints are served, then advertised; flows in flight keep theirs.
            let changed = move |endpoints| {
                if let Some(c) = &s.connector {
                    c.set_discovered(endpoints);
                }
                if let Some(t) = &s.tunnel {
                    t.readvertise();
                }
            };
            tokio::spawn(d.run(changed, shared.drain.clone()))
        });
        let trimmer = memory::enabled().then(|| {
            let s = shared.clone();
            let load = move || {
                let streams = s.connector.as_ref().map_or((0, 0), |c| (c.streams_open(), c.take_peak()));
                let now = s.flows.snapshot().active + streams.0 as u64;
                (now, s.flows.take_peak() + streams.1 as u64)
            };
            tokio::spawn(memory::trim_after_bursts(load, shared.drain.clone()))
        });

        shutdown.await;
        shared.drain.cancel();
        // Peers stop sending new streams here at once, before the grace
        // period: they go to another replica while these finish.
        if let Some(t) = &shared.tunnel {
            t.announce_draining();
        }
        let mut flows = match steered {
            Some(task) => match task.await {
                Ok(flows) => flows,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            },
            None => JoinSet::new(),
        };

        let grace = lock(&shared.config).timeouts.shutdown_grace;
        let deadline = Instant::now() + grace;
        if !flows.is_empty() {
            info!(flows = flows.len(), ?grace, "waiting for open flows");
            let drained =
                tokio::time::timeout_at(deadline, async { while flows.join_next().await.is_some() {} }).await;
            if drained.is_err() {
                warn!(flows = flows.len(), "grace period over; closing the remaining flows");
                flows.shutdown().await;
            }
        }
        if let Some(c) = &shared.connector
            && c.streams_open() > 0
        {
            info!(streams = c.streams_open(), ?grace, "waiting for connector streams");
            if tokio::time::timeout_at(deadline, c.drained()).await.is_err() {
                warn!(streams = c.streams_open(), "grace period over; closing the remaining streams");
            }
        }
        if let Some(r) = &shared.relay
            && r.streams_open() > 0
        {
            info!(streams = r.streams_open(), ?grace, "waiting for relayed streams");
            if tokio::time::timeout_at(deadline, r.drained()).await.is_err() {
                warn!(streams = r.streams_open(), "grace period over; closing the remaining streams");
            }
        }
        if let Some(t) = &shared.tunnel {
            t.close().await;
        }
        if let Some(iface) = iface {
            iface.remove().await;
        }
        if let Some(t) = admin_task {
            t.abort();
        }
        for t in [own_addresses, trimmer, Some(route_states), take_over, discovery].into_iter().flatten() {
            t.abort();
        }
        let summary = AgentHandle(shared).summary();
        info!(kernel = ?summary.kernel, flows = ?summary.flows, "agent stopped");
        summary
    }
}

async fn start_steering(
    config: &ValidConfig,
    table: &RouteTable,
) -> Result<(Steering, SteeringParts), AgentError> {
    // First: probing loads programs, and a missing capability would only
    // show as a verifier or permission error there.
    let redirect = &config.steering.redirect;
    crate::kernel::caps::check_steering(redirect.v4.iter().chain(&redirect.v6).map(|a| a.port()))?;
    let features = probe::probe()?;
    info!(kernel = %features.release, btf = features.btf, ring_buf = features.ring_buf, "kernel features probed");
    if !features.ring_buf {
        warn!("no BPF ring buffer (Linux < 5.8): eBPF programs' logs are unavailable");
    }
    let cgroup = cgroup::resolve(config.steering.cgroup.as_deref())?;
    let capacity = Capacity { flows: config.steering.flow_capacity, bypass: config.steering.bypass_capacity };
    let pins =
        config.steering.pin_dir.as_deref().map(|d| PinDir::for_cgroup(d, &cgroup, capacity)).transpose()?;
    let pinned_before = pins.as_ref().is_some_and(PinDir::exists);
    let redirect = &config.steering.redirect;
    let addrs: Vec<_> = redirect.v4.iter().chain(&redirect.v6).map(|a| a.ip()).collect();
    let iface = if pins.is_some() {
        RedirectInterface::ensure(&redirect.interface, &addrs).await?
    } else {
        RedirectInterface::create(&redirect.interface, &addrs).await?
    };
    info!(interface = %iface.name, kind = ?iface.kind, "redirect interface ready");
    let setup = async {
        // Loaded, not attached: the listeners exist before any connect is
        // sent to them.
        let steering = Steering::load(&cgroup, pins.clone(), capacity)?;
        let (listeners, bound, live_owner) =
            bind_listeners(redirect, steering.current_target(), pins.is_some())?;
        if !live_owner {
            // No tunnel connection is up yet: routes through a peer start refused.
            steering.take_over(bound.0, bound.1, table, |e| route_state::action(e, None))?;
        }
        Ok::<_, AgentError>((listeners, steering, bound, live_owner))
    };
    match setup.await {
        Ok((listeners, steering, bound, live_owner)) => {
            if live_owner {
                info!(cgroup = %cgroup.display(), "another agent steers this cgroup; taking over once this one can serve");
            } else {
                info!(cgroup = %cgroup.display(), routes = table.entries().len(), pinned = pins.is_some(), "steering attached");
            }
            let iface = if pins.is_some() { None } else { Some(iface) };
            Ok((steering, SteeringParts { listeners, iface, deferred: live_owner.then_some(bound) }))
        }
        Err(e) => {
            // Only what this start made goes: a previous agent's pinned
            // state (and the interface it points at) stays in force.
            if !pinned_before {
                if let Some(p) = &pins
                    && let Err(e) = p.remove()
                {
                    warn!(error = %e, "removing the pinned state of a failed start");
                }
                iface.remove().await;
            }
            Err(e)
        }
    }
}

/// Binds the redirect listeners. Pinned, the address the attached programs
/// send connects to (the previous agent's) is tried first: bound, its agent
/// is gone and this one takes over at once; in use, that agent still runs
/// and this one binds the other of the port and the port after it, so both
/// listen while one hands over to the other. Returns the listeners, the
/// bound addresses and whether a live agent steers now.
#[allow(clippy::type_complexity)]
fn bind_listeners(
    redirect: &crate::config::Redirect,
    current: Option<dataplane_common::RedirectTarget>,
    pinned: bool,
) -> Result<(Vec<TcpListener>, (Option<SocketAddr>, Option<SocketAddr>), bool), BindError> {
    let mut listeners = Vec::new();
    let mut bound = (None, None);
    let mut live_owner = false;
    let families = [
        ("steering.redirect.v4", redirect.v4, current.and_then(|t| t.v4()), &mut bound.0),
        ("steering.redirect.v6", redirect.v6, current.and_then(|t| t.v6()), &mut bound.1),
    ];
    for (field, configured, current, slot) in families {
        let Some(configured) = configured else { continue };
        let first = match current {
            Some(c) if pinned && c.ip() == configured.ip() => c,
            _ => configured,
        };
        let listener = match listener::bind(field, first) {
            // In use without a target in the maps: an agent that refused
            // all on its way out and is closing its listeners.
            Err(e) if pinned && e.source.kind() == std::io::ErrorKind::AddrInUse => {
                live_owner |= current.is_some();
                let other_port =
                    if first.port() == configured.port() { configured.port() + 1 } else { configured.port() };
                listener::bind(field, SocketAddr::new(configured.ip(), other_port))?
            }
            other => other?,
        };
        *slot = listener.local_addr().ok();
        listeners.push(listener);
    }
    Ok((listeners, bound, live_owner))
}

/// Takes steering over from a live agent once this one can serve every
/// route (a tunnel connection to each route's peer, `on_no_peer: pass`
/// routes included: the old agent still serves them meanwhile), when that
/// agent gave up (it refused all on its way out), or when
/// `steering.handover_wait` is up. A failed attempt is retried every second:
/// programs already replaced are this agent's and compatible with the rest.
async fn take_over_when_ready(shared: Arc<Shared>, v4: Option<SocketAddr>, v6: Option<SocketAddr>) {
    let Some(steering) = shared.steering.clone() else { return };
    let wait = lock(&shared.config).steering.handover_wait;
    let deadline = Instant::now() + wait;
    let tunnel = shared.tunnel.clone();
    let ready = || lock(&shared.routes).entries().iter().all(|e| route_state::serving(e, tunnel.as_deref()));
    let mut changes = tunnel.as_ref().map(|t| t.liveness());
    while !ready() && Instant::now() < deadline && steering.current_target().is_some() {
        let changed = async {
            match changes.as_mut() {
                Some(c) => drop(c.changed().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = changed => {}
            // Polled: an owner giving up shows only in the maps.
            () = tokio::time::sleep(OWNER_POLL) => {}
            () = shared.drain.cancelled() => return,
        }
    }
    loop {
        if shared.drain.is_cancelled() {
            return;
        }
        let table = lock(&shared.routes).clone();
        match steering.take_over(v4, v6, &table, |e| route_state::action(e, tunnel.as_deref())) {
            Ok(()) => {
                info!(
                    routes = table.entries().len(),
                    ready = ready(),
                    "took over steering from the previous agent"
                );
                return;
            }
            Err(e) => warn!(error = %e, "taking over steering failed; retrying in 1 s"),
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = shared.drain.cancelled() => return,
        }
    }
}

/// How often a waiting successor checks whether the running agent gave up.
const OWNER_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Removes what a pinned agent leaves behind for `config`'s cgroup: the
/// pinned links and maps (the programs detach as the links go), then the
/// redirect interface. Returns what was removed, for the operator.
pub fn uninstall(config: &ValidConfig) -> Result<Vec<String>, AgentError> {
    let mut removed = Vec::new();
    let cgroup = cgroup::resolve(config.steering.cgroup.as_deref())?;
    if let Some(dir) = &config.steering.pin_dir {
        let pins = PinDir::for_cgroup(dir, &cgroup, Capacity::default())?;
        if pins.exists() {
            pins.remove()?;
            removed.push(format!("pinned steering {}", pins.root().display()));
        }
    }
    let name = config.steering.redirect.interface.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AgentError::Netlink(crate::kernel::netlink::NetlinkError::Socket(e)))?;
    if runtime.block_on(RedirectInterface::remove_named(&name))? {
        removed.push(format!("interface {name}"));
    }
    Ok(removed)
}
