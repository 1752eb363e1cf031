//! The sender core driven by a scripted receiver: no sockets.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::Settings;
use crate::proto::objstream::{BodyDecoder, BodyEvent, Event, Framing as BodyFraming, ObjHdr};

const HEAD: &[u8] = b"PUT /v1/objstream/t HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// What the driver saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Connect,
    Close,
    Abort,
    IdleTimer,
    Watchdog(u64),
    Done(String, Result<(), StreamError>),
    End(Termination),
}

struct Harness {
    core: TxConn,
    /// Bytes sent, per connection.
    wire: Vec<Vec<u8>>,
    seen: Vec<Seen>,
    chunk_bytes: usize,
    /// Sends are reported complete at once (false: they stay out).
    sending: bool,
    /// Bytes per send completion.
    step: usize,
}

fn framing() -> TxFraming {
    let s = Settings::default();
    TxFraming {
        head: HEAD.to_vec(),
        pdu: None,
        compression: None,
        max_header: 4096,
        batch_bytes: s.stream_batch_bytes,
        batch_bytes_max: s.stream_batch_bytes_max,
        idle_teardown: Duration::from_secs(4),
        send_timeout: Duration::from_secs(60),
    }
}

fn obj(name: &str, len: usize) -> Outgoing {
    let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    Outgoing {
        hdr: ObjHdr::new("b", name, len as i64),
        body: Payload::Bytes(Arc::from(body)),
        cb: None,
        started: false,
        sent: 0,
        failed: None,
    }
}

impl Harness {
    fn new(f: TxFraming) -> Self {
        Self { core: TxConn::new(f), wire: Vec::new(), seen: Vec::new(), chunk_bytes: 0, sending: true, step: 1 << 30 }
    }

    /// Carries out actions until the core has none; connects succeed.
    fn run(&mut self) {
        while let Some(a) = self.core.poll() {
            match a {
                Action::Connect => {
                    self.seen.push(Seen::Connect);
                    self.wire.push(Vec::new());
                    self.core.on_connected();
                }
                Action::Send => {
                    let b = self.core.batch().expect("a batch");
                    let mut bytes = Vec::new();
                    for (p, n) in b.pieces() {
                        // SAFETY: the batch's pieces, alive while it is.
                        bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
                    }
                    assert_eq!(bytes.len(), b.total());
                    self.wire.last_mut().expect("connected").extend_from_slice(&bytes);
                    if self.sending {
                        for c in bytes.chunks(self.step) {
                            self.core.on_sent(c.len());
                        }
                    }
                }
                Action::Close => self.seen.push(Seen::Close),
                Action::Abort => self.seen.push(Seen::Abort),
                Action::IdleTimer(_) => self.seen.push(Seen::IdleTimer),
                Action::Watchdog(_, g) => self.seen.push(Seen::Watchdog(g)),
                Action::Complete => {
                    let (o, r) = self.core.take_completed().expect("one per Complete");
                    self.seen.push(Seen::Done(o.hdr.name.clone(), r));
                }
                Action::Sent { .. } | Action::Idle(_) => {}
                Action::ChunkBytes(n) => self.chunk_bytes += n,
                Action::Terminate(t) => self.seen.push(Seen::End(t)),
            }
        }
    }

    fn done(&self) -> Vec<(String, Result<(), StreamError>)> {
        self.seen
            .iter()
            .filter_map(|s| match s {
                Seen::Done(n, r) => Some((n.clone(), r.clone())),
                _ => None,
            })
            .collect()
    }

    fn ended(&self) -> Option<&Termination> {
        self.seen.iter().find_map(|s| match s {
            Seen::End(t) => Some(t),
            _ => None,
        })
    }
}

/// The objects a connection's bytes carry, and whether the body ended.
fn decode(wire: &[u8]) -> (Vec<(String, Vec<u8>)>, bool) {
    let mut rest = wire.strip_prefix(HEAD).expect("the request head first");
    let mut d = BodyDecoder::new(BodyFraming::Chunked, false, 4096);
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        let (n, ev) = d.step(rest).expect("valid framing");
        rest = &rest[n..];
        match ev {
            BodyEvent::Obj(Event::Header(h)) => got.push((h.name.clone(), Vec::new())),
            BodyEvent::Obj(Event::Data(b)) => got.last_mut().expect("a header first").1.extend_from_slice(b),
            BodyEvent::Obj(_) => {}
            BodyEvent::NeedMore => return (got, false),
            BodyEvent::End => return (got, true),
        }
    }
}

