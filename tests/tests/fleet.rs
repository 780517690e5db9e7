//! The fleet, end to end, in namespaces (`tests::fleet`): two client nodes,
//! two relays in a DMZ, and a private cluster with two connector replicas
//! and the TLS API server; nftables drops every inbound connection to the
//! client nodes and to the private cluster, so every tunnel is one they
//! dialled out. Node b's identity is named in no config: the relays admit
//! it by pattern. Then the failures, one after the other: a connector
//! drained during a 256 MiB transfer, a connector and a relay killed
//! without a word under a new flow every 50 ms, and the last connector
//! gone, taking the learned routes with it.

use std::{net::SocketAddr, time::Duration};

use tests::{
    agent_process::AgentProcess,
    evil::{self, Attack},
    fleet::{self, Fleet, relay_admin, relay_at},
    probe::Ticks,
    require_root,
    topology::addr,
    tunnel_env::{TunnelEnv, kubectl_works_with},
    wait_for,
};

const CONNECTOR_ID: &str = "spiffe://dataplane.test/connector/private-cluster";
const API: &str = "198.51.100.101:6443";
const ECHO: &str = "198.51.100.102:6443";
const STREAMS_OK: &str = r#"dataplane_connector_streams_total{status="ok"}"#;
const GRANT: &str = "policy:\n  - name: workers\n    identities: ['spiffe://dataplane.test/node/worker-*']\n    \
                     to: [{ cidr: 198.51.100.101/32, ports: [6443] }, { cidr: 198.51.100.102/32, ports: [6443] }]\n";

fn relay_id(n: u16) -> String {
    format!("spiffe://dataplane.test/relay/dmz-{n}")
}

fn tls_yaml(f: &Fleet, name: &str, id: &str) -> String {
    TunnelEnv::tls_yaml(&f.tls(name, id).expect("tls"))
}

fn relay_yaml(f: &Fleet, n: u16) -> String {
    format!(
        "node: relay-{n}\n{}tunnel: {{ listen: '{}', {} }}\nrelay: {{}}\npeers:\n  \
         - {{ name: nodes, identity: 'spiffe://dataplane.test/node/*' }}\n  \
         - {{ name: private-cluster, identity: '{CONNECTOR_ID}', learn: ['198.51.100.0/24'] }}\n{GRANT}",
        tls_yaml(f, &format!("relay-{n}"), &relay_id(n)),
        relay_at(n),
        TunnelEnv::tunnel_timers(),
    )
}

/// Connector replica `n`: dials both relays, believes their attestations.
fn connector_yaml(f: &Fleet, n: u16) -> String {
    let relays: String = (1..=2)
        .map(|r| {
            format!(
                "  - {{ name: relay-{r}, dial: ['{}'], identity: '{}', relay: true }}\n",
                relay_at(r),
                relay_id(r)
            )
        })
        .collect();
    format!(
        "node: connector-{n}\n{}timeouts: {{ connect: 2s, shutdown_grace: 20s }}\ntunnel: {{ {} }}\npeers:\n{relays}\
         serve:\n  - {{ cidr: 198.51.100.101/32, ports: [6443], own_node: true }}\n  \
         - {{ cidr: 198.51.100.102/32, ports: [6443], own_node: true }}\n{GRANT}",
        tls_yaml(f, &format!("connector-{n}"), CONNECTOR_ID),
        TunnelEnv::tunnel_timers(),
    )
}

/// Client node `i` (worker-1, worker-2): dials both relays and learns from
/// them; the same file on every node but for its name and cgroup.
fn client_yaml(f: &Fleet, i: usize) -> String {
    let relays: String = (1..=2)
        .map(|r| {
            format!(
                "  - {{ name: relay-{r}, dial: ['{}'], identity: '{}', learn: ['198.51.100.0/24'] }}\n",
                relay_at(r),
                relay_id(r)
            )
        })
        .collect();
    let worker = format!("worker-{}", i + 1);
    format!(
        "node: {worker}\nsteering: {{ cgroup: {}, pin_dir: null }}\ntimeouts: {{ connect: 2s, shutdown_grace: 2s }}\n\
         {}tunnel: {{ {} }}\npeers:\n{relays}",
        f.nodes[i].cgroup.path.display(),
        tls_yaml(f, &worker, &format!("spiffe://dataplane.test/node/{worker}")),
        TunnelEnv::tunnel_timers(),
    )
}

fn spawn_relay(f: &Fleet, n: u16) -> AgentProcess {
    let env = [("DATAPLANE_LOG", "info")];
    AgentProcess::spawn(&f.dmz, &format!("relay-{n}"), &relay_yaml(f, n), relay_admin(n), f.dir(), &env)
        .expect("relay")
}

