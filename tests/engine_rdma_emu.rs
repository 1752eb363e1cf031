//! RDMA across processes on the emulated fabric (`SHARDWIRE_FABRIC=emu`):
//! every peer here is a process of its own, set up only through the
//! environment, and reached through its soft NICs, addressed by the real
//! Connection handshake. This process's engines run on an `EmuFabric` of
//! their own (its own listeners), as another process would.
//!
//! Peers: `shardwire bench` (the CLI), and this test binary run again as
//! an engine-API peer (`emu_peer` below), which fills and checks its own
//! memory on command so that bytes are checked on the far side. Every
//! wait has a deadline; no assertion measures speed.

mod interop;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use interop::{KillOnDrop, die_with_parent, pattern};
use shardwire::config::EmuFault;
use shardwire::engine::{BatchState, EngineConfig, TransferEngine, TransferOpcode, TransferRequest};
use shardwire::transport::rdma::emu::{EmuConfig, EmuFabric};
use shardwire::transport::rdma::fabric::{Fabric, PortState};

/// How long any one step may take here, at most.
const STEP: Duration = Duration::from_secs(60);

/// The environment a peer process gets: emu, no same-host shortcut.
fn emu_env<'a>(cmd: &'a mut Command, faults: Option<&str>) -> &'a mut Command {
    cmd.env("SHARDWIRE_FABRIC", "emu").env("SHARDWIRE_LOCAL", "0").env_remove("SHARDWIRE_EMU_DEVICES");
    match faults {
        Some(f) => cmd.env("SHARDWIRE_EMU_FAULTS", f),
        None => cmd.env_remove("SHARDWIRE_EMU_FAULTS"),
    }
}

/// Lines of a child's stdout, read on a thread of their own so that a
/// wait for one has a deadline.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = BufReader::new(child.stdout.take().expect("stdout piped"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// What follows `prefix` in the next line that has it, within [`STEP`]
/// (the test harness may print before it on the same line).
fn line_with(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    try_line_with(lines, prefix).unwrap_or_else(|e| panic!("{e}"))
}

fn try_line_with(lines: &mpsc::Receiver<String>, prefix: &str) -> Result<String, String> {
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => match l.find(prefix) {
                Some(at) => return Ok(l[at + prefix.len()..].trim().to_string()),
                None => continue,
            },
            Err(e) => return Err(format!("no line with {prefix:?} within {STEP:?}: {e}")),
        }
    }
}

/// A child's stderr, gathered on a thread of its own.
fn log_of(child: &mut Child) -> Arc<Mutex<String>> {
    let mut err = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(String::new()));
    let into = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                return;
            }
            into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// `shardwire bench --mode=target --protocol=rdma` in its own process.
struct Target {
    child: KillOnDrop,
    name: String,
}

impl Target {
    /// On RPC port `port` (or one of its choosing), with `faults`.
    fn spawn(port: Option<u16>, faults: Option<&str>) -> Target {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
        cmd.args(["bench", "--mode=target", "--protocol=rdma", "--buffer_size=67108864"]);
        if let Some(p) = port {
            cmd.arg(format!("--local_server_name=127.0.0.1:{p}"));
        }
        emu_env(&mut cmd, faults).env("SHARDWIRE_SPIN_US", "20").stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = die_with_parent(&mut cmd).spawn().expect("shardwire runs");
        let (lines, log) = (lines_of(&mut child), log_of(&mut child));
        let name = try_line_with(&lines, "segment_id=").unwrap_or_else(|e| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the target: {e}; it said:\n{}", log.lock().unwrap())
        });
        Target { child: KillOnDrop(child), name }
    }

    fn kill(&mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }
}

/// Runs `cmd` to its end, within [`STEP`] (killed past it).
fn run(cmd: &mut Command) -> Output {
    let child = die_with_parent(cmd.stdout(Stdio::piped()).stderr(Stdio::piped())).spawn().expect("it runs");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(STEP) {
        Ok(out) => out.expect("its output"),
        Err(_) => {
            // SAFETY: kill(2) on the child's pid, which is still ours (not
            // reaped: wait_with_output has not returned).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not end within {STEP:?}");
        }
    }
}

