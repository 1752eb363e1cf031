//! The target side of the TCP data protocol, on one shard.
//!
//! Shard 0 accepts on the engine's data port (a multishot accept) and deals
//! the connections out to the shards in turn. Each connection is a session
//! with two halves that run at once, so pipelined requests flow:
//!
//! - **receive**: headers and WRITE payloads, in stream order. A header is
//!   checked (`[addr, addr + size)` inside one registered region, which is
//!   then pinned) before any payload byte is read; the payload goes straight
//!   into that memory. A small payload and the next header arrive in one
//!   `recvmsg` whose two entries point at the target memory and at the
//!   header buffer: no bounce buffer, one operation per request.
//! - **send**: replies, in request order: a WRITE's status once its payload
//!   has landed, a READ's status and bytes (straight from registered
//!   memory). Replies that are ready together go out in one `sendmsg`.
//!
//! A request that fails the check gets status 1 and the session ends, as
//! with Mooncake; the session first half-closes and drains what the client
//! was still sending, so the client reads the status instead of a reset.
//! The receive half pauses while too many replies wait, so a client that
//! never reads cannot make the server queue without bound.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::iov::{IOV_MAX, IoVecs};
use super::sock;
use crate::engine::registry::{Pin, Registry};
use crate::proto::mooncake::tcp::{self, Opcode, RequestHeader};
use crate::runtime::{Completion, ShardCtx};

/// Largest payload piece per receive operation (a CQE's result is an i32).
const PIECE_BYTES_MAX: u64 = 1 << 30;
/// Payloads up to this size are received together with the next header.
const SMALL_PAYLOAD_MAX: u64 = 256 << 10;
/// The receive half pauses while more replies than this wait to be sent...
const REPLIES_QUEUED_MAX: usize = 1024;
/// ... or while this many READ bytes do.
const READ_BYTES_QUEUED_MAX: u64 = 256 << 20;
/// Headers looked at in one peek: a pipelined run of READs is taken in with
/// two operations (peek, then consume) instead of one per header.
const PEEK_HEADERS_MAX: usize = 64;
const PEEK_BYTES: usize = PEEK_HEADERS_MAX * tcp::HEADER_BYTES;
/// Replies per sendmsg (a READ reply takes two iovecs).
const REPLIES_PER_SEND_MAX: usize = IOV_MAX / 2;
/// After a rejection: how much of the client's unread payload to drain, for
/// how long, in what chunks.
const REJECT_DRAIN_BYTES_MAX: u64 = 64 << 20;
const REJECT_DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_CHUNK: usize = 64 << 10;

/// One shard's server sessions for one engine.
pub struct ServerShard {
    sessions: HashMap<u64, Rc<RefCell<Session>>>,
    next_id: u64,
    registry: Arc<Registry>,
    sessions_max: usize,
    closed: bool,
}

/// A reply waiting to be sent.
enum Reply {
    /// A status frame (v2 only).
    Status(u32),
    /// A READ's bytes, after a status frame if v2; the pin keeps the region
    /// registered until they are sent.
    Read { header: RequestHeader, _pin: Pin },
}

/// Replies in one sendmsg, and what their iovecs point at.
struct SendGroup {
    _statuses: Vec<[u8; tcp::STATUS_BYTES]>,
    iov: IoVecs,
    _replies: Vec<Reply>,
}

/// What a receive operation reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxKind {
    /// Payload bytes, then header bytes, into their places.
    Stream,
    /// A look (MSG_PEEK) at the headers waiting in the socket.
    Peek,
    /// Taking in `n` whole headers already peeked at.
    Consume(usize),
}

/// A WRITE whose payload is being received.
struct Incoming {
    header: RequestHeader,
    _pin: Pin,
    received: u64,
}

