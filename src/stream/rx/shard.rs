//! A receiver on its shards: a thin io_uring driver over [`RxConn`], the
//! sans-IO connection core. It accepts, receives each connection's bytes
//! into its pipe (for the decoding thread), hands request heads to the
//! core, starts bodies on the decoding thread, sends the core's responses,
//! and drains and closes when the core says.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use io_uring::{opcode, types};

use super::conn::{BodyStart, RxConn};
use super::worker::{self, Job, Link};
use super::{RecvError, RxShared, Session};
use crate::config::Placement;
use crate::proto::linger::LingerLimits;
use crate::runtime::{Completion, OpId, ShardCtx};
use crate::stream::pipe::Pipe;

/// Bytes one drain receive drops at most.
const DRAIN_CHUNK: usize = 64 << 10;

static NEXT_RECEIVER: AtomicU64 = AtomicU64::new(1);

/// A receiver's state on one shard.
#[derive(Default)]
struct RxShard {
    conns: HashMap<u64, Rc<RefCell<Conn>>>,
    accept: Option<OpId>,
    next_conn: u64,
}

/// Every receiver's state on a shard.
#[derive(Default)]
struct RxShards(HashMap<u64, RxShard>);

fn rx_shard(ctx: &mut ShardCtx, rx: u64) -> Option<&mut RxShard> {
    ctx.local_mut::<RxShards>()?.0.get_mut(&rx)
}

struct Conn {
    rx: u64,
    id: u64,
    fd: OwnedFd,
    peer: SocketAddr,
    pipe: Arc<Pipe>,
    shared: Arc<RxShared>,
    core: RxConn,
    /// A receive is out (into the pipe, or a drain).
    recv_op: bool,
    /// Bytes the receive out asked for.
    recv_len: usize,
    /// A deferred wake of the decoding thread is armed.
    wake_armed: bool,
    send_op: bool,
    /// The drain's timer is armed.
    linger_timer: bool,
    link: Option<Arc<Link>>,
    session_key: Option<u64>,
    trname: String,
    caller: String,
    gone: bool,
}

