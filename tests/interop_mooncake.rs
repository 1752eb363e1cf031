//! Interop with the real Mooncake Transfer Engine (the
//! mooncake-transfer-engine-non-cuda wheel), both directions, P2P over
//! loopback, every byte checked.

mod interop;

use interop::{MooncakePeer, Rng, pattern};
use shardwire::engine::{TransferEngine, TransferNotify};
use shardwire::proto::mooncake::tcp::Opcode;

const BUF: u64 = 64 << 20;

fn shardwire_engine() -> TransferEngine {
    let e = TransferEngine::new();
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

#[test]
fn shardwire_initiator_writes_and_reads_a_mooncake_target() {
    let mut peer = MooncakePeer::target(BUF);
    let e = shardwire_engine();
    let local = e.allocate_managed_buffer(BUF).unwrap();
    // The peer's segment is found through its RPC port.
    let first = e.get_first_buffer_address(&peer.name).unwrap();
    assert!(first <= peer.buffer && peer.buffer < first + (2 << 30));
    for (i, (offset, len)) in
        [(0u64, 1u64), (7, 100), (4096, 4096), (65_536, (1 << 20) + 3), (1 << 22, 16 << 20)].into_iter().enumerate()
    {
        let seed = 10 + i as u64;
        e.write_bytes_to_buffer(local + offset, &pattern(len as usize, seed)).unwrap();
        e.transfer_sync_write(&peer.name, local + offset, peer.buffer + offset, len).unwrap();
        assert_eq!(peer.cmd(&format!("check {offset} {len} {seed}")), "ok", "write of {len} bytes");
        let seed = 50 + i as u64;
        assert_eq!(peer.cmd(&format!("fill {offset} {len} {seed}")), "ok");
        e.write_bytes_to_buffer(local + offset, &vec![0; len as usize]).unwrap();
        e.transfer_sync_read(&peer.name, local + offset, peer.buffer + offset, len).unwrap();
        assert!(e.read_bytes_from_buffer(local + offset, len).unwrap() == pattern(len as usize, seed), "read of {len}");
    }
}

#[test]
fn random_small_writes_each_read_back_against_mooncake() {
    // Mooncake's test_random_write_circle_times, with shardwire initiating.
    let peer = MooncakePeer::target(1 << 20);
    let e = shardwire_engine();
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    let mut rng = Rng(0x1234_5678);
    for round in 0..1000 {
        let len = rng.range(16, 257);
        let offset = rng.range(0, (1 << 20) - 512);
        let data = pattern(len as usize, round);
        e.write_bytes_to_buffer(local, &data).unwrap();
        e.transfer_sync_write(&peer.name, local, peer.buffer + offset, len).unwrap();
        e.write_bytes_to_buffer(local, &vec![0; len as usize]).unwrap();
        e.transfer_sync_read(&peer.name, local, peer.buffer + offset, len).unwrap();
        assert_eq!(e.read_bytes_from_buffer(local, len).unwrap(), data, "round {round}");
    }
}

#[test]
fn batch_async_notify_and_probe_against_mooncake() {
    let mut peer = MooncakePeer::target(1 << 20);
    let e = shardwire_engine();
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    // A batch of 100 at a 1 KiB stride, as Mooncake's test_batch_write_read.
    let bufs: Vec<u64> = (0..100).map(|i| local + i * 1024).collect();
    let peers: Vec<u64> = (0..100).map(|i| peer.buffer + i * 1024).collect();
    for (i, &b) in bufs.iter().enumerate() {
        e.write_bytes_to_buffer(b, &pattern(1024, 200 + i as u64)).unwrap();
    }
    e.batch_transfer_sync_lists(&peer.name, &bufs, &peers, &[1024; 100], Opcode::Write, None).unwrap();
    for i in 0..100u64 {
        assert_eq!(peer.cmd(&format!("check {} 1024 {}", i * 1024, 200 + i)), "ok");
    }
    // Async: submit reads, then wait on the batch.
    e.write_bytes_to_buffer(local, &vec![0; 100 * 1024]).unwrap();
    let id = e.batch_transfer_async_lists(&peer.name, &bufs, &peers, &[1024; 100], Opcode::Read).unwrap();
    assert_ne!(id, 0);
    e.get_batch_transfer_status(&[id]).unwrap();
    for (i, &b) in bufs.iter().enumerate() {
        assert_eq!(e.read_bytes_from_buffer(b, 1024).unwrap(), pattern(1024, 200 + i as u64));
    }
    // A notification rides after a sync transfer.
    let note = TransferNotify { name: "shardwire".into(), msg: "kv-ready".into() };
    e.transfer_sync(&peer.name, local, peer.buffer, 8, Opcode::Write, Some(&note)).unwrap();
    assert_eq!(peer.cmd("notifies"), "notifies shardwire=kv-ready");
    assert_eq!(e.send_probe(&peer.name), Ok(()));
}

#[test]
fn mooncake_initiator_writes_and_reads_a_shardwire_target() {
    let e = shardwire_engine();
    let remote = e.allocate_managed_buffer(BUF).unwrap();
    let name = e.segment_name().unwrap();
    let mut peer = MooncakePeer::initiator(&name, remote, BUF);
    for (i, (offset, len)) in
        [(0u64, 1u64), (7, 100), (4096, 4096), (65_536, (1 << 20) + 3), (1 << 22, 16 << 20)].into_iter().enumerate()
    {
        let seed = 70 + i as u64;
        assert_eq!(peer.cmd(&format!("write {offset} {len} {seed}")), "ok", "Mooncake wrote {len} bytes");
        assert!(
            e.read_bytes_from_buffer(remote + offset, len).unwrap() == pattern(len as usize, seed),
            "{len} bytes landed"
        );
        let seed = 90 + i as u64;
        e.write_bytes_to_buffer(remote + offset, &pattern(len as usize, seed)).unwrap();
        assert_eq!(peer.cmd(&format!("read {offset} {len} {seed}")), "ok", "Mooncake read {len} bytes");
    }
    assert_eq!(peer.cmd("batch 100 1024 300"), "ok");
    for i in 0..100u64 {
        assert_eq!(e.read_bytes_from_buffer(remote + i * 1024, 1024).unwrap(), pattern(1024, 300 + i));
    }
    assert_eq!(peer.cmd("async 64 4096 400"), "ok");
    assert_eq!(peer.cmd("notify from-mooncake"), "ok 0");
    let notes = e.get_notifies().unwrap();
    assert_eq!(notes, vec![TransferNotify { name: "mooncake-peer".into(), msg: "from-mooncake".into() }]);
    assert_eq!(peer.cmd(&format!("probe {name}")), "ok 0");
}

#[test]
fn mooncake_peer_sees_rejections_from_a_shardwire_target() {
    // A Mooncake initiator writing outside the shardwire target's buffers is
    // refused (Mooncake's client does not check; our server does).
    let e = shardwire_engine();
    let remote = e.allocate_managed_buffer(1 << 20).unwrap();
    let name = e.segment_name().unwrap();
    let mut peer = MooncakePeer::initiator(&name, remote + (4 << 30), 1 << 20);
    assert!(peer.cmd("write 0 64 1").starts_with("fail"), "a write outside registered memory fails");
    drop(peer);
    let mut peer = MooncakePeer::initiator(&name, remote, 1 << 20);
    assert_eq!(peer.cmd("write 0 64 2"), "ok", "the target serves the next peer");
}

/// Runs one side of Mooncake's `transfer_engine_bench` and the other of
/// `shardwire bench`, briefly, and returns the initiator's output.
fn bench_pair(mooncake_target: bool, operation: &str) -> String {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let common = ["--metadata_server=P2PHANDSHAKE", "--local_server_name=127.0.0.1", "--buffer_size=67108864"];
    let initiator_flags = [
        format!("--operation={operation}"),
        "--block_size=65536".into(),
        "--batch_size=8".into(),
        "--threads=2".into(),
        "--duration=1".into(),
    ];
    let mut command = if mooncake_target {
        let mut c = Command::new(interop::mooncake_bench());
        c.args(["--mode=target", "--protocol=tcp"])
            .env("MC_FORCE_TCP", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_shardwire"));
        c.args(["bench", "--mode=target"]).stdout(Stdio::piped()).stderr(Stdio::null());
        c
    };
    command.args(common);
    let mut target = interop::KillOnDrop(interop::die_with_parent(&mut command).spawn().unwrap());
    let segment = if mooncake_target {
        let stderr = std::io::BufReader::new(target.0.stderr.take().unwrap());
        let mut found = None;
        let mut lines = stderr.lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(pos) = line.find("listening on ") {
                found = Some(line[pos + 13..].trim().to_string());
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        found.expect("the Mooncake target prints where it listens")
    } else {
        let mut line = String::new();
        std::io::BufReader::new(target.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        line.trim().strip_prefix("segment_id=").expect("segment_id= line").to_string()
    };
    let out = if mooncake_target {
        Command::new(env!("CARGO_BIN_EXE_shardwire"))
            .args(["bench", "--mode=initiator", &format!("--segment_id={segment}")])
            .args(common)
            .args(&initiator_flags)
            .output()
            .unwrap()
    } else {
        Command::new(interop::mooncake_bench())
            .args(["--mode=initiator", "--protocol=tcp", &format!("--segment_id={segment}")])
            .args(common)
            .args(&initiator_flags)
            .env("MC_FORCE_TCP", "1")
            .output()
            .unwrap()
    };
    drop(target);
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn completed_batches(output: &str) -> u64 {
    let line =
        output.lines().find(|l| l.contains("Test completed")).unwrap_or_else(|| panic!("no result in:\n{output}"));
    let count = line.split("batch count ").nth(1).unwrap().split(',').next().unwrap();
    count.trim().parse().unwrap()
}

#[test]
fn shardwire_bench_drives_mooncakes_target() {
    for op in ["write", "read"] {
        let out = bench_pair(true, op);
        assert!(completed_batches(&out) > 0, "{op}: {out}");
        assert!(out.contains("Batch latency: p50"), "{out}");
    }
}

#[test]
fn mooncakes_bench_drives_a_shardwire_target() {
    for op in ["write", "read"] {
        let out = bench_pair(false, op);
        assert!(completed_batches(&out) > 0, "{op}: {out}");
    }
}
