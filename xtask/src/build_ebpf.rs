//! `cargo xtask build-ebpf`: makes sure the eBPF toolchain is present (nightly
//! rust-src, a bpf-linker built against the nightly's own libLLVM) and builds
//! the BTF-carrying object the agent embeds.
//!
//! Every step that can fail says what failed and what to run by hand.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

/// bpf-linker release built by this task; bump deliberately.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the eBPF crate (needs -Z build-std).
const NIGHTLY: &str = "nightly";

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build without optimisations (the verifier rarely accepts these; for debugging only).
    #[arg(long)]
    pub debug: bool,
}

/// Facts about the installed nightly that decide which bpf-linker we need.
struct Nightly {
    sysroot: PathBuf,
    llvm_major: String,
    commit: String,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").into()
}

/// Where the embedded object lands; dataplane-user's build.rs reads the same path.
pub fn object_path(root: &Path, debug: bool) -> PathBuf {
    let profile = if debug { "debug" } else { "release" };
    root.join("target/ebpf/bpfel-unknown-none").join(profile).join("dataplane-ebpf")
}

/// Runs the whole task and returns the object's path.
pub fn run(opts: &Options) -> Result<PathBuf> {
    let root = workspace_root();
    let nightly = probe_nightly()?;
    ensure_rust_src(&nightly)?;
    let linker_dir = ensure_bpf_linker(&nightly)?;
    build_object(&root, &linker_dir, opts.debug)
}

/// A Command with the variables that cargo/rustup set for *this* build removed,
/// so the nested build picks its own toolchain.
fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn output_of(cmd: &mut Command, what: &str, fix: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: could not run {cmd:?}; {fix}"))?;
    ensure!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}\n{fix}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn status_of(cmd: &mut Command, what: &str, fix: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("{what}: could not run {cmd:?}; {fix}"))?;
    ensure!(status.success(), "{what}: {cmd:?} failed ({status}); {fix}");
    Ok(())
}

fn probe_nightly() -> Result<Nightly> {
    let fix = "install the nightly toolchain: `rustup toolchain install nightly` \
               (this project expects the machine's preinstalled nightly)";
    let vv = output_of(
        clean_command("rustup").args(["run", NIGHTLY, "rustc", "-vV"]),
        "probing the nightly rustc",
        fix,
    )?;
    let field = |name: &str| {
        vv.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("`rustc +nightly -vV` printed no `{name}` line:\n{vv}"))
    };
    let llvm = field("LLVM version:")?;
    let llvm_major = llvm.split('.').next().unwrap_or_default().to_owned();
    ensure!(llvm_major.parse::<u32>().is_ok(), "unexpected LLVM version `{llvm}` from nightly rustc");
    let commit = field("commit-hash:")?;
    let sysroot = output_of(
        clean_command("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]),
        "finding the nightly sysroot",
        fix,
    )?;
    Ok(Nightly { sysroot: PathBuf::from(sysroot.trim()), llvm_major, commit })
}

fn ensure_rust_src(n: &Nightly) -> Result<()> {
    if n.sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src for {NIGHTLY} (needed by -Z build-std)");
    status_of(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        "installing rust-src",
        "run `rustup component add rust-src --toolchain nightly` and check network access to the rustup dist server",
    )
}

/// Directory for tools that outlive `cargo clean` and checkouts.
fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("DATAPLANE_TOOLS_DIR") {
        return Ok(dir.into());
    }
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env::var_os("HOME").context("HOME is not set; set DATAPLANE_TOOLS_DIR")?)
            .join(".cache"),
    };
    Ok(base.join("dataplane"))
}

