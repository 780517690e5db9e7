//! The test network: a workload ("pod") namespace joined to a "node" namespace
//! by a veth pair, as a pod is, and a "server" namespace behind the node that
//! holds the routed destinations. The agent runs in the node namespace.
//!
//! ```text
//!  pod 10.200.0.2 ──veth── 10.200.0.1 node 10.201.0.1 ──veth── 10.201.0.2 server
//!      fd00:200::2          fd00:200::1   fd00:201::1          fd00:201::2
//!                                                              198.51.100.101-103, 2001:db8::101-103 on lo
//! ```

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use dataplane::{
    app::{Agent, AgentHandle, Summary},
    config::{Config, ValidConfig},
};

use crate::{Cgroup, Netns, probe::Probe, unique_id};

pub const POD_V4: &str = "10.200.0.2";
pub const POD_V6: &str = "fd00:200::2";
pub const NODE_TO_SERVER_V4: &str = "10.201.0.1";
pub const NODE_TO_SERVER_V6: &str = "fd00:201::1";
/// Routed in most tests.
pub const API_V4: &str = "198.51.100.101:6443";
pub const API_V6: &str = "[2001:db8::101]:6443";
/// Served by the server but never routed.
pub const OTHER_V4: &str = "198.51.100.102:6443";
pub const OTHER_V6: &str = "[2001:db8::102]:6443";
/// Reachable host, nothing listening: connects get RST.
pub const CLOSED_V4: &str = "198.51.100.103:6443";

pub fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

pub struct Topology {
    pub id: String,
    // Field order is drop order: server threads and cgroup before namespaces.
    pub server: EchoServer,
    pub cgroup: Cgroup,
    pub pod: Netns,
    pub node: Netns,
    pub remote: Netns,
}

impl Topology {
    pub fn new() -> Result<Topology> {
        Topology::with_echo(&[API_V4, API_V6, OTHER_V4, OTHER_V6])
    }

    /// A topology whose server namespace runs the echo server on `echo`.
    pub fn with_echo(echo: &[&str]) -> Result<Topology> {
        let id = unique_id();
        let cgroup = Cgroup::new(&id)?;
        let pod = Netns::new(format!("dpt-{id}-pod"))?;
        let node = Netns::new(format!("dpt-{id}-node"))?;
        let remote = Netns::new(format!("dpt-{id}-srv"))?;
        let (vp, vn, vs, vt) = (format!("vp{id}"), format!("vn{id}"), format!("vs{id}"), format!("vt{id}"));
        node.ip(&["link", "add", &vn, "type", "veth", "peer", "name", &vp, "netns", &pod.name])?;
        node.ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vt, "netns", &remote.name])?;
        for (ns, dev, v4, v6) in [
            (&pod, &vp, "10.200.0.2/24", "fd00:200::2/64"),
            (&node, &vn, "10.200.0.1/24", "fd00:200::1/64"),
            (&node, &vs, "10.201.0.1/24", "fd00:201::1/64"),
            (&remote, &vt, "10.201.0.2/24", "fd00:201::2/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev])?;
            // Without nodad a connect right after setup races DAD and times out.
            ns.ip(&["addr", "add", v6, "dev", dev, "nodad"])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // Static IPv6 neighbours on both ends of each link: on fresh veths
        // neighbour discovery makes the first IPv6 SYN of a namespace wait
        // 1-2 s for a retransmit (measured; IPv4 ARP does not), which would
        // stall or, across an agent's shutdown, fail that first connect.
        let mac = |ns: &Netns, dev: &str| -> Result<String> {
            let out = ns.ip(&["-br", "link", "show", dev])?;
            out.split_whitespace().nth(2).map(str::to_owned).context("no MAC in `ip -br link`")
        };
        for (ns, dev, ip, peer_ns, peer_dev) in [
            (&pod, &vp, "fd00:200::1", &node, &vn),
            (&node, &vn, "fd00:200::2", &pod, &vp),
            (&node, &vs, "fd00:201::2", &remote, &vt),
            (&remote, &vt, "fd00:201::1", &node, &vs),
        ] {
            let lladdr = mac(peer_ns, peer_dev)?;
            ns.ip(&["-6", "neigh", "replace", ip, "lladdr", &lladdr, "dev", dev, "nud", "permanent"])?;
        }
        pod.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;
        remote.ip(&["route", "add", "default", "via", "10.201.0.1"])?;
        remote.ip(&["-6", "route", "add", "default", "via", "fd00:201::1"])?;
        node.ip(&["route", "add", "198.51.100.0/24", "via", "10.201.0.2"])?;
        node.ip(&["-6", "route", "add", "2001:db8::/64", "via", "fd00:201::2"])?;
        for a in ["198.51.100.101/32", "198.51.100.102/32", "198.51.100.103/32"] {
            remote.ip(&["addr", "add", a, "dev", "lo"])?;
        }
        for a in ["2001:db8::101/128", "2001:db8::102/128", "2001:db8::103/128"] {
            remote.ip(&["addr", "add", a, "dev", "lo", "nodad"])?;
        }
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        let server = EchoServer::start(&remote, echo)?;
        Ok(Topology { id, server, cgroup, pod, node, remote })
    }

    /// A config for this topology's cgroup with the given routes (`direct`).
    /// Steering is unpinned (it ends with the agent) unless a test asks for
    /// pins: see [`Topology::pinned_yaml`].
    pub fn config(&self, routes: &[&str]) -> ValidConfig {
        self.config_with(routes, "")
    }

    /// [`Topology::config`] with more top-level YAML (e.g. a `limits:` line).
    pub fn config_with(&self, routes: &[&str], extra: &str) -> ValidConfig {
        self.config_with_steering(routes, "", extra)
    }

    /// [`Topology::config_with`] with more `steering:` keys (one per line,
    /// e.g. `flow_capacity: 1024`).
    pub fn config_with_steering(&self, routes: &[&str], steering: &str, extra: &str) -> ValidConfig {
        let routes: String =
            routes.iter().map(|r| format!("  - {{ cidr: \"{r}\", via: direct }}\n")).collect();
        let steering: String = steering.lines().map(|l| format!("  {l}\n")).collect();
        let text = format!(
            "node: test-{}\nsteering:\n  cgroup: {}\n  pin_dir: null\n{steering}timeouts: {{ connect: 2s, shutdown_grace: 2s }}\n{extra}routes:\n{routes}",
            self.id,
            self.cgroup.path.display()
        );
        Config::parse(&text).expect("test config is valid")
    }

    /// Config text for an agent of this topology with steering pinned under
    /// `pins` (direct routes, both families), for agents run as processes.
    pub fn pinned_yaml(&self, pins: &crate::PinRoot, routes: &[&str], handover_wait: &str) -> String {
        self.pinned_yaml_with(pins, routes, handover_wait, "")
    }

    /// [`Topology::pinned_yaml`] with more `steering:` keys (one per line).
    pub fn pinned_yaml_with(
        &self,
        pins: &crate::PinRoot,
        routes: &[&str],
        handover_wait: &str,
        steering: &str,
    ) -> String {
        let routes: String =
            routes.iter().map(|r| format!("  - {{ cidr: \"{r}\", via: direct }}\n")).collect();
        let steering: String = steering.lines().map(|l| format!("  {l}\n")).collect();
        format!(
            "node: test-{}\nsteering:\n  cgroup: {}\n  pin_dir: {}\n  handover_wait: {handover_wait}\n{steering}\
             timeouts: {{ connect: 2s, shutdown_grace: 10s }}\nroutes:\n{routes}",
            self.id,
            self.cgroup.path.display(),
            pins.0.display()
        )
    }

    /// A workload in the pod namespace and the test cgroup.
    pub fn pod_probe(&self) -> Probe {
        Probe { cgroup: Some(self.cgroup.path.clone()), netns: self.pod.path() }
    }

    /// A process beside the agent (hostNetwork), in the test cgroup.
    pub fn node_probe(&self) -> Probe {
        Probe { cgroup: Some(self.cgroup.path.clone()), netns: self.node.path() }
    }

    /// Starts the agent in process, in the node namespace.
    pub fn start_agent(&self, config: ValidConfig) -> Result<RunningAgent> {
        RunningAgent::start(&self.node, config)
    }
}

