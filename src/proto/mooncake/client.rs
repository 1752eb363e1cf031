//! The TCP v2 client connection as a state machine: events in, actions out,
//! no I/O.
//!
//! One [`ClientConn`] is one connection to a peer's data port. The driver
//! (the shards' client, or the caller-thread direct path) feeds it
//! events and carries out what it asks for:
//!
//! ```text
//!   push(req)                 ─┐
//!   on_connected / on_sent(n)  │          ┌─ poll_send()  -> a SendGroup: headers
//!   on_received(n) / on_eof    ├─ core ───┤     and WRITE payloads to send, in order
//!   on_error / on_timer(now)   │          ├─ poll_recv()  -> a RecvGroup: status frames
//!   close(why) / finish(now)  ─┘          │     and READ destinations to fill, in order
//!                                         ├─ is_closing() -> shut the socket, then
//!                                         │     finish() once no operation is out
//!                                         ├─ next_deadline() -> when to call on_timer
//!                                         ├─ poll_watch() -> watch an idle socket for
//!                                         │     the peer's close; report with on_watch
//!                                         └─ poll_settled() -> (request, how it ended)
//! ```
//!
//! The rules it keeps:
//!
//! - **Pipelining.** Requests go out in groups (one scatter list each),
//!   while earlier ones await their answers; the server answers in order,
//!   so answers are matched to requests by position. At most
//!   `awaiting_max` requests and `inflight_bytes_max` payload bytes await
//!   answers at once (at least one request always goes, however large).
//! - **Answers.** Every v2 request gets an 8-byte status frame, a READ then
//!   its bytes. A request settles as soon as its whole answer is in.
//!   A v1 peer sends no status: a WRITE is done once sent, and only one
//!   request is outstanding at a time.
//! - **Rejections.** A non-zero status settles its request as
//!   [`Settle::Rejected`]; the server closes after one, so the connection
//!   closes and the requests behind it (not run) may be re-sent.
//! - **Closes.** However the connection ends (peer gone, error, garbage
//!   where a status belongs, a request past its deadline), nothing settles
//!   until the driver reports every operation back ([`ClientConn::finish`]):
//!   the kernel may still be writing READ destinations until then. Each
//!   request left then settles once: past its deadline as
//!   [`Settle::TimedOut`]; else [`Settle::Retry`] if it has a retry left
//!   and the peer cannot have run it (it was never sent, or the peer
//!   refused one ahead of it); else [`Settle::Failed`]. A request sent on
//!   a connection that then broke is never re-sent: the peer may have run
//!   it, or may yet (from what the old connection still holds), after a
//!   re-sent copy was answered and a newer WRITE to the same addresses
//!   landed.
//! - **Idle connections.** A connection with no answer due has no receive
//!   out, so nothing would notice its peer go: a connection to a peer
//!   that was killed would wait in the driver's table for ever. While it
//!   is idle the core asks the driver to watch the socket for the peer's
//!   close ([`ClientConn::poll_watch`]); a close seen while idle ends the
//!   connection, and what was queued behind it goes again on a fresh one.
//!   A close seen with answers due is left to the receive, which reads
//!   what the peer sent before it (a rejection, say) and then the end.
//! - **Timeouts.** A request still queued past its deadline settles as
//!   timed out on its own; one already sent means the peer went silent,
//!   and the connection is torn down.
//! - **Authentication** (with a key): once connected, the core reads the
//!   server's challenge, sends its proof and checks the verdict
//!   ([`crate::proto::auth`]) before it sends any request, all by the
//!   connect deadline. A failure ends the connection without re-sends (the
//!   same key would fail again). Without a key, a challenge where a status
//!   belongs is named as such.
//! - **A peer that is gone.** Requests to a peer that publishes an
//!   instance number carry its tag ([`ClientConn::with_instance`]); a
//!   process that answers with [`tcp::STATUS_STALE_INSTANCE`] replaced
//!   the one they were addressed to, and a refused connect means nothing
//!   listens there any more. Either way every request left settles as
//!   [`Settle::PeerGone`], never re-sent: their addresses describe a
//!   process that no longer exists.
//! - **CRC-32C** ([`ClientConn::with_crc32c`], to shardwire targets that
//!   advertise it; see [`tcp`]): headers carry their own check, a WRITE's
//!   payload is followed by its CRC-32C, a READ's answer by the CRC-32C
//!   the server computed. A READ whose bytes do not match, or a status
//!   saying a WRITE's did not, settles as [`Settle::Corrupt`], never
//!   retried; the connection goes on. A header the server found corrupted
//!   ends the connection, as a rejection does.
//!
//! Every request pushed leaves through [`ClientConn::poll_settled`] exactly
//! once. The tests below drive the core with scripted bytes, split at every
//! boundary; `fuzzing::tcp_client` feeds it arbitrary peer bytes.

use std::collections::VecDeque;
use std::time::Instant;

