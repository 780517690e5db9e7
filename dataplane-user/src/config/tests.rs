use ipnet::IpNet;

use super::*;

const GOOD: &str = "
node: worker-1
steering:
  cgroup: /sys/fs/cgroup/unified
  redirect:
    interface: dp0
    v4: 169.254.77.1:15001
    v6: '[fd00:d47a::1]:15001'
timeouts: { connect: 3s, shutdown_grace: 500ms }
routes:
  - { cidr: 198.51.100.101/32, via: direct }
  - { cidr: 2001:db8::101/128, via: direct }
";

fn err(text: &str) -> String {
    Config::parse(text).expect_err("config must be rejected").to_string()
}

#[test]
fn parses_a_full_config() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!(c.node, "worker-1");
    assert_eq!(c.steering.redirect.interface, "dp0");
    assert_eq!(c.timeouts.connect, Duration::from_secs(3));
    assert_eq!(c.timeouts.shutdown_grace, Duration::from_millis(500));
    let routes = c.valid_routes();
    assert_eq!(routes[1].net, "2001:db8::101/128".parse::<IpNet>().expect("net"));
}

#[test]
fn defaults_fill_the_steering_section() {
    let c = Config::parse("routes: [{ cidr: 10.9.0.0/16, via: direct }]").expect("valid");
    assert_eq!(c.steering.cgroup, None);
    assert_eq!(c.steering.redirect, Redirect::default());
    assert_eq!(c.timeouts, Timeouts::default());
}

#[test]
fn null_disables_a_family() {
    let c =
        Config::parse("steering: { redirect: { v6: null } }\nroutes: [{ cidr: 10.9.0.0/16, via: direct }]")
            .expect("valid");
    assert!(c.steering.redirect.v6.is_none());
    assert!(c.steering.redirect.v4.is_some());
}

#[test]
fn unknown_fields_are_named() {
    let e = err("routes: [{ cidr: 10.0.0.0/8, via: direct, port: 1 }]");
    assert!(e.contains("unknown field `port`"), "{e}");
    let e = err("steering: { cgroups: /x }\nroutes: [{ cidr: 10.0.0.0/8, via: direct }]");
    assert!(e.contains("unknown field `cgroups`"), "{e}");
}

#[test]
fn bad_cidrs_name_the_route() {
    let e = err("routes: [{ cidr: 10.0.0.0/8, via: direct }, { cidr: 300.1.1.1/32, via: direct }]");
    assert!(e.contains("routes[1].cidr") && e.contains("not a CIDR"), "{e}");
    let e = err("routes: [{ cidr: 198.51.100.1/24, via: direct }]");
    assert!(e.contains("routes[0].cidr") && e.contains("did you mean 198.51.100.0/24"), "{e}");
    let e = err("routes: [{ cidr: 198.51.100.1, via: direct }]");
    assert!(e.contains("routes[0].cidr"), "{e}");
}

#[test]
fn overlapping_routes_are_rejected_in_either_order() {
    for text in [
        "routes: [{ cidr: 198.51.100.0/24, via: direct }, { cidr: 198.51.100.101/32, via: direct }]",
        "routes: [{ cidr: 198.51.100.101/32, via: direct }, { cidr: 198.51.100.0/24, via: direct }]",
        "routes: [{ cidr: 2001:db8::/32, via: direct }, { cidr: 2001:db8::101/128, via: direct }]",
    ] {
        let e = err(text);
        assert!(e.contains("routes[1].cidr") && e.contains("overlaps routes[0].cidr"), "{e}");
    }
}

#[test]
fn an_agent_that_does_nothing_is_rejected() {
    assert!(err("routes: []").contains("routes, serve and every peer's learn are empty"));
    assert!(err("node: a").contains("routes"));
}

