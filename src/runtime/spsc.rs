//! A bounded, lock-free, single-producer single-consumer ring.
//!
//! The classic design (Lamport, with cached indices as in rtrb and folly's
//! ProducerConsumerQueue): the producer owns `tail`, the consumer owns `head`,
//! each publishes its index with a Release store and reads the other's with
//! an Acquire load, and each keeps a cached copy of the other's index so that
//! the shared cache line is touched only when the cached view says the ring is
//! full (producer) or empty (consumer). Indices grow without wrapping in
//! practice (`usize`), and slots are `index & mask`.
//!
//! Two extras serve the shard runtime:
//! - **Closing.** A consumer that goes away for good calls
//!   [`Consumer::close_and_drain`]. A producer that pushes afterwards gets its
//!   value back as [`PushError::Closed`], and no value is ever stranded in a
//!   ring nobody reads: see `push` for the argument.
//! - **Liveness.** The consumer can see that the producer has been dropped
//!   ([`Consumer::is_abandoned`]), so rings of exited threads are reclaimed.

use std::mem::MaybeUninit;

use crate::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use crate::sync::cell::UnsafeCell;
use crate::sync::{Arc, Mutex};

use crossbeam_utils::CachePadded;

/// Largest ring we build: 2^24 slots.
pub const CAPACITY_MAX: usize = 1 << 24;

struct Ring<T> {
    /// Next slot the consumer reads. Written only by the consumer (or, after
    /// the consumer closed, by the producer under `shutdown`).
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes. Written only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// Set by the consumer when it will never pop again.
    closed: AtomicBool,
    /// Set when the producer is dropped.
    abandoned: AtomicBool,
    /// Serialises the consumer's final drain with a producer's reclaim.
    shutdown: Mutex<()>,
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: a slot is accessed by exactly one side at a time: the producer
// writes slots in [tail, head + capacity) and the consumer reads slots in
// [head, tail). The Release/Acquire index stores hand each slot over, so T
// only needs to be Send.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: see above; the ring owns its Ts.
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: an endpoint's raw slot pointer points into the ring its Arc keeps
// alive, and each endpoint is used by one thread at a time (&mut self).
unsafe impl<T: Send> Send for Producer<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Consumer<T> {}

impl<T> Ring<T> {
    /// Takes the value out of the slot for a (never-wrapping) index.
    ///
    /// # Safety
    /// The slot holds a value written by push and not yet read, and the
    /// caller has the right to read it (it is the consumer, or acts as one).
    #[inline]
    unsafe fn take(&self, index: usize) -> T {
        // `index & mask` is below `slots.len()`, a power of two equal to
        // mask + 1: indexing never panics.
        // SAFETY: forwarded from the caller.
        self.slots[index & self.mask].with_mut(|slot| unsafe { (*slot).assume_init_read() })
    }

    /// Drops every value in [head, tail). Caller must be the only accessor.
    fn drop_pending(&self) {
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        for index in head..tail {
            // SAFETY: slots in [head, tail) were written by push and not yet
            // read; the caller guarantees exclusive access.
            drop(unsafe { self.take(index) });
        }
        self.head.store(tail, Ordering::Release);
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        self.drop_pending();
    }
}

/// Why a push failed. The value comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// The ring holds `capacity` values; try again after the consumer runs.
    Full(T),
    /// The consumer has closed the ring and will never read it.
    Closed(T),
}

impl<T> PushError<T> {
    pub fn into_inner(self) -> T {
        match self {
            PushError::Full(v) | PushError::Closed(v) => v,
        }
    }
}

/// The writing end.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    tail: usize,
    cached_head: usize,
    /// Copies of the ring's constants, so the hot path reads only this
    /// struct and the slot it writes (loom's slots are reached through the
    /// ring, where it can watch every access).
    #[cfg(not(loom))]
    slots: *mut MaybeUninit<T>,
    mask: usize,
}

/// The reading end.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    head: usize,
    cached_tail: usize,
    #[cfg(not(loom))]
    slots: *mut MaybeUninit<T>,
    mask: usize,
    /// The head the producer can see. Publishing every pop would move the
    /// cache line holding `head` to the producer's core once per message when
    /// the ring runs full; publishing every `publish_every` pops, and always
    /// when the ring runs empty, moves it once per batch.
    published_head: usize,
    publish_every: usize,
}

