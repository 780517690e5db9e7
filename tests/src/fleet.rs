//! A fleet in namespaces: two client nodes (each with a pod in its own
//! namespace and cgroup), a DMZ that routes between them and a private
//! cluster and runs the relays, and the private cluster with the TLS API
//! server and an echo server. nftables drops every inbound connection to
//! the client nodes and to the private cluster (only what they dial out
//! comes back), so every tunnel connection there is one they opened.
//!
//! Addresses (IPv4): pod 10.200.0.2 behind its node's 10.200.0.1 (on each
//! node); node a 10.210.1.2, node b 10.210.2.2, the private cluster
//! 10.210.3.2, each behind the DMZ's .1; the relays at 10.210.0.1 on the
//! DMZ. The private cluster's 198.51.100.0/24 is routed nowhere: only the
//! tunnel reaches it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{
    Cgroup, Netns,
    apiserver::ApiServer,
    probe::Probe,
    sh,
    topology::{EchoServer, addr},
    tunnel_env::{TlsPaths, start_api_server},
    unique_id,
};

/// Where relay `n` listens (and its admin API).
pub fn relay_at(n: u16) -> SocketAddr {
    addr(&format!("10.210.0.1:{}", 4432 + n))
}
pub fn relay_admin(n: u16) -> SocketAddr {
    addr(&format!("10.210.0.1:{}", 9480 + n))
}

/// One client node: its namespace, its pod's and the pod's cgroup.
pub struct ClientNode {
    pub cgroup: Cgroup,
    pub pod: Netns,
    pub node: Netns,
}

impl ClientNode {
    /// The pod, as a workload (its namespace and cgroup).
    pub fn pod_probe(&self) -> Probe {
        Probe { cgroup: Some(self.cgroup.path.clone()), netns: self.pod.path() }
    }
}

pub struct Fleet {
    // Drop order: servers before the namespaces they live in.
    pub api: ApiServer,
    pub echo: EchoServer,
    pub nodes: [ClientNode; 2],
    pub dmz: Netns,
    pub private: Netns,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub tunnel_ca: dataplane::tls::certs::Pem,
}

impl Fleet {
    pub fn new() -> Result<Fleet> {
        let id = unique_id();
        let dmz = Netns::new(format!("dpf-{id}-dmz"))?;
        let private = Netns::new(format!("dpf-{id}-priv"))?;
        dmz.sysctl("net.ipv4.ip_forward", "1")?;
        dmz.ip(&["addr", "add", "10.210.0.1/32", "dev", "lo"])?;
        dmz.ip(&["link", "set", "lo", "up"])?;
        let mut nodes = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let node = Netns::new(format!("dpf-{id}-n{side}"))?;
            let pod = Netns::new(format!("dpf-{id}-p{side}"))?;
            let cgroup = Cgroup::new(&format!("{id}{side}"))?;
            let (vp, vn) = (format!("fp{side}{id}"), format!("fn{side}{id}"));
            node.ip(&["link", "add", &vn, "type", "veth", "peer", "name", &vp, "netns", &pod.name])?;
            link(&pod, &vp, "10.200.0.2/24", &node, &vn, "10.200.0.1/24")?;
            pod.ip(&["route", "add", "default", "via", "10.200.0.1"])?;
            let (vd, vu) = (format!("fd{side}{id}"), format!("fu{side}{id}"));
            dmz.ip(&["link", "add", &vd, "type", "veth", "peer", "name", &vu, "netns", &node.name])?;
            let net = i + 1;
            link(&dmz, &vd, &format!("10.210.{net}.1/24"), &node, &vu, &format!("10.210.{net}.2/24"))?;
            node.ip(&["route", "add", "default", "via", &format!("10.210.{net}.1")])?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            firewall(&node, Some(&vn))?;
            nodes.push(ClientNode { cgroup, pod, node });
        }
        let (vd, vu) = (format!("fdc{id}"), format!("fuc{id}"));
        dmz.ip(&["link", "add", &vd, "type", "veth", "peer", "name", &vu, "netns", &private.name])?;
        link(&dmz, &vd, "10.210.3.1/24", &private, &vu, "10.210.3.2/24")?;
        private.ip(&["route", "add", "default", "via", "10.210.3.1"])?;
        private.ip(&["link", "set", "lo", "up"])?;
        for a in ["198.51.100.101/32", "198.51.100.102/32"] {
            private.ip(&["addr", "add", a, "dev", "lo"])?;
        }
        firewall(&private, None)?;

