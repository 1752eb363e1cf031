//! The thread-per-core shard runtime.
//!
//! A [`Runtime`] runs N shards. Each shard is a thread pinned to its planned
//! CPU that owns one io_uring and busy-polls it (see [`shard`] for the loop).
//! Work reaches a shard three ways, each over a bounded lock-free SPSC ring:
//!
//! - from another shard, over the ring for that ordered pair
//!   ([`ShardCtx::send_to`]); the N×(N−1) rings are built at start;
//! - from any other thread (a Python caller, a user thread), over a ring
//!   private to that thread and shard, created on the thread's first use
//!   ([`Runtime::submit`], [`Runtime::call`]);
//! - from the shard itself ([`ShardCtx::spawn`], timers, io completions).
//!
//! A producer writes a shard's eventfd only when that shard is parked
//! ([`park`] explains the protocol). A job that panics is caught, counted
//! and reported to its caller; its shard goes on. Shutdown stops every shard,
//! fails all queued work with [`CallError::Canceled`], cancels io_uring
//! operations in flight, joins every thread and closes every descriptor.

pub mod ctx;
pub mod error;
pub mod hook;
pub(crate) mod inbox;
pub mod latch;
pub mod park;
pub mod shard;
pub mod shared;
pub mod spin;
pub mod spsc;
pub mod stats;
pub mod task;
pub mod timer;
pub mod uring;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use ctx::ShardCtx;
pub use error::{CallError, OpError, SendError, StartError, SubmitError, TimerError};
pub use hook::{HookId, PollHook};
pub use spin::SpinPolicy;
pub use stats::ShardStats;
pub use task::{Pending, Task};
pub use timer::TimerId;
pub use uring::{Completion, OpId, RingFeatures, UringSetup};

use shard::{CURRENT_SHARD, ShardSeed, ShardShared};
use spsc::{Producer, PushError};

/// Builds the poll hooks of shard `i` at start-up, on the shard's thread.
pub type HookFactory = Arc<dyn Fn(usize) -> Vec<Box<dyn PollHook>> + Send + Sync>;

/// Most shards in one runtime.
pub const SHARDS_MAX: usize = crate::topo::plan::SHARDS_MAX;

/// How to build a runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// One entry per shard: the CPU to pin it to, or `None` to leave it free.
    pub cpus: Vec<Option<u32>>,
    /// The NUMA node of each shard, where the plan says (RDMA devices are
    /// given to shards on their own node); empty or shorter: unknown.
    pub numa_nodes: Vec<Option<u32>>,
    /// How long idle shards spin before parking.
    pub spin: SpinPolicy,
    /// Slots in each shard-to-shard ring.
    pub mesh_capacity: usize,
    /// Slots in each foreign-thread ring.
    pub inbox_capacity: usize,
    /// Most foreign threads feeding one shard at once.
    pub foreign_rings_max: usize,
    /// io_uring submission queue entries (the CQ gets four times as many).
    pub ring_entries: u32,
    /// Most io_uring operations in flight per shard.
    pub ops_max: usize,
    /// Most timers per shard.
    pub timers_max: usize,
    /// Most tasks in a shard's local queue.
    pub local_queue_max: usize,
    /// io_uring set-up flags to try.
    pub uring_setup: UringSetup,
    /// How long [`Runtime::submit`] waits for room in a full ring.
    pub submit_timeout: Duration,
    /// Poll hooks installed on every shard at start-up.
    pub hooks: Option<HookFactory>,
}

impl RuntimeConfig {
    /// `shards` unpinned shards with default limits.
    pub fn new(shards: usize) -> Self {
        Self {
            cpus: vec![None; shards],
            numa_nodes: Vec::new(),
            spin: SpinPolicy::default(),
            mesh_capacity: 1024,
            inbox_capacity: 1024,
            foreign_rings_max: 256,
            ring_entries: 256,
            ops_max: 4096,
            timers_max: 65_536,
            local_queue_max: 65_536,
            uring_setup: UringSetup::Auto,
            submit_timeout: Duration::from_secs(30),
            hooks: None,
        }
    }

    /// One shard pinned to each CPU, in order.
    pub fn pinned(cpus: &[u32]) -> Self {
        Self { cpus: cpus.iter().map(|&c| Some(c)).collect(), ..Self::new(0) }
    }

    /// One shard per shard of the placement plan.
    pub fn from_plan(plan: &crate::topo::Plan) -> Self {
        let numa_nodes = plan.shards.iter().map(|s| Some(s.numa_node)).collect();
        Self { numa_nodes, ..Self::pinned(&plan.cpus()) }
    }

