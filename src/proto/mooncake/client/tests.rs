//! The client core driven by scripted peers: no sockets, real memory.

use std::time::{Duration, Instant};

use super::*;
use crate::proto::mooncake::harness::client::Harness;
use crate::proto::mooncake::tcp::{STATUS_OK, STATUS_REJECTED, encode_status};

fn ok() -> [u8; 8] {
    encode_status(STATUS_OK)
}

/// Fills the local buffer with a pattern and queues two writes and two
/// reads, alternating.
fn push_four(h: &mut Harness) {
    for i in 0..4096 {
        h.local[i] = i as u8;
    }
    h.push(Opcode::Write, 0, 100, 0x1000);
    h.push(Opcode::Read, 1000, 7, 0x2000);
    h.push(Opcode::Write, 200, 1, 0x3000);
    h.push(Opcode::Read, 2000, 300, 0x4000);
}

/// Three writes and two reads, pipelined: their headers, and the answer a
/// v2 server gives.
fn pipeline(h: &mut Harness) -> Vec<u8> {
    push_four(h);
    h.push(Opcode::Write, 3000, 33, 0x5000);
    let mut answer = Vec::new();
    answer.extend(ok());
    answer.extend(ok());
    answer.extend([7u8; 7]);
    answer.extend(ok());
    answer.extend(ok());
    answer.extend((0..300).map(|i| (i * 3) as u8));
    answer.extend(ok());
    answer
}

#[test]
fn pipelined_requests_go_out_in_one_group_with_their_payloads() {
    let mut h = Harness::new(true, Limits::default());
    let _ = pipeline(&mut h);
    h.send_all(usize::MAX);
    let mut expect = Vec::new();
    for (op, local, len, remote) in
        [(Opcode::Write, 0, 100, 0x1000), (Opcode::Read, 1000, 7, 0x2000), (Opcode::Write, 200, 1, 0x3000)]
    {
        expect.extend(
            RequestHeader { size: len as u64, addr: remote, opcode: op, v2: true, crc32c: false, instance: None }
                .encode(),
        );
        if op == Opcode::Write {
            expect.extend(&h.local[local..local + len]);
        }
    }
    assert_eq!(&h.wire[..expect.len()], &expect[..]);
    assert!(h.settled.is_empty(), "nothing settles before its answer");
}

#[test]
fn answers_split_at_every_byte_boundary_settle_the_same() {
    let mut whole = Harness::new(true, Limits::default());
    let answer = pipeline(&mut whole);
    whole.send_all(usize::MAX);
    assert_eq!(whole.feed(&answer), answer.len());
    whole.assert_each_settled_once();
    assert!(whole.settled.iter().all(|(_, s)| *s == Settle::Done));
    for cut in 0..=answer.len() {
        for step in [1, 3, usize::MAX] {
            let mut h = Harness::new(true, Limits::default());
            let _ = pipeline(&mut h);
            h.send_all(step);
            let mut fed = h.feed(&answer[..cut]);
            // What was answered in full is settled, in order, and no more.
            let done = h.settled.len();
            assert!(h.settled.iter().enumerate().all(|(i, (id, s))| *id == i && *s == Settle::Done));
            for piece in answer[cut..].chunks(step) {
                fed += h.feed(piece);
            }
            assert_eq!(fed, answer.len());
            assert!(h.settled.len() >= done);
            assert_eq!(h.settled, whole.settled, "cut at {cut}, step {step}");
            assert_eq!(&h.local[1000..1007], &[7u8; 7]);
            assert!(h.local[2000..2300].iter().enumerate().all(|(i, &b)| b == (i * 3) as u8));
        }
    }
}

#[test]
fn a_rejection_mid_pipeline_fails_it_and_resends_what_follows() {
    let mut h = Harness::new(true, Limits::default());
    let answer = pipeline(&mut h);
    h.send_all(usize::MAX);
    // Requests 0 and 1 answered; 2 rejected; the server then closes.
    let mut script = answer[..8 + 8 + 7].to_vec();
    script.extend(encode_status(STATUS_REJECTED));
    h.feed(&script);
    assert!(h.conn.is_closing(), "a rejection ends the connection");
    assert!(
        matches!(h.how(2), Settle::Rejected { status: 1, message } if message.contains("Write of 1 bytes at 0x3000"))
    );
    assert!(h.settled.len() == 3, "the rest waits for finish: {:?}", h.settled);
    h.finish();
    h.assert_each_settled_once();
    assert_eq!((h.how(0), h.how(1)), (&Settle::Done, &Settle::Done));
    assert_eq!((h.how(3), h.how(4)), (&Settle::Retry, &Settle::Retry));
}

