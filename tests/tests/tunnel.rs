//! The product end to end: a workload in a pod namespace, steered by eBPF
//! into the client agent, carried over the mutual-TLS QUIC tunnel to a
//! connector in a private namespace the node has no route to, which dials the
//! destination. The real kubectl talks to a stand-in API server that requires
//! a client certificate, so TLS to the API server is end to end.

use std::time::{Duration, Instant};

use dataplane_common::Counter;

use tests::{
    require_root,
    topology::{OTHER_V4, OTHER_V6, addr},
    tunnel_env::{
        CLIENT_ID, CONNECTOR_ID, Mode, PEER, STALLED_V4, TunnelEnv, UNSERVED_V4, ensure_tunnel, kubectl_works,
    },
    wait_for,
};

/// The connector's tunnel listener in the private namespace.
const CONNECTOR: &str = "10.201.0.2:4433";

#[test]
fn kubectl_reaches_the_private_api_server_through_the_tunnel() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    // Without the tunnel the private network is out of reach from the pod.
    let direct = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(!direct.ok, "the node must not route to the private network: {direct:?}");

    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents start");
    kubectl_works(&env);
    assert!(env.api.requests.load(std::sync::atomic::Ordering::Relaxed) >= 2);

    // IPv6 too, with half-close both ways (the echo server answers after our FIN).
    let a = env.topo.pod_probe().connect(addr(OTHER_V6)).expect("probe");
    assert!(a.ok, "{a:?}");
    assert_eq!(a.peer.as_deref(), Some(OTHER_V6), "getpeername shows the dialled address");
    assert_eq!(a.echoed(), "hello through the dataplane");
    assert!(
        a.server_saw().is_some_and(|s| s.ip().to_string().starts_with("2001:db8::")),
        "dialled by the connector"
    );

    tests::wait_flows_settled(&client.handle);
    let c = connector.handle.connector().expect("connector role");
    assert!(c.metrics.status("ok") >= 3, "{}", connector.handle.encode_metrics());
    let flows = client.handle.flow_stats();
    assert_eq!(flows.no_tunnel + flows.refused_by_peer + flows.unrecovered, 0, "{flows:?}");
    assert!(flows.completed >= 3, "{flows:?}");
    drop(connector);
    client.stop();
}

/// A connector behind a firewall that allows no inbound traffic: it has no
/// listener at all and dials out; the client agent still opens the flows.
#[test]
fn the_connector_dials_out_and_still_receives_flows() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorDialsOut).expect("agents start");
    let cfg =
        env.connector_config(Mode::ConnectorDialsOut, &env.tls("check", CONNECTOR_ID, None).expect("tls"));
    assert!(cfg.tunnel.listen.is_none(), "the connector accepts nothing inbound");
    let local = connector.handle.tunnel().and_then(|t| t.local_addr()).expect("bound");
    assert_ne!(local.port(), 4433, "the connector's only socket is an ephemeral one it dials from");

    kubectl_works(&env);
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.ok && a.echoed() == "hello through the dataplane", "{a:?}");
    let opened = client.handle.tunnel().expect("tunnel").metrics.streams_opened(PEER);
    assert!(opened >= 3, "the client opened the streams over the connector's outbound connection: {opened}");
    drop(connector);
    client.stop();
}

/// 256 MiB out and back through the tunnel, every echoed byte compared with
/// the pattern sent. DATAPLANE_TEST_BULK_MIB sets another size (the kernel
/// matrix uses less under its emulated CPU).
#[test]
fn a_256_mib_transfer_arrives_byte_exact() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, _connector) = env.start(Mode::ConnectorListens).expect("agents start");
    let mib: u64 = std::env::var("DATAPLANE_TEST_BULK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let bytes = mib << 20;
    let b = env.topo.pod_probe().bulk(addr(OTHER_V4), bytes).expect("probe");
    assert!(b.ok, "{b:?}");
    assert_eq!((b.sent, b.received), (bytes, bytes), "{b:?}");
    assert!(b.echo_intact, "the echoed bytes differ from the sent ones: {b:?}");
    eprintln!(
        "{mib} MiB each way through the tunnel in {:.2}s: {:.0} Mbit/s per direction",
        b.secs,
        bytes as f64 * 8.0 / b.secs / 1e6
    );
    tests::wait_flows_settled(&client.handle);
    let f = client.handle.flow_stats();
    assert_eq!(f.bytes_up, bytes, "{f:?}");
    assert!(f.bytes_down > bytes, "the echo plus the server's header line: {f:?}");
}

