//! Any bytes a peer writes on its control stream decode frame by frame to
//! frames or an error, never a panic; a decoded advertisement re-encodes to
//! the same bytes, and every route in it is one an encoder accepts.
#![no_main]

use dataplane_proto::control::{
    Decoded, Frame, RouteSpec, advertisement_len, decode_frame, encode_advertisement,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Complete(frame, used)) = decode_frame(rest) {
        if let Frame::Advertise(ad) = frame {
            let ports: Vec<Vec<u16>> = ad.iter().map(|r| r.ports.iter().collect()).collect();
            let specs: Vec<RouteSpec<'_>> = ad
                .iter()
                .zip(&ports)
                .map(|(r, p)| RouteSpec { addr: r.addr, prefix: r.prefix, ports: p })
                .collect();
            let mut out = vec![0u8; advertisement_len(&specs)];
            let n = encode_advertisement(&specs, &mut out).expect("a decoded advertisement re-encodes");
            assert_eq!(&out[..n], &rest[..used]);
        }
        rest = &rest[used..];
    }
});