#[test]
fn the_peer_closing_at_every_point_settles_each_request_once() {
    let mut reference = Harness::new(true, Limits::default());
    let answer = pipeline(&mut reference);
    for cut in 0..=answer.len() {
        for retries in [0u8, 1] {
            let mut h = Harness::new(true, Limits::default());
            let _ = pipeline(&mut h);
            if retries == 0 {
                // Re-push with no retries left: a second failure is final.
                let mut conn = ClientConn::new("peer", true, Limits::default(), h.now + Duration::from_secs(5));
                conn.on_connected();
                let old = std::mem::replace(&mut h.conn, conn);
                let mut queue: Vec<_> = old.queue.into_iter().collect();
                for r in &mut queue {
                    r.retries = 0;
                }
                for r in queue {
                    assert!(h.conn.push(r).is_ok());
                }
            }
            h.send_all(usize::MAX);
            h.feed(&answer[..cut]);
            h.conn.on_eof();
            h.finish();
            h.assert_each_settled_once();
            // Every request was sent: none that was not answered is sent
            // again, retries left or not (the peer may have run it).
            for (id, how) in &h.settled {
                match how {
                    Settle::Done => {}
                    Settle::Failed(why) => {
                        assert!(why.contains("closed the connection"), "{why}");
                        assert!(why.contains("not sent again"), "request {id}: {why}");
                    }
                    other => panic!("request {id}: {other:?} after a close at byte {cut}"),
                }
            }
            if cut == answer.len() {
                assert!(h.settled.iter().all(|(_, s)| *s == Settle::Done));
            }
        }
    }
}

#[test]
fn a_close_with_a_receive_out_settles_nothing_until_finish() {
    let mut h = Harness::new(true, Limits::default());
    h.push(Opcode::Read, 0, 64, 0x1000);
    h.send_all(usize::MAX);
    assert!(h.conn.poll_recv().is_some(), "a receive is out, into local memory");
    h.conn.close("engine shutting down");
    h.collect();
    assert!(h.settled.is_empty(), "the kernel may still write the READ's destination");
    h.finish();
    assert!(matches!(h.how(0), Settle::Failed(w) if w == "engine shutting down"), "a close by the engine is final");
}

#[test]
fn garbage_where_a_status_belongs_ends_the_connection() {
    let mut h = Harness::new(true, Limits::default());
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.send_all(usize::MAX);
    h.feed(b"HTTP/1.1");
    assert!(h.conn.is_closing());
    assert!(h.conn.ending().unwrap().contains("where a status frame belongs"));
    h.finish();
    h.assert_each_settled_once();
    assert!(
        h.settled.iter().all(|(_, s)| matches!(s, Settle::Failed(w) if w.contains("not sent again"))),
        "both were sent: the peer may have run them ({:?})",
        h.settled
    );
}

/// A connection that breaks: what was sent fails (the peer may have run
/// it, or may yet, after a copy sent again has been answered and a newer
/// WRITE has landed on the same bytes); what was still queued goes again.
#[test]
fn only_what_was_never_sent_goes_again_after_a_break() {
    let mut h = Harness::new(true, Limits { awaiting_max: 3, ..Limits::default() });
    for i in 0..4u64 {
        h.push(Opcode::Write, 0, 16, 0x1000 + i * 16);
    }
    // Three go (the most awaiting at once); the fourth waits.
    h.send_all(usize::MAX);
    h.feed(&ok());
    h.conn.on_error("receive: Connection reset by peer");
    h.finish();
    h.assert_each_settled_once();
    assert_eq!(h.how(0), &Settle::Done);
    assert!(
        matches!(h.how(1), Settle::Failed(w) if w.contains("reset") && w.contains("not sent again")),
        "{:?}",
        h.how(1)
    );
    assert!(matches!(h.how(2), Settle::Failed(w) if w.contains("not sent again")), "{:?}", h.how(2));
    assert_eq!(h.how(3), &Settle::Retry, "never sent: it goes again");
}

