//! One io_uring per shard: set-up with fallbacks, and the table of operations
//! in flight.
//!
//! Set-up tries, in order (kernel floors in brackets):
//! 1. SINGLE_ISSUER [6.0] + DEFER_TASKRUN [6.1] + TASKRUN_FLAG [5.19]:
//!    completions are produced only when the shard enters with GETEVENTS,
//!    and the TASKRUN flag in the SQ ring tells the shard, without a
//!    syscall, that there is deferred work to run.
//! 2. SINGLE_ISSUER + COOP_TASKRUN [5.19] + TASKRUN_FLAG.
//! 3. COOP_TASKRUN + TASKRUN_FLAG.
//! 4. No flags. The kernel posts completions by itself, via task work.
//!
//! A set-up rejected with EINVAL falls through to the next; any other error
//! (ENOSYS, EPERM from a seccomp filter, ENOMEM) means io_uring is not usable
//! and is reported. IORING_FEAT_EXT_ARG [5.11] is required: a parked shard
//! waits for "one completion or the next timer" in a single enter.

use std::io;

use io_uring::{IoUring, cqueue, squeue};

use super::ShardCtx;
use super::error::OpError;

/// Which set-up the ring got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct RingFeatures {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
    pub taskrun_flag: bool,
}

impl RingFeatures {
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.single_issuer {
            parts.push("SINGLE_ISSUER");
        }
        if self.defer_taskrun {
            parts.push("DEFER_TASKRUN");
        }
        if self.coop_taskrun {
            parts.push("COOP_TASKRUN");
        }
        if self.taskrun_flag {
            parts.push("TASKRUN_FLAG");
        }
        if parts.is_empty() { "plain".into() } else { parts.join("+") }
    }
}

/// How hard to try for the modern set-up flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UringSetup {
    /// The best set-up the kernel accepts.
    #[default]
    Auto,
    /// No set-up flags at all: the fallback path, selectable for testing.
    Plain,
}

impl UringSetup {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "auto" | "" => Some(Self::Auto),
            "plain" => Some(Self::Plain),
            _ => None,
        }
    }
}

/// Builds the ring for the calling thread (SINGLE_ISSUER binds it to the
/// first thread that submits, so call this on the shard's own thread).
pub(crate) fn build_ring(entries: u32, setup: UringSetup) -> io::Result<(IoUring, RingFeatures)> {
    let attempts: &[RingFeatures] = match setup {
        UringSetup::Auto => &[
            RingFeatures { single_issuer: true, defer_taskrun: true, coop_taskrun: false, taskrun_flag: true },
            RingFeatures { single_issuer: true, defer_taskrun: false, coop_taskrun: true, taskrun_flag: true },
            RingFeatures { single_issuer: false, defer_taskrun: false, coop_taskrun: true, taskrun_flag: true },
            RingFeatures::default(),
        ],
        UringSetup::Plain => &[RingFeatures::default()],
    };
    let mut last = None;
    for features in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries.saturating_mul(4)).setup_clamp();
        if features.single_issuer {
            builder.setup_single_issuer();
        }
        if features.defer_taskrun {
            builder.setup_defer_taskrun();
        }
        if features.coop_taskrun {
            builder.setup_coop_taskrun();
        }
        if features.taskrun_flag {
            builder.setup_taskrun_flag();
        }
        match builder.build(entries) {
            Ok(ring) => {
                if !ring.params().is_feature_ext_arg() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "io_uring lacks IORING_FEAT_EXT_ARG (needs Linux 5.11 or later)",
                    ));
                }
                return Ok((ring, *features));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no io_uring set-up was accepted")))
}

/// One completion as the shard hands it to an operation's callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The operation's result: a byte count, or a negated errno.
    pub result: i32,
    /// The CQE flags (`IORING_CQE_F_MORE` and friends).
    pub flags: u32,
}

impl Completion {
    /// The result as an `io::Result`.
    pub fn io_result(&self) -> io::Result<u32> {
        if self.result < 0 { Err(io::Error::from_raw_os_error(-self.result)) } else { Ok(self.result as u32) }
    }

