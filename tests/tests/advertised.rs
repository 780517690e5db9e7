//! Routes advertised by connectors, end to end: a client node configured
//! with no route to the API server learns it from two connector replicas
//! on their control streams, steers it into its kernel tries, spreads new
//! flows over the replicas, sends none to a replica from the moment it says
//! it drains, and removes the routes when the last replica is gone.

use std::time::Duration;

use tests::{
    agent_process::AgentProcess,
    require_root,
    topology::{OTHER_V4, addr},
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, PEER, TunnelEnv, kubectl_works},
    wait_for,
};

const STREAMS_OK: &str = r#"dataplane_connector_streams_total{status="ok"}"#;

const API_NET: &str = "198.51.100.101/32";

/// A client node that learns its routes, and two connector replicas that
/// dial it and advertise them.
struct Fleet {
    client: tests::topology::RunningAgent,
    a: AgentProcess,
    b: AgentProcess,
}

impl Fleet {
    fn start(env: &TunnelEnv) -> Fleet {
        let client_tls = env.tls("client", CLIENT_ID, None).expect("tls");
        let text = env.client_config_text(Mode::ConnectorDialsOut, &client_tls);
        // No route to the API server in the file: only one configured route
        // (which a learned one may not override), and where learning may happen.
        let (head, _) = text.split_once("routes:\n").expect("routes section");
        let peer = format!("identity: '{CONNECTOR_ID}' }}");
        assert!(head.contains(&peer), "{head}");
        let learn = format!("identity: '{CONNECTOR_ID}', learn: ['198.51.100.0/24', '2001:db8::/64'] }}");
        let yaml = format!(
            "{}routes:\n  - {{ cidr: '198.51.100.102/32', via: {PEER} }}\n",
            head.replace(&peer, &learn)
        );
        let client = env
            .topo
            .start_agent(dataplane::config::Config::parse(&yaml).expect("client config"))
            .expect("client");
        assert_eq!(client.handle.route_entries(), (1, 0), "only the configured route before any connector");

        let connector_tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
        let connector_yaml = env.connector_config_text(Mode::ConnectorDialsOut, &connector_tls);
        assert!(connector_yaml.contains("shutdown_grace: 1s"), "{connector_yaml}");
        // A grace long enough to watch a draining replica.
        let connector_yaml = connector_yaml.replace("shutdown_grace: 1s", "shutdown_grace: 20s");
        let replica = |n: u16| {
            // Each replica its own node name: it keys the stateless-reset secret.
            let yaml = connector_yaml.replace("node: connector-1", &format!("node: connector-{n}"));
            AgentProcess::start_with_env(
                &env.topo.remote,
                &format!("connector-{n}"),
                &yaml,
                addr(&format!("10.201.0.2:{}", 9478 + n)),
                env.dir(),
                &[("DATAPLANE_LOG", "info")],
            )
            .expect("connector")
        };
        let (a, b) = (replica(1), replica(2));
        let tunnel = client.handle.tunnel().expect("tunnel").clone();
        let api: ipnet::IpNet = API_NET.parse().expect("net");
        wait_for("both replicas advertise to the client", tests::scaled(Duration::from_secs(15)), || {
            tunnel.advertisers(&api).0 == 4 && client.handle.routes_follow_peers()
        });
        assert_eq!(client.handle.route_entries(), (2, 2), "learned 198.51.100.101, 2001:db8::101 and ::102");
        Fleet { client, a, b }
    }
}

/// Streams a replica served.
fn served(replica: &AgentProcess) -> f64 {
    replica.metric(STREAMS_OK).expect("metric")
}

/// A replica killed without a word (SIGKILL: no CONNECTION_CLOSE, and its
/// socket gone, so nothing answers) while a pod opens a new flow every
/// 50 ms: no flow fails, none waits a second, and the flows that were sent
/// to the dead replica fail over to the survivor (counted).
#[test]
fn a_replica_killed_silently_costs_no_flow() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let Fleet { client, a, b } = Fleet::start(&env);
    let ticker = env.topo.pod_probe().tick(addr(OTHER_V4), 50).expect("ticker");
    wait_for("flows on both replicas", tests::scaled(Duration::from_secs(10)), || {
        served(&a) >= 2.0 && served(&b) >= 2.0
    });
    let killed_at = std::time::SystemTime::now();
    a.kill();
    let b_then = served(&b);
    // Twenty flows on the survivor after the kill, the first of them
    // sent to the dead replica before it was suspected.
    wait_for("new flows on the survivor", tests::scaled(Duration::from_secs(10)), || {
        served(&b) >= b_then + 20.0
    });
    let ticks = ticker.finish().expect("ticks");
    let failovers = client.handle.flow_stats();
    let moved = client.handle.encode_metrics();
    eprintln!(
        "replica SIGKILL under a flow every 50 ms: {} ok, {} refused, {} failed, {} broken; slowest flow {:.0} ms; \
         failovers {:?}; flows {failovers:?}",
        ticks.ok,
        ticks.refused,
        ticks.failed,
        ticks.broken,
        ticks.slowest_ok_us / 1e3,
        tests::metric_sample(&moved, "dataplane_flow_failovers_total"),
    );
    let killed_ms = killed_at.duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    ticks.assert_no_late_failure("replica", killed_ms);
    assert!(tests::metric_sample(&moved, "dataplane_flow_failovers_total").unwrap_or(0.0) >= 1.0, "{moved}");
    client.stop();
}

