//! Loading, attaching and talking to the kernel programs: route tries, the
//! redirect target, flow recovery, the agent's bypass set and the counters.

use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, MapType, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps, links::FdLink},
};
use dataplane_common::{
    self as common, AF_INET, AF_INET6, Counter, FlowKey, OrigDst, REDIRECT_V4_ENABLED, REDIRECT_V6_ENABLED,
    RedirectTarget, RouteValue,
};
use ipnet::IpNet;
use tracing::{debug, warn};

use super::{
    pins::{PinDir, PinError, PinnedLink},
    trie,
};
use crate::{
    lock,
    routes::{RouteEntry, RouteTable},
};

/// The object built by `cargo xtask build-ebpf`, embedded at build time.
#[cfg(not(dataplane_no_ebpf))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("DATAPLANE_EBPF_OBJ"));
/// This build found no object (build.rs warned): it compiles and tests, but
/// cannot steer, and says so when asked to.
#[cfg(dataplane_no_ebpf)]
static OBJECT: &[u8] = &[];

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    /// The agent was compiled before the eBPF object existed.
    #[error(
        "this dataplane build has no eBPF object embedded (it was missing when the agent was compiled): \
         run `cargo xtask build-ebpf`, then rebuild"
    )]
    NotBuilt,
    /// The kernel refused the object (missing BTF, maps, permissions...).
    #[error(
        "loading the eBPF object failed: {0} (the agent needs CAP_BPF, CAP_NET_ADMIN and a kernel with BTF)"
    )]
    Load(#[source] aya::EbpfError),
    /// The object lacks something the agent expects: a build mismatch.
    #[error("the eBPF object has no {what} `{name}`; rebuild with `cargo xtask build-ebpf`")]
    Missing { what: &'static str, name: &'static str },
    /// The verifier or the kernel rejected a program.
    #[error("loading program {name} failed: {source}")]
    Program { name: &'static str, source: ProgramError },
    /// Attaching to the cgroup failed.
    #[error("attaching {name} to cgroup {cgroup} failed: {source}")]
    Attach { name: &'static str, cgroup: PathBuf, source: ProgramError },
    /// The cgroup directory could not be opened.
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: std::io::Error },
    /// A map operation failed.
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    /// A route trie has no room for an entry while a change is applied.
    #[error(
        "eBPF map {name} is full ({capacity} entries): new routes go in before old ones leave, so no \
         connect meets a gap, and this change needs more at once; apply it in two smaller steps"
    )]
    RoutesFull { name: &'static str, capacity: u32 },
    /// After a write, a trie did not hold what was written.
    #[error("eBPF map {name} does not hold what was written: {detail}")]
    Verify { name: &'static str, detail: String },
    /// Pinned state could not be read, made or replaced.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// A pinned map is not what this build's programs expect.
    #[error(
        "pinned map {path} is not of this build's layout (v{version}): {detail}; remove the pinned state \
         with `dataplane uninstall` (steering stops until the agent starts again)",
        version = common::LAYOUT_VERSION
    )]
    PinnedLayout { path: PathBuf, detail: String },
    /// The kernel gave a link that cannot be pinned (bpf_link needs 5.7).
    #[error(
        "{name}: the kernel attached it without a bpf_link (Linux < 5.7), which cannot be pinned; set steering.pin_dir: null"
    )]
    NotPinnable { name: &'static str },
    /// An injected fault (tests).
    #[error("injected fault after {writes} writes to the route tries")]
    Injected { writes: usize },
    /// A change failed and putting the tries back failed too: the kernel
    /// may now differ from the running configuration.
    #[error("{apply}; rolling the route tries back also failed: {rollback} (restart the agent)")]
    RollbackFailed { apply: Box<SteeringError>, rollback: Box<SteeringError> },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> SteeringError {
    move |source| SteeringError::Map { name, source }
}

/// Sums of the per-CPU counters, indexed like [`Counter::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters(pub [u64; Counter::COUNT as usize]);

impl KernelCounters {
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// `self - earlier`, per counter (for tests and benchmarks).
    pub fn since(&self, earlier: &KernelCounters) -> KernelCounters {
        let mut out = *self;
        for (o, e) in out.0.iter_mut().zip(earlier.0) {
            *o = o.saturating_sub(e);
        }
        out
    }
}

/// The original destination of an accepted flow, as recorded by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub dst: SocketAddr,
    pub route_id: u32,
}

