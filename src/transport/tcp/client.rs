//! The initiator side of the TCP data protocol on one shard: a thin
//! io_uring driver over [`ClientConn`], the sans-IO connection core.
//!
//! Each shard keeps one persistent connection per peer, opened lazily with
//! an io_uring connect, so the caller never blocks on it. The driver keeps
//! at most one send and one receive out per connection, each over the
//! scatter list the core hands it: the send carries request headers and
//! WRITE payloads straight from registered memory, the receive fills status
//! frames and READ destinations straight in registered memory. Both run at
//! once, so requests are pipelined. Every protocol decision (what goes in a
//! group, what an answer means, what a close means for each request) is the
//! core's; the driver only moves bytes, arms the timer the core asks for,
//! keeps the poll for a hang-up the core asks for on an idle connection
//! (so one to a peer that died leaves the table), and re-sends on a fresh
//! connection what the core says may be re-sent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use super::iov::IoVecs;
use super::sock::{self, RawSockAddr};
use super::{Credits, Peer, QUEUED_PER_SHARD_MAX};
use crate::liveness::Liveness;
use crate::proto::auth::{AuthKey, Port, Prover};
use crate::proto::mooncake::client::{ClientConn, Limits, Settle};
use crate::runtime::{Completion, OpId, ShardCtx, TimerId};
use crate::telemetry::{Event, counters as telemetry};
use crate::transport::request::{Request, Sink, TransferStatus};

/// Bounds on what one connection takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Requests per sendmsg/recvmsg (each takes two iovecs).
    pub group_slices_max: usize,
    /// Payload bytes per sendmsg/recvmsg.
    pub group_bytes_max: u64,
    /// Requests sent and not yet answered.
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
    /// Ask peers that advertise it for CRC-32C framing
    /// (`SHARDWIRE_TCP_CRC32C`).
    pub crc32c: bool,
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
            crc32c: false,
        }
    }
}

impl ClientLimits {
    /// The core's limits for a connection to `peer`.
    pub fn for_peer(&self, peer: &Peer) -> Limits {
        let local = sock::is_local_ip(peer.addr.ip());
        Limits {
            group_reqs_max: self.group_slices_max,
            group_bytes_max: self.group_bytes_max,
            awaiting_max: self.awaiting_max,
            inflight_bytes_max: if local { self.awaiting_bytes_local_max } else { self.awaiting_bytes_max },
            queued_max: QUEUED_PER_SHARD_MAX,
        }
    }
}

/// Answers at least this large are waited for with SO_RCVLOWAT.
const RCVLOWAT_MIN: usize = 64 << 10;
/// The largest SO_RCVLOWAT set (the kernel caps it at half the largest
/// receive buffer; a larger answer is taken in several wake-ups).
const RCVLOWAT_MAX: usize = 4 << 20;
/// Poll bits that mean the peer is gone: its FIN (`POLLRDHUP`), or a reset
/// or both directions shut (`POLLHUP`, `POLLERR`, reported whatever the
/// mask asked for).
const HANG_UP_MASK: u32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32;
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

/// Peers a shard remembers having connected to.
const SEEN_PEERS_MAX: usize = 4096;

/// One shard's client connections for one engine.
pub struct ClientShard {
    conns: HashMap<Peer, Rc<RefCell<Conn>>>,
    /// Peers this shard has connected to before, so that opening another
    /// connection to one counts as a reconnect. Bounded: forgotten whole
    /// when full (a reconnect may then count as a first connect).
    seen: std::collections::HashSet<std::net::SocketAddr>,
    next_id: u64,
    limits: ClientLimits,
    credits: Arc<Credits>,
    shard: usize,
    /// The key each new connection proves before its first request.
    auth: Option<AuthKey>,
    /// Keepalive and `TCP_USER_TIMEOUT` on each new connection.
    liveness: Liveness,
    closed: bool,
}

struct Conn {
    id: u64,
    peer: Peer,
    shard: Weak<RefCell<ClientShard>>,
    core: ClientConn<crate::transport::request::Ticket>,
    fd: Option<OwnedFd>,
    /// The connect is out (its address lives here until it completes).
    connect_addr: Option<Box<RawSockAddr>>,
    /// The send out, and the receive out, with their scatter lists.
    send: Option<Box<IoVecs>>,
    recv: Option<Box<IoVecs>>,
    /// The poll for the peer's hang-up out on an idle connection.
    watch: Option<OpId>,
    /// The socket's SO_RCVLOWAT as last set (1, the kernel's default).
    rcvlowat: usize,
    timer: Option<(TimerId, Instant)>,
    /// The socket was shut down (the core is closing).
    shut: bool,
    /// The shard's back-pressure count, released as requests settle.
    credits: Arc<Credits>,
    shard_id: usize,
    /// Keepalive and `TCP_USER_TIMEOUT`, set on its socket.
    liveness: Liveness,
}

