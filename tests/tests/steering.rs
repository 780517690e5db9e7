//! Kernel steering end to end on the real kernel: programs attached to a child
//! cgroup, a workload in its own network namespace (as a pod), the agent in
//! process in the node namespace, routed destinations in a server namespace.

use std::net::SocketAddr;

use dataplane::app::ReloadError;
use dataplane_common::Counter;
use tests::{
    require_root,
    topology::{
        API_V4, API_V6, CLOSED_V4, NODE_TO_SERVER_V4, NODE_TO_SERVER_V6, OTHER_V4, OTHER_V6, POD_V4, POD_V6,
        Topology, addr,
    },
};

const ROUTES: [&str; 3] = ["198.51.100.101/32", "2001:db8::101/128", "198.51.100.103/32"];

fn ip_of(s: Option<SocketAddr>) -> String {
    s.map(|a| a.ip().to_string()).unwrap_or_default()
}

/// (a) (b) (c) (f): routed v4 and v6 connects from a pod reach the server
/// through the agent, getpeername() shows the dialled address, unrouted TCP
/// and UDP are untouched, and every counter matches the flows made.
#[test]
fn routed_connects_from_a_pod_go_through_the_agent_and_counters_match() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("agent starts");
    let before = agent.handle.kernel_counters().expect("counters");
    let pod = topo.pod_probe();

    for (dst, via) in [(API_V4, NODE_TO_SERVER_V4), (API_V6, NODE_TO_SERVER_V6)] {
        let a = pod.connect(addr(dst)).expect("probe");
        assert!(a.ok, "{dst}: {a:?}");
        assert_eq!(a.peer.as_deref(), Some(addr(dst).to_string().as_str()), "getpeername shows {dst}");
        assert_eq!(ip_of(a.server_saw()), via, "{dst} reached the server from the agent, not the pod");
        assert_eq!(a.echoed(), "hello through the dataplane", "bytes and half-close both ways");
    }

    // A dual-stack AF_INET6 socket dialling the IPv4-mapped form of a routed
    // IPv4 address is steered by the IPv4 table to the IPv4 listener.
    let mapped = "[::ffff:198.51.100.101]:6443";
    let a = pod.connect(addr(mapped)).expect("probe");
    assert!(a.ok, "{mapped}: {a:?}");
    assert_eq!(a.peer.as_deref(), Some(mapped), "getpeername shows the mapped address");
    assert_eq!(ip_of(a.server_saw()), NODE_TO_SERVER_V4, "{mapped} went through the agent");

    for (dst, pod_ip) in [(OTHER_V4, POD_V4), (OTHER_V6, POD_V6)] {
        let a = pod.connect(addr(dst)).expect("probe");
        assert!(a.ok, "{dst}: {a:?}");
        assert_eq!(ip_of(a.server_saw()), pod_ip, "unrouted {dst} went direct from the pod");
        assert_eq!(a.peer.as_deref(), Some(addr(dst).to_string().as_str()));
    }

    let udp = pod.udp_connect(addr(API_V4)).expect("probe");
    assert_eq!(udp.peer.as_deref(), Some(API_V4), "UDP to a routed address is untouched");

    let k = agent.handle.kernel_counters().expect("counters").since(&before);
    assert_eq!(k.get(Counter::ConnectRedirected), 3, "{k:?}");
    assert_eq!(k.get(Counter::Connect6V4Mapped), 1, "{k:?}");
    assert_eq!(k.get(Counter::SockOpsFlowRecorded), 3, "{k:?}");
    assert_eq!(k.get(Counter::GetpeernameRestored), 3, "{k:?}");
    assert_eq!(k.get(Counter::ConnectNotRouted), 2, "{k:?}");
    assert_eq!(k.get(Counter::ConnectNotTcp), 1, "{k:?}");
    assert_eq!(k.get(Counter::ConnectMapError) + k.get(Counter::SockOpsMapError), 0, "{k:?}");
    assert_eq!(k.get(Counter::ConnectAgentSocket), 0, "the agent is outside the cgroup here");

    let summary = agent.stop();
    assert_eq!(summary.flows.accepted, 3, "{:?}", summary.flows);
    assert_eq!(summary.flows.completed, 3, "{:?}", summary.flows);
    assert_eq!(summary.flows.unrecovered + summary.flows.dial_failed, 0, "{:?}", summary.flows);
    assert_eq!(summary.flows.active, 0);
    let payload = "hello through the dataplane".len() as u64;
    assert_eq!(summary.flows.bytes_up, 3 * payload);
    assert!(
        summary.kernel.get(Counter::SockOpsClosed) >= 3,
        "closed sockets were forgotten: {:?}",
        summary.kernel
    );
    assert_eq!(topo.server.seen.lock().expect("lock").len(), 5, "5 TCP connections reached the server");
}

