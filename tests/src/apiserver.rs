//! A stand-in Kubernetes API server for the end-to-end tests: HTTPS with a
//! required client certificate, answering the requests `kubectl version`,
//! `kubectl get pods [--watch]` and `kubectl exec` make (discovery,
//! /version, the pod and the pod list as a Table or a PodList, a watch as
//! a long-lived chunked stream of events, exec over the WebSocket protocol
//! kubectl speaks, `v5.channel.k8s.io`) with the JSON a real API server
//! returns.

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
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: Vec<(&str, &str)> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        if path == format!("{PODS}/{POD_NAME}/exec") && header("upgrade").eq_ignore_ascii_case("websocket") {
            requests.fetch_add(1, Ordering::Relaxed);
            let command: Vec<String> =
                params.iter().filter(|(k, _)| *k == "command").map(|(_, v)| percent_decode(v)).collect();
            return exec(s, &header("sec-websocket-key"), &header("sec-websocket-protocol"), &command).await;
        }
        if path == PODS && params.iter().any(|(k, v)| *k == "watch" && (*v == "true" || *v == "1")) {
            requests.fetch_add(1, Ordering::Relaxed);
            return watch(s, header("accept").contains("as=Table")).await;
        }
        let (status, body) = respond(path, &header("accept"));
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

const PODS: &str = "/api/v1/namespaces/default/pods";

/// What the pod's container "prints" for `kubectl exec -- echo WORDS`.
pub fn exec_output(command: &[&str]) -> String {
    format!("{}\n", command.get(1..).unwrap_or_default().join(" "))
}

fn pod_meta(resource_version: u32) -> String {
    format!(
        r#"{{"name":"{POD_NAME}","namespace":"default","uid":"00000000-0000-0000-0000-000000000001","resourceVersion":"{resource_version}","creationTimestamp":"2026-01-01T00:00:00Z"}}"#
    )
}

fn pod(resource_version: u32, phase: &str) -> String {
    format!(
        r#"{{"kind":"Pod","apiVersion":"v1","metadata":{},"spec":{{"containers":[{{"name":"app","image":"registry.example/app:1"}}]}},"status":{{"phase":"{phase}"}}}}"#,
        pod_meta(resource_version)
    )
}

/// The pod list as the Table kubectl asks for: one row, its restarts.
fn pod_table(resource_version: u32, restarts: u32) -> String {
    format!(
        r#"{{"kind":"Table","apiVersion":"meta.k8s.io/v1","metadata":{{"resourceVersion":"{resource_version}"}},"columnDefinitions":[{{"name":"Name","type":"string","format":"name","description":"","priority":0}},{{"name":"Ready","type":"string","format":"","description":"","priority":0}},{{"name":"Status","type":"string","format":"","description":"","priority":0}},{{"name":"Restarts","type":"string","format":"","description":"","priority":0}},{{"name":"Age","type":"string","format":"","description":"","priority":0}}],"rows":[{{"cells":["{POD_NAME}","1/1","Running","{restarts}","5m"],"object":{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{}}}}}]}}"#,
        pod_meta(resource_version)
    )
}

/// Restart counts a watch reports, one event each, after the list's 0.
pub const WATCH_RESTARTS: [u32; 2] = [1, 2];

/// A watch: the response starts at once and stays open; each event comes
/// 300 ms after the one before, a chunk of its own, and the stream ends
/// (as a real server's watch does at its timeout) after the last.
async fn watch<S: tokio::io::AsyncWrite + Unpin>(mut s: S, table: bool) -> Result<()> {
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await?;
    s.flush().await?;
    for (i, restarts) in WATCH_RESTARTS.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rv = 2 + i as u32;
        let object = if table { pod_table(rv, restarts) } else { pod(rv, "Running") };
        let event = format!("{{\"type\":\"MODIFIED\",\"object\":{object}}}\n");
        s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await?;
        s.flush().await?;
    }
    s.write_all(b"0\r\n\r\n").await?;
    s.flush().await?;
    Ok(())
}

/// `kubectl exec` over WebSocket: the upgrade, then the command's output on
/// the stdout channel (1) and its status on the error channel (3), then a
/// close. `echo` prints its words and succeeds; `false` fails with exit code
/// 1; anything else is not found (126).
async fn exec<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    key: &str,
    offered: &str,
    command: &[String],
) -> Result<()> {
    let protocol = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p))
        .context("no channel protocol kubectl and this server share")?;
    let accept = {
        use base64::Engine;
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
        );
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    };
    s.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let words: Vec<&str> = command.iter().map(String::as_str).collect();
    let status = match words.first().copied() {
        Some("echo") => {
            s.write_all(&ws_frame(0x2, &[&[1], exec_output(&words).as_bytes()].concat())).await?;
            r#"{"metadata":{},"status":"Success"}"#.to_owned()
        }
        Some("false") => exit_status(&words, 1),
        _ => exit_status(&words, 126),
    };
    s.write_all(&ws_frame(0x2, &[&[3], status.as_bytes()].concat())).await?;
    // Normal closure; then wait (briefly) for kubectl's close and its end.
    s.write_all(&ws_frame(0x8, &1000u16.to_be_bytes())).await?;
    s.flush().await?;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    Ok(())
}

fn exit_status(command: &[&str], code: u32) -> String {
    format!(
        r#"{{"metadata":{{}},"status":"Failure","message":"command terminated with non-zero exit code: error executing command {command:?}, exit code {code}","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#
    )
}

/// One unmasked (server-to-client) WebSocket frame, FIN set.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// `%XX` escapes and `+` in a query value.
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, b[i]) {
            (Some(x), _) => {
                out.push(x);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, c) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(path: &str, accept: &str) -> (&'static str, String) {
    let meta = pod_meta(1);
    let body = match path {
        "/version" => format!(
            r#"{{"major":"1","minor":"32","gitVersion":"{SERVER_VERSION}","gitCommit":"0000000000000000000000000000000000000000","gitTreeState":"clean","buildDate":"2026-01-01T00:00:00Z","goVersion":"go1.23.0","compiler":"gc","platform":"linux/amd64"}}"#
        ),
        "/api" => r#"{"kind":"APIVersions","versions":["v1"],"serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":"198.51.100.101:6443"}]}"#.into(),
        "/apis" => r#"{"kind":"APIGroupList","apiVersion":"v1","groups":[]}"#.into(),
        "/api/v1" => r#"{"kind":"APIResourceList","groupVersion":"v1","resources":[{"name":"pods","singularName":"pod","namespaced":true,"kind":"Pod","verbs":["get","list","watch"],"shortNames":["po"],"categories":["all"]}]}"#.into(),
        PODS if accept.contains("as=Table") => pod_table(1, 0),
        p if p == format!("{PODS}/{POD_NAME}") => pod(1, "Running"),
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
