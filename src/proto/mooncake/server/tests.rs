//! The server core driven by scripted clients: no sockets, real memory.

use std::time::Duration;

use super::*;
use crate::proto::linger::LingerLimits;
use crate::proto::mooncake::harness::server::Harness;
use crate::proto::mooncake::tcp::{STATUS_OK, STATUS_REJECTED, encode_status};

fn header(op: Opcode, addr: u64, size: u64, v2: bool) -> Vec<u8> {
    RequestHeader { size, addr, opcode: op, v2, crc32c: false, instance: None }.encode().to_vec()
}

fn ok() -> Vec<u8> {
    encode_status(STATUS_OK).to_vec()
}

/// A pipeline of small and large writes and reads, and the replies and
/// memory a correct server ends with.
fn pipeline(h: &Harness) -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    let mut replies = Vec::new();
    client.extend(header(Opcode::Write, h.addr(0), 100, true));
    client.extend([0xa1u8; 100]);
    replies.extend(ok());
    client.extend(header(Opcode::Read, h.addr(1 << 20), 50, true));
    replies.extend(ok());
    replies.extend([0x5au8; 50]);
    client.extend(header(Opcode::Write, h.addr(4096), 4096, true));
    client.extend((0..4096).map(|i| i as u8));
    replies.extend(ok());
    // A large write: received in place, not staged.
    client.extend(header(Opcode::Write, h.addr(2 << 20), 300_000, true));
    client.extend((0..300_000).map(|i| (i % 251) as u8));
    replies.extend(ok());
    client.extend(header(Opcode::Read, h.addr(4096), 10, true));
    replies.extend(ok());
    replies.extend(0..10u8);
    (client, replies)
}

