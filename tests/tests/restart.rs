//! Pinned steering across agent restarts, with the real `dataplane` binary
//! as its own process in the node namespace: a workload connecting every
//! 10 ms and long transfers while the agent is replaced (SIGTERM, then a
//! new one; and SIGKILL, then a new one), what a pod's connect meets while
//! no agent runs, and `dataplane uninstall`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tests::{
    PinRoot,
    agent_process::AgentProcess,
    fast_us,
    probe::Ticks,
    require_root,
    topology::{API_V4, API_V6, POD_V4, POD_V6, Topology, addr},
};

/// Ten on a real machine; three under emulation (`cargo xtask vm-test`),
/// where each start verifies the programs for seconds: enough to cover the
/// kernel's side of a takeover, which is the same each time.
fn restarts() -> usize {
    if tests::time_scale() > 1 { 3 } else { 10 }
}
const ROUTES: [&str; 2] = ["198.51.100.101/32", "2001:db8::101/128"];

/// Two admin ports, alternating: an agent and its successor run side by side.
fn admin(i: usize) -> SocketAddr {
    addr(if i.is_multiple_of(2) { "127.0.0.1:19464" } else { "127.0.0.1:19465" })
}

/// A node whose steering is pinned: the test topology, a bpffs directory of
/// its own, and a directory for the agents' configs and logs.
struct Node {
    // Field order is drop order: files, then pins, then the namespaces.
    dir: tempfile::TempDir,
    pins: PinRoot,
    topo: Topology,
}

impl Node {
    fn new() -> Node {
        let topo = Topology::new().expect("topology");
        Node { dir: tempfile::tempdir().expect("tmp"), pins: PinRoot::new().expect("bpffs"), topo }
    }

    /// Starts agent `i` (ready: it steers), and checks that a pod's routed
    /// connect is served (so the ticker gets connects to this agent before
    /// the next restart). Returns it with the time from spawn to ready.
    fn start(&self, i: usize) -> (AgentProcess, Duration) {
        let started = self.start_with(i, "30s");
        let a = self.topo.pod_probe().connect(addr(API_V4)).expect("probe");
        assert!(a.ok, "agent {i} serves once ready: {a:?}");
        started
    }

    fn start_with(&self, i: usize, handover_wait: &str) -> (AgentProcess, Duration) {
        let yaml = self.topo.pinned_yaml(&self.pins, &ROUTES, handover_wait);
        let t = Instant::now();
        let agent =
            AgentProcess::start(&self.topo.node, &format!("agent{i}"), &yaml, admin(i), self.dir.path())
                .expect("agent starts");
        (agent, t.elapsed())
    }

    /// `dataplane uninstall` for this node's configuration, in its namespace.
    fn uninstall(&self) -> Vec<String> {
        let yaml = self.topo.pinned_yaml(&self.pins, &ROUTES, "1s");
        let config = dataplane::config::Config::parse(&yaml).expect("config");
        tests::run_in(&self.topo.node.path(), move || dataplane::app::uninstall(&config))
            .expect("in the node namespace")
            .expect("uninstall")
    }
}

/// Whether the server ever saw a connection from the pod itself: a routed
/// connect that left the node unsteered (the agent dials from the node).
fn leaked(topo: &Topology) -> Vec<SocketAddr> {
    let pod = [POD_V4.parse::<std::net::IpAddr>().expect("ip"), POD_V6.parse().expect("ip")];
    topo.server.seen.lock().expect("seen").iter().copied().filter(|a| pod.contains(&a.ip())).collect()
}

/// Long transfers, one after another, while the agent is replaced.
fn transfers(
    topo: &Topology,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<tests::probe::Bulk>> {
    let pod = topo.pod_probe();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && out.len() < 1000 {
            out.push(pod.bulk(addr(API_V4), 8 << 20).expect("probe runs"));
        }
        out
    })
}

