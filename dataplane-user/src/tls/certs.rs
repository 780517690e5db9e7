//! Certificates for the tunnel's private CA: a CA, and node certificates whose
//! identity is a URI SAN (SPIFFE-style, e.g. `spiffe://example.org/node/a`).
//! Used by `dataplane cert`, the demo and the tests.

use std::{net::IpAddr, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// An identity that cannot go into a URI SAN.
    #[error("identity `{0}` is not a URI (expected e.g. spiffe://example.org/node/worker-1)")]
    BadIdentity(String),
    /// A DNS name that cannot go into a SAN.
    #[error("`{0}` is not a valid DNS name")]
    BadDnsName(String),
    /// The CA files do not parse or do not match.
    #[error("CA certificate or key: {0}")]
    BadCa(rcgen::Error),
    /// Generation or signing failed.
    #[error("generating the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// What a node certificate says about its holder.
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    /// URI SAN: the identity peers are configured with.
    pub identity: String,
    /// Extra DNS SANs (for other TLS clients; peers go by the identity).
    pub dns: Vec<String>,
    /// Extra IP SANs.
    pub ips: Vec<IpAddr>,
    pub validity: Duration,
    /// How far in the future the certificate starts to be valid; zero (the
    /// default): from now, with a few minutes' slack for clocks behind.
    pub starts_in: Duration,
}

/// A new self-signed CA.
pub fn new_ca(common_name: &str, validity: Duration) -> Result<Pem, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, Duration::ZERO, validity);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// A certificate signed by `ca`, usable as both TLS client and server (a node
/// dials and is dialled).
pub fn issue(ca: &Pem, spec: &NodeSpec) -> Result<Pem, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(CertError::BadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(CertError::BadCa)?;
    if !spec.identity.contains("://") {
        return Err(CertError::BadIdentity(spec.identity.clone()));
    }
    let uri = Ia5String::try_from(spec.identity.as_str())
        .map_err(|_| CertError::BadIdentity(spec.identity.clone()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&spec.identity);
    params.subject_alt_names.push(SanType::URI(uri));
    for d in &spec.dns {
        let d = Ia5String::try_from(d.as_str()).map_err(|_| CertError::BadDnsName(d.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(d));
    }
    params.subject_alt_names.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, spec.starts_in, spec.validity);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn set_validity(params: &mut CertificateParams, starts_in: Duration, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let secs = |d: Duration| time::Duration::seconds(d.as_secs().min(i64::MAX as u64 / 2) as i64);
    let start = now + secs(starts_in);
    // From now, with a little slack for clocks that are behind.
    params.not_before = if starts_in.is_zero() { now - time::Duration::minutes(5) } else { start };
    params.not_after = start + secs(validity);
}

/// Errors of the file-writing helpers behind `dataplane cert`.
#[derive(Debug, thiserror::Error)]
pub enum CertFileError {
    #[error("{path} exists; pass --force to replace it")]
    Exists { path: std::path::PathBuf },
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// Writes `files` (name, content, private?) into `dir`. Checks every target
/// first, so either all are written or none is.
fn write_all(dir: &std::path::Path, files: &[(&str, &str, bool)], force: bool) -> Result<(), CertFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|source| CertFileError::Io { path: dir.to_owned(), source })?;
    if !force && let Some((name, ..)) = files.iter().find(|(n, ..)| dir.join(n).exists()) {
        return Err(CertFileError::Exists { path: dir.join(name) });
    }
    for (name, content, private) in files {
        let path = dir.join(name);
        let io = |source| CertFileError::Io { path: path.clone(), source };
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if *private { 0o600 } else { 0o644 })
            .open(&path)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, content.as_bytes()).map_err(io)?;
    }
    Ok(())
}

/// `dataplane cert ca`: writes `ca.crt` and `ca.key` into `dir`.
pub fn write_ca(
    dir: &std::path::Path,
    name: &str,
    validity: Duration,
    force: bool,
) -> Result<(), CertFileError> {
    let ca = new_ca(name, validity)?;
    write_all(dir, &[("ca.crt", &ca.cert, false), ("ca.key", &ca.key, true)], force)
}

/// `dataplane cert issue`: reads the CA from `ca_dir`, writes `tls.crt`,
/// `tls.key` and a copy of `ca.crt` into `out` (the three files `tls:` names).
pub fn write_node(
    ca_dir: &std::path::Path,
    spec: &NodeSpec,
    out: &std::path::Path,
    force: bool,
) -> Result<(), CertFileError> {
    let read = |name: &str| {
        let path = ca_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertFileError::Io { path, source })
    };
    let ca = Pem { cert: read("ca.crt")?, key: read("ca.key")? };
    let node = issue(&ca, spec)?;
    write_all(
        out,
        &[("tls.crt", &node.cert, false), ("tls.key", &node.key, true), ("ca.crt", &ca.cert, false)],
        force,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_once_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        write_ca(&ca_dir, "test", Duration::from_secs(3600), false).expect("ca");
        let mode = std::fs::metadata(ca_dir.join("ca.key")).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = write_ca(&ca_dir, "test", Duration::from_secs(3600), false).expect_err("exists");
        assert!(err.to_string().contains("ca.crt exists; pass --force"), "{err}");
        let spec = NodeSpec {
            identity: "spiffe://t/n".into(),
            validity: Duration::from_secs(60),
            ..Default::default()
        };
        let out = dir.path().join("node");
        write_node(&ca_dir, &spec, &out, false).expect("node");
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let err = write_node(&dir.path().join("nope"), &spec, &out, true).expect_err("no CA");
        assert!(err.to_string().contains("nope/ca.crt"), "{err}");
    }
}
