//! Registered memory: the regions a peer may read and write, and that local
//! transfers may use.
//!
//! Every byte a transfer moves, on either side, lies inside one registered
//! region, and the region is *pinned* (an in-flight count) while an
//! operation uses it. Unregistering a region first closes it to new pins,
//! then waits for the pins to drain, so memory is never freed under an
//! operation the kernel is still carrying out. (Mooncake removes the region
//! at once and lets in-flight writes land wherever they land.)

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
    in_flight: AtomicUsize,
    closing: AtomicBool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    pub fn contains(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr >= self.addr && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }

    /// Operations currently using the region.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Keeps a region from being unregistered while an operation uses it.
#[derive(Debug)]
pub struct Pin {
    region: Arc<Region>,
}

impl Pin {
    pub fn region(&self) -> &Region {
        &self.region
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.region.in_flight.fetch_sub(1, Ordering::AcqRel);
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
            regions.insert(
                addr,
                Arc::new(Region {
                    addr,
                    len,
                    location: location.to_string(),
                    in_flight: AtomicUsize::new(0),
                    closing: AtomicBool::new(false),
                }),
            );
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
        region.in_flight.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `unregister`: either it sees our count, or
        // we see its `closing`.
        if region.closing.load(Ordering::SeqCst) {
            region.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pin { region })
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
