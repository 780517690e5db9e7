//! Running the `dataplane-probe` workload and reading what it reports.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One connect as the probe saw it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Attempt {
    pub ok: bool,
    /// getpeername() of the connected socket.
    pub peer: Option<String>,
    /// Everything the server sent.
    pub response: String,
    pub error: Option<String>,
    pub elapsed_us: u64,
}

impl Attempt {
    /// The address the server saw the connection come from (`peer=` line).
    pub fn server_saw(&self) -> Option<SocketAddr> {
        self.header_field("peer=")
    }

    /// The server address the connection actually reached (`local=`).
    pub fn reached(&self) -> Option<SocketAddr> {
        self.header_field("local=")
    }

    fn header_field(&self, name: &str) -> Option<SocketAddr> {
        let line = self.response.lines().next()?;
        line.split_whitespace().find_map(|f| f.strip_prefix(name))?.parse().ok()
    }

    /// The connection was cut with an error the application sees at once:
    /// a reset, seen on read (ECONNRESET) or on write (EPIPE) depending on
    /// which came first, or a refusal.
    pub fn was_reset(&self) -> bool {
        let e = self.error.as_deref().unwrap_or_default();
        // ENOTCONN: the reset came between connect() and getpeername().
        !self.ok
            && (e.contains("reset")
                || e.contains("Broken pipe")
                || e.contains("not connected")
                || self.was_refused())
    }

    /// connect() was refused: ECONNREFUSED, or EPERM where the kernel's
    /// connect hooks cannot set the error (no `bpf_set_retval` before 5.18:
    /// the agent's refusal in the hook then reads EPERM).
    pub fn was_refused(&self) -> bool {
        let e = self.error.as_deref().unwrap_or_default();
        !self.ok && (e.contains("refused") || e.contains("Operation not permitted"))
    }

    /// The echoed payload.
    pub fn echoed(&self) -> &str {
        self.response.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
    }
}

/// The result of a `--bulk` transfer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Bulk {
    pub ok: bool,
    pub sent: u64,
    pub received: u64,
    /// Every byte echoed back equals the byte sent at its offset.
    pub echo_intact: bool,
    pub secs: f64,
    pub error: Option<String>,
}

/// Per-exchange latencies of a `--latencies` run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latencies {
    pub latencies_us: Vec<f64>,
    pub failed: u64,
    /// Wall time of the whole run.
    #[serde(default)]
    pub secs: f64,
}

/// A `--refusals` run: how long each refused connect() took to fail, and
/// the attempts that did something else.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Refusals {
    /// How long each refused connect() took (ECONNREFUSED or EPERM).
    pub refused_us: Vec<f64>,
    /// How many of them failed with EPERM: a kernel whose connect hooks
    /// cannot call `bpf_set_retval` (before 5.18).
    #[serde(default)]
    pub eperm: u64,
    pub other: u64,
    pub first_other: Option<String>,
}

/// A `--tick` run: new connects at a steady pace while something changes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ticks {
    /// Connected and echoed.
    pub ok: u64,
    /// connect() failed with ECONNREFUSED (or ECONNRESET: the handshake
    /// was queued on a listener that closed).
    pub refused: u64,
    pub slowest_refusal_us: f64,
    /// connect() failed otherwise, or hung (3 s).
    pub failed: u64,
    pub first_failure: Option<String>,
    /// Connected, then the exchange failed (reset, or a wrong answer).
    pub broken: u64,
    pub first_broken: Option<String>,
    /// The longest a served connect and exchange took.
    #[serde(default)]
    pub slowest_ok_us: f64,
    /// When the last attempt that was not served started (ms since the epoch).
    #[serde(default)]
    pub last_failure_at_ms: Option<u128>,
}

impl Ticks {
    /// After a kill at `killed_at_ms` (ms since the epoch): no flow failed
    /// later than 1 s after it (scaled, [`crate::fast_us`]), none failed at
    /// all, and none took a second.
    pub fn assert_no_late_failure(&self, what: &str, killed_at_ms: u128) {
        let second = crate::fast_us(1_000_000);
        if let Some(at) = self.last_failure_at_ms {
            assert!(
                at <= killed_at_ms + u128::from(second / 1000),
                "{what}: a flow failed {} ms after the kill: {self:?}",
                at.saturating_sub(killed_at_ms)
            );
        }
        assert_eq!((self.refused, self.failed, self.broken), (0, 0, 0), "{what}: {self:?}");
        assert!(self.slowest_ok_us < second as f64, "{what}: {self:?}");
    }
}

/// Totals of a `--repeat` run.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Milliseconds since the epoch when the first failed attempt started.
    #[serde(default)]
    pub first_error_at_ms: Option<u128>,
    /// When each successful attempt started, in milliseconds since the epoch
    /// (tests check that attempts overlapped a window of theirs).
    #[serde(default)]
    pub ok_at_ms: Vec<u128>,
}

/// A workload process placed in a cgroup and a network namespace.
pub struct Probe {
    pub cgroup: Option<PathBuf>,
    pub netns: PathBuf,
}

/// The probe binary: built by cargo next to the test binaries' `deps/` folder
/// (this crate's [[bin]]), or wherever DATAPLANE_PROBE points.
pub fn probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_PROBE") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir: &Path = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    dir.join("dataplane-probe")
}

impl Probe {
    fn command(&self, extra: &[&str], addr: SocketAddr) -> Command {
        let mut cmd = Command::new(probe_bin());
        if let Some(cg) = &self.cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        cmd.arg("--netns").arg(&self.netns).args(extra).arg(addr.to_string());
        cmd
    }

