//! A target on this host that restarts again and again (killed, then
//! started on the same port: the same segment name, a new process) must
//! not cost its initiators a descriptor or a mapping per restart: the local
//! transport lets go of the process it replaced. Alone in its file, since
//! it counts the descriptors of the whole process.

mod interop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interop::{KillOnDrop, die_with_parent, free_port, pattern};
use shardwire::engine::{EngineConfig, TransferEngine};

/// A `shardwire bench --mode=target` process on `port`, once it says its
/// segment.
fn target(port: u16) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", &format!("--local_server_name=127.0.0.1:{port}"), "--buffer_size=4194304"])
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

/// A write and a read back of 1 MiB over the local path; the first try
/// after a restart may fail (the engine still holds the old process's
/// descriptor, and looks the peer up again after the failure).
fn round_trip(e: &TransferEngine, name: &str, local: u64, seed: u64) {
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
    assert_eq!(e.transport_for(name).unwrap(), "local", "the target is on this host");
    assert!(e.read_bytes_from_buffer(local + (1 << 20), 1 << 20).unwrap() == data, "bytes at {remote:#x}");
}

#[test]
fn a_restarting_target_costs_its_initiator_nothing_per_restart() {
    let port = free_port();
    let name = format!("127.0.0.1:{port}");
    let e = TransferEngine::with_config(EngineConfig { local: true, ..EngineConfig::from_env().unwrap() });
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    let local = e.allocate_managed_buffer(2 << 20).unwrap();
    let mut t = target(port);
    round_trip(&e, &name, local, 0);
    let first = fds();
    const RESTARTS: u64 = 12;
    for round in 1..=RESTARTS {
        let _ = t.0.kill();
        let _ = t.0.wait();
        t = target(port);
        round_trip(&e, &name, local, round);
    }
    // One target process is connected now, as after the first round: the
    // same descriptors, give or take one that comes and goes (a
    // connection of the handshake's being closed).
    let now = fds();
    assert!(
        now.len() <= first.len() + 1,
        "{RESTARTS} restarts left descriptors behind: after the first round {first:?}, now {now:?}"
    );
    e.shutdown();
}
