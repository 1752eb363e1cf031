//! A stream's life on its shard: connecting, framing batches, sending,
//! reading the receiver's answers, idle teardown, and termination.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use io_uring::{opcode, types};

use super::batch::{BATCH_BYTES, BATCH_BYTES_MAX, Batch, Framing};
use super::{Outgoing, StreamError, Termination, TxShared, complete};
use crate::runtime::{Completion, ShardCtx, TimerId};
use crate::transport::tcp::sock::{self, RawSockAddr};

/// Bytes of a receiver's answer we read at most (status, a JSON error).
const RESPONSE_MAX: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Closed,
    Connecting,
    Ready,
}

struct Tx {
    shared: Arc<TxShared>,
    queue: VecDeque<Outgoing>,
    fd: Option<Rc<OwnedFd>>,
    /// Bumped per connection, so completions of an old one are ignored.
    conn_gen: u64,
    conn: ConnState,
    /// A PUT is open (its head was sent, its body not ended).
    in_request: bool,
    /// A batch is being sent.
    sending: bool,
    /// The body was ended; the receiver's status is due.
    awaiting_response: bool,
    fin_requested: bool,
    fin_sent: bool,
    /// The receiver's 200 arrived while the last batch's completion was
    /// still due; it is acted on after that completion.
    answered: Option<bool>,
    response: Vec<u8>,
    recv_op: bool,
    idle_timer: Option<TimerId>,
    /// Bumped per batch, for the watchdog.
    send_gen: u64,
    /// The watchdog timer is armed.
    watchdog: bool,
    ended: bool,
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
            Rc::new(RefCell::new(Tx {
                shared: shared.clone(),
                queue: VecDeque::new(),
                fd: None,
                conn_gen: 0,
                conn: ConnState::Closed,
                in_request: false,
                sending: false,
                awaiting_response: false,
                fin_requested: false,
                fin_sent: false,
                answered: None,
                response: Vec::new(),
                recv_op: false,
                idle_timer: None,
                send_gen: 0,
                watchdog: false,
                ended: false,
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
    tx.borrow_mut().queue.push_back(obj);
    shared.counters.lock().expect("stats lock").set_idle(false, ctx.now());
    kick(ctx, &tx);
}

/// `fin`: send what is queued, then the end-of-stream frame.
pub(super) fn fin(ctx: &mut ShardCtx, shared: &Arc<TxShared>) {
    if shared.termination().is_some() {
        return;
    }
    let tx = tx_of(ctx, shared);
    tx.borrow_mut().fin_requested = true;
    kick(ctx, &tx);
}

/// `stop`: abort.
pub(super) fn stop(ctx: &mut ShardCtx, shared: &Arc<TxShared>) {
    let tx = tx_of(ctx, shared);
    end(ctx, &tx, Termination::Stopped);
}

/// Moves the stream forward: connect, or frame and send the next batch.
fn kick(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    if tx.borrow().ended || tx.borrow().sending || tx.borrow().awaiting_response {
        return;
    }
    // Objects that failed framing complete once those ahead of them have,
    // which is now: nothing is in flight.
    complete_failed_front(tx);
    let mut t = tx.borrow_mut();
    let work = !t.queue.is_empty() || (t.fin_requested && !t.fin_sent);
    if !work {
        drop(t);
        return arm_idle(ctx, tx);
    }
    match t.conn {
        ConnState::Connecting => return,
        ConnState::Closed => {
            drop(t);
            return connect(ctx, tx);
        }
        ConnState::Ready => {}
    }
    let head = (!t.in_request).then(|| request_head(&t.shared));
    let options = &t.shared.options;
    let fin_now = t.fin_requested;
    let framing = Framing {
        head: head.as_deref(),
        pdu: options.pdu_size,
        compression: options.compression,
        max_header: options.max_header,
        fin: fin_now,
        end_body: fin_now,
        batch_bytes: options.batch_bytes,
        batch_bytes_max: options.batch_bytes_max,
    };
    let (batch, failure) = Batch::build(t.queue.make_contiguous(), &framing);
    // A batch cut short by a failed object carries no Fin: that goes next.
    let cut_short = failure.is_some();
    if let Some(f) = failure {
        let e = StreamError::Object(f.error);
        if f.breaks_stream {
            drop(t);
            return end(ctx, tx, Termination::Error(e));
        }
        // The object never reached the wire: it fails alone, in its turn.
        t.queue[f.index].failed = Some(e);
        if batch.completes == 0 && batch.total() == head.as_ref().map_or(0, |h| h.len()) {
            // Nothing else in this batch: go on from the next object.
            drop(t);
            return kick(ctx, tx);
        }
    }
    let whole = fin_now && !cut_short && batch.completes == t.queue.len();
    if batch.total() == 0 {
        return;
    }
    t.in_request = !whole;
    if whole {
        t.fin_sent = true;
        // The answer may be read before this send's completion.
        t.awaiting_response = true;
    }
    t.sending = true;
    t.send_gen += 1;
    drop(t);
    send_batch(ctx, tx, Box::new(batch_with_flag(batch, whole)));
    ensure_watchdog(ctx, tx);
}

/// Completes the objects at the front of the queue whose framing failed.
fn complete_failed_front(tx: &Rc<RefCell<Tx>>) {
    loop {
        let (shared, o) = {
            let mut t = tx.borrow_mut();
            if t.queue.front().is_none_or(|o| o.failed.is_none()) {
                return;
            }
            let o = t.queue.pop_front().expect("checked");
            (t.shared.clone(), o)
        };
        let Outgoing { hdr, body, cb, failed, .. } = o;
        drop(body);
        let e = failed.expect("checked");
        complete(&shared, &hdr, cb, Err(&e));
        shared.release(1);
    }
}

/// Starts the stream's watchdog if it is not running. One timer per
/// stream, not per batch: the shard's timer table is bounded and shared.
fn ensure_watchdog(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    if std::mem::replace(&mut tx.borrow_mut().watchdog, true) {
        return;
    }
    let (timeout, generation) = {
        let t = tx.borrow();
        (t.shared.options.send_timeout, t.send_gen)
    };
    arm_watchdog(ctx, Rc::downgrade(tx), timeout, generation);
}

fn arm_watchdog(ctx: &mut ShardCtx, weak: Weak<RefCell<Tx>>, timeout: std::time::Duration, seen: u64) {
    let w = weak.clone();
    let r = ctx.set_timer(timeout, move |ctx| {
        if let Some(tx) = w.upgrade() {
            watchdog(ctx, &tx, timeout, seen);
        }
    });
    if r.is_err()
        && let Some(tx) = weak.upgrade()
    {
        tx.borrow_mut().watchdog = false;
    }
}

/// Every `timeout`: a send still in flight, or an answer still due, for the
/// same batch as at the previous look has taken at least `timeout`. The
/// send is broken (it then fails), or the stream ends for want of an answer.
fn watchdog(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, timeout: std::time::Duration, seen: u64) {
    let (ended, current, sending, waiting) = {
        let t = tx.borrow();
        (t.ended, t.send_gen, t.sending, t.awaiting_response)
    };
    if ended {
        return;
    }
    if current == seen && sending {
        // No progress: break the connection; the send fails with it.
        if let Some(fd) = &tx.borrow().fd {
            sock::shutdown_both(fd.as_ref());
        }
    } else if current == seen && waiting {
        let e = StreamError::Network(format!("the receiver did not answer within {timeout:?}"));
        return end(ctx, tx, Termination::Error(e));
    }
    if !sending && !waiting {
        // Idle: stop looking until the next send.
        tx.borrow_mut().watchdog = false;
        return;
    }
    arm_watchdog(ctx, Rc::downgrade(tx), timeout, current);
}

/// A batch and whether it ends the request body.
struct InFlight {
    batch: Batch,
    ends_body: bool,
}

fn batch_with_flag(batch: Batch, ends_body: bool) -> InFlight {
    InFlight { batch, ends_body }
}

fn send_batch(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, mut f: Box<InFlight>) {
    let (fd, generation) = {
        let t = tx.borrow();
        (t.fd.clone(), t.conn_gen)
    };
    let Some(fd) = fd else {
        tx.borrow_mut().sending = false;
        return end(ctx, tx, Termination::Error(StreamError::Network("the connection is gone".into())));
    };
    let entry = opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), f.batch.iovecs().msghdr())
        .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
        .build();
    let tx2 = tx.clone();
    // SAFETY: the msghdr and iovecs live in the boxed batch, which points at
    // its own buffers and at Arcs it holds; the closure owns the box (and the
    // descriptor's Rc) until the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _fd = fd;
            on_sent(ctx, &tx2, f, generation, done)
        })
    };
    if let Err(e) = r {
        tx.borrow_mut().sending = false;
        end(ctx, tx, Termination::Error(StreamError::Network(format!("cannot send: {e}"))));
    }
}

