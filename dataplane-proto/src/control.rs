//! The tunnel's control protocol, sans-IO: besides the flows' streams, each
//! side of a tunnel connection opens one unidirectional *control stream*
//! and writes [`Frame`]s on it for the connection's life. A connector says
//! there what it serves ([`Frame::Advertise`]) and that it is going away
//! ([`Frame::Draining`]); the first frame each way is a [`Frame::Hello`]
//! naming the versions the sender speaks. See docs/protocol.md.
//!
//! Framing: `len: u32 BE` (the bytes after it), `type: u8`, body. A frame
//! type this build does not know is skipped whole, so later additions (names
//! for DNS, relay announcements) need no version bump; a version bump is
//! for changes an old peer would misread.
//!
//! Everything a peer sends is bounded: [`MAX_FRAME`] bytes a frame,
//! [`MAX_ROUTES`] routes an advertisement, [`MAX_PORTS`] ports a route, and
//! an advertisement is checked whole (prefix lengths, host bits, ports)
//! before any of it is returned, so a receiver never acts on half of one.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use crate::stream::Decoded;

/// The control protocol version this build speaks (and the only one).
pub const VERSION: u8 = 1;
/// Routes in one advertisement: a quarter of the kernel's per-family trie.
pub const MAX_ROUTES: usize = 1024;
/// Ports of one advertised route (a serve entry lists a handful).
pub const MAX_PORTS: usize = 64;
/// Largest route encoding: family, prefix length, IPv6 address, port count, ports.
const MAX_ROUTE_LEN: usize = 1 + 1 + 16 + 1 + 2 * MAX_PORTS;
/// The longest frame (after its length field): a full advertisement.
pub const MAX_FRAME: usize = 1 + 2 + MAX_ROUTES * MAX_ROUTE_LEN;
/// The length field.
const LEN: usize = 4;

const HELLO: u8 = 1;
const ADVERTISE: u8 = 2;
const DRAINING: u8 = 3;

/// Why bytes are not a valid control frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// A frame declares more than [`MAX_FRAME`] bytes.
    FrameTooLong(usize),
    /// A frame with no type byte.
    EmptyFrame,
    /// A known frame whose body does not have the size its fields say.
    BadLength { frame: &'static str },
    /// A hello whose lowest version is above its highest.
    BadVersions { min: u8, max: u8 },
    /// More than [`MAX_ROUTES`] routes.
    TooManyRoutes(usize),
    /// Address family byte other than 4 or 6.
    BadFamily(u8),
    /// A prefix length over 32 (IPv4) or 128 (IPv6).
    BadPrefix(u8),
    /// Address bits set past the prefix length.
    HostBits,
    /// No ports, more than [`MAX_PORTS`], or port 0.
    BadPorts,
    /// The output buffer cannot hold the encoding.
    BufferTooSmall { needed: usize },
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::FrameTooLong(n) => write!(f, "control frame of {n} bytes exceeds {MAX_FRAME}"),
            ControlError::EmptyFrame => write!(f, "control frame without a type"),
            ControlError::BadLength { frame } => write!(f, "{frame} frame of the wrong length"),
            ControlError::BadVersions { min, max } => write!(f, "hello with versions {min}..{max}"),
            ControlError::TooManyRoutes(n) => write!(f, "{n} routes exceed {MAX_ROUTES}"),
            ControlError::BadFamily(b) => write!(f, "bad address family {b}"),
            ControlError::BadPrefix(p) => write!(f, "prefix length {p} too long for its family"),
            ControlError::HostBits => write!(f, "route with host bits set"),
            ControlError::BadPorts => write!(f, "route with no ports, port 0 or over {MAX_PORTS} ports"),
            ControlError::BufferTooSmall { needed } => write!(f, "buffer too small ({needed} bytes needed)"),
        }
    }
}

/// One control message, borrowing its body from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The first frame each way: the versions the sender speaks.
    Hello { min: u8, max: u8 },
    /// Everything the sender serves now on this connection, replacing what
    /// it advertised before: a route missing from it is withdrawn, and an
    /// empty one withdraws all.
    Advertise(Advertisement<'a>),
    /// The sender takes no new streams from now on; open ones finish.
    Draining,
    /// A frame type this build does not know (skipped).
    Unknown(u8),
}

