//! What operators see: a real scrape of in-process agents, counters that move
//! with real flows, /ready that means "can serve", /healthz, and the status
//! view.

use std::{net::SocketAddr, time::Duration};

use dataplane::admin::client as status;
use tests::{
    Netns, metric_sample, require_root,
    topology::{OTHER_V4, addr},
    tunnel_env::{Mode, PEER, TunnelEnv, UNSERVED_V4},
    wait_for,
};

const ADMIN: &str = "127.0.0.1:9464";

/// GET from the admin API inside the agent's namespace.
fn get(ns: &Netns, path: &'static str) -> (u16, String) {
    let a: SocketAddr = ADMIN.parse().expect("addr");
    ns.run(move || status::get(a, path)).expect("thread").expect("admin answers")
}

#[test]
fn scrapes_show_flows_tunnel_connector_ebpf_and_process() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents start");
    let pod = env.topo.pod_probe();
    for _ in 0..3 {
        assert!(pod.connect(addr(OTHER_V4)).expect("probe").ok);
    }
    assert!(pod.connect(addr(UNSERVED_V4)).expect("probe").was_reset());
    tests::wait_flows_settled(&client.handle);

    let (code, text) = get(&env.topo.node, "/metrics");
    assert_eq!(code, 200);
    let route = r#"route="198.51.100.102/32""#;
    assert_eq!(
        metric_sample(&text, &format!("dataplane_flows_opened_total{{{route}}}")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_sample(&text, &format!(r#"dataplane_flows_closed_total{{{route},result="completed"}}"#)),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(
            &text,
            r#"dataplane_flows_closed_total{route="198.51.100.103/32",result="refused_by_peer"}"#
        ),
        Some(1.0)
    );
    assert_eq!(metric_sample(&text, "dataplane_flows_active"), Some(0.0));
    let payload = "hello through the dataplane".len() as f64;
    assert_eq!(
        metric_sample(&text, &format!(r#"dataplane_flow_bytes_total{{{route},direction="up"}}"#)),
        Some(3.0 * payload)
    );
    assert_eq!(
        metric_sample(&text, r#"dataplane_flow_setup_duration_seconds_count{upstream="tunnel"}"#),
        Some(3.0)
    );
    assert_eq!(
        metric_sample(&text, r#"dataplane_ebpf_events_total{hook="connect",reason="redirected"}"#),
        Some(4.0)
    );
    assert_eq!(metric_sample(&text, r#"dataplane_route_map_entries{family="ipv4"}"#), Some(3.0));
    assert_eq!(metric_sample(&text, "dataplane_steering_attached"), Some(1.0));
    assert_eq!(
        metric_sample(&text, &format!(r#"dataplane_tunnel_connections{{peer="{PEER}",state="up"}}"#)),
        Some(2.0)
    );
    assert_eq!(
        metric_sample(&text, &format!(r#"dataplane_tunnel_streams_opened_total{{peer="{PEER}"}}"#)),
        Some(4.0)
    );
    let rtt =
        metric_sample(&text, &format!(r#"dataplane_tunnel_rtt_seconds{{peer="{PEER}"}}"#)).expect("rtt");
    // Below the idle timeout (1.5 s here, scaled under emulation), or the
    // connection would be dead.
    let idle = tests::fast_us(1_500_000) as f64 / 1e6;
    assert!(rtt > 0.0 && rtt < idle, "rtt {rtt}");
    assert!(
        metric_sample(
            &text,
            &format!(r#"dataplane_tunnel_udp_bytes_total{{peer="{PEER}",direction="sent"}}"#)
        ) > Some(0.0)
    );
    assert!(
        metric_sample(&text, &format!(r#"dataplane_tunnel_congestion_window_bytes{{peer="{PEER}"}}"#))
            > Some(0.0)
    );
    assert!(
        metric_sample(&text, &format!(r#"dataplane_tunnel_lost_packets_total{{peer="{PEER}"}}"#)).is_some()
    );
    assert!(
        metric_sample(&text, r#"dataplane_tunnel_udp_socket_buffer_bytes{direction="receive"}"#)
            >= Some(8.0 * 1024.0 * 1024.0)
    );
    assert!(metric_sample(&text, "dataplane_process_resident_memory_bytes") > Some(1e6));
    assert!(metric_sample(&text, "dataplane_process_cpu_seconds_total").is_some());
    assert!(text.contains("dataplane_build_info{version="), "{text}");

    let (_, c) = get(&env.topo.remote, "/metrics");
    assert_eq!(metric_sample(&c, r#"dataplane_connector_streams_total{status="ok"}"#), Some(3.0), "{c}");
    assert_eq!(metric_sample(&c, r#"dataplane_connector_streams_total{status="denied"}"#), Some(1.0));
    assert_eq!(metric_sample(&c, r#"dataplane_connector_refusals_total{reason="not_served"}"#), Some(1.0));
    assert_eq!(
        metric_sample(
            &c,
            r#"dataplane_tunnel_connections_opened_total{peer="worker-1",direction="accepted"}"#
        ),
        Some(2.0)
    );
    drop(connector);
    client.stop();
}

/// /ready is 503 without a peer, 200 once the tunnel is up, 503 again when
/// the connector goes away; its body names the routes and peer missing.
#[test]
fn ready_follows_the_ability_to_serve() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let tls = env.tls("client", tests::tunnel_env::CLIENT_ID, None).expect("tls");
    let client = env.topo.start_agent(env.client_config(Mode::ConnectorListens, &tls)).expect("client");
    let node = &env.topo.node;
    assert_eq!(get(node, "/healthz").0, 200);
    let (code, body) = get(node, "/ready");
    assert_eq!(code, 503, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).expect("json");
    let missing = r["missing"].as_array().expect("missing");
    assert_eq!(missing.len(), 5, "every routed CIDR is named: {body}");
    assert!(
        missing.iter().all(|m| m["peer"] == PEER && m["reason"] == "no live tunnel connection"),
        "{body}"
    );
    assert!(body.contains("198.51.100.101/32") && body.contains("2001:db8::101/128"), "{body}");

    let connector = env.start_connector(Mode::ConnectorListens).expect("connector");
    wait_for("ready", Duration::from_secs(10), || get(node, "/ready").0 == 200);
    let (code, body) = get(&env.topo.remote, "/ready");
    assert_eq!(code, 200, "the connector serves: {body}");

    drop(connector);
    wait_for("not ready after the connector left", Duration::from_secs(10), || get(node, "/ready").0 == 503);
    client.stop();
}

/// `dataplane status`'s view of a running agent.
#[test]
fn status_shows_peers_routes_and_flows() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let (client, _connector) = env.start(Mode::ConnectorDialsOut).expect("agents start");
    assert!(env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe").ok);
    tests::wait_flows_settled(&client.handle);
    let a: SocketAddr = ADMIN.parse().expect("addr");
    let (s, raw) = env.topo.node.run(move || status::fetch(a)).expect("thread").expect("status");
    assert!(s.readiness.ready, "{raw}");
    assert_eq!(s.peers[0].name, PEER);
    assert_eq!(s.peers[0].live_connections, 2, "{raw}");
    assert!(!s.peers[0].dialed, "the connector dials us");
    assert_eq!(s.routes.len(), 5);
    assert!(s.routes.iter().all(|r| r.ready && r.via == PEER));
    assert_eq!(s.flows.completed, 1);
    let table = status::render(&s);
    for needle in ["ready: yes", "steering: attached", PEER, "198.51.100.101/32", "it does", "completed 1"] {
        assert!(table.contains(needle), "`{needle}` in:\n{table}");
    }
    client.stop();
}

/// Every string under a key named `expr` or `query`, anywhere in a document.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The `dataplane_*` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("dataplane_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Whether a scrape exports `name`: as a sample, or as a family declared
/// (counters and histograms are declared under their base name).
fn exported(scrape: &str, name: &str) -> bool {
    let sample = scrape.lines().any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(['{', ' '])));
    let base =
        ["_total", "_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    sample
        || scrape
            .lines()
            .any(|l| l.strip_prefix("# TYPE ").is_some_and(|r| r.split(' ').next() == Some(base)))
}

#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    if !require_root() {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("dashboard.json")).expect("dashboard"))
            .expect("json");
    let rules: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(root.join("alerts.yaml")).expect("alerts"))
            .expect("yaml");
    let alerts = rules["groups"][0]["rules"].as_array().expect("rules");
    let names: Vec<&str> = alerts.iter().filter_map(|r| r["alert"].as_str()).collect();
    for want in [
        "DataplaneTunnelDown",
        "DataplaneRouteNotReady",
        "DataplaneHandshakeFailures",
        "DataplaneFlowErrorRate",
        "DataplaneEbpfMapErrors",
        "DataplaneCertificateExpiresSoon",
        "DataplaneReloadRefused",
    ] {
        assert!(names.contains(&want), "alert {want} missing: {names:?}");
    }
    for r in alerts {
        assert!(r["expr"].is_string() && r["for"].is_string() && r["labels"]["severity"].is_string(), "{r}");
        assert!(r["annotations"]["summary"].is_string(), "{r}");
    }

    let env = TunnelEnv::new().expect("environment");
    let (client, connector) = env.start(Mode::ConnectorListens).expect("agents start");
    assert!(env.topo.pod_probe().connect(addr(OTHER_V4)).expect("probe").ok);
    // The flow's closing counters exist once the agent has seen it end.
    tests::wait_flows_settled(&client.handle);
    let scrape = format!("{}\n{}", get(&env.topo.node, "/metrics").1, get(&env.topo.remote, "/metrics").1);

    let mut used = Vec::new();
    exprs(&dashboard, &mut used);
    exprs(&rules, &mut used);
    let mut metrics: Vec<String> = used.iter().flat_map(|e| metric_names(e)).collect();
    metrics.sort();
    metrics.dedup();
    assert!(metrics.len() >= 20, "the dashboard covers the agent: {metrics:?}");
    // A connector exports these only when it discovers its API server;
    // tests/tests/discovery.rs checks them on one that does.
    metrics.retain(|m| !m.starts_with("dataplane_kubernetes_discovery_"));
    let missing: Vec<&String> = metrics.iter().filter(|m| !exported(&scrape, m)).collect();
    assert!(missing.is_empty(), "used but not exported: {missing:?}");
    assert!(!exported(&scrape, "dataplane_flows_bogus_total"), "the check can fail");
    drop(connector);
    client.stop();
}
