//! Copying a flow between its TCP socket and its QUIC stream, both ways, with
//! half-close and backpressure: each direction holds at most one chunk, and
//! waits on the other side's flow control (QUIC) or socket buffer (TCP), so a
//! slow reader never makes the agent buffer without bound. Chunks move from
//! TCP to QUIC as `Bytes` handed over whole, and from QUIC to TCP as the
//! chunks quinn received, without another copy in between.

use std::{future::Future, net::SocketAddr, time::Duration};

use std::io::IoSlice;

use crate::traffic::Traffic;
use bytes::{Buf, Bytes, BytesMut};
use dataplane_proto::stream::{self, Decoded, Status};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Largest chunk moved at once from TCP to QUIC.
const CHUNK: usize = 64 * 1024;
/// Most received QUIC frames written to TCP in one syscall.
const BATCH: usize = 32;
/// Application error code for a stream reset because the TCP side failed.
pub const RESET_TCP_FAILED: VarInt = VarInt::from_u32(1);

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("tcp side: {0}")]
    Tcp(#[source] std::io::Error),
    #[error("quic side: {0}")]
    Quic(String),
    /// The connector did not connect the flow (status, or none in time).
    #[error("connector answered {0}")]
    Refused(String),
    /// Nothing moved either way for `limits.flow_idle_timeout`.
    #[error("no bytes either way for {0:?}")]
    Idle(Duration),
}

impl SpliceError {
    /// The TCP side's peer reset (or left) its connection: on the client
    /// agent that is the application, whose choice it is; the path did not
    /// fail.
    pub fn is_client_reset(&self) -> bool {
        matches!(self, SpliceError::Tcp(e) if crate::sockopt::peer_left(e))
    }
}

/// Bytes moved: (tcp -> quic, quic -> tcp).
pub type Moved = (u64, u64);

/// Splices until both directions are finished. `pending` is payload already
/// read from the QUIC stream (after a header) that belongs to the TCP side.
/// On failure both ends are reset, never closed cleanly, so neither side can
/// mistake a broken flow for a complete one. The bytes moved are returned
/// whatever the outcome.
pub async fn splice(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    pending: &[u8],
) -> (Moved, Result<(), SpliceError>) {
    let moved = Traffic::default();
    let (rd, mut wr) = tcp.split();
    let to_tcp = async {
        if !pending.is_empty() {
            wr.write_all(pending).await.map_err(SpliceError::Tcp)?;
            moved.down(pending.len() as u64);
        }
        quic_to_tcp(recv, &mut wr, &moved).await
    };
    let result = tokio::try_join!(tcp_to_quic(rd, send, &moved), to_tcp).map(|_| ());
    (moved.totals(), finish(result, tcp, send, recv))
}

/// The client side of a tunnelled flow: the application's bytes go out at
/// once, right behind the request header (the connector holds them until its
/// dial completes), while the way back first waits for the connector's status
/// within `wait` and calls `on_ok`. Saves the round trip a status-then-data
/// exchange would cost every new flow (a TLS ClientHello goes first).
///
/// With `idle`, a flow that moves nothing either way for that long ends as
/// [`SpliceError::Idle`] (both ends reset).
pub async fn splice_after_status(
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
    wait: Duration,
    idle: Option<Duration>,
    on_ok: impl FnOnce(),
) -> (Moved, Result<(), SpliceError>) {
    let moved = Traffic::default();
    let (rd, mut wr) = tcp.split();
    let to_tcp = async {
        let status = tokio::time::timeout(wait, read_status(recv)).await;
        match status {
            Ok(Ok(Status::Ok)) => on_ok(),
            Ok(Ok(s)) => return Err(SpliceError::Refused(s.as_str().to_owned())),
            Ok(Err(e)) => return Err(SpliceError::Refused(e)),
            Err(_) => return Err(SpliceError::Refused("no answer in time".to_owned())),
        }
        quic_to_tcp(recv, &mut wr, &moved).await
    };
    // The status decides: a refusal must win over an upward copy still
    // running, so the way back is polled first.
    let both = join_down_first(tcp_to_quic(rd, send, &moved), to_tcp);
    let result = tokio::select! {
        r = both => r,
        () = moved.silent_for(idle) => Err(SpliceError::Idle(idle.unwrap_or_default())),
    };
    (moved.totals(), finish(result, tcp, send, recv))
}

