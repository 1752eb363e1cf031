//! Targets that restart again and again under initiators in this process:
//! killed, then started on the same port (the same segment name in a new
//! process, on the same data port or a new one) or on a new port (a
//! replacement node), while several threads of the initiator move small
//! and large transfers, with two threads of this process spinning so
//! every core is contended; under initiators on the same-host path, on
//! TCP and on RDMA (the emulated fabric).
//!
//! What must hold, every round:
//! - a transfer with the addresses of the process that was killed fails
//!   with `PEER_GONE` (-401), saying whether a new process answers, and
//!   never lands in the new process;
//! - then every transfer of every thread, with addresses from the new
//!   process, succeeds at its first try and reads back what it wrote:
//!   nothing of the old process (a connection, a mapping, a lane, a
//!   cached descriptor) is used again or fails a transfer;
//! - and the restarts cost the initiator nothing: its descriptors come
//!   back to what they were after the first round.
//!
//! Alone in their file, since they count the descriptors of the whole
//! process; one test at a time.

mod interop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex, RwLock};

use interop::{KillOnDrop, WAIT, die_with_parent, free_port, poll_until, stamped};
use shardwire::engine::{EngineConfig, TransferEngine, TransferOpcode as Opcode, TransferRequest};
use shardwire::error::code;
use shardwire::transport::rdma::emu::{EmuConfig, EmuFabric};
use shardwire::transport::rdma::fabric::Fabric;

/// Caller threads transferring at once, each in its own slot of the
/// target's buffer.
const THREADS: usize = 3;
const SLOT_BYTES: u64 = 2 << 20;
/// Restarts per variant over TCP and the local path: four variants make
/// 104. Over RDMA (the emulated fabric, whose queue pairs to a new
/// process take longer to make), 12 per variant.
const RESTARTS: u64 = 26;
const RDMA_RESTARTS: u64 = 12;

/// A `shardwire bench --mode=target` process on `port`, once it says its
/// segment, with its data port at `data_port`; over RDMA on the emulated
/// fabric if `rdma`.
fn target(port: u16, data_port: u16, rdma: bool) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args([
        "bench",
        "--mode=target",
        &format!("--local_server_name=127.0.0.1:{port}"),
        &format!("--buffer_size={}", THREADS as u64 * SLOT_BYTES),
    ])
    .env("SHARDWIRE_TCP_DATA_PORT", data_port.to_string())
    // Serving the same-host path whatever the test's environment says.
    .env_remove("SHARDWIRE_LOCAL")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if rdma {
        interop::rdma_emu_target(&mut cmd);
    }
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

/// Where the threads find the target this round.
#[derive(Clone, Default)]
struct Round {
    number: u64,
    name: String,
}

/// Thread `t`'s transfers to the target of `round`: the buffer's address
/// asked of the new process, then writes and reads of 4 KiB (the direct
/// path or a local inline copy), 64 KiB, 1 MiB (striped or shared with the
/// crew) and a batch of two, sync and async; each must succeed at its
/// first try and read back what was written.
fn transfers(e: &TransferEngine, t: usize, round: &Round, local: u64, via: &str) {
    let fail = |what: &str, err: shardwire::engine::TeError| -> ! {
        panic!("round {} ({}), thread {t}: {what} failed at its first try: {err}", round.number, round.name)
    };
    let base = e.get_first_buffer_address(&round.name).unwrap_or_else(|err| fail("the lookup", err));
    assert_eq!(e.transport_for(&round.name).unwrap(), via, "round {}", round.number);
    let slot = base + t as u64 * SLOT_BYTES;
    let back = local + SLOT_BYTES;
    for (i, len) in [4096u64, 64 << 10, 1 << 20, 4096, 300_000].into_iter().enumerate() {
        let seq = round.number << 16 | (t as u64) << 8 | i as u64;
        let data = stamped(len as usize, seq);
        e.write_bytes_to_buffer(local, &data).unwrap();
        let remote = slot + (i as u64 % 2) * (SLOT_BYTES / 2);
        match i % 3 {
            0 => {
                e.transfer_sync_write(&round.name, local, remote, len).unwrap_or_else(|err| fail("a write", err));
                e.transfer_sync_read(&round.name, back, remote, len).unwrap_or_else(|err| fail("a read", err));
            }
            1 => {
                let id = e
                    .transfer_submit_write(&round.name, local, remote, len)
                    .unwrap_or_else(|err| fail("a submit", err));
                e.get_batch_transfer_status(&[id]).unwrap_or_else(|err| fail("an async write", err));
                let id =
                    e.transfer_submit_read(&round.name, back, remote, len).unwrap_or_else(|err| fail("a submit", err));
                e.get_batch_transfer_status(&[id]).unwrap_or_else(|err| fail("an async read", err));
            }
            _ => {
                let half = len / 2;
                let two = |opcode, at: u64| {
                    [
                        TransferRequest { opcode, source: at, target_offset: remote, length: half },
                        TransferRequest { opcode, source: at + half, target_offset: remote + half, length: len - half },
                    ]
                };
                e.batch_transfer_sync(&round.name, &two(Opcode::Write, local), None)
                    .unwrap_or_else(|err| fail("a batch write", err));
                e.batch_transfer_sync(&round.name, &two(Opcode::Read, back), None)
                    .unwrap_or_else(|err| fail("a batch read", err));
            }
        }
        assert!(
            e.read_bytes_from_buffer(back, len).unwrap() == data,
            "round {}, thread {t}: {len} bytes read back differ",
            round.number
        );
    }
}

