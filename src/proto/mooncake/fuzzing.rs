//! Bodies of the fuzz targets in `fuzz/`, kept here so the normal test suite
//! runs them too (over generated inputs) and they cannot rot.
//!
//! Each takes arbitrary bytes, must never panic, and checks that whatever
//! decodes also re-encodes consistently.

use super::{frame, message, name, tcp};

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
            let _ = message::from_wire::<message::SegmentDesc>(&f.body);
            let _ = message::from_wire::<message::HandshakeDesc>(&f.body);
            let _ = message::from_wire::<message::NotifyDesc>(&f.body);
        }
        Ok(None) => assert!(data.len() < frame::LEN_BYTES || data.len() < frame::LEN_BYTES + max as usize + 1),
        Err(_) => {}
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
            tcp::RequestHeader { size: 9, addr: 4096, opcode: tcp::Opcode::Write, v2: true }.encode().to_vec(),
            tcp::encode_status(1).to_vec(),
            b"[::1]:15000".to_vec(),
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
            http_response(&input);
        }
    }
}
