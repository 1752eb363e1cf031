//! A stream on its shard: a thin io_uring driver over [`TxConn`], the
//! sans-IO sender. It opens connections, sends the batches the core frames,
//! keeps one receive posted for the receiver's answers, runs the timers the
//! core asks for, and runs completions (the user's callbacks).

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::batch::Chunk;
use super::conn::{Action, TxConn, TxFraming};
use super::{Outgoing, StreamError, TxShared, complete};
use crate::runtime::{Completion, ShardCtx};
use crate::telemetry::{Direction, StreamDelta, counters as telemetry};
use crate::transport::tcp::iov::IoVecs;
use crate::transport::tcp::sock::{self, RawSockAddr};

/// Bytes one receive of the receiver's answers asks for.
const RECV_BYTES: usize = 4096;

struct Tx {
    shared: Arc<TxShared>,
    core: TxConn,
    fd: Option<Rc<OwnedFd>>,
    /// A receive is posted on the connection of this generation.
    recv_gen: Option<u64>,
    /// The send out: its scatter list.
    send: Option<Box<IoVecs>>,
    /// The stream was removed from the shard (terminated).
    gone: bool,
}

#[derive(Default)]
struct TxStreams(HashMap<u64, Rc<RefCell<Tx>>>);

fn tx_of(ctx: &mut ShardCtx, shared: &Arc<TxShared>) -> Rc<RefCell<Tx>> {
    if ctx.local_mut::<TxStreams>().is_none() {
        ctx.insert_local(TxStreams::default());
    }
    let map = ctx.local_mut::<TxStreams>().expect("installed");
    map.0
        .entry(shared.id)
        .or_insert_with(|| {
            let o = &shared.options;
            let framing = TxFraming {
                head: request_head(shared),
                pdu: o.pdu_size,
                compression: o.compression,
                max_header: o.max_header,
                batch_bytes: o.batch_bytes,
                batch_bytes_max: o.batch_bytes_max,
                idle_teardown: o.idle_teardown,
                send_timeout: o.send_timeout,
            };
            Rc::new(RefCell::new(Tx {
                shared: shared.clone(),
                core: TxConn::new(framing),
                fd: None,
                recv_gen: None,
                send: None,
                gone: false,
            }))
        })
        .clone()
}

/// A new object from `send`.
pub(super) fn enqueue(ctx: &mut ShardCtx, shared: &Arc<TxShared>, obj: Outgoing) {
    if let Some(t) = shared.termination() {
        let e = StreamError::Terminated(Box::new(super::term_error(t)));
        complete(shared, &obj.hdr, obj.cb, Err(&e));
        shared.release(1);
        return;
    }
    let tx = tx_of(ctx, shared);
    tx.borrow_mut().core.enqueue(obj);
    run(ctx, &tx);
}

/// More of a streamed object's bytes.
pub(super) fn chunk(ctx: &mut ShardCtx, shared: &Arc<TxShared>, seq: u64, chunk: Chunk) {
    if shared.termination().is_some() {
        if let Chunk::Data(d) = &chunk {
            shared.release_streamed(d.len());
        }
        return;
    }
    let tx = tx_of(ctx, shared);
    tx.borrow_mut().core.chunk(seq, chunk);
    run(ctx, &tx);
}

/// `fin`: send what is queued, then the end-of-stream frame.
pub(super) fn fin(ctx: &mut ShardCtx, shared: &Arc<TxShared>) {
    if shared.termination().is_some() {
        return;
    }
    let tx = tx_of(ctx, shared);
    tx.borrow_mut().core.fin();
    run(ctx, &tx);
}

/// `stop`: abort.
pub(super) fn stop(ctx: &mut ShardCtx, shared: &Arc<TxShared>) {
    let tx = tx_of(ctx, shared);
    tx.borrow_mut().core.stop();
    run(ctx, &tx);
}