/// `shardwire bench --mode=initiator --protocol=rdma --json` against
/// `segment`: its report, and its log.
fn bench_initiator(segment: &str, operation: &str, faults: Option<&str>) -> (serde_json::Value, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args([
        "bench",
        "--mode=initiator",
        &format!("--segment_id={segment}"),
        "--protocol=rdma",
        &format!("--operation={operation}"),
        "--duration=3",
        "--threads=2",
        "--batch_size=16",
        "--buffer_size=67108864",
        "--json",
    ]);
    emu_env(&mut cmd, faults).env("SHARDWIRE_LOG", "info");
    let out = run(&mut cmd);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let report = serde_json::from_str(stdout.lines().last().expect("a report")).expect("JSON");
    (report, stderr)
}

/// Checks a bench report: RDMA carried it, every device moved bytes, no
/// batch failed.
fn carried_by_every_device(report: &serde_json::Value) {
    assert_eq!(report["transport"], "rdma", "{report}");
    assert_eq!(report["failed_batches"], 0, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    let devices = report["device_bytes"].as_object().unwrap();
    assert_eq!(devices.keys().map(String::as_str).collect::<Vec<_>>(), ["emu0", "emu1"], "{report}");
    assert!(devices.values().all(|b| b.as_u64().unwrap() > 0), "every device carried bytes: {report}");
}

/// `shardwire bench --protocol=rdma` between two processes, writes and
/// reads; then again with a device of both going down a second in.
#[test]
fn the_cli_bench_runs_across_processes_on_every_device() {
    let target = Target::spawn(None, None);
    for operation in ["write", "read"] {
        let (report, _) = bench_initiator(&target.name, operation, None);
        carried_by_every_device(&report);
    }
    drop(target);
    // emu1 goes down in both processes, a second after each made its
    // fabric: the run goes on over emu0, without a failed batch.
    let faults = Some("emu1:down@1");
    let target = Target::spawn(None, faults);
    let (report, log) = bench_initiator(&target.name, "write", faults);
    assert_eq!(report["transport"], "rdma", "{report}");
    assert_eq!(report["failed_batches"], 0, "{report}\n{log}");
    assert!(log.contains("emu: device emu1 port down"), "the fault happened during the run:\n{log}");
    assert!(report["device_bytes"]["emu0"].as_u64().unwrap() > 0, "{report}");
}

/// An engine of this process on `fabric`, without the same-host path, so
/// RDMA carries the bytes.
fn engine_on(fabric: &Arc<EmuFabric>, timeout: Duration) -> TransferEngine {
    let fabric = Some(fabric.clone() as Arc<dyn Fabric>);
    let config = EngineConfig { local: false, fabric, transfer_timeout: timeout, ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "").expect("initialize");
    e
}

fn fabric(faults: Vec<EmuFault>) -> Arc<EmuFabric> {
    Arc::new(EmuFabric::new(EmuConfig { faults, ..EmuConfig::new(&["emu0", "emu1"]) }).unwrap())
}

/// This test binary run again as an engine-API peer (see `emu_peer`).
struct Peer {
    _child: KillOnDrop,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    name: String,
    buffer: u64,
}

impl Peer {
    /// A peer with `bytes` of buffer, under `faults`.
    fn spawn(bytes: u64, faults: Option<&str>) -> Peer {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["emu_peer", "--exact", "--nocapture", "--test-threads=1"]).env("EMU_PEER_BYTES", bytes.to_string());
        emu_env(&mut cmd, faults).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = die_with_parent(&mut cmd).spawn().expect("the test binary runs");
        let stdin = child.stdin.take().unwrap();
        let lines = lines_of(&mut child);
        let ready = line_with(&lines, "peer ready ");
        let (name, buffer) = ready.split_once(' ').expect("a name and an address");
        Peer { _child: KillOnDrop(child), stdin, lines, name: name.into(), buffer: buffer.parse().unwrap() }
    }

    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("the peer is alive");
        self.stdin.flush().unwrap();
        line_with(&self.lines, "peer: ")
    }
}

