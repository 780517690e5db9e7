//! Baselines the benchmark compares the dataplane with, in the same topology
//! and run: a plain userspace TCP relay (socat) and a raw quinn transfer with
//! the tunnel's own TLS material, transport settings and socket buffers (the
//! ceiling of the QUIC stack on this machine).

use std::{net::SocketAddr, sync::Arc, time::Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use dataplane::{config::TunnelSettings, tls::TlsMaterial, tunnel};

use crate::Netns;

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
        // Ready when it accepts.
        let start = Instant::now();
        while ns.run(move || std::net::TcpStream::connect(listen).is_err())? {
            ensure!(start.elapsed().as_secs() < 5, "socat did not start listening on {listen}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(Socat(child))
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Echoes `bytes` over one QUIC stream from `client_ns` to a server in
/// `server_ns` at `server`, writing and reading at once (as the dataplane's
/// bulk test does); returns Mbit/s per direction.
pub fn raw_quinn_echo(
    client_ns: &Netns,
    server_ns: &Netns,
    server: SocketAddr,
    client_tls: TlsMaterial,
    server_tls: TlsMaterial,
    bytes: u64,
) -> Result<f64> {
    let settings = TunnelSettings::default();
    let server_identity = server_tls.identity.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server_thread = server_ns.spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let mut config = quinn::ServerConfig::with_crypto(Arc::new(
                quinn::crypto::rustls::QuicServerConfig::try_from(server_tls.server_config()?)?,
            ));
            config.transport_config(Arc::new(tunnel::transport(&settings)?));
            let (socket, _) = tunnel::udp_socket(server, settings.udp_buffer_bytes)?;
            let ep = quinn::Endpoint::new(
                Default::default(),
                Some(config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            let _ = ready_tx.send(());
            let conn = ep.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            while let Some(chunk) = recv.read_chunk(64 * 1024, true).await? {
                send.write_chunk(chunk.bytes).await?;
            }
            send.finish()?;
            let _ = send.stopped().await;
            Ok(())
        })
    })?;
    ready_rx.recv().context("server thread died")?;
    let client = client_ns.run(move || -> Result<f64> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let settings = TunnelSettings::default();
            let mut config =
                quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(
                    client_tls.client_config(&server_identity)?,
                )?));
            config.transport_config(Arc::new(tunnel::transport(&settings)?));
            let (socket, _) = tunnel::udp_socket("[::]:0".parse()?, settings.udp_buffer_bytes)?;
            let ep = quinn::Endpoint::new(Default::default(), None, socket, Arc::new(quinn::TokioRuntime))?;
            let conn = ep.connect_with(config, server, "dataplane.peer")?.await?;
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
    })??;
    server_thread.join().map_err(|_| anyhow::anyhow!("server panicked"))??;
    Ok(client)
}
