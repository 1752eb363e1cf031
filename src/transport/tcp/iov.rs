//! A scatter/gather list for one `sendmsg`/`recvmsg`, that can resume after a
//! short transfer.
//!
//! With MSG_WAITALL the kernel (5.18 and later, for io_uring sends too)
//! moves everything or fails, but a short count is still possible (a signal,
//! an older kernel), so a list remembers how far it got and the next op
//! carries on from there.

use std::mem::zeroed;

/// Most entries in one list (the kernel's IOV_MAX is 1024).
pub const IOV_MAX: usize = 1024;

pub struct IoVecs {
    iov: Vec<libc::iovec>,
    /// The first entry not fully transferred.
    start: usize,
    msg: libc::msghdr,
    total: usize,
    done: usize,
}

impl Default for IoVecs {
    fn default() -> Self {
        Self::new()
    }
}

impl IoVecs {
    pub fn new() -> Self {
        // SAFETY: msghdr is plain data; all-zero means no name, no control.
        Self { iov: Vec::new(), start: 0, msg: unsafe { zeroed() }, total: 0, done: 0 }
    }

    pub fn with_capacity(n: usize) -> Self {
        Self { iov: Vec::with_capacity(n), ..Self::new() }
    }

    /// Appends `len` bytes at `ptr`. Empty entries are skipped.
    pub fn push(&mut self, ptr: *const u8, len: usize) {
        debug_assert!(self.iov.len() < IOV_MAX);
        if len > 0 {
            self.iov.push(libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len });
            self.total += len;
        }
    }

    pub fn len(&self) -> usize {
        self.iov.len()
    }

    pub fn is_empty(&self) -> bool {
        self.iov.is_empty()
    }

    /// Bytes the whole list covers.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes transferred so far.
    pub fn done(&self) -> usize {
        self.done
    }

    pub fn is_complete(&self) -> bool {
        self.done == self.total
    }

    /// The msghdr for the part not yet transferred. The pointer stays valid
    /// while `self` is neither moved nor changed; callers keep the list in a
    /// `Box` until the operation completes.
    pub fn msghdr(&mut self) -> *const libc::msghdr {
        // SAFETY: start <= len, so the pointer is in bounds (or one past the
        // end with a zero count, which the kernel never dereferences).
        self.msg.msg_iov = unsafe { self.iov.as_mut_ptr().add(self.start) };
        self.msg.msg_iovlen = self.iov.len() - self.start;
        &self.msg
    }

    /// Records that `n` more bytes were transferred, trimming the entries.
    pub fn advance(&mut self, mut n: usize) {
        debug_assert!(self.done + n <= self.total, "advanced past the end");
        self.done += n;
        while n > 0 && self.start < self.iov.len() {
            let entry = &mut self.iov[self.start];
            if n >= entry.iov_len {
                n -= entry.iov_len;
                self.start += 1;
            } else {
                // SAFETY: n < iov_len, so the new base is inside the entry.
                entry.iov_base = unsafe { entry.iov_base.cast::<u8>().add(n) }.cast();
                entry.iov_len -= n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_trims_and_resumes() {
        let a = [1u8; 10];
        let b = [2u8; 20];
        let mut v = IoVecs::new();
        v.push(a.as_ptr(), 10);
        v.push(b.as_ptr(), 0);
        v.push(b.as_ptr(), 20);
        assert_eq!((v.len(), v.total()), (2, 30));
        v.advance(4);
        let m = v.msghdr();
        // SAFETY: reading back the msghdr we just built.
        unsafe {
            assert_eq!((*m).msg_iovlen, 2);
            assert_eq!((*(*m).msg_iov).iov_len, 6);
        }
        v.advance(16);
        let m = v.msghdr();
        // SAFETY: as above.
        unsafe {
            assert_eq!((*m).msg_iovlen, 1);
            assert_eq!((*(*m).msg_iov).iov_base as *const u8, b.as_ptr().wrapping_add(10));
        }
        assert!(!v.is_complete());
        v.advance(10);
        assert!(v.is_complete());
        assert_eq!(v.done(), 30);
    }
}
