//! What the `evil-peer` binary reports, and running it in a namespace.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::tunnel_env::TlsPaths;

/// One phase's streams and how each was answered: a status label
/// (`ok`, `over_stream_cap`, ...) or what went wrong (`no_answer`, `open`,
/// `read`, `no_stream_credit`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    pub opened: usize,
    pub answers: BTreeMap<String, usize>,
    pub secs: f64,
}

impl Phase {
    pub fn count(&self, answer: &str) -> usize {
        self.answers.get(answer).copied().unwrap_or(0)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub connections_welcomed: usize,
    /// Connections that were not welcomed, by close reason.
    pub connections_closed: BTreeMap<String, usize>,
    pub stalled: Phase,
    pub streams: Phase,
    /// When the certificate the first welcomed connection's acceptor
    /// presented stops being valid (Unix seconds).
    #[serde(default)]
    pub acceptor_not_after: Option<u64>,
    /// With `control_garbage`: how the connection was closed.
    #[serde(default)]
    pub control_closed: Option<String>,
}

/// What to make the evil peer do.
pub struct Attack<'a> {
    pub connect: SocketAddr,
    pub expect: &'a str,
    pub connections: usize,
    pub stalled: usize,
    pub streams: usize,
    pub dst: Option<SocketAddr>,
    /// After the streams, break the control protocol on the first connection.
    pub control_garbage: bool,
}

impl Attack<'_> {
    /// A peer that dials once: one connection, and one stream to `dst` if
    /// given (tests of a single handshake or a single dial).
    pub fn dial_once<'a>(connect: SocketAddr, expect: &'a str, dst: Option<SocketAddr>) -> Attack<'a> {
        Attack {
            connect,
            expect,
            connections: 1,
            stalled: 0,
            streams: usize::from(dst.is_some()),
            dst,
            control_garbage: false,
        }
    }
}

/// Runs the evil peer in `netns` to the end and returns its report.
pub fn run(netns: &Path, tls: &TlsPaths, attack: &Attack<'_>) -> Result<Report> {
    finish(spawn(netns, tls, attack)?)
}

/// The binary, next to the test executables (this crate's [[bin]]).
fn bin() -> std::path::PathBuf {
    crate::probe::probe_bin().with_file_name("evil-peer")
}

/// Spawns the evil peer in `netns` with `tls`; returns the running child
/// (its report is on stdout, read by [`finish`]).
pub fn spawn(netns: &Path, tls: &TlsPaths, attack: &Attack<'_>) -> Result<std::process::Child> {
    let mut cmd = Command::new(bin());
    cmd.arg("--netns").arg(netns).arg("--connect").arg(attack.connect.to_string());
    cmd.arg("--ca").arg(&tls.ca).arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
    cmd.args(["--expect", attack.expect]);
    cmd.args(["--connections", &attack.connections.to_string()]);
    cmd.args(["--stalled", &attack.stalled.to_string(), "--streams", &attack.streams.to_string()]);
    if let Some(dst) = attack.dst {
        cmd.args(["--dst", &dst.to_string()]);
    }
    if attack.control_garbage {
        cmd.arg("--control-garbage");
    }
    cmd.stdout(std::process::Stdio::piped()).spawn().context("spawning evil-peer")
}

/// Waits for the evil peer and parses its report.
pub fn finish(child: std::process::Child) -> Result<Report> {
    let out = child.wait_with_output().context("waiting for evil-peer")?;
    if !out.status.success() {
        bail!("evil-peer failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("evil-peer said {}", String::from_utf8_lossy(&out.stdout)))
}