struct Session {
    id: u64,
    shard: Weak<RefCell<ServerShard>>,
    registry: Arc<Registry>,
    fd: Option<OwnedFd>,
    /// The header being assembled.
    header: Box<[u8; tcp::HEADER_BYTES]>,
    header_got: usize,
    incoming: Option<Incoming>,
    /// What the receive op in flight reads.
    rx_kind: RxKind,
    /// Headers peeked at, then consumed.
    peek: Box<[u8; PEEK_BYTES]>,
    /// The receive op's iovecs (payload, then header).
    rx_iov: Option<Box<IoVecs>>,
    rx_in_flight: bool,
    /// The receive half stopped: a rejection is on its way, or the peer
    /// closed.
    rx_stopped: bool,
    replies: VecDeque<Reply>,
    read_bytes_queued: u64,
    tx: Option<Box<SendGroup>>,
    /// End once the replies queued are sent: half-close and drain.
    reject_after_send: bool,
    drain: Option<Box<[u8]>>,
    drained: u64,
    /// Closing: no new ops; finish when none is in flight.
    closing: bool,
}

impl ServerShard {
    pub fn new(registry: Arc<Registry>, sessions_max: usize) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self { sessions: HashMap::new(), next_id: 0, registry, sessions_max, closed: false }))
    }

    /// Sessions currently open.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Takes over an accepted connection.
    pub fn adopt(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx, fd: OwnedFd) {
        let session = {
            let mut shard = this.borrow_mut();
            if shard.closed || shard.sessions.len() >= shard.sessions_max {
                log::warn!("refusing a data connection: {} sessions open on this shard", shard.sessions.len());
                return; // dropping fd closes it
            }
            let _ = sock::set_nodelay(&fd);
            shard.next_id += 1;
            let id = shard.next_id;
            let s = Rc::new(RefCell::new(Session {
                id,
                shard: Rc::downgrade(this),
                registry: shard.registry.clone(),
                fd: Some(fd),
                header: Box::new([0; tcp::HEADER_BYTES]),
                header_got: 0,
                incoming: None,
                rx_kind: RxKind::Stream,
                peek: Box::new([0; PEEK_BYTES]),
                rx_iov: None,
                rx_in_flight: false,
                rx_stopped: false,
                replies: VecDeque::new(),
                read_bytes_queued: 0,
                tx: None,
                reject_after_send: false,
                drain: None,
                drained: 0,
                closing: false,
            }));
            shard.sessions.insert(id, s.clone());
            s
        };
        rx_next(ctx, &session);
    }

    /// Aborts every session.
    pub fn close(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx) {
        let sessions: Vec<_> = {
            let mut shard = this.borrow_mut();
            shard.closed = true;
            shard.sessions.values().cloned().collect()
        };
        for s in sessions {
            close(ctx, &s, "the engine is shutting down");
        }
    }
}

impl Session {
    fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    fn backlogged(&self) -> bool {
        self.replies.len() >= REPLIES_QUEUED_MAX || self.read_bytes_queued >= READ_BYTES_QUEUED_MAX
    }
}

type Step = fn(&mut ShardCtx, &Rc<RefCell<Session>>, Completion);

/// Submits an op for the session. A step that panics closes the session
/// rather than leave it hanging. Returns false if the op could not be queued
/// (the session is then closing).
fn submit(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, entry: squeue::Entry, then: Step) -> bool {
    let rc = session.clone();
    let step = move |ctx: &mut ShardCtx, done: Completion| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(ctx, &rc, done)));
        if let Err(payload) = outcome {
            if let Ok(mut s) = rc.try_borrow_mut() {
                s.rx_in_flight = false;
                s.tx = None;
            }
            close(ctx, &rc, "internal error");
            std::panic::resume_unwind(payload);
        }
    };
    // SAFETY: every buffer the entries of this module point to is boxed in
    // the session (header, iovecs, statuses, drain buffer), which the
    // callback keeps alive, or is registered memory pinned by `incoming` or
    // by a queued READ reply, released only after the op completes.
    match unsafe { ctx.submit_op(entry, step) } {
        Ok(_) => true,
        Err(e) => {
            close(ctx, session, &format!("cannot queue an operation: {e}"));
            false
        }
    }
}

