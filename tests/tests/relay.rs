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

/// Relay 1's identity and address. The relays listen on the node side of
/// the link: the client dials them there, the connector from the private
/// network.
const RELAY_ID: &str = "spiffe://dataplane.test/relay/dmz-1";
const RELAY_AT: &str = "10.201.0.1:4434";
const LEARN: &str = "learn: ['198.51.100.0/24', '2001:db8::/64']";

#[test]
fn a_relay_joins_a_client_and_a_connector_that_both_only_dial_out() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let relay = spawn_relay(&env, 1);
    assert!(!relay.is_ready(), "no connector yet: nothing to forward for");

    // The connector dials the relay and trusts its attestations; its own
    // policy grants the workers the API server only (not 198.51.100.102).
    let connector = spawn_connector(&env, &[1], false);
    wait_for("the relay ready: a connector advertises", tests::scaled(Duration::from_secs(15)), || {
        relay.is_ready()
    });

    // The client dials the relay, learns the routes from it, and steers
    // them: no route in its file, no listener.
    let yaml = client_yaml(&env, &[1]);
    let client = env
        .topo
        .start_agent(dataplane::config::Config::parse(&yaml).expect("client config"))
        .expect("client");
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let api: ipnet::IpNet = "198.51.100.101/32".parse().expect("net");
    wait_for("the client learns the routes from the relay", tests::scaled(Duration::from_secs(15)), || {
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
            && l.contains("peer=relay-1")
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
    connector.wait_exit(tests::scaled(Duration::from_secs(10))).expect("connector exits");
    wait_for("the relay unready", tests::scaled(Duration::from_secs(10)), || !relay.is_ready());
    wait_for("the client's learned routes gone", tests::scaled(Duration::from_secs(10)), || {
        client.handle.route_entries() == (0, 0) && client.handle.routes_follow_peers()
    });
    client.stop();
}

/// The relay's identity, address and admin address for relay `n`.
fn relay_id(n: u16) -> String {
    format!("spiffe://dataplane.test/relay/dmz-{n}")
}
fn relay_at(n: u16) -> String {
    format!("10.201.0.1:{}", 4433 + n)
}

/// Relay `n`: admits every node, learns from the connector, grants the
/// workers the API server and 198.51.100.102.
fn relay_yaml(env: &TunnelEnv, n: u16) -> String {
    let tls = TunnelEnv::tls_yaml(&env.tls(&format!("relay-{n}"), &relay_id(n), None).expect("tls"));
    format!(
        "node: relay-{n}\n{tls}tunnel: {{ listen: '{}', {} }}\nrelay: {{}}\npeers:\n  \
         - {{ name: nodes, identity: 'spiffe://dataplane.test/node/*' }}\n  \
         - {{ name: {PEER}, identity: '{CONNECTOR_ID}', {LEARN} }}\n\
         policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
         - {{ cidr: 198.51.100.101/32, ports: [6443] }}\n      - {{ cidr: '2001:db8::101/128', ports: [6443] }}\n      \
         - {{ cidr: 198.51.100.102/32, ports: [6443] }}\n",
        relay_at(n),
        TunnelEnv::tunnel_timers(),
    )
}

/// The connector, dialling every relay in `relays` and trusting their
/// attestations; its own policy grants the workers the API server, and
/// 198.51.100.102 too if `other`.
fn connector_yaml(env: &TunnelEnv, relays: &[u16], other: bool) -> String {
    let connector_tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let yaml = env.connector_config_text(Mode::ConnectorDialsOut, &connector_tls);
    let direct_peer =
        format!("  - {{ name: worker-1, dial: ['10.201.0.1:4433'], identity: '{CLIENT_ID}' }}\n");
    assert!(yaml.contains(&direct_peer), "{yaml}");
    let peers: String = relays
        .iter()
        .map(|&n| {
            format!(
                "  - {{ name: relay-{n}, dial: ['{}'], identity: '{}', relay: true }}\n",
                relay_at(n),
                relay_id(n)
            )
        })
        .collect();
    let other = if other { "      - { cidr: 198.51.100.102/32, ports: [6443] }\n" } else { "" };
    yaml.replace(&direct_peer, &peers)
        + "policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    to:\n      \
           - { cidr: 198.51.100.101/32, ports: [6443] }\n      - { cidr: '2001:db8::101/128', ports: [6443] }\n"
        + other
}

/// The client, dialling every relay in `relays` and learning from each:
/// no route in its file, no listener.
fn client_yaml(env: &TunnelEnv, relays: &[u16]) -> String {
    let client_tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let text = env.client_config_text(Mode::ConnectorListens, &client_tls);
    let (head, _) = text.split_once("routes:\n").expect("routes section");
    let to_connector =
        format!("  - {{ name: {PEER}, dial: ['10.201.0.2:4433'], identity: '{CONNECTOR_ID}' }}\n");
    assert!(head.contains(&to_connector), "{head}");
    let peers: String = relays
        .iter()
        .map(|&n| {
            format!(
                "  - {{ name: relay-{n}, dial: ['{}'], identity: '{}', {LEARN} }}\n",
                relay_at(n),
                relay_id(n)
            )
        })
        .collect();
    head.replace(&to_connector, &peers)
}

fn spawn_relay(env: &TunnelEnv, n: u16) -> AgentProcess {
    AgentProcess::spawn(
        &env.topo.node,
        &format!("relay-{n}"),
        &relay_yaml(env, n),
        addr(&format!("10.201.0.1:{}", 9480 + n)),
        env.dir(),
        &[("DATAPLANE_LOG", "info")],
    )
    .expect("relay")
}

fn spawn_connector(env: &TunnelEnv, relays: &[u16], other: bool) -> AgentProcess {
    AgentProcess::spawn(
        &env.topo.remote,
        "connector",
        &connector_yaml(env, relays, other),
        addr("10.201.0.2:9479"),
        env.dir(),
        &[("DATAPLANE_LOG", "info")],
    )
    .expect("connector")
}

/// Two relays, each with a connection from the connector and the client;
/// one SIGKILLed while a pod opens a new flow every 50 ms: no flow fails
/// and none takes a second, the client's routes stay (the other relay
/// still advertises them), and the survivor carries the new flows.
#[test]
fn a_relay_killed_silently_costs_no_flow() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (r1, r2) = (spawn_relay(&env, 1), spawn_relay(&env, 2));
    let _connector = spawn_connector(&env, &[1, 2], true);
    wait_for("both relays ready", tests::scaled(Duration::from_secs(15)), || r1.is_ready() && r2.is_ready());
    let client = env
        .topo
        .start_agent(dataplane::config::Config::parse(&client_yaml(&env, &[1, 2])).expect("client config"))
        .expect("client");
    let tunnel = client.handle.tunnel().expect("tunnel").clone();
    let net: ipnet::IpNet = "198.51.100.102/32".parse().expect("net");
    wait_for("both relays advertise to the client", tests::scaled(Duration::from_secs(15)), || {
        tunnel.advertisers(&net).0 == 4 && client.handle.routes_follow_peers()
    });
    let ok = |r: &AgentProcess| {
        r.metric(r#"dataplane_relay_streams_total{route="198.51.100.102/32",result="ok"}"#).unwrap_or(0.0)
    };
    let ticker = env.topo.pod_probe().tick(addr(OTHER_V4), 50).expect("ticker");
    wait_for("ticks through both relays", tests::scaled(Duration::from_secs(10)), || {
        ok(&r1) >= 2.0 && ok(&r2) >= 2.0
    });
    let killed_at = std::time::SystemTime::now();
    r1.kill();
    let then = ok(&r2);
    wait_for("new flows through the survivor", tests::scaled(Duration::from_secs(10)), || {
        ok(&r2) >= then + 20.0
    });
    let ticks = ticker.finish().expect("ticks");
    let metrics = client.handle.encode_metrics();
    eprintln!(
        "relay SIGKILL under a flow every 50 ms: {} ok, {} refused, {} failed, {} broken; slowest {:.0} ms; failovers {:?}",
        ticks.ok,
        ticks.refused,
        ticks.failed,
        ticks.broken,
        ticks.slowest_ok_us / 1e3,
        tests::metric_sample(&metrics, "dataplane_flow_failovers_total"),
    );
    let killed_ms = killed_at.duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    ticks.assert_no_late_failure("relay", killed_ms);
    assert_eq!(client.handle.route_entries(), (2, 1), "the routes stay with one relay up");
    client.stop();
}
