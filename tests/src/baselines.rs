//! Baselines the benchmark compares the dataplane with, in the same topology
//! and run: a plain userspace TCP relay (socat) and a raw quinn transfer with
//! the tunnel's own TLS material, transport settings and socket buffers (the
//! ceiling of the QUIC stack on this machine), both for bulk transfer and
//! for new streams over an established connection.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use dataplane::{config::TunnelSettings, tls::TlsMaterial, tunnel};

use crate::{Netns, probe::Latencies};

/// socat relaying `listen` to `target`, in `ns`; killed on drop.
pub struct Socat(std::process::Child);

impl Socat {
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Result<Socat> {
        let args = [
            format!("TCP-LISTEN:{},bind={},fork,reuseaddr,backlog=4096", listen.port(), listen.ip()),
            format!("TCP:{target}"),
        ];
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "socat"])
            .args(&args)
            .spawn()
            .context("starting socat (apt-get install socat)")?;
        let mut socat = Socat(child);
        wait_listening(ns, listen, 5, "socat", &mut socat.0)?;
        Ok(socat)
    }
}

/// Waits until `addr` in `ns` accepts, for at most `secs`; fails at once
/// if `child` (what should listen there) exits.
fn wait_listening(
    ns: &Netns,
    addr: SocketAddr,
    secs: u64,
    what: &str,
    child: &mut std::process::Child,
) -> Result<()> {
    let start = Instant::now();
    while ns.run(move || std::net::TcpStream::connect(addr).is_err())? {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited with {status}");
        }
        ensure!(start.elapsed().as_secs() < secs, "{what} did not start listening on {addr}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The raw-quinn baseline's runtime on each end: one thread measured the
/// highest here (4.2-4.9 Gbit/s per direction, current-thread or a single
/// worker alike, against 3.2-3.8 with two workers), so it is the ceiling.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// A quinn endpoint in `ns` that echoes every bidirectional stream, with the
/// tunnel's TLS and transport settings; stops on drop.
pub struct RawQuinnServer {
    thread: Option<std::thread::JoinHandle<()>>,
    endpoint: quinn::Endpoint,
    pub addr: SocketAddr,
}

impl RawQuinnServer {
    pub fn start(ns: &Netns, addr: SocketAddr, tls: TlsMaterial) -> Result<RawQuinnServer> {
        let settings = TunnelSettings::default();
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls.server_config()?)?,
        ));
        config.transport_config(Arc::new(tunnel::transport(&settings)?));
        // The socket belongs to the namespace it is created in; the runtime
        // serving it may run anywhere.
        let size = settings.udp_buffer_bytes;
        let (socket, _) = ns.run(move || tunnel::udp_socket(addr, size))??;
        let rt = runtime()?;
        let endpoint = rt.block_on(async {
            quinn::Endpoint::new(Default::default(), Some(config), socket, Arc::new(quinn::TokioRuntime))
        })?;
        let ep = endpoint.clone();
        // Served until the endpoint closes (accept then yields None).
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                while let Some(incoming) = ep.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        // As the tunnel does once a peer is authenticated.
                        tunnel::open_stream_limits(&conn, 65_536);
                        while let Ok((send, recv)) = conn.accept_bi().await {
                            tokio::spawn(echo_stream(send, recv));
                        }
                    });
                }
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        });
        Ok(RawQuinnServer { thread: Some(thread), endpoint, addr })
    }
}

