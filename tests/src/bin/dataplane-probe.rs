//! A workload for the privileged tests: joins a cgroup and a network namespace
//! (in that order: `ip netns exec` would remount /sys and lose the cgroup
//! path), makes TCP or UDP connects, and prints what it saw as JSON.
//!
//! `dataplane-probe [--cgroup DIR] [--netns PATH] [--udp] [--repeat N] [--payload TEXT]
//!                  [--bind-port P] [--reset] [--bulk BYTES] ADDR`
//! `dataplane-probe [--cgroup DIR] [--netns PATH] --exec PROGRAM ARGS...` runs a
//! program (kubectl) as the workload.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};
use tests::probe::{Attempt, Bulk, Summary};

struct Args {
    cgroup: Option<String>,
    netns: Option<String>,
    udp: bool,
    repeat: usize,
    payload: String,
    bind_port: Option<u16>,
    reset: bool,
    bulk: Option<u64>,
    latencies: Option<usize>,
    /// Connects expected to be refused: how long until connect() failed.
    refusals: Option<usize>,
    concurrency: usize,
    /// Connects every this many milliseconds until stdin closes.
    tick: Option<u64>,
    hold: Option<usize>,
    /// With --hold: each connection sends the payload first (no FIN).
    send_first: bool,
    fill: Option<u64>,
    exec: Vec<String>,
    addr: Option<SocketAddr>,
}

fn parse() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns, mut udp, mut repeat, mut payload, mut addr) =
        (None, None, false, 1, "hello through the dataplane".to_owned(), None);
    let (mut bind_port, mut reset, mut bulk, mut exec) = (None, false, None, Vec::new());
    let (mut latencies, mut fill, mut concurrency, mut hold, mut tick) = (None, None, 1usize, None, None);
    let mut refusals = None;
    let mut send_first = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cgroup" => cgroup = Some(args.next().context("--cgroup needs a value")?),
            "--netns" => netns = Some(args.next().context("--netns needs a value")?),
            "--udp" => udp = true,
            "--repeat" => repeat = args.next().context("--repeat needs a value")?.parse()?,
            "--payload" => payload = args.next().context("--payload needs a value")?,
            "--bind-port" => bind_port = Some(args.next().context("--bind-port needs a value")?.parse()?),
            "--reset" => reset = true,
            "--bulk" => bulk = Some(args.next().context("--bulk needs a value")?.parse()?),
            "--latencies" => latencies = Some(args.next().context("--latencies needs a value")?.parse()?),
            "--refusals" => refusals = Some(args.next().context("--refusals needs a value")?.parse()?),
            "--fill" => fill = Some(args.next().context("--fill needs a value")?.parse()?),
            "--concurrency" => concurrency = args.next().context("--concurrency needs a value")?.parse()?,
            "--hold" => hold = Some(args.next().context("--hold needs a value")?.parse()?),
            "--tick" => tick = Some(args.next().context("--tick needs a value")?.parse()?),
            "--send-first" => send_first = true,
            "--exec" => {
                exec = args.by_ref().collect();
                break;
            }
            other if other.starts_with("--") => bail!("unknown option {other}"),
            other => addr = Some(other.parse().with_context(|| format!("bad address {other}"))?),
        }
    }
    if exec.is_empty() && addr.is_none() {
        bail!("missing ADDR");
    }
    Ok(Args {
        cgroup,
        netns,
        udp,
        repeat,
        payload,
        bind_port,
        reset,
        bulk,
        latencies,
        refusals,
        concurrency,
        tick,
        hold,
        send_first,
        fill,
        exec,
        addr,
    })
}

