//! A flow's stream with failover: opened on the best candidate connection
//! (see `candidates`), and if that one cannot be opened, or its peer does
//! not answer (the stream or connection fails before the status, or the
//! peer acknowledges nothing for a few round trips while another candidate
//! exists), opened again on the next, with the header and the bytes the
//! application sent meanwhile replayed. Up to [`ATTEMPTS`] connections are
//! tried, and replay only while those bytes fit [`REPLAY_LIMIT`]: past it
//! (or once the peer answered) the flow is committed to its connection.
//! A peer that answers, even with a refusal, is never asked again.

use std::{sync::Mutex, time::Duration};

use bytes::Bytes;
use dataplane_proto::stream::Status;
use quinn::{RecvStream, SendStream};
use tokio::{net::TcpStream, time::Instant};

use super::{
    Candidate, Tunnel,
    splice::{
        Moved, RESET_TCP_FAILED, SpliceError, finish, join_down_first, quic_to_tcp, read_status,
        tcp_to_quic_seen,
    },
};
use crate::traffic::Traffic;

/// Connections a flow is tried on at most.
pub const ATTEMPTS: usize = 3;
/// Application bytes kept for a replay (a TLS ClientHello, an HTTP request).
pub const REPLAY_LIMIT: usize = 64 << 10;
/// How often a waiting flow looks at whether its peer still acknowledges.
const PROBE_EVERY: Duration = Duration::from_millis(25);

/// Why a peer gave no status.
#[derive(Debug, PartialEq, Eq)]
pub enum Unanswered {
    /// The stream or its connection failed first.
    Lost(String),
    /// The peer acknowledged nothing for this long after the header went out.
    Silent(Duration),
    /// No status by the flow's deadline.
    Timeout,
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::Lost(e) => write!(f, "stream lost before the answer: {e}"),
            Unanswered::Silent(d) => write!(f, "peer acknowledged nothing for {d:?}"),
            Unanswered::Timeout => write!(f, "no answer in time"),
        }
    }
}

/// How long a peer may acknowledge nothing before a flow gives up on it:
/// three round trips and two ACK delays, at least 200 ms.
pub fn silence_limit(rtt: Duration) -> Duration {
    (rtt * 3 + Duration::from_millis(50)).max(Duration::from_millis(200))
}

/// Waits for the status on `recv` until `deadline`. With `alternatives`,
/// gives up on a connection that has received nothing since `sent_rx` for
/// [`silence_limit`]: a live peer acknowledges the header within a round
/// trip even while its dial is still under way.
pub async fn await_status(
    recv: &mut RecvStream,
    c: &Candidate,
    sent_rx: u64,
    alternatives: bool,
    deadline: Instant,
) -> Result<Status, Unanswered> {
    let sent = Instant::now();
    let limit = silence_limit(c.rtt());
    let status = read_status(recv);
    tokio::pin!(status);
    loop {
        tokio::select! {
            biased;
            s = &mut status => return s.map_err(Unanswered::Lost),
            () = tokio::time::sleep_until(deadline) => return Err(Unanswered::Timeout),
            () = tokio::time::sleep(PROBE_EVERY), if alternatives => {
                if c.received() == sent_rx && sent.elapsed() >= limit {
                    return Err(Unanswered::Silent(limit));
                }
            }
        }
    }
}

/// What the application sent before its flow was answered.
#[derive(Debug, Default)]
struct Replay {
    chunks: Vec<Bytes>,
    len: usize,
    /// More than [`REPLAY_LIMIT`]: no replay possible.
    overflow: bool,
    /// The application half-closed.
    finished: bool,
    /// Answered: nothing more is kept.
    answered: bool,
}

impl Replay {
    fn record(&mut self, chunk: &Bytes) {
        if self.answered || self.overflow {
            return;
        }
        self.len += chunk.len();
        if self.len > REPLAY_LIMIT {
            self.overflow = true;
            self.chunks = Vec::new();
        } else {
            self.chunks.push(chunk.clone());
        }
    }

    fn answered(&mut self) {
        self.answered = true;
        self.chunks = Vec::new();
    }
}

/// How one attempt ended.
enum Attempt {
    Unanswered(Unanswered),
    Answered(Status),
    Failed(SpliceError),
}

/// The result of a flow with failover.
pub struct Served {
    pub moved: Moved,
    pub result: Result<(), SpliceError>,
    /// Connections the flow was tried on (1: no failover was needed).
    pub attempts: usize,
    /// A stream was opened and its header written on some connection.
    pub opened: bool,
}

