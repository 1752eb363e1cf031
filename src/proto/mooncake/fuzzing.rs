//! Bodies of the fuzz targets in `fuzz/`, kept here so the normal test suite
//! runs them too (over generated inputs) and they cannot rot.
//!
//! Each takes arbitrary bytes, must never panic, and checks that whatever
//! decodes also re-encodes consistently.

use super::harness::{client as client_harness, server as server_harness};
use super::{client, frame, message, name, rdma, server, tcp};
use crate::proto::auth;

/// The RPC port's frame decoder, with the JSON bodies behind it.
pub fn handshake_frame(data: &[u8]) {
    let max = 1 + u64::from(data.first().copied().unwrap_or(0)) * 64;
    match frame::decode(data, max) {
        Ok(Some((f, used))) => {
            assert!(used <= data.len());
            assert!((used as u64) <= frame::LEN_BYTES as u64 + max);
            if !f.legacy {
                let again = frame::encode(f.kind, &f.body);
                assert_eq!(&again[..], &data[..used]);
            }
            rdma_desc(&f.body);
            let _ = message::from_wire::<message::NotifyDesc>(&f.body);
        }
        Ok(None) => assert!(data.len() < frame::LEN_BYTES || data.len() < frame::LEN_BYTES + max as usize + 1),
        Err(_) => {}
    }
}

/// A segment descriptor's RDMA fields and a Connection message, checked:
/// whatever passes the checks writes out and checks again to the same.
pub fn rdma_desc(data: &[u8]) {
    if let Ok(desc) = message::from_wire::<message::SegmentDesc>(data)
        && let Ok(seg) = rdma::RdmaSegment::from_desc(&desc)
    {
        assert!(!seg.devices.is_empty() && seg.devices.len() <= rdma::DEVICES_MAX);
        assert!(seg.buffers.iter().all(|b| b.lkey.len() == seg.devices.len() && b.rkey.len() == seg.devices.len()));
        let mut again = desc.clone();
        seg.write_into(&mut again);
        let wire = message::to_wire(&again);
        let back: message::SegmentDesc = message::from_wire(&wire).expect("what we write parses");
        assert_eq!(rdma::RdmaSegment::from_desc(&back).as_ref(), Ok(&seg));
    }
    if let Ok(h) = message::from_wire::<message::HandshakeDesc>(data)
        && let Ok(c) = rdma::Connection::from_desc(&h)
    {
        assert!(!c.qps.is_empty() && c.qps.len() <= rdma::QPS_PER_ENDPOINT_MAX);
        assert_eq!(rdma::Connection::from_desc(&c.to_desc()).as_ref(), Ok(&c));
        let no = rdma::rejection(&h, "fuzz");
        assert!(matches!(c.check_reply(&no), Err(rdma::RdmaFault::Rejected(_))));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = rdma::NicPath::parse(text) {
            assert_eq!(p.to_string(), text);
        }
        if let Ok(g) = rdma::Gid::parse(text, "") {
            assert_eq!(g.to_string(), text.to_ascii_lowercase());
        }
    }
}

/// The data port's request header and status frame decoders.
pub fn tcp_header(data: &[u8]) {
    if let Some(bytes) = data.first_chunk::<{ tcp::HEADER_BYTES }>() {
        match tcp::RequestHeader::decode(bytes) {
            Ok(h) => {
                assert!(h.size > 0 && h.addr.checked_add(h.size).is_some());
                let again = tcp::RequestHeader::decode(&h.encode()).expect("a valid header re-decodes");
                assert_eq!(again, h);
            }
            Err((partial, _)) => assert_eq!(partial.v2, bytes[16] & tcp::V2_FLAG != 0),
        }
    }
    if let Some(bytes) = data.first_chunk::<{ tcp::STATUS_BYTES }>()
        && let Ok(code) = tcp::decode_status(bytes)
    {
        assert_eq!(tcp::encode_status(code), *bytes);
    }
    // Address validation over buffers taken from the input.
    let words: Vec<u64> = data.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    if words.len() >= 2 {
        let (addr, size) = (words[0], words[1]);
        let buffers: Vec<(u64, u64)> = words[2..].chunks_exact(2).map(|p| (p[0], p[1])).collect();
        if let Some(i) = tcp::locate(buffers.iter().copied(), addr, size) {
            let (base, len) = buffers[i];
            assert!(size > 0 && addr >= base && addr + size <= base + len);
        }
    }
}

