//! A target that restarts again and again (killed, then started on the
//! same port, so the same segment name in a new process; or on a new port,
//! as a replacement node) must not cost its initiators a descriptor or a
//! mapping per restart: the local transport lets go of the process it
//! replaced, and the TCP transport of its connections to a process that
//! died, even those nothing will use again. Alone in their file, since
//! they count the descriptors of the whole process, one test at a time.

mod interop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use interop::{KillOnDrop, die_with_parent, free_port, pattern};
use shardwire::engine::{EngineConfig, TransferEngine};

/// A `shardwire bench --mode=target` process on `port`, once it says its
/// segment. Its data port is a fresh one each time (as when other
/// processes took the old one), so that a connection to the process it
/// replaced is never used again: only its hang-up can end it.
fn target(port: u16) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", &format!("--local_server_name=127.0.0.1:{port}"), "--buffer_size=4194304"])
        .env("SHARDWIRE_TCP_DATA_PORT", free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("segment_id=127.0.0.1:{port}"), "the target starts");
    child
}

/// This process's descriptors, by what they are open on (`socket`,
/// `/memfd:…`, `anon_inode:…`), for a failure message.
fn fds() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string().split(['[', ' ']).next().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

/// One test at a time counts descriptors.
static COUNTING: Mutex<()> = Mutex::new(());

/// A write and a read back of 1 MiB over `transport`; the first try after
/// a restart may fail (the engine may still hold the old process's
/// descriptor, and looks the peer up again after the failure).
fn round_trip(e: &TransferEngine, transport: &str, name: &str, local: u64, seed: u64) {
    let data = pattern(1 << 20, seed);
    e.write_bytes_to_buffer(local, &data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let remote = loop {
        let tried = e.get_first_buffer_address(name).and_then(|remote| {
            e.transfer_sync_write(name, local, remote, 1 << 20)?;
            e.transfer_sync_read(name, local + (1 << 20), remote, 1 << 20)?;
            Ok(remote)
        });
        match tried {
            Ok(remote) => break remote,
            Err(err) => assert!(Instant::now() < deadline, "no round trip to the restarted target: {err}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(e.transport_for(name).unwrap(), transport);
    // A small synchronous one too: over TCP the calling thread carries it
    // on a connection of its own, which it keeps.
    e.write_bytes_to_buffer(local, &data[..4096]).unwrap();
    e.transfer_sync_write(name, local, remote + (1 << 20), 4096).expect("a small write");
    e.transfer_sync_read(name, local + (1 << 20), remote + (1 << 20), 4096).expect("a small read");
    assert!(e.read_bytes_from_buffer(local + (1 << 20), 4096).unwrap() == data[..4096], "small at {remote:#x}");
    assert!(e.read_bytes_from_buffer(local + (1 << 20), 1 << 20).unwrap() == data, "bytes at {remote:#x}");
}

/// Restarts a target 12 times under an initiator that uses `transport`
/// (`local` with the same-host path on, `tcp` with it off), on the same
/// port or (`replaced`) on a new one each time, with a round trip after
/// each, and checks the initiator's descriptors come back to what they
/// were after the first round.
fn restarts_cost_nothing(transport: &str, replaced: bool) {
    let _alone = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let local_path = transport == "local";
    let e = TransferEngine::with_config(EngineConfig { local: local_path, ..EngineConfig::from_env().unwrap() });
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    let local = e.allocate_managed_buffer(2 << 20).unwrap();
    let mut port = free_port();
    let mut t = target(port);
    round_trip(&e, transport, &format!("127.0.0.1:{port}"), local, 0);
    let first = fds();
    const RESTARTS: u64 = 12;
    for round in 1..=RESTARTS {
        let _ = t.0.kill();
        let _ = t.0.wait();
        if replaced {
            port = free_port();
        }
        t = target(port);
        round_trip(&e, transport, &format!("127.0.0.1:{port}"), local, round);
    }
    // One target process is connected now, as after the first round: the
    // same descriptors, give or take one that comes and goes (a
    // connection of the handshake's being closed). A connection to the
    // last process killed may still be closing: its shard lets go of it
    // once it has seen the hang-up, so the count is given a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = fds();
    while now.len() > first.len() + 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = fds();
    }
    assert!(
        now.len() <= first.len() + 1,
        "{RESTARTS} restarts under {transport} (replaced: {replaced}) left descriptors behind: \
         after the first round {first:?}, now {now:?}"
    );
    e.shutdown();
}

#[test]
fn a_restarting_target_costs_a_local_initiator_nothing_per_restart() {
    restarts_cost_nothing("local", false);
    restarts_cost_nothing("local", true);
}

#[test]
fn a_restarting_target_costs_a_tcp_initiator_nothing_per_restart() {
    restarts_cost_nothing("tcp", false);
    restarts_cost_nothing("tcp", true);
}
