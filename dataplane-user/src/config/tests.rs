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
    let routes = c.valid_routes().expect("valid");
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
fn empty_routes_are_rejected() {
    assert!(err("routes: []").contains("routes: must list at least one route"));
    assert!(err("node: a").contains("routes"));
}

#[test]
fn unknown_upstreams_are_rejected() {
    let e = err("routes: [{ cidr: 10.0.0.0/8, via: private-cluster }]");
    assert!(e.contains("routes[0].via") && e.contains("private-cluster"), "{e}");
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
    let mut b = a.clone();
    b.routes.pop();
    assert!(a.restart_only_changes(&b).is_empty());
    b.steering.redirect.interface = "other".into();
    b.steering.cgroup = None;
    assert_eq!(a.restart_only_changes(&b), vec!["steering.cgroup", "steering.redirect"]);
}
