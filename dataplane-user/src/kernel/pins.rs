//! Steering state pinned under bpffs, so it outlives the agent: the maps
//! (shared by every agent version with the same layout) and the cgroup
//! links (which keep the programs attached). A new agent adopts them and
//! replaces the programs in place with `BPF_LINK_UPDATE`, so the cgroup is
//! never without them; a crashed agent leaves them attached, pointing at a
//! listener that no longer exists, so a routed connect is refused by the
//! kernel at once instead of leaving by the default route.
//!
//! ```text
//! <pin_dir>/<cgroup inode>/links/<program>   one cgroup link per program
//! <pin_dir>/<cgroup inode>/maps-v<LAYOUT>-flows<N>-bypass<M>/<MAP>
//!                                            the maps of one layout and size
//! ```

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    time::SystemTime,
};

use aya::maps::{MapData, MapType};
use dataplane_common::{
    self as common, Counter, FlowKey, LAYOUT_VERSION, OrigDst, RedirectTarget, RouteValue,
};

/// statfs(2) magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

// bpf(2) commands and flags, from include/uapi/linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "steering.pin_dir: {path} is not on a bpf filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`; \
         in the DaemonSet, mount the host's /sys/fs/bpf), or set steering.pin_dir: null to run unpinned \
         (steering then ends with the agent)"
    )]
    NotBpffs { path: PathBuf },
    #[error("steering.pin_dir: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A pinned map is not what this build's programs expect.
    #[error(
        "pinned map {path} is not of this build's layout (v{LAYOUT_VERSION}): {detail}; remove the pinned state \
         with `dataplane uninstall` (steering stops until the agent starts again)"
    )]
    Layout { path: PathBuf, detail: String },
    #[error("pinned link {path}: {call} failed: {source}")]
    Link { path: PathBuf, call: &'static str, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_owned(), source }
}

/// Where one cgroup's steering is pinned.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    /// Names the maps' directory: this build's layout version and the
    /// configured capacities (a change gets maps of its own).
    layout: String,
}

impl PinDir {
    /// The directory for `cgroup` under `pin_dir` (which must be on bpffs;
    /// created if missing). Keyed by the cgroup's inode, so two cgroups, or
    /// a cgroup removed and made again, never share state.
    pub fn for_cgroup(pin_dir: &Path, cgroup: &Path, capacity: Capacity) -> Result<PinDir, PinError> {
        let ino = std::fs::metadata(cgroup).map_err(io_err(cgroup))?.ino();
        let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if statfs_magic(existing).map_err(io_err(existing))? != BPF_FS_MAGIC {
            return Err(PinError::NotBpffs { path: pin_dir.to_owned() });
        }
        Ok(PinDir::for_root(pin_dir.join(ino.to_string()), capacity))
    }

    fn for_root(root: PathBuf, capacity: Capacity) -> PinDir {
        let layout = format!("maps-v{LAYOUT_VERSION}-flows{}-bypass{}", capacity.flows, capacity.bypass);
        PinDir { root, layout }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of this build's map layout.
    pub fn maps(&self) -> PathBuf {
        self.root.join(&self.layout)
    }

    /// The maps' directory name (layout version and capacities).
    pub fn layout(&self) -> &str {
        &self.layout
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn link(&self, program: &str) -> PathBuf {
        self.root.join("links").join(program)
    }

    /// Creates the directories pins go into.
    pub fn create(&self) -> Result<(), PinError> {
        for dir in [self.maps(), self.root.join("links")] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// Checks the maps pinned here (those that exist) against this build's
    /// layout for `capacity`; returns whether any exists.
    pub fn check_maps(&self, capacity: Capacity) -> Result<bool, PinError> {
        let mut any = false;
        for (name, kind, key, value, max) in layout(capacity) {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            any = true;
            let bad = |detail: String| PinError::Layout { path: path.clone(), detail };
            let map = MapData::from_pin(&path).map_err(|e| bad(format!("opening it: {e}")))?;
            let info = map.info().map_err(|e| bad(format!("reading it: {e}")))?;
            let found = (info.map_type().ok(), info.key_size(), info.value_size(), info.max_entries());
            if found != (Some(kind), key, value, max) {
                return Err(bad(format!(
                    "found {:?} key {} value {} entries {}, expected {kind:?} key {key} value {value} entries {max}",
                    found.0, found.1, found.2, found.3
                )));
            }
        }
        Ok(any)
    }

    /// Whether anything is pinned here.
    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// When the state was first pinned (the directory's change time).
    pub fn since(&self) -> Option<SystemTime> {
        let m = std::fs::metadata(&self.root).ok()?;
        Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(m.ctime().max(0) as u64))
    }

    /// Map directories of other layouts (left by an agent of another
    /// version); removed once this agent has taken over.
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let own = self.maps();
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != &own && p.file_name().is_some_and(|n| n.as_bytes().starts_with(b"maps-v")))
            .collect()
    }

    /// Removes everything pinned here: the links go (and with them the
    /// programs, once no agent holds them open), then the maps.
    pub fn remove(&self) -> Result<(), PinError> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(PinError::Io { path: self.root.clone(), source: e })
            }
            _ => Ok(()),
        }
    }
}

