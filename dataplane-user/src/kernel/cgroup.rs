//! Finding and checking the cgroup v2 directory the programs attach to.

use std::path::{Path, PathBuf};

/// statfs(2) magic of a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup v2 filesystem is mounted (see /proc/self/mountinfo); the agent needs cgroup v2")]
    NoCgroup2,
    /// The configured path is not a cgroup v2 directory.
    #[error("steering.cgroup: {path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    /// The path could not be inspected.
    #[error("steering.cgroup: cannot inspect {path}: {source}")]
    Inspect { path: PathBuf, source: std::io::Error },
}

/// The configured cgroup, or the host's cgroup v2 root (the cgroup2 mount point:
/// `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn resolve(configured: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None => {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|source| CgroupError::Inspect { path: "/proc/self/mountinfo".into(), source })?;
            cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)?
        }
    };
    check(&path)?;
    Ok(path)
}

/// Fails unless `path` is a directory on a cgroup2 filesystem.
pub fn check(path: &Path) -> Result<(), CgroupError> {
    let stat = nix_statfs(path).map_err(|source| CgroupError::Inspect { path: path.to_owned(), source })?;
    if stat != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 { path: path.to_owned() });
    }
    Ok(())
}

fn nix_statfs(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c is NUL-terminated and buf is large enough for statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled buf.
    Ok(unsafe { buf.assume_init() }.f_type)
}

/// The first cgroup2 mount point in a mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mountpoint options... - fstype source superopts
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| left.split_whitespace().nth(4).map(unescape))?
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> PathBuf {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let spaced = "30 1 0:26 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(spaced), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn rejects_a_non_cgroup_directory() {
        let err = check(Path::new("/proc")).expect_err("procfs is not cgroup2");
        assert!(err.to_string().contains("steering.cgroup: /proc"), "{err}");
        let err = check(Path::new("/nonexistent/cg")).expect_err("missing");
        assert!(err.to_string().contains("cannot inspect"), "{err}");
    }
}
