//! The control table a target shares with the peers on its host: which of
//! its memory may be written, and who is writing it right now. This is how
//! the local transport keeps its promise of no late writes.
//!
//! The table lives in a memfd the target creates and hands to each peer
//! (`service.rs`). It holds:
//!
//! - **slots**, one per buffer peers may touch (a registered region, or a
//!   managed buffer): where it is, and a generation that changes whenever
//!   the slot opens or closes. Only the target writes slots.
//! - **lanes**, one per copying thread of a peer: a lane is claimed by a
//!   thread (its owner word holds the peer's pid) and says which slot that
//!   thread is copying into or out of, if any.
//!
//! A peer copies like this: it stores the slot's number in its lane, then
//! checks that the slot is still open with the generation it knows; only
//! then does it copy, and it clears its lane after. The target revokes a
//! slot like this: it closes the slot (bumping its generation), then waits
//! until no lane names it. Both sides use sequentially consistent
//! operations, so either the peer sees the slot closed (and copies
//! nothing), or the target sees the lane (and waits for the copy to end):
//! once `revoke` returns, no byte from any peer lands in that memory. A
//! lane whose owner process has died is cleared by whoever finds it (the
//! target while draining, a peer looking for a free lane), so a peer killed
//! mid-copy holds nothing for long. The wait is bounded by its deadline.
//! The protocol's steps themselves are in `lanes.rs`, where loom checks them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::lanes::{self, SLOT_FREE, SLOT_OPEN, STATE_LIVE, STATE_SHUT_DOWN, Word};

/// "SHWLCT01": the table's layout, version 1.
pub const MAGIC: u64 = 0x5348_574c_4354_3031;
/// Buffers one target can share (a table of 3 MiB, touched only as used).
pub const SLOTS_MAX: u32 = 1 << 16;
/// Copying threads, over all peers, at once.
pub const LANES_MAX: u32 = 1024;

/// What a slot's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Managed memory: in memfd `file` at `offset`; peers map it and copy.
    Shm { file: u32, offset: u64 },
    /// Other registered memory: peers copy with cross-memory attach.
    Cma,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    state: AtomicU32,
    target_pid: AtomicU32,
    /// Slots ever used (peers look at `0..high`).
    high: AtomicU32,
    _pad: AtomicU32,
}

#[repr(C)]
struct Slot {
    generation: AtomicU64,
    state: AtomicU32,
    /// 1 shm, 2 cma.
    kind: AtomicU32,
    addr: AtomicU64,
    len: AtomicU64,
    file: AtomicU64,
    offset: AtomicU64,
}

#[repr(C)]
struct Lane {
    /// `pid << 32 | serial` of the owning thread; 0 when free.
    owner: AtomicU64,
    /// The slot being copied, plus one; 0 when idle.
    busy: AtomicU64,
}

const HEADER_BYTES: usize = std::mem::size_of::<Header>();
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const LANE_BYTES: usize = std::mem::size_of::<Lane>();
/// Bytes of the whole table.
pub const TABLE_BYTES: usize = HEADER_BYTES + SLOT_BYTES * SLOTS_MAX as usize + LANE_BYTES * LANES_MAX as usize;

/// A mapping of the table (the target's, or a peer's).
#[derive(Debug)]
pub struct Table {
    base: *mut u8,
    fd: Arc<OwnedFd>,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the
// pointer stays valid for the life of the value (unmapped in Drop).
unsafe impl Send for Table {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for Table {}

/// What a peer knows of an open slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    pub slot: u32,
    pub generation: u64,
    pub addr: u64,
    pub len: u64,
    pub kind: Kind,
}

impl SlotView {
    /// Whether `[addr, addr + len)` lies inside this slot's buffer.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= self.addr + self.len)
    }
}

