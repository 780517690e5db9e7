//! The agent's YAML configuration: the types and their defaults. Validation
//! (in `validate`) turns a [`Config`] into a [`ValidConfig`], which carries
//! what it derived (parsed routes, serve policy), so nothing is parsed twice
//! and holding one proves the config was checked.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

mod serving;
mod validate;

pub use validate::{KubernetesServe, RouteGuard, ValidConfig, ValidRoute, ValidRule, ValidServe, parse_cidr};

/// Exit code for a bad configuration (EX_USAGE from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// The `via` value that dials the original destination from the agent itself.
pub const VIA_DIRECT: &str = "direct";

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The YAML does not match the schema (unknown field, wrong type, ...).
    #[error("invalid config: {0}")]
    Syntax(String),
    /// A field has a value the agent cannot use.
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { field: field.into(), reason: reason.into() }
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity in logs; defaults to $NODE_NAME, then the hostname.
    #[serde(default = "default_node")]
    pub node: String,
    /// Admin HTTP server (/metrics /ready /healthz /status); `null` disables it.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// Threads that carry flows; default: one per CPU this process may run
    /// on (see [`Config::worker_threads`]).
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default)]
    pub log: LogSettings,
    #[serde(default)]
    pub steering: SteeringSettings,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub limits: Limits,
    /// CIDRs whose TCP connects are steered into the agent.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Certificates for the tunnel (required with peers, serve or tunnel.listen).
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub tunnel: TunnelSettings,
    /// Agents this one exchanges flows with.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// As a connector: what this agent dials on behalf of peers. Nothing else.
    #[serde(default)]
    pub serve: Vec<Serve>,
    /// As a connector: which peer identities may reach which of the served
    /// destinations. Without rules, a peer listed by its exact identity may
    /// reach everything served (one peer, one trust decision) and an
    /// identity admitted by a pattern reaches nothing; with rules, they
    /// alone decide. Reloadable.
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
    /// As a relay: forward the streams of client agents to the connectors
    /// that advertise their destinations (both dial this agent). A relay
    /// learns routes from its connector peers (`peers[].learn`), advertises
    /// them on to its clients as `policy` grants them, steers nothing and
    /// needs no root.
    #[serde(default)]
    pub relay: Option<RelaySettings>,
}

/// The relay role (`relay: {}`); nothing to set yet.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {}

/// "Identities matching one of `identities` may reach `to`."
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Named in audit log lines.
    pub name: String,
    /// Identity patterns (see `peers[].identity`).
    pub identities: Vec<String>,
    /// Destinations, each inside what `serve` allows.
    pub to: Vec<PolicyTarget>,
}

/// One destination range of a policy rule: a range and ports, or
/// `kubernetes: true` for the API server endpoints discovered by the
/// `kubernetes` serve entry, whatever they are at the time.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyTarget {
    #[serde(default)]
    pub cidr: Option<String>,
    /// Destination ports; at least one (with `cidr`).
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub kubernetes: bool,
}

/// Logging. `DATAPLANE_LOG` (an EnvFilter) and `DATAPLANE_LOG_FORMAT`
/// override these.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default = "default_log_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { level: default_log_level(), format: LogFormat::default() }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors in clusters.
    Json,
}

/// PEM files: the private CA, this node's certificate (identity in a URI SAN)
/// and its key.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// QUIC endpoint settings. Restart-only.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TunnelSettings {
    /// Accept QUIC from peers here; omit to only dial out.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Keep-alive interval on every tunnel connection.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// A connection silent this long is dead (both ends' minimum applies).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// UDP socket buffer size to force (SO_RCVBUFFORCE/SO_SNDBUFFORCE).
    #[serde(default = "default_udp_buffer")]
    pub udp_buffer_bytes: usize,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            listen: None,
            keep_alive: default_keep_alive(),
            idle_timeout: default_idle_timeout(),
            udp_buffer_bytes: default_udp_buffer(),
        }
    }
}

/// Another agent.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Referenced by `routes[].via`.
    pub name: String,
    /// Addresses to dial; omit for a peer that dials us (a connector behind a
    /// firewall that allows no inbound traffic).
    #[serde(default)]
    pub dial: Vec<SocketAddr>,
    /// The URI SAN its certificate must carry, or a pattern of them (`*`
    /// for one or more characters of one path segment, as in
    /// `spiffe://example.org/node/*`): every node of a fleet in one entry,
    /// each connection still bound to its exact identity. An exact entry
    /// wins over a pattern; among patterns, the first that matches.
    pub identity: String,
    /// Connections to keep to it (when dialing).
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// CIDRs within which this agent steers the routes the peer advertises
    /// (a connector's `serve`, as its policy grants it to this node). A
    /// learned route outside all of them is refused, so a peer can never
    /// take more of this node's traffic than the operator allowed; empty
    /// (the default): nothing is learned from it. Only for a peer with an
    /// exact identity.
    #[serde(default)]
    pub learn: Vec<String>,
    /// On a connector: this peer is a relay, so the client identity each of
    /// its streams attests is the one policy, budgets and audit go by (an
    /// attested identity counts as admitted by pattern: without policy
    /// rules it reaches nothing). Only for a peer with an exact identity.
    #[serde(default)]
    pub relay: bool,
}

