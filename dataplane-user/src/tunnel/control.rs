//! Each connection's control stream, both ways: this agent's hello, what
//! its stream handler advertises to the peer (again whenever that changes)
//! and its draining notice out; the peer's hello, advertisements and
//! draining notice in, kept on the connection for routing to read. The
//! frames are `dataplane_proto::control`'s.
//!
//! The acceptor's control stream is the one its welcome came on (so the
//! dialer needs no second stream credit before it can hear routes); the
//! dialer opens its own once welcomed. A peer that finishes its stream
//! after the welcome (a build from before the control protocol) simply
//! advertises nothing.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use dataplane_proto::control::{self, ControlError, Decoded, Frame, RouteSpec};
use ipnet::IpNet;
use quinn::{RecvStream, SendStream};
use tracing::{debug, info, warn};

use super::{PeerId, Tunnel, handshake};

/// One destination a peer serves: a network and the ports in it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Advert {
    pub net: IpNet,
    pub ports: Vec<u16>,
}

impl Advert {
    pub fn covers(&self, dst: SocketAddr) -> bool {
        self.net.contains(&dst.ip().to_canonical()) && self.ports.contains(&dst.port())
    }
}

/// What the peer said on its control stream, per connection.
#[derive(Debug, Default)]
pub(super) struct ConnState {
    /// The peer takes no new streams on this connection.
    pub draining: AtomicBool,
    /// The peer's latest advertisement (empty until one arrives).
    pub advertised: Mutex<Arc<[Advert]>>,
    /// The routes of the advertisement the caller accepted
    /// ([`Tunnel::trust_advertisements`]): streams go to this connection
    /// by these only. A changed advertisement has none until looked at again.
    pub trusted: Mutex<Arc<[Advert]>>,
    /// Suspected dead at this received-datagram count plus one (0: not
    /// suspected): cleared by the next datagram from the peer.
    pub suspect_at: std::sync::atomic::AtomicU64,
    /// The exact identity an accepted connection was admitted for (None:
    /// dialled, so bound to its entry rather than matched against them).
    pub accepted_from: Option<Arc<str>>,
}

impl ConnState {
    pub fn covers(&self, dst: SocketAddr) -> bool {
        crate::lock(&self.trusted).iter().any(|a| a.covers(dst))
    }
}

/// Why a peer's control stream was given up on.
#[derive(Debug, thiserror::Error)]
enum ControlFailure {
    #[error("malformed control frame: {0}")]
    Malformed(ControlError),
    #[error("the first control frame was not a hello")]
    NoHello,
    #[error("no common control protocol version (peer speaks {0}..{1}, this agent {v}..{v})", v = control::VERSION)]
    Version(u8, u8),
    #[error("advertisements changed more than {MAX_CHANGES} times in {CHANGES_WINDOW:?}")]
    TooOften,
}

/// Changed advertisements a connection may send per [`CHANGES_WINDOW`]:
/// each makes every learner resync its routes (and a client its kernel
/// tries); a reload or a replica coming and going changes a few.
const MAX_CHANGES: u32 = 20;
const CHANGES_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
/// The read buffer's capacity kept between frames (a full advertisement
/// grows it to about 150 KiB once).
const KEEP_BUFFER: usize = 64 << 10;

/// The control protocol versions this build speaks.
const VERSIONS: (u8, u8) = (control::VERSION, control::VERSION);

