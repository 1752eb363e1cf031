//! The initiator side of the TCP data protocol, on one shard.
//!
//! Each shard keeps one persistent connection per peer, opened lazily with an
//! io_uring connect, so the caller never blocks on it. A connection carries
//! many requests at once:
//!
//! - the **send side** takes up to 256 queued slices and writes all their
//!   headers (and WRITE payloads, straight from registered memory) in one
//!   `sendmsg`;
//! - the **receive side** reads the answers of the oldest slices sent in one
//!   `recvmsg`: for each, its 8-byte status and, for a READ, its bytes,
//!   straight into registered memory.
//!
//! The two run concurrently, so requests are pipelined: the server (ours or
//! Mooncake's) handles them in order. A non-zero status fails its slice; the
//! server closes after one, so the slices behind it are re-sent on a fresh
//! connection. A connection that breaks (peer died, reset) re-sends what it
//! can once, if time remains; one that goes silent past a slice's deadline is
//! torn down and that slice fails with `Timeout`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::iov::{IOV_MAX, IoVecs};
use super::slice::{Peer, Slice};
use super::sock::{self, RawSockAddr};
use crate::engine::batch::TransferStatus;
use crate::proto::mooncake::tcp::{self, Opcode, RequestHeader};
use crate::runtime::{Completion, ShardCtx, TimerId};

/// Bounds on what one connection takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Slices per sendmsg/recvmsg (each takes two iovecs).
    pub group_slices_max: usize,
    /// Payload bytes per sendmsg/recvmsg.
    pub group_bytes_max: u64,
    /// Slices sent and not yet answered.
    pub awaiting_max: usize,
    /// Payload bytes sent (or to be received) and not yet answered, to a
    /// peer on another host: enough for the bandwidth-delay product.
    pub awaiting_bytes_max: u64,
    /// The same for a peer on this host. Both ends of a loopback connection
    /// run on one core (the server adopts it on the shard of its incoming
    /// CPU), so a payload is copied into socket buffers and out again there;
    /// while source, socket buffers and destination of what is in flight fit
    /// in that core's L2 cache, the copies run from cache. A quarter of the
    /// L2 (512 KiB of 2 MiB here) took loopback 1 MiB writes from 3.9 to
    /// 7.4 GB/s against 256 MiB.
    pub awaiting_bytes_local_max: u64,
    /// How long a connect may take.
    pub connect_timeout: Duration,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            group_slices_max: 256,
            group_bytes_max: 64 << 20,
            awaiting_max: 1024,
            awaiting_bytes_max: 64 << 20,
            awaiting_bytes_local_max: local_inflight_default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Answers at least this large are waited for with SO_RCVLOWAT.
const RCVLOWAT_MIN: usize = 64 << 10;
/// The largest SO_RCVLOWAT set (the kernel caps it at half the largest
/// receive buffer; a larger answer is taken in several wake-ups).
const RCVLOWAT_MAX: usize = 4 << 20;
/// io_uring: arm the poll before trying the receive (`IORING_RECVSEND_POLL_FIRST`).
const IORING_RECVSEND_POLL_FIRST: u16 = 1;

/// A quarter of CPU 0's L2 cache, within 128 KiB..=4 MiB (512 KiB if
/// sysfs does not say).
pub(crate) fn local_inflight_default() -> u64 {
    static BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        crate::topo::cache::l2_bytes(std::path::Path::new("/sys"), 0)
            .map_or(512 << 10, |l2| (l2 / 4).clamp(128 << 10, 4 << 20))
    })
}

/// One shard's client connections for one engine.
pub struct ClientShard {
    conns: HashMap<Peer, Rc<RefCell<Conn>>>,
    next_id: u64,
    limits: ClientLimits,
    closed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Ready,
    Broken,
}

