//! The target side of the TCP data protocol, on one shard.
//!
//! Shard 0 accepts on the engine's data port (a multishot accept) and deals
//! the connections out to the shards in turn. Each connection is a session
//! that runs one request at a time, as the protocol orders them:
//!
//! 1. receive the 24-byte header;
//! 2. check that `[addr, addr + size)` lies inside one registered region,
//!    and pin it; if not, answer status 1 and close, as Mooncake does;
//! 3. WRITE: receive the payload straight into that memory, then answer
//!    status 0 (v2) — so "complete" on the client means "landed";
//!    READ: send status 0 (v2) and the bytes, straight from that memory.
//!
//! Payloads move in pieces of at most 1 GiB per operation (a CQE's result is
//! an i32). A session that breaks (EOF, reset, the engine closing) releases
//! its pin and its descriptor once its one operation in flight has finished.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::iov::IoVecs;
use super::sock;
use crate::engine::registry::{Pin, Registry};
use crate::proto::mooncake::tcp::{self, Opcode, RequestHeader};
use crate::runtime::{Completion, ShardCtx};

/// Largest payload piece per operation.
const PIECE_BYTES_MAX: u64 = 1 << 30;
/// After a rejection, how much of the client's unread payload the session
/// drains (so the client reads the status, not a reset), and for how long.
const REJECT_DRAIN_BYTES_MAX: u64 = 64 << 20;
const REJECT_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);
const DRAIN_CHUNK: usize = 64 << 10;

/// One shard's server sessions for one engine.
pub struct ServerShard {
    sessions: HashMap<u64, Rc<RefCell<Session>>>,
    next_id: u64,
    registry: Arc<Registry>,
    sessions_max: usize,
    closed: bool,
}

struct Session {
    id: u64,
    shard: Weak<RefCell<ServerShard>>,
    registry: Arc<Registry>,
    fd: Option<OwnedFd>,
    header: Box<[u8; tcp::HEADER_BYTES]>,
    header_got: usize,
    status: Box<[u8; tcp::STATUS_BYTES]>,
    /// The request being served and the pin on its memory.
    current: Option<(RequestHeader, Pin)>,
    /// Payload bytes of the current request moved so far.
    moved: u64,
    /// The gather list of a READ reply or a status frame.
    iov: Option<Box<IoVecs>>,
    /// Close once the op in flight completes.
    closing: bool,
    in_flight: bool,
    /// Scratch space for draining a rejected request's payload.
    drain: Option<Box<[u8]>>,
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
            let s = Rc::new(RefCell::new(Session {
                id: shard.next_id,
                shard: Rc::downgrade(this),
                registry: shard.registry.clone(),
                fd: Some(fd),
                header: Box::new([0; tcp::HEADER_BYTES]),
                header_got: 0,
                status: Box::new([0; tcp::STATUS_BYTES]),
                current: None,
                moved: 0,
                iov: None,
                closing: false,
                in_flight: false,
                drain: None,
            }));
            let id = shard.next_id;
            shard.sessions.insert(id, s.clone());
            s
        };
        recv_header(ctx, &session);
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

fn fd_of(s: &Session) -> i32 {
    s.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
}

/// Submits an op for the session; on failure the session closes.
fn submit(
    ctx: &mut ShardCtx,
    session: &Rc<RefCell<Session>>,
    entry: io_uring::squeue::Entry,
    then: fn(&mut ShardCtx, &Rc<RefCell<Session>>, Completion),
) {
    let rc = session.clone();
    let step = move |ctx: &mut ShardCtx, done: Completion| {
        // A bug in a step must not leave the session hanging: close it.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(ctx, &rc, done)));
        if let Err(payload) = outcome {
            rc.borrow_mut().in_flight = false;
            close(ctx, &rc, "internal error");
            std::panic::resume_unwind(payload);
        }
    };
    // SAFETY: every buffer the entries built in this module point to is
    // either boxed in the session (header, status, iovecs), which the
    // callback keeps alive, or registered memory pinned by `current`, which
    // is released only after the op completes.
    let result = unsafe { ctx.submit_op(entry, step) };
    match result {
        Ok(_) => session.borrow_mut().in_flight = true,
        Err(e) => close(ctx, session, &format!("cannot queue an operation: {e}")),
    }
}

