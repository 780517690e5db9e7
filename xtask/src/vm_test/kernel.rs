//! The guest kernel: the newest Debian package of a series, downloaded and
//! unpacked into target/vm/ (never the host's /boot), with its vmlinux
//! extracted (booted through its PVH entry: no decompression under TCG) and
//! an initramfs built for it; cached per module list.

use std::{
    fs,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    apt,
    initramfs::{MODULES, initramfs},
};

/// The newest `linux-image-*-amd64` of a series: `6.1` matches
/// `linux-image-6.1.0-NN-amd64`, `6.12` matches `linux-image-6.12.NNN+deb12-amd64`.
pub(super) fn resolve_package(series: &str, sources: &[String]) -> Result<String> {
    ensure!(
        series.split('.').count() == 2 && series.split('.').all(|p| p.parse::<u32>().is_ok()),
        "--kernel {series}: expected a series like 6.1 or 6.12"
    );
    for attempt in 0..2 {
        let out = Command::new("apt-cache")
            .args(sources)
            .args(["search", "--names-only", &format!("^linux-image-{}\\.", series.replace('.', "\\."))])
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let best = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|name| Some((package_rank(name, series)?, name.to_owned())))
            .max();
        if let Some((_, name)) = best {
            return Ok(name);
        }
        if attempt == 0 {
            let mut args: Vec<&str> = sources.iter().map(String::as_str).collect();
            args.extend(["update", "-qq"]);
            apt(&args)?;
        }
    }
    bail!("no linux-image package for kernel {series} in apt (apt-cache search linux-image-{series})")
}

/// Orders packages of one series; None for flavours we do not want (rt, cloud, dbg).
/// Debian 11's 5.10 is `linux-image-5.10.0-NN-amd64`.
fn package_rank(name: &str, series: &str) -> Option<Vec<u32>> {
    let rest = name.strip_prefix("linux-image-")?.strip_suffix("-amd64")?;
    let rest = rest.strip_suffix("+deb12").unwrap_or(rest);
    // `6.1` must not match `6.12...`: the series ends at a dot.
    let version = rest.strip_prefix(series)?.strip_prefix('.')?;
    // `.0-50` (6.1) or `.101` (6.12): all-numeric parts only.
    let parts: Option<Vec<u32>> =
        version.split(['.', '-']).filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect();
    parts.filter(|p| !p.is_empty())
}

pub(super) struct Kernel {
    pub pkg: String,
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// apt options for a series: none for Debian 12's own kernels (6.1,
/// 6.12); for 5.x, a source list of our own with Debian 11's security suite
/// (where its 5.10 kernels are), made from the host's security entry, with
/// lists of its own under target/vm: the host's sources stay untouched.
pub(super) fn sources_for(vm_dir: &Path, series: &str) -> Result<Vec<String>> {
    if !series.starts_with("5.") {
        return Ok(Vec::new());
    }
    let dir = vm_dir.join("apt-bullseye");
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("parts"))?;
    let host = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .context("reading /etc/apt/sources.list.d/debian.sources (Debian 12's deb822 sources)")?;
    let security = host
        .split("\n\n")
        .find(|stanza| stanza.contains("debian-security"))
        .context("no debian-security entry in the host's apt sources")?;
    let stanza: String = security
        .lines()
        .map(|l| if l.starts_with("Suites:") { "Suites: bullseye-security" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(dir.join("parts/bullseye.sources"), stanza + "\n")?;
    Ok(vec![
        "-o".into(),
        "Dir::Etc::sourcelist=/dev/null".into(),
        "-o".into(),
        format!("Dir::Etc::sourceparts={}", dir.join("parts").display()),
        "-o".into(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
    ])
}

pub(super) fn prepare_kernel(vm_dir: &Path, pkg: &str, sources: &[String]) -> Result<Kernel> {
    let dir = vm_dir.join(pkg);
    let kernel = Kernel {
        pkg: pkg.to_owned(),
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        dir: dir.clone(),
    };
    // The cache is good for this module list only (the initramfs holds them).
    let stamp = |release: &str| format!("{release}\n{}", MODULES.join(","));
    let ready = fs::read_to_string(dir.join(".ready")).unwrap_or_default();
    if ready.lines().nth(1) == Some(MODULES.join(",").as_str()) {
        return Ok(kernel);
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    eprintln!("xtask: fetching and preparing {pkg} (once; cached in {})", dir.display());
    // Root downloads into our own directory: skip apt's _apt sandbox (a warning otherwise).
    let status = Command::new("apt-get")
        .current_dir(&dir)
        .args(sources)
        .args(["-o", "APT::Sandbox::User=root", "download", pkg])
        .status()?;
    ensure!(status.success(), "apt-get download {pkg} failed");
    let deb = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download produced no .deb")?;
    let unpacked = dir.join("root");
    let status = Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked).status()?;
    ensure!(status.success(), "dpkg -x {} failed", deb.display());
    fs::remove_file(&deb)?;

    let vmlinuz = fs::read_dir(unpacked.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .context("package has no /boot/vmlinuz-*")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    fs::write(&kernel.vmlinux, extract_vmlinux(&fs::read(&vmlinuz)?)?)?;
    let modules_dir = unpacked.join("lib/modules").join(&release);
    fs::write(&kernel.initramfs, initramfs(&modules_dir)?)?;
    fs::remove_dir_all(&unpacked)?;
    fs::write(dir.join(".ready"), stamp(&release))?;
    Ok(kernel)
}

/// Finds the compressed payload in a bzImage and decompresses it with the
/// matching tool (as the kernel's scripts/extract-vmlinux does).
fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let formats: [(&[u8], &str); 3] =
        [(b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x1f\x8b\x08", "gzip")];
    for (magic, tool) in formats {
        let mut from = 0;
        while let Some(pos) = find(&bzimage[from..], magic).map(|p| p + from) {
            let out = decompress(tool, &bzimage[pos..])?;
            if out.starts_with(b"\x7fELF") {
                return Ok(out);
            }
            from = pos + 1;
        }
    }
    bail!("no xz/zstd/gzip payload that decompresses to an ELF vmlinux found in the bzImage")
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs `tool -dc` over `data`; trailing bytes after the stream make the tool
/// complain, so its exit status is ignored and the output judged instead.
pub(super) fn decompress(tool: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(["-dc", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool} (install it with apt)"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut out = Vec::new();
    child.stdout.take().context("stdout")?.read_to_end(&mut out)?;
    let _ = child.wait();
    let _ = writer.join();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ranking_picks_plain_flavours_of_the_series() {
        assert_eq!(package_rank("linux-image-6.1.0-50-amd64", "6.1"), Some(vec![0, 50]));
        assert_eq!(package_rank("linux-image-6.12.101+deb12-amd64", "6.12"), Some(vec![101]));
        assert_eq!(package_rank("linux-image-5.10.0-46-amd64", "5.10"), Some(vec![0, 46]));
        assert!(
            package_rank("linux-image-6.1.0-50-amd64", "6.1")
                > package_rank("linux-image-6.1.0-47-amd64", "6.1")
        );
        assert_eq!(package_rank("linux-image-6.1.0-50-rt-amd64", "6.1"), None);
        assert_eq!(package_rank("linux-image-6.1.0-50-cloud-amd64", "6.1"), None);
        assert_eq!(package_rank("linux-image-6.12.101+deb12-amd64", "6.1"), None, "6.12 is not 6.1");
        assert_eq!(package_rank("linux-image-amd64", "6.1"), None);
    }
}
