//! Two fabrics in one test process stand for two processes: each has its
//! own listeners and threads, and they reach each other only through
//! their sockets. Buffers are declared before the contexts that register
//! them, so the contexts go first. Every wait has a deadline; none is a
//! measure of speed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::super::fabric::{PeerAddr, PortState, Sge, Verb};
use super::nic::{INBOUND_IDLE, LINK_IDLE};
use super::*;

const CAPS: QpCaps = QpCaps { max_send_wr: 8, max_sge: 2, max_inline: 64 };
const WAIT: Duration = Duration::from_secs(30);

/// One side: a fabric of devices `d0` and `d1`, a context on `d0`, its
/// completion queue and a queue pair.
struct Side {
    fabric: EmuFabric,
    ctx: Box<dyn Context>,
    cq: CqId,
    qp: QpNum,
}

fn side(faults: Vec<EmuFault>, cqe: u32) -> Side {
    side_of(EmuConfig { faults, ..EmuConfig::new(&["d0", "d1"]) }, cqe)
}

fn side_of(config: EmuConfig, cqe: u32) -> Side {
    let fabric = EmuFabric::new(config).unwrap();
    let mut ctx = fabric.open("d0").unwrap();
    let cq = ctx.create_cq(cqe).unwrap();
    let qp = ctx.create_qp(cq, CAPS).unwrap();
    Side { fabric, ctx, cq, qp }
}

/// What `ctx`'s peers put in a `PeerAddr` for its queue pair `qp`, as the
/// Connection handshake carries it.
fn addr_of(ctx: &dyn Context, qp: QpNum) -> PeerAddr {
    let info = ctx.info();
    let gid = info.gids[choose(&info)].gid;
    PeerAddr { gid, lid: info.lid, qp, mtu: 4096 }
}

fn choose(info: &DeviceInfo) -> usize {
    super::super::fabric::choose_gid(&info.gids, None).unwrap()
}

/// Moves `qp` of `ctx` to RTS against `peer`.
fn connect(ctx: &mut dyn Context, qp: QpNum, peer: PeerAddr) {
    ctx.modify_qp(qp, Transition::Init { access: Access::ALL }).unwrap();
    ctx.modify_qp(qp, Transition::Rtr { peer }).unwrap();
    ctx.modify_qp(qp, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 }).unwrap();
}

/// Two sides ("processes") with their queue pairs connected.
fn pair(faults: Vec<EmuFault>, cqe: u32) -> (Side, Side) {
    pair_of(side(faults, cqe), side(Vec::new(), cqe))
}

fn pair_of(mut a: Side, mut b: Side) -> (Side, Side) {
    let (to_b, to_a) = (addr_of(b.ctx.as_ref(), b.qp), addr_of(a.ctx.as_ref(), a.qp));
    connect(a.ctx.as_mut(), a.qp, to_b);
    connect(b.ctx.as_mut(), b.qp, to_a);
    (a, b)
}

/// Waits, within [`WAIT`], until `done` holds; `what` says what for.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The next connection to `listener`, within [`WAIT`] (`None` past it).
fn accept_within(listener: &TcpListener) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// Runs `f` on a thread of its own; the receiver hears when it is done
/// (and the thread panicked if it hangs up without a word).
fn on_a_thread(f: impl FnOnce() + Send + 'static) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx
}

/// Waits for what [`on_a_thread`] runs to end, within [`WAIT`].
fn joined(done: &mpsc::Receiver<()>, what: &str) {
    done.recv_timeout(WAIT).unwrap_or_else(|e| panic!("{what}: {e} within {WAIT:?}"));
}

/// Whether the far end of `s` closes it within [`WAIT`] (anything it
/// sends meanwhile is read and dropped).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut sink = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true, // reset
        }
    }
    false
}

/// A raw connection to `fabric`'s device `name` that says hello as the
/// device at `claims` would.
fn hello_to(fabric: &EmuFabric, name: &str, claims: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(fabric.address(name).unwrap()).unwrap();
    let gid = nic::gid_table(claims)[1].gid;
    s.write_all(&wire::Hello { gid, lid: claims.port() }.encode()).unwrap();
    s
}

/// A side whose queue pair is connected to whatever listens at `port`
/// on loopback (a fake peer), moved to RTS with `timeout` (and one retry).
fn side_towards(port: u16, timeout: u8) -> Side {
    let mut s = side(Vec::new(), 16);
    let peer = PeerAddr { lid: port, ..addr_of(s.ctx.as_ref(), s.qp) };
    s.ctx.modify_qp(s.qp, Transition::Init { access: Access::ALL }).unwrap();
    s.ctx.modify_qp(s.qp, Transition::Rtr { peer }).unwrap();
    s.ctx.modify_qp(s.qp, Transition::Rts { timeout, retry_cnt: 1, rnr_retry: 7 }).unwrap();
    s
}

fn reg(ctx: &mut Box<dyn Context>, buf: &mut [u8], access: Access) -> Mr {
    // SAFETY: the tests' buffers are declared before the contexts, so they
    // outlive them.
    unsafe { ctx.register(buf.as_mut_ptr() as u64, buf.len() as u64, access) }.unwrap()
}

fn write(wr_id: u64, local: &Mr, at: u64, len: u32, remote: &Mr, to: u64) -> WorkRequest {
    WorkRequest::between(wr_id, Verb::Write, local, at, len, remote, to)
}

fn read(wr_id: u64, local: &Mr, at: u64, len: u32, remote: &Mr, from: u64) -> WorkRequest {
    WorkRequest::between(wr_id, Verb::Read, local, at, len, remote, from)
}

/// Polls until `n` completions are in, within [`WAIT`].
fn take(s: &mut Side, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} completions: {out:?}", out.len());
        if s.ctx.poll(s.cq, 16, &mut out).unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(out.len(), n, "completions: {out:?}");
    out
}

fn statuses(done: &[Completion]) -> Vec<WcStatus> {
    done.iter().map(|c| c.status).collect()
}

/// Waits, within [`WAIT`], until `ctx`'s events include `want`; returns
/// all it saw.
fn wait_event(ctx: &mut Box<dyn Context>, want: PortEvent) -> Vec<PortEvent> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !seen.contains(&want) {
        assert!(Instant::now() < deadline, "no {want:?} in {seen:?}");
        if ctx.events(&mut seen) == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    seen
}

