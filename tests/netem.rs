//! Loss, delay, reordering, duplication and corruption from the kernel's
//! `netem`, between real processes on two "hosts": this test's engines, in
//! this network namespace, and a `shardwire bench --mode=target` process and
//! a `shardwire stream listen` process in another, joined by a veth pair
//! with the same netem qdisc at the root of both ends (so it acts on both
//! directions).
//!
//! This host's kernel has no netem (CONFIG_NET_SCH_NETEM is off), so the
//! tests are ignored here; tools/test runs them in the qemu VM of
//! tools/rdma-vm, whose Debian kernel has it:
//!
//! ```text
//! cargo test --test netem --no-run      # prints the test binary's path
//! tools/rdma-vm --devices 1 -- <binary> --include-ignored --test-threads 1
//! ```
//!
//! Under each impairment every transfer completes with its bytes intact
//! (TCP repairs what netem breaks), over plain TCP and with shardwire's
//! crc32c framing; every object of a checksummed stream arrives whole, once
//! and in order; and transfers to a peer outside the link go on
//! undisturbed. Under a blackout (every packet lost) each request settles
//! once, with its code, within its timeout, and after it the same engines
//! carry on.

mod interop;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interop::faults::{Bystander, Lines, SLACK, bounded, broken_stream, round_trip, settle};
use interop::netns::Link;
use interop::{KillOnDrop, Rng, die_with_parent, stamped};
use shardwire::engine::{BatchState, EngineConfig, TransferEngine, TransferOpcode, TransferRequest, code};
use shardwire::proto::objstream::{CksumType, ObjHdr};
use shardwire::stream::{Stream, StreamOptions, Termination};

/// The target's buffer.
const TARGET_BYTES: u64 = 32 << 20;
/// The buffer's slots: each request of a round has one of its own.
const SLOT_BYTES: u64 = 2 << 20;
const SLOTS: u64 = TARGET_BYTES / SLOT_BYTES;
/// Requests in one batch, at most.
const BATCH_MAX: u64 = 4;
const RPC_PORT: u16 = 17_001;
const STREAM_PORT: u16 = 17_002;

/// An initiator of this process over TCP only; `crc32c` asks the target
/// for shardwire's checksummed framing.
fn initiator(timeout: Duration, crc32c: bool) -> TransferEngine {
    let mut config =
        EngineConfig { transfer_timeout: timeout, local: false, force_tcp: true, ..EngineConfig::from_env().unwrap() };
    config.client_limits.crc32c = crc32c;
    interop::p2p_engine(config, "tcp")
}

/// The far side: a link to a fresh namespace with a transfer target and a
/// stream listener in it.
struct Far {
    /// The target's segment name, `10.211.S.2:17001`.
    name: String,
    /// The listener's base URL.
    url: String,
    /// The listener's lines: one JSON object per object received.
    lines: Lines,
    _target: KillOnDrop,
    _listener: KillOnDrop,
    /// Last: dropped once the processes in its namespace are gone.
    link: Link,
}

