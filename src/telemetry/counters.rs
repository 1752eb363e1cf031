//! The counters behind every metric, kept per thread.
//!
//! A thread (a shard, a caller, a stream's sender) counts into plain
//! integers of its own, with no atomic and no lock: [`record`] and the
//! other recorders touch only a thread-local [`Counters`]. About every
//! [`PUBLISH_EVERY`], and when a shard parks or a caller's API call returns
//! ([`flush`]), the thread copies what changed into a cell of its own
//! behind a mutex that only a reader (a scrape, `engine.metrics()`, the
//! metric log) ever contends for. A thread that ends adds its figures to the
//! retired total, so counts never go backwards and the set of cells is
//! bounded by the threads alive.
//!
//! [`snapshot`] sums the retired total and every cell.

use std::cell::RefCell;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a busy thread publishes its counters.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Upper bounds of the latency buckets, in microseconds (Mooncake's, so
/// that its metric line and ours bin alike); a last bucket takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000, 10_000_000,
];
/// Latency buckets: one per bound, and the overflow.
pub const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// Distinct device names a thread counts; more are counted as `other`
/// (bounded memory whatever a fabric calls its devices).
pub const DEVICES_MAX: usize = 64;
/// Distinct (trname, direction) pairs a thread counts; more go to `other`.
pub const STREAMS_MAX: usize = 256;
/// The name that stands for every device or trname past the bound.
pub const OTHER: &str = "other";

/// A transfer's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
}

/// The transport that carried a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp = 0,
    Local = 1,
    Rdma = 2,
}

/// Which end of a transfer counted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The engine that asked for it.
    Initiator = 0,
    /// The engine whose memory was read or written (TCP only: one-sided
    /// transports move bytes without the target's threads).
    Target = 1,
}

/// Events counted by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A TCP data connection opened by an initiator.
    TcpConnect = 0,
    /// A TCP data connection opened to a peer that had one before.
    TcpReconnect = 1,
    /// A TCP data connection accepted by a target.
    TcpAccept = 2,
    /// A same-host transfer handed to TCP (the peer withdrew its memory).
    LocalToTcp = 3,
    /// An RDMA transfer handed to TCP (no rail reached the peer).
    RdmaToTcp = 4,
    /// An RDMA endpoint (queue pairs to one peer device) connected.
    RdmaConnect = 5,
    /// A request a target found corrupted by its CRC-32C (a header it
    /// refused, or a WRITE whose bytes landed wrong).
    TcpChecksumTarget = 6,
    /// A request that failed at its initiator with the checksum code
    /// (whichever end found the mismatch).
    TcpChecksumInitiator = 7,
}
/// How many [`Event`]s there are.
pub const EVENTS: usize = 8;

/// A stream's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Tx = 0,
    Rx = 1,
}

impl Op {
    pub const ALL: [Op; 2] = [Op::Read, Op::Write];
    pub fn label(self) -> &'static str {
        ["read", "write"][self as usize]
    }
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Tcp, Via::Local, Via::Rdma];
    pub fn label(self) -> &'static str {
        ["tcp", "local", "rdma"][self as usize]
    }
    /// The transport of a `Transport::name`; unknown names count as TCP.
    pub fn from_name(name: &str) -> Via {
        match name {
            "local" => Via::Local,
            "rdma" => Via::Rdma,
            _ => Via::Tcp,
        }
    }
}

impl Side {
    pub const ALL: [Side; 2] = [Side::Initiator, Side::Target];
    pub fn label(self) -> &'static str {
        ["initiator", "target"][self as usize]
    }
}

impl Direction {
    pub fn label(self) -> &'static str {
        ["tx", "rx"][self as usize]
    }
}

/// Series of transfer counters: one per operation, transport and side.
pub const SERIES: usize = 2 * 3 * 2;

/// The index of a series.
pub fn series_index(op: Op, via: Via, side: Side) -> usize {
    (op as usize * 3 + via as usize) * 2 + side as usize
}

/// Latencies, binned: counts and the sum of the latencies in each bin (so
/// a consumer that re-bins, or needs the total, loses nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Histogram {
    pub counts: [u64; BUCKETS],
    pub sums_ns: [u64; BUCKETS],
}

impl Histogram {
    /// The bucket of a latency.
    pub fn bucket(latency: Duration) -> usize {
        let ns = latency.as_nanos();
        LATENCY_BOUNDS_US.iter().position(|&b| ns <= u128::from(b) * 1000).unwrap_or(BUCKETS - 1)
    }