fn on_sent(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, mut f: Box<InFlight>, generation: u64, done: Completion) {
    if tx.borrow().ended || tx.borrow().conn_gen != generation {
        tx.borrow_mut().sending = false;
        return;
    }
    match done.io_result() {
        Ok(n) => {
            let iov = f.batch.iovecs();
            iov.advance(n as usize);
            if !iov.is_complete() {
                return send_batch(ctx, tx, f);
            }
        }
        Err(e) => {
            tx.borrow_mut().sending = false;
            let peer = tx.borrow().shared.addr;
            return end(ctx, tx, Termination::Error(StreamError::Network(format!("send to {peer}: {e}"))));
        }
    }
    // The whole batch is with the kernel: its objects are complete.
    let (shared, done_objs) = {
        let mut t = tx.borrow_mut();
        t.sending = false;
        let n = f.batch.completes.min(t.queue.len());
        let objs: Vec<Outgoing> = t.queue.drain(..n).collect();
        if f.ends_body {
            t.in_request = false;
        }
        (t.shared.clone(), objs)
    };
    {
        let mut c = shared.counters.lock().expect("stats lock");
        c.offset += f.batch.body_bytes as i64;
        for o in &done_objs {
            if !o.hdr.is_control() {
                c.num += 1;
                c.size += o.sent as i64;
            }
        }
    }
    let n = done_objs.len();
    for o in done_objs {
        let Outgoing { hdr, body, cb, .. } = o;
        drop(body); // closed before the callback, as AIStore does
        complete(&shared, &hdr, cb, Ok(()));
    }
    shared.release(n);
    let answered = tx.borrow_mut().answered.take();
    if let Some(close) = answered {
        return answer_ok(ctx, tx, close);
    }
    kick(ctx, tx);
}

