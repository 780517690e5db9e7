//! The Kubernetes manifests as a platform team renders them: every base and
//! overlay under `deploy/` renders with `kubectl kustomize`, validates
//! against the OpenAPI schemas of the oldest and newest Kubernetes minor we
//! support, passes checkov with each skipped check explained, and carries
//! agent configurations that `dataplane check` accepts; the pod specs grant
//! what each role needs and nothing more.
//!
//! The tools come from `cargo xtask test`, which installs kubernetes-validate
//! and checkov (PyPI) into `target/deploy-tools`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml_ng::Value;

/// Every kustomization under deploy/.
const RENDERED: [&str; 5] = ["client", "connector", "relay", "monitoring", "overlays/cert-manager"];
/// The oldest and newest Kubernetes minor the manifests are for.
const KUBERNETES: [&str; 2] = ["1.29.0", "1.37.0"];
/// Kinds from CRDs (prometheus-operator, cert-manager): no upstream schema.
const CRD_KINDS: [&str; 4] = ["PodMonitor", "PrometheusRule", "Certificate", "ClusterIssuer"];

use tests::pods::deploy_dir;

/// A tool from `target/deploy-tools/bin` (or `DATAPLANE_DEPLOY_TOOLS`).
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("DATAPLANE_DEPLOY_TOOLS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/deploy-tools/bin"),
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: `cargo xtask test` installs it", path.display());
    path
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `kubectl kustomize deploy/<dir>`: the YAML and its objects.
fn render(dir: &str) -> (String, Vec<Value>) {
    let (ok, text) = run(Command::new("kubectl").arg("kustomize").arg(deploy_dir().join(dir)));
    assert!(ok, "kubectl kustomize deploy/{dir}: {text}");
    let docs = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect();
    (text, docs)
}

use serde::Deserialize;

/// Every rendered tree in files of their own, for the tools.
fn rendered_files() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = RENDERED
        .iter()
        .map(|d| {
            let path = dir.path().join(format!("{}.yaml", d.replace('/', "-")));
            std::fs::write(&path, render(d).0).expect("write");
            path
        })
        .collect();
    (dir, files)
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn named<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter().find(|d| kind(d) == k).unwrap_or_else(|| panic!("no {k} rendered"))
}

