//! What the agent reports: readiness (can it serve?), the status document,
//! the per-route readiness metric, and the admin API's read interface.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use super::{AgentHandle, Summary, route_state};
use crate::{
    admin::{self, AdminSource},
    connector::Connector,
    kernel::{KernelCounters, Role, SteeringError},
    lock, process,
    routes::{RouteTable, Upstream},
    steer::metrics::FlowSnapshot,
    tunnel::Tunnel,
};

impl AgentHandle {
    /// Kernel counters summed over CPUs (zero for an agent without steering).
    pub fn kernel_counters(&self) -> Result<KernelCounters, SteeringError> {
        self.0.steering.as_ref().map_or(Ok(KernelCounters::default()), |s| s.counters())
    }

    pub fn flow_stats(&self) -> FlowSnapshot {
        self.0.flows.snapshot()
    }

    /// Route trie sizes (v4, v6) as the kernel holds them.
    pub fn route_entries(&self) -> (usize, usize) {
        self.0.steering.as_ref().map_or((0, 0), |s| s.route_entries())
    }

    pub fn cgroup(&self) -> Option<PathBuf> {
        self.0.steering.as_ref().map(|s| s.cgroup().to_owned())
    }

    pub fn tunnel(&self) -> Option<&Arc<Tunnel>> {
        self.0.tunnel.as_ref()
    }

    /// Whether the kernel's route actions reflect the tunnel connections up
    /// now (a connection that just came up is followed within moments).
    pub fn routes_follow_peers(&self) -> bool {
        let s = &self.0;
        match (&s.tunnel, &s.steering) {
            (Some(t), Some(_)) => {
                s.routes_synced.load(std::sync::atomic::Ordering::Relaxed) == *t.liveness().borrow()
            }
            _ => true,
        }
    }

    /// The TLS files of the running configuration.
    pub fn tls_files(&self) -> Option<crate::config::TlsFiles> {
        lock(&self.0.config).tls.clone()
    }

    /// The loaded programs and maps (tests inject faults through it).
    pub fn steering(&self) -> Option<&Arc<crate::kernel::Steering>> {
        self.0.steering.as_ref()
    }

    pub fn connector(&self) -> Option<&Arc<Connector>> {
        self.0.connector.as_ref()
    }

    pub fn relay(&self) -> Option<&Arc<crate::relay::Relay>> {
        self.0.relay.as_ref()
    }

    /// The Prometheus text of every metric this agent exports.
    pub fn encode_metrics(&self) -> String {
        process::encode(&self.0.registry)
    }