fn report(kind: &str, ticks: &[Ticks], back: &[Duration]) {
    let ok: u64 = ticks.iter().map(|t| t.ok).sum();
    let refused: u64 = ticks.iter().map(|t| t.refused).sum();
    let failed: u64 = ticks.iter().map(|t| t.failed).sum();
    let broken: u64 = ticks.iter().map(|t| t.broken).sum();
    let slowest = ticks.iter().map(|t| t.slowest_refusal_us).fold(0.0, f64::max);
    let mut back = back.to_vec();
    back.sort();
    eprintln!(
        "{kind} x{}: connects ok {ok}, refused {refused} (slowest {slowest:.0} us), failed {failed}, \
         broken after connect {broken}; steering back after start: median {:?}, max {:?}",
        restarts(),
        back[back.len() / 2],
        back[back.len() - 1]
    );
}

/// SIGTERM, then a new agent: the old one serves on until the new one has
/// taken the pinned programs over, so no connect fails and no transfer
/// breaks, in either family.
#[test]
fn ten_sigterm_restarts_fail_no_connect() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let (topo, pins) = (&node.topo, &node.pins);
    let (mut agent, first) = node.start(0);
    let pod = topo.pod_probe();
    let (t4, t6) = (pod.tick(addr(API_V4), 10).expect("ticker"), pod.tick(addr(API_V6), 10).expect("ticker"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bulk = transfers(topo, stop.clone());
    let mut back = vec![first];
    for i in 1..=restarts() {
        agent.terminate();
        let (next, took) = node.start(i);
        back.push(took);
        let status = agent.wait_exit(Duration::from_secs(40)).expect("the old agent exits");
        assert!(status.success(), "the old agent exited with {status}");
        agent = next;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let transfers = bulk.join().expect("transfers");
    let ticks = [t4.finish().expect("ticks v4"), t6.finish().expect("ticks v6")];
    report("SIGTERM", &ticks, &back);
    for t in &ticks {
        assert!(t.ok > 0, "connects went through: {t:?}");
        assert_eq!(
            (t.refused, t.failed, t.broken),
            (0, 0, 0),
            "no connect fails across SIGTERM restarts: {t:?}"
        );
    }
    assert!(!transfers.is_empty());
    for b in &transfers {
        assert!(
            b.ok && b.echo_intact && b.received == b.sent,
            "a transfer across a restart arrives intact: {b:?}"
        );
    }
    assert!(leaked(topo).is_empty(), "nothing left the node unsteered: {:?}", leaked(topo));
    let status = agent.status().expect("status");
    let pinned = &status["steering"]["pinned"];
    assert!(
        pinned["path"].as_str().is_some_and(|p| p.starts_with(&pins.0.display().to_string())),
        "{status}"
    );
}

/// SIGKILL, then a new agent: connects either go through or are refused at
/// once (the pinned programs still send them to a listener that is gone),
/// none hangs and none leaves the node; the new agent steers within a
/// second of its start. While no agent runs, 1,000 connects are timed.
#[test]
fn ten_sigkill_restarts_fail_fast_and_never_leak() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let topo = &node.topo;
    let (mut agent, first) = node.start(0);
    let pod = topo.pod_probe();
    let ticker = pod.tick(addr(API_V4), 10).expect("ticker");
    let mut back = vec![first];
    for i in 1..=restarts() {
        agent.kill();
        if i == 1 {
            let gone = pod.refusals(addr(API_V4), 1000).expect("refusals");
            let mut us = gone.refused_us.clone();
            us.sort_by(f64::total_cmp);
            assert_eq!(
                gone.other, 0,
                "with no agent every routed connect is refused: {:?}",
                gone.first_other
            );
            let (p50, p99) = (us[us.len() / 2], us[us.len() * 99 / 100]);
            eprintln!("agent gone: 1000 routed connects refused, p50 {p50:.0} us, p99 {p99:.0} us");
            assert!(p99 < fast_us(10_000) as f64, "refused in well under 10 ms: p99 {p99:.0} us");
        }
        let (next, took) = node.start(i);
        back.push(took);
        agent = next;
    }
    let ticks = ticker.finish().expect("ticks");
    report("SIGKILL", std::slice::from_ref(&ticks), &back);
    // Service after each restart is asserted above; here, what the steady
    // stream of connects met while agents died and started.
    assert!(ticks.ok + ticks.refused > 0, "the ticker ran: {ticks:?}");
    assert_eq!(ticks.failed, 0, "a connect either succeeds or is refused, never hangs: {ticks:?}");
    assert!(ticks.slowest_refusal_us < fast_us(10_000) as f64, "refusals are fast: {ticks:?}");
    for (i, b) in back.iter().enumerate().skip(1) {
        assert!(*b < Duration::from_micros(fast_us(1_000_000)), "restart {i}: steering back after {b:?}");
    }
    assert!(leaked(topo).is_empty(), "nothing left the node unsteered: {:?}", leaked(topo));
}

/// `dataplane uninstall` removes the pins and the interface: the programs
/// detach, and the pod's connects go their own way again.
#[test]
fn uninstall_removes_pinned_steering() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let (topo, pins) = (&node.topo, &node.pins);
    let (agent, _) = node.start_with(0, "1s");
    let pod = topo.pod_probe();
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok && a.server_saw().is_some_and(|s| s.ip().to_string() != POD_V4), "steered: {a:?}");
    agent.terminate();
    agent.wait_exit(Duration::from_secs(30)).expect("exits after its handover wait");
    // Stopped with no successor: refused in the kernel, pins in place.
    let r = pod.connect(addr(API_V4)).expect("probe");
    assert!(r.was_refused(), "refused while no agent runs: {r:?}");
    assert!(std::fs::read_dir(&pins.0).expect("pins").next().is_some(), "state stays pinned");

    let removed = node.uninstall();
    assert!(removed.iter().any(|r| r.starts_with("pinned steering")), "{removed:?}");
    assert!(removed.iter().any(|r| r.starts_with("interface")), "{removed:?}");
    assert!(std::fs::read_dir(&pins.0).expect("pins").next().is_none(), "nothing pinned");
    let free = pod.connect(addr(API_V4)).expect("probe");
    assert_eq!(
        free.server_saw().map(|s| s.ip().to_string()),
        Some(POD_V4.to_owned()),
        "unsteered once uninstalled: {free:?}"
    );
}