        let dir = tempfile::tempdir()?;
        let (api, kubeconfig) = start_api_server(&private, &[addr("198.51.100.101:6443")], dir.path())?;
        let echo = EchoServer::start(&private, &["198.51.100.102:6443"])?;
        let year = std::time::Duration::from_secs(365 * 86_400);
        let tunnel_ca = dataplane::tls::certs::new_ca("dataplane fleet CA", year)?;
        let nodes: [ClientNode; 2] = nodes.try_into().ok().context("two nodes")?;
        Ok(Fleet { api, echo, nodes, dmz, private, dir, kubeconfig, tunnel_ca })
    }

    /// A certificate for `identity` in its own directory.
    pub fn tls(&self, name: &str, identity: &str) -> Result<TlsPaths> {
        let pem = dataplane::tls::certs::issue(
            &self.tunnel_ca,
            &dataplane::tls::certs::NodeSpec {
                identity: identity.into(),
                validity: std::time::Duration::from_secs(3600),
                ..Default::default()
            },
        )?;
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d)?;
        let paths = TlsPaths { ca: d.join("ca.crt"), cert: d.join("tls.crt"), key: d.join("tls.key") };
        std::fs::write(&paths.ca, &self.tunnel_ca.cert)?;
        std::fs::write(&paths.cert, &pem.cert)?;
        std::fs::write(&paths.key, &pem.key)?;
        Ok(paths)
    }

    /// The real kubectl as a workload in node `i`'s pod.
    pub fn kubectl(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        crate::tunnel_env::kubectl_in(&self.nodes[i].pod_probe(), &self.kubeconfig, self.dir.path(), args)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Addresses both ends of a veth pair and brings them up.
fn link(a: &Netns, a_dev: &str, a_addr: &str, b: &Netns, b_dev: &str, b_addr: &str) -> Result<()> {
    for (ns, dev, v4) in [(a, a_dev, a_addr), (b, b_dev, b_addr)] {
        ns.ip(&["addr", "add", v4, "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// nftables in `ns`: nothing may connect in, from anywhere but loopback
/// and (on a client node) its pod's link; replies to what the namespace
/// opened itself pass. Forwarded traffic is not this namespace's input.
fn firewall(ns: &Netns, pod_link: Option<&str>) -> Result<()> {
    let pod = pod_link.map(|l| format!("iifname \"{l}\" accept\n")).unwrap_or_default();
    let rules = format!(
        "table inet fleet {{\n chain input {{\n  type filter hook input priority 0; policy drop;\n  \
         iifname \"lo\" accept\n  {pod}  ct state established,related accept\n  counter\n }}\n}}\n"
    );
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), rules)?;
    let path = file.path().display().to_string();
    sh(&["ip", "netns", "exec", &ns.name, "nft", "-f", &path])?;
    Ok(())
}

/// Packets the namespace's firewall dropped (the counter before the drop
/// policy sees every packet it drops).
pub fn dropped(ns: &Netns) -> Result<u64> {
    let out = sh(&["ip", "netns", "exec", &ns.name, "nft", "list", "chain", "inet", "fleet", "input"])?;
    let line = out.lines().find(|l| l.trim_start().starts_with("counter")).context("no counter")?;
    let packets = line.split_whitespace().skip_while(|w| *w != "packets").nth(1).context("no packets")?;
    Ok(packets.parse()?)
}
