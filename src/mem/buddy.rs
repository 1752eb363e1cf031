//! A binary buddy allocator over one power-of-two slab, working in offsets
//! (no memory is touched here; the managed-buffer pool maps the slabs).
//!
//! Blocks run from 8 KiB to the slab size. Freeing a block merges it with its
//! buddy whenever the buddy is free too, all the way up, so a pool that is
//! emptied can hand out its largest block again. Mooncake's allocator never
//! merges, so a pool that once served many small buffers can fail a large
//! one forever. `free` also checks that the length given is the length that
//! was allocated; Mooncake recomputes the size class from whatever it is given.

use std::collections::{BTreeSet, HashMap};

/// The smallest block: 8 KiB, Mooncake's smallest size class.
pub const MIN_ORDER: u32 = 13;

/// Why a free was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    #[error("offset {0:#x} is not an allocated block")]
    NotAllocated(u64),
    #[error("block at offset {offset:#x} was allocated with {allocated} bytes, not {given}")]
    LengthMismatch { offset: u64, allocated: u64, given: u64 },
}

/// The allocator state.
#[derive(Debug)]
pub struct Buddy {
    max_order: u32,
    /// Free block offsets per order (index = order - MIN_ORDER).
    free: Vec<BTreeSet<u64>>,
    /// Allocated blocks: offset -> (order, requested length).
    used: HashMap<u64, (u32, u64)>,
    used_bytes: u64,
}

impl Buddy {
    /// A slab of `2^max_order` bytes, all free.
    pub fn new(max_order: u32) -> Self {
        assert!((MIN_ORDER..=40).contains(&max_order), "slab order {max_order} out of range");
        let mut free = vec![BTreeSet::new(); (max_order - MIN_ORDER + 1) as usize];
        free[(max_order - MIN_ORDER) as usize].insert(0);
        Self { max_order, free, used: HashMap::new(), used_bytes: 0 }
    }

    /// The slab size.
    pub fn capacity(&self) -> u64 {
        1 << self.max_order
    }

    /// Bytes in allocated blocks (rounded up to block sizes).
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Whether nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// The order of the smallest block that holds `len` bytes.
    pub fn order_for(len: u64) -> u32 {
        let len = len.max(1 << MIN_ORDER);
        64 - (len - 1).leading_zeros()
    }

