//! The sending side: [`Stream`], one sender-to-receiver flow of objects.
//!
//! `send` queues an object (header and body) and returns; the stream's
//! shard frames queued objects into HTTP chunks of one long PUT and sends
//! them. Every object gets exactly one completion, in the order sent: when
//! its last byte was handed to the kernel, or with the error that stopped
//! it. The PUT opens on the first object (lazy connect), ends after
//! `idle_teardown` without traffic, and a later object opens a new one with
//! the same session id. `fin` ends the stream gracefully; `stop` aborts it.
//!
//! Back-pressure: at most `burst` objects may be queued or in flight; past
//! that, `send` blocks until completions make room. A [`Body::Reader`] is
//! read by the thread that calls `send`, into chunks of 256 KiB, at most
//! 4 MiB of them waiting per stream: `send` returns once the reader is
//! read, and a reader that blocks holds up only its own thread and stream.
//!
//! The rules live in a sans-IO core (`conn.rs`); `shard.rs` drives it.

pub(crate) mod batch;
pub(crate) mod conn;
mod shard;

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use batch::Body;
use batch::{Chunk, Payload, Streamed};

use super::stats::{Stats, TxCounters};
use crate::config::Settings;
use crate::proto::objstream::checksum::{self, CksumType};
use crate::proto::objstream::header::{MAX_HEADER_BYTES, OPC_FIN};
use crate::proto::objstream::lz4::BlockSize;
use crate::proto::objstream::{ObjHdr, frame::MAX_PDU_PAYLOAD};
use crate::runtime::Runtime;

/// AIStore's default burst (`transport.burst_buffer`, v5.0).
pub const BURST_DEFAULT: usize = 1024;
/// The most a burst may be (AIStore's upper bound).
pub const BURST_MAX: usize = 4096;
/// AIStore's default idle teardown.
pub const IDLE_TEARDOWN_DEFAULT: Duration = Duration::from_secs(4);

/// Session ids start above 100, as AIStore's do (the first stream gets 101).
static NEXT_SESSION: AtomicI64 = AtomicI64::new(101);
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// Why a stream or an object failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The stream was stopped (`stop`).
    Stopped,
    /// The stream ended with `fin`; nothing more can be sent.
    Finished,
    /// Could not connect, or the connection failed.
    Network(String),
    /// The receiver answered with an error status.
    Rejected { status: u16, message: String },
    /// This object cannot be sent (bad header, body and size disagree, the
    /// reader failed).
    Object(String),
    /// The stream was terminated earlier for this reason.
    Terminated(Box<StreamError>),
    /// An environment variable has a value it does not accept.
    Config(String),
    /// The stream cannot be made as asked (a URL that is not `http://`, a
    /// bad trname, a PDU size out of range).
    InvalidArgument(String),
}

impl StreamError {
    /// A stable word for the kind of error, for tools (the CLI's JSON
    /// errors): `stopped`, `finished`, `network`, `rejected`, `object`,
    /// `config` or `invalid_argument`; an earlier termination gives its
    /// cause's.
    pub fn code(&self) -> &'static str {
        match self {
            StreamError::Stopped => "stopped",
            StreamError::Finished => "finished",
            StreamError::Network(_) => "network",
            StreamError::Rejected { .. } => "rejected",
            StreamError::Object(_) => "object",
            StreamError::Terminated(e) => e.code(),
            StreamError::Config(_) => "config",
            StreamError::InvalidArgument(_) => "invalid_argument",
        }
    }
}

