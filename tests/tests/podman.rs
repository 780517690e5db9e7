//! The shipped manifests run by a real container runtime. The client
//! DaemonSet's pod template and the connector Deployment's, rendered by
//! `kubectl kustomize` from `deploy/` with a test overlay (this topology's
//! config, with `steering.cgroup` at the test's child cgroup; certificates
//! from host directories in place of Secrets; the connector on the private
//! namespace's network with a service account as the kubelet mounts one),
//! are played by `podman kube play` with the image `cargo xtask image`
//! built and only the capabilities and mounts the manifests grant. A
//! workload in its own namespace and cgroup reaches the stand-in API server
//! through them with the real kubectl, the connector having discovered that
//! server in-cluster (EndpointSlices, from the test API server), and the
//! client's Secret is renewed under a loop of new flows without one failing. Without one
//! of the granted capabilities, or under the runtime's default seccomp
//! profile, the agent refuses to start, saying why.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use dataplane::tls::certs::{self, NodeSpec};
use serde_yaml_ng::Value;
use tests::{
    kube_api::{KubeApi, api_slice},
    pods::{self, PlayedPod},
    require_root,
    topology::{OTHER_V4, addr},
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, TlsPaths, TunnelEnv, kubectl_works},
    wait_for,
};

/// Where the pods' TLS Secrets would be mounted.
const TLS: &str = "tls: { ca: /etc/dataplane/tls/ca.crt, cert: /etc/dataplane/tls/tls.crt, key: /etc/dataplane/tls/tls.key }\n";

/// A Secret's files (`ca.crt`, `tls.crt`, `tls.key`) as the kubelet
/// projects them, owned by the pod's user: the files in a generation's
/// directory, `..data` linking to it and each name linking through
/// `..data`. An update writes a new generation and swaps `..data` in one
/// rename, as a Secret update (a cert-manager renewal) lands.
struct SecretDir {
    root: PathBuf,
    uid: u32,
    generation: u32,
}

impl SecretDir {
    fn new(dir: &Path, name: &str, tls: &TlsPaths, uid: u32) -> SecretDir {
        let mut s = SecretDir { root: dir.join(name), uid, generation: 0 };
        std::fs::create_dir_all(&s.root).expect("dir");
        let read = |p: &Path| std::fs::read(p).expect("read");
        s.update(&[("ca.crt", read(&tls.ca)), ("tls.crt", read(&tls.cert)), ("tls.key", read(&tls.key))]);
        for f in ["ca.crt", "tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), s.root.join(f)).expect("symlink");
        }
        s
    }

    fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        self.generation += 1;
        let generation = format!("..generation-{}", self.generation);
        let dir = self.root.join(&generation);
        std::fs::create_dir(&dir).expect("generation");
        for (name, bytes) in files {
            let path = dir.join(name);
            std::fs::write(&path, bytes).expect("write");
            std::os::unix::fs::chown(&path, Some(self.uid), Some(self.uid)).expect("chown");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        }
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&generation, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.root.join("..data")).expect("swap ..data");
    }
}

/// The test overlay's ConfigMap, replacing the base's, and a patch.
fn overlay(config_map: &str, patch: &str) -> String {
    format!(
        "configMapGenerator:\n  - name: {config_map}\n    namespace: dataplane\n    behavior: replace\n    files: [config.yaml]\n\
         patches:\n  - patch: |-\n{}",
        patch.lines().map(|l| format!("      {l}\n")).collect::<String>()
    )
}

/// The client's config: the topology's (it listens for the connector and
/// learns what it advertises), steering the test's child cgroup.
fn client_config(env: &TunnelEnv, tls: &TlsPaths) -> String {
    let text = env.client_config_text(Mode::ConnectorDialsOut, tls);
    let (head, _) = text.split_once("routes:\n").expect("routes section");
    let peer = format!("identity: '{CONNECTOR_ID}' }}");
    let learn = format!("identity: '{CONNECTOR_ID}', learn: ['198.51.100.0/24', '2001:db8::/64'] }}");
    assert!(head.contains(&env.topo.cgroup.path.display().to_string()), "{head}");
    format!("{}admin: 0.0.0.0:9464\n", head.replace(&peer, &learn).replace(&TunnelEnv::tls_yaml(tls), TLS))
}

