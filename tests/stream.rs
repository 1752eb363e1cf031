//! Object streams end to end on loopback, mirroring AIStore's transport
//! tests (one and many streams, completion order, header-only, random and
//! large sizes, PDUs, compression, dry run, receiver errors, a peer killed
//! mid-stream, bundles), plus the CLI and LZ4 against the `lz4` tool.

mod interop;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interop::{KillOnDrop, Rng, die_with_parent, free_port, stream_listener};
use shardwire::proto::objstream::checksum::{ChecksumError, CksumType, compute_hex};
use shardwire::proto::objstream::lz4::BlockSize;
use shardwire::proto::objstream::{ObjHdr, SIZE_UNKNOWN, frame};
use shardwire::stream::bundle::BundleBody;
use shardwire::stream::{
    Body, Bundle, HandlerError, ObjReader, Receiver, RecvError, RecvHandler, RxOptions, Session, Stream, StreamError,
    StreamOptions, Termination,
};

type Got = Arc<Mutex<Vec<(ObjHdr, Vec<u8>, Session)>>>;

/// Keeps every object it receives, and every error it is told of.
#[derive(Default, Clone)]
struct Collect {
    got: Got,
    errors: Arc<Mutex<Vec<RecvError>>>,
    /// Objects that failed their checksum: name and why.
    bad: Arc<Mutex<Vec<(String, ChecksumError)>>>,
}

impl RecvHandler for Collect {
    fn object(&self, s: &Session, hdr: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError> {
        let mut v = Vec::new();
        body.read_to_end(&mut v)?;
        self.got.lock().unwrap().push((hdr.clone(), v, s.clone()));
        Ok(())
    }
    fn error(&self, _s: &Session, err: &RecvError) {
        self.errors.lock().unwrap().push(err.clone());
    }
    fn bad_checksum(&self, _s: &Session, hdr: &ObjHdr, err: &ChecksumError) {
        self.bad.lock().unwrap().push((hdr.name.clone(), err.clone()));
    }
}

fn receiver() -> Receiver {
    Receiver::bind("127.0.0.1:0".parse().unwrap(), RxOptions::default()).unwrap()
}

fn collect(rx: &Receiver, trname: &str) -> Collect {
    let c = Collect::default();
    rx.handle(trname, c.clone()).unwrap();
    c
}

fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    interop::poll_true(what, timeout.max(interop::WAIT), f);
}

/// Completions in order: each records its index; the test checks order.
/// Completions seen: object name and error, in the order they came.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn recorder() -> (Log, StreamOptions) {
    let log: Log = Arc::default();
    let l = log.clone();
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| {
            l.lock().unwrap().push((h.name.clone(), r.err().map(|e| e.to_string())));
        })),
        ..StreamOptions::default()
    };
    (log, opts)
}

#[test]
fn one_stream_random_sizes_and_large_objects() {
    let rx = receiver();
    let c = collect(&rx, "one");
    let (log, opts) = recorder();
    let s = Stream::new(&rx.url(), "one", opts).unwrap();
    let mut rng = Rng(42);
    let mut want = Vec::new();
    for i in 0..120u64 {
        let len = match i % 6 {
            0 => 0,
            1 => rng.range(1, 100) as usize,
            2 => rng.range(100, 70_000) as usize,
            3 => rng.range(70_000, 3 << 20) as usize,
            4 => 4096,
            _ => {
                if i == 5 {
                    48 << 20
                } else {
                    1 << 20
                }
            }
        };
        let mut h = ObjHdr::new("bck", &format!("o{i}"), len as i64);
        h.opaque = i.to_be_bytes().to_vec();
        h.attrs.atime = 1_700_000_000_000_000_000 + i as i64;
        let body = bytes(i, len);
        // A checksum of the caller's (as AIStore's senders put the stored
        // one), verified by the receiver.
        h.attrs.cksum_type = "xxhash2".into();
        h.attrs.cksum_value = compute_hex(CksumType::Xxhash2, &body);
        h.attrs.version = "7".into();
        h.attrs.custom = vec![("k".into(), i.to_string()), ("empty".into(), String::new())];
        s.send(h.clone(), body.clone()).unwrap();
        want.push((h, body));
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), want.len(), "one completion per object");
    for (i, (name, err)) in log.iter().enumerate() {
        assert_eq!((name.as_str(), err), (format!("o{i}").as_str(), &None), "completion {i} in order, no error");
    }
    let got = c.got.lock().unwrap();
    assert_eq!(got.len(), want.len());
    for ((gh, gb, sess), (wh, wb)) in got.iter().zip(&want) {
        assert_eq!(gh, wh);
        assert!(gb == wb, "body of {}", wh.name);
        assert_eq!(sess.id, s.session_id());
    }
    let st = s.stats();
    assert_eq!(st.num, 120);
    assert_eq!(st.size as usize, want.iter().map(|(_, b)| b.len()).sum::<usize>());
    assert!(st.offset > st.size, "the offset counts headers too");
    let ep = &rx.stats()["one"];
    assert_eq!((ep.total_num, ep.total_size), (120, st.size));
}

#[test]
fn many_streams_at_once() {
    let rx = receiver();
    let mut handlers = Vec::new();
    for k in 0..16 {
        handlers.push(collect(&rx, &format!("m{k}")));
    }
    let url = rx.url();
    let threads: Vec<_> = (0..16)
        .map(|k| {
            let url = url.clone();
            std::thread::spawn(move || {
                let s = Stream::new(&url, &format!("m{k}"), StreamOptions::default()).unwrap();
                let mut total = 0usize;
                for i in 0..50u64 {
                    let len = ((k * 7919 + i as usize * 104_729) % 200_000) * (i as usize % 3);
                    s.send(ObjHdr::new("b", &format!("{k}-{i}"), len as i64), bytes(i + k as u64, len)).unwrap();
                    total += len;
                }
                assert_eq!(s.fin(), Termination::EndOfStream);
                total
            })
        })
        .collect();
    let totals: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (k, h) in handlers.iter().enumerate() {
        let got = h.got.lock().unwrap();
        assert_eq!(got.len(), 50, "stream {k}");
        assert_eq!(got.iter().map(|g| g.1.len()).sum::<usize>(), totals[k]);
        assert!(got.iter().all(|g| g.0.name.starts_with(&format!("{k}-"))));
    }
}

