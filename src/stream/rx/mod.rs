//! The receiving side: an HTTP listener whose shards take object streams
//! and hand each object to the handler registered for its trname.
//!
//! - The listener accepts on shard 0 and deals each connection to the shard
//!   that processes its packets. That shard does all of the connection's
//!   I/O on its ring: receives go straight into the connection's
//!   [`Pipe`](super::pipe::Pipe) and writes the responses (`shard.rs`, a
//!   thin driver). What a head means, which ones are refused with a 4xx,
//!   and how a connection ends are the sans-IO core's (`conn.rs`).
//! - A body is decoded by the connection's own thread (`worker.rs`), which
//!   calls the handler once per object with a reader bounded to that
//!   object. Handlers may block (write a file, say) without stalling the
//!   shard; a slow handler slows its own sender through TCP, as in AIStore.

pub(crate) mod conn;
mod shard;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

pub use worker::ObjReader;

use super::stats::{RxCounters, RxStats};
use crate::config::{Placement, Settings};
use crate::proto::objstream::{ChecksumError, ObjHdr, SbrError};
use crate::runtime::Runtime;

/// Bytes of a connection's receive pipe by default (small, so received
/// bytes are still in cache when the handler reads them).
pub const PIPE_BYTES: usize = 256 << 10;
/// Unregistered names remembered, so late streams get a precise answer.
const CLOSED_NAMES_MAX: usize = 32;

/// What the receiver reports to a handler, and to the sender in the 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvError {
    /// The stream's bytes are not a stream (AIStore's `ErrSBR` codes).
    Broken(SbrError),
    /// The connection ended inside the body.
    PeerClosed(String),
    /// A handler refused an object.
    Handler(String),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Broken(e) => write!(f, "{e}"),
            RecvError::PeerClosed(why) => write!(f, "the connection ended inside the stream: {why}"),
            RecvError::Handler(why) => write!(f, "handler error: {why}"),
        }
    }
}

impl std::error::Error for RecvError {}

/// What a handler returns for an object it refuses; the stream then ends
/// with a 400 carrying the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError(pub String);

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError(e.to_string())
    }
}

/// The session a handler call belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub trname: String,
    /// `Ais-Caller-Id`.
    pub caller: String,
    /// `Ais-Session-Id`.
    pub id: i64,
    pub peer: SocketAddr,
}

/// Receives the objects of one trname.
pub trait RecvHandler: Send + Sync + 'static {
    /// One object. Whatever the handler leaves unread is drained after it
    /// returns. An error ends the stream.
    fn object(&self, session: &Session, hdr: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError>;

    /// The stream broke (every breakage is reported, typed, once).
    fn error(&self, _session: &Session, _err: &RecvError) {}

    /// An object's bytes do not match its header's checksum (or its
    /// checksum cannot be verified): the object failed, the stream goes on.
    /// Called after [`object`](Self::object) returned, whether or not its
    /// reads reached the object's end (the read that does fails with the
    /// same error). The object is not counted as received.
    fn bad_checksum(&self, _session: &Session, _hdr: &ObjHdr, _err: &ChecksumError) {}
}

impl<F> RecvHandler for F
where
    F: Fn(&ObjHdr, &mut ObjReader<'_>) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn object(&self, _session: &Session, hdr: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError> {
        self(hdr, body)
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    #[error("trname {0:?} is already handled")]
    Duplicate(String),
    #[error("trname {0:?} is not handled")]
    Unknown(String),
    #[error("trname must be a non-empty path segment, not {0:?}")]
    BadName(String),
}

/// Receiver options.
#[derive(Debug, Clone)]
pub struct RxOptions {
    /// Read and discard every object without calling handlers
    /// (`AIS_STREAM_DRY_RUN`).
    pub dry_run: bool,
    /// Largest object header accepted (AIStore grows to 128 KiB).
    pub max_header: usize,
    /// Bytes of each connection's receive pipe.
    pub pipe_bytes: usize,
    /// Most connections at once; more are refused with 503.
    pub connections_max: usize,
    /// A connection whose bytes neither arrive nor get read for this long
    /// is closed (an idle keep-alive connection, a sender stalled
    /// mid-stream, or a handler stuck on one object). Keep it above the
    /// senders' idle teardown.
    pub idle_timeout: std::time::Duration,
    /// The most one receive asks for (`SHARDWIRE_STREAM_RECV`).
    pub recv_bytes: usize,
    /// Which shard serves an accepted stream (`SHARDWIRE_STREAM_PLACEMENT`).
    pub placement: Placement,
    /// Pin each decoding thread to its shard's core (`SHARDWIRE_STREAM_PIN`).
    pub pin_workers: bool,
    /// Verify each object's bytes against the checksum its header carries
    /// (AIStore's types; on by default). The decoding thread hashes the
    /// bytes as they pass, so nothing is buffered.
    pub verify_checksums: bool,
}

