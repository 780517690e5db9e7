//! The agent's route table: validated routes with ids that stay stable across
//! reloads (and are never reused), and the diff that syncs the kernel tries.

use std::collections::HashMap;

use ipnet::IpNet;

use crate::config::ValidRoute;

/// Where a route's flows go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Dial the original destination from the agent.
    Direct,
    /// Carry the flow through the tunnel to the named peer, which dials it.
    Peer(std::sync::Arc<str>),
    /// A learned route: carry the flow to a peer that advertises the
    /// destination (any of them, spread; none draining while one is not).
    Advertised,
}

impl Upstream {
    fn of(via: &str) -> Upstream {
        if via == crate::config::VIA_DIRECT { Upstream::Direct } else { Upstream::Peer(via.into()) }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// Stable id: the same CIDR keeps its id across reloads, so a flow recorded
    /// by the kernel before a reload still names the right route after it.
    pub id: u32,
    pub net: IpNet,
    pub upstream: Upstream,
    /// While the peer has no live connection, let connects pass untouched
    /// (`on_no_peer: pass`) instead of refusing them.
    pub pass_without_peer: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteTable {
    entries: Vec<RouteEntry>,
    /// The id the next new CIDR gets. Carried from table to table, never
    /// lowered: an id taken from the highest live entry would hand a removed
    /// route's id to a new one, and a flow recorded under the old route would
    /// be served as the new one.
    next_id: u32,
}

/// What to change in the kernel tries to go from one table to another.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Entries to insert or overwrite.
    pub upsert: Vec<RouteEntry>,
    /// Networks to delete.
    pub remove: Vec<IpNet>,
}

impl RouteTable {
    /// Builds a table, keeping the ids `previous` gave to the same CIDRs; a
    /// CIDR new to it gets an id no earlier table has used.
    pub fn build(routes: &[ValidRoute], previous: &RouteTable) -> RouteTable {
        RouteTable::with_learned(routes, &[], previous)
    }

    /// [`RouteTable::build`] with `learned` networks after the configured
    /// routes (the caller has checked they overlap none of them).
    pub fn with_learned(routes: &[ValidRoute], learned: &[IpNet], previous: &RouteTable) -> RouteTable {
        let known: HashMap<IpNet, u32> = previous.entries.iter().map(|e| (e.net, e.id)).collect();
        let mut next_id = previous.next_id;
        let mut id_for = |net: &IpNet| {
            known.get(net).copied().unwrap_or_else(|| {
                next_id += 1;
                next_id - 1
            })
        };
        let configured = routes.iter().map(|r| RouteEntry {
            id: id_for(&r.net),
            net: r.net,
            upstream: Upstream::of(&r.via),
            pass_without_peer: r.on_no_peer == crate::config::OnNoPeer::Pass,
        });
        let mut entries: Vec<RouteEntry> = configured.collect();
        // A learned route rejects while nothing advertises it: it is gone
        // from the table by then, unless its last advertiser just left.
        entries.extend(learned.iter().map(|net| RouteEntry {
            id: id_for(net),
            net: *net,
            upstream: Upstream::Advertised,
            pass_without_peer: false,
        }));
        RouteTable { entries, next_id }
    }

    pub fn entries(&self) -> &[RouteEntry] {
        &self.entries
    }