#[test]
fn lazy_connect_then_fifo_completions_then_fin() {
    let mut h = Harness::new(framing());
    assert!(h.core.poll().is_none(), "nothing happens before the first object");
    for i in 0..3 {
        h.core.enqueue(obj(&format!("o{i}"), 1000 * i));
    }
    h.run();
    assert_eq!(h.seen.iter().filter(|s| **s == Seen::Connect).count(), 1, "one connection");
    let names: Vec<String> = h
        .done()
        .into_iter()
        .map(|(n, r)| {
            assert_eq!(r, Ok(()));
            n
        })
        .collect();
    assert_eq!(names, ["o0", "o1", "o2"]);
    h.core.fin();
    h.run();
    let (objs, ended) = decode(&h.wire[0]);
    assert!(ended, "fin ends the body");
    assert_eq!(objs.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(), ["o0", "o1", "o2"]);
    assert!(objs[2].1.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert_eq!(h.ended(), None, "the receiver's 200 is due");
    h.core.on_received(OK);
    h.run();
    assert_eq!(h.ended(), Some(&Termination::EndOfStream));
}

#[test]
fn the_answer_split_at_every_byte_boundary_ends_the_stream_once() {
    let answer = [b"HTTP/1.1 100 Continue\r\n\r\n".as_slice(), OK].concat();
    for cut in 0..=answer.len() {
        let mut h = Harness::new(framing());
        h.sending = false; // the answer comes before the send's completion
        h.core.enqueue(obj("a", 10));
        h.core.fin();
        h.run();
        h.core.on_received(&answer[..cut]);
        h.run();
        h.core.on_received(&answer[cut..]);
        h.run();
        assert_eq!(h.ended(), None, "cut {cut}: the completion comes first");
        let total = h.core.batch().unwrap().total();
        h.core.on_sent(total);
        h.run();
        assert_eq!(h.done(), [("a".to_string(), Ok(()))]);
        assert_eq!(h.ended(), Some(&Termination::EndOfStream), "cut {cut}");
        assert_eq!(h.seen.iter().filter(|s| matches!(s, Seen::End(_))).count(), 1);
    }
}

#[test]
fn a_rejection_fails_what_is_left_in_order() {
    let mut h = Harness::new(framing());
    h.sending = false;
    for i in 0..4 {
        h.core.enqueue(obj(&format!("o{i}"), 100));
    }
    h.run();
    let body = br#"{"message":"unknown trname","status":400}"#;
    let reply = format!("HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    let mut reply = reply.into_bytes();
    reply.extend_from_slice(body);
    for b in &reply {
        h.core.on_received(std::slice::from_ref(b));
    }
    h.run();
    let done = h.done();
    assert_eq!(done.len(), 4, "each object completes once");
    for (i, (name, r)) in done.iter().enumerate() {
        assert_eq!(name, &format!("o{i}"));
        assert!(matches!(r, Err(StreamError::Rejected { status: 400, message }) if message.contains("unknown trname")));
    }
    assert!(matches!(h.ended(), Some(Termination::Error(StreamError::Rejected { .. }))));
    // The batch is still out: it is dropped only when the kernel is done.
    let total = h.core.batch().unwrap().total();
    h.core.on_sent(total);
    h.run();
    assert!(h.core.batch().is_none());
}

#[test]
fn the_receiver_closing_at_every_point_completes_each_object_once() {
    for cut in 0..=OK.len() {
        let mut h = Harness::new(framing());
        h.core.enqueue(obj("a", 10));
        h.core.enqueue(obj("b", 10));
        h.core.fin();
        h.run();
        h.core.on_received(&OK[..cut]);
        h.core.on_eof();
        h.run();
        assert_eq!(h.done().len(), 2, "cut {cut}");
        let t = h.ended().expect("ended");
        if cut == OK.len() {
            assert_eq!(t, &Termination::EndOfStream);
        } else {
            assert!(matches!(t, Termination::Error(StreamError::Network(m)) if m.contains("closed")), "{t:?}");
        }
    }
    // Idle keep-alive connection closed by the receiver: a new one later.
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 1));
    h.run();
    h.core.on_idle();
    h.run();
    h.core.on_received(OK);
    h.core.on_eof();
    h.run();
    assert_eq!(h.ended(), None, "nothing was lost");
    h.core.enqueue(obj("b", 1));
    h.run();
    assert_eq!(h.seen.iter().filter(|s| **s == Seen::Connect).count(), 2, "reconnected");
    assert_eq!(decode(&h.wire[1]).0[0].0, "b", "a fresh PUT, head first");
}