/// Backpressure end to end: a server that never reads stalls the writer after
/// a bounded amount (socket buffers and flow-control windows along the path),
/// because neither agent buffers without bound.
#[test]
fn a_slow_reader_stalls_the_writer_instead_of_filling_the_agents() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (_client, _connector) = env.start(Mode::ConnectorListens).expect("agents start");
    let _server = env.stalled_server().expect("server");
    let limit = 1u64 << 30;
    let written = env.topo.pod_probe().fill(addr(STALLED_V4), limit).expect("probe");
    eprintln!("the path accepted {} KiB before the writer blocked", written >> 10);
    assert!(written > 1 << 20, "the flow did carry data: {written}");
    assert!(written < 128 << 20, "accepted {written} bytes: something buffers without bound");
}

/// An application that resets its connection after the path carried its
/// bytes (iperf3 ends every test so) is counted as `client_reset`, apart
/// from failures of the path, which the FlowErrorRate alert counts.
#[test]
fn an_application_reset_is_not_counted_as_a_failure() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, _connector) = env.start(Mode::ConnectorListens).expect("agents start");
    let server = env.stalled_server().expect("server");
    let held = env.topo.pod_probe().hold_sending(addr(STALLED_V4), 1).expect("probe");
    let payload = "hello through the dataplane".len() as u64;
    // The connector dialled: the bytes, sent right behind the header, are
    // on their way.
    wait_for("the flow reaches the server", Duration::from_secs(10), || server.accepted() == 1);
    held.release();
    wait_for("the flow ends", Duration::from_secs(10), || client.handle.flow_stats().active == 0);
    let f = client.handle.flow_stats();
    assert_eq!((f.client_reset, f.failed, f.completed), (1, 0, 0), "{f:?}");
    assert_eq!(f.bytes_up, payload, "the bytes of a reset flow are counted: {f:?}");
    let scrape = client.handle.encode_metrics();
    assert!(
        scrape.contains(r#"dataplane_flows_closed_total{route="198.51.100.102/32",result="client_reset"} 1"#),
        "{scrape}"
    );
}

/// A routed destination the connector does not serve: it answers `denied`,
/// counts why, and the application gets a reset at once, never a hang.
#[test]
fn a_destination_the_connector_does_not_serve_is_refused_fast() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents start");
    let a = env.topo.pod_probe().connect(addr(UNSERVED_V4)).expect("probe");
    assert!(a.was_reset(), "{a:?}");
    assert!(a.elapsed_us < tests::fast_us(500_000), "refused fast, took {} us", a.elapsed_us);
    let c = connector.handle.connector().expect("connector");
    assert_eq!(c.metrics.denials("not_served"), 1, "{}", connector.handle.encode_metrics());
    assert_eq!(c.metrics.status("denied"), 1);
    assert_eq!(client.handle.flow_stats().refused_by_peer, 1);
    // The tunnel itself is unharmed.
    assert!(env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe").ok);
}

