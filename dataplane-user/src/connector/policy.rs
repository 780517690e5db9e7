//! What a connector may dial, and for whom: default deny, allowed only
//! inside a served CIDR on a served port, never in the ranges no connector
//! dials, and only for a peer identity the policy rules grant it to.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::{
    config::{ValidRule, ValidServe},
    ranges::{self, NEVER_SERVED},
    tunnel::{Advert, PeerId},
};

/// Why a destination was refused, for logs and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Denial {
    /// In a range no connector ever dials (loopback, link-local, metadata, ...).
    NeverServed,
    /// Outside every served CIDR.
    NotServed,
    /// In a served CIDR, but not on a served port.
    PortNotServed,
    /// One of the connector's own addresses (it never dials itself).
    OwnAddress,
    /// Served, but no policy rule grants it to the peer's identity.
    NotAllowed,
}

impl Denial {
    pub const ALL: [Denial; 5] = [
        Denial::NeverServed,
        Denial::NotServed,
        Denial::PortNotServed,
        Denial::OwnAddress,
        Denial::NotAllowed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Denial::NeverServed => "never_served",
            Denial::NotServed => "not_served",
            Denial::PortNotServed => "port_not_served",
            Denial::OwnAddress => "own_address",
            Denial::NotAllowed => "not_allowed",
        }
    }
}

/// What this connector may dial, and for whom.
#[derive(Clone, Debug)]
pub struct ServePolicy {
    serve: Vec<ValidServe>,
    /// The API server endpoints discovered now (`serve[].kubernetes`), each
    /// an address with the ports its EndpointSlice publishes.
    discovered: Vec<ValidServe>,
    never: Vec<IpNet>,
    rules: Vec<ValidRule>,
}

impl ServePolicy {
    pub fn new(serve: Vec<ValidServe>, rules: Vec<ValidRule>) -> ServePolicy {
        let never = ranges::parse_table(&NEVER_SERVED).into_iter().map(|(n, _)| n).collect();
        ServePolicy { serve, discovered: Vec::new(), never, rules }
    }

    /// This policy with `discovered` as the API server endpoints served.
    pub fn with_discovered(&self, discovered: Vec<ValidServe>) -> ServePolicy {
        ServePolicy { discovered, ..self.clone() }
    }

    /// The API server endpoints served now.
    pub fn discovered(&self) -> &[ValidServe] {
        &self.discovered
    }

    /// Configured ranges, then discovered endpoints.
    fn all_served(&self) -> impl Iterator<Item = &ValidServe> {
        self.serve.iter().chain(&self.discovered)
    }

    /// [`ServePolicy::check`], then whether `client` may reach it: without
    /// rules, a peer configured by its exact identity may reach everything
    /// served and one admitted by a pattern nothing; with rules, only what
    /// a rule matching its identity lists.
    pub fn check_for(
        &self,
        client: &PeerId,
        dst: SocketAddr,
        own: impl Fn(IpAddr) -> bool,
    ) -> Result<Target, Denial> {
        let target = self.check(dst, own)?;
        let granted = if self.rules.is_empty() {
            client.exact
        } else {
            self.rules.iter().any(|r| {
                let (ip, port) = (target.addr.ip(), target.addr.port());
                r.identities.iter().any(|p| p.matches(&client.identity))
                    && (r.to.iter().any(|(net, ports)| net.contains(&ip) && ports.contains(&port))
                        || r.to_kubernetes
                            && self.discovered.iter().any(|d| d.net.contains(&ip) && d.ports.contains(&port)))
            })
        };
        if granted { Ok(target) } else { Err(Denial::NotAllowed) }
    }

