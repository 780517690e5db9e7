//! The `direct` upstream: the agent dials the original destination itself. It
//! stands in for the tunnel and serves routes that need no tunnel.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

use crate::{
    ebpf::{Steering, SteeringError},
    sockopt,
};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The destination refused or was unreachable.
    #[error("dialing {dst}: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    /// No answer within the connect timeout.
    #[error("dialing {dst}: no answer within {timeout:?}")]
    Timeout { dst: SocketAddr, timeout: Duration },
    /// The socket could not be created or marked as the agent's own.
    #[error("preparing a socket for {dst}: {source}")]
    Socket { dst: SocketAddr, source: io::Error },
    #[error("marking the agent's socket for {dst}: {source}")]
    Bypass { dst: SocketAddr, source: SteeringError },
}

/// Dials `dst` with a socket the connect hooks leave alone: without the bypass
/// a routed destination would be steered straight back into the agent.
pub async fn dial(steering: &Steering, dst: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let socket = if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|source| DialError::Socket { dst, source })?;
    socket.set_nodelay(true).map_err(|source| DialError::Socket { dst, source })?;
    let cookie = sockopt::socket_cookie(&socket).map_err(|source| DialError::Socket { dst, source })?;
    let _bypass = steering.bypass(cookie).map_err(|source| DialError::Bypass { dst, source })?;
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(DialError::Connect { dst, source }),
        Err(_) => Err(DialError::Timeout { dst, timeout }),
    }
}
