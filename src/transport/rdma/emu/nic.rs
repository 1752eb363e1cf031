//! The soft NIC of one `emu` device: its port, its tables and the threads
//! that serve its peers, without the application.
//!
//! - A listener thread accepts connections from other devices (at most
//!   [`INBOUND_MAX`]); each gets a responder thread that checks every part
//!   it is sent against the destination queue pair (which must be in RTR
//!   or RTS and connected to the sender) and the region its rkey names
//!   ([`rules::check_remote`]), copies into or out of the region, and
//!   answers, in order. A connection that sends nothing for the device's
//!   inbound idle limit is closed (its peer has vanished, or forgot it).
//!   On a device listening beyond loopback, a peer's hello (the GID and
//!   LID it says it is) is believed only from the address it names
//!   ([`hello_is_from`]); requesters connect from their device's address
//!   ([`connect_from`]).
//! - Work this device's queue pairs post goes out over its [`Link`]s, one
//!   per peer device ([`super::link`]).
//! - The port goes down and up ([`Device::set_up`]): down, its queue pairs
//!   go to ERR, its links end and its peers are refused.
//! - Every thread wakes at least every [`TICK`] to look at the port and the
//!   device's shutdown, so none outlives the fabric by more than a tick
//!   and its work.
//!
//! Copies into or out of a registered region hold its
//! [`RegionGuard`](super::queues::RegionGuard), so a region is never given
//! back (and its memory freed) in the middle of one; nothing waits on the
//! network while holding a guard or a context's lock. Lock order: a
//! context's lock, then the device's tables (owners, links, inbound),
//! which are taken last and never held across a call.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::super::fabric::{DeviceInfo, FabricError, GidEntry, GidKind, PortEvent, PortState, QpNum, QpState};
use super::super::rules;
use super::frames::FrameReader;
use super::link::{Link, LinkUse};
use super::queues::append_from;
use super::wire::{FRAME_BYTES_MAX, Hello, REQUEST_BYTES, RESPONSE_BYTES, Request, Response, Status};
use super::{CtxShared, lock};
use crate::proto::mooncake::rdma::Gid;

/// Connections from other devices one device serves at once.
pub const INBOUND_MAX: usize = 256;
/// Peer devices one device keeps connections to.
pub const LINKS_MAX: usize = 256;
/// Queue pairs on one device (across its contexts).
pub const QPS_PER_DEVICE_MAX: usize = 1 << 16;
/// Bytes gathered before they are written to the socket.
pub const FLUSH_BYTES: usize = 256 << 10;
/// How often idle threads look at their flags and deadlines.
pub const TICK: Duration = Duration::from_millis(10);
/// How long a new connection may take to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that has carried nothing (and has nothing on the wire) this
/// long is closed, its threads, socket and buffers gone; the queue pairs
/// that hold it connect again on their next post.
pub const LINK_IDLE: Duration = Duration::from_secs(30);
/// A connection from a peer that sends nothing this long is closed: the
/// peer vanished without a word (a requester's own link closes after
/// [`LINK_IDLE`], well before).
pub const INBOUND_IDLE: Duration = Duration::from_secs(60);
/// A connection quiet this long gives back the buffers a burst made grow.
pub const SHRINK_AFTER: Duration = Duration::from_secs(1);
/// What a connection's output buffer keeps when it is quiet (it grows to
/// [`FLUSH_BYTES`] and a frame under load).
pub const OUT_KEPT_BYTES: usize = 64 << 10;
/// What the ports take (every emu device is alike).
pub const ACTIVE_MTU: u32 = 4096;

/// How long a device's connections may be quiet before they close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimits {
    /// A link of its own (see [`LINK_IDLE`]).
    pub link: Duration,
    /// A connection from a peer (see [`INBOUND_IDLE`]); longer than the
    /// peers' `link`, or their idle links are cut under them.
    pub inbound: Duration,
}

impl Default for IdleLimits {
    fn default() -> IdleLimits {
        IdleLimits { link: LINK_IDLE, inbound: INBOUND_IDLE }
    }
}