/// Carries the flow on `tcp` through the first of `candidates` that
/// answers: `header` opens each attempt's stream, the application's bytes
/// follow at once (kept for a replay until the answer), `on_ok` runs once
/// the answer is `ok`. The whole flow has `wait` for an answer; with `idle`
/// it ends after that long without a byte either way.
#[allow(clippy::too_many_arguments)]
pub async fn splice_failover(
    tcp: &mut TcpStream,
    tunnel: &Tunnel,
    candidates: &[Candidate],
    header: &[u8],
    open_within: Duration,
    wait: Duration,
    idle: Option<Duration>,
    on_ok: impl FnOnce(),
) -> Served {
    let moved = Traffic::default();
    let replay = Mutex::new(Replay::default());
    let deadline = Instant::now() + wait;
    let mut on_ok = Some(on_ok);
    let tries = candidates.len().min(ATTEMPTS);
    let mut last = String::from("no live tunnel connection");
    let mut attempts = 0;
    let mut opened = false;
    for (i, c) in candidates.iter().take(tries).enumerate() {
        if i > 0 && crate::lock(&replay).overflow {
            break;
        }
        attempts += 1;
        let (mut send, mut recv) = match tunnel.open_on(c, open_within).await {
            Ok(s) => s,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        if let Err(e) = write_opening(&mut send, header, &replay).await {
            let _ = send.reset(RESET_TCP_FAILED);
            c.suspect();
            last = e;
            continue;
        }
        opened = true;
        let sent_rx = c.received();
        let alternatives = i + 1 < tries;
        let outcome = {
            let (rd, mut wr) = tcp.split();
            let up = async {
                if crate::lock(&replay).finished {
                    return Ok(());
                }
                // What goes up is kept for a replay until the answer.
                let keep = |chunk: Option<&Bytes>| match chunk {
                    Some(c) => crate::lock(&replay).record(c),
                    None => crate::lock(&replay).finished = true,
                };
                tcp_to_quic_seen(rd, &mut send, &moved, keep).await.map_err(Attempt::Failed)
            };
            let down = async {
                match await_status(&mut recv, c, sent_rx, alternatives, deadline).await {
                    Ok(Status::Ok) => {
                        crate::lock(&replay).answered();
                        if let Some(f) = on_ok.take() {
                            f();
                        }
                    }
                    Ok(s) => return Err(Attempt::Answered(s)),
                    Err(u) => return Err(Attempt::Unanswered(u)),
                }
                quic_to_tcp(&mut recv, &mut wr, &moved).await.map_err(Attempt::Failed)
            };
            let both = join_down_first(up, down);
            tokio::select! {
                r = both => r,
                () = moved.silent_for(idle) => Err(Attempt::Failed(SpliceError::Idle(idle.unwrap_or_default()))),
            }
        };
        let result = match outcome {
            Ok(()) => Ok(()),
            Err(Attempt::Unanswered(u @ (Unanswered::Lost(_) | Unanswered::Silent(_)))) if i + 1 < tries => {
                let _ = send.reset(RESET_TCP_FAILED);
                let _ = recv.stop(RESET_TCP_FAILED);
                c.suspect();
                last = u.to_string();
                continue;
            }
            Err(Attempt::Unanswered(u)) => Err(SpliceError::Refused(u.to_string())),
            Err(Attempt::Answered(s)) => Err(SpliceError::Refused(s.as_str().to_owned())),
            Err(Attempt::Failed(e)) => Err(e),
        };
        let result = finish(result, tcp, &mut send, &mut recv);
        if result.is_ok() {
            // Held until the connector has every byte (a draining agent
            // closes its connections once its flows end).
            let _ = send.stopped().await;
        }
        return Served { moved: moved.totals(), result, attempts, opened };
    }
    let _ = crate::sockopt::reset_on_close(tcp);
    Served { moved: moved.totals(), result: Err(SpliceError::Refused(last)), attempts, opened }
}

/// An attempt's opening: the header, then whatever the application sent
/// before (and its half-close).
async fn write_opening(send: &mut SendStream, header: &[u8], replay: &Mutex<Replay>) -> Result<(), String> {
    send.write_all(header).await.map_err(|e| e.to_string())?;
    let (chunks, finished) = {
        let r = crate::lock(replay);
        (r.chunks.clone(), r.finished)
    };
    for chunk in chunks {
        send.write_chunk(chunk).await.map_err(|e| e.to_string())?;
    }
    if finished {
        send.finish().map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_first_bytes_and_gives_up_past_the_limit() {
        let mut r = Replay::default();
        r.record(&Bytes::from(vec![1u8; 1000]));
        assert_eq!((r.chunks.len(), r.overflow), (1, false));
        r.record(&Bytes::from(vec![2u8; REPLAY_LIMIT]));
        assert!(r.overflow && r.chunks.is_empty(), "past the limit nothing is kept, nor replayed");
        let mut r = Replay::default();
        r.record(&Bytes::from_static(b"hello"));
        r.answered();
        r.record(&Bytes::from_static(b"more"));
        assert!(r.chunks.is_empty() && !r.overflow, "nothing kept once answered");
    }

    #[test]
    fn the_silence_limit_follows_the_rtt_with_a_floor() {
        assert_eq!(silence_limit(Duration::from_millis(1)), Duration::from_millis(200));
        assert_eq!(silence_limit(Duration::from_millis(100)), Duration::from_millis(350));
    }
}