/// Installs the receiver on every shard and starts accepting on shard 0.
/// Returns the receiver's id.
pub(super) fn install(shared: &Arc<RxShared>, listener: &Arc<TcpListener>) -> std::io::Result<()> {
    let rx = NEXT_RECEIVER.fetch_add(1, Ordering::Relaxed);
    shared.id.store(rx, Ordering::Relaxed);
    let rt = shared.runtime.clone();
    for shard in 0..rt.shard_count() {
        rt.call(shard, move |ctx| {
            let mut all = ctx.take_local::<RxShards>().unwrap_or_default();
            all.0.insert(rx, RxShard::default());
            ctx.insert_local(all);
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    let (l, s) = (listener.clone(), shared.clone());
    let cpus: Arc<[Option<u32>]> = rt.shard_cpus().into();
    rt.call(0, move |ctx| crate::transport::accept::start(ctx, l, cpus, Streams { rx, shared: s }))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

/// Ends the accept loop and shuts the listening socket's receive side
/// (Linux resets new connections); open connections stay.
pub(super) fn stop_accepting(shared: &Arc<RxShared>, listener: &Arc<TcpListener>) {
    let rx = shared.id.load(Ordering::Relaxed);
    shared.accepting.store(false, Ordering::Release);
    let _ = shared.runtime.call(0, move |ctx| {
        if let Some(state) = rx_shard(ctx, rx)
            && let Some(op) = state.accept.take()
        {
            let _ = ctx.cancel_op(op);
        }
    });
    // SAFETY: shutdown(2) on the receiver's own listening socket, kept
    // open by the Arc; no memory is touched.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) };
}

/// Stops accepting and closes every connection, on every shard.
pub(super) fn uninstall(shared: &Arc<RxShared>, _listener: &Arc<TcpListener>) {
    let rx = shared.id.load(Ordering::Relaxed);
    let rt = shared.runtime.clone();
    for shard in 0..rt.shard_count() {
        let _ = rt.call(shard, move |ctx| {
            let Some(state) = rx_shard(ctx, rx) else { return };
            let accept = state.accept.take();
            let conns: Vec<_> = state.conns.values().cloned().collect();
            if let Some(op) = accept {
                let _ = ctx.cancel_op(op);
            }
            for c in conns {
                close(ctx, &c, "the receiver closed");
            }
            if let Some(all) = ctx.local_mut::<RxShards>() {
                // Connections still finishing operations keep their Rc.
                all.0.remove(&rx);
            }
        });
    }
}

/// The receiver's side of the shared accept loop.
#[derive(Clone)]
struct Streams {
    rx: u64,
    shared: Arc<RxShared>,
}

impl crate::transport::accept::Owner for Streams {
    fn live(&self, ctx: &mut ShardCtx) -> bool {
        self.shared.accepting.load(Ordering::Acquire) && rx_shard(ctx, self.rx).is_some()
    }

    fn set_op(&self, ctx: &mut ShardCtx, op: Option<OpId>) {
        if let Some(st) = rx_shard(ctx, self.rx) {
            st.accept = op;
        }
    }

    fn place(&self, fd: &OwnedFd, incoming: usize, shards: usize) -> usize {
        let local = crate::transport::tcp::sock::is_local_ip(peer_of(fd).ip());
        let target = place(incoming, shards, local, self.shared.options.placement);
        log::debug!("stream receiver: packets on shard {incoming}, served on {target}");
        target
    }

    fn hand_over(&self, ctx: &mut ShardCtx, target: usize, fd: OwnedFd) {
        let (rx, s) = (self.rx, self.shared.clone());
        if target == ctx.id() {
            adopt(ctx, rx, fd, s);
        } else {
            let _ = ctx.send_to(target, move |ctx| adopt(ctx, rx, fd, s));
        }
    }

    fn name(&self) -> &'static str {
        "the stream receiver"
    }
}

/// The shard for an accepted stream. From a peer on this host, not the one
/// where its packets are processed, which is the sender's own core: the
/// sending and the receiving copies then run on two cores at once (on the
/// same core, half the rate). From another host, the one where its packets
/// are processed, so they are read on the core that has them in cache.
/// `SHARDWIRE_STREAM_PLACEMENT=same|other` forces either.
fn place(incoming: usize, shards: usize, peer_is_local: bool, placement: Placement) -> usize {
    let other = match placement {
        Placement::Same => false,
        Placement::Other => true,
        Placement::Auto => peer_is_local,
    };
    if other { (incoming + 1) % shards.max(1) } else { incoming }
}

fn peer_of(fd: &OwnedFd) -> SocketAddr {
    // SAFETY: borrowing the descriptor as a TcpStream without taking it:
    // ManuallyDrop keeps it from being closed here.
    let s = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd.as_raw_fd()) });
    s.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn adopt(ctx: &mut ShardCtx, rx: u64, fd: OwnedFd, shared: Arc<RxShared>) {
    let Some(st) = rx_shard(ctx, rx) else { return };
    st.next_conn += 1;
    let id = st.next_conn;
    let _ = crate::transport::tcp::sock::set_nodelay(&fd);
    // A sender whose host vanishes ends the connection within the idle
    // timeout, between objects or in the middle of one.
    crate::liveness::Liveness::for_timeout(shared.options.idle_timeout).apply_or_log(&fd, "a stream connection");
    let pipe = match Pipe::new(shared.options.pipe_bytes) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("stream receiver: no pipe for a connection: {e}");
            return;
        }
    };
    let over = shared.connections.fetch_add(1, Ordering::Relaxed) >= shared.options.connections_max as u64;
    let conn = Rc::new(RefCell::new(Conn {
        rx,
        id,
        peer: peer_of(&fd),
        fd,
        pipe: pipe.clone(),
        shared: shared.clone(),
        core: RxConn::new(LingerLimits::default()),
        recv_op: false,
        recv_len: 0,
        wake_armed: false,
        send_op: false,
        linger_timer: false,
        link: None,
        session_key: None,
        trname: String::new(),
        caller: String::new(),
        gone: false,
    }));
    st.conns.insert(id, conn.clone());
    let (rt, shard) = (shared.runtime.clone(), ctx.id());
    pipe.set_producer_wake(Box::new(move || {
        let _ = rt.submit(shard, move |ctx| {
            if let Some(c) = rx_shard(ctx, rx).and_then(|st| st.conns.get(&id).cloned()) {
                post_recv(ctx, &c);
            }
        });
    }));
    watch_idle(ctx, &conn, u64::MAX);
    if over {
        let msg = format!("more than {} connections", shared.options.connections_max);
        conn.borrow_mut().core.refuse(503, &msg, "ErrBusy");
        return pump(ctx, &conn);
    }
    post_recv(ctx, &conn);
}

