//! How a peer gets a target's shared memory: a Unix socket in the abstract
//! namespace (so it exists only in the target's network namespace, and goes
//! with the process), which hands out file descriptors.
//!
//! A peer connects and says hello with the target's token (which it learnt
//! from the segment descriptor); the target checks the token and that the
//! peer runs as the same user, and answers with its control table. Later
//! the peer asks for each memfd of managed memory it needs, by number. Each
//! message is 16 bytes; a descriptor travels as `SCM_RIGHTS`.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::mem::managed::ShmFiles;

const OP_HELLO: u32 = 1;
const OP_MEMFD: u32 = 2;
const STATUS_OK: u32 = 0;
const STATUS_REFUSED: u32 = 1;
const STATUS_UNKNOWN: u32 = 2;
/// Connections served at once; more are closed at once.
const CONNECTIONS_MAX: usize = 64;
/// How long a peer may take to say something, and the target to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

fn message(op: u32, arg: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..4].copy_from_slice(&op.to_le_bytes());
    m[8..].copy_from_slice(&arg.to_le_bytes());
    m
}

fn parse(m: &[u8; 16]) -> (u32, u64) {
    (u32::from_le_bytes(m[..4].try_into().expect("4")), u64::from_le_bytes(m[8..].try_into().expect("8")))
}

/// Sends 16 bytes, and a descriptor with them if given.
fn send(stream: &UnixStream, bytes: &[u8; 16], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is "no name, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one cmsg carrying one fd
        // (CMSG_SPACE above); CMSG_FIRSTHDR points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::copy_nonoverlapping(
                &fd as *const RawFd as *const u8,
                libc::CMSG_DATA(cmsg),
                std::mem::size_of::<RawFd>(),
            );
        }
    }
    // SAFETY: the message points at live buffers for the call's length.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n == bytes.len() as isize {
        Ok(())
    } else if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Err(io::ErrorKind::WriteZero.into())
    }
}

/// Receives 16 bytes, and the descriptor sent with them, if any.
fn recv(stream: &UnixStream) -> io::Result<([u8; 16], Option<OwnedFd>)> {
    let mut bytes = [0u8; 16];
    let mut iov = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: bytes.len() };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the message points at live buffers; MSG_CMSG_CLOEXEC marks a
    // received descriptor close-on-exec.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walks the control messages the kernel wrote into `control`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let mut raw: RawFd = -1;
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(cmsg),
                    &mut raw as *mut RawFd as *mut u8,
                    std::mem::size_of::<RawFd>(),
                );
                if raw >= 0 {
                    fd = Some(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the other side closed"));
    }
    Ok((bytes, fd))
}

/// The credentials of the process at the other end (pids as this
/// process's pid namespace numbers them).
fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    // SAFETY: plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 { Ok(cred) } else { Err(io::Error::last_os_error()) }
}

/// The uid of the process at the other end.
fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    peer_cred(stream).map(|c| c.uid)
}

/// The target's side: the socket and the thread that serves it.
pub struct Service {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Service {
    /// Listens on `@<name>` and serves `table` and `files` to peers that
    /// present `token`.
    pub fn start(name: &str, token: u64, table: Arc<OwnedFd>, files: Arc<ShmFiles>) -> io::Result<Service> {
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("shardwire-local".into())
            .spawn(move || serve(listener, token, table, files, s))?;
        Ok(Service { name: name.to_string(), stop, thread: Mutex::new(Some(thread)) })
    }

    /// `@name`, as the descriptor says it.
    pub fn address(&self) -> String {
        format!("@{}", self.name)
    }

