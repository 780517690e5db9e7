//! The capabilities the DaemonSet grants (deploy/client: drop ALL, add BPF,
//! NET_ADMIN, PERFMON and NET_BIND_SERVICE) are the ones the agent needs. With exactly those, and no
//! other (not even the rest of root's), it steers a pod's connects; with one
//! of them missing it refuses to start and names the one it lacks, before
//! anything is loaded or created.

use tests::{
    agent_process::AgentProcess,
    require_root,
    topology::{API_V4, Topology, addr},
};

fn yaml(topo: &Topology, interface: &str) -> String {
    format!(
        "node: caps\nsteering:\n  cgroup: {}\n  pin_dir: null\n  redirect: {{ interface: {interface} }}\n\
         routes:\n  - {{ cidr: 198.51.100.101/32, via: direct }}\n",
        topo.cgroup.path.display()
    )
}

#[test]
fn the_granted_capabilities_are_enough_and_each_is_needed() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let dir = tempfile::tempdir().expect("tmp");
    let admin = addr("127.0.0.1:9480");
    let granted = ["bpf", "net_admin", "perfmon", "net_bind_service"];
    let agent = AgentProcess::start_with_caps(
        &topo.node,
        "granted",
        &yaml(&topo, "dpcaps0"),
        admin,
        dir.path(),
        &granted,
    )
    .expect("the agent starts with exactly the granted capabilities");
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim().to_owned();
    assert_eq!(eff, "000000c000001400", "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only");
    let a = topo.pod_probe().connect(addr(API_V4)).expect("probe");
    assert!(a.ok, "a pod's connect is steered and served: {a:?}");
    let opened = agent.metric(r#"dataplane_flows_opened_total{route="198.51.100.101/32"}"#).expect("metric");
    assert_eq!(opened, 1.0, "the connect went through the agent");
    drop(agent);

    for (caps, lacks) in [
        (["net_admin", "perfmon", "net_bind_service"], "CAP_BPF"),
        (["bpf", "perfmon", "net_bind_service"], "CAP_NET_ADMIN"),
        (["bpf", "net_admin", "net_bind_service"], "CAP_PERFMON"),
        (["bpf", "net_admin", "perfmon"], "CAP_NET_BIND_SERVICE"),
    ] {
        let e = AgentProcess::start_with_caps(
            &topo.node,
            lacks,
            &yaml(&topo, "dpcaps1"),
            admin,
            dir.path(),
            &caps,
        )
        .err()
        .unwrap_or_else(|| panic!("the agent must refuse to start without {lacks}"));
        let text = format!("{e:#}");
        assert!(text.contains(&format!("the agent lacks {lacks} (")), "{text}");
        // Refused before anything was created.
        let links = topo.node.ip(&["-o", "link", "show"]).expect("ip link");
        assert!(!links.contains("dpcaps1"), "no redirect interface was left: {links}");
    }
}
