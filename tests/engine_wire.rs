//! The data port, byte for byte: a raw client pipelines requests at a
//! shardwire target and checks every reply, in order.

mod interop;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use interop::pattern;
use shardwire::engine::TransferEngine;
use shardwire::proto::mooncake::tcp::{self, Opcode, RequestHeader};

fn target() -> (TransferEngine, u64, TcpStream) {
    let e = TransferEngine::new();
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    let buf = e.allocate_managed_buffer(1 << 20).unwrap();
    let port = e.data_port().unwrap();
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (e, buf, s)
}

fn header(op: Opcode, addr: u64, size: u64, v2: bool) -> Vec<u8> {
    RequestHeader { size, addr, opcode: op, v2, crc32c: false, instance: None }.encode().to_vec()
}

fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn status(s: &mut TcpStream) -> u32 {
    tcp::decode_status(&read_exact(s, 8).try_into().unwrap()).expect("an MCTV status frame")
}

#[test]
fn pipelined_reads_and_writes_are_answered_in_order() {
    let (e, buf, mut s) = target();
    e.write_bytes_to_buffer(buf, &pattern(4096, 1)).unwrap();
    e.write_bytes_to_buffer(buf + 8192, &pattern(100, 2)).unwrap();
    let payload = pattern(3000, 3);
    let mut burst = Vec::new();
    burst.extend(header(Opcode::Read, buf, 4096, true));
    burst.extend(header(Opcode::Read, buf + 8192, 100, true));
    burst.extend(header(Opcode::Write, buf + 65536, 3000, true));
    burst.extend(&payload);
    burst.extend(header(Opcode::Read, buf + 65536, 3000, true));
    for i in 0..100u64 {
        burst.extend(header(Opcode::Read, buf + i * 16, 16, true));
    }
    s.write_all(&burst).unwrap();
    assert_eq!(status(&mut s), 0);
    assert_eq!(read_exact(&mut s, 4096), pattern(4096, 1));
    assert_eq!(status(&mut s), 0);
    assert_eq!(read_exact(&mut s, 100), pattern(100, 2));
    assert_eq!(status(&mut s), 0, "the WRITE's status");
    assert_eq!(status(&mut s), 0);
    assert_eq!(read_exact(&mut s, 3000), payload, "a READ sees the WRITE before it");
    let all = pattern(4096, 1);
    for i in 0..100usize {
        assert_eq!(status(&mut s), 0);
        assert_eq!(read_exact(&mut s, 16), all[i * 16..i * 16 + 16]);
    }
}

#[test]
fn a_bad_request_mid_pipeline_is_rejected_after_the_good_ones() {
    let (e, buf, mut s) = target();
    e.write_bytes_to_buffer(buf, &pattern(64, 5)).unwrap();
    let mut burst = Vec::new();
    burst.extend(header(Opcode::Read, buf, 64, true));
    burst.extend(header(Opcode::Read, buf + (4 << 30), 64, true)); // outside every buffer
    burst.extend(header(Opcode::Read, buf, 64, true)); // never served
    burst.extend(header(Opcode::Write, buf, 8, true));
    burst.extend(b"ignored!");
    s.write_all(&burst).unwrap();
    assert_eq!(status(&mut s), 0);
    assert_eq!(read_exact(&mut s, 64), pattern(64, 5));
    assert_eq!(status(&mut s), tcp::STATUS_REJECTED);
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).expect("a clean close, not a reset");
    assert_eq!(n, 0, "nothing after the rejection");
    assert_eq!(e.read_bytes_from_buffer(buf, 8).unwrap(), pattern(8, 5), "the WRITE after it never ran");
}

#[test]
fn malformed_headers_are_rejected() {
    for (bytes, why) in [
        (
            {
                let mut h = header(Opcode::Read, 4096, 8, true);
                h[16] = 0x85;
                h
            },
            "unknown opcode",
        ),
        (header(Opcode::Write, 4096, 0, true), "zero size"),
        (header(Opcode::Read, u64::MAX - 4, 8, true), "overflow"),
    ] {
        let (_e, _buf, mut s) = target();
        s.write_all(&bytes).unwrap();
        assert_eq!(status(&mut s), tcp::STATUS_REJECTED, "{why}");
    }
}

#[test]
fn v1_requests_get_no_status_frames() {
    let (e, buf, mut s) = target();
    let data = pattern(512, 9);
    let mut burst = header(Opcode::Write, buf, 512, false);
    burst.extend(&data);
    burst.extend(header(Opcode::Read, buf, 512, false));
    s.write_all(&burst).unwrap();
    assert_eq!(read_exact(&mut s, 512), data, "v1: the READ's bytes, no status before them");
    assert_eq!(e.read_bytes_from_buffer(buf, 512).unwrap(), data);
    // A bad v1 request: the server just closes.
    s.write_all(&header(Opcode::Read, buf + (4 << 30), 8, false)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0), 0);
}

#[test]
fn a_header_split_across_packets_is_reassembled() {
    let (e, buf, mut s) = target();
    e.write_bytes_to_buffer(buf, &pattern(32, 4)).unwrap();
    s.set_nodelay(true).unwrap();
    let h = header(Opcode::Read, buf, 32, true);
    for chunk in h.chunks(5) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(&mut s), 0);
    assert_eq!(read_exact(&mut s, 32), pattern(32, 4));
}
