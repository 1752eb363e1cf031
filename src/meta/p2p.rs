//! Mooncake's P2P handshake: the RPC port's server and client.
//!
//! The server answers Metadata, Notify, Probe and Connection frames, one
//! request per connection, each connection on its own thread (at most
//! [`CONNECTIONS_MAX`] at once), so a slow or silent client delays nobody
//! else. Mooncake serves them one at a time from a single thread.
//!
//! With an authentication key, every connection opens with the exchange of
//! [`crate::proto::auth`] (the server's challenge first) before any frame;
//! a client that fails it is closed without a byte of the segment.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{TeError, TeResult, code};
use crate::proto::auth::{self, AuthError, AuthKey, Port, Prover, Verifier};
use crate::proto::mooncake::frame::{self, FrameType};
use crate::proto::mooncake::message::{self, HandshakeDesc, NotifyDesc, ProbeReply, SegmentDesc};
use crate::proto::mooncake::name;

/// Most RPC connections served at once; more are closed at accept.
pub const CONNECTIONS_MAX: usize = 64;
/// How long the server waits for a request, and for the client to close.
pub const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused client may keep sending before the server closes.
const REFUSAL_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Mooncake's default port for a name without one (`MC_HANDSHAKE_PORT`).
pub const HANDSHAKE_PORT_DEFAULT: u16 = 12001;

/// What the RPC server asks its engine.
pub trait RpcHandler: Send + Sync + 'static {
    /// This engine's segment descriptor.
    fn metadata(&self) -> SegmentDesc;
    /// A notification arrived.
    fn notify(&self, note: NotifyDesc);
    /// An RDMA connection request; a TCP-only engine rejects it.
    fn connection(&self, request: HandshakeDesc) -> HandshakeDesc;
}

/// The running RPC server.
pub struct RpcServer {
    listener: Arc<TcpListener>,
    port: u16,
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Serves `listener` until stopped; with `auth`, only to clients that
    /// prove the key.
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn RpcHandler>,
        max_frame: u64,
        auth: Option<AuthKey>,
    ) -> io::Result<Self> {
        let port = listener.local_addr()?.port();
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let (l, s, a) = (listener.clone(), stop.clone(), active.clone());
        let acceptor = std::thread::Builder::new()
            .name("shardwire-rpc".into())
            .spawn(move || accept_loop(&l, &s, &a, &handler, max_frame, auth.as_ref()))?;
        Ok(Self { listener, port, stop, active, acceptor: Some(acceptor) })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Stops accepting and waits (a bounded time) for requests in progress.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Shutting a listening socket down wakes the blocked accept.
        // SAFETY: plain syscall on our own listener.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + SERVER_IO_TIMEOUT * 2;
        while self.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    active: &Arc<AtomicUsize>,
    handler: &Arc<dyn RpcHandler>,
    max_frame: u64,
    auth: Option<&AuthKey>,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                log::warn!("rpc accept: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(200));
                continue;
            }
        };
        backoff = Duration::from_millis(1);
        if active.fetch_add(1, Ordering::AcqRel) >= CONNECTIONS_MAX {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("rpc: {CONNECTIONS_MAX} connections in progress; refusing one");
            continue;
        }
        let (h, a, key) = (handler.clone(), active.clone(), auth.cloned());
        let spawned = std::thread::Builder::new().name("shardwire-rpc-conn".into()).spawn(move || {
            if let Err(e) = serve(stream, h.as_ref(), max_frame, key) {
                log::debug!("rpc request: {e}");
            }
            a.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves one request on one connection.
fn serve(mut stream: TcpStream, handler: &dyn RpcHandler, max_frame: u64, auth: Option<AuthKey>) -> io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    if let Some(key) = auth {
        let verifier = Verifier::new(key, Port::Rpc, crate::entropy::bytes());
        stream.write_all(&verifier.challenge())?;
        let mut proof = [0u8; auth::PROOF_BYTES];
        stream.read_exact(&mut proof)?;
        match verifier.check(&proof) {
            Ok(verdict) => stream.write_all(&verdict)?,
            Err((e, verdict)) => {
                // The refusal, then a half-close and a short drain of what
                // the client still sends (never looked at), so that it reads
                // the refusal rather than a reset.
                let peer = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                log::warn!("rpc: refused {peer}: {e}");
                let _ = stream.write_all(&verdict);
                let _ = stream.shutdown(Shutdown::Write);
                let _ = stream.set_read_timeout(Some(REFUSAL_DRAIN_TIMEOUT));
                drain(&mut stream);
                return Err(invalid_data(e));
            }
        }
    }
    let body = read_frame(&mut stream, max_frame)?;
    let request = frame::decode_body(&body);
    let reply_body = match request.kind {
        FrameType::Metadata => message::to_wire(&handler.metadata()),
        FrameType::Probe => message::to_wire(&ProbeReply { status: "success".into() }),
        FrameType::Notify => {
            let note: NotifyDesc = message::from_wire(&request.body).map_err(invalid_data)?;
            handler.notify(note);
            message::to_wire(&message::notify_ack())
        }
        FrameType::Connection => {
            let desc: HandshakeDesc = message::from_wire(&request.body).map_err(invalid_data)?;
            message::to_wire(&handler.connection(desc))
        }
    };
    let reply = if request.legacy {
        let mut out = (reply_body.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&reply_body);
        out
    } else {
        frame::encode(request.kind, &reply_body)
    };
    stream.write_all(&reply)?;
    // As Mooncake's server does: half-close, then let the client close.
    stream.shutdown(Shutdown::Write)?;
    drain(&mut stream);
    Ok(())
}

/// Reads and drops what the client still sends, until it closes, at most
/// 64 KiB (each read bounded by the stream's read timeout).
fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 256];
    let mut drained = 0;
    while drained < 64 << 10 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one frame's length prefix and the bytes it announces.
