//! A byte pipe from a shard to a thread: one producer (the shard's receive
//! operations write into it), one consumer (the thread that decodes).
//!
//! The buffer is a ring mapped twice, back to back, so any run of bytes in
//! it (free space for the producer, data for the consumer) is contiguous in
//! memory: a receive never splits at the wrap, and a decoder never sees a
//! frame cut in two by it. Positions only grow; `head - tail` is the data.
//!
//! Waiting: the consumer parks when it has nothing to read, after setting a
//! flag the producer checks after each commit (and the other way round for
//! the producer, which is woken through a callback onto its shard).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::Duration;

/// How many times the consumer looks before parking. Short: on a small
/// machine the consumer's spinning steals the core the producing shard
/// needs.
const SPIN_CHECKS: u32 = 16;

/// The shared ring.
pub struct Pipe {
    base: NonNull<u8>,
    cap: usize,
    head: AtomicU64,
    tail: AtomicU64,
    /// The producer will write no more (EOF or error).
    closed: AtomicBool,
    /// Why, when it was an error.
    error: Mutex<Option<String>>,
    consumer_waiting: AtomicBool,
    consumer: Mutex<Option<Thread>>,
    producer_waiting: AtomicBool,
    producer_wake: Mutex<Option<Box<dyn Fn() + Send>>>,
}

// SAFETY: the mapping is shared memory with no thread affinity. The producer
// writes only to [head, tail + cap) and the consumer reads only [tail,
// head); each side publishes its position with Release and reads the other
// with Acquire, so the regions never overlap while in use.
unsafe impl Send for Pipe {}
// SAFETY: as above; every other field is atomic or behind a Mutex.
unsafe impl Sync for Pipe {}