#[test]
fn a_node_may_only_learn_routes_within_bounds() {
    let peer = |learn: &str, identity: &str| {
        format!(
            "{TLS}peers:\n  - {{ name: relay, dial: ['192.0.2.1:4433'], identity: '{identity}', learn: {learn} }}\n"
        )
    };
    let c = Config::parse(&peer("['198.51.100.0/24', '2001:db8::/32']", "spiffe://t/relay"))
        .expect("learn-only node");
    assert!(c.learns_routes());
    assert_eq!(c.valid_learn("relay").len(), 2);
    assert!(c.valid_learn("other").is_empty());
    let e = err(&peer("['127.0.0.0/8']", "spiffe://t/relay"));
    assert!(e.contains("peers[0].learn[0]") && e.contains("loop"), "{e}");
    let e = err(&peer("['198.51.100.1/24']", "spiffe://t/relay"));
    assert!(e.contains("peers[0].learn[0]") && e.contains("host bits"), "{e}");
    // The default redirect listener is 169.254.77.1: no learned route may cover it.
    let e = err(&peer("['169.254.0.0/16']", "spiffe://t/relay"));
    assert!(e.contains("peers[0].learn[0]"), "{e}");
    let e = err(&peer("['198.51.100.0/24']", "spiffe://t/relay/*"));
    assert!(e.contains("peers[0].learn") && e.contains("exact identity"), "{e}");
}

#[test]
fn a_relay_listens_learns_and_does_nothing_else() {
    let relay = |extra: &str| {
        format!(
            "{TLS}relay: {{}}\ntunnel: {{ listen: '0.0.0.0:4433' }}\npeers:\n  - {{ name: nodes, identity: 'spiffe://t/node/*' }}\n  \
             - {{ name: c1, identity: 'spiffe://t/connector/c1', learn: ['198.51.100.0/24'] }}\n{extra}"
        )
    };
    let c = Config::parse(&relay(
        "policy:\n  - { name: w, identities: ['spiffe://t/node/*'], to: [{ cidr: 198.51.100.101/32, ports: [6443] }] }\n",
    ))
    .expect("a relay config");
    assert!(!c.steers(), "a relay never steers, though it learns");
    let e = err(&relay(
        "policy:\n  - { name: w, identities: ['spiffe://t/node/*'], to: [{ cidr: 203.0.113.0/24, ports: [6443] }] }\n",
    ));
    assert!(e.contains("policy[0].to[0].cidr") && e.contains("learn"), "{e}");
    let e = err(&relay("routes: [{ cidr: 192.0.2.0/24, via: direct }]\n"));
    assert!(e.contains("routes") && e.contains("relay steers nothing"), "{e}");
    let e = err(&relay("serve: [{ cidr: 192.0.2.0/24, ports: [6443] }]\n"));
    assert!(e.contains("serve") && e.contains("relay dials nothing"), "{e}");
    let e = err(&relay("").replace("tunnel: { listen: '0.0.0.0:4433' }", "tunnel: {}").replace(
        "identity: 'spiffe://t/node/*' }",
        "dial: ['192.0.2.9:4433'], identity: 'spiffe://t/node/*' }",
    ));
    assert!(e.contains("tunnel.listen"), "{e}");
    let e = err(&relay("").replace(", learn: ['198.51.100.0/24']", ""));
    assert!(e.contains("learn"), "{e}");
    // A connector's relay peer: one exact identity.
    let e = err(&format!(
        "{TLS}peers:\n  - {{ name: r, dial: ['192.0.2.1:4433'], identity: 'spiffe://t/relay/*', relay: true }}\nserve: [{{ cidr: 192.0.2.0/24, ports: [6443] }}]\n"
    ));
    assert!(e.contains("peers[0].relay") && e.contains("exact identity"), "{e}");
}

#[test]
fn unknown_upstreams_are_rejected() {
    let e = err("routes: [{ cidr: 10.0.0.0/8, via: private-cluster }]");
    assert!(
        e.contains("routes[0].via") && e.contains("private-cluster") && e.contains("known: direct"),
        "{e}"
    );
}

const TLS: &str = "tls: { ca: /c/ca.crt, cert: /c/tls.crt, key: /c/tls.key }\n";

#[test]
fn a_client_and_a_connector_config_parse() {
    let client = format!(
        "{TLS}peers:\n  - {{ name: private, dial: ['10.0.0.2:4433'], identity: 'spiffe://t/connector' }}\n\
         routes: [{{ cidr: 198.51.100.101/32, via: private }}]\n"
    );
    let c = Config::parse(&client).expect("client config");
    assert_eq!(c.peers[0].connections, 2, "default connections per peer");
    assert_eq!(c.tunnel.keep_alive, Duration::from_secs(2));
    let connector = format!(
        "{TLS}tunnel: {{ listen: '0.0.0.0:4433' }}\npeers: [{{ name: client, identity: 'spiffe://t/node' }}]\n\
         serve: [{{ cidr: 198.51.100.101/32, ports: [6443] }}]\n"
    );
    let c = Config::parse(&connector).expect("connector config");
    assert_eq!(c.valid_serve()[0].ports, vec![6443]);
    assert!(c.valid_routes().is_empty());
}