fn read_frame(stream: &mut TcpStream, max_frame: u64) -> io::Result<Vec<u8>> {
    read_frame_after(stream, None, max_frame)
}

/// As [`read_frame`], with the length prefix already read if `prefix`.
fn read_frame_after(
    stream: &mut TcpStream,
    prefix: Option<[u8; frame::LEN_BYTES]>,
    max_frame: u64,
) -> io::Result<Vec<u8>> {
    let prefix = match prefix {
        Some(p) => p,
        None => {
            let mut p = [0u8; frame::LEN_BYTES];
            stream.read_exact(&mut p)?;
            p
        }
    };
    let len = frame::body_len(&prefix, max_frame).map_err(invalid_data)?;
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body)?;
    Ok(body)
}

/// Timeouts for a client call, and the key it proves when the peers
/// require one.
#[derive(Debug, Clone)]
pub struct CallOptions {
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    pub max_frame: u64,
    pub auth: Option<AuthKey>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            max_frame: frame::MAX_LEN_DEFAULT,
            auth: None,
        }
    }
}

/// Resolves a `host[:port]` name to socket addresses.
pub fn resolve(target: &str, default_port: u16) -> TeResult<Vec<SocketAddr>> {
    let hp = name::parse(target).map_err(TeError::invalid)?;
    let port = hp.port.unwrap_or(default_port);
    let addrs: Vec<SocketAddr> = (hp.host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| TeError::new(code::DNS, format!("cannot resolve {}: {e}", hp.host)))?
        .collect();
    if addrs.is_empty() {
        return Err(TeError::new(code::DNS, format!("{} resolves to no address", hp.host)));
    }
    Ok(addrs)
}

/// Sends one request frame to `target` and returns the reply's body.
pub fn call(target: &str, kind: FrameType, body: &[u8], opts: &CallOptions) -> TeResult<Vec<u8>> {
    match exchange(target, kind, body, opts)? {
        Reply::Frame(body) => Ok(body),
        Reply::AuthRequired => Err(auth_error(target, AuthError::Required)),
    }
}

/// What a call got back.
enum Reply {
    Frame(Vec<u8>),
    /// The peer opened with a challenge, and this process has no key.
    AuthRequired,
}

fn auth_error(target: &str, e: AuthError) -> TeError {
    TeError::new(code::REJECT_HANDSHAKE, format!("rpc to {target}: {e}"))
}