struct Conn {
    id: u64,
    peer: Peer,
    shard: Weak<RefCell<ClientShard>>,
    limits: ClientLimits,
    fd: Option<OwnedFd>,
    phase: Phase,
    connect_addr: Option<Box<RawSockAddr>>,
    connect_deadline: Instant,
    /// Payload bytes this connection may have awaiting answers.
    inflight_max: u64,
    /// The socket's SO_RCVLOWAT as last set (1, the kernel's default).
    rcvlowat: usize,
    /// Slices not yet sent.
    queue: VecDeque<Slice>,
    /// Slices sent (or being sent), oldest first, awaiting their answers.
    awaiting: VecDeque<Slice>,
    awaiting_bytes: u64,
    send: Option<Box<SendGroup>>,
    recv: Option<Box<RecvGroup>>,
    ops: u32,
    timer: Option<(TimerId, Instant)>,
    /// Why the connection broke, and whether its slices may be re-sent.
    broken: Option<(TransferStatus, String, bool)>,
}

struct SendGroup {
    _headers: Vec<[u8; tcp::HEADER_BYTES]>,
    iov: IoVecs,
}

struct RecvGroup {
    statuses: Vec<[u8; tcp::STATUS_BYTES]>,
    iov: IoVecs,
    /// Slices (from the front of `awaiting`) this group answers.
    slices: usize,
}

impl ClientShard {
    pub fn new(limits: ClientLimits) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self { conns: HashMap::new(), next_id: 0, limits, closed: false }))
    }

    /// Connections currently open or opening.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Queues slices for `peer`, opening a connection if there is none.
    pub fn submit(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx, peer: Peer, slices: Vec<Slice>) {
        if slices.is_empty() {
            return;
        }
        let conn = {
            let mut shard = this.borrow_mut();
            if shard.closed {
                drop(shard);
                for s in slices {
                    s.fail(TransferStatus::Failed, "the engine is shutting down");
                }
                return;
            }
            match shard.conns.get(&peer) {
                Some(c) => c.clone(),
                None => {
                    shard.next_id += 1;
                    let conn = Rc::new(RefCell::new(Conn {
                        id: shard.next_id,
                        peer,
                        shard: Rc::downgrade(this),
                        limits: shard.limits,
                        fd: None,
                        phase: Phase::Connecting,
                        connect_addr: None,
                        connect_deadline: Instant::now() + shard.limits.connect_timeout,
                        inflight_max: if sock::is_local_ip(peer.addr.ip()) {
                            shard.limits.awaiting_bytes_local_max
                        } else {
                            shard.limits.awaiting_bytes_max
                        },
                        rcvlowat: 1,
                        queue: VecDeque::new(),
                        awaiting: VecDeque::new(),
                        awaiting_bytes: 0,
                        send: None,
                        recv: None,
                        ops: 0,
                        timer: None,
                        broken: None,
                    }));
                    shard.conns.insert(peer, conn.clone());
                    drop(shard);
                    start_connect(ctx, &conn);
                    conn
                }
            }
        };
        conn.borrow_mut().queue.extend(slices);
        arm_timer(ctx, &conn);
        pump(ctx, &conn);
    }

    /// Aborts every connection; their slices fail. New submissions fail.
    pub fn close(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx) {
        let conns: Vec<_> = {
            let mut shard = this.borrow_mut();
            shard.closed = true;
            shard.conns.drain().map(|(_, c)| c).collect()
        };
        for conn in conns {
            break_conn(ctx, &conn, TransferStatus::Failed, "the engine is shutting down".into(), false);
        }
    }
}

/// Wraps a completion handler so that a bug in it breaks its connection
/// (settling its slices) instead of leaving them to wait for the timeout.
fn guarded(
    conn_rc: &Rc<RefCell<Conn>>,
    handler: fn(&mut ShardCtx, &Rc<RefCell<Conn>>, Completion),
) -> impl FnOnce(&mut ShardCtx, Completion) + 'static {
    let rc = conn_rc.clone();
    move |ctx, done| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(ctx, &rc, done)));
        if let Err(payload) = outcome {
            if let Ok(mut c) = rc.try_borrow_mut() {
                c.ops = c.ops.saturating_sub(1);
            }
            break_conn(ctx, &rc, TransferStatus::Failed, "internal error in the TCP client".into(), false);
            std::panic::resume_unwind(payload);
        }
    }
}

