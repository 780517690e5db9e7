//! The node-local interface that carries the redirect listeners' addresses.
//!
//! Pods have their own loopback, so the redirect target must be an address of
//! the node that every pod reaches through its gateway (the NodeLocal DNSCache
//! pattern). The agent owns an interface for it: it creates it through
//! netlink, puts the listener addresses on it, and deletes it on exit.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags},
    link::LinkMessage,
};
use rtnetlink::{Handle, LinkDummy, LinkIfb, LinkUnspec};
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A request failed; `what` says which.
    #[error("{what}: {source}")]
    Request { what: String, source: rtnetlink::Error },
}

/// Which link type carries the addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Dummy,
    /// Fallback for kernels built without the dummy driver (CONFIG_DUMMY unset).
    Ifb,
}

/// The agent's redirect interface; [`RedirectInterface::remove`] deletes it.
pub struct RedirectInterface {
    handle: Handle,
    pub name: String,
    pub index: u32,
    pub kind: LinkKind,
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
    match handle.link().get().match_name(name.to_owned()).execute().try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(NetlinkError::Request { what: format!("looking up link {name}"), source: e }),
    }
}

impl RedirectInterface {
    /// Creates (or re-creates, after a crash) the interface, brings it up and
    /// adds each address as a host route (/32, /128; IPv6 without DAD so the
    /// listener can bind at once).
    pub async fn create(name: &str, addrs: &[IpAddr]) -> Result<RedirectInterface, NetlinkError> {
        let handle = connect()?;
        if let Some(stale) = link_by_name(&handle, name).await? {
            warn!(interface = name, "removing a leftover redirect interface");
            handle
                .link()
                .del(stale.header.index)
                .execute()
                .await
                .map_err(request(format!("deleting stale {name}")))?;
        }
        let kind = match handle.link().add(LinkDummy::new(name).up().build()).execute().await {
            Ok(()) => LinkKind::Dummy,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                info!(interface = name, "kernel has no dummy link type; using an ifb link instead");
                handle
                    .link()
                    .add(LinkIfb::new(name).up().build())
                    .execute()
                    .await
                    .map_err(request(format!("creating ifb link {name}")))?;
                LinkKind::Ifb
            }
            Err(e) => {
                return Err(NetlinkError::Request { what: format!("creating dummy link {name}"), source: e });
            }
        };
        let link = link_by_name(&handle, name).await?.ok_or_else(|| NetlinkError::Request {
            what: format!("finding {name} after creating it"),
            source: rtnetlink::Error::RequestFailed,
        })?;
        let iface = RedirectInterface { handle, name: name.to_owned(), index: link.header.index, kind };
        if let Err(e) = iface.add_addresses(addrs).await {
            iface.remove().await;
            return Err(e);
        }
        Ok(iface)
    }

    /// Pinned steering: keeps an interface a previous agent left, with its
    /// addresses (a running agent's listeners are bound to them, and the
    /// pinned programs send connects there), adding what is missing; creates
    /// it if there is none.
    pub async fn ensure(name: &str, addrs: &[IpAddr]) -> Result<RedirectInterface, NetlinkError> {
        let handle = connect()?;
        let Some(link) = link_by_name(&handle, name).await? else { return Self::create(name, addrs).await };
        handle
            .link()
            .set(LinkUnspec::new_with_index(link.header.index).up().build())
            .execute()
            .await
            .map_err(request(format!("bringing {name} up")))?;
        let iface = RedirectInterface {
            handle,
            name: name.to_owned(),
            index: link.header.index,
            kind: LinkKind::Dummy,
        };
        for addr in addrs {
            match iface.add_addresses(std::slice::from_ref(addr)).await {
                Err(NetlinkError::Request { source: rtnetlink::Error::NetlinkError(e), .. })
                    if e.raw_code() == -libc::EEXIST => {}
                other => other?,
            }
        }
        Ok(iface)
    }

    /// Deletes the interface called `name`, if there is one (`dataplane uninstall`).
    pub async fn remove_named(name: &str) -> Result<bool, NetlinkError> {
        let handle = connect()?;
        let Some(link) = link_by_name(&handle, name).await? else { return Ok(false) };
        handle.link().del(link.header.index).execute().await.map_err(request(format!("deleting {name}")))?;
        Ok(true)
    }

    async fn add_addresses(&self, addrs: &[IpAddr]) -> Result<(), NetlinkError> {
        for addr in addrs {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let mut req = self.handle.address().add(self.index, *addr, prefix);
            if addr.is_ipv6() {
                req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute().await.map_err(request(format!("adding {addr}/{prefix} to {}", self.name)))?;
        }
        Ok(())
    }

    /// Deletes the interface (and with it its addresses). Failures are logged:
    /// the next start removes a leftover interface anyway.
    pub async fn remove(self) {
        if let Err(e) = self.handle.link().del(self.index).execute().await {
            warn!(interface = %self.name, error = %e, "could not delete the redirect interface");
        }
    }
}
