//! Frame, decoder, LZ4 and body tests; header tests live in `header/`.

use super::body::{BodyDecoder, BodyEvent, Framing};
use super::checksum::{ChecksumError, CksumType, Verdict, compute_hex};
use super::decoder::{Decoder, Event};
use super::error::SbrCode;
use super::frame::{self, MAX_PDU_PAYLOAD, PROTO_HDR_BYTES, ProtoHdr};
use super::header::tests::{GOLDEN_HDR_HEX, golden_hdr};
use super::header::{MAX_HEADER_BYTES, ObjHdr, SIZE_UNKNOWN};
use super::{fuzzing, lz4};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// A tiny deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One object as a test sends it: header, body, and whether in PDUs.
#[derive(Clone)]
struct Obj {
    hdr: ObjHdr,
    body: Vec<u8>,
}

/// Frames a run of objects (sized raw, or PDUs of `pdu` payload bytes).
fn encode_stream(objs: &[Obj], pdu: Option<usize>, fin: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for o in objs {
        frame::encode_obj_frame(&o.hdr, pdu.is_some(), &mut out, MAX_HEADER_BYTES).unwrap();
        if o.hdr.is_header_only() {
            continue;
        }
        match pdu {
            None => out.extend_from_slice(&o.body),
            Some(size) => {
                let mut pieces: Vec<&[u8]> = o.body.chunks(size).collect();
                if o.body.len() % size == 0 {
                    pieces.push(&[]); // an unsized reader hits EOF on a boundary
                }
                let n = pieces.len();
                for (i, p) in pieces.into_iter().enumerate() {
                    out.extend_from_slice(&frame::pdu_header(p.len(), i + 1 == n));
                    out.extend_from_slice(p);
                }
            }
        }
    }
    if fin {
        out.extend_from_slice(&frame::fin_frame());
    }
    out
}

/// What a decoder yields, flattened: (header, body, received) per object.
#[derive(Debug, PartialEq, Eq)]
struct Got {
    objs: Vec<(ObjHdr, Vec<u8>, u64)>,
    fin: bool,
    /// Each object's checksum verdict, in order.
    verdicts: Vec<Verdict>,
}

fn collect(ev: Event<'_>, got: &mut Got) {
    match ev {
        Event::Header(h) => got.objs.push((*h, Vec::new(), 0)),
        Event::Data(d) => got.objs.last_mut().unwrap().1.extend_from_slice(d),
        Event::End { received, verdict } => {
            got.objs.last_mut().unwrap().2 = received;
            got.verdicts.push(verdict);
        }
        Event::Fin => got.fin = true,
    }
}

/// Feeds `bytes` to a frame decoder `piece` bytes at a time.
fn decode_frames(bytes: &[u8], piece: usize) -> Result<Got, super::SbrError> {
    let mut d = Decoder::default();
    let mut got = Got { objs: vec![], fin: false, verdicts: vec![] };
    for chunk in bytes.chunks(piece.max(1)) {
        let mut rest = chunk;
        loop {
            let (n, ev) = d.step(rest)?;
            rest = &rest[n..];
            match ev {
                Some(ev) => collect(ev, &mut got),
                None if rest.is_empty() => break,
                None => unreachable!("None means the input was used up"),
            }
        }
    }
    while d.has_due() {
        let (_, ev) = d.step(&[])?;
        collect(ev.unwrap(), &mut got);
    }
    d.finish()?;
    Ok(got)
}

fn sample_objects(rng: &mut Rng, n: usize, unsized_ok: bool) -> Vec<Obj> {
    (0..n)
        .map(|i| {
            let len = match i % 4 {
                0 => 0,
                1 => rng.below(100) as usize + 1,
                2 => rng.below(300_000) as usize,
                _ => rng.below(5000) as usize,
            };
            let body: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let mut hdr = ObjHdr::new("bck", &format!("obj-{i}"), len as i64);
            hdr.opaque = format!("{i}").into_bytes();
            if unsized_ok && len > 0 && i % 3 == 0 {
                hdr.attrs.size = SIZE_UNKNOWN;
            }
            Obj { hdr, body }
        })
        .collect()
}