fn start_connect(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let mut c = conn_rc.borrow_mut();
    let peer = c.peer.addr;
    let fd = match sock::client_socket(&peer) {
        Ok(fd) => fd,
        Err(e) => {
            drop(c);
            return break_conn(ctx, conn_rc, TransferStatus::Failed, format!("socket for {peer}: {e}"), false);
        }
    };
    let addr = RawSockAddr::new(&peer);
    let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), addr.as_ptr(), addr.len).build();
    c.fd = Some(fd);
    c.connect_addr = Some(addr);
    // SAFETY: the sockaddr lives in the connection (boxed), which the
    // callback keeps alive until the connect completes.
    let submitted = unsafe { ctx.submit_op(entry, guarded(conn_rc, on_connect)) };
    match submitted {
        Ok(_) => c.ops += 1,
        Err(e) => {
            drop(c);
            break_conn(ctx, conn_rc, TransferStatus::Failed, format!("connect to {peer}: {e}"), false);
        }
    }
}

fn on_connect(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    let mut c = conn_rc.borrow_mut();
    c.ops -= 1;
    c.connect_addr = None;
    if c.phase == Phase::Broken {
        drop(c);
        return finish_if_idle(ctx, conn_rc);
    }
    if let Err(e) = done.io_result() {
        let peer = c.peer.addr;
        drop(c);
        return break_conn(ctx, conn_rc, TransferStatus::Failed, format!("connect to {peer}: {e}"), false);
    }
    c.phase = Phase::Ready;
    drop(c);
    arm_timer(ctx, conn_rc);
    pump(ctx, conn_rc);
}

/// Starts a send and a receive if there is work for them.
fn pump(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let failure = {
        let mut c = conn_rc.borrow_mut();
        if c.phase != Phase::Ready {
            return;
        }
        let mut failure = None;
        if c.send.is_none() && !c.queue.is_empty() && c.has_room() {
            failure = c.start_send(ctx, conn_rc).err();
        }
        if failure.is_none() && c.recv.is_none() && !c.awaiting.is_empty() {
            failure = c.start_recv(ctx, conn_rc).err();
        }
        failure
    };
    if let Some(why) = failure {
        break_conn(ctx, conn_rc, TransferStatus::Failed, why, true);
    }
}

impl Conn {
    fn has_room(&self) -> bool {
        let depth_max = if self.peer.v2 { self.limits.awaiting_max } else { 1 };
        self.awaiting.len() < depth_max && self.awaiting_bytes < self.inflight_max
    }

    /// Moves slices from the queue into one sendmsg.
    fn start_send(&mut self, ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) -> Result<(), String> {
        let depth_max = if self.peer.v2 { self.limits.awaiting_max } else { 1 };
        let group_max = if self.peer.v2 { self.limits.group_slices_max.min(IOV_MAX / 2) } else { 1 };
        let mut count = 0;
        let mut bytes = 0u64;
        for s in &self.queue {
            if count == group_max || self.awaiting.len() + count == depth_max {
                break;
            }
            if count > 0 && bytes + s.len > self.limits.group_bytes_max {
                break;
            }
            // At least one slice goes, however large; beyond it, the cap.
            if count + self.awaiting.len() > 0 && self.awaiting_bytes + bytes + s.len > self.inflight_max {
                break;
            }
            count += 1;
            bytes += s.len;
        }
        if count == 0 {
            return Ok(());
        }
        let mut headers = Vec::with_capacity(count);
        for s in self.queue.iter().take(count) {
            let op = s.op;
            headers.push(RequestHeader { size: s.len, addr: s.remote, opcode: op, v2: self.peer.v2 }.encode());
        }
        let mut iov = IoVecs::with_capacity(2 * count);
        for (s, h) in self.queue.iter().take(count).zip(&headers) {
            iov.push(h.as_ptr(), h.len());
            if s.op == Opcode::Write {
                iov.push(s.local as *const u8, s.len as usize);
            }
        }
        let mut group = Box::new(SendGroup { _headers: headers, iov });
        let entry = send_entry(self.fd(), &mut group.iov);
        // SAFETY: the headers and iovecs live in the boxed group, held by the
        // connection until this op completes; the payload is registered
        // memory pinned by the slices, which stay in `awaiting` at least as
        // long (a slice is answered only after the server read all of it).
        unsafe { ctx.submit_op(entry, guarded(conn_rc, on_send)) }.map_err(|e| e.to_string())?;
        self.ops += 1;
        self.send = Some(group);
        for _ in 0..count {
            let s = self.queue.pop_front().expect("counted above");
            self.awaiting_bytes += s.len;
            self.awaiting.push_back(s);
        }
        Ok(())
    }

