//! The programs and their maps (built for the BPF target only).

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_addr,
        bpf_sock_ops,
    },
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use dataplane_common::{
    AF_INET, AF_INET6, BYPASS_MAX_ENTRIES, ConnectVerdict, Counter, FLOWS_MAX_ENTRIES, FlowKey, OrigDst,
    REDIRECT_V4_ENABLED, REDIRECT_V6_ENABLED, ROUTES_MAX_ENTRIES, RedirectTarget, RouteValue,
    connect_verdict, is_tcp_stream, is_v4_mapped, v4_mapped_words,
};

/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails the syscall (EPERM, or what `bpf_set_retval` set).
const DENY: i32 = 0;
/// ECONNREFUSED from include/uapi/asm-generic/errno.h.
const ECONNREFUSED: i32 = 111;

/// Set by the loader (a read-only global) where the kernel lets connect
/// hooks call `bpf_set_retval` (the agent probes it): a refused connect then
/// fails with ECONNREFUSED, as a closed port would, instead of EPERM. The
/// verifier skips the call where this is 0, so older kernels load the same
/// object.
#[unsafe(no_mangle)]
static SET_RETVAL: u32 = 0;
/// TCP_CLOSE from include/net/tcp_states.h.
const TCP_CLOSE: u32 = 7;

#[map(name = "ROUTES_V4")]
static ROUTES_V4: LpmTrie<u32, RouteValue> = LpmTrie::with_max_entries(ROUTES_MAX_ENTRIES, 0);
#[map(name = "ROUTES_V6")]
static ROUTES_V6: LpmTrie<[u32; 4], RouteValue> = LpmTrie::with_max_entries(ROUTES_MAX_ENTRIES, 0);
#[map(name = "REDIRECT")]
static REDIRECT: Array<RedirectTarget> = Array::with_max_entries(1, 0);
#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, OrigDst> = LruHashMap::with_max_entries(FLOWS_MAX_ENTRIES, 0);
#[map(name = "BYPASS")]
static BYPASS: HashMap<u64, u32> = HashMap::with_max_entries(BYPASS_MAX_ENTRIES, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate mid-run.
        unsafe { *slot += 1 };
    }
}

/// Reads the four `user_ip6` words one 32-bit load each: the verifier rejects
/// wider loads of this context field, which LLVM would otherwise merge.
#[inline(always)]
unsafe fn read_ip6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p as *const u32;
    // SAFETY: the caller passes a pointer to a 4-word context field.
    unsafe { [read_volatile(p), read_volatile(p.add(1)), read_volatile(p.add(2)), read_volatile(p.add(3))] }
}

#[inline(always)]
unsafe fn write_ip6(p: *mut [u32; 4], w: [u32; 4]) {
    let p = p as *mut u32;
    // SAFETY: the caller passes a pointer to a writable 4-word context field.
    unsafe {
        write_volatile(p, w[0]);
        write_volatile(p.add(1), w[1]);
        write_volatile(p.add(2), w[2]);
        write_volatile(p.add(3), w[3]);
    }
}

/// What a connect hook does with a routed connect.
enum Routed {
    /// Rewrite to the listener.
    Redirect(RedirectTarget),
    /// Leave it alone (the agent's own socket, or a route set to pass).
    Pass,
    /// Fail it at once: it cannot be steered and must not leave by the
    /// default route.
    Refuse,
}

/// Counts the verdict; `None` when it goes on to redirect.
#[inline(always)]
fn settle(verdict: ConnectVerdict) -> Option<Routed> {
    match verdict {
        ConnectVerdict::NotRouted => count(Counter::ConnectNotRouted),
        ConnectVerdict::AgentSocket => count(Counter::ConnectAgentSocket),
        ConnectVerdict::NoListener => count(Counter::ConnectNoListener),
        ConnectVerdict::NoPeer => count(Counter::ConnectNoPeer),
        ConnectVerdict::Redirect => return None,
    }
    Some(if verdict.refuses() { Routed::Refuse } else { Routed::Pass })
}

/// The hook's return value for a refused connect.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: a read of a loader-set read-only global.
    if unsafe { read_volatile(addr_of!(SET_RETVAL)) } != 0 {
        // SAFETY: helper call with a plain integer.
        unsafe { aya_ebpf::helpers::bpf_set_retval(-ECONNREFUSED) };
    }
    DENY
}

/// Reads type and protocol; counts and returns false for anything but TCP.
#[inline(always)]
fn tcp_only(sa: *const bpf_sock_addr) -> bool {
    // SAFETY: plain loads of context fields allowed for connect4/6.
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    let tcp = is_tcp_stream(sock_type, protocol);
    if !tcp {
        count(Counter::ConnectNotTcp);
    }
    tcp
}

/// The tail both connect hooks share once a route matched: the agent's own
/// sockets pass; a route without a live peer, a family without a listener,
/// or a destination that cannot be recorded is refused; otherwise the
/// original destination is recorded and the redirect target returned. The
/// cookie and target are read only here, so unrouted connects pay one LPM
/// lookup.
#[inline(always)]
fn redirect_routed(
    ctx: &SockAddrContext,
    route: RouteValue,
    listener_flag: u32,
    addr: [u32; 4],
    family: u32,
) -> Routed {
    let Some(target) = REDIRECT.get(0).copied() else {
        count(Counter::ConnectConfigError);
        return Routed::Refuse;
    };
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only tested for presence, never read.
    let agent = unsafe { BYPASS.get(cookie).is_some() };
    if let Some(settled) = settle(connect_verdict(Some(route), agent, target.flags & listener_flag != 0)) {
        return settled;
    }
    // SAFETY: read of user_port, allowed for connect4/6.
    let port = unsafe { read_volatile(addr_of!((*ctx.sock_addr).user_port)) };
    let orig = OrigDst { addr, port, family, route_id: route.route_id, _pad: 0 };
    // Without a record the agent could not serve the flow, and untouched it
    // would leave by the default route: refused.
    if ORIG_DST.insert(cookie, orig, 0).is_err() {
        count(Counter::ConnectMapError);
        return Routed::Refuse;
    }
    count(Counter::ConnectRedirected);
    debug!(ctx, "connect redirected, route {}", route.route_id);
    Routed::Redirect(target)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    if try_connect4(&ctx) { ALLOW } else { refuse() }
}

