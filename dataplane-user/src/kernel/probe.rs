//! What the running kernel offers, probed at start. A missing requirement is
//! an error that names the feature and the first kernel that has it; optional
//! features are reported and the agent does without.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// Oldest kernel the agent supports: cgroup getpeername hooks arrived in 5.8.
pub const MIN_KERNEL: (u8, u8) = (5, 8);
/// Kernels the privileged test suite runs on (`cargo xtask vm-test` and the host).
pub const TESTED_KERNELS: &str = "6.1, 6.12 and 6.18";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// A feature steering cannot work without.
    #[error(
        "kernel {release} lacks {feature} (first in Linux {}.{}); dataplane needs Linux {}.{} or newer (tested on {TESTED_KERNELS})",
        min.0, min.1, MIN_KERNEL.0, MIN_KERNEL.1
    )]
    Missing { feature: &'static str, min: (u8, u8), release: String },
    /// bpf() itself refused although the capabilities are there.
    #[error(
        "the bpf() system call is refused ({0}) although the agent holds CAP_BPF: a seccomp profile or an LSM blocks it (container runtimes' default seccomp profiles allow bpf() only with CAP_SYS_ADMIN; run the agent with seccompProfile Unconfined, as deploy/client does), the capabilities are held only inside a user namespace (a rootless or user-namespaced pod), or, before Linux 5.11, RLIMIT_MEMLOCK is too low"
    )]
    Blocked(String),
}

/// One requirement and whether the kernel has it.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub feature: &'static str,
    pub min: (u8, u8),
    pub present: bool,
}

/// The result of probing: what is there, for the start-up log.
#[derive(Clone, Debug)]
pub struct KernelFeatures {
    pub release: String,
    /// /sys/kernel/btf/vmlinux: not needed by these programs (no CO-RE), reported.
    pub btf: bool,
    /// BPF ring buffer (5.8): carries the programs' aya-log output.
    pub ring_buf: bool,
}

/// Probes the running kernel.
pub fn probe() -> Result<KernelFeatures, KernelError> {
    bpf_allowed()?;
    let release = nix_release();
    let version = KernelVersion::current().ok();
    let prog = |t| is_program_supported(t).unwrap_or(false);
    let map = |t| is_map_supported(t).unwrap_or(false);
    let checks = [
        Check {
            feature: "cgroup sock_addr programs",
            min: (4, 17),
            present: prog(ProgramType::CgroupSockAddr),
        },
        Check { feature: "sock_ops programs", min: (4, 13), present: prog(ProgramType::SockOps) },
        Check { feature: "LPM trie maps", min: (4, 11), present: map(MapType::LpmTrie) },
        Check { feature: "LRU hash maps", min: (4, 10), present: map(MapType::LruHash) },
        Check { feature: "per-CPU array maps", min: (4, 6), present: map(MapType::PerCpuArray) },
        // Attach types cannot be probed without attaching; go by version.
        Check {
            feature: "cgroup getpeername4/6 hooks",
            min: (5, 8),
            present: version.is_none_or(|v| v >= KernelVersion::new(5, 8, 0)),
        },
    ];
    evaluate(&release, &checks)?;
    Ok(KernelFeatures {
        release,
        btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        ring_buf: map(MapType::RingBuf),
    })
}

/// Whether bpf() works at all: one array map created and closed. Every
/// supported kernel has array maps, so EPERM here is a filter (seccomp,
/// LSM) rather than a missing feature, and would otherwise read as one.
fn bpf_allowed() -> Result<(), KernelError> {
    /// BPF_MAP_CREATE's attribute prefix: type, key size, value size, entries.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr =
        MapCreate { map_type: BPF_MAP_TYPE_ARRAY, key_size: 4, value_size: 4, max_entries: 1, rest: [0; 28] };
    // SAFETY: bpf(BPF_MAP_CREATE) reads `size_of::<MapCreate>()` bytes of
    // `attr`, which lives across the call; the returned fd is ours to close.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` was just returned to this process and is closed once.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // ENOSYS: some seccomp profiles answer a refused call so.
        Some(libc::EPERM | libc::ENOSYS) => Err(KernelError::Blocked(e.to_string())),
        // Anything else is for the probes below to name.
        _ => Ok(()),
    }
}

/// The first missing requirement, as an error.
pub fn evaluate(release: &str, checks: &[Check]) -> Result<(), KernelError> {
    match checks.iter().find(|c| !c.present) {
        Some(c) => Err(KernelError::Missing { feature: c.feature, min: c.min, release: release.to_owned() }),
        None => Ok(()),
    }
}

fn nix_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_requirement_names_feature_and_kernel() {
        let checks = [
            Check { feature: "sock_ops programs", min: (4, 13), present: true },
            Check { feature: "cgroup getpeername4/6 hooks", min: (5, 8), present: false },
        ];
        let err = evaluate("5.4.0-150-generic", &checks).expect_err("5.4 lacks getpeername hooks");
        let text = err.to_string();
        assert!(text.contains("5.4.0-150-generic") && text.contains("getpeername4/6"), "{text}");
        assert!(text.contains("first in Linux 5.8") && text.contains("needs Linux 5.8 or newer"), "{text}");
        assert!(evaluate("6.1.0", &checks[..1]).is_ok());
    }

    #[test]
    fn this_kernel_has_everything_required() {
        // The host runs the privileged suite, so it must pass its own probe.
        // Probing loads programs: that needs CAP_BPF (CI runs as root).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: probing the kernel needs root");
            return;
        }
        let f = probe().expect("this kernel is supported");
        assert!(!f.release.is_empty());
    }
}
