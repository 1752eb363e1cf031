//! The TCP v2 server session as a state machine: events in, actions out,
//! no I/O.
//!
//! One [`ServerSession`] is one accepted connection on the data port. The
//! driver feeds it what the socket did and carries out what it asks for:
//!
//! ```text
//!   on_received(n) / on_eof    ─┐         ┌─ poll_recv()  -> where the next receive goes
//!   on_sent(n, now)             ├─ core ──┤─ poll_send()  -> replies to send, coalesced
//!   on_error / on_timer(now)   ─┘         ├─ poll_half_close() -> shut the write side
//!                                         ├─ next_deadline()   -> the drain's end
//!                                         └─ is_closing()      -> shut the socket, then
//!                                               finish() once no operation is out
//! ```
//!
//! The rules it keeps:
//!
//! - **Header intake.** Bytes arrive in a staging buffer, so one receive
//!   takes in a whole run of pipelined requests: READ headers, and small
//!   WRITEs (header and payload), whose payloads are copied from staging
//!   into place. A large payload is received straight into its
//!   destination instead (no copy), with the next header in the same
//!   receive when the payload is not huge. Which of the two the next
//!   receive does adapts to the last WRITE seen: after a large one, only a
//!   header is taken into staging, so large payloads are never staged.
//! - **Range checks.** Every header is checked through the driver's
//!   [`Memory`] before a payload byte is taken: `[addr, addr + size)` must
//!   lie inside one registered region, which stays pinned until the bytes
//!   have landed (a WRITE) or have been sent (a READ).
//! - **Replies**, in request order: a WRITE's status once its payload has
//!   landed, a READ's status and bytes (straight from registered memory).
//!   Replies ready together go out in one send.
//! - **Back-pressure.** Intake pauses while too many replies, or too many
//!   READ bytes, wait to be sent: a client that never reads cannot make
//!   the server queue without bound.
//! - **CRC-32C** (requests flagged for it; see [`tcp`]): a header that
//!   fails its check is refused like a bad range (status 2), and nothing
//!   after it runs. A WRITE's trailer is checked against the bytes as they
//!   landed (through [`Memory::crc32c`]): status 0, or 3 if they differ
//!   (the session goes on). A READ's bytes are followed by their CRC-32C,
//!   computed when the request is taken in.
//! - **Reject, then drain.** A bad header (or range) gets status 1 after the
//!   replies before it, and nothing after it is run, as in Mooncake. Once
//!   that is sent the session half-closes and drains what the client was
//!   still sending (bounded in bytes and time), so the client reads the
//!   status rather than a reset. A v1 client gets no status: the session
//!   just ends.
//! - **Instance tags** ([`ServerSession::with_instance`]): a request
//!   tagged for another process of this segment (the one this process
//!   replaced) is refused with status 4, as a bad range is, before its
//!   range is looked at.
//! - **Authentication** (with a key, [`ServerSession::authenticating`]):
//!   the challenge is the first reply; the client's first 64 bytes must be
//!   a proof of the key, before a single header is looked at. A wrong
//!   proof gets the refusal, then the same half-close and drain as a
//!   rejected request; no proof by the deadline ends the session.
//!
//! The tests below drive it with scripted client bytes split at every
//! boundary; `fuzzing::tcp_server` feeds it arbitrary bytes.

use std::collections::VecDeque;
use std::time::Instant;

use super::tcp::{self, Opcode, RequestHeader};
use crate::proto::auth::{self, Verifier};
use crate::proto::linger::{Linger, LingerLimits};

/// Registered memory as the session sees it: the driver's lookup.
pub trait Memory {
    /// Keeps a region registered while a request uses it.
    type Pin;
    /// Pins the one region holding all of `[addr, addr + len)`, if any.
    fn pin(&self, addr: u64, len: u64) -> Option<Self::Pin>;
    /// Copies `bytes` to `addr`; `[addr, addr + bytes.len())` lies inside
    /// what `pin` holds.
    fn write(&self, pin: &Self::Pin, addr: u64, bytes: &[u8]);
    /// The CRC-32C of `[addr, addr + len)`, which lies inside what `pin`
    /// holds.
    fn crc32c(&self, pin: &Self::Pin, addr: u64, len: u64) -> u32;
}

