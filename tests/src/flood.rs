//! Strangers' QUIC Initials: `n` distinct connection attempts (new
//! connection ids each) as a client that will never answer sends them, and
//! sending them round-robin from many source ports while counting the Retry
//! packets that come back. Used by the limits test and the benchmark.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane::tls::TlsMaterial;

/// `n` Initial packets for `to`, made with `tls` expecting `identity`.
pub fn initials(n: usize, tls: &TlsMaterial, identity: &str, to: SocketAddr) -> Vec<Vec<u8>> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
        tls.client_config(&dataplane::identity::IdentityPattern::parse(identity).expect("identity"))
            .expect("tls"),
    )
    .expect("quic tls");
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut endpoint =
        quinn_proto::Endpoint::new(Arc::new(quinn::EndpointConfig::default()), None, false, None);
    (0..n)
        .map(|_| {
            let now = Instant::now();
            let (_, mut conn) = endpoint.connect(now, config.clone(), to, "dataplane.peer").expect("connect");
            let mut buf = Vec::new();
            let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial to send");
            buf.truncate(t.size);
            buf
        })
        .collect()
}

/// Whether a datagram is a QUIC Retry (long header, type 3).
pub fn is_retry(d: &[u8]) -> bool {
    d.first().is_some_and(|b| b & 0x80 != 0 && (b >> 4) & 0x3 == 3)
}

/// Sends `initials` to `to` round-robin from `sockets` sockets bound at
/// `from` (distinct source ports); returns the Retry packets they got back
/// while sending and for `listen` after. Run it in the namespace `from`
/// belongs to.
pub fn flood(initials: &[Vec<u8>], sockets: usize, from: &str, to: SocketAddr, listen: Duration) -> usize {
    let socks: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind(format!("{from}:0")).expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut retries = 0;
    let mut buf = [0u8; 2048];
    let mut drain = |socks: &[UdpSocket], retries: &mut usize| {
        for s in socks {
            while let Ok(n) = s.recv(&mut buf) {
                *retries += usize::from(is_retry(&buf[..n]));
            }
        }
    };
    for (i, d) in initials.iter().enumerate() {
        let _ = socks[i % sockets].send_to(d, to);
        if i % 50 == 49 {
            drain(&socks, &mut retries);
        }
    }
    // Answers still on their way.
    let until = Instant::now() + listen;
    while Instant::now() < until {
        drain(&socks, &mut retries);
        std::thread::sleep(Duration::from_millis(20));
    }
    retries
}