/// The connector's config: the shipped one's kind of serve entry (its
/// cluster's API server, discovered), with `own_node` because the stand-in
/// API server shares the connector's network here; dialing the client.
fn connector_config(env: &TunnelEnv, tls: &TlsPaths) -> String {
    let text = env.connector_config_text(Mode::ConnectorDialsOut, tls);
    let (head, _) = text.split_once("serve:\n").expect("serve section");
    let head = head.replace(&TunnelEnv::tls_yaml(tls), TLS);
    // And the topology's echo server, for the flow loop under rotation.
    format!(
        "{head}serve:\n  - {{ kubernetes: true, own_node: true }}\n  - {{ cidr: '198.51.100.102/32', ports: [6443], own_node: true }}\n\
         admin: 0.0.0.0:9464\n"
    )
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Plays `pod` changed by `change` (named `<pod>-<suffix>`, run once) on
/// the node; it must exit non-zero. Returns its log.
fn refused_start(
    env: &TunnelEnv,
    pod: &Value,
    config_map: &Value,
    suffix: &str,
    change: impl FnOnce(&mut Value),
) -> String {
    let mut pod = pod.clone();
    let name = format!("{}-{suffix}", pod["metadata"]["name"].as_str().expect("name"));
    pod["metadata"]["name"] = Value::from(name);
    // Once: the exit is the answer.
    pod["spec"]["restartPolicy"] = Value::from("Never");
    change(&mut pod);
    let refused = PlayedPod::play(&env.topo.node, env.dir(), &pod, config_map).expect("played");
    let code = refused.wait_exit(tests::scaled(Duration::from_secs(30))).expect("exits");
    let logs = refused.logs();
    assert_ne!(code, 0, "{logs}");
    logs
}

/// `/ready` and `/status` of an agent's admin port in `ns`.
fn admin_get(ns: &tests::Netns, at: &str, path: &'static str) -> Option<(u16, String)> {
    let addr = addr(at);
    tests::run_in(&ns.path(), move || dataplane::admin::client::get(addr, path).ok()).ok().flatten()
}

#[test]
fn the_daemonset_and_connector_pods_carry_kubectl_through_the_tunnel() {
    if !require_root() {
        return;
    }
    pods::require_image().expect("the image");
    let env = TunnelEnv::new().expect("environment");
    let dir = env.dir();
    let api = KubeApi::start(
        &env.topo.remote,
        addr("127.0.0.1:16443"),
        dir,
        vec![api_slice("kubernetes", "IPv4", &["198.51.100.101"], 6443)],
    )
    .expect("test API server");
    api.service_account(&dir.join("serviceaccount")).expect("service account");

    let client_tls = env.tls("client", CLIENT_ID, None).expect("tls");
    let mut client_secret = SecretDir::new(dir, "secret-client", &client_tls, 0);
    let client_patch = format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{ name: dataplane-client }}\nspec:\n  template:\n    spec:\n      volumes:\n\
         \x20       - name: tls\n          secret: null\n          hostPath: {{ path: {}, type: Directory }}\n",
        client_secret.root.display()
    );
    let client_docs = pods::render_overlay(
        dir,
        "overlay-client",
        "client",
        &overlay("dataplane-client", &client_patch),
        &[("config.yaml", &client_config(&env, &client_tls))],
    )
    .expect("client overlay renders");
    let client_cm = pods::find(&client_docs, "ConfigMap").expect("ConfigMap").clone();
    let client_pod =
        pods::pod_of(pods::find(&client_docs, "DaemonSet").expect("DaemonSet"), "dataplane-client")
            .expect("pod");
    let granted = strings(&client_pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]);
    assert_eq!(granted, ["BPF", "NET_ADMIN", "PERFMON", "NET_BIND_SERVICE"], "what the DaemonSet grants");

    // Without one of them the agent refuses to start, naming it.
    let logs = refused_start(&env, &client_pod, &client_cm, "without-perfmon", |pod| {
        let fewer: Vec<Value> =
            granted.iter().filter(|c| *c != "PERFMON").map(|c| Value::from(c.as_str())).collect();
        pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = Value::Sequence(fewer);
    });
    assert!(logs.contains("PERFMON"), "the refusal names the capability: {logs}");
    // Under the runtime's default seccomp profile bpf() is refused; the
    // agent says that, not that the kernel lacks eBPF.
    let logs = refused_start(&env, &client_pod, &client_cm, "runtime-default-seccomp", |pod| {
        pod["spec"]["securityContext"]["seccompProfile"]["type"] = Value::from("RuntimeDefault");
    });
    assert!(logs.contains("bpf() system call is refused") && logs.contains("seccomp"), "{logs}");

    // The connector, on the private network, with a pod's service account.
    let connector_tls = env.tls("connector", CONNECTOR_ID, None).expect("tls");
    let connector_secret = SecretDir::new(dir, "secret-connector", &connector_tls, 65532);
    let connector_patch = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: dataplane-connector }}\nspec:\n  replicas: 1\n  template:\n    spec:\n\
         \x20     hostNetwork: true\n      containers:\n        - name: connector\n          env:\n\
         \x20           - {{ name: KUBERNETES_SERVICE_HOST, value: 127.0.0.1 }}\n            - {{ name: KUBERNETES_SERVICE_PORT, value: \"16443\" }}\n\
         \x20         volumeMounts:\n            - {{ name: serviceaccount, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true }}\n\
         \x20     volumes:\n        - name: tls\n          secret: null\n          hostPath: {{ path: {}, type: Directory }}\n\
         \x20       - name: serviceaccount\n          hostPath: {{ path: {}, type: Directory }}\n",
        connector_secret.root.display(),
        dir.join("serviceaccount").display()
    );
    let connector_docs = pods::render_overlay(
        dir,
        "overlay-connector",
        "connector",
        &overlay("dataplane-connector", &connector_patch),
        &[("config.yaml", &connector_config(&env, &connector_tls))],
    )
    .expect("connector overlay renders");
    let connector_pod =
        pods::pod_of(pods::find(&connector_docs, "Deployment").expect("Deployment"), "dataplane-connector")
            .expect("pod");
    let connector_cm = pods::find(&connector_docs, "ConfigMap").expect("ConfigMap").clone();
    let connector =
        PlayedPod::play(&env.topo.remote, dir, &connector_pod, &connector_cm).expect("connector played");
    let client = PlayedPod::play(&env.topo.node, dir, &client_pod, &client_cm).expect("client played");

    wait_for("both pods ready", tests::scaled(Duration::from_secs(30)), || {
        let ready = |ns, at| admin_get(ns, at, "/ready").is_some_and(|(code, _)| code == 200);
        let both = ready(&env.topo.remote, "10.201.0.2:9464") && ready(&env.topo.node, "10.201.0.1:9464");
        if !both {
            eprintln!("client: {}\nconnector: {}", client.logs(), connector.logs());
        }
        both
    });
    wait_for("the client learned the discovered API server", tests::scaled(Duration::from_secs(15)), || {
        admin_get(&env.topo.node, "10.201.0.1:9464", "/status")
            .is_some_and(|(_, body)| body.contains("\"198.51.100.101/32\""))
    });
    kubectl_works(&env);

    // Certificate rotation under load: the client's Secret is updated (a
    // renewal: two hours instead of one) while the pod opens a new flow
    // every 50 ms; the agent reloads it from the files, no flow fails, and
    // a new handshake presents the new certificate.
    wait_for("the echo server's route learned", tests::scaled(Duration::from_secs(15)), || {
        admin_get(&env.topo.node, "10.201.0.1:9464", "/status")
            .is_some_and(|(_, b)| b.contains("\"198.51.100.102/32\""))
    });
    let ticker = env.topo.pod_probe().tick(addr(OTHER_V4), 50).expect("ticker");
    let renewed = certs::issue(
        &env.tunnel_ca,
        &NodeSpec { identity: CLIENT_ID.into(), validity: Duration::from_secs(7200), ..Default::default() },
    )
    .expect("issue");
    let ca = std::fs::read(&client_tls.ca).expect("ca");
    client_secret.update(&[
        ("ca.crt", ca),
        ("tls.crt", renewed.cert.into_bytes()),
        ("tls.key", renewed.key.into_bytes()),
    ]);
    let metric = |name: &str| {
        admin_get(&env.topo.node, "10.201.0.1:9464", "/metrics")
            .and_then(|(_, body)| tests::metric_sample(&body, name))
    };
    wait_for("the client reloads the renewed Secret", tests::scaled(Duration::from_secs(20)), || {
        metric(r#"dataplane_tls_reloads_total{result="applied"}"#) == Some(1.0)
    });
    let peer = env.tls("peer", CONNECTOR_ID, None).expect("tls");
    let attack = tests::evil::Attack::dial_once(addr("10.201.0.1:4433"), CLIENT_ID, None);
    let report = tests::evil::run(&env.topo.remote.path(), &peer, &attack).expect("report");
    let presented = report.acceptor_not_after.expect("welcomed");
    let in_an_hour =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    assert!(presented > in_an_hour + 600, "a new handshake presents the renewed certificate ({presented})");
    let expiry = metric("dataplane_tls_certificate_expiry_timestamp_seconds").expect("expiry metric");
    assert_eq!(expiry as u64, presented, "the expiry metric follows the certificate in force");
    let ticks = ticker.finish().expect("ticks");
    assert!(
        ticks.ok >= 20 && ticks.failed == 0 && ticks.refused == 0 && ticks.broken == 0,
        "no flow failed across the rotation: {ticks:?}"
    );

    // The containers run with what the manifests grant, and no more.
    let caps = std::process::Command::new("podman")
        .args(["inspect", "--format", "{{.EffectiveCaps}}", &client.container(), &connector.container()])
        .output()
        .expect("podman inspect");
    let caps = String::from_utf8_lossy(&caps.stdout).to_string();
    let mut lines = caps.lines();
    assert_eq!(lines.next(), Some("[CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_PERFMON]"), "{caps}");
    assert_eq!(lines.next(), Some("[]"), "the connector: none ({caps})");
    assert!(KubeApi::count(&api.served.lists) >= 1 && KubeApi::count(&api.served.unauthorized) == 0);
    drop(client);
    drop(connector);
}
