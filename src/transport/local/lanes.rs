//! The lane protocol of the control table (`control.rs`), on its own: the
//! steps a peer takes around a copy and the steps the target takes to
//! withdraw a buffer, over whichever atomic words hold the state.
//!
//! In the table those words live in a memfd shared between processes (std
//! atomics in a mapping); in the `loom` tests below they are loom's, on the
//! heap, so loom can check the promise the table makes: once the target
//! has closed a slot and seen no lane naming it, no copy into that buffer
//! runs or starts.
//!
//! Both sides are a Dekker pair, each with a SeqCst fence between its store
//! and its load (see `crate::sync` for why a fence and not only SeqCst
//! accesses):
//!
//! ```text
//!   peer (enter)                         target (close, then wait)
//!   lane.busy = slot + 1                 slot.state = CLOSED; generation += 1
//!   fence(SeqCst)                        fence(SeqCst)
//!   slot open, same generation? copy     any lane.busy == slot + 1? wait
//! ```
//!
//! Either the peer sees the slot closed (and copies nothing) or the target
//! sees the lane (and waits until the peer's `exit`, a SeqCst store whose
//! release carries the copy before it).

use std::sync::atomic::Ordering::SeqCst;

use crate::sync::atomic::{Ordering, fence};

/// The target process is up (its header's state word).
pub(crate) const STATE_LIVE: u64 = 1;
/// The target is going away.
pub(crate) const STATE_SHUT_DOWN: u64 = 2;
/// A slot's states.
pub(crate) const SLOT_FREE: u64 = 0;
pub(crate) const SLOT_OPEN: u64 = 1;
pub(crate) const SLOT_CLOSED: u64 = 2;

/// An atomic word the protocol reads and writes, read as a u64.
pub(crate) trait Word {
    fn get(&self, order: Ordering) -> u64;
    fn set(&self, value: u64, order: Ordering);
    fn replace(&self, value: u64, order: Ordering) -> u64;
    fn bump(&self, order: Ordering) -> u64;
}

macro_rules! impl_word {
    ($atomic:ty, $int:ty) => {
        // One body for the 32- and the 64-bit words: the conversions are
        // no-ops for the latter.
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast, clippy::unnecessary_fallible_conversions)]
        impl Word for $atomic {
            #[inline]
            fn get(&self, order: Ordering) -> u64 {
                u64::from(self.load(order))
            }
            #[inline]
            fn set(&self, value: u64, order: Ordering) {
                // Every value the protocol stores in a narrow word (states)
                // fits it.
                debug_assert!(<$int>::try_from(value).is_ok());
                self.store(value as $int, order)
            }
            #[inline]
            fn replace(&self, value: u64, order: Ordering) -> u64 {
                debug_assert!(<$int>::try_from(value).is_ok());
                u64::from(self.swap(value as $int, order))
            }
            #[inline]
            fn bump(&self, order: Ordering) -> u64 {
                u64::from(self.fetch_add(1, order))
            }
        }
    };
}

impl_word!(std::sync::atomic::AtomicU32, u32);
impl_word!(std::sync::atomic::AtomicU64, u64);
#[cfg(loom)]
impl_word!(loom::sync::atomic::AtomicU32, u32);
#[cfg(loom)]
impl_word!(loom::sync::atomic::AtomicU64, u64);

/// What a lane's busy word holds while it copies `slot`.
#[inline]
pub(crate) fn busy_mark(slot: u32) -> u64 {
    u64::from(slot) + 1
}

/// Target: opens a slot whose buffer fields are written (a new generation,
/// so views of its previous buffer no longer enter).
pub(crate) fn open(state: &impl Word, generation: &impl Word) {
    generation.bump(SeqCst);
    state.set(SLOT_OPEN, SeqCst);
}

/// Target: closes a slot; no copy enters it from now on. Then wait until
/// [`copying`] is false for every lane, and [`free`] it.
pub(crate) fn close(state: &impl Word, generation: &impl Word) {
    if state.replace(SLOT_CLOSED, SeqCst) == SLOT_OPEN {
        generation.bump(SeqCst);
    }
    fence(SeqCst);
}

/// Target, after [`close`]: whether `busy` (a lane's word) names `slot`.
#[inline]
pub(crate) fn copying(busy: &impl Word, slot: u32) -> bool {
    busy.get(SeqCst) == busy_mark(slot)
}

/// Target: no lane names the closed slot; it may be reused.
pub(crate) fn free(state: &impl Word) {
    state.set(SLOT_FREE, SeqCst);
}