/// Destinations a connector dials for its peers.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Serve {
    /// A range to serve (with `ports`), or none with `kubernetes`.
    #[serde(default)]
    pub cidr: Option<String>,
    /// Destination ports allowed; at least one (with `cidr`).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Serve this cluster's own API server, wherever it is: the endpoints
    /// (addresses and ports) of the `default/kubernetes` EndpointSlices,
    /// watched through the Kubernetes API (in-cluster service account, or
    /// `KUBECONFIG`) and advertised as they change. At most one entry.
    #[serde(default)]
    pub kubernetes: bool,
    /// The destination may be one of this node's own addresses (a connector
    /// on the API server's node). Without it the connector never dials its
    /// own node, so a CIDR that happens to cover it exposes nothing there.
    #[serde(default)]
    pub own_node: bool,
}

/// Kernel-side steering settings. Changing them needs a restart.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SteeringSettings {
    /// cgroup v2 directory the programs attach to; default: the cgroup v2 mount.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub redirect: Redirect,
    /// Where the programs' links and maps are pinned (a directory on
    /// bpffs), so steering survives the agent: a restarted or upgraded
    /// agent takes it over in place, and while none runs routed connects
    /// are refused instead of leaving by the default route. `null`: not
    /// pinned; steering ends with the agent (connects then pass unsteered).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: Option<PathBuf>,
    /// Pinned: on SIGTERM, how long the agent keeps serving while it waits
    /// for a successor to take over (a rolling update starting the new pod
    /// after the old one stopped); a new agent waits as long for its peers
    /// before it takes over from a live one. Past it, routed connects are
    /// refused in the kernel until an agent runs again.
    #[serde(default = "default_handover_wait", with = "humantime_serde")]
    pub handover_wait: Duration,
    /// Redirected sockets the kernel tracks at once, per node (the FLOWS
    /// and ORIG_DST maps, about 100 bytes an entry each): past it the
    /// least recently used are evicted, counted in
    /// `dataplane_ebpf_map_evictions_total`.
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: u32,
    /// The agent's own dials in flight (BYPASS map); a dial finding it full
    /// fails, counted in `dataplane_ebpf_bypass_full_total`.
    #[serde(default = "default_bypass_capacity")]
    pub bypass_capacity: u32,
}

impl Default for SteeringSettings {
    fn default() -> Self {
        SteeringSettings {
            cgroup: None,
            redirect: Redirect::default(),
            pin_dir: default_pin_dir(),
            handover_wait: default_handover_wait(),
            flow_capacity: default_flow_capacity(),
            bypass_capacity: default_bypass_capacity(),
        }
    }
}

/// The node-local listeners that routed connects are rewritten to. They sit on
/// an interface of their own so every pod can reach them through its gateway.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    #[serde(default = "default_interface")]
    pub interface: String,
    /// IPv4 listener; `null` disables IPv4 steering.
    #[serde(default = "default_v4")]
    pub v4: Option<SocketAddr>,
    /// IPv6 listener; `null` disables IPv6 steering.
    #[serde(default = "default_v6")]
    pub v6: Option<SocketAddr>,
}

impl Default for Redirect {
    fn default() -> Self {
        Redirect { interface: default_interface(), v4: default_v4(), v6: default_v6() }
    }
}

/// Caps on what a workload or a peer can make the agent hold. Reloadable
/// (peer caps apply to connections and streams that start after a reload).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Steered flows one workload (source address) may have open at once;
    /// more are reset at once and counted (`result="over_workload_cap"`).
    #[serde(default = "default_flows_per_workload")]
    pub flows_per_workload: usize,
    /// A steered flow with no byte in either direction for this long is
    /// closed (`result="idle"`). Off by default: API watches are legitimately
    /// silent for long stretches, and TCP keepalive already ends flows whose
    /// far end vanished.
    #[serde(default, with = "humantime_serde")]
    pub flow_idle_timeout: Option<Duration>,
    /// QUIC connections one peer identity may have accepted by this agent at
    /// once; more are closed at the handshake (`over_connection_cap`).
    #[serde(default = "default_connections_per_peer")]
    pub connections_per_peer: usize,
    /// Streams one peer identity may have a connector serve at once (and each
    /// of its connections may open, in QUIC's own stream credit); more are
    /// answered `over_stream_cap` at once.
    #[serde(default = "default_streams_per_peer")]
    pub streams_per_peer: usize,
    /// Connector dials in flight for one peer identity; more are answered
    /// `over_dial_cap` at once.
    #[serde(default = "default_dials_per_peer")]
    pub dials_per_peer: usize,
    /// How long a peer's new stream has to deliver its request header.
    #[serde(default = "default_stream_header_timeout", with = "humantime_serde")]
    pub stream_header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            flows_per_workload: default_flows_per_workload(),
            flow_idle_timeout: None,
            connections_per_peer: default_connections_per_peer(),
            streams_per_peer: default_streams_per_peer(),
            dials_per_peer: default_dials_per_peer(),
            stream_header_timeout: default_stream_header_timeout(),
        }
    }
}

