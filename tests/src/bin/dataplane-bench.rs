//! `cargo xtask bench`: what steering costs a workload, measured in one run
//! with interleaved repetitions (min/median/max over rounds), on the real
//! kernel, from a pod namespace:
//!
//! - `connect()` of an unrouted destination with the programs attached vs not
//!   (the process moves between a cgroup with the programs and one without);
//! - `connect()` of a routed destination (rewritten to the agent's listener)
//!   vs an unrouted one at the same hop distance;
//! - a full exchange (connect, 100-byte request, echo, close) through the agent
//!   (`direct` upstream) vs straight to the server;
//! - the full tunnel path (pod -> eBPF -> client agent -> QUIC -> connector ->
//!   server): new-flow latency over an established tunnel, and single-flow
//!   throughput (256 MiB out and echoed back, SHA-256 checked).
//!
//! Usage: dataplane-bench [--rounds N] [--connects N] [--exchanges N] [--json PATH]

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use socket2::{Domain, Socket, Type};
use tests::{
    Cgroup, JoinedCgroup,
    topology::{OTHER_V4, Topology},
    tunnel_env::{Mode, STALLED_V4, TunnelEnv},
    unique_id,
};

struct Opts {
    rounds: usize,
    connects: usize,
    exchanges: usize,
    json: Option<PathBuf>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts { rounds: 5, connects: 5000, exchanges: 500, json: None };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = value()?.parse()?,
            "--connects" => o.connects = value()?.parse()?,
            "--exchanges" => o.exchanges = value()?.parse()?,
            "--json" => o.json = Some(value()?.into()),
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(o.rounds >= 1 && o.connects >= 1 && o.exchanges >= 1, "counts must be at least 1");
    Ok(o)
}

/// Mean microseconds of the `connect()` syscall alone, over `n` fresh sockets.
fn connect_cost(dst: SocketAddr, n: usize) -> Result<f64> {
    let domain = if dst.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let mut total = Duration::ZERO;
    for _ in 0..n {
        let s = Socket::new(domain, Type::STREAM, None)?;
        // RST on close: no TIME_WAIT pile-up across thousands of connects.
        s.set_linger(Some(Duration::ZERO))?;
        let t = Instant::now();
        s.connect(&dst.into()).with_context(|| format!("connect {dst}"))?;
        total += t.elapsed();
    }
    Ok(total.as_secs_f64() * 1e6 / n as f64)
}

/// Per-exchange latencies (us) of connect + 100-byte request + echo + close.
fn exchanges(dst: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let request = [b'x'; 100];
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::with_capacity(256);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        s.set_nodelay(true)?;
        s.write_all(&request)?;
        s.shutdown(Shutdown::Write)?;
        buf.clear();
        s.read_to_end(&mut buf)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(buf.ends_with(&request), "echo from {dst} incomplete");
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    }
    Ok(out)
}

/// Total kernel run time and invocation count of our programs (needs
/// BPF_ENABLE_STATS held, see main). Exact in-kernel cost, free of the noise
/// that timing a ~20 us syscall from userspace carries.
fn program_time() -> (Duration, u64) {
    const NAMES: [&str; 5] = ["connect4", "connect6", "sock_ops", "getpeername4", "getpeername6"];
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| NAMES.contains(&n)))
        .fold((Duration::ZERO, 0), |(t, c), p| (t + p.run_time(), c + p.run_count()))
}