impl Conn {
    fn ops_out(&self) -> usize {
        usize::from(self.connect_addr.is_some())
            + usize::from(self.send.is_some())
            + usize::from(self.recv.is_some())
            + usize::from(self.watch.is_some())
    }

    fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

/// Which operation a completion belongs to.
#[derive(Clone, Copy)]
enum Op {
    Connect,
    Send,
    Recv,
    Watch,
}

impl ClientShard {
    pub fn new(
        limits: ClientLimits,
        credits: Arc<Credits>,
        shard: usize,
        auth: Option<AuthKey>,
        liveness: Liveness,
    ) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self {
            conns: HashMap::new(),
            seen: std::collections::HashSet::new(),
            next_id: 0,
            limits,
            credits,
            shard,
            auth,
            liveness,
            closed: false,
        }))
    }

    /// Queues requests for `peer`, opening a connection if there is none.
    pub fn submit(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx, peer: Peer, requests: Vec<Request>) {
        if requests.is_empty() {
            return;
        }
        let (conn, fresh, credits, shard) = {
            let mut s = this.borrow_mut();
            let (credits, shard) = (s.credits.clone(), s.shard);
            if s.closed {
                drop(s);
                credits.release(shard, requests.len());
                for r in requests {
                    r.ticket.fail(TransferStatus::Failed, "the engine is shutting down");
                }
                return;
            }
            match s.conns.get(&peer) {
                Some(c) => (c.clone(), false, credits, shard),
                None => {
                    s.next_id += 1;
                    if s.seen.len() >= SEEN_PEERS_MAX {
                        s.seen.clear();
                    }
                    if !s.seen.insert(peer.addr) {
                        telemetry::event(Event::TcpReconnect);
                    }
                    let deadline = Instant::now() + s.limits.connect_timeout;
                    let mut core = ClientConn::new(peer.addr.to_string(), peer.v2, s.limits.for_peer(&peer), deadline)
                        .with_crc32c(peer.crc32c)
                        .with_instance(peer.instance);
                    if let Some(key) = &s.auth {
                        core = core.authenticating(Prover::new(key.clone(), Port::Data, crate::entropy::bytes()));
                    }
                    let conn = Rc::new(RefCell::new(Conn {
                        id: s.next_id,
                        peer,
                        shard: Rc::downgrade(this),
                        core,
                        fd: None,
                        connect_addr: None,
                        send: None,
                        recv: None,
                        watch: None,
                        rcvlowat: 1,
                        timer: None,
                        shut: false,
                        credits: credits.clone(),
                        shard_id: shard,
                        liveness: s.liveness,
                    }));
                    s.conns.insert(peer, conn.clone());
                    (conn, true, credits, shard)
                }
            }
        };
        let mut refused = Vec::new();
        {
            let mut c = conn.borrow_mut();
            for r in requests {
                if let Err(r) = c.core.push(r) {
                    refused.push(r);
                }
            }
        }
        if !refused.is_empty() {
            if !fresh && conn.borrow().core.is_closing() {
                // A closing connection still in the table: take it out, and
                // a fresh one (which takes everything) gets the requests.
                let mut s = this.borrow_mut();
                if s.conns.get(&peer).is_some_and(|c| Rc::ptr_eq(c, &conn)) {
                    s.conns.remove(&peer);
                }
                drop(s);
                Self::submit(this, ctx, peer, refused);
            } else {
                // The credits keep a live queue below its bound: a bug.
                debug_assert!(false, "a live connection refused {} requests", refused.len());
                credits.release(shard, refused.len());
                for r in refused {
                    r.ticket.fail(TransferStatus::Failed, "the connection refused the request");
                }
            }
        }
        // Connect after queueing: a connect that fails at once then fails
        // what was queued, through the core.
        if fresh {
            start_connect(ctx, &conn);
        }
        pump(ctx, &conn);
    }

    /// Cancels every queued request of `sink`, on every connection.
    pub fn cancel(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx, sink: &Arc<dyn Sink>) {
        let conns: Vec<_> = this.borrow().conns.values().cloned().collect();
        for c in conns {
            c.borrow_mut().core.cancel(|r| r.ticket.is_for(sink));
            pump(ctx, &c);
        }
    }

    /// The peer process `peer` reaches is gone (the engine learnt that
    /// another took its name): its connections close, and what they held
    /// settles as gone.
    pub fn retire(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx, peer: Peer) {
        let conn = this.borrow_mut().conns.remove(&peer);
        if let Some(conn) = conn {
            conn.borrow_mut().core.close_gone(format!("{} is gone: another process took its segment name", peer.addr));
            pump(ctx, &conn);
        }
    }

    /// Aborts every connection; their requests fail. New submissions fail.
    pub fn close(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx) {
        let conns: Vec<_> = {
            let mut s = this.borrow_mut();
            s.closed = true;
            s.conns.drain().map(|(_, c)| c).collect()
        };
        for conn in conns {
            conn.borrow_mut().core.close("the engine is shutting down");
            pump(ctx, &conn);
        }
    }
}

