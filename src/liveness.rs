//! How a TCP connection notices a peer whose host vanished without a word.
//!
//! A peer that exits or restarts closes its sockets, and the kernel tells
//! this end (a FIN or a reset). A peer whose host loses power, or is cut
//! off from the network, tells nothing: a connection that is idle then
//! waits for ever, and one with bytes in flight retransmits for about 15
//! minutes (`tcp_retries2`) before the kernel gives up. Every TCP socket
//! shardwire opens or accepts (data connections both ways, object
//! streams, metadata clients) is set up here so both end within about one
//! timeout of the peer's last sign of life:
//!
//! - `TCP_USER_TIMEOUT`: bytes sent and not acknowledged for `timeout`
//!   end the connection (`ETIMEDOUT`) however many retransmissions that
//!   is; with keepalive on, it also bounds the probing of an idle one;
//! - keepalive: an idle connection is probed after `timeout / 2` of
//!   silence, then every `timeout / 6` (at least 1 s each), and given up
//!   once probes go unanswered for the user timeout, so an idle
//!   connection to a vanished host ends between one and about 1.2
//!   timeouts after its last byte.
//!
//! A peer that is alive but slow is not affected: its kernel acknowledges
//! what arrives and answers probes whatever its application does. The
//! timeout is the caller's: `MC_TRANSFER_TIMEOUT` for transfers and
//! metadata calls, the stream's I/O timeouts for streams.

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The shortest timeout taken: the kernel counts keepalive in seconds.
const TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// The longest (`TCP_USER_TIMEOUT` is an int of milliseconds; keepalive
/// times are at most 32767 s).
const TIMEOUT_MAX: Duration = Duration::from_secs(32_767);

/// A connection's liveness settings, derived from one timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Unacknowledged bytes (or unanswered probes) end the connection
    /// after this long.
    pub user_timeout: Duration,
    /// Silence before the first keepalive probe.
    pub idle: Duration,
    /// Between probes.
    pub interval: Duration,
    /// Probes unanswered before the kernel gives up (reached only if the
    /// user timeout were not in force: enough to cover it).
    pub probes: u32,
}

impl Liveness {
    /// The settings for peers that must show life within `timeout`
    /// (clamped to 1..=32767 s).
    pub fn for_timeout(timeout: Duration) -> Self {
        let t = timeout.clamp(TIMEOUT_MIN, TIMEOUT_MAX);
        // Keepalive counts whole seconds.
        let whole = |d: Duration| Duration::from_secs(d.as_secs()).max(TIMEOUT_MIN);
        let (idle, interval) = (whole(t / 2), whole(t / 6));
        // Probes after the idle time until the user timeout, and one more.
        let probes = (t.saturating_sub(idle).as_millis() / interval.as_millis()).min(126) as u32 + 1;
        let l = Self { user_timeout: t, idle, interval, probes };
        l.check();
        l
    }

    fn check(&self) {
        assert!(self.idle >= TIMEOUT_MIN && self.interval >= TIMEOUT_MIN);
        assert!(self.idle.subsec_nanos() == 0 && self.interval.subsec_nanos() == 0, "keepalive counts whole seconds");
        assert!(self.idle <= self.user_timeout && self.user_timeout <= TIMEOUT_MAX);
        assert!((1..=127).contains(&self.probes), "TCP_KEEPCNT is at most 127");
        // Without the user timeout, the probes alone still end it in time.
        assert!(self.idle + self.interval * self.probes >= self.user_timeout);
    }

    /// Sets keepalive and the user timeout on a TCP socket (connected or
    /// not; an accepted one too).
    pub fn apply(&self, fd: &impl AsRawFd) -> io::Result<()> {
        let fd = fd.as_raw_fd();
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, self.idle.as_secs() as libc::c_int)?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, self.interval.as_secs() as libc::c_int)?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, self.probes as libc::c_int)?;
        set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, self.user_timeout.as_millis() as libc::c_int)
    }

    /// [`Liveness::apply`], logging rather than failing: a socket without
    /// it still works, and only a vanished host then takes longer to see.
    pub fn apply_or_log(&self, fd: &impl AsRawFd, what: &str) {
        if let Err(e) = self.apply(fd) {
            log::debug!("{what}: no keepalive or TCP_USER_TIMEOUT ({e}); a vanished peer is seen only by timeouts");
        }
    }
}

fn set(fd: i32, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a live c_int of the size given; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), size_of::<libc::c_int>() as u32)
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The value of an int option of a socket (tests, diagnostics).
pub fn get(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len) };
    if r == 0 { Ok(value) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_the_timeout() {
        let l = Liveness::for_timeout(Duration::from_secs(30));
        assert_eq!(
            l,
            Liveness {
                user_timeout: Duration::from_secs(30),
                idle: Duration::from_secs(15),
                interval: Duration::from_secs(5),
                probes: 4
            }
        );
        // Short and absurd timeouts stay within what the kernel takes.
        for t in [Duration::ZERO, Duration::from_millis(300), Duration::from_secs(1), Duration::from_secs(3)] {
            let l = Liveness::for_timeout(t);
            assert!(l.idle >= Duration::from_secs(1) && l.interval >= Duration::from_secs(1), "{t:?}: {l:?}");
            assert!(l.user_timeout >= Duration::from_secs(1), "{t:?}: {l:?}");
        }
        let long = Liveness::for_timeout(Duration::from_secs(86_400));
        assert_eq!(long.user_timeout, Duration::from_secs(32_767));
        assert!(long.probes <= 127);
    }

    #[test]
    fn a_socket_takes_them() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let l = Liveness::for_timeout(Duration::from_secs(7));
        l.apply(&s).unwrap();
        assert_eq!(get(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE).unwrap(), 1);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT).unwrap(), 7000);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE).unwrap(), 3);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL).unwrap(), 1);
        assert_eq!(get(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT).unwrap(), l.probes as i32);
    }
}