/// Carries out what the core asks for after an event: the close, the
/// half-close and the drain's timer, the next response.
fn pump(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    if conn.borrow().gone {
        return finish_if_idle(ctx, conn);
    }
    // Bound first: a borrow in the `if let` itself would live through
    // the body (edition 2024 keeps it there), and `close` borrows mutably.
    let closed = conn.borrow().core.closed().map(str::to_string);
    if let Some(why) = closed {
        return close(ctx, conn, &why);
    }
    {
        let mut c = conn.borrow_mut();
        if c.core.poll_half_close() {
            // SAFETY: plain syscall on the connection's own descriptor.
            unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_WR) };
        }
    }
    let deadline = {
        let c = conn.borrow();
        (!c.linger_timer).then(|| c.core.next_deadline()).flatten()
    };
    if let Some(at) = deadline {
        let c2 = conn.clone();
        let armed = ctx.set_timer_at(at, move |ctx| {
            let now = ctx.now();
            c2.borrow_mut().core.on_timer(now);
            pump(ctx, &c2);
        });
        if armed.is_err() {
            // No timer to bound the drain: close now rather than maybe never.
            return close(ctx, conn, "no timer for the drain");
        }
        conn.borrow_mut().linger_timer = true;
    }
    if conn.borrow().core.lingering() {
        drain(ctx, conn);
    }
    post_send(ctx, conn);
}

fn post_recv(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    let entry = {
        let c = conn.borrow();
        if c.recv_op || c.gone || c.core.lingering() || c.core.closed().is_some() {
            return;
        }
        let (p, free) = c.pipe.writable();
        if free == 0 {
            if c.pipe.producer_stall() {
                return; // woken when the decoding thread frees space
            }
            drop(c);
            return post_recv(ctx, conn);
        }
        let len = free.min(c.shared.options.recv_bytes);
        drop(c);
        conn.borrow_mut().recv_len = len;
        let c = conn.borrow();
        opcode::Recv::new(types::Fd(c.fd.as_raw_fd()), p, len as u32).build()
    };
    let c2 = conn.clone();
    let pipe = conn.borrow().pipe.clone();
    // SAFETY: the buffer is the pipe's free span, which only this shard
    // writes and the consumer does not read until commit; the closure owns
    // an Arc of the pipe (so the mapping outlives the operation) and of the
    // connection (so the descriptor does).
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _keep = pipe;
            on_recv(ctx, &c2, done)
        })
    };
    match r {
        Ok(_) => conn.borrow_mut().recv_op = true,
        Err(e) => close(ctx, conn, &format!("cannot receive: {e}")),
    }
}

fn on_recv(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, done: Completion) {
    conn.borrow_mut().recv_op = false;
    if conn.borrow().gone {
        return finish_if_idle(ctx, conn);
    }
    let heads = conn.borrow().core.reading_heads();
    match done.io_result() {
        Ok(0) => {
            conn.borrow().pipe.close(None);
            if heads || conn.borrow().core.closed().is_some() {
                return close(ctx, conn, "peer closed");
            }
            // Inside a body the decoding thread sees the end and reports.
            pump(ctx, conn);
        }
        Ok(n) => {
            let n = n as usize;
            conn.borrow().pipe.commit_quiet(n);
            wake_decoder(ctx, conn, n);
            if heads {
                parse_heads(ctx, conn);
            }
            post_recv(ctx, conn);
            pump(ctx, conn);
        }
        Err(e) => {
            conn.borrow().pipe.close(Some(e.to_string()));
            if heads {
                close(ctx, conn, &e.to_string());
            }
        }
    }
}

/// How long a wake of the decoding thread may be put off while receives
/// keep coming back full.
const WAKE_DEFER: Duration = Duration::from_micros(100);

/// Wakes the decoding thread for `n` new bytes, or puts it off: a receive
/// that came back full means more is coming at once, and waking the thread
/// per receive cost two context switches each (about 35,000 per GB). It is
/// woken when a receive comes back short, when the pipe is half full, or
/// after [`WAKE_DEFER`] at the latest.
fn wake_decoder(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, n: usize) {
    let (now, armed) = {
        let c = conn.borrow();
        let now = n < c.recv_len || c.pipe.buffered() >= c.pipe.capacity() / 2 || c.core.reading_heads();
        (now, c.wake_armed)
    };
    if now {
        conn.borrow().pipe.wake();
        return;
    }
    if armed {
        return;
    }
    let c2 = conn.clone();
    if ctx
        .set_timer(WAKE_DEFER, move |_ctx| {
            c2.borrow_mut().wake_armed = false;
            c2.borrow().pipe.wake();
        })
        .is_ok()
    {
        conn.borrow_mut().wake_armed = true;
    } else {
        conn.borrow().pipe.wake();
    }
}