/// Builds a ring of `capacity` slots (rounded up to a power of two, at least 2).
///
/// # Panics
/// If `capacity` exceeds [`CAPACITY_MAX`]: ring sizes are configuration, and
/// callers validate configuration before building rings.
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity <= CAPACITY_MAX, "ring capacity {capacity} above {CAPACITY_MAX}");
    let capacity = capacity.max(2).next_power_of_two();
    let slots = (0..capacity).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect();
    let ring = Arc::new(Ring {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        closed: AtomicBool::new(false),
        abandoned: AtomicBool::new(false),
        shutdown: Mutex::new(()),
        mask: capacity - 1,
        slots,
    });
    // UnsafeCell<MaybeUninit<T>> has the layout of T's slot (both cells are
    // repr(transparent)), so the slice's base pointer addresses slot 0.
    #[cfg(not(loom))]
    let base = ring.slots.as_ptr() as *mut MaybeUninit<T>;
    let mask = ring.mask;
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            cached_head: 0,
            #[cfg(not(loom))]
            slots: base,
            mask,
        },
        Consumer {
            ring,
            head: 0,
            cached_tail: 0,
            #[cfg(not(loom))]
            slots: base,
            mask,
            published_head: 0,
            publish_every: (capacity / 8).max(1),
        },
    )
}

impl<T> Producer<T> {
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Whether the consumer has closed the ring.
    pub fn is_closed(&self) -> bool {
        self.ring.closed.load(Ordering::Acquire)
    }

    /// Pushes without the shutdown check. The value is visible to the
    /// consumer once this returns `Ok`, but if the consumer closes the ring
    /// concurrently the value may stay in the ring until both ends are
    /// dropped. Use it where that is harmless (the shard mesh, whose rings all
    /// die together at shutdown); use [`Producer::push`] elsewhere.
    #[inline]
    pub fn push_unchecked(&mut self, value: T) -> Result<(), PushError<T>> {
        let capacity = self.mask + 1;
        if self.tail - self.cached_head == capacity {
            self.cached_head = self.ring.head.load(Ordering::Acquire);
            if self.tail - self.cached_head == capacity {
                return Err(PushError::Full(value));
            }
        }
        // tail - head < capacity, so this slot is free: the consumer has
        // moved past it (or never reached it) and will not touch it until
        // the Release store of tail below publishes it.
        self.write_slot(value);
        self.tail += 1;
        self.ring.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Writes `value` into the free slot at `tail`.
    #[inline(always)]
    fn write_slot(&mut self, value: T) {
        // SAFETY: the slot at tail is free (checked by the caller), and
        // `tail & mask` is in bounds of the slot array `slots` points to,
        // which the Arc keeps alive.
        #[cfg(not(loom))]
        unsafe {
            (*self.slots.add(self.tail & self.mask)).write(value)
        };
        #[cfg(loom)]
        // SAFETY: as above.
        self.ring.slots[self.tail & self.mask].with_mut(|slot| unsafe { (*slot).write(value) });
    }

    /// Pushes a value, or hands it back if the ring is full or closed.
    ///
    /// No value is ever stranded. The producer publishes `tail`, issues a
    /// SeqCst fence and reads `closed`; the consumer's close sets `closed`,
    /// issues a SeqCst fence and reads `tail`. Of two fenced store-then-load
    /// pairs, at least one load sees the other's store: either the consumer's
    /// final drain sees (and drops) the value, or this push sees `closed` and
    /// takes the value back itself, after waiting for the drain to finish.
    pub fn push(&mut self, value: T) -> Result<(), PushError<T>> {
        if self.is_closed() {
            return Err(PushError::Closed(value));
        }
        self.push_unchecked(value)?;
        fence(Ordering::SeqCst);
        if !self.ring.closed.load(Ordering::Relaxed) {
            return Ok(());
        }
        // The consumer closed while we pushed. Wait for its final drain (it
        // holds `shutdown` throughout), then act as the consumer: it will
        // never touch the ring again.
        let _guard = self.ring.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        let head = self.ring.head.load(Ordering::Acquire);
        if head == self.tail {
            // The drain already took our value; it has been dropped there.
            return Ok(());
        }
        // Our value is the last one; anything before it was pushed by an
        // earlier call that saw `closed` false, and the drain took those.
        debug_assert_eq!(head + 1, self.tail);
        self.tail -= 1;
        // SAFETY: the slot at tail - 1 holds our value, written above and not
        // read by the consumer (head == tail - 1 means it stopped before it).
        let value = unsafe { self.ring.take(self.tail) };
        self.ring.tail.store(self.tail, Ordering::Release);
        Err(PushError::Closed(value))
    }

    /// Values in the ring as the producer sees them: may overcount by the
    /// consumer's unpublished batch.
    pub fn len(&self) -> usize {
        self.tail - self.ring.head.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Drop for Producer<T> {
    fn drop(&mut self) {
        self.ring.abandoned.store(true, Ordering::Release);
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        // The ring drops what lies in [head, tail): make head exact first.
        self.publish_head();
    }
}

impl<T> Consumer<T> {
    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }

    /// Pops the oldest value.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.cached_tail {
            self.publish_head();
            self.cached_tail = self.ring.tail.load(Ordering::Acquire);
            if self.head == self.cached_tail {
                return None;
            }
        }
        let value = self.read_slot();
        self.head += 1;
        if self.head - self.published_head >= self.publish_every {
            self.publish_head();
        }
        Some(value)
    }