#[test]
fn queued_requests_time_out_alone_sent_ones_end_the_connection() {
    let mut h = Harness::new(true, Limits { awaiting_max: 1, ..Limits::default() });
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.push(Opcode::Write, 0, 10, 0x1000);
    // The second is queued behind the first (depth 1), with a short deadline.
    h.conn.queue[1].deadline = h.now + Duration::from_secs(1);
    h.conn.earliest = Some(h.now + Duration::from_secs(1));
    h.send_all(usize::MAX);
    assert_eq!(h.conn.next_deadline(), Some(h.now + Duration::from_secs(1)));
    h.conn.on_timer(h.now + Duration::from_secs(2));
    h.collect();
    assert!(matches!(h.how(1), Settle::TimedOut(_)));
    assert!(!h.conn.is_closing(), "a queued request's timeout does not touch the connection");
    assert_eq!(h.conn.next_deadline(), Some(h.now + Duration::from_secs(30)));
    // The sent one goes silent past its deadline.
    h.conn.on_timer(h.now + Duration::from_secs(31));
    assert!(h.conn.is_closing());
    h.now += Duration::from_secs(31);
    h.finish();
    h.assert_each_settled_once();
    assert!(matches!(h.how(0), Settle::TimedOut(_)));
}

#[test]
fn a_stale_earliest_deadline_is_recomputed() {
    let mut h = Harness::new(true, Limits::default());
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.conn.queue[0].deadline = h.now + Duration::from_secs(1);
    h.conn.earliest = Some(h.now + Duration::from_secs(1));
    h.send_all(usize::MAX);
    h.feed(&ok());
    assert_eq!(h.how(0), &Settle::Done);
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.conn.on_timer(h.now + Duration::from_secs(2));
    assert!(!h.conn.is_closing(), "nothing was late");
    assert_eq!(h.conn.next_deadline(), Some(h.now + Duration::from_secs(30)));
}

/// A request for a connection driven without a harness: a 1-byte WRITE
/// due 30 s after `now`, with one retry, whose ticket is `ticket`.
fn lone_req(now: Instant, ticket: u32) -> Req<u32> {
    Req {
        op: Opcode::Write,
        local: 0x1000,
        remote: 0x1000,
        len: 1,
        deadline: now + Duration::from_secs(30),
        retries: 1,
        ticket,
    }
}

#[test]
fn connect_failures_and_timeouts_are_final() {
    let now = Instant::now();
    let mut c: ClientConn<u32> = ClientConn::new("10.0.0.1:1", true, Limits::default(), now + Duration::from_secs(5));
    let req = |t| lone_req(now, t);
    assert!(c.push(req(1)).is_ok());
    assert!(c.poll_send().is_none(), "nothing goes before the connect");
    assert_eq!(c.next_deadline(), Some(now + Duration::from_secs(5)));
    c.on_timer(now + Duration::from_secs(6));
    assert!(c.is_closing());
    assert!(c.push(req(2)).is_err(), "a closing connection hands requests back");
    c.finish(now + Duration::from_secs(6));
    let (r, how) = c.poll_settled().unwrap();
    assert_eq!(r.ticket, 1);
    assert!(matches!(how, Settle::Failed(w) if w.contains("connect to 10.0.0.1:1 timed out")));
    let mut c: ClientConn<u32> = ClientConn::new("p", true, Limits::default(), now + Duration::from_secs(5));
    assert!(c.push(req(3)).is_ok());
    c.on_connect_failed("Connection refused");
    c.finish(now);
    assert!(matches!(c.poll_settled().unwrap().1, Settle::Failed(w) if w.contains("refused")));
}

#[test]
fn v1_writes_complete_when_sent_and_go_one_at_a_time() {
    let mut h = Harness::new(false, Limits::default());
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.push(Opcode::Read, 100, 4, 0x2000);
    h.send_all(usize::MAX);
    assert_eq!(h.how(0), &Settle::Done, "v1: no status, done once sent");
    assert_eq!(h.wire.len(), 2 * tcp::HEADER_BYTES + 10, "then the read goes, alone");
    assert_eq!(h.wire[16], 1, "no v2 bit in the opcode");
    h.feed(b"abcd");
    assert_eq!(h.how(1), &Settle::Done);
    assert_eq!(&h.local[100..104], b"abcd");
    h.assert_each_settled_once();
}

