//! What happens on a connection before it carries flows: the acceptor maps
//! the peer's certificate to a configured peer and sends its welcome, the
//! dialer waits for that welcome, and a failed handshake gets a short,
//! stable reason for logs and metrics.

use std::time::Duration;

use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
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
/// Close code for a connection whose peer's certificate expired.
pub(super) const CLOSE_CERT_EXPIRED: VarInt = VarInt::from_u32(5);
/// Close code for a peer that holds `limits.connections_per_peer` already.
pub(super) const CLOSE_OVER_CAP: VarInt = VarInt::from_u32(6);
/// Close code for a peer that broke the control protocol.
pub(super) const CLOSE_CONTROL: VarInt = VarInt::from_u32(7);
/// The acceptor's first message: "your certificate and identity are accepted".
/// In TLS 1.3 a client finishes its handshake before the server has checked
/// the client certificate, so without this a dialer would count a connection
/// the peer is about to refuse as live.
const WELCOME: u8 = 1;

/// Acceptor: tells the peer it was accepted. The stream stays open: it is
/// the acceptor's control stream from then on.
pub(super) async fn send_welcome(conn: &quinn::Connection) -> Result<SendStream, String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    s.write_all(&[WELCOME]).await.map_err(|e| e.to_string())?;
    Ok(s)
}

/// Dialer: waits up to `within` for the acceptor's welcome: only then did it
/// accept our certificate and identity. A refusal surfaces as its close
/// reason. Returns the stream the welcome came on: the acceptor's control
/// stream.
pub(super) async fn await_welcome(
    conn: quinn::Connection,
    within: Duration,
) -> Result<(quinn::Connection, RecvStream), ConnectionError> {
    let welcome = async {
        let mut r = conn.accept_uni().await?;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).await.map_err(|_| ConnectionError::Reset)?;
        Ok::<_, ConnectionError>((b[0], r))
    };
    match tokio::time::timeout(within, welcome).await {
        Ok(Ok((WELCOME, control))) => Ok((conn, control)),
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
/// When the certificate a connection's peer presented stops being valid.
/// When the peer's certificate stops being valid: the end of its notAfter
/// second. X.509 times are whole seconds and rustls accepts a certificate
/// through its notAfter second, so a connection closed at notAfter itself
/// could be re-established (and closed again) within that second.
pub(super) fn peer_certificate_expiry(conn: &quinn::Connection) -> Option<std::time::SystemTime> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    crate::tls::validity(certs.first()?).map(|(_, not_after)| not_after + std::time::Duration::from_secs(1))
}

pub(super) fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    uri_san(certs.first()?)
}

/// Every reason a handshake failure is counted under: a fixed set, so no
/// peer (or stranger) can mint metric series by choosing its close codes.
pub const HANDSHAKE_REASONS: &[&str] = &[
    // TLS alerts we sent (or our stack raised).
    "bad_certificate",
    "unsupported_certificate",
    "certificate_expired",
    "certificate_unknown",
    "unknown_ca",
    "certificate_required",
    "no_application_protocol",
    "tls_other",
    // QUIC transport errors we raised.
    "protocol_violation",
    "invalid_token",
    "transport_other",
    // What the peer told us.
    "peer_refused",
    "peer_bad_certificate",
    "peer_unsupported_certificate",
    "peer_certificate_expired",
    "peer_certificate_unknown",
    "peer_unknown_ca",
    "peer_certificate_required",
    "peer_no_application_protocol",
    "peer_tls_other",
    "peer_unknown_identity",
    "peer_over_connection_cap",
    "peer_certificate_not_yet_valid",
    "peer_closed",
    "peer_closed_other",
    // Neither side said anything.
    "timeout",
    "reset",
    "version_mismatch",
    "locally_closed",
    "cids_exhausted",
    // TLS: a certificate not valid yet (the alert is the one for expired).
    "certificate_not_yet_valid",
    // Our own checks after the TLS handshake.
    "unknown_identity",
    "over_connection_cap",
];