/// The peer's side (run only as a child, with EMU_PEER_BYTES set): an
/// engine from the environment (SHARDWIRE_FABRIC=emu), a managed buffer,
/// and commands on stdin, each answered on stdout:
/// `fill OFF LEN SEED`, `check OFF LEN SEED` (its own buffer),
/// `write SEGMENT REMOTE LEN SEED`, `read SEGMENT REMOTE LEN SEED` (from
/// its buffer's start, the read checked), `transport SEGMENT`, `quit`.
#[test]
fn emu_peer() {
    let Ok(bytes) = std::env::var("EMU_PEER_BYTES") else { return };
    let e = TransferEngine::new();
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "").expect("initialize");
    let buf = e.allocate_managed_buffer(bytes.parse().unwrap()).unwrap();
    println!("peer ready {} {buf}", e.segment_name().unwrap());
    let say = |text: String| {
        println!("peer: {text}");
        std::io::stdout().flush().unwrap();
    };
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w[i].parse::<u64>().unwrap();
        match w[0] {
            "quit" => break,
            "transport" => say(e.transport_for(w[1]).unwrap().to_string()),
            "fill" => {
                e.write_bytes_to_buffer(buf + num(1), &pattern(num(2) as usize, num(3))).unwrap();
                say("ok".into());
            }
            "check" => {
                let got = e.read_bytes_from_buffer(buf + num(1), num(2)).unwrap();
                let want = pattern(num(2) as usize, num(3));
                match got.iter().zip(&want).position(|(a, b)| a != b) {
                    None => say("ok".into()),
                    Some(i) => say(format!("mismatch at {i}")),
                }
            }
            "write" => {
                e.write_bytes_to_buffer(buf, &pattern(num(3) as usize, num(4))).unwrap();
                match e.transfer_sync_write(w[1], buf, num(2), num(3)) {
                    Ok(()) => say("ok".into()),
                    Err(err) => say(format!("fail {err}")),
                }
            }
            "read" => {
                e.write_bytes_to_buffer(buf, &vec![0; num(3) as usize]).unwrap();
                let got = e
                    .transfer_sync_read(w[1], buf, num(2), num(3))
                    .and_then(|()| e.read_bytes_from_buffer(buf, num(3)));
                match got {
                    Ok(b) if b == pattern(num(3) as usize, num(4)) => say("ok".into()),
                    Ok(_) => say("fail mismatch".into()),
                    Err(err) => say(format!("fail {err}")),
                }
            }
            other => say(format!("unknown command {other}")),
        }
    }
    e.shutdown();
}

