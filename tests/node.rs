//! `shardwire node` as a real process: its pool read and written by an
//! engine, streams received into a directory, its HTTP pages scraped, its
//! drain on SIGTERM while an initiator writes, a second signal, and
//! settings that name the bad key.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shardwire::engine::{EngineConfig, TransferEngine};
use shardwire::meta::store::KvStore;
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions};

mod interop;
mod prom_text;

use interop::{free_port, poll_true};

/// Bound of every wait on the node (start-up, a page, an exit).
const WAIT: Duration = Duration::from_secs(60);

struct Node {
    child: Child,
    segment: String,
    http: SocketAddr,
    /// Lines of stderr, as they come.
    log: mpsc::Receiver<String>,
    /// Lines of stdout after `segment_id=`.
    out: mpsc::Receiver<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node with `args` and waits for its segment and HTTP address.
fn start(args: &[&str]) -> Node {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.arg("node").args(["--http", "127.0.0.1:0"]);
    if !args.contains(&"--local-server-name") {
        cmd.args(["--local-server-name", "127.0.0.1"]);
    }
    let mut child = cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let (seg_tx, seg_rx) = mpsc::channel();
    let (out_tx, out) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let sent = match line.strip_prefix("segment_id=") {
                Some(s) => seg_tx.send(s.to_string()).is_ok(),
                None => out_tx.send(line).is_ok(),
            };
            if !sent {
                return;
            }
        }
    });
    let segment = seg_rx.recv_timeout(WAIT).expect("the node prints segment_id=");
    let mut http = None;
    let deadline = Instant::now() + WAIT;
    while http.is_none() {
        let line =
            log.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("the node logs its pages");
        if let Some(rest) = line.strip_prefix("shardwire node: serving http://") {
            http = Some(rest.split('/').next().unwrap().parse().unwrap());
        }
    }
    Node { child, segment, http: http.unwrap(), log, out }
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: node\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string())
}

fn initiator(timeout: Duration) -> TransferEngine {
    let config = EngineConfig { local: false, transfer_timeout: timeout, ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    e
}

fn wait_exit(node: &mut Node) -> std::process::ExitStatus {
    interop::poll::exit_within(&mut node.child, WAIT).unwrap_or_else(|| panic!("the node did not exit within {WAIT:?}"))
}

fn signal(node: &Node, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(node.child.id() as i32, sig) }, 0);
}

