//! The admin server under a slowloris: connections that never send a
//! request hold at most `MAX_CONNECTIONS` descriptors, each is closed within
//! the header timeout, and the API answers again once they are gone.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use dataplane::admin::{self, AdminSource, HEADER_TIMEOUT, MAX_CONNECTIONS, Readiness, Status, client::get};

struct Fixed;

impl AdminSource for Fixed {
    fn metrics_text(&self) -> String {
        "# EOF\n".to_owned()
    }
    fn readiness(&self) -> Readiness {
        Readiness { ready: true, missing: Vec::new(), degraded: Vec::new() }
    }
    fn status(&self) -> Status {
        unimplemented!("not asked in this test")
    }
}

fn open_fds() -> usize {
    dataplane::process::ProcessStats::read().open_fds as usize
}

#[test]
fn idle_connections_are_capped_and_timed_out() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt.block_on(admin::bind("127.0.0.1:0".parse().expect("addr"))).expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(admin::serve(listener, Arc::new(Fixed)));
    assert_eq!(get(addr, "/healthz").expect("answers").0, 200);

    let before = open_fds();
    const IDLE: usize = 3 * MAX_CONNECTIONS;
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    // The server has accepted what the cap allows and closed the rest; our
    // own IDLE sockets are in the count too.
    let start = Instant::now();
    let mut closed_at_once = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed_at_once += 1;
        }
    }
    // Saturating: the /healthz connection above may close after `before` was read.
    let held = open_fds().saturating_sub(before + IDLE);
    assert!(held <= MAX_CONNECTIONS, "the server holds {held} admin connections, over {MAX_CONNECTIONS}");
    assert!(
        closed_at_once >= IDLE - MAX_CONNECTIONS,
        "over the cap, connections close at once: {closed_at_once}"
    );

    // The ones it kept are closed by the header timeout.
    for s in &mut idle {
        s.set_read_timeout(Some(HEADER_TIMEOUT * 2)).expect("timeout");
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("an idle admin connection stayed open past {HEADER_TIMEOUT:?}: {e}"),
            }
        }
    }
    assert!(start.elapsed() < HEADER_TIMEOUT * 2, "closed by the header timeout: {:?}", start.elapsed());
    drop(idle);
    assert_eq!(get(addr, "/healthz").expect("answers again").0, 200);

    // One request per connection: the server closes after answering.
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut all = String::new();
    s.read_to_string(&mut all).expect("the server closes after one response");
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
}