use super::tcp::{self, Opcode, RequestHeader};
use crate::proto::auth::{self, Prover};

/// One request: `len` bytes between local memory at `local` and the
/// peer's `remote`. `T` is the driver's handle (its pin and sink), which
/// keeps `[local, local + len)` registered, readable and writable, for as
/// long as the request is in a connection.
#[derive(Debug)]
pub struct Req<T> {
    pub op: Opcode,
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    pub deadline: Instant,
    /// Times the request may still be re-sent on a fresh connection.
    pub retries: u8,
    pub ticket: T,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Its whole answer arrived (or, to a v1 peer, a WRITE was sent).
    Done,
    /// The peer refused it with this status; the reason is the message.
    Rejected { status: u32, message: String },
    /// The connection ended before its answer; re-send it on a fresh one.
    Retry,
    /// The connection ended and it may not be re-sent.
    Failed(String),
    /// Its deadline passed.
    TimedOut(String),
    /// Its bytes arrived (a READ) or landed (a WRITE) but do not match
    /// their CRC-32C; not retried.
    Corrupt(String),
    /// Cancelled before it was sent.
    Canceled,
    /// The process it was addressed to has exited or been replaced by a
    /// new one under its name; it was not re-sent to that one.
    PeerGone(String),
}

/// Bounds on what one connection takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per send or receive group (each takes two scatter entries).
    pub group_reqs_max: usize,
    /// Payload bytes per group (at least one request goes, however large).
    pub group_bytes_max: u64,
    /// Requests sent and not yet answered.
    pub awaiting_max: usize,
    /// Payload bytes sent (or to be received) and not yet answered.
    pub inflight_bytes_max: u64,
    /// Requests queued and not yet sent.
    pub queued_max: usize,
}

/// The scatter lists' limit (the kernel's IOV_MAX is 1024).
pub const PIECES_MAX: usize = 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            group_reqs_max: 256,
            group_bytes_max: 64 << 20,
            awaiting_max: 1024,
            inflight_bytes_max: 64 << 20,
            queued_max: 1 << 16,
        }
    }
}

impl Limits {
    fn check(&self) {
        assert!(self.group_reqs_max >= 1 && self.group_reqs_max <= PIECES_MAX / 2);
        assert!(self.awaiting_max >= 1 && self.queued_max >= 1);
        assert!(self.group_bytes_max >= 1 && self.inflight_bytes_max >= 1);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting {
        deadline: Instant,
    },
    /// Connected; the authentication exchange runs until `deadline`.
    Authenticating {
        deadline: Instant,
    },
    Ready,
    /// Ending: no new groups; settles once the driver calls `finish`.
    Closing,
    Closed,
}

/// Why the connection is ending, and what that means for what is left.
#[derive(Debug, Clone)]
struct Ending {
    why: String,
    /// Which of the requests left may be re-sent on a fresh connection.
    resend: Resend,
    /// The process the requests were addressed to is gone (exited, or
    /// replaced by another under the same name): what is left settles as
    /// [`Settle::PeerGone`], never re-sent.
    gone: bool,
}

/// Which requests of a connection that ended may go again on a fresh one.
///
/// A request may be re-sent only where the peer cannot have run it, and
/// will not run it later: it was never sent, or the peer refused one ahead
/// of it (a server runs nothing after a refusal). One sent on a connection
/// that then broke is not: the peer may have run it, or may yet, from what
/// its kernel (or a middlebox) still holds of the old connection, after the
/// re-sent copy has been answered and a newer WRITE to the same addresses
/// has landed. The soak found exactly that: a WRITE retried on a fresh
/// connection, then overwritten by the caller's next WRITE, and then
/// landing again from the old connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// None of them (the engine closing, a connect or key that failed).
    Nothing,
    /// Those never sent (still queued).
    Unsent,
    /// All of them: the peer refused the one ahead of them and ran none.
    All,
}

/// Where the authentication exchange stands.
#[derive(Debug)]
enum Exchange {
    /// Waiting for the server's challenge.
    Challenge(Prover),
    /// The proof, to be sent.
    Proof(Prover, Box<[u8]>),
    /// The proof is out (or going); waiting for the verdict.
    Verdict(Prover),
}

/// `(address, length)` of local memory a request moves.
type Span = (u64, usize);

/// What one send carries: request headers and WRITE payloads, in order.
#[derive(Debug)]
pub struct SendGroup {
    /// Bytes sent before the requests (the authentication proof).
    preamble: Option<Box<[u8]>>,
    headers: Vec<[u8; tcp::HEADER_BYTES]>,
    /// WRITE payloads' CRC-32Cs (with CRC-32C framing).
    trailers: Vec<[u8; tcp::CRC_BYTES]>,
    /// `(header index, payload, trailer index)` per request: the payload
    /// is the local memory of a WRITE.
    entries: Vec<(usize, Option<Span>, Option<usize>)>,
    total: usize,
    done: usize,
}

