//! What happens on a connection before it carries flows: the acceptor maps
//! the peer's certificate to a configured peer and sends its welcome, the
//! dialer waits for that welcome, and a failed handshake gets a short,
//! stable reason for logs and metrics.

use std::time::Duration;

use quinn::{ConnectionError, VarInt};
use rustls_pki_types::CertificateDer;

use crate::tls::uri_san;

/// Close code when this agent shuts down.
pub(super) const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Close code for a peer whose identity is not configured.
pub(super) const CLOSE_UNKNOWN_PEER: VarInt = VarInt::from_u32(2);
/// Reset code for a stream this agent does not serve.
pub(super) const RESET_NOT_SERVED: VarInt = VarInt::from_u32(3);
/// Close code for a dialled peer that never confirmed it accepted us.
const CLOSE_NO_WELCOME: VarInt = VarInt::from_u32(4);
/// The acceptor's first message: "your certificate and identity are accepted".
/// In TLS 1.3 a client finishes its handshake before the server has checked
/// the client certificate, so without this a dialer would count a connection
/// the peer is about to refuse as live.
const WELCOME: u8 = 1;

/// Acceptor: tells the peer it was accepted.
pub(super) async fn send_welcome(conn: &quinn::Connection) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(&[WELCOME]).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())
}

/// Dialer: waits up to `within` for the acceptor's welcome: only then did it
/// accept our certificate and identity. A refusal surfaces as its close
/// reason.
pub(super) async fn await_welcome(
    conn: quinn::Connection,
    within: Duration,
) -> Result<quinn::Connection, ConnectionError> {
    let welcome = async {
        let mut r = conn.accept_uni().await?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.map_err(|_| ConnectionError::Reset)?;
        Ok::<_, ConnectionError>(b[0])
    };
    match tokio::time::timeout(within, welcome).await {
        Ok(Ok(WELCOME)) => Ok(conn),
        Ok(Ok(_)) => {
            conn.close(CLOSE_NO_WELCOME, b"unexpected welcome");
            Err(ConnectionError::Reset)
        }
        Ok(Err(e)) => Err(conn.close_reason().unwrap_or(e)),
        Err(_) => {
            conn.close(CLOSE_NO_WELCOME, b"no welcome");
            Err(ConnectionError::TimedOut)
        }
    }
}

/// The URI SAN of the certificate a connection's peer presented.
pub(super) fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    uri_san(certs.first()?)
}

/// A short, stable label for why a handshake failed.
pub fn failure_reason(e: &ConnectionError) -> String {
    fn tls_alert(code: u64) -> Option<String> {
        // QUIC carries TLS alerts as CRYPTO_ERROR 0x100 + alert.
        let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff)?;
        Some(
            match alert {
                42 => "bad_certificate",
                43 => "unsupported_certificate",
                45 => "certificate_expired",
                46 => "certificate_unknown",
                48 => "unknown_ca",
                116 => "certificate_required",
                120 => "no_application_protocol",
                a => return Some(format!("tls_alert_{a}")),
            }
            .to_owned(),
        )
    }
    match e {
        ConnectionError::TransportError(t) => {
            tls_alert(u64::from(t.code)).unwrap_or_else(|| format!("transport_{:#x}", u64::from(t.code)))
        }
        ConnectionError::ConnectionClosed(c) => match u64::from(c.error_code) {
            // CONNECTION_REFUSED: the peer is not accepting (shutting down).
            0x2 => "peer_refused".into(),
            code => tls_alert(code).map_or_else(|| format!("peer_closed_{code:#x}"), |a| format!("peer_{a}")),
        },
        ConnectionError::ApplicationClosed(a) if a.error_code == CLOSE_UNKNOWN_PEER => {
            "peer_unknown_identity".into()
        }
        ConnectionError::ApplicationClosed(_) => "peer_closed".into(),
        ConnectionError::TimedOut => "timeout".into(),
        ConnectionError::Reset => "reset".into(),
        ConnectionError::VersionMismatch => "version_mismatch".into(),
        ConnectionError::LocallyClosed => "locally_closed".into(),
        ConnectionError::CidsExhausted => "cids_exhausted".into(),
    }
}
