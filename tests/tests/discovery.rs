//! A connector that serves its own cluster's API server (`serve: [{
//! kubernetes: true }]`), discovered with kube-rs from a test API server
//! that speaks the real list/watch protocol for EndpointSlices: endpoints
//! added, changed and removed reach a client's kernel tries through the
//! tunnel (and the real kubectl its API server); slices other than the API
//! server's own are never served; a 410 Gone relists; while the API is
//! unavailable the last good endpoints stay served and `/ready` and a
//! metric say so.

use std::time::Duration;

use tests::{
    agent_process::AgentProcess,
    kube_api::{KubeApi, api_slice, service_slice},
    require_root,
    topology::{RunningAgent, addr},
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, TunnelEnv, kubectl_works},
    wait_for,
};

const UP: &str = "dataplane_kubernetes_discovery_up";

/// The client's learned routes, sorted.
fn learned(client: &RunningAgent) -> Vec<String> {
    let mut routes: Vec<String> =
        client.handle.status().routes.into_iter().filter(|r| r.source == "learned").map(|r| r.cidr).collect();
    routes.sort();
    routes
}

/// Waits until the client steers exactly `want` (learned) and its kernel
/// tries hold that many entries of each family.
fn wait_learned(client: &RunningAgent, what: &str, want: &[&str]) {
    let v4 = want.iter().filter(|c| !c.contains(':')).count();
    let v6 = want.len() - v4;
    wait_for(what, tests::scaled(Duration::from_secs(15)), || {
        learned(client) == want
            && client.handle.route_entries() == (v4, v6)
            && client.handle.routes_follow_peers()
    });
}

/// A client node that learns its routes from the connector, and nothing else.
fn client(env: &TunnelEnv) -> RunningAgent {
    let tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let text = env.client_config_text(Mode::ConnectorDialsOut, &tls);
    let (head, _) = text.split_once("routes:\n").expect("routes section");
    let peer = format!("identity: '{CONNECTOR_ID}' }}");
    let learn = format!("identity: '{CONNECTOR_ID}', learn: ['198.51.100.0/24', '2001:db8::/64'] }}");
    let yaml = head.replace(&peer, &learn);
    env.topo.start_agent(dataplane::config::Config::parse(&yaml).expect("client config")).expect("client")
}

/// The connector's config: the test's, serving only what it discovers.
fn connector_yaml(env: &TunnelEnv) -> String {
    let tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let text = env.connector_config_text(Mode::ConnectorDialsOut, &tls);
    let (head, _) = text.split_once("serve:\n").expect("serve section");
    // The endpoints are addresses of the connector's own namespace (an API
    // server on the connector's node), so the entry says own_node.
    format!("{head}serve:\n  - {{ kubernetes: true, own_node: true }}\n")
}

