//! A stand-in Kubernetes API server for the end-to-end tests: HTTPS with a
//! required client certificate, answering the requests `kubectl version` and
//! `kubectl get pods` make (discovery, /version, the pod list as a Table or a
//! PodList) with the JSON a real API server returns.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Netns;

pub const SERVER_VERSION: &str = "v1.32.0-dataplane";
pub const POD_NAME: &str = "api-through-dataplane";

pub struct ApiServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
}

impl ApiServer {
    /// Serves on `addrs` inside `ns`. `ca` verifies client certificates.
    pub fn start(
        ns: &Netns,
        addrs: &[SocketAddr],
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<ApiServer> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listeners = addrs
            .iter()
            .map(|a| {
                let a = *a;
                ns.run(move || crate::listen(a))?
            })
            .collect::<Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                for l in listeners {
                    l.set_nonblocking(true).expect("nonblocking");
                    let l = tokio::net::TcpListener::from_std(l).expect("listener");
                    let (acceptor, requests) = (acceptor.clone(), requests2.clone());
                    tokio::spawn(async move {
                        while let Ok((tcp, _)) = l.accept().await {
                            let (acceptor, requests) = (acceptor.clone(), requests.clone());
                            tokio::spawn(async move {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    let _ = serve_http(tls, &requests).await;
                                }
                            });
                        }
                    });
                }
                while !stop2.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        });
        Ok(ApiServer { stop, thread: Some(thread), requests })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// HTTP/1.1 with keep-alive: enough for kubectl's GET requests.
async fn serve_http<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    requests: &AtomicU64,
) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.lines();
        let target =
            lines.next().and_then(|l| l.split_whitespace().nth(1)).context("request line")?.to_owned();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
                })
                .unwrap_or("")
                .to_owned()
        };
        let close = header("connection").eq_ignore_ascii_case("close");
        let (status, body) = respond(target.split('?').next().unwrap_or(""), &header("accept"));
        requests.fetch_add(1, Ordering::Relaxed);
        let reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

fn respond(path: &str, accept: &str) -> (&'static str, String) {
    let meta = format!(
        r#"{{"name":"{POD_NAME}","namespace":"default","uid":"00000000-0000-0000-0000-000000000001","creationTimestamp":"2026-01-01T00:00:00Z"}}"#
    );
    let body = match path {
        "/version" => format!(
            r#"{{"major":"1","minor":"32","gitVersion":"{SERVER_VERSION}","gitCommit":"0000000000000000000000000000000000000000","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.23.0","compiler":"gc","platform":"linux/amd64"}}"#
        ),
        "/api" => r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"198.51.100.101:6443"}]}"#.into(),
        "/apis" => r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#.into(),
        "/api/v1" => r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list"],"shortNames":["po"],"categories":["all"]}]}"#.into(),
        "/api/v1/namespaces/default/pods" if accept.contains("as=Table") => format!(
            r#"{{"kind":"Table","apiVersion":"meta.k8s.io/v1","metadata":{{"resourceVersion":"1"}},"columnDefinitions":[{{"name":"Name","type":"string","format":"name","description":"","priority":0}},{{"name":"Ready","type":"string","format":"","description":"","priority":0}},{{"name":"Status","type":"string","format":"","description":"","priority":0}},{{"name":"Restarts","type":"string","format":"","description":"","priority":0}},{{"name":"Age","type":"string","format":"","description":"","priority":0}}],"rows":[{{"cells":["{POD_NAME}","1/1","Running","0","5m"],"object":{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{meta}}}}}]}}"#
        ),
        "/api/v1/namespaces/default/pods" => format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{{"metadata":{meta},"spec":{{"containers":[{{"name":"app","image":"registry.example/app:1"}}]}},"status":{{"phase":"Running"}}}}]}}"#
        ),
        _ => {
            return (
                "404 Not Found",
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"not found","reason":"NotFound","code":404}"#.into(),
            );
        }
    };
    ("200 OK", body)
}