fn expected(objs: &[Obj], fin: bool) -> Got {
    Got {
        objs: objs.iter().map(|o| (o.hdr.clone(), o.body.clone(), o.body.len() as u64)).collect(),
        fin,
        verdicts: objs.iter().map(|_| Verdict::Unchecked).collect(),
    }
}

#[test]
fn golden_frames() {
    let fin = frame::fin_frame();
    assert_eq!(fin.len(), 58);
    let want = hex("000000000000002a 5c8961e1f2055d33 0000 ffef 0000 0000 0000 0000 0000 0000 0000 \
                    0000000000000000 0000000000000000 0000 0000 0000 0000");
    assert_eq!(fin, want);

    let mut out = Vec::new();
    assert_eq!(frame::encode_obj_frame(&golden_hdr(), false, &mut out, MAX_HEADER_BYTES), Ok(88));
    let mut want = hex("0000000000000048 fadc5c11e20142b1");
    want.extend(hex(GOLDEN_HDR_HEX));
    assert_eq!(out, want);

    let mut body = want.clone();
    body.extend(std::iter::repeat_n(7u8, 231));
    body.extend(frame::fin_frame());
    let got = decode_frames(&body, 5).unwrap();
    // Its checksum value ("h1") is not an xxhash2 value: the object is
    // decoded, and fails verification with that said.
    let bad = ChecksumError::BadValue { ty: CksumType::Xxhash2, value: "h1".into() };
    let verdicts = vec![Verdict::Failed(Box::new(bad))];
    assert_eq!(got, Got { objs: vec![(golden_hdr(), vec![7; 231], 231)], fin: true, verdicts });
}

#[test]
fn proto_header_flags_and_checksum() {
    let p = ProtoHdr { len: 1234, flags: frame::FLAG_PDU | frame::FLAG_PDU_LAST };
    let bytes = p.encode();
    assert_eq!(ProtoHdr::decode(&bytes), Ok(p));
    let mut bad = bytes;
    bad[15] ^= 1;
    assert!(ProtoHdr::decode(&bad).is_err());
}

#[test]
fn sized_stream_decodes_in_any_pieces() {
    let mut rng = Rng(7);
    let objs = sample_objects(&mut rng, 40, false);
    let bytes = encode_stream(&objs, None, true);
    for piece in [1, 7, 16, 58, 4096, bytes.len()] {
        assert_eq!(decode_frames(&bytes, piece).unwrap(), expected(&objs, true), "piece {piece}");
    }
}

#[test]
fn pdu_stream_with_unsized_objects() {
    let mut rng = Rng(11);
    let mut objs = sample_objects(&mut rng, 30, true);
    // An unsized object ending exactly on a PDU boundary: a zero-length last PDU.
    let mut h = ObjHdr::new("bck", "boundary", SIZE_UNKNOWN);
    h.opaque = b"b".to_vec();
    objs.push(Obj { hdr: h, body: vec![3; 2 * 1000] });
    let bytes = encode_stream(&objs, Some(1000), false);
    let got = decode_frames(&bytes, 333).unwrap();
    // Unsized headers arrive with size -1; their end carries the count.
    assert_eq!(got, expected(&objs, false));
    assert!(got.objs.iter().any(|(h, b, r)| h.is_unsized() && *r == b.len() as u64 && !b.is_empty()));
}

#[test]
fn pdu_payload_limit() {
    // AIStore's TestRecvPDUPayloadLength: 128 KiB - 16 is the most.
    let body = vec![1u8; MAX_PDU_PAYLOAD];
    let ok = encode_stream(
        &[Obj { hdr: ObjHdr::new("b", "o", body.len() as i64), body: body.clone() }],
        Some(MAX_PDU_PAYLOAD),
        false,
    );
    assert_eq!(decode_frames(&ok, 1 << 20).unwrap().objs[0].2, MAX_PDU_PAYLOAD as u64);

    let mut bad = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "o", SIZE_UNKNOWN), true, &mut bad, MAX_HEADER_BYTES).unwrap();
    bad.extend_from_slice(&ProtoHdr { len: MAX_PDU_PAYLOAD as u64 + 1, flags: frame::FLAG_PDU }.encode());
    assert_eq!(decode_frames(&bad, 64).unwrap_err().code, SbrCode::PduHdrInvalid);
}

