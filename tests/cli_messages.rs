//! The CLI's failures, run as processes: each says what failed in one
//! sentence on stderr (never a Rust `Debug` dump) and exits non-zero; with
//! `--json`, stdout carries `{"error": {"code", "message"}}`, and a
//! command's JSON result parses.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[path = "interop/poll.rs"]
mod poll;

/// A finished run.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `shardwire <args>` with `env` set, to its end (killed, and the test
/// failed, past 60 s).
fn shardwire(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("shardwire starts");
    // Both pipes are drained on threads, so a chatty child cannot block.
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let Some(status) = poll::exit_within(&mut child, Duration::from_secs(60)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("shardwire {args:?} kept running");
    };
    let collect = |rx: mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(10)).expect("the pipe closes");
    Run { code: status.code(), stdout: collect(out), stderr: collect(err) }
}

fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// The run failed with `exit`, and its stderr ends with one sentence
/// `shardwire: ...` that contains `says` and no debug noise.
fn failed_saying(r: &Run, exit: i32, says: &str) -> String {
    assert_eq!(r.code, Some(exit), "exit code; stderr: {}", r.stderr);
    let line = r.stderr.lines().last().unwrap_or_default().to_string();
    assert!(line.starts_with("shardwire: "), "the last line of stderr is not the sentence: {:?}", r.stderr);
    assert!(line.contains(says), "{line:?} does not say {says:?}");
    for noise in ["{", "Rejected", "Error(", "Some(", "Network(", "\\\"", "panicked"] {
        assert!(!r.stderr.contains(noise), "debug noise {noise:?} in {:?}", r.stderr);
    }
    line
}

/// Parses the last line of stdout as `{"error": {"code", "message"}}` and
/// returns the code, checking the message is the stderr sentence's.
fn json_error(r: &Run) -> String {
    let v = last_json(r);
    let e = &v["error"];
    let message = e["message"].as_str().unwrap_or_else(|| panic!("no error message in {v}"));
    assert!(r.stderr.contains(message), "the JSON message {message:?} is not the sentence in {:?}", r.stderr);
    e["code"].as_str().unwrap_or_else(|| panic!("no error code in {v}")).to_string()
}

fn last_json(r: &Run) -> serde_json::Value {
    let line = r.stdout.lines().last().unwrap_or_else(|| panic!("no stdout; stderr: {}", r.stderr));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
}

