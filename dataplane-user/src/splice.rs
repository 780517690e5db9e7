//! Copying a flow between its TCP socket and its QUIC stream, both ways, with
//! half-close and backpressure: each direction holds at most one chunk, and
//! waits on the other side's flow control (QUIC) or socket buffer (TCP), so a
//! slow reader never makes the agent buffer without bound. Chunks move from
//! TCP to QUIC as `Bytes` handed over whole, and from QUIC to TCP as the
//! chunks quinn received, without another copy in between.

use bytes::BytesMut;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::{io::AsyncWriteExt, net::TcpStream};

/// Largest chunk moved at once.
const CHUNK: usize = 64 * 1024;
/// Application error code for a stream reset because the TCP side failed.
pub const RESET_TCP_FAILED: VarInt = VarInt::from_u32(1);

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("tcp side: {0}")]
    Tcp(#[source] std::io::Error),
    #[error("quic side: {0}")]
    Quic(String),
}

/// Bytes moved: (tcp -> quic, quic -> tcp).
pub type Moved = (u64, u64);

/// Splices until both directions are finished. `pending` is payload already
/// read from the QUIC stream (after a header) that belongs to the TCP side.
/// On failure both ends are reset, never closed cleanly, so neither side can
/// mistake a broken flow for a complete one.
pub async fn splice(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending: &[u8],
) -> Result<Moved, SpliceError> {
    let (rd, mut wr) = tcp.split();
    let up = async {
        let mut total = 0u64;
        // A buffer exists only while data flows: it is allocated when the
        // socket turns readable and released when it drains, so an idle flow
        // (a kept-alive connection, a watch) holds none. A busy flow keeps
        // reusing its allocation, since readiness returns at once.
        let mut buf = BytesMut::new();
        let tcp = rd.as_ref();
        loop {
            tcp.readable().await.map_err(SpliceError::Tcp)?;
            if buf.capacity() < CHUNK / 4 {
                buf.reserve(CHUNK);
            }
            let n = match tcp.try_read_buf(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    buf = BytesMut::new();
                    continue;
                }
                Err(e) => return Err(SpliceError::Tcp(e)),
            };
            if n == 0 {
                // Application half-closed: finish our direction only.
                send.finish().map_err(|e| SpliceError::Quic(e.to_string()))?;
                return Ok(total);
            }
            total += n as u64;
            send.write_chunk(buf.split().freeze()).await.map_err(|e| SpliceError::Quic(e.to_string()))?;
        }
    };
    let down = async {
        let mut total = pending.len() as u64;
        if !pending.is_empty() {
            wr.write_all(pending).await.map_err(SpliceError::Tcp)?;
        }
        while let Some(chunk) =
            recv.read_chunk(CHUNK, true).await.map_err(|e| SpliceError::Quic(e.to_string()))?
        {
            total += chunk.bytes.len() as u64;
            wr.write_all(&chunk.bytes).await.map_err(SpliceError::Tcp)?;
        }
        // Peer finished: pass the FIN on.
        wr.shutdown().await.map_err(SpliceError::Tcp)?;
        Ok(total)
    };
    let result = tokio::try_join!(up, down);
    if result.is_err() {
        let _ = send.reset(RESET_TCP_FAILED);
        let _ = recv.stop(RESET_TCP_FAILED);
        let _ = crate::sockopt::reset_on_close(tcp);
    }
    result
}