impl Tunnel {
    /// Writes this agent's side of a connection's control stream until the
    /// connection closes: hello, then the advertisement for `peer` whenever
    /// it changes ([`Tunnel::readvertise`]), then, once, draining.
    pub(super) async fn write_control(&self, mut send: SendStream, peer: &PeerId) {
        let mut readvertise = self.readvertise.subscribe();
        let mut draining = self.draining.subscribe();
        let mut buf = vec![0u8; 16];
        let Ok(n) = control::encode_hello(VERSIONS.0, VERSIONS.1, &mut buf) else { return };
        if send.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let mut last: Option<Vec<Advert>> = None;
        let mut drain_sent = false;
        loop {
            let routes = self.handler.as_ref().map(|h| h.advertised_to(peer)).unwrap_or_default();
            if last.as_ref() != Some(&routes) {
                match encode_advertisement(&routes, &mut buf) {
                    Ok(n) => {
                        if send.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        debug!(peer = %peer.name, routes = routes.len(), "routes advertised");
                    }
                    Err(e) => {
                        warn!(peer = %peer.name, error = %e, "cannot advertise routes; the peer keeps the last advertisement")
                    }
                }
                last = Some(routes);
            }
            if *draining.borrow_and_update() && !drain_sent {
                let Ok(n) = control::encode_draining(&mut buf) else { return };
                if send.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                drain_sent = true;
            }
            tokio::select! {
                r = readvertise.changed() => if r.is_err() { return },
                r = draining.changed() => if r.is_err() { return },
                _ = send.stopped() => return,
            }
        }
    }

    /// Reads the peer's side of a connection's control stream into `state`
    /// until the stream ends; a malformed one closes the connection.
    pub(super) async fn read_control(
        &self,
        conn: &quinn::Connection,
        mut recv: RecvStream,
        peer: &PeerId,
        state: &ConnState,
        learns: bool,
    ) {
        match self.read_frames(&mut recv, peer, state, learns).await {
            Ok(()) => {}
            Err(e) => {
                if let Some(suppressed) = self.handshake_logs.allow(std::time::Instant::now()) {
                    warn!(peer = %peer.name, identity = %peer.identity, error = %e, suppressed, "peer broke the control protocol; closing the connection");
                }
                self.metrics.control_errors.inc();
                conn.close(handshake::CLOSE_CONTROL, b"control protocol error");
            }
        }
    }

    /// Only a peer this agent `learns` from has its advertisements kept;
    /// anyone else's are read and dropped (a pattern peer's could otherwise
    /// make it hold 1,024 routes per connection for nothing).
    async fn read_frames(
        &self,
        recv: &mut RecvStream,
        peer: &PeerId,
        state: &ConnState,
        learns: bool,
    ) -> Result<(), ControlFailure> {
        let mut buf: Vec<u8> = Vec::new();
        let mut hello = false;
        let mut changes = (std::time::Instant::now(), 0u32);
        loop {
            let used = match control::decode_frame(&buf).map_err(ControlFailure::Malformed)? {
                Decoded::Incomplete(need) => {
                    // Bounded: decode_frame refuses a length over MAX_FRAME.
                    let start = buf.len();
                    buf.resize(need.max(start + 1).min(start + (64 << 10)), 0);
                    match recv.read(&mut buf[start..]).await {
                        Ok(Some(n)) => buf.truncate(start + n),
                        // Finished (a build without the control protocol
                        // ends it after the welcome) or the connection went.
                        Ok(None) | Err(_) => return Ok(()),
                    }
                    continue;
                }
                Decoded::Complete(frame, used) => {
                    match frame {
                        Frame::Hello { min, max } if !hello => {
                            control::negotiate(VERSIONS, (min, max))
                                .ok_or(ControlFailure::Version(min, max))?;
                            hello = true;
                        }
                        _ if !hello => return Err(ControlFailure::NoHello),
                        Frame::Hello { .. } | Frame::Unknown(_) => {}
                        Frame::Advertise(_) if !learns => {}
                        Frame::Advertise(ad) => {
                            let routes = merge(ad.iter().map(|r| Advert {
                                // Checked by the decoder: the prefix fits the family.
                                net: IpNet::new(r.addr, r.prefix).unwrap_or_else(|_| IpNet::from(r.addr)),
                                ports: r.ports.iter().collect(),
                            }));
                            let mut held = crate::lock(&state.advertised);
                            if **held != *routes {
                                if changes.0.elapsed() > CHANGES_WINDOW {
                                    changes = (std::time::Instant::now(), 0);
                                }
                                changes.1 += 1;
                                if changes.1 > MAX_CHANGES {
                                    return Err(ControlFailure::TooOften);
                                }
                                // What stays advertised stays trusted until
                                // the next sync judges the rest.
                                let mut trusted = crate::lock(&state.trusted);
                                let kept: Vec<Advert> =
                                    trusted.iter().filter(|a| routes.contains(a)).cloned().collect();
                                *trusted = Arc::from(kept);
                                drop(trusted);
                                info!(peer = %peer.name, identity = %peer.identity, routes = routes.len(), "peer advertised routes");
                                *held = routes.into();
                                drop(held);
                                self.liveness.send_modify(|n| *n += 1);
                            }
                        }
                        Frame::Draining => {
                            if !state.draining.swap(true, Relaxed) {
                                info!(peer = %peer.name, identity = %peer.identity, "peer is draining; no new streams go to it");
                                self.liveness.send_modify(|n| *n += 1);
                            }
                        }
                    }
                    used
                }
            };
            buf.drain(..used);
            if buf.capacity() > KEEP_BUFFER && buf.len() <= KEEP_BUFFER {
                buf.shrink_to(KEEP_BUFFER);
            }
        }
    }
}

