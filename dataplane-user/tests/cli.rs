//! The `dataplane` binary's contract with operators: exit codes and messages.

use std::process::Command;

fn dataplane(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane")).args(args).output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p.to_string_lossy().into_owned()
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("routes: [{ cidr: 198.51.100.1/24, via: direct }]", "routes[0].cidr"),
        ("routes: [{ cidr: 10.0.0.0/8, via: direct, extra: 1 }]", "unknown field `extra`"),
        ("routes: []", "routes"),
        ("routes: [{ cidr: 10.0.0.0/8, via: direct }, { cidr: 10.1.0.0/16, via: direct }]", "overlaps"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("c{i}.yaml"), text);
        for sub in ["agent", "check"] {
            let (code, out) = dataplane(&[sub, "--config", &path]);
            assert_eq!(code, 64, "{sub} {text}: {out}");
            assert!(out.contains(needle), "{sub} {text}: expected `{needle}` in: {out}");
            assert!(!out.contains("panicked") && !out.contains("backtrace"), "{out}");
        }
    }
    let (code, out) = dataplane(&["agent", "--config", "/nonexistent/dataplane.yaml"]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("/nonexistent/dataplane.yaml"), "{out}");
}

#[test]
fn check_accepts_a_good_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "good.yaml", "routes: [{ cidr: 198.51.100.101/32, via: direct }]\n");
    let (code, out) = dataplane(&["check", "--config", &path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid (1 routes)"), "{out}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let (code, out) = dataplane(&["agent"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--config"), "{out}");
    let (code, out) = dataplane(&["agent", "--config", "x", "--reload-interval", "often"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("reload-interval"), "{out}");
}

/// `dataplane cert`: a certificate valid for no time is refused, a good one is
/// written with its key private.
#[test]
fn cert_refuses_zero_days_and_writes_private_keys() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ca = ca.to_str().expect("utf-8");
    let (code, out) = dataplane(&["cert", "ca", "--out", ca, "--days", "0"]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("--days 0"), "{out}");
    let (code, out) = dataplane(&["cert", "ca", "--out", ca]);
    assert_eq!(code, 0, "{out}");
    let node = dir.path().join("node");
    let node = node.to_str().expect("utf-8");
    let issue = ["cert", "issue", "--ca", ca, "--identity", "spiffe://t/n", "--out", node];
    let (code, out) = dataplane(&[&issue[..], &["--days", "0"]].concat());
    assert_eq!(code, 64, "{out}");
    let (code, out) = dataplane(&issue);
    assert_eq!(code, 0, "{out}");
    let mode = std::fs::metadata(dir.path().join("node/tls.key")).expect("key").permissions().mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
}

/// Serves one canned HTTP response on a loopback port.
fn one_shot_server(body: &'static str) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    addr
}

const STATUS: &str = r#"{"node":"worker-9","version":"0.1.0",
 "readiness":{"ready":false,"missing":[{"what":"198.51.100.101/32","peer":"private","reason":"no live tunnel connection"}]},
 "steering":{"attached":true,"cgroup":"/sys/fs/cgroup","route_entries_v4":1,"route_entries_v6":0},
 "routes":[{"cidr":"198.51.100.101/32","via":"private","ready":false}],
 "peers":[{"name":"private","identity":"spiffe://t/c","dialed":true,"live_connections":0,"rtt_ms":null,"streams_opened":7}],
 "serves":[],
 "flows":{"accepted":9,"unrecovered":0,"route_gone":0,"dial_failed":0,"no_tunnel":2,"refused_by_peer":0,"failed":0,"completed":7,"active":0,"bytes_up":1,"bytes_down":2},
 "process":{"rss_bytes":10485760,"cpu_seconds":1.5,"open_fds":12}}"#;

#[test]
fn status_prints_a_table_or_json() {
    let (code, out) = dataplane(&["status", "--admin", &one_shot_server(STATUS).to_string()]);
    assert_eq!(code, 0, "{out}");
    for needle in
        ["node worker-9", "ready: NO", "not ready: 198.51.100.101/32 via private", "we do", "completed 7"]
    {
        assert!(out.contains(needle), "`{needle}` in:\n{out}");
    }
    let (code, out) = dataplane(&["status", "--json", "--admin", &one_shot_server(STATUS).to_string()]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("the agent's JSON, as is");
    assert_eq!(v["flows"]["no_tunnel"], 2);
}

#[test]
fn status_of_a_stopped_agent_is_a_one_line_error() {
    // Nothing listens on port 1.
    let (code, out) = dataplane(&["status", "--admin", "127.0.0.1:1"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(out.contains("cannot reach the agent's admin API at 127.0.0.1:1"), "{out}");
    let (code, out) = dataplane(&["status", "--admin", "not-an-address"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--admin"), "{out}");
}

#[test]
fn logs_are_json_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Valid, but the agent cannot start: /proc is not a cgroup v2 directory.
    let path = write(
        &dir,
        "c.yaml",
        "admin: null\nlog: { format: json }\nsteering: { cgroup: /proc }\nroutes: [{ cidr: 198.51.100.101/32, via: direct }]\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_dataplane"))
        .args(["agent", "--config", &path])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(v["fields"]["message"].as_str().is_some_and(|m| m.contains("steering.cgroup")), "{line}");
}
