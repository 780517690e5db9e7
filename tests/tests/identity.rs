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
