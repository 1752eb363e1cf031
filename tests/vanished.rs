//! A peer whose host vanishes without a word: its processes run on in a
//! network namespace whose veth pair is deleted, so nothing comes back,
//! neither a FIN nor a reset, and what this side sends goes nowhere (a
//! blackhole route drops it here, rather than letting it take the default
//! route off the machine). Only
//! TCP keepalive and `TCP_USER_TIMEOUT`, tied to the transfer timeout,
//! can tell.
//!
//! What must hold, with a transfer timeout of 3 s:
//! - transfers in flight to it (large ones on the shards, small ones on a
//!   caller thread's direct path) each settle, failed, within the timeout
//!   and some slack, and so does every later one;
//! - an object stream to a receiver there ends with an error within its
//!   send timeout, and every object handed to it completes once;
//! - metadata calls to it (the P2P handshake, an HTTP metadata server's
//!   kept connection) fail within their timeouts;
//! - and every TCP connection of this process to that host is closed,
//!   the idle ones too (no transfer would ever have noticed those).
//!
//! Needs root (network namespaces); tools/setup installs iproute2.

mod interop;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interop::netns::Link;
use interop::{KillOnDrop, WAIT, die_with_parent, poll_true, poll_until};
use shardwire::engine::{EngineConfig, TransferEngine};
use shardwire::meta::http::{CALL_TIMEOUT, HttpStore};
use shardwire::meta::store::KvStore;
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions, Termination};

/// The transfer timeout, the stream's timeouts, and thus every liveness
/// bound below.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Slack for a loaded machine: this bounds a hang, it measures nothing.
const SLACK: Duration = Duration::from_secs(10);

/// TCP connections of this network namespace to `ip` (any port) that are
/// not closed, as `(local port, remote port, state)` from
/// `/proc/self/net/tcp`.
fn connections_to(ip: std::net::Ipv4Addr) -> Vec<(u16, u16, &'static str)> {
    let want = format!("{:08X}", u32::from_le_bytes(ip.octets()));
    let text = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
    let state = |s: &str| match s {
        "01" => "ESTABLISHED",
        "02" => "SYN_SENT",
        "04" => "FIN_WAIT1",
        "05" => "FIN_WAIT2",
        "06" => "TIME_WAIT",
        "07" => "CLOSE",
        "08" => "CLOSE_WAIT",
        "09" => "LAST_ACK",
        "0B" => "CLOSING",
        _ => "OTHER",
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, st) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let (rip, rport) = remote.split_once(':')?;
            let lport = u16::from_str_radix(local.split_once(':')?.1, 16).ok()?;
            let rport = u16::from_str_radix(rport, 16).ok()?;
            // TIME_WAIT is the kernel's, owned by no one: closed for us.
            (rip == want && *st != "06").then(|| (lport, rport, state(st)))
        })
        .collect()
}

