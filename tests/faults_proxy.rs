//! Faults on the wire, between real processes: the proxy of
//! `tests/interop/proxy.rs` sits in front of a `shardwire` target's RPC and
//! data ports (the target advertises the proxy's data address through
//! `SHARDWIRE_TCP_DATA_ADVERTISE`; initiators name the segment by the RPC
//! proxy's address), in front of etcd, and in front of a `shardwire stream
//! listen` receiver, and delays, throttles, stalls, half-closes, resets,
//! truncates and corrupts. Under each fault every request settles once with
//! its code within its bound, transfers after a heal succeed with their
//! bytes intact, and transfers to a peer the proxy does not carry go on
//! undisturbed.
//!
//! Not covered: a corrupted byte in a TCP transfer's payload lands in the
//! target's memory unnoticed, as in Mooncake. TODO(crc32c): the opt-in
//! crc32c payload checksum (issue 13) is the check for that case; its test
//! belongs here once it exists.

mod interop;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use interop::faults::{Bystander, Lines, SLACK, bounded, broken_stream, round_trip, settle};
use interop::proxy::{Conns, Dir, Fault, Proxy, Rule};
use interop::{EtcdServer, KillOnDrop, die_with_parent, free_port, pattern, stream_listener};
use shardwire::engine::{BatchState, EngineConfig, TransferEngine, code};
use shardwire::proto::mooncake::tcp::Opcode;
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions, Termination};

/// The initiators' transfer timeout: short, so that stalls settle soon.
const TIMEOUT: Duration = Duration::from_secs(3);
/// The target's buffer: faults hit its first half, checks after a heal
/// its second (bytes of a timed-out write may still land after a heal).
const BUF: u64 = 8 << 20;
const AFTER_HEAL: u64 = BUF / 2;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// An initiator over TCP only, with the short timeout.
fn initiator() -> TransferEngine {
    let config =
        EngineConfig { transfer_timeout: TIMEOUT, local: false, force_tcp: true, ..EngineConfig::from_env().unwrap() };
    interop::p2p_engine(config, "tcp")
}

/// A `shardwire bench --mode=target` process whose RPC and data ports are
/// reached only through proxies.
struct Target {
    rpc: Proxy,
    data: Proxy,
    /// The segment, as initiators name it: the RPC proxy's address.
    name: String,
    _child: KillOnDrop,
}

