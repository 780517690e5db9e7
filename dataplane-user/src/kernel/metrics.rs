//! The kernel side's metrics, read from the maps at each scrape: the eBPF
//! programs' per-CPU counters (summed), the route tries' sizes, and whether
//! the programs are attached.

use std::sync::Arc;

use dataplane_common::Counter as Reason;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

use super::Steering;

/// The eBPF side, read from the maps at each scrape.
pub struct SteeringCollector(pub Arc<Steering>);

impl std::fmt::Debug for SteeringCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SteeringCollector").finish_non_exhaustive()
    }
}

impl Collector for SteeringCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = self.0.counters().unwrap_or_default();
        let mut m = encoder.encode_descriptor(
            "ebpf_events",
            "eBPF program exits by hook and reason, summed over CPUs",
            None,
            MetricType::Counter,
        )?;
        for c in Reason::ALL {
            m.encode_family(&[("hook", c.hook()), ("reason", c.reason())])?
                .encode_counter::<NoLabelSet, _, u64>(&counters.get(c), None)?;
        }
        let (v4, v6) = self.0.route_entries();
        let mut m = encoder.encode_descriptor(
            "route_map_entries",
            "Routes in the kernel's tries",
            None,
            MetricType::Gauge,
        )?;
        for (family, n) in [("ipv4", v4), ("ipv6", v6)] {
            m.encode_family(&[("family", family)])?.encode_gauge(&(n as i64))?;
        }
        let stats = self.0.map_stats();
        let capacity = self.0.capacity();
        let maps = [
            ("orig_dst", stats.orig_dst, capacity.flows),
            ("flows", stats.flows, capacity.flows),
            ("bypass", stats.bypass, capacity.bypass),
        ];
        let mut m = encoder.encode_descriptor(
            "ebpf_map_entries",
            "Entries in the per-socket maps (counted at most every 10 s)",
            None,
            MetricType::Gauge,
        )?;
        for (map, n, _) in maps {
            m.encode_family(&[("map", map)])?.encode_gauge(&(n as i64))?;
        }
        let mut m = encoder.encode_descriptor(
            "ebpf_map_capacity",
            "Capacity of the per-socket maps (steering.flow_capacity, steering.bypass_capacity)",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, cap) in maps {
            m.encode_family(&[("map", map)])?.encode_gauge(&i64::from(cap))?;
        }
        let (orig_dst, flows) = (stats.orig_dst_evicted, stats.flows_evicted);
        let mut m = encoder.encode_descriptor(
            "ebpf_map_evictions",
            "Entries the LRU maps dropped to make room: redirected sockets whose destination or flow was lost",
            None,
            MetricType::Counter,
        )?;
        for (map, n) in [("orig_dst", orig_dst), ("flows", flows)] {
            m.encode_family(&[("map", map)])?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }
        let mut m = encoder.encode_descriptor(
            "ebpf_bypass_full",
            "Agent dials that failed because the bypass map was full (steering.bypass_capacity)",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&self.0.bypass_full(), None)?;
        let mut m = encoder.encode_descriptor(
            "steering_attached",
            "1 while the eBPF programs are attached",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&i64::from(self.0.attached()))?;
        Ok(())
    }
}
