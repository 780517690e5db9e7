//! The end-to-end tunnel setup: the test topology with the private network cut
//! off from the node (only the tunnel reaches it), a private CA for the
//! tunnel, a stand-in API server with its own CA at 198.51.100.101:6443 and
//! [2001:db8::101]:6443, a kubeconfig for it, and configs for a client agent
//! (node namespace) and a connector agent (private namespace).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use dataplane::{
    app::AgentHandle,
    config::{Config, ValidConfig},
    tls::certs::{self, NodeSpec, Pem},
};

use crate::{
    apiserver::ApiServer,
    topology::{OTHER_V4, OTHER_V6, RunningAgent, Topology, addr},
};

pub const PEER: &str = "private-cluster";
pub const CLIENT_ID: &str = "spiffe://dataplane.test/node/worker-1";
pub const CONNECTOR_ID: &str = "spiffe://dataplane.test/connector/private-cluster";
/// Routed through the tunnel but not served by the connector.
pub const UNSERVED_V4: &str = "198.51.100.103:6443";
/// Served; a server there accepts and never reads (see [`TunnelEnv::stalled_server`]).
pub const STALLED_V4: &str = "198.51.100.102:7000";

/// Which side dials the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client agent dials the connector's listener.
    ConnectorListens,
    /// The connector, allowing no inbound traffic, dials out to the client agent.
    ConnectorDialsOut,
}

pub struct TunnelEnv {
    // Drop order: the API server before the namespaces it lives in.
    pub api: ApiServer,
    pub topo: Topology,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub tunnel_ca: Pem,
}

/// The stand-in API server in `ns` on `addrs`, with its own PKI (a CA, a
/// server certificate for 198.51.100.101 and 2001:db8::101, an admin client
/// certificate) and a kubeconfig for it written into `dir`.
pub fn start_api_server(
    ns: &crate::Netns,
    addrs: &[std::net::SocketAddr],
    dir: &Path,
) -> Result<(ApiServer, PathBuf)> {
    let year = Duration::from_secs(365 * 86_400);

    // The API server's own PKI, unrelated to the tunnel's.
    let api_ca = certs::new_ca("test cluster CA", year)?;
    let server = certs::issue(
        &api_ca,
        &NodeSpec {
            identity: "spiffe://cluster.test/kube-apiserver".into(),
            dns: vec!["kubernetes.default".into()],
            ips: vec!["198.51.100.101".parse()?, "2001:db8::101".parse()?],
            validity: year,
            ..Default::default()
        },
    )?;
    let admin = certs::issue(
        &api_ca,
        &NodeSpec {
            identity: "spiffe://cluster.test/user/admin".into(),
            validity: year,
            ..Default::default()
        },
    )?;
    let api = ApiServer::start(ns, addrs, &api_ca.cert, &server.cert, &server.key)?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let (ca, crt, key) = (
        write("api-ca.crt", &api_ca.cert)?,
        write("admin.crt", &admin.cert)?,
        write("admin.key", &admin.key)?,
    );
    let kubeconfig = write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: private\n  cluster:\n    server: https://198.51.100.101:6443\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: private\n  context: {{cluster: private, user: admin, namespace: default}}\ncurrent-context: private\n",
            ca.display(),
            crt.display(),
            key.display()
        ),
    )?;
    Ok((api, kubeconfig))
}