    /// Reads the answers of the oldest slices in one recvmsg.
    fn start_recv(&mut self, ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) -> Result<(), String> {
        let v2 = self.peer.v2;
        let mut count = 0;
        let mut bytes = 0u64;
        for s in &self.awaiting {
            if count == self.limits.group_slices_max.min(IOV_MAX / 2) {
                break;
            }
            let payload = if s.op == Opcode::Read { s.len } else { 0 };
            if count > 0 && bytes + payload > self.limits.group_bytes_max {
                break;
            }
            // A v1 WRITE has no answer; it completes when sent.
            if !v2 && s.op == Opcode::Write {
                break;
            }
            count += 1;
            bytes += payload;
        }
        if count == 0 {
            return Ok(());
        }
        let statuses = vec![[0u8; tcp::STATUS_BYTES]; if v2 { count } else { 0 }];
        let mut iov = IoVecs::with_capacity(2 * count);
        for (i, s) in self.awaiting.iter().take(count).enumerate() {
            if v2 {
                iov.push(statuses[i].as_ptr(), tcp::STATUS_BYTES);
            }
            if s.op == Opcode::Read {
                iov.push(s.local as *const u8, s.len as usize);
            }
        }
        let mut group = Box::new(RecvGroup { statuses, iov, slices: count });
        let entry = self.recv_entry(&mut group.iov);
        // SAFETY: as for the send: the group is boxed in the connection until
        // completion, and READ targets are pinned registered memory held by
        // slices in `awaiting`, which this op answers.
        unsafe { ctx.submit_op(entry, guarded(conn_rc, on_recv)) }.map_err(|e| e.to_string())?;
        self.ops += 1;
        self.recv = Some(group);
        Ok(())
    }

    fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// The receive of what `iov` still expects. A large answer is waited
    /// for whole: SO_RCVLOWAT set to exactly the bytes still to come (all
    /// of which the server sends, or it closes), and the poll armed first,
    /// so the kernel wakes this shard once instead of once per segment
    /// that lands. On loopback that took reads from a mode of about 4.5
    /// GB/s (receiver woken per 64 KiB, the sender preempted each time) to
    /// a steady 11+. Smaller answers use MSG_WAITALL with the default
    /// low-water mark.
    fn recv_entry(&mut self, iov: &mut IoVecs) -> io_uring::squeue::Entry {
        let remaining = iov.total() - iov.done();
        let want = if remaining >= RCVLOWAT_MIN { remaining.min(RCVLOWAT_MAX) } else { 1 };
        if want != self.rcvlowat {
            self.rcvlowat = match sock::set_rcvlowat(self.fd(), want) {
                Ok(()) => want,
                Err(e) => {
                    // Unknown now: make sure it is 1, or waits could stall.
                    log::warn!("SO_RCVLOWAT {want}: {e}");
                    let _ = sock::set_rcvlowat(self.fd(), 1);
                    1
                }
            };
        }
        let entry = opcode::RecvMsg::new(types::Fd(self.fd()), iov.msghdr() as *mut libc::msghdr);
        if self.rcvlowat > 1 {
            entry.ioprio(IORING_RECVSEND_POLL_FIRST).build()
        } else {
            entry.flags(libc::MSG_WAITALL as u32).build()
        }
    }

    fn pop_awaiting(&mut self) -> Slice {
        let s = self.awaiting.pop_front().expect("an answer for a slice that was sent");
        self.awaiting_bytes -= s.len;
        s
    }
}

fn send_entry(fd: i32, iov: &mut IoVecs) -> io_uring::squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), iov.msghdr()).flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32).build()
}