    pub fn get(&self, id: u32) -> Option<&RouteEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Changes that turn `self` (what the kernel has) into `next`.
    pub fn diff(&self, next: &RouteTable) -> RouteDiff {
        // The kernel keys on (net, id); a changed upstream alone needs no update
        // there, but upserting it is harmless and keeps this simple.
        let upsert = next.entries.iter().filter(|e| !self.entries.contains(e)).cloned().collect();
        let remove = self
            .entries
            .iter()
            .filter(|e| !next.entries.iter().any(|n| n.net == e.net))
            .map(|e| e.net)
            .collect();
        RouteDiff { upsert, remove }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(cidrs: &[&str]) -> Vec<ValidRoute> {
        cidrs
            .iter()
            .map(|c| ValidRoute {
                net: c.parse().expect("cidr"),
                via: "direct".into(),
                on_no_peer: Default::default(),
            })
            .collect()
    }

    #[test]
    fn ids_are_stable_across_rebuilds() {
        let a = RouteTable::build(&routes(&["10.0.0.0/8", "192.0.2.0/24"]), &RouteTable::default());
        let b = RouteTable::build(&routes(&["192.0.2.0/24", "2001:db8::/64"]), &a);
        assert_eq!(a.entries()[1].id, b.entries()[0].id, "same CIDR keeps its id");
        let ids: Vec<u32> = a.entries().iter().chain(b.entries()).map(|e| e.id).collect();
        assert_eq!(ids, vec![0, 1, 1, 2]);
    }

    /// [A0, B1] -> [A0] -> [A0, C]: C must not get B's id, or a flow the
    /// kernel recorded under B before the reload would be served as C.
    #[test]
    fn a_new_cidr_never_reuses_a_removed_routes_id() {
        let a = RouteTable::build(&routes(&["10.0.0.0/8", "192.0.2.0/24"]), &RouteTable::default());
        let b = RouteTable::build(&routes(&["10.0.0.0/8"]), &a);
        let c = RouteTable::build(&routes(&["10.0.0.0/8", "198.51.100.0/24"]), &b);
        let ids = |t: &RouteTable| t.entries().iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!((ids(&a), ids(&b), ids(&c)), (vec![0, 1], vec![0], vec![0, 2]));
        // Not even after every route is gone.
        let empty = RouteTable::build(&[], &c);
        assert_eq!(ids(&RouteTable::build(&routes(&["192.0.2.0/24"]), &empty)), vec![3]);
    }

    #[test]
    fn diff_adds_and_removes() {
        let a = RouteTable::build(&routes(&["10.0.0.0/8", "192.0.2.0/24"]), &RouteTable::default());
        let b = RouteTable::build(&routes(&["192.0.2.0/24", "2001:db8::/64"]), &a);
        let d = a.diff(&b);
        assert_eq!(d.remove, vec!["10.0.0.0/8".parse::<IpNet>().expect("net")]);
        assert_eq!(d.upsert.len(), 1);
        assert_eq!(d.upsert[0].net, "2001:db8::/64".parse::<IpNet>().expect("net"));
        assert_eq!(b.diff(&b), RouteDiff::default());
        let from_empty = RouteTable::default().diff(&b);
        assert_eq!(from_empty.upsert, b.entries().to_vec());
    }

    #[test]
    fn routes_name_their_upstream() {
        let mut r = routes(&["10.0.0.0/8", "192.0.2.0/24"]);
        r[1].via = "private".into();
        let t = RouteTable::build(&r, &RouteTable::default());
        assert_eq!(t.entries()[0].upstream, Upstream::Direct);
        assert_eq!(t.entries()[1].upstream, Upstream::Peer("private".into()));
    }

    #[test]
    fn learned_routes_follow_the_configured_ones_and_keep_their_ids() {
        let learned: Vec<IpNet> = vec!["203.0.113.0/24".parse().expect("net")];
        let a = RouteTable::with_learned(&routes(&["10.0.0.0/8"]), &learned, &RouteTable::default());
        assert_eq!(a.entries()[1].upstream, Upstream::Advertised);
        // Withdrawn, then advertised again: a new id, never the old one.
        let b = RouteTable::with_learned(&routes(&["10.0.0.0/8"]), &[], &a);
        let c = RouteTable::with_learned(&routes(&["10.0.0.0/8"]), &learned, &b);
        let again = RouteTable::with_learned(&routes(&["10.0.0.0/8"]), &learned, &c);
        assert_eq!((a.entries()[1].id, c.entries()[1].id, again.entries()[1].id), (1, 2, 2));
    }

    #[test]
    fn get_finds_routes_by_id() {
        let t = RouteTable::build(&routes(&["10.0.0.0/8", "2001:db8::101/128"]), &RouteTable::default());
        assert_eq!(t.get(1).map(|e| e.net), Some("2001:db8::101/128".parse().expect("net")));
        assert!(t.get(7).is_none());
    }
}
