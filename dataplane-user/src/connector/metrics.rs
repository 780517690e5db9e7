//! The connector role's metrics: streams answered by status, destinations
//! refused by reason, refusals at a peer's caps, and (read at scrape time)
//! each peer's use of its budget and the caps. Known label values start at
//! zero; the peer label only takes configured names.

use std::sync::Arc;

use dataplane_proto::stream::Status;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet},
    metrics::{MetricType, counter::Counter, family::Family},
    registry::Registry,
};

use super::{budget::PeerBudgets, policy::Denial};

/// Statuses a peer's caps answer with.
pub(super) const CAP_STATUSES: [Status; 2] = [Status::OverStreamCap, Status::OverDialCap];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerReasonLabels {
    peer: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub reason: &'static str,
}

/// Metrics of the connector role.
#[derive(Debug)]
pub struct ConnectorMetrics {
    statuses: Family<StatusLabels, Counter>,
    pub(super) refusals: Family<ReasonLabels, Counter>,
    at_cap: Family<PeerReasonLabels, Counter>,
}

impl ConnectorMetrics {
    pub(super) fn register(registry: &mut Registry, budgets: &Arc<PeerBudgets>) -> ConnectorMetrics {
        let m = ConnectorMetrics {
            statuses: Family::default(),
            refusals: Family::default(),
            at_cap: Family::default(),
        };
        registry.register(
            "connector_streams",
            "Streams answered by the connector, by status",
            m.statuses.clone(),
        );
        registry.register(
            "connector_refusals",
            "Destinations the connector refused, by reason",
            m.refusals.clone(),
        );
        // Known label values start at zero, so rates and alerts have series
        // from the first scrape on.
        for status in Status::ALL {
            let _ = m.statuses.get_or_create_owned(&StatusLabels { status: status.as_str() });
        }
        for d in Denial::ALL {
            let _ = m.refusals.get_or_create_owned(&ReasonLabels { reason: d.as_str() });
        }
        registry.register(
            "connector_peer_refusals",
            "Streams refused because their peer was at a cap (limits.streams_per_peer, limits.dials_per_peer)",
            m.at_cap.clone(),
        );
        for peer in budgets.names() {
            m.known_peer(&peer);
        }
        registry.register_collector(Box::new(BudgetCollector(budgets.clone())));
        m
    }

    /// Drops `peer`'s series (a reload removed its entry).
    pub(super) fn forget_peer(&self, peer: &str) {
        for s in CAP_STATUSES {
            self.at_cap.remove(&PeerReasonLabels { peer: peer.to_owned(), reason: s.as_str() });
        }
    }

    /// Starts `peer`'s series at zero (a configured name: the label stays
    /// bounded by the config).
    pub(super) fn known_peer(&self, peer: &str) {
        for s in CAP_STATUSES {
            let _ = self
                .at_cap
                .get_or_create_owned(&PeerReasonLabels { peer: peer.to_owned(), reason: s.as_str() });
        }
    }

    /// Counts a stream `peer` had refused at one of its caps.
    pub(super) fn at_cap(&self, peer: &str, status: Status) {
        self.at_cap.get_or_create(&PeerReasonLabels { peer: peer.to_owned(), reason: status.as_str() }).inc();
    }

    /// Streams `peer` had refused with `status` (a cap status).
    pub fn refused_at_cap(&self, peer: &str, status: Status) -> u64 {
        self.at_cap
            .get(&PeerReasonLabels { peer: peer.to_owned(), reason: status.as_str() })
            .map_or(0, |c| c.get())
    }

    pub(super) fn count_status(&self, status: Status) {
        self.statuses.get_or_create(&StatusLabels { status: status.as_str() }).inc();
    }

    /// Streams answered with `status` (e.g. "ok", "denied").
    pub fn status(&self, status: &str) -> u64 {
        Status::ALL
            .iter()
            .find(|s| s.as_str() == status)
            .and_then(|s| self.statuses.get(&StatusLabels { status: s.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }

    /// Refusals for `reason` (e.g. "not_served").
    pub fn denials(&self, reason: &str) -> u64 {
        Denial::ALL
            .iter()
            .find(|d| d.as_str() == reason)
            .and_then(|d| self.refusals.get(&ReasonLabels { reason: d.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }
}

/// Each peer's use of its budget and the caps, read when scraped (nothing
/// on the stream path but the permits' own counters).
#[derive(Debug)]
struct BudgetCollector(Arc<PeerBudgets>);

impl Collector for BudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let caps = self.0.caps();
        let mut m = encoder.encode_descriptor(
            "connector_peer_limit",
            "The per-peer caps in force",
            None,
            MetricType::Gauge,
        )?;
        for (limit, v) in [("streams", caps.streams), ("dials", caps.dials)] {
            m.encode_family(&[("limit", limit)])?.encode_gauge(&(v as i64))?;
        }
        let mut m = encoder.encode_descriptor(
            "connector_peer_streams",
            "Streams the connector serves for each peer now",
            None,
            MetricType::Gauge,
        )?;
        let by_name = self.0.use_by_name();
        for (peer, (streams, _)) in &by_name {
            m.encode_family(&[("peer", &**peer)])?.encode_gauge(&(*streams as i64))?;
        }
        let mut m = encoder.encode_descriptor(
            "connector_peer_dials",
            "Dials in flight for each peer now",
            None,
            MetricType::Gauge,
        )?;
        for (peer, (_, dials)) in &by_name {
            m.encode_family(&[("peer", &**peer)])?.encode_gauge(&(*dials as i64))?;
        }
        Ok(())
    }
}