/// A port nothing listens on (bound, then let go).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `shardwire <args>`, a command that serves until killed, and
/// reads its stdout to the end on a thread (its lines need a reader),
/// handing each line over.
fn serving(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("shardwire starts");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// A `shardwire stream listen --json` process for trname `good`, killed on
/// drop.
struct Listener {
    child: Child,
    url: String,
}

impl Listener {
    fn start() -> Listener {
        let (child, rx) = serving(&["stream", "listen", "--listen", "127.0.0.1:0", "--trname", "good", "--json"]);
        let first = rx.recv_timeout(Duration::from_secs(20)).expect("the listener's first line within 20 s");
        let v: serde_json::Value = serde_json::from_str(&first).expect("--json: the first line is JSON");
        assert_eq!(v["trnames"], serde_json::json!(["good"]));
        let url = v["listening"].as_str().expect("listening: the URL").to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "it listens where it says");
        Listener { child, url }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// N of "failed after N object(s) (B bytes) had gone out", or 0 for
/// "failed before any object went out" (objects of 4 KiB).
fn went_out_before_failure(line: &str) -> u64 {
    if line.contains("failed before any object went out") {
        return 0;
    }
    let after = line.split("failed after ").nth(1).unwrap_or_else(|| panic!("{line}: no count"));
    let n: u64 = after.split(' ').next().unwrap().parse().unwrap_or_else(|e| panic!("{line}: {e}"));
    let bytes = format!("{} ({} bytes) had gone out", if n == 1 { "object" } else { "objects" }, n * 4096);
    assert!(after.contains(&bytes), "{line}: wanted {bytes:?}");
    n
}

#[test]
fn a_rejected_stream_says_why_and_claims_nothing() {
    let l = Listener::start();
    let send = |json: bool| {
        let mut args = vec!["stream", "send", "--to", &l.url, "--trname", "bad", "--count", "3"];
        if json {
            args.push("--json");
        }
        shardwire(&args, &[])
    };
    let r = send(false);
    let line = failed_saying(&r, 1, "refused the stream (HTTP 400): unknown trname \"bad\"");
    assert!(!r.stderr.contains("sent 3"), "a failed send claims success: {line}");
    // How many went out before the receiver's answer came is the race's;
    // the sentence says which it was.
    assert!(went_out_before_failure(&line) <= 3, "{line}");

    let r = send(true);
    failed_saying(&r, 1, "unknown trname");
    assert_eq!(json_error(&r), "rejected");
    let v = last_json(&r);
    assert_eq!((v["sent"].as_u64(), v["termination"].as_str()), (Some(0), Some("error")), "{v}");
    let said = went_out_before_failure(v["error"]["message"].as_str().unwrap());
    assert_eq!(v["went_out"].as_u64(), Some(said), "{v}");

    // The same objects to a trname it has: acknowledged, and said so.
    let r = shardwire(&["stream", "send", "--to", &l.url, "--trname", "good", "--count", "3", "--json"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v = last_json(&r);
    assert_eq!((v["sent"].as_u64(), v["termination"].as_str()), (Some(3), Some("end-of-stream")), "{v}");
    assert!(v.get("error").is_none(), "{v}");
    let r = shardwire(&["stream", "send", "--to", &l.url, "--trname", "good", "--count", "3"], &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("sent 3 objects, 12288 bytes"), "{}", r.stderr);
}

#[test]
fn stream_send_failures_are_sentences() {
    let port = closed_port().to_string();
    let to = format!("http://127.0.0.1:{port}");
    let r = shardwire(&["stream", "send", "--to", &to, "--trname", "t", "--count", "2", "--json"], &[]);
    failed_saying(&r, 1, "failed before any object went out: network error: connect to");
    assert_eq!(json_error(&r), "network");

    let r = shardwire(&["stream", "send", "--to", "nonsense", "--trname", "t", "--count", "1", "--json"], &[]);
    failed_saying(&r, 2, "\"nonsense\" is not a receiver URL: give http://HOST:PORT");
    assert_eq!(json_error(&r), "invalid_argument");

    let r = shardwire(&["stream", "send", "--to", &to, "--trname", "t", "/no/such/file", "--json"], &[]);
    failed_saying(&r, 1, "cannot read /no/such/file");
    assert_eq!(json_error(&r), "io");
    let dir = std::env::temp_dir();
    let r = shardwire(&["stream", "send", "--to", &to, "--trname", "t", dir.to_str().unwrap()], &[]);
    failed_saying(&r, 1, "it is a directory");

    for (flag, value, says) in [
        ("--size", "abc", "--size \"abc\" is not a size"),
        ("--compress", "7", "--compress \"7\" is not an LZ4 block size"),
        ("--pdu", "1GiB", "PDU size 1073741824 is outside 1..=131056 bytes"),
    ] {
        let r = shardwire(&["stream", "send", "--to", &to, "--trname", "t", "--count", "1", flag, value], &[]);
        failed_saying(&r, 2, says);
    }
}

#[test]
fn stream_listen_failures_are_sentences() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let r = shardwire(&["stream", "listen", "--listen", &addr, "--trname", "t", "--json"], &[]);
    failed_saying(&r, 1, &format!("cannot listen on {addr}: Address already in use"));
    assert_eq!(json_error(&r), "listen");

    let r = shardwire(&["stream", "listen", "--listen", "127.0.0.1:0", "--trname", "t", "--stats-interval=-1"], &[]);
    failed_saying(&r, 2, "--stats-interval -1 is not valid: give a positive number of seconds");
    let r = shardwire(&["stream", "listen", "--listen", "127.0.0.1:0", "--trname", "t", "--trname", "t"], &[]);
    failed_saying(&r, 2, "--trname \"t\" is given twice");
    let r = shardwire(&["stream", "listen", "--listen", "127.0.0.1:0", "--trname", "a/b"], &[]);
    failed_saying(&r, 1, "trname must be a non-empty path segment");
}

#[test]
fn transfer_bench_failures_are_sentences() {
    let small = ["--duration=1", "--threads=1", "--batch_size=1", "--buffer_size=1048576"];
    let segment = format!("--segment_id=127.0.0.1:{}", closed_port());
    let r = shardwire(&[&["bench", "--mode=initiator", &segment, "--json"][..], &small].concat(), &[]);
    failed_saying(&r, 1, "cannot look up segment 127.0.0.1:");
    assert_eq!(json_error(&r), "socket");

    let r = shardwire(&["bench", "--mode=initiator", "--json"], &[]);
    failed_saying(&r, 2, "--mode=initiator needs --segment_id");
    assert_eq!(json_error(&r), "usage");

    let r = shardwire(&[&["bench", "--metadata_server=foo://x", "--json"][..], &small].concat(), &[]);
    failed_saying(&r, 2, "cannot start the engine (tcp with metadata foo://x): metadata server \"foo://x\"");
    assert_eq!(json_error(&r), "invalid_argument");

    let etcd = format!("--metadata_server=etcd://127.0.0.1:{}", closed_port());
    let r = shardwire(&[&["bench", &etcd, "--json"][..], &small].concat(), &[]);
    failed_saying(&r, 1, "cannot start the engine");
    assert_eq!(json_error(&r), "metadata");

    let http = format!("--metadata_server=http://127.0.0.1:{}/metadata", closed_port());
    let r = shardwire(&[&["bench", &http, "--json"][..], &small].concat(), &[]);
    failed_saying(&r, 1, "cannot start the engine (tcp with metadata http://127.0.0.1:");
    assert_eq!(json_error(&r), "metadata");

    let r = shardwire(&["metadata-server", "--listen", "127.0.0.1:1:2"], &[]);
    failed_saying(&r, 1, "cannot start the metadata server: cannot listen on 127.0.0.1:1:2");

    let r = shardwire(&["bench", "--block_size=0", "--duration=1", "--json"], &[]);
    failed_saying(&r, 2, "must be non-zero and fit in buffer_size");
    assert_eq!(json_error(&r), "invalid_argument");
}

#[test]
fn bad_flags_and_environment_fail_as_usage_with_json() {
    // clap's own refusal (its usage follows for people); JSON for tools.
    let r = shardwire(&["bench", "--report_unit=XX", "--json"], &[]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("invalid value 'XX' for '--report_unit"), "{}", r.stderr);
    let v = last_json(&r);
    assert_eq!(v["error"]["code"], "usage");
    assert!(v["error"]["message"].as_str().unwrap().contains("possible values: GB, GiB"), "{v}");

    let r = shardwire(&["topo", "--plan-json"], &[("MC_TRANSFER_TIMEOUT", "abc")]);
    failed_saying(&r, 2, "MC_TRANSFER_TIMEOUT=\"abc\" is not valid");
    assert_eq!(json_error(&r), "config");

    let r = shardwire(&["topo", "--plan-json", "--sysfs-root", "/no/such/sysfs"], &[]);
    failed_saying(&r, 1, "sysfs root /no/such/sysfs");
    assert_eq!(json_error(&r), "topology");
    // `topo --json` writes a file for MC_CUSTOM_TOPO_JSON: nothing on stdout.
    let r = shardwire(&["topo", "--json", "--sysfs-root", "/no/such/sysfs"], &[]);
    failed_saying(&r, 1, "sysfs root /no/such/sysfs");
    assert!(r.stdout.is_empty(), "{}", r.stdout);

    for (args, says) in [
        (&["bench", "stream", "--size", "abc", "--json"][..], "--size \"abc\" is not a size"),
        (&["bench", "stream", "--duration=-1", "--json"][..], "--duration -1 is not valid"),
        (&["bench", "rdma-sim", "--duration", "0", "--json"][..], "--duration 0 is not valid"),
        (&["bench", "rdma-sim", "--devices", "0", "--duration", "0.1", "--json"][..], "1 to 16 --devices"),
        (&["bench", "batches", "--requests", "0", "--json"][..], "--requests, --batch and --block_size must be"),
    ] {
        let r = shardwire(args, &[]);
        failed_saying(&r, 2, says);
        let code = json_error(&r);
        assert!(code == "usage" || code == "invalid_argument", "{args:?}: {code}");
    }
}

#[test]
fn json_results_parse() {
    let quick: &[&[&str]] = &[
        &["bench", "--json", "--duration=1", "--threads=1", "--batch_size=1", "--buffer_size=1048576"],
        &["bench", "batches", "--json", "--requests=64", "--batch=16", "--repeats=1"],
        &["bench", "stream", "--json", "--duration=0.2", "--size=4KiB"],
        &["bench", "rdma-sim", "--json", "--duration=0.05", "--repeats=1"],
        &[
            "bench",
            "runtime",
            "--json",
            "--messages=1000",
            "--repeats=1",
            "--round-trips=100",
            "--parked-round-trips=10",
        ],
        &["topo", "--plan-json"],
    ];
    for args in quick {
        let r = shardwire(args, &[("SHARDWIRE_FABRIC", "sim")]);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        let text = r.stdout.trim();
        let last = if args[0] == "topo" { text } else { text.lines().last().unwrap_or_default() };
        let v: serde_json::Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("{args:?}: {last:?} is not JSON: {e}"));
        assert!(v.is_object() && v.get("error").is_none(), "{args:?}: {v}");
    }
}

#[test]
fn a_target_prints_its_segment_as_json_too() {
    let (mut child, rx) = serving(&["bench", "--mode=target", "--buffer_size=1048576", "--json"]);
    let next = || rx.recv_timeout(Duration::from_secs(20)).expect("a line from the target within 20 s");
    let (first, second) = (next(), next());
    let _ = child.kill();
    let _ = child.wait();
    let name = first.strip_prefix("segment_id=").unwrap_or_else(|| panic!("{first:?}")).to_string();
    let v: serde_json::Value = serde_json::from_str(&second).unwrap_or_else(|e| panic!("{second:?}: {e}"));
    assert_eq!(v["segment_id"], name.as_str());
    assert_eq!(v["buffer_size"], 1048576);
    assert!(v["buffer"].as_u64().is_some_and(|b| b != 0), "{v}");
}

#[test]
fn a_file_shorter_than_its_size_fails_the_stream_and_says_so() {
    // A sysfs file: 4096 bytes by its size, one short line when read.
    let short = "/sys/devices/system/cpu/online";
    let declared = std::fs::metadata(short).unwrap().len();
    assert!(declared > std::fs::read(short).unwrap().len() as u64, "{short} reads as long as its size");
    let l = Listener::start();
    let r = shardwire(&["stream", "send", "--to", &l.url, "--trname", "good", short, "--json"], &[]);
    let line = failed_saying(&r, 1, "failed before any object went out: object error: object online");
    assert!(line.contains("the reader ended after") && line.contains(&format!("of {declared} bytes")), "{line}");
    assert_eq!(json_error(&r), "object");
    let v = last_json(&r);
    assert_eq!((v["sent"].as_u64(), v["went_out"].as_u64()), (Some(0), Some(0)), "{v}");
}
