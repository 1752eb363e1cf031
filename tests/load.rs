//! Load: 64 caller threads against 8 target processes, for a bounded time,
//! with sizes from 1 byte to 1 MiB and every operation the API has (sync,
//! batches, async batches polled to the end, a write by one path read back
//! by the other). Half the threads go through an engine on the local
//! transport, half through one on TCP. Every byte is checked, every batch
//! settles exactly once, and no transfer fails (there are no faults here).
//!
//! `SHARDWIRE_LOAD_SECONDS` sets the duration (default 15).

mod interop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use interop::{KillOnDrop, Rng, die_with_parent, stamped};
use shardwire::engine::{BatchState, EngineConfig, TransferEngine, TransferOpcode as Opcode, TransferRequest};

const PEERS: usize = 8;
const THREADS: usize = 64;
/// Each thread's own slot in each target's buffer: no two threads write
/// the same bytes, so every read-back has one right answer.
const SLOT_BYTES: u64 = 1 << 20;
/// How long one async batch may take before the test calls it hung.
const SETTLE_BOUND: Duration = Duration::from_secs(60);

fn seconds() -> u64 {
    std::env::var("SHARDWIRE_LOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15)
}

/// A size: a quarter tiny, the rest spread over 64 B..1 MiB by powers.
fn size(rng: &mut Rng) -> u64 {
    match rng.range(0, 4) {
        0 => 1 + rng.range(0, 64),
        _ => {
            let shift = 6 + rng.range(0, 15); // 64 B .. 1 MiB
            ((1u64 << shift) + rng.range(0, 1 << shift)).min(SLOT_BYTES)
        }
    }
}

fn target() -> (KillOnDrop, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", "--local_server_name=127.0.0.1"])
        .arg(format!("--buffer_size={}", THREADS as u64 * SLOT_BYTES))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let name = line.trim().strip_prefix("segment_id=").expect("the target prints its segment").to_string();
    (child, name)
}

fn engine(local: bool) -> TransferEngine {
    interop::p2p_engine(EngineConfig { local, ..EngineConfig::from_env().unwrap() }, "tcp")
}

#[derive(Default)]
struct Tally {
    transfers: AtomicU64,
    bytes: AtomicU64,
    batches: AtomicU64,
}

/// Polls an async batch to its end (bounded), and checks it stays ended.
fn settle(e: &TransferEngine, id: u64) -> BatchState {
    let done = interop::poll_until(&format!("batch {id} settles"), SETTLE_BOUND, || {
        match e.transfer_check_status(id).expect("a live batch id") {
            BatchState::Pending => Err("pending"),
            done => Ok(done),
        }
    });
    // Settled once: the id is forgotten, not settled again.
    assert!(e.transfer_check_status(id).is_err(), "batch {id} reported twice");
    done
}

/// One caller thread's loop; panics (failing the test) on any wrong byte.
fn caller(t: usize, engines: [&TransferEngine; 2], peers: &[(String, [u64; 2])], deadline: Instant, tally: &Tally) {
    let mut rng = Rng(0x10ad_0000 + t as u64 * 0x9e37_79b9);
    let which = t % 2;
    let (e, other) = (engines[which], engines[1 - which]);
    let src = e.allocate_managed_buffer(SLOT_BYTES).unwrap();
    let dst = e.allocate_managed_buffer(SLOT_BYTES).unwrap();
    let dst_other = other.allocate_managed_buffer(SLOT_BYTES).unwrap();
    let mut seq = (t as u64) << 40;
    while Instant::now() < deadline {
        seq += 1;
        let p = rng.range(0, PEERS as u64) as usize;
        let (name, bases) = (&peers[p].0, peers[p].1);
        let len = size(&mut rng);
        let off = rng.range(0, SLOT_BYTES - len + 1);
        let remote = bases[which] + t as u64 * SLOT_BYTES + off;
        let bytes = stamped(len as usize, seq);
        e.write_bytes_to_buffer(src + off, &bytes).unwrap();
        let op = rng.range(0, 4);
        let ctx = || format!("thread {t}, op {op}, {len} bytes at +{off} of {name}, seq {seq}");
        match op {
            0 => {
                e.transfer_sync_write(name, src + off, remote, len).unwrap_or_else(|err| panic!("{}: {err}", ctx()));
                e.transfer_sync_read(name, dst + off, remote, len).unwrap_or_else(|err| panic!("{}: {err}", ctx()));
            }
            1 | 2 => {
                // Cut into up to 8 pieces, as one batch each way.
                let pieces = (1 + rng.range(0, 8)).min(len);
                let step = len.div_ceil(pieces);
                let cuts: Vec<(u64, u64)> = (0..len).step_by(step as usize).map(|a| (a, step.min(len - a))).collect();
                let requests = |opcode, local: u64| -> Vec<TransferRequest> {
                    cuts.iter()
                        .map(|&(a, n)| TransferRequest {
                            opcode,
                            source: local + off + a,
                            target_offset: remote + a,
                            length: n,
                        })
                        .collect()
                };
                for (opcode, local) in [(Opcode::Write, src), (Opcode::Read, dst)] {
                    if op == 1 {
                        e.batch_transfer_sync(name, &requests(opcode, local), None)
                            .unwrap_or_else(|err| panic!("{}: {err}", ctx()));
                    } else {
                        let id = e.batch_transfer_async(name, &requests(opcode, local)).unwrap();
                        assert_eq!(settle(e, id), BatchState::Completed, "{}", ctx());
                    }
                    tally.batches.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                // Written by this path, read back by the other engine's.
                e.transfer_sync_write(name, src + off, remote, len).unwrap_or_else(|err| panic!("{}: {err}", ctx()));
                let remote_other = bases[1 - which] + t as u64 * SLOT_BYTES + off;
                other
                    .transfer_sync_read(name, dst_other + off, remote_other, len)
                    .unwrap_or_else(|err| panic!("{}: {err}", ctx()));
                let got = other.read_bytes_from_buffer(dst_other + off, len).unwrap();
                assert!(got == bytes, "{}: the other path read different bytes", ctx());
                tally.transfers.fetch_add(2, Ordering::Relaxed);
                tally.bytes.fetch_add(2 * len, Ordering::Relaxed);
                continue;
            }
        }
        let got = e.read_bytes_from_buffer(dst + off, len).unwrap();
        if got != bytes {
            let at = got.iter().zip(&bytes).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{}: byte {at} differs ({} != {})", ctx(), got[at], bytes[at]);
        }
        tally.transfers.fetch_add(2, Ordering::Relaxed);
        tally.bytes.fetch_add(2 * len, Ordering::Relaxed);
    }
}

#[test]
fn sixty_four_callers_and_eight_peers_move_mixed_sizes_and_every_byte_checks() {
    let targets: Vec<(KillOnDrop, String)> = (0..PEERS).map(|_| target()).collect();
    let local = engine(true);
    let tcp = engine(false);
    // Each target's buffer as each engine addresses it (the same segment).
    let peers: Vec<(String, [u64; 2])> = targets
        .iter()
        .map(|(_, name)| {
            let bases = [local.get_first_buffer_address(name).unwrap(), tcp.get_first_buffer_address(name).unwrap()];
            (name.clone(), bases)
        })
        .collect();
    assert_eq!(local.transport_for(&peers[0].0).unwrap(), "local");
    assert_eq!(tcp.transport_for(&peers[0].0).unwrap(), "tcp");

    let tally = Tally::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds());
    thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (engines, peers, tally) = ([&local, &tcp], &peers, &tally);
                thread::Builder::new()
                    .name(format!("load-{t}"))
                    .spawn_scoped(s, move || caller(t, engines, peers, deadline, tally))
                    .unwrap()
            })
            .collect();
        for h in handles {
            h.join().expect("a caller thread failed");
        }
    });
    let took = started.elapsed();
    let (n, bytes, batches) = (
        tally.transfers.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed),
        tally.batches.load(Ordering::Relaxed),
    );
    eprintln!(
        "load: {THREADS} threads, {PEERS} peers, {:.1} s: {n} transfers checked ({batches} of them batches), {:.2} GB, {:.2} GB/s",
        took.as_secs_f64(),
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / took.as_secs_f64()
    );
    // Every thread did work: none was starved for the whole run.
    assert!(n >= 2 * THREADS as u64, "only {n} transfers in {took:?}");
    // Nothing is left in flight once every caller returned.
    for e in [&local, &tcp] {
        assert!(e.queued_requests().unwrap().iter().all(|&q| q == 0), "requests left queued");
    }
    drop(targets);
}