#[test]
fn tunnel_configs_are_checked() {
    let peer = "peers: [{ name: p, dial: ['10.0.0.2:4433'], identity: 'spiffe://t/p' }]\n";
    let route = "routes: [{ cidr: 198.51.100.101/32, via: p }]\n";
    let e = err(&format!("{peer}{route}"));
    assert!(e.contains("tls: required"), "{e}");
    let e = err(&format!("{TLS}peers: [{{ name: p, identity: 'spiffe://t/p' }}]\n{route}"));
    assert!(e.contains("peers[0].dial") && e.contains("nothing would ever connect"), "{e}");
    let e = err(&format!(
        "{TLS}peers: [{{ name: direct, dial: ['10.0.0.2:1'], identity: 'spiffe://t/p' }}]\n{route}"
    ));
    assert!(e.contains("peers[0].name"), "{e}");
    let e = err(&format!("{TLS}peers: [{{ name: p, dial: ['10.0.0.2:1'], identity: nope }}]\n{route}"));
    assert!(e.contains("peers[0].identity") && e.contains("not a URI"), "{e}");
    let two = "peers: [{ name: p, dial: ['10.0.0.2:1'], identity: 'spiffe://t/p' }, { name: q, dial: ['10.0.0.3:1'], identity: 'spiffe://t/p' }]\n";
    let e = err(&format!("{TLS}{two}{route}"));
    assert!(e.contains("peers[1].identity"), "{e}");
    let e = err(&format!(
        "{TLS}peers: [{{ name: p, dial: ['10.0.0.2:1'], identity: 'spiffe://t/p', connections: 0 }}]\n{route}"
    ));
    assert!(e.contains("peers[0].connections"), "{e}");
    let e = err(&format!("{TLS}{peer}{route}tunnel: {{ keep_alive: 10s, idle_timeout: 5s }}\n"));
    assert!(e.contains("tunnel.keep_alive"), "{e}");
}

#[test]
fn a_connector_never_serves_loopback_link_local_or_metadata() {
    let base = format!(
        "{TLS}tunnel: {{ listen: '0.0.0.0:4433' }}\npeers: [{{ name: c, identity: 'spiffe://t/c' }}]\n"
    );
    for (cidr, needle) in [
        ("127.0.0.1/32", "loopback"),
        ("169.254.169.254/32", "metadata"),
        ("0.0.0.0/0", "unspecified"),
        ("'fe80::/64'", "link-local"),
        ("'fd00:ec2::254/128'", "metadata"),
        ("'::/0'", "unspecified"),
    ] {
        let e = err(&format!("{base}serve: [{{ cidr: {cidr}, ports: [443] }}]\n"));
        assert!(e.contains("serve[0].cidr") && e.contains(needle), "{cidr}: {e}");
    }
    let e = err(&format!("{base}serve: [{{ cidr: 10.0.0.0/8, ports: [] }}]\n"));
    assert!(e.contains("serve[0].ports"), "{e}");
    let e = err(&format!("{TLS}serve: [{{ cidr: 10.0.0.0/8, ports: [443] }}]\n"));
    assert!(e.contains("serve: needs at least one entry in peers"), "{e}");
}

#[test]
fn a_cidr_both_routed_and_served_is_rejected() {
    let e = err(&format!(
        "{TLS}tunnel: {{ listen: '0.0.0.0:4433' }}\npeers: [{{ name: c, identity: 'spiffe://t/c' }}]\n\
         routes: [{{ cidr: 10.1.0.0/16, via: c }}]\nserve: [{{ cidr: 10.0.0.0/8, ports: [443] }}]\n"
    ));
    assert!(e.contains("serve[0].cidr") && e.contains("overlaps routes[0].cidr"), "{e}");
}