    /// Whether more completions will follow for this operation (multishot).
    pub fn has_more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// What runs when an operation completes. A multishot operation's callback
/// runs once per completion until one arrives without `has_more()`.
pub type OpCallback = Box<dyn FnMut(&mut ShardCtx, Completion)>;

/// Identifies an operation in flight (for cancellation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId(pub(crate) u64);

/// User data the shard reserves for its own operations.
pub(crate) const WAKE_READ_USER_DATA: u64 = u64::MAX;
pub(crate) const INTERNAL_USER_DATA: u64 = u64::MAX - 1;

struct OpSlot {
    generation: u32,
    callback: Option<OpCallback>,
}

/// Operations in flight, indexed by the low 32 bits of their user data; the
/// high 32 bits hold a generation so a stale CQE cannot hit a reused slot.
pub(crate) struct OpTable {
    slots: Vec<OpSlot>,
    free: Vec<u32>,
    in_flight: usize,
    max: usize,
}

impl OpTable {
    pub(crate) fn new(max: usize) -> Self {
        Self { slots: Vec::new(), free: Vec::new(), in_flight: 0, max }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn insert(&mut self, callback: OpCallback) -> Result<OpId, OpError> {
        if self.in_flight >= self.max {
            return Err(OpError::TooMany(self.max));
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(OpSlot { generation: 0, callback: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1) & 0x7fff_ffff;
        slot.callback = Some(callback);
        self.in_flight += 1;
        Ok(OpId((u64::from(slot.generation) << 32) | u64::from(index)))
    }

    /// Takes the callback for a completion. The slot stays reserved (and the
    /// callback must be given back with [`OpTable::restore`]) if more
    /// completions follow.
    pub(crate) fn take(&mut self, user_data: u64) -> Option<OpCallback> {
        let (generation, index) = ((user_data >> 32) as u32, user_data as u32);
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.callback.take()
    }

    pub(crate) fn restore(&mut self, user_data: u64, callback: OpCallback) {
        if let Some(slot) = self.slots.get_mut(user_data as u32 as usize) {
            slot.callback = Some(callback);
        }
    }

    /// Frees the slot of a finished operation.
    pub(crate) fn release(&mut self, user_data: u64) {
        let (generation, index) = ((user_data >> 32) as u32, user_data as u32);
        if let Some(slot) = self.slots.get_mut(index as usize)
            && slot.generation == generation
        {
            slot.callback = None;
            slot.generation = slot.generation.wrapping_add(1) & 0x7fff_ffff;
            self.free.push(index);
            self.in_flight -= 1;
        }
    }

    /// Forgets every operation still in flight without running or dropping
    /// its callback: used when the kernel might still touch their buffers.
    pub(crate) fn leak_all(&mut self) -> usize {
        let mut leaked = 0;
        for slot in &mut self.slots {
            if let Some(cb) = slot.callback.take() {
                std::mem::forget(cb);
                leaked += 1;
            }
        }
        self.in_flight = 0;
        leaked
    }
}

/// Pushes an entry, submitting to the kernel first if the queue is full.
pub(crate) fn push_entry(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), OpError> {
    // SAFETY: the caller of the public API vouched for the entry's buffers
    // (see ShardCtx::submit_op); pushing only copies the 64-byte SQE.
    if unsafe { ring.submission().push(entry) }.is_ok() {
        return Ok(());
    }
    ring.submit().map_err(|e| OpError::QueueFull(e.to_string()))?;
    // SAFETY: as above.
    unsafe { ring.submission().push(entry) }.map_err(|_| OpError::QueueFull("still full after submit".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_setup_gets_flags_on_this_kernel_and_plain_gets_none() {
        let (_ring, features) = build_ring(8, UringSetup::Auto).expect("io_uring is available");
        assert!(features.taskrun_flag, "{features:?}");
        let (_ring, plain) = build_ring(8, UringSetup::Plain).unwrap();
        assert_eq!(plain, RingFeatures::default());
        assert_eq!(plain.describe(), "plain");
    }

    #[test]
    fn op_table_rejects_stale_completions() {
        let mut t = OpTable::new(2);
        let a = t.insert(Box::new(|_, _| {})).unwrap();
        t.release(a.0);
        let b = t.insert(Box::new(|_, _| {})).unwrap();
        assert_eq!(a.0 as u32, b.0 as u32, "slot reused");
        assert!(t.take(a.0).is_none(), "stale generation");
        assert!(t.take(b.0).is_some());
        t.release(b.0);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn op_table_limit() {
        let mut t = OpTable::new(1);
        t.insert(Box::new(|_, _| {})).unwrap();
        assert_eq!(t.insert(Box::new(|_, _| {})).unwrap_err(), OpError::TooMany(1));
    }
}