/// Sizes of the per-socket maps (`steering.flow_capacity`,
/// `steering.bypass_capacity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// FLOWS and ORIG_DST: sockets redirected and not yet closed, per node.
    pub flows: u32,
    /// BYPASS: the agent's own dials in flight.
    pub bypass: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity { flows: common::FLOWS_MAX_ENTRIES, bypass: common::BYPASS_MAX_ENTRIES }
    }
}

/// The maps that are pinned, with the layout this build gives them (type,
/// key size, value size, capacity): adopted only if they match.
pub(super) fn layout(capacity: Capacity) -> [(&'static str, MapType, u32, u32, u32); 7] {
    use std::mem::size_of;
    let u = |n: usize| n as u32;
    [
        (common::MAP_ROUTES_V4, MapType::LpmTrie, 8, u(size_of::<RouteValue>()), common::ROUTES_MAX_ENTRIES),
        (common::MAP_ROUTES_V6, MapType::LpmTrie, 20, u(size_of::<RouteValue>()), common::ROUTES_MAX_ENTRIES),
        (common::MAP_REDIRECT, MapType::Array, 4, u(size_of::<RedirectTarget>()), 1),
        (common::MAP_ORIG_DST, MapType::LruHash, 8, u(size_of::<OrigDst>()), capacity.flows),
        (
            common::MAP_FLOWS,
            MapType::LruHash,
            u(size_of::<FlowKey>()),
            u(size_of::<OrigDst>()),
            capacity.flows,
        ),
        (common::MAP_BYPASS, MapType::Hash, 8, 4, capacity.bypass),
        (common::MAP_COUNTERS, MapType::PerCpuArray, 4, 8, Counter::COUNT),
    ]
}

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c is NUL-terminated and buf is large enough for statfs.
    if unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded and filled buf.
    Ok(unsafe { buf.assume_init() }.f_type)
}

fn sys_bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised buffer at least as large as the
    // union member the command reads, and its size is passed along.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// A pinned cgroup link, opened.
pub struct PinnedLink {
    fd: OwnedFd,
    path: PathBuf,
}

impl PinnedLink {
    /// Opens the link pinned at `path`; `None` if nothing is pinned there.
    pub fn open(path: &Path) -> Result<Option<PinnedLink>, PinError> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io_err(path)(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // union bpf_attr, obj_get: { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
        let mut attr = [0u64; 4];
        attr[0] = c.as_ptr() as u64;
        match sys_bpf(BPF_OBJ_GET, &mut attr) {
            Ok(fd) => {
                // SAFETY: BPF_OBJ_GET returned a new descriptor we now own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
                Ok(Some(PinnedLink { fd, path: path.to_owned() }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PinError::Link { path: path.to_owned(), call: "BPF_OBJ_GET", source }),
        }
    }

    /// The id of the program the link runs now.
    pub fn program_id(&self) -> Result<u32, PinError> {
        // struct bpf_link_info begins { u32 type; u32 id; u32 prog_id; ... };
        // the buffer is larger than any kernel's struct and zeroed, as the
        // kernel requires of a tail it does not know.
        let mut info = [0u32; 64];
        // union bpf_attr, info: { u32 bpf_fd; u32 info_len; u64 info; }
        let mut attr = [0u64; 2];
        attr[0] = self.fd.as_raw_fd() as u32 as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(|source| PinError::Link {
            path: self.path.clone(),
            call: "BPF_OBJ_GET_INFO_BY_FD",
            source,
        })?;
        Ok(info[2])
    }

    /// Replaces the link's program with `program` in one step: the cgroup
    /// is never without it. (No BPF_F_REPLACE compare-and-swap: naming the
    /// old program needs its fd, which BPF_PROG_GET_FD_BY_ID gives only to
    /// CAP_SYS_ADMIN, a capability the agent does not ask for.)
    pub fn update(&self, program: BorrowedFd<'_>) -> Result<(), PinError> {
        // union bpf_attr, link_update: { u32 link_fd; u32 new_prog_fd; u32 flags; u32 old_prog_fd; }
        let mut attr = [0u64; 2];
        attr[0] = self.fd.as_raw_fd() as u32 as u64 | ((program.as_raw_fd() as u32 as u64) << 32);
        sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop).map_err(|source| PinError::Link {
            path: self.path.clone(),
            call: "BPF_LINK_UPDATE",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_off_bpffs_is_refused_with_the_way_out() {
        let err =
            PinDir::for_cgroup(Path::new("/tmp/dataplane-pins"), Path::new("/proc"), Capacity::default())
                .expect_err("tmp is no bpffs");
        let text = err.to_string();
        assert!(text.contains("steering.pin_dir: /tmp/dataplane-pins is not on a bpf filesystem"), "{text}");
        assert!(text.contains("pin_dir: null"), "{text}");
    }

    #[test]
    fn paths_carry_the_layout_version() {
        let dir = PinDir::for_root(
            PathBuf::from("/sys/fs/bpf/dataplane/42"),
            Capacity { flows: 1024, bypass: 256 },
        );
        assert_eq!(
            dir.map("FLOWS"),
            PathBuf::from(format!(
                "/sys/fs/bpf/dataplane/42/maps-v{LAYOUT_VERSION}-flows1024-bypass256/FLOWS"
            ))
        );
        assert_eq!(dir.link("connect4"), PathBuf::from("/sys/fs/bpf/dataplane/42/links/connect4"));
    }
}
