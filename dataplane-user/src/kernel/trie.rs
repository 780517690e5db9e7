//! The route tries as exact contents: read every entry, write the
//! difference between two contents in a chosen order, check that a trie
//! holds what it should. `Steering::apply` builds its transaction (apply,
//! verify, roll back) from these.

use std::collections::BTreeMap;

use aya::{
    Pod,
    maps::{LpmTrie, MapData, MapError, lpm_trie::Key},
};
use dataplane_common::{self as common, ROUTES_MAX_ENTRIES, RouteValue};
use ipnet::{Ipv4Net, Ipv6Net};

use super::SteeringError;

/// A trie's entries: (prefix length, address words) to value.
pub(super) type Entries<K> = BTreeMap<(u32, K), RouteValue>;

pub(super) fn v4_key(n: &Ipv4Net) -> (u32, u32) {
    (n.prefix_len().into(), common::v4_word(n.network().octets()))
}

pub(super) fn v6_key(n: &Ipv6Net) -> (u32, [u32; 4]) {
    (n.prefix_len().into(), common::v6_words(n.network().octets()))
}

/// In which order a write makes its changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// New and changed entries, then removals: a CIDR being replaced is
    /// never briefly unrouted.
    GapFree,
    /// Removals first: for a rollback, whose trie may be full.
    RemoveFirst,
}

/// Writes left before an injected fault (tests); `usize::MAX` for none.
pub(super) struct Budget(pub usize);

impl Budget {
    fn spend(&mut self) -> Result<(), SteeringError> {
        if self.0 == usize::MAX {
            return Ok(());
        }
        self.0 = self.0.checked_sub(1).ok_or(SteeringError::Injected { writes: 0 })?;
        Ok(())
    }
}

/// Every entry of a trie (the kernel's lookup on an LPM trie matches the
/// longest prefix, so exact contents come from walking its keys).
pub(super) fn read<K: Pod + Ord>(
    trie: &LpmTrie<MapData, K, RouteValue>,
    name: &'static str,
) -> Result<Entries<K>, SteeringError> {
    let map = |source| SteeringError::Map { name, source };
    trie.iter().map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)).map_err(map)).collect()
}

/// Changes a trie holding `from` into one holding `to`.
pub(super) fn write<K: Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, RouteValue>,
    from: &Entries<K>,
    to: &Entries<K>,
    name: &'static str,
    order: Order,
    budget: &mut Budget,
) -> Result<(), SteeringError> {
    match order {
        Order::GapFree => {
            upsert(trie, from, to, name, budget)?;
            remove(trie, from, to, name, budget)
        }
        Order::RemoveFirst => {
            remove(trie, from, to, name, budget)?;
            upsert(trie, from, to, name, budget)
        }
    }
}

/// Inserts what `to` has and `from` lacks or holds with another value.
fn upsert<K: Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, RouteValue>,
    from: &Entries<K>,
    to: &Entries<K>,
    name: &'static str,
    budget: &mut Budget,
) -> Result<(), SteeringError> {
    for (&(len, data), value) in to.iter().filter(|(k, v)| from.get(k) != Some(v)) {
        budget.spend()?;
        trie.insert(&Key::new(len, data), *value, 0).map_err(|source| insert_error(name, source))?;
    }
    Ok(())
}

/// Removes what `from` has and `to` does not.
fn remove<K: Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, RouteValue>,
    from: &Entries<K>,
    to: &Entries<K>,
    name: &'static str,
    budget: &mut Budget,
) -> Result<(), SteeringError> {
    for &(len, data) in from.keys().filter(|k| !to.contains_key(k)) {
        budget.spend()?;
        match trie.remove(&Key::new(len, data)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(SteeringError::Map { name, source }),
        }
    }
    Ok(())
}

fn insert_error(name: &'static str, source: MapError) -> SteeringError {
    match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOSPC) => {
            SteeringError::RoutesFull { name, capacity: ROUTES_MAX_ENTRIES }
        }
        _ => SteeringError::Map { name, source },
    }
}

/// Checks that a trie holds exactly `expected`.
pub(super) fn verify<K: Pod + Ord + std::fmt::Debug>(
    trie: &LpmTrie<MapData, K, RouteValue>,
    expected: &Entries<K>,
    name: &'static str,
) -> Result<(), SteeringError> {
    let held = read(trie, name)?;
    if &held == expected {
        return Ok(());
    }
    let missing = expected.keys().filter(|k| !held.contains_key(k)).count();
    let extra = held.keys().filter(|k| !expected.contains_key(k)).count();
    let differ = expected.iter().filter(|(k, v)| held.get(k).is_some_and(|h| h != *v)).count();
    Err(SteeringError::Verify {
        name,
        detail: format!("{missing} entries missing, {extra} unexpected, {differ} with other values"),
    })
}