/// SIGTERM of the replica carrying a 256 MiB transfer: the transfer ends
/// byte-exact within the replica's grace, while new flows go to the other.
#[test]
fn a_draining_replica_finishes_its_transfer_and_takes_no_new_flow() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let Fleet { client, a, b } = Fleet::start(&env);
    let probe = env.topo.pod_probe();
    let transfer = std::thread::spawn(move || probe.bulk(addr(OTHER_V4), tests::bulk_bytes()));
    let key = r#"dataplane_connector_peer_streams{peer="worker-1"}"#;
    wait_for("the transfer on a replica", tests::scaled(Duration::from_secs(10)), || {
        a.metric(key).is_ok_and(|n| n >= 1.0) || b.metric(key).is_ok_and(|n| n >= 1.0)
    });
    let (busy, other) = if a.metric(key).is_ok_and(|n| n >= 1.0) { (a, b) } else { (b, a) };
    let busy_before = served(&busy);
    busy.terminate();
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let api: ipnet::IpNet = API_NET.parse().expect("net");
    wait_for("the client hears the replica drain", tests::scaled(Duration::from_secs(5)), || {
        tunnel.advertisers(&api).1 == 2
    });
    let other_before = served(&other);
    let probes = env.topo.pod_probe().repeat(addr(OTHER_V4), 10).expect("probes");
    assert_eq!((probes.ok, probes.failed), (10, 0), "{probes:?}");
    assert_eq!(served(&other), other_before + 10.0, "every new flow on the serving replica");
    assert_eq!(served(&busy), busy_before, "none on the draining one");
    let bulk = transfer.join().expect("thread").expect("bulk");
    assert!(bulk.ok && bulk.echo_intact && bulk.received == tests::bulk_bytes(), "{bulk:?}");
    eprintln!(
        "{} MiB through a draining replica in {:.2} s, byte-exact",
        tests::bulk_bytes() >> 20,
        bulk.secs
    );
    busy.wait_exit(tests::scaled(Duration::from_secs(20))).expect("the drained replica exits");
    client.stop();
}

#[test]
fn connectors_advertise_routes_that_clients_steer_spread_drain_and_withdraw() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let Fleet { client, a, b } = Fleet::start(&env);
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let api: ipnet::IpNet = API_NET.parse().expect("net");
    let status = client.handle.status();
    let route = |cidr: &str| status.routes.iter().find(|r| r.cidr == cidr).cloned().expect(cidr);
    let learned = route("198.51.100.101/32");
    assert_eq!(
        (learned.source.as_str(), learned.via.as_str(), learned.ready),
        ("learned", "advertised", true)
    );
    assert_eq!(learned.advertisers, [PEER]);
    assert_eq!(route("198.51.100.102/32").source, "config", "the configured route wins");
    assert!(
        status
            .refused_routes
            .iter()
            .any(|r| r.what == "198.51.100.102/32" && r.reason.contains("configured")),
        "{:?}",
        status.refused_routes
    );
    let metrics = client.handle.encode_metrics();
    assert!(
        metrics.contains(
            r#"dataplane_route_ready{route="198.51.100.101/32",via="advertised",source="learned"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"dataplane_route_advertisers{route="198.51.100.101/32"} 4"#), "{metrics}");
    assert!(metrics.contains("dataplane_learned_routes_refused 1"), "{metrics}");

    // The real kubectl through a route no client config names.
    kubectl_works(&env);

    // New flows spread over the replicas.
    let before = (served(&a), served(&b));
    let probes = env.topo.pod_probe().repeat(addr(OTHER_V4), 20).expect("probes");
    assert_eq!((probes.ok, probes.failed), (20, 0), "{probes:?}");
    let spread =
        (a.metric(STREAMS_OK).expect("metric") - before.0, b.metric(STREAMS_OK).expect("metric") - before.1);
    assert!(spread.0 >= 5.0 && spread.1 >= 5.0, "20 flows over two replicas: {spread:?}");

    // Flows held open, one per connection, keep replica a in its grace
    // period once it drains.
    let total = served(&a) + served(&b);
    let held = env.topo.pod_probe().hold(addr(OTHER_V4), 4).expect("held flows");
    wait_for("the held flows dialled", tests::scaled(Duration::from_secs(5)), || {
        served(&a) + served(&b) == total + 4.0
    });
    assert!(
        a.metric(r#"dataplane_connector_peer_streams{peer="worker-1"}"#).expect("metric") >= 1.0,
        "one held flow per connection: connector-1 serves some"
    );
    let a_before = served(&a);
    a.terminate();
    wait_for("the client hears connector-1 drain", tests::scaled(Duration::from_secs(5)), || {
        tunnel.advertisers(&api).1 == 2
    });
    let probes = env.topo.pod_probe().repeat(addr(OTHER_V4), 10).expect("probes");
    assert_eq!((probes.ok, probes.failed), (10, 0), "new flows while a replica drains: {probes:?}");
    assert_eq!(
        a.metric(STREAMS_OK).expect("draining replica still up"),
        a_before,
        "no new flow to the draining replica"
    );
    drop(held);
    a.wait_exit(tests::scaled(Duration::from_secs(20))).expect("connector-1 exits once its flows end");
    wait_for("connector-1's connections gone", tests::scaled(Duration::from_secs(5)), || {
        tunnel.advertisers(&api) == (2, 0)
    });
    assert_eq!(client.handle.route_entries(), (2, 2), "connector-2 still advertises the routes");
    kubectl_works(&env);

    // The last advertiser dies without a word: the learned routes go with
    // its connections (at the idle timeout), the configured one stays.
    b.kill();
    wait_for("learned routes withdrawn", tests::scaled(Duration::from_secs(15)), || {
        client.handle.route_entries() == (1, 0) && client.handle.routes_follow_peers()
    });
    let status = client.handle.status();
    assert_eq!(status.routes.len(), 1, "{:?}", status.routes);
    assert!(status.refused_routes.is_empty(), "{:?}", status.refused_routes);
    client.stop();
}
