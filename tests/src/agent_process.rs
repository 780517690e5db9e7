//! The `dataplane` binary run as its own process in a namespace, as a node
//! would run it: the benchmark measures the real agent (its runtime, its
//! allocator, its memory and CPU time alone) rather than an in-process copy.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use dataplane::process::ProcessStats;

use crate::Netns;

/// The `dataplane` binary beside the running test binary (built by `cargo
/// xtask bench`), or `DATAPLANE_BIN`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DATAPLANE_BIN") {
        return p.into();
    }
    crate::probe::probe_bin().with_file_name("dataplane")
}

/// How an agent process is started: extra environment, the endpoint that
/// must answer 200 before it counts as started, and a command it runs under
/// (program and arguments before the agent's own; empty: none).
struct Launch<'a> {
    env: &'a [(&'a str, &'a str)],
    until: &'static str,
    wrapper: &'a [String],
}

/// A running agent process; SIGTERM and wait on drop.
pub struct AgentProcess {
    child: Child,
    ns: PathBuf,
    admin: SocketAddr,
    pub log: PathBuf,
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
        Self::start_with_env(ns, name, config, admin, dir, &[])
    }

    /// [`AgentProcess::start`] with more environment (an allocator to
    /// preload, its settings).
    pub fn start_with_env(
        ns: &Netns,
        name: &str,
        config: &str,
        admin: SocketAddr,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        Self::launch(ns, name, config, admin, dir, Launch { env, until: "/ready", wrapper: &[] })
    }

    /// [`AgentProcess::start`] with only the capabilities `caps` (e.g.
    /// `["bpf", "net_admin"]`), as a container granted exactly those runs it:
    /// every other capability is out of its bounding set.
    pub fn start_with_caps(
        ns: &Netns,
        name: &str,
        config: &str,
        admin: SocketAddr,
        dir: &Path,
        caps: &[&str],
    ) -> Result<AgentProcess> {
        let bounding: String = caps.iter().map(|c| format!(",+{c}")).collect();
        let wrapper = [
            "setpriv".to_owned(),
            "--inh-caps=-all".into(),
            format!("--bounding-set=-all{bounding}"),
            "--".into(),
        ];
        Self::launch(ns, name, config, admin, dir, Launch { env: &[], until: "/ready", wrapper: &wrapper })
    }

    /// [`AgentProcess::start_with_env`] returning once the agent is up
    /// (`/healthz`), ready or not: a relay or connector that waits for the
    /// other to come up.
    pub fn spawn(
        ns: &Netns,
        name: &str,
        config: &str,
        admin: SocketAddr,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        Self::launch(ns, name, config, admin, dir, Launch { env, until: "/healthz", wrapper: &[] })
    }

    fn launch(
        ns: &Netns,
        name: &str,
        config: &str,
        admin: SocketAddr,
        dir: &Path,
        how: Launch<'_>,
    ) -> Result<AgentProcess> {
        let Launch { env, until, wrapper } = how;
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, format!("{config}admin: '{admin}'\n"))?;
        // DATAPLANE_BENCH_LOGS keeps the agents' logs (at DATAPLANE_LOG's
        // level, default warn) in a directory that outlives the run.
        let logs = std::env::var_os("DATAPLANE_BENCH_LOGS").map_or_else(|| dir.to_owned(), PathBuf::from);
        let log = logs.join(format!("{name}.log"));
        let netns =
            std::fs::File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        cmd.args(["agent", "--config"])
            .arg(&path)
            .env("DATAPLANE_LOG", std::env::var("DATAPLANE_LOG").unwrap_or_else(|_| "warn".into()))
            .envs(env.iter().copied())
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
            let ready = agent.get(until);
            if ready.as_ref().is_ok_and(|(code, _)| *code == 200) {
                return Ok(agent);
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20 * crate::time_scale()),
                "agent {name}: no 200 from {until} ({ready:?}): {}",
                agent.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and returns at once (the agent drains on its own).
    pub fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// SIGKILL, as the OOM killer or a node's crash would end it; reaped.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `within`) for the agent to exit; its status.
    pub fn wait_exit(mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(start.elapsed() < within, "agent still running after {within:?}: {}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `/ready` answers 200 now.
    pub fn is_ready(&self) -> bool {
        self.get("/ready").is_ok_and(|(code, _)| code == 200)
    }

    /// `/status`, as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self.get("/status")?;
        ensure!(code == 200, "/status answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    /// CPU time so far and RSS now.
    pub fn usage(&self) -> Result<ProcessStats> {
        ProcessStats::of_pid(self.pid()).with_context(|| format!("reading /proc/{}", self.pid()))
    }

    /// The value of an unlabelled metric (e.g. `dataplane_flows_active`).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = self.get("/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        crate::metric_sample(&body, name).with_context(|| format!("no metric {name}"))
    }

    /// The whole `/metrics` text.
    pub fn metrics_text(&self) -> Result<String> {
        let (code, body) = self.get("/metrics")?;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }

    /// A GET against the admin server, from inside the namespace.
    fn get(&self, path: &'static str) -> Result<(u16, String)> {
        let admin = self.admin;
        Ok(crate::run_in(&self.ns, move || dataplane::admin::client::get(admin, path))??)
    }

    pub fn log_tail(&self) -> String {
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