#[test]
fn per_object_callbacks_fire_in_order() {
    // AIStore's TestSendCallback: callback i never fires before i-1.
    let rx = receiver();
    let c = collect(&rx, "cb");
    let s = Stream::new(&rx.url(), "cb", StreamOptions::default()).unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(AtomicUsize::new(0));
    let n = 10_000;
    for i in 0..n {
        let (next, bad) = (next.clone(), bad.clone());
        let len = i % 700;
        s.send_with(ObjHdr::new("b", &i.to_string(), len as i64), bytes(i as u64, len), move |_h, r| {
            if next.fetch_add(1, Ordering::SeqCst) != i || r.is_err() {
                bad.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    assert_eq!(next.load(Ordering::SeqCst), n);
    assert_eq!(bad.load(Ordering::SeqCst), 0, "out of order or failed");
    assert_eq!(c.got.lock().unwrap().len(), n);
}

#[test]
fn header_only_and_control_objects() {
    let rx = receiver();
    let c = collect(&rx, "ho");
    let s = Stream::new(&rx.url(), "ho", StreamOptions::default()).unwrap();
    for i in 0..7u16 {
        let mut h = ObjHdr::new("b", &format!("h{i}"), 0);
        h.opaque = format!("control message {i}").into_bytes();
        if i % 2 == 1 {
            h.opcode = shardwire::proto::objstream::header::OPC_REQUEST;
        }
        s.send(h, Body::Empty).unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    let got = c.got.lock().unwrap();
    assert_eq!(got.len(), 7);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.0.opaque, format!("control message {i}").into_bytes());
        assert!(g.1.is_empty());
    }
    assert_eq!(s.stats().num, 4, "control objects are left out of the stats");
}

#[test]
fn unsized_objects_in_pdu_mode() {
    let rx = receiver();
    let c = collect(&rx, "pdu");
    let opts = StreamOptions { pdu_size: Some(32 << 10), ..StreamOptions::default() };
    let s = Stream::new(&rx.url(), "pdu", opts).unwrap();
    let lens = [0usize, 1, 32 << 10, (32 << 10) + 1, 64 << 10, 1_000_003, 5 << 20];
    for (i, &len) in lens.iter().enumerate() {
        let data = bytes(i as u64, len);
        // Unsized: a reader of unknown length. Sized: bytes, in PDUs too.
        let (h, body) = if i % 2 == 0 && len > 0 {
            (ObjHdr::new("b", &format!("u{i}"), SIZE_UNKNOWN), Body::Reader(Box::new(std::io::Cursor::new(data))))
        } else {
            (ObjHdr::new("b", &format!("u{i}"), len as i64), Body::from(data))
        };
        s.send(h, body).unwrap();
    }
    // Unsized objects need PDUs: refused on a plain stream, inline.
    let plain = Stream::new(&rx.url(), "pdu", StreamOptions::default()).unwrap();
    let e = plain.send(ObjHdr::new("b", "x", SIZE_UNKNOWN), Body::Reader(Box::new(std::io::empty()))).unwrap_err();
    assert!(matches!(e, StreamError::Object(_)), "{e}");
    assert_eq!(s.fin(), Termination::EndOfStream);
    let got = c.got.lock().unwrap();
    assert_eq!(got.len(), lens.len());
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.1, bytes(i as u64, lens[i]), "object {i}");
        let is_unsized = i % 2 == 0 && lens[i] > 0;
        assert_eq!(g.0.attrs.size, if is_unsized { SIZE_UNKNOWN } else { lens[i] as i64 });
    }
}

#[test]
fn compressed_streams() {
    // AIStore's TestCompressedOne, smaller: burst 2, every 7th object
    // header-only, every 3rd a few random bytes, the rest repetitive.
    for block in [BlockSize::K64, BlockSize::K256, BlockSize::M1, BlockSize::M4] {
        let rx = receiver();
        let c = collect(&rx, "z");
        let opts = StreamOptions { compression: Some(block), burst: 2, ..StreamOptions::default() };
        let s = Stream::new(&rx.url(), "z", opts).unwrap();
        let mut want = Vec::new();
        for i in 0..40u64 {
            let body = if i % 7 == 0 {
                vec![]
            } else if i % 3 == 0 {
                bytes(i, 1 + (i as usize * 13) % 100)
            } else {
                b"abcdefgh".iter().cycle().take(((i as usize) << 16) % (6 << 20)).copied().collect()
            };
            s.send(ObjHdr::new("b", &format!("z{i}"), body.len() as i64), body.clone()).unwrap();
            want.push(body);
        }
        assert_eq!(s.fin(), Termination::EndOfStream);
        let got = c.got.lock().unwrap();
        assert_eq!(got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(), want, "{block:?}");
        let st = s.stats();
        assert!(st.offset < st.size / 4, "{block:?}: {} body bytes carried {} object bytes", st.offset, st.size);
    }
}

#[test]
fn dry_run_reads_and_discards() {
    let opts = RxOptions { dry_run: true, ..RxOptions::default() };
    let rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), opts).unwrap();
    let c = collect(&rx, "dry");
    let s = Stream::new(&rx.url(), "dry", StreamOptions::default()).unwrap();
    for i in 0..100 {
        s.send(ObjHdr::new("b", &i.to_string(), 10_000), vec![1u8; 10_000]).unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    assert!(c.got.lock().unwrap().is_empty(), "no handler calls in a dry run");
    assert_eq!(rx.stats()["dry"].total_num, 100);
    assert_eq!(rx.stats()["dry"].total_size, 1_000_000);
}