/// Bounds on one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The staging buffer: the most one receive takes in besides a payload.
    pub staging_bytes: usize,
    /// WRITE payloads up to this size are copied through staging; larger
    /// ones are received in place.
    pub staged_payload_max: u64,
    /// A payload with at most this much left is received together with
    /// what follows it; more is received alone, waiting for all of it.
    pub payload_with_next_max: u64,
    /// The most one receive puts in place (a completion's result is an i32).
    pub piece_bytes_max: u64,
    /// Intake pauses while more replies than this wait to be sent...
    pub replies_queued_max: usize,
    /// ... or while this many READ bytes do.
    pub read_bytes_queued_max: u64,
    /// Replies per send (a READ reply takes two pieces).
    pub replies_per_send_max: usize,
    /// After a rejection: how much of the client's unread bytes to drain,
    /// and for how long.
    pub linger: LingerLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // 256 KiB: a run of about sixty 4 KiB writes per receive (4 KiB
            // writes went from 2.3 to 2.5 GB/s on loopback against 64 KiB).
            // Its pages are touched only as far as receives fill it, so a
            // session moving large payloads (received in place) or reads
            // keeps little of it resident.
            staging_bytes: 256 << 10,
            staged_payload_max: 16 << 10,
            payload_with_next_max: 256 << 10,
            piece_bytes_max: 1 << 30,
            replies_queued_max: 1024,
            read_bytes_queued_max: 256 << 20,
            replies_per_send_max: 512,
            linger: LingerLimits::default(),
        }
    }
}

impl Limits {
    fn check(&self) {
        assert!(self.staging_bytes >= 2 * tcp::HEADER_BYTES);
        assert!(self.staged_payload_max <= self.staging_bytes as u64);
        assert!(self.piece_bytes_max >= 1 && self.piece_bytes_max <= i32::MAX as u64);
        assert!(self.replies_queued_max >= 1 && self.replies_per_send_max >= 1);
        assert!(self.replies_per_send_max <= super::client::PIECES_MAX / 2);
    }
}

/// Where the next receive goes.
#[derive(Debug)]
pub struct RecvPlan {
    /// `(pointer, length)` pieces, filled in order. They stay valid until
    /// the receive is reported: the staging buffer lives in the session
    /// (on the heap), payload destinations in pinned registered memory.
    pub pieces: Vec<(*mut u8, usize)>,
    /// Wait until every piece is full (`MSG_WAITALL`), or take what came.
    pub wait_all: bool,
}

/// What a receive that is out fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvKind {
    /// A payload's next `len` bytes, in place.
    Payload { len: usize },
    /// A payload's last `len` bytes in place, then staging.
    PayloadThenStaging { len: usize },
    /// Staging only.
    Staging,
    /// Bytes drained after a rejection, into staging, to be dropped.
    Drain,
}

/// A reply waiting to be sent.
enum Reply<P> {
    /// A status frame (v2 only).
    Status(u32),
    /// A READ's bytes, after a status frame if v2, and before their
    /// CRC-32C if the request asked for one.
    Read { header: RequestHeader, _pin: P, crc: Option<u32> },
    /// Bytes of the authentication exchange.
    Exchange(Box<[u8]>),
}

/// Replies in one send, and the pins that keep their sources registered.
struct ReplyGroup<P> {
    statuses: Vec<[u8; tcp::STATUS_BYTES]>,
    /// READs' CRC-32Cs (the pieces point into them).
    _trailers: Vec<[u8; tcp::CRC_BYTES]>,
    pieces: Vec<(*const u8, usize)>,
    /// Kept for their pins (and counted once sent).
    _replies: Vec<Reply<P>>,
    total: usize,
    done: usize,
}