impl Pipe {
    /// A pipe of at least `cap` bytes (rounded up to whole pages).
    pub fn new(cap: usize) -> io::Result<Arc<Pipe>> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let cap = cap.max(page).div_ceil(page) * page;
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"shardwire-pipe".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = Self::map(fd, cap);
        // SAFETY: fd is ours; the mappings keep the memory alive without it.
        unsafe { libc::close(fd) };
        let base = result?;
        Ok(Arc::new(Pipe {
            base,
            cap,
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            error: Mutex::new(None),
            consumer_waiting: AtomicBool::new(false),
            consumer: Mutex::new(None),
            producer_waiting: AtomicBool::new(false),
            producer_wake: Mutex::new(None),
        }))
    }

    fn map(fd: i32, cap: usize) -> io::Result<NonNull<u8>> {
        // SAFETY: fd is a fresh memfd; ftruncate sizes it.
        if unsafe { libc::ftruncate(fd, cap as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: reserve 2*cap of address space; nothing is mapped there yet.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), 2 * cap, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        for half in 0..2 {
            // SAFETY: MAP_FIXED over our own reservation, [base, base + 2cap):
            // each half maps the whole memfd, so byte i and byte i + cap are
            // the same memory.
            let p = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(half * cap).cast(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                let e = io::Error::last_os_error();
                // SAFETY: unmapping the reservation we made above.
                unsafe { libc::munmap(base, 2 * cap) };
                return Err(e);
            }
        }
        Ok(NonNull::new(base.cast()).expect("mmap returned a non-null address"))
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The consumer thread (woken when data arrives).
    pub fn set_consumer(&self, t: Thread) {
        *self.consumer.lock().expect("pipe lock") = Some(t);
    }

    /// How to wake the producer when space frees up after it stalled.
    pub fn set_producer_wake(&self, wake: Box<dyn Fn() + Send>) {
        *self.producer_wake.lock().expect("pipe lock") = Some(wake);
    }

    // ---- producer side ----

    /// Free space: where to write and how much (contiguous).
    pub fn writable(&self) -> (*mut u8, usize) {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        let free = self.cap - (head - tail) as usize;
        // SAFETY: head % cap < cap and the mapping is 2 * cap long, so the
        // pointer and the `free` bytes after it lie inside it.
        let p = unsafe { self.base.as_ptr().add((head % self.cap as u64) as usize) };
        (p, free)
    }

    /// Publishes `n` bytes written at [`writable`](Self::writable).
    pub fn commit(&self, n: usize) {
        let head = self.head.load(Ordering::Relaxed);
        self.head.store(head + n as u64, Ordering::Release);
        self.wake_consumer();
    }

    /// Publishes `n` bytes without waking the consumer; the producer calls
    /// [`wake`](Self::wake) when it is worth it (see the receiver).
    pub fn commit_quiet(&self, n: usize) {
        let head = self.head.load(Ordering::Relaxed);
        self.head.store(head + n as u64, Ordering::Release);
    }

    /// Wakes the consumer if it is waiting.
    pub fn wake(&self) {
        self.wake_consumer();
    }

    /// A number that changes whenever bytes are published or consumed.
    pub fn progress(&self) -> u64 {
        self.head.load(Ordering::Acquire).wrapping_add(self.tail.load(Ordering::Acquire))
    }

    /// Bytes published and not yet consumed.
    pub fn buffered(&self) -> usize {
        (self.head.load(Ordering::Acquire) - self.tail.load(Ordering::Acquire)) as usize
    }

    /// Marks the end of the data (with an error, or `None` for EOF).
    pub fn close(&self, error: Option<String>) {
        if let Some(e) = error {
            self.error.lock().expect("pipe lock").get_or_insert(e);
        }
        self.closed.store(true, Ordering::Release);
        self.wake_consumer();
    }

    fn wake_consumer(&self) {
        fence(Ordering::SeqCst);
        if self.consumer_waiting.load(Ordering::Relaxed)
            && let Some(t) = self.consumer.lock().expect("pipe lock").as_ref()
        {
            t.unpark();
        }
    }

    /// Called by the producer when it found no space: it will be woken
    /// (through the producer callback) once the consumer frees some.
    /// Returns false if space appeared meanwhile (go on without waiting).
    pub fn producer_stall(&self) -> bool {
        self.producer_waiting.store(true, Ordering::SeqCst);
        if self.writable().1 > 0 {
            self.producer_waiting.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    // ---- consumer side ----

    /// The data: a contiguous slice valid until [`consume`](Self::consume)
    /// passes it.
    pub fn readable(&self) -> &[u8] {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        // SAFETY: [tail, head) was written and published by the producer,
        // which writes nothing there until tail moves past it; the double
        // mapping makes it contiguous from base + tail % cap.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add((tail % self.cap as u64) as usize),
                (head - tail) as usize,
            )
        }
    }

    /// Frees `n` bytes at the front of the data.
    pub fn consume(&self, n: usize) {
        if n == 0 {
            return;
        }
        let tail = self.tail.load(Ordering::Relaxed);
        debug_assert!(tail + n as u64 <= self.head.load(Ordering::Acquire));
        self.tail.store(tail + n as u64, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.producer_waiting.swap(false, Ordering::SeqCst)
            && let Some(wake) = self.producer_wake.lock().expect("pipe lock").as_ref()
        {
            wake();
        }
    }

    /// True once the producer closed the pipe and all data was taken.
    pub fn is_drained(&self) -> bool {
        self.closed.load(Ordering::Acquire) && self.readable().is_empty()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The producer's error, if it closed with one.
    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("pipe lock").clone()
    }

    /// Waits until more than `have` bytes are readable or the pipe is
    /// closed; false on close with no new data.
    pub fn wait_more(&self, have: usize) -> bool {
        let mut checks = 0u32;
        loop {
            if self.readable().len() > have {
                return true;
            }
            if self.is_closed() {
                return self.readable().len() > have;
            }
            if checks < SPIN_CHECKS {
                checks += 1;
                std::hint::spin_loop();
                continue;
            }
            self.consumer_waiting.store(true, Ordering::SeqCst);
            if self.readable().len() > have || self.is_closed() {
                self.consumer_waiting.store(false, Ordering::SeqCst);
                continue;
            }
            std::thread::park_timeout(Duration::from_millis(100));
            self.consumer_waiting.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: the two halves were mapped in `map`; nothing refers to them
        // once the last Arc goes (receive operations hold an Arc).
        unsafe { libc::munmap(self.base.as_ptr().cast(), 2 * self.cap) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_contiguously_and_hands_over_between_threads() {
        let pipe = Pipe::new(4096).unwrap();
        let cap = pipe.capacity();
        let total: usize = cap * 50 + 123;
        let producer = {
            let pipe = pipe.clone();
            std::thread::spawn(move || {
                let mut sent = 0usize;
                while sent < total {
                    let (p, free) = pipe.writable();
                    if free == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    let n = free.min(total - sent).min(1000 + sent % 777);
                    for i in 0..n {
                        // SAFETY: within the free span writable() returned.
                        unsafe { *p.add(i) = ((sent + i) % 251) as u8 };
                    }
                    pipe.commit(n);
                    sent += n;
                }
                pipe.close(None);
            })
        };
        pipe.set_consumer(std::thread::current());
        let mut got = 0usize;
        loop {
            let data = pipe.readable();
            if data.is_empty() {
                if !pipe.wait_more(0) {
                    break;
                }
                continue;
            }
            // Take a run that may straddle the wrap, in one slice.
            let take = data.len().min(3001);
            for (i, &b) in data[..take].iter().enumerate() {
                assert_eq!(b, ((got + i) % 251) as u8, "byte {}", got + i);
            }
            got += take;
            pipe.consume(take);
        }
        producer.join().unwrap();
        assert_eq!(got, total);
        assert!(pipe.is_drained() && pipe.error().is_none());
    }
}