#[test]
fn a_host_that_vanishes_is_noticed_and_every_transfer_settles_in_time() {
    let tag = 5000 + std::process::id() % 4000;
    let link = Link::new(tag, None);
    let host: std::net::Ipv4Addr = link.peer().parse().unwrap();
    let name = format!("{host}:9601");
    // A target and a stream receiver on the other "host".
    let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", &format!("--local_server_name={name}"), "--buffer_size=67108864"])
        .env("SHARDWIRE_LOCAL", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut target = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    let mut line = String::new();
    BufReader::new(target.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("segment_id={name}"), "the target starts");
    let listen = format!("{host}:9602");
    let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["stream", "listen", "--listen", &listen, "--trname", "far"]).stdout(Stdio::null()).stderr(Stdio::null());
    let _receiver = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    poll_until("the receiver listens", WAIT, || {
        std::net::TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_millis(500))
    });
    // And an HTTP metadata server there, whose client keeps its connection.
    let meta = format!("{host}:9603");
    let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["metadata-server", "--listen", &meta]).stdout(Stdio::null()).stderr(Stdio::null());
    let _meta_server = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    poll_until("the metadata server listens", WAIT, || {
        std::net::TcpStream::connect_timeout(&meta.parse().unwrap(), Duration::from_millis(500))
    });
    let mut store = HttpStore::new(&format!("http://{meta}/metadata")).unwrap();
    store.put("vanished/k", b"{}").unwrap();
    assert_eq!(store.get("vanished/k").unwrap().as_deref(), Some(&b"{}"[..]));

    let config = EngineConfig { local: false, transfer_timeout: TIMEOUT, ..EngineConfig::from_env().unwrap() };
    let e = Arc::new(TransferEngine::with_config(config));
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    let remote = e.get_first_buffer_address(&name).unwrap();
    let local = e.allocate_managed_buffer(32 << 20).unwrap();
    // Connections of every kind, left idle: the shards' (a large write),
    // this thread's direct path (a small one).
    e.transfer_sync_write(&name, local, remote, 16 << 20).unwrap();
    e.transfer_sync_write(&name, local, remote, 4096).unwrap();
    assert!(connections_to(host).len() >= 3, "shards' and this thread's: {:?}", connections_to(host));

    // Busy too: large writes on the shards and small ones on a caller's
    // own connection, each in a loop until one fails.
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = [(8u64 << 20, 1usize << 20), (4096, 24 << 20)]
        .into_iter()
        .map(|(len, at)| {
            let (e, name, stop) = (e.clone(), name.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ok = 0u64;
                loop {
                    if let Err(err) = e.transfer_sync_write(&name, local + at as u64, remote + at as u64, len) {
                        return (ok, err, Instant::now());
                    }
                    ok += 1;
                    assert!(!stop.load(Ordering::Relaxed), "{len}-byte writes still succeed after the cut");
                }
            })
        })
        .collect();
    // A stream, sending all along.
    let completions = Arc::new(Mutex::new(Vec::new()));
    let c = completions.clone();
    let options = StreamOptions {
        connect_timeout: TIMEOUT,
        send_timeout: TIMEOUT,
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| c.lock().unwrap().push((h.name.clone(), r.is_ok())))),
        ..StreamOptions::default()
    };
    let stream = Arc::new(Stream::new(&format!("http://{listen}"), "far", options).unwrap());
    let handed = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stream, handed) = (stream.clone(), handed.clone());
        std::thread::spawn(move || {
            for i in 0.. {
                if stream.send(ObjHdr::new("b", &format!("o{i}"), 64 << 10), vec![7u8; 64 << 10]).is_err() {
                    break;
                }
                handed.fetch_add(1, Ordering::SeqCst);
            }
            (stream.wait(), Instant::now())
        })
    };
    poll_true("the stream carries objects", WAIT, || completions.lock().unwrap().len() >= 8);

    // The host vanishes.
    link.cut();
    let cut = Instant::now();
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        let (ok, err, at) = b.join().unwrap();
        let took = at - cut;
        assert!(ok > 0, "writes went before the cut");
        assert!(took <= TIMEOUT + SLACK, "a transfer in flight settled {took:?} after the cut: {err}");
        eprintln!("in flight at the cut: settled after {took:?}: {err}");
    }
    let (end, at) = sender.join().unwrap();
    assert!(matches!(end, Termination::Error(_)), "the stream ends with an error, not {end:?}");
    assert!(at - cut <= TIMEOUT + SLACK, "the stream ended {:?} after the cut", at - cut);
    poll_until("every object handed to the stream completes", WAIT, || {
        let (done, handed) = (completions.lock().unwrap().len() as u64, handed.load(Ordering::SeqCst));
        if done >= handed { Ok(()) } else { Err(format!("{done} of {handed}")) }
    });
    let mut names: Vec<String> = completions.lock().unwrap().iter().map(|(n, _)| n.clone()).collect();
    let all = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all, "each object completes once");

    // Later transfers, and the handshake, fail within their timeout too.
    for len in [4096u64, 4 << 20] {
        let start = Instant::now();
        let err = e.transfer_sync_write(&name, local, remote, len).expect_err("the host is gone");
        assert!(start.elapsed() <= TIMEOUT + SLACK, "{len}: {:?}: {err}", start.elapsed());
    }
    let start = Instant::now();
    assert!(e.send_probe(&name).is_err(), "the handshake port is gone too");
    assert!(start.elapsed() <= TIMEOUT + SLACK, "the probe took {:?}", start.elapsed());

    // Every connection to the host is closed, the idle ones included (the
    // metadata client's, kept since its last call): keepalive's probes go
    // unanswered for the user timeout.
    poll_until("every connection to the vanished host is closed", TIMEOUT * 2 + SLACK, || {
        let left = connections_to(host);
        if left.is_empty() { Ok(()) } else { Err(left) }
    });
    eprintln!("every connection closed {:?} after the cut", cut.elapsed());
    // And the metadata client's next call fails within its own timeout.
    let start = Instant::now();
    assert!(store.get("vanished/k").is_err(), "the metadata server is gone");
    assert!(start.elapsed() <= CALL_TIMEOUT + SLACK, "the lookup took {:?}", start.elapsed());
    let _ = target.0.kill();
    e.shutdown();
}
