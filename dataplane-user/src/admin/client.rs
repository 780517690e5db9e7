//! The client side of the admin API, for `dataplane status`: fetch a running
//! agent's /status and show it as a table (or JSON). Errors are one line:
//! the address and what went wrong.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use super::model::Status;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the agent's admin API at {addr}: {source} (is the agent running with `admin: {addr}`?)"
    )]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("reading {addr}/status: {reason}")]
    Read { addr: SocketAddr, reason: String },
}

/// GETs a path from the admin API; returns (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), StatusError> {
    let timeout = Duration::from_secs(3);
    let read = |reason: String| StatusError::Read { addr, reason };
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| StatusError::Connect { addr, source })?;
    s.set_read_timeout(Some(timeout)).map_err(|e| read(e.to_string()))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .map_err(|e| read(e.to_string()))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| read(e.to_string()))?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| read("not an HTTP response".into()))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| read("no status code".into()))?;
    Ok((code, body.to_owned()))
}

/// Fetches and parses /status.
pub fn fetch(addr: SocketAddr) -> Result<(Status, String), StatusError> {
    let (code, body) = get(addr, "/status")?;
    if code != 200 {
        return Err(StatusError::Read { addr, reason: format!("HTTP {code}") });
    }
    let status =
        serde_json::from_str(&body).map_err(|e| StatusError::Read { addr, reason: e.to_string() })?;
    Ok((status, body))
}

/// The human-readable table.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let ready = if s.readiness.ready { "yes" } else { "NO" };
    out += &format!("node {}   version {}   ready: {ready}\n", s.node, s.version);
    match &s.steering {
        Some(st) => {
            out += &format!(
                "steering: {} at {} ({} IPv4 + {} IPv6 routes in the kernel; refusals read {})\n",
                if st.attached { "attached" } else { "DETACHED" },
                st.cgroup,
                st.route_entries_v4,
                st.route_entries_v6,
                st.refusal
            );
            if let Some(p) = &st.pinned {
                let age = now_unix().saturating_sub(p.since_unix);
                out += &format!("pinned: {} (layout v{}, for {})\n", p.path, p.layout, age_text(age));
            }
        }
        None => out += "steering: none (this agent routes nothing)\n",
    }
    for m in &s.readiness.missing {
        out += &format!(
            "  not ready: {} {}({})\n",
            m.what,
            m.peer.as_ref().map(|p| format!("via {p} ")).unwrap_or_default(),
            m.reason
        );
    }
    for m in &s.readiness.degraded {
        out += &format!("  degraded: {} ({})\n", m.what, m.reason);
    }
    if !s.peers.is_empty() {
        out += &format!(
            "\n{:<20} {:<52} {:<7} {:>5} {:>9} {:>8}\n",
            "PEER", "IDENTITY", "DIALS", "CONNS", "RTT", "STREAMS"
        );
        for p in &s.peers {
            let rtt = p.rtt_ms.map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into());
            let dials = if p.dialed { "we do" } else { "it does" };
            out += &format!(
                "{:<20} {:<52} {:<7} {:>5} {:>9} {:>8}\n",
                p.name, p.identity, dials, p.live_connections, rtt, p.streams_opened
            );
        }
    }
    if !s.routes.is_empty() {
        out +=
            &format!("\n{:<24} {:<20} {:<8} {:<6} {}\n", "ROUTE", "VIA", "SOURCE", "READY", "ADVERTISED BY");
        for r in &s.routes {
            out += &format!(
                "{:<24} {:<20} {:<8} {:<6} {}\n",
                r.cidr,
                r.via,
                r.source,
                if r.ready { "yes" } else { "NO" },
                r.advertisers.join(", ")
            );
        }
    }
    for r in &s.refused_routes {
        out += &format!("refused learned route {}: {}\n", r.what, r.reason);
    }
    if !s.serves.is_empty() {
        out += &format!("\nSERVES\n{}\n", s.serves.join("\n"));
    }
    if let Some(d) = &s.discovery {
        let state = match (&d.error, d.synced) {
            (Some(e), _) => format!("FAILING: {e}"),
            (None, true) => "watching".to_owned(),
            (None, false) => "listing".to_owned(),
        };
        out += &format!("kubernetes discovery: {state}; {} endpoints", d.endpoints.len());
        if d.skipped > 0 {
            out += &format!(" ({} addresses skipped)", d.skipped);
        }
        out += "\n";
        for e in &d.endpoints {
            out += &format!("  {e}\n");
        }
    }
    let f = &s.flows;
    out += &format!(
        "\nflows: accepted {} active {} completed {} client reset {} idle {} failed {} | no tunnel {} refused by peer {} dial failed {} over workload cap {} unrecovered {} | bytes up {} down {}\n",
        f.accepted,
        f.active,
        f.completed,
        f.client_reset,
        f.idle,
        f.failed,
        f.no_tunnel,
        f.refused_by_peer,
        f.dial_failed,
        f.over_workload_cap,
        f.unrecovered,
        f.bytes_up,
        f.bytes_down
    );
    let r = &s.reloads;
    out += &format!("reloads: applied {} refused {}\n", r.applied, r.refused);
    if let Some(last) = &r.last_refusal {
        out += &format!("last refused reload (unix time {}): {}\n", last.at_unix, last.error);
    }
    out += &format!(
        "process: rss {:.1} MiB, cpu {:.2} s, {} fds\n",
        s.process.rss_bytes as f64 / (1 << 20) as f64,
        s.process.cpu_seconds,
        s.process.open_fds
    );
    out
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `3d 4h`, `2h 5m`, `7m 12s`, `40s`.
fn age_text(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}
