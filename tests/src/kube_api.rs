//! A test Kubernetes API server for EndpointSlice discovery: HTTPS with a
//! bearer token, speaking the list/watch protocol a real one speaks for
//! `discovery.k8s.io/v1` EndpointSlices in `default`. Lists carry the
//! current resourceVersion; a watch from a resourceVersion streams the
//! events after it (ADDED/MODIFIED/DELETED, k8s-openapi objects), BOOKMARKs
//! while nothing changes, ends after `timeoutSeconds`, and answers a
//! resourceVersion older than the compacted history with an ERROR event
//! carrying a 410 Gone Status, as the real watch cache does. Label
//! selectors on `kubernetes.io/service-name` and the field selector
//! `metadata.name` are honoured. Tests change the slices, compact the
//! history past a change (open watches end; the next one from an older
//! resourceVersion gets the 410), and make the API unavailable (open
//! watches cut, requests answered 503).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use dataplane::tls::certs::{self, NodeSpec};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame};
use k8s_openapi::{
    List,
    api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, WatchEvent},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::sync::{broadcast, mpsc};

use crate::Netns;

/// A poisoned lock is a test that already failed: its data is still fine.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The bearer token the server accepts (a service account's, in a pod).
pub const TOKEN: &str = "dataplane-test-service-account-token";
const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// A bookmark this often on a quiet watch (a real API server sends them
/// about once a minute; faster here so the tests see several).
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

type Body = BoxBody<Bytes, std::io::Error>;

/// What the server has answered, for the tests' assertions.
#[derive(Debug, Default)]
pub struct Served {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    /// Watches that asked for bookmarks (`allowWatchBookmarks=true`).
    pub bookmark_watches: AtomicU64,
    pub bookmarks: AtomicU64,
    /// Watches answered 410 Gone.
    pub gone: AtomicU64,
    pub unauthorized: AtomicU64,
    pub unavailable: AtomicU64,
}

struct Store {
    rv: u64,
    slices: BTreeMap<String, EndpointSlice>,
    /// Events after `compacted`, in order: (resourceVersion, event).
    history: Vec<(u64, WatchEvent<EndpointSlice>)>,
    compacted: u64,
    unavailable: bool,
}

struct State {
    store: Mutex<Store>,
    /// Woken on every change, compaction and outage.
    changes: broadcast::Sender<()>,
    served: Arc<Served>,
}

/// The server, in a namespace, with a kubeconfig for it.
pub struct KubeApi {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub kubeconfig: PathBuf,
    /// The CA of the server's certificate.
    pub ca_pem: String,
    pub served: Arc<Served>,
}

/// One EndpointSlice of the `kubernetes` service: `family` IPv4 or IPv6,
/// its addresses (ready) and the `https` port.
pub fn api_slice(name: &str, family: &str, addresses: &[&str], port: i32) -> EndpointSlice {
    service_slice(name, "kubernetes", family, addresses, port)
}