/// Wraps a completion handler so that a bug in it ends its connection
/// (settling its requests) instead of leaving them to wait for the timeout.
fn guarded(
    conn_rc: &Rc<RefCell<Conn>>,
    op: Op,
    handler: fn(&mut ShardCtx, &Rc<RefCell<Conn>>, Completion),
) -> impl FnOnce(&mut ShardCtx, Completion) + 'static {
    let rc = conn_rc.clone();
    move |ctx, done| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(ctx, &rc, done)));
        if let Err(payload) = outcome {
            if let Ok(mut c) = rc.try_borrow_mut() {
                match op {
                    Op::Connect => c.connect_addr = None,
                    Op::Send => c.send = None,
                    Op::Recv => c.recv = None,
                    Op::Watch => c.watch = None,
                }
                c.core.close("internal error in the TCP client");
            }
            pump(ctx, &rc);
            std::panic::resume_unwind(payload);
        }
    }
}

fn start_connect(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let mut c = conn_rc.borrow_mut();
    let peer = c.peer.addr;
    let fd = match sock::client_socket(&peer) {
        Ok(fd) => fd,
        Err(e) => return c.core.on_connect_failed(format!("socket: {e}")),
    };
    c.liveness.apply_or_log(&fd, "a data connection");
    let addr = RawSockAddr::new(&peer);
    let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), addr.as_ptr(), addr.len).build();
    c.fd = Some(fd);
    // SAFETY: the sockaddr lives in the connection (boxed), which the
    // callback keeps alive, until the connect completes.
    match unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Connect, on_connect)) } {
        Ok(_) => c.connect_addr = Some(addr),
        Err(e) => c.core.on_connect_failed(e.to_string()),
    }
}

fn on_connect(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    {
        let mut c = conn_rc.borrow_mut();
        c.connect_addr = None;
        match done.io_result() {
            Ok(_) => {
                telemetry::event(Event::TcpConnect);
                c.core.on_connected()
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => c.core.on_connect_refused(),
            Err(e) => c.core.on_connect_failed(e.to_string()),
        }
    }
    pump(ctx, conn_rc);
}

fn on_send(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    {
        let mut c = conn_rc.borrow_mut();
        let mut iov = c.send.take().expect("a send out");
        match done.io_result() {
            Ok(n) if n > 0 => {
                c.core.on_sent(n as usize);
                iov.advance(n as usize);
                if !iov.is_complete() && !c.core.is_closing() {
                    // A short send: carry on with the rest.
                    let entry = send_entry(c.fd(), &mut iov);
                    c.send = Some(iov);
                    // SAFETY: as in `pump`: the list is boxed in the
                    // connection again, over the same group.
                    if let Err(e) = unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Send, on_send)) } {
                        c.send = None;
                        c.core.on_error(format!("send: {e}"));
                    }
                }
            }
            Ok(_) => c.core.on_error("send: the connection is closed"),
            Err(e) => c.core.on_error(format!("send: {e}")),
        }
    }
    pump(ctx, conn_rc);
}

fn on_recv(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    {
        let mut c = conn_rc.borrow_mut();
        let mut iov = c.recv.take().expect("a receive out");
        match done.io_result() {
            Ok(0) => c.core.on_eof(),
            Ok(n) => {
                c.core.on_received(n as usize);
                iov.advance(n as usize);
                if !iov.is_complete() && !c.core.is_closing() {
                    let entry = recv_entry(&mut c, &mut iov);
                    c.recv = Some(iov);
                    // SAFETY: as in `pump`: the list is boxed in the
                    // connection again, over the same group.
                    if let Err(e) = unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Recv, on_recv)) } {
                        c.recv = None;
                        c.core.on_error(format!("receive: {e}"));
                    }
                }
            }
            Err(e) => c.core.on_error(format!("receive: {e}")),
        }
    }
    pump(ctx, conn_rc);
}

