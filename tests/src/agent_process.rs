//! The `dataplane` binary run as its own process in a namespace, as a node
//! would run it: the benchmark measures the real agent (its runtime, its
//! allocator, its memory and CPU time alone) rather than an in-process copy.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::Netns;

/// The `dataplane` binary beside the running test binary (built by `cargo
/// xtask bench`), or `DATAPLANE_BIN`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_BIN") {
        return p.into();
    }
    crate::probe::probe_bin().with_file_name("dataplane")
}

/// A running agent process; SIGTERM and wait on drop.
pub struct AgentProcess {
    child: Child,
    ns: PathBuf,
    admin: SocketAddr,
    pub log: PathBuf,
}

/// CPU time and resident memory of a process, from procfs.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessUsage {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

impl AgentProcess {
    /// Writes `config` (YAML; `admin:` is appended) into `dir`, starts
    /// the agent in `ns` and waits until `/ready` answers 200.
    pub fn start(
        ns: &Netns,
        name: &str,
        config: &str,
        admin: SocketAddr,
        dir: &Path,
    ) -> Result<AgentProcess> {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, format!("{config}admin: '{admin}'\n"))?;
        // DATAPLANE_BENCH_LOGS keeps the agents' logs (at DATAPLANE_LOG's
        // level, default warn) in a directory that outlives the run.
        let logs = std::env::var_os("DATAPLANE_BENCH_LOGS").map_or_else(|| dir.to_owned(), PathBuf::from);
        let log = logs.join(format!("{name}.log"));
        let netns =
            std::fs::File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        let mut cmd = Command::new(agent_bin());
        cmd.args(["agent", "--config"])
            .arg(&path)
            .env("DATAPLANE_LOG", std::env::var("DATAPLANE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?.try_clone()?);
        // Only the network namespace changes: `ip netns exec` would remount
        // /sys, hiding the cgroup2 mount the agent attaches to.
        // SAFETY: setns is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", agent_bin().display()))?;
        let mut agent = AgentProcess { child, ns: ns.path(), admin, log };
        let start = Instant::now();
        loop {
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent {name} exited with {status}: {}", agent.log_tail());
            }
            if agent.get("/ready").is_ok_and(|(code, _)| code == 200) {
                return Ok(agent);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "agent {name} not ready: {}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time so far and RSS now.
    pub fn usage(&self) -> Result<ProcessUsage> {
        process_usage(self.pid())
    }

    /// The value of an unlabelled metric (e.g. `dataplane_flows_active`).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = self.get("/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("no metric {name}"))
    }

    /// A plain HTTP/1.0 GET against the admin server, from inside the namespace.
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let (admin, request) = (self.admin, format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n"));
        let reply = crate::run_in(&self.ns, move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })??;
        let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no HTTP status")?;
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime (all threads) and VmRSS of `pid`.
pub fn process_usage(pid: u32) -> Result<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may hold spaces: state is field 3,
    // utime 14 and stime 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(ProcessUsage { cpu_secs: ticks / hz, rss_bytes: rss_kib * 1024 })
}
