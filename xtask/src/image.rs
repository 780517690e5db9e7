//! `cargo xtask image`: the agent's OCI image, `FROM scratch`: the release
//! binary and the shared libraries it links (as `ldd` lists them), nothing
//! else (no shell, no package manager), built by podman and tagged with the
//! workspace version. Installs podman from apt if missing, with the settings
//! this machine kind needs (see shared/design/containers.md).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::build_ebpf::workspace_root;

/// The image's name unless told otherwise (the manifests' `images:` name it).
pub const DEFAULT_NAME: &str = "localhost/dataplane";

/// Where the agent sits in the image.
const BINARY: &str = "/usr/local/bin/dataplane";

#[derive(clap::Args, Debug, Default)]
pub struct Options {
    /// The image name (the tag is the workspace version).
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// Also write the image as an OCI archive to this path.
    #[arg(long)]
    pub archive: Option<PathBuf>,
}

/// Builds the image; returns its reference (`name:version`).
pub fn run(opts: &Options) -> Result<String> {
    let root = workspace_root();
    ensure_podman()?;
    // The bench's build (its feature resolution), so neither rebuilds for the other.
    crate::cargo(&["build", "--quiet", "--release", "-p", "tests", "-p", "dataplane-user", "--bins"], &[])?;
    let binary = root.join("target/release/dataplane");
    let context = root.join("target/image");
    let _ = fs::remove_dir_all(&context);
    let rootfs = context.join("rootfs");
    copy_into(&rootfs, &binary, Path::new(BINARY))?;
    // The release profile keeps debug info (for profiling); the image
    // keeps the symbols (backtraces name functions) and drops the rest.
    let in_image = rootfs.join(BINARY.trim_start_matches('/'));
    let status =
        Command::new("strip").arg("--strip-debug").arg(&in_image).status().context("running strip")?;
    ensure!(status.success(), "strip --strip-debug {} failed", in_image.display());
    for lib in linked_libraries(&binary)? {
        copy_into(&rootfs, &lib, &lib)?;
    }
    let version = env!("CARGO_PKG_VERSION");
    let reference = format!("{}:{version}", opts.name);
    fs::write(context.join("Containerfile"), containerfile(version, &root))?;
    let status = Command::new("podman")
        .args(["build", "--quiet", "--tag", &reference, "--file"])
        .arg(context.join("Containerfile"))
        .arg(&context)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running podman build")?;
    ensure!(status.success(), "podman build failed ({status})");
    let size = output("podman", &["image", "inspect", "--format", "{{.Size}}", &reference])?;
    let files = walk(&rootfs)?;
    println!("xtask: built {reference} ({} MiB, {} files):", mib(size.trim()), files.len());
    for (path, bytes) in &files {
        println!("  {:>8} KiB  /{}", bytes / 1024, path.display());
    }
    smoke(&reference, &root)?;
    if let Some(path) = &opts.archive {
        let status = Command::new("podman")
            .args(["save", "--quiet", "--format", "oci-archive", "--output"])
            .arg(path)
            .arg(&reference)
            .status()
            .context("running podman save")?;
        ensure!(status.success(), "podman save failed ({status})");
    }
    Ok(reference)
}

/// Runs the image as the manifests do (no network, every capability
/// dropped, read-only root) on each role's config from deploy/: the binary
/// starts and finds every library it links.
fn smoke(reference: &str, root: &Path) -> Result<()> {
    for role in ["client", "connector", "relay"] {
        let dir = root.join("deploy").join(role);
        let out = Command::new("podman")
            .args(["run", "--rm", "--network", "none", "--cap-drop", "ALL", "--read-only", "--volume"])
            .arg(format!("{}:/etc/dataplane/config:ro", dir.display()))
            .args([reference, "check", "--config", "/etc/dataplane/config/config.yaml"])
            .output()
            .context("running podman run")?;
        ensure!(
            out.status.success(),
            "the image could not check deploy/{role}/config.yaml: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        print!("xtask: in the image: {}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

fn mib(bytes: &str) -> String {
    bytes.parse::<f64>().map_or_else(|_| bytes.to_owned(), |b| format!("{:.1}", b / (1024.0 * 1024.0)))
}

/// The build file: the OCI labels platform teams read (title, version,
/// licence, source, revision), the files, and the agent as entrypoint.
fn containerfile(version: &str, root: &Path) -> String {
    let revision =
        output("git", &["-C", &root.display().to_string(), "rev-parse", "HEAD"]).unwrap_or_default();
    let source = std::env::var("DATAPLANE_IMAGE_SOURCE")
        .ok()
        .or_else(|| output("git", &["-C", &root.display().to_string(), "remote", "get-url", "origin"]).ok());
    let mut labels = vec![
        ("org.opencontainers.image.title", "dataplane".to_owned()),
        (
            "org.opencontainers.image.description",
            "eBPF-steered node agent, connector and relay: routed connects into a mutual-TLS QUIC tunnel"
                .to_owned(),
        ),
        ("org.opencontainers.image.version", version.to_owned()),
        ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
        ("org.opencontainers.image.revision", revision.trim().to_owned()),
    ];
    if let Some(source) = source {
        labels.push(("org.opencontainers.image.source", source.trim().to_owned()));
    }
    let labels: String =
        labels.iter().map(|(k, v)| format!("LABEL {k}=\"{}\"\n", v.replace('"', "'"))).collect();
    format!("FROM scratch\n{labels}COPY rootfs/ /\nENTRYPOINT [\"{BINARY}\"]\nCMD [\"--help\"]\n")
}

/// The shared libraries `binary` links, the dynamic loader included.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let listing = output("ldd", &[&binary.display().to_string()])?;
    let mut libs = Vec::new();
    for line in listing.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", or the
        // loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    ensure!(!libs.is_empty(), "ldd listed no libraries for {}: a static binary needs none", binary.display());
    Ok(libs)
}

/// Copies `from` to `at` inside `rootfs`, following symlinks (the image
/// holds the files themselves).
fn copy_into(rootfs: &Path, from: &Path, at: &Path) -> Result<()> {
    let dest = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    fs::create_dir_all(dest.parent().context("no parent")?)?;
    fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                let rel = entry.path().strip_prefix(dir)?.to_path_buf();
                out.push((rel, entry.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// podman, and the settings without which no container starts on this
/// machine kind: ulimits the sandbox allows, cgroupfs (no systemd), runc
/// (crun refuses hybrid cgroups).
pub fn ensure_podman() -> Result<()> {
    if Command::new("podman").arg("--version").output().is_err() {
        crate::install_packages(
            &["podman", "buildah", "runc", "catatonit", "conmon"],
            "building and playing the image",
        )?;
    }
    let conf = Path::new("/etc/containers/containers.conf");
    let current = fs::read_to_string(conf).unwrap_or_default();
    if !current.contains("cgroup_manager") {
        fs::create_dir_all(conf.parent().context("no parent")?)?;
        let settings = "# Written by cargo xtask: what podman needs on this machine kind.\n\
                        [containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=4096:4096\"]\n\
                        [engine]\ncgroup_manager = \"cgroupfs\"\nruntime = \"runc\"\n";
        fs::write(conf, format!("{current}\n{settings}"))
            .with_context(|| format!("writing {}", conf.display()))?;
    }
    Ok(())
}