/// Nanoseconds of program time per connect between two [`program_time`] readings.
fn ns_per(before: (Duration, u64), after: (Duration, u64), n: usize) -> f64 {
    (after.0 - before.0).as_nanos() as f64 / n as f64
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let o = opts()?;
    tests::raise_nofile_limit(1 << 17);
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root");
    let topo = Topology::new()?;
    let detached = Cgroup::new(&format!("{}-off", unique_id()))?;
    // A sink one veth hop from the pod (unrouted), and one behind the node for
    // a routed destination, so the agent's upstream dial costs the same.
    topo.remote.ip(&["addr", "add", "198.51.100.104/32", "dev", "lo"])?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    for (ns, a) in [(&topo.node, "10.200.0.1:9000"), (&topo.remote, "198.51.100.104:9000")] {
        let a: SocketAddr = a.parse()?;
        let l = ns.run(move || tests::listen(a))??;
        let stop = stop.clone();
        // Accept and drop: a target whose own cost is the same for every arm.
        sinks.push(std::thread::spawn(move || tests::accept_until(l, stop, |s, _| drop(s))));
    }
    // A realistic table: the API server routes plus 500 others.
    let mut routes: Vec<String> =
        vec!["198.51.100.101/32".into(), "198.51.100.104/32".into(), "2001:db8::101/128".into()];
    routes.extend((0..250).map(|i| format!("10.{}.{}.0/24", 50 + i / 200, i % 200)));
    routes.extend((0..250).map(|i| format!("2001:db8:{:x}::/48", 0x100 + i)));
    let refs: Vec<&str> = routes.iter().map(String::as_str).collect();
    let agent = topo.start_agent(topo.config(&refs))?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    // Back to where we came from before the cgroups are removed (drops first).
    let _home = JoinedCgroup::join(&topo.cgroup.path)?;

    let attached = topo.cgroup.path.clone();
    let detached_path = detached.path.clone();
    let join = |cg: &PathBuf| std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string());
    let unrouted: SocketAddr = "10.200.0.1:9000".parse()?;
    let routed: SocketAddr = "198.51.100.104:9000".parse()?;
    let api: SocketAddr = "198.51.100.101:6443".parse()?;
    let other: SocketAddr = "198.51.100.102:6443".parse()?;
    let (rounds, n, m) = (o.rounds, o.connects, o.exchanges);
    println!(
        "dataplane-bench: {rounds} rounds x {n} connects and {m} exchanges per arm, from a pod namespace"
    );

    let results = topo.pod.run(move || -> Result<_> {
        let mut off = Vec::new();
        let mut on = Vec::new();
        let mut redirected = Vec::new();
        let mut via_agent = Vec::new();
        let mut direct = Vec::new();
        let mut prog_unrouted = Vec::new();
        let mut prog_routed = Vec::new();
        // Warm-up: neighbour entries, listener backlogs, the agent's first dials.
        join(&attached)?;
        connect_cost(routed, 200)?;
        exchanges(api, 50)?;
        exchanges(other, 50)?;
        for _ in 0..rounds {
            join(&detached_path)?;
            off.push(connect_cost(unrouted, n)?);
            join(&attached)?;
            let t0 = program_time();
            on.push(connect_cost(unrouted, n)?);
            let t1 = program_time();
            redirected.push(connect_cost(routed, n)?);
            let t2 = program_time();
            prog_unrouted.push(ns_per(t0, t1, n));
            prog_routed.push(ns_per(t1, t2, n));
            direct.push(exchanges(other, m)?);
            via_agent.push(exchanges(api, m)?);
        }
        Ok((off, on, redirected, direct, via_agent, prog_unrouted, prog_routed))
    })??;
    let (off, on, redirected, direct, via_agent, prog_unrouted, prog_routed) = results;
    let k = agent.handle.kernel_counters()?;
    agent.stop();
    stop.store(true, Ordering::Relaxed);
    for s in sinks {
        let _ = s.join();
    }

    let (off_s, on_s, red_s) = (stats(&off), stats(&on), stats(&redirected));
    println!("\nconnect() syscall, mean us per call (min / median / max over rounds)");
    let row =
        |name: &str, s: (f64, f64, f64)| println!("  {name:<44} {:>7.2} {:>7.2} {:>7.2}", s.0, s.1, s.2);
    row("unrouted, programs not attached", off_s);
    row("unrouted, programs attached", on_s);
    row("routed (rewritten to the agent listener)", red_s);
    let unrouted_overhead = on_s.1 - off_s.1;
    let routed_overhead = red_s.1 - on_s.1;
    println!("  => unrouted overhead {unrouted_overhead:+.2} us ({:.3}x)", on_s.1 / off_s.1);
    println!("  => routed vs unrouted at the same hop {routed_overhead:+.2} us ({:.3}x)", red_s.1 / on_s.1);
    let (pu, pr) = (stats(&prog_unrouted), stats(&prog_routed));
    println!("\nprogram run time in the kernel per connect, ns (min / median / max over rounds)");
    println!("  {:<44} {:>7.0} {:>7.0} {:>7.0}", "unrouted (connect4 miss + sock_ops)", pu.0, pu.1, pu.2);
    println!("  {:<44} {:>7.0} {:>7.0} {:>7.0}", "routed (incl. the agent's own dial)", pr.0, pr.1, pr.2);

    let round_medians = |v: &[Vec<f64>]| -> Vec<f64> { v.iter().map(|r| stats(r).1).collect() };
    let (dm, am) = (stats(&round_medians(&direct)), stats(&round_medians(&via_agent)));
    let mut all_direct: Vec<f64> = direct.concat();
    let mut all_agent: Vec<f64> = via_agent.concat();
    let (d99, a99) = (percentile(&mut all_direct, 0.99), percentile(&mut all_agent, 0.99));
    println!(
        "\nexchange: connect + 100 B request + echo + close, p50 us (min / median / max over rounds), p99"
    );
    println!(
        "  {:<44} {:>7.1} {:>7.1} {:>7.1}   p99 {d99:.1}",
        "direct to the server (unrouted)", dm.0, dm.1, dm.2
    );
    println!(
        "  {:<44} {:>7.1} {:>7.1} {:>7.1}   p99 {a99:.1}",
        "steered through the agent (direct upstream)", am.0, am.1, am.2
    );
    println!("  => steering adds {:+.1} us at p50 ({:.2}x)", am.1 - dm.1, am.1 / dm.1);
    println!(
        "\nkernel counters: redirected {}, not_routed {}",
        k.get(dataplane_common::Counter::ConnectRedirected),
        k.get(dataplane_common::Counter::ConnectNotRouted)
    );

    let json = serde_json::json!({
        "rounds": rounds, "connects_per_arm": n, "exchanges_per_arm": m, "routes": routes.len(),
        "connect_us": {
            "unrouted_detached": off, "unrouted_attached": on, "routed_redirected": redirected,
            "unrouted_overhead_median": unrouted_overhead, "routed_overhead_median": routed_overhead,
        },
        "program_ns_per_connect": { "unrouted": prog_unrouted, "routed": prog_routed },
        "exchange_p50_us": { "direct": round_medians(&direct), "via_agent": round_medians(&via_agent) },
        "exchange_p99_us": { "direct": d99, "via_agent": a99 },
    });
    let tunnel = tunnel_section(&o)?;
    let json = serde_json::json!({ "steering": json, "tunnel": tunnel });
    if let Some(path) = o.json {
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The full path through the tunnel, in its own topology.
fn tunnel_section(o: &Opts) -> Result<serde_json::Value> {
    let env = TunnelEnv::new()?;
    let (client, _connector) = env.start(Mode::ConnectorListens)?;
    // Measured from a separate workload process: only it is in the steered
    // cgroup. (Were this process, which also hosts the connector, in it, the
    // connector's own dials would be steered back into the tunnel.)
    let dst: SocketAddr = OTHER_V4.parse()?;
    let pod = env.topo.pod_probe();
    pod.latencies(dst, 50)?;
    let mut latencies = Vec::new();
    for _ in 0..o.rounds {
        let l = pod.latencies(dst, o.exchanges)?;
        ensure!(l.failed == 0, "{} exchanges failed through the tunnel", l.failed);
        latencies.push(l.latencies_us);
    }
    let bytes = 256u64 << 20;
    let mut mbps = Vec::new();
    for _ in 0..o.rounds.min(3) {
        let b = env.topo.pod_probe().bulk(dst, bytes)?;
        ensure!(b.ok && b.digests_match && b.received == bytes, "bulk transfer failed: {b:?}");
        mbps.push(bytes as f64 * 8.0 / b.secs / 1e6);
    }
    // New flows from 16 workers at once, over the established tunnel.
    let mut concurrent = Vec::new();
    for _ in 0..o.rounds {
        let l = pod.concurrent_latencies(dst, 4000, 16)?;
        ensure!(l.failed == 0, "{} concurrent exchanges failed", l.failed);
        concurrent.push(l);
    }
    let flows_per_sec: Vec<f64> = concurrent.iter().map(|l| l.latencies_us.len() as f64 / l.secs).collect();
    let conc_p50: Vec<f64> = concurrent.iter().map(|l| stats(&l.latencies_us).1).collect();
    let mut conc_all: Vec<f64> = concurrent.iter().flat_map(|l| l.latencies_us.clone()).collect();
    let conc_p99 = percentile(&mut conc_all, 0.99);

    // Memory per idle flow: RSS of this process (both agents, the servers)
    // before and while N idle flows are open; so an upper bound for one agent.
    let _server = env.stalled_server()?;
    let idle_dst: SocketAddr = STALLED_V4.parse()?;
    let mut per_flow = Vec::new();
    for n in [1000usize, 10_000] {
        let base = client.handle.flow_stats().active;
        std::thread::sleep(Duration::from_millis(300));
        let before = dataplane::metrics::ProcessStats::read().rss_bytes;
        let held = pod.hold(idle_dst, n)?;
        let start = Instant::now();
        while client.handle.flow_stats().active < base + n as u64 {
            ensure!(start.elapsed() < Duration::from_secs(60), "idle flows did not all open");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = dataplane::metrics::ProcessStats::read().rss_bytes;
        per_flow.push((n, after.saturating_sub(before) as f64 / n as f64));
        held.release();
        let start = Instant::now();
        while client.handle.flow_stats().active > base {
            ensure!(start.elapsed() < Duration::from_secs(60), "idle flows did not all close");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let flows = client.handle.flow_stats();
    ensure!(flows.no_tunnel + flows.refused_by_peer == 0, "flows failed in the tunnel bench: {flows:?}");

    let medians: Vec<f64> = latencies.iter().map(|r| stats(r).1).collect();
    let mut all = latencies.concat();
    let (p50, p99) = (percentile(&mut all, 0.5), percentile(&mut all, 0.99));
    let (lm, tm) = (stats(&medians), stats(&mbps));
    println!("\nfull tunnel path: pod -> eBPF -> client agent -> QUIC (mTLS) -> connector -> server");
    println!(
        "  new flow over an established tunnel (connect + 100 B + echo + close, timed in a workload process),\n  p50 us per round: {:.0} / {:.0} / {:.0}; overall p50 {p50:.0}, p99 {p99:.0}",
        lm.0, lm.1, lm.2
    );
    println!(
        "  single flow, 256 MiB out and echoed back at once, Mbit/s per direction: {:.0} / {:.0} / {:.0} (min / median / max)",
        tm.0, tm.1, tm.2
    );
    let (fm, cm) = (stats(&flows_per_sec), stats(&conc_p50));
    println!(
        "  new flows, 16 concurrent workers: {:.0} / {:.0} / {:.0} flows/s; p50 {:.0} / {:.0} / {:.0} us; overall p99 {conc_p99:.0} us",
        fm.0, fm.1, fm.2, cm.0, cm.1, cm.2
    );
    for (n, b) in &per_flow {
        println!(
            "  {n} idle flows open: {:.1} KiB RSS per flow (both agents and the server in this process)",
            b / 1024.0
        );
    }
    Ok(serde_json::json!({
        "new_flows_per_sec_16_concurrent": flows_per_sec, "new_flow_p50_us_16_concurrent": conc_p50,
        "new_flow_p99_us_16_concurrent": conc_p99,
        "idle_flow_rss_bytes": per_flow.iter().map(|(n, b)| serde_json::json!({"flows": n, "bytes_per_flow": b})).collect::<Vec<_>>(),
        "new_flow_p50_us_per_round": medians, "new_flow_p50_us": p50, "new_flow_p99_us": p99,
        "single_flow_mbps_per_direction": mbps,
    }))
}