#[test]
fn the_inflight_cap_holds_back_sends_but_one_always_goes() {
    let limits = Limits { inflight_bytes_max: 8192, ..Limits::default() };
    let mut h = Harness::new(true, limits);
    for i in 0..4 {
        h.push(Opcode::Write, i * 4096, 4096, 0x1000);
    }
    let first = h.conn.poll_send().map(|g| g.total()).unwrap();
    assert_eq!(first, 2 * (24 + 4096), "two requests fit under the cap");
    h.conn.on_sent(first);
    assert!(h.conn.poll_send().is_none(), "the cap is full until answers come");
    h.feed(&ok());
    assert_eq!(h.conn.poll_send().map(|g| g.total()), Some(24 + 4096));
    let mut big = Harness::new(true, Limits { inflight_bytes_max: 10, ..Limits::default() });
    big.push(Opcode::Write, 0, 60_000, 0x1000);
    assert!(big.conn.poll_send().is_some(), "one request goes, however large");
}

#[test]
fn queue_bound_and_cancel() {
    let mut h = Harness::new(true, Limits { queued_max: 2, ..Limits::default() });
    h.push(Opcode::Write, 0, 1, 1);
    h.push(Opcode::Write, 0, 1, 2);
    let extra = Req { op: Opcode::Read, local: 0, remote: 3, len: 1, deadline: h.now, retries: 0, ticket: 99 };
    assert!(h.conn.push(extra).is_err(), "a full queue hands the request back");
    assert_eq!(h.conn.cancel(|r| r.remote == 2), 1);
    h.collect();
    assert_eq!(h.how(1), &Settle::Canceled);
}

mod authentication {
    use super::*;
    use crate::proto::auth::{AuthKey, NONCE_BYTES, PROOF_BYTES, Port, Prover, Verifier};

    const KEY: &[u8] = b"a shared key for the tests";

    fn prover(key: &[u8]) -> Prover {
        Prover::new(AuthKey::new(key).unwrap(), Port::Data, [3; NONCE_BYTES])
    }

    fn verifier() -> Verifier {
        Verifier::new(AuthKey::new(KEY).unwrap(), Port::Data, [4; NONCE_BYTES])
    }

    /// Feeds `bytes` `step` at a time, sending whatever the core offers
    /// between pieces.
    fn feed_in_steps(h: &mut Harness, bytes: &[u8], step: usize) {
        for piece in bytes.chunks(step) {
            assert_eq!(h.feed(piece), piece.len());
            h.send_all(usize::MAX);
        }
    }

    #[test]
    fn no_request_goes_before_both_sides_have_proved_the_key_at_every_split() {
        for step in 1..=40 {
            let v = verifier();
            let mut h = Harness::with_auth(true, false, Limits::default(), prover(KEY));
            h.local[..4].copy_from_slice(b"data");
            h.push(Opcode::Write, 0, 4, 0x1000);
            h.send_all(usize::MAX);
            assert!(h.wire.is_empty(), "step {step}: sent before the challenge");
            feed_in_steps(&mut h, &v.challenge(), step);
            assert_eq!(h.wire.len(), PROOF_BYTES, "step {step}: the proof, and only it");
            let verdict = v.check(h.wire[..].try_into().unwrap()).expect("the same key");
            h.wire.clear();
            feed_in_steps(&mut h, &verdict, step);
            // Now the request goes, and its answer settles it.
            let mut expect =
                RequestHeader { size: 4, addr: 0x1000, opcode: Opcode::Write, v2: true, crc32c: false, instance: None }
                    .encode()
                    .to_vec();
            expect.extend(b"data");
            assert_eq!(h.wire, expect, "step {step}");
            assert_eq!(h.feed(&ok()), 8);
            h.assert_each_settled_once();
            assert_eq!(*h.how(0), Settle::Done);
        }
    }

    #[test]
    fn a_refusal_fails_the_requests_without_a_resend() {
        let v = verifier();
        let mut h = Harness::with_auth(true, false, Limits::default(), prover(b"another key of enough bytes"));
        h.push(Opcode::Read, 0, 4, 0x1000);
        assert_eq!(h.feed(&v.challenge()), 40);
        h.send_all(usize::MAX);
        let (_, refusal) = v.check(h.wire[..].try_into().unwrap()).expect_err("another key");
        h.feed(&refusal);
        assert!(h.conn.is_closing());
        h.finish();
        let Settle::Failed(why) = h.how(0) else { panic!("{:?}", h.how(0)) };
        assert!(why.contains("refused this process's authentication key"), "{why}");
    }

