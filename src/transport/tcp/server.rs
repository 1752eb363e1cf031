//! The target side of the TCP data protocol on one shard: a thin io_uring
//! driver over [`ServerSession`], the sans-IO session core.
//!
//! Shard 0 accepts on the engine's data port and hands each connection to
//! the shard its packets arrive on. A session keeps at most one receive and
//! one send out: the receive fills what the core's plan says (its staging
//! buffer, or a WRITE payload's place in registered memory), the send
//! carries the replies the core coalesced (status frames, and READ bytes
//! straight from registered memory). Header checks, pinning, reply order,
//! back-pressure and reject-then-drain are the core's; the driver moves
//! bytes, half-closes and closes when told, and arms the drain's timer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use super::iov::IoVecs;
use super::sock;
use crate::liveness::Liveness;
use crate::mem::{Pin, Registry};
use crate::proto::auth::{AuthKey, Port, Verifier};
use crate::proto::mooncake::server::{Limits, Memory, Served, ServerSession};
use crate::runtime::{Completion, ShardCtx, TimerId};

/// How long a client has, once connected, to prove the key: a client
/// that connects and stays silent does not hold a session for long.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// One shard's server sessions for one engine.
pub struct ServerShard {
    sessions: HashMap<u64, Rc<RefCell<Session>>>,
    next_id: u64,
    memory: Arc<RegisteredMemory>,
    sessions_max: usize,
    /// The key each client must prove before its first request.
    auth: Option<AuthKey>,
    /// This process's instance tag: requests tagged for another process
    /// (the one this replaced) are refused.
    instance: u32,
    /// Keepalive and `TCP_USER_TIMEOUT` on each accepted connection, so a
    /// client whose host vanished does not hold a session for ever.
    liveness: Liveness,
    closed: bool,
}

/// The engine's registered memory, as the session core looks it up.
pub struct RegisteredMemory(pub Arc<Registry>);

impl Memory for RegisteredMemory {
    type Pin = Pin;

    fn pin(&self, addr: u64, len: u64) -> Option<Pin> {
        self.0.pin(addr, len)
    }

    fn write(&self, pin: &Pin, addr: u64, bytes: &[u8]) {
        assert!(pin.region().contains(addr, bytes.len() as u64), "a staged write outside its pinned region");
        // SAFETY: the destination lies inside a registered region (checked
        // above), which the pin keeps registered; registration promised the
        // memory is ours to write, and no other write to it is ordered
        // against this one by the protocol.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
    }

    fn crc32c(&self, pin: &Pin, addr: u64, len: u64) -> u32 {
        assert!(pin.region().contains(addr, len), "a checksum outside its pinned region");
        // SAFETY: the range lies inside a registered region (checked above),
        // which the pin keeps registered and mapped; reading it races only
        // with writers the user orders against this transfer (as any READ
        // of it does).
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
        crate::proto::mooncake::tcp::crc32c(bytes)
    }
}

struct Session {
    id: u64,
    shard: Weak<RefCell<ServerShard>>,
    core: ServerSession<Pin>,
    memory: Arc<RegisteredMemory>,
    fd: Option<OwnedFd>,
    /// The receive out, and the send out, with their scatter lists.
    recv: Option<Box<IoVecs>>,
    send: Option<Box<IoVecs>>,
    timer: Option<TimerId>,
    shut: bool,
}

