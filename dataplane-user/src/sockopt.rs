//! Socket options the standard library and socket2 do not offer.

use std::{io, os::fd::AsRawFd, time::Duration};

/// The kernel's cookie for a socket (SO_COOKIE): the key the eBPF programs use.
pub fn socket_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Makes the next close send RST instead of FIN, so the application sees an
/// error at once rather than a clean end of stream it could mistake for success.
pub fn reset_on_close(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO))
}

/// Whether an error on a socket means its peer reset or left (ECONNRESET,
/// EPIPE), as opposed to a failure of the path or of this side.
pub fn peer_left(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
}

/// TCP keepalive: probes after a minute of silence, every 10 s, 6 of them, so
/// a peer that vanished without a FIN or RST is noticed in about two minutes
/// instead of never (an idle kubectl watch sends nothing for long periods).
pub fn keepalive(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    socket2::SockRef::from(sock).set_tcp_keepalive(&ka)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_is_set_with_our_timers() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        keepalive(&s).expect("set");
        let r = socket2::SockRef::from(&s);
        assert!(r.keepalive().expect("read back"));
        assert_eq!(r.tcp_keepalive_time().expect("time"), Duration::from_secs(60));
        assert_eq!(r.tcp_keepalive_interval().expect("interval"), Duration::from_secs(10));
        assert_eq!(r.tcp_keepalive_retries().expect("retries"), 6);
    }
}
