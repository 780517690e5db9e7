//! Map layouts, map/program names and pure decision functions shared by the eBPF
//! programs (`dataplane-ebpf`) and the agent (`dataplane-user`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on
//! the byte layout; each type carries a compile-time size assertion naming the
//! map that uses it. Addresses are kept in the kernel's own representation
//! (network-order bytes in memory) so the eBPF side never converts them.
#![cfg_attr(not(test), no_std)]

pub mod counter;

pub use counter::Counter;

/// LPM trie of IPv4 routes: key data is the address as `u32` whose in-memory
/// bytes are the octets (as in `bpf_sock_addr.user_ip4`), value [`RouteValue`].
pub const MAP_ROUTES_V4: &str = "ROUTES_V4";
/// LPM trie of IPv6 routes: key data is `[u32; 4]` as in `bpf_sock_addr.user_ip6`.
pub const MAP_ROUTES_V6: &str = "ROUTES_V6";
/// Array with one [`RedirectTarget`]: where routed connects are sent.
pub const MAP_REDIRECT: &str = "REDIRECT";
/// LRU hash: socket cookie (u64) of a redirected client socket -> [`OrigDst`].
/// Read by getpeername4/6; deleted when the socket closes.
pub const MAP_ORIG_DST: &str = "ORIG_DST";
/// LRU hash: the client's own (address, port) as [`FlowKey`] -> [`OrigDst`].
/// Written by sock_ops when a redirected socket is established; the agent looks
/// it up with the peer address of the socket it accepted. sock_ops deletes it
/// when the client socket closes: the agent never deletes, because a client
/// reset before accept and a reused port would make it delete a newer flow's.
pub const MAP_FLOWS: &str = "FLOWS";
/// Hash (not LRU: an evicted entry would send the agent's own dial back into
/// itself): socket cookie (u64) -> u32 marker. Sockets the agent itself opens
/// are registered here before `connect()` so they are never redirected; a
/// full map fails that dial, counted, rather than evicting another's entry.
pub const MAP_BYPASS: &str = "BYPASS";
/// Per-CPU array of u64 counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Program names (the function names in `dataplane-ebpf`), at most 15 bytes.
pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_GETPEERNAME4: &str = "getpeername4";
pub const PROG_GETPEERNAME6: &str = "getpeername6";
pub const PROG_SOCK_OPS: &str = "sock_ops";

/// Version of the maps' layout (types, key and value sizes, capacities,
/// counter slots). Pinned maps live under a directory named after it: an
/// agent adopts only maps of its own layout. Bump it with any change to a
/// map definition or to a type above.
pub const LAYOUT_VERSION: u32 = 1;

/// Capacity of the LPM route tries (per family).
pub const ROUTES_MAX_ENTRIES: u32 = 4096;
/// Capacity of the per-socket LRU maps. Sized for many concurrent flows per
/// node; LRU eviction bounds memory if close events are ever missed.
pub const FLOWS_MAX_ENTRIES: u32 = 65536;
/// Capacity of the bypass map: only the agent's in-flight dials live there.
pub const BYPASS_MAX_ENTRIES: u32 = 16384;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const SOCK_STREAM: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;

/// Route action: redirect the connect to the agent's listener.
pub const ACTION_REDIRECT: u32 = 1;
/// Route action: refuse the connect at once, in the kernel (ECONNREFUSED
/// where `bpf_set_retval` exists for these hooks; EPERM before): the route's
/// peer has no live tunnel connection, and nothing may leave the node by
/// the default route instead.
pub const ACTION_REJECT: u32 = 2;

/// Value of the route tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteValue {
    /// Index of the route in the agent's table (reported back with each flow).
    pub route_id: u32,
    /// One of the `ACTION_*` constants.
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<RouteValue>() == 8, "ROUTES_V4/V6 value");

/// Where routed connects go: the agent's node-local listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedirectTarget {
    /// IPv4 listener address, in-memory bytes = octets (as `user_ip4`).
    pub v4_addr: u32,
    /// IPv4 listener port in `user_port` representation (see [`port_to_user`]).
    pub v4_port: u32,
    /// IPv6 listener address as `user_ip6` words.
    pub v6_addr: [u32; 4],
    /// IPv6 listener port in `user_port` representation.
    pub v6_port: u32,
    /// `REDIRECT_V4_ENABLED | REDIRECT_V6_ENABLED`: a family without a listener
    /// is never redirected (its connects pass untouched).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<RedirectTarget>() == 32, "REDIRECT value");

impl RedirectTarget {
    /// The IPv4 listener, if enabled.
    pub fn v4(&self) -> Option<core::net::SocketAddr> {
        (self.flags & REDIRECT_V4_ENABLED != 0).then(|| {
            core::net::SocketAddr::new(
                core::net::Ipv4Addr::from(v4_octets(self.v4_addr)).into(),
                port_from_user(self.v4_port),
            )
        })
    }

