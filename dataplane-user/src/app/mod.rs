//! The composition root: starts the roles a config asks for (steering when it
//! routes something, the tunnel when it has peers, the connector when it
//! serves something), hands them one drain signal, and shuts them down in an
//! order that never leaves a connect pointing at a dead listener. Reloads
//! are in `reload`, what the admin API reads in `report`, file watching in
//! `watch`.

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
    connector::{Connector, PeerCaps, ServePolicy},
    kernel::{
        KernelCounters, Steering, SteeringError,
        cgroup::{self, CgroupError},
        metrics::SteeringCollector,
        netlink::{NetlinkError, RedirectInterface},
        probe::{self, KernelError},
    },
    lock, memory, process,
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
    Tls(#[from] TlsError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// State shared by the roles and handles.
struct Shared {
    node: String,
    registry: Registry,
    steering: Option<Arc<Steering>>,
    flow_server: Option<Arc<FlowServer>>,
    tunnel: Option<Arc<Tunnel>>,
    connector: Option<Arc<Connector>>,
    config: Mutex<ValidConfig>,
    routes: Arc<Mutex<RouteTable>>,
    flows: Arc<FlowMetrics>,
    reloads: reload::ReloadLog,
    /// The tunnel liveness generation the route actions were last synced to.
    routes_synced: std::sync::atomic::AtomicU64,
    /// The one drain signal: fired when shutdown begins, obeyed by every
    /// role (steering detaches and stops accepting, reloads are refused,
    /// readiness turns false); the grace period that follows is the same for
    /// steered flows and connector streams.
    drain: CancellationToken,
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
    pub async fn start(config: ValidConfig) -> Result<Agent, AgentError> {
        // First, so a taken admin port fails before anything is set up.
        let admin = match config.admin {
            Some(addr) => Some(admin::bind(addr).await?),
            None => None,
        };

        let mut registry = Registry::with_prefix("dataplane");
        let flows = Arc::new(FlowMetrics::register(&mut registry));
        let serve = config.valid_serve();
        let connector = (!serve.is_empty()).then(|| {
            Arc::new(Connector::new(
                ServePolicy::new(serve.to_vec()),
                config.timeouts.connect,
                config.peers.iter().map(|p| p.name.as_str()),
                PeerCaps::from(&config.limits),
                &mut registry,
            ))
        });
        let tls = config.tls.as_ref().map(TlsMaterial::load).transpose()?;
        let tunnel = match &tls {
            Some(tls) => {
                info!(identity = %tls.identity, "tunnel identity loaded");
                let handler = connector.clone().map(|c| c as Arc<dyn StreamHandler>);
                Some(Tunnel::bind(
                    &config.tunnel,
                    &config.limits,
                    &config.peers,
                    tls,
                    handler,
                    &mut registry,
                )?)
            }
            None => None,
        };

        let table = RouteTable::build(config.valid_routes(), &RouteTable::default());
        let (steering, parts) = if table.entries().is_empty() {
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
        registry.register_collector(Box::new(report::RouteReadiness {
            routes: routes.clone(),
            tunnel: tunnel.clone(),
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
            f
        });
        let shared = Arc::new(Shared {
            node: config.node.clone(),
            registry,
            steering,
            flow_server,
            tunnel,
            connector,
            config: Mutex::new(config),
            routes,
            flows,
            reloads,
            routes_synced: std::sync::atomic::AtomicU64::new(0),
            drain: CancellationToken::new(),
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

    /// Serves until `shutdown` resolves, then drains: steering detaches and
    /// takes what was already redirected, open flows and connector streams
    /// get the grace period, the tunnel closes (peers learn at once), and
    /// the interface goes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Summary {
        let Agent { shared, steering, mut tunnel_tasks, admin } = self;
        let admin_task = admin.map(|l| {
            let source: Arc<dyn admin::AdminSource> = Arc::new(AgentHandle(shared.clone()));
            tokio::spawn(admin::serve(l, source))
        });
        let (listeners, iface) = match steering {
            Some(p) => (p.listeners, Some(p.iface)),
            None => (Vec::new(), None),
        };
        let steered =
            shared.flow_server.clone().map(|f| tokio::spawn(f.run(listeners, shared.drain.clone())));
        let own_addresses =
            shared.connector.clone().map(|c| tokio::spawn(c.watch_own_addresses(shared.drain.clone())));
        let route_states = tokio::spawn(route_state::follow_peers(shared.clone(), shared.drain.clone()));
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
        for t in [own_addresses, trimmer, Some(route_states)].into_iter().flatten() {
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
    let features = probe::probe()?;
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
                listeners.push(listener::bind(field, addr)?);
            }
        }
        let steering = Steering::load(&cgroup, redirect.v4, redirect.v6)?;
        // No tunnel connection is up yet: routes through a peer start refused.
        steering.sync(table, |e| route_state::action(e, None))?;
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