pub(super) fn finish(
    result: Result<(), SpliceError>,
    tcp: &mut TcpStream,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<(), SpliceError> {
    if result.is_err() {
        let _ = send.reset(RESET_TCP_FAILED);
        let _ = recv.stop(RESET_TCP_FAILED);
        let _ = crate::sockopt::reset_on_close(tcp);
    }
    result
}

/// Like `try_join!` with `down` polled first; on any error returns at once
/// with that error.
pub(super) async fn join_down_first<E>(
    up: impl Future<Output = Result<(), E>>,
    down: impl Future<Output = Result<(), E>>,
) -> Result<(), E> {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            biased;
            d = &mut down, if !down_done => { d?; down_done = true }
            u = &mut up, if !up_done => { u?; up_done = true }
        }
        if up_done && down_done {
            return Ok(());
        }
    }
}

pub(super) async fn read_status(recv: &mut RecvStream) -> Result<Status, String> {
    let mut buf = [0u8; stream::RESPONSE_LEN];
    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    match stream::decode_response(&buf).map_err(|e| e.to_string())? {
        Decoded::Complete(r, _) => Ok(r.status),
        Decoded::Incomplete(_) => Err("short response".to_owned()),
    }
}

/// TCP to QUIC until the application half-closes. A buffer exists only while
/// data flows: allocated when the socket turns readable, released when it
/// drains, so an idle flow (a kept-alive connection, a watch) holds none. A
/// busy flow keeps reusing its allocation, since readiness returns at once.
async fn tcp_to_quic(rd: ReadHalf<'_>, send: &mut SendStream, moved: &Traffic) -> Result<(), SpliceError> {
    tcp_to_quic_seen(rd, send, moved, |_| {}).await
}

/// [`tcp_to_quic`], showing `seen` each chunk before it is written and
/// `None` at the application's half-close (failover keeps them to replay).
pub(super) async fn tcp_to_quic_seen(
    rd: ReadHalf<'_>,
    send: &mut SendStream,
    moved: &Traffic,
    mut seen: impl FnMut(Option<&Bytes>),
) -> Result<(), SpliceError> {
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
            seen(None);
            return send.finish().map_err(|e| SpliceError::Quic(e.to_string()));
        }
        let chunk = buf.split().freeze();
        seen(Some(&chunk));
        send.write_chunk(chunk).await.map_err(|e| SpliceError::Quic(e.to_string()))?;
        moved.up(n as u64);
    }
}

/// QUIC to TCP until the peer finishes, then pass the FIN on. quinn hands
/// data over as the frames it received (about a packet each), so a batch of
/// them goes out in one vectored write: a syscall per packet would cost more
/// than the copy it saves.
pub(super) async fn quic_to_tcp(
    recv: &mut RecvStream,
    wr: &mut WriteHalf<'_>,
    moved: &Traffic,
) -> Result<(), SpliceError> {
    let mut batch: [Bytes; BATCH] = Default::default();
    while let Some(n) = recv.read_chunks(&mut batch).await.map_err(|e| SpliceError::Quic(e.to_string()))? {
        moved.down(write_all_vectored(wr, &mut batch[..n]).await.map_err(SpliceError::Tcp)?);
    }
    wr.shutdown().await.map_err(SpliceError::Tcp)
}