/// A process beside the agent (hostNetwork pods, node daemons) is steered too.
#[test]
fn a_client_in_the_node_namespace_is_steered_too() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("agent starts");
    let a = topo.node_probe().connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "{a:?}");
    assert_eq!(a.peer.as_deref(), Some(API_V4));
    assert_eq!(agent.stop().flows.completed, 1);
}

/// A routed destination that refuses: the application gets an error at once.
#[test]
fn a_failed_upstream_dial_resets_the_client() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("agent starts");
    let a = topo.pod_probe().connect(addr(CLOSED_V4)).expect("probe");
    assert!(a.was_reset(), "nothing listens at {CLOSED_V4}; the application sees a reset: {a:?}");
    assert!(a.elapsed_us < tests::fast_us(1_000_000), "fails fast, took {} us", a.elapsed_us);
    assert_eq!(agent.stop().flows.dial_failed, 1);
}

/// (d): removing a route at runtime stops steering it; a refused reload
/// changes nothing.
#[test]
fn removing_a_route_at_runtime_stops_steering_it() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("agent starts");
    let pod = topo.pod_probe();
    assert_eq!(agent.handle.route_entries(), (2, 1));
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), NODE_TO_SERVER_V4);

    // A reload that also changes a restart-only field is refused whole.
    let mut bad = topo.config(&["2001:db8::101/128"]).config().clone();
    bad.steering.redirect.interface = "other0".into();
    let bad = bad.validate().expect("valid on its own");
    assert!(
        matches!(agent.handle.reload(bad), Err(ReloadError::RestartRequired(ref f)) if f == &["steering.redirect"])
    );
    assert_eq!(agent.handle.route_entries(), (2, 1), "a refused reload applies nothing");

    agent.handle.reload(topo.config(&["2001:db8::101/128"])).expect("reload");
    assert_eq!(agent.handle.route_entries(), (0, 1));
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "{a:?}");
    assert_eq!(ip_of(a.server_saw()), POD_V4, "no longer steered: the pod reached the server itself");
    let a = pod.connect(addr(API_V6)).expect("probe");
    assert_eq!(ip_of(a.server_saw()), NODE_TO_SERVER_V6, "the remaining route is still steered");

    // Adding it back steers it again.
    agent.handle.reload(topo.config(&ROUTES)).expect("reload");
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), NODE_TO_SERVER_V4);
}

/// A reload that fails half-way through the kernel update leaves the kernel
/// and the agent exactly as they were (apply, verify, roll back), and is
/// counted and shown in `/status`. Two faults: a real one (the trie fills up,
/// since new routes go in before old ones leave) and one injected after a
/// few writes of a change that adds and removes.
#[test]
fn a_reload_that_fails_half_way_changes_nothing() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let many = |second: u8| -> Vec<String> {
        (0..3000).map(|i| format!("10.{second}.{}.{}/32", i / 256, i % 256)).collect()
    };
    let with = |extra: &[String]| {
        let mut routes: Vec<&str> = ROUTES.to_vec();
        routes.extend(extra.iter().map(String::as_str));
        topo.config(&routes)
    };
    let agent = topo.start_agent(with(&many(1))).expect("agent starts");
    let pod = topo.pod_probe();
    let before = (agent.handle.route_entries(), agent.handle.status().routes);
    assert_eq!(before.0, (3002, 1));

    // 3,000 other routes: 1,094 of them fit beside the old ones, the next
    // insert finds the trie full.
    let e = agent.handle.reload(with(&many(2))).expect_err("the trie cannot hold both");
    assert!(e.to_string().contains("is full (4096 entries)"), "{e}");
    assert_eq!(agent.handle.route_entries(), before.0, "the 1,094 inserted were taken out again");
    assert_eq!(agent.handle.status().routes, before.1, "userspace kept the running routes");
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), NODE_TO_SERVER_V4);

    // A fault after three writes of a change that adds one route and removes
    // 3,001: the three are undone.
    let steering = agent.handle.steering().expect("steering").clone();
    steering.fail_next_sync_after(3);
    let e = agent.handle.reload(topo.config(&["2001:db8::101/128", "10.9.0.0/16"])).expect_err("injected");
    assert!(e.to_string().contains("injected fault"), "{e}");
    assert_eq!(agent.handle.route_entries(), before.0);
    assert_eq!(agent.handle.status().routes, before.1);
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), NODE_TO_SERVER_V4);

    let status = agent.handle.status().reloads;
    assert_eq!((status.applied, status.refused), (0, 2));
    let last = status.last_refusal.expect("the last refusal is kept");
    assert!(last.error.contains("injected fault"), "{last:?}");
    let scrape = agent.handle.encode_metrics();
    assert!(scrape.contains("dataplane_config_reloads_total{result=\"refused\"} 2"), "{scrape}");

    // The same change without the fault applies.
    agent.handle.reload(topo.config(&["2001:db8::101/128", "10.9.0.0/16"])).expect("reload");
    assert_eq!(agent.handle.route_entries(), (1, 1));
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), POD_V4);
    assert_eq!(agent.handle.status().reloads.applied, 1);
}