/// One entry per network, ports merged and sorted.
fn merge(routes: impl Iterator<Item = Advert>) -> Vec<Advert> {
    let mut by_net: std::collections::BTreeMap<IpNet, Vec<u16>> = std::collections::BTreeMap::new();
    for r in routes {
        by_net.entry(r.net).or_default().extend(r.ports);
    }
    by_net
        .into_iter()
        .map(|(net, mut ports)| {
            ports.sort_unstable();
            ports.dedup();
            Advert { net, ports }
        })
        .collect()
}

/// An advertisement of `routes` into `buf` (grown to fit); a route with
/// more ports than a frame entry holds is split over several entries.
fn encode_advertisement(routes: &[Advert], buf: &mut Vec<u8>) -> Result<usize, ControlError> {
    let specs: Vec<RouteSpec<'_>> = routes
        .iter()
        .flat_map(|r| {
            r.ports.chunks(control::MAX_PORTS).map(|ports| RouteSpec {
                addr: r.net.network(),
                prefix: r.net.prefix_len(),
                ports,
            })
        })
        .collect();
    buf.resize(control::advertisement_len(&specs).max(buf.len()), 0);
    control::encode_advertisement(&specs, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advert(net: &str, ports: &[u16]) -> Advert {
        Advert { net: net.parse().expect("net"), ports: ports.to_vec() }
    }

    #[test]
    fn advertisements_split_long_port_lists_and_merge_back() {
        let ports: Vec<u16> = (1..=150).collect();
        let routes = vec![advert("198.51.100.0/24", &ports), advert("2001:db8::/64", &[6443])];
        let mut buf = Vec::new();
        let n = encode_advertisement(&routes, &mut buf).expect("encodes");
        let Ok(Decoded::Complete(Frame::Advertise(ad), used)) = control::decode_frame(&buf[..n]) else {
            panic!("decodes")
        };
        assert_eq!((ad.len(), used), (4, n), "150 ports in three entries, and the IPv6 route");
        let back = merge(ad.iter().map(|r| Advert {
            net: IpNet::new(r.addr, r.prefix).expect("net"),
            ports: r.ports.iter().collect(),
        }));
        assert_eq!(back, routes);
    }

    #[test]
    fn an_advert_covers_its_network_on_its_ports_only() {
        let a = advert("198.51.100.0/24", &[6443]);
        assert!(a.covers("198.51.100.101:6443".parse().expect("addr")));
        assert!(a.covers("[::ffff:198.51.100.101]:6443".parse().expect("addr")), "any spelling");
        assert!(!a.covers("198.51.100.101:443".parse().expect("addr")));
        assert!(!a.covers("198.51.101.1:6443".parse().expect("addr")));
    }
}
