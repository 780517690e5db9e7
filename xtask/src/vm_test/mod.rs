//! `cargo xtask vm-test`: the privileged eBPF tests on Debian's own kernels,
//! booted under qemu (TCG) with the host's root mounted read-only over 9p, so
//! the host-built test binaries run unchanged in the guest.
//!
//! Per kernel: resolve the newest package of the series with apt, download and
//! unpack it (never into the host's /boot), extract the uncompressed vmlinux
//! (booted through its PVH entry: no decompression under TCG), build a small
//! initramfs (static busybox, the 9p/overlay/veth/dummy/ifb modules with their
//! dependencies), all cached under target/vm/. Then boot it, run the tests, and
//! report passed / failed (with the test output) / could not boot (with the
//! console tail).
//!
//! Inside: `kernel` (package, vmlinux), `initramfs`, `guest` (test binaries,
//! the script, its results); here the command and the boot.

mod guest;
mod initramfs;
mod kernel;

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::build_ebpf::workspace_root;
use guest::{Suite, build_test_binaries, guest_script, parse_suites};
use kernel::{Kernel, prepare_kernel, resolve_package};

#[derive(clap::Args)]
pub struct Options {
    /// Kernel series to test (Debian package families).
    #[arg(long = "kernel", default_values = ["6.1", "6.12"])]
    pub kernels: Vec<String>,
    /// Wall-clock limit per kernel, in seconds (boot, tests, power-off).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Only run tests whose name contains this (a filter that matches no
    /// test is an error, not a pass).
    #[arg(long)]
    pub filter: Option<String>,
}

enum Outcome {
    Passed(Vec<Suite>),
    Failed(Vec<Suite>, String),
    NoBoot(String),
}

pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    ensure_host_tools()?;
    let binaries = build_test_binaries(&root)?;
    let script = vm_dir.join("tests.sh");
    fs::write(&script, guest_script(&binaries, opts.filter.as_deref()))?;

    let mut results = Vec::new();
    for series in &opts.kernels {
        let sources = kernel::sources_for(&vm_dir, series)?;
        let pkg = resolve_package(series, &sources)?;
        let started = Instant::now();
        let kernel = prepare_kernel(&vm_dir, &pkg, &sources).with_context(|| format!("preparing {pkg}"))?;
        let outcome = boot(&kernel, &script, Duration::from_secs(opts.timeout))?;
        results.push((series.clone(), pkg, outcome, started.elapsed()));
    }

    println!("\nkernel matrix:");
    let mut failed = false;
    for (series, pkg, outcome, took) in &results {
        let verdict = match outcome {
            Outcome::Passed(_) => "passed".to_owned(),
            Outcome::Failed(..) => "FAILED".to_owned(),
            Outcome::NoBoot(_) => "COULD NOT BOOT".to_owned(),
        };
        println!("  {series:<6} {pkg:<34} {verdict:<15} {:>6.1}s", took.as_secs_f64());
        if let Outcome::Passed(suites) | Outcome::Failed(suites, _) = outcome {
            for s in suites {
                println!(
                    "         {:<20} {:>3} passed {:>3} failed {:>5}s{}",
                    s.name,
                    s.passed,
                    s.failed,
                    s.secs,
                    if s.rc == 0 { String::new() } else { format!("  (exit {})", s.rc) }
                );
            }
        }
        match outcome {
            Outcome::Passed(_) => {}
            Outcome::Failed(_, log) => {
                failed = true;
                println!("--- test output on {pkg} ---\n{log}\n---");
            }
            Outcome::NoBoot(tail) => {
                failed = true;
                println!("--- console tail on {pkg} ---\n{tail}\n---");
            }
        }
    }
    ensure!(!failed, "the kernel matrix failed (see above)");
    Ok(())
}

fn ensure_host_tools() -> Result<()> {
    let have_qemu =
        Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    let have_busybox = Path::new("/bin/busybox").is_file();
    if have_qemu && have_busybox {
        return Ok(());
    }
    eprintln!("xtask: installing qemu-system-x86 and busybox-static");
    apt(&["update", "-qq"])?;
    apt(&["install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86", "busybox-static"])
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get (the VM tests need root and Debian's apt)")?;
    ensure!(status.success(), "apt-get {} failed ({status}); run it by hand to see why", args.join(" "));
    Ok(())
}

fn boot(kernel: &Kernel, script: &Path, limit: Duration) -> Result<Outcome> {
    let console = kernel.dir.join("console.log");
    let result = kernel.dir.join("result.log");
    let _ = fs::remove_file(&console);
    let _ = fs::remove_file(&result);
    eprintln!("xtask: booting {} under qemu (TCG)", kernel.pkg);
    let mut child = Command::new("qemu-system-x86_64")
        // Nested /dev/kvm does not boot stock kernels here; single-threaded
        // TCG avoids a 6.12 crash seen with multi-threaded TCG.
        .args(["-accel", "tcg,thread=single", "-m", "2048", "-smp", "1", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(&kernel.initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 rdinit=/init quiet dataplane.tests={}", script.display()))
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", result.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let started = Instant::now();
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = fs::read_to_string(&result).unwrap_or_default();
    let tail = |path: &Path| {
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    if !log.contains("=== BOOTED") {
        let why = if timed_out { format!("no userspace within {limit:?}") } else { "qemu exited".into() };
        return Ok(Outcome::NoBoot(format!("{why}\n{}", tail(&console))));
    }
    let suites = parse_suites(&log);
    let ran: u32 = suites.iter().map(|s| s.passed + s.failed).sum();
    let all_ok = !suites.is_empty() && suites.iter().all(|s| s.rc == 0) && log.contains("=== DONE");
    if all_ok && ran > 0 {
        return Ok(Outcome::Passed(suites));
    }
    let mut report = log.clone();
    if timed_out {
        report += &format!("\n(timed out after {limit:?})");
    }
    if all_ok && ran == 0 {
        report += "\n(no test ran: a --filter that matches nothing is a failure, not a pass)";
    }
    Ok(Outcome::Failed(suites, report))
}