/// The receiver said 200 to an ended body.
fn answer_ok(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, close: bool) {
    let fin_sent = {
        let mut t = tx.borrow_mut();
        t.awaiting_response = false;
        t.fin_sent
    };
    if fin_sent {
        return end(ctx, tx, Termination::EndOfStream);
    }
    if close {
        drop_conn(tx);
    }
    post_recv(ctx, tx);
    kick(ctx, tx);
}

fn request_head(s: &TxShared) -> Vec<u8> {
    let mut h = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: shardwire/{}\r\nTransfer-Encoding: chunked\r\n\
         Content-Type: application/octet-stream\r\nAis-Session-Id: {}\r\nAis-Caller-Id: {}\r\n",
        s.path,
        s.host,
        env!("CARGO_PKG_VERSION"),
        s.session,
        s.options.caller_id
    );
    if s.options.compression.is_some() {
        h.push_str("Ais-Compress: lz4\r\n");
    }
    h.push_str("\r\n");
    h.into_bytes()
}

fn connect(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let addr = tx.borrow().shared.addr;
    let fd = match sock::client_socket(&addr) {
        Ok(fd) => Rc::new(fd),
        Err(e) => return end(ctx, tx, Termination::Error(StreamError::Network(format!("socket: {e}")))),
    };
    if let Some(bytes) = sndbuf_for(&addr, tx.borrow().shared.options.sndbuf) {
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
    let generation = {
        let mut t = tx.borrow_mut();
        t.conn_gen += 1;
        t.conn = ConnState::Connecting;
        t.fd = Some(fd.clone());
        t.response.clear();
        t.conn_gen
    };
    let tx2 = tx.clone();
    // SAFETY: the sockaddr is boxed and owned by the closure, as is an Rc of
    // the descriptor, until the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _keep = (raw, fd);
            on_connect(ctx, &tx2, generation, done)
        })
    };
    if let Err(e) = r {
        return end(ctx, tx, Termination::Error(StreamError::Network(format!("connect: {e}"))));
    }
    let timeout = tx.borrow().shared.options.connect_timeout;
    let tx3 = tx.clone();
    // If the timer table is full, the kernel's own connect timeout applies.
    let _ = ctx.set_timer(timeout, move |ctx| {
        let stuck = {
            let t = tx3.borrow();
            t.conn_gen == generation && t.conn == ConnState::Connecting && !t.ended
        };
        if stuck {
            let e = StreamError::Network(format!("connect to {addr}: timed out after {timeout:?}"));
            end(ctx, &tx3, Termination::Error(e));
        }
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

fn on_connect(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, generation: u64, done: Completion) {
    if tx.borrow().ended || tx.borrow().conn_gen != generation {
        return;
    }
    match done.io_result() {
        Ok(_) => {
            tx.borrow_mut().conn = ConnState::Ready;
            post_recv(ctx, tx);
            kick(ctx, tx);
        }
        Err(e) => {
            let addr = tx.borrow().shared.addr;
            end(ctx, tx, Termination::Error(StreamError::Network(format!("connect to {addr}: {e}"))));
        }
    }
}

/// Keeps a receive posted while connected: it reads the receiver's
/// answers, an early error included, and notices when it closes.
fn post_recv(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let (fd, generation) = {
        let t = tx.borrow();
        if t.recv_op || t.ended || t.conn != ConnState::Ready {
            return;
        }
        (t.fd.clone().expect("ready means a descriptor"), t.conn_gen)
    };
    let mut buf = vec![0u8; 4096];
    let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).build();
    let tx2 = tx.clone();
    // SAFETY: the closure owns the buffer and an Rc of the descriptor until
    // the completion.
    let r = unsafe {
        ctx.submit_op(entry, move |ctx, done| {
            let _fd = fd;
            on_recv(ctx, &tx2, generation, buf, done)
        })
    };
    if r.is_ok() {
        tx.borrow_mut().recv_op = true;
    }
}

fn on_recv(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, generation: u64, buf: Vec<u8>, done: Completion) {
    if tx.borrow().conn_gen != generation {
        return;
    }
    tx.borrow_mut().recv_op = false;
    if tx.borrow().ended {
        return;
    }
    let n = match done.io_result() {
        Ok(n) => n as usize,
        Err(e) => return end(ctx, tx, Termination::Error(StreamError::Network(format!("receive: {e}")))),
    };
    if n == 0 {
        let (busy, waiting) = {
            let t = tx.borrow();
            (t.in_request || t.sending, t.awaiting_response)
        };
        if busy || waiting {
            let e = StreamError::Network("the receiver closed the connection".into());
            return end(ctx, tx, Termination::Error(e));
        }
        // An idle keep-alive connection closed by the receiver: reconnect
        // when there is something to send.
        drop_conn(tx);
        return kick(ctx, tx);
    }
    tx.borrow_mut().response.extend_from_slice(&buf[..n]);
    loop {
        let parsed = parse_response(&tx.borrow().response);
        match parsed {
            Parsed::Partial => {
                if tx.borrow().response.len() > RESPONSE_MAX {
                    let e = StreamError::Network("the receiver's answer is too long".into());
                    return end(ctx, tx, Termination::Error(e));
                }
                break;
            }
            Parsed::Bad(why) => {
                let e = StreamError::Network(format!("the receiver's answer is not HTTP: {why}"));
                return end(ctx, tx, Termination::Error(e));
            }
            Parsed::Done { status, body, used, close } => {
                tx.borrow_mut().response.drain(..used);
                if status == 100 {
                    continue;
                }
                if status != 200 {
                    let message = String::from_utf8_lossy(&body).into_owned();
                    return end(ctx, tx, Termination::Error(StreamError::Rejected { status, message }));
                }
                let (was_waiting, sending) = {
                    let t = tx.borrow();
                    (t.awaiting_response, t.sending)
                };
                if !was_waiting {
                    let e = StreamError::Network("the receiver answered before the body ended".into());
                    return end(ctx, tx, Termination::Error(e));
                }
                if sending {
                    // Complete the last batch's objects first.
                    tx.borrow_mut().answered = Some(close);
                    return;
                }
                return answer_ok(ctx, tx, close);
            }
        }
    }
    post_recv(ctx, tx);
}

enum Parsed {
    Partial,
    Bad(String),
    Done { status: u16, body: Vec<u8>, used: usize, close: bool },
}

fn parse_response(raw: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut fields);
    let head = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return Parsed::Bad(e.to_string()),
    };
    let status = r.code.unwrap_or(0);
    let field = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let close = field("connection").is_some_and(|c| c.contains("close"));
    let len = if status == 100 {
        0
    } else {
        match field("content-length").map(|v| v.parse::<usize>()) {
            Some(Ok(n)) => n,
            Some(Err(_)) => return Parsed::Bad("bad Content-Length".into()),
            // Without a length the answer ends with the connection; take
            // what is there (an error is what we would read).
            None => raw.len() - head,
        }
    };
    if len > RESPONSE_MAX {
        return Parsed::Bad(format!("an answer of {len} bytes"));
    }
    if raw.len() < head + len {
        return Parsed::Partial;
    }
    Parsed::Done { status, body: raw[head..head + len].to_vec(), used: head + len, close }
}