    /// Applies `SHARDWIRE_SPIN_US`, `SHARDWIRE_SPIN_ADAPTIVE` and
    /// `SHARDWIRE_URING_SETUP` from the environment.
    pub fn apply_env(self) -> Result<Self, StartError> {
        let settings = crate::config::Settings::from_env().map_err(|e| StartError::Config(e.to_string()))?;
        Ok(self.apply_settings(&settings))
    }

    /// Applies the shard settings of `s`.
    pub fn apply_settings(mut self, s: &crate::config::Settings) -> Self {
        if let Some(spin) = s.spin {
            self.spin.budget = spin;
        }
        if let Some(adaptive) = s.spin_adaptive {
            self.spin.adaptive = adaptive;
        }
        if s.uring_plain {
            self.uring_setup = UringSetup::Plain;
        }
        self
    }

    fn validate(&self) -> Result<(), StartError> {
        let fail = |m: String| Err(StartError::Config(m));
        if self.cpus.is_empty() {
            return fail("a runtime needs at least one shard".into());
        }
        if self.cpus.len() > SHARDS_MAX {
            return fail(format!("{} shards, above the limit of {SHARDS_MAX}", self.cpus.len()));
        }
        for (name, value) in [("mesh_capacity", self.mesh_capacity), ("inbox_capacity", self.inbox_capacity)] {
            if !(2..=spsc::CAPACITY_MAX).contains(&value) {
                return fail(format!("{name} {value} is outside 2..={}", spsc::CAPACITY_MAX));
            }
        }
        if !(2..=32_768).contains(&self.ring_entries) {
            return fail(format!("ring_entries {} is outside 2..=32768", self.ring_entries));
        }
        for (name, value) in [
            ("foreign_rings_max", self.foreign_rings_max),
            ("ops_max", self.ops_max),
            ("timers_max", self.timers_max),
            ("local_queue_max", self.local_queue_max),
        ] {
            if value == 0 {
                return fail(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// What a shard reports when it has stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardReport {
    pub shard: usize,
    pub cpu: Option<u32>,
    pub features: RingFeatures,
    pub stats: ShardStats,
    /// Operations the kernel did not release in time; their buffers leaked.
    pub leaked_ops: usize,
    /// Set if the shard thread itself died (a runtime bug).
    pub thread_panic: Option<String>,
}

static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

/// Bumped in a forked child (pthread_atfork), which inherits a runtime's
/// memory but none of its threads.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

extern "C" fn after_fork_in_child() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

fn fork_generation() -> u64 {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic, which is
        // async-signal-safe as a fork child handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// A running set of shards.
///
/// `Runtime` is `Sync`: any number of threads may submit to it at once, and
/// one of them may shut it down while the others still submit (they get
/// [`SubmitError::ShutDown`]).
pub struct Runtime {
    id: u64,
    /// The fork generation the shards were started in; in a forked child
    /// the shards do not exist, and the runtime refuses work.
    generation: u64,
    shards: Arc<[Arc<ShardShared>]>,
    threads: Mutex<Vec<JoinHandle<ShardReport>>>,
    features: Vec<RingFeatures>,
    config: Arc<RuntimeConfig>,
}

impl Runtime {
    /// Starts the shards and waits until each is pinned and has its ring.
    pub fn start(config: RuntimeConfig) -> Result<Runtime, StartError> {
        config.validate()?;
        let n = config.cpus.len();
        let id = NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed);
        let mut shared = Vec::with_capacity(n);
        for shard in 0..n {
            let s = ShardShared::new().map_err(|e| StartError::Shard {
                shard,
                cpu: config.cpus[shard],
                fault: format!("eventfd: {e}"),
            })?;
            shared.push(Arc::new(s));
        }
        let peers: Arc<[Arc<ShardShared>]> = shared.into();
        // mesh[from][to]: the ring carrying work from shard `from` to `to`.
        let mut outs: Vec<Vec<Option<Producer<Task>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut ins: Vec<Vec<spsc::Consumer<Task>>> = (0..n).map(|_| Vec::with_capacity(n.saturating_sub(1))).collect();
        for (from, row) in outs.iter_mut().enumerate() {
            for (to, slot) in row.iter_mut().enumerate() {
                if from != to {
                    let (p, c) = spsc::channel(config.mesh_capacity);
                    *slot = Some(p);
                    ins[to].push(c);
                }
            }
        }
        let config = Arc::new(config);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut runtime = Runtime {
            id,
            generation: fork_generation(),
            shards: peers.clone(),
            threads: Mutex::new(Vec::with_capacity(n)),
            features: Vec::new(),
            config: config.clone(),
        };
        for (shard, (mesh_out, mesh_in)) in outs.into_iter().zip(ins).enumerate() {
            let seed = ShardSeed {
                id: shard,
                runtime_id: id,
                cpu: config.cpus[shard],
                peers: peers.clone(),
                mesh_in,
                mesh_out,
                config: config.clone(),
                ready: ready_tx.clone(),
            };
            let spawned =
                std::thread::Builder::new().name(format!("shardwire-shard-{shard}")).spawn(move || shard::run(seed));
            match spawned {
                Ok(handle) => runtime.lock_threads().push(handle),
                Err(e) => {
                    runtime.shutdown();
                    return Err(StartError::Shard { shard, cpu: config.cpus[shard], fault: format!("thread: {e}") });
                }
            }
        }
        drop(ready_tx);
        let mut features = vec![RingFeatures::default(); n];
        let mut first_error = None;
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((shard, Ok(f))) => features[shard] = f,
                Ok((shard, Err(fault))) => {
                    first_error.get_or_insert(StartError::Shard { shard, cpu: config.cpus[shard], fault });
                }
                Err(_) => {
                    first_error.get_or_insert(StartError::Config("a shard thread died during start-up".into()));
                    break;
                }
            }
        }
        if let Some(e) = first_error {
            runtime.shutdown();
            return Err(e);
        }
        runtime.features = features;
        Ok(runtime)
    }

    /// How many shards run.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The NUMA node of each shard, where known.
    pub fn shard_numa_nodes(&self) -> Vec<Option<u32>> {
        (0..self.shards.len()).map(|i| self.config.numa_nodes.get(i).copied().flatten()).collect()
    }

    /// The CPU each shard is pinned to (`None` for unpinned shards).
    pub fn shard_cpus(&self) -> Vec<Option<u32>> {
        self.config.cpus.clone()
    }

    /// The io_uring set-up of each shard.
    pub fn ring_features(&self) -> &[RingFeatures] {
        &self.features
    }

    /// Recent counters of each shard.
    pub fn stats(&self) -> Vec<ShardStats> {
        self.shards.iter().map(|s| ShardStats { wake_writes: s.parker.wake_writes(), ..s.stats.snapshot() }).collect()
    }

    /// Hands `f` to shard `shard` without waiting; fails at once if its ring
    /// from this thread is full.
    pub fn try_submit<F>(&self, shard: usize, f: F) -> Result<(), SubmitError>
    where
        F: FnOnce(&mut ShardCtx) + Send + 'static,
    {
        self.push_foreign(shard, Box::new(f)).map_err(|(e, _)| e)
    }

    /// Hands `f` to shard `shard`, waiting (up to the configured
    /// `submit_timeout`) while its ring from this thread is full.
    pub fn submit<F>(&self, shard: usize, f: F) -> Result<(), SubmitError>
    where
        F: FnOnce(&mut ShardCtx) + Send + 'static,
    {
        self.submit_task(shard, Box::new(f))
    }

    fn submit_task(&self, shard: usize, mut task: Task) -> Result<(), SubmitError> {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            match self.push_foreign(shard, task) {
                Ok(()) => return Ok(()),
                Err((SubmitError::Full { .. }, Some(t))) => task = t,
                Err((e, _)) => return Err(e),
            }
            attempts = attempts.saturating_add(1);
            if start.elapsed() >= self.config.submit_timeout {
                return Err(SubmitError::Timeout { shard, waited_ms: start.elapsed().as_millis() as u64 });
            }
            if attempts < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Runs `f` on shard `shard` and waits for its result.
    pub fn call<R, F>(&self, shard: usize, f: F) -> Result<R, CallError>
    where
        F: FnOnce(&mut ShardCtx) -> R + Send + 'static,
        R: Send + 'static,
    {
        if CURRENT_SHARD.with(|c| c.get()) == Some((self.id, shard)) {
            return Err(SubmitError::WouldDeadlock.into());
        }
        self.call_async(shard, f)?.wait()
    }

    /// Runs `f` on shard `shard`; the result arrives in the returned
    /// [`Pending`].
    pub fn call_async<R, F>(&self, shard: usize, f: F) -> Result<Pending<R>, SubmitError>
    where
        F: FnOnce(&mut ShardCtx) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = task::reply_pair();
        self.submit_task(shard, task::task_with_reply(f, tx))?;
        Ok(rx)
    }

    /// Whether this process is a fork of the one that started the shards.
    pub fn is_forked_copy(&self) -> bool {
        fork_generation() != self.generation
    }

    /// Pushes onto this thread's ring to `shard`, creating it on first use.
    /// On failure the task comes back when it was not consumed.
    fn push_foreign(&self, shard: usize, task: Task) -> Result<(), (SubmitError, Option<Task>)> {
        if self.is_forked_copy() {
            return Err((SubmitError::ShutDown, None));
        }
        let Some(target) = self.shards.get(shard) else {
            return Err((SubmitError::NoSuchShard { shard, count: self.shards.len() }, None));
        };
        let pushed = FOREIGN_RINGS.try_with(|cell| -> Result<(), (SubmitError, Option<Task>)> {
            let mut rings = cell.borrow_mut();
            let slot = match rings.iter().position(|r| r.runtime_id == self.id && r.shard == shard) {
                Some(i) => i,
                None => {
                    let dead = ForeignRing::take_dead(&mut rings);
                    let producer = self.register_foreign(shard, target);
                    drop(rings);
                    drop(dead); // Outside the borrow: dropping tasks may re-enter.
                    let producer = producer.map_err(|e| (e, None))?;
                    rings = cell.borrow_mut();
                    rings.push(ForeignRing { runtime_id: self.id, shard, producer });
                    rings.len() - 1
                }
            };
            match rings[slot].producer.push(task) {
                Ok(()) => Ok(()),
                Err(PushError::Full(t)) => Err((SubmitError::Full { shard }, Some(t))),
                Err(PushError::Closed(t)) => {
                    let ring = rings.swap_remove(slot);
                    drop(rings);
                    drop(ring);
                    drop(t);
                    Err((SubmitError::ShutDown, None))
                }
            }
        });
        match pushed {
            // Producer::push fenced after publishing; now look at `parked`.
            Ok(Ok(())) => {
                target.parker.wake_if_parked_after_fence();
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err((SubmitError::ShutDown, None)), // thread-locals are being torn down
        }
    }

    fn register_foreign(&self, shard: usize, target: &ShardShared) -> Result<Producer<Task>, SubmitError> {
        target.foreign.register(self.config.inbox_capacity, self.config.foreign_rings_max).map_err(|e| match e {
            inbox::RegisterError::Closed => SubmitError::ShutDown,
            inbox::RegisterError::Full { limit } => SubmitError::TooManyThreads { shard, limit },
        })
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<ShardReport>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops every shard, fails queued work with [`CallError::Canceled`],
    /// cancels io in flight, and joins the threads. Idempotent: a second call
    /// returns no reports. Called from one of this runtime's own shards, it
    /// only asks the shards to stop (a thread cannot join itself); the
    /// joining happens at the next call from outside, or on drop.
    pub fn shutdown(&self) -> Vec<ShardReport> {
        if self.is_forked_copy() {
            // The threads were the parent's; there is nothing to stop or join.
            std::mem::forget(std::mem::take(&mut *self.lock_threads()));
            return Vec::new();
        }
        for s in self.shards.iter() {
            s.stop.store(true, Ordering::Release);
            s.parker.wake();
        }
        if CURRENT_SHARD.with(|c| c.get()).is_some_and(|(runtime, _)| runtime == self.id) {
            log::warn!("runtime shutdown requested from one of its shards; joining later");
            return Vec::new();
        }
        let handles = std::mem::take(&mut *self.lock_threads());
        let mut reports = Vec::with_capacity(handles.len());
        for (shard, handle) in handles.into_iter().enumerate() {
            reports.push(match handle.join() {
                Ok(report) => report,
                Err(payload) => ShardReport {
                    shard,
                    thread_panic: Some(task::panic_message(payload.as_ref())),
                    ..ShardReport::default()
                },
            });
        }
        reports
    }

    /// Whether [`Runtime::shutdown`] has been called.
    pub fn is_shut_down(&self) -> bool {
        self.shards.iter().any(|s| s.stop.load(Ordering::Acquire))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One foreign thread's ring into one shard of one runtime.
struct ForeignRing {
    runtime_id: u64,
    shard: usize,
    producer: Producer<Task>,
}

impl ForeignRing {
    /// Removes the rings whose shard has closed them (runtimes shut down).
    fn take_dead(rings: &mut Vec<ForeignRing>) -> Vec<ForeignRing> {
        let mut dead = Vec::new();
        let mut i = 0;
        while i < rings.len() {
            if rings[i].producer.is_closed() {
                dead.push(rings.swap_remove(i));
            } else {
                i += 1;
            }
        }
        dead
    }
}

thread_local! {
    static FOREIGN_RINGS: RefCell<Vec<ForeignRing>> = const { RefCell::new(Vec::new()) };
}