    /// Allocates a block of at least `len` bytes; `None` if `len` is zero or
    /// no block is large enough. The lowest free address is used first.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 || len > self.capacity() {
            return None;
        }
        let want = Self::order_for(len);
        let have = (want..=self.max_order).find(|&o| !self.free[(o - MIN_ORDER) as usize].is_empty())?;
        let offset = self.free[(have - MIN_ORDER) as usize].pop_first()?;
        // Split down to the wanted order, freeing the upper halves.
        for order in (want..have).rev() {
            self.free[(order - MIN_ORDER) as usize].insert(offset + (1 << order));
        }
        self.used.insert(offset, (want, len));
        self.used_bytes += 1 << want;
        Some(offset)
    }

    /// Frees the block at `offset`, which must have been allocated with
    /// exactly `len` bytes, and merges it with free buddies.
    pub fn free(&mut self, offset: u64, len: u64) -> Result<(), FreeError> {
        let &(order, allocated) = self.used.get(&offset).ok_or(FreeError::NotAllocated(offset))?;
        if allocated != len {
            return Err(FreeError::LengthMismatch { offset, allocated, given: len });
        }
        self.used.remove(&offset);
        self.used_bytes -= 1 << order;
        let (mut offset, mut order) = (offset, order);
        while order < self.max_order {
            let buddy = offset ^ (1 << order);
            if !self.free[(order - MIN_ORDER) as usize].remove(&buddy) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        self.free[(order - MIN_ORDER) as usize].insert(offset);
        Ok(())
    }

    /// The allocated block holding `offset`: `(start, requested length)`.
    pub fn block_at(&self, offset: u64) -> Option<(u64, u64)> {
        (MIN_ORDER..=self.max_order).find_map(|order| {
            let start = offset & !((1u64 << order) - 1);
            match self.used.get(&start) {
                Some(&(o, len)) if o == order && offset < start + len => Some((start, len)),
                _ => None,
            }
        })
    }

    /// The largest block that could be allocated now.
    pub fn largest_free(&self) -> u64 {
        (MIN_ORDER..=self.max_order)
            .rev()
            .find(|&o| !self.free[(o - MIN_ORDER) as usize].is_empty())
            .map_or(0, |o| 1 << o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes() {
        assert_eq!(Buddy::order_for(1), 13);
        assert_eq!(Buddy::order_for(8192), 13);
        assert_eq!(Buddy::order_for(8193), 14);
        assert_eq!(Buddy::order_for(256 << 20), 28);
    }

    #[test]
    fn splits_and_coalesces_back_to_one_block() {
        let mut b = Buddy::new(20); // 1 MiB
        let a = b.alloc(8192).unwrap();
        let c = b.alloc(100_000).unwrap();
        let d = b.alloc(8192).unwrap();
        assert_eq!(a, 0);
        assert_eq!(d, 8192, "lowest address first");
        assert_eq!(c % 131_072, 0, "blocks are aligned to their size");
        assert!(b.largest_free() < 1 << 20);
        b.free(a, 8192).unwrap();
        b.free(c, 100_000).unwrap();
        b.free(d, 8192).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.largest_free(), 1 << 20, "every buddy merged");
        assert_eq!(b.alloc(1 << 20), Some(0));
    }

    #[test]
    fn the_block_holding_an_offset() {
        let mut b = Buddy::new(20);
        let a = b.alloc(10_000).unwrap();
        let c = b.alloc(100_000).unwrap();
        assert_eq!(b.block_at(a), Some((a, 10_000)));
        assert_eq!(b.block_at(a + 9_999), Some((a, 10_000)));
        assert_eq!(b.block_at(a + 10_000), None, "past the length asked for");
        assert_eq!(b.block_at(c + 50_000), Some((c, 100_000)));
        b.free(c, 100_000).unwrap();
        assert_eq!(b.block_at(c + 50_000), None, "freed");
    }

    #[test]
    fn free_checks_offset_and_length() {
        let mut b = Buddy::new(16);
        let a = b.alloc(10_000).unwrap();
        assert_eq!(b.free(a + 8, 10_000), Err(FreeError::NotAllocated(a + 8)));
        assert_eq!(b.free(a, 16_384), Err(FreeError::LengthMismatch { offset: a, allocated: 10_000, given: 16_384 }));
        b.free(a, 10_000).unwrap();
        assert_eq!(b.free(a, 10_000), Err(FreeError::NotAllocated(a)), "double free");
    }

    #[test]
    fn exhaustion_and_limits() {
        let mut b = Buddy::new(15); // 32 KiB: four 8 KiB blocks
        let blocks: Vec<_> = (0..4).map(|_| b.alloc(1).unwrap()).collect();
        assert_eq!(b.alloc(1), None);
        assert_eq!(b.alloc(0), None);
        assert_eq!(b.used_bytes(), 32 << 10);
        for blk in blocks {
            b.free(blk, 1).unwrap();
        }
        assert_eq!(b.alloc(1 << 16), None, "larger than the slab");
        assert_eq!(b.alloc(1 << 15), Some(0));
    }

    #[test]
    fn random_churn_keeps_the_invariants() {
        let mut b = Buddy::new(24);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 != 0 || live.is_empty() {
                let len = 1 + x % (1 << 18);
                if let Some(off) = b.alloc(len) {
                    let size = 1u64 << Buddy::order_for(len);
                    assert_eq!(off % size, 0);
                    for &(o, l) in &live {
                        let s = 1u64 << Buddy::order_for(l);
                        assert!(off + size <= o || o + s <= off, "blocks overlap");
                    }
                    live.push((off, len));
                }
            } else {
                let (off, len) = live.swap_remove((x as usize / 3) % live.len());
                b.free(off, len).unwrap();
            }
        }
        for (off, len) in live {
            b.free(off, len).unwrap();
        }
        assert_eq!(b.largest_free(), 1 << 24);
    }
}
