//! The relay, end to end: a client agent and a connector that both only
//! dial out meet at a relay, which forwards the client's flows to the
//! connector stream to stream (the API server's TLS end to end), checks its
//! own policy first and attests the client's exact identity, which the
//! connector's policy and audit lines then go by.

use std::time::Duration;

use tests::{
    agent_process::AgentProcess,
    evil::{self, Attack},
    require_root,
    topology::{API_V4, OTHER_V4, addr},
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, PEER, TunnelEnv, kubectl_works},
    wait_for,
};

const RELAY_ID: &str = "spiffe://dataplane.test/relay/dmz-1";
/// The relay listens on the node side of the link: the client dials it
/// there, the connector from the private network.
const RELAY_AT: &str = "10.201.0.1:4434";
const LEARN: &str = "learn: ['198.51.100.0/24', '2001:db8::/64']";

#[test]
fn a_relay_joins_a_client_and_a_connector_that_both_only_dial_out() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let tls = |name: &str, id: &str| TunnelEnv::tls_yaml(&env.tls(name, id, None).expect("tls"));
    let relay_yaml = format!(
        "node: relay-1\n{}tunnel: {{ listen: '{RELAY_AT}', {} }}\nrelay: {{}}\npeers:\n  \
         - {{ name: nodes, identity: 'spiffe://dataplane.test/node/*' }}\n  \
         - {{ name: {PEER}, identity: '{CONNECTOR_ID}', {LEARN} }}\n\
         policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
         - {{ cidr: 198.51.100.101/32, ports: [6443] }}\n      - {{ cidr: '2001:db8::101/128', ports: [6443] }}\n      \
         - {{ cidr: 198.51.100.102/32, ports: [6443] }}\n",
        tls("relay", RELAY_ID),
        TunnelEnv::tunnel_timers(),
    );
    let relay = AgentProcess::spawn(
        &env.topo.node,
        "relay",
        &relay_yaml,
        addr("10.201.0.1:9481"),
        env.dir(),
        &[("DATAPLANE_LOG", "info")],
    )
    .expect("relay");
    assert!(!relay.is_ready(), "no connector yet: nothing to forward for");

    // The connector dials the relay and trusts its attestations; its own
    // policy grants the workers the API server only (not 198.51.100.102).
    let connector_tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let yaml = env.connector_config_text(Mode::ConnectorDialsOut, &connector_tls);
    let direct_peer =
        format!("  - {{ name: worker-1, dial: ['10.201.0.1:4433'], identity: '{CLIENT_ID}' }}\n");
    assert!(yaml.contains(&direct_peer), "{yaml}");
    let yaml = yaml.replace(
        &direct_peer,
        &format!("  - {{ name: relay, dial: ['{RELAY_AT}'], identity: '{RELAY_ID}', relay: true }}\n"),
    ) + "policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
         - { cidr: 198.51.100.101/32, ports: [6443] }\n      - { cidr: '2001:db8::101/128', ports: [6443] }\n";
    let connector = AgentProcess::spawn(
        &env.topo.remote,
        "connector",
        &yaml,
        addr("10.201.0.2:9479"),
        env.dir(),
        &[("DATAPLANE_LOG", "info")],
    )
    .expect("connector");
    wait_for("the relay ready: a connector advertises", Duration::from_secs(15), || relay.is_ready());

    // The client dials the relay, learns the routes from it, and steers
    // them: no route in its file, no listener.
    let client_tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let text = env.client_config_text(Mode::ConnectorListens, &client_tls);
    let (head, _) = text.split_once("routes:\n").expect("routes section");
    let to_connector = format!("{{ name: {PEER}, dial: ['10.201.0.2:4433'], identity: '{CONNECTOR_ID}' }}");
    assert!(head.contains(&to_connector), "{head}");
    let yaml = head.replace(
        &to_connector,
        &format!("{{ name: relay, dial: ['{RELAY_AT}'], identity: '{RELAY_ID}', {LEARN} }}"),
    );
    let client = env
        .topo
        .start_agent(dataplane::config::Config::parse(&yaml).expect("client config"))
        .expect("client");
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let api: ipnet::IpNet = "198.51.100.101/32".parse().expect("net");
    wait_for("the client learns the routes from the relay", Duration::from_secs(15), || {
        tunnel.advertisers(&api).0 >= 1 && client.handle.routes_follow_peers()
    });
    // What the relay's policy grants the workers and the connector serves.
    assert_eq!(client.handle.route_entries(), (2, 1), "198.51.100.101, .102 and 2001:db8::101");
    kubectl_works(&env);
    let ok = relay
        .metric(r#"dataplane_relay_streams_total{route="198.51.100.101/32",result="ok"}"#)
        .expect("metric");
    assert!(ok >= 2.0, "kubectl's flows went through the relay: {ok}");

    // The relay grants .102 to the workers, the connector does not: the
    // connector refuses it by the attested identity, and says whose it was.
    let a = env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe");
    assert!(a.was_reset(), "{a:?}");
    let log = std::fs::read_to_string(&connector.log).expect("connector log");
    assert!(
        log.lines().any(|l| l.contains("flow denied")
            && l.contains(&format!("client={CLIENT_ID}"))
            && l.contains("peer=relay")
            && l.contains("dst=198.51.100.102:6443")),
        "{log}"
    );

    // An identity the relay's own policy does not grant: refused at the
    // relay, before any connector sees it, counted and audited.
    let intruder = "spiffe://dataplane.test/node/intruder-1";
    let evil_tls = env.tls("intruder", intruder, None).expect("tls");
    let report = evil::run(
        &env.topo.node.path(),
        &evil_tls,
        &Attack::dial_once(addr(RELAY_AT), RELAY_ID, Some(addr(API_V4))),
    )
    .expect("intruder");
    assert_eq!(report.streams.count("denied"), 1, "{report:?}");
    assert!(relay.metric(r#"dataplane_relay_refusals_total{reason="not_allowed"}"#).expect("metric") >= 1.0);
    let log = std::fs::read_to_string(&relay.log).expect("relay log");
    assert!(
        log.lines().any(|l| l.contains("flow denied")
            && l.contains(&format!("client={intruder}"))
            && l.contains(&format!("relay={RELAY_ID}"))),
        "{log}"
    );

    // The connector goes: the relay has nothing to forward for, and the
    // client's learned routes are withdrawn.
    connector.terminate();
    connector.wait_exit(Duration::from_secs(10)).expect("connector exits");
    wait_for("the relay unready", Duration::from_secs(10), || !relay.is_ready());
    wait_for("the client's learned routes gone", Duration::from_secs(10), || {
        client.handle.route_entries() == (0, 0) && client.handle.routes_follow_peers()
    });
    client.stop();
}
