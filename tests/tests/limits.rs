//! What strangers can make an agent hold: a flood of QUIC Initials (each a
//! connection attempt, no peer behind it) costs bounded memory, draws Retry
//! packets once handshakes pile up, mints no metric label, and a real peer
//! still connects at once.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use dataplane::{process::ProcessStats, tls::TlsMaterial, tunnel::HANDSHAKE_REASONS};
use tests::{
    flood::{flood, initials},
    require_root,
    topology::{API_V4, Topology, addr},
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, TunnelEnv, ensure_tunnel},
    wait_for,
};

/// The connector's tunnel listener in the private namespace.
const CONNECTOR: &str = "10.201.0.2:4433";

#[test]
fn a_flood_of_initials_is_bounded_and_a_real_peer_still_connects() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    let paths = env.tls("flood", CLIENT_ID, None).expect("tls");
    let tls = TlsMaterial::load(&dataplane::config::TlsFiles {
        ca: paths.ca.clone(),
        cert: paths.cert.clone(),
        key: paths.key.clone(),
    })
    .expect("tls");
    // Under emulation each Initial costs the agent tens of milliseconds of
    // emulated CPU (decryption, then a Retry or a handshake): 2,000 would
    // take about a minute to drain, so the flood there is smaller.
    let attempts: usize = if tests::time_scale() > 1 { 200 } else { 2000 };
    let to: SocketAddr = CONNECTOR.parse().expect("addr");
    let packets = initials(attempts, &tls, CONNECTOR_ID, to);

    let before = ProcessStats::read().rss_bytes;
    // Under emulation the agent takes seconds to work through the flood
    // (tens of ms of emulated CPU per Initial): listen for its answers
    // that long.
    let listen = Duration::from_millis(500 * tests::time_scale() * tests::time_scale());
    let retries = env.topo.node.run(move || flood(&packets, 100, "10.201.0.1", to, listen)).expect("flood");
    let after = ProcessStats::read().rss_bytes;
    let tunnel = connector.handle.tunnel().expect("tunnel").clone();
    let refused = tunnel.metrics.handshakes_refused("retry");
    eprintln!(
        "{attempts} Initials: {refused} answered with a Retry ({retries} Retry packets seen), \
         RSS {:.1} -> {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert!(refused > 0 && retries > 0, "past the threshold, strangers are asked to prove their address");
    // Before the fix each attempt cost 5 MiB (per-stream state for 65,536
    // streams), so 2,000 of them would have taken gigabytes.
    let grown = after.saturating_sub(before);
    assert!(grown < 64 << 20, "a flood of {attempts} Initials grew the process by {} MiB", grown >> 20);

    // A real peer connects while the flood's handshakes are still pending:
    // it answers the Retry and is admitted.
    let client = env
        .topo
        .start_agent(
            env.client_config(Mode::ConnectorListens, &env.tls("client", CLIENT_ID, None).expect("tls")),
        )
        .expect("client");
    // 1 s on a real machine. Under emulation the flood's 32 admitted TLS
    // handshakes and the Retry packets are seconds of emulated CPU that
    // the peer's own handshake queues behind: there only "it gets in".
    let within = if tests::time_scale() > 1 { Duration::from_secs(60) } else { Duration::from_secs(1) };
    let took = ensure_tunnel(&client.handle, within).expect("the peer gets in");
    eprintln!("a real peer connected {took:?} after the flood");
    assert!(tunnel.live_connections("worker-1") >= 1);

    // Every label the failures were counted under is from the fixed set.
    let scrape = connector.handle.encode_metrics();
    for line in scrape.lines().filter(|l| l.starts_with("dataplane_tunnel_handshake_failures_total{")) {
        let reason = line.split('"').nth(1).expect("a reason label");
        assert!(HANDSHAKE_REASONS.contains(&reason), "label `{reason}` outside the fixed set: {line}");
    }
}

