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

/// The full path through the tunnel, in its own topology, against baselines
/// in the same topology and run: direct (kernel forwarding only), a userspace
/// TCP relay (socat) at the private network's edge, and raw quinn with the
/// tunnel's own TLS and transport settings (the QUIC stack's ceiling).
fn tunnel_section(o: &Opts) -> Result<serde_json::Value> {
    let env = TunnelEnv::new()?;
    let (client, _connector) = env.start(Mode::ConnectorListens)?;
    // Measured from separate workload processes: only they are in the steered
    // cgroup. (Were this process, which also hosts the connector, in it, the
    // connector's own dials would be steered back into the tunnel.)
    let tunnel: SocketAddr = OTHER_V4.parse()?;
    let direct: SocketAddr = "10.201.0.2:7200".parse()?;
    let relay: SocketAddr = "10.201.0.2:7100".parse()?;
    let _direct_echo = tests::topology::EchoServer::start(&env.topo.remote, &["10.201.0.2:7200"])?;
    let _socat = tests::baselines::Socat::start(&env.topo.remote, relay, tunnel)?;
    let quinn_server: SocketAddr = "10.201.0.2:4500".parse()?;
    let load = |name: &str, id: &str| -> Result<dataplane::tls::TlsMaterial> {
        let t = env.tls(name, id, None)?;
        Ok(dataplane::tls::TlsMaterial::load(&dataplane::config::TlsFiles {
            ca: t.ca,
            cert: t.cert,
            key: t.key,
        })?)
    };
    let (qc, qs) = (
        load("raw-client", tests::tunnel_env::CLIENT_ID)?,
        load("raw-server", tests::tunnel_env::CONNECTOR_ID)?,
    );
    let pod = env.topo.pod_probe();
    for d in [tunnel, direct, relay] {
        pod.latencies(d, 50)?;
    }

    let arms = [("direct", direct), ("socat relay", relay), ("dataplane", tunnel)];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut lat_all: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut mbps: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let bytes = 256u64 << 20;
    for _ in 0..o.rounds.min(3) {
        for (i, (_, d)) in arms.iter().enumerate() {
            let l = pod.latencies(*d, o.exchanges)?;
            ensure!(l.failed == 0, "{} exchanges failed", l.failed);
            lat[i].push(stats(&l.latencies_us).1);
            lat_all[i].extend(l.latencies_us);
            let b = pod.bulk(*d, bytes)?;
            ensure!(b.ok && b.digests_match && b.received == bytes, "bulk transfer failed: {b:?}");
            mbps[i].push(bytes as f64 * 8.0 / b.secs / 1e6);
        }
        mbps[3].push(tests::baselines::raw_quinn_echo(
            &env.topo.node,
            &env.topo.remote,
            quinn_server,
            qc.clone(),
            qs.clone(),
            bytes,
        )?);
    }
    // Four flows at once through the tunnel.
    let mut parallel = Vec::new();
    for _ in 0..o.rounds.min(3) {
        let started = Instant::now();
        let each = bytes / 4;
        let results: Vec<Result<tests::probe::Bulk>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| env.topo.pod_probe().bulk(tunnel, each))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
        });
        for r in results {
            let b = r?;
            ensure!(b.ok && b.digests_match, "parallel transfer failed: {b:?}");
        }
        parallel.push(bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6);
    }

    // New flows from 16 workers at once, through the tunnel and direct.
    let mut concurrent: Vec<Vec<tests::probe::Latencies>> = vec![Vec::new(); 2];
    for _ in 0..o.rounds.min(3) {
        for (i, d) in [tunnel, direct].into_iter().enumerate() {
            let l = pod.concurrent_latencies(d, 4000, 16)?;
            ensure!(l.failed == 0, "{} concurrent exchanges failed", l.failed);
            concurrent[i].push(l);
        }
    }
    let flows_per_sec = |v: &Vec<tests::probe::Latencies>| -> Vec<f64> {
        v.iter().map(|l| l.latencies_us.len() as f64 / l.secs).collect()
    };
    let (conc_tunnel, conc_direct) = (flows_per_sec(&concurrent[0]), flows_per_sec(&concurrent[1]));
    let conc_p50: Vec<f64> = concurrent[0].iter().map(|l| stats(&l.latencies_us).1).collect();
    // Memory per idle flow: RSS of this process (both agents, the servers)
    // before and while N idle flows are open; so an upper bound for one agent.
    // Each idle flow costs this process three descriptors (client agent,
    // connector, server); where the hard RLIMIT_NOFILE cannot be raised (this
    // sandbox: 20,000) the largest size is capped to what fits.
    let idle_dst: SocketAddr = STALLED_V4.parse()?;
    let mut per_flow = Vec::new();
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let fits = ((lim.rlim_cur.saturating_sub(2000)) / 3) as usize;
    for n in [1000usize, 10_000.min(fits / 1000 * 1000)] {
        let base = client.handle.flow_stats().active;
        std::thread::sleep(Duration::from_millis(300));
        // Holds the server ends open (never reads); dropped after the
        // clients leave, so every flow can finish both directions.
        let server = env.stalled_server()?;
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
        drop(server);
        let start = Instant::now();
        while client.handle.flow_stats().active > base {
            ensure!(start.elapsed() < Duration::from_secs(60), "idle flows did not all close");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let flows = client.handle.flow_stats();
    ensure!(flows.no_tunnel + flows.refused_by_peer == 0, "flows failed in the tunnel bench: {flows:?}");

    println!(
        "\nfull tunnel path: pod -> eBPF -> client agent -> QUIC (mTLS) -> connector -> server; baselines in the same run"
    );
    println!(
        "  new flow (connect + 100 B + echo + close), one at a time, p50 us (min / median / max over rounds), overall p99:"
    );
    let mut p99s = Vec::new();
    for (i, (name, _)) in arms.iter().enumerate() {
        let m = stats(&lat[i]);
        let p99 = percentile(&mut lat_all[i], 0.99);
        p99s.push(p99);
        println!("    {name:<14} {:>7.0} {:>7.0} {:>7.0}   p99 {p99:.0}", m.0, m.1, m.2);
    }
    println!(
        "  single flow, 256 MiB out and echoed back at once, Mbit/s per direction (min / median / max):"
    );
    for (i, name) in ["direct", "socat relay", "dataplane", "raw quinn (ceiling)"].iter().enumerate() {
        let m = stats(&mbps[i]);
        println!("    {name:<20} {:>7.0} {:>7.0} {:>7.0}", m.0, m.1, m.2);
    }
    let med = |v: &Vec<f64>| stats(v).1;
    println!(
        "    => dataplane / raw quinn {:.2}x, / socat {:.2}x, / direct {:.2}x",
        med(&mbps[2]) / med(&mbps[3]),
        med(&mbps[2]) / med(&mbps[1]),
        med(&mbps[2]) / med(&mbps[0])
    );
    let pm = stats(&parallel);
    println!(
        "  4 parallel flows through the tunnel, aggregate Mbit/s per direction: {:.0} / {:.0} / {:.0}",
        pm.0, pm.1, pm.2
    );
    let (ft, fd, cp) = (stats(&conc_tunnel), stats(&conc_direct), stats(&conc_p50));
    println!(
        "  new flows, 16 concurrent workers: dataplane {:.0} / {:.0} / {:.0} flows/s (p50 {:.0} us), direct {:.0} flows/s => {:.2}x",
        ft.0,
        ft.1,
        ft.2,
        cp.1,
        fd.1,
        ft.1 / fd.1
    );
    for (n, b) in &per_flow {
        println!(
            "  {n} idle flows open: {:.1} KiB RSS per flow (both agents and the server in this process)",
            b / 1024.0
        );
    }
    println!("\ntargets (issue 5), this run:");
    let check = |ok: bool| if ok { "met" } else { "NOT met" };
    let single = med(&mbps[2]) / med(&mbps[3]);
    println!("  single flow >= 85% of raw quinn: {:.0}% -> {}", single * 100.0, check(single >= 0.85));
    println!("  >= 12,000 new flows/s at 16 concurrent: {:.0} -> {}", ft.1, check(ft.1 >= 12_000.0));
    println!("  p50 <= 200 us one at a time: {:.0} us -> {}", med(&lat[2]), check(med(&lat[2]) <= 200.0));
    let worst = per_flow.iter().map(|(_, b)| *b).fold(0.0, f64::max);
    println!("  <= 20 KiB RSS per idle flow: {:.1} KiB -> {}", worst / 1024.0, check(worst <= 20.0 * 1024.0));
    Ok(serde_json::json!({
        "new_flow_p50_us": { "direct": lat[0], "socat": lat[1], "dataplane": lat[2] },
        "new_flow_p99_us": { "direct": p99s[0], "socat": p99s[1], "dataplane": p99s[2] },
        "single_flow_mbps_per_direction": { "direct": mbps[0], "socat": mbps[1], "dataplane": mbps[2], "raw_quinn": mbps[3] },
        "four_flows_mbps_per_direction": parallel,
        "new_flows_per_sec_16_concurrent": { "dataplane": conc_tunnel, "direct": conc_direct },
        "new_flow_p50_us_16_concurrent": conc_p50,
        "idle_flow_rss_bytes": per_flow.iter().map(|(n, b)| serde_json::json!({"flows": n, "bytes_per_flow": b})).collect::<Vec<_>>(),
    }))
}