    /// Reads the value at `head`, which the caller found below `tail`.
    #[inline(always)]
    fn read_slot(&mut self) -> T {
        // SAFETY: head < tail, so the producer wrote this slot and published
        // it with the Release store of tail that our Acquire load saw; the
        // index is masked into the slot array the Arc keeps alive.
        #[cfg(not(loom))]
        let value = unsafe { (*self.slots.add(self.head & self.mask)).assume_init_read() };
        // SAFETY: as above.
        #[cfg(loom)]
        let value = unsafe { self.ring.take(self.head) };
        value
    }

    /// Lets the producer see every slot popped so far.
    #[inline]
    fn publish_head(&mut self) {
        if self.published_head != self.head {
            self.ring.head.store(self.head, Ordering::Release);
            self.published_head = self.head;
        }
    }

    /// Whether a value is waiting (reads the producer's index).
    #[inline]
    pub fn has_pending(&mut self) -> bool {
        if self.head != self.cached_tail {
            return true;
        }
        self.cached_tail = self.ring.tail.load(Ordering::Acquire);
        self.head != self.cached_tail
    }

    /// Values currently in the ring (a snapshot).
    pub fn len(&self) -> usize {
        self.ring.tail.load(Ordering::Acquire) - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the producer has been dropped. Values it pushed before that
    /// are still poppable.
    pub fn is_abandoned(&self) -> bool {
        self.ring.abandoned.load(Ordering::Acquire)
    }

    /// Whether the producer is gone and every value it pushed was popped:
    /// the ring can be dropped. `abandoned` is read first: the producer's
    /// last push is published before it marks the ring, so a value pushed
    /// before the mark is seen by the emptiness check that follows.
    pub fn is_finished(&mut self) -> bool {
        self.is_abandoned() && !self.has_pending()
    }

    /// Closes the ring for good and drops every value still in it. Returns
    /// how many values were dropped. See [`Producer::push`] for why none can
    /// be stranded.
    pub fn close_and_drain(mut self) -> usize {
        let ring = self.ring.clone();
        let _guard = ring.shutdown.lock().unwrap_or_else(|e| e.into_inner());
        self.ring.closed.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let mut dropped = 0;
        while let Some(value) = self.pop() {
            drop(value);
            dropped += 1;
        }
        dropped
    }
}

/// A value that counts its drops, for the tests here and in `inbox`: a
/// value lost or dropped twice shows in the count.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Counted(pub(crate) Arc<AtomicUsize>);

#[cfg(test)]
impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_full() {
        let (mut p, mut c) = channel::<u32>(4);
        assert_eq!(p.capacity(), 4);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(PushError::Full(9)));
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        assert_eq!((1..5).map(|_| c.pop().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn capacity_rounds_up() {
        assert_eq!(channel::<u8>(0).0.capacity(), 2);
        assert_eq!(channel::<u8>(5).0.capacity(), 8);
    }

    #[test]
    fn dropping_both_ends_drops_pending_values() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut p, c) = channel(8);
        for _ in 0..5 {
            p.push(Counted(drops.clone())).unwrap();
        }
        drop(p);
        assert!(c.is_abandoned());
        drop(c);
        assert_eq!(drops.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn close_drains_and_later_pushes_come_back() {
        let drops = Arc::new(AtomicUsize::new(0));
        let (mut p, c) = channel(8);
        p.push(Counted(drops.clone())).unwrap();
        p.push(Counted(drops.clone())).unwrap();
        assert_eq!(c.close_and_drain(), 2);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
        assert!(p.is_closed());
        match p.push(Counted(drops.clone())) {
            Err(PushError::Closed(v)) => drop(v),
            other => panic!("expected Closed, got {:?}", other.is_ok()),
        }
        assert_eq!(drops.load(Ordering::SeqCst), 3);
        drop(p);
        assert_eq!(drops.load(Ordering::SeqCst), 3, "nothing left to drop twice");
    }
}

/// Model checks (`RUSTFLAGS="--cfg loom" cargo test --profile loom --lib
/// loom`). Loom watches every slot access: a value read before its write
/// is published, or a slot rewritten while it is read, is a reported race.
/// How each fails when the code is broken: publishing `tail` or reading
/// `head` with Relaxed makes the first one race on a slot; dropping the
/// fence in `push` (or in `close_and_drain`) strands a value in the second;
/// checking emptiness before `abandoned` in `is_finished` loses a value in
/// the third.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Three values through a ring of two (it fills, and wraps): all
    /// arrive, in order, with no race on a slot.
    #[test]
    fn loom_values_cross_in_order() {
        crate::sync::model(|| {
            let (mut tx, mut rx) = channel::<u32>(2);
            let producer = thread::spawn(move || {
                for v in 0..3 {
                    let mut v = v;
                    while let Err(PushError::Full(back)) = tx.push_unchecked(v) {
                        v = back;
                        thread::yield_now();
                    }
                }
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                match rx.pop() {
                    Some(v) => got.push(v),
                    None => thread::yield_now(),
                }
            }
            producer.join().unwrap();
            assert_eq!(got, [0, 1, 2]);
        });
    }

    /// A push racing the consumer's close: the value is either drained (and
    /// dropped) by the close, or handed back to the producer; never left in
    /// a ring nobody reads while the producer lives on.
    #[test]
    fn loom_a_push_racing_close_is_drained_or_handed_back() {
        crate::sync::model(|| {
            let drops = Arc::new(AtomicUsize::new(0));
            let (mut tx, rx) = channel::<Counted>(2);
            let value = Counted(drops.clone());
            let producer = thread::spawn(move || {
                let pushed = tx.push(value);
                (tx, pushed)
            });
            rx.close_and_drain();
            let (tx, pushed) = producer.join().unwrap();
            match pushed {
                Ok(()) => {}
                Err(PushError::Closed(v)) => drop(v),
                Err(PushError::Full(_)) => panic!("a ring of two is not full after one push"),
            }
            assert_eq!(drops.load(Ordering::Relaxed), 1, "the value was stranded (or dropped twice)");
            drop(tx);
            assert_eq!(drops.load(Ordering::Relaxed), 1);
        });
    }

    /// A producer that pushes and goes away (a foreign thread exiting): the
    /// consumer drops its ring only once it has popped everything.
    #[test]
    fn loom_a_finished_ring_has_nothing_left() {
        crate::sync::model(|| {
            let (mut tx, mut rx) = channel::<u32>(2);
            let producer = thread::spawn(move || {
                tx.push(1).unwrap();
                drop(tx);
            });
            let mut popped = 0;
            loop {
                if rx.pop().is_some() {
                    popped += 1;
                } else if rx.is_finished() {
                    break;
                } else {
                    thread::yield_now();
                }
            }
            assert_eq!(popped, 1, "the ring was reclaimed with a value in it");
            producer.join().unwrap();
        });
    }
}