#[test]
fn writes_and_reads_move_real_bytes_between_processes() {
    let mut src: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; 3_000_000];
    let mut back = vec![0u8; 3_000_000];
    let (mut a, mut b) = pair(Vec::new(), 64);
    let (ls, rd) = (reg(&mut a.ctx, &mut src, Access::ALL), reg(&mut b.ctx, &mut dst, Access::ALL));
    // A gather list of two entries, and a write of several wire parts.
    let mut two = write(1, &ls, 0, 1000, &rd, 0);
    assert!(two.sges.push(Sge { addr: ls.addr + 5000, len: 24, lkey: ls.lkey }));
    let big = write(2, &ls, 1000, 2_500_000, &rd, 1024);
    a.ctx.post(a.qp, &[two, big]).unwrap();
    let done = take(&mut a, 2);
    assert_eq!(
        done.iter().map(|c| (c.wr_id, c.qp, c.status, c.bytes)).collect::<Vec<_>>(),
        [(1, a.qp, WcStatus::Success, 1024), (2, a.qp, WcStatus::Success, 2_500_000)]
    );
    assert_eq!(dst[..1000], src[..1000]);
    assert_eq!(dst[1000..1024], src[5000..5024], "the second entry of the gather list follows the first");
    assert!(dst[1024..2_501_024] == src[1000..2_501_000]);
    // Reads back, scattered over two entries, in a chain of three.
    let lb = reg(&mut a.ctx, &mut back, Access::ALL);
    let mut scattered = read(3, &lb, 0, 100, &rd, 1024);
    assert!(scattered.sges.push(Sge { addr: lb.addr + 200, len: 50, lkey: lb.lkey }));
    let chain = [scattered, read(4, &lb, 1000, 2_000_000, &rd, 1024), read(5, &lb, 2_500_000, 1, &rd, 0)];
    a.ctx.post(a.qp, &chain).unwrap();
    assert_eq!(statuses(&take(&mut a, 3)), [WcStatus::Success; 3]);
    assert_eq!(back[..100], src[1000..1100]);
    assert_eq!(back[200..250], src[1100..1150]);
    assert!(back[1000..2_001_000] == src[1000..2_001_000]);
    assert_eq!(back[2_500_000], src[0]);
}

#[test]
fn inline_data_is_taken_at_post() {
    let mut src = vec![7u8; 128];
    let mut dst = vec![0u8; 128];
    let (mut a, mut b) = pair(Vec::new(), 64);
    let (ls, rd) = (reg(&mut a.ctx, &mut src, Access::ALL), reg(&mut b.ctx, &mut dst, Access::ALL));
    let too_long = WorkRequest { inline: true, ..write(2, &ls, 0, 65, &rd, 0) };
    let e = a.ctx.post(a.qp, &[too_long]).unwrap_err();
    assert!(matches!(&e, FabricError::BadWorkRequest { index: 0, why, .. } if why.contains("inline")), "{e}");
    let read_inline = WorkRequest { inline: true, ..read(2, &ls, 0, 8, &rd, 0) };
    assert!(matches!(a.ctx.post(a.qp, &[read_inline]), Err(FabricError::BadWorkRequest { .. })));
    // Inline bytes come only from memory registered here: past the
    // region's end, or under a key no region has, nothing is read.
    let outside = WorkRequest { inline: true, ..write(3, &ls, 120, 16, &rd, 0) };
    let e = a.ctx.post(a.qp, &[outside]).unwrap_err();
    assert!(matches!(&e, FabricError::BadWorkRequest { why, .. } if why.contains("not inside the region")), "{e}");
    let nobody = Mr { lkey: ls.lkey ^ 0xffff, ..ls };
    let e = a.ctx.post(a.qp, &[WorkRequest { inline: true, ..write(4, &nobody, 0, 8, &rd, 0) }]).unwrap_err();
    assert!(matches!(&e, FabricError::BadWorkRequest { index: 0, .. }), "{e}");
    // The remote side's region is not this context's either.
    let theirs = WorkRequest { inline: true, ..write(5, &rd, 0, 8, &rd, 0) };
    assert!(matches!(a.ctx.post(a.qp, &[theirs]), Err(FabricError::BadWorkRequest { .. })));
    assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Rts, "refused posts leave the queue pair as it was");
    a.ctx.post(a.qp, &[WorkRequest { inline: true, ..write(1, &ls, 0, 32, &rd, 0) }]).unwrap();
    // The memory changes, and even leaves the device, at once: what was
    // posted is what lands.
    src.fill(9);
    a.ctx.deregister(ls.lkey).unwrap();
    let done = take(&mut a, 1);
    assert_eq!((done[0].wr_id, done[0].status, done[0].bytes), (1, WcStatus::Success, 32));
    assert_eq!(dst[..32], [7u8; 32]);
    assert_eq!(dst[32..], [0u8; 96]);
}

#[test]
fn queue_pairs_move_through_their_states_and_post_only_in_rts() {
    let mut buf = vec![0u8; 64];
    let s = side(Vec::new(), 16);
    let Side { fabric, mut ctx, cq, qp } = s;
    assert_eq!(fabric.open("mlx5_9").err(), Some(FabricError::NoDevice("mlx5_9".into())));
    assert_eq!(fabric.kind(), "emu");
    let mr = reg(&mut ctx, &mut buf, Access::ALL);
    assert_eq!(ctx.qp_state(qp).unwrap(), QpState::Reset);
    let w = write(1, &mr, 0, 8, &mr, 0);
    assert_eq!(ctx.post(qp, &[w]).unwrap_err(), FabricError::NotReady { qp, state: QpState::Reset });
    let peer = addr_of(ctx.as_ref(), qp);
    assert!(matches!(ctx.modify_qp(qp, Transition::Rtr { peer }), Err(FabricError::BadTransition { .. })));
    ctx.modify_qp(qp, Transition::Init { access: Access::ALL }).unwrap();
    assert_eq!(ctx.post(qp, &[w]).unwrap_err(), FabricError::NotReady { qp, state: QpState::Init });
    let rts = Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 };
    assert!(matches!(ctx.modify_qp(qp, rts), Err(FabricError::BadTransition { .. })));
    let link_local = PeerAddr { gid: ctx.info().gids[0].gid, ..peer };
    let e = ctx.modify_qp(qp, Transition::Rtr { peer: link_local }).unwrap_err();
    assert!(e.to_string().contains("names no emu device"), "{e}");
    ctx.modify_qp(qp, Transition::Rtr { peer }).unwrap();
    assert_eq!(ctx.post(qp, &[w]).unwrap_err(), FabricError::NotReady { qp, state: QpState::Rtr });
    ctx.modify_qp(qp, rts).unwrap();
    ctx.modify_qp(qp, Transition::Reset).unwrap();
    assert_eq!(ctx.qp_state(qp).unwrap(), QpState::Reset);
    assert!(matches!(ctx.create_qp(CqId(99), CAPS), Err(FabricError::NoCq(_))));
    assert!(matches!(ctx.create_qp(cq, QpCaps { max_sge: 9, ..CAPS }), Err(FabricError::Limit { .. })));
    assert!(matches!(ctx.create_qp(cq, QpCaps { max_inline: 1025, ..CAPS }), Err(FabricError::Limit { .. })));
    assert!(matches!(ctx.create_cq(0), Err(FabricError::Limit { .. })));
    ctx.destroy_qp(qp).unwrap();
    assert_eq!(ctx.destroy_qp(qp), Err(FabricError::NoQp(qp)));
}