impl SendGroup {
    /// The bytes to send, as `(pointer, length)` pieces in order. The
    /// pointers stay valid until the group completes: the headers live in
    /// the group (on the heap), the payloads in the requests' pinned memory.
    pub fn pieces(&self) -> impl Iterator<Item = (*const u8, usize)> + '_ {
        let preamble = self.preamble.iter().map(|b| (b.as_ptr(), b.len()));
        preamble.chain(self.entries.iter().flat_map(move |&(h, payload, trailer)| {
            let header = (self.headers[h].as_ptr(), tcp::HEADER_BYTES);
            std::iter::once(header)
                .chain(payload.map(|(addr, len)| (addr as *const u8, len)))
                .chain(trailer.map(|t| (self.trailers[t].as_ptr(), tcp::CRC_BYTES)))
        }))
    }

    /// Bytes in the whole group.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes of it already sent.
    pub fn done(&self) -> usize {
        self.done
    }
}

/// Where one request's answer lands inside a receive group.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// Offset just past its status frame (its start, to a v1 peer).
    status_end: usize,
    /// Offset just past its whole answer.
    end: usize,
    status_checked: bool,
    /// A READ with CRC-32C framing: its trailer's index, and where its
    /// bytes landed.
    crc: Option<(usize, Span)>,
}

/// What one receive fills: status frames and READ destinations, in order.
#[derive(Debug)]
pub struct RecvGroup {
    /// Bytes received before any answer (the challenge, the verdict); a
    /// group holds these or answers, never both.
    preamble: Option<Box<[u8]>>,
    statuses: Vec<[u8; tcp::STATUS_BYTES]>,
    /// READ payloads' CRC-32Cs as the server sent them.
    trailers: Vec<[u8; tcp::CRC_BYTES]>,
    /// `(status index, READ destination, trailer index)` per request.
    entries: Vec<(Option<usize>, Option<Span>, Option<usize>)>,
    answers: Vec<Answer>,
    /// Answers settled so far (from the front).
    settled: usize,
    total: usize,
    done: usize,
}

impl RecvGroup {
    /// Where to receive, as `(pointer, length)` pieces in order: status
    /// frames in the group (on the heap) and READ destinations in the
    /// requests' pinned memory. Valid until the group completes.
    pub fn pieces(&mut self) -> Vec<(*mut u8, usize)> {
        let mut out = Vec::with_capacity(3 * self.entries.len() + 1);
        if let Some(b) = self.preamble.as_mut() {
            out.push((b.as_mut_ptr(), b.len()));
        }
        for i in 0..self.entries.len() {
            let (status, dest, trailer) = self.entries[i];
            if let Some(s) = status {
                out.push((self.statuses[s].as_mut_ptr(), tcp::STATUS_BYTES));
            }
            if let Some((addr, len)) = dest {
                out.push((addr as *mut u8, len));
            }
            if let Some(t) = trailer {
                out.push((self.trailers[t].as_mut_ptr(), tcp::CRC_BYTES));
            }
        }
        out
    }

    /// Bytes the whole group expects.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes of it received so far.
    pub fn done(&self) -> usize {
        self.done
    }
}

/// One connection's protocol state. See the module documentation.
pub struct ClientConn<T> {
    /// The peer, for messages.
    peer: String,
    v2: bool,
    /// CRC-32C framing (v2 only).
    crc32c: bool,
    limits: Limits,
    phase: Phase,
    /// Requests not yet sent.
    queue: VecDeque<Req<T>>,
    /// The authentication exchange, while it runs (with a key).
    exchange: Option<Exchange>,
    /// Requests sent (or being sent), oldest first, awaiting their answers.
    awaiting: VecDeque<Req<T>>,
    awaiting_bytes: u64,
    send: Option<SendGroup>,
    recv: Option<RecvGroup>,
    ending: Option<Ending>,
    settled: VecDeque<(Req<T>, Settle)>,
    /// No request deadline is earlier than this (it may be stale: the
    /// request it came from may be gone; `on_timer` recomputes it).
    earliest: Option<Instant>,
    /// The driver's watch for the peer's close.
    watch: Watch,
    /// The tag of the peer process requests are addressed to (see
    /// [`tcp`]'s instance tags), if it publishes one.
    instance: Option<u32>,
}

/// Where the driver's idle watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// None out; one is asked for once the connection is idle.
    Idle,
    /// One is out.
    Armed,
    /// The driver cannot watch this connection (its watch failed): never
    /// asked for again, so a failing watch cannot spin.
    Off,
}

