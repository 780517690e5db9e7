//! The steered side of the agent: routed connects, rewritten by the kernel,
//! land on the redirect listeners (`listener`), are accepted and dispatched
//! here, and each is served as one flow (`flow`) through its route's
//! upstream: dialled from the agent (`direct`) or carried through the tunnel
//! to a peer (`via_peer`). `metrics` counts them.

pub mod direct;
pub mod flow;
pub mod listener;
pub mod metrics;
mod via_peer;
pub mod workloads;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    kernel::{Role, Steering},
    lock,
    routes::RouteTable,
    tunnel::Tunnel,
};
use metrics::{FlowMetrics, FlowResult, UNKNOWN_ROUTE};
use workloads::Workloads;

/// After detaching, how long the listeners keep accepting connects that were
/// redirected before the detach and are still completing their handshake.
const SETTLE_AFTER_DETACH: Duration = Duration::from_millis(250);
/// After a successor took over pinned steering, how long the listeners keep
/// accepting: connects redirected here just before its target was written.
/// Longer than a detach's settle, as the successor's own start shares the CPU.
const SETTLE_AFTER_HANDOVER: Duration = Duration::from_millis(500);
/// How often a stopping agent checks whether a successor took over.
const HANDOVER_POLL: Duration = Duration::from_millis(10);

/// A connection accepted on a redirect listener, with its peer address.
type Accepted = (TcpStream, SocketAddr);

/// What serving a flow needs: where its destination was recorded (the
/// kernel), where its route goes (the table), and the upstreams.
pub struct FlowServer {
    node: String,
    steering: Arc<Steering>,
    tunnel: Option<Arc<Tunnel>>,
    routes: Arc<Mutex<RouteTable>>,
    connect_timeout: Mutex<Duration>,
    idle_timeout: Mutex<Option<Duration>>,
    /// Pinned steering: how long a stopping agent serves on, waiting for a
    /// successor to take over; `None`: unpinned (steering ends with it).
    handover_wait: Mutex<Option<Duration>>,
    metrics: Arc<FlowMetrics>,
    workloads: Arc<Workloads>,
    next_flow_id: AtomicU64,
}

impl FlowServer {
    pub fn new(
        node: String,
        steering: Arc<Steering>,
        tunnel: Option<Arc<Tunnel>>,
        routes: Arc<Mutex<RouteTable>>,
        connect_timeout: Duration,
        flows_per_workload: usize,
        metrics: Arc<FlowMetrics>,
    ) -> FlowServer {
        FlowServer {
            node,
            steering,
            tunnel,
            routes,
            connect_timeout: Mutex::new(connect_timeout),
            idle_timeout: Mutex::new(None),
            handover_wait: Mutex::new(None),
            metrics,
            workloads: Arc::new(Workloads::new(flows_per_workload)),
            next_flow_id: AtomicU64::new(1),
        }
    }

    /// Applies a reloaded connect timeout to flows that start from now on.
    pub fn set_connect_timeout(&self, timeout: Duration) {
        *lock(&self.connect_timeout) = timeout;
    }

    /// Applies a reloaded per-workload flow cap.
    pub fn set_flows_per_workload(&self, cap: usize) {
        self.workloads.set_cap(cap);
    }

    fn connect_timeout(&self) -> Duration {
        *lock(&self.connect_timeout)
    }

    /// Applies `limits.flow_idle_timeout` to flows that start from now on.
    pub fn set_flow_idle_timeout(&self, timeout: Option<Duration>) {
        *lock(&self.idle_timeout) = timeout;
    }

    fn flow_idle_timeout(&self) -> Option<Duration> {
        *lock(&self.idle_timeout)
    }

    /// Pinned steering: see [`FlowServer::run`].
    pub fn set_handover_wait(&self, wait: Option<Duration>) {
        *lock(&self.handover_wait) = wait;
    }

