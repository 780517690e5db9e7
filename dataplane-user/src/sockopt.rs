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
