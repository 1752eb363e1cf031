//! Parking a shard on its eventfd, and waking it only when it is parked.
//!
//! The protocol is a Dekker pair of fenced store-then-load sequences:
//!
//! ```text
//!   shard (about to park)            producer (after pushing work)
//!   parked = true                    ring.tail = t        (Release)
//!   fence(SeqCst)                    fence(SeqCst)
//!   look at every inbound ring       if parked: swap(false) and write eventfd
//! ```
//!
//! At least one side sees the other's store: either the shard sees the work
//! and does not park, or the producer sees `parked` and writes the eventfd,
//! which completes the shard's pending read and ends its wait. The swap makes
//! one producer, not all of them, pay for the syscall.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

use crossbeam_utils::CachePadded;

pub(crate) struct Parker {
    parked: CachePadded<AtomicBool>,
    eventfd: OwnedFd,
    /// Eventfd writes, by producers and by shutdown.
    wake_writes: AtomicU64,
}

impl Parker {
    pub(crate) fn new() -> std::io::Result<Self> {
        // SAFETY: plain syscall; a blocking eventfd lets io_uring's read wait
        // on it with fast poll.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { parked: CachePadded::new(AtomicBool::new(false)), eventfd, wake_writes: AtomicU64::new(0) })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Shard side: announces the intent to park. The caller then re-checks
    /// its inbound rings and parks only if they are all empty.
    pub(crate) fn begin_park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Shard side: back to running.
    pub(crate) fn end_park(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Producer side, after work was made visible and a SeqCst fence was
    /// issued: wakes the shard if it is parked. Returns whether it wrote.
    #[inline]
    pub(crate) fn wake_if_parked_after_fence(&self) -> bool {
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            self.write();
            return true;
        }
        false
    }

    /// Unconditional wake (shutdown).
    pub(crate) fn wake(&self) {
        self.parked.store(false, Ordering::Relaxed);
        self.write();
    }

    fn write(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. It can
        // only fail if the counter would overflow (2^64 - 2 pending wakes),
        // which the shard's read resets long before.
        let n = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        debug_assert_eq!(n, 8, "eventfd write failed: {}", std::io::Error::last_os_error());
        self.wake_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn wake_writes(&self) -> u64 {
        self.wake_writes.load(Ordering::Relaxed)
    }
}