/// The version both sides speak, if any: the highest in both ranges.
pub fn negotiate(ours: (u8, u8), theirs: (u8, u8)) -> Option<u8> {
    let v = ours.1.min(theirs.1);
    (v >= ours.0.max(theirs.0)).then_some(v)
}

/// One advertised destination: a network and the ports served in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route<'a> {
    /// The network address, host bits clear.
    pub addr: IpAddr,
    pub prefix: u8,
    pub ports: Ports<'a>,
}

/// A route's ports, as on the wire (big-endian u16s, checked non-zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports<'a>(&'a [u8]);

impl<'a> Ports<'a> {
    pub fn iter(&self) -> impl Iterator<Item = u16> + 'a {
        self.0.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    pub fn len(&self) -> usize {
        self.0.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A checked advertisement: every route in it decoded once already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advertisement<'a> {
    count: usize,
    routes: &'a [u8],
}

impl<'a> Advertisement<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The routes in order.
    pub fn iter(&self) -> impl Iterator<Item = Route<'a>> + 'a {
        let mut rest = self.routes;
        // Checked at decode: every route parses and they fill the body.
        core::iter::from_fn(move || {
            let (route, used) = parse_route(rest).ok()?;
            rest = &rest[used..];
            Some(route)
        })
    }
}

/// A route to encode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec<'a> {
    pub addr: IpAddr,
    pub prefix: u8,
    pub ports: &'a [u16],
}

/// Decodes one frame from the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Result<Decoded<Frame<'_>>, ControlError> {
    let Some(len) = buf.get(..LEN) else { return Ok(Decoded::Incomplete(LEN)) };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ControlError::FrameTooLong(len));
    }
    let Some(frame) = buf.get(LEN..LEN + len) else { return Ok(Decoded::Incomplete(LEN + len)) };
    let (&kind, body) = frame.split_first().ok_or(ControlError::EmptyFrame)?;
    let decoded = match kind {
        HELLO => match *body {
            [min, max] if min <= max && min > 0 => Frame::Hello { min, max },
            [min, max] => return Err(ControlError::BadVersions { min, max }),
            _ => return Err(ControlError::BadLength { frame: "hello" }),
        },
        ADVERTISE => Frame::Advertise(decode_advertisement(body)?),
        DRAINING if body.is_empty() => Frame::Draining,
        DRAINING => return Err(ControlError::BadLength { frame: "draining" }),
        other => Frame::Unknown(other),
    };
    Ok(Decoded::Complete(decoded, LEN + len))
}

fn decode_advertisement(body: &[u8]) -> Result<Advertisement<'_>, ControlError> {
    let [a, b, ref routes @ ..] = *body else { return Err(ControlError::BadLength { frame: "advertise" }) };
    let count = u16::from_be_bytes([a, b]) as usize;
    if count > MAX_ROUTES {
        return Err(ControlError::TooManyRoutes(count));
    }
    let mut rest = routes;
    for _ in 0..count {
        let (_, used) = parse_route(rest)?;
        rest = &rest[used..];
    }
    if !rest.is_empty() {
        return Err(ControlError::BadLength { frame: "advertise" });
    }
    Ok(Advertisement { count, routes })
}

/// One route from the start of `buf`, checked, and its length.
fn parse_route(buf: &[u8]) -> Result<(Route<'_>, usize), ControlError> {
    let short = ControlError::BadLength { frame: "advertise" };
    let [family, prefix, ref rest @ ..] = *buf else { return Err(short) };
    let (addr, max_prefix, rest) = match family {
        4 => {
            let (a, rest) = rest.split_first_chunk::<4>().ok_or(short)?;
            (IpAddr::V4(Ipv4Addr::from(*a)), 32, rest)
        }
        6 => {
            let (a, rest) = rest.split_first_chunk::<16>().ok_or(short)?;
            (IpAddr::V6(Ipv6Addr::from(*a)), 128, rest)
        }
        other => return Err(ControlError::BadFamily(other)),
    };
    if prefix > max_prefix {
        return Err(ControlError::BadPrefix(prefix));
    }
    if !host_bits_clear(addr, prefix) {
        return Err(ControlError::HostBits);
    }
    let (&n, rest) = rest.split_first().ok_or(short)?;
    let n = n as usize;
    if n == 0 || n > MAX_PORTS {
        return Err(ControlError::BadPorts);
    }
    let ports = rest.get(..2 * n).ok_or(short)?;
    if ports.chunks_exact(2).any(|c| c == [0, 0]) {
        return Err(ControlError::BadPorts);
    }
    let used = buf.len() - rest.len() + 2 * n;
    Ok((Route { addr, prefix, ports: Ports(ports) }, used))
}

