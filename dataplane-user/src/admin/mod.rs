//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the
//! process and its event loop are alive), `/ready` (this agent can serve:
//! steering attached and every route with a live tunnel connection; 503 with
//! a JSON body naming what is missing otherwise) and `/status` (the JSON
//! behind `dataplane status`). HTTP only: it reads the agent through
//! [`AdminSource`]. The documents are in `model`; `client` reads them back.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, warn};

pub mod client;
pub mod model;

pub use model::{
    DiscoveryStatus, Missing, PeerStatus, PinnedStatus, Readiness, RefusedRoute, ReloadRefusal, ReloadStatus,
    RouteStatus, Status, SteeringStatus,
};

/// What the admin server reads: the agent implements it; the server knows
/// nothing else of the agent.
pub trait AdminSource: Send + Sync + 'static {
    /// The Prometheus text of every metric.
    fn metrics_text(&self) -> String;
    /// Whether the agent can serve, and if not, what is missing.
    fn readiness(&self) -> Readiness;
    /// The state `dataplane status` shows.
    fn status(&self) -> Status;
}

/// The event loop must have ticked this recently for `/healthz` to pass.
const HEARTBEAT_STALE: Duration = Duration::from_secs(5);
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
#[error("admin: binding {addr}: {source}")]
pub struct AdminError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the admin listener (so a bad address fails the start, naming it).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError { addr, source })
}

/// Connections served at once. Scrapes, probes and `dataplane status` need a
/// handful; the cap keeps a slowloris from spending the descriptors flows
/// need. Connections over it are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer (one request each: no keep-alive).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<dyn AdminSource>) {
    let heartbeat = Arc::new(AtomicU64::new(now_ms()));
    let beat = heartbeat.clone();
    tokio::spawn(async move {
        loop {
            beat.store(now_ms(), Relaxed);
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin connection over the cap; closed");
            continue;
        };
        let (agent, heartbeat) = (agent.clone(), heartbeat.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let (agent, heartbeat) = (agent.clone(), heartbeat.clone());
                async move { Ok::<_, Infallible>(route(&req, &agent, &heartbeat)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "admin connection ended"),
                Err(_) => debug!(%peer, "admin connection over its deadline; closed"),
            }
            drop(slot);
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn route(
    req: &Request<hyper::body::Incoming>,
    agent: &Arc<dyn AdminSource>,
    heartbeat: &AtomicU64,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            agent.metrics_text(),
        ),
        "/healthz" => {
            let age = Duration::from_millis(now_ms().saturating_sub(heartbeat.load(Relaxed)));
            if age < HEARTBEAT_STALE {
                text(StatusCode::OK, "ok\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, &format!("event loop stalled for {age:?}\n"))
            }
        }
        "/ready" => {
            let r = agent.readiness();
            let code = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(code, &r)
        }
        "/status" => json(StatusCode::OK, &agent.status()),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics /healthz /ready /status\n"),
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    reply(code, "text/plain; charset=utf-8", body.to_owned())
}

fn json(code: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    reply(code, "application/json", body + "\n")
}
