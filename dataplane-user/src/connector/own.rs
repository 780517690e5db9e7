//! The connector's own addresses, which it never dials: a served CIDR that
//! happens to cover the node (a `10.0.0.0/8` on a node at 10.1.2.3) must not
//! let a peer reach the node's own services (kubelet, the agent's admin
//! port). Read from the interfaces, and read again on every address change
//! the kernel announces (netlink) and every [`REFRESH`] besides; a dial that
//! still lands on the node (in the moment between an address appearing and
//! the read) is caught after connect, by its source and destination being
//! the same address.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the interface addresses are read again without a change
/// announced (in case the subscription failed or missed one).
pub const REFRESH: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct OwnAddrs(RwLock<HashSet<IpAddr>>);

impl OwnAddrs {
    /// Reads the addresses now.
    pub fn load() -> Arc<OwnAddrs> {
        let own = Arc::new(OwnAddrs::default());
        own.refresh();
        own
    }

    /// Reads every interface's addresses again (canonical: IPv4 as IPv4).
    pub fn refresh(&self) {
        match nix::ifaddrs::getifaddrs() {
            Ok(addrs) => {
                let set: HashSet<IpAddr> = addrs
                    .filter_map(|a| a.address)
                    .filter_map(|s| {
                        s.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .map(|ip| ip.to_canonical())
                    .collect();
                *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = set;
            }
            // Keep the last set: an empty one would let a dial through.
            Err(e) => warn!(error = %e, "reading the interface addresses failed; keeping the last ones"),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&ip.to_canonical())
    }

    /// Reads again on every announced address change and every
    /// [`REFRESH`], until `stop`.
    pub async fn keep_current(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = match subscribe() {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %e, "no netlink address notifications; re-reading every {REFRESH:?} only");
                None
            }
        };
        // Changes between the first read and the subscription.
        self.refresh();
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => self.refresh(),
                Some(_) = async { match changes.as_mut() { Some(rx) => rx.next().await, None => None } } => {
                    self.refresh();
                }
                () = stop.cancelled() => return,
            }
        }
    }
}

type Changes = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A netlink socket subscribed to IPv4 and IPv6 address changes.
fn subscribe() -> std::io::Result<Changes> {
    use rtnetlink::{
        constants::{RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR},
        sys::AsyncSocket,
    };
    let (mut conn, _handle, changes) = rtnetlink::new_connection()?;
    let groups = rtnetlink::sys::SocketAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR);
    conn.socket_mut().socket_mut().bind(&groups)?;
    tokio::spawn(conn);
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_own_addresses_in_any_spelling() {
        let own = OwnAddrs::load();
        assert!(own.contains("127.0.0.1".parse().expect("ip")));
        assert!(own.contains("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!own.contains("192.0.2.77".parse().expect("ip")));
    }
}