    /// What `client` may reach, as routes to advertise to it: everything
    /// served for a peer listed by its exact identity when there are no
    /// rules (nothing for one admitted by a pattern), else what the rules
    /// matching its identity list. A few addresses inside (the connector's
    /// own, the ranges no connector dials) are still refused per flow.
    pub fn granted_to(&self, client: &PeerId) -> Vec<Advert> {
        if self.rules.is_empty() {
            return if client.exact { self.served() } else { Vec::new() };
        }
        let mut out: Vec<Advert> = {
            let rules: Vec<&ValidRule> = self
                .rules
                .iter()
                .filter(|r| r.identities.iter().any(|p| p.matches(&client.identity)))
                .collect();
            let discovered = rules.iter().any(|r| r.to_kubernetes).then_some(&self.discovered);
            let ranges = rules
                .iter()
                .flat_map(|r| &r.to)
                .map(|(net, ports)| Advert { net: *net, ports: ports.clone() });
            ranges
                .chain(
                    discovered.into_iter().flatten().map(|d| Advert { net: d.net, ports: d.ports.clone() }),
                )
                .collect()
        };
        tidy(&mut out);
        out
    }

    /// Everything served, as routes to advertise.
    pub fn served(&self) -> Vec<Advert> {
        let mut out: Vec<Advert> =
            self.all_served().map(|s| Advert { net: s.net, ports: s.ports.clone() }).collect();
        tidy(&mut out);
        out
    }

    /// Default deny: allowed only inside a served CIDR on a served port, and
    /// never in the ranges no connector dials, nor at one of its own
    /// addresses (`own`) unless the serve entry says `own_node`, however the
    /// address is spelled (`::ffff:127.0.0.1` is loopback).
    pub fn check(&self, dst: SocketAddr, own: impl Fn(IpAddr) -> bool) -> Result<Target, Denial> {
        let ip: IpAddr = dst.ip().to_canonical();
        // Every spelling: 64:ff9b::a9fe:a9fe is the metadata address through
        // a NAT64 gateway, 2002:7f00:1:: loopback through 6to4.
        let spellings = ranges::address_spellings(ip);
        for spelling in &spellings {
            if self.never.iter().any(|n| n.contains(spelling))
                || spelling.is_multicast()
                || spelling.is_unspecified()
            {
                return Err(Denial::NeverServed);
            }
        }
        let mut in_cidr = false;
        for s in self.all_served().filter(|s| s.net.contains(&ip)) {
            in_cidr = true;
            if s.ports.contains(&dst.port()) {
                if !s.own_node && spellings.iter().any(|&a| own(a)) {
                    return Err(Denial::OwnAddress);
                }
                return Ok(Target { addr: SocketAddr::new(ip, dst.port()), own_node: s.own_node });
            }
        }
        Err(if in_cidr { Denial::PortNotServed } else { Denial::NotServed })
    }
}

/// Ports sorted and unique, routes sorted and unique.
fn tidy(routes: &mut Vec<Advert>) {
    for a in routes.iter_mut() {
        a.ports.sort_unstable();
        a.ports.dedup();
    }
    routes.sort();
    routes.dedup();
}