    pub fn observe(&mut self, latency: Duration) {
        let b = Self::bucket(latency);
        self.counts[b] += 1;
        self.sums_ns[b] = self.sums_ns[b].saturating_add(latency.as_nanos().min(u128::from(u64::MAX)) as u64);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_ns(&self) -> u64 {
        self.sums_ns.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    fn add(&mut self, other: &Histogram) {
        for b in 0..BUCKETS {
            self.counts[b] += other.counts[b];
            self.sums_ns[b] = self.sums_ns[b].saturating_add(other.sums_ns[b]);
        }
    }
}

/// One series: requests settled, bytes moved, failures, and (initiator
/// side) the latency from submission to settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Series {
    pub requests: u64,
    pub bytes: u64,
    pub failures: u64,
    pub latency: Histogram,
}

impl Series {
    fn add(&mut self, other: &Series) {
        self.requests += other.requests;
        self.bytes += other.bytes;
        self.failures += other.failures;
        self.latency.add(&other.latency);
    }
}

/// One RDMA device's figures.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceCounts {
    pub name: String,
    pub bytes: u64,
    pub rail_pauses: u64,
}

/// One stream endpoint's figures, per direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCounts {
    pub trname: String,
    pub direction: Direction,
    pub objects: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sessions: u64,
}

/// Every counter. Cumulative since the process started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub series: [Series; SERIES],
    /// Requests submitted by initiators, per transport (in flight:
    /// submitted less settled).
    pub submitted: [u64; 3],
    pub events: [u64; EVENTS],
    pub devices: Vec<DeviceCounts>,
    pub streams: Vec<StreamCounts>,
}

impl Default for Counters {
    fn default() -> Self {
        EMPTY
    }
}

impl Counters {
    pub fn series(&self, op: Op, via: Via, side: Side) -> &Series {
        &self.series[series_index(op, via, side)]
    }

    /// Initiator requests submitted over `via` and not yet settled.
    pub fn in_flight(&self, via: Via) -> u64 {
        let settled: u64 = Op::ALL.iter().map(|&op| self.series(op, via, Side::Initiator).requests).sum();
        // A caller may not have published its submissions yet when a shard
        // has published their settlement: never below zero.
        self.submitted[via as usize].saturating_sub(settled)
    }

    pub fn event(&self, e: Event) -> u64 {
        self.events[e as usize]
    }

    pub fn device(&self, name: &str) -> Option<&DeviceCounts> {
        self.devices.iter().find(|d| d.name == name)
    }

    pub fn stream(&self, trname: &str, direction: Direction) -> Option<&StreamCounts> {
        self.streams.iter().find(|s| s.trname == trname && s.direction == direction)
    }

    /// Adds `other` in.
    pub fn add(&mut self, other: &Counters) {
        for (a, b) in self.series.iter_mut().zip(&other.series) {
            a.add(b);
        }
        for (a, b) in self.submitted.iter_mut().zip(&other.submitted) {
            *a += b;
        }
        for (a, b) in self.events.iter_mut().zip(&other.events) {
            *a += b;
        }
        for d in &other.devices {
            let mine = device_slot(&mut self.devices, &d.name, usize::MAX);
            mine.bytes += d.bytes;
            mine.rail_pauses += d.rail_pauses;
        }
        for s in &other.streams {
            let mine = stream_slot(&mut self.streams, &s.trname, s.direction, usize::MAX);
            mine.objects += s.objects;
            mine.bytes += s.bytes;
            mine.errors += s.errors;
            mine.sessions += s.sessions;
        }
    }
}

/// The entry for `name`, added if missing; past `max` entries, the `other`
/// entry.
fn device_slot<'a>(list: &'a mut Vec<DeviceCounts>, name: &str, max: usize) -> &'a mut DeviceCounts {
    let name = if list.len() >= max && !list.iter().any(|d| d.name == name) { OTHER } else { name };
    match list.iter().position(|d| d.name == name) {
        Some(i) => &mut list[i],
        None => {
            list.push(DeviceCounts { name: name.to_string(), ..Default::default() });
            list.last_mut().expect("just pushed")
        }
    }
}

