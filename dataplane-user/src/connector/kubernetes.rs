//! The `kubernetes` serve entry: this cluster's own API server, wherever it
//! runs. The EndpointSlice the API server writes for the `default/kubernetes`
//! service (named `kubernetes`, labelled with the service: both selected, so
//! a slice someone else labels so is not served), with the ports it
//! publishes, is watched with kube-rs' watcher into a reflector store (every
//! matching slice merged, IPv4 and IPv6 alike); each complete view becomes
//! the connector's discovered set, advertised to its peers.
//!
//! A failed list or watch (the API unreachable, a 410 Gone for a compacted
//! resourceVersion) ends that watcher: after a backoff a new one lists from
//! scratch. The store swaps only when a list completes, so the last good set
//! stays served meanwhile; `/ready` and `kubernetes_discovery_up` say so.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{reflector, watcher},
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{KubernetesServe, ValidServe},
    ranges::{self, NEVER_SERVED},
};

/// The service whose endpoints are the API server, in every cluster.
pub const NAMESPACE: &str = "default";
pub const SERVICE: &str = "kubernetes";
/// Every slice of the service carries this label with its name.
const SELECTOR: &str = "kubernetes.io/service-name=kubernetes";
/// The API server names the slice it keeps for itself after the service:
/// RBAC can then grant that one object (`resourceNames`) and nothing else.
const SLICE: &str = "metadata.name=kubernetes";
/// The most endpoints served from discovery (a control plane has a handful):
/// more are skipped and counted, so a broken cluster cannot have the
/// connector advertise without bound.
pub const MAX_ENDPOINTS: usize = 64;
/// The API server ends each watch after this long (the watcher then
/// watches again from where it was); a read waits a little longer, so a
/// connection that went silent (a blackholed API server) fails within it.
const WATCH_TIMEOUT: Duration = Duration::from_secs(50);
const READ_TIMEOUT: Duration = Duration::from_secs(65);
/// Backoff between failed watchers: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watcher that lived this long before failing starts the backoff
/// afresh; one failing sooner (a list that works and a watch that never
/// does) keeps doubling it.
const STABLE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "serve[].kubernetes: no Kubernetes API configuration could be loaded (KUBECONFIG, ~/.kube/config, or the pod's service account): {0}"
    )]
    Config(#[source] kube::config::InferConfigError),
    #[error("serve[].kubernetes: building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Where discovery stands, for `/ready` and `/status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiscoveryState {
    /// A complete list has been seen: `endpoints` is what the API said.
    pub synced: bool,
    /// The last list or watch failed: since when, and why. Cleared by the
    /// next complete list or change.
    pub failing: Option<(SystemTime, String)>,
    /// Served now, by address.
    pub endpoints: Vec<ValidServe>,
    /// Addresses the slices list but the connector does not serve
    /// (FQDN slices, bad or never-served addresses, past the cap).
    pub skipped: usize,
}

/// The API server's endpoints, discovered and kept current.
pub struct Discovery {
    api: Api<EndpointSlice>,
    own_node: bool,
    state: Mutex<DiscoveryState>,
    metrics: DiscoveryMetrics,
}

impl Discovery {
    /// A client for the API this process runs against: `KUBECONFIG` (or
    /// `~/.kube/config`) if there is one, else the pod's service account.
    pub async fn connect(
        entry: KubernetesServe,
        registry: &mut Registry,
    ) -> Result<Discovery, DiscoveryError> {
        let mut config = kube::Config::infer().await.map_err(DiscoveryError::Config)?;
        config.read_timeout = Some(READ_TIMEOUT);
        // The client's own retries of 429/503/504 (up to 15, for minutes)
        // would hide an outage from `/ready`; the watch loop's backoff
        // retries instead, and says so meanwhile.
        config.default_retry = false;
        info!(api = %config.cluster_url, "Kubernetes API for serve[].kubernetes");
        let client = Client::try_from(config).map_err(DiscoveryError::Client)?;
        Ok(Discovery {
            api: Api::namespaced(client, NAMESPACE),
            own_node: entry.own_node,
            state: Mutex::default(),
            metrics: DiscoveryMetrics::register(registry),
        })
    }

    pub fn state(&self) -> DiscoveryState {
        crate::lock(&self.state).clone()
    }

