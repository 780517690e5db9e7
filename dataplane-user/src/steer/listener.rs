//! The redirect listeners that steered connects land on: binding them, and
//! taking what the kernel queued when they close.

use std::{io, net::SocketAddr};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[derive(Debug, thiserror::Error)]
#[error("binding the redirect listener {field} = {addr}: {source}")]
pub struct BindError {
    pub field: &'static str,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds one redirect listener. The backlog is large: a burst of connects is
/// completed by the kernel before the agent gets to accept them.
pub fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError { field, addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_nodelay(true).map_err(err)?;
    // Accepted sockets inherit keepalive and its timers from the listener:
    // set once here, not with four syscalls on every flow.
    crate::sockopt::keepalive(&socket).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

/// Whether an accept() error concerns only the connection being accepted
/// (it died in the queue), as opposed to the process (EMFILE, ENOBUFS, ...).
pub fn is_per_connection(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM))
}

/// Accepts whatever the kernel already queued on `listener` without waiting:
/// after the programs are detached no new connect can arrive, but connects
/// redirected just before are established and waiting here.
pub fn drain_queued(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    let Ok(std) = listener.into_std() else { return Vec::new() };
    let mut out = Vec::new();
    // into_std keeps the socket non-blocking, so accept ends on WouldBlock.
    loop {
        match std.accept() {
            Ok((stream, peer)) => {
                // accept(2) does not pass O_NONBLOCK on; tokio needs it.
                if stream.set_nonblocking(true).is_ok()
                    && let Ok(stream) = TcpStream::from_std(stream)
                {
                    out.push((stream, peer));
                }
            }
            Err(e) if is_per_connection(&e) => {}
            Err(_) => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn drained_connections_are_usable_async_streams() {
        let listener = bind("steering.redirect.v4", "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Completed by the kernel, waiting in the accept queue.
        let mut clients: Vec<_> =
            (0..3).map(|_| std::net::TcpStream::connect(addr).expect("connect")).collect();
        let drained = drain_queued(listener);
        assert_eq!(drained.len(), 3, "every queued connection is taken");
        for ((mut stream, peer), client) in drained.into_iter().zip(&mut clients) {
            assert_eq!(Some(peer), client.local_addr().ok());
            let accepted = socket2::SockRef::from(&stream);
            assert!(accepted.keepalive().expect("keepalive"), "inherited from the listener");
            assert_eq!(accepted.tcp_keepalive_time().expect("time"), std::time::Duration::from_secs(60));
            stream.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            std::io::Read::read_exact(client, &mut b).expect("read");
            std::io::Write::write_all(client, b"y").expect("write");
            stream.read_exact(&mut b).await.expect("async read");
            assert_eq!(&b, b"y");
        }
    }
}
