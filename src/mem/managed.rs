//! Managed buffers: memory the engine maps, registers and hands out.
//!
//! Requests up to 256 MiB come from 2 GiB slabs through a buddy allocator
//! that merges freed blocks; larger ones get a mapping of their own. Every
//! mapping is a memfd mapped shared, so a peer on this host can map the
//! same pages (the local transport passes it the descriptor) and read and
//! write them with plain copies. Hugepages back it where the system has
//! enough free ones (reserved up front, so there is no fault later);
//! otherwise ordinary pages, taken only as they are written. A slab that
//! empties is returned to the system (all but one).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::buddy::Buddy;
use super::registry::Registry;
use crate::error::{TeError, TeResult, code};

/// Slabs are 2^31 bytes.
pub const SLAB_ORDER: u32 = 31;
/// Above this, a request gets its own mapping.
pub const SMALL_MAX: u64 = 256 << 20;
/// The hugepage size tried for mappings that are a multiple of it.
const HUGEPAGE_BYTES: u64 = 2 << 20;

/// One shared mapping: its memfd, where it is mapped, and its number.
#[derive(Debug)]
struct Mapping {
    id: u32,
    fd: Arc<OwnedFd>,
    base: u64,
    len: u64,
}

/// The memfds of an engine's managed memory, by number, for the local
/// transport to hand to peers.
#[derive(Debug, Default)]
pub struct ShmFiles {
    files: Mutex<HashMap<u32, (Arc<OwnedFd>, u64)>>,
}

impl ShmFiles {
    /// The memfd numbered `id` and its length.
    pub fn get(&self, id: u32) -> Option<(Arc<OwnedFd>, u64)> {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    fn put(&self, m: &Mapping) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(m.id, (m.fd.clone(), m.len));
    }

    fn remove(&self, id: u32) {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

/// Where a managed buffer lives in shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmPlace {
    /// The memfd's number (see [`ShmFiles`]).
    pub file: u32,
    /// The buffer's offset in it.
    pub offset: u64,
}

struct Slab {
    map: Mapping,
    buddy: Buddy,
}

/// The engine's managed memory.
pub struct ManagedPool {
    registry: Arc<Registry>,
    slabs: Vec<Slab>,
    /// Dedicated mappings: address -> (requested length, mapping).
    large: BTreeMap<u64, (u64, Mapping)>,
    files: Arc<ShmFiles>,
    next_file: u32,
    drain: Duration,
}

fn page_round(len: u64) -> u64 {
    const PAGE: u64 = 4096;
    len.div_ceil(PAGE) * PAGE
}

/// Free hugepages of the default size, from /proc/meminfo.
fn hugepages_free() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// A memfd of `len` bytes, mapped shared: on hugepages if enough are free
/// (then reserved by the mapping, so no write can fault for want of one),
/// else on ordinary pages, backed as they are written.
fn map(len: u64, id: u32) -> TeResult<Mapping> {
    let fail = |what: &str| {
        TeError::new(
            code::MEMORY,
            format!("cannot {what} {len} bytes of managed memory: {}", std::io::Error::last_os_error()),
        )
    };
    let huge = len % HUGEPAGE_BYTES == 0 && hugepages_free() * HUGEPAGE_BYTES >= len;
    for use_huge in [huge, false] {
        if use_huge != huge && !huge {
            break;
        }
        let flags = libc::MFD_CLOEXEC | if use_huge { libc::MFD_HUGETLB } else { 0 };
        // SAFETY: a plain syscall with a NUL-terminated name.
        let raw = unsafe { libc::memfd_create(c"shardwire-managed".as_ptr(), flags) };
        if raw < 0 {
            if use_huge {
                continue;
            }
            return Err(fail("create a memfd for"));
        }
        // SAFETY: the descriptor is fresh and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            if use_huge {
                continue;
            }
            return Err(fail("size a memfd of"));
        }
        // Hugepages are reserved at mmap (no MAP_NORESERVE), so a shortage
        // fails here, not as a SIGBUS later; ordinary memfd pages are never
        // reserved.
        let extra = if use_huge { 0 } else { libc::MAP_NORESERVE };
        // SAFETY: maps our own fresh memfd; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | extra,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            if use_huge {
                continue;
            }
            return Err(fail("map"));
        }
        return Ok(Mapping { id, fd: Arc::new(fd), base: ptr as u64, len });
    }
    Err(fail("map"))
}