/// Listens on the given addresses; each connection gets `peer=ADDR local=ADDR\n`
/// (who connected, and which of the server's addresses was reached) and then
/// an echo of what it sends, until EOF.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub seen: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addrs: &[&str]) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for a in addrs {
            let a = addr(a);
            let listener = ns.run(move || crate::listen(a))??;
            let (stop, seen) = (stop.clone(), seen.clone());
            threads.push(std::thread::spawn(move || {
                crate::accept_until(listener, stop, |conn, peer| {
                    seen.lock().expect("lock").push(peer);
                    std::thread::spawn(move || echo(conn, peer));
                })
            }));
        }
        Ok(EchoServer { stop, threads, seen })
    }
}

fn echo(mut conn: std::net::TcpStream, peer: SocketAddr) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = conn.write_all(format!("peer={peer} local={local}\n").as_bytes());
    let mut buf = [0u8; 16384];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = conn.shutdown(Shutdown::Write);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The agent running in process on its own runtime in a namespace.
pub struct RunningAgent {
    pub handle: AgentHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Summary>>,
}

impl RunningAgent {
    pub fn start(ns: &Netns, config: ValidConfig) -> Result<RunningAgent> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,aya=warn,aya_obj=warn")
            .with_test_writer()
            .try_init();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let agent = match Agent::start(config).await {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e)));
                        return None;
                    }
                };
                let _ = ready_tx.send(Ok(agent.handle()));
                Some(
                    agent
                        .run(async {
                            let _ = stop_rx.await;
                        })
                        .await,
                )
            })
        })?;
        let handle = ready_rx.recv().context("agent thread died")??;
        let thread = Some(std::thread::spawn(move || thread.join().ok().flatten().expect("agent ran")));
        Ok(RunningAgent { handle, stop: Some(stop), thread })
    }

    /// Stops the agent (as SIGTERM would) and returns its final summary.
    pub fn stop(mut self) -> Summary {
        self.shutdown().expect("agent stopped cleanly")
    }

    fn shutdown(&mut self) -> Option<Summary> {
        let _ = self.stop.take()?.send(());
        self.thread.take()?.join().ok()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