/// Another product's cgroup programs (a connect4 rewriting a service VIP
/// to a backend, a sock_ops), attached before ours and after ours to the
/// same cgroup: both products' traffic works, and our start, restarts (an
/// upgrade is the same in-place replacement) and uninstall never detach
/// or replace programs that are not ours.
#[test]
fn another_products_cgroup_programs_survive_ours() {
    if !require_root() {
        return;
    }
    use tests::standin::OtherProduct;
    let node = Node::new();
    let topo = &node.topo;
    let backend: std::net::SocketAddrV4 = tests::topology::OTHER_V4.parse().expect("addr");
    let (vip1, vip2) = ("10.96.0.10:80".parse().expect("vip"), "10.96.0.11:80".parse().expect("vip"));
    let first =
        OtherProduct::attach(&topo.cgroup.path, vip1, backend).expect("the other product, before ours");
    let (agent, _) = node.start(0);
    let second =
        OtherProduct::attach(&topo.cgroup.path, vip2, backend).expect("the other product, after ours");
    let pod = topo.pod_probe();
    let check = |when: &str, ours: bool| {
        for vip in [vip1, vip2] {
            let a = pod.connect(SocketAddr::V4(vip)).expect("probe");
            assert!(a.ok, "{when}: the other product's VIP {vip} works: {a:?}");
            assert_eq!(a.reached(), Some(SocketAddr::V4(backend)), "{when}: {vip} reached its backend");
            assert_eq!(
                a.server_saw().map(|s| s.ip().to_string()),
                Some(POD_V4.to_owned()),
                "{when}: not ours"
            );
        }
        let calls = (first.sock_ops_calls().expect("counter"), second.sock_ops_calls().expect("counter"));
        let a = pod.connect(addr(API_V4)).expect("probe");
        assert!(a.ok, "{when}: a routed connect works: {a:?}");
        let steered = a.server_saw().is_some_and(|s| s.ip().to_string() != POD_V4);
        assert_eq!(steered, ours, "{when}: routed connects steered only while ours is installed: {a:?}");
        let after = (first.sock_ops_calls().expect("counter"), second.sock_ops_calls().expect("counter"));
        assert!(after.0 > calls.0 && after.1 > calls.1, "{when}: the other sock_ops programs still run");
    };
    check("both attached", true);
    agent.terminate();
    let (next, _) = node.start(1);
    assert!(agent.wait_exit(Duration::from_secs(40)).expect("the old agent exits").success());
    let agent = next;
    check("after a SIGTERM restart", true);
    agent.kill();
    let (agent, _) = node.start(2);
    check("after a SIGKILL restart", true);
    agent.kill();
    node.uninstall();
    check("after our uninstall", false);
}

