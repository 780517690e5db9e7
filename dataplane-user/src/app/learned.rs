//! Learned routes: what peers advertise on their control streams, turned
//! into routes this node steers. A peer's advertised route counts only
//! inside its `peers[].learn` CIDRs (and never where no route may go, such
//! as loopback); one outside is refused on its own, and the peer is sent
//! streams only for the routes taken from it. Then the merge with the
//! configured routes: a learned route that overlaps one of them is refused
//! (the configured route wins), as is one overlapping a learned route
//! already taken; every refusal is kept with its reason, for the log and
//! `/status`. Replicas advertising the same network make one route.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

use crate::{
    config::ValidConfig,
    ranges::overlaps,
    tunnel::{Advert, Advertisement, Trust, Tunnel},
};
use dataplane_common::ROUTES_MAX_ENTRIES;

/// The learned routes to steer, and what was refused, by what it is.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Learned {
    pub nets: Vec<IpNet>,
    pub refused: BTreeMap<String, String>,
    /// Per connection, the advertisement judged and its routes that were
    /// taken: streams for learned routes go only to these, for these.
    pub trusted: Trust,
    /// What the trusted connections serve in the learned routes (a relay
    /// advertises it on).
    pub served: Vec<Advert>,
}

/// What `tunnel`'s live connections advertise, as learned routes.
pub(super) fn learned_routes(config: &ValidConfig, tunnel: Option<&Tunnel>) -> Learned {
    let Some(tunnel) = tunnel else { return Learned::default() };
    merge(config, &tunnel.advertisements())
}

