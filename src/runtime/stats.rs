//! Shard counters. The shard keeps plain counters and publishes them into
//! relaxed atomics every so often; readers get a recent snapshot without
//! slowing the loop.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A snapshot of one shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShardStats {
    /// Loop iterations.
    pub loops: u64,
    /// Jobs run (from rings, the local queue, timers and completions).
    pub jobs_run: u64,
    /// Jobs, callbacks and hooks that panicked.
    pub panics: u64,
    /// Jobs dropped unrun at shutdown.
    pub jobs_canceled: u64,
    /// Times the shard parked.
    pub parks: u64,
    /// Wake-ups seen on the eventfd.
    pub wakeups: u64,
    /// Eventfd writes made to wake this shard.
    pub wake_writes: u64,
    /// io_uring_enter calls.
    pub enters: u64,
    /// Completions reaped.
    pub completions: u64,
    /// Timers fired.
    pub timers_fired: u64,
    /// Rings from foreign threads currently attached.
    pub foreign_rings: u64,
    /// The spin budget now in force, in nanoseconds.
    pub spin_budget_ns: u64,
}

macro_rules! stats_cell {
    ($($field:ident),*) => {
        #[derive(Default)]
        pub(crate) struct StatsCell { $($field: AtomicU64,)* }

        impl StatsCell {
            pub(crate) fn publish(&self, s: &ShardStats) {
                $(self.$field.store(s.$field, Ordering::Relaxed);)*
            }

            pub(crate) fn snapshot(&self) -> ShardStats {
                ShardStats { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }
    };
}

stats_cell!(
    loops,
    jobs_run,
    panics,
    jobs_canceled,
    parks,
    wakeups,
    wake_writes,
    enters,
    completions,
    timers_fired,
    foreign_rings,
    spin_budget_ns
);