/// The hang-up poll came back: with the peer's close, or (an error, or
/// cancelled) without news.
fn on_watch(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>, done: Completion) {
    {
        let mut c = conn_rc.borrow_mut();
        c.watch = None;
        let hung_up = match done.io_result() {
            Ok(mask) => mask & HANG_UP_MASK != 0,
            Err(e) => {
                if !c.core.is_closing() {
                    log::debug!("connection {} to {}: hang-up poll: {e}", c.id, c.peer.addr);
                }
                false
            }
        };
        c.core.on_watch(hung_up);
    }
    pump(ctx, conn_rc);
}

fn on_timer(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    {
        let mut c = conn_rc.borrow_mut();
        c.timer = None;
        let now = ctx.now();
        c.core.on_timer(now);
    }
    pump(ctx, conn_rc);
}

/// Carries out what the core asks for: the next send and receive, the
/// shutdown and finish of a closing connection, the timer; then settles
/// what the core settled.
fn pump(ctx: &mut ShardCtx, conn_rc: &Rc<RefCell<Conn>>) {
    let mut settled = Vec::new();
    {
        let mut c = conn_rc.borrow_mut();
        // A failure to queue an operation ends the connection, which the
        // second round then closes.
        for _ in 0..2 {
            if c.core.is_closing() {
                close_if_idle(ctx, &mut c, conn_rc);
                break;
            }
            if c.send.is_none()
                && let Some(g) = c.core.poll_send()
            {
                let mut iov = Box::new(IoVecs::with_capacity(2 * g.pieces().count()));
                for (p, n) in g.pieces() {
                    iov.push(p, n);
                }
                let entry = send_entry(c.fd(), &mut iov);
                c.send = Some(iov);
                // SAFETY: the headers live in the core's group, which it
                // keeps until the group is reported sent or the connection
                // finishes (after this op is back); the payloads are
                // registered memory pinned by the requests' tickets, which
                // the core holds at least as long.
                if let Err(e) = unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Send, on_send)) } {
                    c.send = None;
                    c.core.on_error(format!("send: {e}"));
                    continue;
                }
            }
            if c.recv.is_none()
                && let Some(g) = c.core.poll_recv()
            {
                let pieces = g.pieces();
                let mut iov = Box::new(IoVecs::with_capacity(pieces.len()));
                for (p, n) in pieces {
                    iov.push(p.cast_const(), n);
                }
                let entry = recv_entry(&mut c, &mut iov);
                c.recv = Some(iov);
                // SAFETY: the status frames live in the core's group and the
                // READ destinations are pinned registered memory, both held
                // until this op is back (see the core's `finish`).
                if let Err(e) = unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Recv, on_recv)) } {
                    c.recv = None;
                    c.core.on_error(format!("receive: {e}"));
                    continue;
                }
            }
            if c.watch.is_none() && c.core.poll_watch() {
                let entry = opcode::PollAdd::new(types::Fd(c.fd()), libc::POLLRDHUP as u32).build();
                // SAFETY: a poll points at no memory; the descriptor stays
                // open until the op is back (`close_if_idle` finishes only
                // once `ops_out` is zero).
                match unsafe { ctx.submit_op(entry, guarded(conn_rc, Op::Watch, on_watch)) } {
                    Ok(id) => c.watch = Some(id),
                    // No watch: the connection works on, as the direct
                    // path's do, and finds a dead peer when next used.
                    Err(e) => {
                        log::debug!("connection {} to {}: no hang-up poll: {e}", c.id, c.peer.addr);
                        c.core.on_watch(false);
                    }
                }
            }
            break;
        }
        while let Some(s) = c.core.poll_settled() {
            settled.push(s);
        }
        if !c.core.is_closing() {
            arm_timer(ctx, &mut c, conn_rc);
        }
    }
    if settled.is_empty() {
        return;
    }
    let (peer, shard, credits, shard_id) = {
        let c = conn_rc.borrow();
        (c.peer, c.shard.upgrade(), c.credits.clone(), c.shard_id)
    };
    // Credits go back before the tickets settle: whoever a settlement
    // wakes finds the room already there.
    let retries = settled.iter().filter(|(_, how)| *how == Settle::Retry).count();
    credits.release(shard_id, settled.len() - retries);
    let mut retry = Vec::with_capacity(retries);
    for (r, how) in settled {
        match how {
            Settle::Retry => retry.push(r),
            Settle::Done => r.ticket.done(r.len),
            Settle::Rejected { message, .. } => r.ticket.fail(TransferStatus::Failed, &message),
            Settle::Failed(why) => r.ticket.fail(TransferStatus::Failed, &why),
            Settle::TimedOut(why) => r.ticket.fail(TransferStatus::Timeout, &why),
            Settle::Corrupt(why) => {
                telemetry::event(Event::TcpChecksumInitiator);
                r.ticket.fail_corrupt(&why)
            }
            Settle::Canceled => r.ticket.fail(TransferStatus::Canceled, "canceled before it was sent"),
            Settle::PeerGone(why) => r.ticket.fail_gone(&why),
        }
    }
    if !retry.is_empty() {
        match shard {
            Some(shard) => ClientShard::submit(&shard, ctx, peer, retry),
            None => {
                credits.release(shard_id, retry.len());
                drop(retry); // each fails in Drop
            }
        }
    }
}