impl Far {
    /// Sets it up, or returns `None` (and says why) where the kernel has
    /// no netem.
    fn start(tag: u32) -> Option<Far> {
        let link = Link::new(tag, None);
        if !link.has_netem() {
            assert!(std::env::var_os("RDMA_VM").is_none(), "the VM's kernel must have netem (sch_netem)");
            eprintln!("no netem in this kernel: tools/test runs this test in the VM of tools/rdma-vm");
            return None;
        }
        let name = format!("{}:{RPC_PORT}", link.peer());
        let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
        cmd.args(["bench", "--mode=target", &format!("--local_server_name={name}")])
            .arg(format!("--buffer_size={TARGET_BYTES}"))
            .env("SHARDWIRE_LOCAL", "0")
            .env("MC_FORCE_TCP", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut target = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
        let target_lines = Lines::of(target.0.stdout.take().unwrap());
        let first = target_lines.next(SLACK * 2).expect("the target says its segment");
        assert_eq!(first.trim(), format!("segment_id={name}"), "the target starts");

        let addr = format!("{}:{STREAM_PORT}", link.peer());
        let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
        cmd.args(["stream", "listen", "--listen", &addr, "--trname", "far", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut listener = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
        let lines = Lines::of(listener.0.stdout.take().unwrap());
        let first = lines.next(SLACK * 2).expect("the listener says where it listens");
        assert!(first.contains("listening"), "the listener starts: {first}");
        Some(Far { name, url: format!("http://{addr}"), lines, _target: target, _listener: listener, link })
    }
}

/// A link tag of this process's (the two tests take this and the next):
/// never 0, whose names tools/rdma-vm's own veth pair has, and the two
/// tests' subnets differ.
fn tag() -> u32 {
    1_000 + 2 * (std::process::id() % 4_000)
}

/// What one workload moved.
#[derive(Default, Debug, Clone, Copy)]
struct Moved {
    transfers: u64,
    bytes: u64,
}

/// A random length: mostly small or middling, now and then whole slots.
fn length(rng: &mut Rng) -> u64 {
    match rng.range(0, 10) {
        0 => rng.range(1, 64),
        1..=3 => rng.range(1, 8 << 10),
        4..=6 => rng.range(8 << 10, 256 << 10),
        7 | 8 => rng.range(256 << 10, SLOT_BYTES / 2),
        _ => rng.range(SLOT_BYTES / 2, SLOT_BYTES + 1),
    }
}

/// `rounds` rounds, each a batch of 1 to [`BATCH_MAX`] writes of random
/// lengths to random slots of the target's buffer, then one batch reading
/// them back into another buffer; every byte is compared, and each block
/// names its transfer ([`stamped`]), so a misplaced or stale block shows.
fn workload(e: &TransferEngine, name: &str, rng: &mut Rng, rounds: u64, seq: &mut u64) -> Moved {
    let remote = e.get_first_buffer_address(name).unwrap();
    let out = e.allocate_managed_buffer(BATCH_MAX * SLOT_BYTES).unwrap();
    let back = e.allocate_managed_buffer(BATCH_MAX * SLOT_BYTES).unwrap();
    let mut moved = Moved::default();
    for _ in 0..rounds {
        let n = rng.range(1, BATCH_MAX + 1);
        let first_slot = rng.range(0, SLOTS);
        let mut writes = Vec::new();
        let mut want = Vec::new();
        for i in 0..n {
            let len = length(rng);
            let slot = (first_slot + i) % SLOTS;
            let at = remote + slot * SLOT_BYTES + rng.range(0, SLOT_BYTES - len + 1);
            *seq += 1;
            let data = stamped(len as usize, *seq);
            e.write_bytes_to_buffer(out + i * SLOT_BYTES, &data).unwrap();
            writes.push(TransferRequest {
                opcode: TransferOpcode::Write,
                source: out + i * SLOT_BYTES,
                target_offset: at,
                length: len,
            });
            want.push(data);
            moved.bytes += 2 * len;
        }
        e.batch_transfer_sync(name, &writes, None).unwrap_or_else(|err| panic!("a batch of {n} writes: {err}"));
        let reads: Vec<TransferRequest> = writes
            .iter()
            .enumerate()
            .map(|(i, w)| TransferRequest { opcode: TransferOpcode::Read, source: back + i as u64 * SLOT_BYTES, ..*w })
            .collect();
        e.batch_transfer_sync(name, &reads, None).unwrap_or_else(|err| panic!("a batch of {n} reads: {err}"));
        for (i, data) in want.iter().enumerate() {
            let got = e.read_bytes_from_buffer(back + i as u64 * SLOT_BYTES, data.len() as u64).unwrap();
            assert!(&got == data, "{} bytes read back as written", data.len());
        }
        moved.transfers += 2 * n;
    }
    e.free_managed_buffer(out, BATCH_MAX * SLOT_BYTES).unwrap();
    e.free_managed_buffer(back, BATCH_MAX * SLOT_BYTES).unwrap();
    moved
}

/// Sends `count` objects of random lengths with an xxhash checksum (the
/// listener verifies it) and checks that each completed once, without
/// error, and that the listener took each whole and in order. Returns the
/// bytes sent.
fn objects(far: &Far, rng: &mut Rng, round: usize, count: usize) -> u64 {
    let done: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let d = done.clone();
    let opts = StreamOptions {
        checksum: Some(CksumType::Xxhash),
        send_timeout: Duration::from_secs(60),
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| d.lock().unwrap().push((h.name.clone(), r.is_ok())))),
        ..StreamOptions::default()
    };
    let s = Stream::new(&far.url, "far", opts).unwrap();
    let mut want = Vec::new();
    let mut bytes = 0;
    for i in 0..count {
        let len = if i % 8 == 0 { 0 } else { rng.range(1, 300_000) };
        let name = format!("r{round}-{i}");
        s.send(ObjHdr::new("b", &name, len as i64), stamped(len as usize, i as u64)).unwrap();
        want.push((name, len));
        bytes += len;
    }
    assert_eq!(s.fin(), Termination::EndOfStream, "round {round}: the stream ends cleanly");
    let done = done.lock().unwrap().clone();
    assert_eq!(done.len(), count, "round {round}: each object completes once");
    assert!(done.iter().all(|(_, ok)| *ok), "round {round}: no object failed: {done:?}");
    for (name, len) in want {
        let line = far.lines.next(SLACK).unwrap_or_else(|| panic!("round {round}: {name} never arrived"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["name"].as_str(), v["received"].as_u64()), (Some(name.as_str()), Some(len)), "{line}");
        assert_eq!(v["cksum_type"].as_str(), Some("xxhash"), "{line}");
    }
    bytes
}

#[test]
#[ignore = "needs netem: tools/test runs it in the VM of tools/rdma-vm"]
fn impairments_lose_nothing() {
    let Some(far) = Far::start(tag()) else { return };
    let timeout = Duration::from_secs(60);
    let plain = Arc::new(initiator(timeout, false));
    let crc = initiator(timeout, true);
    // Each: what, and the qdisc on both ends.
    let impairments = [
        ("loss 3%", "netem loss 3%"),
        ("delay 20 ms, jitter 10 ms (reorders)", "netem delay 20ms 10ms"),
        ("reorder 25% (others delayed 10 ms)", "netem delay 10ms reorder 25% 50%"),
        ("duplicate 10%", "netem duplicate 10%"),
        ("corrupt 2% (a bit flipped)", "netem corrupt 2%"),
        ("all at once", "netem delay 5ms 2ms loss 1% duplicate 2% corrupt 1% reorder 10%"),
    ];
    let mut rng = Rng(0x5eed_0001);
    let mut seq = 0u64;
    let mut report = Vec::new();
    for (round, (what, qdisc)) in impairments.into_iter().enumerate() {
        far.link.shape_both(qdisc);
        let bystander = Bystander::start(plain.clone(), || initiator(Duration::from_secs(60), false));
        let start = Instant::now();
        let a = workload(&plain, &far.name, &mut rng, 12, &mut seq);
        let b = workload(&crc, &far.name, &mut rng, 12, &mut seq);
        let object_bytes = objects(&far, &mut rng, round, 40);
        let took = start.elapsed();
        let rounds = bystander.finish();
        let (packets, dropped) = far.link.qdisc_counts();
        far.link.unshape();
        assert!(rounds >= 2, "{what}: the bystander went on ({rounds} rounds)");
        report.push(format!(
            "netem {what}: {} transfers ({} MiB; half with crc32c), 40 objects ({} KiB), all intact, in {took:.1?}; \
             {packets} packets, {dropped} dropped by netem; bystander {rounds} rounds",
            a.transfers + b.transfers,
            (a.bytes + b.bytes) >> 20,
            object_bytes >> 10
        ));
    }
    crc.shutdown();
    plain.shutdown();
    eprintln!("{}", report.join("\n"));
}

#[test]
#[ignore = "needs netem: tools/test runs it in the VM of tools/rdma-vm"]
fn a_blackout_settles_every_request_and_heals() {
    let Some(far) = Far::start(tag() + 1) else { return };
    let timeout = Duration::from_secs(3);
    let e = Arc::new(initiator(timeout, false));
    let remote = e.get_first_buffer_address(&far.name).unwrap();
    let local = e.allocate_managed_buffer(TARGET_BYTES).unwrap();
    round_trip(&e, &far.name, local, remote, 1 << 20, 1);
    let bystander = Bystander::start(e.clone(), || initiator(Duration::from_secs(60), false));

    // Connections to the target from every shard, before the lights go out.
    let warm = settle(&e, &far.name, TransferOpcode::Write, local, remote, 4, 256 << 10, timeout);
    assert_eq!(warm.expect("submitted"), BatchState::Completed);

    far.link.shape_both("netem loss 100%");
    let mut report = Vec::new();
    // Batches: the first, on open connections, times out (once). A failed
    // batch makes the engine forget the peer's descriptor, so a later one
    // looks it up again, which fails at submission with a socket error
    // within the call's bound.
    let ops = [(TransferOpcode::Write, "write"), (TransferOpcode::Read, "read"), (TransferOpcode::Write, "write")];
    for (i, (op, what)) in ops.into_iter().enumerate() {
        let start = Instant::now();
        let outcome = match settle(&e, &far.name, op, local, remote, 4, 256 << 10, timeout) {
            Ok(state) => {
                assert_eq!(state, BatchState::TimedOut, "a {what} batch in a blackout (code {})", state.code());
                format!("{state:?} ({})", state.code())
            }
            Err(err) => {
                assert!(i > 0, "the first batch, on open connections, is submitted: {err}");
                assert_eq!(err.code(), code::SOCKET, "{err}");
                assert!(err.message().contains(&far.name), "{err}");
                format!("refused at submission: {err}")
            }
        };
        let took = start.elapsed();
        assert!(took < timeout + SLACK, "a {what} batch in a blackout took {took:?}");
        report.push(format!("blackout, {what} batch: {outcome} in {took:.1?}"));
    }
    // A handshake with the target: a socket error naming the peer.
    let fresh = Arc::new(initiator(timeout, false));
    let (f2, name) = (fresh.clone(), far.name.clone());
    let start = Instant::now();
    let err = bounded("a handshake in a blackout", timeout + SLACK, move || f2.get_first_buffer_address(&name))
        .expect_err("a handshake in a blackout fails");
    assert_eq!(err.code(), code::SOCKET, "{err}");
    assert!(err.message().contains(&far.name), "{err}");
    report.push(format!("blackout, handshake: {err} in {:.1?}", start.elapsed()));
    // An object stream: it ends with an error within its send timeout,
    // and every object handed to it completes once.
    let send_timeout = Duration::from_secs(3);
    let opts = StreamOptions { send_timeout, connect_timeout: send_timeout, ..StreamOptions::default() };
    let start = Instant::now();
    let (sent, _, end) = broken_stream("a stream in a blackout", &far.url, "far", "dark-", opts);
    report.push(format!("blackout, stream: {end} in {:.1?}; {sent} objects, each completed once", start.elapsed()));
    let (_, dropped) = far.link.qdisc_counts();
    far.link.unshape();

    // Light again: the same initiators carry on, and a new stream
    // delivers everything (after whatever of the dark stream got through).
    round_trip(&e, &far.name, local, remote + (TARGET_BYTES / 2), 1 << 20, 2);
    round_trip(&e, &far.name, local, remote + (TARGET_BYTES / 2), 4096, 3);
    let remote_fresh = fresh.get_first_buffer_address(&far.name).expect("the handshake after the blackout");
    assert_eq!(remote_fresh, remote);
    let fresh_local = fresh.allocate_managed_buffer(1 << 20).unwrap();
    round_trip(&fresh, &far.name, fresh_local, remote + (TARGET_BYTES / 2), 1 << 20, 4);
    let s = Stream::new(&far.url, "far", StreamOptions { send_timeout, ..StreamOptions::default() }).unwrap();
    for i in 0..5 {
        s.send(ObjHdr::new("b", &format!("light-{i}"), 1000), vec![7u8; 1000]).unwrap();
    }
    assert_eq!(s.fin(), Termination::EndOfStream, "a stream after the blackout");
    for i in 0..5 {
        far.lines.find(&format!("\"light-{i}\""));
    }
    let rounds = bystander.finish();
    assert!(rounds >= 2, "the bystander went on ({rounds} rounds)");
    report.push(format!("blackout: {dropped} packets dropped by netem; healed; bystander {rounds} rounds"));
    fresh.shutdown();
    e.shutdown();
    eprintln!("{}", report.join("\n"));
}