fn check_memory(h: &Harness) {
    assert!(h.mem.bytes[..100].iter().all(|&b| b == 0xa1));
    assert!(h.mem.bytes[4096..8192].iter().enumerate().all(|(i, &b)| b == i as u8));
    assert!(h.mem.bytes[2 << 20..(2 << 20) + 300_000].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[test]
fn a_pipeline_split_at_every_byte_boundary_gets_the_same_replies() {
    let mut reference = Harness::new(Limits::default());
    reference.mem.bytes[1 << 20..(1 << 20) + 50].fill(0x5a);
    let (client, replies) = pipeline(&reference);
    reference.feed(&client);
    assert_eq!(reference.wire, replies);
    check_memory(&reference);
    // Cuts near the small requests at every byte; through the large
    // payload at a stride (each cut is a fresh session).
    let small_end = 24 + 100 + 24 + 24 + 4096 + 24 + 64;
    let cuts = (0..=small_end).chain((small_end..client.len()).step_by(7919)).chain([client.len()]);
    for cut in cuts {
        let mut h = Harness::new(Limits::default());
        h.mem.bytes[1 << 20..(1 << 20) + 50].fill(0x5a);
        h.send_step = 1 + cut % 13;
        // Addresses are this harness's own memory.
        let (client, replies) = pipeline(&h);
        h.feed(&client[..cut]);
        h.feed(&client[cut..]);
        assert_eq!(h.wire, replies, "cut at {cut}");
        check_memory(&h);
    }
    // Byte by byte.
    let mut h = Harness::new(Limits::default());
    h.mem.bytes[1 << 20..(1 << 20) + 50].fill(0x5a);
    let (client, replies) = pipeline(&h);
    for b in &client[..small_end] {
        h.feed(std::slice::from_ref(b));
    }
    h.feed(&client[small_end..]);
    assert_eq!(h.wire, replies);
}

#[test]
fn a_run_of_small_writes_is_taken_in_by_one_receive() {
    let mut h = Harness::new(Limits::default());
    let mut client = Vec::new();
    for i in 0..12 {
        client.extend(header(Opcode::Write, h.addr(i * 4096), 4096, true));
        client.extend(vec![i as u8 + 1; 4096]);
    }
    h.feed(&client);
    assert_eq!(h.receives, 1, "twelve 4 KiB writes fit one staging receive");
    assert_eq!(h.wire, ok().repeat(12), "and are answered in one send");
    for i in 0..12 {
        assert!(h.mem.bytes[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8 + 1));
    }
    assert_eq!(h.mem.pins.get(), 0, "landed writes are unpinned");
}

#[test]
fn large_payloads_are_received_in_place() {
    let mut h = Harness::new(Limits::default());
    let mut client = header(Opcode::Write, h.addr(0), 1 << 20, true);
    h.feed(&client);
    let plan = h.plan.as_ref().expect("a receive for the payload");
    assert!(plan.wait_all, "a payload larger than 256 KiB is awaited whole");
    assert_eq!(plan.pieces, vec![(h.addr(0) as *mut u8, 1 << 20)], "straight into the region");
    client = vec![7u8; 1 << 20];
    client.extend(header(Opcode::Write, h.addr(2 << 20), 100_000, true));
    h.feed(&client);
    let plan = h.plan.as_ref().expect("the next payload, then the next header");
    assert_eq!(plan.pieces[0], (h.addr(2 << 20) as *mut u8, 100_000), "in place, not staged");
    assert_eq!(plan.pieces[1].1, 24, "after a large write, only a header is staged");
    h.feed(&[9u8; 100_000]);
    let plan = h.plan.as_ref().unwrap();
    assert_eq!(plan.pieces.len(), 1);
    assert_eq!(h.wire, ok().repeat(2));
}

#[test]
fn a_rejection_mid_pipeline_answers_1_runs_nothing_after_and_drains() {
    let mut h = Harness::new(Limits::default());
    let mut client = header(Opcode::Write, h.addr(0), 8, true);
    client.extend([1u8; 8]);
    client.extend(header(Opcode::Read, 0x10, 8, true)); // not registered
    client.extend(header(Opcode::Write, h.addr(100), 8, true));
    client.extend([2u8; 8]);
    h.feed(&client);
    let mut expect = ok();
    expect.extend(encode_status(STATUS_REJECTED));
    assert_eq!(h.wire, expect);
    assert_eq!(&h.mem.bytes[100..108], &[0u8; 8], "nothing after the rejection runs");
    assert!(!h.s.is_closing(), "it drains before it closes");
    assert_eq!(h.s.next_deadline(), Some(h.now + Duration::from_secs(1)));
    h.feed(&[0u8; 5000]);
    assert!(!h.s.is_closing());
    h.eof();
    assert!(h.s.is_closing());
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0);
}

#[test]
fn the_drain_is_bounded_in_bytes_and_time() {
    let limits = Limits { linger: LingerLimits { bytes_max: 10_000, ..LingerLimits::default() }, ..Limits::default() };
    let mut h = Harness::new(limits);
    h.feed(&header(Opcode::Read, 0x10, 8, true));
    assert!(h.s.poll_half_close() || h.s.next_deadline().is_some());
    h.feed(&vec![0u8; 20_000]);
    assert!(h.s.is_closing() && h.s.why().unwrap().contains("drained enough"));
    let mut h = Harness::new(Limits::default());
    h.feed(&header(Opcode::Write, 0x10, 8, true));
    h.s.on_timer(h.now + Duration::from_millis(500));
    assert!(!h.s.is_closing());
    h.s.on_timer(h.now + Duration::from_secs(1));
    assert!(h.s.is_closing() && h.s.why().unwrap().contains("timed out"));
}

#[test]
fn bad_headers_are_rejected_with_the_version_they_asked_for() {
    for (op_byte, v2) in [(0x87u8, true), (0x07, false)] {
        let mut h = Harness::new(Limits::default());
        let mut bad = header(Opcode::Read, h.addr(0), 8, true);
        bad[16] = op_byte;
        h.feed(&bad);
        if v2 {
            assert_eq!(h.wire, encode_status(STATUS_REJECTED).to_vec());
        } else {
            assert!(h.wire.is_empty() && h.s.is_closing(), "v1: no status, the session ends");
        }
    }
    let mut h = Harness::new(Limits::default());
    h.feed(&header(Opcode::Write, h.addr(0), 0, true));
    assert_eq!(h.wire, encode_status(STATUS_REJECTED).to_vec(), "zero-length");
    let mut h = Harness::new(Limits::default());
    h.feed(&header(Opcode::Write, u64::MAX - 4, 8, true));
    assert_eq!(h.wire, encode_status(STATUS_REJECTED).to_vec(), "wrapping range");
}

#[test]
fn v1_clients_get_bytes_without_statuses() {
    let mut h = Harness::new(Limits::default());
    h.mem.bytes[..4].copy_from_slice(b"abcd");
    let mut client = header(Opcode::Write, h.addr(100), 3, false);
    client.extend(b"xyz");
    client.extend(header(Opcode::Read, h.addr(0), 4, false));
    h.feed(&client);
    assert_eq!(h.wire, b"abcd");
    assert_eq!(&h.mem.bytes[100..103], b"xyz");
}

#[test]
fn replies_back_up_intake_pauses_and_resumes() {
    let limits = Limits { replies_queued_max: 4, ..Limits::default() };
    let mut h = Harness::new(limits);
    h.sending = false;
    let mut client = Vec::new();
    for i in 0..10u64 {
        client.extend(header(Opcode::Read, h.addr(i as usize), 1, true));
    }
    h.feed(&client);
    assert_eq!(h.s.replies_pending(), 4, "intake stops at the bound");
    assert!(h.s.poll_recv().is_none(), "and so do receives");
    h.sending = true;
    h.run();
    assert_eq!(h.wire.len(), 10 * 9, "all ten answered once replies drain");
}

#[test]
fn requests_staged_before_the_client_closes_are_still_answered() {
    let limits = Limits { replies_queued_max: 2, ..Limits::default() };
    let mut h = Harness::new(limits);
    h.sending = false;
    let mut client = Vec::new();
    for i in 0..6u64 {
        client.extend(header(Opcode::Read, h.addr(i as usize), 1, true));
    }
    h.feed(&client);
    h.eof();
    assert!(!h.s.is_closing(), "four requests still wait in staging");
    h.sending = true;
    h.run();
    assert_eq!(h.wire.len(), 6 * 9);
    assert!(h.s.is_closing(), "then the session ends");
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0);
}