    /// The IPv6 listener, if enabled.
    pub fn v6(&self) -> Option<core::net::SocketAddr> {
        (self.flags & REDIRECT_V6_ENABLED != 0).then(|| {
            core::net::SocketAddr::new(
                core::net::Ipv6Addr::from(v6_octets(self.v6_addr)).into(),
                port_from_user(self.v6_port),
            )
        })
    }
}

pub const REDIRECT_V4_ENABLED: u32 = 1;
pub const REDIRECT_V6_ENABLED: u32 = 2;

/// The destination a redirected socket originally asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    /// Address words as `user_ip6`; for IPv4 only `addr[0]` is set (as `user_ip4`).
    pub addr: [u32; 4],
    /// Port in `user_port` representation, so getpeername can write it back as is.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Route that matched ([`RouteValue::route_id`]).
    pub route_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32, "ORIG_DST/FLOWS value");

/// The client's own end of a redirected flow, as the agent sees it as the peer
/// of the accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Address words as `user_ip6`; IPv4 (and IPv4-mapped IPv6) in `addr[0]`.
    pub addr: [u32; 4],
    /// Port in host byte order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 24, "FLOWS key");

impl FlowKey {
    /// Key for a client at an IPv4 address (`addr` as `user_ip4`), port in host order.
    pub const fn v4(addr: u32, port: u16) -> Self {
        FlowKey { addr: [addr, 0, 0, 0], port: port as u32, family: AF_INET }
    }

    /// Key for a client at an IPv6 address. An IPv4-mapped address
    /// (`::ffff:a.b.c.d`) becomes the IPv4 key, because the agent's IPv4
    /// listener sees such a peer as plain IPv4.
    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        if is_v4_mapped(addr) {
            FlowKey::v4(addr[3], port)
        } else {
            FlowKey { addr, port: port as u32, family: AF_INET6 }
        }
    }
}

/// Whether `user_ip6` words hold an IPv4-mapped address (`::ffff:a.b.c.d`).
pub const fn is_v4_mapped(addr: [u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// `user_ip6` words of the IPv4-mapped form (`::ffff:a.b.c.d`) of a `user_ip4` word.
pub const fn v4_mapped_words(v4: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
}

/// Converts a host-order port to the `bpf_sock_addr.user_port` representation
/// (network-order u16 in the low 16 bits).
pub const fn port_to_user(port: u16) -> u32 {
    port.to_be() as u32
}

/// Converts `bpf_sock_addr.user_port` to a host-order port.
pub const fn port_from_user(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

/// `user_ip4` representation of IPv4 octets.
pub const fn v4_word(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// Octets of a `user_ip4` word.
pub const fn v4_octets(word: u32) -> [u8; 4] {
    word.to_ne_bytes()
}

/// `user_ip6` representation of IPv6 octets.
pub const fn v6_words(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Octets of `user_ip6` words.
pub const fn v6_octets(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

/// Whether a socket is plain TCP: the only kind steered. UDP, raw and MPTCP
/// (a stream socket with protocol 262) pass untouched.
pub const fn is_tcp_stream(sock_type: u32, protocol: u32) -> bool {
    sock_type == SOCK_STREAM && protocol == IPPROTO_TCP
}

/// What a connect hook does with a TCP socket, decided from plain values so the
/// decision is unit-tested on the host and the kernel code stays straight-line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// No route matched: untouched.
    NotRouted,
    /// The agent's own socket: untouched.
    AgentSocket,
    /// The family has no redirect listener configured: refused.
    NoListener,
    /// The route's peer has no live connection: refused.
    NoPeer,
    /// Rewrite to the redirect listener.
    Redirect,
}

impl ConnectVerdict {
    /// Whether the connect is refused (fail closed) rather than passed on:
    /// a routed connect that cannot be steered must not leave the node by
    /// its default route.
    pub const fn refuses(self) -> bool {
        matches!(self, ConnectVerdict::NoListener | ConnectVerdict::NoPeer)
    }
}

/// Decides a TCP connect from the route lookup result, whether the agent
/// registered the socket and whether the family has a listener. The kernel
/// consults the bypass map only for routed connects.
pub const fn connect_verdict(
    route: Option<RouteValue>,
    agent_socket: bool,
    listener: bool,
) -> ConnectVerdict {
    match route {
        Some(r) if r.action == ACTION_REDIRECT || r.action == ACTION_REJECT => {
            if agent_socket {
                ConnectVerdict::AgentSocket
            } else if r.action == ACTION_REJECT {
                ConnectVerdict::NoPeer
            } else if listener {
                ConnectVerdict::Redirect
            } else {
                ConnectVerdict::NoListener
            }
        }
        _ => ConnectVerdict::NotRouted,
    }
}

#[cfg(feature = "user")]
mod pod {
    // Each type is #[repr(C)], Copy, made only of integers, and has no implicit
    // padding (sizes asserted above), so every bit pattern is a valid value.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RouteValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RedirectTarget {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::FlowKey {}
}

#[cfg(test)]
mod tests;