impl Session {
    fn fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

impl ServerShard {
    pub fn new(
        registry: Arc<Registry>,
        sessions_max: usize,
        auth: Option<AuthKey>,
        instance: u32,
        liveness: Liveness,
    ) -> Rc<RefCell<Self>> {
        Rc::new(RefCell::new(Self {
            sessions: HashMap::new(),
            next_id: 0,
            memory: Arc::new(RegisteredMemory(registry)),
            sessions_max,
            auth,
            instance,
            liveness,
            closed: false,
        }))
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
            shard.liveness.apply_or_log(&fd, "an accepted data connection");
            crate::telemetry::counters::event(crate::telemetry::Event::TcpAccept);
            shard.next_id += 1;
            let id = shard.next_id;
            let mut core = ServerSession::new(Limits::default()).with_instance(shard.instance);
            if let Some(key) = &shard.auth {
                let verifier = Verifier::new(key.clone(), Port::Data, crate::entropy::bytes());
                core = core.authenticating(verifier, Instant::now() + AUTH_TIMEOUT);
            }
            let s = Rc::new(RefCell::new(Session {
                id,
                shard: Rc::downgrade(this),
                core,
                memory: shard.memory.clone(),
                fd: Some(fd),
                recv: None,
                send: None,
                timer: None,
                shut: false,
            }));
            shard.sessions.insert(id, s.clone());
            s
        };
        pump(ctx, &session);
    }

    /// Aborts every session.
    pub fn close(this: &Rc<RefCell<Self>>, ctx: &mut ShardCtx) {
        let sessions: Vec<_> = {
            let mut shard = this.borrow_mut();
            shard.closed = true;
            shard.sessions.values().cloned().collect()
        };
        for s in sessions {
            s.borrow_mut().core.close("the engine is shutting down");
            pump(ctx, &s);
        }
    }
}

type Step = fn(&mut ShardCtx, &Rc<RefCell<Session>>, Completion);

/// Submits an op for the session. A step that panics ends the session
/// rather than leave it hanging.
fn submit(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, entry: squeue::Entry, then: Step, is_recv: bool) -> bool {
    let rc = session.clone();
    let step = move |ctx: &mut ShardCtx, done: Completion| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| then(ctx, &rc, done)));
        if let Err(payload) = outcome {
            if let Ok(mut s) = rc.try_borrow_mut() {
                if is_recv {
                    s.recv = None;
                } else {
                    s.send = None;
                }
                s.core.close("internal error in the TCP server");
            }
            pump(ctx, &rc);
            std::panic::resume_unwind(payload);
        }
    };
    // SAFETY: every buffer the entries of this module point to is in the
    // session core (its staging buffer, its reply statuses) or registered
    // memory pinned by the core (a WRITE's destination, a READ's source);
    // the core releases them only in `finish`, which runs once no op is
    // out. The scatter lists are boxed in the session, which the callback
    // keeps alive.
    unsafe { ctx.submit_op(entry, step) }.is_ok()
}

/// Carries out what the core asks for: half-close, close, the next
/// receive and send, the drain's timer.
fn pump(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>) {
    let mut s = session.borrow_mut();
    count_served(s.core.take_served());
    for _ in 0..2 {
        if s.core.is_closing() {
            return close_if_idle(ctx, &mut s);
        }
        if s.core.poll_half_close()
            && let Some(fd) = &s.fd
        {
            // SAFETY: plain syscall on the session's own socket.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
        }
        if s.timer.is_none()
            && let Some(at) = s.core.next_deadline()
        {
            let rc = session.clone();
            let timer = ctx.set_timer_at(at, move |ctx| {
                {
                    let mut s = rc.borrow_mut();
                    s.timer = None;
                    let now = ctx.now();
                    s.core.on_timer(now);
                }
                pump(ctx, &rc);
            });
            match timer {
                Ok(id) => s.timer = Some(id),
                Err(_) => {
                    // No timer to bound the drain: close now rather than
                    // maybe never.
                    s.core.close("no timer for the drain after a rejection");
                    continue;
                }
            }
        }
        if s.recv.is_none()
            && let Some(plan) = s.core.poll_recv()
        {
            let mut iov = Box::new(IoVecs::with_capacity(plan.pieces.len()));
            for &(p, n) in &plan.pieces {
                iov.push(p.cast_const(), n);
            }
            let flags = if plan.wait_all { libc::MSG_WAITALL as u32 } else { 0 };
            let entry = opcode::RecvMsg::new(types::Fd(s.fd()), iov.msghdr() as *mut libc::msghdr).flags(flags).build();
            s.recv = Some(iov);
            if !submit(ctx, session, entry, on_recv, true) {
                s.recv = None;
                s.core.on_error("cannot queue a receive");
                continue;
            }
        }
        if s.send.is_none()
            && let Some(pieces) = s.core.poll_send()
        {
            let mut iov = Box::new(IoVecs::with_capacity(pieces.len()));
            for &(p, n) in pieces {
                iov.push(p, n);
            }
            let entry = send_entry(s.fd(), &mut iov);
            s.send = Some(iov);
            if !submit(ctx, session, entry, on_send, false) {
                s.send = None;
                s.core.on_error("cannot queue a send");
                continue;
            }
        }
        return;
    }
}

