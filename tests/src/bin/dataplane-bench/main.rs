//! `cargo xtask bench`: what the dataplane costs a workload, measured in one
//! run with interleaved repetitions (min/median/max over rounds), on the real
//! kernel, from a pod namespace, against baselines in the same run:
//!
//! - steering (`steering`): `connect()` of an unrouted destination with the
//!   programs attached vs not (the process moves between a cgroup with the
//!   programs and one without); a routed `connect()` vs an unrouted one at the
//!   same hop distance; an exchange through the agent (`direct` upstream) vs
//!   straight to the server;
//! - the full tunnel path (pod -> eBPF -> client agent -> QUIC -> connector ->
//!   server), with both agents run as `dataplane` processes, and the same
//!   through a relay (see `tunnel.rs`).
//!
//! - memory after a burst, per allocator (`burst`), and what 10,000
//!   strangers' QUIC Initials cost a connector (`initials`; see `memory.rs`).
//!
//! Usage: dataplane-bench [--rounds N] [--connects N] [--exchanges N] [--json PATH]
//!                        [--only steering,latency,throughput,parallel,concurrent,idle,relay,burst,initials]
//!                        [--workers N] [--burst-wait SECS] [--allocators glibc,jemalloc,mimalloc]

mod memory;
mod tunnel;

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
use tests::{Cgroup, JoinedCgroup, topology::Topology, unique_id};

struct Opts {
    rounds: usize,
    connects: usize,
    exchanges: usize,
    json: Option<PathBuf>,
    /// Sections to run (all when empty).
    only: Vec<String>,
    /// `workers:` for both agents (their default when unset).
    workers: Option<usize>,
    /// How long the burst section watches RSS after the flows closed.
    burst_wait: Duration,
    /// The burst section's allocators whose names contain one of these (all when unset).
    allocators: Option<Vec<String>>,
}

/// The sections `--only` can pick.
const SECTIONS: [&str; 9] =
    ["steering", "latency", "throughput", "parallel", "concurrent", "idle", "relay", "burst", "initials"];

/// The sections of the tunnel run (`tunnel.rs`), which share one setup.
const TUNNEL_SECTIONS: [&str; 6] = ["latency", "throughput", "parallel", "concurrent", "idle", "relay"];

impl Opts {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        connects: 5000,
        exchanges: 500,
        json: None,
        only: Vec::new(),
        workers: None,
        burst_wait: Duration::from_secs(60),
        allocators: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        let number = |v: String| v.parse::<usize>().with_context(|| format!("{a}: `{v}` is not a count"));
        match a.as_str() {
            "--rounds" => o.rounds = number(value()?)?,
            "--connects" => o.connects = number(value()?)?,
            "--exchanges" => o.exchanges = number(value()?)?,
            "--json" => o.json = Some(value()?.into()),
            "--workers" => o.workers = Some(number(value()?)?),
            "--burst-wait" => o.burst_wait = Duration::from_secs(number(value()?)? as u64),
            "--allocators" => o.allocators = Some(value()?.split(',').map(str::to_owned).collect()),
            "--only" => {
                for s in value()?.split(',') {
                    ensure!(
                        SECTIONS.contains(&s),
                        "--only: unknown section `{s}` (known: {})",
                        SECTIONS.join(", ")
                    );
                    o.only.push(s.to_owned());
                }
            }
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

fn main() -> std::process::ExitCode {
    // The error chain, not a backtrace: every message says what is wrong.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataplane-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let o = opts()?;
    tests::raise_nofile_limit(1 << 17);
    ensure!(nix::unistd::geteuid().is_root(), "the benchmark needs root");
    let mut json = serde_json::Map::new();
    if o.runs("steering") {
        json.insert("steering".into(), steering_section(&o)?);
    }
    if TUNNEL_SECTIONS.iter().any(|s| o.runs(s)) {
        json.insert("tunnel".into(), tunnel::run(&o)?);
    }
    if o.runs("burst") {
        json.insert("burst".into(), memory::run(&o)?);
    }
    if o.runs("initials") {
        json.insert("initials".into(), memory::initials(&o)?);
    }
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Steering alone: connect() costs and an exchange through the agent with a
/// `direct` upstream, against the same exchange unrouted.
fn steering_section(o: &Opts) -> Result<serde_json::Value> {
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
    // The verdict is what an application sees: the syscall, attached vs
    // detached; the programs' own run time below explains it.
    println!(
        "  target: unrouted connect() overhead <= 2 us: {unrouted_overhead:+.2} us -> {}",
        if unrouted_overhead <= 2.0 { "met" } else { "NOT met" }
    );
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
    Ok(json)
}
