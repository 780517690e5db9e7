//! Address ranges the agent treats specially, and the other spellings an
//! IPv4 address has inside IPv6 (mapped `::ffff:a.b.c.d`, compatible
//! `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4 `2002:aabb:ccdd::`), so a
//! check made on one spelling cannot be dodged with another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Ranges a connector never dials, whatever it is configured to serve: the
/// classic SSRF targets on a node. Routes with `via: direct` (the agent
/// dials them itself) may not cover them either.
pub const NEVER_SERVED: [(&str, &str); 8] = [
    ("0.0.0.0/8", "unspecified/this-network addresses"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (incl. the cloud metadata address 169.254.169.254)"),
    ("224.0.0.0/4", "multicast"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fd00:ec2::254/128", "the cloud metadata address"),
];

/// Ranges no route may cover: steering them would loop or break the node.
pub const NEVER_ROUTED: [(&str, &str); 4] = [
    ("0.0.0.0/8", "unspecified/this-network addresses"),
    ("127.0.0.0/8", "loopback"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
];

/// IPv6 prefixes that embed an IPv4 address, and the bit at which its 32
/// bits start.
const EMBEDDINGS: [(Ipv6Addr, u8, u8); 4] = [
    // ::ffff:0:0/96, IPv4-mapped
    (Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96, 96),
    // ::/96, IPv4-compatible (deprecated, still routable by some stacks)
    (Ipv6Addr::UNSPECIFIED, 96, 96),
    // 64:ff9b::/96, the NAT64 well-known prefix
    (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96, 96),
    // 2002::/16, 6to4
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16, 16),
];

/// The static ranges of a table such as [`NEVER_SERVED`], parsed.
pub fn parse_table(table: &[(&str, &'static str)]) -> Vec<(IpNet, &'static str)> {
    table.iter().map(|(c, why)| (c.parse().expect("static CIDR"), *why)).collect()
}

/// The IPv4 ranges an IPv6 range also stands for, one per embedding it
/// overlaps (all of IPv4 where it covers a whole embedding prefix).
pub fn ipv4_spellings(net: Ipv6Net) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    for (base, prefix_len, at) in EMBEDDINGS {
        let embedding = Ipv6Net::new(base, prefix_len).expect("static prefix");
        if !(embedding.contains(&net.network()) || net.contains(&embedding.network())) {
            continue;
        }
        if net.prefix_len() <= prefix_len {
            out.push(Ipv4Net::default());
            continue;
        }
        let bits = u128::from(net.network());
        let v4 = (bits >> (128 - u32::from(at) - 32)) as u32;
        let len = (net.prefix_len() - at).min(32);
        out.push(Ipv4Net::new(Ipv4Addr::from(v4), len).expect("length at most 32").trunc());
    }
    out
}

/// Every spelling of `net` to check: itself, and for IPv6 the IPv4 ranges it
/// embeds.
pub fn spellings(net: IpNet) -> Vec<IpNet> {
    let mut out = vec![net];
    if let IpNet::V6(v6) = net {
        out.extend(ipv4_spellings(v6).into_iter().map(IpNet::V4));
    }
    out
}

/// Every spelling of one address: itself (IPv4-mapped shown as IPv4), and
/// for IPv6 the IPv4 addresses it embeds.
pub fn address_spellings(ip: IpAddr) -> Vec<IpAddr> {
    let ip = ip.to_canonical();
    let mut out = vec![ip];
    if let IpAddr::V6(v6) = ip {
        let host = Ipv6Net::new(v6, 128).expect("128 is a valid length");
        out.extend(ipv4_spellings(host).into_iter().map(|n| IpAddr::V4(n.network())));
    }
    out
}

/// The first of `table` that `net` overlaps in any spelling.
pub fn overlapped<'a>(net: IpNet, table: &'a [(IpNet, &'static str)]) -> Option<&'a (IpNet, &'static str)> {
    spellings(net).into_iter().find_map(|s| table.iter().find(|(range, _)| overlaps(range, &s)))
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn ipv6_ranges_name_the_ipv4_they_embed() {
        let v4 = |s: &str| match net(s) {
            IpNet::V6(n) => ipv4_spellings(n),
            IpNet::V4(_) => unreachable!(),
        };
        assert_eq!(v4("::ffff:127.0.0.1/128"), vec!["127.0.0.1/32".parse().expect("net")]);
        assert_eq!(v4("64:ff9b::a9fe:a9fe/128"), vec!["169.254.169.254/32".parse().expect("net")]);
        assert_eq!(v4("2002:7f00:1::/48"), vec!["127.0.0.1/32".parse().expect("net")]);
        assert_eq!(v4("2002:7f00::/24"), vec!["127.0.0.0/8".parse().expect("net")]);
        // Covering a whole embedding prefix covers all of IPv4.
        assert_eq!(v4("::ffff:0.0.0.0/96"), vec![Ipv4Net::default()]);
        assert!(v4("2001:db8::/32").is_empty());
        // ::/0 covers every embedding.
        assert_eq!(v4("::/0").len(), 4);
    }

    #[test]
    fn loopback_is_found_in_every_spelling() {
        let never = parse_table(&NEVER_ROUTED);
        for s in
            ["127.0.0.2/32", "127.128.0.0/9", "::ffff:127.0.0.1/128", "::ffff:0.0.0.0/96", "::7f00:1/128"]
        {
            assert!(overlapped(net(s), &never).is_some(), "{s}");
        }
        for s in ["198.51.100.101/32", "2001:db8::101/128", "::ffff:198.51.100.101/128"] {
            assert!(overlapped(net(s), &never).is_none(), "{s}");
        }
        let ips: Vec<IpAddr> = address_spellings("64:ff9b::7f00:1".parse().expect("ip"));
        assert!(ips.contains(&"127.0.0.1".parse().expect("ip")), "{ips:?}");
    }
}