/// Restarts a target `restarts` times under an initiator on `via`
/// (`local`: the same-host path on; `tcp`: off; `rdma`: the emulated
/// fabric), on the same port or (`replaced`) a new one each time; see the
/// module documentation.
fn restarts(via: &str, replaced: bool, restarts: u64) {
    let _alone = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let rdma = via == "rdma";
    let fabric = rdma.then(|| Arc::new(EmuFabric::new(EmuConfig::new(&["emu0", "emu1"])).unwrap()) as Arc<dyn Fabric>);
    let config = EngineConfig { local: via == "local", fabric, ..EngineConfig::from_env().unwrap() };
    let e = Arc::new(TransferEngine::with_config(config));
    e.initialize("127.0.0.1", "P2PHANDSHAKE", if rdma { "rdma" } else { "tcp" }, "").expect("initialize");
    // Two threads spinning: every core is contended throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    let (mut port, mut data_port) = (free_port(), free_port());
    let mut t = target(port, data_port, rdma);
    let round = Arc::new(RwLock::new(Round { number: 0, name: format!("127.0.0.1:{port}") }));
    // Each round: the threads start together, and the next restart waits
    // until they are all done.
    let start = Arc::new(Barrier::new(THREADS + 1));
    let done = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (e, round, start, done, via) = (e.clone(), round.clone(), start.clone(), done.clone(), via.to_string());
            std::thread::spawn(move || {
                let local = e.allocate_managed_buffer(2 * SLOT_BYTES).unwrap();
                loop {
                    start.wait();
                    let r = round.read().unwrap().clone();
                    if r.name.is_empty() {
                        return;
                    }
                    transfers(&e, i, &r, local, &via);
                    done.wait();
                }
            })
        })
        .collect();
    let run_round = || {
        start.wait();
        done.wait();
    };
    run_round();
    let first = fds();
    let probe = e.allocate_managed_buffer(4096).unwrap();
    for n in 1..=restarts {
        let old = round.read().unwrap().clone();
        let old_base = e.get_first_buffer_address(&old.name).unwrap();
        drop(t);
        if replaced {
            port = free_port();
        }
        // Every other restart keeps the data port: a re-opened connection
        // then reaches the new process, which must refuse what was
        // addressed to the old one.
        if n % 2 == 1 {
            data_port = free_port();
        }
        t = target(port, data_port, rdma);
        // A transfer with the old process's address: gone, and said so.
        let err = e.transfer_sync_write(&old.name, probe, old_base, 4096).expect_err("the old process is gone");
        assert_eq!(err.code(), code::PEER_GONE, "restart {n} ({via}, replaced: {replaced}): {err}");
        let said = if replaced { "does not answer" } else { "answers as a new process now" };
        assert!(err.message().contains(said), "restart {n} ({via}): {err}");
        if n <= 2 {
            eprintln!("restart {n} ({via}, replaced: {replaced}): {err}");
        }
        *round.write().unwrap() = Round { number: n, name: format!("127.0.0.1:{port}") };
        run_round();
    }
    // One target process is connected now, as after the first round: the
    // same descriptors, give or take one that comes and goes (a
    // connection of the handshake's being closed). A connection to the
    // last process killed may still be closing: its shard lets go of it
    // once it has seen the hang-up.
    poll_until(&format!("{restarts} restarts under {via} (replaced: {replaced}) leave no descriptor"), WAIT, || {
        let now = fds();
        if now.len() <= first.len() + 1 { Ok(()) } else { Err(format!("after the first round {first:?}, now {now:?}")) }
    });
    *round.write().unwrap() = Round::default();
    start.wait();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    drop(t);
    e.shutdown();
}

#[test]
fn a_target_restarting_on_its_port_under_a_local_initiator() {
    restarts("local", false, RESTARTS);
}

#[test]
fn a_target_replaced_on_new_ports_under_a_local_initiator() {
    restarts("local", true, RESTARTS);
}

#[test]
fn a_target_restarting_on_its_port_under_a_tcp_initiator() {
    restarts("tcp", false, RESTARTS);
}

#[test]
fn a_target_replaced_on_new_ports_under_a_tcp_initiator() {
    restarts("tcp", true, RESTARTS);
}

#[test]
fn a_target_restarting_on_its_port_under_an_rdma_initiator() {
    restarts("rdma", false, RDMA_RESTARTS);
}

#[test]
fn a_target_replaced_on_new_ports_under_an_rdma_initiator() {
    restarts("rdma", true, RDMA_RESTARTS);
}