#[test]
fn every_object_validates_against_the_kubernetes_schemas() {
    let (_dir, files) = rendered_files();
    for version in KUBERNETES {
        let (ok, text) = run(Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files));
        assert!(ok, "Kubernetes {version}: {text}");
        // Only CRD kinds may go without a schema.
        for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))), "{line}");
        }
    }
    // A CRD object is at least what its operator reads.
    let monitoring = render("monitoring").1;
    assert_eq!(named(&monitoring, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"], "admin");
    let certs = render("overlays/cert-manager").1;
    for c in certs.iter().filter(|d| kind(d) == "Certificate") {
        let usages: Vec<&str> =
            c["spec"]["usages"].as_sequence().expect("usages").iter().filter_map(|u| u.as_str()).collect();
        assert!(usages.contains(&"client auth") && usages.contains(&"server auth"), "{c:?}");
        assert!(c["spec"]["uris"][0].as_str().is_some_and(|u| u.starts_with("spiffe://")), "{c:?}");
        assert_eq!(c["spec"]["issuerRef"]["kind"], "ClusterIssuer", "the CA key stays with cert-manager");
    }
}

#[test]
fn checkov_passes_and_every_skip_says_why() {
    let (dir, files) = rendered_files();
    let mut cmd = Command::new(tool("checkov"));
    cmd.current_dir(dir.path()).args([
        "--framework",
        "kubernetes",
        "--skip-download",
        "--compact",
        "--quiet",
    ]);
    for f in &files {
        cmd.arg("-f").arg(f);
    }
    let (ok, text) = run(&mut cmd);
    assert!(ok && text.contains("Failed checks: 0"), "checkov: {text}");
    let mut skips = 0;
    for d in RENDERED {
        for obj in render(d).1 {
            let Some(annotations) = obj["metadata"]["annotations"].as_mapping() else { continue };
            for (k, v) in annotations {
                if k.as_str().is_some_and(|k| k.starts_with("checkov.io/skip")) {
                    let v = v.as_str().expect("a string");
                    let (check, why) = v.split_once('=').unwrap_or_else(|| panic!("{v}: CHECK=reason"));
                    assert!(check.starts_with("CKV") && why.len() >= 20, "{v}: a skip names its reason");
                    skips += 1;
                }
            }
        }
    }
    assert!(text.contains(&format!("Skipped checks: {skips}")), "every skip is one annotation: {text}");
}

#[test]
fn the_agent_configs_in_the_manifests_pass_dataplane_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for d in RENDERED {
        for cm in render(d).1.iter().filter(|o| kind(o) == "ConfigMap") {
            let Some(config) = cm["data"]["config.yaml"].as_str() else { continue };
            let path = dir.path().join(format!("{}.yaml", cm["metadata"]["name"].as_str().expect("name")));
            std::fs::write(&path, config).expect("write");
            let (ok, text) =
                run(Command::new(tests::agent_process::agent_bin()).arg("check").arg("-c").arg(&path));
            assert!(ok, "deploy/{d}: dataplane check: {text}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "client, connector and relay each carry a config");
}

/// The pod template's first container.
fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn config_of(docs: &[Value]) -> dataplane::config::ValidConfig {
    let text = named(docs, "ConfigMap")["data"]["config.yaml"].as_str().expect("config.yaml");
    dataplane::config::Config::parse(text).expect("valid")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default()
}

#[test]
fn the_daemonset_grants_what_steering_needs_and_no_more() {
    let docs = render("client").1;
    let ds = named(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(ds);
    let config = config_of(&docs);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists", "every taint tolerated");
    let sc = &c["securityContext"];
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    // Exactly what the agent checks for at start, with its config's ports.
    let redirect = &config.steering.redirect;
    let ports = redirect.v4.iter().chain(&redirect.v6).map(|a| a.port());
    let needed: Vec<&str> = dataplane::kernel::caps::for_steering(ports)
        .iter()
        .map(|c| c.name.trim_start_matches("CAP_"))
        .collect();
    assert_eq!(strings(&sc["capabilities"]["add"]), needed);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc.get("privileged").is_none_or(|p| *p == false));
    // The kubelet waits past the agent's grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace");
    assert!(grace > config.timeouts.shutdown_grace.as_secs() + 5, "{grace} s");
    // Probes on the admin port the config binds, on every address (the
    // kubelet probes the node's address).
    let admin = config.admin.expect("admin enabled");
    assert!(admin.ip().is_unspecified(), "{admin}");
    let port =
        c["ports"].as_sequence().expect("ports").iter().find(|p| p["name"] == "admin").expect("admin port");
    assert_eq!(port["containerPort"].as_u64(), Some(u64::from(admin.port())));
    for (probe, path) in
        [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/ready")]
    {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }
    assert_eq!(c["env"][0]["name"], "NODE_NAME");
    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(
        c["resources"]["requests"]["memory"].is_string() && c["resources"]["limits"]["memory"].is_string()
    );
    // The cgroup it steers is mounted; so is bpffs, where pinned state lives.
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    let cgroup = config.steering.cgroup.as_ref().expect("cgroup").display().to_string();
    assert!(mounts.iter().any(|m| cgroup.starts_with(m)), "{cgroup} in {mounts:?}");
    let pins = config.steering.pin_dir.as_ref().expect("pinned").display().to_string();
    assert!(mounts.iter().any(|m| pins.starts_with(m)), "{pins} in {mounts:?}");
    // The config checksum: the ConfigMap's name carries a hash of its
    // content, and the pod template names it, so a change rolls the pods.
    let cm = named(&docs, "ConfigMap")["metadata"]["name"].as_str().expect("name");
    assert!(cm.starts_with("dataplane-client-") && cm.len() > "dataplane-client-".len() + 5, "{cm}");
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    assert!(volumes.iter().any(|v| v["configMap"]["name"] == cm), "the pods name {cm}");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(1));
    // The runtimes' default seccomp profiles refuse bpf() without SYS_ADMIN.
    assert_eq!(ds["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"], "Unconfined");
}

#[test]
fn connectors_and_relays_run_unprivileged_in_pairs() {
    for (dir, name) in [("connector", "dataplane-connector"), ("relay", "dataplane-relay")] {
        let docs = render(dir).1;
        let deployment = named(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let c = container(deployment);
        assert_eq!(deployment["metadata"]["name"], name);
        assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2), "{dir}");
        assert!(pod["hostNetwork"].is_null() || pod["hostNetwork"] == false, "{dir}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{dir}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{dir}");
        assert_eq!(strings(&c["securityContext"]["capabilities"]["drop"]), ["ALL"], "{dir}");
        assert!(c["securityContext"]["capabilities"]["add"].is_null(), "{dir}: no capability added");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{dir}");
        // The API only for a connector that discovers its API server.
        let discovers = config_of(&docs).kubernetes_serve().is_some();
        assert_eq!(dir == "connector", discovers, "the shipped connector serves its cluster's API server");
        assert_eq!(pod["automountServiceAccountToken"], discovers, "{dir}: no API access it does not use");
        let roles: Vec<&Value> =
            docs.iter().filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole").collect();
        if discovers {
            // Read access to EndpointSlices in `default`, and nothing else.
            let role = named(&docs, "Role");
            assert_eq!(role["metadata"]["namespace"], "default");
            assert_eq!(role["rules"].as_sequence().map(Vec::len), Some(1), "{role:?}");
            assert_eq!(strings(&role["rules"][0]["apiGroups"]), ["discovery.k8s.io"]);
            assert_eq!(strings(&role["rules"][0]["resources"]), ["endpointslices"]);
            assert_eq!(strings(&role["rules"][0]["verbs"]), ["get", "list", "watch"]);
            assert_eq!(
                strings(&role["rules"][0]["resourceNames"]),
                ["kubernetes"],
                "the API server's slice only"
            );
            let binding = named(&docs, "RoleBinding");
            assert_eq!(binding["metadata"]["namespace"], "default");
            assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
            let subject = &binding["subjects"][0];
            assert_eq!(subject["name"], pod["serviceAccountName"]);
            assert_eq!(subject["namespace"], deployment["metadata"]["namespace"], "the pods' own namespace");
            assert_eq!(roles.len(), 1, "{dir}: one Role");
        } else {
            assert!(roles.is_empty(), "{dir}: no RBAC");
        }
        assert!(!pod["affinity"]["podAntiAffinity"].is_null(), "{dir}: replicas on different nodes");
        let selector = &deployment["spec"]["selector"]["matchLabels"];
        let pdb = named(&docs, "PodDisruptionBudget");
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector, "{dir}");
        assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1), "{dir}");
        let policy = named(&docs, "NetworkPolicy");
        assert_eq!(&policy["spec"]["podSelector"]["matchLabels"], selector, "{dir}");
        // The admin port only from the monitoring namespace.
        let admin_rule = policy["spec"]["ingress"]
            .as_sequence()
            .expect("ingress")
            .iter()
            .find(|r| r["ports"][0]["port"].as_u64() == Some(9464))
            .expect("an admin rule");
        assert!(!admin_rule["from"].is_null(), "{dir}: the admin port is not open to all");
        let config = config_of(&docs);
        assert!(!config.steers(), "{dir}: no eBPF");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("grace");
        assert!(grace > config.timeouts.shutdown_grace.as_secs() + 5, "{dir}: {grace} s");
    }
    // The relay's Service carries its tunnel port.
    let docs = render("relay").1;
    let listen = config_of(&docs).tunnel.listen.expect("a relay listens");
    let service = named(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(u64::from(listen.port())));
    assert_eq!(service["spec"]["ports"][0]["protocol"], "UDP");
}

#[test]
fn the_prometheus_rule_is_alerts_yaml() {
    let monitoring = deploy_dir().join("monitoring");
    let alerts: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(monitoring.join("alerts.yaml")).expect("alerts"))
            .expect("yaml");
    let rendered = render("monitoring").1;
    let rule = named(&rendered, "PrometheusRule");
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "prometheusrule.yaml wraps alerts.yaml, rule for rule"
    );
    let dashboard = named(&rendered, "ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = dashboard["data"]["dashboard.json"].as_str().expect("dashboard");
    let on_disk = std::fs::read_to_string(monitoring.join("dashboard.json")).expect("dashboard");
    assert_eq!(json, on_disk);
}
