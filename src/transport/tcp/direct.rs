//! The direct path: a small synchronous request carried out by the calling
//! thread itself, on a persistent connection of its own.
//!
//! Handing a 4 KiB write to a shard costs a thread hop each way, and on a
//! machine with few cores the shard, the caller and the peer's shard then
//! compete for them. For one small request the caller does better to send
//! the request and read the answer itself, as Mooncake's client does: it
//! spins on a non-blocking receive for a few microseconds (the answer often
//! arrives by then) and then blocks with the transfer's deadline as the
//! socket timeout.
//!
//! This is a second driver of the same client core the shards drive
//! ([`ClientConn`]), with blocking sockets instead of io_uring: the
//! protocol has one implementation.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::Peer;
use super::iov::IoVecs;
use crate::liveness::Liveness;
use crate::proto::auth::{AuthKey, Port, Prover};
use crate::proto::mooncake::client::{ClientConn, Limits, Req, Settle};
use crate::telemetry::{Event, counters as telemetry};
use crate::transport::InlineRequest;

/// Requests up to this size may take the direct path.
pub const DIRECT_BYTES_MAX: u64 = 64 << 10;
/// Connections one thread keeps (one per engine and peer); the oldest goes.
const CONNECTIONS_PER_THREAD_MAX: usize = 32;
/// How long the caller polls before it blocks.
const SPIN: Duration = Duration::from_micros(30);

struct Cached {
    engine: u64,
    /// The peer's data port and process (its instance tag): a restarted
    /// peer never gets a connection made to the process it replaced.
    peer: Peer,
    stream: TcpStream,
}

thread_local! {
    static CONNECTIONS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
    /// The [`RETIRED`] count this thread's cache was last pruned at.
    static PRUNED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Bumped whenever an engine learns that a peer process is gone
/// ([`retired`]): each thread then prunes its kept connections of hung-up
/// ones at its next direct transfer, rather than only when it next opens
/// one, so a thread that goes on using other peers lets go of them too.
static RETIRED: AtomicU64 = AtomicU64::new(0);

/// A peer process is gone: every thread prunes its dead connections at
/// its next direct transfer.
pub fn retired() {
    RETIRED.fetch_add(1, Ordering::Release);
}

/// How a direct transfer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The peer refused it (status 1): retrying elsewhere would not help.
    Rejected,
    TimedOut,
    /// The bytes failed their CRC-32C (never retried).
    Corrupt,
    /// The peer process it was addressed to has exited or been replaced.
    PeerGone,
    /// Anything else (the connection broke).
    Failed,
}

/// Why a direct transfer failed.
#[derive(Debug)]
pub struct DirectError {
    pub failure: Failure,
    pub message: String,
}

impl DirectError {
    fn new(failure: Failure, message: impl Into<String>) -> Self {
        Self { failure, message: message.into() }
    }
}

/// How the direct path opens a connection.
#[derive(Debug, Clone, Copy)]
pub struct Dial<'a> {
    pub connect_timeout: Duration,
    /// Keepalive and `TCP_USER_TIMEOUT`, from the transfer timeout.
    pub liveness: Liveness,
    /// The key a fresh connection proves.
    pub auth: Option<&'a AuthKey>,
}