/// Sends raw bytes as one request; returns the status and the body.
fn raw_request(addr: std::net::SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[test]
fn receiver_errors_are_4xx_and_typed() {
    let rx = receiver();
    let c = collect(&rx, "e");
    let a = rx.local_addr();
    let put = |path: &str, extra: &str| {
        format!("PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n")
    };
    assert_eq!(raw_request(a, put("/v1/objstream/nope", "").as_bytes()).0, 400);
    assert!(raw_request(a, put("/v1/objstream/nope", "").as_bytes()).1.contains("unknown trname"));
    assert_eq!(raw_request(a, put("/v1/objstream/e", "Ais-Session-Id: x1\r\n").as_bytes()).0, 400);
    assert_eq!(raw_request(a, put("/v1/objstream/e", "Ais-Compress: zstd\r\n").as_bytes()).0, 400);
    assert_eq!(raw_request(a, put("/v1/other/e", "").as_bytes()).0, 404);
    assert_eq!(raw_request(a, b"GET /v1/objstream/e HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(raw_request(a, b"PUT /v1/objstream/e HTTP/1.1\r\nbad header\r\n\r\n").0, 400);
    let huge = format!("PUT /v1/objstream/e HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(20_000));
    assert_eq!(raw_request(a, huge.as_bytes()).0, 431);
    // An empty PUT is an empty stream.
    assert_eq!(raw_request(a, put("/v1/objstream/e", "Ais-Session-Id: 7\r\n").as_bytes()).0, 200);

    // AIStore's TestMalformedTransportHeader: hlen 42, valid check word,
    // a sender-id length of 42.
    let mut frame_bytes = frame::ProtoHdr { len: 42, flags: 0 }.encode().to_vec();
    let mut hdr = vec![0u8; 42];
    hdr[1] = 42;
    frame_bytes.extend_from_slice(&hdr);
    let mut req =
        format!("PUT /v1/objstream/e HTTP/1.1\r\nContent-Length: {}\r\nAis-Caller-Id: t1\r\n\r\n", frame_bytes.len())
            .into_bytes();
    req.extend_from_slice(&frame_bytes);
    let (status, body) = raw_request(a, &req);
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type_code"], "ErrSBR");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.starts_with("e[t1] sbr_obj_hdr_inval:["), "{msg}");
    assert!(msg.contains("hlen=42 err: malformed object header: at offset 2: unexpected EOF"), "{msg}");
    wait_for("the handler's error call", Duration::from_secs(5), || !c.errors.lock().unwrap().is_empty());
    assert!(matches!(&c.errors.lock().unwrap()[0], RecvError::Broken(e) if e.code.as_str() == "sbr_obj_hdr_inval"));

    // The receiver is still healthy.
    let s = Stream::new(&rx.url(), "e", StreamOptions::default()).unwrap();
    s.send(ObjHdr::new("b", "fine", 3), vec![1, 2, 3]).unwrap();
    assert_eq!(s.fin(), Termination::EndOfStream);
    assert_eq!(c.got.lock().unwrap().len(), 1);

    // A stream to an unknown trname: every object fails, with the answer.
    let (recorded, opts) = recorder();
    let log = recorded.clone();
    let s = Stream::new(&rx.url(), "missing", opts).unwrap();
    for i in 0..5 {
        let _ = s.send(ObjHdr::new("b", &i.to_string(), 100), vec![0u8; 100]);
    }
    match s.fin() {
        Termination::Error(StreamError::Rejected { status: 400, message }) => {
            assert!(message.contains("unknown trname"))
        }
        other => panic!("{other:?}"),
    }
    let log = log.lock().unwrap();
    // Each object completes once: those handed to the kernel before the
    // answer arrived count as sent (AIStore's meaning of completion), the
    // rest carry the rejection.
    assert_eq!(log.len(), 5);
    let failed: Vec<_> = log.iter().filter_map(|(_, e)| e.clone()).collect();
    assert!(failed.iter().all(|e| e.contains("unknown trname")), "{failed:?}");
    drop(log);
    // After termination, sends fail inline, each with its completion.
    assert!(matches!(s.send(ObjHdr::new("b", "late", 0), Body::Empty), Err(StreamError::Terminated(_))));
    assert_eq!(recorded.lock().unwrap().len(), 6);
}

#[test]
fn a_handler_error_breaks_the_stream() {
    let rx = receiver();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    rx.handle("h", move |h: &ObjHdr, _b: &mut ObjReader<'_>| {
        s2.fetch_add(1, Ordering::SeqCst);
        if h.name == "poison" { Err(HandlerError("refused".into())) } else { Ok(()) }
    })
    .unwrap();
    let (log, opts) = recorder();
    let s = Stream::new(&rx.url(), "h", opts).unwrap();
    s.send(ObjHdr::new("b", "ok", 10), vec![0u8; 10]).unwrap();
    s.send(ObjHdr::new("b", "poison", 10), vec![0u8; 10]).unwrap();
    let t = s.fin();
    assert!(
        matches!(&t, Termination::Error(StreamError::Rejected { status: 400, message }) if message.contains("refused")),
        "{t:?}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[test]
fn unhandled_names_are_refused_with_a_reason() {
    let rx = receiver();
    collect(&rx, "gone");
    assert!(rx.handle("gone", |_h: &ObjHdr, _b: &mut ObjReader<'_>| Ok(())).is_err(), "duplicate");
    rx.unhandle("gone").unwrap();
    assert!(rx.unhandle("gone").is_err());
    let s = Stream::new(&rx.url(), "gone", StreamOptions::default()).unwrap();
    s.send(ObjHdr::new("b", "x", 1), vec![1]).unwrap();
    assert!(
        matches!(s.fin(), Termination::Error(StreamError::Rejected { message, .. }) if message.contains("was closed"))
    );
}

#[test]
fn idle_teardown_reconnects_with_the_same_session() {
    let rx = receiver();
    let c = collect(&rx, "idle");
    let opts = StreamOptions { idle_teardown: Duration::from_millis(150), ..StreamOptions::default() };
    let s = Stream::new(&rx.url(), "idle", opts).unwrap();
    s.send(ObjHdr::new("b", "a", 5), vec![5u8; 5]).unwrap();
    wait_for("the first object", Duration::from_secs(5), || c.got.lock().unwrap().len() == 1);
    // The PUT ends after the idle time; the receiver closes its session.
    wait_for("the idle teardown", Duration::from_secs(5), || rx.stats()["idle"].sessions.is_empty());
    s.send(ObjHdr::new("b", "b", 5), vec![6u8; 5]).unwrap();
    assert_eq!(s.fin(), Termination::EndOfStream);
    let got = c.got.lock().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].2.id, got[1].2.id, "the same session id on both PUTs");
    assert!(s.stats().idle_pct > 0.0);
}

#[test]
fn back_pressure_bounds_what_is_queued() {
    let rx = receiver();
    let gate = Arc::new(Mutex::new(()));
    let held = gate.lock().unwrap();
    let g = gate.clone();
    rx.handle("slow", move |_h: &ObjHdr, b: &mut ObjReader<'_>| {
        let _open = g.lock().unwrap();
        std::io::copy(b, &mut std::io::sink())?;
        Ok(())
    })
    .unwrap();
    let opts = StreamOptions { burst: 8, ..StreamOptions::default() };
    let s = Arc::new(Stream::new(&rx.url(), "slow", opts).unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let (s2, n2) = (s.clone(), sent.clone());
    let t = std::thread::spawn(move || {
        for i in 0..5000 {
            s2.send(ObjHdr::new("b", &i.to_string(), 64 << 10), vec![0u8; 64 << 10]).unwrap();
            n2.fetch_add(1, Ordering::SeqCst);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.outstanding() <= 8);
    let stuck = sent.load(Ordering::SeqCst);
    assert!(stuck < 5000, "send blocks while the receiver does not read ({stuck} sent)");
    drop(held);
    t.join().unwrap();
    assert_eq!(s.fin(), Termination::EndOfStream);
}

#[test]
fn a_receiver_killed_mid_stream_fails_every_pending_object() {
    let port = free_port();
    let mut child = stream_listener(port, "k");
    let mut lines = Lines::of(child.0.stdout.take().unwrap());
    let (log, opts) = recorder();
    let s = Stream::new(&format!("http://127.0.0.1:{port}"), "k", opts).unwrap();
    s.send(ObjHdr::new("b", "first", 100), vec![1u8; 100]).unwrap();
    assert!(lines.next().contains("\"first\""));
    let big: Arc<[u8]> = vec![7u8; 4 << 20].into();
    let handed = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let (big, handed) = (big.clone(), handed.clone());
        let s = Arc::new(s);
        let s2 = s.clone();
        (
            s,
            std::thread::spawn(move || {
                let mut n = 1;
                for i in 0..2000 {
                    if s2.send(ObjHdr::new("b", &format!("big{i}"), big.len() as i64), big.clone()).is_err() {
                        break;
                    }
                    handed.fetch_add(1, Ordering::SeqCst);
                    n += 1;
                }
                n
            }),
        )
    };
    // Killed mid-stream: with objects handed over and more coming.
    wait_for("a few objects handed over", interop::WAIT, || handed.load(Ordering::SeqCst) >= 4);
    child.0.kill().unwrap();
    let start = Instant::now();
    let sent = feeder.1.join().unwrap();
    let t = feeder.0.wait();
    assert!(matches!(t, Termination::Error(StreamError::Network(_))), "{t:?}");
    // One completion each, the refused one too. An object handed to the
    // shard just before the stream ended completes there, after `wait`.
    let expected = sent + usize::from(sent < 2001);
    wait_for("every completion", Duration::from_secs(10), || log.lock().unwrap().len() >= expected);
    assert!(start.elapsed() < Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(50));
    let log = log.lock().unwrap();
    assert_eq!(log.len(), expected, "one completion each, and no more");
    assert!(log.iter().any(|(_, e)| e.is_some()), "pending objects fail");
    assert_eq!(log[0], ("first".into(), None));
}

#[test]
fn bundle_with_a_multiplier() {
    let nodes: Vec<Receiver> = (0..3).map(|_| receiver()).collect();
    let handlers: Vec<Collect> = nodes.iter().map(|r| collect(r, "bdl")).collect();
    let mut cluster = BTreeMap::new();
    cluster.insert("self".to_string(), "http://127.0.0.1:1".to_string());
    for (i, r) in nodes.iter().enumerate() {
        cluster.insert(format!("t{i}"), r.url());
    }
    let done = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let d = done.clone();
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| d.lock().unwrap().push((h.name.clone(), r.is_ok())))),
        ..StreamOptions::default()
    };
    let b = Bundle::new(&cluster, "self", "bdl", 4, opts).unwrap();
    assert_eq!(b.destinations(), ["t0", "t1", "t2"]);
    let reopened = Arc::new(AtomicUsize::new(0));
    let n = 60;
    for i in 0..n {
        let name = format!("x{i}");
        let body = if i % 7 == 0 {
            BundleBody::Empty
        } else if i % 2 == 0 {
            BundleBody::Bytes(bytes(i as u64, 50_000).into())
        } else {
            let data = bytes(i as u64, 50_000);
            let r = reopened.clone();
            let d2 = data.clone();
            BundleBody::Reader {
                first: Box::new(std::io::Cursor::new(data)),
                reopen: Arc::new(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(Box::new(std::io::Cursor::new(d2.clone())) as Box<dyn Read + Send>)
                }),
            }
        };
        let size = if i % 7 == 0 { 0 } else { 50_000 };
        b.send(ObjHdr::new("b", &name, size), body, None).unwrap();
    }
    // Multicast to a subset, and to a name that is not there.
    b.send_to(ObjHdr::new("b", "only-t1", 3), BundleBody::Bytes(vec![1, 2, 3].into()), &["t1"], None).unwrap();
    assert!(b.send_to(ObjHdr::new("b", "nowhere", 0), BundleBody::Empty, &["t9"], None).is_err());
    let readers = (0..n).filter(|i| i % 7 != 0 && i % 2 == 1).count();
    for t in b.close(true) {
        assert_eq!(t.1, Termination::EndOfStream, "{}", t.0);
    }
    assert_eq!(reopened.load(Ordering::SeqCst), readers * 2, "reopened once per extra replica");
    let done = done.lock().unwrap();
    assert_eq!(done.len(), n + 2, "one completion per object, after its last replica");
    assert_eq!(done.iter().filter(|(_, ok)| !ok).count(), 1, "only the missing destination failed");
    for (k, h) in handlers.iter().enumerate() {
        let got = h.got.lock().unwrap();
        let mut names: Vec<_> = got.iter().map(|g| g.0.name.clone()).collect();
        names.sort();
        let mut want: Vec<_> = (0..n).map(|i| format!("x{i}")).collect();
        if k == 1 {
            want.push("only-t1".into());
        }
        want.sort();
        assert_eq!(names, want, "node t{k}");
        assert!(got.iter().all(|g| g.0.sid == "self"));
        for g in got.iter().filter(|g| g.0.name.starts_with('x')) {
            let i: u64 = g.0.name[1..].parse().unwrap();
            if i % 7 != 0 {
                assert_eq!(g.1, bytes(i, 50_000));
            }
        }
        // With a multiplier of 4, the node saw 4 sessions.
        let mut sessions: Vec<i64> = got.iter().map(|g| g.2.id).collect();
        sessions.sort();
        sessions.dedup();
        assert_eq!(sessions.len(), 4, "node t{k}");
    }
}

#[test]
fn bundle_destinations_change_at_run_time() {
    let a = receiver();
    let ca = collect(&a, "dyn");
    let b_rx = receiver();
    let cb = collect(&b_rx, "dyn");
    let mut cluster = BTreeMap::new();
    cluster.insert("a".to_string(), a.url());
    let b = Bundle::new(&cluster, "me", "dyn", 1, StreamOptions::default()).unwrap();
    b.send(ObjHdr::new("b", "1", 1), BundleBody::Bytes(vec![1].into()), None).unwrap();
    b.add("b", &b_rx.url()).unwrap();
    b.send(ObjHdr::new("b", "2", 1), BundleBody::Bytes(vec![2].into()), None).unwrap();
    assert!(b.remove("a"));
    assert!(!b.remove("a"));
    b.send(ObjHdr::new("b", "3", 1), BundleBody::Bytes(vec![3].into()), None).unwrap();
    b.close(true);
    wait_for("a's objects", Duration::from_secs(5), || ca.got.lock().unwrap().len() == 2);
    let names = |c: &Collect| c.got.lock().unwrap().iter().map(|g| g.0.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ca), ["1", "2"]);
    assert_eq!(names(&cb), ["2", "3"]);
}

#[test]
fn cli_listen_prints_one_json_line_per_object() {
    let port = free_port();
    let mut child = stream_listener(port, "cli");
    let mut lines = Lines::of(child.0.stdout.take().unwrap());
    let s = Stream::new(&format!("http://127.0.0.1:{port}"), "cli", StreamOptions::default()).unwrap();
    let mut h = ObjHdr::new("bkt", "dir/name", 1000);
    h.bucket.provider = "aws".into();
    h.opaque = vec![0xde, 0xad, 0x01];
    h.attrs.atime = 1234567890;
    h.attrs.cksum_type = "md5".into();
    h.attrs.cksum_value = compute_hex(CksumType::Md5, &[9u8; 1000]);
    h.attrs.version = "3".into();
    h.attrs.custom = vec![("color".into(), "blue".into())];
    s.send(h, vec![9u8; 1000]).unwrap();
    assert_eq!(s.fin(), Termination::EndOfStream);
    let v: serde_json::Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "bucket": "bkt", "provider": "aws", "name": "dir/name", "opaque": "dead01", "size": 1000,
            "received": 1000, "atime": 1234567890, "cksum_type": "md5",
            "cksum_value": compute_hex(CksumType::Md5, &[9u8; 1000]), "version": "3",
            "custom": {"color": "blue"}
        })
    );

    // `stream send` with files, compressed.
    let dir = std::env::temp_dir().join(format!("shardwire-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("f1"), vec![3u8; 300_000]).unwrap();
    std::fs::write(dir.join("f2"), b"").unwrap();
    let (f1, f2) = (dir.join("f1"), dir.join("f2"));
    let out = cli_send(port, "cli", &["--compress", "256K", "--json", f1.to_str().unwrap(), f2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(report["stats"]["Num"], 2);
    assert_eq!(report["stats"]["Size"], 300_000);
    for (name, size) in [("f1", 300_000), ("f2", 0)] {
        let v: serde_json::Value = serde_json::from_str(&lines.next()).unwrap();
        assert_eq!((v["name"].as_str().unwrap(), v["received"].as_i64().unwrap()), (name, size));
    }

    // `--checksum`: the sender puts one in each header (a file's read
    // first), the listener verifies it.
    let out = cli_send(port, "cli", &["--checksum", "xxhash", f1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!((v["name"].as_str(), v["received"].as_i64()), (Some("f1"), Some(300_000)), "{v}");
    assert_eq!(v["cksum_type"], "xxhash");
    assert_eq!(v["cksum_value"], compute_hex(CksumType::Xxhash, &[3u8; 300_000]));
    let out = cli_send(port, "cli", &["--checksum", "sha1", "--count", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"sha1\" is not a checksum type (xxhash,"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    // An object whose bytes do not match its checksum: a line with the
    // error in place of the object's, and the stream goes on.
    let s = Stream::new(&format!("http://127.0.0.1:{port}"), "cli", StreamOptions::default()).unwrap();
    let mut h = ObjHdr::new("bkt", "bad", 1000);
    h.attrs.cksum_type = "crc32c".into();
    h.attrs.cksum_value = compute_hex(CksumType::Crc32c, &[1u8; 1000]);
    s.send(h, vec![2u8; 1000]).unwrap();
    s.send(ObjHdr::new("bkt", "after", 10), vec![0u8; 10]).unwrap();
    assert_eq!(s.fin(), Termination::EndOfStream);
    let v: serde_json::Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!((v["name"].as_str(), v["error"]["code"].as_str()), (Some("bad"), Some("bad_checksum")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("crc32c"), "{v}");
    let v: serde_json::Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!((v["name"].as_str(), v["received"].as_i64()), (Some("after"), Some(10)), "{v}");
}

#[test]
fn lz4_frames_agree_with_the_lz4_tool() {
    use shardwire::proto::objstream::lz4;
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 1000 / 3) as u8).collect();
    // Ours, closed with an end mark, decoded by `lz4 -d`.
    let mut z = lz4::frame_header(BlockSize::K256).to_vec();
    for b in data.chunks(256 << 10) {
        lz4::encode_block(b, &mut z);
    }
    z.extend_from_slice(&lz4::END_MARK);
    let out = pipe_through(&["-d", "-c"], &z);
    assert!(out == data, "lz4 -d disagrees");
    // The tool's (linked blocks, content checksum), decoded by ours.
    for flags in [&["-c", "-B4"][..], &["-c", "-BD", "-B5", "--content-size"][..], &["-c", "-BX", "-9"][..]] {
        let tool = pipe_through(flags, &data);
        let mut d = lz4::Decoder::new();
        let mut back = Vec::new();
        let mut rest = &tool[..];
        while !rest.is_empty() {
            let n = d.feed(rest).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
            rest = &rest[n..];
            back.extend_from_slice(d.output());
            let k = d.output().len();
            d.consume(k);
        }
        d.finish().unwrap();
        assert!(back == data, "{flags:?}");
    }
}

/// `shardwire stream send --to http://127.0.0.1:<port> --trname <trname>`
/// plus `args`, run to its end.
fn cli_send(port: u16, trname: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(["stream", "send", "--to", &format!("http://127.0.0.1:{port}"), "--trname", trname])
        .args(args)
        .output()
        .unwrap()
}

/// A child's output, line by line, with a bound on every wait: a test fails
/// instead of hanging when an expected line never comes.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    fn next(&mut self) -> String {
        self.0.recv_timeout(Duration::from_secs(20)).expect("an expected line within 20 s")
    }
}

fn pipe_through(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("lz4")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the lz4 tool (tools/setup installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    assert!(out.status.success(), "lz4 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn stop_completes_everything_once() {
    // AIStore's TestCompletionCount: stop part-way; every send completes
    // exactly once and the stream reports "stopped".
    let rx = receiver();
    collect(&rx, "stop");
    let s = Stream::new(&rx.url(), "stop", StreamOptions::default()).unwrap();
    let completions = Arc::new(AtomicUsize::new(0));
    let mut sends = 0;
    for i in 0..10_000 {
        if i == 6000 {
            s.stop();
        }
        let c = completions.clone();
        let size = if i % 7 == 0 { 0 } else { 2000 };
        let mut h = ObjHdr::new("b", &i.to_string(), size as i64);
        if i % 7 == 0 {
            h.opaque = b"header only".to_vec();
        }
        let _ = s.send_with(h, vec![0u8; size], move |_, _| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        sends += 1;
    }
    assert_eq!(s.wait(), Termination::Stopped);
    wait_for("every completion", Duration::from_secs(10), || completions.load(Ordering::SeqCst) == sends);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(completions.load(Ordering::SeqCst), sends, "exactly once");
}

#[test]
fn keep_alive_partial_reads_and_dry_run_from_the_environment() {
    // Two PUTs on one connection; the handler reads only part of each
    // object and the rest is drained, so the next object is intact.
    let rx = receiver();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    rx.handle("ka", move |h: &ObjHdr, b: &mut ObjReader<'_>| {
        let mut first = [0u8; 3];
        b.read_exact(&mut first)?;
        s2.lock().unwrap().push((h.name.clone(), first));
        Ok(())
    })
    .unwrap();
    let mut c = TcpStream::connect(rx.local_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for round in 0..2u8 {
        let mut body = Vec::new();
        for i in 0..3u8 {
            let h = ObjHdr::new("b", &format!("{round}-{i}"), 1000);
            frame::encode_obj_frame(&h, false, &mut body, 4096).unwrap();
            body.extend((0..1000).map(|k| (k as u8).wrapping_add(i + round)));
        }
        body.extend_from_slice(&frame::fin_frame());
        let mut req = format!("PUT /v1/objstream/ka HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAis-Session-Id: 5\r\n\r\n{:x}\r\n", body.len()).into_bytes();
        req.extend_from_slice(&body);
        req.extend_from_slice(b"\r\n0\r\n\r\n");
        c.write_all(&req).unwrap();
        let mut resp = [0u8; 38];
        c.read_exact(&mut resp).unwrap();
        assert!(
            resp.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            "{}",
            String::from_utf8_lossy(&resp)
        );
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 6);
    for (n, first) in seen.iter() {
        let (round, i): (u8, u8) = (n[..1].parse().unwrap(), n[2..].parse().unwrap());
        assert_eq!(*first, [round + i, round + i + 1, round + i + 2], "{n}");
    }

    // AIS_STREAM_DRY_RUN through the CLI: objects are read, not printed.
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args([
        "stream",
        "listen",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--trname",
        "d",
        "--stats-interval",
        "0.2",
    ])
    .env("AIS_STREAM_DRY_RUN", "true")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().unwrap());
    let mut stderr = Lines::of(child.0.stderr.take().unwrap());
    wait_for("the listener", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    let out = cli_send(port, "d", &["--count", "25", "--size", "10KiB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The stats lines on stderr show the objects; stdout stays empty.
    let deadline = Instant::now() + Duration::from_secs(20);
    let total = loop {
        let line = stderr.next();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && let Some(n) = v["d"]["total_num"].as_i64()
            && (n == 25 || Instant::now() > deadline)
        {
            assert_eq!(v["d"]["total_size"], n * 10240);
            break n;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(5), "no stats line");
    };
    assert_eq!(total, 25);
    child.0.kill().unwrap();
    let mut stdout = String::new();
    child.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    assert!(stdout.is_empty(), "a dry run prints no objects: {stdout}");
}

#[test]
fn a_receiver_that_never_answers_is_bounded() {
    // A raw listener that reads everything and answers nothing: fin ends
    // with an error after the send timeout instead of waiting for ever.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    });
    let (log, opts) = recorder();
    let opts = StreamOptions { send_timeout: Duration::from_millis(500), ..opts };
    let s = Stream::new(&format!("http://{addr}"), "silent", opts).unwrap();
    s.send(ObjHdr::new("b", "x", 10), vec![0u8; 10]).unwrap();
    let start = Instant::now();
    let t = s.fin();
    assert!(matches!(&t, Termination::Error(StreamError::Network(m)) if m.contains("did not answer")), "{t:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(log.lock().unwrap().len(), 1);
    drop(s);
    sink.join().unwrap();
}

#[test]
fn an_error_answer_survives_a_body_still_coming() {
    // The receiver refuses at the head while the client is still sending a
    // large body: it half-closes and drains, so the client reads the 400
    // and its writes are not reset.
    let rx = receiver();
    let mut c = TcpStream::connect(rx.local_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = vec![0u8; 8 << 20];
    let head = format!("PUT /v1/objstream/nobody HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
    c.write_all(head.as_bytes()).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&body).is_ok());
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text.contains("unknown trname"), "{text}");
    assert!(writer.join().unwrap(), "the body was drained, not reset");
}

#[test]
fn idle_connections_and_stalled_senders_are_closed() {
    let opts = RxOptions { idle_timeout: Duration::from_millis(300), ..RxOptions::default() };
    let rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), opts).unwrap();
    let c = collect(&rx, "idle");
    // A connection that sends half a head, then nothing.
    let mut quiet = TcpStream::connect(rx.local_addr()).unwrap();
    quiet.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    quiet.write_all(b"PUT /v1/objstream/idle HTTP/1.1\r\n").unwrap();
    // A sender that stops in the middle of an object.
    let mut stalled = TcpStream::connect(rx.local_addr()).unwrap();
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut body = Vec::new();
    frame::encode_obj_frame(&ObjHdr::new("b", "half", 1000), false, &mut body, 4096).unwrap();
    body.extend_from_slice(&[1u8; 500]);
    let mut req =
        format!("PUT /v1/objstream/idle HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n", body.len() + 500)
            .into_bytes();
    req.extend_from_slice(&body);
    stalled.write_all(&req).unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    assert_eq!(quiet.read_to_end(&mut rest).unwrap_or(0), 0, "closed without an answer");
    let _ = stalled.read_to_end(&mut rest);
    assert!(start.elapsed() < Duration::from_secs(5));
    wait_for("the handler's error", Duration::from_secs(5), || !c.errors.lock().unwrap().is_empty());
    assert!(matches!(&c.errors.lock().unwrap()[0], RecvError::PeerClosed(m) if m.contains("no bytes moved")));
    wait_for("the connections to go", Duration::from_secs(5), || rx.connections() == 0);
}

#[test]
fn an_object_failing_at_framing_fails_alone() {
    // A header above the stream's limit fails when its batch is framed,
    // before any of its bytes go out; it completes in its turn, after the
    // objects ahead of it, and the stream, and fin, go on.
    let rx = receiver();
    let c = collect(&rx, "alone");
    let (log, opts) = recorder();
    let s = Stream::new(&rx.url(), "alone", opts).unwrap();
    let mut want = Vec::new();
    for i in 0..40 {
        let name = format!("o{i}");
        if i % 10 == 7 {
            let mut big = ObjHdr::new("b", &name, 3);
            big.opaque = vec![0; 5000];
            s.send(big, vec![4, 5, 6]).unwrap();
            want.push((name, true));
        } else {
            s.send(ObjHdr::new("b", &name, 3), vec![1, 2, 3]).unwrap();
            want.push((name, false));
        }
    }
    let start = Instant::now();
    assert_eq!(s.fin(), Termination::EndOfStream);
    assert!(start.elapsed() < Duration::from_secs(10));
    let log = log.lock().unwrap();
    let got: Vec<(String, bool)> = log.iter().map(|(n, e)| (n.clone(), e.is_some())).collect();
    assert_eq!(got, want, "one completion each, in order, the oversized ones failed");
    assert!(log.iter().filter_map(|(_, e)| e.as_deref()).all(|e| e.contains("header is")));
    let names: Vec<_> = c.got.lock().unwrap().iter().map(|g| g.0.name.clone()).collect();
    let sent: Vec<_> = want.iter().filter(|(_, failed)| !failed).map(|(n, _)| n.clone()).collect();
    assert_eq!(names, sent);
}

#[test]
fn panicking_user_code_fails_its_object_not_the_stream_machinery() {
    let rx = receiver();
    rx.handle("p", |h: &ObjHdr, _b: &mut ObjReader<'_>| {
        assert!(h.name != "boom", "a handler bug");
        Ok(())
    })
    .unwrap();
    collect(&rx, "q");

    // A handler that panics: its stream ends with a 400 naming the panic.
    let s = Stream::new(&rx.url(), "p", StreamOptions::default()).unwrap();
    s.send(ObjHdr::new("b", "boom", 1), vec![1]).unwrap();
    let t = s.fin();
    assert!(
        matches!(&t, Termination::Error(StreamError::Rejected { message, .. }) if message.contains("panicked")),
        "{t:?}"
    );

    // A completion callback that panics: the others still run, fin works.
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, _r| {
            s2.fetch_add(1, Ordering::SeqCst);
            assert!(h.name != "cb-boom", "a callback bug");
        })),
        ..StreamOptions::default()
    };
    let s = Stream::new(&rx.url(), "q", opts).unwrap();
    for name in ["a", "cb-boom", "b"] {
        s.send(ObjHdr::new("b", name, 1), vec![1]).unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    assert_eq!(seen.load(Ordering::SeqCst), 3);

    // A reader that panics: its object fails, the stream ends with the
    // error, every object completes once, and nothing hangs.
    struct Bomb;
    impl Read for Bomb {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("a reader bug")
        }
    }
    let (log, opts) = recorder();
    let s = Stream::new(&rx.url(), "q", opts).unwrap();
    s.send(ObjHdr::new("b", "before", 1), vec![1]).unwrap();
    s.send(ObjHdr::new("b", "bomb", 10), Body::Reader(Box::new(Bomb))).unwrap();
    let _ = s.send(ObjHdr::new("b", "after", 1), vec![1]);
    let t = s.fin();
    assert!(matches!(&t, Termination::Error(StreamError::Object(m)) if m.contains("panicked")), "{t:?}");
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 3);
    assert!(log.iter().any(|(n, e)| n == "bomb" && e.is_some()));
}

/// Readers are read on the sending thread, never on the shard: a reader
/// that blocks holds up its own object, while another stream on the same
/// (single) shard runs to its end.
#[test]
fn a_blocked_reader_does_not_stall_the_shard() {
    use shardwire::runtime::{Runtime, RuntimeConfig};
    let rx = receiver();
    let c = collect(&rx, "slow");
    let fast = collect(&rx, "fast");
    let rt = Arc::new(Runtime::start(RuntimeConfig::new(1)).unwrap());

    /// Gives 100 KiB, then blocks until told to go on, then gives the rest.
    /// Not told within 30 s (the shard stalled, so the other stream never
    /// finished and nobody told it), it fails, and so does this test.
    struct Gate {
        given: usize,
        go: std::sync::mpsc::Receiver<()>,
    }
    impl Read for Gate {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.given == 100 << 10 && self.go.recv_timeout(Duration::from_secs(30)).is_err() {
                return Err(std::io::Error::other("nobody opened the gate"));
            }
            let n = buf.len().min((300 << 10) - self.given).min((100 << 10) - self.given % (100 << 10));
            buf[..n].fill(7);
            self.given += n;
            Ok(n)
        }
    }
    let (go, gate) = std::sync::mpsc::channel();
    let slow = Arc::new(Stream::with_runtime(rt.clone(), &rx.url(), "slow", StreamOptions::default()).unwrap());
    let s = slow.clone();
    let sender = std::thread::spawn(move || {
        s.send(ObjHdr::new("b", "gated", 300 << 10), Body::Reader(Box::new(Gate { given: 0, go: gate }))).unwrap();
    });
    wait_for("the gated reader to block", Duration::from_secs(10), || slow.stats().offset > 0);

    let other = Stream::with_runtime(rt.clone(), &rx.url(), "fast", StreamOptions::default()).unwrap();
    for i in 0..50 {
        other.send(ObjHdr::new("b", &format!("f{i}"), 1000), vec![i as u8; 1000]).unwrap();
    }
    assert_eq!(other.fin(), Termination::EndOfStream, "the other stream on the shard completes");
    assert_eq!(fast.got.lock().unwrap().len(), 50);
    assert!(c.got.lock().unwrap().is_empty(), "the gated object is still being read");

    go.send(()).unwrap();
    sender.join().unwrap();
    assert_eq!(slow.fin(), Termination::EndOfStream);
    let got = c.got.lock().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, vec![7u8; 300 << 10]);
    drop(got);
    drop(slow);
    rt.shutdown();
}