/// Writes every chunk, resuming after partial writes; leaves `chunks` empty
/// (each slot released once written). Returns the bytes written.
async fn write_all_vectored(wr: &mut WriteHalf<'_>, chunks: &mut [Bytes]) -> std::io::Result<u64> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        let mut slices = [IoSlice::new(&[]); BATCH];
        let k = chunks.len() - first;
        for (slot, c) in slices.iter_mut().zip(&chunks[first..]) {
            *slot = IoSlice::new(c);
        }
        let mut n = wr.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while first < chunks.len() && n >= chunks[first].len() {
            n -= chunks[first].len();
            chunks[first] = Bytes::new();
            first += 1;
        }
        if n > 0 {
            chunks[first].advance(n);
        }
    }
    Ok(total as u64)
}

/// Copies a stream to another, both ways, until both directions end (the
/// relay's forwarding: neither side's bytes are looked into). A direction
/// that fails resets the stream it was writing to, so each far end learns
/// at once. Returns the bytes moved (towards `b`, towards `a`).
pub async fn splice_streams(
    a: (&mut SendStream, &mut RecvStream),
    b: (&mut SendStream, &mut RecvStream),
) -> (u64, u64) {
    async fn one_way(from: &mut RecvStream, to: &mut SendStream) -> u64 {
        let mut moved = 0u64;
        loop {
            match from.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    moved += chunk.bytes.len() as u64;
                    if to.write_chunk(chunk.bytes).await.is_err() {
                        let _ = from.stop(RESET_TCP_FAILED);
                        return moved;
                    }
                }
                Ok(None) => {
                    let _ = to.finish();
                    return moved;
                }
                Err(_) => {
                    let _ = to.reset(RESET_TCP_FAILED);
                    return moved;
                }
            }
        }
    }
    let (a_send, a_recv) = a;
    let (b_send, b_recv) = b;
    tokio::join!(one_way(a_recv, b_send), one_way(b_recv, a_send))
}

/// Reads until a complete request is buffered; returns its destination, flow
/// id and length (bytes after it are payload).
pub async fn read_request(
    recv: &mut RecvStream,
    buf: &mut Vec<u8>,
) -> Result<(SocketAddr, u64, usize), String> {
    let mut chunk = [0u8; 2048];
    loop {
        match stream::decode_request(buf).map_err(|e| e.to_string())? {
            Decoded::Complete(req, n) => return Ok((req.dst, req.flow_id, n)),
            Decoded::Incomplete(_) => {}
        }
        let n = recv
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("stream ended inside the header")?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A batch larger than the socket takes at once is written whole, in
    /// order, across partial writes, and every slot is released.
    #[tokio::test]
    async fn vectored_writes_resume_after_partial_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut writer = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (mut reader, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&writer).set_send_buffer_size(4096).expect("sndbuf");
        // Chunks of uneven sizes, each byte telling its position.
        let sizes = [1usize, 70_000, 3, 1452, 250_000, 17, 9000, 1];
        let mut next = 0u32;
        let mut chunks: Vec<Bytes> = sizes
            .iter()
            .map(|&n| {
                Bytes::from(
                    (0..n)
                        .map(|_| {
                            next += 1;
                            (next % 251) as u8
                        })
                        .collect::<Vec<u8>>(),
                )
            })
            .collect();
        let total: usize = sizes.iter().sum();
        let read = tokio::spawn(async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.expect("read");
            got
        });
        let (_, mut wr) = writer.split();
        let written = tokio::time::timeout(Duration::from_secs(10), write_all_vectored(&mut wr, &mut chunks))
            .await
            .expect("written within 10 s")
            .expect("write");
        wr.shutdown().await.expect("shutdown");
        assert_eq!(written, total as u64);
        assert!(chunks.iter().all(Bytes::is_empty), "every slot is released");
        let got = read.await.expect("reader");
        assert_eq!(got.len(), total);
        assert!(got.iter().enumerate().all(|(i, &b)| b == ((i as u32 + 1) % 251) as u8), "bytes in order");
    }
}
