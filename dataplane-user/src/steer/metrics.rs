//! Flow metrics of the steering side: flows opened and closed by route and
//! result, active flows, bytes by direction, and flow setup latency (accept
//! to the upstream's answer). Totals are kept alongside for `dataplane status`.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// How a flow ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FlowResult {
    /// Ran to the end (both directions finished).
    completed,
    /// Carried data, then one side failed or reset.
    failed,
    /// No original destination was recorded for the peer.
    unrecovered,
    /// The route was removed between connect and accept.
    route_gone,
    /// The kernel's record named a route that does not contain the recorded
    /// destination: refused, never dialled (not expected to happen).
    route_mismatch,
    /// The direct upstream could not be dialled.
    dial_failed,
    /// The route's peer had no live tunnel connection.
    no_tunnel,
    /// The connector answered with a status other than ok, or not in time.
    refused_by_peer,
    /// Refused at accept: the workload had `limits.flows_per_workload` open.
    over_workload_cap,
    /// The application reset its own connection (iperf3 ends every test so);
    /// the path did not fail. Not an error of the dataplane.
    client_reset,
    /// Nothing moved either way for `limits.flow_idle_timeout`; both ends
    /// were reset.
    idle,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub route: String,
    pub result: FlowResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub route: String,
    /// `up`: application to destination; `down`: back.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// `direct` or `tunnel`.
    pub upstream: &'static str,
}

/// A point-in-time copy of the totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowSnapshot {
    pub accepted: u64,
    pub unrecovered: u64,
    pub route_gone: u64,
    #[serde(default)]
    pub route_mismatch: u64,
    pub dial_failed: u64,
    pub no_tunnel: u64,
    pub refused_by_peer: u64,
    pub failed: u64,
    #[serde(default)]
    pub client_reset: u64,
    #[serde(default)]
    pub over_workload_cap: u64,
    #[serde(default)]
    pub idle: u64,
    pub completed: u64,
    pub active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// The steering side's flow metrics.
#[derive(Debug)]
pub struct FlowMetrics {
    opened: Family<RouteLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    active: Gauge,
    bytes: Family<BytesLabels, Counter>,
    setup: Family<UpstreamLabels, Histogram>,
    failovers: Counter,
    totals: [AtomicU64; 11],
    accepted: AtomicU64,
    /// The most flows active at once since [`FlowMetrics::take_peak`].
    peak: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

/// Flows not (yet) attributed to a route.
pub const UNKNOWN_ROUTE: &str = "unknown";

impl FlowMetrics {
    pub fn register(registry: &mut Registry) -> FlowMetrics {
        let m = FlowMetrics {
            opened: Family::default(),
            closed: Family::default(),
            active: Gauge::default(),
            bytes: Family::default(),
            // 50 us .. ~26 s: from a local connect to a slow far dial.
            setup: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 20))
            }),
            failovers: Counter::default(),
            totals: Default::default(),
            accepted: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        };
        registry.register("flows_opened", "Steered connections accepted, by route", m.opened.clone());
        registry.register("flows_closed", "Flows ended, by route and result", m.closed.clone());
        registry.register("flows_active", "Flows being served now", m.active.clone());
        registry.register_with_unit(
            "flow",
            "Payload bytes by route and direction",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register_with_unit(
            "flow_setup_duration",
            "Accept to the upstream's answer (direct: TCP connect; tunnel: connector status)",
            Unit::Seconds,
            m.setup.clone(),
        );
        registry.register(
            "flow_failovers",
            "Times a flow's stream was opened again on another tunnel connection (the first gave no answer)",
            m.failovers.clone(),
        );
        m
    }

    /// A flow moved on to another connection `n` times before an answer.
    pub fn failed_over(&self, n: usize) {
        self.failovers.inc_by(n as u64);
    }

    /// Failovers so far.
    pub fn failovers(&self) -> u64 {
        self.failovers.get()
    }

    /// A flow was accepted; it counts as active until [`FlowMetrics::closed`].
    pub fn opened(&self, route: &str) {
        self.accepted.fetch_add(1, Relaxed);
        self.opened.get_or_create(&RouteLabels { route: route.to_owned() }).inc();
        let active = self.active.inc() + 1;
        self.peak.fetch_max(active.max(0) as u64, Relaxed);
    }

    /// The most flows that were active at once since the last call.
    pub fn take_peak(&self) -> u64 {
        self.peak.swap(0, Relaxed)
    }

    pub fn closed(&self, route: &str, result: FlowResult) {
        // Leave the active count first: whoever sees the result counted
        // (a test's poll, a scrape) then never sees the flow still active.
        self.active.dec();
        self.totals[result as usize].fetch_add(1, Relaxed);
        self.closed.get_or_create(&ClosedLabels { route: route.to_owned(), result }).inc();
    }

    pub fn bytes(&self, route: &str, up: u64, down: u64) {
        self.up.fetch_add(up, Relaxed);
        self.down.fetch_add(down, Relaxed);
        for (direction, n) in [("up", up), ("down", down)] {
            self.bytes.get_or_create(&BytesLabels { route: route.to_owned(), direction }).inc_by(n);
        }
    }

    pub fn setup(&self, upstream: &'static str, took: Duration) {
        self.setup.get_or_create(&UpstreamLabels { upstream }).observe(took.as_secs_f64());
    }

    pub fn snapshot(&self) -> FlowSnapshot {
        let t = |r: FlowResult| self.totals[r as usize].load(Relaxed);
        FlowSnapshot {
            accepted: self.accepted.load(Relaxed),
            unrecovered: t(FlowResult::unrecovered),
            route_gone: t(FlowResult::route_gone),
            route_mismatch: t(FlowResult::route_mismatch),
            dial_failed: t(FlowResult::dial_failed),
            no_tunnel: t(FlowResult::no_tunnel),
            refused_by_peer: t(FlowResult::refused_by_peer),
            failed: t(FlowResult::failed),
            client_reset: t(FlowResult::client_reset),
            over_workload_cap: t(FlowResult::over_workload_cap),
            idle: t(FlowResult::idle),
            completed: t(FlowResult::completed),
            active: self.active.get().max(0) as u64,
            bytes_up: self.up.load(Relaxed),
            bytes_down: self.down.load(Relaxed),
        }
    }
}