#[test]
fn routes_may_not_cover_the_listener_or_loopback() {
    let e = err("routes: [{ cidr: 0.0.0.0/0, via: direct }]");
    assert!(e.contains("routes[0].cidr"), "{e}");
    let e = err("routes: [{ cidr: 169.254.0.0/16, via: direct }]");
    assert!(e.contains("redirect listener"), "{e}");
    let e = err("routes: [{ cidr: 127.0.0.0/8, via: direct }]");
    assert!(e.contains("loopback"), "{e}");
    let e = err("routes: [{ cidr: 'fd00::/8', via: direct }]");
    assert!(e.contains("steering.redirect.v6"), "{e}");
}

/// Loopback in any spelling: each of these passed `dataplane check` once.
#[test]
fn routes_may_not_cover_loopback_in_any_spelling() {
    for cidr in
        ["127.0.0.2/32", "127.128.0.0/9", "'::ffff:127.0.0.1/128'", "'::ffff:0.0.0.0/96'", "'::7f00:1/128'"]
    {
        let e = err(&format!("routes: [{{ cidr: {cidr}, via: direct }}]"));
        // ::ffff:0.0.0.0/96 covers all of IPv4: 0.0.0.0/8 is found first.
        assert!(
            e.contains("routes[0].cidr") && (e.contains("loopback") || e.contains("unspecified")),
            "{cidr}: {e}"
        );
    }
    // The redirect listener in its mapped spelling is still the listener.
    let e = err("routes: [{ cidr: '::ffff:169.254.77.1/128', via: direct }]");
    assert!(e.contains("steering.redirect.v4"), "{e}");
}

/// The agent dials a `via: direct` route itself: never the metadata
/// address or link-local, however spelled.
#[test]
fn direct_routes_never_reach_link_local_or_metadata() {
    let no_v4_listener = "steering: { redirect: { v4: null } }
";
    for cidr in ["169.254.169.254/32", "'64:ff9b::a9fe:a9fe/128'", "'fe80::1/128'", "224.0.0.0/8"] {
        let e = err(&format!("{no_v4_listener}routes: [{{ cidr: {cidr}, via: direct }}]"));
        assert!(e.contains("routes[0].cidr") && e.contains("via: direct"), "{cidr}: {e}");
    }
    // Through a peer the connector's policy decides (it refuses these too).
    let ok = format!(
        "{TLS}{no_v4_listener}peers: [{{ name: c, dial: ['192.0.2.1:4433'], identity: 'spiffe://t/c' }}]\n\
         routes: [{{ cidr: 198.51.100.0/24, via: c }}]\n"
    );
    Config::parse(&ok).expect("a peer route is fine");
}

#[test]
fn serve_refuses_forbidden_ranges_in_other_spellings() {
    let base = format!(
        "{TLS}tunnel: {{ listen: '0.0.0.0:4433' }}\npeers: [{{ name: c, identity: 'spiffe://t/c' }}]\n"
    );
    for cidr in ["'64:ff9b::a9fe:a9fe/128'", "'2002:7f00::/24'", "'::ffff:127.0.0.0/104'"] {
        let e = err(&format!("{base}serve: [{{ cidr: {cidr}, ports: [443] }}]\n"));
        assert!(e.contains("serve[0].cidr") && e.contains("never dials"), "{cidr}: {e}");
    }
}

#[test]
fn routes_are_capped_at_the_kernel_tries_capacity() {
    let n = dataplane_common::ROUTES_MAX_ENTRIES as usize + 1;
    let routes: String =
        (0..n).map(|i| format!("  - {{ cidr: 10.{}.{}.0/24, via: direct }}\n", i / 256, i % 256)).collect();
    let e = err(&format!("routes:\n{routes}"));
    assert!(e.contains("routes:") && e.contains("4097 IPv4 routes") && e.contains("4096"), "{e}");
}

#[test]
fn bad_listeners_are_named() {
    let base = "\nroutes: [{ cidr: 10.0.0.0/8, via: direct }]";
    let e = err(&format!("steering: {{ redirect: {{ v4: '[fd00::1]:1' }} }}{base}"));
    assert!(e.contains("steering.redirect.v4") && e.contains("not an IPv4"), "{e}");
    let e = err(&format!("steering: {{ redirect: {{ v4: 127.0.0.1:1 }} }}{base}"));
    assert!(e.contains("steering.redirect.v4") && e.contains("not reachable from pods"), "{e}");
    let e = err(&format!("steering: {{ redirect: {{ v4: 169.254.1.1:0 }} }}{base}"));
    assert!(e.contains("port must not be 0"), "{e}");
    let e = err(&format!("steering: {{ redirect: {{ interface: this-name-is-too-long }} }}{base}"));
    assert!(e.contains("steering.redirect.interface"), "{e}");
    let e = err(&format!("steering: {{ redirect: {{ v4: null, v6: null }} }}{base}"));
    assert!(e.contains("both disabled"), "{e}");
}