#[test]
fn serves_its_pool_streams_and_pages_then_drains_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("sw-node-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stream_port = free_port();
    let listen = format!("127.0.0.1:{stream_port}");
    let to_dir = format!("files=dir:{}", dir.display());
    let mut node = start(&[
        "--pool",
        "64MiB",
        "--stream-listen",
        &listen,
        "--trname",
        &to_dir,
        "--trname",
        "tally=count",
        "--drain-timeout",
        "3",
    ]);
    assert_eq!(get(node.http, "/healthz").0, 200);
    assert_eq!(get(node.http, "/readyz"), (200, "ready\n".to_string()));

    // The pool, written and read back by an engine.
    let e = initiator(Duration::from_secs(5));
    let pool = e.get_first_buffer_address(&node.segment).unwrap();
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    e.write_bytes_to_buffer(local, &data).unwrap();
    e.transfer_sync_write(&node.segment, local, pool + 4096, 1 << 20).unwrap();
    e.write_bytes_to_buffer(local, &vec![0u8; 1 << 20]).unwrap();
    e.transfer_sync_read(&node.segment, local, pool + 4096, 1 << 20).unwrap();
    assert!(e.read_bytes_from_buffer(local, 1 << 20).unwrap() == data);

    // Objects into the directory; a name that would leave it fails alone.
    let (done_tx, done_rx) = mpsc::channel();
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| {
            let _ = done_tx.send((h.name.clone(), r.is_ok()));
        })),
        ..StreamOptions::default()
    };
    let s = Stream::new(&format!("http://{listen}"), "files", opts).unwrap();
    s.send(ObjHdr::new("bck", "one", 5), b"hello".to_vec()).unwrap();
    assert_eq!(done_rx.recv_timeout(WAIT).expect("a completion"), ("one".to_string(), true));
    poll_true("the object reaches the directory", WAIT, || dir.join("bck").join("one").exists());
    assert_eq!(std::fs::read(dir.join("bck").join("one")).unwrap(), b"hello");
    // A completion says the object was sent; the receiver refuses it (the
    // stream's error count says so) and writes nothing outside.
    s.send(ObjHdr::new("bck", "../escape", 3), b"bad".to_vec()).unwrap();
    let _ = done_rx.recv_timeout(WAIT).expect("a completion");
    drop(s);
    let errors = "shardwire_stream_errors_total{trname=\"files\",direction=\"rx\"}";
    poll_true("the refusal is counted", WAIT, || {
        prom_text::parse_prometheus(&get(node.http, "/metrics").1).get(errors) == Some(&1.0)
    });
    assert!(!dir.join("escape").exists() && !dir.join("bck").join("escape").exists());

    // The metrics page parses and shows what was served.
    let (status, body) = get(node.http, "/metrics");
    assert_eq!(status, 200);
    let m = prom_text::parse_prometheus(&body);
    let served = "shardwire_transfer_bytes_total{op=\"write\",transport=\"tcp\",side=\"target\"}";
    assert_eq!(m.get(served), Some(&((1u64 << 20) as f64)), "{body}");
    assert!(m.keys().any(|k| k.starts_with("shardwire_stream_objects_total{trname=\"files\"")), "{body}");

    // SIGTERM while the initiator writes: every transfer settles, done or
    // failed with a code, and the node exits 0 within its drain timeout.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let (seg, stop2, written2) = (node.segment.clone(), stop.clone(), written.clone());
    let writer = std::thread::spawn(move || {
        let mut failed = 0u64;
        while !stop2.load(Ordering::Acquire) {
            match e.transfer_sync_write(&seg, local, pool, 256 << 10) {
                Ok(()) => {
                    written2.fetch_add(1, Ordering::Release);
                }
                Err(err) => {
                    assert!(err.code() < 0, "a failure has a code: {err}");
                    failed += 1;
                }
            }
        }
        failed
    });
    // The signal comes while the writer is at it.
    poll_true("the writer's first write", WAIT, || written.load(Ordering::Acquire) > 0);
    signal(&node, libc::SIGTERM);
    let status = wait_exit(&mut node);
    assert_eq!(status.code(), Some(0), "{status}");
    stop.store(true, Ordering::Release);
    let _failed = writer.join().expect("every transfer settled: the writer ended");
    let log: Vec<String> = node.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("stopping: no new peers; draining")), "{log:?}");
    assert!(!log.iter().any(|l| l.contains("panicked")), "nothing panicked, even caught: {log:?}");
    assert!(log.iter().any(|l| l.contains("trname tally: 0 objects")), "{log:?}");
    assert!(log.last().is_some_and(|l| l.ends_with("stopped")), "{log:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let stream_port = free_port();
    let listen = format!("127.0.0.1:{stream_port}");
    let mut node =
        start(&["--pool", "16MiB", "--drain-timeout", "600", "--json", "--stream-listen", &listen, "--trname", "t"]);
    let e = initiator(Duration::from_secs(5));
    let pool = e.get_first_buffer_address(&node.segment).unwrap();
    let local = e.allocate_managed_buffer(64 << 10).unwrap();
    // Keep the node busy so its drain does not finish on its own.
    let stop = Arc::new(AtomicBool::new(false));
    let (seg, stop2) = (node.segment.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        while !stop2.load(Ordering::Acquire) {
            let _ = e.transfer_sync_write(&seg, local, pool, 64 << 10);
        }
    });
    signal(&node, libc::SIGTERM);
    poll_true("the node stops being ready", WAIT, || get(node.http, "/readyz").0 == 503);
    // Draining: no new peers, no new streams (the RPC port is the
    // segment's), while the writer's connection goes on.
    let rpc: SocketAddr = node.segment.parse().unwrap();
    poll_true("the RPC port refuses connections", WAIT, || {
        TcpStream::connect_timeout(&rpc, Duration::from_secs(5)).is_err()
    });
    assert!(TcpStream::connect_timeout(&listen.parse().unwrap(), Duration::from_secs(5)).is_err());
    signal(&node, libc::SIGINT);
    let status = wait_exit(&mut node);
    assert_eq!(status.code(), Some(130), "the second signal ends it, not the drain: {status}");
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
}