/// What a receiver's error answer says: the `message` of AIStore's JSON
/// error body (`{"message": ..., "status": ..., "type_code": ...}`), or the
/// body's text as it is.
fn receiver_reason(body: &str) -> String {
    let body = body.trim();
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(body)
        && let Some(serde_json::Value::String(m)) = o.get("message")
    {
        return m.clone();
    }
    if body.is_empty() { "it gave no reason".to_string() } else { body.to_string() }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Stopped => f.write_str("the stream was stopped"),
            StreamError::Finished => f.write_str("the stream has ended (end-of-stream)"),
            StreamError::Network(e) => write!(f, "network error: {e}"),
            StreamError::Rejected { status, message } => {
                write!(f, "the receiver refused the stream (HTTP {status}): {}", receiver_reason(message))
            }
            StreamError::Object(e) => write!(f, "object error: {e}"),
            StreamError::Terminated(e) => write!(f, "stream terminated: {e}"),
            StreamError::Config(e) => write!(f, "configuration: {e}"),
            StreamError::InvalidArgument(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StreamError {}

/// A completion: the object's header and its outcome.
pub type SentCallback = Arc<dyn Fn(&ObjHdr, Result<(), &StreamError>) + Send + Sync>;
/// A one-object completion, overriding the stream's.
pub type ObjCallback = Box<dyn FnOnce(&ObjHdr, Result<(), &StreamError>) + Send>;

/// Stream options (AIStore's `Extra`).
#[derive(Clone)]
pub struct StreamOptions {
    /// Objects that may be queued or in flight before `send` blocks
    /// (`AIS_STREAM_BURST_NUM`, default 1024).
    pub burst: usize,
    /// The PUT ends after this long without objects.
    pub idle_teardown: Duration,
    /// LZ4-compress the body, with this block size.
    pub compression: Option<BlockSize>,
    /// PDU payload size for PDU streams (needed for unsized objects).
    pub pdu_size: Option<usize>,
    /// Largest object header this stream sends (4 KiB, as AIStore).
    pub max_header: usize,
    /// `Ais-Caller-Id`.
    pub caller_id: String,
    /// The stream-wide completion callback.
    pub on_sent: Option<SentCallback>,
    /// Connecting gives up after this long.
    pub connect_timeout: Duration,
    /// A send that does not complete in this long breaks the stream, and
    /// so does a receiver that does not answer an ended body in this long.
    pub send_timeout: Duration,
    /// Object bytes per send once enough objects are in
    /// (`SHARDWIRE_STREAM_BATCH`), and the most one send carries
    /// (`SHARDWIRE_STREAM_BATCH_MAX`).
    pub batch_bytes: usize,
    pub batch_bytes_max: usize,
    /// The socket's send buffer (`SHARDWIRE_STREAM_SNDBUF`; 0 leaves it to
    /// the kernel); `None`: half the in-flight cap to a peer on this host,
    /// the kernel's choice to others.
    pub sndbuf: Option<usize>,
    /// Put this checksum in the header of every object sent from memory
    /// ([`Body::Bytes`], [`Body::Empty`]) whose header carries none; it is
    /// computed by the thread that calls `send`. The header goes out before
    /// the body, so a [`Body::Reader`]'s object keeps the checksum its
    /// header carries (compute one with [`checksum::compute_hex`] or
    /// [`checksum::Hasher`] when the bytes can be read twice), as AIStore's
    /// senders put the stored checksum of an object in its header.
    pub checksum: Option<CksumType>,
}

impl Default for StreamOptions {
    /// The built-in defaults with the environment applied (a bad value
    /// there fails `Stream::new`, not this).
    fn default() -> Self {
        Self::from_settings(&Settings::from_env().unwrap_or_default())
    }
}

impl StreamOptions {
    pub fn from_settings(s: &Settings) -> Self {
        StreamOptions {
            burst: s.stream_burst.clamp(1, BURST_MAX),
            idle_teardown: IDLE_TEARDOWN_DEFAULT,
            compression: None,
            pdu_size: None,
            max_header: 4096,
            caller_id: String::new(),
            on_sent: None,
            connect_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            batch_bytes: s.stream_batch_bytes,
            batch_bytes_max: s.stream_batch_bytes_max,
            sndbuf: s.stream_sndbuf,
            checksum: None,
        }
    }
}

impl fmt::Debug for StreamOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamOptions")
            .field("burst", &self.burst)
            .field("idle_teardown", &self.idle_teardown)
            .field("compression", &self.compression)
            .field("pdu_size", &self.pdu_size)
            .field("max_header", &self.max_header)
            .field("caller_id", &self.caller_id)
            .field("checksum", &self.checksum)
            .finish_non_exhaustive()
    }
}

/// An object waiting to be sent, or being sent.
pub(crate) struct Outgoing {
    pub hdr: ObjHdr,
    pub body: Payload,
    pub cb: Option<ObjCallback>,
    /// The header is on the wire.
    pub started: bool,
    /// Body bytes framed so far.
    pub sent: u64,
    /// Framing failed before any of it went out: it completes with this
    /// once the objects ahead of it have.
    pub failed: Option<StreamError>,
}

/// How the stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// `fin` completed: every object was sent and the receiver said 200.
    EndOfStream,
    Stopped,
    Error(StreamError),
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::EndOfStream => {
                f.write_str("ended normally: the receiver answered the end of the stream with 200")
            }
            Termination::Stopped => f.write_str("stopped"),
            Termination::Error(e) => write!(f, "failed: {e}"),
        }
    }
}