/// A queue pair talks to itself: a write to its own memory, through its
/// device's own listener (one process, one device).
#[test]
fn a_queue_pair_connected_to_itself_and_contexts_of_one_process() {
    let mut mem = vec![0u8; 8192];
    let mut other = vec![0u8; 4096];
    let mut s = side(Vec::new(), 16);
    let me = addr_of(s.ctx.as_ref(), s.qp);
    connect(s.ctx.as_mut(), s.qp, me);
    let mr = reg(&mut s.ctx, &mut mem, Access::ALL);
    mem_fill(&mr, 0, 4096, 3);
    s.ctx.post(s.qp, &[write(1, &mr, 0, 4096, &mr, 4096)]).unwrap();
    assert_eq!(statuses(&take(&mut s, 1)), [WcStatus::Success]);
    assert_eq!(mem[..4096], mem[4096..]);
    // A second context on the other device of the same fabric.
    let mut c2 = s.fabric.open("d1").unwrap();
    let cq2 = c2.create_cq(16).unwrap();
    let q2 = c2.create_qp(cq2, CAPS).unwrap();
    let q1 = s.ctx.create_qp(s.cq, CAPS).unwrap();
    let (to2, to1) = (addr_of(c2.as_ref(), q2), addr_of(s.ctx.as_ref(), q1));
    connect(s.ctx.as_mut(), q1, to2);
    connect(c2.as_mut(), q2, to1);
    let m2 = reg(&mut c2, &mut other, Access::ALL);
    s.ctx.post(q1, &[write(2, &mr, 0, 4096, &m2, 0)]).unwrap();
    let done = take(&mut s, 1);
    assert_eq!((done[0].qp, done[0].status), (q1, WcStatus::Success));
    assert_eq!(other[..], mem[..4096]);
}

/// Fills `len` bytes of `mr` at `at` with a pattern of `seed`.
fn mem_fill(mr: &Mr, at: u64, len: usize, seed: u8) {
    // SAFETY: inside the region, which the test owns and nobody else uses now.
    let bytes = unsafe { std::slice::from_raw_parts_mut((mr.addr + at) as *mut u8, len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ seed;
    }
}

/// Which memory a check names, on either side.
#[derive(Clone, Copy, PartialEq)]
enum Mem {
    /// A region with every access.
    Rw,
    /// A region that takes reads only (no local or remote write).
    Ro,
    /// A key no region has.
    NoKey,
    /// The other side's key (a local key used as a remote one).
    Other,
}

/// One check: the verb, local memory and offset, remote memory and
/// offset, bytes, and how it must end.
struct Check(&'static str, Verb, Mem, u64, Mem, u64, u32, WcStatus);

const CHECKS: [Check; 8] = [
    Check("a bad rkey", Verb::Write, Mem::Rw, 0, Mem::NoKey, 0, 8, WcStatus::RemAccessErr),
    Check("past the remote end", Verb::Write, Mem::Rw, 0, Mem::Rw, 4090, 16, WcStatus::RemAccessErr),
    Check("a write to read-only memory", Verb::Write, Mem::Rw, 0, Mem::Ro, 0, 8, WcStatus::RemAccessErr),
    Check("a local key as remote key", Verb::Write, Mem::Rw, 0, Mem::Other, 0, 8, WcStatus::RemAccessErr),
    Check("past the local end", Verb::Write, Mem::Rw, 4090, Mem::Rw, 0, 16, WcStatus::LocLenErr),
    Check("a bad lkey", Verb::Write, Mem::NoKey, 0, Mem::Rw, 0, 8, WcStatus::LocProtErr),
    Check("a read into read-only memory", Verb::Read, Mem::Ro, 0, Mem::Rw, 0, 8, WcStatus::LocProtErr),
    Check("a read of read-only remote memory", Verb::Read, Mem::Rw, 0, Mem::Ro, 0, 8, WcStatus::Success),
];

#[test]
fn keys_bounds_and_access_are_the_hardwares_and_the_rest_flushes() {
    let read_only = Access { local_write: false, remote_read: true, remote_write: false };
    for Check(what, verb, local, at, remote, to, len, want) in CHECKS {
        let (mut l, mut l_ro, mut r, mut r_ro) = (vec![1u8; 4096], vec![1u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
        let (mut a, mut b) = pair(Vec::new(), 64);
        let (lm, lm_ro) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut a.ctx, &mut l_ro, read_only));
        let (rm, rm_ro) = (reg(&mut b.ctx, &mut r, Access::ALL), reg(&mut b.ctx, &mut r_ro, read_only));
        let pick = |mem: Mem, rw: &Mr, ro: &Mr, other: &Mr| match mem {
            Mem::Rw => *rw,
            Mem::Ro => *ro,
            Mem::NoKey => Mr { lkey: rw.lkey ^ 0xffff, rkey: rw.rkey ^ 0xffff, ..*rw },
            Mem::Other => Mr { rkey: other.rkey, ..*rw },
        };
        let (mine, theirs) = (pick(local, &lm, &lm_ro, &rm), pick(remote, &rm, &rm_ro, &lm));
        let wr = WorkRequest { verb, ..write(1, &mine, at, len, &theirs, to) };
        let next = write(2, &lm, 0, 8, &rm, 100);
        a.ctx.post(a.qp, &[wr, next, next]).unwrap();
        let done = take(&mut a, 3);
        assert_eq!(done[0].status, want, "{what}");
        if want == WcStatus::Success {
            assert_eq!(statuses(&done[1..]), [WcStatus::Success; 2], "{what}");
            continue;
        }
        assert_eq!(statuses(&done[1..]), [WcStatus::WrFlushErr; 2], "{what}: what follows is flushed");
        assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Err, "{what}");
        if want == WcStatus::RemAccessErr {
            let mut events = Vec::new();
            b.ctx.events(&mut events);
            assert_eq!(events, [PortEvent::QpFatal(b.qp)], "{what}: the responder's queue pair went to ERR too");
            assert_eq!(b.ctx.qp_state(b.qp).unwrap(), QpState::Err, "{what}");
        }
        // A queue pair in ERR takes posts, and flushes them.
        a.ctx.post(a.qp, &[next]).unwrap();
        assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::WrFlushErr], "{what}");
        drop((a, b));
        assert!(r.iter().chain(&r_ro).all(|&x| x == 0), "{what}: nothing landed");
        assert!(l_ro.iter().all(|&x| x == 1), "{what}: nothing was read into read-only memory");
    }
}

