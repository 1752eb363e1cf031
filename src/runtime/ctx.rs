//! [`ShardCtx`]: what a job running on a shard can reach.
//!
//! Everything here is shard-local and needs no synchronisation: the io_uring,
//! the timers, the outbound rings to the other shards, the local queue, the
//! poll hooks and a type map for transport state.

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue};

use super::error::{OpError, SendError, TimerError};
use super::hook::{HookChange, HookId, PollHook};
use super::shard::ShardShared;
use super::spsc::{Producer, PushError};
use super::stats::ShardStats;
use super::task::Task;
use super::timer::{TimerId, Timers};
use super::uring::{self, Completion, INTERNAL_USER_DATA, OpId, OpTable};

/// The context of a running shard, passed to every job and callback.
pub struct ShardCtx {
    pub(crate) id: usize,
    pub(crate) peers: Arc<[Arc<ShardShared>]>,
    pub(crate) mesh_out: Vec<Option<Producer<Task>>>,
    /// Peers pushed to since the last flush, to check for parking.
    pub(crate) wake_marks: Vec<bool>,
    pub(crate) wake_list: Vec<usize>,
    pub(crate) local: VecDeque<Task>,
    pub(crate) local_max: usize,
    pub(crate) timers: Timers,
    pub(crate) ops: OpTable,
    pub(crate) ring: IoUring,
    pub(crate) hook_changes: Vec<HookChange>,
    pub(crate) next_hook_id: u64,
    pub(crate) locals: HashMap<TypeId, Box<dyn Any>>,
    pub(crate) now: Instant,
    pub(crate) stopping: bool,
    pub(crate) stats: ShardStats,
}

impl ShardCtx {
    /// This shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The loop's clock, read once per iteration.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Whether the shard is shutting down (callbacks run during the final
    /// drain see true).
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// The counters so far.
    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    /// Runs `f` on shard `to`, over the SPSC ring from this shard to it.
    /// Sending to oneself queues `f` locally.
    pub fn send_to<F>(&mut self, to: usize, f: F) -> Result<(), SendError<Task>>
    where
        F: FnOnce(&mut ShardCtx) + Send + 'static,
    {
        self.try_send(to, Box::new(f))
    }

    /// [`ShardCtx::send_to`] for a task already boxed; a failed send hands it
    /// back so the caller can retry later (say, from a timer).
    pub fn try_send(&mut self, to: usize, task: Task) -> Result<(), SendError<Task>> {
        if to == self.id {
            return self.spawn_task(task);
        }
        let Some(Some(producer)) = self.mesh_out.get_mut(to) else {
            return Err(SendError::NoSuchShard(task));
        };
        if producer.is_closed() {
            return Err(SendError::Closed(task));
        }
        match producer.push_unchecked(task) {
            Ok(()) => {
                if !self.wake_marks[to] {
                    self.wake_marks[to] = true;
                    self.wake_list.push(to);
                }
                Ok(())
            }
            Err(PushError::Full(t)) => Err(SendError::Full(t)),
            Err(PushError::Closed(t)) => Err(SendError::Closed(t)),
        }
    }

    /// Queues `f` to run on this shard in a later loop iteration.
    pub fn spawn<F>(&mut self, f: F) -> Result<(), SendError<Task>>
    where
        F: FnOnce(&mut ShardCtx) + Send + 'static,
    {
        self.spawn_task(Box::new(f))
    }

    fn spawn_task(&mut self, task: Task) -> Result<(), SendError<Task>> {
        if self.local.len() >= self.local_max {
            return Err(SendError::Full(task));
        }
        self.local.push_back(task);
        Ok(())
    }

    /// Wakes the peers this shard pushed to, if they are parked: one fence
    /// for the whole loop iteration, not one per message.
    pub(crate) fn flush_wakes(&mut self) {
        if self.wake_list.is_empty() {
            return;
        }
        super::park::producer_fence();
        for &peer in &self.wake_list {
            self.wake_marks[peer] = false;
            self.peers[peer].parker.wake_if_parked_after_fence();
        }
        self.wake_list.clear();
    }

    /// Runs `f` after `delay`.
    pub fn set_timer<F>(&mut self, delay: Duration, f: F) -> Result<TimerId, TimerError>
    where
        F: FnOnce(&mut ShardCtx) + 'static,
    {
        self.set_timer_at(self.now + delay, f)
    }