/// Takes complete request heads from the pipe while the connection is
/// between bodies, and starts the body of each on the decoding thread.
fn parse_heads(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    let shared = conn.borrow().shared.clone();
    let started = {
        let mut c = conn.borrow_mut();
        let pipe = c.pipe.clone();
        let taken = c.core.on_head(pipe.readable(), |trname| shared.handler(trname));
        if let Some((_, _, used)) = &taken {
            pipe.consume(*used);
        }
        taken
    };
    if let Some((body, handler, _)) = started {
        start_body(ctx, conn, body, handler);
    }
    pump(ctx, conn);
}

/// Hands a body to the decoding thread.
fn start_body(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, body: BodyStart, handler: Arc<dyn super::RecvHandler>) {
    let shared = conn.borrow().shared.clone();
    let BodyStart { trname, caller, session_id, compressed, framing } = body;
    let (key, counters) = shared.open_session(&trname, &caller, session_id);
    let session = Session { trname: trname.clone(), caller: caller.clone(), id: session_id, peer: conn.borrow().peer };
    let job = Job {
        handler,
        session,
        framing,
        compressed,
        counters,
        dry_run: shared.options.dry_run,
        max_header: shared.options.max_header,
        verify: shared.options.verify_checksums,
    };
    {
        let mut c = conn.borrow_mut();
        c.session_key = Some(key);
        c.trname = trname;
        c.caller = caller;
    }
    match ensure_worker(ctx, conn) {
        Ok(link) => link.give(job),
        Err(e) => {
            shared.close_session(key);
            conn.borrow_mut().session_key = None;
            conn.borrow_mut().core.on_no_decoder(&e.to_string());
        }
    }
}

fn ensure_worker(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) -> std::io::Result<Arc<Link>> {
    if let Some(l) = conn.borrow().link.clone() {
        return Ok(l);
    }
    let link = Link::new();
    let (rx, id, shard) = (conn.borrow().rx, conn.borrow().id, ctx.id());
    let rt = conn.borrow().shared.runtime.clone();
    let done = Box::new(move |result: Result<(), RecvError>| {
        let _ = rt.submit(shard, move |ctx| {
            if let Some(c) = rx_shard(ctx, rx).and_then(|st| st.conns.get(&id).cloned()) {
                body_done(ctx, &c, result);
            }
        });
    });
    let cpu = if conn.borrow().shared.options.pin_workers { rt_cpu(&conn.borrow().shared, shard) } else { None };
    worker::spawn(link.clone(), conn.borrow().pipe.clone(), done, cpu)?;
    conn.borrow_mut().link = Some(link.clone());
    Ok(link)
}

fn rt_cpu(shared: &RxShared, shard: usize) -> Option<u32> {
    shared.runtime.shard_cpus().get(shard).copied().flatten()
}

/// The decoding thread finished a body: answer, then read the next head.
fn body_done(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, result: Result<(), RecvError>) {
    let (shared, key) = {
        let mut c = conn.borrow_mut();
        (c.shared.clone(), c.session_key.take())
    };
    if let Some(key) = key {
        shared.close_session(key);
    }
    if conn.borrow().gone {
        return finish_if_idle(ctx, conn);
    }
    {
        let mut c = conn.borrow_mut();
        let who = format!("{}[{}]", c.trname, c.caller);
        let ended = c.pipe.is_closed();
        c.core.on_body_done(result, ended, &who);
    }
    if conn.borrow().core.reading_heads() {
        parse_heads(ctx, conn);
        post_recv(ctx, conn);
    }
    pump(ctx, conn);
}

