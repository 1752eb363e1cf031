//! Batches and tasks: what a caller waits on.
//!
//! A batch holds tasks (one per request); a task is split into slices that
//! shards carry out. Slices report back through atomics, from any shard; the
//! last slice of the last task sets the batch's latch. Batch ids index a
//! table, so a bogus id is an error, never a dereference (Mooncake casts
//! the id to a pointer).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{TeError, TeResult, code};
use crate::runtime::latch::Latch;
use crate::telemetry::counters::{self as metrics, Op, Side, Via};
use crate::transport::request::Sink;
pub use crate::transport::request::TransferStatus;

/// The settled state of a batch, as `transfer_check_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// Every task completed (1).
    Completed,
    /// Some task is still running (0).
    Pending,
    /// A task failed (-1).
    Failed,
    /// A task ran out of time (-2).
    TimedOut,
}

impl BatchState {
    /// Mooncake's `transfer_check_status` value.
    pub fn code(self) -> i32 {
        match self {
            Self::Completed => 1,
            Self::Pending => 0,
            Self::Failed => -1,
            Self::TimedOut => -2,
        }
    }
}

/// One request of a batch.
#[derive(Debug)]
pub struct Task {
    pub len: u64,
    /// What the metrics count it as.
    op: Op,
    remaining_slices: AtomicU32,
    /// 0, or the first failure's TransferStatus.
    failure: AtomicU8,
    transferred: AtomicU64,
}

impl Task {
    pub fn status(&self) -> TransferStatus {
        if self.remaining_slices.load(Ordering::Acquire) > 0 {
            return TransferStatus::Pending;
        }
        match self.failure.load(Ordering::Acquire) {
            0 => TransferStatus::Completed,
            f => TransferStatus::from_u8(f),
        }
    }

    /// Bytes moved by the slices that completed.
    pub fn transferred(&self) -> u64 {
        self.transferred.load(Ordering::Acquire)
    }
}

/// A set of tasks submitted together.
pub struct Batch {
    /// The segment the batch transfers to.
    pub target: String,
    /// Which process of it the batch was addressed to
    /// (`SegmentDesc::incarnation`; 0 if not said).
    pub instance: u64,
    pub tasks: Box<[Task]>,
    pending_tasks: AtomicUsize,
    /// Tasks that failed or timed out (counted once each).
    failed_tasks: AtomicUsize,
    timed_out_tasks: AtomicUsize,
    pub deadline: Instant,
    settled: Latch,
    /// The transport the metrics count the tasks under (`None`: not
    /// counted) and when the batch was submitted, for their latency.
    via: Option<Via>,
    submitted: Instant,
    first_error: Mutex<Option<String>>,
    /// The first CRC-32C failure's description, if any.
    first_corrupt: Mutex<Option<String>>,
    /// The first failure because the peer process was gone, if any.
    first_gone: Mutex<Option<String>>,
    /// Runs once, when the batch settles (an asyncio loop's wake-up).
    on_settle: Mutex<Option<SettleHook>>,
}

