//! Property tests of the control protocol.

use core::net::IpAddr;

use proptest::prelude::*;

use crate::control::*;

/// A network with host bits clear, and 1..=MAX_PORTS non-zero ports.
fn route() -> impl Strategy<Value = (IpAddr, u8, Vec<u16>)> {
    let net = prop_oneof![
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| {
            let masked = if p == 0 { 0 } else { a & (u32::MAX << (32 - u32::from(p))) };
            (IpAddr::from(masked.to_be_bytes()), p)
        }),
        (any::<u128>(), 0u8..=128).prop_map(|(a, p)| {
            let masked = if p == 0 { 0 } else { a & (u128::MAX << (128 - u32::from(p))) };
            (IpAddr::from(masked.to_be_bytes()), p)
        }),
    ];
    (net, prop::collection::vec(1..=u16::MAX, 1..=8)).prop_map(|((a, p), ports)| (a, p, ports))
}

fn specs(routes: &[(IpAddr, u8, Vec<u16>)]) -> Vec<RouteSpec<'_>> {
    routes.iter().map(|(addr, prefix, ports)| RouteSpec { addr: *addr, prefix: *prefix, ports }).collect()
}

fn encoded(routes: &[(IpAddr, u8, Vec<u16>)]) -> Vec<u8> {
    let specs = specs(routes);
    let mut out = vec![0u8; advertisement_len(&specs)];
    let n = encode_advertisement(&specs, &mut out).expect("encodes");
    assert_eq!(n, out.len());
    out
}

proptest! {
    #[test]
    fn advertisements_round_trip(routes in prop::collection::vec(route(), 0..32)) {
        let bytes = encoded(&routes);
        let Ok(Decoded::Complete(Frame::Advertise(ad), used)) = decode_frame(&bytes) else {
            return Err(TestCaseError::fail("an encoded advertisement decodes"));
        };
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(ad.len(), routes.len());
        let back: Vec<(IpAddr, u8, Vec<u16>)> =
            ad.iter().map(|r| (r.addr, r.prefix, r.ports.iter().collect())).collect();
        prop_assert_eq!(back, routes);
        // Every strict prefix asks for more, never errs.
        for cut in 0..bytes.len() {
            let d = decode_frame(&bytes[..cut]);
            prop_assert!(matches!(d, Ok(Decoded::Incomplete(need)) if need > cut), "{:?}", d);
        }
    }

    /// A stream of frames decodes frame by frame, whatever follows each.
    #[test]
    fn frames_follow_each_other(routes in prop::collection::vec(route(), 0..4), unknown in 4u8..) {
        let mut stream = Vec::new();
        let mut buf = [0u8; 16];
        let n = encode_hello(1, 3, &mut buf).expect("hello");
        stream.extend_from_slice(&buf[..n]);
        stream.extend_from_slice(&encoded(&routes));
        // A frame of a type from a later build, with a body: skipped whole.
        stream.extend_from_slice(&[0, 0, 0, 3, unknown, 0xde, 0xad]);
        let n = encode_draining(&mut buf).expect("draining");
        stream.extend_from_slice(&buf[..n]);
        let mut kinds = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            match decode_frame(&stream[at..]) {
                Ok(Decoded::Complete(f, used)) => {
                    kinds.push(match f {
                        Frame::Hello { min: 1, max: 3 } => "hello",
                        Frame::Advertise(a) if a.len() == routes.len() => "advertise",
                        Frame::Unknown(k) if k == unknown => "unknown",
                        Frame::Draining => "draining",
                        other => return Err(TestCaseError::fail(format!("{other:?}"))),
                    });
                    at += used;
                }
                other => return Err(TestCaseError::fail(format!("{other:?} at {at}"))),
            }
        }
        prop_assert_eq!(kinds, vec!["hello", "advertise", "unknown", "draining"]);
    }

    #[test]
    fn any_bytes_decode_to_a_frame_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Decoded::Complete(Frame::Advertise(ad), _)) = decode_frame(&bytes) {
            // Whatever decoded is what an encoder would write.
            let routes: Vec<(IpAddr, u8, Vec<u16>)> =
                ad.iter().map(|r| (r.addr, r.prefix, r.ports.iter().collect())).collect();
            prop_assert_eq!(routes.len(), ad.len());
            let again = encoded(&routes);
            prop_assert_eq!(&again[..], &bytes[..again.len()]);
        }
    }

    /// A valid advertisement with one byte changed: a value or an error,
    /// never a panic, and never a route an encoder would refuse.
    #[test]
    fn corrupted_advertisements_never_yield_bad_routes(
        routes in prop::collection::vec(route(), 1..8),
        at in any::<prop::sample::Index>(),
        value in any::<u8>(),
    ) {
        let mut bytes = encoded(&routes);
        let i = at.index(bytes.len());
        bytes[i] = value;
        if let Ok(Decoded::Complete(Frame::Advertise(ad), _)) = decode_frame(&bytes) {
            for r in ad.iter() {
                let ports: Vec<u16> = r.ports.iter().collect();
                let spec = [RouteSpec { addr: r.addr, prefix: r.prefix, ports: &ports }];
                let mut out = vec![0u8; advertisement_len(&spec)];
                prop_assert!(encode_advertisement(&spec, &mut out).is_ok(), "{:?}", r);
            }
        }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version(a in 1u8..10, b in 0u8..10, c in 1u8..10, d in 0u8..10) {
        let (ours, theirs) = ((a, a + b), (c, c + d));
        match negotiate(ours, theirs) {
            Some(v) => {
                prop_assert!((ours.0..=ours.1).contains(&v) && (theirs.0..=theirs.1).contains(&v));
                prop_assert!(!(v + 1..=ours.1).any(|w| (theirs.0..=theirs.1).contains(&w)));
            }
            None => prop_assert!(!(ours.0..=ours.1).any(|w| (theirs.0..=theirs.1).contains(&w))),
        }
    }
}