/// Registered in an HTTP metadata store (`shardwire metadata-server`):
/// found there by an engine, and its keys gone once it has drained.
#[test]
fn registers_in_a_metadata_store_and_withdraws_on_sigterm() {
    let server = interop::HttpMetaServer::shardwire(&[]);
    let name = format!("127.0.0.1:{}", free_port());
    let mut node =
        start(&["--pool", "16MiB", "--metadata-server", &server.url(), "--local-server-name", &name, "--json"]);
    assert_eq!(node.segment, name);
    let ready: serde_json::Value = serde_json::from_str(&node.out.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(ready["segment_id"], name.as_str());
    assert_eq!(ready["pool_bytes"], 16u64 << 20);
    assert_eq!(ready["http"], node.http.to_string().as_str());
    let mut client = server.client();
    assert!(client.get(&format!("mooncake/ram/{name}")).unwrap().is_some());
    let e = TransferEngine::new();
    e.initialize(&format!("127.0.0.1:{}", free_port()), &server.url(), "tcp", "").unwrap();
    let pool = e.get_first_buffer_address(&name).unwrap();
    let local = e.allocate_managed_buffer(4096).unwrap();
    e.write_bytes_to_buffer(local, b"through the metadata server").unwrap();
    e.transfer_sync_write(&name, local, pool, 27).unwrap();
    e.transfer_sync_read(&name, local + 1024, pool, 27).unwrap();
    assert_eq!(e.read_bytes_from_buffer(local + 1024, 27).unwrap(), b"through the metadata server");
    signal(&node, libc::SIGTERM);
    assert_eq!(wait_exit(&mut node).code(), Some(0));
    let stopped: serde_json::Value = serde_json::from_str(&node.out.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(stopped["stopped"], true);
    assert_eq!(stopped["drained"], true, "nothing was moving");
    assert_eq!(client.get(&format!("mooncake/ram/{name}")).unwrap(), None);
    assert_eq!(client.get(&format!("mooncake/rpc_meta/{name}")).unwrap(), None);
}

#[test]
fn bad_settings_name_their_key() {
    let dir = std::env::temp_dir().join(format!("sw-node-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shardwire")).arg("node").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "pool = \"8MiB\"\npoool = 3\n").unwrap();
    let err = run(&["--config", unknown.to_str().unwrap()]);
    assert!(err.contains("poool"), "{err}");
    let typed = dir.join("typed.toml");
    std::fs::write(&typed, "drain-timeout = \"soon\"\n").unwrap();
    let err = run(&["--config", typed.to_str().unwrap()]);
    assert!(err.contains("drain-timeout") || err.contains("drain_timeout"), "{err}");
    assert!(run(&["--pool", "lots"]).contains("pool"));
    let out =
        Command::new(env!("CARGO_BIN_EXE_shardwire")).args(["node", "--pool", "lots", "--json"]).output().unwrap();
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json: the error as JSON on stdout");
    assert!(err["error"]["message"].as_str().unwrap().contains("pool"), "{err}");
    assert!(run(&["--trname", "x"]).contains("stream-listen"));
    assert!(run(&["--stream-listen", "nowhere", "--trname", "x"]).contains("stream-listen"));
    assert!(run(&["--protocol", "udp"]).contains("protocol"));
    // The file is read.
    let good = dir.join("good.toml");
    std::fs::write(&good, "pool = \"lots\"\n").unwrap();
    assert!(run(&["--config", good.to_str().unwrap()]).contains("pool"));
    let _ = std::fs::remove_dir_all(&dir);
}