/// What [`Batch::set_on_settle`] runs.
pub type SettleHook = Box<dyn FnOnce() + Send + 'static>;

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("target", &self.target)
            .field("tasks", &self.tasks.len())
            .field("settled", &self.is_settled())
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// A batch whose task `i` will be carried out in `slices[i]` slices; a
    /// task with no slices (zero bytes) is complete at once.
    pub fn new(target: &str, lens: &[u64], slices: &[u32], deadline: Instant) -> Arc<Self> {
        Self::counted(target, 0, None, &vec![Op::Write; lens.len()], lens, slices, deadline)
    }

    /// [`Batch::new`], counted in the metrics as requests of `ops` over
    /// `via` (when given) as they settle. Tasks of no bytes are not
    /// counted: nothing is sent for them.
    #[allow(clippy::too_many_arguments)]
    pub fn counted(
        target: &str,
        instance: u64,
        via: Option<Via>,
        ops: &[Op],
        lens: &[u64],
        slices: &[u32],
        deadline: Instant,
    ) -> Arc<Self> {
        assert_eq!(lens.len(), slices.len());
        assert_eq!(lens.len(), ops.len());
        let tasks: Box<[Task]> = lens
            .iter()
            .zip(slices)
            .zip(ops)
            .map(|((&len, &n), &op)| Task {
                len,
                op,
                remaining_slices: AtomicU32::new(n),
                failure: AtomicU8::new(0),
                transferred: AtomicU64::new(0),
            })
            .collect();
        let pending = slices.iter().filter(|&&n| n > 0).count();
        let batch = Arc::new(Self {
            target: target.to_string(),
            instance,
            tasks,
            pending_tasks: AtomicUsize::new(pending),
            failed_tasks: AtomicUsize::new(0),
            timed_out_tasks: AtomicUsize::new(0),
            deadline,
            settled: Latch::new(),
            via,
            submitted: Instant::now(),
            first_error: Mutex::new(None),
            first_corrupt: Mutex::new(None),
            first_gone: Mutex::new(None),
            on_settle: Mutex::new(None),
        });
        if pending == 0 {
            batch.settled.set();
        }
        batch
    }

    /// A slice of task `task` moved `bytes`.
    pub fn slice_done(&self, task: usize, bytes: u64) {
        self.tasks[task].transferred.fetch_add(bytes, Ordering::AcqRel);
        self.finish_slice(task);
    }

    /// A slice of task `task` failed (`Failed` or `Timeout`).
    pub fn slice_failed(&self, task: usize, status: TransferStatus, why: &str) {
        debug_assert!(matches!(status, TransferStatus::Failed | TransferStatus::Timeout | TransferStatus::Canceled));
        let t = &self.tasks[task];
        if t.failure.compare_exchange(0, status as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let counter = if status == TransferStatus::Timeout { &self.timed_out_tasks } else { &self.failed_tasks };
            counter.fetch_add(1, Ordering::AcqRel);
            let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(why.to_string());
            }
        }
        self.finish_slice(task);
    }

    fn finish_slice(&self, task: usize) {
        let t = &self.tasks[task];
        let before = t.remaining_slices.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "more slices finished than were planned");
        if before == 1
            && let Some(via) = self.via
        {
            // The task settled, on this thread: count it here.
            let now = Instant::now();
            let ok = t.failure.load(Ordering::Acquire) == 0;
            let bytes = t.transferred();
            let latency = now.saturating_duration_since(self.submitted);
            metrics::record(t.op, via, Side::Initiator, bytes, ok, Some(latency), now);
        }
        if before == 1 && self.pending_tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.set();
            let hook = self.on_settle.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }

    /// Runs `hook` once the batch has settled: now, if it already has. The
    /// hook runs on whichever thread finishes the last slice, so it must be
    /// quick (a write to an eventfd, say).
    pub fn set_on_settle(&self, hook: SettleHook) {
        let mut slot = self.on_settle.lock().unwrap_or_else(|e| e.into_inner());
        // Settling sets the latch, then takes the hook under this lock: a
        // hook stored here before that is taken; one that comes after sees
        // the latch set and runs at once.
        if self.settled.is_set() {
            drop(slot);
            hook();
        } else {
            *slot = Some(hook);
        }
    }

    /// Whether every slice has finished, successfully or not.
    pub fn is_settled(&self) -> bool {
        self.settled.is_set()
    }

    /// The batch's state now. A batch past its deadline that has not
    /// settled reports `TimedOut` (its slices are being failed by then).
    pub fn state(&self) -> BatchState {
        if self.timed_out_tasks.load(Ordering::Acquire) > 0 {
            return BatchState::TimedOut;
        }
        if self.failed_tasks.load(Ordering::Acquire) > 0 {
            return BatchState::Failed;
        }
        if self.is_settled() {
            BatchState::Completed
        } else if Instant::now() > self.deadline + Duration::from_secs(1) {
            BatchState::TimedOut
        } else {
            BatchState::Pending
        }
    }

    /// A slice of task `task` failed its CRC-32C: a failure, and the
    /// batch's result then says so with [`code::CHECKSUM`].
    pub fn slice_corrupt(&self, task: usize, why: &str) {
        {
            let mut first = self.first_corrupt.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(why.to_string());
            }
        }
        self.slice_failed(task, TransferStatus::Failed, why);
    }

    /// A slice of task `task` was addressed to a peer process that has
    /// exited or been replaced: a failure, and the batch's result then
    /// says so with [`code::PEER_GONE`] (unless bytes were corrupted).
    pub fn slice_gone(&self, task: usize, why: &str) {
        {
            let mut first = self.first_gone.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(why.to_string());
            }
        }
        self.slice_failed(task, TransferStatus::Failed, why);
    }

    /// Whether a slice failed because its peer process was gone.
    pub fn peer_gone(&self) -> bool {
        self.first_gone.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The first failure's description.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until every slice has finished or `deadline` passes.
    pub fn wait(&self, spin: Duration, deadline: Instant) -> bool {
        self.settled.wait(spin, Some(deadline))
    }

    /// Settles the batch as one result: `Ok` if every task completed.
    pub fn result(&self) -> TeResult<()> {
        match self.state() {
            BatchState::Completed => Ok(()),
            BatchState::Pending => Err(TeError::invalid("the batch has not finished")),
            BatchState::Failed => {
                // Corruption outranks other failures: it is the one to see.
                if let Some(why) = self.first_corrupt.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                    return Err(TeError::new(code::CHECKSUM, why));
                }
                // Then a peer that is gone: the caller must look it up
                // again, not retry the same addresses.
                if let Some(why) = self.first_gone.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                    return Err(TeError::new(code::PEER_GONE, why));
                }
                Err(TeError::invalid(self.first_error().unwrap_or_else(|| "transfer failed".into())))
            }
            BatchState::TimedOut => Err(TeError::invalid(
                self.first_error().unwrap_or_else(|| "transfer timed out (MC_TRANSFER_TIMEOUT)".into()),
            )),
        }
    }
}