/// Bytes across processes through the engine API, both ways, checked on
/// the side that did not send them: this process writes and reads the
/// peer's memory, and the peer writes and reads this process's.
#[test]
fn bytes_cross_processes_both_ways_and_are_checked_on_the_far_side() {
    let size = 8u64 << 20;
    let mut peer = Peer::spawn(size, None);
    let f = fabric(Vec::new());
    let me = engine_on(&f, Duration::from_secs(30));
    assert_eq!(me.transport_for(&peer.name).unwrap(), "rdma");
    let local = me.allocate_managed_buffer(size).unwrap();
    let back = me.allocate_managed_buffer(size).unwrap();
    for (round, len) in [1u64, 4096, 65_537, 3 << 20, size].into_iter().enumerate() {
        let seed = round as u64 + 1;
        me.write_bytes_to_buffer(local, &pattern(len as usize, seed)).unwrap();
        me.transfer_sync_write(&peer.name, local, peer.buffer, len).unwrap();
        assert_eq!(peer.cmd(&format!("check 0 {len} {seed}")), "ok", "{len} bytes written, checked by the peer");
        assert_eq!(peer.cmd(&format!("fill 0 {len} {}", seed + 100)), "ok");
        me.transfer_sync_read(&peer.name, back, peer.buffer, len).unwrap();
        assert!(me.read_bytes_from_buffer(back, len).unwrap() == pattern(len as usize, seed + 100), "{len} bytes read");
    }
    // A batch of scattered pieces, asynchronously.
    me.write_bytes_to_buffer(local, &pattern(1 << 20, 7)).unwrap();
    let requests: Vec<TransferRequest> = (0..64u64)
        .map(|k| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + k * 16_384,
            target_offset: peer.buffer + (63 - k) * 16_384,
            length: 16_384,
        })
        .collect();
    let batch = me.batch_transfer_async(&peer.name, &requests).unwrap();
    me.get_batch_transfer_status(&[batch]).unwrap();
    for k in [0u64, 17, 63] {
        me.write_bytes_to_buffer(back, &[0; 16_384]).unwrap();
        me.transfer_sync_read(&peer.name, back, peer.buffer + (63 - k) * 16_384, 16_384).unwrap();
        let want = &pattern(1 << 20, 7)[(k * 16_384) as usize..((k + 1) * 16_384) as usize];
        assert!(me.read_bytes_from_buffer(back, 16_384).unwrap() == want, "piece {k}");
    }
    // The other way: the peer's soft NIC reaches this process's memory.
    let mine = me.segment_name().unwrap();
    assert_eq!(peer.cmd(&format!("transport {mine}")), "rdma");
    assert_eq!(peer.cmd(&format!("write {mine} {local} {} 9", 2 << 20)), "ok");
    assert!(me.read_bytes_from_buffer(local, 2 << 20).unwrap() == pattern(2 << 20, 9), "the peer's write landed here");
    me.write_bytes_to_buffer(back, &pattern(1 << 20, 11)).unwrap();
    assert_eq!(peer.cmd(&format!("read {mine} {back} {} 11", 1 << 20)), "ok", "the peer read this process's bytes");
    let moved = me.rdma_device_bytes().unwrap();
    assert!(moved.iter().all(|(_, b)| *b > 0), "both devices carried bytes: {moved:?}");
}