fn unmap(m: &Mapping) {
    // SAFETY: the range is a whole mapping made by `map`, unregistered
    // first, with no pin left on it. The memfd closes when its last Arc
    // goes (a peer may hold its own mapping of it, which stays valid).
    unsafe { libc::munmap(m.base as *mut libc::c_void, m.len as usize) };
}

impl ManagedPool {
    pub fn new(registry: Arc<Registry>, drain: Duration) -> Self {
        Self {
            registry,
            slabs: Vec::new(),
            large: BTreeMap::new(),
            files: Arc::new(ShmFiles::default()),
            next_file: 1,
            drain,
        }
    }

    /// The memfds behind this pool.
    pub fn files(&self) -> Arc<ShmFiles> {
        self.files.clone()
    }

    fn new_mapping(&mut self, len: u64) -> TeResult<Mapping> {
        let id = self.next_file;
        let m = map(len, id)?;
        self.next_file =
            self.next_file.checked_add(1).ok_or_else(|| TeError::new(code::MEMORY, "memfd numbers ran out"))?;
        if let Err(e) = self.registry.register(m.base, m.len, "*") {
            unmap(&m);
            return Err(e);
        }
        self.files.put(&m);
        Ok(m)
    }

    /// Allocates `len` bytes of registered memory.
    pub fn allocate(&mut self, len: u64) -> TeResult<u64> {
        if len == 0 {
            return Err(TeError::invalid("cannot allocate a zero-length managed buffer"));
        }
        if len > SMALL_MAX {
            let m = self.new_mapping(page_round(len))?;
            let addr = m.base;
            self.large.insert(addr, (len, m));
            return Ok(addr);
        }
        for slab in &mut self.slabs {
            if let Some(offset) = slab.buddy.alloc(len) {
                // A freed buffer was withdrawn from its slab's region; the
                // bytes handed out now are served again.
                self.registry.restore(slab.map.base + offset, len);
                return Ok(slab.map.base + offset);
            }
        }
        let m = self.new_mapping(1u64 << SLAB_ORDER)?;
        let mut slab = Slab { map: m, buddy: Buddy::new(SLAB_ORDER) };
        let offset = slab.buddy.alloc(len).expect("a fresh slab holds any small request");
        let addr = slab.map.base + offset;
        self.slabs.push(slab);
        Ok(addr)
    }

    /// Frees a buffer; `len` must be the length it was allocated with.
    pub fn free(&mut self, addr: u64, len: u64) -> TeResult<()> {
        self.check_free(addr, len)?;
        if self.large.contains_key(&addr) {
            self.registry.unregister(addr, self.drain)?;
            let (_, m) = self.large.remove(&addr).expect("checked");
            self.files.remove(m.id);
            unmap(&m);
            return Ok(());
        }
        let size = 1u64 << SLAB_ORDER;
        let index = self.slabs.iter().position(|s| addr >= s.map.base && addr < s.map.base + size).expect("checked");
        // No peer's transfer reaches the buffer once this returns (the slab
        // stays registered for the others).
        self.registry.withdraw(addr, len, self.drain)?;
        let slab = &mut self.slabs[index];
        slab.buddy.free(addr - slab.map.base, len).expect("checked by check_free");
        let (empty, base) = (slab.buddy.is_empty(), slab.map.base);
        if empty && self.slabs.len() > 1 && self.registry.unregister(base, self.drain).is_ok() {
            let slab = self.slabs.remove(index);
            self.files.remove(slab.map.id);
            unmap(&slab.map);
        }
        Ok(())
    }

