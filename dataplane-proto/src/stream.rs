//! The tunnel's stream protocol, sans-IO: each TCP flow is one bidirectional
//! QUIC stream that opens with a [`Request`] (where to dial, flow metadata)
//! and is answered by a [`Response`] (a [`Status`]) before any payload flows.
//! Pure encode/decode over byte slices: no sockets, no allocation, so it is
//! property-tested and fuzzed, and usable from `no_std`. See docs/protocol.md.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Protocol version carried in every header.
pub const VERSION: u8 = 1;
/// Upper bound on a request's metadata block: a peer controls it.
pub const MAX_METADATA: usize = 1024;
/// Fixed part of a request: version, family, port, flow id, metadata length.
const REQUEST_FIXED: usize = 1 + 1 + 2 + 8 + 2;
/// Largest possible request (IPv6, full metadata).
pub const MAX_REQUEST: usize = REQUEST_FIXED + 16 + MAX_METADATA;
/// A response: version and status.
pub const RESPONSE_LEN: usize = 2;

/// Metadata entry types. Unknown types are skipped by decoders, so new ones
/// can be added without a version bump.
pub const META_SOURCE_NODE: u8 = 1;
pub const META_WORKLOAD: u8 = 2;
/// The exact identity of the client agent a relay forwards the stream for,
/// attested by the relay; a connector believes it only from a peer it has
/// configured as a relay.
pub const META_CLIENT_IDENTITY: u8 = 3;

/// Why bytes are not a valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The peer speaks a version this build does not.
    UnsupportedVersion(u8),
    /// Address family byte other than 4 or 6.
    BadFamily(u8),
    /// Metadata longer than [`MAX_METADATA`].
    MetadataTooLong(usize),
    /// A metadata entry runs past the block.
    BadMetadata,
    /// Status byte outside [`Status`].
    BadStatus(u8),
    /// The output buffer cannot hold the encoding.
    BufferTooSmall { needed: usize },
    /// Port 0 is never a valid destination.
    ZeroPort,
}

impl core::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ProtocolError::UnsupportedVersion(v) => {
                write!(f, "unsupported protocol version {v} (this build speaks {VERSION})")
            }
            ProtocolError::BadFamily(b) => write!(f, "bad address family {b}"),
            ProtocolError::MetadataTooLong(n) => write!(f, "metadata of {n} bytes exceeds {MAX_METADATA}"),
            ProtocolError::BadMetadata => write!(f, "malformed metadata entry"),
            ProtocolError::BadStatus(s) => write!(f, "unknown status {s}"),
            ProtocolError::BufferTooSmall { needed } => write!(f, "buffer too small ({needed} bytes needed)"),
            ProtocolError::ZeroPort => write!(f, "destination port 0"),
        }
    }
}

/// The result of decoding a prefix of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A complete value and how many bytes it took.
    Complete(T, usize),
    /// More bytes are needed; at least this many in total.
    Incomplete(usize),
}

/// What the client asks the connector to do for one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Where the application connected (the original destination).
    pub dst: SocketAddr,
    /// Chosen by the client; appears in both sides' logs.
    pub flow_id: u64,
    /// TLV entries (see [`Metadata`]); at most [`MAX_METADATA`] bytes.
    pub metadata: Metadata<'a>,
}

/// A block of metadata entries: `type: u8, len: u8, value: [u8; len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Metadata<'a>(&'a [u8]);

/// The connector's answer before payload flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Connected; payload follows.
    Ok = 0,
    /// The destination refused the connection (TCP RST).
    Refused = 1,
    /// No route to the destination, or it did not answer.
    Unreachable = 2,
    /// The connector's dial timed out.
    Timeout = 3,
    /// Policy: the connector does not serve this destination.
    Denied = 4,
    /// The request could not be decoded (or did not arrive in time).
    ProtocolError = 5,
    /// The connector serves as many streams for this peer as it allows
    /// (`limits.streams_per_peer`); the flow is refused, nothing was dialled.
    OverStreamCap = 6,
    /// The connector has as many dials in flight for this peer as it allows
    /// (`limits.dials_per_peer`); the flow is refused, nothing was dialled.
    OverDialCap = 7,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::Refused,
        Status::Unreachable,
        Status::Timeout,
        Status::Denied,
        Status::ProtocolError,
        Status::OverStreamCap,
        Status::OverDialCap,
    ];

    pub fn from_u8(b: u8) -> Result<Status, ProtocolError> {
        Status::ALL.get(b as usize).copied().ok_or(ProtocolError::BadStatus(b))
    }

    /// Label for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Refused => "refused",
            Status::Unreachable => "unreachable",
            Status::Timeout => "timeout",
            Status::Denied => "denied",
            Status::ProtocolError => "protocol_error",
            Status::OverStreamCap => "over_stream_cap",
            Status::OverDialCap => "over_dial_cap",
        }
    }
}