fn drop_conn(tx: &Rc<RefCell<Tx>>) {
    let mut t = tx.borrow_mut();
    if let Some(fd) = t.fd.take() {
        sock::shutdown_both(fd.as_ref());
    }
    t.conn = ConnState::Closed;
    t.conn_gen += 1;
    t.in_request = false;
    t.awaiting_response = false;
    t.recv_op = false;
    t.response.clear();
}

/// Ends the PUT after `idle_teardown` without objects.
fn arm_idle(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let (timeout, shared) = {
        let t = tx.borrow();
        if !t.in_request || t.idle_timer.is_some() {
            return;
        }
        (t.shared.options.idle_teardown, t.shared.clone())
    };
    shared.counters.lock().expect("stats lock").set_idle(true, ctx.now());
    let tx2 = tx.clone();
    let id = ctx.set_timer(timeout, move |ctx| {
        tx2.borrow_mut().idle_timer = None;
        let idle = {
            let t = tx2.borrow();
            !t.ended && t.in_request && !t.sending && t.queue.is_empty() && !t.fin_requested
        };
        if idle {
            end_body(ctx, &tx2);
        }
    });
    tx.borrow_mut().idle_timer = id.ok();
}

/// Ends the request body (idle teardown): the receiver then answers.
fn end_body(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>) {
    let framing = Framing {
        head: None,
        pdu: None,
        compression: None,
        max_header: 4096,
        fin: false,
        end_body: true,
        batch_bytes: BATCH_BYTES,
        batch_bytes_max: BATCH_BYTES_MAX,
    };
    let (batch, _) = Batch::build(&mut [], &framing);
    {
        let mut t = tx.borrow_mut();
        t.sending = true;
        t.send_gen += 1;
        t.in_request = false;
        t.awaiting_response = true;
    }
    send_batch(ctx, tx, Box::new(batch_with_flag(batch, true)));
    ensure_watchdog(ctx, tx);
}

