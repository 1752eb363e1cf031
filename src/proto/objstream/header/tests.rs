use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The reference's §1.8 object (AIStore's `Example_headers`, first object).
pub(crate) fn golden_hdr() -> ObjHdr {
    ObjHdr {
        bucket: Bucket {
            name: "abc".into(),
            provider: "aws".into(),
            ns_name: "namespace".into(),
            ns_uuid: "uuid".into(),
        },
        name: "X".into(),
        attrs: ObjAttrs {
            size: 231,
            atime: 663_346_294,
            cksum_type: "xxhash2".into(),
            cksum_value: "h1".into(),
            version: "1".into(),
            custom: vec![],
        },
        ..ObjHdr::default()
    }
}

pub(crate) const GOLDEN_HDR_HEX: &str = "0000 0000 0003616263 0003617773 00096e616d657370616365 000475756964 \
     000158 0000 0000 00000000000000e7 000000002789dc76 000778786861736832 00026831 000131 0000";

#[test]
fn golden_header_encodes_and_decodes() {
    let want = hex(GOLDEN_HDR_HEX);
    assert_eq!(want.len(), 72, "Example_headers prints hlen 72");
    let h = golden_hdr();
    assert_eq!(h.encoded_len(), 72);
    let mut out = Vec::new();
    assert_eq!(h.encode(&mut out, MAX_HEADER_BYTES), Ok(72));
    assert_eq!(out, want);
    assert_eq!(ObjHdr::decode(&want).unwrap(), h);
}

#[test]
fn every_field_round_trips() {
    let h = ObjHdr {
        sid: "t[abc]".into(),
        opcode: OPC_REQUEST,
        bucket: Bucket { name: "b".into(), provider: "gcp".into(), ns_name: "n".into(), ns_uuid: "u".into() },
        name: "dir/obj-\u{e9}".into(),
        opaque: vec![0, 1, 2, 255],
        demux: "xid-1".into(),
        attrs: ObjAttrs {
            size: SIZE_UNKNOWN,
            atime: i64::MAX,
            cksum_type: "none".into(),
            cksum_value: "not-empty".into(),
            version: "".into(),
            custom: vec![("k".into(), "".into()), ("xx".into(), "11".into())],
        },
    };
    let mut out = vec![9, 9];
    let n = h.encode(&mut out, MAX_HEADER_BYTES).unwrap();
    assert_eq!(out.len(), 2 + n);
    assert_eq!(ObjHdr::decode(&out[2..]).unwrap(), h);
}

#[test]
fn every_truncation_is_malformed() {
    let mut bytes = Vec::new();
    let mut h = golden_hdr();
    h.attrs.custom.push(("k".into(), "v".into()));
    h.encode(&mut bytes, MAX_HEADER_BYTES).unwrap();
    for n in 0..bytes.len() {
        let e = ObjHdr::decode(&bytes[..n]).unwrap_err();
        assert!(matches!(e, HeaderError::Truncated { .. }), "length {n}: {e:?}");
        assert!(e.to_string().contains("unexpected EOF"), "{e}");
    }
    // One byte too many: the fields end before the declared length.
    bytes.push(0);
    let e = ObjHdr::decode(&bytes).unwrap_err();
    assert_eq!(e, HeaderError::Length { decoded: bytes.len() - 1, declared: bytes.len() });
    assert_eq!(
        e.to_string(),
        format!("object header length mismatch: decoded {} of {} bytes", bytes.len() - 1, bytes.len())
    );
}

#[test]
fn oversized_length_prefixes_are_caught_where_they_point() {
    // AIStore's TestExtObjHeaderLengthPrefixes: an empty 48-byte header with
    // one custom pair k/v; each length prefix set to 0xFFFF in turn.
    let mut h = ObjHdr::default();
    h.attrs.custom.push(("k".into(), "v".into()));
    let mut base = Vec::new();
    h.encode(&mut base, MAX_HEADER_BYTES).unwrap();
    assert_eq!(base.len(), 48);
    for off in [0, 4, 6, 8, 10, 12, 14, 16, 34, 36, 38, 40, 43] {
        let mut b = base.clone();
        b[off] = 0xFF;
        b[off + 1] = 0xFF;
        let e = ObjHdr::decode(&b).unwrap_err();
        assert_eq!(e, HeaderError::Truncated { offset: off + 2 }, "prefix at {off}");
        assert_eq!(e.to_string(), format!("malformed object header: at offset {}: unexpected EOF", off + 2));
    }
}

#[test]
fn encode_refuses_what_cannot_be_decoded() {
    let mut out = vec![1, 2, 3];
    let mut h = ObjHdr::new("b", &"n".repeat(70_000), 1);
    assert_eq!(h.encode(&mut out, usize::MAX), Err(EncodeError::FieldTooLong { field: "name", len: 70_000 }));
    assert_eq!(out, [1, 2, 3], "nothing is left behind");
    h.name = "n".into();
    h.attrs.custom.push((String::new(), "v".into()));
    assert_eq!(h.encode(&mut out, usize::MAX), Err(EncodeError::EmptyCustomKey));
    assert_eq!(out, [1, 2, 3]);
    h.attrs.custom.clear();
    h.opaque = vec![0; 5000];
    assert!(matches!(h.encode(&mut out, 4096), Err(EncodeError::TooLong { .. })));
}

#[test]
fn bad_strings_and_sizes_are_errors() {
    let mut h = ObjHdr::new("b", "ok", 5);
    let mut b = Vec::new();
    h.encode(&mut b, MAX_HEADER_BYTES).unwrap();
    // "ok" sits after sid(2) opcode(2) bucket(3) provider(5) ns(2) ns(2) and its prefix.
    let at = 2 + 2 + 3 + 5 + 2 + 2 + 2;
    b[at] = 0xFF;
    assert!(matches!(ObjHdr::decode(&b), Err(HeaderError::NotUtf8 { field: "name", .. })));
    h.attrs.size = -2;
    let mut b = Vec::new();
    h.encode(&mut b, MAX_HEADER_BYTES).unwrap();
    assert_eq!(ObjHdr::decode(&b), Err(HeaderError::Size(-2)));
}