/// A queue pair answers only the one it is connected to: another queue
/// pair of the same peer that claims it is not reached.
#[test]
fn a_queue_pair_answers_only_its_peer() {
    let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
    let (mut a, mut b) = pair(Vec::new(), 64);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    let stranger = a.ctx.create_qp(a.cq, CAPS).unwrap();
    let to_b = addr_of(b.ctx.as_ref(), b.qp);
    connect(a.ctx.as_mut(), stranger, to_b);
    a.ctx.post(stranger, &[write(1, &lm, 0, 8, &rm, 0), write(2, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 2)), [WcStatus::RetryExcErr, WcStatus::WrFlushErr]);
    // A queue pair number nobody has.
    let ghost = a.ctx.create_qp(a.cq, CAPS).unwrap();
    connect(a.ctx.as_mut(), ghost, PeerAddr { qp: QpNum(0xff_fffe), ..to_b });
    a.ctx.post(ghost, &[write(3, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::RetryExcErr]);
    // The real peer still works.
    a.ctx.post(a.qp, &[write(4, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::Success]);
    drop((a, b));
    assert_eq!(r[..8], [1u8; 8]);
}

#[test]
fn queues_and_completion_queues_have_bounds() {
    let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
    let (mut a, mut b) = pair(Vec::new(), 4);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    let chain: Vec<WorkRequest> = (0..10).map(|i| write(i, &lm, 0, 8, &rm, 0)).collect();
    let e = a.ctx.post(a.qp, &chain).unwrap_err();
    assert_eq!(e, FabricError::QueueFull { qp: a.qp, outstanding: 8, max: 8 });
    // Eight completions into a queue of four, none polled: an overrun.
    let seen = wait_event(&mut a.ctx, PortEvent::CqOverrun(a.cq));
    assert_eq!(seen, [PortEvent::CqOverrun(a.cq)]);
    let mut out = Vec::new();
    a.ctx.poll(a.cq, 64, &mut out).unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Err);
    a.ctx.deregister(lm.lkey).unwrap();
    assert_eq!(a.ctx.deregister(lm.lkey), Err(FabricError::NoRegion(lm.lkey)));
}

#[test]
fn a_region_named_by_outstanding_work_is_not_given_back() {
    // A peer that takes the connection (the kernel does) and never reads.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut l = vec![1u8; 1 << 20];
    // Timeout 0 is verbs' "forever": the cap, 30 s, so it surely waits.
    let mut s = side_towards(silent.local_addr().unwrap().port(), 0);
    let lm = reg(&mut s.ctx, &mut l, Access::ALL);
    s.ctx.post(s.qp, &[write(1, &lm, 0, 1 << 20, &lm, 0)]).unwrap();
    assert_eq!(s.ctx.deregister(lm.lkey), Err(FabricError::RegionBusy(lm.lkey, 1)));
    s.ctx.modify_qp(s.qp, Transition::Err).unwrap();
    assert_eq!(statuses(&take(&mut s, 1)), [WcStatus::WrFlushErr], "moved to ERR: flushed at once");
    s.ctx.deregister(lm.lkey).unwrap();
}

/// A peer that takes connections and never answers: the work times out
/// after the queue pair's retries, as `RETRY_EXC_ERR`, and what follows
/// is flushed.
#[test]
fn a_peer_that_never_answers_times_out() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = on_a_thread(move || {
        // Takes the bytes and says nothing, until the connection ends.
        let mut s = accept_within(&silent).expect("the link connects");
        assert!(closed_by_peer(&mut s), "the link closes its connection when it gives up");
    });
    let mut l = vec![1u8; 4096];
    // 4.096 µs × 2^10 × 2 tries is 8 ms: the floor, 100 ms, applies.
    let mut s = side_towards(port, 10);
    let lm = reg(&mut s.ctx, &mut l, Access::ALL);
    s.ctx.post(s.qp, &[write(1, &lm, 0, 8, &lm, 0), write(2, &lm, 0, 8, &lm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut s, 2)), [WcStatus::RetryExcErr, WcStatus::WrFlushErr]);
    drop(s);
    joined(&hold, "the silent peer");
    assert_eq!(retry_ns(14, 7), 4096 * (1 << 14) * 8, "Mooncake's settings: about 537 ms");
    assert_eq!(retry_ns(1, 0), RETRY_FLOOR_NS);
    assert_eq!((retry_ns(0, 7), retry_ns(31, 7)), (RETRY_CAP_NS, RETRY_CAP_NS));
}

