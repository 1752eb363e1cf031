//! Managed buffers: memory the engine maps, registers and hands out.
//!
//! Requests up to 256 MiB come from 2 GiB slabs through a buddy allocator
//! that merges freed blocks; larger ones get a mapping of their own. Slabs
//! are mapped with MAP_NORESERVE, so only the pages written are backed, and a
//! slab that empties is returned to the system (all but one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::buddy::{Buddy, FreeError};
use super::registry::Registry;
use crate::error::{TeError, TeResult, code};

/// Slabs are 2^31 bytes.
pub const SLAB_ORDER: u32 = 31;
/// Above this, a request gets its own mapping.
pub const SMALL_MAX: u64 = 256 << 20;

struct Slab {
    base: u64,
    buddy: Buddy,
}

/// The engine's managed memory.
pub struct ManagedPool {
    registry: Arc<Registry>,
    slabs: Vec<Slab>,
    /// Dedicated mappings: address -> (requested length, mapped length).
    large: BTreeMap<u64, (u64, u64)>,
    drain: Duration,
}

fn page_round(len: u64) -> u64 {
    const PAGE: u64 = 4096;
    len.div_ceil(PAGE) * PAGE
}

fn map(len: u64) -> TeResult<u64> {
    // SAFETY: a fresh anonymous mapping; no existing memory is touched.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(TeError::new(code::MEMORY, format!("cannot map {len} bytes: {}", std::io::Error::last_os_error())));
    }
    Ok(ptr as u64)
}

fn unmap(addr: u64, len: u64) {
    // SAFETY: the range is a whole mapping made by `map`, unregistered
    // first, with no pin left on it.
    unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) };
}

impl ManagedPool {
    pub fn new(registry: Arc<Registry>, drain: Duration) -> Self {
        Self { registry, slabs: Vec::new(), large: BTreeMap::new(), drain }
    }

    /// Allocates `len` bytes of registered memory.
    pub fn allocate(&mut self, len: u64) -> TeResult<u64> {
        if len == 0 {
            return Err(TeError::invalid("cannot allocate a zero-length managed buffer"));
        }
        if len > SMALL_MAX {
            let mapped = page_round(len);
            let addr = map(mapped)?;
            if let Err(e) = self.registry.register(addr, mapped, "*") {
                unmap(addr, mapped);
                return Err(e);
            }
            self.large.insert(addr, (len, mapped));
            return Ok(addr);
        }
        for slab in &mut self.slabs {
            if let Some(offset) = slab.buddy.alloc(len) {
                return Ok(slab.base + offset);
            }
        }
        let size = 1u64 << SLAB_ORDER;
        let base = map(size)?;
        if let Err(e) = self.registry.register(base, size, "*") {
            unmap(base, size);
            return Err(e);
        }
        let mut slab = Slab { base, buddy: Buddy::new(SLAB_ORDER) };
        let offset = slab.buddy.alloc(len).expect("a fresh slab holds any small request");
        self.slabs.push(slab);
        Ok(base + offset)
    }

    /// Frees a buffer; `len` must be the length it was allocated with.
    pub fn free(&mut self, addr: u64, len: u64) -> TeResult<()> {
        if let Some(&(requested, mapped)) = self.large.get(&addr) {
            if requested != len {
                return Err(TeError::invalid(format!(
                    "managed buffer {addr:#x} was allocated with {requested} bytes, not {len}"
                )));
            }
            self.registry.unregister(addr, self.drain)?;
            self.large.remove(&addr);
            unmap(addr, mapped);
            return Ok(());
        }
        let size = 1u64 << SLAB_ORDER;
        let index = self
            .slabs
            .iter()
            .position(|s| addr >= s.base && addr < s.base + size)
            .ok_or_else(|| TeError::invalid(format!("{addr:#x} is not a managed buffer")))?;
        let slab = &mut self.slabs[index];
        slab.buddy.free(addr - slab.base, len).map_err(|e| match e {
            FreeError::NotAllocated(_) => TeError::invalid(format!("{addr:#x} is not an allocated managed buffer")),
            FreeError::LengthMismatch { allocated, .. } => {
                TeError::invalid(format!("managed buffer {addr:#x} was allocated with {allocated} bytes, not {len}"))
            }
        })?;
        let (empty, base) = (slab.buddy.is_empty(), slab.base);
        if empty && self.slabs.len() > 1 && self.registry.unregister(base, self.drain).is_ok() {
            self.slabs.remove(index);
            unmap(base, size);
        }
        Ok(())
    }