#[test]
fn bad_durations_are_named() {
    let e = err("timeouts: { connect: soon }\nroutes: [{ cidr: 10.0.0.0/8, via: direct }]");
    assert!(e.contains("timeouts.connect"), "{e}");
}

#[test]
fn restart_only_changes_are_listed() {
    let a = Config::parse(GOOD).expect("valid");
    let mut b = a.config().clone();
    b.routes.pop();
    assert!(a.restart_only_changes(&b).is_empty());
    b.steering.redirect.interface = "other".into();
    b.steering.cgroup = None;
    assert_eq!(a.restart_only_changes(&b), vec!["steering.cgroup", "steering.redirect"]);
}

#[test]
fn peers_reload_but_the_first_learn_needs_steering() {
    let a = Config::parse(&format!(
        "{GOOD}tls: {{ ca: /c, cert: /c, key: /k }}\npeers: [{{ name: p, dial: ['192.0.2.1:4433'], identity: 'spiffe://t/p' }}]\n"
    ))
    .expect("valid");
    let mut b = a.config().clone();
    b.peers[0].identity = "spiffe://example.org/connector/other".into();
    b.peers[0].connections = 4;
    b.peers.push(b.peers[0].clone());
    b.peers[1].name = "second".into();
    assert!(a.restart_only_changes(&b).is_empty(), "{:?}", a.restart_only_changes(&b));
    // A connector steers nothing: learning from a peer needs steering,
    // which is set up at start.
    let connector = Config::parse(
        "tls: { ca: /c, cert: /c, key: /k }\ntunnel: { listen: '127.0.0.1:4433' }\n\
         peers: [{ name: n, identity: 'spiffe://t/n' }]\nserve: [{ cidr: 10.9.0.0/16, ports: [443] }]\n",
    )
    .expect("valid");
    let mut c = connector.config().clone();
    c.peers[0].learn = vec!["10.8.0.0/16".into()];
    assert_eq!(
        connector.restart_only_changes(&c),
        vec!["routes or peers[].learn (the first needs steering, set up at start)"]
    );
}

#[test]
fn workers_default_to_the_cpus_and_are_bounded() {
    let c = Config::parse(GOOD).expect("valid");
    assert_eq!((c.worker_threads(0), c.worker_threads(2), c.worker_threads(16)), (1, 2, 16));
    let c = Config::parse(&format!("{GOOD}workers: 3\n")).expect("valid");
    assert_eq!(c.worker_threads(2), 3);
    for bad in ["0", "257", "-1", "two"] {
        let e = err(&format!("{GOOD}workers: {bad}\n"));
        assert!(e.contains("workers"), "{bad}: {e}");
    }
    let mut d = c.config().clone();
    d.workers = None;
    assert_eq!(c.restart_only_changes(&d), vec!["workers"]);
}