impl Default for RxOptions {
    /// The built-in defaults with the environment applied (a bad value
    /// there fails `Receiver::bind`, not this).
    fn default() -> Self {
        Self::from_settings(&Settings::from_env().unwrap_or_default())
    }
}

impl RxOptions {
    pub fn from_settings(s: &Settings) -> Self {
        RxOptions {
            dry_run: s.stream_dry_run,
            max_header: crate::proto::objstream::header::MAX_HEADER_BYTES,
            pipe_bytes: s.stream_pipe_bytes,
            connections_max: 1024,
            idle_timeout: std::time::Duration::from_secs(120),
            recv_bytes: s.stream_recv_bytes,
            placement: s.stream_placement,
            pin_workers: s.stream_pin,
            verify_checksums: true,
        }
    }
}

/// A live session's counters, for [`Receiver::stats`].
struct SessionEntry {
    trname: String,
    caller: String,
    id: i64,
    counters: Arc<RxCounters>,
}

/// State shared by the handle, the shards and the decoding threads.
pub(crate) struct RxShared {
    /// The receiver's id on the shards.
    pub(crate) id: AtomicU64,
    handlers: RwLock<HashMap<String, Arc<dyn RecvHandler>>>,
    closed_names: Mutex<VecDeque<String>>,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    next_session: AtomicU64,
    pub(crate) options: RxOptions,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) connections: AtomicU64,
    closed: AtomicBool,
    /// False once the receiver stopped taking connections.
    pub(crate) accepting: AtomicBool,
    /// Objects and bytes of sessions that ended, per trname.
    totals: Mutex<HashMap<String, (i64, i64)>>,
}

impl RxShared {
    pub(crate) fn handler(&self, trname: &str) -> Result<Arc<dyn RecvHandler>, String> {
        if let Some(h) = self.handlers.read().expect("handlers lock").get(trname) {
            return Ok(h.clone());
        }
        if self.closed_names.lock().expect("names lock").iter().any(|n| n == trname) {
            return Err(format!("trname {trname:?} was closed"));
        }
        Err(format!("unknown trname {trname:?}"))
    }

    pub(crate) fn open_session(&self, trname: &str, caller: &str, id: i64) -> (u64, Arc<RxCounters>) {
        let key = self.next_session.fetch_add(1, Ordering::Relaxed);
        let counters = Arc::new(RxCounters::default());
        let entry = SessionEntry { trname: trname.into(), caller: caller.into(), id, counters: counters.clone() };
        self.sessions.lock().expect("sessions lock").insert(key, entry);
        (key, counters)
    }

    pub(crate) fn close_session(&self, key: u64) {
        if let Some(e) = self.sessions.lock().expect("sessions lock").remove(&key) {
            let mut totals = self.totals.lock().expect("totals lock");
            let t = totals.entry(e.trname).or_default();
            t.0 += e.counters.num.load(Ordering::Relaxed);
            t.1 += e.counters.size.load(Ordering::Relaxed);
        }
    }
}

fn check_name(trname: &str) -> Result<(), RegError> {
    if trname.is_empty() || trname.contains('/') || trname.len() > 256 {
        return Err(RegError::BadName(trname.into()));
    }
    Ok(())
}

/// Per-endpoint receive statistics (the seed's `GetNetworkStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStats {
    /// Live sessions.
    pub sessions: Vec<RxStats>,
    /// Objects and bytes received on this endpoint, ended sessions included.
    pub total_num: i64,
    pub total_size: i64,
}

/// A listening receiver.
pub struct Receiver {
    shared: Arc<RxShared>,
    listener: Arc<TcpListener>,
    addr: SocketAddr,
}