#[test]
fn closing_with_operations_out_keeps_pins_until_finish() {
    let mut h = Harness::new(Limits::default());
    h.sending = false;
    h.feed(&header(Opcode::Read, h.addr(0), 64, true));
    h.feed(&header(Opcode::Write, h.addr(0), 1 << 20, true));
    assert_eq!(h.mem.pins.get(), 2, "a READ reply and a WRITE payload");
    h.s.on_error("receive failed");
    assert!(h.s.is_closing());
    assert_eq!(h.mem.pins.get(), 2, "the kernel may still use them");
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0);
}

mod authentication {
    use super::*;
    use crate::proto::auth::{AuthKey, CHALLENGE_BYTES, NONCE_BYTES, Port, Prover, VERDICT_BYTES, Verifier};

    const KEY: &[u8] = b"a shared key for the tests";

    fn keyed(h: &mut Harness) -> std::time::Instant {
        let deadline = h.now + Duration::from_secs(5);
        let v = Verifier::new(AuthKey::new(KEY).unwrap(), Port::Data, [8; NONCE_BYTES]);
        h.s = ServerSession::new(Limits::default()).authenticating(v, deadline);
        deadline
    }

    /// The proof of `key` for the challenge at the start of `wire`.
    fn proof(key: &[u8], wire: &[u8]) -> Vec<u8> {
        let mut p = Prover::new(AuthKey::new(key).unwrap(), Port::Data, [9; NONCE_BYTES]);
        p.answer(wire[..CHALLENGE_BYTES].try_into().unwrap()).unwrap().to_vec()
    }

    #[test]
    fn the_challenge_goes_first_and_requests_follow_a_good_proof_at_every_split() {
        for step in [1, 2, 7, 23, 24, 63, 64, 65, 100, 4096] {
            let mut h = Harness::new(Limits::default());
            h.mem.bytes[1 << 20..(1 << 20) + 50].fill(0x5a);
            // Addresses are this harness's own memory.
            let (client, replies) = pipeline(&h);
            keyed(&mut h);
            h.run();
            assert_eq!(h.wire.len(), CHALLENGE_BYTES, "the challenge, before any byte from the client");
            // The proof with the pipeline right behind it, split anywhere.
            let mut bytes = proof(KEY, &h.wire);
            bytes.extend(&client);
            for piece in bytes.chunks(step) {
                h.feed(piece);
            }
            assert_eq!(&h.wire[CHALLENGE_BYTES..CHALLENGE_BYTES + 8], b"SWAUTHOK", "step {step}");
            assert_eq!(&h.wire[CHALLENGE_BYTES + VERDICT_BYTES..], &replies[..], "step {step}");
            check_memory(&h);
        }
    }