/// State shared by the handle and the shard.
pub(crate) struct TxShared {
    pub id: u64,
    pub session: i64,
    pub runtime: Arc<Runtime>,
    pub shard: usize,
    pub addr: std::net::SocketAddr,
    pub host: String,
    pub path: String,
    /// The receiver's endpoint (the metrics count per trname).
    pub trname: String,
    pub options: StreamOptions,
    /// Objects queued or in flight.
    outstanding: Mutex<usize>,
    room: Condvar,
    /// Bytes read from readers and not yet sent (the sending threads wait
    /// while this is at [`STREAMED_BYTES_MAX`]).
    streamed: Mutex<usize>,
    streamed_room: Condvar,
    /// Numbers streamed objects, so their chunks find them.
    next_seq: AtomicU64,
    pub counters: Mutex<TxCounters>,
    term: Mutex<Option<Termination>>,
    termed: Condvar,
}

/// Bytes of one stream read from readers and waiting to be sent, at most.
pub const STREAMED_BYTES_MAX: usize = 4 << 20;

impl TxShared {
    /// Waits (up to the send timeout) until `n` more streamed bytes fit.
    fn take_streamed(&self, n: usize) -> Result<(), StreamError> {
        let deadline = Instant::now() + self.options.send_timeout;
        let mut held = self.streamed.lock().expect("streamed lock");
        while *held > 0 && *held + n > STREAMED_BYTES_MAX {
            if let Some(t) = self.termination() {
                return Err(StreamError::Terminated(Box::new(term_error(t))));
            }
            let now = Instant::now();
            if now >= deadline {
                let e = format!("the stream took no bytes for {:?}", self.options.send_timeout);
                return Err(StreamError::Network(e));
            }
            held = self
                .streamed_room
                .wait_timeout(held, (deadline - now).min(Duration::from_millis(100)))
                .expect("streamed lock")
                .0;
        }
        *held += n;
        Ok(())
    }

    /// `n` streamed bytes left the shard.
    pub(crate) fn release_streamed(&self, n: usize) {
        let mut held = self.streamed.lock().expect("streamed lock");
        *held = held.saturating_sub(n);
        self.streamed_room.notify_all();
    }

    /// Frees one burst slot.
    pub(crate) fn release(&self, n: usize) {
        let mut o = self.outstanding.lock().expect("burst lock");
        *o = o.saturating_sub(n);
        self.room.notify_all();
    }

    pub(crate) fn terminate(&self, t: Termination) {
        let mut term = self.term.lock().expect("term lock");
        if term.is_none() {
            *term = Some(t);
        }
        self.termed.notify_all();
        self.room.notify_all();
        self.streamed_room.notify_all();
    }

    pub(crate) fn termination(&self) -> Option<Termination> {
        self.term.lock().expect("term lock").clone()
    }
}

/// A stream to one receiver endpoint. Dropping a stream that has not
/// terminated stops it (its queued objects complete with `Stopped`); call
/// [`fin`](Stream::fin) first to deliver them.
pub struct Stream {
    shared: Arc<TxShared>,
}

impl Stream {
    /// A stream to `url` (`http://host:port`, the receiver's base URL) for
    /// `trname`, on the process's shard runtime. Nothing connects until
    /// the first object.
    pub fn new(url: &str, trname: &str, options: StreamOptions) -> Result<Stream, StreamError> {
        let rt = crate::runtime::shared::shared_runtime().map_err(|e| StreamError::Network(e.to_string()))?;
        Self::with_runtime(rt, url, trname, options)
    }