/// Starts the next receive, if the receive half may run.
fn rx_next(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        if s.closing || s.rx_stopped || s.rx_in_flight || s.backlogged() {
            return;
        }
        let fd = s.fd();
        let header_left = tcp::HEADER_BYTES - s.header_got;
        // SAFETY: header_got < HEADER_BYTES, so the pointer is in the box.
        let header_ptr = unsafe { s.header.as_mut_ptr().add(s.header_got) };
        let mut kind = RxKind::Stream;
        let entry = match &s.incoming {
            Some(w) if w.header.size - w.received <= SMALL_PAYLOAD_MAX => {
                // The rest of a small payload, and whatever of the next
                // header has arrived with it.
                let mut iov = Box::new(IoVecs::with_capacity(2));
                iov.push((w.header.addr + w.received) as *const u8, (w.header.size - w.received) as usize);
                iov.push(header_ptr, header_left);
                let msg = iov.msghdr() as *mut libc::msghdr;
                s.rx_iov = Some(iov);
                opcode::RecvMsg::new(types::Fd(fd), msg).build()
            }
            Some(w) => {
                let piece = (w.header.size - w.received).min(PIECE_BYTES_MAX) as u32;
                opcode::Recv::new(types::Fd(fd), (w.header.addr + w.received) as *mut u8, piece)
                    .flags(libc::MSG_WAITALL)
                    .build()
            }
            None if s.header_got == 0 => {
                kind = RxKind::Peek;
                opcode::Recv::new(types::Fd(fd), s.peek.as_mut_ptr(), PEEK_BYTES as u32).flags(libc::MSG_PEEK).build()
            }
            None => opcode::Recv::new(types::Fd(fd), header_ptr, header_left as u32).flags(libc::MSG_WAITALL).build(),
        };
        s.rx_kind = kind;
        entry
    };
    if submit(ctx, session, entry, on_rx) {
        session.borrow_mut().rx_in_flight = true;
    }
}

fn on_rx(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let mut n = {
        let mut s = session.borrow_mut();
        s.rx_in_flight = false;
        s.rx_iov = None;
        if s.closing {
            drop(s);
            return finish_if_idle(session);
        }
        match done.io_result() {
            Ok(0) => {
                // The client closed its side: send what is queued, then end.
                s.rx_stopped = true;
                let idle = s.tx.is_none() && s.replies.is_empty();
                drop(s);
                if idle {
                    close(ctx, session, "peer closed the connection");
                }
                return;
            }
            Err(_) => {
                drop(s);
                return close(ctx, session, "receive failed");
            }
            Ok(n) => n as u64,
        }
    };
    let kind = session.borrow().rx_kind;
    match kind {
        RxKind::Peek => return on_peek(ctx, session, n as usize),
        RxKind::Consume(headers) => return on_consume(ctx, session, n as usize, headers),
        RxKind::Stream => {}
    }
    // Payload bytes first, then header bytes.
    let mut s = session.borrow_mut();
    if let Some(w) = &mut s.incoming {
        let take = n.min(w.header.size - w.received);
        w.received += take;
        n -= take;
        if w.received == w.header.size {
            let v2 = w.header.v2;
            s.incoming = None; // unpins: the bytes have landed
            if v2 {
                s.replies.push_back(Reply::Status(tcp::STATUS_OK));
            }
        }
    }
    s.header_got += n as usize;
    debug_assert!(s.header_got <= tcp::HEADER_BYTES);
    if s.header_got == tcp::HEADER_BYTES {
        s.header_got = 0;
        let header = *s.header;
        take_header(&mut s, &header);
    }
    drop(s);
    after_rx(ctx, session);
}

/// After headers were taken in: end a rejected v1 session, or carry on.
fn after_rx(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let close_now = {
        let s = session.borrow();
        s.rx_stopped && s.replies.is_empty() && s.tx.is_none() && !s.reject_after_send
    };
    if close_now {
        return close(ctx, session, "request rejected (v1: no status)");
    }
    tx_next(ctx, session);
    rx_next(ctx, session);
}

/// Acts on one complete header. Returns whether more headers may follow
/// without a payload in between (a READ was taken).
fn take_header(s: &mut Session, bytes: &[u8; tcp::HEADER_BYTES]) -> bool {
    let h = match RequestHeader::decode(bytes) {
        Ok(h) => h,
        Err((partial, why)) => {
            reject(s, partial.v2, &why.to_string());
            return false;
        }
    };
    let Some(pin) = s.registry.pin(h.addr, h.size) else {
        reject(s, h.v2, "address range is not inside one registered buffer");
        return false;
    };
    match h.opcode {
        Opcode::Write => {
            s.incoming = Some(Incoming { header: h, _pin: pin, received: 0 });
            false
        }
        Opcode::Read => {
            s.read_bytes_queued += h.size;
            s.replies.push_back(Reply::Read { header: h, _pin: pin });
            true
        }
    }
}