/// Carries out `r` on this thread. The caller has checked both ranges and
/// pinned the local one for the length of the call.
pub fn transfer(engine: u64, peer: Peer, r: &InlineRequest, dial: Dial<'_>) -> Result<(), DirectError> {
    debug_assert!(peer.v2 && r.len > 0 && r.len <= DIRECT_BYTES_MAX);
    let retired = RETIRED.load(Ordering::Acquire);
    if PRUNED_AT.try_with(|p| p.replace(retired) != retired).unwrap_or(false) {
        drop_hung_up();
    }
    // A kept connection may be dead (the peer restarted, idled us out, or
    // its host vanished): it is looked at before the request goes on it,
    // since a request sent on a connection that then breaks is not sent
    // again (the peer may have run it; see the client core's `Resend`).
    let kept = take(engine, peer).filter(|s| {
        let dead = hung_up(s);
        if dead {
            telemetry::event(Event::TcpReconnect);
        }
        !dead
    });
    let (mut stream, cached) = match kept {
        Some(s) => (s, true),
        None => {
            drop_hung_up();
            (connect(peer, r.deadline, dial)?, false)
        }
    };
    // A fresh connection proves the key first; a kept one has.
    let prover = dial.auth.filter(|_| !cached).map(|k| Prover::new(k.clone(), Port::Data, crate::entropy::bytes()));
    match exchange(&mut stream, peer, r, prover) {
        Settle::Done => {
            put_back(engine, peer, stream);
            Ok(())
        }
        // On any failure the connection's state is unknown: it is dropped.
        Settle::Rejected { message, .. } => Err(DirectError::new(Failure::Rejected, message)),
        Settle::TimedOut(message) => Err(DirectError::new(Failure::TimedOut, message)),
        Settle::Failed(message) => Err(DirectError::new(Failure::Failed, message)),
        Settle::Corrupt(message) => Err(DirectError::new(Failure::Corrupt, message)),
        Settle::PeerGone(message) => Err(DirectError::new(Failure::PeerGone, message)),
        Settle::Retry => unreachable!("a direct request has no retry"),
        Settle::Canceled => unreachable!("nothing cancels a direct request"),
    }
}

/// Whether a kept connection's peer has closed or reset it (or its host
/// was found gone by keepalive): one poll, without waiting.
fn hung_up(stream: &TcpStream) -> bool {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: polls one live descriptor the stream owns, without waiting.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Forgets this thread's connections to an engine's peers (when it shuts
/// down).
pub fn forget(engine: u64) {
    let _ = CONNECTIONS.try_with(|c| c.borrow_mut().retain(|k| k.engine != engine));
}

fn take(engine: u64, peer: Peer) -> Option<TcpStream> {
    CONNECTIONS
        .try_with(|c| {
            let mut c = c.borrow_mut();
            c.iter().position(|k| k.engine == engine && k.peer == peer).map(|i| c.swap_remove(i).stream)
        })
        .ok()
        .flatten()
}

/// Drops this thread's kept connections whose peer hung up (a process
/// that died, or was replaced on a new data port that nothing addresses
/// the old one by), which would otherwise wait for the cache's bound to
/// push them out. Runs when a connection is opened anyway, not on every
/// transfer: one poll of at most `CONNECTIONS_PER_THREAD_MAX` descriptors.
fn drop_hung_up() {
    let _ = CONNECTIONS.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.is_empty() {
            return;
        }
        debug_assert!(c.len() <= CONNECTIONS_PER_THREAD_MAX);
        let mut polls: Vec<libc::pollfd> =
            c.iter().map(|k| libc::pollfd { fd: k.stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 }).collect();
        // SAFETY: `polls` is a live array of `polls.len()` entries, each on
        // a descriptor the cache owns; a zero timeout does not block.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
        if ready <= 0 {
            return;
        }
        let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        let mut i = 0;
        // `retain` visits the entries once each, in order, as `polls` has them.
        c.retain(|_| {
            let hung_up = polls[i].revents & gone != 0;
            i += 1;
            !hung_up
        });
    });
}

fn connect(peer: Peer, deadline: Instant, dial: Dial<'_>) -> Result<TcpStream, DirectError> {
    let timeout = deadline.saturating_duration_since(Instant::now()).min(dial.connect_timeout);
    if timeout.is_zero() {
        return Err(DirectError::new(Failure::TimedOut, "timed out before connecting"));
    }
    let stream = TcpStream::connect_timeout(&peer.addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut => DirectError::new(Failure::TimedOut, format!("connect to {}: {e}", peer.addr)),
        io::ErrorKind::ConnectionRefused => DirectError::new(
            Failure::PeerGone,
            format!(
                "connect to {}: refused: nothing listens at that data port any more (the peer process exited)",
                peer.addr
            ),
        ),
        _ => DirectError::new(Failure::Failed, format!("connect to {}: {e}", peer.addr)),
    })?;
    let _ = stream.set_nodelay(true);
    dial.liveness.apply_or_log(&stream, "a direct-path connection");
    telemetry::event(Event::TcpConnect);
    Ok(stream)
}