async fn echo_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    while let Some(chunk) = recv.read_chunk(64 * 1024, true).await? {
        send.write_chunk(chunk.bytes).await?;
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

impl Drop for RawQuinnServer {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A quinn connection from `ns` to a [`RawQuinnServer`], with the tunnel's
/// settings: the QUIC stack's ceiling for the benchmark's tunnel arms.
pub struct RawQuinnClient {
    rt: tokio::runtime::Runtime,
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl RawQuinnClient {
    pub fn connect(
        ns: &Netns,
        server: &RawQuinnServer,
        tls: TlsMaterial,
        server_identity: &str,
    ) -> Result<Self> {
        let settings = TunnelSettings::default();
        let mut config =
            quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
                tls.client_config(&dataplane::identity::IdentityPattern::parse(server_identity)?)?,
            )?));
        config.transport_config(Arc::new(tunnel::transport(&settings)?));
        let size = settings.udp_buffer_bytes;
        let (socket, _) = ns.run(move || tunnel::udp_socket("[::]:0".parse().expect("addr"), size))??;
        // One worker, not the current thread: the connection's driver must
        // run between calls (keep-alives), or a pause longer than the idle
        // timeout between two arms had the server reset it.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let addr = server.addr;
        let (endpoint, conn) = rt.block_on(async move {
            let ep = quinn::Endpoint::new(Default::default(), None, socket, Arc::new(quinn::TokioRuntime))?;
            let conn = ep.connect_with(config, addr, "dataplane.peer")?.await?;
            tunnel::open_stream_limits(&conn, 65_536);
            Ok::<_, anyhow::Error>((ep, conn))
        })?;
        Ok(RawQuinnClient { rt, conn, endpoint })
    }

    /// Echoes `bytes` over one stream, writing and reading at once (as the
    /// probe's bulk transfer does); returns Mbit/s per direction.
    pub fn echo(&self, bytes: u64) -> Result<f64> {
        let conn = self.conn.clone();
        self.bounded(async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            let start = Instant::now();
            let block = Bytes::from(vec![0x5au8; 64 * 1024]);
            let writer = async {
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    send.write_chunk(block.slice(..n)).await?;
                    left -= n as u64;
                }
                send.finish()?;
                Ok::<_, anyhow::Error>(())
            };
            let reader = async {
                let mut got = 0u64;
                while let Some(c) = recv.read_chunk(64 * 1024, true).await? {
                    got += c.bytes.len() as u64;
                }
                Ok::<_, anyhow::Error>(got)
            };
            let ((), got) = tokio::try_join!(writer, reader)?;
            ensure!(got == bytes, "raw quinn echoed {got} of {bytes} bytes");
            Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
        })
    }

    /// `n` exchanges (new stream, 100-byte request, echo, finish), from
    /// `concurrency` tasks at once: the QUIC part of a tunnelled flow alone.
    pub fn exchanges(&self, n: usize, concurrency: usize) -> Result<Latencies> {
        let conn = self.conn.clone();
        self.bounded(async move {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..concurrency {
                let conn = conn.clone();
                let share = n / concurrency + usize::from(w < n % concurrency);
                tasks.spawn(async move {
                    let mut out = Vec::with_capacity(share);
                    for _ in 0..share {
                        let t = Instant::now();
                        let (mut send, mut recv) = conn.open_bi().await?;
                        send.write_all(&[b'x'; 100]).await?;
                        send.finish()?;
                        let echoed = recv.read_to_end(1024).await?;
                        ensure!(echoed.len() == 100, "raw quinn echoed {} of 100 bytes", echoed.len());
                        out.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Ok::<_, anyhow::Error>(out)
                });
            }
            let mut latencies_us = Vec::with_capacity(n);
            while let Some(r) = tasks.join_next().await {
                latencies_us.extend(r??);
            }
            Ok(Latencies { latencies_us, failed: 0, secs: started.elapsed().as_secs_f64() })
        })
    }
}

impl RawQuinnClient {
    /// Runs `f` with a time limit: a stalled stream fails the run, never hangs it.
    fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, f).await.context("raw quinn: no answer within 120 s")?
        })
    }
}

impl Drop for RawQuinnClient {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.close(0u32.into(), b"done");
    }
}