/// Terminates the stream: every object still queued or in flight completes
/// with the reason, in order.
fn end(ctx: &mut ShardCtx, tx: &Rc<RefCell<Tx>>, how: Termination) {
    let (shared, objs) = {
        let mut t = tx.borrow_mut();
        if t.ended {
            return;
        }
        t.ended = true;
        if let Some(fd) = t.fd.take() {
            sock::shutdown_both(fd.as_ref());
        }
        if let Some(timer) = t.idle_timer.take() {
            ctx.cancel_timer(timer);
        }
        t.conn = ConnState::Closed;
        (t.shared.clone(), t.queue.drain(..).collect::<Vec<_>>())
    };
    let err = match &how {
        Termination::EndOfStream => StreamError::Finished,
        Termination::Stopped => StreamError::Stopped,
        Termination::Error(e) => e.clone(),
    };
    let n = objs.len();
    for o in objs {
        let Outgoing { hdr, body, cb, failed, .. } = o;
        drop(body);
        complete(&shared, &hdr, cb, Err(failed.as_ref().unwrap_or(&err)));
    }
    shared.release(n);
    shared.counters.lock().expect("stats lock").set_idle(true, ctx.now());
    if let Some(map) = ctx.local_mut::<TxStreams>() {
        map.0.remove(&shared.id);
    }
    shared.terminate(how);
}