/// Peer: starts a copy of `slot` on its lane (`busy`) if the target is live
/// (`target`) and the slot is open with the generation the peer knows.
/// `true`: copy, then [`exit`]. `false`: the buffer is withdrawn; copy
/// nothing (the lane is idle again).
pub(crate) fn enter(
    busy: &impl Word,
    slot: u32,
    target: &impl Word,
    state: &impl Word,
    generation: &impl Word,
    known_generation: u64,
) -> bool {
    busy.set(busy_mark(slot), SeqCst);
    fence(SeqCst);
    let ok = target.get(SeqCst) == STATE_LIVE
        && state.get(SeqCst) == SLOT_OPEN
        && generation.get(SeqCst) == known_generation;
    if !ok {
        busy.set(0, SeqCst);
    }
    ok
}

/// Peer: the copy on this lane ended.
#[inline]
pub(crate) fn exit(busy: &impl Word) {
    busy.set(0, SeqCst);
}

/// Model checks (`RUSTFLAGS="--cfg loom" cargo test --profile loom --lib
/// loom`). The buffer is a loom cell: the peer writes it inside its copy,
/// the target writes it once it has withdrawn the slot (reusing the
/// memory). A copy that overlaps the reuse is a race loom reports. How it
/// fails when broken: without either fence, or with the peer checking the
/// slot before announcing its lane, loom finds the run where the peer sees
/// the slot open and the target sees the lane idle.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::Arc;
    use crate::sync::atomic::{AtomicU32, AtomicU64};
    use crate::sync::cell::UnsafeCell;
    use loom::thread;

    struct Model {
        target: AtomicU32,
        state: AtomicU32,
        generation: AtomicU64,
        lanes: [AtomicU64; 2],
        /// The slot's buffer: one part per lane (two copies run at once
        /// into different bytes of it).
        buffer: [UnsafeCell<u64>; 2],
    }

    // SAFETY: the buffer is what the protocol guards: written by a peer
    // between enter and exit, by the target after the withdrawal. Loom
    // checks every access to it for a missing happens-before.
    unsafe impl Sync for Model {}

    const SLOT: u32 = 5;

    fn model() -> Arc<Model> {
        let m = Model {
            target: AtomicU32::new(STATE_LIVE as u32),
            state: AtomicU32::new(SLOT_FREE as u32),
            generation: AtomicU64::new(0),
            lanes: [AtomicU64::new(0), AtomicU64::new(0)],
            buffer: [UnsafeCell::new(0), UnsafeCell::new(0)],
        };
        open(&m.state, &m.generation);
        Arc::new(m)
    }

    /// One peer copy on `lane`, knowing generation `known`.
    fn peer_copy(m: &Model, lane: usize, known: u64) -> bool {
        if !enter(&m.lanes[lane], SLOT, &m.target, &m.state, &m.generation, known) {
            return false;
        }
        // SAFETY: inside enter/exit the buffer is the copy's; loom checks
        // that the target's reuse never overlaps it.
        m.buffer[lane].with_mut(|p| unsafe { *p += 1 });
        exit(&m.lanes[lane]);
        true
    }

    /// The target withdraws the slot, waits for every lane, reuses it.
    fn withdraw(m: &Model) {
        close(&m.state, &m.generation);
        while m.lanes.iter().any(|l| copying(l, SLOT)) {
            thread::yield_now();
        }
        free(&m.state);
        for part in &m.buffer {
            // SAFETY: withdrawn: loom reports any copy still touching it.
            part.with_mut(|p| unsafe { *p = 100 });
        }
    }

    #[test]
    fn loom_no_copy_overlaps_a_withdrawal() {
        crate::sync::model(|| {
            let m = model();
            let known = m.generation.load(Ordering::Relaxed);
            let peers: Vec<_> = (0..2)
                .map(|lane| {
                    let m = m.clone();
                    thread::spawn(move || peer_copy(&m, lane, known))
                })
                .collect();
            withdraw(&m);
            for p in peers {
                p.join().unwrap();
            }
            // The copies that went in ran before the reuse (loom would
            // have reported the overlap), or they did not go in at all.
            for part in &m.buffer {
                // SAFETY: every thread has joined.
                part.with_mut(|p| assert_eq!(unsafe { *p }, 100, "a copy landed after the withdrawal"));
            }
        });
    }

    /// A view from before a reopen (an older generation) copies nothing,
    /// even with the slot open again.
    #[test]
    fn loom_a_stale_generation_does_not_enter() {
        crate::sync::model(|| {
            let m = model();
            let stale = m.generation.load(Ordering::Relaxed);
            let peer = {
                let m = m.clone();
                thread::spawn(move || peer_copy(&m, 0, stale))
            };
            withdraw(&m);
            open(&m.state, &m.generation);
            peer.join().unwrap();
            // SAFETY: every thread has joined.
            let value = m.buffer[0].with_mut(|p| unsafe { *p });
            assert_eq!(value, 100, "the stale copy landed after the reuse");
            assert!(!enter(&m.lanes[0], SLOT, &m.target, &m.state, &m.generation, stale), "stale after reopen");
        });
    }
}
