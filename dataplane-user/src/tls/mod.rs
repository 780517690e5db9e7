//! Mutual TLS for the tunnel: one crypto provider (aws-lc-rs, with the
//! X25519MLKEM768 hybrid key exchange preferred), TLS 1.3 only, the project
//! ALPN, and peers identified by the URI SAN of a certificate from the private
//! CA. Names in SNI play no part: the dialer checks the chain and that the URI
//! is the identity configured for the peer it meant to reach; the acceptor
//! checks the chain and maps the URI to a configured peer.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};

use crate::{config::TlsFiles, identity::IdentityPattern};

pub mod certs;

/// ALPN of the tunnel protocol; a peer that does not offer it is refused.
pub const ALPN: &[u8] = b"dataplane/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("tls.{field}: {path}: {reason}")]
    File { field: &'static str, path: PathBuf, reason: String },
    /// The own certificate has no URI SAN.
    #[error("tls.cert: {path} has no URI SAN identity (issue it with `dataplane cert issue --identity ...`)")]
    NoIdentity { path: PathBuf },
    /// rustls refused the material (key does not match, ...).
    #[error("tls: {0}")]
    Config(#[from] rustls::Error),
    #[error("tls: {0}")]
    Verifier(String),
    /// The own certificate is outside its validity period.
    #[error("tls.cert: {path} is {what} (valid {not_before} to {not_after} UTC; now {now})")]
    OwnCertificate { path: PathBuf, what: &'static str, not_before: String, not_after: String, now: String },
}

/// The crypto provider for the whole tree. X25519MLKEM768 comes first among
/// the key exchange groups (rustls' `prefer-post-quantum`), classic X25519 next.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Loaded CA, own chain and key, and the own identity.
#[derive(Clone)]
pub struct TlsMaterial {
    pub roots: Arc<RootCertStore>,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub identity: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // A Kubernetes Secret mounted for a non-root pod is the pod's
        // fsGroup's (root owns it, mode 0440): the group bits are how this
        // process reads it, and only pods of that group share them.
        let for_own_group = |m: &std::fs::Metadata| {
            m.uid() != nix::unistd::geteuid().as_raw() && m.gid() == nix::unistd::getegid().as_raw()
        };
        if let Ok(meta) = std::fs::metadata(&files.key)
            && let Some(problem) = key_mode_problem(meta.permissions().mode(), for_own_group(&meta))
        {
            tracing::warn!(path = %files.key.display(), "tls.key {problem}");
        }
        let read = |field: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| TlsError::File {
                field,
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        let material = Self::parse(
            &read("ca", &files.ca)?,
            &read("cert", &files.cert)?,
            &read("key", &files.key)?,
            files,
        )?;
        check_own_validity(&material.chain[0], &files.cert, SystemTime::now())?;
        Ok(material)
    }

    /// Built from PEM text already in memory (tests, the demo). Unlike
    /// [`TlsMaterial::load`], whatever validity period the certificate has is
    /// the caller's business (a test presents early or expired ones).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<TlsMaterial, TlsError> {
        let files = TlsFiles { ca: "<memory>".into(), cert: "<memory>".into(), key: "<memory>".into() };
        Self::parse(ca.as_bytes(), cert.as_bytes(), key.as_bytes(), &files)
    }

    /// `files` only names the sources in errors.
    fn parse(ca: &[u8], cert: &[u8], key: &[u8], files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        let bad = |field: &'static str, path: &PathBuf, reason: String| TlsError::File {
            field,
            path: path.clone(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(|e| bad("ca", &files.ca, e.to_string()))?;
            roots.add(c).map_err(|e| bad("ca", &files.ca, e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("ca", &files.ca, "no certificate in the file".into()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("cert", &files.cert, e.to_string()))?;
        let leaf =
            chain.first().ok_or_else(|| bad("cert", &files.cert, "no certificate in the file".into()))?;
        let identity = uri_san(leaf).ok_or_else(|| TlsError::NoIdentity { path: files.cert.clone() })?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("key", &files.key, e.to_string()))?;
        let material = TlsMaterial { roots: Arc::new(roots), chain, key: Arc::new(key), identity };
        // Fails here, naming the problem, if the key does not match the cert.
        material.server_config()?;
        Ok(material)
    }

    /// When this agent's own certificate stops being valid.
    pub fn not_after(&self) -> Option<SystemTime> {
        validity(self.chain.first()?).map(|(_, not_after)| not_after)
    }

    /// Accepting side: a client certificate from the CA is required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        // No resumption: a resumed session skips the certificate check, so a
        // peer whose certificate expired (or whose identity was removed)
        // would come back in on an old ticket. Tunnel connections are few
        // and long-lived; a full handshake each costs nothing that matters.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// The secret behind the tunnel's QUIC stateless resets, derived from
    /// this node's private key and `node` (HMAC-SHA256 over a fixed label
    /// and the node name): as secret as the key, and the same after a
    /// restart. A restarted agent then answers its predecessor's
    /// connections with a stateless reset, so a peer drops them at its next
    /// packet (one keep-alive) instead of waiting out the idle timeout. The
    /// node name keeps replicas that share one key (a Deployment mounting
    /// one Secret) from resetting each other's connections behind a load
    /// balancer. A rotated key changes it: connections made before such a
    /// rotation fall back to the idle timeout.
    pub fn stateless_reset_secret(&self, node: &str) -> [u8; 32] {
        use aws_lc_rs::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, self.key.secret_der());
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"dataplane/quic/stateless-reset/v1\0");
        ctx.update(node.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Dialing side, for a peer whose identity must match `expected`.
    pub fn client_config(&self, expected: &IdentityPattern) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(PeerVerifier {
            roots: self.roots.clone(),
            expected: expected.clone(),
            provider: provider(),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }
}

/// A certificate's validity period.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let v = parsed.validity();
    let at = |t: i64| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(t).ok()?));
    Some((at(v.not_before.timestamp())?, at(v.not_after.timestamp())?))
}

/// The agent's own certificate must be valid now: an agent whose every
/// handshake is going to fail should say so at start, not run silently.
fn check_own_validity(leaf: &CertificateDer<'_>, path: &Path, now: SystemTime) -> Result<(), TlsError> {
    let (not_before, not_after) = validity(leaf).ok_or_else(|| TlsError::File {
        field: "cert",
        path: path.to_owned(),
        reason: "cannot read its validity period".into(),
    })?;
    let what = if now < not_before {
        "not valid yet"
    } else if now > not_after {
        "expired"
    } else {
        return Ok(());
    };
    let show = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    Err(TlsError::OwnCertificate {
        path: path.to_owned(),
        what,
        not_before: show(not_before),
        not_after: show(not_after),
        now: show(now),
    })
}

/// What is wrong with a key file's permission bits, if anything: a private
/// key readable by group or others is readable by whoever shares the node.
/// Group read is expected of a file another user owns for this process's
/// own group (`own_group`: a Secret mounted with an fsGroup).
pub fn key_mode_problem(mode: u32, own_group: bool) -> Option<String> {
    let allowed = if own_group { 0o040 } else { 0 };
    (mode & 0o077 & !allowed != 0).then(|| {
        format!("is readable by group or others (mode {:o}); make it 0600 (`chmod 600`)", mode & 0o777)
    })
}

/// The first URI SAN of a certificate: a peer's identity.
pub fn uri_san(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
        _ => None,
    })
}

