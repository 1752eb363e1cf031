//! The direct path: a small synchronous transfer carried out by the calling
//! thread itself, on a persistent connection of its own.
//!
//! Handing a 4 KiB write to a shard costs a thread hop each way, and on a
//! machine with few cores the shard, the caller and the peer's shard then
//! compete for them. For one small request the caller does better to send
//! the request and read the answer itself, as Mooncake's client does: it
//! spins on a non-blocking receive for a few microseconds (the answer often
//! arrives by then) and then blocks with the transfer's deadline as the
//! socket timeout. The protocol is the same TCP v2 the shards speak, to the
//! same server; only large or batched transfers go through the shards.

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::slice::Peer;
use crate::proto::mooncake::tcp::{self, Opcode, RequestHeader};

/// Requests up to this size may take the direct path.
pub const DIRECT_BYTES_MAX: u64 = 64 << 10;
/// Connections one thread keeps (one per engine and peer); the oldest goes.
const CONNECTIONS_PER_THREAD_MAX: usize = 32;
/// How long the caller polls before it blocks.
const SPIN: Duration = Duration::from_micros(30);

struct Cached {
    engine: u64,
    peer: SocketAddr,
    stream: TcpStream,
}

thread_local! {
    static CONNECTIONS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Why a direct transfer failed; `rejected` if the peer said no (status 1),
/// so retrying elsewhere would not help.
#[derive(Debug)]
pub struct DirectError {
    pub rejected: bool,
    pub timed_out: bool,
    /// The connection was dead before the peer answered anything.
    pub stale: bool,
    pub message: String,
}

/// Moves `len` bytes between local `local` and the peer's `remote`, on this
/// thread. The caller has checked both ranges and pinned the local one.
pub fn transfer(
    engine: u64,
    peer: Peer,
    op: Opcode,
    local: u64,
    remote: u64,
    len: u64,
    deadline: Instant,
) -> Result<(), DirectError> {
    debug_assert!(peer.v2 && len > 0 && len <= DIRECT_BYTES_MAX);
    let (mut stream, cached) = take(engine, peer.addr, deadline)?;
    let mut result = exchange(&mut stream, op, local, remote, len, deadline);
    if cached && result.as_ref().is_err_and(|e| e.stale) {
        // A kept connection the peer had closed (it restarted, or idled us
        // out): requests are idempotent, so try once on a fresh one.
        let (fresh, _) = connect(peer.addr, deadline)?;
        stream = fresh;
        result = exchange(&mut stream, op, local, remote, len, deadline);
    }
    if result.is_ok() {
        put_back(engine, peer.addr, stream);
    }
    // On any failure the connection's state is unknown: it is dropped.
    result
}

/// Forgets this thread's connections to an engine's peers (when it shuts
/// down, or a peer restarts).
pub fn forget(engine: u64) {
    let _ = CONNECTIONS.try_with(|c| c.borrow_mut().retain(|k| k.engine != engine));
}

/// This thread's connection to `peer`, and whether it was kept from before.
fn take(engine: u64, peer: SocketAddr, deadline: Instant) -> Result<(TcpStream, bool), DirectError> {
    let cached = CONNECTIONS
        .try_with(|c| {
            let mut c = c.borrow_mut();
            c.iter().position(|k| k.engine == engine && k.peer == peer).map(|i| c.swap_remove(i).stream)
        })
        .ok()
        .flatten();
    match cached {
        Some(s) => Ok((s, true)),
        None => connect(peer, deadline),
    }
}

fn connect(peer: SocketAddr, deadline: Instant) -> Result<(TcpStream, bool), DirectError> {
    let timeout = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(5));
    if timeout.is_zero() {
        return Err(error(true, "transfer timed out before connecting".into()));
    }
    let stream = TcpStream::connect_timeout(&peer, timeout)
        .map_err(|e| error(e.kind() == io::ErrorKind::TimedOut, format!("connect to {peer}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok((stream, false))
}

fn error(timed_out: bool, message: String) -> DirectError {
    DirectError { rejected: false, timed_out, stale: false, message }
}

fn put_back(engine: u64, peer: SocketAddr, stream: TcpStream) {
    let _ = CONNECTIONS.try_with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CONNECTIONS_PER_THREAD_MAX {
            c.remove(0);
        }
        c.push(Cached { engine, peer, stream });
    });
}

fn exchange(
    stream: &mut TcpStream,
    op: Opcode,
    local: u64,
    remote: u64,
    len: u64,
    deadline: Instant,
) -> Result<(), DirectError> {
    // Before the first byte of the answer, a reset, a broken pipe or an
    // end of stream means the connection was dead already.
    let mut answered = false;
    let io = |e: io::Error, answered: bool| DirectError {
        rejected: false,
        timed_out: matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        stale: !answered
            && matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
        message: format!("direct transfer: {e}"),
    };
    let header = RequestHeader { size: len, addr: remote, opcode: op, v2: true }.encode();
    // SAFETY: the caller pinned [local, local + len) inside registered
    // memory for the length of this call.
    let payload = unsafe { std::slice::from_raw_parts(local as *const u8, len as usize) };
    stream.set_write_timeout(Some(remaining(deadline)?)).map_err(|e| io(e, answered))?;
    if op == Opcode::Write {
        write_all_vectored(stream, &header, payload).map_err(|e| io(e, answered))?;
    } else {
        stream.write_all(&header).map_err(|e| io(e, answered))?;
    }
    let mut status = [0u8; tcp::STATUS_BYTES];
    receive(stream, &mut status, deadline).map_err(|e| io(e, answered))?;
    answered = true;
    match tcp::decode_status(&status) {
        Ok(tcp::STATUS_OK) => {}
        Ok(code) => {
            return Err(DirectError {
                rejected: true,
                timed_out: false,
                stale: false,
                message: format!(
                    "{} rejected a {op:?} of {len} bytes at {remote:#x} (status {code}): not inside a buffer it has registered",
                    stream.peer_addr().map_or_else(|_| "the peer".into(), |a| a.to_string())
                ),
            });
        }
        Err(raw) => return Err(error(false, format!("the peer sent {raw:#018x} where a status frame belongs"))),
    }
    if op == Opcode::Read {
        // SAFETY: as above; a READ's destination is the pinned local range.
        let dest = unsafe { std::slice::from_raw_parts_mut(local as *mut u8, len as usize) };
        receive(stream, dest, deadline).map_err(|e| io(e, answered))?;
    }
    Ok(())
}

fn remaining(deadline: Instant) -> Result<Duration, DirectError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(error(true, "no answer within the transfer timeout".into()));
    }
    Ok(left)
}

fn write_all_vectored(stream: &mut TcpStream, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut bufs = [io::IoSlice::new(header), io::IoSlice::new(payload)];
    let mut bufs: &mut [io::IoSlice<'_>] = &mut bufs;
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `buf`: polls without blocking for a few microseconds, then blocks
/// with the deadline as the receive timeout.
fn receive(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    let mut got = 0;
    let spin_until = Instant::now() + SPIN;
    while got < buf.len() {
        let spinning = Instant::now() < spin_until;
        if !spinning {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            stream.set_read_timeout(Some(left))?;
        }
        let flags = if spinning { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: receives into the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::recv(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got, flags) };
        if n > 0 {
            got += n as usize;
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
