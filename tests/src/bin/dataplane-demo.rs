//! `cargo xtask demo`: the whole product on one machine. A workload namespace
//! (a pod) on a node whose agent steers the private API server's addresses
//! with eBPF into a mutual-TLS QUIC tunnel; a "private cluster" namespace the
//! node has no route to, whose connector allows no inbound traffic and dials
//! out to the node's agent; the real kubectl in the pod talks to the API
//! server through it. Exits non-zero if anything does not behave as shown,
//! so CI runs it too.

use std::process::ExitCode;

use anyhow::{Context, Result, ensure};
use tests::{
    topology::{OTHER_V6, addr},
    tunnel_env::{CONNECTOR_ID, Mode, PEER, TunnelEnv, UNSERVED_V4},
};

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn demo() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the demo needs root (eBPF, cgroups, network namespaces)");
    let env = TunnelEnv::new().context("creating namespaces, certificates and the API server")?;
    let t = &env.topo;
    println!("== topology (network namespaces on this machine)");
    println!(
        "   pod      {:<20} 10.200.0.2        workload: the real kubectl, in cgroup {}",
        t.pod.name,
        t.cgroup.path.display()
    );
    println!(
        "   node     {:<20} 10.201.0.1        client agent: eBPF steering + QUIC tunnel (listens :4433)",
        t.node.name
    );
    println!(
        "   private  {:<20} 10.201.0.2        connector agent (no listener: dials out), API server",
        t.remote.name
    );
    println!(
        "            API server at https://198.51.100.101:6443 and [2001:db8::101]:6443, client certs required;"
    );
    println!("            the node has no route to 198.51.100.0/24: only the tunnel reaches it");

    let (client, connector) = env.start(Mode::ConnectorDialsOut).context("starting the agents")?;
    let tunnel = client.handle.tunnel().context("tunnel")?;
    println!(
        "\n== tunnel up: the connector dialled out; {} live connection(s) to `{PEER}` ({CONNECTOR_ID})",
        tunnel.live_connections(PEER)
    );

    for args in [&["version"][..], &["get", "pods"][..]] {
        let o = env.kubectl(args)?;
        println!("\n$ kubectl {}   (from the pod, unmodified, no proxy settings)", args.join(" "));
        print!("{}", out(&o));
        ensure!(o.status.success(), "kubectl {} failed", args.join(" "));
    }

    let pod = t.pod_probe();
    let a = pod.connect(addr(OTHER_V6))?;
    ensure!(a.ok, "IPv6 flow failed: {:?}", a.error);
    println!(
        "\n== IPv6: {OTHER_V6} answered through the tunnel; getpeername() in the pod: {}",
        a.peer.unwrap_or_default()
    );
    let a = pod.connect(addr(UNSERVED_V4))?;
    ensure!(a.was_reset(), "an unserved destination must be refused");
    println!(
        "== {UNSERVED_V4} is routed but not served by the connector: refused, the app got `{}` after {} us",
        a.error.unwrap_or_default(),
        a.elapsed_us
    );

    tests::wait_flows_settled(&client.handle);
    // The real binary and the real curl, in the node's network namespace,
    // against the client agent's admin API.
    let in_node = |program: &std::path::Path, args: &[&str]| -> Result<String> {
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", &t.node.name])
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        ensure!(o.status.success(), "{} {args:?} failed: {}", program.display(), out(&o));
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    println!("\n$ dataplane status   (in the node's network namespace)");
    print!("{}", in_node(&tests::agent_process::agent_bin(), &["status", "--admin", "127.0.0.1:9464"])?);
    println!("\n$ curl -s 127.0.0.1:9464/metrics | grep ...   (a few of the client agent's series)");
    let scrape = in_node(std::path::Path::new("curl"), &["-sf", "http://127.0.0.1:9464/metrics"])?;
    for prefix in [
        "dataplane_flows_closed_total",
        "dataplane_flow_setup_duration_seconds_count",
        "dataplane_ebpf_events_total{hook=\"connect\",reason=\"redirected\"}",
        "dataplane_tunnel_connections{",
        "dataplane_tunnel_rtt_seconds",
    ] {
        for line in scrape.lines().filter(|l| l.starts_with(prefix)) {
            println!("   {line}");
        }
    }
    let c = connector.handle.connector().context("connector")?;
    println!(
        "== connector: streams ok {}, denied {}; refusals not_served {}",
        c.metrics.status("ok"),
        c.metrics.status("denied"),
        c.metrics.denials("not_served")
    );

    drop(connector);
    client.stop();
    let a = pod.connect(addr(OTHER_V6))?;
    ensure!(!a.ok, "the private network must be unreachable without the agents");
    println!(
        "\n== agents stopped: {OTHER_V6} is unreachable from the pod again ({})",
        a.error.unwrap_or_default()
    );
    Ok(())
}
