//! Socket set-up: listeners on a chosen or random port, and client sockets
//! ready for an io_uring connect.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd};

/// Mooncake's default random-port range.
pub const PORT_RANGE_DEFAULT: (u16, u16) = (15000, 17000);
/// How many random ports to try before giving up (Mooncake tries 500).
pub const PORT_ATTEMPTS_MAX: usize = 500;

/// The address to bind when none is configured: every interface, IPv6 and
/// IPv4 (a dual-stack socket), as Mooncake listens.
pub fn any_address() -> IpAddr {
    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
}

/// Binds a listener on `ip`: on `port` if given (and not 0), otherwise on a
/// random free port of `range`.
pub fn bind_listener(ip: IpAddr, port: Option<u16>, range: (u16, u16)) -> io::Result<TcpListener> {
    if let Some(port) = port.filter(|&p| p != 0) {
        return bind_one(ip, port);
    }
    let span = u32::from(range.1 - range.0) + 1;
    let mut seed = random_seed();
    let mut last = None;
    for _ in 0..PORT_ATTEMPTS_MAX {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = range.0 + (seed % u64::from(span)) as u16;
        match bind_one(ip, port) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "no free port in {}..={} after {PORT_ATTEMPTS_MAX} tries (last error: {})",
            range.0,
            range.1,
            last.map_or_else(|| "none".into(), |e| e.to_string())
        ),
    ))
}

fn bind_one(ip: IpAddr, port: u16) -> io::Result<TcpListener> {
    match TcpListener::bind(SocketAddr::new(ip, port)) {
        // A kernel without IPv6: the IPv4 wildcard instead.
        Err(e) if ip == any_address() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
        }
        other => other,
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    (nanos ^ (u64::from(std::process::id()) << 32) ^ (&local as *const u8 as u64)) | 1
}

/// Whether `ip` belongs to this host (loopback, or an address of one of
/// its interfaces): only a local address can be bound.
pub fn is_local_ip(ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// A new TCP socket for `peer`, with TCP_NODELAY, not yet connected.
pub fn client_socket(peer: &SocketAddr) -> io::Result<OwnedFd> {
    let family = if peer.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the descriptor is wrapped at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_nodelay(&fd)?;
    Ok(fd)
}

/// Turns off Nagle: requests and status frames are small and latency-bound.
pub fn set_nodelay(fd: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: passes a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Sets SO_RCVLOWAT: readiness (and wake-ups) wait for this many bytes.
pub fn set_rcvlowat(fd: i32, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: passes a live c_int of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Shuts both directions of a socket, which makes the kernel fail any
/// operation waiting on it; used to abort a connection with ops in flight.
pub fn shutdown_both(fd: &impl std::os::fd::AsRawFd) {
    // SAFETY: plain syscall on a descriptor we own; errors (ENOTCONN) are
    // harmless here.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// A socket address in the kernel's layout, for an io_uring connect.
pub struct RawSockAddr {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

impl RawSockAddr {
    pub fn new(addr: &SocketAddr) -> Box<Self> {
        // SAFETY: sockaddr_storage is plain data; zeroed is valid.
        let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_storage is large and aligned enough for
                // any sockaddr, sockaddr_in included.
                let sin = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_scope_id = a.scope_id();
                size_of::<libc::sockaddr_in6>()
            }
        };
        Box::new(Self { storage, len: len as libc::socklen_t })
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_and_fixed_ports() {
        let a = bind_listener(IpAddr::V4(Ipv4Addr::LOCALHOST), None, PORT_RANGE_DEFAULT).unwrap();
        let port = a.local_addr().unwrap().port();
        assert!((15000..=17000).contains(&port));
        let err = bind_listener(IpAddr::V4(Ipv4Addr::LOCALHOST), Some(port), PORT_RANGE_DEFAULT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "a fixed port is honoured, not replaced");
        let b = bind_listener(any_address(), None, (16000, 16100)).unwrap();
        assert!((16000..=16100).contains(&b.local_addr().unwrap().port()));
    }

    #[test]
    fn raw_sockaddr_layout() {
        let v4 = RawSockAddr::new(&"127.0.0.1:4660".parse().unwrap());
        assert_eq!(v4.len as usize, size_of::<libc::sockaddr_in>());
        // SAFETY: reading back what new() wrote, as sockaddr_in.
        let sin = unsafe { &*(&v4.storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        assert_eq!(u16::from_be(sin.sin_port), 4660);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 1]);
        let v6 = RawSockAddr::new(&"[::1]:80".parse().unwrap());
        assert_eq!(v6.len as usize, size_of::<libc::sockaddr_in6>());
    }
}