fn recv_header(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        s.current = None;
        s.moved = 0;
        let got = s.header_got;
        // SAFETY: got < HEADER_BYTES, so the pointer stays inside the box.
        let ptr = unsafe { s.header.as_mut_ptr().add(got) };
        opcode::Recv::new(types::Fd(fd_of(&s)), ptr, (tcp::HEADER_BYTES - got) as u32).flags(libc::MSG_WAITALL).build()
    };
    submit(ctx, session, entry, on_header);
}

fn on_header(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let header = {
        let mut s = session.borrow_mut();
        s.in_flight = false;
        if s.closing {
            drop(s);
            return finish(session);
        }
        match done.io_result() {
            Ok(0) | Err(_) => {
                drop(s);
                return close(ctx, session, "peer closed or failed");
            }
            Ok(n) => s.header_got += n as usize,
        }
        if s.header_got < tcp::HEADER_BYTES {
            drop(s);
            return recv_header(ctx, session);
        }
        s.header_got = 0;
        RequestHeader::decode(&s.header)
    };
    let header = match header {
        Ok(h) => h,
        Err((partial, why)) => return reject(ctx, session, partial.v2, &why.to_string()),
    };
    let registry = session.borrow().registry.clone();
    let Some(pin) = registry.pin(header.addr, header.size) else {
        return reject(ctx, session, header.v2, "address range is not inside one registered buffer");
    };
    let op = header.opcode;
    session.borrow_mut().current = Some((header, pin));
    match op {
        Opcode::Write => recv_body(ctx, session),
        Opcode::Read => send_read_reply(ctx, session),
    }
}

/// Answers a bad request: status 1 (v2) and close, or just close (v1).
fn reject(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, v2: bool, why: &str) {
    log::debug!("rejecting a data request: {why}");
    if !v2 {
        return close(ctx, session, why);
    }
    let entry = {
        let mut s = session.borrow_mut();
        *s.status = tcp::encode_status(tcp::STATUS_REJECTED);
        opcode::Send::new(types::Fd(fd_of(&s)), s.status.as_ptr(), tcp::STATUS_BYTES as u32)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build()
    };
    submit(ctx, session, entry, on_reject_sent);
}

/// The rejection is out: say no more (FIN), and swallow what the client was
/// still sending, so it reads the status rather than a reset. Bounded in
/// bytes and in time.
fn on_reject_sent(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    {
        let mut s = session.borrow_mut();
        s.in_flight = false;
        if s.closing || done.result < 0 {
            drop(s);
            return close(ctx, session, "request rejected");
        }
        if let Some(fd) = &s.fd {
            // SAFETY: plain syscall on our own socket.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
        }
        s.drain = Some(vec![0u8; DRAIN_CHUNK].into_boxed_slice());
        s.moved = 0;
    }
    let rc = session.clone();
    let _ = ctx.set_timer(REJECT_DRAIN_TIME, move |ctx| close(ctx, &rc, "rejection drain time is up"));
    drain_more(ctx, session);
}

fn drain_more(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        let fd = fd_of(&s);
        let buf = s.drain.as_mut().expect("draining");
        opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32).build()
    };
    submit(ctx, session, entry, |ctx, session, done| {
        let more = {
            let mut s = session.borrow_mut();
            s.in_flight = false;
            match done.io_result() {
                Ok(n) if n > 0 && !s.closing => {
                    s.moved += u64::from(n);
                    s.moved < REJECT_DRAIN_BYTES_MAX
                }
                _ => false,
            }
        };
        if more { drain_more(ctx, session) } else { close(ctx, session, "request rejected") }
    });
}

fn recv_body(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let s = session.borrow();
        let (h, _) = s.current.as_ref().expect("a request is being served");
        let piece = (h.size - s.moved).min(PIECE_BYTES_MAX) as u32;
        let ptr = (h.addr + s.moved) as *mut u8;
        opcode::Recv::new(types::Fd(fd_of(&s)), ptr, piece).flags(libc::MSG_WAITALL).build()
    };
    submit(ctx, session, entry, on_body);
}