/// A peer killed (SIGKILL) mid-transfer: every request outstanding then,
/// and every one made after, settles failed with a code, within
/// MC_TRANSFER_TIMEOUT (5 s here); nothing hangs. The peer restarted on
/// the same RPC port (its soft NICs on new ports) is reached again.
#[test]
fn a_peer_killed_mid_transfer_fails_what_was_outstanding_and_a_restarted_peer_is_reached() {
    let port = interop::free_port();
    let mut target = Target::spawn(Some(port), None);
    let timeout = Duration::from_secs(5);
    let f = fabric(Vec::new());
    let me = engine_on(&f, timeout);
    let name = target.name.clone();
    assert_eq!(me.transport_for(&name).unwrap(), "rdma");
    let size = 64u64 << 20;
    let local = me.allocate_managed_buffer(size).unwrap();
    me.write_bytes_to_buffer(local, &pattern(size as usize, 3)).unwrap();
    let remote = me.get_first_buffer_address(&name).unwrap();
    let batch_of = |k: u64| -> Vec<TransferRequest> {
        (0..16u64)
            .map(|i| TransferRequest {
                opcode: if (k + i) % 2 == 0 { TransferOpcode::Write } else { TransferOpcode::Read },
                source: local + i * (1 << 20),
                target_offset: remote + ((k * 16 + i) % 64) * (1 << 20),
                length: 1 << 20,
            })
            .collect()
    };
    // Work flowing: the first batches complete.
    let first = me.batch_transfer_async(&name, &batch_of(0)).unwrap();
    me.get_batch_transfer_status(&[first]).unwrap();
    let mut ids: Vec<u64> = (1..9).map(|k| me.batch_transfer_async(&name, &batch_of(k)).unwrap()).collect();
    target.kill();
    let killed_at = Instant::now();
    ids.extend((9..13).map(|k| me.batch_transfer_async(&name, &batch_of(k)).unwrap()));
    // Every one settles, by the transfer timeout (and a margin for the
    // machine: this bounds a hang, it measures nothing).
    let states = interop::poll_until("every batch settles after the kill", timeout + interop::WAIT, || {
        let states = me.batch_states(&ids).unwrap().into_iter().map(Result::unwrap).collect::<Vec<_>>();
        if states.contains(&BatchState::Pending) { Err(states) } else { Ok(states) }
    });
    println!("settled {:?} after the kill: {states:?}", killed_at.elapsed());
    let failed: Vec<i32> = states.iter().filter(|s| **s != BatchState::Completed).map(|s| s.code()).collect();
    assert!(failed.len() >= 4, "at least the batches made after the kill failed: {states:?}");
    assert!(failed.iter().all(|&c| c == -1 || c == -2), "failed with a code: {states:?}");
    for id in &ids[8..] {
        let e = me.get_batch_transfer_status(&[*id]).unwrap_err();
        assert!(e.code() < 0, "a batch made after the kill fails with a code: {e}");
    }
    // The peer comes back on the same RPC port, its soft NICs on new ones:
    // the handshake tells this side where, and transfers work again.
    let target = Target::spawn(Some(port), None);
    assert_eq!(target.name, name);
    let remote = me.get_first_buffer_address(&name).unwrap();
    // (The reads of the batches above landed in `local`: the pattern again.)
    me.write_bytes_to_buffer(local, &pattern(size as usize, 3)).unwrap();
    me.transfer_sync_write(&name, local, remote, size).unwrap();
    let back = me.allocate_managed_buffer(size).unwrap();
    me.transfer_sync_read(&name, back, remote, size).unwrap();
    assert!(me.read_bytes_from_buffer(back, size).unwrap() == pattern(size as usize, 3));
    assert_eq!(me.transport_for(&name).unwrap(), "rdma");
}

/// `emu1:down@1` in this process and the peer's, mid-run: once this
/// process's emu1 is down, transfers keep succeeding, over emu0 only.
#[test]
fn a_device_down_mid_run_leaves_the_transfers_to_the_other_rail() {
    let size = 4u64 << 20;
    // The peer's emu1 goes down a second after its fabric is made.
    let mut peer = Peer::spawn(size, Some("emu1:down@1"));
    let f = fabric(vec![EmuFault::Down { device: "emu1".into(), after: Duration::from_secs(1) }]);
    let me = engine_on(&f, Duration::from_secs(30));
    let local = me.allocate_managed_buffer(size).unwrap();
    let mut seed = 0u64;
    let mut write_and_check = |me: &TransferEngine, peer: &mut Peer| {
        seed += 1;
        me.write_bytes_to_buffer(local, &pattern(size as usize, seed)).unwrap();
        me.transfer_sync_write(&peer.name, local, peer.buffer, size).unwrap();
        assert_eq!(peer.cmd(&format!("check 0 {size} {seed}")), "ok");
    };
    // Transfers through the fault, until this side's emu1 is down.
    let deadline = Instant::now() + STEP;
    while f.devices()[1].state != PortState::Down {
        assert!(Instant::now() < deadline, "emu1 never went down");
        write_and_check(&me, &mut peer);
    }
    let before = me.rdma_device_bytes().unwrap();
    for _ in 0..8 {
        write_and_check(&me, &mut peer);
    }
    let after = me.rdma_device_bytes().unwrap();
    assert_eq!((before[1].0.as_str(), after[1].1), ("emu1", before[1].1), "nothing more over emu1: {after:?}");
    assert!(after[0].1 >= before[0].1 + 8 * size, "emu0 carried all of it: {before:?} -> {after:?}");
    assert_eq!(me.transport_for(&peer.name).unwrap(), "rdma");
}