    /// Serves connects accepted on `listeners` until `drain`, then stops in
    /// the order that never leaves a connect pointing at a closed listener:
    /// detach the connect programs, keep accepting what was redirected
    /// before for a settle period, detach the rest, take what is queued, and
    /// close the listeners. Returns the flows still open, for the caller's
    /// grace period.
    pub async fn run(self: Arc<Self>, listeners: Vec<TcpListener>, drain: CancellationToken) -> JoinSet<()> {
        let (accepted_tx, mut accepted_rx) = mpsc::channel::<Accepted>(1024);
        let stop_accepting = CancellationToken::new();
        let mut acceptors = JoinSet::new();
        for listener in listeners {
            acceptors.spawn(accept_loop(listener, accepted_tx.clone(), stop_accepting.clone()));
        }
        drop(accepted_tx);

        // Dispatch on a task of its own, so it runs on a runtime worker:
        // polled by `run`'s caller (the thread in `block_on`, which is no
        // worker), every new flow waited for that thread to be woken and
        // scheduled, measured at up to hundreds of microseconds per flow on
        // a busy 2-core node.
        let dispatcher = tokio::spawn(self.clone().dispatch(accepted_rx, drain.clone()));
        let (mut flows, rx) = match dispatcher.await {
            Ok(parts) => parts,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        accepted_rx = rx;

        let handover = *lock(&self.handover_wait);
        let settle = match handover {
            None => {
                info!("shutting down: detaching steering");
                self.steering.stop_redirecting();
                SETTLE_AFTER_DETACH
            }
            Some(wait) => self.hand_over(wait, &mut accepted_rx, &mut flows).await,
        };
        // A connect redirected just before may still be in its handshake;
        // under load that can outlast a drain of the accept queue, and
        // closing the listener then would reset it. Keep accepting, with
        // sock_ops still recording flows, until such stragglers have landed;
        // then detach the rest.
        let settle = tokio::time::sleep(settle);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                Some((stream, peer)) = accepted_rx.recv() => self.spawn_flow(&mut flows, stream, peer),
            }
        }
        self.steering.detach();
        stop_accepting.cancel();
        while let Some(Ok(listener)) = acceptors.join_next().await {
            for (stream, peer) in listener::drain_queued(listener) {
                self.spawn_flow(&mut flows, stream, peer);
            }
        }
        while let Ok((stream, peer)) = accepted_rx.try_recv() {
            self.spawn_flow(&mut flows, stream, peer);
        }
        flows
    }

    /// Pinned steering, stopping: serves on (new flows included) until a
    /// successor has taken over the programs, or `wait` is up; then, with
    /// no successor, makes the kernel refuse routed connects (the pinned
    /// programs stay for the next agent). Returns how long to keep
    /// accepting stragglers: connects sent here just before the switch.
    async fn hand_over(
        self: &Arc<Self>,
        wait: Duration,
        accepted: &mut mpsc::Receiver<Accepted>,
        flows: &mut JoinSet<()>,
    ) -> Duration {
        let deadline = tokio::time::Instant::now() + wait;
        let mut poll = tokio::time::interval(HANDOVER_POLL);
        let superseded = loop {
            if self.steering.role() != Role::Owner {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::select! {
                _ = poll.tick() => {}
                Some((stream, peer)) = accepted.recv() => self.spawn_flow(flows, stream, peer),
            }
        };
        if superseded {
            info!("shutting down: another agent took over steering");
            return SETTLE_AFTER_HANDOVER;
        }
        match self.steering.refuse_all() {
            Ok(()) => info!(
                ?wait,
                "shutting down: no agent took over; routed connects are refused in the kernel until one starts"
            ),
            Err(e) => warn!(error = %e, "shutting down: making the kernel refuse routed connects failed"),
        }
        SETTLE_AFTER_DETACH
    }

    /// Spawns a flow for each accepted connection and reaps finished ones
    /// until `drain`, then hands both back for the shutdown sequence.
    async fn dispatch(
        self: Arc<Self>,
        mut accepted: mpsc::Receiver<Accepted>,
        drain: CancellationToken,
    ) -> (JoinSet<()>, mpsc::Receiver<Accepted>) {
        let mut flows = JoinSet::new();
        loop {
            tokio::select! {
                _ = drain.cancelled() => break,
                Some((stream, peer)) = accepted.recv() => self.spawn_flow(&mut flows, stream, peer),
                Some(_) = flows.join_next(), if !flows.is_empty() => {}
            }
        }
        (flows, accepted)
    }

    fn spawn_flow(self: &Arc<Self>, flows: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
        let Some(slot) = self.workloads.open(peer.ip()) else {
            // Refused before any work: no task, no dial, a reset at once.
            self.metrics.opened(UNKNOWN_ROUTE);
            self.metrics.closed(UNKNOWN_ROUTE, FlowResult::over_workload_cap);
            flow::reset(&stream);
            debug!(%peer, "workload at its flow cap; reset");
            return;
        };
        let id = self.next_flow_id.fetch_add(1, Relaxed);
        let span = info_span!("flow", id, %peer, route = tracing::field::Empty, via = tracing::field::Empty);
        flows.spawn(flow::serve(self.clone(), stream, peer, id, slot).instrument(span));
    }
}

/// Accepts until `stop`, then hands the listener back (its queue is drained
/// by the shutdown sequence).
async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<Accepted>,
    stop: CancellationToken,
) -> TcpListener {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return listener,
            res = listener.accept() => match res {
                Ok(conn) => {
                    if tx.send(conn).await.is_err() {
                        return listener;
                    }
                }
                // A connection that died in the queue: next one.
                Err(e) if listener::is_per_connection(&e) => {}
                // EMFILE and friends: back off instead of spinning.
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