/// Into this shard's metrics (published with its next flush). A refused
/// request counts as a failed write: which operation it was is unknown
/// when its header did not decode.
fn count_served(served: Served) {
    use crate::telemetry::counters::{Event, Op, Via, events, record_served};
    events(Event::TcpChecksumTarget, served.corrupt);
    if served.is_empty() {
        return;
    }
    if served.reads > 0 {
        record_served(Op::Read, Via::Tcp, served.reads, served.read_bytes, 0);
    }
    if served.writes + served.rejected > 0 {
        record_served(Op::Write, Via::Tcp, served.writes + served.rejected, served.write_bytes, served.rejected);
    }
}

fn send_entry(fd: i32, iov: &mut IoVecs) -> squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), iov.msghdr()).flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32).build()
}

fn on_recv(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    {
        let mut s = session.borrow_mut();
        s.recv = None;
        if !s.core.is_closing() {
            match done.io_result() {
                Ok(0) => s.core.on_eof(),
                Ok(n) => {
                    let memory = s.memory.clone();
                    s.core.on_received(n as usize, memory.as_ref());
                }
                Err(e) => s.core.on_error(format!("receive: {e}")),
            }
        }
    }
    pump(ctx, session);
}

fn on_send(ctx: &mut ShardCtx, session: &Rc<RefCell<Session>>, done: Completion) {
    let resend = {
        let mut s = session.borrow_mut();
        let mut iov = s.send.take().expect("a send out");
        if s.core.is_closing() {
            None
        } else {
            match done.io_result() {
                Ok(n) if n > 0 => {
                    let memory = s.memory.clone();
                    s.core.on_sent(n as usize, Instant::now(), memory.as_ref());
                    iov.advance(n as usize);
                    if iov.is_complete() {
                        None
                    } else {
                        let entry = send_entry(s.fd(), &mut iov);
                        s.send = Some(iov);
                        Some(entry)
                    }
                }
                Ok(_) => {
                    s.core.on_error("send: the connection is closed");
                    None
                }
                Err(e) => {
                    s.core.on_error(format!("send: {e}"));
                    None
                }
            }
        }
    };
    if let Some(entry) = resend
        && !submit(ctx, session, entry, on_send, false)
    {
        let mut s = session.borrow_mut();
        s.send = None;
        s.core.on_error("cannot queue a send");
    }
    pump(ctx, session);
}

/// A closing session: shut the socket (so operations out come back), and
/// once none is out, drop the core's pins and forget the session.
fn close_if_idle(ctx: &mut ShardCtx, s: &mut Session) {
    if !s.shut {
        s.shut = true;
        log::debug!("data session {} closing: {}", s.id, s.core.why().unwrap_or("?"));
        if let Some(fd) = &s.fd {
            sock::shutdown_both(fd);
        }
        if let Some(t) = s.timer.take() {
            ctx.cancel_timer(t);
        }
    }
    if s.recv.is_some() || s.send.is_some() {
        return;
    }
    s.core.finish();
    s.fd = None;
    if let Some(shard) = s.shard.upgrade()
        && let Ok(mut shard) = shard.try_borrow_mut()
    {
        shard.sessions.remove(&s.id);
    }
}
