//! `cargo xtask`: developer tasks that need more than cargo: building the eBPF
//! object (and the toolchain it needs), the demo, the kernel matrix, the
//! supply-chain check, benchmarks, and the container image.

mod build_ebpf;
mod deny;
mod image;
mod vm_test;

use std::process::Command as Process;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "dataplane developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the eBPF object (installs nightly rust-src and a matching bpf-linker if missing).
    BuildEbpf(build_ebpf::Options),
    /// Run clippy on the eBPF crate for the BPF target, warnings denied.
    ClippyEbpf,
    /// Build everything and run the whole test suite (privileged tests need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the local demo: namespaces, the agent, a steered connection, counters (needs root).
    Demo,
    /// Run the privileged eBPF tests on Debian's 6.1 and 6.12 kernels under qemu (needs root).
    VmTest(vm_test::Options),
    /// Build the agent's OCI image with podman (FROM scratch: the binary and the libraries it links).
    Image(image::Options),
    /// cargo deny (advisories against the RustSec snapshot in supply-chain/, licences, duplicates, sources).
    Deny(deny::Options),
    /// Measure steering and the tunnel against baselines (release build, needs root); writes target/bench/bench.json.
    Bench {
        /// Extra arguments for dataplane-bench (--rounds, --connects, --exchanges, --only).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    // Print the error chain, not a backtrace: every message says what to run.
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::BuildEbpf(opts) => build_ebpf::run(&opts).map(|_| ()),
        Command::ClippyEbpf => build_ebpf::clippy(),
        Command::Test { args } => {
            build_ebpf::run(&build_ebpf::Options::default())?;
            // The fleet test's firewalls.
            ensure_package(&["nft", "--version"], "nftables", "the fleet test's firewalls")?;
            // The manifests' validators (tests/tests/deploy.rs).
            ensure_deploy_tools()?;
            // The image (and podman) tests/tests/podman.rs plays the manifests with.
            image::run(&image::Options { name: image::DEFAULT_NAME.into(), archive: None })?;
            cargo(&["test", "--workspace", "--no-fail-fast"], &args)
        }
        Command::Demo => {
            build_ebpf::run(&build_ebpf::Options::default())?;
            // The demo drives the probe (the pod's workload) and the agent
            // binary (`dataplane status`) beside it.
            cargo(&["build", "--quiet", "-p", "tests", "-p", "dataplane-user", "--bins"], &[])?;
            cargo(&["run", "--quiet", "-p", "tests", "--bin", "dataplane-demo"], &[])
        }
        Command::Deny(opts) => deny::run(&opts),
        Command::Image(opts) => {
            build_ebpf::run(&build_ebpf::Options::default())?;
            image::run(&opts).map(|_| ())
        }
        Command::VmTest(opts) => {
            build_ebpf::run(&build_ebpf::Options::default())?;
            vm_test::run(&opts)
        }
        Command::Bench { mut args } => {
            build_ebpf::run(&build_ebpf::Options::default())?;
            ensure_package(&["socat", "-V"], "socat", "the relay baseline")?;
            ensure_sshd()?;
            let out = build_ebpf::workspace_root().join("target/bench");
            std::fs::create_dir_all(&out)?;
            args.extend(["--json".into(), out.join("bench.json").display().to_string()]);
            // The bench drives the probe and the agent binaries beside it.
            cargo(&["build", "--quiet", "--release", "-p", "tests", "-p", "dataplane-user", "--bins"], &[])?;
            cargo(&["run", "--quiet", "--release", "-p", "tests", "--bin", "dataplane-bench", "--"], &args)
        }
    }
}

/// The manifest validators, from PyPI at pinned versions, in a virtualenv
/// under target/ (the tests find them there).
fn ensure_deploy_tools() -> Result<()> {
    const TOOLS: [&str; 2] = ["kubernetes-validate==1.37.0", "checkov==3.3.30"];
    let dir = build_ebpf::workspace_root().join("target/deploy-tools");
    let stamp = dir.join("installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == TOOLS.join("\n")) {
        return Ok(());
    }
    // This machine kind ships kubectl (with kustomize built in); Debian has no package of it.
    ensure!(
        Process::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success()),
        "kubectl is needed to render deploy/ (kubectl kustomize)"
    );
    eprintln!("xtask: installing {} into {}", TOOLS.join(", "), dir.display());
    let status =
        Process::new("python3").args(["-m", "venv"]).arg(&dir).status().context("python3 -m venv")?;
    ensure!(status.success(), "python3 -m venv {} failed", dir.display());
    let status = Process::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(TOOLS)
        .status()
        .context("pip install")?;
    ensure!(status.success(), "pip install {} failed", TOOLS.join(" "));
    std::fs::write(stamp, TOOLS.join("\n"))?;
    Ok(())
}

/// sshd and ssh for the bench's `ssh -L` baseline. The package would start
/// its service (sshd on the machine's port 22); a policy-rc.d refuses that
/// for the install, so only the bench's own sshd runs, in its namespace.
fn ensure_sshd() -> Result<()> {
    if std::path::Path::new("/usr/sbin/sshd").exists()
        && Process::new("ssh-keygen").arg("-?").output().is_ok()
    {
        return Ok(());
    }
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            policy,
            "#!/bin/sh\n# cargo xtask: no service starts while packages install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let installed = install_packages(&["openssh-server", "openssh-client"], "the ssh -L baseline");
    if ours {
        std::fs::remove_file(policy)?;
    }
    installed
}

/// Installs the Debian `package` (for `why`) unless `probe` runs.
fn ensure_package(probe: &[&str], package: &str, why: &str) -> Result<()> {
    if Process::new(probe[0]).args(&probe[1..]).output().is_ok() {
        return Ok(());
    }
    install_packages(&[package], why)
}

/// Installs Debian `packages` (for `why`): apt-get install, and once more
/// after an `apt-get update` (a fresh machine has no package lists).
fn install_packages(packages: &[&str], why: &str) -> Result<()> {
    let list = packages.join(" ");
    eprintln!("xtask: installing {list} ({why})");
    let apt = |args: &[&str]| {
        Process::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages);
    let ok = apt(&install) || (apt(&["update", "-qq"]) && apt(&install));
    ensure!(ok, "installing {list} failed; run `apt-get update && apt-get install {list}`");
    Ok(())
}

/// Runs the cargo that runs us, in the workspace root.
fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Process::new(&cargo)
        .current_dir(build_ebpf::workspace_root())
        .args(args)
        .args(extra)
        .status()
        .with_context(|| format!("running cargo {args:?}"))?;
    ensure!(status.success(), "cargo {} failed ({status})", args.join(" "));
    Ok(())
}