/// Returns the directory holding `bpf-linker`, building it if missing or built
/// for another nightly. It links rustc's own libLLVM (no LLVM packages of that
/// major exist for this Debian), through a prefix whose RUNPATH the binary keeps.
fn ensure_bpf_linker(n: &Nightly) -> Result<PathBuf> {
    let short = &n.commit[..n.commit.len().min(12)];
    let home = cache_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{}-{short}", n.llvm_major));
    let bin_dir = home.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file() {
        let ok = Command::new(&linker).arg("--version").output().map(|o| o.status.success());
        if matches!(ok, Ok(true)) {
            return Ok(bin_dir);
        }
        eprintln!("xtask: {} does not run; rebuilding it", linker.display());
    }

    let libllvm = fs::read_dir(n.sysroot.join("lib"))
        .with_context(|| format!("reading {}/lib", n.sysroot.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            name.starts_with("libLLVM.so.") && p.is_file()
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}/lib: the nightly toolchain ships no shared LLVM; \
                 reinstall it with `rustup toolchain install nightly --force`",
                n.sysroot.display()
            )
        })?;
    let prefix = home.join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let soname = libllvm.file_name().context("libLLVM path has no file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }

    let feature = format!("llvm-{}", n.llvm_major);
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against rustc's libLLVM ({feature}); about a minute"
    );
    status_of(
        clean_command("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
            .args(["--no-default-features", "--features", &feature, "--root"])
            .arg(&home)
            .env("LLVM_PREFIX", &prefix),
        "building bpf-linker",
        &format!(
            "check that bpf-linker {BPF_LINKER_VERSION} has the `{feature}` feature \
             (`cargo info bpf-linker@{BPF_LINKER_VERSION}`); by hand: LLVM_PREFIX={} cargo install bpf-linker \
             --no-default-features --features {feature} --root {}",
            prefix.display(),
            home.display()
        ),
    )?;
    let ran = Command::new(&linker).arg("--version").output();
    ensure!(
        matches!(ran, Ok(ref o) if o.status.success()),
        "the freshly built {} does not run ({ran:?}); is {} still there?",
        linker.display(),
        libllvm.display()
    );
    Ok(bin_dir)
}

/// `cargo build` (or another cargo subcommand) of the eBPF crate for its target.
fn ebpf_cargo(root: &Path, linker_dir: &Path, subcommand: &str) -> Command {
    let mut path = OsString::from(linker_dir);
    if let Some(old) = env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    let rustflags =
        ["--cfg=bpf_target_arch=\"x86_64\"", "-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f");
    let mut cmd = clean_command("rustup");
    cmd.current_dir(root)
        .args(["run", NIGHTLY, "cargo", subcommand, "-p", "dataplane-ebpf", "--bins"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/ebpf"))
        .env("PATH", path)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    cmd
}

/// `cargo xtask clippy-ebpf`: clippy on the eBPF crate for the BPF target,
/// warnings denied (the host clippy run cannot see target-specific code).
pub fn clippy() -> Result<()> {
    let root = workspace_root();
    let nightly = probe_nightly()?;
    ensure_rust_src(&nightly)?;
    let linker_dir = ensure_bpf_linker(&nightly)?;
    let mut cmd = ebpf_cargo(&root, &linker_dir, "clippy");
    cmd.args(["--release", "--", "-D", "warnings"]);
    status_of(&mut cmd, "clippy on the eBPF crate", "fix the lints reported above")
}

fn build_object(root: &Path, linker_dir: &Path, debug: bool) -> Result<PathBuf> {
    let mut cmd = ebpf_cargo(root, linker_dir, "build");
    if !debug {
        cmd.arg("--release");
    }
    status_of(&mut cmd, "building the eBPF object", "see the compiler output above")?;
    let obj = object_path(root, debug);
    ensure!(obj.is_file(), "the build succeeded but {} is missing", obj.display());
    let bytes = fs::read(&obj)?;
    if !bytes.windows(4).any(|w| w == b".BTF") {
        bail!("{} carries no .BTF section; is bpf-linker run with --btf?", obj.display());
    }
    eprintln!("xtask: eBPF object at {}", obj.display());
    Ok(obj)
}