/// A handler that reads each object with `read_exact` of its size, so it
/// never sees the object's end (nor a checksum failure there); the hook
/// still tells it.
#[derive(Default, Clone)]
struct ExactReader {
    names: Arc<Mutex<Vec<String>>>,
    bad: Arc<Mutex<Vec<(String, ChecksumError)>>>,
}

impl RecvHandler for ExactReader {
    fn object(&self, _s: &Session, hdr: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError> {
        let mut v = vec![0u8; hdr.attrs.size as usize];
        body.read_exact(&mut v)?;
        self.names.lock().unwrap().push(hdr.name.clone());
        Ok(())
    }
    fn bad_checksum(&self, _s: &Session, hdr: &ObjHdr, err: &ChecksumError) {
        self.bad.lock().unwrap().push((hdr.name.clone(), err.clone()));
    }
}

#[test]
fn checksums_computed_by_the_sender_and_verified_by_the_receiver() {
    let rx = receiver();
    let c = collect(&rx, "ck");
    let exact = ExactReader::default();
    rx.handle("ck-exact", exact.clone()).unwrap();
    for (trname, compression) in [("ck", None), ("ck", Some(BlockSize::K64)), ("ck-exact", None)] {
        c.got.lock().unwrap().clear();
        c.bad.lock().unwrap().clear();
        let (log, mut opts) = recorder();
        opts.checksum = Some(CksumType::Crc32c);
        opts.compression = compression;
        let s = Stream::new(&rx.url(), trname, opts).unwrap();
        let mut sent = Vec::new();
        for i in 0..12u64 {
            let len = [0, 1, 100, 70_000, 300_000, 4096][i as usize % 6];
            let body = bytes(i + 100, len);
            let mut h = ObjHdr::new("bck", &format!("o{i}"), len as i64);
            if i == 7 {
                // The caller's own checksum is kept, not recomputed: here a
                // wrong one, so this object (and only it) fails.
                h.attrs.cksum_type = "sha256".into();
                h.attrs.cksum_value = compute_hex(CksumType::Sha256, b"other bytes");
            }
            if i == 9 {
                // A reader's object keeps its header as it is (none here).
                s.send(h.clone(), Body::Reader(Box::new(std::io::Cursor::new(body.clone())))).unwrap();
            } else {
                s.send(h.clone(), body.clone()).unwrap();
            }
            sent.push((h, body));
        }
        assert_eq!(s.fin(), Termination::EndOfStream, "{trname} {compression:?}: the stream goes on past the failure");
        assert!(log.lock().unwrap().iter().all(|(_, e)| e.is_none()), "the sender sees no error");
        let bad = if trname == "ck" { c.bad.lock().unwrap().clone() } else { exact.bad.lock().unwrap().clone() };
        assert_eq!(bad.len(), 1, "{trname}: one object failed: {bad:?}");
        let (name, e) = &bad[0];
        let want_actual = compute_hex(CksumType::Sha256, &sent[7].1);
        assert_eq!(name, "o7");
        assert_eq!(
            e,
            &ChecksumError::Mismatch {
                ty: CksumType::Sha256,
                expected: compute_hex(CksumType::Sha256, b"other bytes"),
                actual: want_actual.clone()
            }
        );
        assert!(e.to_string().contains(&want_actual), "the error names the actual value: {e}");
        if trname == "ck" {
            // Every other object arrived, with the checksum the sender put
            // in its header (crc32c), or none for the reader's.
            let got = c.got.lock().unwrap();
            let names: Vec<&str> = got.iter().map(|(h, _, _)| h.name.as_str()).collect();
            let want: Vec<String> = (0..12).filter(|&i| i != 7).map(|i| format!("o{i}")).collect();
            assert_eq!(names, want);
            for (h, b, _) in got.iter() {
                let i: usize = h.name[1..].parse().unwrap();
                assert!(b == &sent[i].1, "body of {}", h.name);
                if i == 9 {
                    assert_eq!((h.attrs.cksum_type.as_str(), h.attrs.cksum_value.as_str()), ("", ""));
                } else {
                    assert_eq!(h.attrs.cksum_type, "crc32c");
                    assert_eq!(h.attrs.cksum_value, compute_hex(CksumType::Crc32c, b));
                }
            }
            assert!(c.errors.lock().unwrap().is_empty(), "no stream error: {:?}", c.errors.lock().unwrap());
        } else {
            // The handler that never read to the end took every object,
            // and was told of the bad one afterwards.
            assert_eq!(exact.names.lock().unwrap().len(), 12);
            exact.names.lock().unwrap().clear();
            exact.bad.lock().unwrap().clear();
        }
    }
}

#[test]
fn a_handler_reading_to_the_end_gets_the_checksum_error() {
    let rx = receiver();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    rx.handle("ck-read", move |hdr: &ObjHdr, body: &mut ObjReader<'_>| {
        let mut v = Vec::new();
        match body.read_to_end(&mut v) {
            Ok(_) => s2.lock().unwrap().push(format!("{} ok", hdr.name)),
            Err(e) => {
                let inner = e.get_ref().and_then(|i| i.downcast_ref::<ChecksumError>()).cloned();
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
                let inner = inner.expect("the inner error is the ChecksumError");
                s2.lock().unwrap().push(format!("{} {inner}", hdr.name));
                // Every read after it fails the same way.
                assert!(body.read(&mut [0u8; 8]).is_err());
            }
        }
        Ok(())
    })
    .unwrap();
    let s = Stream::new(&rx.url(), "ck-read", StreamOptions::default()).unwrap();
    for (name, ty, value) in [
        ("good", "xxhash", compute_hex(CksumType::Xxhash, &[1u8; 5000])),
        ("bad", "xxhash", compute_hex(CksumType::Xxhash, &[2u8; 5000])),
        ("unknown", "blake3", "00".to_string()),
        ("after", "md5", compute_hex(CksumType::Md5, &[1u8; 5000])),
    ] {
        let mut h = ObjHdr::new("b", name, 5000);
        h.attrs.cksum_type = ty.into();
        h.attrs.cksum_value = value;
        s.send(h, vec![1u8; 5000]).unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0], "good ok");
    assert!(seen[1].starts_with("bad checksum mismatch: xxhash"), "{}", seen[1]);
    assert!(seen[1].contains(&compute_hex(CksumType::Xxhash, &[1u8; 5000])), "{}", seen[1]);
    assert!(seen[2].starts_with("unknown unknown checksum type \"blake3\""), "{}", seen[2]);
    assert_eq!(seen[3], "after ok");
}
