//! Registered memory: the regions a peer may read and write, and that local
//! transfers may use.
//!
//! Every byte a transfer moves, on either side, lies inside one registered
//! region, and the region is *pinned* (an in-flight count) while an
//! operation uses it. Unregistering a region first closes it to new pins,
//! then waits for the pins to drain, so memory is never freed under an
//! operation the kernel is still carrying out. (Mooncake removes the region
//! at once and lets in-flight writes land wherever they land.)
//!
//! Part of a region can be withdrawn too (a managed buffer freed inside a
//! slab that stays registered): no new pin reaches into it, and
//! [`Registry::withdraw`] returns once the pins taken before it have gone.
//! Pins count by epoch for that: a withdrawal moves the epoch on (twice)
//! and waits for the older pins only, so traffic that starts elsewhere in
//! the slab meanwhile does not hold it up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::error::{TeError, TeResult, code};

/// Most regions one engine registers.
pub const REGIONS_MAX: usize = 1 << 20;

/// One registered region.
#[derive(Debug)]
pub struct Region {
    pub addr: u64,
    pub len: u64,
    /// `cpu:0`, `cuda:1`, or `*`, as given at registration.
    pub location: String,
    closing: AtomicBool,
    /// Pins by the parity of the epoch they were taken in (their sum is
    /// every pin: one count per pin, not two).
    by_epoch: [AtomicUsize; 2],
    epoch: AtomicUsize,
    /// Withdrawn parts, `(addr, len)`, disjoint; `has_holes` spares pins
    /// the lock while there are none.
    holes: RwLock<Vec<(u64, u64)>>,
    has_holes: AtomicBool,
}

/// Withdrawn parts one region may have at once.
pub const HOLES_MAX: usize = 1 << 16;

impl Region {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    pub fn contains(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }

    /// Operations currently using the region.
    pub fn in_flight(&self) -> usize {
        self.by_epoch[0].load(Ordering::SeqCst) + self.by_epoch[1].load(Ordering::SeqCst)
    }

    fn new(addr: u64, len: u64, location: &str) -> Region {
        Region {
            addr,
            len,
            location: location.to_string(),
            closing: AtomicBool::new(false),
            by_epoch: [AtomicUsize::new(0), AtomicUsize::new(0)],
            epoch: AtomicUsize::new(0),
            holes: RwLock::new(Vec::new()),
            has_holes: AtomicBool::new(false),
        }
    }

    /// Whether `[addr, addr + len)` reaches into a withdrawn part.
    fn in_hole(&self, addr: u64, len: u64) -> bool {
        if !self.has_holes.load(Ordering::SeqCst) {
            return false;
        }
        let holes = self.holes.read().unwrap_or_else(|e| e.into_inner());
        holes.iter().any(|&(a, l)| addr < a + l && a < addr + len)
    }
}

/// Keeps a region from being unregistered while an operation uses it.
#[derive(Debug)]
pub struct Pin {
    region: Arc<Region>,
    /// The parity of the epoch it was taken in.
    epoch: usize,
}

