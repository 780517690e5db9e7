//! A stand-in for another product's cgroup programs (Cilium's socket load
//! balancer, say), for the coexistence test: a connect4 program that
//! rewrites a "service VIP" to a backend, and a sock_ops program that counts
//! its callbacks, attached with `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI` as
//! such products do. Hand-assembled and loaded with bpf(2) directly, so it
//! shares nothing with the agent's loader: whatever the agent does to the
//! cgroup, it cannot mistake these for its own.

use std::{
    ffi::CString,
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// Offsets in `struct bpf_sock_addr`.
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<i64> {
    // SAFETY: attr is a zeroed buffer larger than the union member each
    // command reads; its size is passed along.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn put32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// One instruction: opcode, registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64 | ((dst | (src << 4)) as u64) << 8 | (off as u16 as u64) << 16 | (imm as u32 as u64) << 32
}

fn load(prog_type: u32, attach_type: u32, insns: &[u64], name: &str) -> Result<OwnedFd> {
    let license = CString::new("GPL").expect("no NUL");
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, prog_type);
    put32(&mut attr, 4, insns.len() as u32);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1);
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    put32(&mut attr, 68, attach_type);
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        anyhow::anyhow!("loading {name}: {e}: {}", String::from_utf8_lossy(&log[..end]))
    })?;
    // SAFETY: BPF_PROG_LOAD returned a descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The other product's programs, attached to one cgroup until dropped.
pub struct OtherProduct {
    cgroup: std::fs::File,
    connect4: OwnedFd,
    sock_ops: OwnedFd,
    counter: OwnedFd,
}

impl OtherProduct {
    /// Attaches a connect4 that sends `vip` to `backend`, and a counting
    /// sock_ops, to `cgroup`.
    pub fn attach(cgroup: &Path, vip: SocketAddrV4, backend: SocketAddrV4) -> Result<OtherProduct> {
        // Before 5.11 programs and maps are charged to RLIMIT_MEMLOCK, whose
        // default (8 MiB, less what the agent's loader took in this
        // process) runs out after a few loads.
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: a valid rlimit; failing leaves the limit as it was.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        let word = |a: &SocketAddrV4| i32::from_ne_bytes(a.ip().octets());
        let port = |a: &SocketAddrV4| a.port().to_be() as i32;
        let connect4 = [
            insn(0x61, 2, 1, USER_IP4, 0),       // w2 = ctx->user_ip4
            insn(0x56, 2, 0, 6, word(&vip)),     // if w2 != vip goto out
            insn(0x61, 2, 1, USER_PORT, 0),      // w2 = ctx->user_port
            insn(0x56, 2, 0, 4, port(&vip)),     // if w2 != vip port goto out
            insn(0xb4, 3, 0, 0, word(&backend)), // w3 = backend ip
            insn(0x63, 1, 3, USER_IP4, 0),       // ctx->user_ip4 = w3
            insn(0xb4, 3, 0, 0, port(&backend)), // w3 = backend port
            insn(0x63, 1, 3, USER_PORT, 0),      // ctx->user_port = w3
            insn(0xb7, 0, 0, 0, 1),              // out: r0 = 1 (allow)
            insn(0x95, 0, 0, 0, 0),              // exit
        ];
        let connect4 =
            load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT, &connect4, "other_connect4")?;

        let mut attr = [0u8; 72];
        put32(&mut attr, 0, BPF_MAP_TYPE_ARRAY);
        put32(&mut attr, 4, 4);
        put32(&mut attr, 8, 8);
        put32(&mut attr, 12, 1);
        let map = sys_bpf(BPF_MAP_CREATE, &mut attr).context("creating the stand-in's counter")?;
        // SAFETY: BPF_MAP_CREATE returned a descriptor we now own.
        let counter = unsafe { OwnedFd::from_raw_fd(map as i32) };
        let map_fd = counter.as_raw_fd();
        let sock_ops = [
            insn(0x18, 1, 1, 0, map_fd), // r1 = map (BPF_PSEUDO_MAP_FD)
            insn(0, 0, 0, 0, 0),
            insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),  // r2 = r10
            insn(0x07, 2, 0, 0, -4),  // r2 += -4
            insn(0x85, 0, 0, 0, 1),   // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),   // if r0 == 0 goto out
            insn(0xb7, 1, 0, 0, 1),   // r1 = 1
            insn(0xdb, 0, 1, 0, 0),   // lock *(u64 *)(r0 + 0) += r1
            insn(0xb7, 0, 0, 0, 1),   // out: r0 = 1
            insn(0x95, 0, 0, 0, 0),   // exit
        ];
        let sock_ops = load(BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS, &sock_ops, "other_sockops")?;
        let cgroup = std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let other = OtherProduct { cgroup, connect4, sock_ops, counter };
        other
            .prog_attach(BPF_PROG_ATTACH, &other.sock_ops, BPF_CGROUP_SOCK_OPS)
            .context("attaching sock_ops")?;
        other
            .prog_attach(BPF_PROG_ATTACH, &other.connect4, BPF_CGROUP_INET4_CONNECT)
            .context("attaching connect4")?;
        Ok(other)
    }

    fn prog_attach(&self, cmd: libc::c_long, prog: &OwnedFd, attach_type: u32) -> io::Result<()> {
        // union bpf_attr: { u32 target_fd; u32 attach_bpf_fd; u32 attach_type; u32 attach_flags; ... }
        let mut attr = [0u8; 32];
        put32(&mut attr, 0, self.cgroup.as_raw_fd() as u32);
        put32(&mut attr, 4, prog.as_raw_fd() as u32);
        put32(&mut attr, 8, attach_type);
        if cmd == BPF_PROG_ATTACH {
            put32(&mut attr, 12, BPF_F_ALLOW_MULTI);
        }
        sys_bpf(cmd, &mut attr).map(drop)
    }

    /// sock_ops callbacks the stand-in has seen.
    pub fn sock_ops_calls(&self) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        // union bpf_attr: { u32 map_fd; u64 key; u64 value; u64 flags; }
        let mut attr = [0u8; 32];
        put32(&mut attr, 0, self.counter.as_raw_fd() as u32);
        put64(&mut attr, 8, &key as *const u32 as u64);
        put64(&mut attr, 16, &mut value as *mut u64 as u64);
        sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the stand-in's counter")?;
        Ok(value)
    }
}

impl Drop for OtherProduct {
    fn drop(&mut self) {
        let _ = self.prog_attach(BPF_PROG_DETACH, &self.connect4, BPF_CGROUP_INET4_CONNECT);
        let _ = self.prog_attach(BPF_PROG_DETACH, &self.sock_ops, BPF_CGROUP_SOCK_OPS);
    }
}