#[test]
fn limits_have_defaults_and_bounds() {
    let route = "routes: [{ cidr: 10.9.0.0/16, via: direct }]\n";
    let c = Config::parse(route).expect("valid");
    assert_eq!(c.limits, Limits::default());
    assert_eq!(
        (c.limits.connections_per_peer, c.limits.streams_per_peer, c.limits.dials_per_peer),
        (8, 8192, 256)
    );
    assert_eq!(c.limits.flow_idle_timeout, None, "the idle timeout is off unless asked for");
    let c =
        Config::parse(&format!("limits: {{ flow_idle_timeout: 1h, stream_header_timeout: 2s }}\n{route}"))
            .expect("valid");
    assert_eq!(c.limits.flow_idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(c.limits.stream_header_timeout, Duration::from_secs(2));
    for (field, value, says) in [
        ("flows_per_workload", "0", "must be between 1 and 65536"),
        ("connections_per_peer", "0", "must be between 1 and 256"),
        ("connections_per_peer", "257", "must be between 1 and 256"),
        ("streams_per_peer", "65537", "must be between 1 and 65536"),
        ("dials_per_peer", "0", "must be between 1 and 65536"),
        ("stream_header_timeout", "10ms", "must be between 100ms and 5m"),
        ("flow_idle_timeout", "500ms", "must be at least 1s"),
    ] {
        let e = err(&format!("limits: {{ {field}: {value} }}\n{route}"));
        assert!(e.contains(&format!("limits.{field}")) && e.contains(says), "{field}={value}: {e}");
    }
}

#[test]
fn on_no_peer_is_for_routes_via_a_peer() {
    let e = err("routes: [{ cidr: 10.9.0.0/16, via: direct, on_no_peer: pass }]");
    assert!(e.contains("routes[0].on_no_peer") && e.contains("via: direct"), "{e}");
    let e = err("routes: [{ cidr: 10.9.0.0/16, via: direct, on_no_peer: sometimes }]");
    assert!(e.contains("unknown variant `sometimes`"), "{e}");
}

#[test]
fn steering_is_pinned_by_default_and_null_unpins_it() {
    let c = Config::parse("routes: [{ cidr: 10.9.0.0/16, via: direct }]").expect("valid");
    assert_eq!(c.steering.pin_dir.as_deref(), Some(std::path::Path::new("/sys/fs/bpf/dataplane")));
    assert_eq!(c.steering.handover_wait, Duration::from_secs(10));
    assert_eq!((c.steering.flow_capacity, c.steering.bypass_capacity), (65536, 16384));
    let c = Config::parse("steering: { pin_dir: null }\nroutes: [{ cidr: 10.9.0.0/16, via: direct }]")
        .expect("valid");
    assert_eq!(c.steering.pin_dir, None);
}

#[test]
fn pinning_settings_are_checked() {
    let route = "routes: [{ cidr: 10.9.0.0/16, via: direct }]";
    let e = err(&format!("steering: {{ pin_dir: bpf/dataplane }}\n{route}"));
    assert!(e.contains("steering.pin_dir") && e.contains("absolute"), "{e}");
    let e = err(&format!("steering: {{ handover_wait: 11m }}\n{route}"));
    assert!(e.contains("steering.handover_wait") && e.contains("at most"), "{e}");
    let e = err(&format!("steering: {{ flow_capacity: 100 }}\n{route}"));
    assert!(e.contains("steering.flow_capacity: 100: must be between 1024 and 1048576"), "{e}");
    let e = err(&format!("steering: {{ bypass_capacity: 0 }}\n{route}"));
    assert!(e.contains("steering.bypass_capacity"), "{e}");
    let e = err(&format!("steering: {{ redirect: {{ v4: 169.254.77.1:65535 }} }}\n{route}"));
    assert!(e.contains("steering.redirect.v4") && e.contains("next port"), "{e}");
    // Unpinned, the last port is fine: no successor takes the next one.
    Config::parse(&format!("steering: {{ pin_dir: null, redirect: {{ v4: 169.254.77.1:65535 }} }}\n{route}"))
        .expect("unpinned");
}

const CONNECTOR: &str = "tunnel: { listen: '0.0.0.0:4433' }\n\
     peers: [{ name: nodes, identity: 'spiffe://t/node/*' }, { name: admin, identity: 'spiffe://t/user/admin' }]\n\
     serve:\n  - { cidr: 198.51.100.0/24, ports: [6443] }\n  - { cidr: '2001:db8::/64', ports: [443, 6443] }\n";

#[test]
fn peers_admit_identities_by_pattern_and_policy_grants_destinations() {
    let text = format!(
        "{TLS}{CONNECTOR}policy:\n  - name: ci\n    identities: ['spiffe://t/node/ci-*']\n    \
         to: [{{ cidr: 198.51.100.101/32, ports: [6443] }}, {{ cidr: '2001:db8::/80', ports: [443] }}]\n"
    );
    let c = Config::parse(&text).expect("connector with a pattern peer and a policy");
    let peers = c.valid_peers();
    assert!(!peers[0].1.is_exact() && peers[0].1.matches("spiffe://t/node/ci-9"));
    assert!(peers[1].1.is_exact());
    let rule = &c.valid_policy()[0];
    assert_eq!(rule.name, "ci");
    assert_eq!(rule.to[1], ("2001:db8::/80".parse().expect("net"), vec![443]));
    // No policy at all is valid: exact peers keep what they had.
    assert!(Config::parse(&format!("{TLS}{CONNECTOR}")).expect("valid").valid_policy().is_empty());
}

#[test]
fn bad_patterns_and_policies_are_refused_by_field() {
    let pattern = |id: &str| {
        err(&format!(
            "{TLS}tunnel: {{ listen: '0.0.0.0:4433' }}\npeers: [{{ name: n, identity: '{id}' }}]\n\
             serve: [{{ cidr: 198.51.100.0/24, ports: [6443] }}]\n"
        ))
    };
    let e = pattern("spiffe://*/node/a");
    assert!(e.contains("peers[0].identity") && e.contains("only in the path"), "{e}");
    let e = pattern("spiffe://t/**");
    assert!(e.contains("peers[0].identity") && e.contains("`**`"), "{e}");
    let rule = |body: &str| err(&format!("{TLS}{CONNECTOR}policy:\n  - {body}\n"));
    for (body, want) in [
        (
            "{ name: '', identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/32, ports: [6443] }] }",
            "policy[0].name",
        ),
        (
            "{ name: a, identities: [], to: [{ cidr: 198.51.100.1/32, ports: [6443] }] }",
            "policy[0].identities",
        ),
        (
            "{ name: a, identities: ['nope'], to: [{ cidr: 198.51.100.1/32, ports: [6443] }] }",
            "policy[0].identities[0]",
        ),
        ("{ name: a, identities: ['spiffe://t/a'], to: [] }", "policy[0].to"),
        (
            "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/33, ports: [6443] }] }",
            "policy[0].to[0].cidr",
        ),
        (
            "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/32, ports: [] }] }",
            "policy[0].to[0].ports",
        ),
        // More than is served: it would grant nothing there.
        (
            "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.0.0/16, ports: [6443] }] }",
            "not inside one serve entry",
        ),
        (
            "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/32, ports: [22] }] }",
            "port 22",
        ),
        (
            "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/32, ports: [6443] }], extra: 1 }",
            "unknown field",
        ),
    ] {
        let e = rule(body);
        assert!(e.contains(want), "{body}: {e}");
    }
    let twice = "{ name: a, identities: ['spiffe://t/a'], to: [{ cidr: 198.51.100.1/32, ports: [6443] }] }";
    let e = rule(&format!("{twice}\n  - {twice}"));
    assert!(e.contains("policy[1].name") && e.contains("also policy[0]"), "{e}");
    // A route trusts one peer: never whoever matches a pattern.
    let e = err(&format!(
        "{TLS}peers: [{{ name: p, dial: ['10.0.0.2:1'], identity: 'spiffe://t/connector/*' }}]\n\
         routes: [{{ cidr: 198.51.100.101/32, via: p }}]\n"
    ));
    assert!(e.contains("routes[0].via") && e.contains("one exact identity"), "{e}");
    // A policy on an agent that serves nothing is a mistake, said so.
    let e = err(&format!(
        "{TLS}peers: [{{ name: p, dial: ['10.0.0.2:1'], identity: 'spiffe://t/p' }}]\n\
         routes: [{{ cidr: 198.51.100.101/32, via: p }}]\npolicy: [{twice}]\n"
    ));
    assert!(e.contains("policy: set, but this agent serves nothing"), "{e}");
}

/// The fleet configurations the README shows (one per role) are ones the
/// agent takes. (The reference block above them lists every field, for a
/// client and a connector at once, and is not one agent's config.)
#[test]
fn the_readme_fleet_examples_validate() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let fleet = readme.split("## Fleet").nth(1).and_then(|s| s.split("\n## ").next()).expect("fleet section");
    let blocks: Vec<&str> =
        fleet.split("```yaml\n").skip(1).map(|b| b.split("```").next().unwrap_or_default()).collect();
    assert_eq!(blocks.len(), 3, "a client node, a relay, a connector");
    for block in blocks {
        if let Err(e) = Config::parse(block) {
            panic!("README example refused: {e}\n{block}");
        }
    }
}