/// Checks a server's chain against the private CA and its URI SAN against
/// the identity configured for the peer being dialled; the SNI name is unused.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    expected: IdentityPattern,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match uri_san(end_entity) {
            Some(id) if self.expected.matches(&id) => Ok(ServerCertVerified::assertion()),
            other => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                    Arc::new(IdentityMismatch { expected: self.expected.to_string(), found: other }),
                ))))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The peer presented a valid certificate for someone else.
#[derive(Debug)]
struct IdentityMismatch {
    expected: String,
    found: Option<String>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer identity {:?} is not the expected {}", self.found, self.expected)
    }
}

impl std::error::Error for IdentityMismatch {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::certs::{self, NodeSpec};
    use super::*;

    fn node(ca: &certs::Pem, id: &str) -> TlsMaterial {
        let spec =
            NodeSpec { identity: id.into(), validity: Duration::from_secs(3600), ..Default::default() };
        let pem = certs::issue(ca, &spec).expect("issue");
        TlsMaterial::from_pem(&ca.cert, &pem.cert, &pem.key).expect("load")
    }

    #[test]
    fn identities_come_from_the_uri_san() {
        let ca = certs::new_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let m = node(&ca, "spiffe://dataplane.test/node/a");
        assert_eq!(m.identity, "spiffe://dataplane.test/node/a");
        assert_eq!(uri_san(&m.chain[0]).as_deref(), Some("spiffe://dataplane.test/node/a"));
    }