impl<T> ClientConn<T> {
    /// A connection being opened to `peer` (a v2 peer if `v2`), which must
    /// be up by `connect_deadline`.
    pub fn new(peer: impl Into<String>, v2: bool, limits: Limits, connect_deadline: Instant) -> Self {
        limits.check();
        Self {
            peer: peer.into(),
            v2,
            crc32c: false,
            limits,
            phase: Phase::Connecting { deadline: connect_deadline },
            queue: VecDeque::new(),
            exchange: None,
            awaiting: VecDeque::new(),
            awaiting_bytes: 0,
            send: None,
            recv: None,
            ending: None,
            settled: VecDeque::new(),
            earliest: None,
            watch: Watch::Idle,
            instance: None,
        }
    }

    /// Tags every request with `tag`, the peer process's (a v2 peer that
    /// publishes one); the peer refuses them if it is another process.
    /// Set before the first request is pushed.
    pub fn with_instance(mut self, tag: Option<u32>) -> Self {
        assert!(tag.is_none() || self.v2, "instance tags need a v2 peer");
        assert!(tag.is_none_or(|t| t <= tcp::INSTANCE_TAG_MASK), "a tag is 24 bits");
        assert!(self.queue.is_empty() && self.awaiting.is_empty(), "set before any request");
        self.instance = tag;
        self
    }

    /// The connection proves `prover`'s key once connected, before any
    /// request goes (a new connection only; one already authenticated
    /// needs nothing).
    pub fn authenticating(mut self, prover: Prover) -> Self {
        assert!(matches!(self.phase, Phase::Connecting { .. }), "authentication is set up before the connect");
        self.exchange = Some(Exchange::Challenge(prover));
        self
    }

    /// Whether the peer speaks v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// Uses CRC-32C framing (`on`) with a v2 peer that advertises it; set
    /// before the first request is pushed.
    pub fn with_crc32c(mut self, on: bool) -> Self {
        assert!(!on || self.v2, "CRC-32C framing needs a v2 peer");
        assert!(self.queue.is_empty() && self.awaiting.is_empty(), "set before any request");
        self.crc32c = on;
        self
    }

    /// Whether requests carry CRC-32Cs.
    pub fn is_crc32c(&self) -> bool {
        self.crc32c
    }

    /// Requests queued or awaiting answers.
    pub fn outstanding(&self) -> usize {
        self.queue.len() + self.awaiting.len()
    }

