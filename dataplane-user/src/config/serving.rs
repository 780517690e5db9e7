//! The connector's side of validation: `serve` (ranges, and the
//! `kubernetes` entry) and the `policy` rules that grant them.

use ipnet::IpNet;

use super::{
    Config, ConfigError,
    validate::{KubernetesServe, ValidRule, ValidServe, parse_cidr},
};
use crate::{
    identity::IdentityPattern,
    ranges::{self, NEVER_SERVED},
};

impl Config {
    /// The policy rules, parsed; each destination must lie inside what
    /// `serve` allows, or on a relay inside what it learns (a rule granting
    /// more grants nothing, and says so now rather than at the first
    /// refused flow).
    pub(super) fn parse_policy(
        &self,
        serve: &[ValidServe],
        kubernetes: bool,
        learn: &[Vec<IpNet>],
    ) -> Result<Vec<ValidRule>, ConfigError> {
        let relay = self.relay.is_some();
        if !self.policy.is_empty() && serve.is_empty() && !kubernetes && !relay {
            return Err(ConfigError::invalid(
                "policy",
                "set, but this agent serves nothing (serve is empty)",
            ));
        }
        let mut out: Vec<ValidRule> = Vec::with_capacity(self.policy.len());
        for (i, r) in self.policy.iter().enumerate() {
            let field = |f: &str| format!("policy[{i}].{f}");
            if r.name.is_empty()
                || r.name.len() > 63
                || r.name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ConfigError::invalid(field("name"), "1 to 63 characters, no spaces"));
            }
            if let Some(j) = out.iter().position(|q| q.name == r.name) {
                return Err(ConfigError::invalid(
                    field("name"),
                    format!("`{}` is also policy[{j}].name", r.name),
                ));
            }
            if r.identities.is_empty() {
                return Err(ConfigError::invalid(field("identities"), "list at least one identity pattern"));
            }
            let mut identities = Vec::with_capacity(r.identities.len());
            for (k, id) in r.identities.iter().enumerate() {
                identities.push(IdentityPattern::parse(id).map_err(|e| {
                    ConfigError::invalid(format!("policy[{i}].identities[{k}]"), e.to_string())
                })?);
            }
            if r.to.is_empty() {
                return Err(ConfigError::invalid(field("to"), "list at least one destination"));
            }
            let mut to = Vec::with_capacity(r.to.len());
            let mut to_kubernetes = false;
            for (k, t) in r.to.iter().enumerate() {
                let at = |f: &str| format!("policy[{i}].to[{k}].{f}");
                let cidr = match (&t.cidr, t.kubernetes) {
                    (Some(_), true) => {
                        return Err(ConfigError::invalid(
                            at("kubernetes"),
                            "set either cidr or kubernetes, not both",
                        ));
                    }
                    (None, false) => {
                        return Err(ConfigError::invalid(
                            at("cidr"),
                            "set cidr (with ports) or kubernetes: true",
                        ));
                    }
                    (None, true) if !t.ports.is_empty() => {
                        return Err(ConfigError::invalid(
                            at("ports"),
                            "not with kubernetes: the ports are those the EndpointSlices publish",
                        ));
                    }
                    (None, true) if !kubernetes => {
                        return Err(ConfigError::invalid(
                            at("kubernetes"),
                            "no serve entry has kubernetes: true, so there is nothing discovered to grant",
                        ));
                    }
                    (None, true) => {
                        to_kubernetes = true;
                        continue;
                    }
                    (Some(cidr), false) => cidr,
                };
                let net = parse_cidr(cidr).map_err(|e| ConfigError::invalid(at("cidr"), e))?;
                if t.ports.is_empty() || t.ports.contains(&0) {
                    return Err(ConfigError::invalid(at("ports"), "list at least one port, none of them 0"));
                }
                if relay {
                    if !learn.iter().flatten().any(|l| l.contains(&net)) {
                        return Err(ConfigError::invalid(
                            at("cidr"),
                            format!(
                                "{net} is not inside any peer's learn: the relay would never forward there"
                            ),
                        ));
                    }
                    to.push((net, t.ports.clone()));
                    continue;
                }
                for &port in &t.ports {
                    let served = serve.iter().any(|s| {
                        s.ports.contains(&port)
                            && s.net.contains(&net.network())
                            && s.net.contains(&net.broadcast())
                    });
                    if !served {
                        return Err(ConfigError::invalid(
                            at("cidr"),
                            format!(
                                "{net} port {port} is not inside one serve entry: the rule would grant nothing there"
                            ),
                        ));
                    }
                }
                to.push((net, t.ports.clone()));
            }
            out.push(ValidRule { name: r.name.clone(), identities, to, to_kubernetes });
        }
        Ok(out)
    }

    /// The serve entries, parsed, checked against the ranges never served.
    /// The `kubernetes` entry (at most one, without `cidr` or `ports`) comes
    /// apart from the ranges.
    pub(super) fn parse_serve(&self) -> Result<(Vec<ValidServe>, Option<KubernetesServe>), ConfigError> {
        let never = ranges::parse_table(&NEVER_SERVED);
        let mut out = Vec::with_capacity(self.serve.len());
        let mut kubernetes: Option<(usize, KubernetesServe)> = None;
        for (i, s) in self.serve.iter().enumerate() {
            let cidr = match (&s.cidr, s.kubernetes) {
                (Some(_), true) => {
                    return Err(ConfigError::invalid(
                        format!("serve[{i}].kubernetes"),
                        "set either cidr (with ports) or kubernetes, not both",
                    ));
                }
                (None, false) => {
                    return Err(ConfigError::invalid(
                        format!("serve[{i}].cidr"),
                        "set cidr (with ports) or kubernetes: true",
                    ));
                }
                (None, true) => {
                    if !s.ports.is_empty() {
                        return Err(ConfigError::invalid(
                            format!("serve[{i}].ports"),
                            "not with kubernetes: the ports are those the EndpointSlices publish",
                        ));
                    }
                    if let Some((j, _)) = kubernetes {
                        return Err(ConfigError::invalid(
                            format!("serve[{i}].kubernetes"),
                            format!("serve[{j}] already serves this cluster's API server"),
                        ));
                    }
                    kubernetes = Some((i, KubernetesServe { own_node: s.own_node }));
                    continue;
                }
                (Some(cidr), false) => cidr,
            };
            let net = parse_cidr(cidr).map_err(|e| ConfigError::invalid(format!("serve[{i}].cidr"), e))?;
            if let Some((range, why)) = ranges::overlapped(net, &never) {
                return Err(ConfigError::invalid(
                    format!("serve[{i}].cidr"),
                    format!("{net} overlaps {range}, {why}, which a connector never dials"),
                ));
            }
            if s.ports.is_empty() || s.ports.contains(&0) {
                return Err(ConfigError::invalid(
                    format!("serve[{i}].ports"),
                    "list at least one port, none of them 0",
                ));
            }
            out.push(ValidServe { net, ports: s.ports.clone(), own_node: s.own_node });
        }
        Ok((out, kubernetes.map(|(_, k)| k)))
    }
}
