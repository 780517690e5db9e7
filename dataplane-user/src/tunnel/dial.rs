//! Keeping dialled connections up: one loop per configured connection to a
//! peer, reconnecting with exponential backoff and jitter.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use quinn::ConnectionError;
use tracing::warn;

use super::{Tunnel, handshake, pool::PeerSlot};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A handshake the peer has not answered within this is started over: a
/// peer that was restarting gets a fresh Initial soon after it is back,
/// not whenever the abandoned attempt's doubling retransmits come round.
const ATTEMPT: Duration = Duration::from_secs(2);

impl Tunnel {
    /// Dials `slot`'s peer, cycling through `addrs` (starting at `index`, so
    /// a peer's connections spread over its addresses), until the tunnel
    /// closes or a reload retires the slot.
    pub(super) async fn dial_loop(
        self: Arc<Self>,
        slot: Arc<PeerSlot>,
        addrs: Vec<SocketAddr>,
        index: usize,
    ) {
        let mut stop = self.stop.subscribe();
        let mut backoff = BACKOFF_MIN;
        let mut attempt = index;
        loop {
            if *stop.borrow() || slot.retired.is_cancelled() {
                return;
            }
            // Read at every attempt: a rotated certificate is used by the
            // next dial.
            let Some(config) = self.client_config(&slot.name) else { return };
            let addr = addrs[attempt % addrs.len()];
            attempt += 1;
            // The SNI name is unused: the verifier goes by the URI SAN.
            let connecting = self.endpoint.connect_with(config, addr, "dataplane.peer");
            let attempt_once = async {
                let conn = match connecting {
                    Ok(c) => tokio::time::timeout(ATTEMPT, c).await.unwrap_or(Err(ConnectionError::TimedOut)),
                    Err(e) => {
                        warn!(peer = %slot.name, %addr, error = %e, "cannot dial");
                        Err(ConnectionError::LocallyClosed)
                    }
                }?;
                handshake::await_welcome(conn, self.welcome_timeout).await
            };
            // A reload that retires the slot ends the attempt too: its
            // connection would only be refused by `add`.
            let result = tokio::select! {
                r = attempt_once => r,
                () = slot.retired.cancelled() => return,
            };
            match result {
                Ok((conn, control)) => {
                    backoff = BACKOFF_MIN;
                    // The verifier checked it against the entry's pattern.
                    let identity = Arc::from(handshake::peer_identity(&conn).unwrap_or_default());
                    let control = super::Control::Dialed(control);
                    self.run_connection(slot.clone(), conn, identity, "dialed", control).await;
                }
                Err(_) if *stop.borrow() => return,
                Err(e) => {
                    let reason = handshake::failure_reason(&e);
                    warn!(peer = %slot.name, %addr, %reason, error = %e, "tunnel handshake failed");
                    self.metrics.failed(reason);
                }
            }
            // Exponential backoff with jitter (50-150%), so a fleet of agents
            // does not reconnect in lockstep after a connector restart.
            let delay = backoff.mul_f64(0.5 + jitter());
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
                () = slot.retired.cancelled() => return,
            }
        }
    }
}

/// A number in [0, 1) that differs between calls and processes; enough for
/// backoff jitter without a random number generator dependency.
fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Relaxed) ^ seed ^ u64::from(std::process::id());
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let v: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(v.windows(2).any(|w| w[0] != w[1]));
    }
}