    /// Whether another request may be queued now.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.limits.queued_max && !self.is_closing()
    }

    /// Queues a request. A closing connection, or a full queue, hands it
    /// back: the driver sends it elsewhere or fails it.
    pub fn push(&mut self, req: Req<T>) -> Result<(), Req<T>> {
        if !self.has_room() {
            return Err(req);
        }
        debug_assert!(req.len > 0, "zero-length requests never reach a connection");
        self.earliest = Some(self.earliest.map_or(req.deadline, |e| e.min(req.deadline)));
        self.queue.push_back(req);
        Ok(())
    }

    /// The connect completed.
    pub fn on_connected(&mut self) {
        if let Phase::Connecting { deadline } = self.phase {
            self.phase = if self.exchange.is_some() { Phase::Authenticating { deadline } } else { Phase::Ready };
        }
    }

    /// The connect failed: nothing was sent, and a re-send would meet the
    /// same refusal, so what is queued fails.
    pub fn on_connect_failed(&mut self, why: impl Into<String>) {
        self.end(format!("connect to {}: {}", self.peer, why.into()), Resend::Nothing);
    }

    /// The connect was refused: nothing listens at the peer's data port,
    /// so the process the requests were addressed to has exited (or
    /// stopped taking connections, which it does only to go away): what is
    /// queued settles as [`Settle::PeerGone`].
    pub fn on_connect_refused(&mut self) {
        let why = format!(
            "connect to {}: refused: nothing listens at that data port any more (the peer process exited)",
            self.peer
        );
        self.end_gone(why);
    }

    /// The next send, if none is out and there is room: take it, send its
    /// pieces, and report with [`on_sent`](Self::on_sent).
    pub fn poll_send(&mut self) -> Option<&SendGroup> {
        if matches!(self.phase, Phase::Authenticating { .. }) {
            if self.send.is_some() || !matches!(self.exchange, Some(Exchange::Proof(..))) {
                return None;
            }
            let Some(Exchange::Proof(prover, proof)) = self.exchange.take() else { unreachable!("matched above") };
            self.exchange = Some(Exchange::Verdict(prover));
            let total = proof.len();
            let (headers, entries) = (Vec::new(), Vec::new());
            let trailers = Vec::new();
            self.send = Some(SendGroup { preamble: Some(proof), headers, trailers, entries, total, done: 0 });
            return self.send.as_ref();
        }
        if self.phase != Phase::Ready || self.send.is_some() || self.queue.is_empty() {
            return None;
        }
        let depth_max = if self.v2 { self.limits.awaiting_max } else { 1 };
        let group_max = if self.v2 { self.limits.group_reqs_max } else { 1 };
        let mut count = 0;
        let mut bytes = 0u64;
        for r in &self.queue {
            if count == group_max || self.awaiting.len() + count >= depth_max {
                break;
            }
            if count > 0 && bytes + r.len > self.limits.group_bytes_max {
                break;
            }
            // At least one request goes, however large; beyond it, the cap.
            if count + self.awaiting.len() > 0 && self.awaiting_bytes + bytes + r.len > self.limits.inflight_bytes_max {
                break;
            }
            count += 1;
            bytes += r.len;
        }
        if count == 0 {
            return None;
        }
        let mut group = SendGroup {
            preamble: None,
            headers: Vec::with_capacity(count),
            trailers: Vec::new(),
            entries: Vec::with_capacity(count),
            total: 0,
            done: 0,
        };
        for _ in 0..count {
            let r = self.queue.pop_front().expect("counted above");
            let header = RequestHeader {
                size: r.len,
                addr: r.remote,
                opcode: r.op,
                v2: self.v2,
                crc32c: self.crc32c,
                instance: self.instance,
            };
            group.headers.push(header.encode());
            group.total += tcp::HEADER_BYTES;
            let payload = (r.op == Opcode::Write).then_some((r.local, r.len as usize));
            group.total += payload.map_or(0, |p| p.1);
            // The trailers are all in place before pieces() points at them.
            let trailer = match payload {
                Some(span) if self.crc32c => {
                    group.trailers.push(local_crc32c(span).to_le_bytes());
                    group.total += tcp::CRC_BYTES;
                    Some(group.trailers.len() - 1)
                }
                _ => None,
            };
            group.entries.push((group.headers.len() - 1, payload, trailer));
            self.awaiting_bytes += r.len;
            // Awaiting from now: its answer may be read before the send
            // is reported complete.
            self.awaiting.push_back(r);
        }
        debug_assert!(self.awaiting.len() <= depth_max.max(1));
        self.send = Some(group);
        self.send.as_ref()
    }

    /// `n` more bytes of the send went out (`n > 0`).
    pub fn on_sent(&mut self, n: usize) {
        let Some(group) = self.send.as_mut() else {
            debug_assert!(false, "on_sent without a send");
            return;
        };
        assert!(n > 0 && group.done + n <= group.total, "sent {n} bytes past the group's {}", group.total);
        group.done += n;
        if group.done < group.total {
            return;
        }
        self.send = None;
        if self.is_closing() {
            return;
        }
        if !self.v2 {
            // v1: a WRITE has no answer; it is done once in the socket.
            while self.awaiting.front().is_some_and(|r| r.op == Opcode::Write) {
                let r = self.pop_awaiting();
                self.settled.push_back((r, Settle::Done));
            }
        }
    }

    /// The next receive, if none is out and answers are due: fill its
    /// pieces, and report with [`on_received`](Self::on_received).
    pub fn poll_recv(&mut self) -> Option<&mut RecvGroup> {
        if matches!(self.phase, Phase::Authenticating { .. }) {
            let len = match self.exchange {
                _ if self.recv.is_some() => return None,
                Some(Exchange::Challenge(_)) => auth::CHALLENGE_BYTES,
                Some(Exchange::Verdict(_)) => auth::VERDICT_BYTES,
                _ => return None,
            };
            self.recv = Some(RecvGroup {
                preamble: Some(vec![0u8; len].into_boxed_slice()),
                statuses: Vec::new(),
                trailers: Vec::new(),
                entries: Vec::new(),
                answers: Vec::new(),
                settled: 0,
                total: len,
                done: 0,
            });
            return self.recv.as_mut();
        }
        if self.phase != Phase::Ready || self.recv.is_some() {
            return None;
        }
        let mut count = 0;
        let mut bytes = 0u64;
        for r in &self.awaiting {
            if count == self.limits.group_reqs_max {
                break;
            }
            let payload = if r.op == Opcode::Read { r.len } else { 0 };
            if count > 0 && bytes + payload > self.limits.group_bytes_max {
                break;
            }
            // A v1 WRITE has no answer.
            if !self.v2 && r.op == Opcode::Write {
                break;
            }
            count += 1;
            bytes += payload;
        }
        if count == 0 {
            return None;
        }
        let reads_crc =
            if self.crc32c { self.awaiting.iter().take(count).filter(|r| r.op == Opcode::Read).count() } else { 0 };
        let mut group = RecvGroup {
            preamble: None,
            statuses: vec![[0u8; tcp::STATUS_BYTES]; if self.v2 { count } else { 0 }],
            trailers: vec![[0u8; tcp::CRC_BYTES]; reads_crc],
            entries: Vec::with_capacity(count),
            answers: Vec::with_capacity(count),
            settled: 0,
            total: 0,
            done: 0,
        };
        let mut trailers = 0;
        for (i, r) in self.awaiting.iter().take(count).enumerate() {
            let status = self.v2.then_some(i);
            let dest = (r.op == Opcode::Read).then_some((r.local, r.len as usize));
            group.total += if self.v2 { tcp::STATUS_BYTES } else { 0 };
            let status_end = group.total;
            group.total += dest.map_or(0, |d| d.1);
            let mut crc = None;
            if let Some(span) = dest
                && self.crc32c
            {
                crc = Some((trailers, span));
                trailers += 1;
                group.total += tcp::CRC_BYTES;
            }
            group.entries.push((status, dest, crc.map(|c| c.0)));
            group.answers.push(Answer { status_end, end: group.total, status_checked: !self.v2, crc });
        }
        debug_assert_eq!(trailers, group.trailers.len());
        self.recv = Some(group);
        self.recv.as_mut()
    }

    /// `n` more bytes of the receive arrived (`n > 0`; an end of stream is
    /// [`on_eof`](Self::on_eof)). Settles every request answered in full.
    pub fn on_received(&mut self, n: usize) {
        let Some(mut group) = self.recv.take() else {
            debug_assert!(false, "on_received without a receive");
            return;
        };
        assert!(n > 0 && group.done + n <= group.total, "received {n} bytes past the group's {}", group.total);
        group.done += n;
        if self.is_closing() {
            // The connection is ending: the bytes are moot, and the group
            // is held until the driver calls finish.
            self.recv = Some(group);
            return;
        }
        if let Some(bytes) = group.preamble.take() {
            if group.done < group.total {
                group.preamble = Some(bytes);
                self.recv = Some(group);
            } else {
                self.on_exchange_bytes(&bytes);
            }
            return;
        }
        while group.settled < group.answers.len() {
            let a = group.answers[group.settled];
            if !a.status_checked && group.done >= a.status_end {
                let raw = &group.statuses[group.settled];
                match tcp::decode_status(raw) {
                    Ok(tcp::STATUS_OK) => group.answers[group.settled].status_checked = true,
                    Ok(tcp::STATUS_PAYLOAD_CHECKSUM)
                        if self.crc32c && self.awaiting.front().is_some_and(|r| r.op == Opcode::Write) =>
                    {
                        // The bytes landed wrong; the framing is intact, so
                        // the connection goes on.
                        let r = self.pop_awaiting();
                        let why = format!(
                            "{} received a WRITE of {} bytes at {:#x} whose bytes do not match their CRC-32C (corrupted on the way)",
                            self.peer, r.len, r.remote
                        );
                        self.settled.push_back((r, Settle::Corrupt(why)));
                        group.settled += 1;
                        continue;
                    }
                    Ok(tcp::STATUS_HEADER_CHECKSUM) if self.crc32c => {
                        let r = self.pop_awaiting();
                        let why = format!(
                            "{} received the header of a {:?} of {} bytes at {:#x} corrupted (its CRC-32C check failed)",
                            self.peer, r.op, r.len, r.remote
                        );
                        self.settled.push_back((r, Settle::Corrupt(why.clone())));
                        group.settled += 1;
                        // The server ends the session: what follows was not
                        // run, and may go again.
                        self.recv = Some(group);
                        self.end(why, Resend::All);
                        return;
                    }
                    Ok(tcp::STATUS_STALE_INSTANCE) if self.instance.is_some() => {
                        // Another process answers at this data port: the
                        // one the requests were addressed to is gone. None
                        // of them may run in this one.
                        let r = self.pop_awaiting();
                        let why = format!(
                            "{} is another process now: the one this {:?} of {} bytes at {:#x} was addressed to has exited and been replaced",
                            self.peer, r.op, r.len, r.remote
                        );
                        self.settled.push_back((r, Settle::PeerGone(why.clone())));
                        group.settled += 1;
                        self.recv = Some(group);
                        self.end_gone(why);
                        return;
                    }
                    Ok(status) => {
                        let r = self.pop_awaiting();
                        let message = format!(
                            "{} rejected a {:?} of {} bytes at {:#x} (status {status}): not inside a buffer it has registered",
                            self.peer, r.op, r.len, r.remote
                        );
                        self.settled.push_back((r, Settle::Rejected { status, message: message.clone() }));
                        group.settled += 1;
                        // The server closes after a rejection; what follows
                        // was not run, and may go again elsewhere.
                        self.recv = Some(group);
                        self.end(message, Resend::All);
                        return;
                    }
                    Err(_) if auth::is_challenge(raw) => {
                        self.recv = Some(group);
                        let why = auth::AuthError::Required;
                        self.end(format!("{}: {why}", self.peer), Resend::Nothing);
                        return;
                    }
                    Err(raw) => {
                        self.recv = Some(group);
                        self.end(
                            format!("{} sent {raw:#018x} where a status frame belongs", self.peer),
                            Resend::Unsent,
                        );
                        return;
                    }
                }
            }
            if group.done < a.end {
                break;
            }
            let r = self.pop_awaiting();
            let how = match a.crc {
                Some((t, span)) => {
                    let carried = u32::from_le_bytes(group.trailers[t]);
                    let actual = local_crc32c(span);
                    if carried == actual {
                        Settle::Done
                    } else {
                        Settle::Corrupt(format!(
                            "the {} bytes read from {:#x} at {} do not match their CRC-32C ({actual:#010x}, sent {carried:#010x}): corrupted on the way",
                            r.len, r.remote, self.peer
                        ))
                    }
                }
                None => Settle::Done,
            };
            self.settled.push_back((r, how));
            group.settled += 1;
        }
        if group.done < group.total {
            self.recv = Some(group);
        } else {
            debug_assert_eq!(group.settled, group.answers.len());
        }
    }

    /// A challenge or a verdict is in whole.
    fn on_exchange_bytes(&mut self, bytes: &[u8]) {
        debug_assert!(matches!(self.phase, Phase::Authenticating { .. }));
        let outcome = match self.exchange.take() {
            Some(Exchange::Challenge(mut prover)) => {
                let challenge = bytes.try_into().expect("a challenge's length");
                prover.answer(challenge).map(|proof| {
                    self.exchange = Some(Exchange::Proof(prover, Box::new(proof)));
                })
            }
            Some(Exchange::Verdict(prover)) => {
                prover.check_verdict(bytes.try_into().expect("a verdict's length")).map(|()| {
                    self.phase = Phase::Ready;
                })
            }
            other => unreachable!("bytes received in the exchange's state {other:?}"),
        };
        if let Err(e) = outcome {
            // No re-send: the same keys would meet the same answer.
            self.end(format!("authentication with {}: {e}", self.peer), Resend::Nothing);
        }
    }

    /// The peer closed its side.
    pub fn on_eof(&mut self) {
        if let Phase::Authenticating { .. } = self.phase {
            // A server that refuses may close before its whole verdict is in.
            let why = match self.exchange {
                Some(Exchange::Challenge(_)) => auth::AuthError::NoChallenge,
                _ => auth::AuthError::Refused,
            };
            return self.end(format!("authentication with {}: {why}", self.peer), Resend::Nothing);
        }
        self.end(format!("{} closed the connection", self.peer), Resend::Unsent);
    }

    /// An operation failed (a send or a receive).
    pub fn on_error(&mut self, why: impl Into<String>) {
        self.end(format!("{}: {}", self.peer, why.into()), Resend::Unsent);
    }

    /// Closes the connection on the driver's behalf (the engine shutting
    /// down): what is left fails, without re-sends.
    pub fn close(&mut self, why: impl Into<String>) {
        self.end(why.into(), Resend::Nothing);
    }

    /// Closes the connection because the peer process it reaches is gone
    /// (the engine learnt that another took its name): what is left
    /// settles as [`Settle::PeerGone`].
    pub fn close_gone(&mut self, why: impl Into<String>) {
        self.end_gone(why.into());
    }

    /// Cancels the queued (not yet sent) requests `which` selects.
    pub fn cancel(&mut self, mut which: impl FnMut(&Req<T>) -> bool) -> usize {
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let mut n = 0;
        for r in self.queue.drain(..) {
            if which(&r) {
                self.settled.push_back((r, Settle::Canceled));
                n += 1;
            } else {
                kept.push_back(r);
            }
        }
        self.queue = kept;
        n
    }

    /// Whether the driver should now watch the socket for the peer's close
    /// (with an op that does not read: a poll for a hang-up). Asked for
    /// once a connection is ready and idle (no answer due) and none is
    /// out; the driver reports it back with [`on_watch`](Self::on_watch).
    /// A driver that cannot watch never calls this (the direct path, which
    /// finds a dead connection when it next uses it).
    pub fn poll_watch(&mut self) -> bool {
        let idle = self.phase == Phase::Ready && self.awaiting.is_empty() && self.recv.is_none();
        if !idle || self.watch != Watch::Idle {
            return false;
        }
        self.watch = Watch::Armed;
        true
    }

    /// The watch came back: `hung_up` if the peer closed or reset the
    /// connection; otherwise it ended without news (cancelled, or the
    /// driver could not run it) and is not asked for again.
    pub fn on_watch(&mut self, hung_up: bool) {
        debug_assert_eq!(self.watch, Watch::Armed, "a watch reported that was not out");
        if !hung_up {
            self.watch = Watch::Off;
            return;
        }
        // A hang-up is level-triggered: a new watch would see it at once.
        // Once the receive has taken the answers in front of it, the
        // connection ends through that receive or through the next watch.
        self.watch = Watch::Idle;
        if self.phase != Phase::Ready || !self.awaiting.is_empty() || self.recv.is_some() {
            // Answers are due and may sit in front of the close: the
            // receive reads them, then meets the end itself.
            return;
        }
        // Nothing was in flight, so what is queued was never sent and
        // may go again on a fresh connection.
        self.end(format!("{} closed the idle connection", self.peer), Resend::Unsent);
    }

    /// When [`on_timer`](Self::on_timer) is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Connecting { deadline } | Phase::Authenticating { deadline } => {
                Some(self.earliest.map_or(deadline, |e| e.min(deadline)))
            }
            Phase::Ready => self.earliest,
            Phase::Closing | Phase::Closed => None,
        }
    }

    /// Time passed: a connect past its deadline fails; queued requests past
    /// theirs time out alone; a sent one past its deadline means the peer
    /// is silent, and the connection is torn down.
    pub fn on_timer(&mut self, now: Instant) {
        if self.is_closing() {
            return;
        }
        if let Phase::Connecting { deadline } = self.phase
            && now >= deadline
        {
            return self.end(format!("connect to {} timed out", self.peer), Resend::Nothing);
        }
        if let Phase::Authenticating { deadline } = self.phase
            && now >= deadline
        {
            let why = match self.exchange {
                Some(Exchange::Challenge(_)) => auth::AuthError::NoChallenge.to_string(),
                _ => "no verdict in time".to_string(),
            };
            return self.end(format!("authentication with {} timed out: {why}", self.peer), Resend::Nothing);
        }
        if self.earliest.is_none_or(|e| now < e) {
            return;
        }
        if self.awaiting.iter().any(|r| r.deadline <= now) {
            return self.end(format!("no answer from {} within the transfer timeout", self.peer), Resend::Unsent);
        }
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for r in self.queue.drain(..) {
            if r.deadline <= now {
                let why = format!("timed out in the queue to {}", self.peer);
                self.settled.push_back((r, Settle::TimedOut(why)));
            } else {
                kept.push_back(r);
            }
        }
        self.queue = kept;
        self.earliest = self.queue.iter().chain(self.awaiting.iter()).map(|r| r.deadline).min();
    }

    /// Whether the connection is ending: the driver shuts its socket (so
    /// operations out come back) and then calls [`finish`](Self::finish).
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Closed)
    }

    /// Whether `finish` has run.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Why the connection is ending, once it is.
    pub fn ending(&self) -> Option<&str> {
        self.ending.as_ref().map(|e| e.why.as_str())
    }

    /// Every operation of a closing connection is back: settle what is
    /// left (see the module documentation).
    pub fn finish(&mut self, now: Instant) {
        if self.phase == Phase::Closed {
            return;
        }
        assert!(self.is_closing(), "finish before the connection ended");
        self.phase = Phase::Closed;
        self.send = None;
        self.recv = None;
        let ending = self.ending.clone().unwrap_or(Ending {
            why: "connection lost".into(),
            resend: Resend::Nothing,
            gone: false,
        });
        // Sent (or being sent) first, then never sent: see `Resend`.
        let sent: Vec<(Req<T>, bool)> = self.awaiting.drain(..).map(|r| (r, true)).collect();
        let unsent = self.queue.drain(..).map(|r| (r, false));
        self.awaiting_bytes = 0;
        for (mut r, was_sent) in sent.into_iter().chain(unsent) {
            let may_resend = match ending.resend {
                Resend::All => true,
                Resend::Unsent => !was_sent,
                Resend::Nothing => false,
            };
            let how = if now >= r.deadline {
                Settle::TimedOut(format!("{} (the transfer timeout passed)", ending.why))
            } else if ending.gone {
                Settle::PeerGone(ending.why.clone())
            } else if may_resend && r.retries > 0 {
                r.retries -= 1;
                Settle::Retry
            } else if was_sent && ending.resend == Resend::Unsent {
                Settle::Failed(format!(
                    "{}; the request had been sent, so it is not sent again (the peer may have run it, or still may)",
                    ending.why
                ))
            } else {
                Settle::Failed(ending.why.clone())
            };
            self.settled.push_back((r, how));
        }
        self.earliest = None;
    }

    /// The next settled request.
    pub fn poll_settled(&mut self) -> Option<(Req<T>, Settle)> {
        self.settled.pop_front()
    }

    fn end(&mut self, why: String, resend: Resend) {
        if self.is_closing() {
            return;
        }
        self.phase = Phase::Closing;
        self.ending = Some(Ending { why, resend, gone: false });
    }

    fn end_gone(&mut self, why: String) {
        if self.is_closing() {
            return;
        }
        self.phase = Phase::Closing;
        self.ending = Some(Ending { why, resend: Resend::Nothing, gone: true });
    }

    fn pop_awaiting(&mut self) -> Req<T> {
        let r = self.awaiting.pop_front().expect("an answer for a request that was sent");
        self.awaiting_bytes -= r.len;
        r
    }
}

/// The CRC-32C of a request's local memory.
fn local_crc32c((addr, len): Span) -> u32 {
    // SAFETY: `span` is a request's `[local, local + len)`, which its ticket
    // keeps registered and readable while the request is in the connection
    // (see `Req`); this runs while it is (a WRITE being grouped, a READ
    // whose bytes have all been received, so the kernel writes no more).
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    tcp::crc32c(bytes)
}

#[cfg(test)]
mod tests;