    /// As [`new`](Self::new), on the given runtime.
    pub fn with_runtime(
        rt: Arc<Runtime>,
        url: &str,
        trname: &str,
        mut options: StreamOptions,
    ) -> Result<Stream, StreamError> {
        // A bad environment value stops the stream here, named.
        Settings::from_env().map_err(|e| StreamError::Config(e.to_string()))?;
        let invalid = |e: String| Err(StreamError::InvalidArgument(e));
        let Some(rest) = url.strip_prefix("http://") else {
            return invalid(format!("{url:?} is not a receiver URL: give http://HOST:PORT"));
        };
        let host = rest.trim_end_matches('/').to_string();
        if host.contains('/') {
            return invalid(format!("{url:?} has a path: give the receiver's base URL, http://HOST:PORT"));
        }
        if options.caller_id.contains(['\r', '\n']) || host.contains(['\r', '\n', ' ']) {
            return invalid("the caller id and the host must not hold spaces or line breaks".into());
        }
        use std::net::ToSocketAddrs;
        let addr = host
            .to_socket_addrs()
            .map_err(|e| StreamError::Network(format!("cannot resolve {host:?}: {e}")))?
            .next()
            .ok_or_else(|| StreamError::Network(format!("{host:?} resolves to no address")))?;
        if trname.is_empty() || trname.contains(['/', ' ', '\r', '\n']) {
            return invalid(format!("trname {trname:?} is not valid: give a non-empty name without '/' or spaces"));
        }
        if let Some(p) = options.pdu_size
            && (p == 0 || p > MAX_PDU_PAYLOAD)
        {
            return invalid(format!("PDU size {p} is outside 1..={MAX_PDU_PAYLOAD} bytes"));
        }
        options.burst = options.burst.clamp(1, BURST_MAX);
        options.max_header = options.max_header.clamp(512, MAX_HEADER_BYTES);
        let id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let shard = (id as usize) % rt.shard_count();
        let shared = Arc::new(TxShared {
            id,
            session: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            runtime: rt,
            shard,
            addr,
            host,
            path: format!("/v1/objstream/{trname}"),
            trname: trname.to_string(),
            options,
            outstanding: Mutex::new(0),
            room: Condvar::new(),
            streamed: Mutex::new(0),
            streamed_room: Condvar::new(),
            next_seq: AtomicU64::new(1),
            counters: Mutex::new(TxCounters::new(Instant::now())),
            term: Mutex::new(None),
            termed: Condvar::new(),
        });
        Ok(Stream { shared })
    }

    /// The session id every PUT of this stream carries.
    pub fn session_id(&self) -> i64 {
        self.shared.session
    }

    /// Queues an object; its completion goes to the stream's callback.
    pub fn send(&self, hdr: ObjHdr, body: impl Into<Body>) -> Result<(), StreamError> {
        self.send_obj(hdr, body.into(), None)
    }

    /// Queues an object with a callback of its own (the stream's is then
    /// not called for it).
    pub fn send_with(
        &self,
        hdr: ObjHdr,
        body: impl Into<Body>,
        cb: impl FnOnce(&ObjHdr, Result<(), &StreamError>) + Send + 'static,
    ) -> Result<(), StreamError> {
        self.send_obj(hdr, body.into(), Some(Box::new(cb)))
    }