impl<'a> Metadata<'a> {
    /// Wraps a block after checking that every entry fits.
    pub fn new(block: &'a [u8]) -> Result<Metadata<'a>, ProtocolError> {
        if block.len() > MAX_METADATA {
            return Err(ProtocolError::MetadataTooLong(block.len()));
        }
        let mut rest = block;
        while !rest.is_empty() {
            let [_, len, ..] = *rest else { return Err(ProtocolError::BadMetadata) };
            rest = rest.get(2 + len as usize..).ok_or(ProtocolError::BadMetadata)?;
        }
        Ok(Metadata(block))
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// The first value of an entry type.
    pub fn get(&self, kind: u8) -> Option<&'a [u8]> {
        self.iter().find(|(k, _)| *k == kind).map(|(_, v)| v)
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut rest = self.0;
        core::iter::from_fn(move || {
            let [kind, len, ..] = *rest else { return None };
            let value = rest.get(2..2 + len as usize)?;
            rest = &rest[2 + len as usize..];
            Some((kind, value))
        })
    }
}

/// Writes one metadata entry into `out` at `at`; returns the new end.
pub fn put_metadata(out: &mut [u8], at: usize, kind: u8, value: &[u8]) -> Result<usize, ProtocolError> {
    let len = u8::try_from(value.len()).map_err(|_| ProtocolError::BadMetadata)?;
    let end = at + 2 + value.len();
    if end > MAX_METADATA {
        return Err(ProtocolError::MetadataTooLong(end));
    }
    let slot = out.get_mut(at..end).ok_or(ProtocolError::BufferTooSmall { needed: end })?;
    slot[0] = kind;
    slot[1] = len;
    slot[2..].copy_from_slice(value);
    Ok(end)
}

impl Request<'_> {
    pub fn encoded_len(&self) -> usize {
        let addr = if self.dst.is_ipv4() { 4 } else { 16 };
        REQUEST_FIXED + addr + self.metadata.0.len()
    }

    /// Encodes into `out`, returning the length written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, ProtocolError> {
        let needed = self.encoded_len();
        if self.dst.port() == 0 {
            return Err(ProtocolError::ZeroPort);
        }
        let out = out.get_mut(..needed).ok_or(ProtocolError::BufferTooSmall { needed })?;
        out[0] = VERSION;
        out[1] = if self.dst.is_ipv4() { 4 } else { 6 };
        out[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
        out[4..12].copy_from_slice(&self.flow_id.to_be_bytes());
        // Metadata::new bounds the length by MAX_METADATA, which fits a u16.
        out[12..14].copy_from_slice(&(self.metadata.0.len() as u16).to_be_bytes());
        let addr_end = match self.dst.ip() {
            IpAddr::V4(ip) => {
                out[14..18].copy_from_slice(&ip.octets());
                18
            }
            IpAddr::V6(ip) => {
                out[14..30].copy_from_slice(&ip.octets());
                30
            }
        };
        out[addr_end..].copy_from_slice(self.metadata.0);
        Ok(needed)
    }
}

/// Decodes a request from the start of `buf`.
pub fn decode_request(buf: &[u8]) -> Result<Decoded<Request<'_>>, ProtocolError> {
    if buf.len() < REQUEST_FIXED {
        // The version byte alone is enough to reject a foreign peer early.
        if let Some(&v) = buf.first()
            && v != VERSION
        {
            return Err(ProtocolError::UnsupportedVersion(v));
        }
        return Ok(Decoded::Incomplete(REQUEST_FIXED));
    }
    if buf[0] != VERSION {
        return Err(ProtocolError::UnsupportedVersion(buf[0]));
    }
    let addr_len = match buf[1] {
        4 => 4,
        6 => 16,
        other => return Err(ProtocolError::BadFamily(other)),
    };
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    if port == 0 {
        return Err(ProtocolError::ZeroPort);
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[4..12]);
    let meta_len = u16::from_be_bytes([buf[12], buf[13]]) as usize;
    if meta_len > MAX_METADATA {
        return Err(ProtocolError::MetadataTooLong(meta_len));
    }
    let total = REQUEST_FIXED + addr_len + meta_len;
    if buf.len() < total {
        return Ok(Decoded::Incomplete(total));
    }
    let addr = &buf[REQUEST_FIXED..REQUEST_FIXED + addr_len];
    let ip = if addr_len == 4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(addr);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let metadata = Metadata::new(&buf[REQUEST_FIXED + addr_len..total])?;
    Ok(Decoded::Complete(
        Request { dst: SocketAddr::new(ip, port), flow_id: u64::from_be_bytes(id), metadata },
        total,
    ))
}

/// The connector's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        [VERSION, self.status as u8]
    }
}

/// Decodes a response from the start of `buf`.
pub fn decode_response(buf: &[u8]) -> Result<Decoded<Response>, ProtocolError> {
    match *buf {
        [] => Ok(Decoded::Incomplete(RESPONSE_LEN)),
        [v, ..] if v != VERSION => Err(ProtocolError::UnsupportedVersion(v)),
        [_] => Ok(Decoded::Incomplete(RESPONSE_LEN)),
        [_, s, ..] => Ok(Decoded::Complete(Response { status: Status::from_u8(s)? }, RESPONSE_LEN)),
    }
}