    /// Watches until `stop`, handing each changed set of endpoints to
    /// `changed`.
    pub async fn run(self: Arc<Self>, changed: impl Fn(Vec<ValidServe>), stop: CancellationToken) {
        let (store, mut writer) = reflector::store::<EndpointSlice>();
        let mut failures = 0u32;
        loop {
            let config = watcher::Config::default()
                .labels(SELECTOR)
                .fields(SLICE)
                .timeout(WATCH_TIMEOUT.as_secs() as u32);
            let started = tokio::time::Instant::now();
            let mut events = std::pin::pin!(watcher(self.api.clone(), config));
            let error = loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = stop.cancelled() => return,
                };
                match next {
                    Some(Ok(event)) => {
                        writer.apply_watcher_event(&event);
                        // Until the list is done the store still holds the
                        // previous complete one.
                        if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                            continue;
                        }
                        self.observe(&store.state(), &changed);
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the watch stream ended".to_owned(),
                }
            };
            if started.elapsed() >= STABLE {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            let wait = backoff(failures);
            self.failed(error, wait);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// A complete view of the slices: serve what they list now.
    fn observe(&self, slices: &[Arc<EndpointSlice>], changed: &impl Fn(Vec<ValidServe>)) {
        let (endpoints, skipped) = endpoints_of(slices, self.own_node);
        let mut state = crate::lock(&self.state);
        if state.failing.take().is_some() {
            info!("Kubernetes API list/watch working again");
        }
        // After the state, so whoever sees the metric sees the state too.
        self.metrics.up.set(1);
        self.metrics.endpoints.set(endpoints.len() as i64);
        self.metrics.skipped.set(skipped as i64);
        let first = !state.synced;
        state.synced = true;
        state.skipped = skipped;
        if first || state.endpoints != endpoints {
            let list: Vec<String> =
                endpoints.iter().map(|e| format!("{} {:?}", e.net.addr(), e.ports)).collect();
            info!(endpoints = ?list, skipped, "API server endpoints (default/kubernetes)");
            if skipped > 0 {
                warn!(
                    skipped,
                    "EndpointSlice addresses not served (FQDN, invalid, never served, or past {MAX_ENDPOINTS})"
                );
            }
            state.endpoints = endpoints.clone();
            drop(state);
            changed(endpoints);
        }
    }

    fn failed(&self, error: String, retry_in: Duration) {
        let mut state = crate::lock(&self.state);
        warn!(
            error = %error,
            ?retry_in,
            serving = state.endpoints.len(),
            "Kubernetes API list/watch failed; serving the last good endpoints, relisting after the backoff"
        );
        let since = state.failing.as_ref().map_or_else(SystemTime::now, |(t, _)| *t);
        state.failing = Some((since, error));
        self.metrics.up.set(0);
        self.metrics.errors.inc();
    }
}

/// The endpoints the slices list, merged by address (a port published by
/// any slice of an address is served), ready or of unknown readiness, TCP,
/// in address order; and how many addresses were skipped.
pub fn endpoints_of(slices: &[Arc<EndpointSlice>], own_node: bool) -> (Vec<ValidServe>, usize) {
    let never = ranges::parse_table(&NEVER_SERVED);
    let mut by_addr: BTreeMap<IpAddr, BTreeSet<u16>> = BTreeMap::new();
    let mut skipped = 0;
    for slice in slices {
        let v4 = match slice.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            _ => {
                skipped += slice.endpoints.iter().map(|e| e.addresses.len()).sum::<usize>();
                continue;
            }
        };
        let ports: BTreeSet<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()).filter(|&n| n != 0))
            .collect();
        if ports.is_empty() {
            continue;
        }
        // Kubernetes: an unknown readiness is to be read as ready.
        let ready =
            slice.endpoints.iter().filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false));
        for address in ready.flat_map(|e| &e.addresses) {
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 && ranges::overlapped(ip.into(), &never).is_none() => {
                    by_addr.entry(ip).or_default().extend(&ports);
                }
                _ => skipped += 1,
            }
        }
    }
    skipped += by_addr.len().saturating_sub(MAX_ENDPOINTS);
    let endpoints = by_addr
        .into_iter()
        .take(MAX_ENDPOINTS)
        .map(|(ip, ports)| ValidServe { net: ip.into(), ports: ports.into_iter().collect(), own_node })
        .collect();
    (endpoints, skipped)
}

/// The wait before the `failures`th retry: doubling, capped, with up to a
/// quarter more so connectors that failed together do not relist together.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(BACKOFF_MAX);
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    base + base / 4 * (nanos % 1000) / 1000
}

/// Discovery's metrics (no labels).
struct DiscoveryMetrics {
    up: Gauge,
    endpoints: Gauge,
    skipped: Gauge,
    errors: Counter,
}