/// `ssh -L` with AES-GCM, the tool platform teams reach for: sshd in the
/// private namespace, the client in the node's, forwarding one local port
/// over one SSH connection (every forwarded flow a channel on it) to a
/// target the private side reaches. Killed on drop.
pub struct SshForward {
    sshd: std::process::Child,
    ssh: std::process::Child,
    _dir: tempfile::TempDir,
    pub listen: SocketAddr,
}

/// The cipher `ssh -L` users are told to pick for speed.
pub const SSH_CIPHER: &str = "aes128-gcm@openssh.com";

impl SshForward {
    /// sshd on `sshd_at` in `server_ns`; `ssh -L listen:target` in `client_ns`.
    pub fn start(
        server_ns: &Netns,
        sshd_at: SocketAddr,
        client_ns: &Netns,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<SshForward> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for key in ["host_ed25519", "id_ed25519"] {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .context("ssh-keygen (apt-get install openssh-client)")?;
            ensure!(status.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("id_ed25519.pub"), d.join("authorized_keys"))?;
        // sshd's privilege separation directory (the package's service
        // makes it; no service runs here).
        std::fs::create_dir_all("/run/sshd")?;
        let config = d.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {ip}\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 AllowTcpForwarding yes\nCiphers {SSH_CIPHER}\nCompression no\nUseDNS no\nPrintMotd no\n\
                 MaxSessions 64\nMaxStartups 64\n",
                port = sshd_at.port(),
                ip = sshd_at.ip(),
                d = d.display()
            ),
        )?;
        let sshd = std::process::Command::new("ip")
            .args(["netns", "exec", &server_ns.name, "/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting sshd (apt-get install openssh-server)")?;
        let mut sshd = sshd;
        wait_listening(server_ns, sshd_at, 5, "sshd", &mut sshd)?;
        let forward = format!("{}:{}:{}:{}", listen.ip(), listen.port(), target.ip(), target.port());
        // An interactive session (`-tt`, a remote command that waits), as
        // `ssh -L` users run it: OpenSSH sets TCP_NODELAY on the connection
        // only then. With `-N` every forwarded exchange waited out Nagle
        // and a delayed ACK (44 ms a new flow, measured).
        let ssh = std::process::Command::new("ip")
            .args(["netns", "exec", &client_ns.name, "ssh", "-tt", "-i"])
            .arg(d.join("id_ed25519"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
            ])
            .args(["-o", "ExitOnForwardFailure=yes", "-o", "GatewayPorts=yes", "-o", "Compression=no"])
            .args(["-o", "LogLevel=ERROR", "-c", SSH_CIPHER, "-L", &forward, "-p"])
            .arg(sshd_at.port().to_string())
            .arg(format!("root@{}", sshd_at.ip()))
            .arg("sleep 2147483647")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting ssh")?;
        let mut fwd = SshForward { sshd, ssh, _dir: dir, listen };
        wait_listening(client_ns, listen, 10, &format!("ssh -L {forward}"), &mut fwd.ssh)?;
        Ok(fwd)
    }

    /// CPU-seconds and RSS of the ssh client and every sshd process serving
    /// it (the listener and its per-connection children), summed.
    pub fn usage(&self) -> Result<dataplane::process::ProcessStats> {
        let roots = [self.ssh.id(), self.sshd.id()];
        let mut total = dataplane::process::ProcessStats::default();
        for pid in descendants(&roots)? {
            if let Ok(s) = dataplane::process::ProcessStats::of_pid(pid) {
                total.rss_bytes += s.rss_bytes;
                total.cpu_seconds += s.cpu_seconds;
                total.open_fds += s.open_fds;
            }
        }
        Ok(total)
    }
}

/// `roots` and every process below them (`ip netns exec` execs in place,
/// so the children are the tools' own).
fn descendants(roots: &[u32]) -> Result<Vec<u32>> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, f)| f.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut out: Vec<u32> = roots.to_vec();
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    Ok(out)
}

impl Drop for SshForward {
    fn drop(&mut self) {
        for child in [&mut self.ssh, &mut self.sshd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
