//! The documents the admin API serves (`/ready`, `/status`), shared by the
//! server and `dataplane status`.

use serde::{Deserialize, Serialize};

use crate::{process::ProcessStats, steer::metrics::FlowSnapshot};

/// Why the agent is not ready, route by route.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Missing {
    /// The route (CIDR) or `steering` / `peer:<name>`.
    pub what: String,
    /// The peer it needs, if any.
    pub peer: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub missing: Vec<Missing>,
    /// Ready, but serving on stale knowledge (the Kubernetes API
    /// unreachable, the last good endpoints still served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<Missing>,
}

/// `serve[].kubernetes`: the API server endpoints discovered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// A complete list of the EndpointSlices has been seen.
    pub synced: bool,
    /// The last list or watch failed: since when (Unix seconds), and why.
    pub failing_since_unix: Option<u64>,
    pub error: Option<String>,
    /// Served now: `address ports [..]`.
    pub endpoints: Vec<String>,
    /// Listed but not served (FQDN, invalid, never served, past the cap).
    pub skipped: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub identity: String,
    /// This agent dials it (otherwise it dials us).
    pub dialed: bool,
    pub live_connections: usize,
    pub rtt_ms: Option<f64>,
    pub streams_opened: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteStatus {
    pub cidr: String,
    /// A peer's name, `direct`, or `advertised` (a learned route).
    pub via: String,
    pub ready: bool,
    /// `config` or `learned` (advertised by peers).
    #[serde(default)]
    pub source: String,
    /// A learned route: the peers whose live connections advertise it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertisers: Vec<String>,
    /// A learned route: live connections advertising it whose peer drains.
    #[serde(default)]
    pub draining: usize,
}

/// An advertised route (or a whole advertisement) not steered, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedRoute {
    pub what: String,
    pub reason: String,
}

/// Everything `dataplane status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub readiness: Readiness,
    pub steering: Option<SteeringStatus>,
    pub routes: Vec<RouteStatus>,
    /// Learned routes refused now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_routes: Vec<RefusedRoute>,
    pub peers: Vec<PeerStatus>,
    pub serves: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,
    pub flows: FlowSnapshot,
    pub process: ProcessStats,
    #[serde(default)]
    pub reloads: ReloadStatus,
}

/// Configuration reloads since start.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadStatus {
    pub applied: u64,
    pub refused: u64,
    pub last_refusal: Option<ReloadRefusal>,
}

/// The last reload refused: when, and why (nothing of it was applied).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadRefusal {
    pub at_unix: u64,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SteeringStatus {
    pub attached: bool,
    pub cgroup: String,
    pub route_entries_v4: usize,
    pub route_entries_v6: usize,
    /// The error a refused routed connect gets: `ECONNREFUSED`, or `EPERM`
    /// on kernels whose connect hooks cannot set it (before 5.18).
    #[serde(default)]
    pub refusal: String,
    /// Where the links and maps are pinned; absent when unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<PinnedStatus>,
}

/// Steering state pinned under bpffs (it outlives the agent).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinnedStatus {
    pub path: String,
    /// When it was first pinned (by this agent or one before it).
    pub since_unix: u64,
    /// The map layout version this agent uses.
    pub layout: u32,
}