/// False when the connect is refused.
fn try_connect4(ctx: &SockAddrContext) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if !tcp_only(sa) {
        return true;
    }
    // SAFETY: plain load of user_ip4, allowed for connect4.
    let dst = unsafe { read_volatile(addr_of!((*sa).user_ip4)) };
    let Some(route) = ROUTES_V4.get(Key::new(32, dst)).copied() else {
        count(Counter::ConnectNotRouted);
        return true;
    };
    let target = match redirect_routed(ctx, route, REDIRECT_V4_ENABLED, [dst, 0, 0, 0], AF_INET) {
        Routed::Redirect(t) => t,
        Routed::Pass => return true,
        Routed::Refuse => return false,
    };
    // SAFETY: user_ip4 and user_port are writable in connect4.
    unsafe {
        write_volatile(addr_of_mut!((*sa).user_ip4), target.v4_addr);
        write_volatile(addr_of_mut!((*sa).user_port), target.v4_port);
    }
    true
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if try_connect6(&ctx) { ALLOW } else { refuse() }
}

/// False when the connect is refused.
fn try_connect6(ctx: &SockAddrContext) -> bool {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if !tcp_only(sa) {
        return true;
    }
    // SAFETY: loads of user_ip6, one word at a time.
    let dst = unsafe { read_ip6(addr_of!((*sa).user_ip6)) };
    // A dual-stack socket dialling ::ffff:a.b.c.d is an IPv4 flow: route it by
    // the IPv4 table and send it to the IPv4 listener in mapped form.
    let mapped = is_v4_mapped(dst);
    let route = if mapped {
        ROUTES_V4.get(Key::new(32, dst[3])).copied()
    } else {
        ROUTES_V6.get(Key::new(128, dst)).copied()
    };
    let Some(route) = route else {
        count(Counter::ConnectNotRouted);
        return true;
    };
    let flag = if mapped { REDIRECT_V4_ENABLED } else { REDIRECT_V6_ENABLED };
    let target = match redirect_routed(ctx, route, flag, dst, AF_INET6) {
        Routed::Redirect(t) => t,
        Routed::Pass => return true,
        Routed::Refuse => return false,
    };
    let (addr, port) = if mapped {
        count(Counter::Connect6V4Mapped);
        (v4_mapped_words(target.v4_addr), target.v4_port)
    } else {
        (target.v6_addr, target.v6_port)
    };
    // SAFETY: user_ip6 and user_port are writable in connect6.
    unsafe {
        write_ip6(addr_of_mut!((*sa).user_ip6), addr);
        write_volatile(addr_of_mut!((*sa).user_port), port);
    }
    true
}

/// Returns the original destination of a redirected socket to getpeername().
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) -> i32 {
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the entry is copied out at once; a concurrent close may delete it,
    // in which case the stale copy is still the right answer for this socket.
    let Some(orig) = (unsafe { ORIG_DST.get(cookie) }).copied() else {
        return ALLOW;
    };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6 and user_port are writable in getpeername4/6.
    unsafe {
        if v6 {
            write_ip6(addr_of_mut!((*sa).user_ip6), orig.addr);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), orig.addr[0]);
        }
        write_volatile(addr_of_mut!((*sa).user_port), orig.port);
    }
    count(Counter::GetpeernameRestored);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true)
}

/// On an established redirected socket, publishes its flow under the client's
/// own (address, port), which is what the agent sees as the accepted socket's
/// peer; on close, forgets the socket.
#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    try_sock_ops(&ctx);
    1
}

fn try_sock_ops(ctx: &SockOpsContext) {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: plain load of the op field.
    let op = unsafe { read_volatile(addr_of!((*ops).op)) };
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE;
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !closing {
        return;
    }
    // SAFETY: cookie helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = client_key(ops);
    if closing {
        // The client reaches CLOSE only after a reset or after the agent's own
        // FIN (TIME_WAIT), so the agent no longer needs the flow: forget it.
        // While this socket lived no other socket could hold the same key.
        if FLOWS.remove(key).is_ok() {
            count(Counter::SockOpsFlowForgotten);
        }
        if ORIG_DST.remove(cookie).is_ok() {
            count(Counter::SockOpsClosed);
        }
        return;
    }
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_DST.get(cookie) }).copied() else {
        return;
    };
    if FLOWS.insert(key, orig, 0).is_err() {
        count(Counter::SockOpsMapError);
        warn!(ctx, "sock_ops: FLOWS insert failed");
        return;
    }
    count(Counter::SockOpsFlowRecorded);
    // Ask for state callbacks on this socket only, to forget it at close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// The client's own (address, port): what the agent sees as its peer.
#[inline(always)]
fn client_key(ops: *mut bpf_sock_ops) -> FlowKey {
    // Each field is read unconditionally, then chosen: branch-dependent ctx
    // loads that LLVM merges are rejected by the verifier.
    // SAFETY: loads of sock_ops context fields, one word at a time.
    let (family, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_ip6(addr_of!((*ops).local_ip6)),
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    if family == AF_INET6 { FlowKey::v6(ip6, port as u16) } else { FlowKey::v4(ip4, port as u16) }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
