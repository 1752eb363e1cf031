//! A [`Link`]: one device's connection to one peer device, shared by every
//! queue pair connected there.
//!
//! A sender thread takes the work requests posted (checks each locally,
//! [`rules::check_local`], cuts it into parts of at most
//! [`PAYLOAD_BYTES_MAX`], sends them), and a receiver thread takes the
//! answers and completes the work requests. At most [`LINK_PARTS_MAX`]
//! parts and [`LINK_BYTES_MAX`] bytes are unanswered on a link, and at
//! most [`LINK_QUEUE_MAX`] work requests wait to be sent. A part
//! unanswered past its queue pair's retry time, or a connection that
//! breaks, ends the link: what it carried completes with `RETRY_EXC_ERR`
//! (and what followed on those queue pairs is flushed), and what is handed
//! to it later fails the same way. However a link's thread ends (a panic
//! too), every work request handed to the link completes exactly once.
//!
//! The connection is made on first use. A link that has had nothing to do
//! for the device's link idle limit closes ([`Link::closed_idle`]): its
//! threads, socket and buffers go, and a queue pair that still holds it
//! gets a new one on its next post.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

use super::super::fabric::{FabricError, QpNum, Sges, Verb, WcStatus};
use super::super::rules;
use super::frames::FrameReader;
use super::nic::{Device, FLUSH_BYTES, OUT_KEPT_BYTES, SHRINK_AFTER, TICK, connect_from, locked, spawn};
use super::queues::{RegionGuard, append_from, spans};
use super::wire::{Hello, PAYLOAD_BYTES_MAX, RESPONSE_BYTES, Request, Response, Status};
use super::{CtxShared, lock};

/// Parts unanswered on one link at most.
pub const LINK_PARTS_MAX: usize = 1024;
/// Bytes unanswered on one link at most (one part may pass it alone).
pub const LINK_BYTES_MAX: u64 = 16 << 20;
/// Work requests handed to one link and not yet sent, at most: what the
/// link can have unanswered four times over, more than the engine's
/// default queue pairs (2 of 256 work requests per endpoint) of several
/// shards have outstanding towards one peer device. The queue is made at
/// this size (32 bytes a request). A work request that finds it full
/// completes with `RETRY_EXC_ERR` (a link that congested), never waits
/// and is never refused: the post took it, so it completes, exactly once.
pub const LINK_QUEUE_MAX: usize = 4 * LINK_PARTS_MAX;

/// A work request handed to a link: found again by its queue pair and
/// sequence number, so one that was flushed meanwhile is passed over.
#[derive(Clone)]
pub struct Op {
    pub ctx: Weak<CtxShared>,
    pub qpn: u32,
    pub seq: u64,
}

impl Op {
    /// Ends the work request with `status` (if it is still waiting).
    fn finish(&self, status: WcStatus) {
        if let Some(ctx) = self.ctx.upgrade() {
            lock(&ctx.queues).finish(self.qpn, self.seq, status);
        }
    }
}

/// A queue pair's hold on a link: an idle link (no holds) may be closed
/// to make room.
pub struct LinkUse(Arc<Link>);

impl LinkUse {
    pub fn new(link: Arc<Link>) -> LinkUse {
        link.users.fetch_add(1, Ordering::AcqRel);
        LinkUse(link)
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.0
    }
}