/// Carries out the core's actions, then keeps a receive posted. Burst
/// slots and object counts go back once per round, not per object: a
/// release wakes the threads waiting to send.
fn run(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let shared = tx.borrow().shared.clone();
    let mut done = Done::default();
    loop {
        let action = tx.borrow_mut().core.poll();
        let Some(action) = action else { break };
        match action {
            Action::Connect => connect(ctx, tx),
            Action::Send => send(ctx, tx),
            Action::Close => {
                if let Some(fd) = tx.borrow_mut().fd.take() {
                    sock::shutdown_both(fd.as_ref());
                }
            }
            Action::Abort => {
                if let Some(fd) = &tx.borrow().fd {
                    sock::shutdown_both(fd.as_ref());
                }
            }
            Action::IdleTimer(after) => {
                let weak = Rc::downgrade(tx);
                // If the timer table is full the PUT stays open until the
                // next object or `fin` (or the receiver's idle timeout).
                let _ = ctx.set_timer(after, move |ctx| with(ctx, &weak, |c| c.on_idle()));
            }
            Action::Watchdog(after, seen) => {
                let weak = Rc::downgrade(tx);
                if ctx.set_timer(after, move |ctx| with(ctx, &weak, |c| c.on_watchdog(seen))).is_err() {
                    tx.borrow_mut().core.watchdog_failed();
                }
            }
            Action::Complete => {
                let (o, result) = tx.borrow_mut().core.take_completed().expect("one object per Complete");
                if result.is_ok() && !o.hdr.is_control() {
                    done.objects += 1;
                    done.bytes += o.sent as i64;
                } else if result.is_err() {
                    done.errors += 1;
                }
                let Outgoing { hdr, body, cb, .. } = o;
                drop(body); // closed before the callback, as AIStore does
                complete(&shared, &hdr, cb, result.as_ref().map(|_| ()));
                done.slots += 1;
            }
            Action::Sent { body_bytes } => {
                tx.borrow().shared.counters.lock().expect("stats lock").offset += body_bytes as i64;
            }
            Action::Idle(idle) => {
                let now = ctx.now();
                tx.borrow().shared.counters.lock().expect("stats lock").set_idle(idle, now);
            }
            Action::ChunkBytes(n) => tx.borrow().shared.release_streamed(n),
            Action::Terminate(how) => {
                done.flush(&shared);
                tx.borrow_mut().gone = true;
                if let Some(map) = ctx.local_mut::<TxStreams>() {
                    map.0.remove(&shared.id);
                }
                shared.terminate(how);
            }
        }
    }
    done.flush(&shared);
    post_recv(ctx, tx);
}

/// Completions of one round, reported together.
#[derive(Default)]
struct Done {
    slots: usize,
    objects: i64,
    bytes: i64,
    errors: u64,
}

impl Done {
    fn flush(&mut self, shared: &TxShared) {
        if self.objects > 0 {
            let mut c = shared.counters.lock().expect("stats lock");
            c.num += self.objects;
            c.size += self.bytes;
        }
        if self.objects > 0 || self.errors > 0 {
            let delta = StreamDelta {
                objects: self.objects as u64,
                bytes: self.bytes as u64,
                errors: self.errors,
                sessions: 0,
            };
            telemetry::stream(&shared.trname, Direction::Tx, delta);
        }
        if self.slots > 0 {
            shared.release(self.slots);
        }
        *self = Done::default();
    }
}

/// Delivers a timer to the core, if the stream is still there.
fn with(ctx: &mut ShardCtx, weak: &Weak<RefCell<Tx>>, f: impl FnOnce(&mut TxConn)) {
    if let Some(tx) = weak.upgrade() {
        f(&mut tx.borrow_mut().core);
        run(ctx, &tx);
    }
}

/// The head every PUT of the stream opens with.
fn request_head(s: &TxShared) -> Vec<u8> {
    let session = s.session.to_string();
    let agent = concat!("shardwire/", env!("CARGO_PKG_VERSION"));
    let mut fields = vec![
        ("Host", s.host.as_str()),
        ("User-Agent", agent),
        ("Transfer-Encoding", "chunked"),
        ("Content-Type", "application/octet-stream"),
        ("Ais-Session-Id", session.as_str()),
        ("Ais-Caller-Id", s.options.caller_id.as_str()),
    ];
    if s.options.compression.is_some() {
        fields.push(("Ais-Compress", "lz4"));
    }
    // The path and host were checked when the stream was made, and the
    // caller id is checked there too: writing cannot fail.
    crate::http::request::write_head("PUT", &s.path, &fields).expect("a checked head")
}

fn connect(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let (addr, sndbuf, generation, send_timeout) = {
        let t = tx.borrow();
        (t.shared.addr, t.shared.options.sndbuf, t.core.generation(), t.shared.options.send_timeout)
    };
    let fail = |ctx: &mut ShardCtx, why: String| {
        tx.borrow_mut().core.on_connect_failed(why);
        run(ctx, tx);
    };
    let fd = match sock::client_socket(&addr) {
        Ok(fd) => Rc::new(fd),
        Err(e) => return fail(ctx, format!("socket: {e}")),
    };
    // A receiver whose host vanishes ends the connection within the send
    // timeout, idle or not.
    crate::liveness::Liveness::for_timeout(send_timeout).apply_or_log(&*fd, "a stream connection");
    if let Some(bytes) = sndbuf_for(&addr, sndbuf) {
        // SAFETY: setsockopt reads one c_int from a live local.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    let raw = RawSockAddr::new(&addr);
    let entry = opcode::Connect::new(types::Fd(fd.as_raw_fd()), raw.as_ptr(), raw.len).build();
    tx.borrow_mut().fd = Some(fd.clone());
    let tx2 = tx.clone();
    // SAFETY: the sockaddr is boxed and owned by the closure, as is an Rc of
    // the descriptor, until the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _keep = (raw, fd);
            if tx2.borrow().core.generation() != generation {
                return; // an older connection
            }
            match done.io_result() {
                Ok(_) => {
                    let delta = StreamDelta { sessions: 1, ..StreamDelta::default() };
                    telemetry::stream(&tx2.borrow().shared.trname, Direction::Tx, delta);
                    tx2.borrow_mut().core.on_connected()
                }
                Err(e) => tx2.borrow_mut().core.on_connect_failed(format!("connect to {addr}: {e}")),
            }
            run(ctx, &tx2);
        })
    };
    if let Err(e) = r {
        return fail(ctx, format!("connect: {e}"));
    }
    let timeout = tx.borrow().shared.options.connect_timeout;
    let weak = Rc::downgrade(tx);
    // If the timer table is full, the kernel's own connect timeout applies.
    let _ = ctx.set_timer(timeout, move |ctx| {
        with(ctx, &weak, |c| {
            if c.generation() == generation {
                c.on_connect_failed(format!("connect to {addr}: timed out after {timeout:?}"));
            }
        })
    });
}