/// TLS file paths for a config.
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TunnelEnv {
    pub fn new() -> Result<TunnelEnv> {
        let topo = Topology::with_echo(&[OTHER_V4, OTHER_V6])?;
        // The private network is reachable only through the tunnel.
        topo.node.ip(&["route", "del", "198.51.100.0/24"])?;
        topo.node.ip(&["-6", "route", "del", "2001:db8::/64"])?;
        let dir = tempfile::tempdir()?;
        let year = Duration::from_secs(365 * 86_400);
        let tunnel_ca = certs::new_ca("dataplane test tunnel CA", year)?;
        let (api, kubeconfig) = start_api_server(
            &topo.remote,
            &[addr("198.51.100.101:6443"), addr("[2001:db8::101]:6443")],
            dir.path(),
        )?;
        Ok(TunnelEnv { api, topo, dir, kubeconfig, tunnel_ca })
    }

    /// Issues a tunnel certificate for `identity` from `ca` (default: the
    /// tunnel CA) into its own directory.
    pub fn tls(&self, name: &str, identity: &str, ca: Option<&Pem>) -> Result<TlsPaths> {
        self.tls_with(name, identity, ca, Duration::from_secs(3600))
    }

    /// [`TunnelEnv::tls`] with a certificate that expires `validity` from now.
    pub fn tls_valid_for(&self, name: &str, identity: &str, validity: Duration) -> Result<TlsPaths> {
        self.tls_with(name, identity, None, validity)
    }

    /// [`TunnelEnv::tls`] with a certificate valid only from `starts_in` from now.
    pub fn tls_not_yet_valid(&self, name: &str, identity: &str, starts_in: Duration) -> Result<TlsPaths> {
        let spec = NodeSpec {
            identity: identity.into(),
            validity: Duration::from_secs(3600),
            starts_in,
            ..Default::default()
        };
        self.write_tls(name, &self.tunnel_ca, &spec)
    }

    fn tls_with(&self, name: &str, identity: &str, ca: Option<&Pem>, validity: Duration) -> Result<TlsPaths> {
        let ca = ca.unwrap_or(&self.tunnel_ca);
        self.write_tls(name, ca, &NodeSpec { identity: identity.into(), validity, ..Default::default() })
    }

    fn write_tls(&self, name: &str, ca: &Pem, spec: &NodeSpec) -> Result<TlsPaths> {
        let pem = certs::issue(ca, spec)?;
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d)?;
        let paths = TlsPaths { ca: d.join("ca.crt"), cert: d.join("tls.crt"), key: d.join("tls.key") };
        std::fs::write(&paths.ca, &ca.cert)?;
        std::fs::write(&paths.cert, &pem.cert)?;
        std::fs::write(&paths.key, &pem.key)?;
        Ok(paths)
    }

    pub fn tls_yaml(t: &TlsPaths) -> String {
        format!("tls: {{ ca: {}, cert: {}, key: {} }}\n", t.ca.display(), t.cert.display(), t.key.display())
    }

    /// Short keep-alive and idle timeout: the tests wait for dead tunnels.
    /// Scaled like the latency bounds ([`crate::fast_us`]): on a starved
    /// emulated CPU a 1.5 s idle timeout can expire mid-transfer.
    pub fn tunnel_timers() -> String {
        let (keep_alive, idle) = (crate::fast_us(300_000) / 1000, crate::fast_us(1_500_000) / 1000);
        format!("keep_alive: {keep_alive}ms, idle_timeout: {idle}ms")
    }

    /// The client agent: steers the private addresses into the tunnel.
    pub fn client_config(&self, mode: Mode, tls: &TlsPaths) -> ValidConfig {
        Config::parse(&self.client_config_text(mode, tls)).expect("client config is valid")
    }

    /// [`TunnelEnv::client_config`] as the YAML a node would be given.
    pub fn client_config_text(&self, mode: Mode, tls: &TlsPaths) -> String {
        let (dial, listen) = match mode {
            Mode::ConnectorListens => ("dial: ['10.201.0.2:4433'], ", String::new()),
            Mode::ConnectorDialsOut => ("", "listen: '10.201.0.1:4433', ".to_owned()),
        };
        format!(
            "node: worker-1\nsteering: {{ cgroup: {}, pin_dir: null }}\ntimeouts: {{ connect: 2s, shutdown_grace: 2s }}\n{}\
             tunnel: {{ {listen}{} }}\npeers:\n  - {{ name: {PEER}, {dial}identity: '{CONNECTOR_ID}' }}\nroutes:\n{}",
            self.topo.cgroup.path.display(),
            Self::tls_yaml(tls),
            Self::tunnel_timers(),
            [
                "198.51.100.101/32",
                "2001:db8::101/128",
                "198.51.100.102/32",
                "2001:db8::102/128",
                "198.51.100.103/32"
            ]
            .iter()
            .map(|c| format!("  - {{ cidr: '{c}', via: {PEER} }}\n"))
            .collect::<String>()
        )
    }

    /// The connector agent in the private namespace.
    pub fn connector_config(&self, mode: Mode, tls: &TlsPaths) -> ValidConfig {
        Config::parse(&self.connector_config_text(mode, tls)).expect("connector config is valid")
    }

    /// [`TunnelEnv::connector_config`] as YAML.
    pub fn connector_config_text(&self, mode: Mode, tls: &TlsPaths) -> String {
        let (dial, listen) = match mode {
            Mode::ConnectorListens => ("", "listen: '10.201.0.2:4433', ".to_owned()),
            Mode::ConnectorDialsOut => ("dial: ['10.201.0.1:4433'], ", String::new()),
        };
        format!(
            "node: connector-1\ntimeouts: {{ connect: 2s, shutdown_grace: 1s }}\n{}tunnel: {{ {listen}{} }}\n\
             peers:\n  - {{ name: worker-1, {dial}identity: '{CLIENT_ID}' }}\nserve:\n{}",
            Self::tls_yaml(tls),
            Self::tunnel_timers(),
            // The servers share the connector's namespace, as an API server
            // shares its node with a connector on a control-plane node: the
            // entries say so (`own_node`), or the connector would refuse
            // them as its own addresses.
            ["198.51.100.101/32", "2001:db8::101/128", "198.51.100.102/32", "2001:db8::102/128"]
                .iter()
                .map(|c| format!("  - {{ cidr: '{c}', ports: [6443, 7000], own_node: true }}\n"))
                .collect::<String>()
        )
    }

    /// A client (node namespace) and a connector (private namespace), both
    /// up, with the tunnel established.
    pub fn start(&self, mode: Mode) -> Result<(RunningAgent, RunningAgent)> {
        let client =
            self.topo.start_agent(self.client_config(mode, &self.tls("client", CLIENT_ID, None)?))?;
        let connector = self.start_connector(mode)?;
        // Every configured connection (peers[].connections, 2 by default),
        // not just the first: tests count them.
        ensure_connections(&client.handle, CONNECTIONS, Duration::from_secs(10))?;
        Ok((client, connector))
    }

    pub fn start_connector(&self, mode: Mode) -> Result<RunningAgent> {
        let cfg = self.connector_config(mode, &self.tls("connector", CONNECTOR_ID, None)?);
        RunningAgent::start(&self.topo.remote, cfg)
    }

    /// Runs kubectl as a workload in the pod namespace and cgroup.
    pub fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        kubectl_in(&self.topo.pod_probe(), &self.kubeconfig, self.dir.path(), args)
    }

    /// A server at [`STALLED_V4`] that accepts connections and never reads;
    /// it holds them until the returned guard is dropped.
    pub fn stalled_server(&self) -> Result<StalledServer> {
        let listener = self.topo.remote.run(|| crate::listen(addr(STALLED_V4)))??;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop2, count) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            crate::accept_until(listener, stop2, |conn, _| {
                held.push(conn);
                count.store(held.len(), std::sync::atomic::Ordering::Relaxed);
            });
        });
        Ok(StalledServer { stop, accepted, thread: Some(thread) })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs the real kubectl as a workload where `pod` runs (its namespace and
/// cgroup), with `kubeconfig` and a home under `dir`.
pub fn kubectl_in(
    pod: &crate::probe::Probe,
    kubeconfig: &Path,
    dir: &Path,
    args: &[&str],
) -> Result<std::process::Output> {
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let mut all = vec!["--request-timeout=20s"];
    all.extend_from_slice(args);
    pod.exec("/usr/bin/kubectl", &all, &[("KUBECONFIG", kubeconfig), ("HOME", home.as_path())])
}

/// The real kubectl in the pod gets the stand-in API server's version and
/// its pod list through the tunnel.
pub fn kubectl_works(env: &TunnelEnv) {
    kubectl_works_with(|args| env.kubectl(args));
}

/// [`kubectl_works`] with kubectl run by `kubectl`.
pub fn kubectl_works_with(kubectl: impl Fn(&[&str]) -> Result<std::process::Output>) {
    use crate::apiserver::{POD_NAME, SERVER_VERSION};
    let text = output_text;
    let v = kubectl(&["version"]).expect("kubectl runs");
    assert!(v.status.success(), "kubectl version: {}", text(&v));
    assert!(text(&v).contains(&format!("Server Version: {SERVER_VERSION}")), "{}", text(&v));
    let pods = kubectl(&["get", "pods"]).expect("kubectl runs");
    assert!(pods.status.success(), "kubectl get pods: {}", text(&pods));
    let out = text(&pods);
    assert!(out.contains("NAME") && out.contains(POD_NAME) && out.contains("Running"), "{out}");
    eprintln!("$ kubectl version\n{}$ kubectl get pods\n{out}", text(&v));
}

/// Tunnel connections each side keeps (the config's default).
pub const CONNECTIONS: usize = 2;

/// Waits until the agent has a live tunnel connection to the peer.
pub fn ensure_tunnel(handle: &AgentHandle, within: Duration) -> Result<Duration> {
    ensure_connections(handle, 1, within)
}

/// Waits until the agent has at least `n` live tunnel connections to the peer.
pub fn ensure_connections(handle: &AgentHandle, n: usize, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    let tunnel = handle.tunnel().context("agent has no tunnel")?;
    while start.elapsed() < within {
        // Up, and the kernel's route actions follow (routes through a peer
        // refuse connects until its first connection is up).
        if tunnel.live_connections(PEER) >= n && handle.routes_follow_peers() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let live = tunnel.live_connections(PEER);
    anyhow::bail!("{live} of {n} tunnel connections to {PEER} within {within:?}")
}

pub struct StalledServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StalledServer {
    /// Connections accepted and held so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for StalledServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