    #[test]
    fn a_server_without_the_key_is_not_trusted() {
        // Something that opens like a challenge but cannot prove the key.
        let v = Verifier::new(AuthKey::new(b"the server's other key....").unwrap(), Port::Data, [4; NONCE_BYTES]);
        let mut h = Harness::with_auth(true, false, Limits::default(), prover(KEY));
        h.push(Opcode::Write, 0, 4, 0x1000);
        h.feed(&v.challenge());
        h.send_all(usize::MAX);
        // A forged acceptance: the right word, a MAC of the wrong key.
        let mut forged = [0u8; 40];
        forged[..8].copy_from_slice(b"SWAUTHOK");
        h.wire.clear();
        h.feed(&forged);
        h.send_all(usize::MAX);
        assert!(h.wire.is_empty(), "a request went to an unproved server");
        h.finish();
        let Settle::Failed(why) = h.how(0) else { panic!("{:?}", h.how(0)) };
        assert!(why.contains("could not prove"), "{why}");
    }

    #[test]
    fn silence_or_a_close_in_place_of_the_challenge_is_named() {
        let mut h = Harness::with_auth(true, false, Limits::default(), prover(KEY));
        h.push(Opcode::Write, 0, 4, 0x1000);
        assert!(h.conn.next_deadline().is_some_and(|d| d <= h.now + Duration::from_secs(5)));
        h.conn.on_timer(h.now + Duration::from_secs(6));
        h.finish();
        let Settle::Failed(why) = h.how(0) else { panic!("{:?}", h.how(0)) };
        assert!(why.contains("timed out") && why.contains("no SHARDWIRE_AUTH_KEY"), "{why}");

        let mut h = Harness::with_auth(true, false, Limits::default(), prover(KEY));
        h.push(Opcode::Write, 0, 4, 0x1000);
        h.conn.on_eof();
        h.finish();
        let Settle::Failed(why) = h.how(0) else { panic!("{:?}", h.how(0)) };
        assert!(why.contains("did not open with an authentication challenge"), "{why}");

        // A Mooncake status frame where the challenge belongs.
        let mut h = Harness::with_auth(true, false, Limits::default(), prover(KEY));
        h.push(Opcode::Write, 0, 4, 0x1000);
        let mut not_a_challenge = ok().to_vec();
        not_a_challenge.resize(40, 0);
        h.feed(&not_a_challenge);
        h.finish();
        assert!(matches!(h.how(0), Settle::Failed(why) if why.contains("did not open")), "{:?}", h.how(0));
    }

    #[test]
    fn a_client_without_a_key_names_the_challenge_it_meets() {
        let mut h = Harness::new(true, Limits::default());
        h.push(Opcode::Read, 0, 4, 0x1000);
        h.send_all(usize::MAX);
        h.feed(&verifier().challenge()[..8]);
        assert!(h.conn.is_closing());
        h.finish();
        let Settle::Failed(why) = h.how(0) else { panic!("{:?}", h.how(0)) };
        assert!(why.contains("requires authentication") && why.contains("SHARDWIRE_AUTH_KEY"), "{why}");
    }
}

/// The pipeline with CRC-32C framing, and the answer a shardwire server
/// gives: statuses, READ bytes and their CRC-32Cs.
fn crc_pipeline(h: &mut Harness) -> Vec<u8> {
    push_four(h);
    let read: Vec<u8> = (0..300).map(|i| (i * 3) as u8).collect();
    let mut answer = Vec::new();
    answer.extend(ok());
    answer.extend(ok());
    answer.extend([7u8; 7]);
    answer.extend(crate::proto::mooncake::tcp::crc32c(&[7u8; 7]).to_le_bytes());
    answer.extend(ok());
    answer.extend(ok());
    answer.extend(&read);
    answer.extend(crate::proto::mooncake::tcp::crc32c(&read).to_le_bytes());
    answer
}