/// A short, stable label for why a handshake failed, from
/// [`HANDSHAKE_REASONS`].
pub fn failure_reason(e: &ConnectionError) -> &'static str {
    match e {
        ConnectionError::TransportError(t) if not_yet_valid(u64::from(t.code), t.reason.as_bytes()) => {
            "certificate_not_yet_valid"
        }
        ConnectionError::TransportError(t) => code_reason(u64::from(t.code), false),
        ConnectionError::ConnectionClosed(c) if not_yet_valid(u64::from(c.error_code), &c.reason) => {
            "peer_certificate_not_yet_valid"
        }
        ConnectionError::ConnectionClosed(c) => code_reason(u64::from(c.error_code), true),
        ConnectionError::ApplicationClosed(a) if a.error_code == CLOSE_UNKNOWN_PEER => {
            "peer_unknown_identity"
        }
        ConnectionError::ApplicationClosed(a) if a.error_code == CLOSE_OVER_CAP => "peer_over_connection_cap",
        ConnectionError::ApplicationClosed(_) => "peer_closed",
        ConnectionError::TimedOut => "timeout",
        ConnectionError::Reset => "reset",
        ConnectionError::VersionMismatch => "version_mismatch",
        ConnectionError::LocallyClosed => "locally_closed",
        ConnectionError::CidsExhausted => "cids_exhausted",
    }
}

/// TLS has one alert for a certificate outside its validity, expired or not
/// yet valid (certificate_expired, 45); rustls says which in the error text,
/// which QUIC carries in the close frame to the peer as well.
fn not_yet_valid(code: u64, reason: &[u8]) -> bool {
    code == 0x100 + 45 && reason.windows(b"not valid yet".len()).any(|w| w == b"not valid yet")
}

/// The label for a QUIC transport error code, raised here or (`by_peer`)
/// sent by the peer. QUIC carries TLS alerts as CRYPTO_ERROR 0x100 + alert.
fn code_reason(code: u64, by_peer: bool) -> &'static str {
    let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff);
    match (by_peer, code, alert) {
        (_, _, Some(alert)) => {
            let (ours, theirs) = match alert {
                42 => ("bad_certificate", "peer_bad_certificate"),
                43 => ("unsupported_certificate", "peer_unsupported_certificate"),
                45 => ("certificate_expired", "peer_certificate_expired"),
                46 => ("certificate_unknown", "peer_certificate_unknown"),
                48 => ("unknown_ca", "peer_unknown_ca"),
                116 => ("certificate_required", "peer_certificate_required"),
                120 => ("no_application_protocol", "peer_no_application_protocol"),
                _ => ("tls_other", "peer_tls_other"),
            };
            if by_peer { theirs } else { ours }
        }
        // CONNECTION_REFUSED: the peer is not accepting (shutting down, or busy).
        (true, 0x2, None) => "peer_refused",
        (true, _, None) => "peer_closed_other",
        (false, 0xa, None) => "protocol_violation",
        (false, 0xb, None) => "invalid_token",
        (false, _, None) => "transport_other",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever code a peer sends, or our stack raises, the label is one
        /// of the fixed set.
        #[test]
        fn every_code_maps_into_the_fixed_set(code in any::<u64>(), by_peer in any::<bool>()) {
            prop_assert!(HANDSHAKE_REASONS.contains(&code_reason(code, by_peer)));
        }
    }

    #[test]
    fn known_codes_keep_their_names() {
        assert_eq!(code_reason(0x100 + 48, false), "unknown_ca");
        assert_eq!(code_reason(0x100 + 48, true), "peer_unknown_ca");
        assert_eq!(code_reason(0x100 + 7, true), "peer_tls_other");
        assert_eq!(code_reason(0x2, true), "peer_refused");
        assert_eq!(code_reason(0xa, false), "protocol_violation");
        assert_eq!(code_reason(0xdead_beef, true), "peer_closed_other");
        assert_eq!(failure_reason(&ConnectionError::TimedOut), "timeout");
        let alert = |reason: &str| quinn_proto::TransportError {
            code: quinn_proto::TransportErrorCode::crypto(45),
            frame: None,
            reason: reason.into(),
        };
        let early = "invalid peer certificate: certificate not valid yet: verification time 1 (UNIX), ...";
        assert_eq!(
            failure_reason(&ConnectionError::TransportError(alert(early))),
            "certificate_not_yet_valid"
        );
        assert_eq!(
            failure_reason(&ConnectionError::TransportError(alert(
                "invalid peer certificate: certificate expired"
            ))),
            "certificate_expired"
        );
    }
}
