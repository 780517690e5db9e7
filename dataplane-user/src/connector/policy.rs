//! What a connector may dial: default deny, allowed only inside a served
//! CIDR on a served port, and never in the ranges no connector dials.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::{
    config::ValidServe,
    ranges::{self, NEVER_SERVED},
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
}

impl Denial {
    pub const ALL: [Denial; 4] =
        [Denial::NeverServed, Denial::NotServed, Denial::PortNotServed, Denial::OwnAddress];

    pub const fn as_str(self) -> &'static str {
        match self {
            Denial::NeverServed => "never_served",
            Denial::NotServed => "not_served",
            Denial::PortNotServed => "port_not_served",
            Denial::OwnAddress => "own_address",
        }
    }
}

/// What this connector may dial.
#[derive(Clone, Debug)]
pub struct ServePolicy {
    serve: Vec<ValidServe>,
    never: Vec<IpNet>,
}

impl ServePolicy {
    pub fn new(serve: Vec<ValidServe>) -> ServePolicy {
        let never = ranges::parse_table(&NEVER_SERVED).into_iter().map(|(n, _)| n).collect();
        ServePolicy { serve, never }
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
        for s in self.serve.iter().filter(|s| s.net.contains(&ip)) {
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
        ServePolicy::new(vec![
            ValidServe { net: "198.51.100.101/32".parse().expect("net"), ports: vec![6443], own_node: false },
            ValidServe {
                net: "2001:db8::/64".parse().expect("net"),
                ports: vec![443, 6443],
                own_node: false,
            },
            ValidServe { net: "192.0.2.10/32".parse().expect("net"), ports: vec![6443], own_node: true },
        ])
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
        let nat64 = ServePolicy::new(vec![ValidServe {
            net: "64:ff9b::/96".parse().expect("net"),
            ports: vec![6443],
            own_node: false,
        }]);
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
