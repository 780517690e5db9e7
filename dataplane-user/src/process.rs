//! The process itself: memory, CPU and descriptors from procfs, read at
//! scrape time, and the metrics every agent exports whatever its roles.
//! Components own their metrics (`FlowMetrics`, `TunnelMetrics`,
//! `ConnectorMetrics`, the kernel's `SteeringCollector`).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{MetricType, info::Info},
    registry::{Registry, Unit},
};

/// This process, from /proc/self.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = ProcessStats::read();
        encoder
            .encode_descriptor(
                "process_resident_memory",
                "Resident set size",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?
            .encode_gauge(&(p.rss_bytes as i64))?;
        encoder
            .encode_descriptor(
                "process_cpu",
                "User and system CPU time",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, f64>(&p.cpu_seconds, None)?;
        encoder
            .encode_descriptor("process_open_fds", "Open file descriptors", None, MetricType::Gauge)?
            .encode_gauge(&(p.open_fds as i64))?;
        Ok(())
    }
}

/// Memory, CPU and descriptors of a process.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessStats {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
}

impl ProcessStats {
    /// This process; zeros where procfs cannot be read.
    pub fn read() -> ProcessStats {
        Self::from_procfs("/proc/self").unwrap_or_default()
    }

    /// Another process (the benchmark reads the agents it runs); an error
    /// once it is gone.
    pub fn of_pid(pid: u32) -> std::io::Result<ProcessStats> {
        Self::from_procfs(&format!("/proc/{pid}"))
    }

    fn from_procfs(dir: &str) -> std::io::Result<ProcessStats> {
        let malformed =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{dir}/{what}"));
        // SAFETY: sysconf has no preconditions.
        let (page, ticks) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_CLK_TCK)) };
        let rss_pages = std::fs::read_to_string(format!("{dir}/statm"))?
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| malformed("statm"))?;
        // Fields after the command name, which may contain spaces: utime and
        // stime are the 12th and 13th.
        let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
        let cpu_ticks = (|| {
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })()
        .ok_or_else(|| malformed("stat"))?;
        let open_fds = std::fs::read_dir(format!("{dir}/fd"))?.count() as u64;
        Ok(ProcessStats {
            rss_bytes: rss_pages * page.max(1) as u64,
            cpu_seconds: cpu_ticks as f64 / ticks.max(1) as f64,
            open_fds,
        })
    }
}

/// Registers what every agent exports regardless of role.
pub fn register_common(registry: &mut Registry) {
    registry.register("build", "Build information", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
    registry.register_collector(Box::new(ProcessCollector));
}

/// The registry's text (OpenMetrics) encoding.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = ProcessStats::read();
        assert!(p.rss_bytes > 1 << 20, "{p:?}");
        assert!(p.open_fds >= 3, "{p:?}");
        let mut r = Registry::with_prefix("dataplane");
        register_common(&mut r);
        let text = encode(&r);
        for name in [
            "dataplane_build_info{version=",
            "dataplane_process_resident_memory_bytes ",
            "dataplane_process_cpu_seconds_total ",
        ] {
            assert!(text.contains(name), "{name} in:\n{text}");
        }
    }

    #[test]
    fn another_process_is_read_by_pid_and_a_gone_one_is_an_error() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("sleep");
        let p = ProcessStats::of_pid(child.id()).expect("a live child reads");
        assert!(p.rss_bytes > 0 && p.open_fds >= 1, "{p:?}");
        child.kill().expect("kill");
        child.wait().expect("reaped");
        assert!(ProcessStats::of_pid(child.id()).is_err(), "a reaped process is an error, not zeros");
    }
}
