//! A hostile but authenticated peer, built on the project's own TLS and
//! stream protocol: a valid certificate for a configured identity, used to
//! push a connector past every per-peer cap. It prints what it was answered
//! as one JSON object (`tests::evil::Report`).
//!
//! `evil-peer --netns PATH --connect ADDR --ca F --cert F --key F --expect ID
//!            [--connections N] [--stalled N] [--streams N --dst ADDR]`
//!
//! 1. `--connections`: that many QUIC connections at once; counts how many
//!    were welcomed and how many closed at the connection cap. The welcomed
//!    ones carry the rest.
//! 2. `--stalled`: streams that send one byte of a header and then nothing.
//! 3. `--streams`: streams with a whole header for `--dst`; each waits for
//!    its status and ends.
//! 4. `--control-garbage`: a control stream that declares a frame longer
//!    than any allowed; reports how the acceptor closed the connection.
//!
//! Every phase is bounded: at most 4,096 streams in flight, and every wait
//! has a timeout.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use dataplane::tls::TlsMaterial;
use dataplane_proto::stream::{self, Decoded, MAX_REQUEST, Metadata, Request};
use tests::evil::{Phase, Report};
use tokio::sync::Semaphore;

/// Streams of this process in flight at once.
const IN_FLIGHT: usize = 4096;
/// How long any one answer may take before it counts as `no_answer`.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

struct Args {
    netns: Option<PathBuf>,
    connect: SocketAddr,
    tls: dataplane::config::TlsFiles,
    expect: String,
    connections: usize,
    stalled: usize,
    streams: usize,
    dst: Option<SocketAddr>,
    control_garbage: bool,
}

fn parse() -> Result<Args> {
    let mut a = std::env::args().skip(1);
    let (mut netns, mut connect, mut ca, mut cert, mut key, mut expect) =
        (None, None, None, None, None, None);
    let (mut connections, mut stalled, mut streams, mut dst) = (1, 0, 0, None);
    let mut control_garbage = false;
    while let Some(flag) = a.next() {
        let mut value = || a.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--control-garbage" => control_garbage = true,
            "--netns" => netns = Some(PathBuf::from(value()?)),
            "--connect" => connect = Some(value()?.parse()?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--expect" => expect = Some(value()?),
            "--connections" => connections = value()?.parse()?,
            "--stalled" => stalled = value()?.parse()?,
            "--streams" => streams = value()?.parse()?,
            "--dst" => dst = Some(value()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        netns,
        connect: connect.context("--connect is required")?,
        tls: dataplane::config::TlsFiles {
            ca: ca.context("--ca is required")?,
            cert: cert.context("--cert is required")?,
            key: key.context("--key is required")?,
        },
        expect: expect.context("--expect is required")?,
        connections: connections.max(1),
        stalled,
        streams,
        dst,
        control_garbage,
    })
}

fn main() -> Result<()> {
    let args = parse()?;
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", ns.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = rt.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(args: Args) -> Result<Report> {
    // From PEM, not `TlsMaterial::load`: an attacker presents whatever
    // certificate it has, valid now or not.
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let tls = TlsMaterial::from_pem(&read(&args.tls.ca)?, &read(&args.tls.cert)?, &read(&args.tls.key)?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
        tls.client_config(&dataplane::identity::IdentityPattern::parse(&args.expect)?)?,
    )?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    config.transport_config(Arc::new(transport));
    let bind: SocketAddr = if args.connect.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    let mut report = Report::default();

    // 1. Connections, all at once.
    let attempts = (0..args.connections).map(|_| {
        let endpoint = endpoint.clone();
        let to = args.connect;
        tokio::spawn(async move { welcomed(&endpoint, to).await })
    });
    let mut live = Vec::new();
    for a in attempts.collect::<Vec<_>>() {
        match a.await? {
            Ok(c) => live.push(c),
            Err(reason) => *report.connections_closed.entry(reason).or_default() += 1,
        }
    }
    report.connections_welcomed = live.len();
    report.acceptor_not_after = live.first().and_then(acceptor_not_after);
    if live.is_empty() {
        return Ok(report);
    }

    // 2. Stalled streams: one byte of a header, then silence.
    report.stalled = phase(&live, args.stalled, |mut send, mut recv| async move {
        send.write_all(&[stream::VERSION]).await.map_err(|e| format!("write: {e}"))?;
        let answer = status(&mut recv).await;
        drop(send);
        answer
    })
    .await;

    // 3. Whole requests for `dst`, each waiting for its status.
    if let Some(dst) = args.dst {
        let mut header = [0u8; MAX_REQUEST];
        let n = Request { dst, flow_id: 1, metadata: Metadata::default() }
            .encode(&mut header)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let header: Arc<[u8]> = header[..n].into();
        report.streams = phase(&live, args.streams, move |mut send, mut recv| {
            let header = header.clone();
            async move {
                send.write_all(&header).await.map_err(|e| format!("write: {e}"))?;
                let answer = status(&mut recv).await;
                let _ = send.finish();
                answer
            }
        })
        .await;
    }
    // 4. A control stream that breaks the protocol at its first frame.
    if args.control_garbage {
        let conn = &live[0];
        let mut uni = conn.open_uni().await?;
        uni.write_all(&[0xff, 0xff, 0xff, 0xff]).await?;
        let closed = tokio::time::timeout(ANSWER_WITHIN, conn.closed()).await;
        report.control_closed = Some(closed.map_or_else(|_| "still_open".to_owned(), |e| close_reason(&e)));
    }
    for c in &live {
        c.close(0u32.into(), b"done");
    }
    endpoint.wait_idle().await;
    Ok(report)
}

/// When the acceptor's certificate on `conn` stops being valid.
fn acceptor_not_after(conn: &quinn::Connection) -> Option<u64> {
    let certs = conn.peer_identity()?.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    let (_, not_after) = dataplane::tls::validity(certs.first()?)?;
    not_after.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// Connects and waits for the acceptor's welcome (or its refusal).
async fn welcomed(endpoint: &quinn::Endpoint, to: SocketAddr) -> Result<quinn::Connection, String> {
    let conn = endpoint
        .connect(to, "dataplane.peer")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| close_reason(&e))?;
    let welcome = async {
        let mut uni = conn.accept_uni().await?;
        let mut b = [0u8; 1];
        uni.read_exact(&mut b).await.map_err(|_| quinn::ConnectionError::Reset)?;
        Ok::<_, quinn::ConnectionError>(())
    };
    match tokio::time::timeout(ANSWER_WITHIN, welcome).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err(close_reason(&conn.close_reason().unwrap_or(e))),
        Err(_) => Err("no_welcome".to_owned()),
    }
}

