//! The agent: starts steering (interface, listeners, programs, routes), serves
//! steered flows, applies reloads, and shuts down in an order that never
//! leaves a connect pointing at a dead listener.

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

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    cgroup::{self, CgroupError},
    config::{Config, ConfigError},
    direct,
    ebpf::{KernelCounters, Steering, SteeringError},
    kernel::{self, KernelError},
    netlink::{NetlinkError, RedirectInterface},
    routes::{RouteTable, Upstream},
    sockopt,
    steer::{self, ActiveFlow, BindError, FlowSnapshot, FlowStats},
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

/// State shared by the accept loops, flows and handles.
struct Shared {
    steering: Steering,
    config: Mutex<Config>,
    routes: Mutex<RouteTable>,
    stats: FlowStats,
    next_flow_id: AtomicU64,
}

/// A started agent, ready to [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    iface: RedirectInterface,
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
    /// Sets up steering: the redirect interface and listeners first, then the
    /// programs (so no connect is redirected before its listener exists), then
    /// the routes. On failure everything created so far is removed again.
    pub async fn start(config: Config) -> Result<Agent, AgentError> {
        config.validate()?;
        let routes = config.valid_routes()?;
        let features = kernel::probe()?;
        info!(
            kernel = %features.release,
            btf = features.btf,
            ring_buf = features.ring_buf,
            "kernel features probed"
        );
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
            for (field, addr) in
                [("steering.redirect.v4", redirect.v4), ("steering.redirect.v6", redirect.v6)]
            {
                if let Some(addr) = addr {
                    listeners.push(steer::bind(field, addr)?);
                }
            }
            let steering = Steering::load(&cgroup, redirect.v4, redirect.v6)?;
            let table = RouteTable::build(&routes, &RouteTable::default());
            steering.apply(&RouteTable::default().diff(&table))?;
            Ok::<_, AgentError>((listeners, steering, table))
        };
        let (listeners, steering, table) = match setup.await {
            Ok(v) => v,
            Err(e) => {
                iface.remove().await;
                return Err(e);
            }
        };
        info!(cgroup = %cgroup.display(), routes = table.entries().len(), "steering attached");
        let shared = Arc::new(Shared {
            steering,
            config: Mutex::new(config),
            routes: Mutex::new(table),
            stats: FlowStats::default(),
            next_flow_id: AtomicU64::new(1),
        });
        Ok(Agent { shared, listeners, iface })
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle(self.shared.clone())
    }

    /// The addresses the redirect listeners are bound to.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves steered flows until `shutdown` resolves, then: detaches the
    /// programs, accepts what was already redirected, closes the listeners,
    /// gives open flows the grace period, and removes the interface.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Summary {
        let Agent { shared, listeners, iface } = self;
        let mut flows = JoinSet::new();
        let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr)>(1024);
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

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some((stream, peer)) = accepted_rx.recv() => spawn_flow(&shared, &mut flows, stream, peer),
                Some(_) = flows.join_next(), if !flows.is_empty() => {}
            }
        }

        info!("shutting down: detaching steering");
        shared.steering.detach();
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
        iface.remove().await;
        let summary = AgentHandle(shared).summary();
        info!(kernel = ?summary.kernel, flows = ?summary.flows, "agent stopped");
        summary
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_flow(shared: &Arc<Shared>, flows: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
    shared.stats.accepted.fetch_add(1, Relaxed);
    let id = shared.next_flow_id.fetch_add(1, Relaxed);
    let span = info_span!("flow", id, %peer);
    flows.spawn(serve_flow(shared.clone(), stream, peer).instrument(span));
}

/// Serves one steered connection: recover its destination, dial, splice.
/// Every failure resets the client so the application sees an error at once.
async fn serve_flow(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    let stats = &shared.stats;
    let _active = ActiveFlow::new(stats);
    let Some(flow) = shared.steering.lookup_flow(peer) else {
        // Usually a client that reset before we accepted (its entry is gone
        // with it); otherwise something connected to the listener directly.
        stats.unrecovered.fetch_add(1, Relaxed);
        debug!("no original destination recorded for this peer; resetting");
        return reset(client);
    };
    let upstream = lock(&shared.routes).get(flow.route_id).map(|r| r.upstream.clone());
    let Some(upstream) = upstream else {
        stats.route_gone.fetch_add(1, Relaxed);
        info!(dst = %flow.dst, route = flow.route_id, "route removed since the connect; resetting");
        return reset(client);
    };
    let timeout = lock(&shared.config).timeouts.connect;
    let mut server = match upstream {
        Upstream::Direct => match direct::dial(&shared.steering, flow.dst, timeout).await {
            Ok(s) => s,
            Err(e) => {
                stats.dial_failed.fetch_add(1, Relaxed);
                info!(dst = %flow.dst, route = flow.route_id, error = %e, "upstream dial failed; resetting");
                return reset(client);
            }
        },
    };
    debug!(dst = %flow.dst, route = flow.route_id, "flow open");
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((up, down)) => {
            stats.bytes_up.fetch_add(up, Relaxed);
            stats.bytes_down.fetch_add(down, Relaxed);
            stats.completed.fetch_add(1, Relaxed);
            debug!(up, down, "flow closed");
        }
        // One side reset or failed: pass the failure on rather than a clean FIN.
        Err(e) => {
            debug!(error = %e, "flow failed");
            reset(client);
            reset(server);
        }
    }
}

fn reset(stream: TcpStream) {
    let _ = sockopt::reset_on_close(&stream);
}

impl AgentHandle {
    /// Applies a new configuration. Only routes change at runtime; a config
    /// that changes anything else is refused whole.
    pub fn reload(&self, next: Config) -> Result<(), ReloadError> {
        let shared = &self.0;
        if !shared.steering.attached() {
            return Err(ReloadError::Stopped);
        }
        next.validate()?;
        let mut config = lock(&shared.config);
        let restart = config.restart_only_changes(&next);
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        let routes = next.valid_routes()?;
        let mut table = lock(&shared.routes);
        let new_table = RouteTable::build(&routes, &table);
        let diff = table.diff(&new_table);
        shared.steering.apply(&diff)?;
        info!(added = diff.upsert.len(), removed = diff.remove.len(), "routes reloaded");
        *table = new_table;
        *config = next;
        Ok(())
    }

    /// Kernel counters summed over CPUs.
    pub fn kernel_counters(&self) -> Result<KernelCounters, SteeringError> {
        self.0.steering.counters()
    }

    pub fn flow_stats(&self) -> FlowSnapshot {
        self.0.stats.snapshot()
    }

    /// Route trie sizes (v4, v6) as the kernel holds them.
    pub fn route_entries(&self) -> (usize, usize) {
        self.0.steering.route_entries()
    }

    pub fn cgroup(&self) -> PathBuf {
        self.0.steering.cgroup().to_owned()
    }

    pub fn summary(&self) -> Summary {
        Summary { kernel: self.kernel_counters().unwrap_or_default(), flows: self.flow_stats() }
    }
}
