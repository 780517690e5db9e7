//! Property tests of the wire protocol.

use core::net::SocketAddr;

use proptest::prelude::*;

use crate::stream::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), 1..=u16::MAX).prop_map(|(o, p)| SocketAddr::from((o, p))),
        (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(o, p)| SocketAddr::from((o, p))),
    ]
}

fn metadata() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..8)
}

/// A valid request, encoded: (bytes, header length).
fn encoded_request() -> impl Strategy<Value = (Vec<u8>, usize)> {
    (addr(), any::<u64>(), metadata()).prop_map(|(dst, flow_id, entries)| {
        let mut meta = [0u8; MAX_METADATA];
        let mut end = 0;
        for (k, v) in &entries {
            end = put_metadata(&mut meta, end, *k, v).expect("fits");
        }
        let req = Request { dst, flow_id, metadata: Metadata::new(&meta[..end]).expect("valid") };
        let mut buf = vec![0u8; MAX_REQUEST];
        let n = req.encode(&mut buf).expect("encodes");
        buf.truncate(n);
        (buf, n)
    })
}

/// Byte positions of a header whose value no decoder checks: the flow id
/// (bytes 4..12) and the destination address (after the fixed part).
fn free_positions(header: &[u8]) -> Vec<usize> {
    let addr_len = if header[1] == 4 { 4 } else { 16 };
    (4..12).chain(14..14 + addr_len).collect()
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
        // Random bytes almost never decode (the version byte alone rules out
        // 255 in 256): this checks only that nothing panics. The re-encoding
        // property runs on the decodable inputs below.
        let _ = decode_request(&bytes);
        let _ = decode_response(&bytes);
    }

    /// A valid header with its flow id and address bytes overwritten at
    /// random (values no decoder checks) and any bytes after it: it always
    /// decodes, to exactly the header, and re-encodes to the same bytes.
    #[test]
    fn decodable_headers_re_encode_to_the_same_bytes(
        (bytes, n) in encoded_request(),
        writes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        trailing in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = bytes;
        let free = free_positions(&bytes[..n]);
        for (at, value) in writes {
            bytes[*at.get(&free)] = value;
        }
        bytes.extend_from_slice(&trailing);
        let decoded = decode_request(&bytes);
        let Ok(Decoded::Complete(req, used)) = decoded else {
            return Err(TestCaseError::fail(format!("a valid header must decode: {decoded:?}")));
        };
        prop_assert_eq!(used, n, "the header ends where it was encoded to end");
        let mut again = [0u8; MAX_REQUEST];
        let m = req.encode(&mut again).expect("a decoded request re-encodes");
        prop_assert_eq!(&again[..m], &bytes[..n]);
    }

    /// The same headers with any byte overwritten: a value or an error,
    /// never a panic; whatever still decodes re-encodes to its bytes.
    #[test]
    fn corrupted_headers_decode_to_a_value_or_an_error(
        (bytes, n) in encoded_request(),
        writes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = bytes;
        for (at, value) in writes {
            let i = at.index(n);
            bytes[i] = value;
        }
        if let Ok(Decoded::Complete(req, used)) = decode_request(&bytes) {
            let mut again = [0u8; MAX_REQUEST];
            let m = req.encode(&mut again).expect("a decoded request re-encodes");
            prop_assert_eq!(&again[..m], &bytes[..used]);
        }
    }

    #[test]
    fn responses_round_trip(i in 0usize..Status::ALL.len()) {
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
    assert_eq!(decode_request(&[9]), Err(ProtocolError::UnsupportedVersion(9)), "rejected on the first byte");
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
    assert_eq!(decode_response(&[1, 8]), Err(ProtocolError::BadStatus(8)));
    assert_eq!(decode_response(&[1]), Ok(Decoded::Incomplete(2)));
    let meta =
        Metadata::new(&[META_SOURCE_NODE, 2, b'n', b'1', 99, 0, META_WORKLOAD, 1, b'w']).expect("valid");
    assert_eq!(meta.get(META_SOURCE_NODE), Some(&b"n1"[..]));
    assert_eq!(meta.get(META_WORKLOAD), Some(&b"w"[..]), "unknown entry 99 is skipped");
}