#[test]
fn idle_teardown_ends_the_put_and_the_next_object_opens_another() {
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 5));
    h.run();
    assert!(h.seen.contains(&Seen::IdleTimer));
    h.core.enqueue(obj("b", 5));
    h.run();
    // The timer armed after a fires: b went in since, but nothing is queued
    // now, so the PUT ends with both.
    h.core.on_idle();
    h.run();
    let (objs, ended) = decode(&h.wire[0]);
    assert!(ended, "the idle PUT ended");
    assert_eq!(objs.len(), 2);
    h.core.on_received(OK);
    h.core.enqueue(obj("c", 5));
    h.run();
    let second = &h.wire[0][h.wire[0].windows(HEAD.len()).rposition(|w| w == HEAD).unwrap()..];
    assert_eq!(decode(second).0[0].0, "c", "the same connection, a new PUT");
    assert_eq!(h.seen.iter().filter(|s| **s == Seen::Connect).count(), 1);
    // With Connection: close, the next object connects again.
    h.core.on_idle();
    h.run();
    h.core.on_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    h.run();
    assert!(h.seen.contains(&Seen::Close));
    h.core.enqueue(obj("d", 5));
    h.run();
    assert_eq!(h.seen.iter().filter(|s| **s == Seen::Connect).count(), 2);
    assert!(h.done().iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn the_watchdog_aborts_a_stuck_send_and_ends_a_silent_receiver() {
    let mut h = Harness::new(framing());
    h.sending = false;
    h.core.enqueue(obj("a", 5));
    h.run();
    let g = h.seen.iter().find_map(|s| if let Seen::Watchdog(g) = s { Some(*g) } else { None }).unwrap();
    h.core.on_watchdog(g - 1);
    h.run();
    assert!(!h.seen.contains(&Seen::Abort), "progress since the last look");
    h.core.on_watchdog(g);
    h.run();
    assert!(h.seen.contains(&Seen::Abort), "the same send for a whole period");
    h.core.on_send_failed("send: Broken pipe");
    h.run();
    assert!(matches!(h.done()[0].1, Err(StreamError::Network(_))));
    // The answer to an ended body that never comes.
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 5));
    h.core.fin();
    h.run();
    h.core.on_watchdog(1);
    h.run();
    assert!(matches!(h.ended(), Some(Termination::Error(StreamError::Network(m))) if m.contains("did not answer")));
}

#[test]
fn streamed_objects_wait_for_their_chunks_and_release_them() {
    let mut h = Harness::new(framing());
    let mut o = obj("s", 0);
    o.hdr.attrs.size = 300_000;
    o.body = Payload::Streamed(super::super::batch::Streamed::new(7));
    h.core.enqueue(o);
    h.core.enqueue(obj("after", 3));
    h.run();
    assert!(h.done().is_empty(), "waits for its bytes, and so does what is behind it");
    let data: Vec<u8> = (0..300_000).map(|i| (i % 7) as u8).collect();
    for piece in data.chunks(100_000) {
        h.core.chunk(7, Chunk::Data(Arc::from(piece.to_vec())));
        h.run();
    }
    h.core.chunk(7, Chunk::End);
    h.run();
    assert_eq!(h.done().into_iter().map(|d| d.0).collect::<Vec<_>>(), ["s", "after"]);
    assert_eq!(h.chunk_bytes, 300_000, "every streamed byte left the budget");
    let (objs, _) = decode(&h.wire[0]);
    assert_eq!(objs[0].1, data);
    // A chunk for an object that is gone is released at once.
    h.core.chunk(99, Chunk::Data(Arc::from(vec![0u8; 10])));
    h.run();
    assert_eq!(h.chunk_bytes, 300_010);
}

#[test]
fn an_object_that_cannot_be_framed_fails_alone_in_its_turn() {
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 1));
    let mut big = obj("big", 0);
    big.hdr.opaque = vec![0; 5000];
    h.core.enqueue(big);
    h.core.enqueue(obj("c", 1));
    h.core.fin();
    h.run();
    h.core.on_received(OK);
    h.run();
    let done = h.done();
    assert_eq!(done.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["a", "big", "c"]);
    assert!(done[0].1.is_ok() && done[2].1.is_ok());
    assert!(matches!(&done[1].1, Err(StreamError::Object(_))));
    assert_eq!(h.ended(), Some(&Termination::EndOfStream));
}

#[test]
fn garbage_and_early_answers_end_the_stream() {
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 1));
    h.run();
    h.core.on_received(OK);
    h.run();
    assert!(
        matches!(h.ended(), Some(Termination::Error(StreamError::Network(m))) if m.contains("before the body ended"))
    );
    let mut h = Harness::new(framing());
    h.core.enqueue(obj("a", 1));
    h.run();
    h.core.on_received(b"SSH-2.0-OpenSSH\r\n\r\n");
    h.run();
    assert!(matches!(h.ended(), Some(Termination::Error(StreamError::Network(m))) if m.contains("not HTTP")));
}