/// (e): after the agent stops, steering is gone and the interface removed; and
/// while it stops, no connect fails (none points at a closed listener).
#[test]
fn stopping_the_agent_removes_steering_without_failing_connects() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("agent starts");
    let pod = topo.pod_probe();
    assert_eq!(ip_of(pod.connect(addr(API_V4)).expect("probe").server_saw()), NODE_TO_SERVER_V4);

    // Connects keep coming, from two workloads at once, while the agent shuts down.
    let loads = [
        pod.spawn_repeat(addr(API_V4), 400).expect("probe"),
        pod.spawn_repeat(addr(API_V6), 400).expect("probe"),
    ];
    // Stop once the load is visibly going through the agent (process start-up
    // is slow under an emulated CPU: no fixed sleep).
    let start = std::time::Instant::now();
    while agent.handle.flow_stats().accepted < 10 {
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the load never reached the agent");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let epoch_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    let began = epoch_ms();
    let summary = agent.stop();
    let ended = epoch_ms();
    let mut in_window = 0;
    for load in loads {
        let during = tests::probe::wait_summary(load).expect("probe");
        assert_eq!(during.failed, 0, "a connect failed during shutdown: {during:?}");
        assert_eq!(during.ok, 400);
        in_window += during.ok_at_ms.iter().filter(|&&t| (began..=ended).contains(&t)).count();
    }
    // Without this the test would pass with a load that ended before the
    // shutdown began.
    assert!(in_window > 0, "no connect started while the agent was stopping ({began}..{ended} ms)");
    eprintln!("{in_window} connects started during the {} ms shutdown, none failed", ended - began);
    assert!(summary.flows.accepted >= 10, "some load went through the agent: {:?}", summary.flows);
    assert_eq!(summary.flows.unrecovered, 0, "{:?}", summary.flows);

    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "{a:?}");
    assert_eq!(ip_of(a.server_saw()), POD_V4, "steering is gone after the agent stopped");
    assert!(topo.node.ip(&["link", "show", "dataplane0"]).is_err(), "redirect interface removed");
}

/// A second agent with the same config starts after the first stopped: nothing
/// (interface, addresses, listeners) is left behind to collide with.
#[test]
fn the_agent_restarts_cleanly() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    topo.start_agent(topo.config(&ROUTES)).expect("first start").stop();
    let agent = topo.start_agent(topo.config(&ROUTES)).expect("second start");
    let a = topo.pod_probe().connect(addr(API_V6)).expect("probe");
    assert_eq!(ip_of(a.server_saw()), NODE_TO_SERVER_V6, "{a:?}");
    assert_eq!(agent.stop().flows.completed, 1);
}