/// HTTP responses (etcd's JSON gateway), chunked bodies included, whole
/// and fed to the incremental chunked decoder in pieces.
pub fn http_response(data: &[u8]) {
    if let Ok(r) = crate::http::response::parse(data, 1 << 20) {
        assert!(r.status <= 999);
        assert!(r.body.len() <= data.len());
    }
    let whole = crate::http::chunked::decode_all(data, 1 << 20);
    let mut decoder = crate::http::chunked::Decoder::new();
    let (mut fed, mut used, mut out) = (0, 0, Vec::new());
    let streamed = loop {
        fed = (fed + 7).min(data.len());
        match decoder.step(&data[used..fed]) {
            Err(e) => break Err(e),
            Ok((n, step)) => {
                used += n;
                match step {
                    crate::http::chunked::Step::Data(d) => out.extend_from_slice(d),
                    crate::http::chunked::Step::Done => break Ok(out),
                    crate::http::chunked::Step::NeedMore if fed == data.len() => {
                        break Err(crate::http::HttpError::Truncated(""));
                    }
                    crate::http::chunked::Step::NeedMore => {}
                }
            }
        }
    };
    // Whole or in pieces, the decoder reaches the same verdict.
    assert_eq!(whole.is_ok(), streamed.is_ok());
    if let (Ok(a), Ok(b)) = (whole, streamed) {
        assert_eq!(a, b);
    }
}

/// Segment names and hosts, which arrive in descriptors from the network.
pub fn segment_name(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(hp) = name::parse(text)
    {
        assert!(!hp.host.is_empty());
        if let Some(port) = hp.port {
            let again = name::parse(&name::HostPort::with_port(&hp.host, port)).expect("re-parses");
            assert_eq!(again.port, Some(port));
        }
    }
}

/// The client core fed arbitrary peer bytes: requests from the first
/// bytes, then answers (literal bytes, or, in structured mode, status
/// frames and data built from the input) in pieces of arbitrary sizes.
/// With bit 7 of the shape byte, the connection uses CRC-32C framing; with
/// bit 6, it authenticates first:
/// the peer's bytes then stand where the challenge belongs, or, in
/// structured mode, follow a real challenge and verdict. The driver's
/// hang-up watch reports at points the input picks. Nothing panics, and
/// every request settles exactly once.
pub fn tcp_client(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&shape, mut rest)) = rest.split_first() else { return };
    let limits = client::Limits {
        group_reqs_max: 1 + usize::from(shape & 3),
        inflight_bytes_max: 64 + 64 * u64::from((shape >> 4) & 3),
        awaiting_max: 1 + usize::from((shape >> 2) & 3),
        ..client::Limits::default()
    };
    let v2 = mode & 1 == 0;
    let crc32c = v2 && shape & 0x80 != 0;
    let keyed = shape & 0x40 != 0;
    let key = || auth::AuthKey::new(b"the fuzzing key, 26 bytes.").expect("long enough");
    let mut h = if keyed {
        let prover = auth::Prover::new(key(), auth::Port::Data, [1; auth::NONCE_BYTES]);
        client_harness::Harness::with_auth(v2, crc32c, limits, prover)
    } else {
        // Half the unkeyed v2 connections tag their requests, so a peer's
        // status 4 (another process) is met too.
        let instance = (v2 && rest.len() % 2 == 1).then_some(7);
        client_harness::Harness::with_instance(v2, crc32c, instance, limits)
    };
    let requests = 1 + usize::from(mode >> 5);
    for i in 0..requests {
        let b = rest.first().copied().unwrap_or(i as u8);
        rest = rest.get(1..).unwrap_or_default();
        let op = if b & 1 == 0 { tcp::Opcode::Read } else { tcp::Opcode::Write };
        h.push(op, i * 256, 1 + usize::from(b >> 1), 0x1000 + i as u64);
    }
    let peer: Vec<u8> = if mode & 2 == 0 {
        rest.to_vec()
    } else {
        let mut out = Vec::new();
        for &b in rest {
            match b % 5 {
                0 => out.extend(tcp::encode_status(tcp::STATUS_OK)),
                1 => out.extend(tcp::encode_status(u32::from(b >> 3))),
                2 => out.extend(std::iter::repeat_n(0xab, usize::from(b / 5))),
                _ => out.push(b),
            }
        }
        out
    };
    let step = 1 + usize::from(mode >> 2 & 7);
    if keyed && mode & 2 != 0 {
        // A real exchange first, so the answers that follow are reached.
        let verifier = auth::Verifier::new(key(), auth::Port::Data, [2; auth::NONCE_BYTES]);
        h.feed(&verifier.challenge());
        h.send_all(step);
        let proof: [u8; auth::PROOF_BYTES] = h.wire[..].try_into().expect("the proof alone");
        h.feed(&verifier.check(&proof).expect("the same key"));
    }
    h.send_all(step);
    let mut at = 0;
    // The driver's hang-up watch, armed whenever the core asks, comes back
    // (with the peer's close, or without news) where a peer byte has its
    // two top bits set.
    let mut watched = h.conn.poll_watch();
    while at < peer.len() && !h.conn.is_closing() {
        if peer[at] & 0xc0 == 0xc0 && watched {
            h.conn.on_watch(peer[at] & 0x20 != 0);
            watched = false;
            if h.conn.is_closing() {
                break;
            }
        }
        let n = (1 + usize::from(peer[at] % 23)).min(peer.len() - at);
        if h.feed(&peer[at..at + n]) == 0 {
            break;
        }
        at += n;
        h.send_all(step);
        watched |= h.conn.poll_watch();
    }
    if !h.conn.is_closing() {
        if mode & 4 == 0 {
            h.conn.on_eof();
        } else {
            h.conn.on_timer(h.now + std::time::Duration::from_secs(3600));
        }
    }
    if !h.conn.is_closing() {
        // Everything was answered: nothing times out.
        h.conn.close("fuzz: the end");
    }
    h.finish();
    h.assert_each_settled_once();
}

