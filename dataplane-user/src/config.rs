//! The agent's YAML configuration: types, defaults, and validation whose errors
//! name the offending field.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

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
    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
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
    #[serde(default)]
    pub steering: Steering,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// CIDRs whose TCP connects are steered into the agent.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// Kernel-side steering settings. Changing them needs a restart.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Steering {
    /// cgroup v2 directory the programs attach to; default: the cgroup v2 mount.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub redirect: Redirect,
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
}

fn default_node() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}
fn default_interface() -> String {
    "dataplane0".to_owned()
}
fn default_v4() -> Option<SocketAddr> {
    Some(SocketAddr::new(Ipv4Addr::new(169, 254, 77, 1).into(), 15001))
}
fn default_v6() -> Option<SocketAddr> {
    Some(SocketAddr::new(Ipv6Addr::new(0xfd00, 0xd47a, 0, 0, 0, 0, 0, 1).into(), 15001))
}
fn default_connect() -> Duration {
    Duration::from_secs(10)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

/// A validated route: the parsed network plus where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRoute {
    pub net: IpNet,
    pub via: String,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text)
    }

    /// Parses and validates YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything serde cannot: addresses, CIDRs, overlaps, references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.trim().is_empty() {
            return Err(ConfigError::invalid("node", "must not be empty"));
        }
        self.steering.redirect.validate()?;
        self.valid_routes()?;
        Ok(())
    }

    /// The routes, parsed and checked against each other and the listeners.
    pub fn valid_routes(&self) -> Result<Vec<ValidRoute>, ConfigError> {
        if self.routes.is_empty() {
            return Err(ConfigError::invalid(
                "routes",
                "must list at least one route (an agent without routes steers nothing)",
            ));
        }
        let mut out: Vec<ValidRoute> = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let net =
                parse_cidr(&r.cidr).map_err(|e| ConfigError::invalid(format!("routes[{i}].cidr"), e))?;
            if r.via != VIA_DIRECT {
                return Err(ConfigError::invalid(
                    format!("routes[{i}].via"),
                    format!(
                        "unknown upstream `{}`: no peers are configured; the only upstream is `{VIA_DIRECT}`",
                        r.via
                    ),
                ));
            }
            for (what, addr) in self.reserved_addresses() {
                if net.contains(&addr) {
                    return Err(ConfigError::invalid(
                        format!("routes[{i}].cidr"),
                        format!("{net} covers {what} {addr}; steering it would loop or break the node"),
                    ));
                }
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
            out.push(ValidRoute { net, via: r.via.clone() });
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
        if self.steering.cgroup != other.steering.cgroup {
            v.push("steering.cgroup");
        }
        if self.steering.redirect != other.steering.redirect {
            v.push("steering.redirect");
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

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests;