const DISCOVERS: &str = "tunnel: { listen: '0.0.0.0:4433' }\n\
     peers: [{ name: nodes, identity: 'spiffe://t/node/*' }, { name: admin, identity: 'spiffe://t/user/admin' }]\n";

#[test]
fn a_connector_may_serve_its_clusters_api_server_by_discovery() {
    let c = Config::parse(&format!("{TLS}{DISCOVERS}serve: [{{ kubernetes: true }}]\n"))
        .expect("discovering connector");
    assert_eq!(c.kubernetes_serve(), Some(KubernetesServe { own_node: false }));
    assert!(c.serves() && c.valid_serve().is_empty());
    // Beside ranges, and granted by policy as `kubernetes: true`.
    let text = format!(
        "{TLS}{DISCOVERS}serve:\n  - {{ kubernetes: true, own_node: true }}\n  - {{ cidr: 198.51.100.0/24, ports: [443] }}\n\
         policy:\n  - name: ops\n    identities: ['spiffe://t/node/ops-*']\n    to: [{{ kubernetes: true }}, {{ cidr: 198.51.100.7/32, ports: [443] }}]\n"
    );
    let c = Config::parse(&text).expect("with a policy");
    assert_eq!(c.kubernetes_serve(), Some(KubernetesServe { own_node: true }));
    let rule = &c.valid_policy()[0];
    assert!(rule.to_kubernetes && rule.to.len() == 1);
}