    #[test]
    fn bad_material_names_the_file() {
        let ca = certs::new_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let a = certs::issue(
            &ca,
            &NodeSpec {
                identity: "spiffe://t/a".into(),
                validity: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .expect("a");
        let b = certs::issue(
            &ca,
            &NodeSpec {
                identity: "spiffe://t/b".into(),
                validity: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .expect("b");
        let err = TlsMaterial::from_pem(&ca.cert, &a.cert, &b.key).expect_err("key of another cert");
        assert!(err.to_string().contains("tls"), "{err}");
        let err = TlsMaterial::from_pem("not pem", &a.cert, &a.key).expect_err("bad CA");
        assert!(err.to_string().contains("tls.ca"), "{err}");
        assert!(matches!(
            certs::issue(&ca, &NodeSpec { identity: "no-scheme".into(), ..Default::default() }),
            Err(certs::CertError::BadIdentity(_))
        ));
    }

    #[test]
    fn an_own_certificate_outside_its_validity_is_refused_naming_it() {
        let ca = certs::new_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let m = node(&ca, "spiffe://t/a");
        let leaf = &m.chain[0];
        let (not_before, not_after) = validity(leaf).expect("validity");
        let path = Path::new("/etc/dataplane/tls/tls.crt");
        assert!(check_own_validity(leaf, path, not_before + Duration::from_secs(60)).is_ok());
        let e = check_own_validity(leaf, path, not_after + Duration::from_secs(1)).expect_err("expired");
        assert!(e.to_string().contains("tls.cert") && e.to_string().contains("expired"), "{e}");
        let e = check_own_validity(leaf, path, not_before - Duration::from_secs(1)).expect_err("early");
        assert!(e.to_string().contains("not valid yet"), "{e}");
    }

    #[test]
    fn keys_readable_by_others_are_named() {
        assert!(key_mode_problem(0o100600, false).is_none());
        assert!(key_mode_problem(0o100400, false).is_none());
        let p = key_mode_problem(0o100644, false).expect("a problem");
        assert!(p.contains("644") && p.contains("0600"), "{p}");
        assert!(key_mode_problem(0o100640, false).is_some());
        // A Secret mounted for this process's group (fsGroup, 0440).
        assert!(key_mode_problem(0o100440, true).is_none());
        assert!(key_mode_problem(0o100444, true).is_some(), "others still may not read it");
        assert!(key_mode_problem(0o100460, true).is_some(), "nor the group write it");
    }

    #[test]
    fn the_reset_secret_follows_the_private_key() {
        let ca = certs::new_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let a = node(&ca, "spiffe://t/a");
        let b = node(&ca, "spiffe://t/b");
        let secret = |m: &TlsMaterial, node: &str| m.stateless_reset_secret(node);
        assert_eq!(secret(&a, "n1"), secret(&a.clone(), "n1"), "stable for one key and node");
        assert_ne!(secret(&a, "n1"), secret(&b, "n1"), "another key, another secret");
        assert_ne!(secret(&a, "n1"), secret(&a, "n2"), "replicas sharing a key differ by node");
        assert_ne!(secret(&a, "n1"), [0; 32]);
    }

    #[test]
    fn sessions_are_never_resumed() {
        let ca = certs::new_ca("test CA", Duration::from_secs(3600)).expect("ca");
        let m = node(&ca, "spiffe://t/a");
        let server = m.server_config().expect("server");
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.can_cache(), "no session cache");
        let client =
            m.client_config(&IdentityPattern::parse("spiffe://t/b").expect("pattern")).expect("client");
        // rustls exposes the client's store only through Debug.
        let resumption = format!("{:?}", client.resumption);
        assert!(resumption.contains("NoClientSessionStorage"), "{resumption}");
    }

    #[test]
    fn the_provider_prefers_the_post_quantum_hybrid() {
        let p = provider();
        let first = p.kx_groups.first().expect("kx groups").name();
        assert_eq!(first, rustls::NamedGroup::X25519MLKEM768, "X25519MLKEM768 first");
    }
}