fn stream_slot<'a>(list: &'a mut Vec<StreamCounts>, trname: &str, dir: Direction, max: usize) -> &'a mut StreamCounts {
    let known = |s: &StreamCounts, n: &str| s.trname == n && s.direction == dir;
    let name = if list.len() >= max && !list.iter().any(|s| known(s, trname)) { OTHER } else { trname };
    match list.iter().position(|s| known(s, name)) {
        Some(i) => &mut list[i],
        None => {
            list.push(StreamCounts {
                trname: name.to_string(),
                direction: dir,
                objects: 0,
                bytes: 0,
                errors: 0,
                sessions: 0,
            });
            list.last_mut().expect("just pushed")
        }
    }
}

/// What changed since the thread last published: a bit per series, and
/// one for everything else (events, devices, streams, submissions).
#[derive(Debug, Clone, Copy, Default)]
struct Dirty {
    series: u16,
    rest: bool,
}

const _: () = assert!(SERIES <= 16, "Dirty::series has a bit per series");

/// A thread's counters and its published cell.
struct Local {
    plain: Counters,
    dirty: Dirty,
    cell: Arc<Mutex<Counters>>,
    last_publish: Instant,
}

impl Local {
    fn new() -> Self {
        let cell = Arc::new(Mutex::new(Counters::default()));
        registry().cells.push(cell.clone());
        Self { plain: Counters::default(), dirty: Dirty::default(), cell, last_publish: Instant::now() }
    }

    /// Copies what changed into the cell.
    fn publish(&mut self, now: Instant) {
        self.last_publish = now;
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.series == 0 && !dirty.rest {
            return;
        }
        let mut cell = lock(&self.cell);
        let mut bits = dirty.series;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            cell.series[i] = self.plain.series[i];
        }
        if dirty.rest {
            cell.submitted = self.plain.submitted;
            cell.events = self.plain.events;
            cell.devices.clone_from(&self.plain.devices);
            cell.streams.clone_from(&self.plain.streams);
        }
    }

    fn maybe_publish(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_publish) >= PUBLISH_EVERY {
            self.publish(now);
        }
    }
}

impl Drop for Local {
    /// The thread ends: its figures join the retired total, its cell goes.
    fn drop(&mut self) {
        let mut reg = registry();
        reg.retired.add(&self.plain);
        reg.cells.retain(|c| !Arc::ptr_eq(c, &self.cell));
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

/// Every live thread's cell, and what ended threads counted.
struct Registry {
    cells: Vec<Arc<Mutex<Counters>>>,
    retired: Counters,
}

/// The registry in force. A forked child gets a fresh one (see
/// [`after_fork_in_child`]): the parent's may have been locked by a thread
/// the child does not have.
static REGISTRY: AtomicPtr<Mutex<Registry>> = AtomicPtr::new(std::ptr::null_mut());
static FIRST_REGISTRY: Mutex<Registry> = Mutex::new(Registry { cells: Vec::new(), retired: EMPTY });

const ZERO_SERIES: Series =
    Series { requests: 0, bytes: 0, failures: 0, latency: Histogram { counts: [0; BUCKETS], sums_ns: [0; BUCKETS] } };
const EMPTY: Counters = Counters {
    series: [ZERO_SERIES; SERIES],
    submitted: [0; 3],
    events: [0; EVENTS],
    devices: Vec::new(),
    streams: Vec::new(),
};

fn registry() -> MutexGuard<'static, Registry> {
    static FORK_HANDLER: std::sync::Once = std::sync::Once::new();
    FORK_HANDLER.call_once(|| {
        // SAFETY: registers a function for the child side of fork(); it
        // runs in the child's only thread.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        if rc != 0 {
            log::warn!("metrics: cannot register a fork handler ({rc}); a forked child may block on its metrics");
        }
    });
    let ptr = REGISTRY.load(Ordering::Acquire);
    // SAFETY: a non-null pointer is a registry leaked by the fork handler:
    // never freed, so 'static.
    let current: &'static Mutex<Registry> = if ptr.is_null() { &FIRST_REGISTRY } else { unsafe { &*ptr } };
    lock(current)
}

