//! The `direct` upstream: the agent dials the original destination itself. It
//! stands in for the tunnel and serves routes that need no tunnel.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::Instant,
};
use tracing::{debug, info};

use super::{FlowServer, flow::reset, metrics::FlowResult};
use crate::{
    kernel::{Steering, SteeringError},
    sockopt,
    traffic::Traffic,
};

/// Largest chunk relayed at once in each direction.
const CHUNK: usize = 64 * 1024;

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

/// Serves a flow by dialling its destination and relaying both ways.
pub(super) async fn serve(
    server: &FlowServer,
    client: &mut TcpStream,
    dst: SocketAddr,
    accepted: Instant,
    route: &str,
) -> FlowResult {
    let mut upstream = match dial(&server.steering, dst, server.connect_timeout()).await {
        Ok(s) => s,
        Err(e) => {
            info!(%dst, error = %e, "upstream dial failed; resetting");
            reset(client);
            return FlowResult::dial_failed;
        }
    };
    let _ = sockopt::keepalive(&upstream);
    server.metrics.setup("direct", accepted.elapsed());
    debug!(%dst, "flow open (direct)");
    let (moved, result) = relay(client, &mut upstream, server.flow_idle_timeout()).await;
    server.metrics.bytes(route, moved.0, moved.1);
    match result {
        Ok(()) => {
            debug!(up = moved.0, down = moved.1, "flow closed");
            FlowResult::completed
        }
        // One side reset or failed: pass the failure on rather than a clean FIN.
        Err(e) => {
            reset(client);
            reset(&upstream);
            if let RelayError::Idle(after) = e {
                info!(%dst, ?after, "flow idle past limits.flow_idle_timeout; reset");
                FlowResult::idle
            } else if e.is_client_reset() {
                debug!(up = moved.0, down = moved.1, "the application reset its connection");
                FlowResult::client_reset
            } else {
                debug!(error = %e, "flow failed");
                FlowResult::failed
            }
        }
    }
}

/// Which side of a relayed flow failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("application side: {0}")]
    Client(#[source] io::Error),
    #[error("destination side: {0}")]
    Upstream(#[source] io::Error),
    /// Nothing moved either way for `limits.flow_idle_timeout`.
    #[error("no bytes either way for {0:?}")]
    Idle(Duration),
}

impl RelayError {
    /// The application reset (or abandoned) its own connection: the path
    /// did not fail. iperf3, for one, ends every test with a reset.
    pub fn is_client_reset(&self) -> bool {
        matches!(self, RelayError::Client(e) if sockopt::peer_left(e))
    }
}

/// Copies both ways with half-close until both directions finished (or,
/// with `idle`, until nothing moved for that long); returns the bytes moved
/// (up: client to upstream, down: back) whatever happened, and which side
/// failed, if one did.
pub async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Option<Duration>,
) -> ((u64, u64), Result<(), RelayError>) {
    let moved = Traffic::default();
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let to_upstream = copy_half(&mut cr, &mut uw, |n| moved.up(n), RelayError::Client, RelayError::Upstream);
    let to_client = copy_half(&mut ur, &mut cw, |n| moved.down(n), RelayError::Upstream, RelayError::Client);
    let result = tokio::select! {
        r = async { tokio::try_join!(to_upstream, to_client) } => r.map(|_| ()),
        () = moved.silent_for(idle) => Err(RelayError::Idle(idle.unwrap_or_default())),
    };
    (moved.totals(), result)
}

/// One direction: read until EOF, pass the FIN on; errors are attributed to
/// the side they came from.
async fn copy_half(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    moved: impl Fn(u64),
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = from.read(&mut buf).await.map_err(read_side)?;
        if n == 0 {
            return to.shutdown().await.map_err(write_side);
        }
        to.write_all(&buf[..n]).await.map_err(write_side)?;
        moved(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        (a, l.accept().await.expect("accept").0)
    }

    /// The relay says which side failed: a client that resets after its
    /// exchange is told apart from a destination that fails.
    #[tokio::test]
    async fn relay_tells_a_client_reset_from_an_upstream_failure() {
        for client_resets in [true, false] {
            let (mut app, mut agent_side) = pair().await;
            let (mut agent_up, mut dst) = pair().await;
            let relayed = tokio::spawn(async move { relay(&mut agent_side, &mut agent_up, None).await });
            app.write_all(b"ping").await.expect("write");
            let mut b = [0u8; 4];
            dst.read_exact(&mut b).await.expect("relayed up");
            dst.write_all(b"pong").await.expect("write");
            app.read_exact(&mut b).await.expect("relayed down");
            let gone = if client_resets { app } else { dst };
            sockopt::reset_on_close(&gone).expect("linger");
            drop(gone);
            let ((up, down), result) = relayed.await.expect("relay task");
            assert_eq!((up, down), (4, 4), "bytes are counted whatever the ending");
            let e = result.expect_err("a reset is an error");
            assert_eq!(e.is_client_reset(), client_resets, "{e}");
        }
    }
}