    fn send_obj(&self, mut hdr: ObjHdr, body: Body, cb: Option<ObjCallback>) -> Result<(), StreamError> {
        let s = &self.shared;
        let reject = |hdr: ObjHdr, cb: Option<ObjCallback>, e: StreamError| {
            complete(s, &hdr, cb, Err(&e));
            Err(e)
        };
        if let Some(t) = s.termination() {
            return reject(hdr, cb, StreamError::Terminated(Box::new(term_error(t))));
        }
        if hdr.opcode >= OPC_FIN {
            let e = StreamError::Object(format!("opcode {} is reserved", hdr.opcode));
            return reject(hdr, cb, e);
        }
        if hdr.is_unsized() && s.options.pdu_size.is_none() {
            return reject(hdr, cb, StreamError::Object("an unsized object needs a PDU stream".into()));
        }
        if hdr.attrs.size < -1 {
            let e = StreamError::Object(format!("size {}", hdr.attrs.size));
            return reject(hdr, cb, e);
        }
        if let Body::Bytes(b) = &body
            && hdr.attrs.size >= 0
            && (b.len() as u64) < hdr.attrs.size as u64
        {
            let e = format!("{}: {} bytes given, {} declared", hdr.name, b.len(), hdr.attrs.size);
            return reject(hdr, cb, StreamError::Object(e));
        }
        if let Some(ty) = s.options.checksum {
            add_checksum(&mut hdr, &body, ty);
        }
        // Back-pressure: wait for room in the burst, as long as a send may
        // take (a stream that moves nothing for that long is broken).
        {
            let mut deadline = None;
            let mut o = s.outstanding.lock().expect("burst lock");
            while *o >= s.options.burst {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + s.options.send_timeout);
                if s.termination().is_some() {
                    drop(o);
                    let t = s.termination().expect("checked");
                    return reject(hdr, cb, StreamError::Terminated(Box::new(term_error(t))));
                }
                let now = Instant::now();
                if now >= deadline {
                    drop(o);
                    let e = format!("{} objects stayed in flight for {:?}", s.options.burst, s.options.send_timeout);
                    return reject(hdr, cb, StreamError::Network(e));
                }
                o = s.room.wait_timeout(o, (deadline - now).min(Duration::from_millis(100))).expect("burst lock").0;
            }
            *o += 1;
        }
        let size = hdr.attrs.size;
        let (payload, reader) = match body {
            Body::Empty => (Payload::Empty, None),
            Body::Bytes(b) => (Payload::Bytes(b), None),
            Body::Reader(r) => {
                let seq = s.next_seq.fetch_add(1, Ordering::Relaxed);
                (Payload::Streamed(Streamed::new(seq)), Some((seq, r)))
            }
        };
        let obj = Outgoing { hdr, body: payload, cb, started: false, sent: 0, failed: None };
        let shared = s.clone();
        if let Err(e) = s.runtime.submit(s.shard, move |ctx| shard::enqueue(ctx, &shared, obj)) {
            return Err(self.runtime_gone(e, true));
        }
        // A reader is read here, on the sending thread, into bounded
        // chunks: a slow or blocked reader holds up this thread and this
        // object (and those behind it on this stream), never the shard.
        if let Some((seq, mut reader)) = reader {
            let mut failed = None;
            batch::read_chunks(reader.as_mut(), size, |chunk| {
                if let Chunk::Data(d) = &chunk
                    && let Err(e) = s.take_streamed(d.len())
                {
                    failed = Some(e);
                    return false;
                }
                let shared = s.clone();
                match s.runtime.submit(s.shard, move |ctx| shard::chunk(ctx, &shared, seq, chunk)) {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(self.runtime_gone(e, false));
                        false
                    }
                }
            });
            if let Some(e) = failed {
                // The object is failed on the shard with the stream.
                let shared = s.clone();
                let why = e.to_string();
                let _ = s.runtime.submit(s.shard, move |ctx| shard::chunk(ctx, &shared, seq, Chunk::Failed(why)));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The runtime refused work: the stream cannot go on. `object`: what
    /// was refused held an object, whose burst slot is freed here (it was
    /// dropped without a completion).
    fn runtime_gone(&self, e: crate::runtime::SubmitError, object: bool) -> StreamError {
        if object {
            self.shared.release(1);
        }
        let err = StreamError::Network(format!("the runtime is gone: {e}"));
        self.shared.terminate(Termination::Error(err.clone()));
        err
    }

    /// Ends the stream gracefully: queued objects go out, then the
    /// end-of-stream frame; waits for the receiver's answer. Returns how
    /// the stream ended.
    pub fn fin(&self) -> Termination {
        let s = self.shared.clone();
        if s.termination().is_none() {
            let shared = s.clone();
            if s.runtime.submit(s.shard, move |ctx| shard::fin(ctx, &shared)).is_err() {
                s.terminate(Termination::Error(StreamError::Network("the runtime is gone".into())));
            }
        }
        self.wait()
    }

    /// Aborts: what is queued or in flight completes with `Stopped`.
    pub fn stop(&self) {
        let s = self.shared.clone();
        let shared = s.clone();
        if s.runtime.submit(s.shard, move |ctx| shard::stop(ctx, &shared)).is_err() {
            s.terminate(Termination::Stopped);
        }
    }

    /// Waits until the stream has terminated.
    pub fn wait(&self) -> Termination {
        let mut t = self.shared.term.lock().expect("term lock");
        loop {
            if let Some(t) = t.clone() {
                return t;
            }
            t = self.shared.termed.wait(t).expect("term lock");
        }
    }

    /// How the stream ended, if it has.
    pub fn term_info(&self) -> Option<Termination> {
        self.shared.termination()
    }

    pub fn is_terminated(&self) -> bool {
        self.shared.termination().is_some()
    }

    /// The stream's figures; idle and total durations cover the time since
    /// the previous call.
    pub fn stats(&self) -> Stats {
        self.shared.counters.lock().expect("stats lock").read(Instant::now())
    }

    /// Objects queued or in flight.
    pub fn outstanding(&self) -> usize {
        *self.shared.outstanding.lock().expect("burst lock")
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.shared.host, self.shared.path)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.shared.termination().is_none() {
            self.stop();
        }
    }
}