    fn run<T: for<'de> Deserialize<'de>>(&self, extra: &[&str], addr: SocketAddr) -> Result<T> {
        let out = self.command(extra, addr).output().context("running dataplane-probe")?;
        if !out.status.success() {
            bail!("dataplane-probe failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("probe output: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// `n` connects expected to be refused (ECONNREFUSED), timed.
    pub fn refusals(&self, addr: SocketAddr, n: usize) -> Result<Refusals> {
        self.run(&["--refusals", &n.to_string()], addr)
    }

    /// One TCP connect + exchange.
    pub fn connect(&self, addr: SocketAddr) -> Result<Attempt> {
        self.run(&[], addr)
    }

    /// Connects from a fixed source port, then resets at once (no exchange).
    pub fn connect_and_reset(&self, addr: SocketAddr, port: u16) -> Result<Attempt> {
        self.run(&["--bind-port", &port.to_string(), "--reset"], addr)
    }

    /// One exchange from a fixed source port.
    pub fn connect_from(&self, addr: SocketAddr, port: u16) -> Result<Attempt> {
        self.run(&["--bind-port", &port.to_string()], addr)
    }

    /// One UDP connect (no traffic).
    pub fn udp_connect(&self, addr: SocketAddr) -> Result<Attempt> {
        self.run(&["--udp"], addr)
    }

    /// `n` sequential TCP exchanges.
    pub fn repeat(&self, addr: SocketAddr, n: usize) -> Result<Summary> {
        self.run(&["--repeat", &n.to_string()], addr)
    }

    /// Writes to a peer until a write blocks for a second (at most `limit`
    /// bytes); returns how much the path accepted.
    pub fn fill(&self, addr: SocketAddr, limit: u64) -> Result<u64> {
        let v: serde_json::Value = self.run(&["--fill", &limit.to_string()], addr)?;
        v["written"].as_u64().context("probe printed no `written`")
    }

    /// `n` sequential exchanges of 100 bytes, each timed.
    pub fn latencies(&self, addr: SocketAddr, n: usize) -> Result<Latencies> {
        self.run(&["--latencies", &n.to_string()], addr)
    }

    /// `n` exchanges of 100 bytes from `workers` concurrent loops.
    pub fn concurrent_latencies(&self, addr: SocketAddr, n: usize, workers: usize) -> Result<Latencies> {
        self.run(&["--latencies", &n.to_string(), "--concurrency", &workers.to_string()], addr)
    }

    /// Opens `n` idle connections and keeps them until the returned child's
    /// stdin is closed (drop it, or call [`Held::release`]).
    pub fn hold(&self, addr: SocketAddr, n: usize) -> Result<Held> {
        self.hold_with(addr, n, &[])
    }

    /// [`Probe::hold`], each connection sending the payload first (no FIN):
    /// an application that then resets, as iperf3 ends its tests.
    pub fn hold_sending(&self, addr: SocketAddr, n: usize) -> Result<Held> {
        self.hold_with(addr, n, &["--send-first"])
    }

    fn hold_with(&self, addr: SocketAddr, n: usize, extra: &[&str]) -> Result<Held> {
        use std::io::BufRead;
        let count = n.to_string();
        let mut args = vec!["--hold", &count];
        args.extend_from_slice(extra);
        let mut child = self
            .command(&args, addr)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning dataplane-probe")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("probe said {line:?}"))?;
        anyhow::ensure!(v["held"].as_u64() == Some(n as u64), "probe held {line}");
        Ok(Held(child))
    }

    /// Starts connecting to `addr` every `every_ms` (`--tick`) until the
    /// returned [`Ticker`] is finished.
    pub fn tick(&self, addr: SocketAddr, every_ms: u64) -> Result<Ticker> {
        use std::io::BufRead;
        let every = every_ms.to_string();
        let mut child = self
            .command(&["--tick", &every], addr)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning dataplane-probe")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        anyhow::ensure!(line.contains("ticking"), "probe said {line:?}");
        Ok(Ticker { child, stdout })
    }

    /// Sends `bytes` through an echo server and back, comparing digests.
    pub fn bulk(&self, addr: SocketAddr, bytes: u64) -> Result<Bulk> {
        self.run(&["--bulk", &bytes.to_string()], addr)
    }

    /// Runs `program args` as the workload (in the cgroup and namespace).
    pub fn exec(&self, program: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<std::process::Output> {
        let mut cmd = Command::new(probe_bin());
        if let Some(cg) = &self.cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        cmd.arg("--netns").arg(&self.netns).arg("--exec").arg(program).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().with_context(|| format!("running {program} as the workload"))
    }

    /// Starts `n` sequential exchanges in the background.
    pub fn spawn_repeat(&self, addr: SocketAddr, n: usize) -> Result<std::process::Child> {
        self.command(&["--repeat", &n.to_string()], addr)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning dataplane-probe")
    }
}

/// Reads the summary of a probe started with [`Probe::spawn_repeat`].
pub fn wait_summary(child: std::process::Child) -> Result<Summary> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("dataplane-probe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Idle connections held open by a probe process.
pub struct Held(std::process::Child);

impl Held {
    pub fn release(mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// A running `--tick` probe.
pub struct Ticker {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Ticker {
    /// Stops the loop and returns what it counted.
    pub fn finish(mut self) -> Result<Ticks> {
        use std::io::Read;
        drop(self.child.stdin.take());
        let mut text = String::new();
        self.stdout.read_to_string(&mut text)?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "probe exited with {status}: {text}");
        serde_json::from_str(text.trim()).with_context(|| format!("probe said {text:?}"))
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