/// One emu device: its listener, its queue pairs' owners, its links.
pub struct Device {
    pub name: String,
    /// Where peers reach it: the GID's address, the LID as port.
    pub addr: SocketAddr,
    pub gids: Vec<GidEntry>,
    pub numa_node: Option<u32>,
    pub idle: IdleLimits,
    /// Threads of its fabric running (see [`spawn`]).
    pub threads: Arc<AtomicUsize>,
    up: AtomicBool,
    shut: AtomicBool,
    /// `error_every=<n>` (n ≥ 1): every nth work request fails.
    error_every: Option<u64>,
    /// Work requests carried out (counted for `error_every`).
    carried: AtomicU64,
    contexts: Mutex<Vec<Weak<CtxShared>>>,
    /// Queue pair number to the context that owns it: incoming parts are
    /// routed by their destination queue pair.
    owners: Mutex<HashMap<u32, Weak<CtxShared>>>,
    next_qp: AtomicU32,
    links: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    /// Connections served, by id (clones, to close them from outside).
    inbound: Mutex<HashMap<u64, TcpStream>>,
    next_inbound: AtomicU64,
}

pub fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A number unlikely to repeat across processes and restarts: where queue
/// pair numbers and keys start, so that a restarted peer's are not taken
/// for the old one's.
pub fn start_value(salt: u64) -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let x = (u64::from(std::process::id()) << 32 ^ nanos ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 40) as u32
}

/// The address a GID and LID name: an IPv4-mapped GID is that IPv4
/// address, another routable GID the IPv6 address; the LID is the port.
pub fn address_of(gid: &Gid, lid: u16) -> Option<SocketAddr> {
    let ip = Ipv6Addr::from(gid.0);
    let link_local = gid.0[0] == 0xfe && gid.0[1] & 0xc0 == 0x80;
    if lid == 0 || ip.is_unspecified() || link_local {
        return None;
    }
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), lid),
        None => SocketAddr::new(IpAddr::V6(ip), lid),
    })
}

/// The GID table of a device listening at `addr`: a link-local entry at
/// index 0 (as a RoCE port has), the listener's address at index 1
/// (IPv4-mapped for IPv4), both RoCE v2, so that [`choose_gid`] picks 1.
///
/// [`choose_gid`]: super::super::fabric::choose_gid
pub fn gid_table(addr: SocketAddr) -> Vec<GidEntry> {
    let [hi, lo] = addr.port().to_be_bytes();
    let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0xff, 0xfe, 0, hi, lo];
    let routable = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    vec![
        GidEntry { gid: Gid(link_local), kind: GidKind::RoceV2 },
        GidEntry { gid: Gid(routable), kind: GidKind::RoceV2 },
    ]
}

/// Starts thread `name` running `f`, counted in `threads` while it runs
/// (a guard counts it out, also when it panics, or when it never starts).
pub fn spawn(threads: &Arc<AtomicUsize>, name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    struct Running(Arc<AtomicUsize>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    threads.fetch_add(1, Ordering::AcqRel);
    let running = Running(threads.clone());
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let _running = running;
        f();
    })?;
    Ok(())
}

/// Waits until `fd` has something to read (a connection to accept), at
/// most `timeout`.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd, ours and valid for the call, on a descriptor the
    // caller holds open; an error or EINTR only ends the wait early.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// A socket address as the kernel takes it.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data, valid all zero.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: plain old data, valid all zero.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            // SAFETY: sockaddr_storage is large enough and aligned for any
            // socket address; the write is of a whole, valid sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: plain old data, valid all zero.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: as above, for a sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Connects to `peer` within `timeout` from address `local` (a port of the