/// Where a checked stream may be dialled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Its serve entry allows this node's own addresses.
    pub own_node: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ServePolicy {
        ServePolicy::new(served(), Vec::new())
    }

    fn served() -> Vec<ValidServe> {
        vec![
            ValidServe { net: "198.51.100.101/32".parse().expect("net"), ports: vec![6443], own_node: false },
            ValidServe {
                net: "2001:db8::/64".parse().expect("net"),
                ports: vec![443, 6443],
                own_node: false,
            },
            ValidServe { net: "192.0.2.10/32".parse().expect("net"), ports: vec![6443], own_node: true },
        ]
    }

    fn peer(identity: &str, exact: bool) -> PeerId {
        PeerId { name: "nodes".into(), identity: identity.into(), exact }
    }

    #[test]
    fn without_rules_only_exact_peers_reach_what_is_served() {
        let p = policy();
        let dst = "198.51.100.101:6443".parse().expect("addr");
        assert!(p.check_for(&peer("spiffe://t/connector/a", true), dst, |_| false).is_ok());
        assert_eq!(
            p.check_for(&peer("spiffe://t/node/a", false), dst, |_| false),
            Err(Denial::NotAllowed),
            "a pattern grants a connection, not a destination"
        );
        // What is not served stays refused as such, for everyone.
        let unserved = "198.51.100.102:6443".parse().expect("addr");
        assert_eq!(
            p.check_for(&peer("spiffe://t/connector/a", true), unserved, |_| false),
            Err(Denial::NotServed)
        );
    }

    #[test]
    fn rules_grant_destinations_to_identities_by_pattern() {
        let rule = |name: &str, ids: &[&str], to: &[(&str, &[u16])]| ValidRule {
            name: name.into(),
            identities: ids
                .iter()
                .map(|i| crate::identity::IdentityPattern::parse(i).expect("pattern"))
                .collect(),
            to: to.iter().map(|(n, p)| (n.parse().expect("net"), p.to_vec())).collect(),
            to_kubernetes: false,
        };
        let p = ServePolicy::new(
            served(),
            vec![
                rule("ci", &["spiffe://t/node/ci-*"], &[("198.51.100.101/32", &[6443])]),
                rule(
                    "ops",
                    &["spiffe://t/node/ops-*", "spiffe://t/user/admin"],
                    &[("2001:db8::/64", &[443])],
                ),
            ],
        );
        let ok = |id: &str, exact: bool, dst: &str| {
            p.check_for(&peer(id, exact), dst.parse().expect("addr"), |_| false)
        };
        assert!(ok("spiffe://t/node/ci-1", false, "198.51.100.101:6443").is_ok());
        assert_eq!(ok("spiffe://t/node/ci-1", false, "[2001:db8::5]:443"), Err(Denial::NotAllowed));
        assert!(ok("spiffe://t/node/ops-1", false, "[2001:db8::5]:443").is_ok());
        assert_eq!(
            ok("spiffe://t/node/ops-1", false, "[2001:db8::5]:6443"),
            Err(Denial::NotAllowed),
            "port too"
        );
        assert!(ok("spiffe://t/user/admin", true, "[2001:db8::5]:443").is_ok());
        // With rules, an exact peer gets only what they grant.
        assert_eq!(ok("spiffe://t/connector/x", true, "198.51.100.101:6443"), Err(Denial::NotAllowed));
        // A mapped spelling is checked as the IPv4 it is.
        assert!(ok("spiffe://t/node/ci-1", false, "[::ffff:198.51.100.101]:6443").is_ok());

        // What is advertised to each is what it is granted, no more.
        let granted = |id: &str, exact: bool| {
            p.granted_to(&peer(id, exact))
                .iter()
                .map(|a| (a.net.to_string(), a.ports.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(granted("spiffe://t/node/ci-1", false), vec![("198.51.100.101/32".into(), vec![6443])]);
        assert_eq!(granted("spiffe://t/user/admin", true), vec![("2001:db8::/64".into(), vec![443])]);
        assert_eq!(granted("spiffe://t/connector/x", true), vec![]);
    }

    #[test]
    fn without_rules_exact_peers_are_advertised_everything_served() {
        let p = policy();
        let all = p.granted_to(&peer("spiffe://t/connector/a", true));
        let nets: Vec<String> = all.iter().map(|a| a.net.to_string()).collect();
        assert_eq!(nets, ["192.0.2.10/32", "198.51.100.101/32", "2001:db8::/64"]);
        assert_eq!(all[2].ports, [443, 6443]);
        assert!(p.granted_to(&peer("spiffe://t/node/a", false)).is_empty(), "a pattern peer: nothing");
    }

    fn check(s: &str) -> Result<SocketAddr, Denial> {
        policy().check(s.parse().expect("addr"), |_| false).map(|t| t.addr)
    }

    #[test]
    fn never_dials_its_own_addresses_however_spelled() {
        let own: IpAddr = "198.51.100.101".parse().expect("ip");
        let p = policy();
        for dst in ["198.51.100.101:6443", "[::ffff:198.51.100.101]:6443"] {
            assert_eq!(p.check(dst.parse().expect("addr"), |ip| ip == own), Err(Denial::OwnAddress), "{dst}");
        }
        // Through a served NAT64 prefix, the IPv4 it embeds is seen.
        let nat64 = ServePolicy::new(
            vec![ValidServe {
                net: "64:ff9b::/96".parse().expect("net"),
                ports: vec![6443],
                own_node: false,
            }],
            Vec::new(),
        );
        let dst = "[64:ff9b::c633:6465]:6443".parse().expect("addr");
        assert_eq!(nat64.check(dst, |ip| ip == own), Err(Denial::OwnAddress));
        assert!(p.check("198.51.100.101:6443".parse().expect("addr"), |_| false).is_ok());
        // Unless its serve entry says own_node (a connector on the API
        // server's node).
        let on_node = p.check("192.0.2.10:6443".parse().expect("addr"), |_| true).expect("own_node");
        assert!(on_node.own_node);
        // Loopback never, own_node or not.
        assert_eq!(p.check("127.0.0.1:6443".parse().expect("addr"), |_| true), Err(Denial::NeverServed));
    }

    #[test]
    fn discovered_endpoints_are_served_and_granted_as_they_are_now() {
        let endpoint = |net: &str, port: u16| ValidServe {
            net: net.parse().expect("net"),
            ports: vec![port],
            own_node: false,
        };
        let ops = ValidRule {
            name: "ops".into(),
            identities: vec![
                crate::identity::IdentityPattern::parse("spiffe://t/node/ops-*").expect("pattern"),
            ],
            to: Vec::new(),
            to_kubernetes: true,
        };
        let p = ServePolicy::new(Vec::new(), vec![ops]);
        let ops_node = peer("spiffe://t/node/ops-1", false);
        let dst = "10.0.0.5:6443".parse().expect("addr");
        assert_eq!(p.check_for(&ops_node, dst, |_| false), Err(Denial::NotServed), "nothing discovered yet");
        assert!(p.granted_to(&ops_node).is_empty());

        let p = p.with_discovered(vec![endpoint("10.0.0.5/32", 6443), endpoint("fd00::5/128", 443)]);
        assert!(p.check_for(&ops_node, dst, |_| false).is_ok());
        assert_eq!(
            p.check_for(&ops_node, "10.0.0.5:22".parse().expect("addr"), |_| false),
            Err(Denial::PortNotServed)
        );
        assert_eq!(
            p.check_for(&peer("spiffe://t/node/ci-1", false), dst, |_| false),
            Err(Denial::NotAllowed),
            "the rule names who"
        );
        let granted: Vec<String> =
            p.granted_to(&ops_node).iter().map(|a| format!("{} {:?}", a.net, a.ports)).collect();
        assert_eq!(granted, vec!["10.0.0.5/32 [6443]", "fd00::5/128 [443]"]);

        // A changed set replaces the old one whole; a reloaded policy keeps it.
        let p = p.with_discovered(vec![endpoint("10.0.0.6/32", 6443)]);
        assert_eq!(p.check_for(&ops_node, dst, |_| false), Err(Denial::NotServed));
        let reloaded = ServePolicy::new(Vec::new(), Vec::new()).with_discovered(p.discovered().to_vec());
        assert_eq!(reloaded.served().len(), 1);
        // The ranges no connector dials stay refused, discovered or not.
        let p = p.with_discovered(vec![endpoint("169.254.169.254/32", 80)]);
        assert_eq!(p.check("169.254.169.254:80".parse().expect("addr"), |_| false), Err(Denial::NeverServed));
    }

    #[test]
    fn serves_only_what_is_configured() {
        assert!(check("198.51.100.101:6443").is_ok());
        assert!(check("[2001:db8::5]:443").is_ok());
        assert_eq!(check("198.51.100.101:22"), Err(Denial::PortNotServed));
        assert_eq!(check("198.51.100.102:6443"), Err(Denial::NotServed));
        assert_eq!(check("[2001:db8:1::5]:443"), Err(Denial::NotServed));
    }

    #[test]
    fn never_dials_loopback_link_local_or_metadata_however_spelled() {
        for dst in [
            "127.0.0.1:6443",
            "[::1]:6443",
            "169.254.169.254:80",
            "[fe80::1]:443",
            "[fd00:ec2::254]:80",
            "0.0.0.0:6443",
            "[::]:6443",
            "224.0.0.1:6443",
            "[::ffff:127.0.0.1]:6443",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::a9fe:a9fe]:80",
            "[2002:7f00:1::]:6443",
            "[::7f00:1]:6443",
        ] {
            assert_eq!(check(dst), Err(Denial::NeverServed), "{dst}");
        }
        // A mapped form of a served address is served, dialled as IPv4.
        assert_eq!(check("[::ffff:198.51.100.101]:6443"), Ok("198.51.100.101:6443".parse().expect("addr")));
    }
}