fn put_back(engine: u64, peer: Peer, stream: TcpStream) {
    let _ = CONNECTIONS.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CONNECTIONS_PER_THREAD_MAX {
            c.remove(0);
        }
        c.push(Cached { engine, peer, stream });
    });
}

/// Drives a one-request core over a blocking stream until it settles.
fn exchange(stream: &mut TcpStream, peer: Peer, r: &InlineRequest, prover: Option<Prover>) -> Settle {
    let limits = Limits { group_reqs_max: 1, awaiting_max: 1, queued_max: 1, ..Limits::default() };
    let mut core = ClientConn::new(peer.addr.to_string(), true, limits, r.deadline)
        .with_crc32c(peer.crc32c)
        .with_instance(peer.instance);
    if let Some(p) = prover {
        core = core.authenticating(p);
    }
    core.on_connected();
    let req =
        Req { op: r.op, local: r.local, remote: r.remote, len: r.len, deadline: r.deadline, retries: 0, ticket: () };
    if core.push(req).is_err() {
        return Settle::Failed("the direct path refused the request".into());
    }
    // Each step either moves bytes, or ends the connection; a request has
    // a header, a payload, a status and READ bytes: a handful of steps, a
    // few more for short transfers. The bound catches a core bug.
    for _ in 0..(1 << 20) {
        if let Some((_, how)) = core.poll_settled() {
            return how;
        }
        if core.is_closing() {
            core.finish(Instant::now());
            continue;
        }
        if let Some(g) = core.poll_send() {
            let mut iov = IoVecs::with_capacity(2);
            for (p, n) in g.pieces() {
                iov.push(p, n);
            }
            if let Err(e) = send_all(stream, &mut iov, r.deadline, |n| core.on_sent(n)) {
                core.on_error(format!("send: {e}"));
            }
            continue;
        }
        if let Some(g) = core.poll_recv() {
            let pieces = g.pieces();
            let mut iov = IoVecs::with_capacity(pieces.len());
            for (p, n) in pieces {
                iov.push(p.cast_const(), n);
            }
            match receive(stream, &mut iov, r.deadline, |n| core.on_received(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => core.on_eof(),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => core.on_timer(r.deadline.max(Instant::now())),
                Err(e) => core.on_error(format!("receive: {e}")),
            }
            continue;
        }
        core.on_error("nothing left to send or receive, and no answer");
    }
    Settle::Failed("the direct path made no progress".into())
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(io::ErrorKind::TimedOut.into()) } else { Ok(left) }
}

/// Sends the whole list, reporting each piece that went out.
fn send_all(
    stream: &mut TcpStream,
    iov: &mut IoVecs,
    deadline: Instant,
    mut sent: impl FnMut(usize),
) -> io::Result<()> {
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    while !iov.is_complete() {
        // SAFETY: the list points at the core's header and the caller's
        // pinned local memory, both alive for this call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), iov.msghdr(), libc::MSG_NOSIGNAL) };
        if n > 0 {
            iov.advance(n as usize);
            sent(n as usize);
        } else if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        } else {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// Fills the list: polls without blocking for a few microseconds, then
/// blocks with the deadline as the receive timeout. Reports each piece
/// that arrived.
fn receive(stream: &mut TcpStream, iov: &mut IoVecs, deadline: Instant, mut got: impl FnMut(usize)) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let spin_until = Instant::now() + SPIN;
    while !iov.is_complete() {
        let spinning = Instant::now() < spin_until;
        if !spinning {
            stream.set_read_timeout(Some(remaining(deadline)?))?;
        }
        let flags = if spinning { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: receives into the list's unfilled part: the core's status
        // frame and the caller's pinned local memory.
        let n = unsafe { libc::recvmsg(fd, iov.msghdr() as *mut libc::msghdr, flags) };
        if n > 0 {
            iov.advance(n as usize);
            got(n as usize);
        } else if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection"));
        } else {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock if spinning => std::hint::spin_loop(),
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
                _ => return Err(e),
            }
        }
    }
    Ok(())
}