/// Certificates from another CA are refused at the handshake, whichever side
/// holds them, and counted by reason; flows fail at once meanwhile.
#[test]
fn a_peer_with_a_certificate_from_another_ca_is_refused_at_the_handshake() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let rogue = dataplane::tls::certs::new_ca("rogue CA", Duration::from_secs(3600)).expect("ca");

    // A client with the right identity, signed by the wrong CA.
    let tls = env.tls("rogue-client", CLIENT_ID, Some(&rogue)).expect("tls");
    std::fs::write(&tls.ca, &env.tunnel_ca.cert).expect("trusts the real CA");
    let connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    let client = env.topo.start_agent(env.client_config(Mode::ConnectorListens, &tls)).expect("client");
    let server_side = connector.handle.tunnel().expect("tunnel");
    let refused = || {
        ["unknown_ca", "bad_certificate"]
            .iter()
            .map(|r| server_side.metrics.handshake_failures(r))
            .sum::<u64>()
    };
    wait_for("the connector refuses the rogue client", Duration::from_secs(10), || refused() >= 1);
    let client_side = client.handle.tunnel().expect("tunnel");
    wait_for("the refused client learns why", Duration::from_secs(10), || {
        client_side.metrics.handshake_failures("peer_unknown_ca") >= 1
    });
    // Both sides have seen the refusal: no connection may be up, or ever
    // have been counted as up.
    assert_eq!(client_side.live_connections(PEER), 0, "no tunnel may come up");
    // The refused dialer never counted the connection as up: in TLS 1.3 it
    // finishes first, so only the welcome tells it apart.
    assert_eq!(client_side.metrics.connections_opened(PEER), 0, "a refused connection never counts as up");
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.was_reset() && a.elapsed_us < tests::fast_us(500_000), "fails at once without a tunnel: {a:?}");
    // Refused in the kernel: the route has no live peer.
    assert!(client.handle.kernel_counters().expect("counters").get(Counter::ConnectNoPeer) >= 1);
    drop(client);
    drop(connector);

    // A connector signed by the wrong CA: the client refuses it.
    let tls = env.tls("rogue-connector", CONNECTOR_ID, Some(&rogue)).expect("tls");
    std::fs::write(&tls.ca, &env.tunnel_ca.cert).expect("trusts the real CA");
    let connector = tests::topology::RunningAgent::start(
        &env.topo.remote,
        env.connector_config(Mode::ConnectorListens, &tls),
    )
    .expect("connector");
    let client = env
        .topo
        .start_agent(env.client_config(Mode::ConnectorListens, &env.tls("c2", CLIENT_ID, None).expect("tls")))
        .expect("client");
    let client_side = client.handle.tunnel().expect("tunnel");
    wait_for("the client refuses the rogue connector", Duration::from_secs(10), || {
        client_side.metrics.handshake_failures("unknown_ca") >= 1
    });
    assert_eq!(client_side.live_connections(PEER), 0, "no tunnel may come up");
    assert_eq!(client_side.metrics.connections_opened(PEER), 0);
    drop(connector);
}

/// The connector dies without a word (its link is cut first, so not even its
/// CONNECTION_CLOSE gets out): the client notices within the idle timeout,
/// new routed connects then fail at once, and flows work again as soon as the
/// connector is back.
#[test]
fn killing_the_connector_fails_new_flows_fast_and_they_recover() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents start");
    assert!(env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe").ok);

    let link = format!("vt{}", env.topo.id);
    env.topo.remote.ip(&["link", "set", &link, "down"]).expect("cut the link");
    let cut = Instant::now();
    // Its shutdown waits for acknowledgements that cannot arrive: let it.
    let stopping = std::thread::spawn(move || drop(connector));
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    // QUIC's idle timeout is the larger of the configured one (1.5 s, scaled
    // under emulation) and three probe timeouts, which grow with the
    // measured RTT: about 2 s on a real machine, more under an emulated CPU
    // (RTTs of 250 ms seen).
    let limit = Duration::from_micros(tests::fast_us(5_000_000));
    while tunnel.live_connections(PEER) > 0 {
        assert!(cut.elapsed() < limit, "dead tunnel not noticed within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let noticed = cut.elapsed();
    assert!(
        noticed >= Duration::from_millis(500),
        "noticed by the idle timeout, not a close frame: {noticed:?}"
    );
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.was_reset(), "{a:?}");
    let bound = tests::fast_us(300_000);
    assert!(a.elapsed_us < bound, "fails fast once the tunnel is known dead: {} us", a.elapsed_us);

    stopping.join().expect("connector stopped");
    env.topo.remote.ip(&["link", "set", &link, "up"]).expect("restore the link");
    let _connector = env.start_connector(Mode::ConnectorListens).expect("connector restarts");
    let back = ensure_tunnel(&client.handle, Duration::from_secs(20)).expect("client reconnects");
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.ok, "flows work again: {a:?}");
    eprintln!("dead tunnel noticed after {noticed:?}; reconnected {back:?} after the connector returned");
}