#[test]
fn crc32c_requests_carry_checks_and_answers_split_anywhere_settle_the_same() {
    use crate::proto::mooncake::tcp::crc32c;
    let mut h = Harness::with_crc32c(true, true, Limits::default());
    let answer = crc_pipeline(&mut h);
    h.send_all(usize::MAX);
    // WRITE: flagged header, payload, its CRC-32C; READ: a flagged header.
    let mut expect = Vec::new();
    for (op, local, len, remote) in [
        (Opcode::Write, 0, 100, 0x1000),
        (Opcode::Read, 1000, 7, 0x2000),
        (Opcode::Write, 200, 1, 0x3000),
        (Opcode::Read, 2000, 300, 0x4000),
    ] {
        expect.extend(
            RequestHeader { size: len as u64, addr: remote, opcode: op, v2: true, crc32c: true, instance: None }
                .encode(),
        );
        if op == Opcode::Write {
            expect.extend(&h.local[local..local + len]);
            expect.extend(crc32c(&h.local[local..local + len]).to_le_bytes());
        }
    }
    assert_eq!(h.wire, expect);
    for cut in 0..=answer.len() {
        for step in [1, 5, usize::MAX] {
            let mut h = Harness::with_crc32c(true, true, Limits::default());
            let _ = crc_pipeline(&mut h);
            h.send_all(step);
            let mut fed = h.feed(&answer[..cut]);
            for piece in answer[cut..].chunks(step) {
                fed += h.feed(piece);
            }
            assert_eq!(fed, answer.len(), "cut {cut} step {step}");
            h.assert_each_settled_once();
            assert!(h.settled.iter().all(|(_, s)| *s == Settle::Done), "cut {cut}: {:?}", h.settled);
            assert!(h.local[2000..2300].iter().enumerate().all(|(i, &b)| b == (i * 3) as u8));
            assert!(!h.conn.is_closing());
        }
    }
}

#[test]
fn a_corrupted_byte_anywhere_in_a_read_fails_that_read_alone() {
    let mut reference = Harness::with_crc32c(true, true, Limits::default());
    let answer = crc_pipeline(&mut reference);
    // The second READ's bytes and its trailer: a flipped byte in either is
    // caught, and only that request fails.
    let start = answer.len() - 300 - 4;
    for at in start..answer.len() {
        let mut h = Harness::with_crc32c(true, true, Limits::default());
        let _ = crc_pipeline(&mut h);
        h.send_all(usize::MAX);
        let mut bad = answer.clone();
        bad[at] ^= 0x80;
        assert_eq!(h.feed(&bad), bad.len());
        h.assert_each_settled_once();
        for id in 0..3 {
            assert_eq!(h.how(id), &Settle::Done, "byte {at}");
        }
        assert!(
            matches!(h.how(3), Settle::Corrupt(why) if why.contains("300 bytes read from 0x4000") && why.contains("CRC-32C")),
            "byte {at}: {:?}",
            h.how(3)
        );
        assert!(!h.conn.is_closing(), "the framing is intact: the connection goes on");
    }
}

#[test]
fn the_servers_checksum_statuses_fail_their_requests() {
    use crate::proto::mooncake::tcp::{STATUS_HEADER_CHECKSUM, STATUS_PAYLOAD_CHECKSUM};
    // A WRITE whose bytes landed corrupted: that request fails, the
    // connection goes on.
    let mut h = Harness::with_crc32c(true, true, Limits::default());
    let answer = crc_pipeline(&mut h);
    h.send_all(usize::MAX);
    let mut bad = answer.clone();
    bad[..8].copy_from_slice(&encode_status(STATUS_PAYLOAD_CHECKSUM));
    assert_eq!(h.feed(&bad), bad.len());
    h.assert_each_settled_once();
    assert!(matches!(h.how(0), Settle::Corrupt(why) if why.contains("WRITE of 100 bytes at 0x1000")), "{:?}", h.how(0));
    assert!((1..4).all(|id| *h.how(id) == Settle::Done));
    assert!(!h.conn.is_closing());
    // A header the server found corrupted: that request fails; the server
    // has ended the session, so those behind it go again elsewhere.
    let mut h = Harness::with_crc32c(true, true, Limits::default());
    let _ = crc_pipeline(&mut h);
    h.send_all(usize::MAX);
    let mut answer = ok().to_vec();
    answer.extend(encode_status(STATUS_HEADER_CHECKSUM));
    h.feed(&answer);
    assert!(h.conn.is_closing());
    h.finish();
    h.assert_each_settled_once();
    assert_eq!(h.how(0), &Settle::Done);
    assert!(matches!(h.how(1), Settle::Corrupt(why) if why.contains("header")), "{:?}", h.how(1));
    assert!((2..4).all(|id| *h.how(id) == Settle::Retry));
    // Without CRC-32C framing, these codes are plain rejections.
    let mut h = Harness::new(true, Limits::default());
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.send_all(usize::MAX);
    h.feed(&encode_status(STATUS_PAYLOAD_CHECKSUM));
    assert!(matches!(h.how(0), Settle::Rejected { status: 3, .. }));
}