impl Drop for LinkUse {
    fn drop(&mut self) {
        self.0.users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A part on the wire, waiting for its answer.
pub struct Part {
    op: Op,
    verb: Verb,
    offset: u64,
    len: u32,
    /// The work request's last part: its answer completes it.
    last: bool,
    tag: u64,
    deadline: Instant,
}

#[derive(Default)]
struct Flight {
    parts: VecDeque<Part>,
    bytes: u64,
    next_tag: u64,
}

/// This device's connection to one peer device.
pub struct Link {
    device: Weak<Device>,
    pub peer: SocketAddr,
    /// Feeds the sender ([`LINK_QUEUE_MAX`] at most); `None` once it ended.
    tx: Mutex<Option<mpsc::SyncSender<Op>>>,
    dead: AtomicBool,
    /// It ended because it had nothing to do, not by a failure: a queue
    /// pair that holds it may connect again.
    idle_closed: AtomicBool,
    /// Queue pairs that hold it ([`LinkUse`]).
    pub users: AtomicUsize,
    flight: Mutex<Flight>,
    room: Condvar,
    /// The connection, to break it from outside.
    stream: Mutex<Option<TcpStream>>,
}

/// What a work request needs on the wire, read under the context's lock.
struct Prepared {
    verb: Verb,
    len: u64,
    remote_addr: u64,
    rkey: u32,
    dst_qp: QpNum,
    path_mtu: u16,
    retry: Duration,
    /// Inline data, or the local memory: the entries, and the guard of
    /// each one's region.
    data: Option<Box<[u8]>>,
    sges: Sges,
    guards: Vec<Arc<RegionGuard>>,
}

/// How a link's thread ends, however it ends (a panic unwinding through
/// it too): the link ends, the work on the wire fails (in the order it
/// was sent), then the work request the thread held, then (the sender's)
/// what was still handed to it. So every work request handed to a link
/// completes exactly once, and none waits for ever on a thread gone.
pub(super) struct Ending<'a> {
    pub(super) link: &'a Link,
    /// The sender's queue, to fail what is left in it.
    pub(super) rx: Option<&'a mpsc::Receiver<Op>>,
    /// The work request taken from the queue (the sender) or from the
    /// wire (the receiver) and not yet ended or on the wire.
    pub(super) carrying: Option<Op>,
    pub(super) why: String,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        let why = if std::thread::panicking() {
            log::error!("emu: a thread of the link to {} panicked: its work fails", self.link.peer);
            "a thread of the link panicked"
        } else {
            self.why.as_str()
        };
        fail_all(self.link.kill(why));
        if let Some(op) = self.carrying.take() {
            op.finish(WcStatus::RetryExcErr);
        }
        if let Some(rx) = self.rx {
            locked(&self.link.tx).take();
            // Nothing can be handed over any more: fail what was.
            while let Ok(op) = rx.try_recv() {
                op.finish(WcStatus::RetryExcErr);
            }
        }
    }
}