fn close_reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(a) => format!("application_{}", a.error_code),
        other => dataplane::tunnel::failure_reason(other).to_owned(),
    }
}

/// The connector's status for a stream, as its label.
async fn status(recv: &mut quinn::RecvStream) -> Result<String, String> {
    let mut b = [0u8; stream::RESPONSE_LEN];
    match tokio::time::timeout(ANSWER_WITHIN, recv.read_exact(&mut b)).await {
        Err(_) => Err("no_answer".to_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Ok(Ok(())) => match stream::decode_response(&b) {
            Ok(Decoded::Complete(r, _)) => Ok(r.status.as_str().to_owned()),
            other => Err(format!("bad response {other:?}")),
        },
    }
}

/// Opens `n` streams round-robin over `conns`, at most [`IN_FLIGHT`] at a
/// time, runs `each` on every one, and tallies what they were answered.
async fn phase<F, Fut>(conns: &[quinn::Connection], n: usize, each: F) -> Phase
where
    F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<String, String>> + Send,
{
    let start = Instant::now();
    let tally = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let Ok(permit) = gate.clone().acquire_owned().await else { break };
        let (conn, each, tally) = (conns[i % conns.len()].clone(), each.clone(), tally.clone());
        tasks.spawn(async move {
            let answer = match tokio::time::timeout(ANSWER_WITHIN, conn.open_bi()).await {
                Err(_) => Err("no_stream_credit".to_owned()),
                Ok(Err(e)) => Err(format!("open: {e}")),
                Ok(Ok((send, recv))) => each(send, recv).await,
            };
            let key = answer.unwrap_or_else(|e| e.split(':').next().unwrap_or("error").to_owned());
            *tally.lock().expect("tally").entry(key).or_default() += 1;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let answers = std::mem::take(&mut *tally.lock().expect("tally"));
    Phase { opened: n, answers, secs: start.elapsed().as_secs_f64() }
}
