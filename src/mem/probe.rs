//! Questions about this process's memory that must not fault: is a range
//! mapped readable and writable, and copies that fail with an error where a
//! plain `memcpy` would kill the process.
//!
//! Registration asks [`check_mapped`] first, so an address that is not
//! memory of this process (`register_memory(0xdeadbeef000, 4096)`) is
//! refused instead of faulting the first transfer that touches it. The
//! engine's byte helpers copy with [`read()`] and [`write()`], which go through
//! `process_vm_readv`/`process_vm_writev` on this process: the kernel does
//! the copy and reports `EFAULT` for memory that went away.

use std::io;

/// Most lines of `/proc/self/maps` looked at (a process with more
/// mappings than this is refused registration, with a message).
const MAPPINGS_MAX: usize = 1 << 20;

/// Checks that all of `[addr, addr + len)` is mapped, readable and
/// writable in this process; the error says what is not.
pub fn check_mapped(addr: u64, len: u64) -> Result<(), String> {
    let end = addr.checked_add(len).ok_or_else(|| format!("{addr:#x} + {len} wraps around"))?;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    check_in(&maps, addr, end)
}

/// The NUMA node the page at `addr` lives on (a page not touched yet is
/// placed first, as a read would), or `None` where the kernel does not say
/// (no NUMA support, or not memory of this process). What Mooncake's `*`
/// location means.
pub fn numa_node_of(addr: u64) -> Option<u32> {
    const MPOL_F_NODE: libc::c_ulong = 1;
    const MPOL_F_ADDR: libc::c_ulong = 2;
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int to `node` (the mask pointer is
    // null with a size of 0, so it writes no mask); with MPOL_F_ADDR it
    // reads nothing at `addr` in user space, and refuses an unmapped one
    // with EFAULT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as *mut libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    (rc == 0 && node >= 0).then_some(node as u32)
}

/// Asks the kernel to place the pages of `[addr, addr + len)` not yet
/// touched on NUMA node `node` when it can (`MPOL_PREFERRED`: another node
/// when that one is full). `addr` must be page-aligned. For a shared
/// mapping (a memfd) the policy is the memory's, whoever touches it.
pub fn prefer_node(addr: u64, len: u64, node: u32) -> io::Result<()> {
    const MPOL_PREFERRED: libc::c_int = 1;
    /// Bits of the node mask passed (nodes 0..=1023).
    const MASK_BITS: u32 = 1024;
    if node >= MASK_BITS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NUMA node {node} is above {MASK_BITS}")));
    }
    let mut mask = [0 as libc::c_ulong; (MASK_BITS / libc::c_ulong::BITS) as usize];
    mask[(node / libc::c_ulong::BITS) as usize] |= 1 << (node % libc::c_ulong::BITS);
    // SAFETY: mbind reads the mask (MASK_BITS bits, the array's size) and
    // changes only the policy of the range, which the kernel checks is
    // mapped (EFAULT otherwise); it touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len as libc::c_ulong,
            MPOL_PREFERRED,
            mask.as_ptr(),
            (MASK_BITS + 1) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// [`check_mapped`] against the text of a maps file.
fn check_in(maps: &str, addr: u64, end: u64) -> Result<(), String> {
    let mut at = addr;
    for (i, line) in maps.lines().enumerate() {
        if i >= MAPPINGS_MAX {
            return Err(format!("more than {MAPPINGS_MAX} mappings; cannot check [{addr:#x}, {end:#x})"));
        }
        let Some((lo, hi, perms)) = parse_line(line) else { continue };
        if hi <= at {
            continue;
        }
        if lo > at {
            break; // a hole at `at`
        }
        if !(perms.starts_with("rw")) {
            return Err(format!("[{lo:#x}, {hi:#x}) is mapped {perms}, not readable and writable"));
        }
        at = hi;
        if at >= end {
            return Ok(());
        }
    }
    Err(if at == addr {
        format!("{addr:#x} is not mapped memory of this process")
    } else {
        format!("[{at:#x}, {end:#x}) is not mapped memory of this process")
    })
}

fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.split_ascii_whitespace();
    let (lo, hi) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?, perms))
}

/// Copies `out.len()` bytes from `addr` of this process into `out`.
pub fn read(addr: u64, out: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let local = libc::iovec { iov_base: out[done..].as_mut_ptr().cast(), iov_len: out.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: out.len() - done };
        // SAFETY: `local` is our own buffer of the length given; the
        // kernel reads `remote` through the page tables and fails with
        // EFAULT instead of faulting if it is not mapped.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from_raw_os_error(libc::EFAULT)),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// Copies `bytes` to `addr` of this process.
pub fn write(addr: u64, bytes: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let local = libc::iovec { iov_base: bytes[done..].as_ptr() as *mut libc::c_void, iov_len: bytes.len() - done };
        let remote = libc::iovec { iov_base: (addr + done as u64) as *mut libc::c_void, iov_len: bytes.len() - done };
        // SAFETY: as in `read`, the other way: the kernel writes `remote`
        // and reports EFAULT for memory that is not mapped writable.
        let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from_raw_os_error(libc::EFAULT)),
            _ => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numa_node_of_memory_is_one_this_machine_has() {
        let buf = vec![1u8; 8192];
        let nodes = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("node")?.parse::<u32>().ok()).count())
            .unwrap_or(0);
        match numa_node_of(buf.as_ptr() as u64) {
            Some(n) => assert!((n as usize) < nodes.max(1), "node {n} of {nodes}"),
            None => assert_eq!(nodes, 0, "the kernel has NUMA nodes but did not say which"),
        }
        assert_eq!(numa_node_of(0x10), None, "not memory of this process");
    }

    const MAPS: &str = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/x
00652000-00655000 rw-p 00052000 08:02 173521      /usr/bin/x
00655000-00660000 rw-p 00000000 00:00 0           [heap]
00700000-00701000 r--p 00000000 00:00 0
";

    #[test]
    fn coverage_holes_and_permissions() {
        assert!(check_in(MAPS, 0x652000, 0x660000).is_ok(), "two adjacent rw mappings");
        assert!(check_in(MAPS, 0x653000, 0x654000).is_ok());
        assert!(check_in(MAPS, 0x660000, 0x661000).unwrap_err().contains("0x660000 is not mapped"));
        assert!(check_in(MAPS, 0x65f000, 0x661000).unwrap_err().contains("[0x660000, 0x661000) is not mapped"));
        assert!(check_in(MAPS, 0x400000, 0x401000).unwrap_err().contains("r-xp"), "code is not writable");
        assert!(check_in(MAPS, 0x700000, 0x700010).unwrap_err().contains("r--p"));
        assert!(check_in(MAPS, 0xdeadbeef000, 0xdeadbef0000).is_err());
    }

    #[test]
    fn the_live_process() {
        let v = vec![7u8; 10_000];
        let addr = v.as_ptr() as u64;
        check_mapped(addr, 10_000).unwrap();
        assert!(check_mapped(0xdeadbeef000, 4096).is_err());
        let mut out = vec![0u8; 100];
        read(addr + 50, &mut out).unwrap();
        assert_eq!(out, vec![7u8; 100]);
        assert_eq!(read(0xdeadbeef000, &mut out).unwrap_err().raw_os_error(), Some(libc::EFAULT));
        assert!(write(0xdeadbeef000, b"x").is_err(), "no fault, an error");
        let mut w = vec![0u8; 8];
        write(w.as_mut_ptr() as u64, b"abcdefgh").unwrap();
        assert_eq!(&w, b"abcdefgh");
    }
}