/// The loaded programs plus handles to their maps (the kernel's side of
/// steering; `steer` is the agent's). Unpinned, dropping it (or
/// [`Steering::detach`]) detaches the programs, so a crashed agent leaves no
/// steering behind. Pinned ([`PinDir`]), the links and maps outlive the
/// agent: a successor adopts them, and while none runs, routed connects are
/// refused by the kernel (their listener is gone).
pub struct Steering {
    /// Owns the programs (and, unpinned, their links); `None` once detached.
    programs: Mutex<Option<Ebpf>>,
    routes_v4: Mutex<LpmTrie<MapData, u32, RouteValue>>,
    routes_v6: Mutex<LpmTrie<MapData, [u32; 4], RouteValue>>,
    redirect: Mutex<Array<MapData, RedirectTarget>>,
    flows: Mutex<HashMap<MapData, FlowKey, OrigDst>>,
    bypass: Mutex<HashMap<MapData, u64, u32>>,
    counters: PerCpuArray<MapData, u64>,
    cgroup: PathBuf,
    capacity: Capacity,
    /// Refused connects fail with ECONNREFUSED (`bpf_set_retval` loaded),
    /// else EPERM.
    econnrefused: bool,
    orig_dst: Mutex<HashMap<MapData, u64, OrigDst>>,
    /// The last [`Steering::map_stats`], and when it was counted.
    map_stats: Mutex<Option<(std::time::Instant, MapStats)>>,
    pins: Option<Pins>,
    /// [`Role`]: whether this agent's programs are the ones attached.
    role: AtomicU8,
    /// The redirect target this agent writes once it owns steering.
    target: Mutex<RedirectTarget>,
    /// Dials that found the bypass map full (and failed instead).
    bypass_full: std::sync::atomic::AtomicU64,
    /// A logger no task drains (loaded outside a runtime), kept because the
    /// programs reference its ring buffer: dropped, it would close the map
    /// and the programs would fail to load.
    _idle_logger: Option<KernelLogger>,
    /// Writes the next apply may make before it fails (tests); usize::MAX: none.
    fault_after: std::sync::atomic::AtomicUsize,
}

/// Pinned mode: where, whether the maps were adopted, and this agent's
/// connect4 program (a successor replaces it last: once the pinned link runs
/// another, this agent no longer steers anything).
struct Pins {
    dir: PinDir,
    /// The maps were pinned by an earlier agent (and may be in use).
    adopted_maps: bool,
    /// The kernel id of this agent's connect4 program.
    connect4_id: u32,
    /// This agent's programs went onto the pinned links.
    linked: std::sync::atomic::AtomicBool,
}

/// Where an agent stands with the steering of its cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Loaded; another agent's programs may still be attached.
    Waiting = 0,
    /// This agent's programs are attached: it writes the maps.
    Owner = 1,
    /// Detached, or (pinned) a successor replaced the programs.
    Done = 2,
}