/// An agent whose maps differ (here: another flow capacity; a new layout
/// version is the same) takes over with maps of its own: the programs are
/// replaced in place, the old maps' pins go, and connects go on.
#[test]
fn a_new_map_layout_takes_over_in_place() {
    if !require_root() {
        return;
    }
    let node = Node::new();
    let (topo, pins) = (&node.topo, &node.pins);
    let (old, _) = node.start(0);
    let layouts = || -> Vec<String> {
        let cgroup_dir =
            std::fs::read_dir(&pins.0).expect("pins").next().expect("one cgroup").expect("entry").path();
        let mut names: Vec<String> = std::fs::read_dir(cgroup_dir)
            .expect("cgroup pins")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("maps-"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(layouts().len(), 1, "{:?}", layouts());
    let before = layouts();
    let pod = topo.pod_probe();
    let ticker = pod.tick(addr(API_V4), 10).expect("ticker");
    old.terminate();
    let yaml = topo.pinned_yaml_with(pins, &ROUTES, "30s", "flow_capacity: 4096");
    let new =
        AgentProcess::start(&topo.node, "resized", &yaml, admin(1), node.dir.path()).expect("agent starts");
    assert!(old.wait_exit(Duration::from_secs(40)).expect("the old agent exits").success());
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "served by the new agent: {a:?}");
    let ticks = ticker.finish().expect("ticks");
    eprintln!("new layout: {ticks:?}");
    assert!(ticks.ok > 0 && ticks.refused == 0 && ticks.failed == 0, "{ticks:?}");
    let after = layouts();
    assert_eq!(after.len(), 1, "only the new layout's maps stay pinned: {after:?}");
    assert_ne!(after, before);
    assert!(after[0].contains("flows4096"), "{after:?}");
    drop(new);
}

/// Routes through a peer (to the connector's echo server: the API server
/// there speaks TLS): the new agent takes over only once its own
/// tunnel to the connector is up (it would otherwise refuse every routed
/// connect until then), so SIGTERM restarts of a client agent fail no
/// connect either.
#[test]
fn sigterm_restarts_of_a_tunnel_client_fail_no_connect() {
    if !require_root() {
        return;
    }
    use tests::tunnel_env::{CLIENT_ID, Mode, TunnelEnv};
    let env = TunnelEnv::new().expect("environment");
    let _connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    let pins = PinRoot::new().expect("bpffs");
    let tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let yaml = env
        .client_config_text(Mode::ConnectorListens, &tls)
        .replace("pin_dir: null", &format!("pin_dir: {}, handover_wait: 30s", pins.0.display()));
    let dir = tempfile::tempdir().expect("tmp");
    let start =
        |i: usize| AgentProcess::start(&env.topo.node, &format!("client{i}"), &yaml, admin(i), dir.path());
    let mut agent = start(0).expect("client agent");
    let pod = env.topo.pod_probe();
    let ticker = pod.tick(addr(tests::topology::OTHER_V4), 10).expect("ticker");
    for i in 1..=restarts().min(5) {
        agent.terminate();
        let next = start(i).expect("the next client agent");
        assert!(agent.wait_exit(Duration::from_secs(40)).expect("the old agent exits").success());
        agent = next;
        let a = pod.connect(addr(tests::topology::OTHER_V4)).expect("probe");
        assert!(a.ok, "restart {i}: served through the new agent's tunnel: {a:?}");
    }
    let ticks = ticker.finish().expect("ticks");
    eprintln!("tunnel client, SIGTERM x{}: {ticks:?}", restarts().min(5));
    assert!(ticks.ok > 0, "{ticks:?}");
    assert_eq!((ticks.refused, ticks.failed, ticks.broken), (0, 0, 0), "{ticks:?}");
}

/// A client agent the connector dials (the connector allows no inbound
/// traffic, the client node does) serves again soon after it restarts,
/// however it went, with an idle timeout far longer than the test may take:
/// killed, the new agent answers the connector's keep-alives on the dead
/// connections with stateless resets (its reset key is derived from the
/// node's private key, so it is its predecessor's) and the connector drops
/// them at once; stopped, its CONNECTION_CLOSE does that, and the
/// connector's next attempts (each started over after 2 s unanswered)
/// reach the new agent as soon as it listens. Waiting out the idle timeout
/// would miss the start deadline.
#[test]
fn a_restarted_client_agent_is_served_again_long_before_the_idle_timeout() {
    if !require_root() {
        return;
    }
    use tests::tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, TunnelEnv};
    let env = TunnelEnv::new().expect("environment");
    let idle = Duration::from_secs(60 * tests::time_scale());
    let long_idle = |yaml: String| {
        let at = yaml.find("idle_timeout: ").expect("an idle timeout") + "idle_timeout: ".len();
        let end = at + yaml[at..].find("ms").expect("in ms") + 2;
        format!("{}{}s{}", &yaml[..at], idle.as_secs(), &yaml[end..])
    };
    let tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let connector_yaml = long_idle(env.connector_config_text(Mode::ConnectorDialsOut, &tls));
    let _connector = tests::topology::RunningAgent::start(
        &env.topo.remote,
        dataplane::config::Config::parse(&connector_yaml).expect("connector config"),
    )
    .expect("connector");
    let tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let yaml = long_idle(env.client_config_text(Mode::ConnectorDialsOut, &tls));
    let dir = tempfile::tempdir().expect("tmp");
    // Ready means a live tunnel connection for every routed peer.
    let start =
        |i: usize| AgentProcess::start(&env.topo.node, &format!("client{i}"), &yaml, admin(0), dir.path());
    let mut agent = start(0).expect("client agent");
    let pod = env.topo.pod_probe();
    for (i, how) in [(1, "SIGKILL"), (2, "SIGTERM"), (3, "SIGKILL")] {
        let down = Instant::now();
        if how == "SIGKILL" {
            agent.kill();
        } else {
            agent.terminate();
            assert!(agent.wait_exit(Duration::from_secs(40)).expect("exits").success());
        }
        let spawned = Instant::now();
        agent = start(i).expect("served again: the tunnel is up before the start deadline");
        let a = pod.connect(addr(tests::topology::OTHER_V4)).expect("probe");
        assert!(a.ok, "after {how}: served through the tunnel: {a:?}");
        let (since_down, since_start) = (down.elapsed(), spawned.elapsed());
        eprintln!(
            "client restart after {how}: served again {since_start:?} after the new agent started ({since_down:?} after the old one went)"
        );
        assert!(since_down < idle / 4, "after {how}: {since_down:?}");
    }
}