fn post_send(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    let entry = {
        let c = conn.borrow();
        if c.send_op || c.gone {
            return;
        }
        let Some(rest) = c.core.poll_send() else { return };
        opcode::Send::new(types::Fd(c.fd.as_raw_fd()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    };
    let c2 = conn.clone();
    // SAFETY: the bytes are the front response in the core, which is not
    // touched while `send_op` is set; the closure keeps the connection (and
    // so the core and the descriptor) alive until the completion.
    match unsafe { ctx.submit_op(entry, move |ctx, done| on_send(ctx, &c2, done)) } {
        Ok(_) => conn.borrow_mut().send_op = true,
        Err(e) => close(ctx, conn, &format!("cannot send: {e}")),
    }
}

fn on_send(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, done: Completion) {
    conn.borrow_mut().send_op = false;
    if conn.borrow().gone {
        return finish_if_idle(ctx, conn);
    }
    match done.io_result() {
        Ok(n) => {
            let now = ctx.now();
            conn.borrow_mut().core.on_sent(n as usize, now);
            pump(ctx, conn);
        }
        Err(e) => close(ctx, conn, &format!("send failed: {e}")),
    }
}

/// Closes the connection once its pipe has seen no progress (bytes in or
/// out) for a whole `idle_timeout`.
fn watch_idle(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, last: u64) {
    let (timeout, now) = {
        let c = conn.borrow();
        if c.gone {
            return;
        }
        (c.shared.options.idle_timeout, c.pipe.progress())
    };
    if now == last {
        let why = format!("no bytes moved for {timeout:?}");
        conn.borrow().pipe.close(Some(why.clone()));
        return close(ctx, conn, &why);
    }
    // A weak reference: a closed connection (and its descriptor) goes at
    // once, not when the timer fires.
    let weak = Rc::downgrade(conn);
    // If the timer table is full, this connection goes unwatched (it still
    // ends when its peer closes).
    let _ = ctx.set_timer(timeout, move |ctx| {
        if let Some(c) = weak.upgrade() {
            watch_idle(ctx, &c, now);
        }
    });
}

/// Reads and drops what the client still sends, while the core drains.
fn drain(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    if conn.borrow().gone || conn.borrow().recv_op {
        return;
    }
    let mut buf = vec![0u8; DRAIN_CHUNK];
    let entry = opcode::Recv::new(types::Fd(conn.borrow().fd.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).build();
    let c2 = conn.clone();
    // SAFETY: the closure owns the buffer, and the connection (with its
    // descriptor), until the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _buf = buf;
            c2.borrow_mut().recv_op = false;
            if c2.borrow().gone {
                return finish_if_idle(ctx, &c2);
            }
            let n = done.io_result().map_or(0, |n| n as usize);
            c2.borrow_mut().core.on_drained(n);
            pump(ctx, &c2);
        })
    };
    match r {
        Ok(_) => conn.borrow_mut().recv_op = true,
        Err(_) => close(ctx, conn, "response sent"),
    }
}

/// Ends a connection: no more I/O, the decoding thread stops, and the
/// state goes once its operations are back.
fn close(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>, why: &str) {
    {
        let mut c = conn.borrow_mut();
        if c.gone {
            return;
        }
        log::debug!("stream receiver: connection {} from {} closes: {why}", c.id, c.peer);
        c.gone = true;
        c.core.close(why);
        crate::transport::tcp::sock::shutdown_both(&c.fd);
        c.pipe.close(Some(format!("connection closed: {why}")));
        if let Some(l) = &c.link {
            l.quit();
        }
        c.shared.connections.fetch_sub(1, Ordering::Relaxed);
    }
    finish_if_idle(ctx, conn);
}

fn finish_if_idle(ctx: &mut ShardCtx, conn: &Rc<RefCell<Conn>>) {
    let (rx, id, idle) = {
        let c = conn.borrow();
        (c.rx, c.id, c.gone && !c.recv_op && !c.send_op && c.session_key.is_none())
    };
    if idle && let Some(st) = rx_shard(ctx, rx) {
        st.conns.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::place;
    use crate::config::Placement;

    #[test]
    fn local_streams_go_to_the_other_core_remote_ones_stay() {
        assert_eq!(place(1, 2, true, Placement::Auto), 0);
        assert_eq!(place(0, 2, true, Placement::Auto), 1);
        assert_eq!(place(1, 2, false, Placement::Auto), 1);
        assert_eq!(place(0, 1, true, Placement::Auto), 0, "one shard: nowhere else to go");
        assert_eq!(place(1, 2, true, Placement::Same), 1, "forced");
        assert_eq!(place(1, 2, false, Placement::Other), 0, "forced");
    }
}