/// A peer that answers a byte at a time and never finishes an answer:
/// the part times out all the same.
#[test]
fn a_peer_that_trickles_bytes_times_out_too() {
    let trickler = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = trickler.local_addr().unwrap().port();
    let hold = on_a_thread(move || {
        let mut s = accept_within(&trickler).expect("the link connects");
        // A response header that announces 1 MiB of data, then the data,
        // a byte every 5 ms, until the connection ends (or the deadline:
        // the link gives up long before).
        let header = wire::Response { status: wire::Status::Ok, data_len: 1 << 20, tag: 0 }.encode();
        let deadline = Instant::now() + WAIT;
        for b in header.iter().chain(std::iter::repeat(&0u8)) {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            assert!(Instant::now() < deadline, "the link still reads the trickle after {WAIT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut l = vec![1u8; 4096];
    let mut s = side_towards(port, 10);
    let lm = reg(&mut s.ctx, &mut l, Access::ALL);
    s.ctx.post(s.qp, &[read(1, &lm, 0, 4096, &lm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut s, 1)), [WcStatus::RetryExcErr]);
    drop(s);
    joined(&hold, "the trickling peer");
}

/// The peer "process" goes mid-work: what was on the wire fails as
/// `RETRY_EXC_ERR`, what followed is flushed, and later work fails too.
#[test]
fn a_peer_that_goes_mid_work_fails_the_work_and_flushes_the_rest() {
    let mut l = vec![5u8; 1 << 20];
    let mut r = vec![0u8; 1 << 20];
    let (mut a, mut b) = pair(Vec::new(), 64);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    let chain: Vec<WorkRequest> = (0..8).map(|i| write(i, &lm, 0, 1 << 20, &rm, 0)).collect();
    a.ctx.post(a.qp, &chain).unwrap();
    let Side { fabric, ctx, .. } = b;
    drop(fabric); // its listener and connections go; its context lives on
    let mut done = take(&mut a, 8);
    if done.iter().all(|c| c.status == WcStatus::Success) {
        // All landed before the peer went: the next one meets it gone.
        a.ctx.post(a.qp, &[write(8, &lm, 0, 8, &rm, 0)]).unwrap();
        done.extend(take(&mut a, 1));
    }
    let s = statuses(&done);
    let first = s.iter().position(|&x| x != WcStatus::Success).unwrap();
    assert_eq!(s[first], WcStatus::RetryExcErr, "{s:?}");
    assert!(s[first + 1..].iter().all(|&x| x == WcStatus::WrFlushErr), "{s:?}");
    assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Err);
    // Made again towards the same peer (its listener is gone): refused.
    a.ctx.modify_qp(a.qp, Transition::Reset).unwrap();
    let gone = addr_of(ctx.as_ref(), QpNum(1));
    connect(a.ctx.as_mut(), a.qp, gone);
    a.ctx.post(a.qp, &[write(9, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::RetryExcErr]);
    drop(ctx);
}

/// The port is taken down and up by hand here (the fabric's own call),
/// so every check runs while it is down, however slow the machine; the
/// timer that does it from `SHARDWIRE_EMU_FAULTS` is tested on its own.
#[test]
fn a_port_down_fails_its_work_refuses_its_peers_and_comes_back_up() {
    let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
    let (mut a, mut b) = pair(Vec::new(), 64);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    assert!(a.fabric.set_device("d0", false));
    let seen = wait_event(&mut a.ctx, PortEvent::PortDown);
    assert_eq!(seen, [PortEvent::PortDown, PortEvent::QpFatal(a.qp)]);
    assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Err);
    assert_eq!(a.fabric.devices()[0].state, PortState::Down);
    assert_eq!(a.fabric.devices()[1].state, PortState::Active, "only d0 went");
    a.ctx.post(a.qp, &[write(1, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::WrFlushErr]);
    let peer = addr_of(b.ctx.as_ref(), b.qp);
    a.ctx.modify_qp(a.qp, Transition::Reset).unwrap();
    a.ctx.modify_qp(a.qp, Transition::Init { access: Access::ALL }).unwrap();
    assert!(matches!(a.ctx.modify_qp(a.qp, Transition::Rtr { peer }), Err(FabricError::BadTransition { .. })));
    // The peer's work towards the downed port is refused.
    b.ctx.post(b.qp, &[write(2, &rm, 0, 8, &lm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut b, 1)), [WcStatus::RetryExcErr]);
    // Up again: connected anew, the work goes through.
    assert!(a.fabric.set_device("d0", true));
    wait_event(&mut a.ctx, PortEvent::PortActive);
    a.ctx.modify_qp(a.qp, Transition::Rtr { peer }).unwrap();
    a.ctx.modify_qp(a.qp, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 }).unwrap();
    b.ctx.modify_qp(b.qp, Transition::Reset).unwrap();
    let to_a = addr_of(a.ctx.as_ref(), a.qp);
    connect(b.ctx.as_mut(), b.qp, to_a);
    a.ctx.post(a.qp, &[write(3, &lm, 0, 8, &rm, 8)]).unwrap();
    b.ctx.post(b.qp, &[write(4, &rm, 100, 8, &lm, 100)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::Success]);
    assert_eq!(statuses(&take(&mut b, 1)), [WcStatus::Success]);
    drop((a, b));
    assert_eq!(r[8..16], [1u8; 8]);
}

/// The fault timer applies the port changes in their order; only the
/// order is checked (and that each happens, within generous deadlines),
/// not when.
#[test]
fn the_fault_timer_takes_ports_down_then_up_in_order() {
    let mut s = side(Vec::new(), 16);
    let d0 = Arc::downgrade(s.fabric.device("d0").unwrap());
    let timed = vec![(Duration::from_millis(20), d0.clone(), false), (Duration::from_millis(40), d0, true)];
    let timer = on_a_thread(move || apply_in_time(&timed, Instant::now(), &AtomicBool::new(false)));
    joined(&timer, "the timer");
    let mut seen = Vec::new();
    s.ctx.events(&mut seen);
    assert_eq!(seen, [PortEvent::PortDown, PortEvent::PortActive], "down, then up");
    // A timer that is stopped applies nothing more, however far off its
    // changes are.
    let d1 = Arc::downgrade(s.fabric.device("d1").unwrap());
    let stop = Arc::new(AtomicBool::new(true));
    let stopped = stop.clone();
    let timer = on_a_thread(move || apply_in_time(&[(Duration::from_secs(3600), d1, false)], Instant::now(), &stopped));
    joined(&timer, "a stopped timer");
    assert_eq!(s.fabric.devices()[1].state, PortState::Active);
    // The fabric runs it from its faults.
    let down = vec![EmuFault::Down { device: "d1".into(), after: Duration::ZERO }];
    let f = EmuFabric::new(EmuConfig { faults: down, ..EmuConfig::new(&["d0", "d1"]) }).unwrap();
    wait_until("d1 down by the timer", || f.devices()[1].state == PortState::Down);
    assert_eq!(f.devices()[0].state, PortState::Active);
}

#[test]
fn error_every_fails_every_nth_work_request_of_the_device() {
    let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
    let (mut a, mut b) = pair(vec![EmuFault::ErrorEvery { device: "d0".into(), every: 3 }], 64);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    let chain: Vec<WorkRequest> = (0..5).map(|i| write(i, &lm, 0, 8, &rm, i * 8)).collect();
    a.ctx.post(a.qp, &chain).unwrap();
    use WcStatus::*;
    assert_eq!(statuses(&take(&mut a, 5)), [Success, Success, RetryExcErr, WrFlushErr, WrFlushErr]);
    // The count goes on from where it was: the queue pair made again, the
    // next three are the 4th (flushed ones do not count), 5th and 6th.
    a.ctx.modify_qp(a.qp, Transition::Reset).unwrap();
    let to_b = addr_of(b.ctx.as_ref(), b.qp);
    connect(a.ctx.as_mut(), a.qp, to_b);
    a.ctx.post(a.qp, &chain[..3]).unwrap();
    assert_eq!(statuses(&take(&mut a, 3)), [Success, Success, RetryExcErr]);
    // The other device has no such fault.
    drop((a, b));
    assert_eq!(r[..16], [1u8; 16]);
    // Every 0th: refused, with a reason, before anything starts.
    let never = EmuConfig {
        faults: vec![EmuFault::ErrorEvery { device: "d1".into(), every: 0 }],
        ..EmuConfig::new(&["d0", "d1"])
    };
    let e = EmuFabric::new(never).err().expect("error_every=0 is refused");
    assert!(e.to_string().contains("error_every=0 on d1"), "{e}");
}

/// Regions come and go while a peer reads and writes them: every
/// operation either lands in registered memory or fails; none touches
/// memory given back. Each buffer is kept, and filled with a marker as
/// soon as it is deregistered: a late write would change the marker, seen
/// after the completions, and again once the peer's fabric is gone.
#[test]
fn regions_given_back_under_a_peers_traffic_are_not_touched() {
    const ROUNDS: u64 = 20;
    let marker = |round: u64| 0xa0 ^ round as u8;
    let mut l = vec![1u8; 1 << 16];
    // Declared before the sides: they outlive the contexts.
    let mut kept: Vec<Vec<u8>> = (0..ROUNDS).map(|_| vec![0u8; 1 << 16]).collect();
    let (mut a, mut b) = pair(Vec::new(), 1024);
    let lm = reg(&mut a.ctx, &mut l, Access::ALL);
    for round in 0..ROUNDS {
        let r = &mut kept[round as usize];
        let rm = reg(&mut b.ctx, r, Access::ALL);
        if a.ctx.qp_state(a.qp).unwrap() == QpState::Err {
            // Both ends went to ERR (the responder's on the refusal). New
            // queue pairs, as the slice engine makes: parts of the old
            // ones still on the wire cannot reach them.
            assert_eq!(b.ctx.qp_state(b.qp).unwrap(), QpState::Err);
            a.ctx.destroy_qp(a.qp).unwrap();
            b.ctx.destroy_qp(b.qp).unwrap();
            (a.qp, b.qp) = (a.ctx.create_qp(a.cq, CAPS).unwrap(), b.ctx.create_qp(b.cq, CAPS).unwrap());
            let (to_b, to_a) = (addr_of(b.ctx.as_ref(), b.qp), addr_of(a.ctx.as_ref(), a.qp));
            connect(a.ctx.as_mut(), a.qp, to_b);
            connect(b.ctx.as_mut(), b.qp, to_a);
        }
        let chain: Vec<WorkRequest> = (0..8)
            .map(|i| if i % 2 == 0 { write(i, &lm, 0, 1 << 16, &rm, 0) } else { read(i, &lm, 0, 1 << 16, &rm, 0) })
            .collect();
        a.ctx.post(a.qp, &chain).unwrap();
        if round % 2 == 0 {
            std::thread::sleep(Duration::from_micros(200 * round));
        }
        b.ctx.deregister(rm.lkey).unwrap();
        // Given back: nobody may touch it now but its owner.
        kept[round as usize].fill(marker(round));
        let s = statuses(&take(&mut a, 8));
        let ok = s.iter().take_while(|&&x| x == WcStatus::Success).count();
        if ok < 8 {
            assert_eq!(s[ok], WcStatus::RemAccessErr, "round {round}: {s:?}");
            assert!(s[ok + 1..].iter().all(|&x| x == WcStatus::WrFlushErr), "round {round}: {s:?}");
        }
        assert!(kept[round as usize].iter().all(|&x| x == marker(round)), "round {round}: written after it went");
    }
    // The peer "process" goes, its threads with it: still untouched.
    let b_threads = b.fabric.thread_count();
    drop((a, b));
    wait_until("the peer's threads end", || b_threads.load(Ordering::Acquire) == 0);
    for (round, r) in kept.iter().enumerate() {
        assert!(r.iter().all(|&x| x == marker(round as u64)), "round {round}: written after it went");
    }
}

#[test]
fn devices_describe_their_listeners() {
    let mut topo = EmuConfig::new(&["mlx5_0", "mlx5_1"]);
    topo.devices[1].numa_node = Some(1);
    let f = EmuFabric::new(topo).unwrap();
    let infos = f.devices();
    assert_eq!(infos.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["mlx5_0", "mlx5_1"]);
    for d in &infos {
        let addr = f.address(&d.name).unwrap();
        assert_eq!(d.lid, addr.port());
        assert_eq!(nic::address_of(&d.gids[choose(d)].gid, d.lid), Some(addr));
        assert_eq!(d.state, PortState::Active);
    }
    assert_eq!((infos[0].numa_node, infos[1].numa_node), (None, Some(1)));
    assert_ne!(infos[0].lid, infos[1].lid);
    assert!(EmuFabric::new(EmuConfig::new(&["x", "x"])).is_err());
    assert!(EmuFabric::new(EmuConfig::new(&[])).is_err());
    assert!(!f.set_device("nope", false));
}

#[test]
fn the_configuration_comes_from_the_settings_and_the_topology_file() {
    let dir = std::env::temp_dir().join(format!("shardwire-emu-topo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let topo = dir.join("topo.json");
    std::fs::write(&topo, r#"{"cpu:0": [["emu0"], ["emu1"]], "cpu:1": [["emu1"], ["emu0"]]}"#).unwrap();
    let path = topo.to_string_lossy().to_string();
    let s = Settings::from_lookup(|n| match n {
        "SHARDWIRE_FABRIC" => Some("emu".into()),
        "SHARDWIRE_EMU_FAULTS" => Some("emu1:error_every=2".into()),
        "MC_CUSTOM_TOPO_JSON" => Some(path.clone()),
        "MC_TCP_BIND_ADDRESS" => Some("127.0.0.1".into()),
        _ => None,
    })
    .unwrap();
    let c = EmuConfig::from_settings(&s).unwrap();
    assert_eq!(
        c.devices,
        [EmuDevice { name: "emu0".into(), numa_node: Some(0) }, EmuDevice { name: "emu1".into(), numa_node: Some(1) }]
    );
    assert_eq!(c.faults, [EmuFault::ErrorEvery { device: "emu1".into(), every: 2 }]);
    std::fs::write(&topo, "not json").unwrap();
    assert!(EmuConfig::from_settings(&s).unwrap_err().contains("topo.json"));
    assert!(EmuConfig::from_settings(&Settings::default()).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Idle limits short enough to see them act in a test (they are
/// bounds, not measures: the checks only wait for what follows).
fn quick(link_idle: Duration, inbound_idle: Duration) -> EmuConfig {
    EmuConfig { idle: IdleLimits { link: link_idle, inbound: inbound_idle }, ..EmuConfig::new(&["d0", "d1"]) }
}

/// A link with nothing to do closes (its threads go, on both sides), and
/// the queue pair that held it connects again on its next post.
#[test]
fn a_quiet_link_closes_and_its_queue_pair_connects_again() {
    let (mut l, mut r) = (vec![3u8; 4096], vec![0u8; 4096]);
    let a = side_of(quick(Duration::from_millis(20), INBOUND_IDLE), 64);
    let (mut a, mut b) = pair_of(a, side(Vec::new(), 64));
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    // At rest: a's two listeners (its link's sender goes when it closes);
    // b's, and the sender of its own link, which has not sent anything
    // but is not quiet for long enough to close on b's limit.
    let (a_rest, b_rest) = (2, b.fabric.threads());
    assert_eq!(b_rest, 3);
    for round in 0..3u64 {
        a.ctx.post(a.qp, &[write(round, &lm, 0, 8, &rm, round * 8)]).unwrap();
        assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::Success], "round {round}");
        // The link closes: its sender and receiver, and the peer's
        // responder (its connection closed), all go.
        wait_until("the quiet link closes", || a.fabric.links("d0") == Some(0) && a.fabric.threads() == a_rest);
        wait_until("the peer's responder ends", || b.fabric.threads() == b_rest);
        assert_eq!(a.ctx.qp_state(a.qp).unwrap(), QpState::Rts, "a quiet link is no failure");
    }
    drop((a, b));
    assert_eq!(r[..24], [3u8; 24]);
}

/// A peer that says hello and then nothing (it vanished) is cut off after
/// the inbound idle limit; one that is quiet when the port goes down is
/// cut off then; a connection while the port is down is refused.
#[test]
fn connections_from_peers_end_when_quiet_or_when_the_port_goes() {
    let s = side_of(quick(LINK_IDLE, Duration::from_millis(50)), 16);
    let rest = s.fabric.threads();
    let me = s.fabric.address("d1").unwrap();
    let mut quiet = hello_to(&s.fabric, "d0", me);
    assert!(closed_by_peer(&mut quiet), "a quiet peer is cut off");
    wait_until("its responder ends", || s.fabric.threads() == rest);

    let s = side(Vec::new(), 16);
    let rest = s.fabric.threads();
    let mut quiet = hello_to(&s.fabric, "d0", me);
    wait_until("the connection is served", || s.fabric.threads() == rest + 1);
    assert!(s.fabric.set_device("d0", false));
    assert!(closed_by_peer(&mut quiet), "the port went down");
    wait_until("its responder ends", || s.fabric.threads() == rest);
    let mut refused = hello_to(&s.fabric, "d0", me);
    assert!(closed_by_peer(&mut refused), "refused while the port is down");
    assert_eq!(s.fabric.threads(), rest, "no responder for a refused connection");
}

/// Dropping a fabric ends every thread it started, whatever they were
/// doing: listeners (nothing wakes them but their tick; one on a port
/// down already), responders of live connections and of quiet ones, links
/// with work on the wire, the fault timer.
#[test]
fn dropping_the_fabric_ends_every_thread() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
    let later = vec![EmuFault::Up { device: "d1".into(), after: Duration::from_secs(3600) }];
    let (mut a, mut b) = pair(later, 64);
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    a.ctx.post(a.qp, &[write(1, &lm, 0, 8, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::Success]);
    // A second queue pair with work on the wire towards a silent peer.
    let stuck = a.ctx.create_qp(a.cq, CAPS).unwrap();
    let peer = PeerAddr { lid: silent.local_addr().unwrap().port(), ..addr_of(a.ctx.as_ref(), stuck) };
    a.ctx.modify_qp(stuck, Transition::Init { access: Access::ALL }).unwrap();
    a.ctx.modify_qp(stuck, Transition::Rtr { peer }).unwrap();
    a.ctx.modify_qp(stuck, Transition::Rts { timeout: 0, retry_cnt: 7, rnr_retry: 7 }).unwrap();
    a.ctx.post(stuck, &[write(2, &lm, 0, 8, &lm, 0)]).unwrap();
    let link = a.fabric.device("d0").unwrap().link(peer_socket(&peer)).expect("the link to the silent peer");
    wait_until("the work is on the wire", || link.on_the_wire() == 1);
    // A quiet connection, served.
    let before = b.fabric.threads();
    let mut quiet = hello_to(&b.fabric, "d1", a.fabric.address("d1").unwrap());
    wait_until("the connection is served", || b.fabric.threads() == before + 1);
    // A port that is down already when the fabric goes.
    assert!(a.fabric.set_device("d1", false));
    let (a_threads, b_threads) = (a.fabric.thread_count(), b.fabric.thread_count());
    drop((a, b));
    wait_until("every thread of both ends", || {
        a_threads.load(Ordering::Acquire) == 0 && b_threads.load(Ordering::Acquire) == 0
    });
    assert!(closed_by_peer(&mut quiet));
    drop(link);
}

fn peer_socket(peer: &PeerAddr) -> SocketAddr {
    nic::address_of(&peer.gid, peer.lid).unwrap()
}

/// A link's queue is bounded: a work request that finds it full
/// completes with RETRY_EXC_ERR at once (the queue pair to ERR); every
/// work request posted completes exactly once.
#[test]
fn a_link_whose_queue_is_full_fails_the_work_request_that_finds_it_so() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut l = vec![1u8; 4096];
    // Timeout 0: the cap, 30 s; the peer never answers, so the link's
    // sender stops at its parts in flight and the queue fills.
    let mut s = side_towards(silent.local_addr().unwrap().port(), 0);
    let n = link::LINK_QUEUE_MAX + 2;
    let cq = s.ctx.create_cq(2 * n as u32).unwrap();
    let qp = s.ctx.create_qp(cq, QpCaps { max_send_wr: n as u32, ..CAPS }).unwrap();
    let peer = PeerAddr { qp: QpNum(1), ..addr_of(s.ctx.as_ref(), s.qp) };
    let peer = PeerAddr { lid: silent.local_addr().unwrap().port(), ..peer };
    s.ctx.modify_qp(qp, Transition::Init { access: Access::ALL }).unwrap();
    s.ctx.modify_qp(qp, Transition::Rtr { peer }).unwrap();
    s.ctx.modify_qp(qp, Transition::Rts { timeout: 0, retry_cnt: 7, rnr_retry: 7 }).unwrap();
    let lm = reg(&mut s.ctx, &mut l, Access::ALL);
    let chain: Vec<WorkRequest> = (0..n as u64).map(|i| write(i, &lm, 0, 8, &lm, 0)).collect();
    // One post: the sender cannot take work meanwhile (it needs the
    // context's lock for each), so at most one leaves the queue.
    s.ctx.post(qp, &chain).unwrap();
    assert_eq!(s.ctx.qp_state(qp).unwrap(), QpState::Err, "the one that found the queue full failed at once");
    s.ctx.modify_qp(qp, Transition::Err).unwrap();
    let mut done = Vec::new();
    let deadline = Instant::now() + WAIT;
    while done.len() < n {
        assert!(Instant::now() < deadline, "{} of {n} completions", done.len());
        if s.ctx.poll(cq, 1024, &mut done).unwrap() == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let ids: Vec<u64> = done.iter().map(|c| c.wr_id).collect();
    assert_eq!(ids, (0..n as u64).collect::<Vec<_>>(), "each once, in order");
    let failed: Vec<usize> = (0..n).filter(|&i| done[i].status == WcStatus::RetryExcErr).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0] >= link::LINK_QUEUE_MAX, "the queue held {} before: {failed:?}", link::LINK_QUEUE_MAX);
    assert!(done.iter().all(|c| matches!(c.status, WcStatus::RetryExcErr | WcStatus::WrFlushErr)));
}

/// A link's thread that panics still fails the work it had on the wire
/// (its [`link::Ending`] runs as it unwinds): nothing waits for ever.
#[test]
fn a_link_thread_that_panics_fails_the_work_it_carried() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut l = vec![1u8; 4096];
    let mut s = side_towards(silent.local_addr().unwrap().port(), 0);
    let lm = reg(&mut s.ctx, &mut l, Access::ALL);
    s.ctx.post(s.qp, &[write(1, &lm, 0, 8, &lm, 0), write(2, &lm, 0, 8, &lm, 0)]).unwrap();
    let link = s.fabric.device("d0").unwrap().link(silent.local_addr().unwrap()).expect("the link");
    wait_until("the work is on the wire", || link.on_the_wire() == 2);
    let panicked = std::thread::spawn(move || {
        let _end = link::Ending { link: &link, rx: None, carrying: None, why: String::new() };
        panic!("a link's thread panics (on purpose)");
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(panicked.join().is_err());
    });
    assert_eq!(rx.recv_timeout(WAIT), Ok(true), "the thread panicked");
    assert_eq!(statuses(&take(&mut s, 2)), [WcStatus::RetryExcErr, WcStatus::WrFlushErr]);
    assert_eq!(s.fabric.links("d0"), Some(0), "the link ended");
}

/// A hello is believed only from the address it names, on a device that
/// listens beyond loopback.
#[test]
fn a_hello_is_believed_only_from_the_address_it_names() {
    let hello = |addr: &str| {
        let a: SocketAddr = addr.parse().unwrap();
        wire::Hello { gid: nic::gid_table(a)[1].gid, lid: a.port() }
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let h = hello("10.0.0.7:4000");
    assert!(nic::hello_is_from(ip("10.0.0.1"), &h, ip("10.0.0.7")));
    assert!(!nic::hello_is_from(ip("10.0.0.1"), &h, ip("10.0.0.8")), "another host speaking for it");
    assert!(nic::hello_is_from(ip("::"), &h, ip("::ffff:10.0.0.7")), "a dual-stack listener sees it mapped");
    assert!(!nic::hello_is_from(ip("0.0.0.0"), &h, ip("127.0.0.1")));
    assert!(nic::hello_is_from(ip("127.0.0.1"), &h, ip("127.0.0.1")), "loopback: this host only");
    let link_local = wire::Hello { gid: nic::gid_table("10.0.0.7:4000".parse().unwrap())[0].gid, lid: 4000 };
    assert!(!nic::hello_is_from(ip("10.0.0.1"), &link_local, ip("10.0.0.7")), "names no address");
    // connect_from: the connection comes from the address asked for.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = nic::connect_from(ip("127.0.0.2"), listener.local_addr().unwrap(), WAIT).unwrap();
    let got = accept_within(&listener).expect("connected");
    assert_eq!(got.peer_addr().unwrap().ip(), ip("127.0.0.2"));
}

/// This host's address beyond loopback, if it has one (a route out).
fn routable_ip() -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?; // no packet: a UDP connect only routes
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Devices listening beyond loopback: peers connect from their devices'
/// addresses and are served; a connection whose hello names another
/// address than it comes from is refused.
#[test]
fn devices_beyond_loopback_serve_only_hellos_from_where_they_come() {
    let Some(ip) = routable_ip() else {
        eprintln!("no address beyond loopback here: skipped");
        return;
    };
    let config = || EmuConfig { bind: ip, ..EmuConfig::new(&["d0", "d1"]) };
    let (mut l, mut r) = (vec![4u8; 4096], vec![0u8; 4096]);
    let (mut a, mut b) = pair_of(side_of(config(), 64), side_of(config(), 64));
    let (lm, rm) = (reg(&mut a.ctx, &mut l, Access::ALL), reg(&mut b.ctx, &mut r, Access::ALL));
    a.ctx.post(a.qp, &[write(1, &lm, 0, 64, &rm, 0)]).unwrap();
    assert_eq!(statuses(&take(&mut a, 1)), [WcStatus::Success]);
    // From loopback, naming the device's own address: refused.
    let target = b.fabric.address("d0").unwrap();
    let mut liar = nic::connect_from("127.0.0.1".parse().unwrap(), target, WAIT).unwrap();
    let claims = a.fabric.address("d0").unwrap();
    liar.write_all(&wire::Hello { gid: nic::gid_table(claims)[1].gid, lid: claims.port() }.encode()).unwrap();
    assert!(closed_by_peer(&mut liar), "a hello from elsewhere than it names is refused");
    drop((a, b));
    assert_eq!(r[..64], [4u8; 64]);
}