fn on_send(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    let mut c = conn_rc.borrow_mut();
    c.ops -= 1;
    if c.phase == Phase::Broken {
        c.send = None;
        drop(c);
        return finish_if_idle(ctx, conn_rc);
    }
    let peer = c.peer.addr;
    match done.io_result() {
        Ok(0) | Err(_) => {
            c.send = None;
            let why = match done.io_result() {
                Err(e) => format!("send to {peer}: {e}"),
                _ => format!("send to {peer}: connection closed"),
            };
            drop(c);
            return break_conn(ctx, conn_rc, TransferStatus::Failed, why, true);
        }
        Ok(n) => {
            let fd = c.fd();
            let group = c.send.as_mut().expect("a send in flight");
            group.iov.advance(n as usize);
            if !group.iov.is_complete() {
                // A short send: carry on with the rest.
                let entry = send_entry(fd, &mut group.iov);
                // SAFETY: as in start_send; the same group stays boxed.
                match unsafe { ctx.submit_op(entry, guarded(conn_rc, on_send)) } {
                    Ok(_) => c.ops += 1,
                    Err(e) => {
                        c.send = None;
                        drop(c);
                        return break_conn(ctx, conn_rc, TransferStatus::Failed, e.to_string(), true);
                    }
                }
                return;
            }
            c.send = None;
        }
    }
    if !c.peer.v2 {
        // v1: a WRITE is "complete" once it is in the socket.
        while c.awaiting.front().is_some_and(|s| s.op == Opcode::Write) {
            c.pop_awaiting().complete();
        }
    }
    drop(c);
    arm_timer(ctx, conn_rc);
    pump(ctx, conn_rc);
}

fn on_recv(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    let mut c = conn_rc.borrow_mut();
    c.ops -= 1;
    let peer = c.peer.addr;
    let mut group = c.recv.take().expect("a receive in flight");
    if c.phase == Phase::Broken {
        drop(c);
        return finish_if_idle(ctx, conn_rc);
    }
    let ended = match done.io_result() {
        Err(e) => Some(format!("receive from {peer}: {e}")),
        Ok(0) => Some(format!("{peer} closed the connection")),
        Ok(n) => {
            group.iov.advance(n as usize);
            if !group.iov.is_complete() {
                let entry = c.recv_entry(&mut group.iov);
                let slices = group.slices;
                c.recv = Some(group);
                // SAFETY: as in start_recv; the group is boxed in the
                // connection again before the op can complete.
                match unsafe { ctx.submit_op(entry, guarded(conn_rc, on_recv)) } {
                    Ok(_) => {
                        c.ops += 1;
                        return;
                    }
                    Err(e) => {
                        group = c.recv.take().expect("just stored");
                        debug_assert_eq!(group.slices, slices);
                        Some(e.to_string())
                    }
                }
            } else {
                None
            }
        }
    };
    // Settle every slice whose answer arrived in full.
    let v2 = c.peer.v2;
    let mut offset = 0usize;
    let received = group.iov.done();
    let mut rejected = None;
    for i in 0..group.slices {
        let front = c.awaiting.front().expect("the group answers slices in awaiting");
        let status_len = if v2 { tcp::STATUS_BYTES } else { 0 };
        let data_len = if front.op == Opcode::Read { front.len as usize } else { 0 };
        if v2 && received >= offset + tcp::STATUS_BYTES {
            match tcp::decode_status(&group.statuses[i]) {
                Ok(tcp::STATUS_OK) => {}
                Ok(code) => {
                    let s = c.pop_awaiting();
                    rejected = Some(format!(
                        "{peer} rejected a {:?} of {} bytes at {:#x} (status {code}): not inside a buffer it has registered",
                        s.op, s.len, s.remote
                    ));
                    s.fail(TransferStatus::Failed, rejected.as_deref().unwrap_or_default());
                    break;
                }
                Err(raw) => {
                    rejected = Some(format!("{peer} sent {raw:#018x} where a status frame belongs"));
                    break;
                }
            }
        }
        if received < offset + status_len + data_len {
            break; // The answer did not arrive in full.
        }
        offset += status_len + data_len;
        c.pop_awaiting().complete();
    }
    drop(c);
    if let Some(why) = rejected {
        // The server closes after a rejection; what follows was not run.
        return break_conn(ctx, conn_rc, TransferStatus::Failed, why, true);
    }
    if let Some(why) = ended {
        return break_conn(ctx, conn_rc, TransferStatus::Failed, why, true);
    }
    arm_timer(ctx, conn_rc);
    pump(ctx, conn_rc);
}