    #[test]
    fn a_wrong_proof_is_refused_and_nothing_behind_it_runs() {
        let mut h = Harness::new(Limits::default());
        keyed(&mut h);
        h.run();
        let mut bytes = proof(b"not the key, but long enough", &h.wire);
        bytes.extend(header(Opcode::Write, h.addr(0), 4, true));
        bytes.extend(b"evil");
        h.feed(&bytes);
        assert_eq!(&h.wire[CHALLENGE_BYTES..CHALLENGE_BYTES + 8], b"SWAUTHNO");
        assert_eq!(h.wire.len(), CHALLENGE_BYTES + VERDICT_BYTES, "no status, no reply");
        assert_eq!(&h.mem.bytes[..4], &[0u8; 4], "the write behind a bad proof landed");
        assert_eq!(h.mem.pins.get(), 0);
        // The drain after a refusal, as after a rejected request.
        h.eof();
        assert!(h.s.is_closing(), "{:?}", h.s.why());
    }

    #[test]
    fn a_mooncake_client_gets_the_challenge_and_a_refusal_but_no_data() {
        let mut h = Harness::new(Limits::default());
        h.mem.bytes[..64].fill(0x77);
        keyed(&mut h);
        // Three READ headers (72 bytes): the first 64 read as a proof.
        let mut bytes = Vec::new();
        for _ in 0..3 {
            bytes.extend(header(Opcode::Read, h.addr(0), 64, true));
        }
        h.feed(&bytes);
        assert!(!h.wire.windows(64).any(|w| w == [0x77u8; 64]), "memory reached an unproved client");
        assert_eq!(&h.wire[CHALLENGE_BYTES..CHALLENGE_BYTES + 8], b"SWAUTHNO");
    }

    #[test]
    fn a_silent_client_is_closed_at_the_deadline() {
        let mut h = Harness::new(Limits::default());
        let deadline = keyed(&mut h);
        h.run();
        assert_eq!(h.s.next_deadline(), Some(deadline));
        h.s.on_timer(deadline - Duration::from_millis(1));
        assert!(!h.s.is_closing());
        h.s.on_timer(deadline);
        assert!(h.s.is_closing());
        assert!(h.s.why().unwrap().contains("no authentication proof"));
    }
}

fn crc_header(op: Opcode, addr: u64, size: u64) -> Vec<u8> {
    RequestHeader { size, addr, opcode: op, v2: true, crc32c: true, instance: None }.encode().to_vec()
}

/// The pipeline with CRC-32C framing: WRITEs carry trailers, READ replies
/// end with one. `corrupt`: the index of a WRITE payload byte to flip on
/// the way (its trailer stays the sender's).
fn crc_pipeline(h: &Harness, corrupt: Option<usize>) -> (Vec<u8>, Vec<u8>) {
    let mut client = Vec::new();
    let mut replies = Vec::new();
    let write = |client: &mut Vec<u8>, replies: &mut Vec<u8>, at: usize, payload: Vec<u8>, flip: Option<usize>| {
        client.extend(crc_header(Opcode::Write, h.addr(at), payload.len() as u64));
        let crc = tcp::crc32c(&payload);
        let mut sent = payload;
        let status = match flip {
            Some(i) if i < sent.len() => {
                sent[i] ^= 0x04;
                tcp::STATUS_PAYLOAD_CHECKSUM
            }
            _ => STATUS_OK,
        };
        client.extend(sent);
        client.extend(crc.to_le_bytes());
        replies.extend(encode_status(status));
    };
    write(&mut client, &mut replies, 0, vec![0xa1; 100], corrupt);
    client.extend(crc_header(Opcode::Read, h.addr(1 << 20), 50));
    replies.extend(ok());
    replies.extend([0x5au8; 50]);
    replies.extend(tcp::crc32c(&[0x5a; 50]).to_le_bytes());
    write(&mut client, &mut replies, 4096, (0..4096).map(|i| i as u8).collect(), None);
    // A large write, received in place, then its trailer through staging.
    write(&mut client, &mut replies, 2 << 20, (0..300_000).map(|i| (i % 251) as u8).collect(), None);
    client.extend(crc_header(Opcode::Read, h.addr(4096), 10));
    replies.extend(ok());
    replies.extend(0..10u8);
    replies.extend(tcp::crc32c(&(0..10u8).collect::<Vec<_>>()).to_le_bytes());
    (client, replies)
}

