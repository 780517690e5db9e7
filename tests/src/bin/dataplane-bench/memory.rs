//! Memory that comes back after a burst (`--only burst`): for each
//! allocator, fresh agents (as `dataplane` processes, so RSS is theirs)
//! hold 10,000 idle flows through the tunnel, close them, and have their
//! RSS sampled every second for `--burst-wait` seconds (60). The target: back
//! within 1.5x of the RSS at start within a minute. glibc runs as built
//! (with and without the agent's trim after bursts, `DATAPLANE_MALLOC_TRIM`);
//! jemalloc and mimalloc are preloaded (Debian's libjemalloc2 and
//! libmimalloc2.0; an arm whose library is missing is skipped, saying so).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use dataplane::process::ProcessStats;
use serde_json::json;
use tests::{
    agent_process::AgentProcess,
    tunnel_env::{CLIENT_ID, CONNECTOR_ID, Mode, STALLED_V4, TunnelEnv},
};

use super::Opts;

const FLOWS: usize = 10_000;
const TARGET: f64 = 1.5;
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";

struct Allocator {
    name: &'static str,
    preload: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
}

const ALLOCATORS: [Allocator; 6] = [
    Allocator { name: "glibc, no trim", preload: None, env: &[("DATAPLANE_MALLOC_TRIM", "0")] },
    Allocator { name: "glibc + trim (default)", preload: None, env: &[] },
    Allocator {
        name: "glibc + trim, 2 arenas",
        preload: None,
        env: &[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")],
    },
    Allocator { name: "jemalloc, 10 s decay", preload: Some(JEMALLOC), env: &[] },
    Allocator {
        name: "jemalloc, 1 s decay + bg",
        preload: Some(JEMALLOC),
        env: &[("MALLOC_CONF", "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000")],
    },
    Allocator { name: "mimalloc", preload: Some(MIMALLOC), env: &[] },
];

/// One agent's RSS through the burst.
#[derive(Clone, Copy, Debug, Default)]
struct Trace {
    start: u64,
    peak: u64,
    end: u64,
    /// Seconds after the flows closed until RSS was within the target.
    back_after: Option<f64>,
}

impl Trace {
    fn row(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let within = self.back_after.map_or("never".to_owned(), |s| format!("after {s:.0} s"));
        format!(
            "{:>5.1} -> {:>6.1} -> {:>5.1} MiB ({:.2}x; within {TARGET}x {within})",
            mib(self.start),
            mib(self.peak),
            mib(self.end),
            self.end as f64 / self.start.max(1) as f64
        )
    }
}

pub fn run(o: &Opts) -> Result<serde_json::Value> {
    println!(
        "\nmemory after a burst: {FLOWS} idle flows through the tunnel, closed, then RSS sampled for {} s; \
         start -> peak -> end, per agent",
        o.burst_wait.as_secs()
    );
    let mut rows = Vec::new();
    for a in ALLOCATORS
        .iter()
        .filter(|a| o.allocators.as_ref().is_none_or(|f| f.iter().any(|f| a.name.contains(f.as_str()))))
    {
        if let Some(lib) = a.preload
            && !Path::new(lib).exists()
        {
            println!(
                "  {:<26} skipped: {lib} is not installed (apt-get install libjemalloc2 libmimalloc2.0)",
                a.name
            );
            continue;
        }
        let (client, connector) = burst(a, o.burst_wait)?;
        println!("  {:<26} client    {}", a.name, client.row());
        println!("  {:<26} connector {}", "", connector.row());
        let json = |t: Trace| json!({ "start": t.start, "peak": t.peak, "end": t.end, "back_within_target_after_s": t.back_after });
        rows.push(json!({ "allocator": a.name, "client": json(client), "connector": json(connector) }));
    }
    Ok(json!({ "flows": FLOWS, "wait_s": o.burst_wait.as_secs(), "target": TARGET, "allocators": rows }))
}

fn burst(a: &Allocator, wait: Duration) -> Result<(Trace, Trace)> {
    let env = TunnelEnv::new()?;
    env.topo.remote.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    env.topo.pod.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let admin: SocketAddr = "127.0.0.1:9464".parse()?;
    let mode = Mode::ConnectorListens;
    let mut vars: Vec<(&str, &str)> = a.env.to_vec();
    if let Some(lib) = a.preload {
        vars.push(("LD_PRELOAD", lib));
    }
    // 10,000 flows from one pod: above the default per-workload cap, and
    // through one peer: above the default per-peer stream cap.
    let caps = "limits: { flows_per_workload: 20000, streams_per_peer: 20000 }\n";
    let connector_yaml = env.connector_config_text(mode, &env.tls("connector", CONNECTOR_ID, None)?) + caps;
    let connector = AgentProcess::start_with_env(
        &env.topo.remote,
        "connector",
        &connector_yaml,
        admin,
        env.dir(),
        &vars,
    )?;
    let client_yaml = env.client_config_text(mode, &env.tls("client", CLIENT_ID, None)?) + caps;
    let client =
        AgentProcess::start_with_env(&env.topo.node, "client", &client_yaml, admin, env.dir(), &vars)?;
    let pod = env.topo.pod_probe();
    let mut c = Trace { start: client.usage()?.rss_bytes, ..Default::default() };
    let mut k = Trace { start: connector.usage()?.rss_bytes, ..Default::default() };
    let sample = |c: &mut Trace, k: &mut Trace| -> Result<(ProcessStats, ProcessStats)> {
        let (now_c, now_k) = (client.usage()?, connector.usage()?);
        c.peak = c.peak.max(now_c.rss_bytes);
        k.peak = k.peak.max(now_k.rss_bytes);
        Ok((now_c, now_k))
    };

    let server = env.stalled_server()?;
    let held = pod.hold(STALLED_V4.parse()?, FLOWS)?;
    let open = Instant::now();
    while !(client.metric("dataplane_flows_active")? >= FLOWS as f64 && server.accepted() >= FLOWS) {
        ensure!(open.elapsed() < Duration::from_secs(120), "{}: flows did not open", a.name);
        sample(&mut c, &mut k)?;
        std::thread::sleep(Duration::from_millis(100));
    }
    sample(&mut c, &mut k)?;
    held.release();
    drop(server);
    let closed = Instant::now();
    while client.metric("dataplane_flows_active")? > 0.0 {
        ensure!(closed.elapsed() < Duration::from_secs(120), "{}: flows did not close", a.name);
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed = Instant::now();
    loop {
        let (now_c, now_k) = sample(&mut c, &mut k)?;
        let t = closed.elapsed().as_secs_f64();
        for (trace, now) in [(&mut c, now_c), (&mut k, now_k)] {
            trace.end = now.rss_bytes;
            let within = now.rss_bytes as f64 <= trace.start as f64 * TARGET;
            trace.back_after = match (trace.back_after, within) {
                (None, true) => Some(t),
                (_, false) => None,
                (kept, true) => kept,
            };
        }
        if closed.elapsed() >= wait {
            return Ok((c, k));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What strangers cost (`--only initials`): a connector agent (its own
/// process) before and after 10,000 QUIC Initials from 100 source ports,
/// none of which ever answers; then how long a real peer takes to connect.
pub fn initials(_o: &Opts) -> Result<serde_json::Value> {
    const INITIALS: usize = 10_000;
    let env = TunnelEnv::new()?;
    let admin: SocketAddr = "127.0.0.1:9464".parse()?;
    let mode = Mode::ConnectorListens;
    let connector_yaml = env.connector_config_text(mode, &env.tls("connector", CONNECTOR_ID, None)?);
    let connector = AgentProcess::start(&env.topo.remote, "connector", &connector_yaml, admin, env.dir())?;
    let paths = env.tls("stranger", CLIENT_ID, None)?;
    let tls = dataplane::tls::TlsMaterial::load(&dataplane::config::TlsFiles {
        ca: paths.ca,
        cert: paths.cert,
        key: paths.key,
    })?;
    let to: SocketAddr = "10.201.0.2:4433".parse()?;
    let packets = tests::flood::initials(INITIALS, &tls, CONNECTOR_ID, to);
    let before = connector.usage()?;
    let sent = Instant::now();
    let retries = env
        .topo
        .node
        .run(move || tests::flood::flood(&packets, 100, "10.201.0.1", to, Duration::from_millis(500)))?;
    let flooded = connector.usage()?;
    let settle = Instant::now();
    while connector.metric("dataplane_tunnel_handshakes_in_flight")? > 0.0 {
        ensure!(settle.elapsed() < Duration::from_secs(120), "handshakes did not drain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained = connector.usage()?;
    let drained_after = sent.elapsed();
    let client_yaml = env.client_config_text(mode, &env.tls("client", CLIENT_ID, None)?);
    let started = Instant::now();
    let client = AgentProcess::start(&env.topo.node, "client", &client_yaml, admin, env.dir())?;
    let connected = started.elapsed();
    drop(client);
    let mib = |p: ProcessStats| p.rss_bytes as f64 / 1048576.0;
    println!(
        "\nstrangers: {INITIALS} QUIC Initials from 100 source ports at a connector agent process ({retries} Retry \
         packets back)"
    );
    println!(
        "  RSS {:.1} MiB before, {:.1} right after, {:.1} once its handshakes drained ({:.1} s after the flood began); \
         CPU {:.2} s for the flood",
        mib(before),
        mib(flooded),
        mib(drained),
        drained_after.as_secs_f64(),
        drained.cpu_seconds - before.cpu_seconds
    );
    println!(
        "  a real peer's agent started and was ready (tunnel up) {:.0} ms later",
        connected.as_secs_f64() * 1e3
    );
    Ok(json!({
        "initials": INITIALS,
        "retries_seen": retries,
        "rss_before": before.rss_bytes,
        "rss_after": flooded.rss_bytes,
        "rss_drained": drained.rss_bytes,
        "cpu_seconds": drained.cpu_seconds - before.cpu_seconds,
        "peer_ready_ms": connected.as_secs_f64() * 1e3,
    }))
}