/// A closing connection: shut the socket (so the operations out come
/// back), leave the shard's table, and finish once none is out.
fn close_if_idle(ctx: &mut ShardCtx, c: &mut Conn, conn_rc: &Rc<RefCell<Conn>>) {
    if c.core.is_closed() {
        return;
    }
    if !c.shut {
        c.shut = true;
        log::debug!("connection {} to {} closing: {}", c.id, c.peer.addr, c.core.ending().unwrap_or("?"));
        if let Some((id, _)) = c.timer.take() {
            ctx.cancel_timer(id);
        }
        if let Some(fd) = &c.fd {
            sock::shutdown_both(fd);
        }
        // The shutdown wakes the poll with a hang-up; the cancel makes
        // sure of it whatever state the socket was in.
        if let Some(id) = c.watch
            && let Err(e) = ctx.cancel_op(id)
        {
            log::debug!("connection {} to {}: cancelling the hang-up poll: {e}", c.id, c.peer.addr);
        }
        if let Some(shard) = c.shard.upgrade()
            && let Ok(mut shard) = shard.try_borrow_mut()
            && shard.conns.get(&c.peer).is_some_and(|live| Rc::ptr_eq(live, conn_rc))
        {
            shard.conns.remove(&c.peer);
        }
    }
    if c.ops_out() == 0 {
        c.core.finish(Instant::now());
        c.fd = None;
    }
}

/// Keeps one timer per connection at the core's next deadline.
fn arm_timer(ctx: &mut ShardCtx, c: &mut Conn, conn_rc: &Rc<RefCell<Conn>>) {
    let want = c.core.next_deadline();
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
                    c.core.close(format!("cannot set a timeout: {e}"));
                }
            }
        }
        (None, None) => {}
    }
}

fn send_entry(fd: i32, iov: &mut IoVecs) -> io_uring::squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), iov.msghdr()).flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32).build()
}

/// The receive of what `iov` still expects. A large answer is waited for
/// whole: SO_RCVLOWAT set to exactly the bytes still to come (all of which
/// the server sends, or it closes), and the poll armed first, so the kernel
/// wakes this shard once instead of once per segment that lands. On
/// loopback that took reads from a mode of about 4.5 GB/s (receiver woken
/// per 64 KiB, the sender preempted each time) to a steady 11+. Smaller
/// answers use MSG_WAITALL with the default low-water mark.
fn recv_entry(c: &mut Conn, iov: &mut IoVecs) -> io_uring::squeue::Entry {
    let remaining = iov.total() - iov.done();
    let want = if remaining >= RCVLOWAT_MIN { remaining.min(RCVLOWAT_MAX) } else { 1 };
    if want != c.rcvlowat {
        c.rcvlowat = match sock::set_rcvlowat(c.fd(), want) {
            Ok(()) => want,
            Err(e) => {
                // Unknown now: make sure it is 1, or waits could stall.
                log::warn!("SO_RCVLOWAT {want}: {e}");
                let _ = sock::set_rcvlowat(c.fd(), 1);
                1
            }
        };
    }
    let entry = opcode::RecvMsg::new(types::Fd(c.fd()), iov.msghdr() as *mut libc::msghdr);
    if c.rcvlowat > 1 {
        entry.ioprio(IORING_RECVSEND_POLL_FIRST).build()
    } else {
        entry.flags(libc::MSG_WAITALL as u32).build()
    }
}
