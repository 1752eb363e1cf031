//! Bodies of the objstream fuzz targets in `fuzz/`, also run by the unit
//! tests over generated inputs so they cannot rot. None may panic.

use super::body::{BodyDecoder, BodyEvent, Framing};
use super::checksum::{ChecksumError, CksumType, Verifier, compute_hex};
use super::decoder::Event;
use super::header::{MAX_HEADER_BYTES, ObjHdr};
use super::lz4;

/// The object header decoder: whatever decodes re-encodes to the same bytes.
pub fn obj_header(data: &[u8]) {
    if let Ok(h) = ObjHdr::decode(data) {
        let mut again = Vec::new();
        h.encode(&mut again, usize::MAX).expect("a decoded header encodes");
        assert_eq!(again, data);
    }
}

/// A whole request body through every layer. The first byte picks the
/// framing and compression; the rest is fed in pieces of varying size.
pub fn objstream_body(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let framing = if mode & 1 == 0 { Framing::Chunked } else { Framing::Length(rest.len() as u64) };
    let mut d = BodyDecoder::new(framing, mode & 2 != 0, MAX_HEADER_BYTES);
    let piece = 1 + usize::from(mode >> 2);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut events = 0usize;
    loop {
        if buf.is_empty() || fed < rest.len() {
            let n = piece.min(rest.len() - fed);
            buf.extend_from_slice(&rest[fed..fed + n]);
            fed += n;
        }
        let (used, ev) = match d.step(&buf) {
            Ok(x) => x,
            Err(_) => return,
        };
        assert!(used <= buf.len());
        let end = matches!(ev, BodyEvent::End);
        let need = matches!(ev, BodyEvent::NeedMore);
        if let BodyEvent::Obj(Event::Data(s)) = &ev {
            assert!(!s.is_empty());
        }
        buf.drain(..used);
        events += 1;
        assert!(events < 4 * data.len() + 64, "the decoder makes progress");
        if end || (need && fed == rest.len()) {
            return;
        }
    }
}

/// A header's checksum fields as a peer may send them: the first byte picks
/// the type (one of AIStore's, an unknown one, or `none`), the next up to
/// 128 bytes are the value, the rest the body, fed in pieces. Verifying
/// never panics; a value computed over the body verifies, and flipping a
/// body byte makes it a mismatch.
pub fn obj_checksum(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let names = ["xxhash", "xxhash2", "crc32c", "md5", "sha256", "sha512", "none", "", "blake3"];
    let ty = names[usize::from(pick) % names.len()];
    let split = rest.len().min(usize::from(pick >> 1) % 129);
    let (value, body) = rest.split_at(split);
    let value = String::from_utf8_lossy(value);
    let piece = 1 + usize::from(pick >> 4);
    match Verifier::for_header(ty, &value) {
        Ok(Some(mut v)) => {
            for p in body.chunks(piece) {
                v.update(p);
            }
            match v.finish() {
                Ok(t) => assert_eq!(t.as_str(), ty),
                Err(ChecksumError::Mismatch { expected, actual, .. }) => assert_ne!(expected, actual),
                Err(e) => panic!("a parsed checksum can only mismatch: {e}"),
            }
        }
        Ok(None) => assert!(ty.is_empty() || ty == "none" || value.is_empty()),
        Err(_) => {}
    }
    let Some(t) = CksumType::parse(ty) else { return };
    let good = compute_hex(t, body);
    let mut v = Verifier::for_header(ty, &good).expect("our own value parses").expect("a checksum");
    body.chunks(piece).for_each(|p| v.update(p));
    assert_eq!(v.finish(), Ok(t));
    if let Some(i) = body.len().checked_sub(1).map(|n| usize::from(pick) % (n + 1)) {
        let mut bad = body.to_vec();
        bad[i] ^= 1;
        let mut v = Verifier::for_header(ty, &good).expect("parses").expect("a checksum");
        v.update(&bad);
        assert!(matches!(v.finish(), Err(ChecksumError::Mismatch { .. })), "one flipped bit is caught");
    }
}

/// The LZ4 frame decoder on its own, then a round trip through the encoder.
pub fn lz4_frame(data: &[u8]) {
    let mut d = lz4::Decoder::new();
    let mut rest = data;
    let mut out = 0usize;
    while !rest.is_empty() {
        match d.feed(rest) {
            Ok(n) => rest = &rest[n..],
            Err(_) => break,
        }
        out += d.output().len();
        let n = d.output().len();
        d.consume(n);
    }
    let _ = (out, d.finish());

    let mut frame = lz4::frame_header(lz4::BlockSize::K64).to_vec();
    for block in data.chunks(64 << 10) {
        lz4::encode_block(block, &mut frame);
    }
    let mut d = lz4::Decoder::new();
    let mut back = Vec::new();
    let mut rest = &frame[..];
    while !rest.is_empty() {
        let n = d.feed(rest).expect("our own frame decodes");
        rest = &rest[n..];
        back.extend_from_slice(d.output());
        let n = d.output().len();
        d.consume(n);
    }
    d.finish().expect("ends at a block boundary");
    assert_eq!(back, data);
}

/// The receiver's request-head parser: never panics, never claims more
/// bytes than it was given, and refuses heads above the limit.
pub fn http_request(data: &[u8]) {
    use crate::http::request::{HEAD_BYTES_MAX, parse_head};
    match parse_head(data) {
        Ok(Some((head, used))) => {
            assert!(used <= data.len() && used <= HEAD_BYTES_MAX);
            let _ = head.field("ais-session-id");
        }
        Ok(None) => assert!(data.len() < HEAD_BYTES_MAX),
        Err(e) => assert!((400..600).contains(&e.status)),
    }
}