    /// Whether this agent can serve: steering attached (if it routes), and a
    /// live tunnel connection for every route through a peer and every peer
    /// it dials.
    pub fn readiness(&self) -> admin::Readiness {
        let s = &self.0;
        let mut missing = Vec::new();
        if s.drain.is_cancelled() {
            missing.push(admin::Missing { what: "agent".into(), peer: None, reason: "shutting down".into() });
        }
        if let Some(st) = &s.steering {
            let reason = match st.role() {
                Role::Owner => None,
                Role::Waiting => Some("waiting to take over from the agent that steers now"),
                Role::Done if st.pin_dir().is_some() => Some("another agent took over steering"),
                Role::Done => Some("programs detached"),
            };
            if let Some(reason) = reason {
                missing.push(admin::Missing { what: "steering".into(), peer: None, reason: reason.into() });
            }
        }
        if let Some(r) = &s.relay
            && r.routes() == 0
        {
            missing.push(admin::Missing {
                what: "relay".into(),
                peer: None,
                reason: "no connector advertises a route to forward for".into(),
            });
        }
        if !self.routes_follow_peers() {
            missing.push(admin::Missing {
                what: "steering".into(),
                peer: None,
                reason: "route actions not yet following a tunnel change".into(),
            });
        }
        let live = |peer: &str| s.tunnel.as_ref().map_or(0, |t| t.live_connections(peer));
        for r in lock(&s.routes).entries() {
            if let Upstream::Peer(p) = &r.upstream
                && live(p) == 0
            {
                missing.push(admin::Missing {
                    what: r.net.to_string(),
                    peer: Some(p.to_string()),
                    reason: "no live tunnel connection".into(),
                });
            }
            // A learned route leaves the table with its last advertiser;
            // this is the moment in between.
            if r.upstream == Upstream::Advertised && !route_state::serving(r, s.tunnel.as_deref()) {
                missing.push(admin::Missing {
                    what: r.net.to_string(),
                    peer: None,
                    reason: "no live connection advertises it".into(),
                });
            }
        }
        let config = lock(&s.config);
        for p in config.peers.iter().filter(|p| !p.dial.is_empty()) {
            if live(&p.name) == 0 && !missing.iter().any(|m| m.peer.as_deref() == Some(&p.name)) {
                missing.push(admin::Missing {
                    what: format!("peer:{}", p.name),
                    peer: Some(p.name.clone()),
                    reason: "no live tunnel connection to a peer this agent dials".into(),
                });
            }
        }
        let mut degraded = Vec::new();
        if let Some(d) = &s.discovery {
            let state = d.state();
            let what = || "kubernetes".to_owned();
            let error = state.failing.as_ref().map(|(_, e)| e.as_str());
            if !state.synced {
                let why = error.unwrap_or("the first list is under way");
                missing.push(admin::Missing {
                    what: what(),
                    peer: None,
                    reason: format!(
                        "the API server's EndpointSlices (default/kubernetes) not listed yet: {why}"
                    ),
                });
            } else if state.endpoints.is_empty() {
                missing.push(admin::Missing {
                    what: what(),
                    peer: None,
                    reason: "the EndpointSlices of default/kubernetes list no ready address to serve".into(),
                });
            }
            if let (true, Some((since, e))) = (state.synced, &state.failing) {
                let for_s = since.elapsed().map_or(0, |d| d.as_secs());
                degraded.push(admin::Missing {
                    what: what(),
                    peer: None,
                    reason: format!(
                        "the last list/watch of the Kubernetes API failed (failing for {for_s} s): serving the last good {} endpoints; {e}",
                        state.endpoints.len()
                    ),
                });
            }
        }
        admin::Readiness { ready: missing.is_empty(), missing, degraded }
    }

    fn discovery_status(&self) -> Option<admin::DiscoveryStatus> {
        let state = self.0.discovery.as_ref()?.state();
        let since =
            |t: &std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Some(admin::DiscoveryStatus {
            synced: state.synced,
            failing_since_unix: state.failing.as_ref().map(|(t, _)| since(t)),
            error: state.failing.map(|(_, e)| e),
            endpoints: state
                .endpoints
                .iter()
                .map(|e| format!("{} ports {:?}", e.net.addr(), e.ports))
                .collect(),
            skipped: state.skipped,
        })
    }