impl Pin {
    pub fn region(&self) -> &Region {
        &self.region
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.region.by_epoch[self.epoch].fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine's regions, keyed by start address.
#[derive(Debug, Default)]
pub struct Registry {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Arc<Region>>> {
        self.regions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Arc<Region>>> {
        self.regions.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `[addr, addr + len)`.
    pub fn register(&self, addr: u64, len: u64, location: &str) -> TeResult<()> {
        self.register_batch(&[(addr, len)], location)
    }

    /// Registers several regions, all or none: each is checked against the
    /// existing regions and against the others first.
    pub fn register_batch(&self, items: &[(u64, u64)], location: &str) -> TeResult<()> {
        let mut sorted = items.to_vec();
        sorted.sort_unstable();
        for &(addr, len) in &sorted {
            check_range(addr, len)?;
        }
        for pair in sorted.windows(2) {
            if pair[0].0 + pair[0].1 > pair[1].0 {
                return Err(overlap(pair[1].0, pair[1].1, pair[0].0, pair[0].1));
            }
        }
        let mut regions = self.write();
        if regions.len() + sorted.len() > REGIONS_MAX {
            return Err(TeError::new(code::TOO_MANY_REQUESTS, format!("more than {REGIONS_MAX} registered regions")));
        }
        for &(addr, len) in &sorted {
            if let Some(existing) = overlapping(&regions, addr, len) {
                return Err(overlap(addr, len, existing.addr, existing.len));
            }
        }
        for &(addr, len) in &sorted {
            regions.insert(addr, Arc::new(Region::new(addr, len, location)));
        }
        Ok(())
    }

    /// Unregisters the region that starts at `addr`. New operations on it are
    /// refused at once; operations in flight get up to `drain` to finish,
    /// after which the region stays registered and `BATCH_BUSY` comes back.
    pub fn unregister(&self, addr: u64, drain: Duration) -> TeResult<()> {
        let region = self
            .read()
            .get(&addr)
            .cloned()
            .ok_or_else(|| TeError::new(code::ADDRESS_NOT_REGISTERED, format!("no region starts at {addr:#x}")))?;
        if region.closing.swap(true, Ordering::SeqCst) {
            return Err(TeError::new(code::BATCH_BUSY, format!("region {addr:#x} is already being unregistered")));
        }
        fence(Ordering::SeqCst);
        let deadline = Instant::now() + drain;
        while region.in_flight() > 0 {
            if Instant::now() >= deadline {
                region.closing.store(false, Ordering::SeqCst);
                return Err(TeError::new(
                    code::BATCH_BUSY,
                    format!("region {addr:#x} still has {} transfers in flight", region.in_flight()),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.write().remove(&addr);
        Ok(())
    }

    /// Pins the region holding all of `[addr, addr + len)`, if there is one
    /// and it is not being unregistered.
    pub fn pin(&self, addr: u64, len: u64) -> Option<Pin> {
        let region = {
            let regions = self.read();
            let (_, region) = regions.range(..=addr).next_back()?;
            if !region.contains(addr, len) {
                return None;
            }
            region.clone()
        };
        let epoch = region.epoch.load(Ordering::SeqCst) & 1;
        region.by_epoch[epoch].fetch_add(1, Ordering::SeqCst);
        // Pairs with the fences in `unregister` and `withdraw`: either they
        // see our count, or we see their `closing` or hole.
        if region.closing.load(Ordering::SeqCst) || region.in_hole(addr, len) {
            region.by_epoch[epoch].fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pin { region, epoch })
    }

    /// Withdraws `[addr, addr + len)`, part of a registered region: new
    /// pins reaching into it are refused at once, and this returns when
    /// the pins taken before have gone (up to `drain`; then the part is
    /// given back and `BATCH_BUSY` returned).
    pub fn withdraw(&self, addr: u64, len: u64, drain: Duration) -> TeResult<()> {
        let region = self.region_of(addr, len)?;
        {
            let mut holes = region.holes.write().unwrap_or_else(|e| e.into_inner());
            if holes.iter().any(|&(a, l)| addr < a + l && a < addr + len) {
                return Err(TeError::new(code::BATCH_BUSY, format!("[{addr:#x}, +{len}) is withdrawn already")));
            }
            if holes.len() >= HOLES_MAX {
                return Err(TeError::new(code::TOO_MANY_REQUESTS, format!("{HOLES_MAX} parts withdrawn already")));
            }
            holes.push((addr, len));
            region.has_holes.store(true, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        // Two flips, as in SRCU: the first drains the pins of the epoch now
        // ending; the second those left in the other parity from before
        // (an earlier withdrawal that gave up) and the few taken between
        // the flips. Pins taken after the second flip are not waited for.
        let deadline = Instant::now() + drain;
        for _ in 0..2 {
            let old = region.epoch.fetch_add(1, Ordering::SeqCst) & 1;
            while region.by_epoch[old].load(Ordering::SeqCst) > 0 {
                if Instant::now() >= deadline {
                    self.restore(addr, len);
                    return Err(TeError::new(
                        code::BATCH_BUSY,
                        format!("[{addr:#x}, +{len}) still has transfers in flight"),
                    ));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    /// Gives back what was withdrawn of `[addr, addr + len)` (a buffer
    /// allocated again there).
    pub fn restore(&self, addr: u64, len: u64) {
        let Ok(region) = self.region_of(addr, len) else { return };
        let mut holes = region.holes.write().unwrap_or_else(|e| e.into_inner());
        let end = addr + len;
        let mut kept = Vec::with_capacity(holes.len() + 1);
        for &(a, l) in holes.iter() {
            let e = a + l;
            if e <= addr || a >= end {
                kept.push((a, l));
                continue;
            }
            if a < addr {
                kept.push((a, addr - a));
            }
            if e > end {
                kept.push((end, e - end));
            }
        }
        region.has_holes.store(!kept.is_empty(), Ordering::SeqCst);
        *holes = kept;
    }

    fn region_of(&self, addr: u64, len: u64) -> TeResult<Arc<Region>> {
        let regions = self.read();
        match regions.range(..=addr).next_back() {
            Some((_, r)) if r.contains(addr, len) => Ok(r.clone()),
            _ => Err(TeError::new(code::ADDRESS_NOT_REGISTERED, format!("[{addr:#x}, +{len}) is not registered"))),
        }
    }

    /// Whether `[addr, addr + len)` lies inside one registered region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let regions = self.read();
        regions.range(..=addr).next_back().is_some_and(|(_, r)| r.contains(addr, len))
    }

    /// `(addr, len)` of every region, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.read().values().map(|r| (r.addr, r.len)).collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check_range(addr: u64, len: u64) -> TeResult<()> {
    if len == 0 {
        return Err(TeError::invalid(format!("cannot register zero bytes at {addr:#x}")));
    }
    if addr == 0 {
        return Err(TeError::invalid("cannot register the null address"));
    }
    if addr.checked_add(len).is_none() {
        return Err(TeError::invalid(format!("{addr:#x} + {len} wraps around the address space")));
    }
    Ok(())
}

fn overlap(addr: u64, len: u64, other: u64, other_len: u64) -> TeError {
    TeError::new(
        code::ADDRESS_OVERLAPPED,
        format!("[{addr:#x}, +{len}) overlaps the registered region [{other:#x}, +{other_len})"),
    )
}

fn overlapping(regions: &BTreeMap<u64, Arc<Region>>, addr: u64, len: u64) -> Option<Arc<Region>> {
    let end = addr + len;
    if let Some((_, before)) = regions.range(..=addr).next_back()
        && before.end() > addr
    {
        return Some(before.clone());
    }
    regions.range(addr..end).next().map(|(_, r)| r.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_overlap_and_zero_length() {
        let r = Registry::new();
        r.register(0x1000, 0x1000, "cpu:0").unwrap();
        assert_eq!(r.register(0x1800, 0x100, "*").unwrap_err().code(), code::ADDRESS_OVERLAPPED);
        assert_eq!(r.register(0x0800, 0x1000, "*").unwrap_err().code(), code::ADDRESS_OVERLAPPED);
        assert_eq!(r.register(0x0000_0800, 0x4000, "*").unwrap_err().code(), code::ADDRESS_OVERLAPPED);
        assert_eq!(r.register(0x3000, 0, "*").unwrap_err().code(), code::INVALID_ARGUMENT);
        assert_eq!(r.register(0, 10, "*").unwrap_err().code(), code::INVALID_ARGUMENT);
        assert_eq!(r.register(u64::MAX - 1, 10, "*").unwrap_err().code(), code::INVALID_ARGUMENT);
        r.register(0x2000, 0x1000, "*").expect("adjacent regions are fine");
        assert_eq!(r.ranges(), vec![(0x1000, 0x1000), (0x2000, 0x1000)]);
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let r = Registry::new();
        r.register(0x9000, 0x100, "*").unwrap();
        let err = r.register_batch(&[(0x1000, 0x100), (0x2000, 0x100), (0x9080, 0x10)], "*").unwrap_err();
        assert_eq!(err.code(), code::ADDRESS_OVERLAPPED);
        assert_eq!(r.len(), 1, "nothing of the failed batch stayed");
        let err = r.register_batch(&[(0x1000, 0x200), (0x1100, 0x10)], "*").unwrap_err();
        assert_eq!(err.code(), code::ADDRESS_OVERLAPPED, "overlap within the batch");
        r.register_batch(&[(0x2000, 0x100), (0x1000, 0x100)], "*").unwrap();
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn unregister_unknown_is_not_registered() {
        let r = Registry::new();
        assert_eq!(r.unregister(0x1000, Duration::ZERO).unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
        r.register(0x1000, 0x100, "*").unwrap();
        assert_eq!(r.unregister(0x1001, Duration::ZERO).unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
        r.unregister(0x1000, Duration::ZERO).unwrap();
        assert!(r.is_empty());
    }

    #[test]
    fn a_withdrawn_part_takes_no_new_pin_and_waits_only_for_older_pins() {
        let r = Arc::new(Registry::new());
        r.register(0x10000, 0x10000, "*").unwrap();
        let inside = r.pin(0x11000, 0x100).unwrap();
        // Busy: a pin taken before it is still held (twice: the pin is
        // older than both withdrawals' epochs, and must still be waited for).
        assert_eq!(r.withdraw(0x11000, 0x1000, Duration::from_millis(5)).unwrap_err().code(), code::BATCH_BUSY);
        assert_eq!(r.withdraw(0x11000, 0x1000, Duration::from_millis(5)).unwrap_err().code(), code::BATCH_BUSY);
        assert!(r.pin(0x11000, 1).is_some(), "a busy withdrawal gives the part back");
        let epoch = |r: &Registry| r.read().get(&0x10000).unwrap().epoch.load(Ordering::SeqCst);
        let start = epoch(&r);
        let r2 = r.clone();
        let t = std::thread::spawn(move || r2.withdraw(0x11000, 0x1000, Duration::from_secs(30)));
        // Both flips done: the withdrawal waits on the older pin alone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while epoch(&r) < start + 2 {
            assert!(Instant::now() < deadline, "the withdrawal never moved the epoch on");
            std::thread::yield_now();
        }
        assert!(r.pin(0x11800, 0x10).is_none(), "the part is withdrawn while it waits");
        // Pins taken since, elsewhere in the region, do not hold it up:
        // only the older one does.
        let newer = r.pin(0x18000, 0x100).unwrap();
        assert!(!t.is_finished());
        drop(inside);
        t.join().unwrap().unwrap();
        assert!(r.pin(0x11800, 0x10).is_none(), "nothing reaches into the withdrawn part");
        assert!(r.pin(0x10f00, 0x200).is_none(), "nor across its edge");
        assert!(r.pin(0x12000, 0x10).is_some(), "the rest of the region is served");
        assert_eq!(r.withdraw(0x11800, 0x10, Duration::ZERO).unwrap_err().code(), code::BATCH_BUSY);
        // Allocated again in part: that part is served, the rest not.
        r.restore(0x11000, 0x800);
        assert!(r.pin(0x11000, 0x800).is_some());
        assert!(r.pin(0x11800, 0x10).is_none());
        r.restore(0x11800, 0x800);
        assert!(r.pin(0x11800, 0x10).is_some());
        drop(newer);
        r.unregister(0x10000, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn pins_hold_off_unregister_and_block_new_pins_while_closing() {
        let r = Arc::new(Registry::new());
        r.register(0x1000, 0x1000, "*").unwrap();
        assert!(r.pin(0x1fff, 2).is_none(), "runs past the region");
        let pin = r.pin(0x1800, 0x10).unwrap();
        assert_eq!(pin.region().in_flight(), 1);
        assert_eq!(r.unregister(0x1000, Duration::from_millis(5)).unwrap_err().code(), code::BATCH_BUSY);
        assert!(r.contains(0x1000, 1), "still registered after a busy unregister");
        let r2 = r.clone();
        let t = std::thread::spawn(move || r2.unregister(0x1000, Duration::from_secs(10)));
        while !r.read().get(&0x1000).unwrap().closing.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        assert!(r.pin(0x1000, 1).is_none(), "no new pins while closing");
        drop(pin);
        t.join().unwrap().unwrap();
        assert!(!r.contains(0x1000, 1));
    }
}
