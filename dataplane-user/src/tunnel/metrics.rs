//! The tunnel's metrics: what it counts (handshake failures by reason,
//! connections and streams opened) and what it reads from quinn at scrape
//! time (connection states, RTT, congestion window, losses, bytes).

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::peers::PeerSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PeerDirectionLabels {
    pub peer: String,
    /// `dialed` or `accepted`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct BufferLabels {
    /// `receive` or `send`.
    pub direction: &'static str,
}

/// Metrics of the tunnel; per-connection QUIC statistics are read at scrape
/// time by [`TunnelCollector`].
#[derive(Debug)]
pub struct TunnelMetrics {
    handshake_failures: Family<ReasonLabels, Counter>,
    handshakes_refused: Family<ReasonLabels, Counter>,
    pub(super) handshakes_in_flight: Gauge,
    pub(super) connections_opened: Family<PeerDirectionLabels, Counter>,
    pub(super) streams_opened: Family<PeerLabels, Counter>,
    pub(super) udp_buffer: Family<BufferLabels, Gauge>,
    pub(super) control_errors: Counter,
}

impl TunnelMetrics {
    pub(super) fn register(registry: &mut Registry) -> TunnelMetrics {
        let m = TunnelMetrics {
            handshake_failures: Family::default(),
            handshakes_refused: Family::default(),
            handshakes_in_flight: Gauge::default(),
            connections_opened: Family::default(),
            streams_opened: Family::default(),
            udp_buffer: Family::default(),
            control_errors: Counter::default(),
        };
        registry.register(
            "tunnel_control_errors",
            "Tunnel connections closed because the peer broke the control protocol",
            m.control_errors.clone(),
        );
        registry.register(
            "tunnel_handshake_failures",
            "Failed tunnel handshakes in either direction, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "tunnel_handshakes_refused",
            "Connection attempts not given a handshake, by reason (retry: asked to prove its address first; \
             busy: too many handshakes in flight; per_source: too many from its address)",
            m.handshakes_refused.clone(),
        );
        for reason in ["retry", "busy", "per_source"] {
            let _ = m.handshakes_refused.get_or_create_owned(&ReasonLabels { reason: reason.to_owned() });
        }
        registry.register(
            "tunnel_handshakes_in_flight",
            "Handshakes of accepted connection attempts not finished yet",
            m.handshakes_in_flight.clone(),
        );
        registry.register(
            "tunnel_connections_opened",
            "Tunnel connections established, by peer and direction",
            m.connections_opened.clone(),
        );
        registry.register(
            "tunnel_streams_opened",
            "Flow streams this agent opened, by peer",
            m.streams_opened.clone(),
        );
        // The reasons operators alert on start at zero, so the series exist
        // from the first scrape on (other reasons appear when they happen).
        for reason in [
            "unknown_ca",
            "bad_certificate",
            "peer_unknown_ca",
            "peer_bad_certificate",
            "unknown_identity",
            "timeout",
        ] {
            let _ = m.handshake_failures.get_or_create_owned(&ReasonLabels { reason: reason.to_owned() });
        }
        registry.register_with_unit(
            "tunnel_udp_socket_buffer",
            "UDP socket buffer size the kernel granted",
            Unit::Bytes,
            m.udp_buffer.clone(),
        );
        m
    }