/// A certificate is checked at the handshake; a connection must not outlive
/// it. The client closes its connections when the connector's certificate
/// expires, and every redial is then refused on that certificate.
#[test]
fn a_connection_closes_when_the_peers_certificate_expires() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let valid = Duration::from_micros(tests::fast_us(6_000_000));
    let issued = Instant::now();
    let tls = env.tls_valid_for("short-lived", CONNECTOR_ID, valid).expect("tls");
    let _connector = tests::topology::RunningAgent::start(
        &env.topo.remote,
        env.connector_config(Mode::ConnectorListens, &tls),
    )
    .expect("connector");
    let client = env
        .topo
        .start_agent(
            env.client_config(Mode::ConnectorListens, &env.tls("client", CLIENT_ID, None).expect("tls")),
        )
        .expect("client");
    ensure_tunnel(&client.handle, valid / 2).expect("up while the certificate is valid");
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    wait_for("the connections close at the certificate's expiry", valid + Duration::from_secs(10), || {
        tunnel.live_connections(PEER) == 0
    });
    // Certificates carry whole seconds: expiry is at most 1 s before `valid`.
    let closed = issued.elapsed();
    assert!(closed + Duration::from_secs(1) >= valid, "closed at {closed:?}, before the expiry at {valid:?}");
    wait_for("a redial is refused on the expired certificate", Duration::from_secs(15), || {
        tunnel.metrics.handshake_failures("certificate_expired") >= 1
    });
    assert_eq!(tunnel.live_connections(PEER), 0, "no connection comes back");
}

/// A certificate that is not valid yet is refused, and both sides say so:
/// TLS has one alert for either end of the validity period, so the reason
/// comes from rustls's error text, which QUIC carries in its close frame.
#[test]
fn a_certificate_not_valid_yet_is_refused_and_reported_as_such() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    // A configured identity, from the right CA, an hour early.
    let early = env.tls_not_yet_valid("early", CLIENT_ID, Duration::from_secs(3600)).expect("tls");
    let attack = tests::evil::Attack::dial_once(CONNECTOR.parse().expect("addr"), CONNECTOR_ID, None);
    let report = tests::evil::run(&env.topo.node.path(), &early, &attack).expect("report");
    assert_eq!(report.connections_welcomed, 0, "{report:?}");
    assert_eq!(
        report.connections_closed.get("peer_certificate_not_yet_valid"),
        Some(&1),
        "the dialer learns its certificate is not valid yet (not that it expired): {report:?}"
    );
    let tunnel = connector.handle.tunnel().expect("tunnel");
    wait_for("the refusal counted as not yet valid", Duration::from_secs(10), || {
        tunnel.metrics.handshake_failures("certificate_not_yet_valid") == 1
    });
    assert_eq!(tunnel.metrics.handshake_failures("certificate_expired"), 0);
}

/// A served CIDR that covers the connector's own node does not let a peer
/// reach the node's own services: its addresses are never dialled, also one
/// it gains while running.
#[test]
fn the_connector_never_dials_its_own_addresses() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let text = env
        .connector_config_text(Mode::ConnectorListens, &tls)
        .replace("serve:\n", "serve:\n  - { cidr: '10.201.0.0/24', ports: [7002] }\n");
    let connector = tests::topology::RunningAgent::start(
        &env.topo.remote,
        dataplane::config::Config::parse(&text).expect("connector config"),
    )
    .expect("connector");
    // A service of the connector's node, on every address it has.
    let service = env
        .topo
        .remote
        .run(|| std::net::TcpListener::bind("0.0.0.0:7002").and_then(|l| l.set_nonblocking(true).map(|()| l)))
        .expect("in the namespace")
        .expect("listener");
    let peer = env.tls("peer", CLIENT_ID, None).expect("tls");
    let ask = |dst: &str| {
        let attack =
            tests::evil::Attack::dial_once(CONNECTOR.parse().expect("addr"), CONNECTOR_ID, Some(addr(dst)));
        tests::evil::run(&env.topo.node.path(), &peer, &attack).expect("report")
    };
    let c = connector.handle.connector().expect("connector").clone();

    let r = ask("10.201.0.2:7002");
    assert_eq!(r.streams.count("denied"), 1, "the connector's own tunnel address: {r:?}");
    // An address the node gains at runtime is known within moments (netlink).
    env.topo.remote.ip(&["addr", "add", "10.201.0.9/32", "dev", "lo"]).expect("ip addr add");
    wait_for("the new address known", Duration::from_secs(2), || {
        c.is_own_address("10.201.0.9".parse().expect("ip"))
    });
    let r = ask("10.201.0.9:7002");
    assert_eq!(r.streams.count("denied"), 1, "an address added at runtime: {r:?}");
    assert_eq!(c.metrics.denials("own_address"), 2);
    assert!(
        matches!(service.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing ever connected to the node's own service"
    );
}