    /// Stops serving (peers that have their descriptors keep them).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(listener: UnixListener, token: u64, table: Arc<OwnedFd>, files: Arc<ShmFiles>, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
                    log::warn!("local transport: refusing a peer: {CONNECTIONS_MAX} connected");
                    continue;
                }
                live.fetch_add(1, Ordering::SeqCst);
                let (t, f, l, s) = (table.clone(), files.clone(), live.clone(), stop.clone());
                let spawned = std::thread::Builder::new().name("shardwire-local-peer".into()).spawn(move || {
                    if let Err(e) = serve_peer(&stream, token, &t, &f, &s) {
                        log::debug!("local transport: a peer's connection ended: {e}");
                    }
                    l.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    live.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("local transport: accept failed: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn serve_peer(stream: &UnixStream, token: u64, table: &OwnedFd, files: &ShmFiles, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    if peer_uid(stream)? != me {
        let _ = send(stream, &message(STATUS_REFUSED, 0), None);
        return Err(io::Error::other("a peer running as another user"));
    }
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let (hello, _) = recv(stream)?;
    if parse(&hello) != (OP_HELLO, token) {
        let _ = send(stream, &message(STATUS_REFUSED, 0), None);
        return Err(io::Error::other("a peer without the token"));
    }
    send(stream, &message(STATUS_OK, 0), Some(table.as_raw_fd()))?;
    // Requests for memfds, for as long as the peer keeps the connection
    // (it does, while it uses this target).
    stream.set_read_timeout(Some(ACCEPT_POLL * 10))?;
    while !stop.load(Ordering::SeqCst) {
        let req = match recv(stream) {
            Ok((req, _)) => req,
            // A signal, or the poll's timeout: not the peer going. (A
            // link closed by mistake would make its peer take this target
            // for gone.)
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        match parse(&req) {
            (OP_MEMFD, id) => match files.get(id as u32).filter(|_| id <= u64::from(u32::MAX)) {
                Some((fd, len)) => send(stream, &message(STATUS_OK, len), Some(fd.as_raw_fd()))?,
                None => send(stream, &message(STATUS_UNKNOWN, 0), None)?,
            },
            (op, _) => {
                let _ = send(stream, &message(STATUS_REFUSED, 0), None);
                return Err(io::Error::other(format!("unknown request {op}")));
            }
        }
    }
    Ok(())
}

/// A peer's connection to one target's service.
pub struct Link {
    stream: Mutex<UnixStream>,
}

impl Link {
    /// Connects to `address` (`@name`), says hello with `token`, and
    /// returns the link and the target's control table.
    pub fn connect(address: &str, token: u64) -> io::Result<(Link, OwnedFd)> {
        let name = address.strip_prefix('@').ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{address:?} is not an abstract socket"))
        })?;
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let stream = UnixStream::connect_addr(&addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        send(&stream, &message(OP_HELLO, token), None)?;
        let (reply, fd) = recv(&stream)?;
        match (parse(&reply).0, fd) {
            (STATUS_OK, Some(fd)) => Ok((Link { stream: Mutex::new(stream) }, fd)),
            _ => Err(io::Error::new(io::ErrorKind::PermissionDenied, "the target refused (token or user)")),
        }
    }

    /// The memfd numbered `id`, and its length.
    pub fn memfd(&self, id: u32) -> io::Result<(OwnedFd, u64)> {
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        send(&stream, &message(OP_MEMFD, u64::from(id)), None)?;
        let (reply, fd) = recv(&stream)?;
        let (status, len) = parse(&reply);
        match (status, fd) {
            (STATUS_OK, Some(fd)) => Ok((fd, len)),
            (STATUS_UNKNOWN, _) => Err(io::Error::new(io::ErrorKind::NotFound, format!("no memfd {id} (freed?)"))),
            _ => Err(io::Error::other("the target refused")),
        }
    }

    /// The process at the other end (the target), as this process's pid
    /// namespace numbers it: the socket's peer credentials.
    pub fn peer_pid(&self) -> io::Result<u32> {
        let cred = peer_cred(&self.stream.lock().unwrap_or_else(|e| e.into_inner()))?;
        u32::try_from(cred.pid).ok().filter(|&p| p > 0).ok_or_else(|| io::Error::other("no peer pid"))
    }

    /// Whether the target has closed the connection (it exited).
    pub fn is_closed(&self) -> bool {
        let stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one live descriptor without waiting.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLIN) != 0 && {
            let mut b = [0u8; 1];
            let _ = stream.set_nonblocking(true);
            let closed = matches!((&*stream).read(&mut b), Ok(0));
            let _ = stream.set_nonblocking(false);
            closed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_with_the_token_gets_the_table_and_memfds() {
        let table = crate::transport::local::control::Table::create(std::process::id()).unwrap();
        let files = Arc::new(ShmFiles::default());
        let name = format!("shardwire-test-{}-{}", std::process::id(), line!());
        let svc = Service::start(&name, 77, table.fd().clone(), files.clone()).unwrap();
        assert!(Link::connect(&svc.address(), 78).is_err(), "a wrong token is refused");
        let (link, fd) = Link::connect(&svc.address(), 77).unwrap();
        let view = crate::transport::local::control::Table::attach(fd).unwrap();
        assert_eq!(view.target_pid(), std::process::id());
        assert_eq!(link.memfd(5).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(!link.is_closed());
        svc.stop();
        assert!(Link::connect(&svc.address(), 77).is_err(), "stopped: nobody listens");
    }
}