    /// Counts a failed handshake; `reason` is one of
    /// [`super::handshake::HANDSHAKE_REASONS`].
    pub(super) fn failed(&self, reason: &'static str) {
        self.handshake_failures.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    pub(super) fn refused(&self, reason: &'static str) {
        self.handshakes_refused.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Connection attempts refused for `reason` (`retry`, `busy`, `per_source`).
    pub fn handshakes_refused(&self, reason: &str) -> u64 {
        self.handshakes_refused.get(&ReasonLabels { reason: reason.to_owned() }).map_or(0, |c| c.get())
    }

    /// Handshake failures counted for `reason`.
    pub fn handshake_failures(&self, reason: &str) -> u64 {
        self.handshake_failures.get(&ReasonLabels { reason: reason.to_owned() }).map_or(0, |c| c.get())
    }

    /// Connections established with `peer`, both directions.
    pub fn connections_opened(&self, peer: &str) -> u64 {
        ["dialed", "accepted"]
            .iter()
            .filter_map(|d| {
                self.connections_opened
                    .get(&PeerDirectionLabels { peer: peer.to_owned(), direction: d })
                    .map(|c| c.get())
            })
            .sum()
    }

    /// Drops `peer`'s series (a reload removed its entry), so renamed
    /// entries do not pile up.
    pub(super) fn forget_peer(&self, peer: &str) {
        for direction in ["accepted", "dialed"] {
            self.connections_opened.remove(&PeerDirectionLabels { peer: peer.to_owned(), direction });
        }
        self.streams_opened.remove(&PeerLabels { peer: peer.to_owned() });
    }

    /// Streams this agent opened to `peer`.
    pub fn streams_opened(&self, peer: &str) -> u64 {
        self.streams_opened.get(&PeerLabels { peer: peer.to_owned() }).map_or(0, |c| c.get())
    }
}

/// Reads every peer's live connections at scrape time: connection states,
/// RTT, congestion window, lost packets and bytes on the wire (quinn's stats).
#[derive(Debug)]
pub(super) struct TunnelCollector {
    pub peers: Arc<std::sync::Mutex<Arc<PeerSet>>>,
}

impl Collector for TunnelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        struct Row {
            peer: Arc<str>,
            up: u64,
            down: u64,
            rtt: Option<f64>,
            cwnd: u64,
            lost: u64,
            sent: u64,
            received: u64,
            datagrams_sent: u64,
            datagrams_received: u64,
        }
        let set = crate::lock(&self.peers).clone();
        let rows: Vec<Row> = set
            .by_name
            .values()
            .map(|p| {
                let live = p.live();
                let stats: Vec<quinn::ConnectionStats> = live.iter().map(|c| c.stats()).collect();
                let r = crate::lock(&p.closed);
                Row {
                    peer: p.name.clone(),
                    up: live.len() as u64,
                    down: u64::from(p.spec.dialers).saturating_sub(live.len() as u64),
                    rtt: live.iter().map(|c| c.rtt().as_secs_f64()).reduce(f64::min),
                    cwnd: stats.iter().map(|s| s.path.cwnd).sum(),
                    lost: r.lost_packets + stats.iter().map(|s| s.path.lost_packets).sum::<u64>(),
                    sent: r.sent + stats.iter().map(|s| s.udp_tx.bytes).sum::<u64>(),
                    received: r.received + stats.iter().map(|s| s.udp_rx.bytes).sum::<u64>(),
                    datagrams_sent: r.datagrams_sent + stats.iter().map(|s| s.udp_tx.datagrams).sum::<u64>(),
                    datagrams_received: r.datagrams_received
                        + stats.iter().map(|s| s.udp_rx.datagrams).sum::<u64>(),
                }
            })
            .collect();
        let mut m = encoder.encode_descriptor(
            "tunnel_connections",
            "Tunnel connections by peer and state (down: dialled connections not up)",
            None,
            MetricType::Gauge,
        )?;
        for r in &rows {
            for (state, n) in [("up", r.up), ("down", r.down)] {
                m.encode_family(&[("peer", &*r.peer), ("state", state)])?.encode_gauge(&(n as i64))?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_rtt",
            "Smoothed RTT of the best live connection to the peer",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for r in &rows {
            if let Some(rtt) = r.rtt {
                m.encode_family(&[("peer", &*r.peer)])?.encode_gauge(&rtt)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_congestion_window",
            "Congestion windows of the live connections to the peer, summed",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for r in &rows {
            m.encode_family(&[("peer", &*r.peer)])?.encode_gauge(&(r.cwnd as i64))?;
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_lost_packets",
            "Packets declared lost on connections to the peer",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            m.encode_family(&[("peer", &*r.peer)])?.encode_counter::<NoLabelSet, _, u64>(&r.lost, None)?;
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_udp",
            "UDP payload bytes on connections to the peer, by direction",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for r in &rows {
            for (direction, n) in [("sent", r.sent), ("received", r.received)] {
                m.encode_family(&[("peer", &*r.peer), ("direction", direction)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "tunnel_udp_datagrams",
            "UDP datagrams on connections to the peer, by direction (an idle connection's are its keep-alives and their acknowledgements)",
            None,
            MetricType::Counter,
        )?;
        for r in &rows {
            for (direction, n) in [("sent", r.datagrams_sent), ("received", r.datagrams_received)] {
                m.encode_family(&[("peer", &*r.peer), ("direction", direction)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        Ok(())
    }
}
