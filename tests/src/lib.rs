//! Harness for the privileged tests: network namespaces and child cgroups that
//! clean up through Drop, a pod/node/server topology joined by veth pairs, an
//! echo server that reports who connected, and the agent run in process inside
//! the node namespace.

pub mod agent_process;
pub mod apiserver;
pub mod baselines;
pub mod evil;
pub mod fleet;
pub mod flood;
pub mod kube_api;
pub mod pods;
pub mod probe;
pub mod standin;
pub mod topology;
pub mod tunnel_env;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

/// A name unique to this process and call, short enough for interface names.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{:x}{:x}", std::process::id() % 0xfff, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command and fails with its stderr if it fails.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        sh(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Writes a sysctl inside the namespace (procfs follows the thread's netns).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {path}")))?
    }

    /// Runs `f` on a thread that entered this namespace; threads it spawns
    /// (a tokio runtime's workers) are in the namespace too.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        spawn_in(&self.path(), f)
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        run_in(&self.path(), f)
    }
}

/// [`Netns::spawn`] for a namespace known by its path.
pub fn spawn_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let entered = nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET);
        let ok = entered.is_ok();
        let _ = tx.send(entered);
        assert!(ok, "setns failed");
        f()
    });
    rx.recv().context("namespace thread died")?.context("setns")?;
    Ok(handle)
}

/// [`Netns::run`] for a namespace known by its path.
pub fn run_in<T: Send + 'static>(path: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    spawn_in(path, f)?.join().map_err(|_| anyhow::anyhow!("thread in {} panicked", path.display()))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// The value of one sample line (name and exact labels) in a Prometheus scrape.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

/// A listener with a deep backlog (bursts of connects must not overflow it
/// and fall back to SYN retransmits, which would dominate any measurement).
pub fn listen(addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Accepts on `listener` until `stop` is set, handing each connection to
/// `handle`. Waits in poll(2), so a connection is accepted the moment it
/// arrives and `stop` is noticed within 50 ms.
pub fn accept_until(
    listener: std::net::TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    mut handle: impl FnMut(std::net::TcpStream, std::net::SocketAddr),
) {
    use std::os::fd::AsRawFd;
    let _ = listener.set_nonblocking(true);
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: pfd is a valid pollfd for the listener, which outlives the call.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, 50) };
        if ready <= 0 {
            continue;
        }
        while let Ok((conn, peer)) = listener.accept() {
            let _ = conn.set_nonblocking(false);
            handle(conn, peer);
        }
    }
}

/// The cgroup v2 mount point of this host.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    dataplane::kernel::cgroup::cgroup2_mount(&mountinfo)
        .context("no cgroup2 mount: these tests need cgroup v2")
}

/// A child cgroup created for one test; on drop its processes are killed and
/// it is removed. The programs attach here, never to the host's root.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Cgroup> {
        let path = cgroup2_root()?.join(format!("dataplane-test-{name}"));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for pid in self.procs() {
            if pid as u32 != std::process::id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// Moves this whole process into `cgroup` until dropped (then back to where it
/// was). Only for a test binary that holds a single test.
pub struct JoinedCgroup {
    previous: PathBuf,
}

impl JoinedCgroup {
    pub fn join(cgroup: &Path) -> Result<JoinedCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel =
            own.lines().find_map(|l| l.strip_prefix("0::")).context("process has no cgroup v2 membership")?;
        let previous = cgroup2_root()?.join(rel.trim_start_matches('/'));
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(JoinedCgroup { previous })
    }
}

impl Drop for JoinedCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.previous.join("cgroup.procs"), std::process::id().to_string());
    }
}

/// Skips (with the reason) when not root: these tests need CAP_BPF,
/// CAP_NET_ADMIN and CAP_SYS_ADMIN. CI runs as root, so they always run there.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    false
}

/// Raises RLIMIT_NOFILE (soft and hard; root may raise the hard limit) to at
/// least `want`: benchmarks hold tens of thousands of sockets in one process.
pub fn raise_nofile_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: the rlimits are valid for the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let top = lim.rlim_max.max(want);
        let raised = libc::rlimit { rlim_cur: top, rlim_max: top };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not allowed to raise the hard limit: take what it permits.
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A directory on bpffs for one test's pinned steering (bpffs is mounted
/// at /sys/fs/bpf first if it is not); removed, with all it pins, on drop.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn new() -> Result<PinRoot> {
        let base = Path::new("/sys/fs/bpf");
        let mounted = std::fs::read_to_string("/proc/self/mounts")?
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"])?;
        }
        let dir = base.join(format!("dataplane-test-{}", unique_id()));
        std::fs::create_dir_all(&dir)?;
        Ok(PinRoot(dir))
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A latency bound a test asserts, in microseconds, scaled by
/// `DATAPLANE_TEST_TIME_SCALE` (default 1). The bounds are set for a real
/// machine; under an emulated CPU (`cargo xtask vm-test` sets the scale)
/// everything runs several times slower. Bounds stay well under the timeouts
/// whose expiry they rule out (a hang would still fail them).
pub fn fast_us(us: u64) -> u64 {
    us * time_scale()
}

/// `d` stretched by [`time_scale`]: a bound on a wait, for slow machines.
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    d * time_scale() as u32
}

/// Bytes a big transfer moves: `DATAPLANE_TEST_BULK_MIB` (the emulated
/// kernels' runs set a few), by default 256 MiB.
pub fn bulk_bytes() -> u64 {
    let mib = std::env::var("DATAPLANE_TEST_BULK_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256u64);
    mib << 20
}

/// `DATAPLANE_TEST_TIME_SCALE`, at least 1: how much slower than a real
/// machine this one is taken to be.
pub fn time_scale() -> u64 {
    let scale = std::env::var("DATAPLANE_TEST_TIME_SCALE").ok().and_then(|v| v.parse::<u64>().ok());
    scale.unwrap_or(1).max(1)
}

/// Polls `done` every 20 ms until it holds; panics naming `what` if it does
/// not within `within`.
pub fn wait_for(what: &str, within: std::time::Duration, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until the agent has no active flows. An application sees a flow end
/// (the FIN the agent passes on) a moment before the agent's flow task has
/// finished and counted it; checks of the totals wait for that.
pub fn wait_flows_settled(handle: &dataplane::app::AgentHandle) {
    let start = std::time::Instant::now();
    while handle.flow_stats().active > 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "flows still active: {:?}",
            handle.flow_stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