fn main() -> Result<()> {
    let args = parse()?;
    if let Some(cg) = &args.cgroup {
        std::fs::write(format!("{cg}/cgroup.procs"), "0").with_context(|| format!("joining cgroup {cg}"))?;
    }
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(ns).with_context(|| format!("opening {ns}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {ns}"))?;
    }
    if let Some((program, rest)) = args.exec.split_first() {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(program).args(rest).exec();
        bail!("exec {program}: {err}");
    }
    let addr = args.addr.context("missing ADDR")?;
    if let Some(bytes) = args.bulk {
        println!("{}", serde_json::to_string(&bulk(addr, bytes))?);
        return Ok(());
    }
    if let Some(limit) = args.fill {
        // Writes until a write blocks for a second (or `limit` bytes went).
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(1)))?;
        let block = vec![0x5au8; 64 * 1024];
        let mut written = 0u64;
        while written < limit {
            match s.write(&block) {
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        println!("{}", serde_json::json!({ "written": written }));
        return Ok(());
    }
    if let Some(hold) = args.hold {
        // Opens `hold` idle connections, says so, and keeps them until stdin closes.
        raise_nofile_limit();
        let mut held = Vec::with_capacity(hold);
        for _ in 0..hold {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            if args.send_first {
                s.write_all(args.payload.as_bytes())?;
            }
            held.push(s);
        }
        println!("{}", serde_json::json!({ "held": held.len() }));
        std::io::stdout().flush()?;
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
        // Closed with RST: thousands of FIN closes would leave as many
        // TIME_WAIT entries toward the agent's one listener address, the
        // ports the benchmark's later flows need.
        for s in &held {
            socket2::SockRef::from(s).set_linger(Some(Duration::ZERO))?;
        }
        return Ok(());
    }
    if let Some(every) = args.tick {
        println!("{}", serde_json::to_string(&tick(addr, &args.payload, Duration::from_millis(every))?)?);
        return Ok(());
    }
    if let Some(n) = args.refusals {
        let mut out = tests::probe::Refusals::default();
        for _ in 0..n {
            let t = Instant::now();
            match TcpStream::connect(addr) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    out.refused_us.push(t.elapsed().as_secs_f64() * 1e6)
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    out.refused_us.push(t.elapsed().as_secs_f64() * 1e6);
                    out.eperm += 1;
                }
                Err(e) => {
                    out.other += 1;
                    out.first_other.get_or_insert_with(|| e.to_string());
                }
                Ok(_) => {
                    out.other += 1;
                    out.first_other.get_or_insert_with(|| "connected".to_owned());
                }
            }
        }
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if let Some(n) = args.latencies {
        // 100-byte requests, as the benchmark's other exchange arms, from
        // `concurrency` workers at once.
        let payload = "x".repeat(100);
        let started = Instant::now();
        let workers: Vec<_> = (0..args.concurrency.max(1))
            .map(|w| {
                let payload = payload.clone();
                let share = n / args.concurrency.max(1) + usize::from(w < n % args.concurrency.max(1));
                std::thread::spawn(move || {
                    let mut out = tests::probe::Latencies::default();
                    for _ in 0..share {
                        let a = attempt(addr, &payload, None, Close::Graceful);
                        if a.ok && a.echoed() == payload {
                            out.latencies_us.push(a.elapsed_us as f64);
                        } else {
                            out.failed += 1;
                        }
                    }
                    out
                })
            })
            .collect();
        let mut out = tests::probe::Latencies::default();
        for w in workers {
            let part = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
            out.latencies_us.extend(part.latencies_us);
            out.failed += part.failed;
        }
        out.secs = started.elapsed().as_secs_f64();
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let args = Args { addr: Some(addr), ..args };
    if args.udp {
        let sock = UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.connect(addr)?;
        let peer = sock.peer_addr()?;
        println!(
            "{}",
            serde_json::to_string(&Attempt { ok: true, peer: Some(peer.to_string()), ..Default::default() })?
        );
        return Ok(());
    }
    if args.repeat == 1 {
        let close = if args.reset { Close::ResetAtOnce } else { Close::Graceful };
        let a = attempt(addr, &args.payload, args.bind_port, close);
        println!("{}", serde_json::to_string(&a)?);
        return Ok(());
    }
    let mut summary = Summary::default();
    for _ in 0..args.repeat {
        let started =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let a = attempt(addr, &args.payload, None, Close::Graceful);
        if a.ok {
            summary.ok += 1;
            summary.ok_at_ms.push(started);
        } else {
            summary.failed += 1;
            summary.first_error_at_ms = summary.first_error_at_ms.or(Some(started));
            summary.first_error = summary.first_error.or(a.error);
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// A new connect (and an exchange) every `every` until stdin closes (or
/// 10 minutes, a bound), each classified: served, refused at connect(), a
/// connect that hung or failed otherwise, or an exchange broken after it
/// connected. A second thread watches stdin so a hung attempt cannot keep
/// the loop from ending.
fn tick(addr: SocketAddr, payload: &str, every: Duration) -> Result<tests::probe::Ticks> {
    const LIMIT: Duration = Duration::from_secs(600);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = done.clone();
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
        watcher.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    println!("{}", serde_json::json!({ "ticking": true }));
    std::io::stdout().flush()?;
    let mut out = tests::probe::Ticks::default();
    let started = Instant::now();
    let mut next = Instant::now();
    while !done.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < LIMIT {
        let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let sock = Socket::new(domain, Type::STREAM, None)?;
        let t = Instant::now();
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
        let connected = sock.connect_timeout(&addr.into(), Duration::from_secs(3));
        let took_us = t.elapsed().as_secs_f64() * 1e6;
        match connected {
            // A reset during connect(): the handshake landed in the queue
            // of a listener that was closing (its agent killed) and the
            // kernel refused it from there; as fast as a refusal, and
            // counted as one.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                out.refused += 1;
                out.last_failure_at_ms = Some(at_ms);
                out.slowest_refusal_us = out.slowest_refusal_us.max(took_us);
            }
            Err(e) => {
                out.failed += 1;
                out.last_failure_at_ms = Some(at_ms);
                out.first_failure.get_or_insert_with(|| format!("connect: {e} after {took_us:.0} us"));
            }
            Ok(()) => {
                let mut s: TcpStream = sock.into();
                let exchange = (|| -> std::io::Result<String> {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(payload.as_bytes())?;
                    s.shutdown(Shutdown::Write)?;
                    let mut response = String::new();
                    s.read_to_string(&mut response)?;
                    Ok(response)
                })();
                match exchange {
                    Ok(r) if r.ends_with(payload) => {
                        out.ok += 1;
                        out.slowest_ok_us = out.slowest_ok_us.max(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok(r) => {
                        out.broken += 1;
                        out.last_failure_at_ms = Some(at_ms);
                        out.first_broken.get_or_insert_with(|| format!("answer {r:?}"));
                    }
                    Err(e) => {
                        out.broken += 1;
                        out.last_failure_at_ms = Some(at_ms);
                        out.first_broken.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
    Ok(out)
}

/// How an attempt ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Send, half-close, read to the end, close.
    Graceful,
    /// Connect and close with RST at once (no exchange).
    ResetAtOnce,
}

/// connect, getpeername, then as `close` says.
fn attempt(addr: SocketAddr, payload: &str, bind_port: Option<u16>, close: Close) -> Attempt {
    let start = Instant::now();
    let mut out = Attempt::default();
    let result = (|| -> std::io::Result<()> {
        let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let sock = Socket::new(domain, Type::STREAM, None)?;
        if let Some(port) = bind_port {
            // Reusing a port right after an RST close is what the test is about.
            sock.set_reuse_address(true)?;
            let any: SocketAddr =
                if addr.is_ipv4() { ([0, 0, 0, 0], port).into() } else { ([0u16; 8], port).into() };
            sock.bind(&any.into())?;
        }
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        let mut s: TcpStream = sock.into();
        out.peer = Some(s.peer_addr()?.to_string());
        if close == Close::ResetAtOnce {
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(payload.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        out.response = response;
        Ok(())
    })();
    out.elapsed_us = start.elapsed().as_micros() as u64;
    match result {
        Ok(()) => out.ok = true,
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

/// Sends `bytes` of a pseudo-random pattern to an echo server while reading
/// the echo back, and checks every byte against the pattern at its offset.
/// The pattern's length is prime, so a lost, repeated or reordered block
/// shows as a mismatch; checking costs a memcmp, a fraction of what hashing
/// would take from the CPU the measured path shares with this process.
fn bulk(addr: SocketAddr, bytes: u64) -> Bulk {
    const PATTERN_LEN: usize = 1_048_573;
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    let pattern: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..PATTERN_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    );
    let start = Instant::now();
    let run = || -> std::io::Result<Bulk> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut writer = s.try_clone()?;
        let out = pattern.clone();
        let sender = std::thread::spawn(move || -> std::io::Result<()> {
            let (mut offset, mut left) = (0usize, bytes);
            while left > 0 {
                let n = (left.min(64 * 1024) as usize).min(PATTERN_LEN - offset);
                writer.write_all(&out[offset..offset + n])?;
                offset = (offset + n) % PATTERN_LEN;
                left -= n as u64;
            }
            writer.shutdown(Shutdown::Write)
        });
        let mut reader = std::io::BufReader::with_capacity(256 * 1024, s);
        let mut header = String::new();
        std::io::BufRead::read_line(&mut reader, &mut header)?;
        let (mut received, mut intact, mut offset) = (0u64, true, 0usize);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let mut got = &buf[..n];
            while !got.is_empty() {
                let k = got.len().min(PATTERN_LEN - offset);
                intact &= got[..k] == pattern[offset..offset + k];
                offset = (offset + k) % PATTERN_LEN;
                got = &got[k..];
            }
            received += n as u64;
        }
        sender.join().map_err(|_| std::io::Error::other("sender panicked"))??;
        Ok(Bulk { ok: true, sent: bytes, received, echo_intact: intact, ..Default::default() })
    };
    let mut out = run().unwrap_or_else(|e| Bulk { error: Some(e.to_string()), ..Default::default() });
    out.secs = start.elapsed().as_secs_f64();
    out
}

/// Holding thousands of connections needs more than the default limits.
fn raise_nofile_limit() {
    tests::raise_nofile_limit(1 << 17);
}