fn host_bits_clear(addr: IpAddr, prefix: u8) -> bool {
    match addr {
        IpAddr::V4(a) => u32::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) == 0,
        IpAddr::V6(a) => u128::from(a).checked_shl(u32::from(prefix)).unwrap_or(0) == 0,
    }
}

/// Writes a frame of `kind` whose body `body` writes; returns the length.
fn put_frame(
    out: &mut [u8],
    kind: u8,
    body_len: usize,
    body: impl FnOnce(&mut [u8]) -> Result<(), ControlError>,
) -> Result<usize, ControlError> {
    let needed = LEN + 1 + body_len;
    let out = out.get_mut(..needed).ok_or(ControlError::BufferTooSmall { needed })?;
    out[..LEN].copy_from_slice(&((1 + body_len) as u32).to_be_bytes());
    out[LEN] = kind;
    body(&mut out[LEN + 1..])?;
    Ok(needed)
}

/// Encodes a hello for the versions `min..=max`.
pub fn encode_hello(min: u8, max: u8, out: &mut [u8]) -> Result<usize, ControlError> {
    if min == 0 || min > max {
        return Err(ControlError::BadVersions { min, max });
    }
    put_frame(out, HELLO, 2, |b| {
        b.copy_from_slice(&[min, max]);
        Ok(())
    })
}

/// Encodes a draining notice.
pub fn encode_draining(out: &mut [u8]) -> Result<usize, ControlError> {
    put_frame(out, DRAINING, 0, |_| Ok(()))
}

/// How long [`encode_advertisement`] of `routes` is.
pub fn advertisement_len(routes: &[RouteSpec<'_>]) -> usize {
    let route = |r: &RouteSpec<'_>| 3 + if r.addr.is_ipv4() { 4 } else { 16 } + 2 * r.ports.len();
    LEN + 1 + 2 + routes.iter().map(route).sum::<usize>()
}

/// Encodes an advertisement of `routes`, refusing what a decoder would.
pub fn encode_advertisement(routes: &[RouteSpec<'_>], out: &mut [u8]) -> Result<usize, ControlError> {
    if routes.len() > MAX_ROUTES {
        return Err(ControlError::TooManyRoutes(routes.len()));
    }
    for r in routes {
        let max_prefix = if r.addr.is_ipv4() { 32 } else { 128 };
        if r.prefix > max_prefix {
            return Err(ControlError::BadPrefix(r.prefix));
        }
        if !host_bits_clear(r.addr, r.prefix) {
            return Err(ControlError::HostBits);
        }
        if r.ports.is_empty() || r.ports.len() > MAX_PORTS || r.ports.contains(&0) {
            return Err(ControlError::BadPorts);
        }
    }
    let body_len = advertisement_len(routes) - LEN - 1;
    put_frame(out, ADVERTISE, body_len, |b| {
        b[..2].copy_from_slice(&(routes.len() as u16).to_be_bytes());
        let mut at = 2;
        for r in routes {
            b[at + 1] = r.prefix;
            at += 2;
            match r.addr {
                IpAddr::V4(a) => {
                    b[at - 2] = 4;
                    b[at..at + 4].copy_from_slice(&a.octets());
                    at += 4;
                }
                IpAddr::V6(a) => {
                    b[at - 2] = 6;
                    b[at..at + 16].copy_from_slice(&a.octets());
                    at += 16;
                }
            }
            // Checked above: 1..=MAX_PORTS fits a byte.
            b[at] = r.ports.len() as u8;
            at += 1;
            for p in r.ports {
                b[at..at + 2].copy_from_slice(&p.to_be_bytes());
                at += 2;
            }
        }
        Ok(())
    })
}
