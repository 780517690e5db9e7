//! Loading, attaching and talking to the kernel programs: route tries, the
//! redirect target, flow recovery, the agent's bypass set and the counters.
//! Who steers (taking over, handing over) is in `handover`; how full the
//! per-socket maps are, in `census`.

mod census;
mod handover;

pub use census::MapStats;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use dataplane_common::{
    self as common, AF_INET, AF_INET6, Counter, FlowKey, OrigDst, REDIRECT_V4_ENABLED, REDIRECT_V6_ENABLED,
    RedirectTarget, RouteValue,
};
use ipnet::IpNet;
use tracing::{debug, warn};

use super::{
    logs::{self, KernelLogger},
    pins::{self, Capacity, PinDir, PinError},
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
    routes_v4: Mutex<RoutesV4>,
    routes_v6: Mutex<RoutesV6>,
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

/// cgroup bpf_links (kernel >= 5.7, which aya uses when available) always
/// coexist with other programs on the cgroup, and link_create rejects the
/// ALLOW_MULTI flag (EINVAL): `Single` means "no flags" there, not exclusive.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// Program names and the cgroup sock_addr hooks they attach to.
const SOCK_ADDR_PROGRAMS: [&str; 4] =
    [common::PROG_CONNECT4, common::PROG_CONNECT6, common::PROG_GETPEERNAME4, common::PROG_GETPEERNAME6];

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
            Some(dir) => dir.check_maps(capacity)?,
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
        let level = logs::kernel_log_level();
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
                pins::layout(capacity).iter().map(|m| (m.0, dir.map(m.0))).collect()
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
            Ok(logger) => logs::spawn_kernel_logger(logger),
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

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Whether the programs attached are this agent's.
    pub fn attached(&self) -> bool {
        self.role() == Role::Owner
    }

    /// The pinned state's directory, if pinned.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref().map(|p| &p.dir)
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
        let Err(failed) = write_tries(
            (&mut v4, &mut v6),
            (&old4, &old6),
            (&new4, &new6),
            trie::Order::GapFree,
            &mut trie::Budget(fault),
        ) else {
            return Ok(());
        };
        // Back to what was there, from what the tries hold now: removals
        // first (a full trie takes no insert), then the old values.
        let rolled_back = trie::read(&v4, common::MAP_ROUTES_V4)
            .and_then(|now4| Ok((now4, trie::read(&v6, common::MAP_ROUTES_V6)?)))
            .and_then(|(now4, now6)| {
                write_tries(
                    (&mut v4, &mut v6),
                    (&now4, &now6),
                    (&old4, &old6),
                    trie::Order::RemoveFirst,
                    &mut trie::Budget(usize::MAX),
                )
            });
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

type RoutesV4 = LpmTrie<MapData, u32, RouteValue>;
type RoutesV6 = LpmTrie<MapData, [u32; 4], RouteValue>;

/// Changes both route tries from `from` to `to` in `order`, then checks
/// that they hold exactly `to`.
fn write_tries(
    (v4, v6): (&mut RoutesV4, &mut RoutesV6),
    from: (&trie::Entries<u32>, &trie::Entries<[u32; 4]>),
    to: (&trie::Entries<u32>, &trie::Entries<[u32; 4]>),
    order: trie::Order,
    budget: &mut trie::Budget,
) -> Result<(), SteeringError> {
    trie::write(v4, from.0, to.0, common::MAP_ROUTES_V4, order, budget)?;
    trie::write(v6, from.1, to.1, common::MAP_ROUTES_V6, order, budget)?;
    trie::verify(v4, to.0, common::MAP_ROUTES_V4)?;
    trie::verify(v6, to.1, common::MAP_ROUTES_V6)
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