type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// cgroup bpf_links (kernel >= 5.7, which aya uses when available) always
/// coexist with other programs on the cgroup, and link_create rejects the
/// ALLOW_MULTI flag (EINVAL): `Single` means "no flags" there, not exclusive.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Program names and the cgroup sock_addr hooks they attach to.
const SOCK_ADDR_PROGRAMS: [&str; 4] =
    [common::PROG_CONNECT4, common::PROG_CONNECT6, common::PROG_GETPEERNAME4, common::PROG_GETPEERNAME6];

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
fn pinned_layout(capacity: Capacity) -> [(&'static str, MapType, u32, u32, u32); 7] {
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

/// Checks the maps pinned in `dir` (those that exist) against this build's
/// layout; returns whether any exists.
fn check_pinned_maps(dir: &PinDir, capacity: Capacity) -> Result<bool, SteeringError> {
    let mut any = false;
    for (name, kind, key, value, max) in pinned_layout(capacity) {
        let path = dir.map(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let bad = |detail: String| SteeringError::PinnedLayout { path: path.clone(), detail };
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

impl Steering {
    /// Loads (verifies) the programs; nothing is attached until
    /// [`Steering::take_over`]. With `pins`, the maps are those pinned there
    /// if an earlier agent left them (checked against this build's layout),
    /// or are pinned there now. Refused connects fail with ECONNREFUSED
    /// where the kernel lets connect hooks call `bpf_set_retval`; where the
    /// verifier refuses that, the object is loaded again without it
    /// (refusals then read EPERM).
    pub fn load(cgroup: &Path, pins: Option<PinDir>, capacity: Capacity) -> Result<Steering, SteeringError> {
        if OBJECT.is_empty() {
            return Err(SteeringError::NotBuilt);
        }
        // Decided once, before any attempt: an attempt the verifier refuses
        // has pinned fresh maps, which the retry must not take for adopted.
        let adopted = match &pins {
            Some(dir) => check_pinned_maps(dir, capacity)?,
            None => false,
        };
        match Self::load_with(cgroup, pins.clone(), adopted, capacity, true) {
            Err(SteeringError::Program { name, source })
                if name == common::PROG_CONNECT4 || name == common::PROG_CONNECT6 =>
            {
                warn!(
                    program = name,
                    error = %source,
                    "the kernel refused bpf_set_retval in connect hooks; refused connects will fail with EPERM, not ECONNREFUSED"
                );
                Self::load_with(cgroup, pins, adopted, capacity, false)
            }
            other => other,
        }
    }

    fn load_with(
        cgroup: &Path,
        pins: Option<PinDir>,
        adopted_maps: bool,
        capacity: Capacity,
        set_retval: bool,
    ) -> Result<Steering, SteeringError> {
        let level = kernel_log_level();
        let econnrefused = set_retval;
        let set_retval = u32::from(set_retval);
        let mut loader = EbpfLoader::new();
        loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global("SET_RETVAL", &set_retval, true)
            .map_max_entries(common::MAP_ORIG_DST, capacity.flows)
            .map_max_entries(common::MAP_FLOWS, capacity.flows)
            .map_max_entries(common::MAP_BYPASS, capacity.bypass);
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(dir) => {
                dir.create()?;
                pinned_layout(capacity).iter().map(|m| (m.0, dir.map(m.0))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(SteeringError::Load)?;
        // Every program is loaded (verified) before any is attached: a
        // refusal leaves nothing attached behind.
        let sock_ops: &mut SockOps = program(&mut ebpf, common::PROG_SOCK_OPS)?;
        sock_ops.load().map_err(|source| SteeringError::Program { name: common::PROG_SOCK_OPS, source })?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| SteeringError::Program { name, source })?;
        }
        let idle_logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_kernel_logger(logger),
            Err(e) => {
                warn!(error = %e, "eBPF logs unavailable");
                None
            }
        };
        let pins = match pins {
            Some(dir) => {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, common::PROG_CONNECT4)?;
                let connect4_id = prog
                    .info()
                    .map_err(|source| SteeringError::Program { name: common::PROG_CONNECT4, source })?
                    .id();
                Some(Pins { dir, adopted_maps, connect4_id, linked: Default::default() })
            }
            None => None,
        };
        Ok(Steering {
            routes_v4: Mutex::new(try_map(&mut ebpf, common::MAP_ROUTES_V4)?),
            routes_v6: Mutex::new(try_map(&mut ebpf, common::MAP_ROUTES_V6)?),
            redirect: Mutex::new(try_map(&mut ebpf, common::MAP_REDIRECT)?),
            flows: Mutex::new(try_map(&mut ebpf, common::MAP_FLOWS)?),
            bypass: Mutex::new(try_map(&mut ebpf, common::MAP_BYPASS)?),
            counters: try_map(&mut ebpf, common::MAP_COUNTERS)?,
            cgroup: cgroup.to_owned(),
            capacity,
            map_stats: Mutex::new(None),
            econnrefused,
            orig_dst: Mutex::new(try_map(&mut ebpf, common::MAP_ORIG_DST)?),
            programs: Mutex::new(Some(ebpf)),
            pins,
            role: AtomicU8::new(Role::Waiting as u8),
            target: Mutex::new(RedirectTarget::default()),
            bypass_full: Default::default(),
            _idle_logger: idle_logger,
            fault_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    /// Where routed connects go now, as the adopted maps say: the listener
    /// of the agent whose programs are attached (pinned, adopted maps only).
    /// With maps of another layout (an agent of another version, or other
    /// capacities, still running), its target is read from its own
    /// pinned REDIRECT.
    pub fn current_target(&self) -> Option<RedirectTarget> {
        let pins = self.pins.as_ref()?;
        if !pins.dir.link(common::PROG_CONNECT4).exists() {
            return None;
        }
        let target = if pins.adopted_maps {
            lock(&self.redirect).get(&0, 0).ok()
        } else {
            pins.dir.other_layouts().iter().find_map(|dir| {
                let data = MapData::from_pin(dir.join(common::MAP_REDIRECT)).ok()?;
                let map: Array<MapData, RedirectTarget> = aya::maps::Map::Array(data).try_into().ok()?;
                map.get(&0, 0).ok()
            })
        };
        target.filter(|t| t.flags != 0)
    }

    /// Makes this agent's programs the attached ones, steering routed
    /// connects to `v4`/`v6` by `table`. Maps no other agent uses are
    /// written first and the programs attached after, so no connect meets
    /// an empty map; adopted maps (the previous agent's programs still run
    /// on them) are written after this agent's programs replaced the
    /// previous ones in place, redirect target first, so the previous agent
    /// stops receiving connects the moment this one starts.
    pub fn take_over(
        &self,
        v4: Option<SocketAddr>,
        v6: Option<SocketAddr>,
        table: &RouteTable,
        action: impl Fn(&RouteEntry) -> u32,
    ) -> Result<(), SteeringError> {
        *lock(&self.target) = redirect_target(v4, v6);
        let adopted = self.pins.as_ref().is_some_and(|p| p.adopted_maps);
        if !adopted {
            self.write_maps(table, &action)?;
        }
        self.attach_programs()?;
        if let Some(pins) = &self.pins {
            pins.linked.store(true, Ordering::Release);
        }
        if adopted {
            self.write_maps(table, &action)?;
        }
        if let Some(pins) = &self.pins {
            for old in pins.dir.other_layouts() {
                if let Err(e) = std::fs::remove_dir_all(&old) {
                    warn!(path = %old.display(), error = %e, "removing another layout's pinned maps failed");
                }
            }
        }
        debug!(cgroup = %self.cgroup.display(), pinned = self.pins.is_some(), "steering taken over");
        Ok(())
    }

    fn write_maps(
        &self,
        table: &RouteTable,
        action: &impl Fn(&RouteEntry) -> u32,
    ) -> Result<(), SteeringError> {
        let target = *lock(&self.target);
        lock(&self.redirect).set(0, target, 0).map_err(map_err(common::MAP_REDIRECT))?;
        self.role.store(Role::Owner as u8, Ordering::Release);
        self.sync(table, action)
    }

    /// Attaches the programs (sock_ops first: a connect redirected before
    /// it is attached would be established without its flow recorded;
    /// getpeername before connect for the same reason). Pinned, a program
    /// whose link is pinned already replaces the one the link runs.
    fn attach_programs(&self) -> Result<(), SteeringError> {
        let mut programs = lock(&self.programs);
        let ebpf = programs.as_mut().ok_or(SteeringError::Missing { what: "program", name: "(detached)" })?;
        let cgroup = &self.cgroup;
        let cgroup_file =
            File::open(cgroup).map_err(|source| SteeringError::Cgroup { path: cgroup.to_owned(), source })?;
        let attach_err = |name: &'static str| {
            move |source| SteeringError::Attach { name, cgroup: cgroup.to_owned(), source }
        };
        let order = [
            common::PROG_SOCK_OPS,
            common::PROG_GETPEERNAME6,
            common::PROG_GETPEERNAME4,
            common::PROG_CONNECT6,
            common::PROG_CONNECT4,
        ];
        for name in order {
            let pinned = match &self.pins {
                Some(pins) => Some((pins.dir.link(name), PinnedLink::open(&pins.dir.link(name))?)),
                None => None,
            };
            // The same steps for both program types, which share no trait:
            // replace the pinned link's program, or attach (and, pinned,
            // hand back the link to pin).
            macro_rules! attach_or_update {
                ($kind:ty) => {{
                    let prog: &mut $kind = program(ebpf, name)?;
                    if let Some((_, Some(link))) = &pinned {
                        let fd = prog.fd().map_err(|source| SteeringError::Program { name, source })?;
                        link.update(fd.as_fd())?;
                        None
                    } else {
                        let id = prog.attach(&cgroup_file, ATTACH_MODE).map_err(attach_err(name))?;
                        match pinned {
                            Some(_) => Some(
                                prog.take_link(id)
                                    .map_err(attach_err(name))?
                                    .try_into()
                                    .map_err(|_| SteeringError::NotPinnable { name })?,
                            ),
                            None => None,
                        }
                    }
                }};
            }
            let fd_link: Option<FdLink> = if name == common::PROG_SOCK_OPS {
                attach_or_update!(SockOps)
            } else {
                attach_or_update!(CgroupSockAddr)
            };
            if let (Some(fd_link), Some((path, _))) = (fd_link, pinned) {
                fd_link.pin(&path).map_err(|e| {
                    SteeringError::Pin(PinError::Link {
                        path: path.clone(),
                        call: "BPF_OBJ_PIN",
                        source: std::io::Error::other(e.to_string()),
                    })
                })?;
            }
        }
        Ok(())
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Where this agent stands (pinned, a successor that replaced the
    /// programs makes it [`Role::Done`], checked here).
    pub fn role(&self) -> Role {
        let role = self.role.load(Ordering::Acquire);
        if role == Role::Owner as u8 && self.superseded() {
            self.role.store(Role::Done as u8, Ordering::Release);
            return Role::Done;
        }
        match role {
            0 => Role::Waiting,
            1 => Role::Owner,
            _ => Role::Done,
        }
    }

    /// Whether the programs attached are this agent's.
    pub fn attached(&self) -> bool {
        self.role() == Role::Owner
    }

    /// Pinned: whether another agent's connect4 now runs on the pinned link.
    fn superseded(&self) -> bool {
        // Before this agent linked its programs, the links run its
        // predecessor's: that is not being superseded.
        let Some(pins) = self.pins.as_ref().filter(|p| p.linked.load(Ordering::Acquire)) else {
            return false;
        };
        match PinnedLink::open(&pins.dir.link(common::PROG_CONNECT4)) {
            Ok(Some(link)) => link.program_id().is_ok_and(|id| id != pins.connect4_id),
            // Unpinned (by `dataplane uninstall`).
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// The pinned state's directory, if pinned.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref().map(|p| &p.dir)
    }

    /// Pinned, as owner: makes every routed connect fail in the kernel (the
    /// target has no listener), for when this agent stops with no successor.
    /// The programs stay attached; the next agent writes its own target.
    pub fn refuse_all(&self) -> Result<(), SteeringError> {
        if self.role() != Role::Owner {
            return Ok(());
        }
        let own = *lock(&self.target);
        let map = &mut *lock(&self.redirect);
        // A successor that wrote its own target since is left alone (what
        // remains of the race, its `keep_target` repairs within a second).
        if map.get(&0, 0).ok() == Some(own) {
            map.set(0, RedirectTarget { flags: 0, ..own }, 0).map_err(map_err(common::MAP_REDIRECT))?;
        }
        self.role.store(Role::Done as u8, Ordering::Release);
        Ok(())
    }

    /// As owner, puts this agent's redirect target back if the map holds
    /// another (an agent that stopped just as this one took over may have
    /// written its refusal over it).
    pub fn keep_target(&self) {
        if self.role() != Role::Owner {
            return;
        }
        let want = *lock(&self.target);
        let map = &mut *lock(&self.redirect);
        if map.get(&0, 0).ok() != Some(want) {
            warn!("the redirect target was overwritten; writing it back");
            let _ = map.set(0, want, 0);
        }
    }

    /// Unpinned: detaches the connect programs only: no new connect is
    /// steered, while one already redirected still has its flow recorded
    /// when its handshake completes (sock_ops) and sees its original peer
    /// (getpeername). The mirror of the attach order; [`Steering::detach`]
    /// removes the rest once such stragglers have landed. Pinned: nothing
    /// (the programs stay for the next agent).
    pub fn stop_redirecting(&self) {
        if self.pins.is_some() {
            return;
        }
        let mut programs = lock(&self.programs);
        let Some(ebpf) = programs.as_mut() else { return };
        for name in [common::PROG_CONNECT4, common::PROG_CONNECT6] {
            let prog: Option<&mut CgroupSockAddr> = ebpf.program_mut(name).and_then(|p| p.try_into().ok());
            if let Err(e) =
                prog.map_or(Err("not loaded".to_owned()), |p| p.unload().map_err(|e| e.to_string()))
            {
                // Stopping new steering comes first: detach everything.
                warn!(program = name, error = %e, "detaching one program failed; detaching all");
                *programs = None;
                self.role.store(Role::Done as u8, Ordering::Release);
                return;
            }
        }
        debug!(cgroup = %self.cgroup.display(), "connect programs detached");
    }

    /// Unpinned: detaches every program; connects are no longer steered
    /// afterwards. Pinned: the programs stay attached through their pins.
    pub fn detach(&self) {
        if self.pins.is_some() {
            return;
        }
        self.role.store(Role::Done as u8, Ordering::Release);
        if lock(&self.programs).take().is_some() {
            debug!(cgroup = %self.cgroup.display(), "eBPF programs detached");
        }
    }

    /// Dials that failed because the bypass map was full.
    pub fn bypass_full(&self) -> u64 {
        self.bypass_full.load(Ordering::Relaxed)
    }

    /// Whether a connect the programs refuse fails with ECONNREFUSED (the
    /// kernel lets connect hooks call `bpf_set_retval`: 5.18 and later) or
    /// with EPERM (older kernels).
    pub fn refuses_with_econnrefused(&self) -> bool {
        self.econnrefused
    }

    /// The per-socket maps' sizes.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Entries in the per-socket maps and what the LRU maps evicted,
    /// counted at most every [`ENTRIES_EVERY`] (a scrape in between gets
    /// the last count): counting walks the maps.
    ///
    /// Evicted is what went in, less what the programs removed at close,
    /// less what is there. Inserts are read before the walk and removals
    /// after it, so an entry that comes or goes during the walk can only
    /// make the figure low, never invent an eviction; it is kept monotonic.
    /// The counters live as long as the maps, so this holds across agent
    /// restarts. An entry FLOWS overwrote (a client's address and port
    /// reused while a missed close left the old one) counts as evicted.
    pub fn map_stats(&self) -> MapStats {
        let mut cached = lock(&self.map_stats);
        if let Some((at, stats)) = *cached
            && at.elapsed() < ENTRIES_EVERY
        {
            return stats;
        }
        let before = self.counters().unwrap_or_default();
        // One map at a time (the flow path waits on these locks), and at
        // most a little past capacity: under churn a walk whose cursor key
        // is deleted starts over.
        let walk = |cap: u32| cap as usize + 1024;
        let orig_dst = lock(&self.orig_dst).keys().take(walk(self.capacity.flows)).count() as u64;
        let flows = lock(&self.flows).keys().take(walk(self.capacity.flows)).count() as u64;
        let bypass = lock(&self.bypass).keys().take(walk(self.capacity.bypass)).count() as u64;
        let after = self.counters().unwrap_or_default();
        let gone = |inserted: Counter, removed: Counter, present: u64| {
            before.get(inserted).saturating_sub(after.get(removed)).saturating_sub(present)
        };
        let previous = cached.map(|(_, s)| s).unwrap_or_default();
        let stats = MapStats {
            orig_dst,
            flows,
            bypass,
            orig_dst_evicted: previous.orig_dst_evicted.max(gone(
                Counter::ConnectRedirected,
                Counter::SockOpsClosed,
                orig_dst,
            )),
            flows_evicted: previous.flows_evicted.max(gone(
                Counter::SockOpsFlowRecorded,
                Counter::SockOpsFlowForgotten,
                flows,
            )),
        };
        *cached = Some((std::time::Instant::now(), stats));
        stats
    }

    /// Makes the tries hold `table`, each entry with the action `action`
    /// gives it (redirect, or refuse while its peer is down), as one change:
    /// read what they hold, write (new and changed entries first, then
    /// removals, so no connect meets a gap), read back and compare. If a
    /// write fails part-way (a full trie, for one) or the tries do not hold
    /// what was written, they are put back exactly as they were and the
    /// error is returned: a refused reload leaves the kernel as it found it.
    /// Only the owner writes: before [`Steering::take_over`] (the table is
    /// written then) and after a successor took over, this does nothing.
    pub fn sync(&self, table: &RouteTable, action: impl Fn(&RouteEntry) -> u32) -> Result<(), SteeringError> {
        if self.role() != Role::Owner {
            return Ok(());
        }
        let mut v4 = lock(&self.routes_v4);
        let mut v6 = lock(&self.routes_v6);
        let (old4, old6) = (trie::read(&v4, common::MAP_ROUTES_V4)?, trie::read(&v6, common::MAP_ROUTES_V6)?);
        let (mut new4, mut new6) = (trie::Entries::new(), trie::Entries::new());
        for e in table.entries() {
            let value = RouteValue { route_id: e.id, action: action(e) };
            match e.net {
                IpNet::V4(n) => new4.insert(trie::v4_key(&n), value),
                IpNet::V6(n) => new6.insert(trie::v6_key(&n), value),
            };
        }
        if (&old4, &old6) == (&new4, &new6) {
            return Ok(());
        }
        let fault = self.fault_after.swap(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        let mut budget = trie::Budget(fault);
        let applied =
            trie::write(&mut v4, &old4, &new4, common::MAP_ROUTES_V4, trie::Order::GapFree, &mut budget)
                .and_then(|()| {
                    trie::write(
                        &mut v6,
                        &old6,
                        &new6,
                        common::MAP_ROUTES_V6,
                        trie::Order::GapFree,
                        &mut budget,
                    )
                })
                .and_then(|()| trie::verify(&v4, &new4, common::MAP_ROUTES_V4))
                .and_then(|()| trie::verify(&v6, &new6, common::MAP_ROUTES_V6));
        let Err(failed) = applied else { return Ok(()) };
        // Back to what was there: removals first (a full trie takes no
        // insert), then the old values.
        let mut unlimited = trie::Budget(usize::MAX);
        let rolled_back = trie::read(&v4, common::MAP_ROUTES_V4)
            .and_then(|now| {
                trie::write(
                    &mut v4,
                    &now,
                    &old4,
                    common::MAP_ROUTES_V4,
                    trie::Order::RemoveFirst,
                    &mut unlimited,
                )
            })
            .and_then(|()| trie::read(&v6, common::MAP_ROUTES_V6))
            .and_then(|now| {
                trie::write(
                    &mut v6,
                    &now,
                    &old6,
                    common::MAP_ROUTES_V6,
                    trie::Order::RemoveFirst,
                    &mut unlimited,
                )
            })
            .and_then(|()| trie::verify(&v4, &old4, common::MAP_ROUTES_V4))
            .and_then(|()| trie::verify(&v6, &old6, common::MAP_ROUTES_V6));
        match rolled_back {
            Ok(()) => Err(failed),
            Err(rollback) => {
                Err(SteeringError::RollbackFailed { apply: Box::new(failed), rollback: Box::new(rollback) })
            }
        }
    }

    /// Makes the next [`Steering::sync`] that writes fail after `writes` successful
    /// map writes, as a kernel error half-way through would (tests inject
    /// it to check the rollback; nothing else calls it).
    #[doc(hidden)]
    pub fn fail_next_sync_after(&self, writes: usize) {
        self.fault_after.store(writes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of entries in the route tries (v4, v6).
    pub fn route_entries(&self) -> (usize, usize) {
        (lock(&self.routes_v4).keys().count(), lock(&self.routes_v6).keys().count())
    }

    /// The original destination of a flow accepted from `peer`. The entry
    /// stays: the kernel removes it when the client socket closes.
    pub fn lookup_flow(&self, peer: SocketAddr) -> Option<Recovered> {
        let key = match peer.ip() {
            IpAddr::V4(ip) => FlowKey::v4(common::v4_word(ip.octets()), peer.port()),
            IpAddr::V6(ip) => FlowKey::v6(common::v6_words(ip.octets()), peer.port()),
        };
        let orig = lock(&self.flows).get(&key, 0).ok()?;
        Some(Recovered { dst: orig_socket_addr(&orig), route_id: orig.route_id })
    }

    /// Marks one of the agent's own sockets so the connect hooks leave it alone
    /// until the returned guard is dropped (after `connect()` returned).
    pub fn bypass(&self, cookie: u64) -> Result<BypassGuard<'_>, SteeringError> {
        if let Err(e) = lock(&self.bypass).insert(cookie, 1, 0) {
            self.bypass_full.fetch_add(1, Ordering::Relaxed);
            return Err(map_err(common::MAP_BYPASS)(e));
        }
        Ok(BypassGuard { steering: self, cookie })
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<KernelCounters, SteeringError> {
        let mut out = KernelCounters::default();
        for c in Counter::ALL {
            let per_cpu = self.counters.get(&(c as u32), 0).map_err(map_err(common::MAP_COUNTERS))?;
            out.0[c as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

/// How often [`Steering::map_stats`] walks the maps.
pub const ENTRIES_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Entries in the per-socket maps, and what the LRU ones evicted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    pub orig_dst: u64,
    pub flows: u64,
    pub bypass: u64,
    pub orig_dst_evicted: u64,
    pub flows_evicted: u64,
}

/// Removes a socket from the bypass set when dropped.
pub struct BypassGuard<'a> {
    steering: &'a Steering,
    cookie: u64,
}

impl Drop for BypassGuard<'_> {
    fn drop(&mut self) {
        let _ = lock(&self.steering.bypass).remove(&self.cookie);
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, SteeringError> {
    ebpf.take_map(name).ok_or(SteeringError::Missing { what: "map", name })
}

fn try_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, SteeringError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    take(ebpf, name)?.try_into().map_err(map_err(name))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, SteeringError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(SteeringError::Missing { what: "program", name })?;
    prog.try_into().map_err(|source| SteeringError::Program { name, source })
}

fn redirect_target(v4: Option<SocketAddr>, v6: Option<SocketAddr>) -> RedirectTarget {
    let mut t = RedirectTarget::default();
    if let Some(SocketAddr::V4(a)) = v4 {
        t.v4_addr = common::v4_word(a.ip().octets());
        t.v4_port = common::port_to_user(a.port());
        t.flags |= REDIRECT_V4_ENABLED;
    }
    if let Some(SocketAddr::V6(a)) = v6 {
        t.v6_addr = common::v6_words(a.ip().octets());
        t.v6_port = common::port_to_user(a.port());
        t.flags |= REDIRECT_V6_ENABLED;
    }
    t
}

fn orig_socket_addr(o: &OrigDst) -> SocketAddr {
    let port = common::port_from_user(o.port);
    if o.family == AF_INET {
        return SocketAddr::new(IpAddr::from(common::v4_octets(o.addr[0])), port);
    }
    debug_assert_eq!(o.family, AF_INET6);
    let ip = std::net::Ipv6Addr::from(common::v6_octets(o.addr));
    // A dual-stack socket that dialled ::ffff:a.b.c.d wants the IPv4 host.
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), port),
        None => SocketAddr::new(ip.into(), port),
    }
}

/// The kernel-side log level follows the agent's: below it, the programs skip
/// logging entirely (one global load on the hot path).
fn kernel_log_level() -> u8 {
    use tracing::level_filters::LevelFilter;
    let level = match LevelFilter::current() {
        LevelFilter::TRACE => aya_log::Level::Trace,
        LevelFilter::DEBUG => aya_log::Level::Debug,
        LevelFilter::INFO => aya_log::Level::Info,
        LevelFilter::WARN => aya_log::Level::Warn,
        _ => aya_log::Level::Error,
    };
    level as u8
}

/// Drains the programs' log ring buffer on the runtime; hands the logger
/// back where there is no runtime to drain it on.
fn spawn_kernel_logger(logger: KernelLogger) -> Option<KernelLogger> {
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return Some(logger) };
    // SAFETY: the logger owns its ring buffer fd, which stays open and the same
    // for as long as the logger (moved into the AsyncFd) lives.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let (logger, e) = e.into_parts();
            warn!(error = %e, "eBPF logs will not be drained");
            return Some(logger);
        }
    };
    handle.spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orig_dst_converts_back_to_socket_addrs() {
        let v4: SocketAddr = "198.51.100.101:6443".parse().expect("addr");
        let o = OrigDst {
            addr: [common::v4_word([198, 51, 100, 101]), 0, 0, 0],
            port: common::port_to_user(6443),
            family: AF_INET,
            ..Default::default()
        };
        assert_eq!(orig_socket_addr(&o), v4);
        let mapped = OrigDst {
            addr: common::v4_mapped_words(common::v4_word([198, 51, 100, 101])),
            port: common::port_to_user(6443),
            family: AF_INET6,
            ..Default::default()
        };
        assert_eq!(orig_socket_addr(&mapped), v4);
        let v6: SocketAddr = "[2001:db8::101]:6443".parse().expect("addr");
        let o6 = OrigDst {
            addr: common::v6_words("2001:db8::101".parse::<std::net::Ipv6Addr>().expect("ip").octets()),
            port: common::port_to_user(6443),
            family: AF_INET6,
            ..Default::default()
        };
        assert_eq!(orig_socket_addr(&o6), v6);
    }

    #[test]
    fn redirect_target_sets_flags_per_family() {
        let t = redirect_target(Some("169.254.77.1:15001".parse().expect("addr")), None);
        assert_eq!(t.flags, REDIRECT_V4_ENABLED);
        assert_eq!(common::v4_octets(t.v4_addr), [169, 254, 77, 1]);
        assert_eq!(common::port_from_user(t.v4_port), 15001);
        let t = redirect_target(None, Some("[fd00:d47a::1]:15001".parse().expect("addr")));
        assert_eq!(t.flags, REDIRECT_V6_ENABLED);
    }
}