impl Link {
    pub fn start(device: &Arc<Device>, peer: SocketAddr) -> Result<Arc<Link>, FabricError> {
        let (tx, rx) = mpsc::sync_channel(LINK_QUEUE_MAX);
        let link = Arc::new(Link {
            device: Arc::downgrade(device),
            peer,
            tx: Mutex::new(Some(tx)),
            dead: AtomicBool::new(false),
            idle_closed: AtomicBool::new(false),
            users: AtomicUsize::new(0),
            flight: Mutex::new(Flight::default()),
            room: Condvar::new(),
            stream: Mutex::new(None),
        });
        let (l, d) = (link.clone(), device.clone());
        spawn(&device.threads, "sw-emu-send", move || l.send_loop(&d, &rx))
            .map_err(|e| FabricError::Call { call: "spawn", why: e.to_string() })?;
        Ok(link)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Parts on the wire now (test support).
    #[cfg(test)]
    pub fn on_the_wire(&self) -> usize {
        locked(&self.flight).parts.len()
    }

    /// Whether it ended for having nothing to do (so nothing it was handed
    /// failed): a queue pair that holds it takes a new link.
    pub fn closed_idle(&self) -> bool {
        self.idle_closed.load(Ordering::Acquire)
    }

    /// Hands a posted work request to the sender; gives it back if the
    /// link has ended or its queue is full ([`LINK_QUEUE_MAX`]).
    pub fn send(&self, op: Op) -> Result<(), Op> {
        let tx = locked(&self.tx);
        let Some(tx) = tx.as_ref().filter(|_| !self.is_dead()) else { return Err(op) };
        tx.try_send(op).map_err(|e| match e {
            mpsc::TrySendError::Full(op) => {
                log::warn!("emu: link to {}: {LINK_QUEUE_MAX} work requests wait already; one fails", self.peer);
                op
            }
            mpsc::TrySendError::Disconnected(op) => op,
        })
    }

    /// Ends the link (once): the connection is broken and the parts it
    /// carried are returned, for the caller to fail (or drop).
    pub fn kill(&self, why: &str) -> Vec<Part> {
        if self.dead.swap(true, Ordering::AcqRel) {
            return Vec::new();
        }
        log::debug!("emu: link to {} ended: {why}", self.peer);
        if let Some(s) = locked(&self.stream).take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let parts: Vec<Part> = {
            let mut f = locked(&self.flight);
            f.bytes = 0;
            f.parts.drain(..).collect()
        };
        self.room.notify_all();
        if let Some(d) = self.device.upgrade() {
            d.forget_link(self);
        }
        parts
    }

    /// Ends the link (once), failing what it carried.
    pub fn end(&self, why: &str) {
        fail_all(self.kill(why));
    }

    /// Closes the link for having nothing to do, unless work was handed to
    /// it meanwhile (returned, to be carried). Under the sender's lock, so
    /// that no post hands it work as it closes: a post finds it closed
    /// ([`Self::closed_idle`]) and takes a new link.
    fn close_idle(&self, rx: &mpsc::Receiver<Op>) -> Option<Op> {
        let mut tx = locked(&self.tx);
        if let Ok(op) = rx.try_recv() {
            return Some(op);
        }
        self.idle_closed.store(true, Ordering::Release);
        tx.take();
        // Nothing is on the wire (the caller looked, and only this thread
        // puts parts there) and nothing waits: nothing to fail. Dead and
        // gone from the device's links before a post can look again.
        let parts = self.kill("idle");
        assert!(parts.is_empty(), "an idle link has nothing on the wire");
        None
    }

    /// The sender thread: carries what is posted until the link ends (or
    /// closes, idle); then [`Ending`] fails what it had.
    fn send_loop(self: &Arc<Self>, device: &Arc<Device>, rx: &mpsc::Receiver<Op>) {
        let mut end = Ending { link: self, rx: Some(rx), carrying: None, why: "closed".into() };
        let mut conn = None;
        let mut out = Vec::new(); // grows to what is queued: FLUSH_BYTES and a frame
        let mut busy = Instant::now(); // when it last had work, or work on the wire
        'run: loop {
            let op = match rx.recv_timeout(TICK) {
                Ok(op) => op,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.is_dead() || device.is_shut() {
                        break;
                    }
                    if !locked(&self.flight).parts.is_empty() {
                        busy = Instant::now();
                        continue;
                    }
                    let quiet = busy.elapsed();
                    if quiet >= SHRINK_AFTER {
                        out.shrink_to(OUT_KEPT_BYTES);
                    }
                    if quiet < device.idle.link {
                        continue;
                    }
                    match self.close_idle(rx) {
                        Some(op) => op,
                        None => break,
                    }
                }
            };
            busy = Instant::now();
            let mut next = Some(op);
            while let Some(op) = next.take() {
                end.carrying = Some(op.clone());
                if let Err(why) = self.carry(device, &op, &mut conn, &mut out) {
                    // Whatever part of it got out or not, it has failed:
                    // `end` fails it, after what is on the wire before it.
                    end.why = why;
                    break 'run;
                }
                end.carrying = None;
                next = rx.try_recv().ok();
            }
            if let Err(e) = flush(&mut conn, &mut out) {
                end.why = e.to_string();
                break;
            }
        }
    }

    /// Sends work request `op`: checked locally, cut into parts, each
    /// recorded as in flight and queued in `out`. An error ends the link
    /// (and the caller fails `op`).
    fn carry(
        self: &Arc<Self>,
        device: &Arc<Device>,
        op: &Op,
        conn: &mut Option<TcpStream>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let Some(prep) = prepare(device, op) else { return Ok(()) };
        if conn.is_none() {
            let s =
                self.connect(device, prep.retry, out).map_err(|e| format!("cannot connect to {}: {e}", self.peer))?;
            *conn = Some(s);
        }
        let max = u64::from(PAYLOAD_BYTES_MAX);
        let parts = prep.len.div_ceil(max).max(1);
        for k in 0..parts {
            let offset = k * max;
            let len = (prep.len - offset).min(max) as u32;
            self.wait_room(len, conn, out)?;
            let tag = locked(&self.flight).next_tag;
            let req = Request {
                verb: prep.verb,
                path_mtu: prep.path_mtu,
                dst_qp: prep.dst_qp,
                src_qp: QpNum(op.qpn),
                rkey: prep.rkey,
                tag,
                remote_addr: prep.remote_addr,
                wr_len: prep.len,
                offset,
                part_len: len,
            };
            let at = out.len();
            out.extend_from_slice(&req.encode());
            if req.carries_data() && !gather(&prep, offset, len, out) {
                // A region went: the work request ended meanwhile (its
                // context closed); if not, it ends here.
                out.truncate(at);
                op.finish(WcStatus::LocProtErr);
                return Ok(());
            }
            let part = Part {
                op: op.clone(),
                verb: prep.verb,
                offset,
                len,
                last: k + 1 == parts,
                tag,
                deadline: Instant::now() + prep.retry,
            };
            {
                let mut f = locked(&self.flight);
                if self.is_dead() {
                    return Err("ended".into());
                }
                f.next_tag += 1;
                f.bytes += u64::from(len);
                f.parts.push_back(part);
            }
            if out.len() >= FLUSH_BYTES {
                flush(conn, out).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Connects (from the device's address, which the hello names), says
    /// hello (queued in `out`) and starts the receiver.
    fn connect(self: &Arc<Self>, device: &Device, timeout: Duration, out: &mut Vec<u8>) -> io::Result<TcpStream> {
        let stream = connect_from(device.addr.ip(), self.peer, timeout)?;
        let _ = stream.set_nodelay(true);
        *locked(&self.stream) = Some(stream.try_clone()?);
        if self.is_dead() {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(io::Error::other("the link ended"));
        }
        let gid = device.gids[1].gid;
        out.extend_from_slice(&Hello { gid, lid: device.addr.port() }.encode());
        let (l, input) = (self.clone(), stream.try_clone()?);
        spawn(&device.threads, "sw-emu-recv", move || {
            let mut end = Ending { link: &l, rx: None, carrying: None, why: "closed".into() };
            if let Err(why) = l.recv_loop(input, &mut end) {
                end.why = why;
            }
        })?;
        Ok(stream)
    }

    /// Waits until a part of `len` bytes may go, writing out what is
    /// queued meanwhile (the answers it waits for may depend on it).
    fn wait_room(&self, len: u32, conn: &mut Option<TcpStream>, out: &mut Vec<u8>) -> Result<(), String> {
        loop {
            {
                let f = locked(&self.flight);
                let fits = f.parts.len() < LINK_PARTS_MAX && f.bytes + u64::from(len) <= LINK_BYTES_MAX;
                if self.is_dead() {
                    return Err("ended".into());
                }
                if fits || f.parts.is_empty() {
                    return Ok(());
                }
                if out.is_empty() {
                    let _ = self.room.wait_timeout(f, TICK).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
            }
            flush(conn, out).map_err(|e| e.to_string())?;
        }
    }

    /// The receiver thread: completes work requests as their answers come.
    /// An error ends the link ([`Ending`], with `end`, which also fails
    /// the work request whose answer was being taken).
    fn recv_loop(&self, mut stream: TcpStream, end: &mut Ending<'_>) -> Result<(), String> {
        stream.set_read_timeout(Some(TICK)).map_err(|e| e.to_string())?;
        let mut input = FrameReader::new(RESPONSE_BYTES + PAYLOAD_BYTES_MAX as usize);
        let (mut heard, mut received_bytes) = (Instant::now(), 0);
        loop {
            if self.is_dead() {
                return Ok(());
            }
            let next = input.next(&mut stream, Response::decode).map_err(|e| e.to_string())?;
            if input.received_bytes() != received_bytes {
                (heard, received_bytes) = (Instant::now(), input.received_bytes());
            }
            let Some((resp, n)) = next else {
                // Idle: has a part waited past its queue pair's retries?
                if let Some(waited) = self.overdue() {
                    return Err(format!("no answer in {} ms", waited.as_millis()));
                }
                if heard.elapsed() >= SHRINK_AFTER {
                    input.shrink();
                }
                continue;
            };
            let part = {
                let mut f = locked(&self.flight);
                match f.parts.front() {
                    Some(p) if p.tag == resp.tag => {}
                    _ => return Err(format!("an answer to no request (tag {})", resp.tag)),
                }
                let p = f.parts.pop_front().expect("looked at above");
                // Off the wire: if this thread ends before it is settled,
                // `end` fails it.
                end.carrying = Some(p.op.clone());
                assert!(f.bytes >= u64::from(p.len), "the bytes in flight count the parts in flight");
                f.bytes -= u64::from(p.len);
                p
            };
            self.room.notify_one();
            let data = &input.frame(n)[RESPONSE_BYTES..];
            let want = if part.verb == Verb::Read && resp.status == Status::Ok { part.len } else { 0 };
            if data.len() != want as usize {
                return Err(format!("an answer of {} bytes to a part of {want}", data.len()));
            }
            settle(&part, resp.status, data);
            end.carrying = None;
            input.consume(n);
        }
    }

    /// How long the oldest part past its deadline has waited, if any.
    fn overdue(&self) -> Option<Duration> {
        let now = Instant::now();
        let f = locked(&self.flight);
        f.parts.iter().find(|p| p.deadline <= now).map(|p| now - p.deadline)
    }
}

/// What work request `op` needs on the wire, or `None` if it has ended
/// (flushed, or failed here: a fault, the port, a local check).
fn prepare(device: &Device, op: &Op) -> Option<Prepared> {
    let ctx = op.ctx.upgrade()?;
    let mut q = lock(&ctx.queues);
    let (qp, p) = q.pending(op.qpn, op.seq)?;
    let (wr, data) = (p.wr, p.data.clone());
    let peer = qp.peer?;
    let retry = Duration::from_nanos(qp.retry_ns);
    let failure = if device.fault_due() || !device.is_up() {
        Some(WcStatus::RetryExcErr)
    } else if data.is_none() {
        wr.sges.iter().find_map(|s| rules::check_local(s, q.local(s.lkey), wr.verb).err())
    } else {
        None
    };
    if let Some(status) = failure {
        q.finish(op.qpn, op.seq, status);
        return None;
    }
    let guards =
        if data.is_some() { Vec::new() } else { wr.sges.iter().map(|s| q.mrs[&s.lkey].guard.clone()).collect() };
    Some(Prepared {
        verb: wr.verb,
        len: wr.len(),
        remote_addr: wr.remote_addr,
        rkey: wr.rkey,
        dst_qp: peer.qp,
        path_mtu: peer.mtu.min(4096) as u16,
        retry,
        data,
        sges: wr.sges,
        guards,
    })
}

/// Appends bytes `[offset, +len)` of a write to `out`; false if a region
/// it reads went meanwhile.
fn gather(prep: &Prepared, offset: u64, len: u32, out: &mut Vec<u8>) -> bool {
    if let Some(data) = &prep.data {
        out.extend_from_slice(&data[offset as usize..offset as usize + len as usize]);
        return true;
    }
    spans(&prep.sges, offset, u64::from(len)).all(|(i, addr, n)| {
        // SAFETY: the entry lies inside its region (checked locally when
        // prepared); the region stays mapped while its guard is held,
        // and the work request keeps it registered until it completes. A
        // raw copy, through no reference: the application and peers may
        // write that memory meanwhile.
        let piece = || unsafe { append_from(out, addr, n) };
        prep.guards[i].with(piece).is_some()
    })
}

/// The answer to `part` came: a read's bytes go into local memory, and
/// the work request ends with its last part or a failure.
fn settle(part: &Part, status: Status, data: &[u8]) {
    match status {
        Status::RemoteAccess => return part.op.finish(WcStatus::RemAccessErr),
        Status::NotConnected => return part.op.finish(WcStatus::RetryExcErr),
        Status::Ok => {}
    }
    if !data.is_empty() {
        let Some(ctx) = part.op.ctx.upgrade() else { return };
        let pieces: Vec<(Arc<RegionGuard>, u64, usize)> = {
            let q = lock(&ctx.queues);
            let Some((_, p)) = q.pending(part.op.qpn, part.op.seq) else { return };
            let Some(guards) =
                p.wr.sges.iter().map(|s| q.mrs.get(&s.lkey).map(|r| r.guard.clone())).collect::<Option<Vec<_>>>()
            else {
                return;
            };
            spans(&p.wr.sges, part.offset, u64::from(part.len))
                .map(|(i, addr, n)| (guards[i].clone(), addr, n))
                .collect()
        };
        let mut at = 0;
        for (guard, addr, n) in pieces {
            // SAFETY: the entry lies inside a region that takes local
            // writes (checked locally before the part was sent), mapped
            // while its guard is held; `data` is this thread's buffer.
            guard.with(|| unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), addr as *mut u8, n) });
            at += n;
        }
    }
    if part.last {
        part.op.finish(WcStatus::Success);
    }
}

/// Fails the work requests of parts a link carried when it ended.
pub fn fail_all(parts: Vec<Part>) {
    for p in parts {
        p.op.finish(WcStatus::RetryExcErr);
    }
}

fn flush(conn: &mut Option<TcpStream>, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let stream = conn.as_mut().ok_or_else(|| io::Error::other("not connected"))?;
    stream.write_all(out)?;
    out.clear();
    Ok(())
}