fn spawn_connector(f: &Fleet, n: u16) -> AgentProcess {
    let admin = addr(&format!("127.0.0.1:{}", 9470 + n));
    let env = [("DATAPLANE_LOG", "info")];
    AgentProcess::spawn(&f.private, &format!("connector-{n}"), &connector_yaml(f, n), admin, f.dir(), &env)
        .expect("connector")
}

fn served(c: &AgentProcess) -> f64 {
    c.metric(STREAMS_OK).expect("metric")
}

/// Routes in a client's kernel tries, IPv4.
fn kernel_routes(c: &AgentProcess) -> f64 {
    c.metric(r#"dataplane_route_map_entries{family="ipv4"}"#).expect("metric")
}

/// Kills `victim` while node `i`'s pod opens a new flow to the echo server
/// every 50 ms; returns what the loop saw and when the kill was.
fn kill_under_load(
    f: &Fleet,
    i: usize,
    victim: AgentProcess,
    survivors_served: impl Fn() -> f64,
) -> (Ticks, u128) {
    let ticker = f.nodes[i].pod_probe().tick(addr(ECHO), 50).expect("ticker");
    let before = survivors_served();
    wait_for("the loop running", tests::scaled(Duration::from_secs(10)), || {
        survivors_served() >= before + 4.0
    });
    let killed_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    victim.kill();
    let then = survivors_served();
    wait_for("twenty flows after the kill", tests::scaled(Duration::from_secs(15)), || {
        survivors_served() >= then + 20.0
    });
    (ticker.finish().expect("ticks"), killed_at)
}

/// No flow failed later than 1 s after the kill, and none waited a second.
fn no_flow_failed_late(what: &str, ticks: &Ticks, killed_at: u128) {
    eprintln!(
        "{what} SIGKILL under a flow every 50 ms: {} ok, {} refused, {} failed, {} broken; slowest {:.0} ms",
        ticks.ok,
        ticks.refused,
        ticks.failed,
        ticks.broken,
        ticks.slowest_ok_us / 1e3
    );
    ticks.assert_no_late_failure(what, killed_at);
}

#[test]
fn a_fleet_behind_firewalls_serves_kubectl_and_survives_its_failures() {
    if !require_root() {
        return;
    }
    let f = Fleet::new().expect("fleet");
    let (r1, r2) = (spawn_relay(&f, 1), spawn_relay(&f, 2));
    let (c1, c2) = (spawn_connector(&f, 1), spawn_connector(&f, 2));
    wait_for("both relays ready", tests::scaled(Duration::from_secs(20)), || r1.is_ready() && r2.is_ready());
    let start_client = |i: usize| {
        let admin = addr("127.0.0.1:9464");
        let env = [("DATAPLANE_LOG", "info")];
        AgentProcess::start_with_env(
            &f.nodes[i].node,
            &format!("client-{i}"),
            &client_yaml(&f, i),
            admin,
            f.dir(),
            &env,
        )
        .expect("client")
    };
    let clients = [start_client(0), start_client(1)];

    // Both nodes learned the routes from both relays and steer them.
    for c in &clients {
        wait_for("the learned routes in the kernel", tests::scaled(Duration::from_secs(15)), || {
            kernel_routes(c) == 2.0
        });
        let status = c.status().expect("status");
        let routes = status["routes"].as_array().expect("routes");
        let api = routes.iter().find(|r| r["cidr"] == "198.51.100.101/32").expect("the API server's route");
        assert_eq!((api["source"].as_str(), api["ready"].as_bool()), (Some("learned"), Some(true)), "{api}");
        assert_eq!(api["advertisers"], serde_json::json!(["relay-1", "relay-2"]), "{api}");
    }
    // The real kubectl from both pods; worker-2 is named in no config.
    for i in 0..2 {
        kubectl_works_with(|args| f.kubectl(i, args));
    }
    // The firewalls hold: nothing connects in from the DMZ.
    let before = fleet::dropped(&f.nodes[0].node).expect("counter");
    let knock: SocketAddr = addr("10.210.1.2:9464");
    let knocked = f
        .dmz
        .run(move || std::net::TcpStream::connect_timeout(&knock, Duration::from_millis(300)))
        .expect("ns");
    assert!(
        knocked.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused),
        "{knocked:?}"
    );
    assert!(fleet::dropped(&f.nodes[0].node).expect("counter") > before, "the inbound SYN was dropped");

    // An identity of the node pattern that no rule grants: refused at the
    // relay, counted and audited, while worker-1 and worker-2 are served.
    let intruder = "spiffe://dataplane.test/node/intruder-1";
    let evil_tls = f.tls("intruder", intruder).expect("tls");
    let relay_1 = relay_id(1);
    let attack = Attack::dial_once(relay_at(1), &relay_1, Some(addr(API)));
    let report = evil::run(&f.nodes[1].node.path(), &evil_tls, &attack).expect("intruder");
    assert_eq!(report.streams.count("denied"), 1, "{report:?}");
    assert!(r1.metric(r#"dataplane_relay_refusals_total{reason="not_allowed"}"#).expect("metric") >= 1.0);
    let log = std::fs::read_to_string(&r1.log).expect("relay log");
    assert!(
        log.lines().any(|l| l.contains("flow denied") && l.contains(&format!("client={intruder}"))),
        "{log}"
    );

    // A connector drained during a 256 MiB transfer: the transfer ends
    // byte-exact, and new flows go to the other replica meanwhile.
    let probe = f.nodes[0].pod_probe();
    let transfer = std::thread::spawn(move || probe.bulk(addr(ECHO), tests::bulk_bytes()));
    let streams = |c: &AgentProcess| {
        (1..=2)
            .map(|r| {
                c.metric(&format!(r#"dataplane_connector_peer_streams{{peer="relay-{r}"}}"#)).unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    wait_for("the transfer on a replica", tests::scaled(Duration::from_secs(10)), || {
        streams(&c1) + streams(&c2) >= 1.0
    });
    let (busy, other, busy_n) = if streams(&c1) >= 1.0 { (c1, c2, 1) } else { (c2, c1, 2) };
    let busy_before = served(&busy);
    busy.terminate();
    // The relays stop choosing it as soon as they hear it drain.
    let draining = |r: &AgentProcess| {
        r.status().ok().and_then(|s| {
            let routes = s["routes"].as_array()?.clone();
            routes.iter().find(|r| r["cidr"] == "198.51.100.102/32").and_then(|r| r["draining"].as_u64())
        })
    };
    wait_for("both relays hear the replica drain", tests::scaled(Duration::from_secs(5)), || {
        draining(&r1) == Some(2) && draining(&r2) == Some(2)
    });
    let other_before = served(&other);
    let probes = f.nodes[1].pod_probe().repeat(addr(ECHO), 10).expect("probes");
    let tails = || {
        let grep = |a: &AgentProcess| {
            let log = std::fs::read_to_string(&a.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("tunnel connection up")).collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        format!(
            "client b:\n{}\nrelay 1:\n{}\nrelay 2:\n{}\nserving connector:\n{}",
            grep(&clients[1]),
            grep(&r1),
            grep(&r2),
            grep(&other)
        )
    };
    assert_eq!((probes.ok, probes.failed), (10, 0), "{probes:?}\n{}", tails());
    assert_eq!(served(&other), other_before + 10.0, "every new flow on the serving replica");
    assert_eq!(served(&busy), busy_before, "none on the draining one");
    let bulk = transfer.join().expect("thread").expect("bulk");
    assert!(bulk.ok && bulk.echo_intact && bulk.received == tests::bulk_bytes(), "{bulk:?}");
    eprintln!(
        "{} MiB through a draining connector and a relay in {:.2} s, byte-exact",
        tests::bulk_bytes() >> 20,
        bulk.secs
    );
    busy.wait_exit(tests::scaled(Duration::from_secs(20))).expect("the drained replica exits");
    let back = spawn_connector(&f, busy_n);
    wait_for("the replica back on both relays", tests::scaled(Duration::from_secs(15)), || back.is_ready());

    // A connector killed without a word under load: the relays fail over.
    let (ticks, at) = kill_under_load(&f, 0, other, || served(&back));
    no_flow_failed_late("connector", &ticks, at);

    // A relay killed without a word under load: the clients fail over.
    let relayed = |r: &AgentProcess| {
        r.metric(r#"dataplane_relay_streams_total{route="198.51.100.102/32",result="ok"}"#).unwrap_or(0.0)
    };
    let (ticks, at) = kill_under_load(&f, 1, r1, || relayed(&r2));
    no_flow_failed_late("relay", &ticks, at);

    // The last connector goes: the routes leave every client's tries.
    back.terminate();
    back.wait_exit(tests::scaled(Duration::from_secs(20))).expect("connector exits");
    for c in &clients {
        wait_for("the learned routes withdrawn", tests::scaled(Duration::from_secs(10)), || {
            kernel_routes(c) == 0.0
        });
    }
    wait_for("the relay unready: no connector", tests::scaled(Duration::from_secs(10)), || !r2.is_ready());
}
