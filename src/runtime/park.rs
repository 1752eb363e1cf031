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
//!
//! [`ParkFlag`] is that protocol without the eventfd, so that loom can check
//! it (the `loom` tests below: a lost wake-up is the failure they look for);
//! [`Parker`] adds the eventfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

use crossbeam_utils::CachePadded;

use crate::sync::atomic::{AtomicBool, Ordering, fence};

/// The `parked` word of the protocol above.
pub(crate) struct ParkFlag {
    parked: CachePadded<AtomicBool>,
}

impl ParkFlag {
    pub(crate) fn new() -> Self {
        Self { parked: CachePadded::new(AtomicBool::new(false)) }
    }

    /// Shard side: announces the intent to park. The caller then re-checks
    /// its inbound rings and parks only if they are all empty.
    #[inline]
    pub(crate) fn begin_park(&self) {
        self.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Shard side: back to running.
    #[inline]
    pub(crate) fn end_park(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Producer side, after work was made visible and a SeqCst fence was
    /// issued ([`producer_fence`]): whether the caller must wake the shard.
    /// Of the producers that see the shard parked, one wins the swap.
    #[inline]
    pub(crate) fn take_wake_after_fence(&self) -> bool {
        self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel)
    }

    /// Shutdown: the shard is to run (and see `stop`), parked or not.
    pub(crate) fn clear(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }
}

/// Producer side: the fence between making work visible (a ring's tail)
/// and reading `parked`. One fence covers every ring pushed to since.
#[inline]
pub(crate) fn producer_fence() {
    fence(Ordering::SeqCst);
}

pub(crate) struct Parker {
    flag: ParkFlag,
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
        Ok(Self { flag: ParkFlag::new(), eventfd, wake_writes: AtomicU64::new(0) })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Shard side: see [`ParkFlag::begin_park`].
    pub(crate) fn begin_park(&self) {
        self.flag.begin_park();
    }

    /// Shard side: back to running.
    pub(crate) fn end_park(&self) {
        self.flag.end_park();
    }

    /// Producer side, after work was made visible and a SeqCst fence was
    /// issued ([`producer_fence`]): wakes the shard if it is parked.
    /// Returns whether it wrote.
    #[inline]
    pub(crate) fn wake_if_parked_after_fence(&self) -> bool {
        if self.flag.take_wake_after_fence() {
            self.write();
            return true;
        }
        false
    }

    /// Unconditional wake (shutdown).
    pub(crate) fn wake(&self) {
        self.flag.clear();
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

/// Model checks (`RUSTFLAGS="--cfg loom" cargo test --profile loom --lib
/// loom`): the shard's park and a producer's push-then-wake, over a real
/// ring, never both miss. Each fails if a fence goes: without the one in
/// `begin_park` (or `producer_fence`) loom finds the run where the shard
/// sees an empty ring and the producer sees it running, a lost wake-up.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::runtime::spsc;
    use crate::sync::Arc;
    use crate::sync::atomic::AtomicUsize;
    use loom::thread;

    /// The shard's side of one park attempt: announce, look at the ring;
    /// true if it found work (and so did not park).
    fn try_park(flag: &ParkFlag, ring: &mut spsc::Consumer<u32>) -> bool {
        flag.begin_park();
        if ring.has_pending() {
            flag.end_park();
            return true;
        }
        false
    }

    #[test]
    fn loom_a_push_is_seen_or_wakes_the_shard() {
        crate::sync::model(|| {
            let flag = Arc::new(ParkFlag::new());
            let (mut tx, mut rx) = spsc::channel::<u32>(2);
            let producer = {
                let flag = flag.clone();
                thread::spawn(move || {
                    tx.push_unchecked(7).unwrap();
                    producer_fence();
                    flag.take_wake_after_fence()
                })
            };
            let saw_work = try_park(&flag, &mut rx);
            let woke = producer.join().unwrap();
            assert!(saw_work || woke, "lost wake-up: the shard parked with work in its ring");
        });
    }

    /// Two producers on their own rings (the mesh's shape): the shard is
    /// woken by at most one of them (one eventfd write), and not missed.
    #[test]
    fn loom_of_two_producers_at_most_one_writes() {
        crate::sync::model(|| {
            let flag = Arc::new(ParkFlag::new());
            let writes = Arc::new(AtomicUsize::new(0));
            let mut rings = Vec::new();
            let mut producers = Vec::new();
            for value in 0..2u32 {
                let (mut tx, rx) = spsc::channel::<u32>(2);
                rings.push(rx);
                let (flag, writes) = (flag.clone(), writes.clone());
                producers.push(thread::spawn(move || {
                    tx.push_unchecked(value).unwrap();
                    producer_fence();
                    if flag.take_wake_after_fence() {
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            flag.begin_park();
            let saw_work = rings.iter_mut().any(|r| r.has_pending());
            if saw_work {
                flag.end_park();
            }
            for p in producers {
                p.join().unwrap();
            }
            let writes = writes.load(Ordering::Relaxed);
            assert!(writes <= 1, "{writes} eventfd writes for one park");
            assert!(saw_work || writes == 1, "lost wake-up with two producers");
        });
    }
}