/// Certificates rotate without a restart (a cert-manager Secret update):
/// new handshakes present the new certificate, connections up and the flows
/// on them continue, not one new flow fails meanwhile, and a bad file is
/// refused with the old material kept. Both sides: the connector's new
/// certificate is what a new dialer sees, the client's is what a restarted
/// connector sees on the client's redial.
#[test]
fn certificates_rotate_without_a_restart_or_a_failed_flow() {
    if !require_root() {
        return;
    }
    use dataplane::tls::certs::{self, NodeSpec};
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents");
    // As a Secret update lands: each file replaced whole (rename).
    let rotate = |name: &str, identity: &str, validity: Duration| {
        let pem = certs::issue(
            &env.tunnel_ca,
            &NodeSpec { identity: identity.into(), validity, ..Default::default() },
        )
        .expect("issue");
        let dir = env.dir().join(name);
        for (file, text) in [("tls.key", &pem.key), ("tls.crt", &pem.cert)] {
            let tmp = dir.join(format!(".{file}.new"));
            std::fs::write(&tmp, text).expect("write");
            std::fs::rename(&tmp, dir.join(file)).expect("rename");
        }
    };
    let unix =
        |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let old_expiry = tunnel.peer_certificate_expiries(PEER);
    assert_eq!(old_expiry.len(), 2, "two connections up");

    // New flows in a loop the whole time.
    let load = env.topo.pod_probe().spawn_repeat(addr(OTHER_V4), 300).expect("flows");

    // The connector's certificate: two hours instead of one.
    rotate("connector", CONNECTOR_ID, Duration::from_secs(7200));
    connector.handle.reload_tls().expect("the rotated certificate loads");
    // A bad file: refused, the rotated material stays in force.
    let dir = env.dir().join("connector");
    let good_key = std::fs::read(dir.join("tls.key")).expect("key");
    std::fs::write(dir.join("tls.key"), "not a key").expect("write");
    let e = connector.handle.reload_tls().expect_err("a bad key is refused");
    assert!(e.to_string().contains("old stays in force"), "{e}");
    std::fs::write(dir.join("tls.key"), good_key).expect("restore");
    let scrape = connector.handle.encode_metrics();
    assert!(scrape.contains("dataplane_tls_reloads_total{result=\"applied\"} 1"), "{scrape}");
    assert!(scrape.contains("dataplane_tls_reloads_total{result=\"refused\"} 1"), "{scrape}");

    // A new dialer sees the new certificate; the connections up keep the old.
    let peer = env.tls("peer", CLIENT_ID, None).expect("tls");
    let attack = tests::evil::Attack::dial_once(CONNECTOR.parse().expect("addr"), CONNECTOR_ID, None);
    let report = tests::evil::run(&env.topo.node.path(), &peer, &attack).expect("report");
    let new_not_after = report.acceptor_not_after.expect("welcomed");
    let old = unix(old_expiry[0]);
    assert!(
        new_not_after >= old + 3000,
        "new handshakes present the rotated certificate ({new_not_after} vs {old})"
    );
    assert_eq!(tunnel.peer_certificate_expiries(PEER), old_expiry, "connections up were not touched");
    let expiry_metric = tests::metric_sample(
        &connector.handle.encode_metrics(),
        "dataplane_tls_certificate_expiry_timestamp_seconds",
    )
    .expect("expiry metric");
    assert_eq!(expiry_metric as u64, new_not_after, "the expiry metric follows the certificate in force");

    let summary = tests::probe::wait_summary(load).expect("flows");
    assert_eq!(summary.failed, 0, "no flow failed across the rotation: {:?}", summary.first_error);

    // The client's certificate: rotated, then the connector restarts and
    // the client redials with the new one.
    rotate("client", CLIENT_ID, Duration::from_secs(7200));
    client.handle.reload_tls().expect("the client's rotated certificate loads");
    drop(connector);
    let connector = env.start_connector(Mode::ConnectorListens).expect("connector again");
    tests::tunnel_env::ensure_tunnel(&client.handle, Duration::from_secs(10 * tests::time_scale()))
        .expect("redialled");
    let seen = connector.handle.tunnel().expect("tunnel").peer_certificate_expiries("worker-1");
    assert!(
        seen.iter().all(|t| unix(*t) >= old + 3000) && !seen.is_empty(),
        "the redial presented the client's rotated certificate: {seen:?}"
    );
}