/// A WRITE whose payload is coming in.
struct Incoming<P> {
    header: RequestHeader,
    pin: P,
    received: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// The rejection is out; the write side is (to be) shut, and the
    /// client's bytes are read and dropped, for a while.
    Draining(Linger),
    /// Ending: no new operations; the driver calls `finish` once none is out.
    Closing,
    Closed,
}

/// Requests a session has carried out (or refused) since the driver last
/// took the tally: a WRITE counts once its payload has landed, a READ once
/// its bytes are sent, a rejection when it is decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Requests refused (bad header, unregistered range).
    pub rejected: u64,
    /// CRC-32C failures: headers refused for them, and WRITEs whose bytes
    /// landed wrong.
    pub corrupt: u64,
    /// Requests refused because they were addressed to the process this
    /// one replaced (counted among `rejected` too).
    pub stale: u64,
}

impl Served {
    pub fn is_empty(&self) -> bool {
        self.reads == 0 && self.writes == 0 && self.rejected == 0
    }
}

/// One session's protocol state. See the module documentation.
pub struct ServerSession<P> {
    limits: Limits,
    phase: Phase,
    staging: Box<[u8]>,
    /// Bytes of staging not yet taken in: `staging[start..end]`.
    start: usize,
    end: usize,
    /// How much of staging the next receive may fill (adapts to the size
    /// of the WRITEs coming in).
    window: usize,
    incoming: Option<Incoming<P>>,
    replies: VecDeque<Reply<P>>,
    read_bytes_queued: u64,
    send: Option<ReplyGroup<P>>,
    recv: Option<RecvKind>,
    /// A rejection is queued: drain once it is sent (v2), or end (v1).
    rejected: Option<bool>,
    /// The client closed its side.
    peer_eof: bool,
    why: Option<String>,
    served: Served,
    /// The client's proof is awaited, until the deadline.
    proof_awaited: Option<(Verifier, Instant)>,
    /// The tag of this process's instance number: a request tagged for
    /// another is refused ([`tcp::STATUS_STALE_INSTANCE`]).
    instance: Option<u32>,
}

impl<P> ServerSession<P> {
    pub fn new(limits: Limits) -> Self {
        limits.check();
        Self {
            limits,
            phase: Phase::Running,
            staging: vec![0u8; limits.staging_bytes].into_boxed_slice(),
            start: 0,
            end: 0,
            window: limits.staging_bytes,
            incoming: None,
            replies: VecDeque::new(),
            read_bytes_queued: 0,
            send: None,
            recv: None,
            rejected: None,
            peer_eof: false,
            why: None,
            served: Served::default(),
            proof_awaited: None,
            instance: None,
        }
    }

    /// Requests tagged with an instance other than `tag` (this process's)
    /// are refused: they were addressed to the process this one replaced.
    pub fn with_instance(mut self, tag: u32) -> Self {
        assert!(tag <= tcp::INSTANCE_TAG_MASK, "a tag is 24 bits");
        self.instance = Some(tag);
        self
    }

    /// The session opens with the authentication exchange: `verifier`'s
    /// challenge goes first, and the client's proof must be in by
    /// `deadline`.
    pub fn authenticating(mut self, verifier: Verifier, deadline: Instant) -> Self {
        assert!(self.replies.is_empty() && self.end == 0, "authentication is set up before anything happens");
        self.replies.push_back(Reply::Exchange(Box::new(verifier.challenge())));
        self.proof_awaited = Some((verifier, deadline));
        self
    }

    /// What was served since the last call (for the metrics).
    pub fn take_served(&mut self) -> Served {
        std::mem::take(&mut self.served)
    }

