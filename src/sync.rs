//! The synchronisation primitives of the structures that `loom` checks.
//!
//! The SPSC ring, the park flag, the foreign-thread inbox and the control
//! table's lane protocol take their atomics (and the ring its slots and
//! locks) from here: std's in every normal build, loom's when the crate is
//! built with `--cfg loom` to model-check them (`tools/test` runs
//! `RUSTFLAGS="--cfg loom" cargo test --profile loom --lib loom`). The std
//! side is a plain re-export, so the normal build is the same code as
//! before. A loom build exists only to run those model checks: loom's
//! atomics work only inside `loom::model`, so nothing else runs in it.
//!
//! One limit of loom shapes the code it checks: it treats a `SeqCst` load or
//! store as `AcqRel`, but models `fence(SeqCst)` exactly. Every Dekker-style
//! "store mine, then load yours" pair here therefore puts a `SeqCst` fence
//! between the store and the load, which is also the textbook form of the
//! argument.

#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

pub(crate) mod atomic {
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};

    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
}

/// An `UnsafeCell` with loom's closure-based access, so that loom can see
/// (and flag) two threads touching the same slot without a happens-before.
pub(crate) mod cell {
    #[cfg(loom)]
    pub(crate) use loom::cell::UnsafeCell;

    /// std's `UnsafeCell`, with loom's way in.
    #[cfg(not(loom))]
    #[derive(Debug)]
    #[repr(transparent)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    #[cfg(not(loom))]
    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        /// Runs `f` with a pointer for writing; the caller must have the
        /// right to write (no other access at the same time).
        #[inline(always)]
        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

/// Runs `f` in the loom model, with the preemption bound from
/// `LOOM_MAX_PREEMPTIONS` (default 2 here, where loom's default is none):
/// every model in this crate is small, and two preemptions find the
/// ordering bugs they are built to find (each model says how it fails).
#[cfg(all(test, loom))]
pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}