/// Proves the key to the server, and checks its proof in turn.
fn authenticate(stream: &mut TcpStream, target: &str, key: &AuthKey) -> TeResult<()> {
    let mut prover = Prover::new(key.clone(), Port::Rpc, crate::entropy::bytes());
    let mut challenge = [0u8; auth::CHALLENGE_BYTES];
    // A peer without a key waits for our frame: we read nothing until our
    // timeout, or its close.
    stream.read_exact(&mut challenge).map_err(|e| auth_error(target, no_challenge(e)))?;
    let proof = prover.answer(&challenge).map_err(|e| auth_error(target, e))?;
    stream.write_all(&proof).map_err(|e| TeError::new(code::SOCKET, format!("rpc to {target}: {e}")))?;
    let mut verdict = [0u8; auth::VERDICT_BYTES];
    // A server that refuses may close before the whole verdict is read.
    stream.read_exact(&mut verdict).map_err(|_| auth_error(target, AuthError::Refused))?;
    prover.check_verdict(&verdict).map_err(|e| auth_error(target, e))
}

fn no_challenge(e: io::Error) -> AuthError {
    log::debug!("waiting for an authentication challenge: {e}");
    AuthError::NoChallenge
}

fn exchange(target: &str, kind: FrameType, body: &[u8], opts: &CallOptions) -> TeResult<Reply> {
    let addrs = resolve(target, HANDSHAKE_PORT_DEFAULT)?;
    let mut last = None;
    let mut stream = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, opts.connect_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            // The address only when the name is not already it.
            Err(e) if addr.to_string() == target => last = Some(e.to_string()),
            Err(e) => last = Some(format!("{addr}: {e}")),
        }
    }
    let mut stream = stream
        .ok_or_else(|| TeError::new(code::SOCKET, format!("cannot reach {target}: {}", last.unwrap_or_default())))?;
    let io = |e: io::Error| TeError::new(code::SOCKET, format!("rpc to {target}: {e}"));
    stream.set_read_timeout(Some(opts.io_timeout)).map_err(io)?;
    stream.set_write_timeout(Some(opts.io_timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    crate::liveness::Liveness::for_timeout(opts.io_timeout).apply_or_log(&stream, "an RPC connection");
    if let Some(key) = &opts.auth {
        authenticate(&mut stream, target, key)?;
    }
    // Without a key, a server that requires one sends its challenge where
    // our reply's length belongs; the write may already meet its close.
    let written = stream.write_all(&frame::encode(kind, body));
    let mut prefix = [0u8; frame::LEN_BYTES];
    let read = stream.read_exact(&mut prefix);
    if read.is_ok() && opts.auth.is_none() && auth::is_challenge(&prefix) {
        return Ok(Reply::AuthRequired);
    }
    written.map_err(io)?;
    read.map_err(io)?;
    let reply = read_frame_after(&mut stream, Some(prefix), opts.max_frame).map_err(io)?;
    let decoded = frame::decode_body(&reply);
    if decoded.legacy || decoded.kind != kind {
        return Err(TeError::new(
            code::REJECT_HANDSHAKE,
            format!("{target} answered a {kind:?} request with a {:?} frame", decoded.kind),
        ));
    }
    Ok(Reply::Frame(decoded.body))
}

/// Asks `target` for its segment descriptor, sending ours as Mooncake does.
pub fn fetch_segment(target: &str, ours: &SegmentDesc, opts: &CallOptions) -> TeResult<SegmentDesc> {
    let body = call(target, FrameType::Metadata, &message::to_wire(ours), opts)?;
    message::from_wire(&body)
        .map_err(|e| TeError::new(code::MALFORMED_JSON, format!("{target} sent a bad segment descriptor: {e}")))
}

/// Sends a notification.
pub fn send_notify(target: &str, note: &NotifyDesc, opts: &CallOptions) -> TeResult<()> {
    call(target, FrameType::Notify, &message::to_wire(note), opts).map(|_| ())
}

/// Probes `target`. A peer that requires a key this process lacks is
/// alive all the same: it answered with its challenge.
pub fn probe(target: &str, opts: &CallOptions) -> TeResult<()> {
    let body = match exchange(target, FrameType::Probe, b"{}\n", opts)? {
        Reply::Frame(body) => body,
        Reply::AuthRequired => return Ok(()),
    };
    let reply: ProbeReply = message::from_wire(&body)
        .map_err(|e| TeError::new(code::MALFORMED_JSON, format!("{target} sent a bad probe reply: {e}")))?;
    if reply.status == "success" {
        Ok(())
    } else {
        Err(TeError::new(code::REJECT_HANDSHAKE, format!("{target} answered the probe with {:?}", reply.status)))
    }
}