    /// Checks that `free(addr, len)` would succeed, changing nothing.
    pub fn check_free(&self, addr: u64, len: u64) -> TeResult<()> {
        if let Some((requested, _)) = self.large.get(&addr) {
            if *requested != len {
                return Err(TeError::invalid(format!(
                    "managed buffer {addr:#x} was allocated with {requested} bytes, not {len}"
                )));
            }
            return Ok(());
        }
        let size = 1u64 << SLAB_ORDER;
        let slab = self
            .slabs
            .iter()
            .find(|s| addr >= s.map.base && addr < s.map.base + size)
            .ok_or_else(|| TeError::invalid(format!("{addr:#x} is not a managed buffer")))?;
        match slab.buddy.block_at(addr - slab.map.base) {
            Some((off, allocated)) if off == addr - slab.map.base => {
                if allocated == len {
                    Ok(())
                } else {
                    Err(TeError::invalid(format!(
                        "managed buffer {addr:#x} was allocated with {allocated} bytes, not {len}"
                    )))
                }
            }
            _ => Err(TeError::invalid(format!("{addr:#x} is not an allocated managed buffer"))),
        }
    }

    /// Whether `addr` lies in managed memory, and if so the buffer holding
    /// it: `Some(Some((start, length)))`, or `Some(None)` for managed memory
    /// no buffer holds (free, or past the length a buffer was asked with).
    pub fn buffer_at(&self, addr: u64) -> Option<Option<(u64, u64)>> {
        if let Some((&start, (len, m))) = self.large.range(..=addr).next_back()
            && addr < start + m.len
        {
            return Some((addr < start + len).then_some((start, *len)));
        }
        let size = 1u64 << SLAB_ORDER;
        let slab = self.slabs.iter().find(|s| addr >= s.map.base && addr < s.map.base + size)?;
        Some(slab.buddy.block_at(addr - slab.map.base).map(|(off, len)| (slab.map.base + off, len)))
    }

    /// Where the managed buffer starting at `addr` lives in shared memory.
    pub fn place_of(&self, addr: u64) -> Option<ShmPlace> {
        if let Some((_, m)) = self.large.get(&addr) {
            return Some(ShmPlace { file: m.id, offset: 0 });
        }
        let size = 1u64 << SLAB_ORDER;
        let slab = self.slabs.iter().find(|s| addr >= s.map.base && addr < s.map.base + size)?;
        Some(ShmPlace { file: slab.map.id, offset: addr - slab.map.base })
    }

    /// Bytes handed out (in block sizes) and slabs mapped.
    pub fn usage(&self) -> (u64, usize) {
        let small: u64 = self.slabs.iter().map(|s| s.buddy.used_bytes()).sum();
        let large: u64 = self.large.values().map(|(_, m)| m.len).sum();
        (small + large, self.slabs.len())
    }
}

impl Drop for ManagedPool {
    fn drop(&mut self) {
        for slab in std::mem::take(&mut self.slabs) {
            // A region still pinned after the drain is leaked, not unmapped
            // under an operation that may still write it.
            if self.registry.unregister(slab.map.base, self.drain).is_ok() {
                self.files.remove(slab.map.id);
                unmap(&slab.map);
            }
        }
        for (addr, (_, m)) in std::mem::take(&mut self.large) {
            if self.registry.unregister(addr, self.drain).is_ok() {
                self.files.remove(m.id);
                unmap(&m);
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
    fn buffers_live_in_memfds_another_mapping_sees() {
        let registry = Arc::new(Registry::new());
        let mut pool = ManagedPool::new(registry, Duration::ZERO);
        let a = pool.allocate(8192).unwrap();
        let b = pool.allocate(100).unwrap();
        let place = pool.place_of(b).unwrap();
        assert_eq!(pool.place_of(a).unwrap().file, place.file, "one slab, one memfd");
        let (fd, len) = pool.files().get(place.file).unwrap();
        assert_eq!(len, 1 << SLAB_ORDER);
        // SAFETY: maps the pool's memfd a second time, shared; unmapped below.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        // SAFETY: writes inside the second mapping, at the block's offset.
        unsafe { std::ptr::write_bytes((other as *mut u8).add(place.offset as usize), 0x77, 100) };
        // SAFETY: reads the block through the pool's own mapping.
        let seen = unsafe { std::slice::from_raw_parts(b as *const u8, 100) };
        assert!(seen.iter().all(|&x| x == 0x77), "the same pages");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(other, len as usize) };
        assert!(pool.place_of(b + 1).is_some_and(|p| p.offset == place.offset + 1));
        pool.free(b, 100).unwrap();
        assert!(pool.check_free(b, 100).is_err(), "freed");
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