impl Sink for Batch {
    fn settle(&self, task: usize, outcome: Result<u64, (TransferStatus, &str)>) {
        match outcome {
            Ok(bytes) => self.slice_done(task, bytes),
            Err((status, why)) => self.slice_failed(task, status, why),
        }
    }

    fn settle_corrupt(&self, task: usize, why: &str) {
        self.slice_corrupt(task, why);
    }

    fn settle_gone(&self, task: usize, why: &str) {
        self.slice_gone(task, why);
    }
}

/// Most batches an engine tracks at once.
pub const BATCHES_MAX: usize = 1 << 20;

/// Batch ids handed out to callers.
#[derive(Debug)]
pub struct BatchTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Batch>>>,
    /// Signalled when a batch is forgotten (room for a waiting insert).
    room: Condvar,
    limit: usize,
}

impl Default for BatchTable {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchTable {
    pub fn new() -> Self {
        // Ids start at a per-process random-looking point, so an id from
        // another engine or an earlier run is unlikely to name a batch here.
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let start = (seed ^ (u64::from(std::process::id()) << 40)) & 0x0000_ffff_ffff_ff00 | 0x0001_0000_0000_0000;
        Self { next: AtomicU64::new(start), live: Mutex::new(HashMap::new()), room: Condvar::new(), limit: BATCHES_MAX }
    }

    /// A table of at most `limit` batches.
    pub fn with_limit(limit: usize) -> Self {
        Self { limit: limit.max(1), ..Self::new() }
    }

    /// Files a batch and returns its id (never 0: 0 is Mooncake's failure
    /// sentinel for the async APIs). With the table full, waits for room
    /// until `deadline` (another thread checking or waiting on a batch
    /// makes room), then fails with `TOO_MANY_REQUESTS`.
    pub fn insert(&self, batch: Arc<Batch>, deadline: Instant) -> TeResult<u64> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        while live.len() >= self.limit {
            let now = Instant::now();
            if now >= deadline {
                return Err(TeError::new(
                    code::TOO_MANY_REQUESTS,
                    format!(
                        "{} batches stayed outstanding until the transfer timeout; check or wait on some",
                        self.limit
                    ),
                ));
            }
            live = self.room.wait_timeout(live, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        live.insert(id, batch);
        Ok(id)
    }

    pub fn get(&self, id: u64) -> TeResult<Arc<Batch>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| TeError::invalid(format!("no batch has id {id}")))
    }