/// Whether process `pid` is gone: exited, or a zombie its parent has not
/// reaped yet (it copies nothing any more either way).
pub fn is_dead(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for the process's existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    // "pid (comm) S ...": the state follows the last ')'.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state == 'Z' || state == 'X')
}

fn map(fd: &OwnedFd) -> std::io::Result<*mut u8> {
    // SAFETY: maps a memfd of at least TABLE_BYTES (checked by callers);
    // no existing memory is touched.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TABLE_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED { Err(std::io::Error::last_os_error()) } else { Ok(ptr.cast()) }
}

impl Table {
    /// A new table for the target process `pid`.
    pub fn create(pid: u32) -> std::io::Result<Table> {
        // SAFETY: a plain syscall with a NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"shardwire-local-control".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), TABLE_BYTES as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let base = map(&fd)?;
        let t = Table { base, fd: Arc::new(fd) };
        t.header().target_pid.store(pid, Ordering::Relaxed);
        t.header().state.set(STATE_LIVE, Ordering::Relaxed);
        t.header().magic.store(MAGIC, Ordering::Release);
        Ok(t)
    }

    /// Maps a table a target handed over, checking what it is.
    pub fn attach(fd: OwnedFd) -> std::io::Result<Table> {
        // SAFETY: fstat fills a stat struct for our own descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (st.st_size as usize) < TABLE_BYTES {
            return Err(std::io::Error::other(format!("a control table of {} bytes, not {TABLE_BYTES}", st.st_size)));
        }
        let base = map(&fd)?;
        let t = Table { base, fd: Arc::new(fd) };
        if t.header().magic.load(Ordering::Acquire) != MAGIC {
            return Err(std::io::Error::other("not a shardwire control table (another version?)"));
        }
        Ok(t)
    }

    /// The memfd, to hand to peers.
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header, aligned by mmap.
        unsafe { &*(self.base as *const Header) }
    }

    fn slot(&self, i: u32) -> &Slot {
        assert!(i < SLOTS_MAX);
        // SAFETY: inside the mapping: slots follow the header.
        unsafe { &*(self.base.add(HEADER_BYTES + SLOT_BYTES * i as usize) as *const Slot) }
    }

    fn lane(&self, i: u32) -> &Lane {
        assert!(i < LANES_MAX);
        let at = HEADER_BYTES + SLOT_BYTES * SLOTS_MAX as usize + LANE_BYTES * i as usize;
        // SAFETY: inside the mapping: lanes follow the slots.
        unsafe { &*(self.base.add(at) as *const Lane) }
    }

    /// The target's process.
    pub fn target_pid(&self) -> u32 {
        self.header().target_pid.load(Ordering::Relaxed)
    }

    /// Whether the target is up: not shut down, not dead.
    pub fn target_live(&self) -> bool {
        self.header().state.get(Ordering::Acquire) == STATE_LIVE
    }

    // --- The target's side -------------------------------------------------

    /// Opens slot `i` (free, chosen by the target) for a buffer.
    pub fn open(&self, i: u32, addr: u64, len: u64, kind: Kind) {
        let s = self.slot(i);
        assert_eq!(s.state.get(Ordering::Acquire), SLOT_FREE, "slot {i} is in use");
        s.addr.store(addr, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        let (k, file, offset) = match kind {
            Kind::Shm { file, offset } => (1, u64::from(file), offset),
            Kind::Cma => (2, 0, 0),
        };
        s.kind.store(k, Ordering::Relaxed);
        s.file.store(file, Ordering::Relaxed);
        s.offset.store(offset, Ordering::Relaxed);
        lanes::open(&s.state, &s.generation);
        self.header().high.fetch_max(i + 1, Ordering::SeqCst);
    }

    /// Closes slot `i` and waits, until `deadline`, for every copy into or
    /// out of it to end. `Ok`: no peer touches the buffer again, and the
    /// slot is free for reuse. `Err(n)`: `n` copies still run (the slot
    /// stays closed: no new copy starts; call again to finish).
    pub fn revoke(&self, i: u32, deadline: Instant) -> Result<(), usize> {
        let s = self.slot(i);
        lanes::close(&s.state, &s.generation);
        let mut waited = 0u32;
        loop {
            let busy = self.copies_in(i);
            if busy == 0 {
                lanes::free(&s.state);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(busy);
            }
            waited += 1;
            if waited < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Lanes copying into or out of slot `i` now; a lane whose owner died
    /// is cleared on the way.
    fn copies_in(&self, i: u32) -> usize {
        let mut n = 0;
        for l in 0..LANES_MAX {
            let lane = self.lane(l);
            if !lanes::copying(&lane.busy, i) {
                continue;
            }
            let owner = lane.owner.load(Ordering::SeqCst);
            if owner == 0 || is_dead((owner >> 32) as u32) {
                // Its copy ended with its process.
                let _ = lane.busy.compare_exchange(lanes::busy_mark(i), 0, Ordering::SeqCst, Ordering::SeqCst);
                let _ = lane.owner.compare_exchange(owner, 0, Ordering::SeqCst, Ordering::SeqCst);
                continue;
            }
            n += 1;
        }
        n
    }

    /// Lanes in the middle of a copy (of live or dead owners).
    pub fn busy_lanes(&self) -> usize {
        (0..LANES_MAX).filter(|&l| self.lane(l).busy.load(Ordering::SeqCst) != 0).count()
    }

    /// The target is going away: no copy starts from now on (peers fail,
    /// and, being on this host, fall back to nothing: the target is gone).
    pub fn shut_down(&self) {
        self.header().state.set(STATE_SHUT_DOWN, Ordering::SeqCst);
    }

    // --- A peer's side -----------------------------------------------------

    /// Every open slot, for a peer's cache (`0..high`, read consistently:
    /// a slot that changes while it is read is left out and read next time).
    pub fn open_slots(&self) -> Vec<SlotView> {
        let high = self.header().high.load(Ordering::SeqCst).min(SLOTS_MAX);
        let mut out = Vec::new();
        for i in 0..high {
            let s = self.slot(i);
            if s.state.get(Ordering::SeqCst) != SLOT_OPEN {
                continue;
            }
            let generation = s.generation.load(Ordering::SeqCst);
            let (addr, len) = (s.addr.load(Ordering::Relaxed), s.len.load(Ordering::Relaxed));
            let kind = match s.kind.load(Ordering::Relaxed) {
                1 => {
                    Kind::Shm { file: s.file.load(Ordering::Relaxed) as u32, offset: s.offset.load(Ordering::Relaxed) }
                }
                _ => Kind::Cma,
            };
            if s.state.get(Ordering::SeqCst) == SLOT_OPEN && s.generation.load(Ordering::SeqCst) == generation {
                out.push(SlotView { slot: i, generation, addr, len, kind });
            }
        }
        out.sort_by_key(|v| v.addr);
        out
    }

    /// Claims a free lane for `owner` (`pid << 32 | serial`), reclaiming
    /// the lanes of dead processes when none is free.
    pub fn claim_lane(&self, owner: u64) -> Option<u32> {
        debug_assert!(owner >> 32 != 0);
        for pass in 0..2 {
            for l in 0..LANES_MAX {
                let lane = self.lane(l);
                let now = lane.owner.load(Ordering::SeqCst);
                let free = now == 0 || (pass == 1 && is_dead((now >> 32) as u32));
                if free && lane.owner.compare_exchange(now, owner, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                    lane.busy.store(0, Ordering::SeqCst);
                    return Some(l);
                }
            }
        }
        None
    }

    /// Gives a lane back.
    pub fn release_lane(&self, lane: u32, owner: u64) {
        let l = self.lane(lane);
        l.busy.store(0, Ordering::SeqCst);
        let _ = l.owner.compare_exchange(owner, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Starts a copy on `lane` into or out of `view`'s buffer: `true` if
    /// the slot is still open with the generation the peer knows (the copy
    /// may go; call [`exit`](Self::exit) after it), `false` if it was
    /// revoked (nothing may be copied).
    pub fn enter(&self, lane: u32, view: &SlotView) -> bool {
        let s = self.slot(view.slot);
        lanes::enter(&self.lane(lane).busy, view.slot, &self.header().state, &s.state, &s.generation, view.generation)
    }

    /// The copy on `lane` ended.
    pub fn exit(&self, lane: u32) {
        lanes::exit(&self.lane(lane).busy);
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create` or `attach`, not used after.
        unsafe { libc::munmap(self.base.cast(), TABLE_BYTES) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(serial: u32) -> u64 {
        (u64::from(std::process::id()) << 32) | u64::from(serial)
    }

    #[test]
    fn a_revoked_slot_takes_no_new_copy_and_waits_for_the_running_one() {
        let target = Table::create(std::process::id()).unwrap();
        let peer = Table::attach(target.fd().try_clone().unwrap()).unwrap();
        target.open(3, 0x1000, 4096, Kind::Cma);
        let views = peer.open_slots();
        assert_eq!(views.len(), 1);
        let v = views[0];
        assert!(v.contains(0x1800, 16) && !v.contains(0x1ff0, 32));
        let lane = peer.claim_lane(owner(1)).unwrap();
        assert!(peer.enter(lane, &v), "open: the copy may go");
        // The target revokes while the copy runs: it must wait for it.
        let soon = Instant::now() + Duration::from_millis(30);
        assert_eq!(target.revoke(3, soon), Err(1));
        assert!(!peer.enter(peer.claim_lane(owner(2)).unwrap(), &v), "closed: no new copy starts");
        peer.exit(lane);
        assert_eq!(target.revoke(3, Instant::now() + Duration::from_secs(1)), Ok(()));
        // Reopened for another buffer: the old view's generation is stale.
        target.open(3, 0x1000, 4096, Kind::Shm { file: 2, offset: 64 });
        assert!(!peer.enter(lane, &v), "a stale generation copies nothing");
        let fresh = peer.open_slots()[0];
        assert_eq!(fresh.kind, Kind::Shm { file: 2, offset: 64 });
        assert!(peer.enter(lane, &fresh));
        peer.exit(lane);
        target.shut_down();
        assert!(!peer.enter(lane, &fresh), "a target shut down takes no copy");
    }

    #[test]
    fn lanes_of_dead_processes_are_reclaimed() {
        let target = Table::create(std::process::id()).unwrap();
        target.open(0, 0x1000, 4096, Kind::Cma);
        let v = target.open_slots()[0];
        // A child claims a lane, starts a copy, and dies in the middle of it.
        // SAFETY: the child only touches the shared table and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let me = (u64::from(std::process::id()) << 32) | 1;
            let lane = target.claim_lane(me).unwrap();
            let _ = target.enter(lane, &v);
            // SAFETY: leaves the child at once, busy lane and all.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(target.revoke(0, Instant::now() + Duration::from_secs(5)), Ok(()), "the dead copy holds nothing");
        // Every lane claimed by the living, then one more: a dead one is taken.
        for i in 0..LANES_MAX {
            let l = target.claim_lane(owner(10 + i));
            assert!(l.is_some() || i == LANES_MAX - 1, "lane {i}");
        }
    }

    #[test]
    fn the_wrong_memfd_is_refused() {
        // SAFETY: a plain syscall; wrapped at once.
        let raw = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        assert!(Table::attach(fd.try_clone().unwrap()).is_err(), "too small");
        // SAFETY: sizes our own memfd.
        unsafe { libc::ftruncate(fd.as_raw_fd(), TABLE_BYTES as libc::off_t) };
        assert!(Table::attach(fd).is_err(), "no magic");
    }
}