/// kernel's choosing), so that the peer sees the connection come from the
/// address this device's hello names (see [`hello_is_from`]), whichever
/// interface the route would have picked. Of another family than `peer`,
/// `local` is not used.
pub fn connect_from(local: IpAddr, peer: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    if local.is_ipv4() != peer.is_ipv4() || local.is_unspecified() {
        return TcpStream::connect_timeout(&peer, timeout);
    }
    let family = if peer.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) with constant arguments; what it returns is
    // checked, and owned by `fd` at once.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just made, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (from, from_len) = sockaddr(SocketAddr::new(local, 0));
    // SAFETY: `from` holds a socket address of `from_len` bytes, valid for
    // the call; `fd` is open.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const from).cast(), from_len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let (to, to_len) = sockaddr(peer);
    // SAFETY: as above, for the peer's address.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const to).cast(), to_len) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        // Non-blocking: the connection completes (or fails) when the
        // socket turns writable, within the timeout.
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"));
            }
            let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one pollfd, ours and valid for the call; `fd` is open.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                n if n > 0 => break,
                0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR is an int; `err` and `len` are ours, valid for
        // the call, and `len` says the size of `err`.
        if unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut len)
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Whether a hello naming `hello` may be believed from a connection that
/// comes from `from`, on a device listening at `listening`: on loopback
/// only this host reaches it, and it is; elsewhere the address the hello
/// names must be the one the connection comes from (a requester connects
/// from its device's address, [`connect_from`]), so a peer cannot speak
/// for a device that is not its own.
pub fn hello_is_from(listening: IpAddr, hello: &Hello, from: IpAddr) -> bool {
    if listening.is_loopback() {
        return true;
    }
    address_of(&hello.gid, hello.lid).is_some_and(|named| named.ip().to_canonical() == from.to_canonical())
}

