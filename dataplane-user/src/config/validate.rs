//! Validation: everything serde cannot check (addresses, CIDRs, overlaps,
//! references), with errors that name the field. Its result, [`ValidConfig`],
//! keeps the parsed routes and serve entries for the agent to use.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use ipnet::IpNet;

use super::{Config, ConfigError, Limits, MAX_WORKERS, Redirect, VIA_DIRECT};
use crate::{
    identity::IdentityPattern,
    ranges::{self, NEVER_ROUTED, NEVER_SERVED},
};
use dataplane_common::ROUTES_MAX_ENTRIES;

/// `steering.flow_capacity`: below, a busy node evicts; above, the two
/// maps would take over 200 MiB of kernel memory.
const FLOW_CAPACITY: std::ops::RangeInclusive<u32> = 1024..=1 << 20;
/// `steering.bypass_capacity`: at least the default per-peer dial cap.
const BYPASS_CAPACITY: std::ops::RangeInclusive<u32> = 256..=1 << 18;
/// The longest `steering.handover_wait`: a stopping agent holds its pod that long.
const MAX_HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// A configuration that passed [`Config::validate`], with the routes and
/// serve entries validation parsed. It reads as the [`Config`] it wraps.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidConfig {
    config: Config,
    routes: Vec<ValidRoute>,
    serve: Vec<ValidServe>,
    /// The `kubernetes` serve entry, if any.
    kubernetes: Option<KubernetesServe>,
    /// `peers[i].identity`, parsed.
    peer_identities: Vec<IdentityPattern>,
    policy: Vec<ValidRule>,
    /// `peers[i].learn`, parsed.
    learn: Vec<Vec<IpNet>>,
    guard: RouteGuard,
}

impl ValidConfig {
    /// The routes, parsed, in file order.
    pub fn valid_routes(&self) -> &[ValidRoute] {
        &self.routes
    }

    /// The ranges this agent serves as a connector, parsed.
    pub fn valid_serve(&self) -> &[ValidServe] {
        &self.serve
    }

    /// The `kubernetes` serve entry: this cluster's API server, discovered.
    pub fn kubernetes_serve(&self) -> Option<KubernetesServe> {
        self.kubernetes
    }

    /// This agent is a connector: it serves ranges or its cluster's API server.
    pub fn serves(&self) -> bool {
        !self.serve.is_empty() || self.kubernetes.is_some()
    }

    /// Each peer with its identity pattern, in file order.
    pub fn valid_peers(&self) -> Vec<(&super::Peer, &IdentityPattern)> {
        self.config.peers.iter().zip(&self.peer_identities).collect()
    }

    /// The connector's policy rules, parsed.
    pub fn valid_policy(&self) -> &[ValidRule] {
        &self.policy
    }

    /// Where routes advertised by `peer` may lie (`peers[].learn`).
    pub fn valid_learn(&self, peer: &str) -> &[IpNet] {
        let i = self.config.peers.iter().position(|p| p.name == peer);
        i.and_then(|i| self.learn.get(i)).map_or(&[], Vec::as_slice)
    }

    /// Some peer's advertised routes may be steered.
    pub fn learns_routes(&self) -> bool {
        self.learn.iter().any(|l| !l.is_empty())
    }

    /// This agent steers connects: it routes or learns something, and is
    /// not a relay (which forwards what it learns, never steers).
    pub fn steers(&self) -> bool {
        self.config.relay.is_none() && (!self.routes.is_empty() || self.learns_routes())
    }

    /// What no route, configured or learned, may cover.
    pub fn route_guard(&self) -> &RouteGuard {
        &self.guard
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

/// A validated route: the parsed network plus where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRoute {
    pub net: IpNet,
    pub via: String,
    pub on_no_peer: super::OnNoPeer,
}

/// A validated serve entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidServe {
    pub net: IpNet,
    pub ports: Vec<u16>,
    pub own_node: bool,
}

/// The `kubernetes` serve entry, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KubernetesServe {
    pub own_node: bool,
}

/// A validated policy rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRule {
    pub name: String,
    pub identities: Vec<IdentityPattern>,
    pub to: Vec<(IpNet, Vec<u16>)>,
    /// The rule grants the discovered API server endpoints too.
    pub to_kubernetes: bool,
}

