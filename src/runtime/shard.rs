//! The shard: one pinned thread, one io_uring, and the busy-poll loop.
//!
//! One loop iteration:
//! 1. reap the io_uring CQ in userspace and run the callbacks;
//! 2. drain the inbound SPSC rings (from every other shard, then from
//!    foreign threads), a bounded batch per ring so no ring starves another;
//! 3. run the local queue, due timers and poll hooks;
//! 4. wake the peers this iteration pushed to, if they are parked;
//! 5. enter the kernel only if entries wait in the SQ, or the ring's
//!    TASKRUN flag says deferred completions wait to be produced;
//! 6. if nothing was done for a whole spin budget, park: wait in one
//!    io_uring_enter for any completion (the eventfd read is one) or the
//!    next timer.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, SubmitArgs, Timespec};
use io_uring::{opcode, types};

use super::ctx::ShardCtx;
use super::hook::{HookChange, HookId, PollHook};
use super::inbox::ForeignInbox;
use super::park::Parker;
use super::spin::SpinState;
use super::spsc::{Consumer, Producer};
use super::stats::{ShardStats, StatsCell};
use super::task::{Task, panic_message};
use super::timer::Timers;
use super::uring::{self, Completion, INTERNAL_USER_DATA, OpTable, RingFeatures, WAKE_READ_USER_DATA};
use super::{RuntimeConfig, ShardReport};

/// Most tasks taken from one inbound ring per loop iteration.
const RING_BATCH_MAX: usize = 256;
/// Most completions reaped per batch.
const CQE_BATCH_MAX: usize = 256;
/// Most timers fired per loop iteration.
const TIMERS_PER_LOOP_MAX: usize = 1024;
/// Loop iterations between stats publications.
const STATS_EVERY_LOOPS: u64 = 1024;
/// How long shutdown waits for cancelled operations to complete.
const SHUTDOWN_CANCEL_WAIT: Duration = Duration::from_secs(2);

/// The part of a shard other threads see.
pub(crate) struct ShardShared {
    pub(crate) parker: Parker,
    pub(crate) stop: AtomicBool,
    /// Rings from foreign threads, registered on their first use.
    pub(crate) foreign: ForeignInbox<Task>,
    pub(crate) stats: StatsCell,
}

impl ShardShared {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self {
            parker: Parker::new()?,
            stop: AtomicBool::new(false),
            foreign: ForeignInbox::new(),
            stats: StatsCell::default(),
        })
    }
}

/// Everything a shard thread starts with.
pub(crate) struct ShardSeed {
    pub(crate) id: usize,
    pub(crate) runtime_id: u64,
    pub(crate) cpu: Option<u32>,
    pub(crate) peers: Arc<[Arc<ShardShared>]>,
    pub(crate) mesh_in: Vec<Consumer<Task>>,
    pub(crate) mesh_out: Vec<Option<Producer<Task>>>,
    pub(crate) config: Arc<RuntimeConfig>,
    pub(crate) ready: mpsc::Sender<(usize, Result<RingFeatures, String>)>,
}

thread_local! {
    /// (runtime id, shard id) of the shard running on this thread.
    pub(crate) static CURRENT_SHARD: std::cell::Cell<Option<(u64, usize)>> = const { std::cell::Cell::new(None) };
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: u32) -> Result<(), String> {
    // core_affinity indexes a fixed cpu_set_t and panics beyond it.
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        return Err(format!("cannot pin to CPU {cpu}: above CPU_SETSIZE ({})", libc::CPU_SETSIZE));
    }
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu as usize }) {
        Ok(())
    } else {
        Err(format!(
            "cannot pin to CPU {cpu}: {} (is it online and in this process's affinity mask?)",
            std::io::Error::last_os_error()
        ))
    }
}