    /// The state `dataplane status` shows.
    pub fn status(&self) -> admin::Status {
        let s = &self.0;
        let readiness = self.readiness();
        let config = lock(&s.config).config().clone();
        let tunnel = s.tunnel.as_ref();
        let advertised_by = |net: &ipnet::IpNet| {
            let ads = tunnel.map(|t| t.advertisements()).unwrap_or_default();
            let mut peers: Vec<String> = ads
                .iter()
                .filter(|a| a.routes.iter().any(|r| r.net == *net))
                .map(|a| a.peer.to_string())
                .collect();
            peers.sort();
            peers.dedup();
            peers
        };
        let routes = lock(&s.routes)
            .entries()
            .iter()
            .map(|r| {
                let ready = route_state::serving(r, tunnel.map(|t| &**t));
                let (via, source, advertisers) = match &r.upstream {
                    Upstream::Direct => ("direct".to_owned(), "config", Vec::new()),
                    Upstream::Peer(p) => (p.to_string(), "config", Vec::new()),
                    Upstream::Advertised => ("advertised".to_owned(), "learned", advertised_by(&r.net)),
                };
                let draining = match r.upstream {
                    Upstream::Advertised => tunnel.map_or(0, |t| t.advertisers(&r.net).1),
                    _ => 0,
                };
                admin::RouteStatus {
                    cidr: r.net.to_string(),
                    via,
                    ready,
                    source: source.to_owned(),
                    advertisers,
                    draining,
                }
            })
            .collect();
        let refused_routes = lock(&s.learned_refused)
            .iter()
            .map(|(what, why)| admin::RefusedRoute { what: what.clone(), reason: why.clone() })
            .collect();
        let peers = config
            .peers
            .iter()
            .map(|p| admin::PeerStatus {
                name: p.name.clone(),
                identity: p.identity.clone(),
                dialed: !p.dial.is_empty(),
                live_connections: tunnel.map_or(0, |t| t.live_connections(&p.name)),
                rtt_ms: tunnel.and_then(|t| t.best_rtt(&p.name)).map(|d| d.as_secs_f64() * 1e3),
                streams_opened: tunnel.map_or(0, |t| t.metrics.streams_opened(&p.name)),
            })
            .collect();
        let steering = s.steering.as_ref().map(|st| {
            let (v4, v6) = st.route_entries();
            admin::SteeringStatus {
                attached: st.attached(),
                cgroup: st.cgroup().display().to_string(),
                route_entries_v4: v4,
                route_entries_v6: v6,
                refusal: if st.refuses_with_econnrefused() { "ECONNREFUSED" } else { "EPERM" }.to_owned(),
                pinned: st.pin_dir().map(|d| admin::PinnedStatus {
                    path: d.root().display().to_string(),
                    since_unix: d
                        .since()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs()),
                    layout: dataplane_common::LAYOUT_VERSION,
                }),
            }
        });
        admin::Status {
            node: s.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            readiness,
            steering,
            routes,
            refused_routes,
            peers,
            serves: config
                .serve
                .iter()
                .map(|v| match &v.cidr {
                    Some(cidr) => format!("{cidr} ports {:?}", v.ports),
                    None => "kubernetes (the endpoints of default/kubernetes)".to_owned(),
                })
                .collect(),
            discovery: self.discovery_status(),
            flows: self.flow_stats(),
            process: process::ProcessStats::read(),
            reloads: s.reloads.status(),
        }
    }

    pub fn summary(&self) -> Summary {
        Summary { kernel: self.kernel_counters().unwrap_or_default(), flows: self.flow_stats() }
    }
}

impl AdminSource for AgentHandle {
    fn metrics_text(&self) -> String {
        self.encode_metrics()
    }

    fn readiness(&self) -> admin::Readiness {
        AgentHandle::readiness(self)
    }

    fn status(&self) -> admin::Status {
        AgentHandle::status(self)
    }
}

/// `dataplane_route_ready{route, via, source}`: 1 while a route can be
/// served (a direct route always; a peer route while the peer has a live
/// connection; a learned one while a connection advertises it), and
/// `dataplane_route_advertisers{route}` for the learned ones. Labels are
/// bounded by the routes: configured, or learned inside `peers[].learn`.
#[derive(Debug)]
pub(super) struct RouteReadiness {
    pub routes: Arc<Mutex<RouteTable>>,
    pub tunnel: Option<Arc<Tunnel>>,
    pub refused: Arc<Mutex<std::collections::BTreeMap<String, String>>>,
}

impl Collector for RouteReadiness {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tunnel = self.tunnel.as_deref();
        let entries = lock(&self.routes).entries().to_vec();
        let mut m = encoder.encode_descriptor(
            "route_ready",
            "1 while the route can be served (its peer has a live tunnel connection, or one advertises it)",
            None,
            MetricType::Gauge,
        )?;
        for r in &entries {
            let route = r.net.to_string();
            let (via, source) = match &r.upstream {
                Upstream::Direct => ("direct".to_owned(), "config"),
                Upstream::Peer(p) => (p.to_string(), "config"),
                Upstream::Advertised => ("advertised".to_owned(), "learned"),
            };
            m.encode_family(&[("route", route.as_str()), ("via", via.as_str()), ("source", source)])?
                .encode_gauge(&i64::from(route_state::serving(r, tunnel)))?;
        }
        let mut m = encoder.encode_descriptor(
            "route_advertisers",
            "Live tunnel connections whose peer advertises the learned route",
            None,
            MetricType::Gauge,
        )?;
        for r in entries.iter().filter(|r| r.upstream == Upstream::Advertised) {
            let n = tunnel.map_or(0, |t| t.advertisers(&r.net).0);
            m.encode_family(&[("route", r.net.to_string().as_str())])?.encode_gauge(&(n as i64))?;
        }
        let refused = lock(&self.refused).len();
        encoder
            .encode_descriptor(
                "learned_routes_refused",
                "Advertised routes refused now: outside peers[].learn, overlapping a configured or \
                 learned route (see /status for why)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(refused as i64))?;
        Ok(())
    }
}