/// Puts `ty`'s checksum of an in-memory body into a header that has none
/// (AIStore's `NoneC`: an empty or `none` type, or an empty value).
fn add_checksum(hdr: &mut ObjHdr, body: &Body, ty: CksumType) {
    let a = &hdr.attrs;
    if !(a.cksum_type.is_empty() || a.cksum_type == "none" || a.cksum_value.is_empty()) {
        return;
    }
    let bytes: &[u8] = match body {
        // Only `size` bytes go (an unsized object sends them all).
        Body::Bytes(b) if a.size >= 0 => &b[..(a.size as usize).min(b.len())],
        Body::Bytes(b) => b,
        Body::Empty if a.size == 0 => &[],
        Body::Empty | Body::Reader(_) => return,
    };
    let value = checksum::compute_hex(ty, bytes);
    hdr.attrs.cksum_type = ty.as_str().to_string();
    hdr.attrs.cksum_value = value;
}

fn term_error(t: Termination) -> StreamError {
    match t {
        Termination::EndOfStream => StreamError::Finished,
        Termination::Stopped => StreamError::Stopped,
        Termination::Error(e) => e,
    }
}

/// Runs an object's completion: its own callback, else the stream's.
/// A callback that panics is logged and skipped: the completions after it
/// still run, and the stream's bookkeeping (burst slots, the queue) stays
/// whole.
pub(crate) fn complete(s: &TxShared, hdr: &ObjHdr, cb: Option<ObjCallback>, result: Result<(), &StreamError>) {
    let run = std::panic::AssertUnwindSafe(|| match cb {
        Some(cb) => cb(hdr, result),
        None => {
            if let Some(cb) = &s.options.on_sent {
                cb(hdr, result);
            }
        }
    });
    if let Err(p) = std::panic::catch_unwind(run) {
        let why = crate::runtime::task::panic_message(p.as_ref());
        log::error!("stream {}: the completion callback of {} panicked: {why}", s.id, hdr.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_options_are_checked_up_front() {
        let rt = Arc::new(Runtime::start(crate::runtime::RuntimeConfig::new(1)).unwrap());
        let bad = |url: &str, tr: &str, o: StreamOptions| Stream::with_runtime(rt.clone(), url, tr, o).err();
        let invalid = |e: Option<StreamError>| matches!(e, Some(StreamError::InvalidArgument(_)));
        assert!(invalid(bad("https://127.0.0.1:1", "t", StreamOptions::default())));
        assert!(invalid(bad("http://127.0.0.1:1/v1/objstream", "t", StreamOptions::default())));
        assert!(invalid(bad("http://127.0.0.1:1", "a/b", StreamOptions::default())));
        let pdu = StreamOptions { pdu_size: Some(200 << 10), ..StreamOptions::default() };
        assert!(invalid(bad("http://127.0.0.1:1", "t", pdu)));
        // Lazy: nothing listens on port 1, yet the stream is made; the
        // failure comes with the first object, as its completion.
        let s = Stream::with_runtime(rt.clone(), "http://127.0.0.1:1", "t", StreamOptions::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        s.send_with(ObjHdr::new("b", "o", 1), vec![1u8], move |_, r| tx.send(r.err().cloned()).unwrap()).unwrap();
        let err = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(err, Some(StreamError::Network(ref m)) if m.contains("connect")), "{err:?}");
        assert!(matches!(s.wait(), Termination::Error(StreamError::Network(_))));
        rt.shutdown();
    }
    #[test]
    fn errors_read_as_sentences_with_a_code() {
        // AIStore's JSON error body is reduced to its message.
        let body = r#"{"message":"unknown trname \"x\"","status":400,"type_code":"ErrHTTP"}"#;
        let e = StreamError::Rejected { status: 400, message: body.into() };
        assert_eq!(e.to_string(), r#"the receiver refused the stream (HTTP 400): unknown trname "x""#);
        assert_eq!(e.code(), "rejected");
        // Any other body is said as it is; an empty one is named.
        let e = StreamError::Rejected { status: 503, message: " too many connections\n".into() };
        assert_eq!(e.to_string(), "the receiver refused the stream (HTTP 503): too many connections");
        let e = StreamError::Rejected { status: 500, message: String::new() };
        assert_eq!(e.to_string(), "the receiver refused the stream (HTTP 500): it gave no reason");
        // An earlier termination gives its cause's code.
        let e = StreamError::Terminated(Box::new(StreamError::Network("connect: refused".into())));
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            ("network", "stream terminated: network error: connect: refused")
        );
        let t = Termination::Error(StreamError::Stopped);
        assert_eq!(t.to_string(), "failed: the stream was stopped");
        for e in [StreamError::Finished, StreamError::Object("x".into()), StreamError::InvalidArgument("y".into())] {
            assert!(!e.to_string().contains('{') && !e.to_string().contains("Error("), "{e}");
        }
    }
}