fn on_body(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let (finished, v2) = {
        let mut s = session.borrow_mut();
        s.in_flight = false;
        if s.closing {
            drop(s);
            return finish(session);
        }
        match done.io_result() {
            Ok(0) | Err(_) => {
                drop(s);
                return close(ctx, session, "peer went away mid-write");
            }
            Ok(n) => s.moved += u64::from(n),
        }
        let (h, _) = s.current.as_ref().expect("a request is being served");
        (s.moved == h.size, h.v2)
    };
    if !finished {
        return recv_body(ctx, session);
    }
    if !v2 {
        return recv_header(ctx, session);
    }
    // The bytes have landed: now say so.
    let entry = {
        let mut s = session.borrow_mut();
        s.current = None;
        *s.status = tcp::encode_status(tcp::STATUS_OK);
        opcode::Send::new(types::Fd(fd_of(&s)), s.status.as_ptr(), tcp::STATUS_BYTES as u32)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build()
    };
    submit(ctx, session, entry, on_status_sent);
}

fn on_status_sent(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    {
        let mut s = session.borrow_mut();
        s.in_flight = false;
        if s.closing {
            drop(s);
            return finish(session);
        }
    }
    match done.io_result() {
        Ok(8) => recv_header(ctx, session),
        _ => close(ctx, session, "could not send a status frame"),
    }
}

fn send_read_reply(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let entry = {
        let mut s = session.borrow_mut();
        let (h, _) = s.current.as_ref().expect("a request is being served");
        let (addr, size, v2) = (h.addr, h.size, h.v2);
        let mut iov = Box::new(IoVecs::with_capacity(2));
        if v2 {
            *s.status = tcp::encode_status(tcp::STATUS_OK);
            iov.push(s.status.as_ptr(), tcp::STATUS_BYTES);
        }
        iov.push(addr as *const u8, size.min(PIECE_BYTES_MAX) as usize);
        let msg = iov.msghdr();
        s.iov = Some(iov);
        opcode::SendMsg::new(types::Fd(fd_of(&s)), msg).flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32).build()
    };
    submit(ctx, session, entry, on_read_sent);
}

fn on_read_sent(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let next = {
        let mut s = session.borrow_mut();
        s.in_flight = false;
        if s.closing {
            drop(s);
            return finish(session);
        }
        let n = match done.io_result() {
            Ok(n) if n > 0 => n as usize,
            _ => {
                drop(s);
                return close(ctx, session, "peer went away mid-read");
            }
        };
        let mut iov = s.iov.take().expect("a reply in flight");
        iov.advance(n);
        if !iov.is_complete() {
            // A short send: the rest of this piece.
            let msg = iov.msghdr();
            s.iov = Some(iov);
            Some(
                opcode::SendMsg::new(types::Fd(fd_of(&s)), msg)
                    .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
                    .build(),
            )
        } else {
            let status_len =
                if s.current.as_ref().is_some_and(|(h, _)| h.v2) && s.moved == 0 { tcp::STATUS_BYTES } else { 0 };
            s.moved += (iov.total() - status_len) as u64;
            let (h, _) = s.current.as_ref().expect("a request is being served");
            if s.moved < h.size {
                // The next piece of a reply above 1 GiB.
                let mut iov = Box::new(IoVecs::with_capacity(1));
                let piece = (h.size - s.moved).min(PIECE_BYTES_MAX) as usize;
                iov.push((h.addr + s.moved) as *const u8, piece);
                let msg = iov.msghdr();
                s.iov = Some(iov);
                Some(
                    opcode::SendMsg::new(types::Fd(fd_of(&s)), msg)
                        .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
                        .build(),
                )
            } else {
                None
            }
        }
    };
    match next {
        Some(entry) => submit(ctx, session, entry, on_read_sent),
        None => recv_header(ctx, session),
    }
}

/// Shuts the session down; it is dropped once its op in flight finishes.
fn close(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, why: &str) {
    let _ = ctx;
    {
        let mut s = session.borrow_mut();
        log::debug!("data session {} closing: {why}", s.id);
        s.closing = true;
        if let Some(fd) = &s.fd {
            sock::shutdown_both(fd);
        }
        if s.in_flight {
            return;
        }
    }
    finish(session);
}

/// Releases the pin and the descriptor, and forgets the session.
fn finish(session: &Rc<RefCell<Session>>) {
    let mut s = session.borrow_mut();
    s.current = None;
    s.iov = None;
    s.drain = None;
    s.fd = None;
    if let Some(shard) = s.shard.upgrade() {
        shard.borrow_mut().sessions.remove(&s.id);
    }
}