    /// Forgets a batch; its slices, if any still run, finish on their own.
    pub fn remove(&self, id: u64) {
        if self.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id).is_some() {
            self.room.notify_all();
        }
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn completes_when_every_slice_is_done() {
        let b = Batch::new("peer:1", &[10, 20], &[1, 2], later());
        assert_eq!(b.state(), BatchState::Pending);
        b.slice_done(0, 10);
        b.slice_done(1, 10);
        assert!(!b.is_settled());
        assert_eq!(b.tasks[1].status(), TransferStatus::Pending);
        b.slice_done(1, 10);
        assert!(b.is_settled());
        assert_eq!(b.state(), BatchState::Completed);
        assert_eq!(b.tasks[1].status(), TransferStatus::Completed);
        assert_eq!(b.tasks[1].transferred(), 20);
        assert_eq!(b.result(), Ok(()));
    }

    #[test]
    fn zero_length_tasks_are_done_at_once() {
        let b = Batch::new("peer:1", &[0, 0], &[0, 0], later());
        assert!(b.is_settled());
        assert_eq!(b.state(), BatchState::Completed);
    }

    #[test]
    fn a_failure_is_reported_once_and_keeps_the_first_reason() {
        let b = Batch::new("peer:1", &[10, 10], &[2, 1], later());
        b.slice_failed(0, TransferStatus::Failed, "peer rejected the address");
        b.slice_failed(0, TransferStatus::Timeout, "later reason");
        assert_eq!(b.state(), BatchState::Failed);
        assert!(!b.is_settled(), "task 1 still runs");
        b.slice_done(1, 10);
        assert!(b.is_settled());
        assert_eq!(b.tasks[0].status(), TransferStatus::Failed);
        assert_eq!(b.result().unwrap_err().message(), "peer rejected the address");
    }

    #[test]
    fn the_settle_hook_runs_once_whenever_it_is_set() {
        use std::sync::atomic::AtomicUsize;
        let runs = Arc::new(AtomicUsize::new(0));
        let b = Batch::new("peer:1", &[10], &[1], later());
        let r = runs.clone();
        b.set_on_settle(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        b.slice_done(0, 10);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let r = runs.clone();
        b.set_on_settle(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        assert_eq!(runs.load(Ordering::SeqCst), 2, "already settled: at once");
    }

    #[test]
    fn timeouts_are_their_own_state() {
        let b = Batch::new("peer:1", &[10], &[1], later());
        b.slice_failed(0, TransferStatus::Timeout, "no answer in 30 s");
        assert_eq!(b.state(), BatchState::TimedOut);
        assert_eq!(b.state().code(), -2);
    }

    #[test]
    fn table_ids_are_nonzero_and_bogus_ids_are_errors() {
        let t = BatchTable::new();
        let id = t.insert(Batch::new("peer:1", &[0], &[0], later()), later()).unwrap();
        assert_ne!(id, 0);
        assert!(t.get(id).is_ok());
        assert_eq!(t.get(id ^ 0xdead).unwrap_err().code(), code::INVALID_ARGUMENT);
        assert_eq!(t.get(0).unwrap_err().code(), code::INVALID_ARGUMENT);
        t.remove(id);
        assert!(t.get(id).is_err());
    }

    #[test]
    fn a_full_table_makes_the_caller_wait_then_fail() {
        let t = Arc::new(BatchTable::with_limit(2));
        let a = t.insert(Batch::new("p", &[0], &[0], later()), later()).unwrap();
        t.insert(Batch::new("p", &[0], &[0], later()), later()).unwrap();
        let soon = Instant::now() + Duration::from_millis(50);
        let e = t.insert(Batch::new("p", &[0], &[0], later()), soon).unwrap_err();
        assert_eq!(e.code(), code::TOO_MANY_REQUESTS);
        // Room made by another thread lets a waiting insert through.
        let t2 = t.clone();
        let waiter = std::thread::spawn(move || t2.insert(Batch::new("p", &[0], &[0], later()), later()));
        while !waiter.is_finished() && t.len() == 2 {
            t.remove(a);
            std::thread::yield_now();
        }
        assert!(waiter.join().unwrap().is_ok());
        assert_eq!(t.len(), 2);
    }
}