/// What no route may cover, configured or learned: ranges whose steering
/// would loop or break the node (loopback, the redirect listeners, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct RouteGuard {
    never_routed: Vec<(IpNet, &'static str)>,
    reserved: Vec<(&'static str, IpAddr)>,
}

impl RouteGuard {
    fn new(config: &Config) -> RouteGuard {
        RouteGuard { never_routed: ranges::parse_table(&NEVER_ROUTED), reserved: config.reserved_addresses() }
    }

    /// Why `net` must not be steered, if it must not.
    pub fn check(&self, net: IpNet) -> Result<(), String> {
        // Any spelling: ::ffff:127.0.0.1 is loopback too.
        if let Some((range, why)) = ranges::overlapped(net, &self.never_routed) {
            return Err(format!("{net} covers {range} ({why}); steering it would loop or break the node"));
        }
        for spelling in ranges::spellings(net) {
            if let Some((what, addr)) = self.reserved.iter().find(|(_, a)| spelling.contains(a)) {
                return Err(format!("{net} covers {what} {addr}; steering it would loop or break the node"));
            }
        }
        Ok(())
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let within = |field: &str, v: usize, max: usize| {
            if (1..=max).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    format!("limits.{field}"),
                    format!("{v}: must be between 1 and {max}"),
                ))
            }
        };
        within("flows_per_workload", self.flows_per_workload, super::MAX_FLOWS_PER_WORKLOAD)?;
        within("connections_per_peer", self.connections_per_peer, super::MAX_CONNECTIONS_PER_PEER)?;
        within("streams_per_peer", self.streams_per_peer, super::MAX_STREAMS_PER_PEER)?;
        within("dials_per_peer", self.dials_per_peer, super::MAX_STREAMS_PER_PEER)?;
        let header = self.stream_header_timeout;
        if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&header) {
            return Err(ConfigError::invalid(
                "limits.stream_header_timeout",
                format!("{header:?}: must be between 100ms and 5m"),
            ));
        }
        if let Some(idle) = self.flow_idle_timeout
            && idle < Duration::from_secs(1)
        {
            return Err(ConfigError::invalid(
                "limits.flow_idle_timeout",
                format!("{idle:?}: must be at least 1s (omit it to turn the timeout off)"),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<ValidConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<ValidConfig, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.validate()
    }

    /// Checks everything serde cannot: addresses, CIDRs, overlaps, references.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        if self.node.trim().is_empty() {
            return Err(ConfigError::invalid("node", "must not be empty"));
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::filter::EnvFilter>() {
            return Err(ConfigError::invalid("log.level", format!("`{}`: {e}", self.log.level)));
        }
        if let Some(w) = self.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return Err(ConfigError::invalid("workers", format!("{w}: must be between 1 and {MAX_WORKERS}")));
        }
        self.steering.redirect.validate()?;
        self.validate_pinning()?;
        self.limits.validate()?;
        let peer_identities = self.validate_peers()?;
        let guard = RouteGuard::new(&self);
        let routes = self.parse_routes(&guard)?;
        let learn = self.parse_learn(&guard)?;
        let (serve, kubernetes) = self.parse_serve()?;
        let serves = !serve.is_empty() || kubernetes.is_some();
        if routes.is_empty() && !serves && learn.iter().all(Vec::is_empty) {
            return Err(ConfigError::invalid(
                "routes",
                "routes, serve and every peer's learn are empty: the agent would do nothing",
            ));
        }
        for (i, s) in serve.iter().enumerate() {
            if let Some(j) = routes.iter().position(|r| overlaps(&r.net, &s.net)) {
                return Err(ConfigError::invalid(
                    format!("serve[{i}].cidr"),
                    format!(
                        "{} overlaps routes[{j}].cidr {}: a node never steers what it serves",
                        s.net, routes[j].net
                    ),
                ));
            }
        }
        let uses_tunnel = !self.peers.is_empty() || serves || self.tunnel.listen.is_some();
        if uses_tunnel && self.tls.is_none() {
            return Err(ConfigError::invalid(
                "tls",
                "required with peers, serve or tunnel.listen (mutual TLS always)",
            ));
        }
        if serves && self.peers.is_empty() {
            return Err(ConfigError::invalid(
                "serve",
                "needs at least one entry in peers: only configured peers may send flows",
            ));
        }
        self.validate_relay(&routes, serves, &learn)?;
        let policy = self.parse_policy(&serve, kubernetes.is_some(), &learn)?;
        Ok(ValidConfig { config: self, routes, serve, kubernetes, peer_identities, policy, learn, guard })
    }

    fn validate_pinning(&self) -> Result<(), ConfigError> {
        let st = &self.steering;
        for (field, value, range) in [
            ("steering.flow_capacity", st.flow_capacity, FLOW_CAPACITY),
            ("steering.bypass_capacity", st.bypass_capacity, BYPASS_CAPACITY),
        ] {
            if !range.contains(&value) {
                return Err(ConfigError::invalid(
                    field,
                    format!("{value}: must be between {} and {}", range.start(), range.end()),
                ));
            }
        }
        let Some(dir) = &st.pin_dir else { return Ok(()) };
        if !dir.is_absolute() {
            return Err(ConfigError::invalid(
                "steering.pin_dir",
                format!("{}: must be an absolute path on bpffs (e.g. /sys/fs/bpf/dataplane)", dir.display()),
            ));
        }
        if st.handover_wait > MAX_HANDOVER_WAIT {
            return Err(ConfigError::invalid(
                "steering.handover_wait",
                format!(
                    "{:?}: at most {MAX_HANDOVER_WAIT:?} (a stopping agent holds its pod that long)",
                    st.handover_wait
                ),
            ));
        }
        // A new agent binds the next port while the one it replaces still
        // listens on the configured one.
        for (field, addr) in
            [("steering.redirect.v4", st.redirect.v4), ("steering.redirect.v6", st.redirect.v6)]
        {
            if addr.is_some_and(|a| a.port() == u16::MAX) {
                return Err(ConfigError::invalid(
                    field,
                    "port must be below 65535 when pinned: a restarting agent takes the next port while the old one drains",
                ));
            }
        }
        Ok(())
    }

    fn validate_peers(&self) -> Result<Vec<IdentityPattern>, ConfigError> {
        let t = &self.tunnel;
        if t.keep_alive.is_zero() || t.keep_alive >= t.idle_timeout {
            return Err(ConfigError::invalid(
                "tunnel.keep_alive",
                "must be above 0 and below tunnel.idle_timeout",
            ));
        }
        if !(64 << 10..=1 << 30).contains(&t.udp_buffer_bytes) {
            return Err(ConfigError::invalid("tunnel.udp_buffer_bytes", "must be between 64 KiB and 1 GiB"));
        }
        let mut identities = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter().enumerate() {
            let field = |f: &str| format!("peers[{i}].{f}");
            if p.name.is_empty() || p.name == VIA_DIRECT {
                return Err(ConfigError::invalid(
                    field("name"),
                    format!("`{}` is reserved or empty", p.name),
                ));
            }
            if let Some(j) = self.peers[..i].iter().position(|q| q.name == p.name) {
                return Err(ConfigError::invalid(
                    field("name"),
                    format!("`{}` is also peers[{j}].name", p.name),
                ));
            }
            let identity = IdentityPattern::parse(&p.identity)
                .map_err(|e| ConfigError::invalid(field("identity"), e.to_string()))?;
            if let Some(j) = self.peers[..i].iter().position(|q| q.identity == p.identity) {
                return Err(ConfigError::invalid(field("identity"), format!("also peers[{j}].identity")));
            }
            if !(1..=16).contains(&p.connections) {
                return Err(ConfigError::invalid(field("connections"), "must be between 1 and 16"));
            }
            if let Some(a) = p.dial.iter().find(|a| a.port() == 0 || a.ip().is_unspecified()) {
                return Err(ConfigError::invalid(field("dial"), format!("{a} is not a dialable address")));
            }
            if p.dial.is_empty() && t.listen.is_none() {
                return Err(ConfigError::invalid(
                    field("dial"),
                    format!(
                        "`{}` has no dial addresses and tunnel.listen is not set: nothing would ever connect",
                        p.name
                    ),
                ));
            }
            identities.push(identity);
        }
        Ok(identities)
    }

    /// A relay listens, learns, and does nothing else; `peers[].relay`
    /// names a relay peer of a connector, by exact identity.
    fn validate_relay(
        &self,
        routes: &[ValidRoute],
        serves: bool,
        learn: &[Vec<IpNet>],
    ) -> Result<(), ConfigError> {
        for (i, p) in self.peers.iter().enumerate() {
            if p.relay && p.identity.contains('*') {
                return Err(ConfigError::invalid(
                    format!("peers[{i}].relay"),
                    format!("`{}` has an identity pattern: a relay is trusted by one exact identity", p.name),
                ));
            }
            if p.relay && self.relay.is_some() {
                return Err(ConfigError::invalid(
                    format!("peers[{i}].relay"),
                    "a relay does not forward through another relay",
                ));
            }
        }
        if self.relay.is_none() {
            return Ok(());
        }
        let refuse = |field: &str, why: &str| Err(ConfigError::invalid(field, why));
        if self.tunnel.listen.is_none() {
            return refuse("tunnel.listen", "a relay needs it: client agents and connectors dial the relay");
        }
        if !routes.is_empty() {
            return refuse("routes", "a relay steers nothing (it forwards tunnel streams)");
        }
        if serves {
            return refuse("serve", "a relay dials nothing (run a connector for that)");
        }
        if learn.iter().all(Vec::is_empty) {
            return refuse("peers", "a relay needs at least one peer with learn: its connectors");
        }
        Ok(())
    }

    /// The routes, parsed and checked against each other and the listeners.
    /// `peers[].learn`, parsed: CIDRs no route could cover refused, and
    /// only for peers with one exact identity.
    fn parse_learn(&self, guard: &RouteGuard) -> Result<Vec<Vec<IpNet>>, ConfigError> {
        let mut out = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.iter().enumerate() {
            if !p.learn.is_empty() && p.identity.contains('*') {
                return Err(ConfigError::invalid(
                    format!("peers[{i}].learn"),
                    format!(
                        "`{}` has an identity pattern ({}): routes are learned only from a peer with one exact identity",
                        p.name, p.identity
                    ),
                ));
            }
            let mut nets = Vec::with_capacity(p.learn.len());
            for (j, c) in p.learn.iter().enumerate() {
                let field = || format!("peers[{i}].learn[{j}]");
                let net = parse_cidr(c).map_err(|e| ConfigError::invalid(field(), e))?;
                guard.check(net).map_err(|e| ConfigError::invalid(field(), e))?;
                nets.push(net);
            }
            out.push(nets);
        }
        Ok(out)
    }

    fn parse_routes(&self, guard: &RouteGuard) -> Result<Vec<ValidRoute>, ConfigError> {
        let never_served = ranges::parse_table(&NEVER_SERVED);
        let mut out: Vec<ValidRoute> = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let net =
                parse_cidr(&r.cidr).map_err(|e| ConfigError::invalid(format!("routes[{i}].cidr"), e))?;
            if r.via != VIA_DIRECT && !self.peers.iter().any(|p| p.name == r.via) {
                let known: Vec<&str> =
                    std::iter::once(VIA_DIRECT).chain(self.peers.iter().map(|p| p.name.as_str())).collect();
                return Err(ConfigError::invalid(
                    format!("routes[{i}].via"),
                    format!("unknown upstream `{}` (known: {})", r.via, known.join(", ")),
                ));
            }
            // A route trusts one peer with its flows: under a pattern, any
            // certificate that matches could stand in for the connector.
            if let Some(p) = self.peers.iter().find(|p| p.name == r.via && p.identity.contains('*')) {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].via"),
                    format!(
                        "`{}` has an identity pattern ({}): a route needs a peer with one exact identity",
                        p.name, p.identity
                    ),
                ));
            }
            let field = || format!("routes[{i}].cidr");
            guard.check(net).map_err(|e| ConfigError::invalid(field(), e))?;
            if r.via == VIA_DIRECT
                && let Some((range, why)) = ranges::overlapped(net, &never_served)
            {
                return Err(ConfigError::invalid(
                    field(),
                    format!(
                        "{net} overlaps {range}, {why}: a `via: direct` route is dialled by the agent itself, which never dials there"
                    ),
                ));
            }
            if let Some((j, other)) = out.iter().enumerate().find(|(_, o)| overlaps(&o.net, &net)) {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].cidr"),
                    format!(
                        "{net} overlaps routes[{j}].cidr {}; each address may match one route",
                        other.net
                    ),
                ));
            }
            if r.via == VIA_DIRECT && r.on_no_peer.is_some() {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].on_no_peer"),
                    "applies to routes via a peer; a `via: direct` route has no peer to wait for",
                ));
            }
            out.push(ValidRoute { net, via: r.via.clone(), on_no_peer: r.on_no_peer.unwrap_or_default() });
        }
        for (family, v4) in [("IPv4", true), ("IPv6", false)] {
            let n = out.iter().filter(|r| r.net.addr().is_ipv4() == v4).count();
            if n > ROUTES_MAX_ENTRIES as usize {
                return Err(ConfigError::invalid(
                    "routes",
                    format!(
                        "{n} {family} routes exceed the kernel route trie's capacity of {ROUTES_MAX_ENTRIES}"
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Addresses no route may cover.
    fn reserved_addresses(&self) -> Vec<(&'static str, IpAddr)> {
        let mut v = vec![
            ("the IPv4 loopback", IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ("the IPv6 loopback", IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ("the unspecified address", IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            ("the unspecified address", IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        ];
        let r = &self.steering.redirect;
        v.extend(r.v4.map(|a| ("the redirect listener (steering.redirect.v4)", a.ip())));
        v.extend(r.v6.map(|a| ("the redirect listener (steering.redirect.v6)", a.ip())));
        v
    }

    /// Names of fields that differ from `other` and only take effect on restart.
    pub fn restart_only_changes(&self, other: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.node != other.node {
            v.push("node");
        }
        if self.admin != other.admin {
            v.push("admin");
        }
        if self.workers != other.workers {
            v.push("workers");
        }
        if self.log != other.log {
            v.push("log");
        }
        if self.steering.cgroup != other.steering.cgroup {
            v.push("steering.cgroup");
        }
        if self.steering.redirect != other.steering.redirect {
            v.push("steering.redirect");
        }
        let pinning = |c: &Config| {
            let s = &c.steering;
            (s.pin_dir.clone(), s.handover_wait, s.flow_capacity, s.bypass_capacity)
        };
        if pinning(self) != pinning(other) {
            v.push("steering (pin_dir, handover_wait, capacities)");
        }
        if self.tls != other.tls {
            v.push("tls");
        }
        if self.tunnel != other.tunnel {
            v.push("tunnel");
        }
        if self.relay != other.relay {
            v.push("relay");
        }
        let discovers = |c: &Config| c.serve.iter().find(|s| s.kubernetes).map(|s| s.own_node);
        if discovers(self) != discovers(other) {
            v.push("serve[].kubernetes (the discovery is set up at start)");
        }
        // Steering is set up at start only for an agent that routes or
        // learns something (a relay never steers).
        let learns = |c: &Config| c.peers.iter().any(|p| !p.learn.is_empty());
        let steers = |c: &Config| c.relay.is_none() && (!c.routes.is_empty() || learns(c));
        if !steers(self) && steers(other) {
            v.push("routes or peers[].learn (the first needs steering, set up at start)");
        }
        v
    }
}

impl Redirect {
    fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.interface;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
            return Err(ConfigError::invalid(
                "steering.redirect.interface",
                format!("`{name}` is not a valid interface name (1-15 characters, no '/' or spaces)"),
            ));
        }
        if self.v4.is_none() && self.v6.is_none() {
            return Err(ConfigError::invalid("steering.redirect", "v4 and v6 are both disabled"));
        }
        for (field, addr, want_v4) in
            [("steering.redirect.v4", self.v4, true), ("steering.redirect.v6", self.v6, false)]
        {
            let Some(addr) = addr else { continue };
            if addr.is_ipv4() != want_v4 {
                return Err(ConfigError::invalid(
                    field,
                    format!("{addr} is not an IPv{} address", if want_v4 { 4 } else { 6 }),
                ));
            }
            if addr.port() == 0 {
                return Err(ConfigError::invalid(field, "port must not be 0"));
            }
            let ip = addr.ip();
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                // Pods have their own loopback: a redirect there lands in the pod.
                return Err(ConfigError::invalid(
                    field,
                    format!("{ip} is not reachable from pods; use a node-local address such as 169.254.77.1"),
                ));
            }
        }
        Ok(())
    }
}

/// Parses `a.b.c.d/n` or `x::y/n` with host bits clear. A bare address is not
/// accepted: a route must say how wide it is.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text.parse().map_err(|_| {
        format!("`{text}` is not a CIDR (expected e.g. 198.51.100.101/32 or 2001:db8::101/128)")
    })?;
    if net.addr() != net.network() {
        return Err(format!("`{text}` has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

use ranges::overlaps;
