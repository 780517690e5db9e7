//! Socket and transport setup shared by every tunnel connection: quinn's
//! transport parameters sized for a tunnel, and a UDP socket with forced
//! buffers.

use std::{sync::Arc, time::Duration};

use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};

use super::TunnelError;
use crate::{config::TunnelSettings, tls::TlsMaterial};

/// The RTT assumed before the first sample. It sets the first handshake
/// retransmit (three times it): quinn's 333 ms default put it at 1 s and a
/// dial towards a peer that was restarting waited 1 s, then 2 s, then 4 s
/// for its next Initial. Tunnel peers are a data centre apart at most; on a
/// longer path the cost is one early retransmit of a small packet.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Streams a peer may open while the handshake runs. quinn sets up state for
/// every stream the limit allows when it creates a connection (about 80
/// bytes each way per stream): at 65,536 that was 5 MiB for each Initial a
/// stranger sent. The welcome, the only stream before authentication, is
/// unidirectional.
const HANDSHAKE_STREAMS: u32 = 8;
/// Per-stream and per-connection receive windows, which are also what a peer
/// can make us hold per connection. 4 MiB carries a stream at 6 Gbit/s over
/// a 5 ms path (650 Mbit/s at 50 ms), 16 MiB a connection at 25 Gbit/s (2.7
/// at 50 ms): ample for API-server traffic. Twice these measured the same on
/// the benchmark, and left the agents 20-50 MiB larger after a burst.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// The transport settings every tunnel connection uses (public for the
/// benchmark's raw-QUIC baseline, which must match them).
pub fn transport(settings: &TunnelSettings) -> Result<TransportConfig, TunnelError> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(HANDSHAKE_STREAMS))
        // One for the welcome; no other unidirectional streams are used.
        .max_concurrent_uni_streams(VarInt::from_u32(1))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .initial_rtt(INITIAL_RTT)
        .keep_alive_interval(Some(settings.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(settings.idle_timeout).map_err(|e| TunnelError::Quic(e.to_string()))?,
        ));
    Ok(t)
}

/// The endpoint's settings: a stateless-reset key that survives restarts
/// ([`TlsMaterial::stateless_reset_secret`]), so peers of a restarted
/// agent drop its predecessor's connections at once.
pub fn endpoint_config(tls: &TlsMaterial, node: &str) -> EndpointConfig {
    let secret = tls.stateless_reset_secret(node);
    let mut config = EndpointConfig::new(Arc::new(ResetKey(aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &secret,
    ))));
    // Connection IDs of 8 random bytes. quinn's default keeps 3 random
    // bytes and a 5-byte check keyed per process, and drops packets whose
    // check fails without a reset: a new agent would ignore its
    // predecessor's connections. With a stable reset key, 3 random bytes
    // would also repeat IDs (and so reset tokens, which resets carry in
    // the clear) across restarts; 8 do not.
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(CID_LEN)));
    config
}

/// Bytes of a connection ID, all random.
const CID_LEN: usize = 8;

/// HMAC-SHA256 for quinn's reset tokens (quinn implements its trait for
/// one crypto library's key type, which one depending on its features).
struct ResetKey(aws_lc_rs::hmac::Key);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        signature_out.copy_from_slice(aws_lc_rs::hmac::sign(&self.0, data).as_ref());
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        aws_lc_rs::hmac::verify(&self.0, data, signature).map_err(|_| quinn::crypto::CryptoError)
    }
}

/// Raises an authenticated connection's stream limit to the working one,
/// `limits.streams_per_peer` (the peer learns it in a MAX_STREAMS frame):
/// no connection of a peer may open more streams than the peer may have
/// served, and quinn's default of 100 would cap a node's concurrent flows
/// per connection far too low.
pub fn open_stream_limits(conn: &quinn::Connection, streams: usize) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(u32::try_from(streams).unwrap_or(u32::MAX)));
}

/// A UDP socket with the buffers forced to `size` (the agent is privileged:
/// SO_*BUFFORCE ignores net.core.*mem_max), falling back to the unforced
/// options. Returns the sizes the kernel actually granted. GSO/GRO stay on:
/// quinn enables them on the socket it is given.
pub fn udp_socket(
    addr: std::net::SocketAddr,
    size: usize,
) -> std::io::Result<(std::net::UdpSocket, (usize, usize))> {
    use std::os::fd::AsRawFd;

    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // [::] serves IPv4 peers too.
        socket.set_only_v6(false)?;
    }
    let force = |opt: libc::c_int| {
        let v = size as libc::c_int;
        // SAFETY: v outlives the call; the size passed is its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !force(libc::SO_RCVBUFFORCE) {
        socket.set_recv_buffer_size(size)?;
    }
    if !force(libc::SO_SNDBUFFORCE) {
        socket.set_send_buffer_size(size)?;
    }
    socket.bind(&addr.into())?;
    let granted = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    Ok((socket.into(), granted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forced_udp_buffers_are_granted() {
        let (_s, (rcv, snd)) = udp_socket("127.0.0.1:0".parse().expect("addr"), 4 << 20).expect("socket");
        // Linux reports double the requested size (bookkeeping overhead).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(rcv >= 4 << 20 && snd >= 4 << 20, "forced as root: {rcv} {snd}");
        }
    }
}
