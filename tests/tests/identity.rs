//! Identities by pattern and per-identity policy, end to end: client nodes
//! that no config names join a connector through one `peers` pattern, and
//! the connector's policy decides per exact identity what each may reach.

use std::time::Duration;

use tests::{
    agent_process::AgentProcess,
    require_root,
    topology::{OTHER_V4, addr},
    tunnel_env::{
        CLIENT_ID, CONNECTIONS, CONNECTOR_ID, Mode, TunnelEnv, ensure_connections, kubectl_works,
        output_text as text,
    },
};

/// A fleet's nodes in one `peers` entry: the connector admits client nodes
/// by pattern, so a node it has never heard of joins with no config change,
/// each connection is bound to the node's exact identity, and the policy
/// grants destinations per identity. A flow no rule grants is refused at
/// once (`denied`), counted, and audited with both identities; the real
/// kubectl works for the nodes the policy allows.
#[test]
fn nodes_join_by_pattern_and_the_policy_decides_per_identity() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let exact = format!("  - {{ name: worker-1, identity: '{CLIENT_ID}' }}\n");
    let yaml = env.connector_config_text(Mode::ConnectorListens, &tls);
    assert!(yaml.contains(&exact), "{yaml}");
    let yaml = yaml.replace(&exact, "  - { name: nodes, identity: 'spiffe://dataplane.test/node/*' }\n")
        + "policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
           - { cidr: 198.51.100.101/32, ports: [6443] }\n      - { cidr: '2001:db8::101/128', ports: [6443] }\n";
    let connector = AgentProcess::start_with_env(
        &env.topo.remote,
        "connector",
        &yaml,
        addr("10.201.0.2:9479"),
        env.dir(),
        &[("DATAPLANE_LOG", "info")],
    )
    .expect("connector");
    let intruder = "spiffe://dataplane.test/node/intruder-1";
    for (name, identity, granted) in [
        ("worker-1", CLIENT_ID, true),
        // Never named anywhere: admitted by the pattern, granted by the rule.
        ("worker-2", "spiffe://dataplane.test/node/worker-2", true),
        // The same pattern admits it; no rule grants it anything.
        ("intruder", intruder, false),
    ] {
        let tls = env.tls(name, identity, None).expect("tls");
        let client = env.topo.start_agent(env.client_config(Mode::ConnectorListens, &tls)).expect("client");
        ensure_connections(&client.handle, CONNECTIONS, Duration::from_secs(10))
            .expect("admitted by the pattern");
        if granted {
            kubectl_works(&env);
            // Served by the connector, but not granted by the rule.
            let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
            assert!(a.was_reset(), "{name}: {a:?}");
        } else {
            let a = env.topo.pod_probe().connect(addr("198.51.100.101:6443")).expect("probe");
            assert!(a.was_reset(), "{name}: {a:?}");
            assert!(a.elapsed_us < tests::fast_us(500_000), "refused fast, took {} us", a.elapsed_us);
            let v = env.kubectl(&["version"]).expect("kubectl runs");
            assert!(!v.status.success(), "the intruder's kubectl must fail: {}", text(&v));
        }
        assert!(client.handle.flow_stats().refused_by_peer >= 1);
        client.stop();
    }
    let refused =
        connector.metric(r#"dataplane_connector_refusals_total{reason="not_allowed"}"#).expect("metric");
    // One probe per worker, the intruder's probe and its kubectl's attempts.
    assert!(refused >= 4.0, "{refused}");
    assert!(connector.metric(r#"dataplane_connector_streams_total{status="ok"}"#).expect("metric") >= 4.0);
    let log = std::fs::read_to_string(&connector.log).expect("connector log");
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("flow denied")).collect();
    let says = |who: &str, dst: &str| {
        audit.iter().any(|l| {
            l.contains(&format!("client={who}"))
                && l.contains(&format!("connector={CONNECTOR_ID}"))
                && l.contains(&format!("dst={dst}"))
                && l.contains("not_allowed")
        })
    };
    assert!(says(intruder, "198.51.100.101:6443"), "{audit:#?}");
    assert!(says(CLIENT_ID, OTHER_V4), "{audit:#?}");
    // Each connection is bound to the exact identity it presented.
    for id in [CLIENT_ID, "spiffe://dataplane.test/node/worker-2", intruder] {
        assert!(
            log.lines().any(|l| l.contains("tunnel connection up") && l.contains(&format!("identity={id}"))),
            "{id}: {log}"
        );
    }
}

/// `peers` reloads without a restart, as a fleet grows and shrinks: the
/// connector starts with one exact entry; a second node's dials are
/// refused until a reload adds a pattern that admits it, while the first
/// node's connections stay up and a loop of its flows never fails. A
/// reload that drops the exact entry moves the first node's connections
/// to the pattern (closed, redialled, matched again), where the reloaded
/// policy decides what it reaches; one that drops the pattern closes the
/// second node's connections and refuses its redials. A reload that also
/// changes a restart-only field changes nothing. On the dialling side, a
/// changed entry is redialled with its new connection count.
#[test]
fn peers_reload_without_a_restart() {
    if !require_root() {
        return;
    }
    use dataplane::config::Config;
    use tests::{metric_sample, tunnel_env::PEER};
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents");
    let tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let base = env.connector_config_text(Mode::ConnectorListens, &tls);
    let exact = format!("  - {{ name: worker-1, identity: '{CLIENT_ID}' }}\n");
    assert!(base.contains(&exact), "{base}");
    let pattern = "  - { name: nodes, identity: 'spiffe://dataplane.test/node/*' }\n";
    let reload = |text: &str| connector.handle.reload(Config::parse(text).expect("valid config"));
    let connector_tunnel = connector.handle.tunnel().expect("tunnel").clone();
    let unknown = || {
        metric_sample(
            &connector.handle.encode_metrics(),
            r#"dataplane_tunnel_handshake_failures_total{reason="unknown_identity"}"#,
        )
        .unwrap_or(0.0)
    };
    let dials = |agent: &tests::topology::RunningAgent| {
        metric_sample(
            &agent.handle.encode_metrics(),
            &format!(r#"dataplane_tunnel_connections_opened_total{{peer="{PEER}",direction="dialed"}}"#),
        )
        .unwrap_or(0.0)
    };
    let client_dials = || dials(&client);
    let within = Duration::from_secs(15 * tests::time_scale());

    // A second node: refused for now. Its agent runs beside the connector
    // (the node namespace holds worker-1's redirect interface), steering a
    // cgroup of its own.
    let worker2_tls = env.tls("worker-2", "spiffe://dataplane.test/node/worker-2", None).expect("tls");
    let worker2_cgroup = tests::Cgroup::new("peers-reload-worker-2").expect("cgroup");
    let worker2_text = format!(
        "node: worker-2\nadmin: null\nsteering: {{ cgroup: {}, pin_dir: null }}\n{}tunnel: {{ {} }}\n\
         peers:\n  - {{ name: {PEER}, dial: ['10.201.0.2:4433'], identity: '{CONNECTOR_ID}' }}\n\
         routes:\n  - {{ cidr: 198.51.100.101/32, via: {PEER} }}\n",
        worker2_cgroup.path.display(),
        TunnelEnv::tls_yaml(&worker2_tls),
        TunnelEnv::tunnel_timers()
    );
    let worker2 =
        tests::topology::RunningAgent::start(&env.topo.remote, Config::parse(&worker2_text).expect("valid"))
            .expect("worker-2");
    let worker2_tunnel = worker2.handle.tunnel().expect("tunnel").clone();
    tests::wait_for("worker-2 is refused", within, || unknown() >= 1.0);
    assert_eq!(worker2_tunnel.live_connections(PEER), 0);

    // The pattern joins it, under a loop of worker-1's flows.
    let dials_before = client_dials();
    assert_eq!(dials_before, CONNECTIONS as f64);
    let load = env.topo.pod_probe().spawn_repeat(addr(OTHER_V4), 200).expect("flows");
    let grown = base.replace(&exact, &format!("{exact}{pattern}"));
    reload(&grown).expect("adding a pattern applies");
    ensure_connections(&worker2.handle, CONNECTIONS, within).expect("worker-2 joins without a restart");
    let summary = tests::probe::wait_summary(load).expect("flows");
    assert_eq!(summary.failed, 0, "no flow of worker-1 failed: {:?}", summary.first_error);
    assert_eq!(client_dials(), dials_before, "worker-1's connections were not touched");
    assert_eq!(connector_tunnel.live_connections("worker-1"), CONNECTIONS);
    assert_eq!(connector_tunnel.live_connections("nodes"), CONNECTIONS);

    // Without its exact entry, worker-1 is matched by the pattern, and the
    // reloaded policy decides: the API server only.
    let policy = "policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
                  - { cidr: 198.51.100.101/32, ports: [6443] }\n      - { cidr: '2001:db8::101/128', ports: [6443] }\n";
    let shrunk = base.replace(&exact, pattern) + policy;
    reload(&shrunk).expect("dropping the exact entry applies");
    let worker2_dials = dials(&worker2);
    assert_eq!(connector_tunnel.peer_names(), ["nodes".into()]);
    tests::wait_for("worker-1 moves to the pattern", within, || {
        connector_tunnel.live_connections("nodes") == 2 * CONNECTIONS
    });
    ensure_connections(&client.handle, CONNECTIONS, within).expect("worker-1 redialled");
    tests::wait_for("worker-1 redialled under the pattern", within, || {
        client_dials() >= dials_before + CONNECTIONS as f64
    });
    assert_eq!(dials(&worker2), worker2_dials, "worker-2's connections were not touched");
    kubectl_works(&env);
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.was_reset(), "no rule grants {OTHER_V4} any more: {a:?}");

    // The exact entry back, beside the unchanged pattern: worker-1's
    // connections, accepted under the pattern, are moved to it (closed and
    // redialled); worker-2's stay where they are.
    let client_before = client_dials();
    reload(&(grown.clone() + policy)).expect("adding the exact entry back applies");
    tests::wait_for("worker-1 moves to its exact entry", within, || {
        connector_tunnel.live_connections("worker-1") == CONNECTIONS
            && connector_tunnel.live_connections("nodes") == CONNECTIONS
    });
    tests::wait_for("worker-1 redialled", within, || client_dials() >= client_before + CONNECTIONS as f64);
    assert_eq!(dials(&worker2), worker2_dials, "worker-2's connections were not touched");

    // Without the pattern, worker-2 is out: closed, and refused again.
    let refused_before = unknown();
    let only_exact = base.clone();
    reload(&only_exact).expect("dropping the pattern applies");
    tests::wait_for("worker-2 is closed and refused", within, || {
        worker2_tunnel.live_connections(PEER) == 0 && unknown() > refused_before
    });
    ensure_connections(&client.handle, CONNECTIONS, within).expect("worker-1 back on its exact entry");
    assert_eq!(connector_tunnel.live_connections("worker-1"), CONNECTIONS);
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.ok, "the exact entry reaches all that is served again: {a:?}");

    // Peers and a restart-only field at once: refused whole.
    let e = reload(&grown.replace("node: connector-1", "node: connector-2")).expect_err("restart-only");
    assert!(e.to_string().contains("node") && !e.to_string().contains("peers"), "{e}");
    assert_eq!(connector_tunnel.peer_names(), ["worker-1".into()], "the refused reload changed no peer");

    // The dialling side: a changed entry is redialled with its new count.
    let dir = env.dir().join("client");
    let client_tls = tests::tunnel_env::TlsPaths {
        ca: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    let text = env.client_config_text(Mode::ConnectorListens, &client_tls);
    let dial = "dial: ['10.201.0.2:4433'], ";
    assert!(text.contains(dial), "{text}");
    let three = text.replace(dial, &format!("{dial}connections: 3, "));
    client.handle.reload(Config::parse(&three).expect("valid")).expect("a changed peer entry applies");
    ensure_connections(&client.handle, 3, within).expect("three connections");
    tests::wait_for("the old connections are gone", within, || {
        connector_tunnel.live_connections("worker-1") == 3
    });
    kubectl_works(&env);
    let scrape = connector.handle.encode_metrics();
    assert_eq!(metric_sample(&scrape, r#"dataplane_config_reloads_total{result="applied"}"#), Some(4.0));
    assert_eq!(metric_sample(&scrape, r#"dataplane_config_reloads_total{result="refused"}"#), Some(1.0));
}