#[test]
fn a_hang_up_seen_at_every_point_of_the_answers_loses_none_of_them() {
    let mut reference = Harness::new(true, Limits::default());
    let answer = pipeline(&mut reference);
    for cut in 0..=answer.len() {
        let mut h = Harness::new(true, Limits::default());
        assert!(h.conn.poll_watch(), "a ready, idle connection is watched");
        assert!(!h.conn.poll_watch(), "one watch at a time");
        let _ = pipeline(&mut h);
        h.send_all(usize::MAX);
        h.feed(&answer[..cut]);
        // The peer answered everything and then closed: the close may be
        // seen before, amid or after the answers are read.
        h.conn.on_watch(true);
        if cut < answer.len() {
            assert!(!h.conn.is_closing(), "answers are due at byte {cut}: the receive reads them first");
            assert!(!h.conn.poll_watch(), "no watch while answers are due");
            assert_eq!(h.feed(&answer[cut..]), answer.len() - cut);
            assert!(h.conn.poll_watch(), "idle again, watched again");
            h.conn.on_watch(true);
        }
        assert!(h.conn.is_closing(), "a hang-up on an idle connection ends it (cut {cut})");
        assert!(h.conn.ending().is_some_and(|w| w.contains("closed the idle connection")));
        h.finish();
        h.assert_each_settled_once();
        assert!(h.settled.iter().all(|(_, s)| *s == Settle::Done), "cut {cut}: {:?}", h.settled);
    }
}

#[test]
fn a_hang_up_behind_a_rejection_leaves_the_rejection_its_meaning() {
    let mut h = Harness::new(true, Limits::default());
    assert!(h.conn.poll_watch());
    h.push(Opcode::Write, 0, 10, 0x1000);
    h.push(Opcode::Write, 10, 10, 0x2000);
    h.send_all(usize::MAX);
    // The server refused the first and closed: the close is seen first.
    h.conn.on_watch(true);
    assert!(!h.conn.is_closing());
    h.feed(&encode_status(STATUS_REJECTED));
    assert!(matches!(h.how(0), Settle::Rejected { status, .. } if *status == STATUS_REJECTED));
    h.finish();
    assert_eq!(h.how(1), &Settle::Retry, "not run: may go again");
    h.assert_each_settled_once();
}

#[test]
fn what_was_queued_on_an_idle_connection_that_hung_up_goes_again() {
    let mut h = Harness::new(true, Limits::default());
    assert!(h.conn.poll_watch());
    // Queued in the moment between the hang-up and its report.
    h.push(Opcode::Read, 0, 16, 0x1000);
    h.conn.on_watch(true);
    assert!(h.conn.is_closing());
    assert!(h.conn.poll_send().is_none(), "nothing goes on a connection that is ending");
    h.finish();
    assert_eq!(h.how(0), &Settle::Retry);
    h.assert_each_settled_once();
}

#[test]
fn a_watch_that_ends_without_news_is_not_asked_for_again() {
    let mut h = Harness::new(true, Limits::default());
    assert!(h.conn.poll_watch());
    h.conn.on_watch(false);
    assert!(!h.conn.is_closing());
    assert!(!h.conn.poll_watch(), "a failing watch must not spin");
    h.push(Opcode::Write, 0, 8, 0x1000);
    h.send_all(usize::MAX);
    h.feed(&ok());
    assert_eq!(h.how(0), &Settle::Done, "the connection works on without it");
    assert!(!h.conn.poll_watch());
}

#[test]
fn no_watch_before_the_connection_is_ready_or_once_it_ends() {
    let now = Instant::now();
    let mut c: ClientConn<u32> = ClientConn::new("p", true, Limits::default(), now + Duration::from_secs(5));
    assert!(!c.poll_watch(), "connecting");
    let key = crate::proto::auth::AuthKey::new(b"a key of at least sixteen bytes").unwrap();
    let prover =
        crate::proto::auth::Prover::new(key, crate::proto::auth::Port::Data, [1; crate::proto::auth::NONCE_BYTES]);
    let mut c: ClientConn<u32> =
        ClientConn::new("p", true, Limits::default(), now + Duration::from_secs(5)).authenticating(prover);
    c.on_connected();
    assert!(!c.poll_watch(), "authenticating: the exchange's own receive watches");
    let mut c: ClientConn<u32> = ClientConn::new("p", true, Limits::default(), now + Duration::from_secs(5));
    c.on_connected();
    c.close("engine shutting down");
    assert!(!c.poll_watch(), "closing");
}

