//! `cargo xtask demo`: a local topology (workload namespace, node namespace
//! with the agent, a private "API server" namespace), a routed connect steered
//! through the agent, an unrouted one left alone, and the counters. Exits
//! non-zero if anything does not behave as shown, so CI runs it too.

use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use dataplane_common::Counter;
use tests::topology::{API_V4, API_V6, OTHER_V4, Topology, addr};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo needs root (eBPF, cgroups, network namespaces)");
    println!("== topology");
    let topo = Topology::new().context("creating namespaces")?;
    println!(
        "   pod    {:<22} 10.200.0.2, fd00:200::2   (workload, own netns, cgroup {})",
        topo.pod.name,
        topo.cgroup.path.display()
    );
    println!(
        "   node   {:<22} agent; redirect listeners 169.254.77.1:15001, [fd00:d47a::1]:15001",
        topo.node.name
    );
    println!(
        "   server {:<22} 'private' hosts 198.51.100.101-102, 2001:db8::101-102 :6443",
        topo.remote.name
    );

    let routes = ["198.51.100.101/32", "2001:db8::101/128"];
    let config = topo.config(&routes);
    println!("\n== agent config (routes)");
    for r in &config.routes {
        println!("   - {{ cidr: {}, via: {} }}", r.cidr, r.via);
    }
    let agent = topo.start_agent(config).context("starting the agent")?;
    let pod = topo.pod_probe();

    println!("\n== connects from the pod");
    println!("   {:<24} {:<24} {:<26} path", "dialled", "getpeername()", "server saw connection from");
    let mut steered = 0;
    for dst in [API_V4, API_V6, OTHER_V4] {
        let a = pod.connect(addr(dst))?;
        ensure!(a.ok, "connect to {dst} failed: {:?}", a.error);
        let saw = a.server_saw().map(|s| s.to_string()).unwrap_or_default();
        let via_agent = !saw.starts_with("10.200.") && !saw.starts_with("[fd00:200::");
        steered += usize::from(via_agent);
        let path = if via_agent { "steered: pod -> eBPF -> agent -> server" } else { "direct (not routed)" };
        println!("   {dst:<24} {:<24} {saw:<26} {path}", a.peer.as_deref().unwrap_or_default());
        ensure!(a.echoed() == "hello through the dataplane", "echo mismatch for {dst}");
    }
    ensure!(steered == 2, "expected the two routed connects to be steered, got {steered}");

    println!("\n== eBPF counters (summed over CPUs)");
    let k = agent.handle.kernel_counters()?;
    for c in Counter::ALL {
        println!("   {:<12} {:<14} {}", c.hook(), c.reason(), k.get(c));
    }
    let f = agent.handle.flow_stats();
    println!(
        "\n== agent flows\n   accepted {}  completed {}  bytes up {}  down {}",
        f.accepted, f.completed, f.bytes_up, f.bytes_down
    );

    agent.stop();
    let after = pod.connect(addr(API_V4))?;
    let saw = after.server_saw().map(|s| s.to_string()).unwrap_or_default();
    println!("\n== agent stopped: {API_V4} now goes direct (server saw {saw}); steering is gone");
    ensure!(saw.starts_with("10.200.0.2"), "steering still active after stop");
    Ok(())
}
