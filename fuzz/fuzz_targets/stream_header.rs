//! Any bytes a peer sends decode to a header or an error, never a panic; a
//! decoded request re-encodes to the same bytes.
#![no_main]

use dataplane_proto::stream::{Decoded, MAX_REQUEST, decode_request, decode_response};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Complete(req, n)) = decode_request(data) {
        let mut out = [0u8; MAX_REQUEST];
        let m = req.encode(&mut out).expect("a decoded request re-encodes");
        assert_eq!(&out[..m], &data[..n]);
    }
    let _ = decode_response(data);
});