/// The server core fed arbitrary client bytes (literal, or, in structured
/// mode, requests built from the input, valid and not), in pieces of
/// arbitrary sizes, with small limits so back-pressure and staging edges
/// are reached. With bit 0 of the second byte, the session requires a key:
/// the client's bytes stand where the proof belongs, or (bit 1) follow a
/// good proof; with bit 2, it knows its instance tag and refuses requests
/// tagged for another. Nothing panics, and every pin is released at the
/// end.
pub fn tcp_server(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&flags, rest)) = rest.split_first() else { return };
    let limits = server::Limits {
        staging_bytes: 96 + usize::from(mode & 7) * 16,
        staged_payload_max: 32,
        payload_with_next_max: 64,
        replies_queued_max: 1 + usize::from(mode >> 3 & 3),
        replies_per_send_max: 2,
        linger: crate::proto::linger::LingerLimits { bytes_max: 256, ..Default::default() },
        ..server::Limits::default()
    };
    let mut h = server_harness::Harness::with_memory(limits, 4096);
    h.send_step = 1 + usize::from(mode >> 5);
    let mut proof = Vec::new();
    if flags & 4 != 0 {
        // This process's tag is 5; some structured requests carry 6.
        h.s = server::ServerSession::new(limits).with_instance(5);
    }
    if flags & 1 != 0 {
        let key = || auth::AuthKey::new(b"the fuzzing key, 26 bytes.").expect("long enough");
        let verifier = auth::Verifier::new(key(), auth::Port::Data, [3; auth::NONCE_BYTES]);
        let session = std::mem::replace(&mut h.s, server::ServerSession::new(limits));
        h.s = session.authenticating(verifier, h.now + std::time::Duration::from_secs(5));
        h.run();
        if flags & 2 != 0 {
            let mut prover = auth::Prover::new(key(), auth::Port::Data, [4; auth::NONCE_BYTES]);
            let challenge = h.wire[..auth::CHALLENGE_BYTES].try_into().expect("the challenge went first");
            proof = prover.answer(challenge).expect("a challenge").to_vec();
        }
    }
    let client: Vec<u8> = if mode & 0x80 == 0 {
        rest.to_vec()
    } else {
        let mut out = Vec::new();
        for (i, &b) in rest.iter().enumerate() {
            let addr = h.addr(usize::from(b) * 8);
            debug_assert!(usize::from(b) * 8 + 128 <= 4096);
            let len = 1 + u64::from(b & 0x7f);
            let v2 = b & 0x80 == 0 || i % 7 != 0;
            // Some requests with CRC-32C framing, a few of them corrupted.
            let crc32c = v2 && i % 3 == 0;
            // Some tagged: for this process, or (now and then) another.
            let instance = (v2 && i % 4 == 1).then_some(if i % 9 == 1 { 6 } else { 5 });
            let header = |size, addr, opcode| tcp::RequestHeader { size, addr, opcode, v2, crc32c, instance }.encode();
            match b % 4 {
                0 => {
                    out.extend(header(len, addr, tcp::Opcode::Write));
                    let payload: Vec<u8> = std::iter::repeat_n(b, len as usize).collect();
                    out.extend(&payload);
                    if crc32c {
                        let crc = tcp::crc32c(&payload) ^ u32::from(i % 5 == 0);
                        out.extend(crc.to_le_bytes());
                    }
                }
                1 => {
                    let mut h = header(len, addr, tcp::Opcode::Read);
                    if crc32c && i % 11 == 0 {
                        h[3] ^= 0x20;
                    }
                    out.extend(h);
                }
                2 => out.extend(header(len, 0x40, tcp::Opcode::Read)),
                _ => out.push(b),
            }
        }
        out
    };
    let client = [proof, client].concat();
    let mut at = 0;
    for (i, &b) in client.iter().enumerate() {
        if at >= client.len() {
            break;
        }
        if i % 5 == 0 {
            h.sending = b & 1 == 0;
        }
        let n = (1 + usize::from(b % 29)).min(client.len() - at);
        h.feed(&client[at..at + n]);
        at += n;
    }
    h.sending = true;
    h.run();
    h.eof();
    if !h.s.is_closing() {
        h.s.on_timer(h.now + std::time::Duration::from_secs(3600));
    }
    if !h.s.is_closing() {
        h.s.close("fuzz: the end");
    }
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0, "every pin is released");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs every target over inputs built from a fixed generator plus
    /// mutations of valid messages: no panic, whatever the bytes.
    #[test]
    fn fuzz_targets_survive_generated_inputs() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let seeds: Vec<Vec<u8>> = vec![
            frame::encode(
                frame::FrameType::Metadata,
                br#"{"buffers":[{"addr":1,"length":2,"name":"a"}],"name":"h:1","protocol":"tcp","tcp_data_port":5}"#,
            ),
            frame::encode(frame::FrameType::Notify, br#"{"name":"a","notify_msg":"b"}"#),
            tcp::RequestHeader { size: 9, addr: 4096, opcode: tcp::Opcode::Write, v2: true, crc32c: false, instance: None }.encode().to_vec(),
            tcp::RequestHeader { size: 9, addr: 4096, opcode: tcp::Opcode::Read, v2: true, crc32c: true, instance: None }.encode().to_vec(),
            tcp::encode_status(1).to_vec(),
            b"[::1]:15000".to_vec(),
            br#"{"buffers":[{"addr":4096,"length":8192,"lkey":[1],"name":"cpu:0","rkey":[2]}],"devices":[{"gid":"fe:80:00:00:00:00:00:00:02:42:ac:ff:fe:11:00:02","lid":0,"name":"rxe0"}],"name":"h:1","priority_matrix":{"cpu:0":[["rxe0"],[]]},"protocol":"rdma"}"#.to_vec(),
            br#"{"local_gid":"fe:80:00:00:00:00:00:00:02:42:ac:ff:fe:11:00:02","local_lid":0,"local_nic_path":"h:1@rxe0","peer_nic_path":"h:2@rxe1","qp_num":[17,18],"ready_ack":true}"#.to_vec(),
            b"h:1@mlx5_0".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
        ];
        for round in 0..60_000u32 {
            let mut input = if round % 2 == 0 {
                seeds[round as usize % seeds.len()].clone()
            } else {
                (0..next() % 96).map(|_| next() as u8).collect()
            };
            for _ in 0..next() % 4 {
                if !input.is_empty() {
                    let i = (next() as usize) % input.len();
                    input[i] = next() as u8;
                }
            }
            handshake_frame(&input);
            tcp_header(&input);
            segment_name(&input);
            rdma_desc(&input);
            http_response(&input);
            tcp_client(&input);
            tcp_server(&input);
        }
    }
}