/// One EndpointSlice of `service`.
pub fn service_slice(
    name: &str,
    service: &str,
    family: &str,
    addresses: &[&str],
    port: i32,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(SERVICE_LABEL.to_owned(), service.to_owned())])),
            ..Default::default()
        },
        address_type: family.into(),
        endpoints: addresses
            .iter()
            .map(|a| Endpoint {
                addresses: vec![(*a).into()],
                conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("https".into()),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

impl KubeApi {
    /// Serves `slices` on `addr` inside `ns`, writing the kubeconfig (server
    /// CA, token) into `dir`.
    pub fn start(ns: &Netns, addr: SocketAddr, dir: &Path, slices: Vec<EndpointSlice>) -> Result<KubeApi> {
        let year = Duration::from_secs(365 * 86_400);
        let ca = certs::new_ca("test API CA", year)?;
        let server = certs::issue(
            &ca,
            &NodeSpec {
                identity: "spiffe://cluster.test/kube-apiserver".into(),
                ips: vec![addr.ip()],
                validity: year,
                ..Default::default()
            },
        )?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.cert.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(server.key.as_bytes())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let ca_path = dir.join("discovery-ca.crt");
        std::fs::write(&ca_path, &ca.cert)?;
        let kubeconfig = dir.join("discovery-kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: own\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\n\
                 users:\n- name: connector\n  user:\n    token: {TOKEN}\ncontexts:\n- name: own\n  context: {{cluster: own, user: connector}}\ncurrent-context: own\n",
                ca_path.display()
            ),
        )?;

        let served = Arc::new(Served::default());
        let state = Arc::new(State {
            store: Mutex::new(Store {
                rv: 100,
                slices: BTreeMap::new(),
                history: Vec::new(),
                compacted: 100,
                unavailable: false,
            }),
            changes: broadcast::channel(64).0,
            served: served.clone(),
        });
        for s in slices {
            state.apply(s, false);
        }
        let listener = ns.run(move || crate::listen(addr))??;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, state2) = (stop.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                listener.set_nonblocking(true).expect("nonblocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, state) = (acceptor.clone(), state2.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let service = hyper::service::service_fn(move |req| {
                                let state = state.clone();
                                async move { Ok::<_, Infallible>(state.answer(req)) }
                            });
                            let io = hyper_util::rt::TokioIo::new(tls);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await;
                        });
                    }
                });
                while !stop2.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        });
        Ok(KubeApi { state, stop, thread: Some(thread), kubeconfig, ca_pem: ca.cert, served })
    }

    /// A service account directory as the kubelet mounts it in a pod
    /// (`token`, `ca.crt`, `namespace`), written into `dir`.
    pub fn service_account(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), TOKEN)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_pem)?;
        std::fs::write(dir.join("namespace"), "dataplane")?;
        Ok(())
    }

    /// Adds or replaces a slice (ADDED or MODIFIED to open watches).
    pub fn apply(&self, slice: EndpointSlice) {
        self.state.apply(slice, false);
    }

    /// Deletes a slice by name (DELETED to open watches).
    pub fn delete(&self, name: &str) {
        let mut st = lock(&self.state.store);
        if let Some(mut old) = st.slices.remove(name) {
            st.rv += 1;
            let rv = st.rv;
            old.metadata.resource_version = Some(rv.to_string());
            st.history.push((rv, WatchEvent::Deleted(old)));
        }
        drop(st);
        let _ = self.state.changes.send(());
    }

    /// Applies `slice` and compacts the history past it: open watches end
    /// and a watch from any earlier resourceVersion gets 410 Gone, so only
    /// a new list shows the change.
    pub fn apply_compacted(&self, slice: EndpointSlice) {
        self.state.apply(slice, true);
    }

    /// Cuts open watches and answers 503 to everything while unavailable.
    pub fn set_available(&self, available: bool) {
        lock(&self.state.store).unavailable = !available;
        let _ = self.state.changes.send(());
    }

    pub fn count(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl State {
    fn apply(&self, mut slice: EndpointSlice, compact: bool) {
        let mut st = lock(&self.store);
        st.rv += 1;
        let rv = st.rv;
        slice.metadata.resource_version = Some(rv.to_string());
        let name = slice.metadata.name.clone().unwrap_or_default();
        let event = match st.slices.insert(name, slice.clone()) {
            Some(_) => WatchEvent::Modified(slice),
            None => WatchEvent::Added(slice),
        };
        if compact {
            st.history.clear();
            st.compacted = rv;
        } else {
            st.history.push((rv, event));
        }
        drop(st);
        let _ = self.changes.send(());
    }

    fn answer(self: &Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let auth = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            self.served.unauthorized.fetch_add(1, Ordering::Relaxed);
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        if lock(&self.store).unavailable {
            self.served.unavailable.fetch_add(1, Ordering::Relaxed);
            return status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is shutting down",
            );
        }
        if req.method() != hyper::Method::GET || req.uri().path() != PATH {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decode(v)))
            .collect();
        let service = match query.get("labelSelector").map(|s| s.split_once('=')) {
            None => None,
            Some(Some((SERVICE_LABEL, v))) => Some(v.to_owned()),
            Some(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported label selector"),
        };
        let name = match query.get("fieldSelector").map(|s| s.split_once('=')) {
            None => None,
            Some(Some(("metadata.name", v))) => Some(v.to_owned()),
            Some(_) => return status(StatusCode::BAD_REQUEST, "BadRequest", "unsupported field selector"),
        };
        let selected = move |s: &EndpointSlice| {
            service.as_ref().is_none_or(|want| {
                s.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_LABEL)) == Some(want)
            }) && name.as_ref().is_none_or(|want| s.metadata.name.as_ref() == Some(want))
        };
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800);
            let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
            self.served.watches.fetch_add(1, Ordering::Relaxed);
            if bookmarks {
                self.served.bookmark_watches.fetch_add(1, Ordering::Relaxed);
            }
            return self.watch(from, Duration::from_secs(timeout), bookmarks, Box::new(selected));
        }
        self.served.lists.fetch_add(1, Ordering::Relaxed);
        let st = lock(&self.store);
        let list = List::<EndpointSlice> {
            items: st.slices.values().filter(|s| selected(s)).cloned().collect(),
            metadata: ListMeta { resource_version: Some(st.rv.to_string()), ..Default::default() },
        };
        json(StatusCode::OK, &list)
    }

    /// A watch from `from`: the events after it, then each change as it
    /// happens, bookmarks in between; 410 Gone once `from` is compacted.
    fn watch(
        self: &Arc<Self>,
        from: u64,
        timeout: Duration,
        bookmarks: bool,
        selected: Box<dyn Fn(&EndpointSlice) -> bool + Send>,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
        let state = self.clone();
        let mut changes = self.changes.subscribe();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut seen = from;
            let mut streaming = false;
            loop {
                // What to send now, and whether the stream ends after it.
                let (lines, then) = {
                    let st = lock(&state.store);
                    if st.unavailable {
                        (Vec::new(), Some(Err(std::io::Error::other("the API server went away"))))
                    } else if seen < st.compacted && !streaming {
                        state.served.gone.fetch_add(1, Ordering::Relaxed);
                        let gone = WatchEvent::<EndpointSlice>::ErrorStatus(gone_status(seen, st.compacted));
                        (vec![json_line(&gone)], Some(Ok(())))
                    } else if seen < st.compacted {
                        // History this watch had not sent is gone: the
                        // server ends the watch, and the client's next one
                        // (from where it was) gets the 410.
                        (Vec::new(), Some(Ok(())))
                    } else {
                        let lines = st
                            .history
                            .iter()
                            .filter(|(rv, e)| *rv > seen && event_object(e).is_some_and(&selected))
                            .map(|(_, e)| json_line(e))
                            .collect();
                        seen = st.rv;
                        (lines, None)
                    }
                };
                streaming = true;
                for l in lines {
                    if tx.send(Ok(Frame::data(l))).await.is_err() {
                        return;
                    }
                }
                match then {
                    // A cut connection: the client sees the body fail.
                    Some(Err(e)) => return drop(tx.send(Err(e)).await),
                    Some(Ok(())) => return,
                    None => {}
                }
                tokio::select! {
                    _ = changes.recv() => {}
                    () = tokio::time::sleep(BOOKMARK_EVERY), if bookmarks => {
                        state.served.bookmarks.fetch_add(1, Ordering::Relaxed);
                        if tx.send(Ok(Frame::data(json_line(&bookmark(seen))))).await.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
        let body = StreamBody::new(tokio_stream_from(rx));
        Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .expect("response")
    }
}

/// The Status of a watch from a compacted resourceVersion, as the API
/// server words it.
fn gone_status(from: u64, oldest: u64) -> Status {
    Status {
        code: Some(410),
        reason: Some("Expired".into()),
        status: Some("Failure".into()),
        message: Some(format!("too old resource version: {from} ({oldest})")),
        ..Default::default()
    }
}

/// A BOOKMARK as the API server sends it: the object is only apiVersion,
/// kind and the resourceVersion (k8s-openapi's own bookmark leaves out the
/// first two, which clients such as kube-rs require).
fn bookmark(rv: u64) -> serde_json::Value {
    serde_json::json!({
        "type": "BOOKMARK",
        "object": {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": { "resourceVersion": rv.to_string() }
        }
    })
}

fn event_object(e: &WatchEvent<EndpointSlice>) -> Option<&EndpointSlice> {
    match e {
        WatchEvent::Added(s) | WatchEvent::Modified(s) | WatchEvent::Deleted(s) => Some(s),
        _ => None,
    }
}

/// One newline-terminated JSON value, as watch streams carry them.
fn json_line(v: &impl serde::Serialize) -> Bytes {
    let mut v = serde_json::to_vec(v).expect("json");
    v.push(b'\n');
    Bytes::from(v)
}

fn json(code: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("json"));
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(bytes).map_err(|never: Infallible| match never {}).boxed())
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let s = Status {
        code: Some(i32::from(code.as_u16())),
        reason: Some(reason.into()),
        status: Some("Failure".into()),
        message: Some(message.into()),
        ..Default::default()
    };
    json(code, &s)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => match u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The receiver as a stream of frames.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
