//! The connector role's metrics: streams answered by status, destinations
//! refused by reason. Known label values start at zero.

use dataplane_proto::stream::Status;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::policy::Denial;

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
}

impl ConnectorMetrics {
    pub fn register(registry: &mut Registry) -> ConnectorMetrics {
        let m = ConnectorMetrics { statuses: Family::default(), refusals: Family::default() };
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
        for d in [Denial::NeverServed, Denial::NotServed, Denial::PortNotServed] {
            let _ = m.refusals.get_or_create_owned(&ReasonLabels { reason: d.as_str() });
        }
        m
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
        [Denial::NeverServed, Denial::NotServed, Denial::PortNotServed]
            .iter()
            .find(|d| d.as_str() == reason)
            .and_then(|d| self.refusals.get(&ReasonLabels { reason: d.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }
}