/// In a forked child: the metrics start from nothing, as a new process's.
/// The parent's registry and this thread's cell are left as they are
/// (leaked): another thread of the parent may have held their locks, and
/// that thread does not exist here.
extern "C" fn after_fork_in_child() {
    let fresh = Box::leak(Box::new(Mutex::new(Registry { cells: Vec::new(), retired: EMPTY })));
    REGISTRY.store(fresh, Ordering::Release);
    let _ = LOCAL.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut()
            && let Some(old) = slot.take()
        {
            // Its Drop would lock the parent's registry.
            std::mem::forget(old);
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counting never panics while holding a cell; a poisoned one still
    // holds good figures.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on this thread's counters. During thread teardown (the
/// thread-local already gone) the figures are dropped: nothing is left to
/// publish them.
fn with_local(f: impl FnOnce(&mut Local)) {
    let _ = LOCAL.try_with(|slot| {
        let Ok(mut slot) = slot.try_borrow_mut() else { return };
        f(slot.get_or_insert_with(Local::new));
    });
}

/// A transfer request settled: `bytes` moved (0 on failure), `ok` or not,
/// `latency` from submission (initiator side; `None` on the target side).
/// `now` is when it settled, and paces publishing.
pub fn record(op: Op, via: Via, side: Side, bytes: u64, ok: bool, latency: Option<Duration>, now: Instant) {
    let i = series_index(op, via, side);
    with_local(|l| {
        let s = &mut l.plain.series[i];
        s.requests += 1;
        s.bytes += bytes;
        s.failures += u64::from(!ok);
        if let Some(lat) = latency {
            s.latency.observe(lat);
        }
        l.dirty.series |= 1 << i;
        l.maybe_publish(now);
    });
}

/// Requests served (target side): `requests` of them, `failures` among
/// them, `bytes` moved. No clock: published at the shard's next [`flush`].
pub fn record_served(op: Op, via: Via, requests: u64, bytes: u64, failures: u64) {
    let i = series_index(op, via, Side::Target);
    with_local(|l| {
        let s = &mut l.plain.series[i];
        s.requests += requests;
        s.bytes += bytes;
        s.failures += failures;
        l.dirty.series |= 1 << i;
    });
}

/// `n` initiator requests submitted over `via`.
pub fn submitted(via: Via, n: u64) {
    with_local(|l| {
        l.plain.submitted[via as usize] += n;
        l.dirty.rest = true;
    });
}

pub fn event(e: Event) {
    events(e, 1);
}

/// `n` events of kind `e`.
pub fn events(e: Event, n: u64) {
    if n == 0 {
        return;
    }
    with_local(|l| {
        l.plain.events[e as usize] += n;
        l.dirty.rest = true;
    });
}

/// `bytes` moved over RDMA device `name`.
pub fn device_bytes(name: &str, bytes: u64) {
    with_local(|l| {
        device_slot(&mut l.plain.devices, name, DEVICES_MAX).bytes += bytes;
        l.dirty.rest = true;
    });
}

/// A rail of device `name` was paused.
pub fn rail_paused(name: &str) {
    with_local(|l| {
        device_slot(&mut l.plain.devices, name, DEVICES_MAX).rail_pauses += 1;
        l.dirty.rest = true;
    });
}

/// What a stream endpoint counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamDelta {
    pub objects: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sessions: u64,
}

/// Adds `delta` to stream `trname`'s figures in `direction`.
pub fn stream(trname: &str, direction: Direction, delta: StreamDelta) {
    with_local(|l| {
        let s = stream_slot(&mut l.plain.streams, trname, direction, STREAMS_MAX);
        s.objects += delta.objects;
        s.bytes += delta.bytes;
        s.errors += delta.errors;
        s.sessions += delta.sessions;
        l.dirty.rest = true;
    });
}

/// Publishes this thread's counters: if `force`, whatever changed now;
/// otherwise only when [`PUBLISH_EVERY`] has passed. Shards call it from
/// their loop and before parking; the engine when an API call returns.
pub fn flush(force: bool) {
    let _ = LOCAL.try_with(|slot| {
        let Ok(mut slot) = slot.try_borrow_mut() else { return };
        let Some(l) = slot.as_mut() else { return };
        let now = Instant::now();
        if force {
            l.publish(now);
        } else {
            l.maybe_publish(now);
        }
    });
}

/// Every thread's published figures and the retired ones, summed.
pub fn snapshot() -> Counters {
    let reg = registry();
    let mut total = reg.retired.clone();
    for cell in &reg.cells {
        total.add(&lock(cell));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_mooncakes_bins() {
        assert_eq!(Histogram::bucket(Duration::from_micros(0)), 0);
        assert_eq!(Histogram::bucket(Duration::from_micros(10)), 0);
        assert_eq!(Histogram::bucket(Duration::from_nanos(10_001)), 1);
        assert_eq!(Histogram::bucket(Duration::from_millis(3)), 8, "2-5 ms");
        assert_eq!(Histogram::bucket(Duration::from_secs(10)), BUCKETS - 2);
        assert_eq!(Histogram::bucket(Duration::from_secs(11)), BUCKETS - 1, "overflow");
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_micros(7));
        h.observe(Duration::from_millis(3));
        assert_eq!(h.count(), 3);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.sums_ns[0], 10_000);
        assert_eq!(h.sum_ns(), 3_010_000);
    }

    #[test]
    fn series_are_distinct() {
        let mut seen = std::collections::BTreeSet::new();
        for op in Op::ALL {
            for via in Via::ALL {
                for side in Side::ALL {
                    assert!(seen.insert(series_index(op, via, side)));
                }
            }
        }
        assert_eq!(seen.len(), SERIES);
        assert_eq!(*seen.last().unwrap(), SERIES - 1);
    }

    /// A thread's figures reach the snapshot once published, and stay in
    /// it after the thread ends. Other tests count too (the counters are
    /// the process's), so this compares before and after on series and
    /// names no other test uses.
    #[test]
    fn published_figures_survive_their_thread() {
        let name = "counters-test-dev";
        let before = snapshot();
        let dev_before = before.device(name).map_or(0, |d| d.bytes);
        let t = std::thread::spawn(move || {
            device_bytes(name, 100);
            rail_paused(name);
            stream(
                "counters-test-trname",
                Direction::Rx,
                StreamDelta { objects: 2, bytes: 20, errors: 1, sessions: 1 },
            );
            // Not published yet: the figures are the thread's own.
            let unpublished = snapshot().device(name).map_or(0, |d| d.bytes);
            flush(true);
            let published = snapshot().device(name).map_or(0, |d| d.bytes);
            device_bytes(name, 5);
            (unpublished, published)
        });
        let (unpublished, published) = t.join().unwrap();
        assert_eq!(unpublished, dev_before);
        assert_eq!(published, dev_before + 100);
        // The 5 bytes counted after the last flush arrive when the thread
        // ends.
        let after = snapshot();
        assert_eq!(after.device(name).unwrap().bytes, dev_before + 105);
        assert!(after.device(name).unwrap().rail_pauses >= 1);
        let s = after.stream("counters-test-trname", Direction::Rx).unwrap();
        assert!(s.objects >= 2 && s.bytes >= 20 && s.errors >= 1 && s.sessions >= 1);
    }

    /// A forked child starts from nothing, and counts and reads its own
    /// figures even when the parent held the registry at the fork.
    #[test]
    fn a_forked_child_starts_afresh() {
        let name = "counters-fork-dev";
        device_bytes(name, 7);
        flush(true);
        assert!(snapshot().device(name).is_some());
        let held = registry();
        // SAFETY: the child runs only async-signal-safe-enough code of
        // ours (no other thread exists in it) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let fresh = snapshot().device(name).is_none();
            device_bytes(name, 3);
            flush(true);
            let counted = snapshot().device(name).map(|d| d.bytes) == Some(3);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if fresh && counted { 0 } else { 1 }) };
        }
        drop(held);
        assert!(pid > 0);
        let mut status = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        // SAFETY: polls our own child.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if Instant::now() > deadline {
                // SAFETY: ends our own child, blocked on a lock.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("the forked child blocked on the parent's registry");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status}");
    }

    #[test]
    fn names_past_the_bound_count_as_other() {
        let mut list = Vec::new();
        for i in 0..3 {
            device_slot(&mut list, &format!("d{i}"), 2).bytes += 1;
        }
        device_slot(&mut list, "d0", 2).bytes += 1;
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].bytes, 2, "a known name keeps its entry");
        assert_eq!(list[2].name, OTHER);
    }

    #[test]
    fn in_flight_never_goes_below_zero() {
        let mut c = Counters::default();
        c.series[series_index(Op::Write, Via::Tcp, Side::Initiator)].requests = 3;
        c.submitted[Via::Tcp as usize] = 2;
        assert_eq!(c.in_flight(Via::Tcp), 0);
        c.submitted[Via::Tcp as usize] = 5;
        assert_eq!(c.in_flight(Via::Tcp), 2);
    }
}