/// Keeps one timer per connection at its earliest deadline.
fn arm_timer(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let mut c = conn_rc.borrow_mut();
    if c.phase == Phase::Broken {
        return;
    }
    let earliest = c.queue.iter().chain(c.awaiting.iter()).map(|s| s.deadline).min();
    let want = match (c.phase, earliest) {
        (Phase::Connecting, Some(d)) => Some(d.min(c.connect_deadline)),
        (Phase::Connecting, None) => Some(c.connect_deadline),
        (_, d) => d,
    };
    match (want, c.timer) {
        (None, Some((id, _))) => {
            ctx.cancel_timer(id);
            c.timer = None;
        }
        (Some(w), Some((_, at))) if at <= w => {}
        (Some(w), existing) => {
            if let Some((id, _)) = existing {
                ctx.cancel_timer(id);
            }
            let rc = conn_rc.clone();
            match ctx.set_timer_at(w, move |ctx| on_timer(ctx, &rc)) {
                Ok(id) => c.timer = Some((id, w)),
                Err(e) => {
                    // Without a timer nothing bounds the wait: give up now.
                    c.timer = None;
                    drop(c);
                    break_conn(ctx, conn_rc, TransferStatus::Failed, format!("cannot set a timeout: {e}"), false);
                }
            }
        }
        (None, None) => {}
    }
}

fn on_timer(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let now = ctx.now();
    let expired = {
        let mut c = conn_rc.borrow_mut();
        c.timer = None;
        if c.phase == Phase::Broken {
            return;
        }
        if c.phase == Phase::Connecting && now >= c.connect_deadline {
            Some((TransferStatus::Failed, format!("connect to {} timed out", c.peer.addr)))
        } else if c.queue.iter().chain(c.awaiting.iter()).any(|s| s.deadline <= now) {
            Some((TransferStatus::Timeout, format!("no answer from {} within the transfer timeout", c.peer.addr)))
        } else {
            None
        }
    };
    match expired {
        Some((status, why)) => break_conn(ctx, conn_rc, status, why, true),
        None => arm_timer(ctx, conn_rc),
    }
}

/// Marks a connection broken and aborts its ops; its slices are settled
/// once no op is in flight.
fn break_conn(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, status: TransferStatus, why: String, retry: bool) {
    {
        let mut c = conn_rc.borrow_mut();
        if c.phase == Phase::Broken {
            return;
        }
        log::debug!("connection {} to {} broken: {why}", c.id, c.peer.addr);
        c.phase = Phase::Broken;
        c.broken = Some((status, why, retry));
        if let Some((id, _)) = c.timer.take() {
            ctx.cancel_timer(id);
        }
        if let Some(shard) = c.shard.upgrade() {
            let mut shard = shard.borrow_mut();
            if shard.conns.get(&c.peer).is_some_and(|live| Rc::ptr_eq(live, conn_rc)) {
                shard.conns.remove(&c.peer);
            }
        }
        if let Some(fd) = &c.fd {
            sock::shutdown_both(fd);
        }
    }
    finish_if_idle(ctx, conn_rc);
}

/// Once a broken connection has no op in flight: close it, re-send what may
/// be re-sent, fail the rest.
fn finish_if_idle(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let (peer, shard, retry, failed) = {
        let mut c = conn_rc.borrow_mut();
        if c.phase != Phase::Broken || c.ops > 0 {
            return;
        }
        c.fd = None;
        let (status, why, may_retry) =
            c.broken.take().unwrap_or((TransferStatus::Failed, "connection lost".into(), false));
        let now = Instant::now();
        let mut retry = Vec::new();
        let mut failed = Vec::new();
        let mut slices: Vec<Slice> = c.awaiting.drain(..).collect();
        slices.extend(c.queue.drain(..));
        c.awaiting_bytes = 0;
        for mut s in slices {
            if now >= s.deadline {
                failed.push((s, TransferStatus::Timeout));
            } else if may_retry && s.retries > 0 {
                s.retries -= 1;
                retry.push(s);
            } else {
                failed.push((s, status));
            }
        }
        let failed: Vec<_> = failed.into_iter().map(|(s, st)| (s, st, why.clone())).collect();
        (c.peer, c.shard.upgrade(), retry, failed)
    };
    for (s, status, why) in failed {
        s.fail(status, &why);
    }
    if !retry.is_empty() {
        match shard {
            Some(shard) => ClientShard::submit(&shard, ctx, peer, retry),
            None => drop(retry), // each fails in Drop
        }
    }
}