#[test]
fn bad_kubernetes_entries_are_refused_by_field() {
    let serve = |entries: &str| err(&format!("{TLS}{DISCOVERS}serve: [{entries}]\n"));
    let e = serve("{ kubernetes: true, cidr: 198.51.100.0/24, ports: [443] }");
    assert!(e.contains("serve[0].kubernetes") && e.contains("not both"), "{e}");
    let e = serve("{ kubernetes: true, ports: [443] }");
    assert!(e.contains("serve[0].ports") && e.contains("EndpointSlices"), "{e}");
    let e = serve("{ kubernetes: true }, { kubernetes: true }");
    assert!(e.contains("serve[1].kubernetes") && e.contains("serve[0] already"), "{e}");
    let e = serve("{ ports: [443] }");
    assert!(e.contains("serve[0].cidr") && e.contains("kubernetes: true"), "{e}");
    let e = serve("{ kubernetes: false }");
    assert!(e.contains("serve[0].cidr"), "{e}");

    let policy = |serve: &str, to: &str| {
        err(&format!(
            "{TLS}{DISCOVERS}serve: [{serve}]\npolicy: [{{ name: p, identities: ['spiffe://t/node/*'], to: [{to}] }}]\n"
        ))
    };
    let ranges = "{ cidr: 198.51.100.0/24, ports: [443] }";
    let e = policy(ranges, "{ kubernetes: true }");
    assert!(e.contains("policy[0].to[0].kubernetes") && e.contains("nothing discovered"), "{e}");
    let e = policy("{ kubernetes: true }", "{ kubernetes: true, ports: [443] }");
    assert!(e.contains("policy[0].to[0].ports"), "{e}");
    let e = policy("{ kubernetes: true }", "{ kubernetes: true, cidr: 198.51.100.0/24 }");
    assert!(e.contains("policy[0].to[0].kubernetes") && e.contains("not both"), "{e}");
    let e = policy("{ kubernetes: true }", "{ ports: [443] }");
    assert!(e.contains("policy[0].to[0].cidr"), "{e}");
    // A relay dials nothing, discovered or not.
    let e = err(&format!("{TLS}{DISCOVERS}relay: {{}}\nserve: [{{ kubernetes: true }}]\n"));
    assert!(e.contains("serve") && e.contains("relay dials nothing"), "{e}");
}

#[test]
fn starting_or_stopping_discovery_needs_a_restart() {
    let a = Config::parse(&format!("{TLS}{DISCOVERS}serve: [{{ cidr: 198.51.100.0/24, ports: [443] }}]\n"))
        .expect("valid");
    let mut b = a.config().clone();
    b.serve.push(Serve { cidr: None, ports: Vec::new(), own_node: false, kubernetes: true });
    assert_eq!(a.restart_only_changes(&b), vec!["serve[].kubernetes (the discovery is set up at start)"]);
    b.serve.remove(0);
    let b = b.validate().expect("valid");
    assert!(b.restart_only_changes(b.config()).is_empty());
}