#[test]
fn bad_frames_are_errors_naming_what_is_wrong() {
    let v4 = |prefix: u8, addr: [u8; 4], ports: &[u16]| {
        let mut b = vec![0, 0, 0, 0, 2, 0, 1, 4, prefix];
        b.extend_from_slice(&addr);
        b.push(ports.len() as u8);
        for p in ports {
            b.extend_from_slice(&p.to_be_bytes());
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        b
    };
    assert!(matches!(decode_frame(&v4(24, [198, 51, 100, 0], &[6443])), Ok(Decoded::Complete(..))));
    assert_eq!(decode_frame(&v4(24, [198, 51, 100, 1], &[6443])), Err(ControlError::HostBits));
    assert_eq!(decode_frame(&v4(33, [198, 51, 100, 0], &[6443])), Err(ControlError::BadPrefix(33)));
    assert_eq!(decode_frame(&v4(24, [198, 51, 100, 0], &[])), Err(ControlError::BadPorts));
    assert_eq!(decode_frame(&v4(24, [198, 51, 100, 0], &[0])), Err(ControlError::BadPorts));
    let mut bad = v4(24, [198, 51, 100, 0], &[6443]);
    bad[7] = 5;
    assert_eq!(decode_frame(&bad), Err(ControlError::BadFamily(5)));
    // A count that promises more routes than the body holds.
    let mut short = v4(24, [198, 51, 100, 0], &[6443]);
    short[6] = 2;
    assert_eq!(decode_frame(&short), Err(ControlError::BadLength { frame: "advertise" }));
    let mut over = vec![0, 0, 0, 3, 2];
    over.extend_from_slice(&((MAX_ROUTES + 1) as u16).to_be_bytes());
    assert_eq!(decode_frame(&over), Err(ControlError::TooManyRoutes(MAX_ROUTES + 1)));
    // The length alone rules out an oversized frame: nothing is buffered for it.
    let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
    assert_eq!(decode_frame(&huge), Err(ControlError::FrameTooLong(MAX_FRAME + 1)));
    assert_eq!(decode_frame(&[0, 0, 0, 0]), Err(ControlError::EmptyFrame));
    assert_eq!(decode_frame(&[0, 0, 0, 3, 1, 2, 1]), Err(ControlError::BadVersions { min: 2, max: 1 }));
    assert_eq!(decode_frame(&[0, 0, 0, 2, 3, 0]), Err(ControlError::BadLength { frame: "draining" }));
    let ports: Vec<u16> = (1..=MAX_PORTS as u16 + 1).collect();
    let spec = [RouteSpec { addr: "10.0.0.0".parse().expect("ip"), prefix: 8, ports: &ports }];
    assert_eq!(encode_advertisement(&spec, &mut [0u8; 512]), Err(ControlError::BadPorts));
    let mut small = [0u8; 4];
    assert!(matches!(encode_hello(1, 1, &mut small), Err(ControlError::BufferTooSmall { needed: 7 })));
    assert_eq!(negotiate((1, 1), (2, 3)), None);
    assert_eq!(negotiate((1, 2), (2, 3)), Some(2));
}

#[test]
fn the_largest_advertisement_fits_max_frame() {
    let ports: Vec<u16> = (1..=MAX_PORTS as u16).collect();
    let routes: Vec<RouteSpec<'_>> = (0..MAX_ROUTES)
        .map(|i| RouteSpec {
            addr: IpAddr::from(((i as u128) << 64).to_be_bytes()),
            prefix: 64,
            ports: &ports,
        })
        .collect();
    let mut out = vec![0u8; advertisement_len(&routes)];
    let n = encode_advertisement(&routes, &mut out).expect("encodes");
    assert_eq!(n - 4, MAX_FRAME);
    assert!(
        matches!(decode_frame(&out), Ok(Decoded::Complete(Frame::Advertise(a), m)) if a.len() == MAX_ROUTES && m == n)
    );
}