/// Fail closed: while a route's peer has no live connection, a routed
/// connect is refused at once in the kernel (ECONNREFUSED): nothing reaches
/// the agent to be reset, nothing leaves the node by its default route.
/// Routes redirect again as soon as the tunnel is up, and refuse again as
/// soon as it goes; `on_no_peer: pass` lets connects go on untouched.
#[test]
fn a_route_without_a_live_peer_is_refused_in_the_kernel() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let client = env.topo.start_agent(env.client_config(Mode::ConnectorListens, &tls)).expect("client");
    let pod = env.topo.pod_probe();
    let refused = |n: usize| {
        let r = pod.refusals(addr(OTHER_V4), n).expect("probe");
        assert_eq!(r.other, 0, "every connect refused: {r:?}");
        // ECONNREFUSED where the agent found bpf_set_retval, else EPERM.
        let eperm = client.handle.steering().is_some_and(|s| !s.refuses_with_econnrefused());
        assert_eq!(r.eperm, if eperm { n as u64 } else { 0 }, "{r:?}");
        let mut t = r.refused_us.clone();
        t.sort_by(f64::total_cmp);
        (t[t.len() / 2], t[t.len() * 99 / 100])
    };
    let (p50, p99) = refused(1000);
    eprintln!("no live peer: 1,000 routed connects refused, p50 {p50:.0} us, p99 {p99:.0} us");
    assert!(p50 < tests::fast_us(10_000) as f64, "refused at once: p50 {p50:.0} us");
    let counters = client.handle.kernel_counters().expect("counters");
    assert!(counters.get(Counter::ConnectNoPeer) >= 1000);
    assert_eq!(client.handle.flow_stats().accepted, 0, "nothing reached the agent");

    // The tunnel comes up: the route redirects again.
    let connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    ensure_tunnel(&client.handle, Duration::from_secs(10 * tests::time_scale())).expect("tunnel");
    wait_for("the route redirects", Duration::from_secs(5 * tests::time_scale()), || {
        pod.connect(addr(OTHER_V4)).is_ok_and(|a| a.ok)
    });

    // The connector goes (with a close frame): refused again at once.
    drop(connector);
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    wait_for("the tunnel gone", Duration::from_secs(10), || tunnel.live_connections(PEER) == 0);
    let (p50, p99) = refused(1000);
    eprintln!("peer gone: 1,000 routed connects refused, p50 {p50:.0} us, p99 {p99:.0} us");
    drop(client);

    // on_no_peer: pass: the connect goes on untouched; the node has no route
    // to the private network, so it fails there, not at our hook.
    let text = env
        .client_config_text(Mode::ConnectorListens, &tls)
        .replace("via: private-cluster }", "via: private-cluster, on_no_peer: pass }");
    let client =
        env.topo.start_agent(dataplane::config::Config::parse(&text).expect("config")).expect("client");
    let a = pod.connect(addr(OTHER_V4)).expect("probe");
    assert!(!a.ok && !a.error.as_deref().unwrap_or_default().contains("refused"), "passed on: {a:?}");
    assert_eq!(client.handle.kernel_counters().expect("counters").get(Counter::ConnectNoPeer), 0);
}

/// A configured peer that breaks the control protocol (a frame longer than
/// any allowed) has its connection closed with the control error code and
/// counted; nothing is buffered for the frame, and the other peer's flows
/// go on.
#[test]
fn a_peer_that_breaks_the_control_protocol_is_closed_and_counted() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents");
    let peer = env.tls("peer", CLIENT_ID, None).expect("tls");
    let mut attack = tests::evil::Attack::dial_once(CONNECTOR.parse().expect("addr"), CONNECTOR_ID, None);
    attack.control_garbage = true;
    let report = tests::evil::run(&env.topo.node.path(), &peer, &attack).expect("report");
    assert_eq!(report.connections_welcomed, 1, "{report:?}");
    assert_eq!(report.control_closed.as_deref(), Some("application_7"), "{report:?}");
    let scrape = connector.handle.encode_metrics();
    assert_eq!(tests::metric_sample(&scrape, "dataplane_tunnel_control_errors_total"), Some(1.0), "{scrape}");
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.ok, "the well-behaved client's flows go on: {a:?}");
    client.stop();
}