    /// Runs `f` at `deadline` (or at once, if it has passed).
    pub fn set_timer_at<F>(&mut self, deadline: Instant, f: F) -> Result<TimerId, TimerError>
    where
        F: FnOnce(&mut ShardCtx) + 'static,
    {
        if self.stopping {
            return Err(TimerError::ShuttingDown);
        }
        self.timers.insert(deadline, Box::new(f))
    }

    /// Cancels a timer; false if it already fired or was cancelled.
    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.timers.cancel(id)
    }

    /// Timers set and not yet fired or cancelled.
    pub fn timers_pending(&self) -> usize {
        self.timers.len()
    }

    /// Queues an io_uring operation; `on_complete` runs once with its result.
    /// The entry's user data is overwritten.
    ///
    /// # Safety
    /// Every buffer, file descriptor and struct the entry points to must stay
    /// valid until `on_complete` runs. Owning them inside the closure is the
    /// easy way: the shard keeps the closure until the completion arrives,
    /// and at shutdown it cancels the operation and waits for it (or, if the
    /// kernel does not let go in time, leaks the closure rather than free
    /// memory the kernel may still write).
    pub unsafe fn submit_op<F>(&mut self, entry: squeue::Entry, on_complete: F) -> Result<OpId, OpError>
    where
        F: FnOnce(&mut ShardCtx, Completion) + 'static,
    {
        let mut once = Some(on_complete);
        let callback = move |ctx: &mut ShardCtx, c: Completion| {
            if let Some(f) = once.take() {
                f(ctx, c);
            }
        };
        // SAFETY: forwarded from the caller.
        unsafe { self.submit_multishot(entry, callback) }
    }

    /// Like [`ShardCtx::submit_op`], for multishot operations: `on_complete`
    /// runs for every completion, the last one without `has_more()`.
    ///
    /// # Safety
    /// As for [`ShardCtx::submit_op`].
    pub unsafe fn submit_multishot<F>(&mut self, entry: squeue::Entry, on_complete: F) -> Result<OpId, OpError>
    where
        F: FnMut(&mut ShardCtx, Completion) + 'static,
    {
        if self.stopping {
            return Err(OpError::ShuttingDown);
        }
        let id = self.ops.insert(Box::new(on_complete))?;
        let entry = entry.user_data(id.0);
        if let Err(e) = uring::push_entry(&mut self.ring, &entry) {
            self.ops.release(id.0);
            return Err(e);
        }
        Ok(id)
    }

    /// Asks the kernel to cancel an operation; its callback still runs, with
    /// `-ECANCELED` if the cancel won.
    pub fn cancel_op(&mut self, id: OpId) -> Result<(), OpError> {
        let entry = opcode::AsyncCancel::new(id.0).build().user_data(INTERNAL_USER_DATA);
        uring::push_entry(&mut self.ring, &entry)
    }

    /// Operations in flight.
    pub fn ops_in_flight(&self) -> usize {
        self.ops.in_flight()
    }

    /// Adds a poll hook; it is polled from the next loop iteration on.
    pub fn add_poll_hook(&mut self, hook: Box<dyn PollHook>) -> HookId {
        self.next_hook_id += 1;
        let id = HookId(self.next_hook_id);
        self.hook_changes.push(HookChange::Add(id, hook));
        id
    }

    /// Removes a poll hook after the current iteration.
    pub fn remove_poll_hook(&mut self, id: HookId) {
        self.hook_changes.push(HookChange::Remove(id));
    }

    /// Stores shard-local state of type `T`, returning the previous value.
    pub fn insert_local<T: 'static>(&mut self, value: T) -> Option<T> {
        self.locals.insert(TypeId::of::<T>(), Box::new(value)).and_then(|old| old.downcast::<T>().ok()).map(|b| *b)
    }

    /// The shard-local state of type `T`.
    pub fn local_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.locals.get_mut(&TypeId::of::<T>()).and_then(|b| b.downcast_mut::<T>())
    }

    /// Removes and returns the shard-local state of type `T`.
    pub fn take_local<T: 'static>(&mut self) -> Option<T> {
        self.locals.remove(&TypeId::of::<T>()).and_then(|b| b.downcast::<T>().ok()).map(|b| *b)
    }
}