/// Most a config may set `limits.flows_per_workload` to: the kernel's flow
/// table holds 65,536 flows for the whole node.
pub const MAX_FLOWS_PER_WORKLOAD: usize = 65_536;
/// Most a config may set `limits.streams_per_peer` to: QUIC stream credit
/// costs memory per connection up front (quinn sets up state for every
/// stream the limit allows, about 80 bytes each way).
pub const MAX_STREAMS_PER_PEER: usize = 65_536;
/// Most a config may set `limits.connections_per_peer` to.
pub const MAX_CONNECTIONS_PER_PEER: usize = 256;

/// A kubectl needs a handful of connections and a busy CI runner a few
/// hundred; 4,096 leaves room for both while one pod cannot take the node's
/// descriptors (5,000 silent flows from one pod were all held before).
fn default_flows_per_workload() -> usize {
    4096
}
/// A client agent keeps `peers[].connections` (2 by default) to each peer;
/// 8 leaves room for a restart's overlap and a larger pool.
fn default_connections_per_peer() -> usize {
    8
}
/// Two workloads' worth of the per-workload cap: about 42 MiB of connector
/// memory at the measured 5.2 KiB per flow, and 650 KiB of QUIC stream state
/// per connection.
fn default_streams_per_peer() -> usize {
    8192
}
/// A dial takes one round trip to the destination: 256 in flight carry
/// thousands of new flows a second, while a peer cannot make the connector
/// hold more half-open sockets than that.
fn default_dials_per_peer() -> usize {
    256
}
/// A header is one write right after the stream opens; 5 s allows for a
/// congested path.
fn default_stream_header_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Dialing an upstream (e.g. `10s`).
    #[serde(default = "default_connect", with = "humantime_serde")]
    pub connect: Duration,
    /// How long open flows may finish after SIGTERM before they are cut.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { connect: default_connect(), shutdown_grace: default_grace() }
    }
}

/// One steered CIDR.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Network in CIDR notation, host bits clear (`198.51.100.101/32`).
    pub cidr: String,
    /// Where flows go: `direct` (dial the original destination from the agent).
    pub via: String,
    /// While the route's peer has no live connection: `reject` (default:
    /// the connect fails at once, in the kernel, and nothing leaves the
    /// node) or `pass` (the connect goes to its destination untouched, by
    /// whatever route the node has). Only for routes via a peer.
    #[serde(default)]
    pub on_no_peer: Option<OnNoPeer>,
}

/// What a routed connect does while its peer has no live connection.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnNoPeer {
    #[default]
    Reject,
    Pass,
}

fn default_node() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}
/// Most runtime worker threads a config may ask for.
pub const MAX_WORKERS: usize = 256;

impl Config {
    /// The runtime's worker threads: `workers`, or `cpus` (the CPUs this
    /// process may run on, cgroup quota included). Operators cap it where
    /// the agent's share of the node should be smaller than its CPU limit;
    /// on the 2-core benchmark one and two workers measured within noise of
    /// each other (README, "Performance").
    pub fn worker_threads(&self, cpus: usize) -> usize {
        self.workers.unwrap_or(cpus.max(1))
    }
}

fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9464))
}
fn default_log_level() -> String {
    "info".to_owned()
}
/// The redirect listeners' default port (and, pinned, the next one): below
/// 1024, so no unprivileged process on the node can bind it while no agent
/// does (after a crash, the pinned programs still send routed connects
/// there) or take the port the next agent needs.
pub const DEFAULT_REDIRECT_PORT: u16 = 1013;

fn default_flow_capacity() -> u32 {
    dataplane_common::FLOWS_MAX_ENTRIES
}
fn default_bypass_capacity() -> u32 {
    dataplane_common::BYPASS_MAX_ENTRIES
}
fn default_pin_dir() -> Option<PathBuf> {
    Some(PathBuf::from("/sys/fs/bpf/dataplane"))
}
fn default_handover_wait() -> Duration {
    Duration::from_secs(10)
}
fn default_interface() -> String {
    "dataplane0".to_owned()
}
fn default_v4() -> Option<SocketAddr> {
    Some(SocketAddr::new(Ipv4Addr::new(169, 254, 77, 1).into(), DEFAULT_REDIRECT_PORT))
}
fn default_v6() -> Option<SocketAddr> {
    Some(SocketAddr::new(Ipv6Addr::new(0xfd00, 0xd47a, 0, 0, 0, 0, 0, 1).into(), DEFAULT_REDIRECT_PORT))
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(2)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(8)
}
fn default_udp_buffer() -> usize {
    8 << 20
}
fn default_connections() -> u32 {
    2
}
fn default_connect() -> Duration {
    Duration::from_secs(10)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

#[cfg(test)]
mod tests;