impl Receiver {
    /// Listens on `addr` (port 0 picks one) with the process's shard
    /// runtime.
    pub fn bind(addr: SocketAddr, options: RxOptions) -> std::io::Result<Receiver> {
        let runtime = crate::runtime::shared::shared_runtime().map_err(|e| std::io::Error::other(e.to_string()))?;
        Self::start(runtime, addr, options)
    }

    /// Listens on `addr` with `handlers` registered before the first
    /// connection is taken, so no early stream meets an unknown trname.
    pub fn bind_with(
        addr: SocketAddr,
        options: RxOptions,
        handlers: Vec<(String, Arc<dyn RecvHandler>)>,
    ) -> std::io::Result<Receiver> {
        let runtime = crate::runtime::shared::shared_runtime().map_err(|e| std::io::Error::other(e.to_string()))?;
        Self::start_with(runtime, addr, options, handlers)
    }

    /// Listens on `addr` on the given runtime's shards.
    pub fn start(runtime: Arc<Runtime>, addr: SocketAddr, options: RxOptions) -> std::io::Result<Receiver> {
        Self::start_with(runtime, addr, options, Vec::new())
    }

    /// [`start`](Self::start), with handlers registered first.
    pub fn start_with(
        runtime: Arc<Runtime>,
        addr: SocketAddr,
        options: RxOptions,
        handlers: Vec<(String, Arc<dyn RecvHandler>)>,
    ) -> std::io::Result<Receiver> {
        // A bad environment value stops the receiver here, named.
        Settings::from_env().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        for (name, _) in &handlers {
            check_name(name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        }
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let shared = Arc::new(RxShared {
            id: AtomicU64::new(0),
            handlers: RwLock::new(handlers.into_iter().collect()),
            closed_names: Mutex::new(VecDeque::new()),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            options,
            runtime: runtime.clone(),
            connections: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
            totals: Mutex::new(HashMap::new()),
        });
        shard::install(&shared, &listener)?;
        Ok(Receiver { shared, listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL prefix senders use: `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers `handler` for `trname`.
    pub fn handle(&self, trname: &str, handler: impl RecvHandler) -> Result<(), RegError> {
        self.handle_arc(trname, Arc::new(handler))
    }

    pub fn handle_arc(&self, trname: &str, handler: Arc<dyn RecvHandler>) -> Result<(), RegError> {
        check_name(trname)?;
        let mut map = self.shared.handlers.write().expect("handlers lock");
        if map.contains_key(trname) {
            return Err(RegError::Duplicate(trname.into()));
        }
        map.insert(trname.into(), handler);
        self.shared.closed_names.lock().expect("names lock").retain(|n| n != trname);
        Ok(())
    }

    /// Unregisters `trname`; streams already running keep their handler
    /// until they end, new ones are refused.
    pub fn unhandle(&self, trname: &str) -> Result<(), RegError> {
        if self.shared.handlers.write().expect("handlers lock").remove(trname).is_none() {
            return Err(RegError::Unknown(trname.into()));
        }
        let mut closed = self.shared.closed_names.lock().expect("names lock");
        if closed.len() == CLOSED_NAMES_MAX {
            closed.pop_front();
        }
        closed.push_back(trname.into());
        Ok(())
    }

    /// Statistics per endpoint (trname).
    pub fn stats(&self) -> std::collections::BTreeMap<String, EndpointStats> {
        let mut out: std::collections::BTreeMap<String, EndpointStats> = Default::default();
        for (name, (n, s)) in self.shared.totals.lock().expect("totals lock").iter() {
            let e = out.entry(name.clone()).or_default();
            e.total_num += n;
            e.total_size += s;
        }
        for e in self.shared.sessions.lock().expect("sessions lock").values() {
            let snap = e.counters.snapshot(&e.caller, e.id);
            let ep = out.entry(e.trname.clone()).or_default();
            ep.total_num += snap.num;
            ep.total_size += snap.size;
            ep.sessions.push(snap);
        }
        out
    }

    /// Connections open now.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Takes no new connections (a draining node); the ones open go on
    /// until [`Receiver::close`]. New senders are refused with a reset.
    pub fn stop_accepting(&self) {
        shard::stop_accepting(&self.shared, &self.listener);
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        if self.shared.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        shard::uninstall(&self.shared, &self.listener);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.close();
    }
}