impl Device {
    /// A device named `name` listening on `bind` (a port of its own), its
    /// listener thread started (counted in `threads`).
    pub fn start(
        name: &str,
        bind: IpAddr,
        numa_node: Option<u32>,
        error_every: Option<u64>,
        idle: IdleLimits,
        threads: &Arc<AtomicUsize>,
    ) -> Result<Arc<Device>, FabricError> {
        if error_every == Some(0) {
            // Every 0th would divide by zero in the sender thread.
            return Err(FabricError::Call { call: "emu device", why: format!("{name}: error_every=0 (at least 1)") });
        }
        let listener = TcpListener::bind(SocketAddr::new(bind, 0))
            .map_err(|e| FabricError::Call { call: "bind", why: format!("emu device {name} on {bind}: {e}") })?;
        let port = listener.local_addr().map_err(|e| FabricError::Call { call: "getsockname", why: e.to_string() })?;
        // Polled, so that its thread sees the shutdown without being woken
        // by a connection (which may not be possible: out of descriptors).
        listener.set_nonblocking(true).map_err(|e| FabricError::Call { call: "fcntl", why: e.to_string() })?;
        // A listener on every address is reached, and advertised, on loopback.
        let ip = match bind {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let addr = SocketAddr::new(ip, port.port());
        let device = Arc::new(Device {
            name: name.to_string(),
            addr,
            gids: gid_table(addr),
            numa_node,
            idle,
            threads: threads.clone(),
            up: AtomicBool::new(true),
            shut: AtomicBool::new(false),
            error_every,
            carried: AtomicU64::new(0),
            contexts: Mutex::new(Vec::new()),
            owners: Mutex::new(HashMap::new()),
            next_qp: AtomicU32::new(start_value(u64::from(port.port()))),
            links: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            next_inbound: AtomicU64::new(0),
        });
        let d = device.clone();
        spawn(threads, "sw-emu-listen", move || d.listen(listener))
            .map_err(|e| FabricError::Call { call: "spawn", why: e.to_string() })?;
        Ok(device)
    }

    pub fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            port: 1,
            state: if self.is_up() { PortState::Active } else { PortState::Down },
            lid: self.addr.port(),
            gids: self.gids.clone(),
            active_mtu: ACTIVE_MTU,
            max_mr_size: 1 << 40,
            max_qp_wr: 16_384,
            max_cqe: 1 << 20,
            numa_node: self.numa_node,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_shut(&self) -> bool {
        self.shut.load(Ordering::Acquire)
    }

    /// Whether the work request carried now is one `error_every` fails.
    pub fn fault_due(&self) -> bool {
        let n = self.carried.fetch_add(1, Ordering::Relaxed) + 1;
        self.error_every.is_some_and(|every| n % every == 0)
    }

    pub fn add_context(&self, ctx: &Arc<CtxShared>) {
        let mut all = locked(&self.contexts);
        all.retain(|c| c.strong_count() > 0);
        all.push(Arc::downgrade(ctx));
    }

    fn live_contexts(&self) -> Vec<Arc<CtxShared>> {
        locked(&self.contexts).iter().filter_map(Weak::upgrade).collect()
    }

    /// A queue pair number of this device for `ctx`.
    pub fn new_qp(&self, ctx: &Arc<CtxShared>) -> Result<u32, FabricError> {
        let mut owners = locked(&self.owners);
        if owners.len() >= QPS_PER_DEVICE_MAX {
            return Err(FabricError::Limit {
                what: "queue pairs on the device".into(),
                max: QPS_PER_DEVICE_MAX as u64,
            });
        }
        // Ends: fewer than 2^24 - 1 numbers are taken.
        loop {
            let n = self.next_qp.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
            if n != 0 && !owners.contains_key(&n) {
                owners.insert(n, Arc::downgrade(ctx));
                return Ok(n);
            }
        }
    }

    pub fn forget_qp(&self, qpn: u32) {
        locked(&self.owners).remove(&qpn);
    }

    fn owner(&self, qpn: QpNum) -> Option<Arc<CtxShared>> {
        locked(&self.owners).get(&qpn.0).and_then(Weak::upgrade)
    }

    /// The link to the device at `peer`, made if there is none alive.
    pub fn link_to(self: &Arc<Self>, peer: SocketAddr) -> Result<LinkUse, FabricError> {
        let mut links = locked(&self.links);
        if let Some(link) = links.get(&peer).filter(|l| !l.is_dead()) {
            return Ok(LinkUse::new(link.clone()));
        }
        let mut idle = Vec::new();
        if links.len() >= LINKS_MAX {
            let unused: Vec<SocketAddr> =
                links.iter().filter(|(_, l)| l.users.load(Ordering::Acquire) == 0).map(|(a, _)| *a).collect();
            idle.extend(unused.iter().filter_map(|a| links.remove(a)));
        }
        if links.len() >= LINKS_MAX {
            return Err(FabricError::Limit { what: "peer devices connected".into(), max: LINKS_MAX as u64 });
        }
        let link = Link::start(self, peer)?;
        links.insert(peer, link.clone());
        drop(links);
        for l in idle {
            // No queue pair uses it: what it still carries is for work
            // requests gone already, so nothing is left to complete (and
            // this may run under a context's lock: nothing is completed).
            drop(l.kill("unused, to make room"));
        }
        Ok(LinkUse::new(link))
    }

    /// Links to peers now.
    pub fn links(&self) -> usize {
        locked(&self.links).len()
    }

    /// The live link to `peer`, if there is one (test support).
    #[cfg(test)]
    pub fn link(&self, peer: SocketAddr) -> Option<Arc<Link>> {
        locked(&self.links).get(&peer).cloned()
    }

    pub fn forget_link(&self, link: &Link) {
        let mut links = locked(&self.links);
        if links.get(&link.peer).is_some_and(|l| std::ptr::eq(Arc::as_ptr(l), link)) {
            links.remove(&link.peer);
        }
    }

    /// The port goes down or comes up. Down: every queue pair on it goes
    /// to ERR (flushing its work) with an event, its links close (their
    /// work fails), and connections from peers are refused.
    pub fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        log::info!("emu: device {} port {}", self.name, if up { "up" } else { "down" });
        for ctx in self.live_contexts() {
            let mut q = lock(&ctx.queues);
            q.push_event(if up { PortEvent::PortActive } else { PortEvent::PortDown });
            if !up {
                let live: Vec<u32> = q
                    .qps
                    .iter()
                    .filter(|(_, p)| !matches!(p.state, QpState::Reset | QpState::Err))
                    .map(|(&n, _)| n)
                    .collect();
                for n in live {
                    q.flush(n);
                    q.push_event(PortEvent::QpFatal(QpNum(n)));
                }
            }
        }
        if !up {
            self.end_links("the port is down");
            self.close_inbound();
        }
    }

    /// Ends every link, failing what they carried.
    fn end_links(&self, why: &str) {
        let links: Vec<Arc<Link>> = locked(&self.links).drain().map(|(_, l)| l).collect();
        for l in links {
            l.end(why);
        }
    }