#[test]
fn pdu_sizes_must_add_up() {
    let mut bytes = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "o", 10), true, &mut bytes, MAX_HEADER_BYTES).unwrap();
    bytes.extend_from_slice(&frame::pdu_header(4, true));
    bytes.extend_from_slice(&[0; 4]);
    assert_eq!(decode_frames(&bytes, 64).unwrap_err().code, SbrCode::PduDataSize);

    let mut bytes = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "o", 3), true, &mut bytes, MAX_HEADER_BYTES).unwrap();
    bytes.extend_from_slice(&frame::pdu_header(4, false));
    assert_eq!(decode_frames(&bytes, 64).unwrap_err().code, SbrCode::PduDataSize);

    // A PDU header without the PDU flag.
    let mut bytes = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "o", 3), true, &mut bytes, MAX_HEADER_BYTES).unwrap();
    bytes.extend_from_slice(&ProtoHdr { len: 3, flags: 0 }.encode());
    assert_eq!(decode_frames(&bytes, 64).unwrap_err().code, SbrCode::PduHdrInvalid);
}

#[test]
fn malformed_headers_break_with_typed_errors() {
    // AIStore's TestMalformedTransportHeader: hlen 42, a valid check, and a
    // sender-id length of 42.
    let mut bytes = ProtoHdr { len: 42, flags: 0 }.encode().to_vec();
    let mut hdr = vec![0u8; 42];
    hdr[1] = 42;
    bytes.extend_from_slice(&hdr);
    let e = decode_frames(&bytes, 100).unwrap_err();
    assert_eq!(e.code, SbrCode::ObjHdrInval);
    assert!(e.to_string().starts_with("sbr_obj_hdr_inval:["), "{e}");
    assert!(e.to_string().contains("hlen=42 err: malformed object header: at offset 2: unexpected EOF"), "{e}");

    let mut bytes = frame::fin_frame();
    bytes[15] ^= 0x40;
    assert_eq!(decode_frames(&bytes, 100).unwrap_err().code, SbrCode::HdrChecksum);

    let too_long = ProtoHdr { len: MAX_HEADER_BYTES as u64 + 1, flags: 0 }.encode();
    assert_eq!(decode_frames(&too_long, 100).unwrap_err().code, SbrCode::ProtoHdrLong);
    let zero = ProtoHdr { len: 0, flags: 0 }.encode();
    assert_eq!(decode_frames(&zero, 100).unwrap_err().code, SbrCode::ObjHdrInval);
    let legacy = ProtoHdr { len: 50, flags: frame::FLAG_MSG }.encode();
    assert_eq!(decode_frames(&legacy, 100).unwrap_err().code, SbrCode::ProtoHdr);

    // Unsized outside PDU mode.
    let mut bytes = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "o", SIZE_UNKNOWN), false, &mut bytes, MAX_HEADER_BYTES).unwrap();
    assert_eq!(decode_frames(&bytes, 100).unwrap_err().code, SbrCode::ObjHdrInval);

    // Anything after the end-of-stream frame.
    let mut bytes = frame::fin_frame();
    bytes.push(0);
    assert_eq!(decode_frames(&bytes, 100).unwrap_err().code, SbrCode::ProtoHdr);

    // A broken decoder stays broken.
    let mut d = Decoder::default();
    assert!(d.step(&too_long).is_err());
    assert!(d.step(&frame::fin_frame()).is_err());
}

#[test]
fn a_body_ending_mid_frame_is_a_typed_error() {
    let objs = vec![Obj { hdr: ObjHdr::new("b", "o", 100), body: vec![5; 100] }];
    let sized = encode_stream(&objs, None, false);
    let pdu = encode_stream(&objs, Some(40), false);
    let cases: [(&[u8], SbrCode); 5] = [
        (&sized[..10], SbrCode::ProtoHdr),
        (&sized[..30], SbrCode::ObjHdrShort),
        (&sized[..sized.len() - 1], SbrCode::ObjDataEof),
        (&pdu[..pdu.len() - 100 - 3 * 16 + 8], SbrCode::PduHdrShort),
        (&pdu[..pdu.len() - 5], SbrCode::PduData),
    ];
    for (bytes, code) in cases {
        assert_eq!(decode_frames(bytes, 9).unwrap_err().code, code, "{} bytes", bytes.len());
    }
    // Between objects the body may end: idle teardown.
    assert!(decode_frames(&sized, 9).is_ok());
}

