//! The guest's initramfs: static busybox, an /init that mounts the host's
//! root read-only (9p) under a tmpfs overlay and runs the tests script, and
//! the kernel modules the guest needs with their dependencies, in load order.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::kernel::{decompress, find};

/// Modules the guest needs; their dependencies are added from .modinfo.
/// virtio_rng: without an entropy source the guest's CRNG may not be ready
/// for minutes under emulation, and TLS (getrandom) blocks until it is.
/// nf_tables and nft_ct (with conntrack): the fleet test's firewalls;
/// crc32c for libcrc32c, which nf_tables needs and which finds its
/// algorithm by name, not by a module dependency.
pub(super) const MODULES: [&str; 13] = [
    "9pnet_virtio",
    "9p",
    "overlay",
    "virtio_pci",
    "veth",
    "dummy",
    "ifb",
    "netfs",
    "virtio_rng",
    "crc32c_generic",
    "crc32c_intel",
    "nf_tables",
    "nft_ct",
];

/// Reads a module file, decompressing .ko.xz / .ko.zst.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = fs::read(path)?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        decompress("xz", &data)
    } else if name.ends_with(".zst") {
        decompress("zstd", &data)
    } else {
        Ok(data)
    }
}

/// Module name as the kernel normalises it (`-` and `_` are the same).
fn module_name(path: &Path) -> String {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    file.split(".ko").next().unwrap_or_default().replace('-', "_")
}

/// The `depends=` list from a module's .modinfo section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let Some(pos) = find(ko, b"\0depends=") else { return Vec::new() };
    let rest = &ko[pos + 9..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.to_string_lossy().contains(".ko") {
            out.push(path);
        }
    }
    Ok(())
}

/// The initramfs: busybox, /init, and the needed modules in load order.
pub(super) fn initramfs(modules_dir: &Path) -> Result<Vec<u8>> {
    let mut files = Vec::new();
    walk(modules_dir, &mut files)?;
    let by_name: BTreeMap<String, PathBuf> = files.into_iter().map(|p| (module_name(&p), p)).collect();
    // Depth-first: dependencies before dependants. Built-in ones are absent.
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some(path) = by_name.get(name) else { return Ok(()) };
        let ko = read_module(path)?;
        for dep in module_depends(&ko) {
            visit(&dep, by_name, seen, order)?;
        }
        order.push((name.to_owned(), ko));
        Ok(())
    }
    for m in MODULES {
        visit(m, &by_name, &mut seen, &mut order)?;
    }

    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "host", "upper", "newroot", "modules"] {
        cpio.dir(d);
    }
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?,
    );
    cpio.file("init", 0o755, INIT.as_bytes());
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    cpio.file("modules/order", 0o644, names.join("\n").as_bytes());
    for (name, ko) in &order {
        cpio.file(&format!("modules/{name}.ko"), 0o644, ko);
    }
    Ok(cpio.finish())
}

/// The guest's /init: load modules, mount the host root read-only (9p) under
/// a tmpfs overlay, mount the kernel filesystems inside it, run the tests
/// script named on the kernel command line with its output on ttyS1, power off.
/// /tmp is left to the overlay (writable, host content visible): a checkout
/// under /tmp must stay reachable.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko 2>/dev/null; done
script=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^dataplane.tests=//p')
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /host || echo "9p mount failed" > /dev/ttyS1
mount -t tmpfs tmpfs /upper
mkdir -p /upper/up /upper/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/upper/up,workdir=/upper/work /newroot || echo "overlay failed" > /dev/ttyS1
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t tmpfs tmpfs /newroot/run
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t bpf bpf /newroot/sys/fs/bpf
echo "=== BOOTED $(uname -r)" > /dev/ttyS1
chroot /newroot /bin/sh "$script" > /dev/ttyS1 2>&1
echo "=== DONE" > /dev/ttyS1
poweroff -f
"#;

/// A newc cpio archive, the format the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_depends_are_read_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring,9pnet\0name=9pnet_virtio\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring", "9pnet"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert_eq!(module_name(Path::new("/m/kernel/net/9p/9pnet-virtio.ko.xz")), "9pnet_virtio");
    }

    #[test]
    fn cpio_entries_are_aligned_newc() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"#!x");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert!(out.len().is_multiple_of(4));
        assert!(find(&out, b"TRAILER!!!").is_some());
        // mode field: regular file 0755
        assert_eq!(&out[14..22], b"000081ed");
    }
}