/// The shard thread's body.
pub(crate) fn run(seed: ShardSeed) -> ShardReport {
    let id = seed.id;
    let cpu = seed.cpu;
    let fail = |fault: String| {
        let _ = seed.ready.send((id, Err(fault)));
        ShardReport { shard: id, cpu, ..ShardReport::default() }
    };
    // Pin before allocating anything large, so first touch lands locally.
    if let Some(cpu) = cpu
        && let Err(fault) = pin_current_thread(cpu)
    {
        return fail(fault);
    }
    let (ring, features) = match uring::build_ring(seed.config.ring_entries, seed.config.uring_setup) {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot set up io_uring: {e}")),
    };
    CURRENT_SHARD.with(|c| c.set(Some((seed.runtime_id, id))));
    let now = Instant::now();
    let shared = seed.peers[id].clone();
    let peer_count = seed.peers.len();
    let ctx = ShardCtx {
        id,
        peers: seed.peers,
        mesh_out: seed.mesh_out,
        wake_marks: vec![false; peer_count],
        wake_list: Vec::new(),
        local: VecDeque::new(),
        local_max: seed.config.local_queue_max,
        timers: Timers::new(seed.config.timers_max),
        ops: OpTable::new(seed.config.ops_max),
        ring,
        hook_changes: Vec::new(),
        next_hook_id: 0,
        locals: Default::default(),
        now,
        stopping: false,
        stats: ShardStats::default(),
    };
    let mut shard = Shard {
        ctx,
        shared,
        mesh_in: seed.mesh_in,
        foreign_in: Vec::new(),
        hooks: Vec::new(),
        spin: SpinState::new(seed.config.spin, now),
        wake_buf: Box::new(0),
        wake_armed: false,
        cqe_buf: Vec::with_capacity(CQE_BATCH_MAX),
        idle_since: now,
    };
    if let Some(factory) = &seed.config.hooks {
        for hook in factory(id) {
            shard.ctx.add_poll_hook(hook);
        }
        shard.apply_hook_changes();
    }
    let _ = seed.ready.send((id, Ok(features)));
    shard.run_loop();
    let report = shard.shut_down();
    CURRENT_SHARD.with(|c| c.set(None));
    ShardReport { cpu, features, ..report }
}

struct Shard {
    ctx: ShardCtx,
    shared: Arc<ShardShared>,
    mesh_in: Vec<Consumer<Task>>,
    foreign_in: Vec<Consumer<Task>>,
    hooks: Vec<(HookId, Box<dyn PollHook>)>,
    spin: SpinState,
    /// The eventfd read's target; lives as long as the read may be in flight.
    wake_buf: Box<u64>,
    wake_armed: bool,
    cqe_buf: Vec<(u64, Completion)>,
    idle_since: Instant,
}

impl Shard {
    fn run_loop(&mut self) {
        loop {
            let now = Instant::now();
            self.ctx.now = now;
            let mut work = self.reap();
            work += self.drain_inbound();
            work += self.run_local();
            work += self.fire_timers(now);
            work += self.poll_hooks();
            self.ctx.flush_wakes();
            self.ctx.stats.loops += 1;
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            self.enter_if_needed();
            self.spin.tick(now);
            if work > 0 {
                self.idle_since = now;
            } else if now.duration_since(self.idle_since) >= self.spin.budget() && self.hooks_allow_park() {
                self.park();
                self.idle_since = Instant::now();
            }
            if self.ctx.stats.loops % STATS_EVERY_LOOPS == 0 {
                self.publish_stats();
            }
        }
    }