    /// Closes every connection from a peer (their threads see it, and the
    /// port or the shutdown, at once or within a tick).
    fn close_inbound(&self) {
        for s in locked(&self.inbound).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Whether the port is up and the fabric not going.
    fn serving(&self) -> bool {
        self.is_up() && !self.is_shut()
    }

    /// The fabric is going: the port goes down for good, the listener
    /// stops within a tick, and every connection closes, whether the port
    /// was up or not.
    pub fn shutdown(&self) {
        if self.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.set_up(false);
        // set_up does nothing on a port that was down already; these are
        // done again whatever it did (both are idempotent).
        self.end_links("the fabric is going");
        self.close_inbound();
    }

    /// The listener thread: polls for connections, looking at the
    /// shutdown at least every tick.
    fn listen(self: Arc<Self>, listener: TcpListener) {
        while !self.is_shut() {
            match listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener, TICK),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: wait a little, as accept
                    // loops do, rather than spin.
                    log::debug!("emu: {}: accept: {e}", self.name);
                    std::thread::sleep(TICK);
                }
            }
        }
    }

    /// Serves a connection accepted, on a thread of its own, if the port
    /// is up and there is room; dropped (closed) if not.
    fn admit(self: &Arc<Self>, stream: TcpStream) {
        if !self.serving() || stream.set_nonblocking(false).is_err() {
            return; // refused: dropped at once
        }
        let id = self.next_inbound.fetch_add(1, Ordering::Relaxed);
        {
            let mut inbound = locked(&self.inbound);
            if inbound.len() >= INBOUND_MAX {
                log::warn!("emu: {}: {INBOUND_MAX} connections already; one refused", self.name);
                return;
            }
            match stream.try_clone() {
                Ok(clone) => inbound.insert(id, clone),
                Err(_) => return,
            };
        }
        // The port may have gone down (or the fabric) since the look
        // above, and closed only the connections listed then: looked at
        // again now that this one is listed, so one of the two closes it.
        if !self.serving() {
            if let Some(s) = locked(&self.inbound).remove(&id) {
                let _ = s.shutdown(Shutdown::Both);
            }
            return;
        }
        /// Unlists the connection however its thread ends (a panic too),
        /// so that it does not count against [`INBOUND_MAX`] for ever.
        struct Listed(Arc<Device>, u64);
        impl Drop for Listed {
            fn drop(&mut self) {
                locked(&self.0.inbound).remove(&self.1);
            }
        }
        let listed = Listed(self.clone(), id);
        // If the thread does not start, the closure (and `listed`) is
        // dropped: the connection is unlisted and closed.
        let _ = spawn(&self.threads, "sw-emu-serve", move || {
            if let Err(e) = listed.0.serve(stream) {
                log::debug!("emu: {}: a peer's connection ended: {e}", listed.0.name);
            }
        });
    }

    /// Serves one peer device's connection: its hello, then its parts, in
    /// order, each answered. Reads wait at most a tick, so that the port,
    /// the shutdown and the idle limit are looked at while it is quiet.
    fn serve(&self, mut stream: TcpStream) -> io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut input = FrameReader::new(FRAME_BYTES_MAX);
        let deadline = Instant::now() + HELLO_TIMEOUT;
        stream.set_read_timeout(Some(TICK))?;
        let hello = loop {
            if let Some((hello, n)) = input.next(&mut stream, Hello::decode)? {
                input.consume(n);
                break hello;
            }
            if !self.serving() {
                return Err(io::Error::other("the port is down"));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no hello"));
            }
        };
        let from = stream.peer_addr()?.ip();
        if !hello_is_from(self.addr.ip(), &hello, from) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("a hello for GID {} LID {} from {from}", hello.gid, hello.lid),
            ));
        }
        // A peer that stops reading its answers is as gone as one that
        // stops sending: a write waits at most the idle limit too.
        stream.set_write_timeout(Some(self.idle.inbound.max(TICK)))?;
        let mut out = Vec::new(); // grows to what is queued: FLUSH_BYTES and a frame
        let (mut heard, mut received_bytes) = (Instant::now(), input.received_bytes());
        loop {
            let next = input.next(&mut stream, Request::decode)?;
            if input.received_bytes() != received_bytes {
                (heard, received_bytes) = (Instant::now(), input.received_bytes());
            }
            let Some((req, n)) = next else {
                if !self.serving() {
                    return Err(io::Error::other("the port is down"));
                }
                let quiet = heard.elapsed();
                if quiet >= self.idle.inbound {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("nothing in {quiet:?}")));
                }
                if quiet >= SHRINK_AFTER {
                    input.shrink();
                    out.shrink_to(OUT_KEPT_BYTES);
                }
                continue;
            };
            if !self.serving() {
                return Err(io::Error::other("the port is down"));
            }
            let at = out.len();
            out.extend_from_slice(&[0; RESPONSE_BYTES]);
            let status = self.respond(&hello, &req, &input.frame(n)[REQUEST_BYTES..], &mut out);
            let data_len = (out.len() - at - RESPONSE_BYTES) as u32;
            out[at..at + RESPONSE_BYTES].copy_from_slice(&Response { status, data_len, tag: req.tag }.encode());
            input.consume(n);
            if out.len() >= FLUSH_BYTES || !input.has(Request::decode) {
                stream.write_all(&out)?;
                out.clear();
            }
        }
    }

    /// One part, checked as a responder checks it and carried out; a
    /// read's bytes are appended to `out`. A part the region refuses puts
    /// the responder's queue pair in ERR too (as an RC responder does on
    /// a remote access error), so the parts behind it, already on the
    /// wire, are not carried out.
    fn respond(&self, hello: &Hello, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> Status {
        let Some(ctx) = self.owner(req.dst_qp) else { return Status::NotConnected };
        let refused = || {
            let mut q = lock(&ctx.queues);
            q.flush(req.dst_qp.0);
            q.push_event(PortEvent::QpFatal(req.dst_qp));
            Status::RemoteAccess
        };
        let guard = {
            let q = lock(&ctx.queues);
            let Some(qp) = q.qps.get(&req.dst_qp.0).filter(|_| !q.closed) else { return Status::NotConnected };
            let connected = qp.peer.is_some_and(|p| p.qp == req.src_qp && p.gid == hello.gid && p.lid == hello.lid);
            if !matches!(qp.state, QpState::Rtr | QpState::Rts) || !connected || u32::from(req.path_mtu) > ACTIVE_MTU {
                return Status::NotConnected;
            }
            let region = q.rkeys.get(&req.rkey).and_then(|lkey| q.mrs.get(lkey));
            let access = region.map(|r| (&r.mr, r.access));
            if rules::check_remote(req.verb, req.remote_addr, req.wr_len, access, qp.access).is_err() {
                drop(q);
                return refused();
            }
            region.expect("checked above").guard.clone()
        };
        let (at, len) = (req.remote_addr + req.offset, req.part_len as usize);
        let copied = if req.carries_data() {
            debug_assert_eq!(payload.len(), len);
            // SAFETY: `[at, at + len)` lies inside the region (checked
            // against its bounds above); its registrant keeps it mapped
            // until it deregisters it, which retires the guard held here
            // first (the contract of `Context::register`). The payload is
            // this thread's buffer, so the two do not overlap.
            guard.with(|| unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), at as *mut u8, len) })
        } else {
            // SAFETY: as above: inside the region, mapped while the guard
            // is held. A raw copy: its registrant (and other peers) may
            // write it meanwhile, and no reference to it is made.
            guard.with(|| unsafe { append_from(out, at, len) })
        };
        if copied.is_some() { Status::Ok } else { refused() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_and_lids_say_where_a_device_listens() {
        let v4: SocketAddr = "10.1.2.3:41000".parse().unwrap();
        let table = gid_table(v4);
        assert_eq!(super::super::super::fabric::choose_gid(&table, None), Ok(1));
        assert_eq!(address_of(&table[1].gid, 41000), Some(v4));
        assert_eq!(address_of(&table[0].gid, 41000), None, "link-local names no listener");
        assert_eq!(address_of(&table[1].gid, 0), None);
        let v6: SocketAddr = "[2001:db8::7]:5000".parse().unwrap();
        assert_eq!(address_of(&gid_table(v6)[1].gid, 5000), Some(v6));
        assert_eq!(address_of(&Gid::default(), 5000), None);
    }
}