    /// Whether `addr` lies in managed memory, and if so the buffer holding
    /// it: `Some(Some((start, length)))`, or `Some(None)` for managed memory
    /// no buffer holds (free, or past the length a buffer was asked with).
    pub fn buffer_at(&self, addr: u64) -> Option<Option<(u64, u64)>> {
        if let Some((&start, &(len, mapped))) = self.large.range(..=addr).next_back()
            && addr < start + mapped
        {
            return Some((addr < start + len).then_some((start, len)));
        }
        let size = 1u64 << SLAB_ORDER;
        let slab = self.slabs.iter().find(|s| addr >= s.base && addr < s.base + size)?;
        Some(slab.buddy.block_at(addr - slab.base).map(|(off, len)| (slab.base + off, len)))
    }

    /// Bytes handed out (in block sizes) and slabs mapped.
    pub fn usage(&self) -> (u64, usize) {
        let small: u64 = self.slabs.iter().map(|s| s.buddy.used_bytes()).sum();
        let large: u64 = self.large.values().map(|&(_, m)| m).sum();
        (small + large, self.slabs.len())
    }
}

impl Drop for ManagedPool {
    fn drop(&mut self) {
        let size = 1u64 << SLAB_ORDER;
        for slab in std::mem::take(&mut self.slabs) {
            // A region still pinned after the drain is leaked, not unmapped
            // under an operation that may still write it.
            if self.registry.unregister(slab.base, self.drain).is_ok() {
                unmap(slab.base, size);
            }
        }
        for (addr, (_, mapped)) in std::mem::take(&mut self.large) {
            if self.registry.unregister(addr, self.drain).is_ok() {
                unmap(addr, mapped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_write_free_and_reuse() {
        let registry = Arc::new(Registry::new());
        let mut pool = ManagedPool::new(registry.clone(), Duration::ZERO);
        let a = pool.allocate(4096).unwrap();
        let b = pool.allocate(1 << 20).unwrap();
        assert!(registry.contains(a, 4096) && registry.contains(b, 1 << 20));
        assert_eq!(a % 8192, 0, "blocks are at least 8 KiB aligned");
        // SAFETY: the pool mapped and handed out these bytes.
        unsafe {
            std::ptr::write_bytes(a as *mut u8, 0xab, 4096);
            std::ptr::write_bytes(b as *mut u8, 0xcd, 1 << 20);
        }
        assert_eq!(pool.free(a, 4095).unwrap_err().code(), code::INVALID_ARGUMENT);
        pool.free(a, 4096).unwrap();
        assert!(pool.free(a, 4096).is_err(), "double free");
        pool.free(b, 1 << 20).unwrap();
        assert_eq!(pool.usage(), (0, 1));
        // Everything merged back: the slab's first 256 MiB block is whole.
        let base = registry.ranges()[0].0;
        assert_eq!(pool.allocate(SMALL_MAX).unwrap(), base);
    }

    #[test]
    fn buffer_at_names_the_block_not_the_slab() {
        let registry = Arc::new(Registry::new());
        let mut pool = ManagedPool::new(registry, Duration::ZERO);
        let a = pool.allocate(1 << 20).unwrap();
        let big = pool.allocate(SMALL_MAX + 5).unwrap();
        assert_eq!(pool.buffer_at(a + 10), Some(Some((a, 1 << 20))));
        assert_eq!(pool.buffer_at(a + (1 << 20)), Some(None), "in the slab, in no buffer");
        assert_eq!(pool.buffer_at(big + SMALL_MAX), Some(Some((big, SMALL_MAX + 5))));
        assert_eq!(pool.buffer_at(big + SMALL_MAX + 5), Some(None), "the mapping's rounding");
        assert_eq!(pool.buffer_at(0x1000), None, "not managed memory");
    }

    #[test]
    fn large_requests_get_their_own_mapping() {
        let registry = Arc::new(Registry::new());
        let mut pool = ManagedPool::new(registry.clone(), Duration::ZERO);
        let big = pool.allocate(SMALL_MAX + 1).unwrap();
        assert!(registry.contains(big, SMALL_MAX + 1));
        assert!(pool.free(big, SMALL_MAX).is_err());
        pool.free(big, SMALL_MAX + 1).unwrap();
        assert!(!registry.contains(big, 1));
        assert_eq!(pool.allocate(0).unwrap_err().code(), code::INVALID_ARGUMENT);
        assert!(pool.free(0x1234, 10).is_err());
    }
}