/// A start that fails half way leaves nothing behind.
#[test]
fn a_failed_start_cleans_up() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let mut config = topo.config(&ROUTES).config().clone();
    config.steering.cgroup = Some("/proc".into());
    let config = config.validate().expect("valid on its own: the start refuses it");
    let err = topo.start_agent(config).err().expect("must fail").to_string();
    assert!(err.contains("steering.cgroup") && err.contains("/proc"), "{err}");
    // Bind failure after the interface exists: the interface must go again.
    let blocker = topo
        .node
        .run(|| {
            // Occupy the listener port on the node so the agent's bind fails.
            let s = std::net::TcpListener::bind(("0.0.0.0", dataplane::config::DEFAULT_REDIRECT_PORT));
            s.map(|l| l.local_addr().map(|_| l))
        })
        .expect("thread")
        .expect("bind")
        .expect("addr");
    let err = topo.start_agent(topo.config(&ROUTES)).err().expect("must fail").to_string();
    assert!(err.contains("steering.redirect.v4"), "{err}");
    assert!(topo.node.ip(&["link", "show", "dataplane0"]).is_err(), "interface removed after a failed start");
    drop(blocker);
    let a = topo.pod_probe().connect(addr(API_V4)).expect("probe");
    assert_eq!(ip_of(a.server_saw()), POD_V4, "no steering left attached: {a:?}");
}

/// A client that resets before the agent serves it, then a new flow from the
/// same source port to another routed destination: each flow reaches its own
/// destination (the kernel, not the agent, forgets flows, at client close).
#[test]
fn port_reuse_after_a_reset_never_misroutes() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let routes = ["198.51.100.101/32", "198.51.100.102/32"];
    let agent = topo.start_agent(topo.config(&routes)).expect("agent starts");
    let pod = topo.pod_probe();
    for i in 0..40u16 {
        let port = 41000 + i;
        let a = pod.connect_and_reset(addr(OTHER_V4), port).expect("probe");
        assert!(a.ok, "reset connect {i}: {a:?}");
        let b = pod.connect_from(addr(API_V4), port).expect("probe");
        assert!(b.ok, "flow {i} after a reset on port {port}: {b:?}");
        assert_eq!(b.reached(), Some(addr(API_V4)), "flow {i} reached its own destination: {b:?}");
        assert_eq!(ip_of(b.server_saw()), NODE_TO_SERVER_V4, "flow {i} went through the agent");
    }
    let k = agent.handle.kernel_counters().expect("counters");
    assert_eq!(k.get(Counter::ConnectRedirected), 80, "{k:?}");
    let summary = agent.stop();
    assert_eq!(summary.flows.completed, 40, "{:?}", summary.flows);
}

/// Shutdown detaches in the reverse of the attach order: with the connect
/// programs gone nothing new is steered, while a flow redirected before keeps
/// sock_ops (its close is seen and its record removed) until the rest go.
#[test]
fn stop_redirecting_keeps_redirected_flows_recorded() {
    if !require_root() {
        return;
    }
    use dataplane::{kernel::Steering, routes::RouteTable};
    let topo = Topology::new().expect("topology");
    // The redirect target: a listener of this test's own in the node namespace.
    let target = addr("10.200.0.1:15999");
    let listener = topo.node.run(move || tests::listen(target)).expect("netns").expect("listen");
    let steering = Steering::load(&topo.cgroup.path, None, Default::default()).expect("steering loads");
    let config = topo.config(&ROUTES);
    let table = RouteTable::build(config.valid_routes(), &RouteTable::default());
    steering.take_over(Some(target), None, &table, |_| dataplane_common::ACTION_REDIRECT).expect("attached");

    let pod = topo.pod_probe();
    let held = pod.hold(addr(API_V4), 1).expect("a redirected connection");
    let (_conn, peer) = listener.accept().expect("accepted at the redirect target");
    assert_eq!(steering.lookup_flow(peer).map(|f| f.dst), Some(addr(API_V4)), "flow recorded");
    let closed = steering.counters().expect("counters").get(Counter::SockOpsClosed);

    steering.stop_redirecting();
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert_eq!(ip_of(a.server_saw()), POD_V4, "not steered once the connect programs are gone");

    held.release();
    let start = std::time::Instant::now();
    while steering.counters().expect("counters").get(Counter::SockOpsClosed) == closed {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "sock_ops never saw the close");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(steering.lookup_flow(peer).is_none(), "the closed flow's record is removed");
    assert!(steering.attached(), "sock_ops and getpeername stay until detach");
    steering.detach();
    assert!(!steering.attached());
}