/// Whole headers wait in the socket: take in a run of READs (and the WRITE
/// or bad header that ends it) with one more operation. Fewer bytes than a
/// header: wait for the rest the usual way.
fn on_peek(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, n: usize) {
    let entry = {
        let mut s = session.borrow_mut();
        let whole = n / tcp::HEADER_BYTES;
        let fd = s.fd();
        if whole == 0 {
            s.rx_kind = RxKind::Stream;
            opcode::Recv::new(types::Fd(fd), s.header.as_mut_ptr(), tcp::HEADER_BYTES as u32)
                .flags(libc::MSG_WAITALL)
                .build()
        } else {
            let mut take = 0;
            for i in 0..whole {
                take += 1;
                let bytes: &[u8; tcp::HEADER_BYTES] =
                    s.peek[i * tcp::HEADER_BYTES..][..tcp::HEADER_BYTES].try_into().expect("24 bytes");
                if !matches!(RequestHeader::decode(bytes), Ok(h) if h.opcode == Opcode::Read) {
                    break;
                }
            }
            s.rx_kind = RxKind::Consume(take);
            opcode::Recv::new(types::Fd(fd), s.peek.as_mut_ptr(), (take * tcp::HEADER_BYTES) as u32)
                .flags(libc::MSG_WAITALL)
                .build()
        }
    };
    if submit(ctx, session, entry, on_rx) {
        session.borrow_mut().rx_in_flight = true;
    }
}

fn on_consume(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, n: usize, headers: usize) {
    {
        let mut s = session.borrow_mut();
        s.rx_kind = RxKind::Stream;
        if n != headers * tcp::HEADER_BYTES {
            // The peeked bytes were in the socket: a short take means the
            // connection is failing.
            drop(s);
            return close(ctx, session, "short read of peeked headers");
        }
        for i in 0..headers {
            let bytes: [u8; tcp::HEADER_BYTES] =
                s.peek[i * tcp::HEADER_BYTES..][..tcp::HEADER_BYTES].try_into().expect("24 bytes");
            if !take_header(&mut s, &bytes) {
                break;
            }
        }
    }
    after_rx(ctx, session);
}

/// Refuses the request in `s.header`: status 1 (v2) after the replies
/// already queued, then the session ends.
fn reject(s: &mut Session, v2: bool, why: &str) {
    log::debug!("data session {}: rejecting a request: {why}", s.id);
    s.rx_stopped = true;
    if v2 {
        s.replies.push_back(Reply::Status(tcp::STATUS_REJECTED));
        s.reject_after_send = true;
    }
}

/// Sends the replies that are ready, if no send is in flight.
fn tx_next(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        if s.closing || s.tx.is_some() || s.replies.is_empty() {
            return;
        }
        let count = s.replies.len().min(REPLIES_PER_SEND_MAX);
        let replies: Vec<Reply> = s.replies.drain(..count).collect();
        let statuses: Vec<[u8; tcp::STATUS_BYTES]> = replies
            .iter()
            .map(|r| match r {
                Reply::Status(code) => tcp::encode_status(*code),
                Reply::Read { .. } => tcp::encode_status(tcp::STATUS_OK),
            })
            .collect();
        let mut iov = IoVecs::with_capacity(2 * count);
        for (r, st) in replies.iter().zip(&statuses) {
            match r {
                Reply::Status(_) => iov.push(st.as_ptr(), tcp::STATUS_BYTES),
                Reply::Read { header, .. } => {
                    if header.v2 {
                        iov.push(st.as_ptr(), tcp::STATUS_BYTES);
                    }
                    iov.push(header.addr as *const u8, header.size as usize);
                    s.read_bytes_queued -= header.size;
                }
            }
        }
        let mut group = Box::new(SendGroup { _statuses: statuses, iov, _replies: replies });
        let entry = send_entry(s.fd(), &mut group.iov);
        s.tx = Some(group);
        entry
    };
    if !submit(ctx, session, entry, on_tx) {
        session.borrow_mut().tx = None;
        finish_if_idle(session);
    }
}