/// One pod holding idle connections to a routed destination gets
/// `limits.flows_per_workload` of them; the rest are reset at once and
/// counted, and the pod's (and anyone's) flows work again as slots free.
#[test]
fn a_workload_is_capped_at_its_flows() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo
        .start_agent(topo.config_with(&["198.51.100.101/32"], "limits: { flows_per_workload: 5 }\n"))
        .expect("agent");
    let pod = topo.pod_probe();
    let held = pod.hold(addr(API_V4), 5).expect("five flows held");
    wait_for("five flows open", Duration::from_secs(10), || agent.handle.flow_stats().active == 5);
    let over = pod.connect(addr(API_V4)).expect("probe");
    assert!(over.was_reset(), "the sixth is refused: {over:?}");
    wait_for("the refusal counted", Duration::from_secs(10), || {
        agent.handle.flow_stats().over_workload_cap == 1
    });
    assert_eq!(agent.handle.flow_stats().active, 5, "no task for a refused flow");
    held.release();
    wait_for("the held flows end", Duration::from_secs(10), || agent.handle.flow_stats().active == 0);
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "a freed slot serves again: {a:?}");
}

/// With `limits.flow_idle_timeout`, flows that move nothing either way are
/// ended (both ends reset) once the timeout passed, not before, and counted
/// as `idle`; without it (the default, every other test) idle flows stay.
#[test]
fn idle_flows_end_after_the_idle_timeout() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let limit = Duration::from_secs(1);
    let agent = topo
        .start_agent(topo.config_with(&["198.51.100.101/32"], "limits: { flow_idle_timeout: 1s }\n"))
        .expect("agent");
    let pod = topo.pod_probe();
    let start = Instant::now();
    let held = pod.hold(addr(API_V4), 3).expect("three flows held");
    wait_for("three idle flows ended", Duration::from_secs(10 * tests::time_scale()), || {
        let flows = agent.handle.flow_stats();
        flows.idle == 3 && flows.active == 0
    });
    let took = start.elapsed();
    eprintln!("three idle flows ended {took:?} after they opened (limit {limit:?})");
    assert!(took >= limit, "ended after {took:?}, before the {limit:?} timeout");
    assert_eq!(agent.handle.flow_stats().failed, 0, "an idle end is not a failure");
    held.release();
    let a = pod.connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "new flows are served: {a:?}");
}

/// With more redirected sockets open than `steering.flow_capacity`, the
/// kernel's LRU maps evict the oldest entries, and the agent counts them
/// (`dataplane_ebpf_map_evictions_total`) beside each map's entries and
/// capacity.
#[test]
fn a_full_flow_map_evicts_and_the_evictions_are_counted() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let agent = topo
        .start_agent(topo.config_with_steering(&["198.51.100.101/32"], "flow_capacity: 1024", ""))
        .expect("agent");
    let metric = |series: &str| tests::metric_sample(&agent.handle.encode_metrics(), series);
    assert_eq!(metric("dataplane_ebpf_map_capacity{map=\"orig_dst\"}"), Some(1024.0));
    assert_eq!(metric("dataplane_ebpf_map_evictions_total{map=\"orig_dst\"}"), Some(0.0), "none yet");
    let held = topo.pod_probe().hold(addr(API_V4), 1300).expect("1300 sockets held");
    // Counted at most every 10 s: wait out the first count, taken above.
    wait_for("evictions counted", Duration::from_secs(30 * tests::time_scale()), || {
        metric("dataplane_ebpf_map_evictions_total{map=\"orig_dst\"}").is_some_and(|n| n > 0.0)
    });
    let entries = metric("dataplane_ebpf_map_entries{map=\"orig_dst\"}").expect("entries");
    let evicted = metric("dataplane_ebpf_map_evictions_total{map=\"orig_dst\"}").expect("evictions");
    eprintln!("1300 sockets, capacity 1024: {entries} entries, {evicted} evicted");
    assert!(entries <= 1024.0, "{entries} entries in a map of 1024");
    assert!(evicted + entries <= 1300.0 + 2.0, "never more evicted than went in: {evicted} + {entries}");
    held.release();
}