// --- Instance tags: a peer process that is gone ------------------------------

#[test]
fn tagged_requests_carry_the_peers_tag() {
    let mut h = Harness::tagged(0xab_cdef);
    h.push(Opcode::Write, 0, 4, 0x1000);
    h.send_all(usize::MAX);
    let header: [u8; 24] = h.wire[..24].try_into().unwrap();
    let decoded = RequestHeader::decode(&header).unwrap();
    assert_eq!(decoded.instance, Some(0xab_cdef));
    assert_eq!((decoded.size, decoded.addr, decoded.opcode), (4, 0x1000, Opcode::Write));
}

/// Another process answers at the data port (status 4): the request it
/// refused and every one behind it settle as gone, none re-sent, however
/// the answer is split.
#[test]
fn a_stale_instance_answer_settles_everything_left_as_gone_split_anywhere() {
    let mut reference = Harness::tagged(7);
    let answer = pipeline(&mut reference);
    // Requests 0 and 1 answered, then the refusal of request 2.
    let mut script = answer[..8 + 8 + 7].to_vec();
    script.extend(encode_status(crate::proto::mooncake::tcp::STATUS_STALE_INSTANCE));
    for cut in 0..=script.len() {
        for step in [1, 5, usize::MAX] {
            let mut h = Harness::tagged(7);
            let _ = pipeline(&mut h);
            h.send_all(step);
            h.feed(&script[..cut]);
            for piece in script[cut..].chunks(step) {
                h.feed(piece);
            }
            assert!(h.conn.is_closing(), "cut {cut}: the refusal ends the connection");
            h.finish();
            h.assert_each_settled_once();
            assert_eq!((h.how(0), h.how(1)), (&Settle::Done, &Settle::Done), "cut {cut}");
            assert!(
                matches!(h.how(2), Settle::PeerGone(w) if w.contains("another process now") && w.contains("0x3000")),
                "cut {cut}: {:?}",
                h.how(2)
            );
            for i in [3, 4] {
                assert!(matches!(h.how(i), Settle::PeerGone(_)), "cut {cut}: {i} is {:?}, not re-sent", h.how(i));
            }
        }
    }
}

/// Status 4 means a stale instance only to a connection that tagged its
/// requests; to another it is a rejection like any other.
#[test]
fn status_4_to_an_untagged_connection_is_a_rejection() {
    let mut h = Harness::new(true, Limits::default());
    h.push(Opcode::Write, 0, 4, 0x1000);
    h.send_all(usize::MAX);
    h.feed(&encode_status(crate::proto::mooncake::tcp::STATUS_STALE_INSTANCE));
    h.finish();
    assert!(matches!(h.how(0), Settle::Rejected { status: 4, .. }), "{:?}", h.how(0));
}

#[test]
fn a_refused_connect_or_a_retired_peer_settles_as_gone() {
    let now = Instant::now();
    let req = |t| lone_req(now, t);
    let mut c: ClientConn<u32> = ClientConn::new("10.0.0.1:1", true, Limits::default(), now + Duration::from_secs(5));
    assert!(c.push(req(1)).is_ok() && c.push(req(2)).is_ok());
    c.on_connect_refused();
    c.finish(now);
    for _ in 0..2 {
        let (_, how) = c.poll_settled().unwrap();
        assert!(matches!(how, Settle::PeerGone(ref w) if w.contains("nothing listens")), "{how:?}");
    }
    // One whose peer the engine retired, with a request sent and one queued.
    let mut h = Harness::tagged(1);
    h.push(Opcode::Write, 0, 4, 0x1000);
    h.send_all(usize::MAX);
    h.push(Opcode::Write, 0, 4, 0x2000);
    h.conn.close_gone("retired");
    h.finish();
    h.assert_each_settled_once();
    assert!(h.settled.iter().all(|(_, s)| matches!(s, Settle::PeerGone(w) if w == "retired")), "{:?}", h.settled);
    // Past its deadline, a request times out, gone or not.
    let mut c: ClientConn<u32> = ClientConn::new("p", true, Limits::default(), now + Duration::from_secs(5));
    assert!(c.push(Req { deadline: now, ..req(3) }).is_ok());
    c.on_connect_refused();
    c.finish(now + Duration::from_secs(1));
    assert!(matches!(c.poll_settled().unwrap().1, Settle::TimedOut(_)));
}
