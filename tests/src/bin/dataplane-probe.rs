//! A workload for the privileged tests: joins a cgroup and a network namespace
//! (in that order: `ip netns exec` would remount /sys and lose the cgroup
//! path), makes TCP or UDP connects, and prints what it saw as JSON.
//!
//! `dataplane-probe [--cgroup DIR] [--netns PATH] [--udp] [--repeat N] [--payload TEXT]
//!                  [--bind-port P] [--reset] ADDR`

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Socket, Type};
use tests::probe::{Attempt, Summary};

struct Args {
    cgroup: Option<String>,
    netns: Option<String>,
    udp: bool,
    repeat: usize,
    payload: String,
    bind_port: Option<u16>,
    reset: bool,
    addr: SocketAddr,
}

fn parse() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let (mut cgroup, mut netns, mut udp, mut repeat, mut payload, mut addr) =
        (None, None, false, 1, "hello through the dataplane".to_owned(), None);
    let (mut bind_port, mut reset) = (None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cgroup" => cgroup = Some(args.next().context("--cgroup needs a value")?),
            "--netns" => netns = Some(args.next().context("--netns needs a value")?),
            "--udp" => udp = true,
            "--repeat" => repeat = args.next().context("--repeat needs a value")?.parse()?,
            "--payload" => payload = args.next().context("--payload needs a value")?,
            "--bind-port" => bind_port = Some(args.next().context("--bind-port needs a value")?.parse()?),
            "--reset" => reset = true,
            other if other.starts_with("--") => bail!("unknown option {other}"),
            other => addr = Some(other.parse().with_context(|| format!("bad address {other}"))?),
        }
    }
    Ok(Args { cgroup, netns, udp, repeat, payload, bind_port, reset, addr: addr.context("missing ADDR")? })
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
    if args.udp {
        let sock = UdpSocket::bind(if args.addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sock.connect(args.addr)?;
        let peer = sock.peer_addr()?;
        println!(
            "{}",
            serde_json::to_string(&Attempt { ok: true, peer: Some(peer.to_string()), ..Default::default() })?
        );
        return Ok(());
    }
    if args.repeat == 1 {
        let a = attempt(args.addr, &args.payload, args.bind_port, args.reset);
        println!("{}", serde_json::to_string(&a)?);
        return Ok(());
    }
    let mut summary = Summary::default();
    for _ in 0..args.repeat {
        let a = attempt(args.addr, &args.payload, None, false);
        if a.ok {
            summary.ok += 1;
        } else {
            summary.failed += 1;
            summary.first_error = summary.first_error.or(a.error);
        }
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// connect, getpeername, send, half-close, read to the end; or with `reset`,
/// connect and close with RST at once.
fn attempt(addr: SocketAddr, payload: &str, bind_port: Option<u16>, reset: bool) -> Attempt {
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
        if reset {
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
