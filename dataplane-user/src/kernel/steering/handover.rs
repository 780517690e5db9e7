//! Who steers a cgroup: taking the programs over (attaching them, or,
//! pinned, replacing a predecessor's in place), noticing a successor that
//! replaced ours, and what a stopping owner leaves in the maps.

use std::{fs::File, net::SocketAddr, os::fd::AsFd, sync::atomic::Ordering};

use aya::{
    maps::{Array, MapData},
    programs::{CgroupSockAddr, SockOps, links::FdLink},
};
use dataplane_common::{self as common, RedirectTarget};
use tracing::{debug, warn};

use super::{ATTACH_MODE, Role, Steering, SteeringError, map_err, program, redirect_target};
use crate::{
    kernel::pins::{PinError, PinnedLink},
    lock,
    routes::{RouteEntry, RouteTable},
};

impl Steering {
    /// Pinned: where routed connects go now, the listener of the agent whose
    /// programs are attached, as its REDIRECT map says (the adopted one, or,
    /// with maps of another layout, that layout's pinned one). `None`
    /// unpinned, with nothing attached, or when that agent refused all.
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
}