    /// Runs a job, a callback or a hook, keeping its panic to itself.
    fn guarded(ctx: &mut ShardCtx, what: &str, f: impl FnOnce(&mut ShardCtx)) -> bool {
        match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
            Ok(()) => true,
            Err(payload) => {
                ctx.stats.panics += 1;
                log::error!("shard {}: a {what} panicked: {}", ctx.id, panic_message(payload.as_ref()));
                false
            }
        }
    }

    fn run_task(&mut self, task: Task) {
        self.ctx.stats.jobs_run += 1;
        Self::guarded(&mut self.ctx, "job", task);
    }

    fn reap(&mut self) -> usize {
        let mut total = 0;
        loop {
            self.cqe_buf.clear();
            for cqe in self.ctx.ring.completion().take(CQE_BATCH_MAX) {
                self.cqe_buf.push((cqe.user_data(), Completion { result: cqe.result(), flags: cqe.flags() }));
            }
            let batch = self.cqe_buf.len();
            if batch == 0 {
                return total;
            }
            total += batch;
            self.ctx.stats.completions += batch as u64;
            for i in 0..batch {
                let (user_data, completion) = self.cqe_buf[i];
                self.dispatch(user_data, completion);
            }
            if batch < CQE_BATCH_MAX {
                return total;
            }
        }
    }

    fn dispatch(&mut self, user_data: u64, completion: Completion) {
        match user_data {
            WAKE_READ_USER_DATA => {
                self.wake_armed = false;
                self.ctx.stats.wakeups += 1;
            }
            INTERNAL_USER_DATA => {}
            _ => {
                let Some(mut callback) = self.ctx.ops.take(user_data) else {
                    // A late completion of a cancelled multishot op whose slot
                    // was released; nothing owns it any more.
                    return;
                };
                self.ctx.stats.jobs_run += 1;
                let ok = Self::guarded(&mut self.ctx, "completion callback", |ctx| callback(ctx, completion));
                if completion.has_more() && ok {
                    self.ctx.ops.restore(user_data, callback);
                } else {
                    if completion.has_more() {
                        let _ = self.ctx.cancel_op(uring::OpId(user_data));
                    }
                    self.ctx.ops.release(user_data);
                }
            }
        }
    }

    /// Whether shutdown was requested: checked between tasks, so work still
    /// queued when it comes is failed rather than run.
    #[inline]
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn drain_inbound(&mut self) -> usize {
        let mut work = 0;
        for i in 0..self.mesh_in.len() {
            for _ in 0..RING_BATCH_MAX {
                if self.stopping() {
                    return work;
                }
                let Some(task) = self.mesh_in[i].pop() else { break };
                self.run_task(task);
                work += 1;
            }
        }
        self.shared.foreign.adopt(&mut self.foreign_in);
        let mut i = 0;
        while i < self.foreign_in.len() {
            let mut popped = 0;
            while popped < RING_BATCH_MAX {
                if self.stopping() {
                    return work + popped;
                }
                let Some(task) = self.foreign_in[i].pop() else { break };
                self.run_task(task);
                popped += 1;
            }
            work += popped;
            if popped == 0 && self.foreign_in[i].is_finished() {
                drop(self.foreign_in.swap_remove(i));
                self.shared.foreign.retire();
                continue;
            }
            i += 1;
        }
        self.ctx.stats.foreign_rings = self.foreign_in.len() as u64;
        work
    }

    fn run_local(&mut self) -> usize {
        let n = self.ctx.local.len();
        for _ in 0..n {
            if self.stopping() {
                break;
            }
            let Some(task) = self.ctx.local.pop_front() else { break };
            self.run_task(task);
        }
        n
    }

    fn fire_timers(&mut self, now: Instant) -> usize {
        let mut fired = 0;
        while fired < TIMERS_PER_LOOP_MAX {
            let Some(callback) = self.ctx.timers.pop_due(now) else { break };
            fired += 1;
            self.ctx.stats.timers_fired += 1;
            self.ctx.stats.jobs_run += 1;
            Self::guarded(&mut self.ctx, "timer", callback);
        }
        fired
    }

    fn poll_hooks(&mut self) -> usize {
        let mut work = 0;
        let mut failed = Vec::new();
        for (id, hook) in &mut self.hooks {
            let mut n = 0;
            if Self::guarded(&mut self.ctx, "poll hook", |ctx| n = hook.poll(ctx)) {
                work += n;
            } else {
                failed.push(*id);
            }
        }
        for id in failed {
            log::error!("shard {}: removing poll hook {id:?} after its panic", self.ctx.id);
            self.hooks.retain(|(h, _)| *h != id);
        }
        self.apply_hook_changes();
        work
    }

    fn apply_hook_changes(&mut self) {
        for change in std::mem::take(&mut self.ctx.hook_changes) {
            match change {
                HookChange::Add(id, hook) => self.hooks.push((id, hook)),
                HookChange::Remove(id) => self.hooks.retain(|(h, _)| *h != id),
            }
        }
    }

    fn hooks_allow_park(&mut self) -> bool {
        self.hooks.iter_mut().all(|(_, h)| h.can_park())
    }

    /// Enters the kernel only when it has to: entries wait in the SQ, the
    /// kernel flagged deferred task work, or the CQ overflowed.
    fn enter_if_needed(&mut self) {
        let sq = self.ctx.ring.submission();
        let needed = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if needed {
            self.ctx.stats.enters += 1;
            // submit_and_wait(0) adds GETEVENTS when TASKRUN or overflow is
            // flagged. EBUSY (CQ overflow) and EINTR are retried next time.
            let _ = self.ctx.ring.submit_and_wait(0);
        }
    }

    fn arm_wake_read(&mut self) {
        if self.wake_armed {
            return;
        }
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry =
            opcode::Read::new(types::Fd(self.shared.parker.fd()), buf.cast(), 8).build().user_data(WAKE_READ_USER_DATA);
        // The buffer is owned by the shard and outlives the read: shutdown
        // waits for its completion or leaks the buffer.
        if uring::push_entry(&mut self.ctx.ring, &entry).is_ok() {
            self.wake_armed = true;
        }
    }

    fn has_work_or_stop(&mut self) -> bool {
        if self.shared.stop.load(Ordering::Acquire) || self.shared.foreign.has_new() || !self.ctx.local.is_empty() {
            return true;
        }
        if self.mesh_in.iter_mut().any(|c| c.has_pending()) || self.foreign_in.iter_mut().any(|c| c.has_pending()) {
            return true;
        }
        if !self.ctx.ring.completion().is_empty() {
            return true;
        }
        let sq = self.ctx.ring.submission();
        sq.taskrun() || sq.cq_overflow()
    }

    fn park(&mut self) {
        self.arm_wake_read();
        if !self.wake_armed {
            return; // Could not arm: keep spinning rather than sleep deaf.
        }
        self.shared.parker.begin_park();
        if self.has_work_or_stop() {
            self.shared.parker.end_park();
            return;
        }
        self.ctx.stats.parks += 1;
        self.ctx.stats.enters += 1;
        self.ctx.stats.spin_budget_ns = self.spin.budget().as_nanos() as u64;
        self.publish_stats();
        // Parked, the shard counts nothing: what it counted is published
        // now, not at its next wake-up.
        crate::telemetry::counters::flush(true);
        let result = match self.ctx.timers.next_deadline() {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    self.shared.parker.end_park();
                    return;
                }
                let ts = Timespec::from(wait);
                let args = SubmitArgs::new().timespec(&ts);
                self.ctx.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ctx.ring.submit_and_wait(1),
        };
        if let Err(e) = result
            && !matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN))
        {
            log::warn!("shard {}: io_uring wait failed: {e}", self.ctx.id);
        }
        self.shared.parker.end_park();
    }

    fn publish_stats(&mut self) {
        self.ctx.stats.spin_budget_ns = self.spin.budget().as_nanos() as u64;
        self.ctx.stats.wake_writes = self.shared.parker.wake_writes();
        self.shared.stats.publish(&self.ctx.stats);
        // The metrics too, if their period has passed.
        crate::telemetry::counters::flush(false);
    }

    /// Refuses new work, fails what is queued, cancels what is in flight.
    fn shut_down(mut self) -> ShardReport {
        self.ctx.stopping = true;
        let mut canceled = 0usize;
        for ring in std::mem::take(&mut self.mesh_in) {
            canceled += ring.close_and_drain();
        }
        self.shared.foreign.close(&mut self.foreign_in);
        for ring in std::mem::take(&mut self.foreign_in) {
            canceled += ring.close_and_drain();
        }
        canceled += self.ctx.local.len();
        self.ctx.local.clear();
        canceled += self.ctx.timers.clear();
        for (_, mut hook) in std::mem::take(&mut self.hooks) {
            Self::guarded(&mut self.ctx, "poll hook shutdown", |ctx| hook.shutdown(ctx));
        }
        self.ctx.hook_changes.clear();
        let leaked = self.cancel_in_flight();
        // Work queued by callbacks during the drain can no longer run.
        canceled += self.ctx.local.len();
        self.ctx.local.clear();
        self.ctx.timers.clear();
        self.ctx.locals.clear();
        self.ctx.stats.jobs_canceled += canceled as u64;
        self.publish_stats();
        crate::telemetry::counters::flush(true);
        ShardReport {
            shard: self.ctx.id,
            stats: self.shared.stats.snapshot(),
            leaked_ops: leaked,
            ..ShardReport::default()
        }
    }

    /// Cancels every operation in flight and waits, within a bound, for
    /// their completions. Returns how many had to be leaked.
    fn cancel_in_flight(&mut self) -> usize {
        if self.ctx.ops.in_flight() == 0 && !self.wake_armed {
            return 0;
        }
        let _ = self.ctx.ring.submit();
        let cancel = self
            .ctx
            .ring
            .submitter()
            .register_sync_cancel(Some(Timespec::from(Duration::from_millis(500))), CancelBuilder::any());
        if let Err(e) = cancel
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::debug!("shard {}: sync cancel: {e}", self.ctx.id);
        }
        let deadline = Instant::now() + SHUTDOWN_CANCEL_WAIT;
        while (self.ctx.ops.in_flight() > 0 || self.wake_armed) && Instant::now() < deadline {
            let ts = Timespec::from(Duration::from_millis(10));
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.ctx.ring.submitter().submit_with_args(1, &args);
            self.ctx.now = Instant::now();
            self.reap();
        }
        let mut leaked = 0;
        if self.ctx.ops.in_flight() > 0 {
            leaked = self.ctx.ops.leak_all();
            log::error!(
                "shard {}: {leaked} operations did not complete after cancel; leaking their buffers",
                self.ctx.id
            );
        }
        if self.wake_armed {
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
            leaked += 1;
        }
        leaked
    }
}
