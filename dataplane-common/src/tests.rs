use super::*;

#[test]
fn counters_are_indexed_in_order() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(*c as u32, i as u32, "{c:?}");
    }
}

#[test]
fn counter_labels_are_unique_per_hook() {
    for a in Counter::ALL {
        for b in Counter::ALL {
            if a != b {
                assert!((a.hook(), a.reason()) != (b.hook(), b.reason()), "{a:?} vs {b:?}");
            }
        }
    }
}

#[test]
fn port_conversions_round_trip_and_match_kernel_layout() {
    // The kernel stores 6443 (0x192b) as big-endian in the low 16 bits.
    let user = port_to_user(6443);
    assert_eq!((user as u16).to_ne_bytes(), [0x19, 0x2b]);
    assert_eq!(port_from_user(user), 6443);
}

#[test]
fn address_words_keep_octet_order_in_memory() {
    let w = v4_word([198, 51, 100, 101]);
    assert_eq!(w.to_ne_bytes(), [198, 51, 100, 101]);
    assert_eq!(v4_octets(w), [198, 51, 100, 101]);
    let o6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x01];
    assert_eq!(v6_octets(v6_words(o6)), o6);
    assert_eq!(v6_words(o6)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
}

#[test]
fn v4_mapped_flow_keys_become_v4() {
    let mapped = v6_words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 2]);
    assert!(is_v4_mapped(mapped));
    assert_eq!(FlowKey::v6(mapped, 40000), FlowKey::v4(v4_word([10, 0, 0, 2]), 40000));
    let real6 = v6_words([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    assert!(!is_v4_mapped(real6));
    assert_eq!(FlowKey::v6(real6, 1).family, AF_INET6);
}

#[test]
fn only_plain_tcp_is_steered() {
    assert!(is_tcp_stream(SOCK_STREAM, IPPROTO_TCP));
    assert!(!is_tcp_stream(2, 17), "UDP");
    assert!(!is_tcp_stream(SOCK_STREAM, 262), "MPTCP");
    assert!(!is_tcp_stream(3, IPPROTO_TCP), "raw");
}

#[test]
fn connect_verdicts_cover_every_exit() {
    let route = Some(RouteValue { route_id: 3, action: ACTION_REDIRECT });
    use ConnectVerdict::*;
    assert_eq!(connect_verdict(route, false, true), Redirect);
    assert_eq!(connect_verdict(route, true, true), AgentSocket);
    assert_eq!(connect_verdict(None, false, true), NotRouted);
    // An unrouted agent socket counts as unrouted: bypass is only checked for routes.
    assert_eq!(connect_verdict(None, true, true), NotRouted);
    assert_eq!(connect_verdict(route, false, false), NoListener);
    let other = Some(RouteValue { route_id: 1, action: 0 });
    assert_eq!(connect_verdict(other, false, true), NotRouted);
    let no_peer = Some(RouteValue { route_id: 2, action: ACTION_REJECT });
    assert_eq!(connect_verdict(no_peer, false, true), NoPeer);
    assert_eq!(connect_verdict(no_peer, true, true), AgentSocket, "the agent's own dials always pass");
    // Fail closed: what is routed but cannot be steered is refused.
    assert!(NoPeer.refuses() && NoListener.refuses());
    assert!(!Redirect.refuses() && !NotRouted.refuses() && !AgentSocket.refuses());
}
