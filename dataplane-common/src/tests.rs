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
}

mod protocol {
    use core::net::SocketAddr;

    use proptest::prelude::*;

    use crate::protocol::*;

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1..=u16::MAX).prop_map(|(o, p)| SocketAddr::from((o, p))),
            (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(o, p)| SocketAddr::from((o, p))),
        ]
    }

    fn metadata() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..8)
    }

    proptest! {
        #[test]
        fn requests_round_trip(dst in addr(), flow_id in any::<u64>(), entries in metadata()) {
            let mut meta = [0u8; MAX_METADATA];
            let mut end = 0;
            for (k, v) in &entries {
                end = put_metadata(&mut meta, end, *k, v).expect("fits");
            }
            let req = Request { dst, flow_id, metadata: Metadata::new(&meta[..end]).expect("valid") };
            let mut buf = [0u8; MAX_REQUEST];
            let n = req.encode(&mut buf).expect("encodes");
            prop_assert_eq!(n, req.encoded_len());
            prop_assert_eq!(decode_request(&buf[..n]), Ok(Decoded::Complete(req, n)));
            let decoded: Vec<(u8, Vec<u8>)> = req.metadata.iter().map(|(k, v)| (k, v.to_vec())).collect();
            prop_assert_eq!(decoded, entries);
            // Every strict prefix asks for more bytes, never errs or panics.
            for cut in 0..n {
                let prefix = decode_request(&buf[..cut]);
                prop_assert!(matches!(prefix, Ok(Decoded::Incomplete(need)) if need > cut), "{:?}", prefix);
            }
        }

        #[test]
        fn any_bytes_decode_to_a_value_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(Decoded::Complete(req, n)) = decode_request(&bytes) {
                prop_assert!(n <= bytes.len());
                let mut again = [0u8; MAX_REQUEST];
                let m = req.encode(&mut again).expect("a decoded request re-encodes");
                prop_assert_eq!(&again[..m], &bytes[..n]);
            }
            let _ = decode_response(&bytes);
        }

        #[test]
        fn responses_round_trip(i in 0usize..6) {
            let r = Response { status: Status::ALL[i] };
            prop_assert_eq!(decode_response(&r.encode()), Ok(Decoded::Complete(r, RESPONSE_LEN)));
        }
    }

    #[test]
    fn limits_and_bad_input_are_errors() {
        let mut buf = [0u8; MAX_REQUEST];
        let req = Request {
            dst: "198.51.100.101:6443".parse().expect("addr"),
            flow_id: 7,
            metadata: Metadata::default(),
        };
        let n = req.encode(&mut buf).expect("encodes");
        assert_eq!(n, 18);
        let mut bad = buf;
        bad[0] = 2;
        assert_eq!(decode_request(&bad[..n]), Err(ProtocolError::UnsupportedVersion(2)));
        assert_eq!(
            decode_request(&[9]),
            Err(ProtocolError::UnsupportedVersion(9)),
            "rejected on the first byte"
        );
        let mut bad = buf;
        bad[1] = 5;
        assert_eq!(decode_request(&bad[..n]), Err(ProtocolError::BadFamily(5)));
        let mut bad = buf;
        bad[12..14].copy_from_slice(&((MAX_METADATA + 1) as u16).to_be_bytes());
        assert_eq!(decode_request(&bad[..n]), Err(ProtocolError::MetadataTooLong(MAX_METADATA + 1)));
        let mut bad = buf;
        bad[2..4].copy_from_slice(&[0, 0]);
        assert_eq!(decode_request(&bad[..n]), Err(ProtocolError::ZeroPort));
        // An entry claiming more bytes than the block holds.
        assert_eq!(Metadata::new(&[1, 5, 0]), Err(ProtocolError::BadMetadata));
        assert_eq!(Metadata::new(&[1]), Err(ProtocolError::BadMetadata));
        assert!(matches!(req.encode(&mut [0u8; 10]), Err(ProtocolError::BufferTooSmall { needed: 18 })));
        assert_eq!(decode_response(&[1, 6]), Err(ProtocolError::BadStatus(6)));
        assert_eq!(decode_response(&[1]), Ok(Decoded::Incomplete(2)));
        let meta =
            Metadata::new(&[META_SOURCE_NODE, 2, b'n', b'1', 99, 0, META_WORKLOAD, 1, b'w']).expect("valid");
        assert_eq!(meta.get(META_SOURCE_NODE), Some(&b"n1"[..]));
        assert_eq!(meta.get(META_WORKLOAD), Some(&b"w"[..]), "unknown entry 99 is skipped");
    }
}