#[test]
fn crc32c_requests_split_at_every_byte_boundary_are_checked() {
    for corrupt in [None, Some(0), Some(99)] {
        let small_end = 24 + 100 + 4 + 24 + 24 + 4096 + 4 + 24 + 64;
        let len = crc_pipeline(&Harness::new(Limits::default()), corrupt).0.len();
        let cuts = (0..=small_end).chain((small_end..len).step_by(7919)).chain([len - 4, len - 1, len]);
        for cut in cuts {
            let mut h = Harness::new(Limits::default());
            h.mem.bytes[1 << 20..(1 << 20) + 50].fill(0x5a);
            h.send_step = 1 + cut % 13;
            let (client, replies) = crc_pipeline(&h, corrupt);
            h.feed(&client[..cut]);
            h.feed(&client[cut..]);
            assert_eq!(h.wire, replies, "cut at {cut}, corrupt {corrupt:?}");
            assert!(!h.s.is_closing(), "a corrupted payload leaves the framing intact: the session goes on");
            assert!(h.mem.bytes[4096..8192].iter().enumerate().all(|(i, &b)| b == i as u8));
            let served = h.s.take_served();
            assert_eq!((served.writes, served.corrupt), (3, u64::from(corrupt.is_some())));
        }
    }
}

#[test]
fn a_corrupted_crc32c_header_is_refused_and_ends_the_session() {
    let mut h = Harness::new(Limits::default());
    let mut client = crc_header(Opcode::Write, h.addr(0), 8);
    client.extend([1u8; 8]);
    client.extend(tcp::crc32c(&[1u8; 8]).to_le_bytes());
    let mut bad = crc_header(Opcode::Write, h.addr(64), 8);
    bad[9] ^= 0x01; // the address: without the check it would land elsewhere
    client.extend(&bad);
    client.extend([2u8; 8]);
    client.extend(tcp::crc32c(&[2u8; 8]).to_le_bytes());
    h.feed(&client);
    let mut want = ok();
    want.extend(encode_status(tcp::STATUS_HEADER_CHECKSUM));
    assert_eq!(h.wire, want);
    assert!(h.mem.bytes[64..72].iter().all(|&b| b == 0), "nothing of the refused request landed");
    assert!(h.mem.bytes[64 + 256..72 + 256].iter().all(|&b| b == 0));
    assert_eq!(h.s.take_served().corrupt, 1);
    h.eof();
    assert!(h.s.is_closing());
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0);
}

fn tagged(op: Opcode, addr: u64, size: u64, tag: u32) -> Vec<u8> {
    RequestHeader { size, addr, opcode: op, v2: true, crc32c: false, instance: Some(tag) }.encode().to_vec()
}

/// Requests tagged for this process run; one tagged for another (the one
/// this replaced) is refused with status 4 even where its range is
/// registered here, nothing after it runs, and the session drains as
/// after any rejection; an untagged one (a Mooncake client) runs.
#[test]
fn a_request_for_another_instance_is_refused_before_its_range_is_looked_at() {
    let mut h = Harness::new(Limits::default());
    h.s = ServerSession::new(Limits::default()).with_instance(0x12_3456);
    let mut client = tagged(Opcode::Write, h.addr(0), 8, 0x12_3456);
    client.extend([1u8; 8]);
    client.extend(header(Opcode::Write, h.addr(8), 8, true));
    client.extend([3u8; 8]);
    client.extend(tagged(Opcode::Write, h.addr(100), 8, 0x65_4321));
    client.extend([2u8; 8]);
    client.extend(tagged(Opcode::Write, h.addr(200), 8, 0x12_3456));
    client.extend([4u8; 8]);
    h.feed(&client);
    let mut expect = ok();
    expect.extend(ok());
    expect.extend(encode_status(crate::proto::mooncake::tcp::STATUS_STALE_INSTANCE));
    assert_eq!(h.wire, expect);
    assert_eq!(&h.mem.bytes[..16], &[[1u8; 8], [3u8; 8]].concat()[..]);
    assert_eq!(&h.mem.bytes[100..108], &[0u8; 8], "the stale request did not land");
    assert_eq!(&h.mem.bytes[200..208], &[0u8; 8], "nothing after the refusal runs");
    let served = h.s.take_served();
    assert_eq!((served.writes, served.rejected, served.stale), (2, 1, 1));
    assert!(!h.s.is_closing(), "it drains before it closes");
    h.eof();
    assert!(h.s.is_closing());
    h.s.finish();
    assert_eq!(h.mem.pins.get(), 0);
    // A session that knows no tag of its own serves tagged requests.
    let mut h = Harness::new(Limits::default());
    h.feed(&[tagged(Opcode::Write, h.addr(0), 2, 9), vec![5u8; 2]].concat());
    assert_eq!(h.wire, ok());
}