/// Frames an LZ4 body the way AIStore does: one frame, a block flushed at
/// each object's end, no end mark.
fn lz4_body(objs: &[Obj], block: lz4::BlockSize) -> Vec<u8> {
    let mut out = lz4::frame_header(block).to_vec();
    for o in objs {
        let plain = encode_stream(std::slice::from_ref(o), None, false);
        for b in plain.chunks(block.bytes()) {
            lz4::encode_block(b, &mut out);
        }
    }
    lz4::encode_block(&frame::fin_frame(), &mut out);
    out
}

fn chunked(body: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = (rng.below(70_000) as usize + 1).min(rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Runs a whole body through [`BodyDecoder`], `piece` bytes at a time.
/// Returns what it decoded and the bytes left after the body.
fn decode_body(
    raw: &[u8],
    framing: Framing,
    compressed: bool,
    piece: usize,
) -> Result<(Got, Vec<u8>), super::SbrError> {
    let mut d = BodyDecoder::new(framing, compressed, MAX_HEADER_BYTES);
    let mut got = Got { objs: vec![], fin: false, verdicts: vec![] };
    let mut buf = Vec::new();
    let mut fed = 0;
    loop {
        let (used, ev) = d.step(&buf)?;
        let mut done = false;
        let mut need = false;
        match ev {
            BodyEvent::Obj(ev) => collect(ev, &mut got),
            BodyEvent::NeedMore => need = true,
            BodyEvent::End => done = true,
        }
        buf.drain(..used);
        if done {
            return Ok((got, buf));
        }
        if need {
            assert!(buf.len() < 1 << 20, "NeedMore with a large buffer");
            if fed == raw.len() {
                return Err(super::SbrError::new(SbrCode::Body, "the test ran out of input"));
            }
            let n = piece.min(raw.len() - fed);
            buf.extend_from_slice(&raw[fed..fed + n]);
            fed += n;
        }
    }
}

#[test]
fn bodies_through_every_layer() {
    let mut rng = Rng(99);
    let objs = sample_objects(&mut rng, 25, false);
    let plain = encode_stream(&objs, None, true);
    let want = expected(&objs, true);

    let mut with_next = chunked(&plain, &mut rng);
    with_next.extend_from_slice(b"PUT /next");
    for piece in [1, 100, 65536] {
        let (got, rest) = decode_body(&with_next, Framing::Chunked, false, piece).unwrap();
        assert_eq!(got, want, "chunked, piece {piece}");
        assert!(b"PUT /next".starts_with(&rest), "the next request is left alone");
        let (got, _) = decode_body(&plain, Framing::Length(plain.len() as u64), false, piece).unwrap();
        assert_eq!(got, want, "length, piece {piece}");
    }

    for block in [lz4::BlockSize::K64, lz4::BlockSize::K256, lz4::BlockSize::M1, lz4::BlockSize::M4] {
        let z = lz4_body(&objs, block);
        let body = chunked(&z, &mut rng);
        let (got, _) = decode_body(&body, Framing::Chunked, true, 7919).unwrap();
        assert_eq!(got, want, "lz4 {block:?}");
    }
}

#[test]
fn lz4_bodies_may_end_without_an_end_mark_but_not_mid_block() {
    let objs = vec![Obj { hdr: ObjHdr::new("b", "o", 5000), body: vec![9; 5000] }];
    let mut z = lz4::frame_header(lz4::BlockSize::K256).to_vec();
    lz4::encode_block(&encode_stream(&objs, None, false), &mut z);
    let (got, _) = decode_body(&z, Framing::Length(z.len() as u64), true, 100).unwrap();
    assert_eq!(got, expected(&objs, false));

    let cut = &z[..z.len() - 3];
    let e = decode_body(cut, Framing::Length(cut.len() as u64), true, 100).unwrap_err();
    assert_eq!(e.code, SbrCode::Lz4);

    let mut bad = z.clone();
    bad[6] ^= 1; // the descriptor checksum
    let e = decode_body(&bad, Framing::Length(bad.len() as u64), true, 100).unwrap_err();
    assert_eq!(e.code, SbrCode::Lz4);
}

#[test]
fn lz4_frames_written_by_others_decode() {
    // A closed frame with an end mark and a content checksum flag, two
    // frames back to back, a skippable frame, and dependent blocks.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i / 7) as u8).collect();
    let mut z = Vec::new();
    let flg = 0x40 | (1 << 2); // version 01, linked blocks, content checksum
    let bd = 4 << 4;
    z.extend_from_slice(&lz4::MAGIC.to_le_bytes());
    z.extend_from_slice(&[flg, bd, (super::xxh32::xxh32(&[flg, bd], 0) >> 8) as u8]);
    // Dependent blocks: compress each with the previous 64 KiB as history.
    let mut prev: &[u8] = &[];
    for block in payload.chunks(64 << 10) {
        let c = lz4_flex::block::compress_with_dict(block, prev);
        z.extend_from_slice(&(c.len() as u32).to_le_bytes());
        z.extend_from_slice(&c);
        prev = &block[block.len().saturating_sub(64 << 10)..];
    }
    z.extend_from_slice(&lz4::END_MARK);
    z.extend_from_slice(&super::xxh32::xxh32(&payload, 0).to_le_bytes());
    z.extend_from_slice(&0x184D_2A51u32.to_le_bytes());
    z.extend_from_slice(&3u32.to_le_bytes());
    z.extend_from_slice(b"xyz");
    z.extend_from_slice(&lz4::frame_header(lz4::BlockSize::K64));
    lz4::encode_block(b"tail", &mut z);

    let mut d = lz4::Decoder::new();
    let mut out = Vec::new();
    for piece in z.chunks(1000) {
        let mut rest = piece;
        while !rest.is_empty() {
            let n = d.feed(rest).unwrap();
            rest = &rest[n..];
            out.extend_from_slice(d.output());
            let n = d.output().len();
            d.consume(n);
        }
    }
    d.finish().unwrap();
    let mut want = payload.clone();
    want.extend_from_slice(b"tail");
    assert_eq!(out, want);
}

/// Objects whose headers carry checksums: right ones of every type, a
/// wrong one, an unknown type, a malformed value, and none; with the
/// verdict each must get.
fn checksummed_objects() -> (Vec<Obj>, Vec<Verdict>) {
    let body = |n: usize, k: u8| -> Vec<u8> { (0..n).map(|i| (i as u8).wrapping_mul(k).wrapping_add(k)).collect() };
    let mut objs = Vec::new();
    let mut verdicts = Vec::new();
    let mut add = |name: &str, b: Vec<u8>, ty: &str, value: String, v: Verdict| {
        let mut hdr = ObjHdr::new("bck", name, b.len() as i64);
        hdr.attrs.cksum_type = ty.into();
        hdr.attrs.cksum_value = value;
        objs.push(Obj { hdr, body: b });
        verdicts.push(v);
    };
    for (i, ty) in CksumType::ALL.into_iter().enumerate() {
        let b = body(100 + 300 * i, i as u8 + 3);
        let value = compute_hex(ty, &b);
        add(&format!("good-{ty}"), b, ty.as_str(), value, Verdict::Verified(ty));
    }
    add("empty", Vec::new(), "md5", compute_hex(CksumType::Md5, b""), Verdict::Verified(CksumType::Md5));
    let b = body(777, 5);
    let mut corrupt = b.clone();
    corrupt[500] ^= 0x10;
    let (expected, actual) = (compute_hex(CksumType::Crc32c, &b), compute_hex(CksumType::Crc32c, &corrupt));
    let e = ChecksumError::Mismatch { ty: CksumType::Crc32c, expected: expected.clone(), actual };
    add("corrupt", corrupt, "crc32c", expected, Verdict::Failed(Box::new(e)));
    let e = ChecksumError::UnknownType { ty: "blake3".into() };
    add("unknown", body(10, 1), "blake3", "00".into(), Verdict::Failed(Box::new(e)));
    let e = ChecksumError::BadValue { ty: CksumType::Xxhash2, value: "h1".into() };
    add("malformed", body(3, 2), "xxhash2", "h1".into(), Verdict::Failed(Box::new(e)));
    add("none", body(50, 9), "none", String::new(), Verdict::Unchecked);
    add(
        "after",
        body(64, 4),
        "sha256",
        compute_hex(CksumType::Sha256, &body(64, 4)),
        Verdict::Verified(CksumType::Sha256),
    );
    (objs, verdicts)
}

#[test]
fn checksums_are_verified_as_bytes_stream_split_at_every_boundary() {
    let (objs, verdicts) = checksummed_objects();
    let want = Got { verdicts, ..expected(&objs, true) };
    for pdu in [None, Some(500)] {
        let wire = encode_stream(&objs, pdu, true);
        assert_eq!(decode_frames(&wire, usize::MAX).unwrap(), want, "whole, pdu {pdu:?}");
        for cut in 0..=wire.len() {
            let mut d = Decoder::default();
            let mut got = Got { objs: vec![], fin: false, verdicts: vec![] };
            for part in [&wire[..cut], &wire[cut..]] {
                let mut rest = part;
                loop {
                    let (n, ev) = d.step(rest).unwrap();
                    rest = &rest[n..];
                    match ev {
                        Some(ev) => collect(ev, &mut got),
                        None => break,
                    }
                }
            }
            while d.has_due() {
                collect(d.step(&[]).unwrap().1.unwrap(), &mut got);
            }
            assert_eq!(got, want, "cut at {cut}, pdu {pdu:?}");
        }
        for piece in [1, 3, 64] {
            assert_eq!(decode_frames(&wire, piece).unwrap(), want, "pieces of {piece}, pdu {pdu:?}");
        }
    }
    // Through LZ4 and chunks too: the bytes hashed are the decompressed ones.
    let mut rng = Rng(7);
    let body = chunked(&lz4_body(&objs, lz4::BlockSize::K64), &mut rng);
    for piece in [1, 13, 4096] {
        let (got, _) = decode_body(&body, Framing::Chunked, true, piece).unwrap();
        assert_eq!(got, want, "lz4, pieces of {piece}");
    }
}

#[test]
fn verification_can_be_turned_off() {
    let (objs, _) = checksummed_objects();
    let wire = encode_stream(&objs, None, true);
    let mut d = Decoder::default();
    d.set_verify(false);
    let mut got = Got { objs: vec![], fin: false, verdicts: vec![] };
    let mut rest = &wire[..];
    loop {
        let (n, ev) = d.step(rest).unwrap();
        rest = &rest[n..];
        match ev {
            Some(ev) => collect(ev, &mut got),
            None if rest.is_empty() && !d.has_due() => break,
            None => {}
        }
    }
    assert_eq!(got, expected(&objs, true), "every verdict is Unchecked");
}

#[test]
fn fuzz_targets_survive_generated_inputs() {
    let mut rng = Rng(0x5eed);
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let objs = sample_objects(&mut rng, 6, true);
    let (cks, _) = checksummed_objects();
    for (mode, body) in [
        (0u8, chunked(&encode_stream(&objs[..3], None, true), &mut rng)),
        (1, encode_stream(&objs, Some(500), false)),
        (2, chunked(&lz4_body(&objs[..2], lz4::BlockSize::K64), &mut rng)),
        (1, encode_stream(&cks, None, true)),
        (5, encode_stream(&cks, Some(300), true)),
    ] {
        let mut s = vec![mode];
        s.extend(body);
        seeds.push(s);
    }
    let mut head = b"PUT /v1/objstream/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\nAis-Session-Id: 1\r\n\r\n".to_vec();
    head.extend_from_slice(&seeds[0][1..]);
    seeds.push(head);
    for seed in &seeds {
        fuzzing::objstream_body(seed);
        fuzzing::lz4_frame(seed);
        fuzzing::obj_header(&seed[1 + PROTO_HDR_BYTES.min(seed.len() - 1)..]);
        fuzzing::obj_checksum(seed);
        for _ in 0..300 {
            let mut m = seed.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(m.len() as u64) as usize;
                match rng.below(3) {
                    0 => m[i] = rng.next() as u8,
                    1 => m.truncate(i.max(1)),
                    _ => m.insert(i, rng.next() as u8),
                }
            }
            fuzzing::objstream_body(&m);
            fuzzing::http_request(&m);
            fuzzing::lz4_frame(&m[..m.len().min(4096)]);
            fuzzing::obj_header(&m[..m.len().min(512)]);
            fuzzing::obj_checksum(&m[..m.len().min(4096)]);
        }
    }
}