fn target() -> Target {
    let (rpc_port, data_port) = (free_port(), free_port());
    let rpc = Proxy::start(loopback(rpc_port));
    let data = Proxy::start(loopback(data_port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", &format!("--local_server_name=127.0.0.1:{rpc_port}")])
        .arg(format!("--buffer_size={BUF}"))
        .env("SHARDWIRE_LOCAL", "0")
        .env("MC_FORCE_TCP", "1")
        .env("SHARDWIRE_TCP_DATA_PORT", data_port.to_string())
        .env("SHARDWIRE_TCP_DATA_ADVERTISE", data.addr().to_string())
        .env("SHARDWIRE_SPIN_US", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("segment_id=127.0.0.1:{rpc_port}"), "the target starts");
    Target { name: rpc.addr().to_string(), rpc, data, _child: child }
}

/// What a batch under a fault must end as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Completed,
    Failed,
    TimedOut,
}

#[test]
fn tcp_transfers_under_each_fault_settle_once_and_recover() {
    use Dir::{Down, Up};
    use Expect::{Completed, Failed, TimedOut};
    use Opcode::{Read, Write};
    let t = target();
    // 8 requests of 256 KiB: over both shards, so over two connections.
    let (n, len) = (8u64, 256u64 << 10);
    let scenarios: [(&str, Dir, Fault, Opcode, Expect); 13] = [
        ("delay", Up, Fault::Delay(Duration::from_millis(5)), Write, Completed),
        ("bandwidth cap", Down, Fault::Bandwidth { bytes_per_s: 8 << 20 }, Read, Completed),
        ("short stall", Up, Fault::Stall { at: 100_000, for_ms: Some(300) }, Write, Completed),
        ("stall of the payload", Up, Fault::Stall { at: 100_000, for_ms: None }, Write, TimedOut),
        ("stall of the answers", Down, Fault::Stall { at: 0, for_ms: None }, Read, TimedOut),
        ("half-close toward the target", Up, Fault::HalfClose { at: 100_000 }, Write, Failed),
        ("half-close toward the initiator", Down, Fault::HalfClose { at: 0 }, Write, Failed),
        ("reset mid-write", Up, Fault::Reset { at: 100_000 }, Write, Failed),
        ("reset mid-read", Down, Fault::Reset { at: 100_000 }, Read, Failed),
        ("truncated write", Up, Fault::Truncate { at: 100_000 }, Write, Failed),
        ("truncated read", Down, Fault::Truncate { at: 100_000 }, Read, Failed),
        // Byte 16 of the first header is its opcode (0x81, WRITE with v2
        // framing): flipped, it is no opcode at all.
        ("corrupt request header", Up, Fault::Corrupt { at: 16 }, Write, Failed),
        // Byte 4 of the first answer is in its status frame's "MCTV" magic.
        ("corrupt status frame", Down, Fault::Corrupt { at: 4 }, Read, Failed),
    ];
    let mut report = Vec::new();
    // Each: what, the fault's direction and rule (on the data proxy, for
    // the connections the scenario's initiator opens), the operation, and
    // how the batch must end.
    for (i, &(what, dir, fault, op, expect)) in scenarios.iter().enumerate() {
        // A fresh initiator: its connections are new, so offsets count
        // from their first byte.
        let e = Arc::new(initiator());
        let local = e.allocate_managed_buffer(BUF).unwrap();
        let remote = e.get_first_buffer_address(&t.name).unwrap();
        let first = t.data.counts().accepted;
        t.data.set(vec![Rule::new(Conns::From(first), dir, fault)]);
        let bystander = Bystander::start(e.clone(), initiator);
        let start = Instant::now();
        let state = settle(&e, &t.name, op, local, remote, n, len, TIMEOUT).expect("the batch is submitted");
        let took = start.elapsed();
        let rounds = bystander.finish();
        let want = match expect {
            Completed => BatchState::Completed,
            Failed => BatchState::Failed,
            TimedOut => BatchState::TimedOut,
        };
        assert_eq!(state, want, "{what}: the batch's state (code {})", state.code());
        assert!(rounds >= 2, "{what}: the bystander went on ({rounds} rounds)");
        // Healed, the same initiator carries on with intact bytes, small
        // (the caller's direct path) and large.
        t.data.heal();
        round_trip(&e, &t.name, local, remote + AFTER_HEAL, 4096, i as u64);
        round_trip(&e, &t.name, local, remote + AFTER_HEAL, 1 << 20, i as u64 + 100);
        report.push(format!("{what}: {state:?} ({}) in {took:?}; bystander {rounds} rounds", state.code()));
        e.shutdown();
    }
    // The initiators reached the data port only through its proxy, as
    // the descriptor said (none of the faults would have fired otherwise).
    assert!(t.data.counts().accepted >= scenarios.len() as u64, "{:?}", t.data.counts());
    eprintln!("{}", report.join("\n"));
}

/// The P2P handshake (the Metadata request on the RPC port) under faults:
/// a clear error within the call's bound, then, healed, the segment opens.
#[test]
fn the_handshake_under_faults_fails_clearly_and_recovers() {
    use Dir::{Down, Up};
    let t = target();
    let faults = [
        ("stalled answer", Down, Fault::Stall { at: 0, for_ms: None }, code::SOCKET, "rpc to"),
        ("reset", Down, Fault::Reset { at: 0 }, code::SOCKET, "reset by peer"),
        ("answer cut in its length prefix", Down, Fault::Truncate { at: 4 }, code::SOCKET, "failed to fill"),
        ("request never finished", Up, Fault::HalfClose { at: 3 }, code::SOCKET, "failed to fill"),
        // The top byte of the length prefix: an absurd length.
        ("corrupt length", Down, Fault::Corrupt { at: 7 }, code::SOCKET, "frame length"),
        // The first byte of the JSON body (after 8 bytes of length, 1 of type).
        ("corrupt descriptor", Down, Fault::Corrupt { at: 9 }, code::MALFORMED_JSON, "bad segment descriptor"),
    ];
    for (what, dir, fault, want, says) in faults {
        let e = Arc::new(initiator());
        let first = t.rpc.counts().accepted;
        t.rpc.set(vec![Rule::new(Conns::From(first), dir, fault)]);
        let (e2, name) = (e.clone(), t.name.clone());
        let err = bounded(what, TIMEOUT + SLACK, move || e2.get_first_buffer_address(&name))
            .expect_err(&format!("{what}: the lookup must fail"));
        assert_eq!(err.code(), want, "{what}: {err}");
        // The error names the peer, and what went wrong.
        assert!(err.message().contains(&t.name) && err.message().contains(says), "{what}: {err}");
        t.rpc.heal();
        let remote = e.get_first_buffer_address(&t.name).unwrap_or_else(|err| panic!("{what}, healed: {err}"));
        let local = e.allocate_managed_buffer(1 << 20).unwrap();
        round_trip(&e, &t.name, local, remote + AFTER_HEAL, 65_536, 7);
        eprintln!("handshake, {what}: {err}");
        e.shutdown();
    }
}

/// etcd through a proxy: an initiator finds its peers through it. A lookup
/// under a fault fails with a metadata error within the client's bound;
/// healed, it succeeds and the transfer goes through.
#[test]
fn etcd_lookups_under_faults_fail_clearly_and_recover() {
    use Dir::{Down, Up};
    let etcd = EtcdServer::start();
    let p = Proxy::start(etcd.endpoint.parse().unwrap());
    let via = format!("etcd://{}", p.addr());
    let config =
        EngineConfig { transfer_timeout: TIMEOUT, local: false, force_tcp: true, ..EngineConfig::from_env().unwrap() };
    let e = Arc::new(TransferEngine::with_config(config.clone()));
    e.initialize("127.0.0.1:7300", &via, "tcp", "").expect("initialize through the proxy");
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    let faults = [
        ("stalled answer", Down, Fault::Stall { at: 0, for_ms: None }),
        ("reset", Down, Fault::Reset { at: 0 }),
        ("truncated answer", Down, Fault::Truncate { at: 20 }),
        ("request never finished", Up, Fault::HalfClose { at: 10 }),
        // The status code's first digit, in "HTTP/1.1 200 OK".
        ("corrupt status line", Down, Fault::Corrupt { at: 9 }),
    ];
    for (i, (what, dir, fault)) in faults.into_iter().enumerate() {
        // A target registered straight with etcd, under a name the
        // initiator has not looked up yet.
        let name = format!("127.0.0.1:{}", 7301 + i);
        let target = TransferEngine::with_config(config.clone());
        target.initialize(&name, &etcd.url(), "tcp", "").unwrap();
        let remote = target.allocate_managed_buffer(1 << 20).unwrap();
        p.set(vec![Rule::new(Conns::From(p.counts().accepted), dir, fault)]);
        let (e2, n2) = (e.clone(), name.clone());
        let err = bounded(what, Duration::from_secs(10) + SLACK, move || e2.get_first_buffer_address(&n2))
            .expect_err(&format!("{what}: the lookup must fail"));
        assert_eq!(err.code(), code::METADATA, "{what}: {err}");
        assert!(err.message().contains("etcd"), "{what}: {err}");
        p.heal();
        e.get_first_buffer_address(&name).unwrap_or_else(|err| panic!("{what}, healed: {err}"));
        let data = pattern(65_536, i as u64);
        e.write_bytes_to_buffer(local, &data).unwrap();
        e.transfer_sync_write(&name, local, remote, 65_536).unwrap();
        assert!(target.read_bytes_from_buffer(remote, 65_536).unwrap() == data, "{what}: bytes");
        eprintln!("etcd, {what}: {err}");
        target.shutdown();
    }
    e.shutdown();
}

/// Object streams to a `shardwire stream listen` process through a proxy:
/// under each fault the stream ends with an error within the send timeout,
/// every object sent completes exactly once, and a new stream after the
/// heal delivers every object.
#[test]
fn object_streams_under_faults_complete_each_object_once_and_recover() {
    use Dir::{Down, Up};
    let port = free_port();
    let mut child = stream_listener(port, "f");
    let lines = Lines::of(child.0.stdout.take().unwrap());
    let p = Proxy::start(loopback(port));
    let url = format!("http://{}", p.addr());
    let send_timeout = Duration::from_secs(2);
    let faults = [
        ("reset", Up, Fault::Reset { at: 200_000 }),
        ("truncated", Up, Fault::Truncate { at: 200_000 }),
        ("half-closed toward the receiver", Up, Fault::HalfClose { at: 200_000 }),
        ("stalled", Up, Fault::Stall { at: 200_000, for_ms: None }),
        ("answer reset", Down, Fault::Reset { at: 0 }),
        // The request line's first byte: not an HTTP method any more.
        ("corrupt request head", Up, Fault::Corrupt { at: 0 }),
    ];
    for (round, (what, dir, fault)) in faults.into_iter().enumerate() {
        p.set(vec![Rule::new(Conns::From(p.counts().accepted), dir, fault)]);
        let opts = StreamOptions { send_timeout, ..StreamOptions::default() };
        let (sent, failed, end) = broken_stream(what, &url, "f", &format!("r{round}-"), opts);
        // A completion says an object went out (as in AIStore), not that
        // it was taken: objects still in flight when the sender learns of
        // the fault fail; those already out completed, and the stream's end
        // carries the error. How many are which depends on timing.
        eprintln!("stream, {what}: {end}; {sent} objects, {failed} failed");

        // Healed: a new stream delivers everything.
        p.heal();
        let s = Stream::new(&url, "f", StreamOptions { send_timeout, ..StreamOptions::default() }).unwrap();
        for i in 0..5 {
            s.send(ObjHdr::new("b", &format!("healed{round}-{i}"), 1000), vec![7u8; 1000]).unwrap();
        }
        assert_eq!(s.fin(), Termination::EndOfStream, "{what}: healed");
        for i in 0..5 {
            lines.find(&format!("\"healed{round}-{i}\""));
        }
    }
    drop(p);
    let _ = child.0.kill();
}