fn send_entry(fd: i32, iov: &mut IoVecs) -> squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), iov.msghdr()).flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32).build()
}

fn on_tx(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let resend = {
        let mut s = session.borrow_mut();
        if s.closing {
            s.tx = None;
            drop(s);
            return finish_if_idle(session);
        }
        let n = match done.io_result() {
            Ok(n) if n > 0 => n as usize,
            _ => {
                s.tx = None;
                drop(s);
                return close(ctx, session, "send failed");
            }
        };
        let fd = s.fd();
        let group = s.tx.as_mut().expect("a send in flight");
        group.iov.advance(n);
        if group.iov.is_complete() {
            s.tx = None; // releases the READ pins
            None
        } else {
            Some(send_entry(fd, &mut group.iov))
        }
    };
    if let Some(entry) = resend {
        if !submit(ctx, session, entry, on_tx) {
            session.borrow_mut().tx = None;
            finish_if_idle(session);
        }
        return;
    }
    let (reject, ended) = {
        let s = session.borrow();
        let drained = s.replies.is_empty();
        (drained && s.reject_after_send, drained && s.rx_stopped && !s.reject_after_send)
    };
    if reject {
        return start_reject_drain(ctx, session);
    }
    if ended {
        return close(ctx, session, "peer closed the connection");
    }
    tx_next(ctx, session);
    rx_next(ctx, session);
}

/// The rejection is out: say no more (FIN), and swallow what the client was
/// still sending, bounded in bytes and time.
fn start_reject_drain(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    {
        let mut s = session.borrow_mut();
        s.reject_after_send = false;
        if let Some(fd) = &s.fd {
            // SAFETY: plain syscall on our own socket.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
        }
        s.drain = Some(vec![0u8; DRAIN_CHUNK].into_boxed_slice());
    }
    let rc = session.clone();
    if ctx.set_timer(REJECT_DRAIN_TIME, move |ctx| close(ctx, &rc, "rejection drain time is up")).is_err() {
        // No timer to bound the drain: close now rather than maybe never.
        return close(ctx, session, "no timer for the rejection drain");
    }
    drain_more(ctx, session);
}

fn drain_more(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        if s.closing {
            return;
        }
        let fd = s.fd();
        let buf = s.drain.as_mut().expect("draining");
        opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build()
    };
    if submit(ctx, session, entry, on_drain) {
        session.borrow_mut().rx_in_flight = true;
    }
}

fn on_drain(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let more = {
        let mut s = session.borrow_mut();
        s.rx_in_flight = false;
        if s.closing {
            drop(s);
            return finish_if_idle(session);
        }
        match done.io_result() {
            Ok(n) if n > 0 => {
                s.drained += u64::from(n);
                s.drained < REJECT_DRAIN_BYTES_MAX
            }
            _ => false,
        }
    };
    if more { drain_more(ctx, session) } else { close(ctx, session, "request rejected") }
}

/// Shuts the session down; it is dropped once no op is in flight.
fn close(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, why: &str) {
    let _ = ctx;
    {
        let mut s = session.borrow_mut();
        if !s.closing {
            log::debug!("data session {} closing: {why}", s.id);
            s.closing = true;
            if let Some(fd) = &s.fd {
                sock::shutdown_both(fd);
            }
        }
    }
    finish_if_idle(session);
}

/// Once closing and idle: releases pins and the descriptor, and forgets the
/// session.
fn finish_if_idle(session: &Rc<RefCell<Session>>) {
    let mut s = session.borrow_mut();
    if !s.closing || s.rx_in_flight || s.tx.is_some() {
        return;
    }
    s.incoming = None;
    s.replies.clear();
    s.rx_iov = None;
    s.drain = None;
    s.fd = None;
    if let Some(shard) = s.shard.upgrade() {
        shard.borrow_mut().sessions.remove(&s.id);
    }
}