/// What an idle tunnel connection costs with the default keep-alive (2 s)
/// and idle timeout (8 s): its keep-alives and their acknowledgements, a
/// few datagrams a second, counted in `tunnel_udp_datagrams_total`.
#[test]
fn an_idle_tunnel_connection_costs_a_few_datagrams_a_second() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let defaults =
        |text: String| text.replace(&TunnelEnv::tunnel_timers(), "keep_alive: 2s, idle_timeout: 8s");
    let client_tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let client_yaml = defaults(env.client_config_text(Mode::ConnectorListens, &client_tls));
    assert!(client_yaml.contains("keep_alive: 2s"), "{client_yaml}");
    let client = env
        .topo
        .start_agent(dataplane::config::Config::parse(&client_yaml).expect("config"))
        .expect("client");
    let connector_tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let connector_yaml = defaults(env.connector_config_text(Mode::ConnectorListens, &connector_tls));
    let _connector = tests::topology::RunningAgent::start(
        &env.topo.remote,
        dataplane::config::Config::parse(&connector_yaml).expect("config"),
    )
    .expect("connector");
    tests::tunnel_env::ensure_connections(&client.handle, 2, Duration::from_secs(10)).expect("connections");
    let datagrams = || {
        let m = client.handle.encode_metrics();
        ["sent", "received"]
            .iter()
            .map(|d| {
                let series =
                    format!(r#"dataplane_tunnel_udp_datagrams_total{{peer="{PEER}",direction="{d}"}}"#);
                tests::metric_sample(&m, &series).expect("datagram counter")
            })
            .collect::<Vec<f64>>()
    };
    let before = (datagrams(), Instant::now());
    // A measurement window of three keep-alive intervals, nothing sent.
    std::thread::sleep(Duration::from_secs(6));
    let after = datagrams();
    let secs = before.1.elapsed().as_secs_f64();
    let per_conn = |i: usize| (after[i] - before.0[i]) / secs / 2.0;
    let (sent, received) = (per_conn(0), per_conn(1));
    eprintln!(
        "idle tunnel connection, keep-alive 2 s: {sent:.2} datagrams/s sent, {received:.2} received, \
         {:.0} per hour each way",
        (sent + received) / 2.0 * 3600.0
    );
    assert!(sent > 0.0 && received > 0.0, "keep-alives flow both ways: {sent} {received}");
    assert!(
        sent + received <= 3.0,
        "an idle connection costs at most 3 datagrams a second: {sent} + {received}"
    );
    client.stop();
}

/// kubectl beyond one-shot GETs, through the tunnel: `get pods --watch`
/// holds one long-lived chunked response while the API server sends events
/// 300 ms apart, and `exec` upgrades to WebSocket (`v5.channel.k8s.io`) and
/// gets the command's output and exit status over its channels (pod
/// connectors are known to end exec with EOF).
#[test]
fn kubectl_watches_and_execs_through_the_tunnel() {
    if !require_root() {
        return;
    }
    use tests::{
        apiserver::{POD_NAME, WATCH_RESTARTS, exec_output},
        tunnel_env::output_text as text,
    };
    let env = TunnelEnv::new().expect("environment");
    let (_client, _connector) = env.start(Mode::ConnectorListens).expect("agents");
    let started = Instant::now();
    let w = env.kubectl(&["get", "pods", "--watch"]).expect("kubectl runs");
    let took = started.elapsed();
    let out = text(&w);
    assert!(w.status.success(), "the watch ends when the server ends it: {out}");
    // The list's row (restarts 0), then one row per event, in order.
    let restarts: Vec<&str> =
        out.lines().filter(|l| l.starts_with(POD_NAME)).filter_map(|l| l.split_whitespace().nth(3)).collect();
    let want: Vec<String> = std::iter::once(0).chain(WATCH_RESTARTS).map(|r| r.to_string()).collect();
    assert_eq!(restarts, want, "{out}");
    assert!(took >= Duration::from_millis(600), "the events came over one held response: {took:?}");
    eprintln!("$ kubectl get pods --watch ({took:?})\n{out}");

    let words = ["echo", "through", "the", "tunnel"];
    let mut args = vec!["exec", POD_NAME, "--"];
    args.extend(words);
    let e = env.kubectl(&args).expect("kubectl runs");
    assert!(e.status.success(), "kubectl exec: {}", text(&e));
    assert_eq!(String::from_utf8_lossy(&e.stdout), exec_output(&words), "{}", text(&e));
    let f = env.kubectl(&["exec", POD_NAME, "--", "false"]).expect("kubectl runs");
    assert_eq!(f.status.code(), Some(1), "the command's exit code comes back: {}", text(&f));
}
