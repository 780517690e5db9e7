//! The relay's metrics: streams by route and result, its own refusals by
//! reason, and how many routes its connectors serve. Route labels are the
//! learned routes (bounded by `peers[].learn` and the advertisement limits)
//! or `none`; results are the stream statuses, a fixed set.

use dataplane_proto::stream::Status;
use ipnet::IpNet;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::Refusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteResultLabels {
    route: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug)]
pub struct RelayMetrics {
    streams: Family<RouteResultLabels, Counter>,
    refusals: Family<ReasonLabels, Counter>,
    pub(super) routes: Gauge,
    failovers: Counter,
}

impl RelayMetrics {
    pub(super) fn register(registry: &mut Registry) -> RelayMetrics {
        let m = RelayMetrics {
            streams: Family::default(),
            refusals: Family::default(),
            routes: Gauge::default(),
            failovers: Counter::default(),
        };
        registry.register(
            "relay_streams",
            "Client streams the relay answered or forwarded, by route and by the status the client got",
            m.streams.clone(),
        );
        registry.register(
            "relay_refusals",
            "Streams the relay answered itself, by reason (not_allowed, no_connector, bad_header)",
            m.refusals.clone(),
        );
        for r in Refusal::ALL {
            let _ = m.refusals.get_or_create_owned(&ReasonLabels { reason: r.as_str() });
        }
        registry.register("relay_routes", "Routes the relay's connectors serve now", m.routes.clone());
        registry.register(
            "relay_failovers",
            "Times a stream was forwarded again to another connector connection (the first gave no answer)",
            m.failovers.clone(),
        );
        m
    }

    pub(super) fn failed_over(&self, n: usize) {
        self.failovers.inc_by(n as u64);
    }

    pub(super) fn relayed(&self, route: Option<IpNet>, status: &'static str) {
        let route = route.map_or_else(|| "none".to_owned(), |n| n.to_string());
        self.streams.get_or_create(&RouteResultLabels { route, result: status }).inc();
    }

    pub(super) fn refused(&self, why: Refusal) {
        self.refusals.get_or_create(&ReasonLabels { reason: why.as_str() }).inc();
    }

    /// Streams answered with `status` on `route` (`none`: outside every route).
    pub fn streams(&self, route: &str, status: Status) -> u64 {
        let labels = RouteResultLabels { route: route.to_owned(), result: status.as_str() };
        self.streams.get(&labels).map_or(0, |c| c.get())
    }

    /// Streams the relay refused itself for `reason`.
    pub fn refusals(&self, reason: &str) -> u64 {
        Refusal::ALL
            .iter()
            .find(|r| r.as_str() == reason)
            .and_then(|r| self.refusals.get(&ReasonLabels { reason: r.as_str() }).map(|c| c.get()))
            .unwrap_or(0)
    }
}