#[test]
fn discovered_endpoints_reach_the_clients_kernel_as_they_change() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let api = KubeApi::start(
        &env.topo.remote,
        addr("127.0.0.1:16443"),
        env.dir(),
        vec![
            api_slice("kubernetes", "IPv4", &["198.51.100.101"], 6443),
            // A slice someone else labelled as the API server's: never served.
            api_slice("kubernetes-injected", "IPv4", &["198.51.100.103"], 6443),
            // Another service's slice: never served either.
            service_slice("other-abcde", "other", "IPv4", &["198.51.100.103"], 6443),
        ],
    )
    .expect("test API server");
    let client = client(&env);
    let kubeconfig = api.kubeconfig.to_str().expect("path").to_owned();
    let connector = AgentProcess::start_with_env(
        &env.topo.remote,
        "connector",
        &connector_yaml(&env),
        addr("10.201.0.2:9479"),
        env.dir(),
        &[("KUBECONFIG", &kubeconfig), ("DATAPLANE_LOG", "info")],
    )
    .expect("connector");

    // Listed: the one endpoint, steered by the client; kubectl reaches it.
    wait_learned(&client, "the listed endpoint is learned", &["198.51.100.101/32"]);
    kubectl_works(&env);
    let status = connector.status().expect("status");
    assert_eq!(
        status["discovery"]["endpoints"],
        serde_json::json!(["198.51.100.101 ports [6443]"]),
        "{status}"
    );

    // Added: a second address in the slice.
    api.apply(api_slice("kubernetes", "IPv4", &["198.51.100.101", "198.51.100.102"], 6443));
    wait_learned(&client, "the added endpoint", &["198.51.100.101/32", "198.51.100.102/32"]);

    // Changed: the API server moves.
    api.apply(api_slice("kubernetes", "IPv4", &["198.51.100.102"], 6443));
    wait_learned(&client, "the moved endpoint", &["198.51.100.102/32"]);
    // Quiet now: the watch gets bookmarks, and takes them without an error.
    assert!(KubeApi::count(&api.served.bookmark_watches) >= 1, "the watch asked for bookmarks");
    wait_for("bookmarks on the quiet watch", tests::scaled(Duration::from_secs(5)), || {
        KubeApi::count(&api.served.bookmarks) >= 2
    });
    let watches = KubeApi::count(&api.served.watches);
    assert_eq!(connector.metric("dataplane_kubernetes_discovery_errors_total").expect("metric"), 0.0);
    assert_eq!(connector.metric(UP).expect("metric"), 1.0);

    // 410 Gone: the change is compacted out of the history under the open
    // watch (which ends), so the next watch from where it was gets 410 and
    // only a new list shows the change.
    let lists = KubeApi::count(&api.served.lists);
    api.apply_compacted(api_slice("kubernetes", "IPv4", &["198.51.100.101"], 6443));
    wait_learned(&client, "the change seen by relisting", &["198.51.100.101/32"]);
    assert!(KubeApi::count(&api.served.gone) >= 1, "the watch got 410 Gone");
    assert!(KubeApi::count(&api.served.lists) > lists, "and the connector listed again");
    assert!(KubeApi::count(&api.served.watches) > watches, "and watched again after the list");

    // Unavailable: the last good endpoints stay served, /ready says so.
    api.set_available(false);
    wait_for("discovery reports the API failing", tests::scaled(Duration::from_secs(10)), || {
        connector.status().is_ok_and(|s| s["readiness"]["degraded"].to_string().contains("list/watch"))
    });
    assert_eq!(connector.metric(UP).expect("metric"), 0.0);
    assert!(connector.is_ready(), "a connector serving its last good endpoints stays ready");
    let status = connector.status().expect("status");
    assert!(status["readiness"]["degraded"].to_string().contains("last good 1 endpoints"), "{status}");
    kubectl_works(&env);
    assert_eq!(learned(&client), ["198.51.100.101/32"]);
    api.set_available(true);
    wait_for("discovery recovers", tests::scaled(Duration::from_secs(15)), || {
        connector.metric(UP).is_ok_and(|v| v == 1.0)
    });
    let status = connector.status().expect("status");
    assert!(status["readiness"].get("degraded").is_none(), "{status}");

    // Removed: the slice goes, and the route with it; the connector has
    // nothing to serve and says so.
    api.delete("kubernetes");
    wait_learned(&client, "the removed endpoint is dropped", &[]);
    wait_for("the connector not ready without endpoints", tests::scaled(Duration::from_secs(5)), || {
        !connector.is_ready()
    });
    let status = connector.status().expect("status");
    assert!(status["readiness"]["missing"].to_string().contains("no ready address"), "{status}");

    // An IPv6 API server: its slice is served as it comes.
    api.apply(api_slice("kubernetes", "IPv6", &["2001:db8::101"], 6443));
    wait_learned(&client, "the IPv6 endpoint", &["2001:db8::101/128"]);

    assert_eq!(KubeApi::count(&api.served.unauthorized), 0, "the token was presented every time");
    alerts_use_exported_metrics(&connector);
    assert!(connector.metric("dataplane_kubernetes_discovery_errors_total").expect("metric") >= 2.0);
    assert_eq!(connector.metric("dataplane_kubernetes_discovery_endpoints").expect("metric"), 1.0);
    eprintln!(
        "discovery: {} lists, {} watches, {} bookmarks, {} gone, {} answered 503",
        KubeApi::count(&api.served.lists),
        KubeApi::count(&api.served.watches),
        KubeApi::count(&api.served.bookmarks),
        KubeApi::count(&api.served.gone),
        KubeApi::count(&api.served.unavailable),
    );
}

/// Without an API to ask (no KUBECONFIG, not in a pod), a connector that
/// would discover its API server refuses to start, saying why.
#[test]
fn a_connector_without_a_kubernetes_api_refuses_to_start() {
    if !require_root() {
        return;
    }
    let env = TunnelEnv::new().expect("environment");
    let missing = env.dir().join("no-such-kubeconfig");
    let started = AgentProcess::start_with_env(
        &env.topo.remote,
        "connector",
        &connector_yaml(&env),
        addr("10.201.0.2:9479"),
        env.dir(),
        &[("KUBECONFIG", missing.to_str().expect("path")), ("KUBERNETES_SERVICE_HOST", "")],
    );
    let e = format!("{:#}", started.err().expect("refused"));
    assert!(e.contains("exited with exit status") && e.contains("serve[].kubernetes"), "{e}");
    assert!(e.contains("no Kubernetes API configuration"), "{e}");
}

/// The shipped alert on discovery reads metrics this connector exports.
fn alerts_use_exported_metrics(connector: &AgentProcess) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/alerts.yaml");
    let text = std::fs::read_to_string(path).expect("alerts");
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("yaml");
    let exprs: Vec<&str> = rules["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter_map(|r| r["expr"].as_str())
        .filter(|e| e.contains("dataplane_kubernetes_discovery_"))
        .collect();
    assert!(!exprs.is_empty(), "an alert on discovery is shipped");
    let scrape = connector.metrics_text().expect("scrape");
    for expr in exprs {
        let names = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for name in names.filter(|n| n.starts_with("dataplane_")) {
            assert!(scrape.lines().any(|l| l.starts_with(name)), "{name} (in `{expr}`) is not exported");
        }
    }
}