    /// Where the next receive goes, if one may go now.
    pub fn poll_recv(&mut self) -> Option<RecvPlan> {
        if self.recv.is_some() {
            return None;
        }
        match self.phase {
            Phase::Draining(_) => {
                self.recv = Some(RecvKind::Drain);
                let pieces = vec![(self.staging.as_mut_ptr(), self.staging.len())];
                return Some(RecvPlan { pieces, wait_all: false });
            }
            Phase::Running => {}
            Phase::Closing | Phase::Closed => return None,
        }
        if self.peer_eof || self.rejected.is_some() || self.backlogged() {
            return None;
        }
        // What is left unparsed moves to the front, so the window fits.
        if self.start > 0 {
            self.staging.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let window = self.window.min(self.staging.len()).max(tcp::HEADER_BYTES);
        let free = window.saturating_sub(self.end);
        let staging = (ptr_at(&mut self.staging, self.end), free);
        let (kind, pieces, wait_all) = match &self.incoming {
            Some(w) => {
                let left = w.header.size - w.received;
                let at = (w.header.addr + w.received) as *mut u8;
                if left > self.limits.payload_with_next_max || free == 0 {
                    let len = left.min(self.limits.piece_bytes_max) as usize;
                    (RecvKind::Payload { len }, vec![(at, len)], true)
                } else {
                    let len = left as usize;
                    (RecvKind::PayloadThenStaging { len }, vec![(at, len), staging], false)
                }
            }
            None if free == 0 => return None,
            None => (RecvKind::Staging, vec![staging], false),
        };
        self.recv = Some(kind);
        Some(RecvPlan { pieces, wait_all })
    }

    /// `n` bytes of the receive arrived (`n > 0`; an end of stream is
    /// [`on_eof`](Self::on_eof)).
    pub fn on_received<M: Memory<Pin = P>>(&mut self, n: usize, memory: &M) {
        let kind = self.recv.take().expect("on_received without a receive");
        assert!(n > 0, "an empty receive is on_eof");
        match kind {
            RecvKind::Drain => {
                if let Phase::Draining(linger) = &mut self.phase {
                    linger.on_drained(n);
                    if let Some(why) = linger.done() {
                        self.end_session(format!("after a rejection: {why}"));
                    }
                }
                return;
            }
            RecvKind::Payload { len } => {
                assert!(n <= len);
                self.payload_landed(n as u64);
            }
            RecvKind::PayloadThenStaging { len } => {
                let into_payload = n.min(len);
                self.payload_landed(into_payload as u64);
                self.end += n - into_payload;
            }
            RecvKind::Staging => self.end += n,
        }
        assert!(self.end <= self.staging.len());
        if self.phase == Phase::Running {
            self.take_in(memory);
        }
    }

    /// The client closed its side: reply to what was taken in (requests
    /// still staged included), then end.
    pub fn on_eof(&mut self) {
        self.recv = None;
        match self.phase {
            Phase::Draining(_) => self.end_session("after a rejection: the client closed"),
            Phase::Running => {
                self.peer_eof = true;
                self.end_if_done();
            }
            Phase::Closing | Phase::Closed => {}
        }
    }

    /// An operation failed: the session ends at once.
    pub fn on_error(&mut self, why: impl Into<String>) {
        self.end_session(why);
    }

    /// Ends the session on the driver's behalf (the engine shutting down).
    pub fn close(&mut self, why: impl Into<String>) {
        self.end_session(why);
    }

    /// The replies to send next, if no send is out: `(pointer, length)`
    /// pieces, valid until the send completes.
    pub fn poll_send(&mut self) -> Option<&[(*const u8, usize)]> {
        if self.send.is_some() || self.replies.is_empty() || self.is_closing() {
            return None;
        }
        let count = self.replies.len().min(self.limits.replies_per_send_max);
        let replies: Vec<Reply<P>> = self.replies.drain(..count).collect();
        let statuses: Vec<[u8; tcp::STATUS_BYTES]> = replies
            .iter()
            .map(|r| match r {
                Reply::Status(code) => tcp::encode_status(*code),
                Reply::Read { .. } | Reply::Exchange(_) => tcp::encode_status(tcp::STATUS_OK),
            })
            .collect();
        // Built whole before any piece points into it.
        let trailers: Vec<[u8; tcp::CRC_BYTES]> = replies
            .iter()
            .filter_map(|r| match r {
                Reply::Read { crc: Some(c), .. } => Some(c.to_le_bytes()),
                _ => None,
            })
            .collect();
        let mut pieces = Vec::with_capacity(3 * count);
        let mut total = 0;
        let mut t = 0;
        for (r, st) in replies.iter().zip(&statuses) {
            match r {
                Reply::Status(_) => pieces.push((st.as_ptr(), tcp::STATUS_BYTES)),
                Reply::Read { header, crc, .. } => {
                    if header.v2 {
                        pieces.push((st.as_ptr(), tcp::STATUS_BYTES));
                    }
                    pieces.push((header.addr as *const u8, header.size as usize));
                    if crc.is_some() {
                        pieces.push((trailers[t].as_ptr(), tcp::CRC_BYTES));
                        t += 1;
                    }
                    self.read_bytes_queued -= header.size;
                }
                // The box's heap bytes do not move when the reply does.
                Reply::Exchange(bytes) => pieces.push((bytes.as_ptr(), bytes.len())),
            }
        }
        debug_assert_eq!(t, trailers.len());
        for p in &pieces {
            total += p.1;
        }
        // The statuses' heap buffer does not move when the Vec does.
        self.send = Some(ReplyGroup { statuses, _trailers: trailers, pieces, _replies: replies, total, done: 0 });
        self.send.as_ref().map(|g| {
            debug_assert_eq!(g.statuses.len(), count);
            g.pieces.as_slice()
        })
    }

    /// `n` more bytes of the replies went out.
    pub fn on_sent<M: Memory<Pin = P>>(&mut self, n: usize, now: Instant, memory: &M) {
        let group = self.send.as_mut().expect("on_sent without a send");
        assert!(n > 0 && group.done + n <= group.total, "sent {n} past the group's {}", group.total);
        group.done += n;
        if group.done < group.total {
            return;
        }
        for r in &group._replies {
            if let Reply::Read { header, .. } = r {
                self.served.reads += 1;
                self.served.read_bytes += header.size;
            }
        }
        self.send = None; // releases the READ pins
        if self.phase != Phase::Running {
            return;
        }
        if self.replies.is_empty()
            && let Some(v2) = self.rejected
        {
            if !v2 {
                return self.end_session("request rejected (v1: no status)");
            }
            if self.peer_eof {
                return self.end_session("request rejected; the client has closed");
            }
            self.phase = Phase::Draining(Linger::new(self.limits.linger, now));
            return;
        }
        // Room again for what waits in staging.
        self.take_in(memory);
        self.end_if_done();
    }

    /// Once, when the rejection is out: the driver shuts the write side.
    pub fn poll_half_close(&mut self) -> bool {
        match &mut self.phase {
            Phase::Draining(linger) => linger.poll_half_close(),
            _ => false,
        }
    }

    /// When [`on_timer`](Self::on_timer) is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Draining(linger) => Some(linger.deadline()),
            Phase::Running => self.proof_awaited.as_ref().map(|(_, deadline)| *deadline),
            _ => None,
        }
    }

    pub fn on_timer(&mut self, now: Instant) {
        if self.phase == Phase::Running && self.proof_awaited.as_ref().is_some_and(|(_, deadline)| now >= *deadline) {
            return self.end_session("no authentication proof from the client in time");
        }
        if let Phase::Draining(linger) = &mut self.phase {
            linger.on_timer(now);
            if let Some(why) = linger.done() {
                self.end_session(format!("after a rejection: {why}"));
            }
        }
    }

    /// Whether the session is ending: the driver shuts its socket and calls
    /// [`finish`](Self::finish) once no operation is out.
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Closed)
    }

    /// Why the session is ending.
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    /// No operation is out: drop every pin and buffer.
    pub fn finish(&mut self) {
        assert!(self.is_closing(), "finish before the session ended");
        self.phase = Phase::Closed;
        self.incoming = None;
        self.replies.clear();
        self.send = None;
        self.recv = None;
        self.read_bytes_queued = 0;
    }

    /// Replies queued or being sent.
    pub fn replies_pending(&self) -> usize {
        self.replies.len() + self.send.as_ref().map_or(0, |g| g.statuses.len())
    }

    fn backlogged(&self) -> bool {
        self.replies.len() >= self.limits.replies_queued_max
            || self.read_bytes_queued >= self.limits.read_bytes_queued_max
    }

    fn end_session(&mut self, why: impl Into<String>) {
        if self.is_closing() {
            return;
        }
        self.phase = Phase::Closing;
        self.why = Some(why.into());
    }

    /// After the client's end of stream: end once nothing more can be taken
    /// in and every reply is out. (A rejection ends the session its own way,
    /// once it is sent.)
    fn end_if_done(&mut self) {
        if !self.peer_eof || self.rejected.is_some() || self.backlogged() {
            return;
        }
        if self.replies.is_empty() && self.send.is_none() {
            // A payload cut short is dropped with its pin: nothing writes
            // it any more.
            self.end_session("the client closed the connection");
        }
    }

    fn payload_landed(&mut self, n: u64) {
        let w = self.incoming.as_mut().expect("payload bytes for a WRITE");
        w.received += n;
        debug_assert!(w.received <= w.header.size);
        // With CRC-32C framing the WRITE is done once its trailer is taken
        // in (`take_in`), and is kept (pinned) until then.
        if w.received == w.header.size && !w.header.crc32c {
            self.served.writes += 1;
            self.served.write_bytes += w.header.size;
            let v2 = w.header.v2;
            self.incoming = None; // unpins: the bytes have landed
            if v2 {
                self.replies.push_back(Reply::Status(tcp::STATUS_OK));
            }
        }
    }

    /// Takes in what staging holds: headers, and the payloads that follow
    /// them, until staging runs dry, a payload must be received in place,
    /// or replies back up.
    fn take_in<M: Memory<Pin = P>>(&mut self, memory: &M) {
        if self.proof_awaited.is_some() && !self.take_proof() {
            return;
        }
        while self.rejected.is_none() && !self.backlogged() {
            if let Some(w) = &self.incoming
                && w.received == w.header.size
            {
                // The payload is in: its CRC-32C trailer is due.
                debug_assert!(w.header.crc32c);
                if self.end - self.start < tcp::CRC_BYTES {
                    return;
                }
                let at = self.start;
                let carried = u32::from_le_bytes(self.staging[at..at + tcp::CRC_BYTES].try_into().expect("4 bytes"));
                self.start += tcp::CRC_BYTES;
                let w = self.incoming.take().expect("checked above");
                let actual = memory.crc32c(&w.pin, w.header.addr, w.header.size);
                self.served.writes += 1;
                self.served.write_bytes += w.header.size;
                let status = if actual == carried {
                    tcp::STATUS_OK
                } else {
                    log::warn!(
                        "data session: a WRITE of {} bytes at {:#x} landed corrupted (CRC-32C {actual:#010x}, sent {carried:#010x})",
                        w.header.size,
                        w.header.addr
                    );
                    self.served.corrupt += 1;
                    tcp::STATUS_PAYLOAD_CHECKSUM
                };
                self.replies.push_back(Reply::Status(status));
                continue; // unpinned: the bytes have landed and been checked
            }
            if let Some(w) = &self.incoming {
                let k = ((w.header.size - w.received) as usize).min(self.end - self.start);
                if k == 0 {
                    return;
                }
                memory.write(&w.pin, w.header.addr + w.received, &self.staging[self.start..self.start + k]);
                self.start += k;
                self.payload_landed(k as u64);
                continue;
            }
            if self.end - self.start < tcp::HEADER_BYTES {
                return;
            }
            let bytes: &[u8; tcp::HEADER_BYTES] =
                self.staging[self.start..self.start + tcp::HEADER_BYTES].try_into().expect("24 bytes");
            let decoded = RequestHeader::decode(bytes);
            self.start += tcp::HEADER_BYTES;
            let h = match decoded {
                Ok(h) => h,
                Err((partial, why @ tcp::HeaderError::HeaderChecksum { .. })) => {
                    self.served.corrupt += 1;
                    return self.reject(partial.v2, tcp::STATUS_HEADER_CHECKSUM, &why.to_string());
                }
                Err((partial, why)) => return self.reject(partial.v2, tcp::STATUS_REJECTED, &why.to_string()),
            };
            if let (Some(theirs), Some(ours)) = (h.instance, self.instance)
                && theirs != ours
            {
                // Checked before the range: the addresses describe another
                // process's memory, whatever this one has registered there.
                self.served.stale += 1;
                let why = format!("a request for instance {theirs:#08x} of this segment; this is {ours:#08x}");
                return self.reject(h.v2, tcp::STATUS_STALE_INSTANCE, &why);
            }
            let Some(pin) = memory.pin(h.addr, h.size) else {
                return self.reject(h.v2, tcp::STATUS_REJECTED, "address range is not inside one registered buffer");
            };
            match h.opcode {
                Opcode::Write => {
                    // Large payloads are received in place: after one, take
                    // in only a header at a time, so none is staged.
                    // (With CRC-32C framing, the payload's trailer comes
                    // with the next header.)
                    let trailer = if h.crc32c { tcp::CRC_BYTES } else { 0 };
                    self.window = if h.size > self.limits.staged_payload_max {
                        tcp::HEADER_BYTES + trailer
                    } else {
                        self.staging.len()
                    };
                    self.incoming = Some(Incoming { header: h, pin, received: 0 });
                }
                Opcode::Read => {
                    self.window = self.staging.len();
                    self.read_bytes_queued += h.size;
                    let crc = h.crc32c.then(|| memory.crc32c(&pin, h.addr, h.size));
                    self.replies.push_back(Reply::Read { header: h, _pin: pin, crc });
                }
            }
        }
    }

    /// Checks the client's proof once staging holds it; whether requests
    /// may be taken in now.
    fn take_proof(&mut self) -> bool {
        if self.end - self.start < auth::PROOF_BYTES {
            return false;
        }
        let (verifier, _) = self.proof_awaited.take().expect("a proof is awaited");
        let proof: &[u8; auth::PROOF_BYTES] =
            self.staging[self.start..self.start + auth::PROOF_BYTES].try_into().expect("sized above");
        self.start += auth::PROOF_BYTES;
        match verifier.check(proof) {
            Ok(verdict) => {
                self.replies.push_back(Reply::Exchange(Box::new(verdict)));
                true
            }
            Err((e, refusal)) => {
                log::warn!("data session: refused a client: {e}");
                self.replies.push_back(Reply::Exchange(Box::new(refusal)));
                // As a rejected request: the refusal, a half-close, a
                // drain; nothing the client sent is looked at.
                self.rejected = Some(true);
                false
            }
        }
    }

    /// Refuses the request just taken in: `status` (v2) after the replies
    /// queued before it; nothing after it runs.
    fn reject(&mut self, v2: bool, status: u32, why: &str) {
        log::debug!("data session: rejecting a request: {why}");
        // Whatever staging still holds is never looked at again (a receive
        // may be filling it, so it stays as it is).
        self.rejected = Some(v2);
        self.served.rejected += 1;
        if v2 {
            self.replies.push_back(Reply::Status(status));
        } else if self.replies.is_empty() && self.send.is_none() {
            self.end_session("request rejected (v1: no status)");
        }
    }
}

/// A pointer `at` bytes into `buf` (at most one past its end).
fn ptr_at(buf: &mut [u8], at: usize) -> *mut u8 {
    assert!(at <= buf.len());
    buf[at..].as_mut_ptr()
}

#[cfg(test)]
mod tests;