impl DiscoveryMetrics {
    fn register(registry: &mut Registry) -> DiscoveryMetrics {
        let m = DiscoveryMetrics {
            up: Gauge::default(),
            endpoints: Gauge::default(),
            skipped: Gauge::default(),
            errors: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("kubernetes_discovery");
        r.register(
            "up",
            "1 while the last list/watch of the API server's EndpointSlices succeeded; 0 while it fails (the last good endpoints are still served)",
            m.up.clone(),
        );
        r.register("endpoints", "API server endpoints served from discovery now", m.endpoints.clone());
        r.register(
            "skipped_addresses",
            "Addresses the EndpointSlices list that are not served (FQDN, invalid, never served, past the cap)",
            m.skipped.clone(),
        );
        r.register(
            "errors",
            "Failed lists and watches of the API server's EndpointSlices (each relists after a backoff)",
            m.errors.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn slice(
        family: &str,
        ports: &[(i32, Option<&str>)],
        endpoints: &[(&str, Option<bool>)],
    ) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            address_type: family.into(),
            endpoints: endpoints
                .iter()
                .map(|(a, ready)| Endpoint {
                    addresses: vec![(*a).into()],
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .iter()
                    .map(|(p, proto)| EndpointPort {
                        port: Some(*p),
                        protocol: proto.map(Into::into),
                        name: Some("https".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        })
    }

    fn served(slices: &[Arc<EndpointSlice>]) -> (Vec<String>, usize) {
        let (eps, skipped) = endpoints_of(slices, false);
        (eps.iter().map(|e| format!("{} {:?}", e.net, e.ports)).collect(), skipped)
    }

    #[test]
    fn slices_of_both_families_merge_by_address() {
        let v4 = slice("IPv4", &[(6443, Some("TCP"))], &[("10.0.0.5", Some(true)), ("10.0.0.6", None)]);
        let v6 = slice("IPv6", &[(6443, None)], &[("fd00::5", Some(true))]);
        // A second slice of the same address (a slice being replaced) adds its ports.
        let more = slice("IPv4", &[(443, None)], &[("10.0.0.5", Some(true))]);
        assert_eq!(
            served(&[v4, v6, more]),
            (
                vec![
                    "10.0.0.5/32 [443, 6443]".into(),
                    "10.0.0.6/32 [6443]".into(),
                    "fd00::5/128 [6443]".into()
                ],
                0
            )
        );
    }

    #[test]
    fn only_ready_tcp_addresses_of_the_slices_family_are_served() {
        let not_ready =
            slice("IPv4", &[(6443, None)], &[("10.0.0.5", Some(false)), ("10.0.0.6", Some(true))]);
        assert_eq!(served(&[not_ready]), (vec!["10.0.0.6/32 [6443]".into()], 0));
        let udp = slice("IPv4", &[(53, Some("UDP"))], &[("10.0.0.7", None)]);
        assert_eq!(served(&[udp]), (vec![], 0), "no TCP port, nothing to serve");
        let bad = slice(
            "IPv4",
            &[(6443, None)],
            &[("fd00::1", None), ("not-an-ip", None), ("127.0.0.1", None), ("169.254.169.254", None)],
        );
        assert_eq!(served(&[bad]), (vec![], 4), "wrong family, invalid, loopback, metadata");
        let fqdn = slice("FQDN", &[(6443, None)], &[("api.example.org", None)]);
        assert_eq!(served(&[fqdn]), (vec![], 1));
        let port0 = slice("IPv4", &[(0, None), (70_000, None)], &[("10.0.0.8", None)]);
        assert_eq!(served(&[port0]), (vec![], 0));
    }

    #[test]
    fn endpoints_past_the_cap_are_skipped_and_counted() {
        let addrs: Vec<String> =
            (0..MAX_ENDPOINTS + 3).map(|i| format!("10.1.{}.{}", i / 200, i % 200 + 1)).collect();
        let eps: Vec<(&str, Option<bool>)> = addrs.iter().map(|a| (a.as_str(), None)).collect();
        let (list, skipped) = endpoints_of(&[slice("IPv4", &[(6443, None)], &eps)], true);
        assert_eq!((list.len(), skipped), (MAX_ENDPOINTS, 3));
        assert!(list.iter().all(|e| e.own_node));
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let b = |n| backoff(n).as_millis();
        assert!((250..=313).contains(&b(1)), "{}", b(1));
        assert!((500..=625).contains(&b(2)), "{}", b(2));
        assert!((30_000..=37_500).contains(&b(20)), "{}", b(20));
        assert!((30_000..=37_500).contains(&b(u32::MAX)));
    }
}