/// The send buffer for a stream to `addr`: to a peer on this host, half of
/// the engine's in-flight cap (the kernel doubles it: a quarter of L2), so
/// what one core copies in is still in cache when the other copies it out
/// (1 MiB objects on loopback: 4.3 GB/s autotuned, 5.2-6.0 capped).
/// Other hosts keep the kernel's autotuning, which sizes for the path.
/// `SHARDWIRE_STREAM_SNDBUF` overrides (0: autotune).
fn sndbuf_for(addr: &std::net::SocketAddr, configured: Option<usize>) -> Option<libc::c_int> {
    if let Some(v) = configured {
        return (v > 0).then(|| v.min(libc::c_int::MAX as usize) as libc::c_int);
    }
    sock::is_local_ip(addr.ip()).then(|| {
        (crate::transport::tcp::client::local_inflight_default() / 2).min(libc::c_int::MAX as u64) as libc::c_int
    })
}

fn send(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let (fd, mut iov) = {
        let t = tx.borrow();
        let batch = t.core.batch().expect("a batch to send");
        let pieces = batch.pieces();
        let mut iov = Box::new(IoVecs::with_capacity(pieces.len()));
        for (p, n) in pieces {
            iov.push(p, n);
        }
        (t.fd.clone(), iov)
    };
    let Some(fd) = fd else {
        tx.borrow_mut().core.on_send_failed("the connection is gone");
        return run(ctx, tx);
    };
    if submit_send(ctx, tx, fd, &mut iov) {
        tx.borrow_mut().send = Some(iov);
    } else {
        run(ctx, tx);
    }
}

/// Queues the send of what `iov` still holds; false if it could not be.
fn submit_send(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, fd: Rc<OwnedFd>, iov: &mut IoVecs) -> bool {
    let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), iov.msghdr())
        .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
        .build();
    let tx2 = tx.clone();
    // SAFETY: the iovecs are boxed in the stream until the completion; they
    // point at the core's batch, which the core holds until it is told the
    // send completed (or failed); the closure holds an Rc of the descriptor.
    let r = unsafe { ctx.submit_op(entry, move |ctx, done| on_sent(ctx, &tx2, fd, done)) };
    match r {
        Ok(_) => true,
        Err(e) => {
            tx.borrow_mut().core.on_send_failed(format!("cannot send: {e}"));
            false
        }
    }
}

fn on_sent(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, fd: Rc<OwnedFd>, done: Completion) {
    let mut iov = tx.borrow_mut().send.take().expect("a send out");
    match done.io_result() {
        Ok(n) if n > 0 => {
            iov.advance(n as usize);
            tx.borrow_mut().core.on_sent(n as usize);
            if !iov.is_complete() && tx.borrow().core.batch().is_some() && submit_send(ctx, tx, fd, &mut iov) {
                tx.borrow_mut().send = Some(iov);
            }
        }
        Ok(_) => tx.borrow_mut().core.on_send_failed("send: the connection is closed"),
        Err(e) => {
            let peer = tx.borrow().shared.addr;
            tx.borrow_mut().core.on_send_failed(format!("send to {peer}: {e}"));
        }
    }
    run(ctx, tx);
}

/// Keeps a receive posted while connected: it reads the receiver's
/// answers, an early error included, and notices when it closes.
fn post_recv(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let (fd, generation) = {
        let t = tx.borrow();
        if t.gone || !t.core.wants_recv() || t.recv_gen == Some(t.core.generation()) {
            return;
        }
        let Some(fd) = t.fd.clone() else { return };
        (fd, t.core.generation())
    };
    let mut buf = vec![0u8; RECV_BYTES];
    let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).build();
    let tx2 = tx.clone();
    // SAFETY: the closure owns the buffer and an Rc of the descriptor until
    // the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _fd = fd;
            {
                let mut t = tx2.borrow_mut();
                if t.recv_gen == Some(generation) {
                    t.recv_gen = None;
                }
                if t.core.generation() != generation {
                    return; // an older connection
                }
                match done.io_result() {
                    Ok(0) => t.core.on_eof(),
                    Ok(n) => t.core.on_received(&buf[..n as usize]),
                    Err(e) => t.core.on_recv_failed(e.to_string()),
                }
            }
            run(ctx, &tx2);
        })
    };
    if r.is_ok() {
        tx.borrow_mut().recv_gen = Some(generation);
    }
}
