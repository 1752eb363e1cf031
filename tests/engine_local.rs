//! The local transport between engines on this host: which transport a
//! peer gets, both tiers (shared memfds for managed memory, cross-memory
//! attach for other registered memory), and the promise of no late writes,
//! against real peer processes (this test binary, run again as a peer).

mod interop;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interop::netns::Link;
use interop::{KillOnDrop, die_with_parent, pattern};
use shardwire::engine::{EngineConfig, TransferEngine, TransferOpcode, TransferRequest, code};

fn engine_with(local: bool, force_tcp: bool) -> TransferEngine {
    // Two copy threads, so that large copies and batches are shared with a
    // helper whatever the host's cores.
    let config = EngineConfig { local, force_tcp, local_threads: 2, ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

fn engine() -> TransferEngine {
    engine_with(true, false)
}

/// Memory of our own, page-aligned, that the test can unmap.
struct Region {
    addr: u64,
    len: u64,
}

impl Region {
    fn new(len: u64) -> Region {
        // SAFETY: a fresh anonymous mapping; no memory of ours is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Region { addr: p as u64, len }
    }

    /// Takes the memory away as an unmap would (every access faults, and
    /// the kernel's cross-memory attach gets EFAULT) but keeps its
    /// addresses reserved: the tests of a binary share one process, and
    /// an unmapped range may be handed to another thread's next mapping,
    /// which a write meant to fail would then land in.
    fn take_away(&self) {
        // SAFETY: replaces the test's own mapping, in place, with an
        // inaccessible one; nothing of ours is read or written.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                self.len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_eq!(p as u64, self.addr, "the range is replaced in place");
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping made in `new`, alive until drop; the tests
        // read it only while no transfer into it runs (or after revoking).
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len as usize) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new` (unmapping twice is harmless).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

#[test]
fn a_peer_on_this_host_goes_local_unless_turned_off() {
    let target = engine();
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let name = target.segment_name().unwrap();
    for (local, force_tcp, expected) in [(true, false, "local"), (false, false, "tcp"), (true, true, "tcp")] {
        let initiator = engine_with(local, force_tcp);
        assert_eq!(initiator.transport_for(&name).unwrap(), expected, "local={local} force_tcp={force_tcp}");
        let buf = initiator.allocate_managed_buffer(1 << 20).unwrap();
        let data = pattern(1 << 20, u64::from(local) + 2 * u64::from(force_tcp));
        initiator.write_bytes_to_buffer(buf, &data).unwrap();
        initiator.transfer_sync_write(&name, buf, remote, 1 << 20).unwrap();
        assert!(target.read_bytes_from_buffer(remote, 1 << 20).unwrap() == data);
    }
    // A target with the local transport off publishes nothing for it: its
    // peers reach it over TCP, whatever they have on.
    let tcp_target = engine_with(false, false);
    tcp_target.allocate_managed_buffer(4096).unwrap();
    assert_eq!(engine().transport_for(&tcp_target.segment_name().unwrap()).unwrap(), "tcp");
}

/// Every size, both directions, into managed memory (a plain copy through
/// the shared memfd) and into other registered memory (cross-memory
/// attach), through the sync, batch and async calls.
#[test]
fn both_tiers_carry_every_size_both_ways() {
    let target = engine();
    let managed = target.allocate_managed_buffer(8 << 20).unwrap();
    let registered = Region::new(8 << 20);
    target.register_memory(registered.addr, registered.len, "cpu:0").unwrap();
    let initiator = engine();
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "local");
    let local = initiator.allocate_managed_buffer(8 << 20).unwrap();
    let back = initiator.allocate_managed_buffer(8 << 20).unwrap();
    for (i, remote) in [managed, registered.addr].into_iter().enumerate() {
        for (round, len) in [1u64, 7, 4096, 65_537, 1 << 20, 8 << 20].into_iter().enumerate() {
            let data = pattern(len as usize, (i * 10 + round) as u64);
            initiator.write_bytes_to_buffer(local, &data).unwrap();
            initiator.transfer_sync_write(&name, local, remote, len).unwrap();
            assert!(target.read_bytes_from_buffer(remote, len).unwrap() == data, "tier {i}, {len} bytes");
            initiator.transfer_sync_read(&name, back, remote, len).unwrap();
            assert!(initiator.read_bytes_from_buffer(back, len).unwrap() == data, "tier {i}, read {len}");
        }
        // Batches of scattered 4 KiB pieces, asynchronously: 1 MiB (one
        // thread copies it all) and 4 MiB (groups shared with the helper).
        for pieces in [256u64, 1024] {
            batch_lands_scattered(&initiator, &name, &target, local, remote, pieces, 77 + i as u64);
        }
    }
}

/// Writes `pieces` 4 KiB pieces in one asynchronous batch, each to the
/// mirrored place, and checks where each landed.
fn batch_lands_scattered(
    initiator: &TransferEngine,
    name: &str,
    target: &TransferEngine,
    local: u64,
    remote: u64,
    pieces: u64,
    seed: u64,
) {
    let len = pieces * 4096;
    let data = pattern(len as usize, seed);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let requests: Vec<TransferRequest> = (0..pieces)
        .map(|k| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + k * 4096,
            target_offset: remote + (pieces - 1 - k) * 4096,
            length: 4096,
        })
        .collect();
    let batch = initiator.batch_transfer_async(name, &requests).unwrap();
    // Waits (bounded by the transfer timeout) and says how it went.
    initiator.get_batch_transfer_status(&[batch]).unwrap();
    let landed = target.read_bytes_from_buffer(remote, len).unwrap();
    for k in 0..pieces as usize {
        let at = (pieces as usize - 1 - k) * 4096;
        assert!(landed[at..at + 4096] == data[k * 4096..(k + 1) * 4096], "{remote:#x}, {pieces} pieces: piece {k}");
    }
}

/// Bounds: the initiator refuses what the target does not publish; memory
/// the target registered and then (wrongly) took away is a clean error
/// from the kernel (EFAULT), not a crash of either side.
#[test]
fn out_of_bounds_and_unmapped_memory_are_errors() {
    let target = engine();
    let remote = target.allocate_managed_buffer(1 << 16).unwrap();
    let gone = Region::new(1 << 20);
    target.register_memory(gone.addr, gone.len, "cpu:0").unwrap();
    let initiator = engine();
    let name = target.segment_name().unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    initiator.transfer_sync_write(&name, local, gone.addr, 4096).unwrap();
    let err = initiator.transfer_sync_write(&name, local, remote + (1 << 16) - 8, 64).unwrap_err();
    assert!(err.message().contains("not inside"), "{err}");
    // Still registered, on purpose.
    gone.take_away();
    for len in [4096u64, 1 << 20] {
        let err = initiator.transfer_sync_write(&name, local, gone.addr, len).unwrap_err();
        assert!(err.message().contains("Bad address"), "{len}: {err}");
        let err = initiator.transfer_sync_read(&name, local, gone.addr, len).unwrap_err();
        assert!(err.message().contains("Bad address"), "{len}: {err}");
    }
    // The engines go on.
    initiator.transfer_sync_write(&name, local, remote, 4096).unwrap();
}

// --- Peer processes --------------------------------------------------------

/// The peer: when `SHARDWIRE_TEST_PEER` is set (`segment addr len block`),
/// writes `block` bytes round the target's `[addr, +len)` until its
/// standard input closes or 60 s pass, saying on standard output when it
/// first succeeded and first failed, and the counts at the end.
/// Not a test: ignored, and run only by [`Peer::start`].
#[test]
#[ignore = "the peer process of the other tests"]
fn peer_process() {
    let args = std::env::var("SHARDWIRE_TEST_PEER").expect("run by Peer::start, with SHARDWIRE_TEST_PEER");
    let a: Vec<&str> = args.split_whitespace().collect();
    let (segment, addr, len, block): (&str, u64, u64, u64) =
        (a[0], a[1].parse().unwrap(), a[2].parse().unwrap(), a[3].parse().unwrap());
    let e = engine();
    assert_eq!(e.transport_for(segment).unwrap(), "local");
    let buf = e.allocate_managed_buffer(block).unwrap();
    e.write_bytes_to_buffer(buf, &vec![0xee; block as usize]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let (mut ok, mut failed, mut ok_after_failure) = (0u64, 0u64, 0u64);
    let mut out = std::io::stdout();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        match e.transfer_sync_write(segment, buf, addr + at, block) {
            Ok(()) => {
                ok += 1;
                if failed > 0 {
                    ok_after_failure += 1;
                }
                if ok == 1 {
                    writeln!(out, "\npeer: ok").unwrap();
                }
            }
            Err(err) => {
                failed += 1;
                if failed == 1 {
                    writeln!(out, "\npeer: failed {} {}", err.code(), err.message()).unwrap();
                }
                if failed == 1000 {
                    writeln!(out, "\npeer: failed 1000").unwrap();
                }
            }
        }
        at = (at + block) % (len - block + 1);
    }
    writeln!(out, "\npeer: done {ok} {failed} {ok_after_failure}").unwrap();
}

struct Peer {
    child: KillOnDrop,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Peer {
    fn start(segment: &str, addr: u64, len: u64, block: u64) -> Peer {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env("SHARDWIRE_TEST_PEER", format!("{segment} {addr} {len} {block}"))
            // Copies of 2 MiB and more are shared with a helper thread,
            // under the caller's lane, however many cores the host has.
            .env("SHARDWIRE_LOCAL_THREADS", "2");
        Peer::spawn(cmd, "peer_process")
    }

    /// Runs `cmd` (this test binary, or a wrapper of it) as the ignored
    /// test `role`.
    fn spawn(mut cmd: Command, role: &str) -> Peer {
        cmd.args(["--exact", role, "--ignored", "--nocapture", "--test-threads=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = die_with_parent(&mut cmd).spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Peer { child: KillOnDrop(child), lines }
    }

    /// The next thing the peer says (`peer: ...`), skipping the harness's lines.
    fn expect(&mut self, prefix: &str) -> String {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            let Some(said) = line.strip_prefix("peer: ") else { continue };
            if said.starts_with(prefix) {
                return said.to_string();
            }
            assert!(!said.starts_with("failed") && !said.starts_with("done"), "wanted {prefix:?}, got {said:?}");
        }
        panic!("the peer ended before saying {prefix:?}");
    }

    /// Closes its input; returns (ok, failed, ok after a failure).
    fn finish(mut self) -> (u64, u64, u64) {
        drop(self.child.0.stdin.take());
        let done = self.expect("done ");
        let n: Vec<u64> = done.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
        (n[0], n[1], n[2])
    }
}

/// A peer hammers registered memory (cross-memory attach) while the
/// target unregisters it: once `unregister_memory` returns, not one byte
/// lands, and every later write fails with the code TCP gives. Blocks of
/// 64 KiB (one copy each) and of 2 MiB (shared with a helper thread).
#[test]
fn no_byte_lands_after_unregister_returns() {
    no_byte_lands_after_unregister(64 << 10);
    no_byte_lands_after_unregister(2 << 20);
}

fn no_byte_lands_after_unregister(block: u64) {
    let target = engine();
    let mut region = Region::new(4 << 20);
    target.register_memory(region.addr, region.len, "cpu:0").unwrap();
    let mut peer = Peer::start(&target.segment_name().unwrap(), region.addr, region.len, block);
    peer.expect("ok");
    target.unregister_memory(region.addr).unwrap();
    region.bytes().fill(0x5a);
    let first = peer.expect("failed ");
    assert!(first.starts_with(&format!("failed {} ", code::INVALID_ARGUMENT)), "{first}");
    assert!(first.contains("rejected"), "{first}");
    peer.expect("failed 1000");
    assert!(region.bytes().iter().all(|&b| b == 0x5a), "a peer wrote after unregister returned");
    let (ok, failed, ok_after_failure) = peer.finish();
    assert!(ok > 0 && failed >= 1000 && ok_after_failure == 0, "{ok} {failed} {ok_after_failure}");
}

/// A peer hammers a managed buffer (plain copies into the shared memfd)
/// while the target frees it: nothing lands in the block once
/// `free_managed_buffer` returns. The block is then allocated again (the
/// same address): the peer's view is stale (an old generation), and its
/// writes land only through a fresh look at the table, into the new block.
/// Writes of 16 KiB, and of 2 MiB (shared with a helper thread).
#[test]
fn a_freed_managed_block_takes_no_late_write_and_is_reused_cleanly() {
    a_freed_managed_block_is_safe(1 << 20, 16 << 10);
    a_freed_managed_block_is_safe(4 << 20, 2 << 20);
}

fn a_freed_managed_block_is_safe(len: u64, write: u64) {
    let target = engine();
    let _keep = target.allocate_managed_buffer(4096).unwrap(); // keeps the slab
    let block = target.allocate_managed_buffer(len).unwrap();
    let mut peer = Peer::start(&target.segment_name().unwrap(), block, len, write);
    peer.expect("ok");
    target.free_managed_buffer(block, len).unwrap();
    // The slab is still mapped: look at the freed bytes directly.
    // SAFETY: the block's memory stays mapped in the slab `_keep` holds.
    let freed = unsafe { std::slice::from_raw_parts_mut(block as *mut u8, len as usize) };
    freed.fill(0x5a);
    peer.expect("failed ");
    peer.expect("failed 1000");
    assert!(freed.iter().all(|&b| b == 0x5a), "a peer wrote after free returned");
    let again = target.allocate_managed_buffer(len).unwrap();
    assert_eq!(again, block, "the buddy allocator hands the same block out again");
    target.write_bytes_to_buffer(again, &vec![0; len as usize]).unwrap();
    interop::poll_true("the peer's writes reach the new block", interop::WAIT, || {
        target.read_bytes_from_buffer(again, len).unwrap().contains(&0xee)
    });
    let (ok, failed, ok_after_failure) = peer.finish();
    assert!(ok > 0 && failed >= 1000 && ok_after_failure > 0, "{ok} {failed} {ok_after_failure}");
}

/// A peer killed in the middle of a copy holds nothing: the target's
/// unregister and free see its lane's owner dead (a zombie, not reaped
/// yet) and return at once.
#[test]
fn a_peer_killed_mid_copy_does_not_hold_the_target() {
    let config = EngineConfig { transfer_timeout: Duration::from_secs(20), ..EngineConfig::from_env().unwrap() };
    let target = TransferEngine::with_config(config);
    target.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    let len = 64u64 << 20;
    let managed = target.allocate_managed_buffer(len).unwrap();
    let region = Region::new(len);
    target.register_memory(region.addr, region.len, "cpu:0").unwrap();
    for (addr, managed_tier) in [(managed, true), (region.addr, false)] {
        let mut peer = Peer::start(&target.segment_name().unwrap(), addr, len, len);
        peer.expect("ok");
        let deadline = Instant::now() + Duration::from_secs(30);
        while target.local_copies_running().unwrap() == 0 {
            assert!(Instant::now() < deadline, "the peer never copied");
            std::hint::spin_loop();
        }
        // SAFETY: signals our own child.
        unsafe { libc::kill(peer.child.0.id() as libc::pid_t, libc::SIGKILL) };
        // Were the dead lane not reclaimed, these would wait out the drain
        // (the transfer timeout) and fail as busy.
        if managed_tier {
            target.free_managed_buffer(managed, len).unwrap();
        } else {
            target.unregister_memory(region.addr).unwrap();
        }
        assert_eq!(target.local_copies_running().unwrap(), 0);
        let _ = peer.child.0.wait();
    }
}

/// A target in another process, run by [`Target::start`]: its engine on
/// the address `SHARDWIRE_TEST_TARGET` names, with 1 MiB of registered
/// memory and 1 MiB of managed memory; with `undumpable`, it makes itself
/// non-dumpable first (cross-memory attach then needs CAP_SYS_PTRACE).
/// Says `target <segment> <registered> <managed>` and lives until its
/// standard input closes. Not a test: ignored, and run only by `start`.
#[test]
#[ignore = "the target process of the other tests"]
fn target_process() {
    let args = std::env::var("SHARDWIRE_TEST_TARGET").expect("run by Target::start, with SHARDWIRE_TEST_TARGET");
    let (ip, undumpable) = args.split_once(' ').expect("an address and a flag");
    if undumpable == "1" {
        // SAFETY: changes a flag of this process; no memory is touched.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
    let e = TransferEngine::with_config(EngineConfig::from_env().unwrap());
    e.initialize(ip, "P2PHANDSHAKE", "tcp", "").expect("initialize");
    let region = Region::new(1 << 20);
    e.register_memory(region.addr, region.len, "cpu:0").unwrap();
    let managed = e.allocate_managed_buffer(1 << 20).unwrap();
    println!("\npeer: target {} {} {managed}", e.segment_name().unwrap(), region.addr);
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
}

/// A target process, and what it says of itself.
struct Target {
    peer: Peer,
    segment: String,
    registered: u64,
    managed: u64,
}

impl Target {
    /// `wrap` runs the test binary (for example inside a namespace).
    fn start(wrap: Command, ip: &str, undumpable: bool) -> Target {
        let mut cmd = wrap;
        cmd.env("SHARDWIRE_TEST_TARGET", format!("{ip} {}", u8::from(undumpable)));
        let mut peer = Peer::spawn(cmd, "target_process");
        let said = peer.expect("target ");
        let w: Vec<&str> = said.split_whitespace().collect();
        Target { segment: w[1].to_string(), registered: w[2].parse().unwrap(), managed: w[3].parse().unwrap(), peer }
    }
}

/// Messages the engine logs in this process, kept for tests to look at.
static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct KeepLogs;

impl log::Log for KeepLogs {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
            if logged.len() < 10_000 {
                logged.push(r.args().to_string());
            }
        }
    }
    fn flush(&self) {}
}

/// Keeps what the engine logs from now on, in [`LOGGED`].
fn keep_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::set_logger(&KeepLogs).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// How many logged messages contain both `a` and `b`.
fn logged_with(a: &str, b: &str) -> usize {
    LOGGED.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|m| m.contains(a) && m.contains(b)).count()
}

/// Writes a pattern into the registered, then the managed memory of `t`
/// and reads it back, `rounds` times, checking every byte.
fn round_trips(initiator: &TransferEngine, t: &Target, rounds: u64) {
    let out = initiator.allocate_managed_buffer(1 << 20).unwrap();
    let back = initiator.allocate_managed_buffer(1 << 20).unwrap();
    for round in 0..rounds {
        for remote in [t.registered, t.managed] {
            let data = pattern(1 << 20, round * 2 + u64::from(remote == t.managed));
            initiator.write_bytes_to_buffer(out, &data).unwrap();
            initiator.transfer_sync_write(&t.segment, out, remote, 1 << 20).unwrap();
            initiator.transfer_sync_read(&t.segment, back, remote, 1 << 20).unwrap();
            assert!(initiator.read_bytes_from_buffer(back, 1 << 20).unwrap() == data, "round {round} at {remote:#x}");
        }
    }
    initiator.free_managed_buffer(out, 1 << 20).unwrap();
    initiator.free_managed_buffer(back, 1 << 20).unwrap();
}

/// This thread (and the threads it starts) without CAP_SYS_PTRACE; the
/// rest of the test binary keeps it (capabilities are per thread).
fn drop_ptrace_capability() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_PTRACE: u32 = 19;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills the two capability words of a live array.
    assert_eq!(unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) }, 0);
    let keep = !(1u32 << CAP_SYS_PTRACE);
    data[0].effective &= keep;
    data[0].permitted &= keep;
    data[0].inheritable &= keep;
    // SAFETY: capset reads the header and two words; it changes only
    // this thread's credentials.
    assert_eq!(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) }, 0, "capset");
}

/// A target the kernel will not let this process attach to (it is not
/// dumpable, and the initiator lacks CAP_SYS_PTRACE): its registered
/// memory is reached over TCP, with one log line saying why, and its
/// managed memory (a memfd, which needs no ptrace rights) through the
/// same route. Every byte arrives.
#[test]
fn a_refused_cross_memory_attach_falls_back_to_tcp_once() {
    keep_logs();
    let t = Target::start(Command::new(std::env::current_exe().unwrap()), "127.0.0.1", true);
    let handle = std::thread::spawn(move || {
        drop_ptrace_capability();
        let initiator = engine();
        assert_eq!(initiator.transport_for(&t.segment).unwrap(), "local");
        round_trips(&initiator, &t, 3);
        assert_eq!(logged_with(&t.segment, "cross-memory attach refused"), 1, "{:?}", LOGGED.lock().unwrap());
        drop(t.peer);
    });
    handle.join().unwrap();
}

/// A target in another network namespace has this host's boot id but not
/// its abstract Unix sockets: the initiator cannot reach its local
/// service, says so once in the log, and uses TCP for all of it.
#[test]
fn a_peer_in_another_network_namespace_is_reached_over_tcp() {
    keep_logs();
    let tag = std::process::id() % 10_000;
    let link = Link::new(tag, None);
    let t = Target::start(link.exec(std::env::current_exe().unwrap().to_str().unwrap()), &link.peer(), false);
    let initiator = engine();
    assert_eq!(initiator.transport_for(&t.segment).unwrap(), "tcp");
    round_trips(&initiator, &t, 2);
    assert_eq!(logged_with(&t.segment, "another network namespace?"), 1, "{:?}", LOGGED.lock().unwrap());
    drop(t);
    drop(link);
}