/// [`learned_routes`] over the advertisements given.
pub(super) fn merge(config: &ValidConfig, ads: &[Advertisement]) -> Learned {
    let guard = config.route_guard();
    let mut candidates = BTreeSet::new();
    let mut refused = BTreeMap::new();
    let mut taken = Vec::new();
    for Advertisement { peer, connection, routes } in ads {
        let allowed = config.valid_learn(peer);
        if allowed.is_empty() {
            // Not learning from this peer: nothing to refuse.
            continue;
        }
        // Each route on its own: one outside the peer's bounds is refused
        // (and said so); the rest still count.
        let mut ok = Vec::new();
        for a in routes.iter() {
            let why = if allowed.iter().any(|l| l.contains(&a.net)) {
                guard.check(a.net).err()
            } else {
                Some(format!("lies outside peers[{peer}].learn"))
            };
            match why {
                Some(why) => {
                    refused.insert(a.net.to_string(), format!("advertised by {peer}: {why}"));
                }
                None => {
                    candidates.insert(a.net);
                    ok.push(a.clone());
                }
            }
        }
        taken.push((*connection, routes.clone(), ok));
    }
    let configured = config.valid_routes();
    let mut nets: Vec<IpNet> = Vec::new();
    for net in candidates {
        if let Some(r) = configured.iter().find(|r| overlaps(&r.net, &net)) {
            refused.insert(net.to_string(), format!("overlaps the configured route {}, which wins", r.net));
            continue;
        }
        if let Some(o) = nets.iter().find(|o| overlaps(o, &net)) {
            refused.insert(net.to_string(), format!("overlaps the learned route {o}"));
            continue;
        }
        let family = |n: &IpNet| n.addr().is_ipv4() == net.addr().is_ipv4();
        let used =
            configured.iter().filter(|r| family(&r.net)).count() + nets.iter().filter(|n| family(n)).count();
        if used >= ROUTES_MAX_ENTRIES as usize {
            refused
                .insert(net.to_string(), format!("the kernel route trie holds {ROUTES_MAX_ENTRIES} routes"));
            continue;
        }
        nets.push(net);
    }
    // What each connection may be sent streams for: its routes that were
    // learned, and nothing it advertised beyond them.
    let trusted: Trust = taken
        .into_iter()
        .map(|(c, judged, ok)| {
            (c, (judged, ok.into_iter().filter(|a| nets.contains(&a.net)).collect::<Vec<_>>()))
        })
        .filter(|(_, (_, routes))| !routes.is_empty())
        .collect();
    let mut served: Vec<Advert> = trusted.values().flat_map(|(_, r)| r).cloned().collect();
    served.sort();
    served.dedup();
    Learned { nets, refused, trusted, served }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(routes: &str) -> ValidConfig {
        let text = format!(
            "tls: {{ ca: /c, cert: /c, key: /k }}\npeers:\n  - {{ name: a, dial: ['192.0.2.1:4433'], identity: 'spiffe://t/a', learn: ['198.51.100.0/24', '2001:db8::/32'] }}\n  \
             - {{ name: b, dial: ['192.0.2.2:4433'], identity: 'spiffe://t/b', learn: ['198.51.100.0/24'] }}\n  \
             - {{ name: c, dial: ['192.0.2.3:4433'], identity: 'spiffe://t/c' }}\n{routes}"
        );
        Config::parse(&text).expect("valid")
    }

    fn ad(peer: &str, nets: &[&str]) -> Advertisement {
        let routes: Vec<Advert> =
            nets.iter().map(|n| Advert { net: n.parse().expect("net"), ports: vec![6443] }).collect();
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let connection = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Advertisement { peer: peer.into(), connection, routes: routes.into() }
    }

    fn nets(l: &Learned) -> Vec<String> {
        l.nets.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn replicas_make_one_route_and_unlisted_peers_teach_nothing() {
        let c = config("");
        let l = merge(
            &c,
            &[
                ad("a", &["198.51.100.101/32", "2001:db8::101/128"]),
                ad("b", &["198.51.100.101/32"]),
                ad("c", &["203.0.113.0/24"]),
            ],
        );
        assert_eq!(nets(&l), ["198.51.100.101/32", "2001:db8::101/128"]);
        assert!(l.refused.is_empty(), "{:?}", l.refused);
        assert_eq!(l.trusted.len(), 2, "a's and b's connections, not c's");
        assert_eq!(l.served.len(), 2, "the replicas' identical entries merged");
    }

    #[test]
    fn a_route_outside_learn_is_refused_and_never_sent_streams() {
        let c = config("");
        // b may not teach IPv6: that route is refused, the other taken.
        let l = merge(&c, &[ad("b", &["198.51.100.101/32", "2001:db8::101/128"])]);
        assert_eq!(nets(&l), ["198.51.100.101/32"]);
        let why = &l.refused["2001:db8::101/128"];
        assert!(why.contains("advertised by b") && why.contains("outside peers[b].learn"), "{why}");
        let trusted: Vec<&Vec<Advert>> = l.trusted.values().map(|(_, r)| r).collect();
        assert_eq!(trusted.len(), 1);
        assert_eq!(trusted[0].iter().map(|a| a.net.to_string()).collect::<Vec<_>>(), ["198.51.100.101/32"]);
    }

    #[test]
    fn configured_routes_win_and_overlapping_learned_routes_are_refused() {
        let c = config("routes:\n  - { cidr: 198.51.100.101/32, via: a }\n");
        let l =
            merge(&c, &[ad("a", &["198.51.100.101/32", "198.51.100.0/28"]), ad("b", &["198.51.100.0/25"])]);
        // The /32 and the /25 overlap the configured /32; the /28 does not.
        assert_eq!(nets(&l), ["198.51.100.0/28"]);
        assert!(l.refused["198.51.100.101/32"].contains("configured route 198.51.100.101/32"));
        assert!(l.refused["198.51.100.0/25"].contains("configured route"));
        let c = config("");
        let l = merge(&c, &[ad("a", &["198.51.100.0/28"]), ad("b", &["198.51.100.0/25"])]);
        assert_eq!(nets(&l), ["198.51.100.0/25"]);
        assert_eq!(l.refused["198.51.100.0/28"], "overlaps the learned route 198.51.100.0/25");
    }
}
