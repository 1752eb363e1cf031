//! `shardwire bench runtime`: the shard runtime against plain-thread anchors.
//!
//! - **Message rate per SPSC pair.** A producer on one CPU and a consumer on
//!   another move `messages` values: through our ring, through `rtrb` and
//!   crossbeam's `ArrayQueue` (the anchors), and through the runtime itself
//!   (tasks sent from shard 0 to shard 1 and run there).
//! - **Round trip** from a foreign thread to a shard and back
//!   ([`Runtime::call`]), with the shard spinning, parked and woken at once,
//!   and parked for a millisecond (long enough for an idle vCPU to halt), against
//!   a `std::sync::mpsc` thread hand-off (a thread blocked in `recv`) and a
//!   spinning `rtrb` pair.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Percentiles, pin_current};
use crate::runtime::{Runtime, RuntimeConfig, ShardCtx, SpinPolicy, spsc};

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Messages per SPSC-rate run.
    pub messages: u64,
    /// Round trips per spinning latency run.
    pub round_trips: usize,
    /// Round trips per parked latency run (each waits for the shard to park).
    pub parked_round_trips: usize,
    /// Runs of each SPSC-rate measurement; the median is reported.
    pub repeats: usize,
    /// The CPU of the caller/producer.
    pub cpu_a: u32,
    /// The CPU of the shard/consumer.
    pub cpu_b: u32,
}

impl Default for Options {
    fn default() -> Self {
        let cpus = crate::topo::plan::current_affinity().unwrap_or_else(|| vec![0]);
        let cpu_a = cpus.first().copied().unwrap_or(0);
        let cpu_b = cpus.get(1).copied().unwrap_or(cpu_a);
        Self { messages: 5_000_000, round_trips: 20_000, parked_round_trips: 2_000, repeats: 3, cpu_a, cpu_b }
    }
}

/// One message-rate figure.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub name: &'static str,
    pub messages: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
}

/// One round-trip figure.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    pub name: &'static str,
    pub latency: Percentiles,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cpu_a: u32,
    pub cpu_b: u32,
    pub ring_features: String,
    pub rates: Vec<Rate>,
    pub round_trips: Vec<RoundTrip>,
}

impl Report {
    fn rate(&self, name: &str) -> f64 {
        self.rates.iter().find(|r| r.name == name).map_or(0.0, |r| r.msgs_per_s)
    }

    fn p50(&self, name: &str) -> f64 {
        self.round_trips.iter().find(|r| r.name == name).map_or(0.0, |r| r.latency.p50_us)
    }

    /// The report as the table the README carries.
    pub fn render(&self) -> String {
        let mut out = format!(
            "CPUs {} (producer/caller) and {} (consumer/shard); io_uring set-up: {}\n\n",
            self.cpu_a, self.cpu_b, self.ring_features
        );
        let anchor = self.rate(RTRB);
        out.push_str("| SPSC pair | Mmsg/s | vs rtrb |\n|---|---:|---:|\n");
        for r in &self.rates {
            out.push_str(&format!(
                "| {} | {:.1} | {:.2}x |\n",
                r.name,
                r.msgs_per_s / 1e6,
                r.msgs_per_s / anchor.max(1.0)
            ));
        }
        let anchor = self.p50(MPSC_HANDOFF);
        out.push_str("\n| round trip | p50 µs | p90 µs | p99 µs | p50 vs mpsc hand-off |\n|---|---:|---:|---:|---:|\n");
        for r in &self.round_trips {
            out.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.3}x |\n",
                r.name,
                r.latency.p50_us,
                r.latency.p90_us,
                r.latency.p99_us,
                r.latency.p50_us / anchor.max(0.001)
            ));
        }
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        out.push_str(&format!(
            "\ntargets: SPSC rate >= rtrb: {} ({:.2}x); spinning round trip p50 <= 5 µs: {} ({:.1} µs); \
             parked wake p50 <= 30 µs: {} woken at once ({:.1} µs), {} parked 1 ms ({:.1} µs, {:.2}x this \
             machine's kernel wake floor of {:.1} µs)\n",
            verdict(self.rate(SHARDWIRE_SPSC) >= self.rate(RTRB)),
            self.rate(SHARDWIRE_SPSC) / self.rate(RTRB).max(1.0),
            verdict(self.p50(SPINNING) <= 5.0),
            self.p50(SPINNING),
            verdict(self.p50(PARKED_AT_ONCE) <= 30.0),
            self.p50(PARKED_AT_ONCE),
            verdict(self.p50(PARKED) <= 30.0),
            self.p50(PARKED),
            self.p50(PARKED) / self.p50(KERNEL_WAKE).max(0.001),
            self.p50(KERNEL_WAKE),
        ));
        out
    }
}

const SHARDWIRE_SPSC: &str = "shardwire spsc ring";
const SHARDWIRE_MESH: &str = "shardwire shard->shard tasks";
const RTRB: &str = "rtrb 0.4 (anchor)";
#[cfg(feature = "bench-anchors")]
const ARRAY_QUEUE: &str = "crossbeam ArrayQueue (anchor)";
const SPINNING: &str = "shard spinning";
const PARKED_AT_ONCE: &str = "shard parked, woken at once";
const PARKED: &str = "shard parked for 1 ms";
const MPSC_HANDOFF: &str = "std mpsc thread hand-off (anchor)";
#[cfg(feature = "bench-anchors")]
const RTRB_SPIN_PAIR: &str = "rtrb spinning pair (anchor)";
const KERNEL_WAKE: &str = "thread blocked in eventfd read (kernel wake floor)";

/// Runs every measurement.
pub fn run(opts: &Options) -> Report {
    // Interleave the runs so drift on a shared machine hits all alike.
    #[cfg(feature = "bench-anchors")]
    let pairs: Vec<(&'static str, PairFn)> =
        vec![(SHARDWIRE_SPSC, ours), (RTRB, rtrb_pair), (ARRAY_QUEUE, array_queue)];
    #[cfg(not(feature = "bench-anchors"))]
    let pairs: Vec<(&'static str, PairFn)> = vec![(SHARDWIRE_SPSC, ours)];
    let mut runs: Vec<Vec<Duration>> = vec![Vec::new(); pairs.len()];
    for _ in 0..opts.repeats.max(1) {
        for (i, (_, f)) in pairs.iter().enumerate() {
            runs[i].push(f(opts));
        }
    }
    let mut rates: Vec<Rate> =
        pairs.iter().zip(runs).map(|((name, _), mut r)| rate(name, opts.messages, median(&mut r))).collect();
    let mut mesh_runs = Vec::new();
    let mut features = String::new();
    for _ in 0..opts.repeats.max(1) {
        let (elapsed, f) = mesh_rate(opts);
        mesh_runs.push(elapsed);
        features = f;
    }
    rates.push(rate(SHARDWIRE_MESH, opts.messages, median(&mut mesh_runs)));
    let mut round_trips = vec![
        RoundTrip { name: SPINNING, latency: shard_round_trip(opts, None) },
        RoundTrip { name: PARKED_AT_ONCE, latency: shard_round_trip(opts, Some(Duration::ZERO)) },
        RoundTrip { name: PARKED, latency: shard_round_trip(opts, Some(Duration::from_millis(1))) },
        RoundTrip { name: MPSC_HANDOFF, latency: mpsc_round_trip(opts) },
    ];
    #[cfg(feature = "bench-anchors")]
    round_trips.push(RoundTrip { name: RTRB_SPIN_PAIR, latency: rtrb_round_trip(opts) });
    round_trips.push(RoundTrip { name: KERNEL_WAKE, latency: eventfd_wake(opts) });
    Report { cpu_a: opts.cpu_a, cpu_b: opts.cpu_b, ring_features: features, rates, round_trips }
}

type PairFn = fn(&Options) -> Duration;

fn rate(name: &'static str, messages: u64, elapsed: Duration) -> Rate {
    let seconds = elapsed.as_secs_f64();
    Rate { name, messages, seconds, msgs_per_s: messages as f64 / seconds.max(1e-9) }
}

fn median(runs: &mut [Duration]) -> Duration {
    runs.sort_unstable();
    runs[runs.len() / 2]
}

const PAIR_CAPACITY: usize = 4096;

/// Runs a producer on `cpu_a` and a consumer on `cpu_b`; the consumer checks
/// order, and the time runs from both being ready to the last message.
fn pair<P, C>(opts: &Options, mut produce: P, mut consume: C) -> Duration
where
    P: FnMut(u64) -> bool + Send + 'static,
    C: FnMut() -> Option<u64> + Send + 'static,
{
    let n = opts.messages;
    let (cpu_a, cpu_b) = (opts.cpu_a, opts.cpu_b);
    let go = Arc::new(AtomicBool::new(false));
    let go2 = go.clone();
    let consumer = thread::spawn(move || {
        pin_current(cpu_b);
        while !go2.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        let mut expected = 0u64;
        while expected < n {
            if let Some(v) = consume() {
                assert_eq!(v, expected, "out of order");
                expected += 1;
            } else {
                std::hint::spin_loop();
            }
        }
        start.elapsed()
    });
    let producer = thread::spawn(move || {
        pin_current(cpu_a);
        go.store(true, Ordering::Release);
        for i in 0..n {
            while !produce(i) {
                std::hint::spin_loop();
            }
        }
    });
    producer.join().expect("producer");
    consumer.join().expect("consumer")
}

fn ours(opts: &Options) -> Duration {
    let (mut p, mut c) = spsc::channel::<u64>(PAIR_CAPACITY);
    pair(opts, move |v| p.push_unchecked(v).is_ok(), move || c.pop())
}

#[cfg(feature = "bench-anchors")]
fn rtrb_pair(opts: &Options) -> Duration {
    let (mut p, mut c) = rtrb::RingBuffer::<u64>::new(PAIR_CAPACITY);
    pair(opts, move |v| p.push(v).is_ok(), move || c.pop().ok())
}

#[cfg(feature = "bench-anchors")]
fn array_queue(opts: &Options) -> Duration {
    let q = Arc::new(crossbeam_queue::ArrayQueue::<u64>::new(PAIR_CAPACITY));
    let q2 = q.clone();
    pair(opts, move |v| q.push(v).is_ok(), move || q2.pop())
}

/// Shard 1's tally of tasks received from shard 0.
struct MeshTally {
    received: u64,
    target: u64,
    done: Arc<AtomicBool>,
}

fn tally(ctx: &mut ShardCtx) {
    if let Some(t) = ctx.local_mut::<MeshTally>() {
        t.received += 1;
        if t.received == t.target {
            t.done.store(true, Ordering::Release);
        }
    }
}

/// Sends as many tally tasks as fit, then queues itself to go on in the
/// next loop iteration, so shard 0's loop keeps turning.
fn pump(ctx: &mut ShardCtx, mut left: u64) {
    while left > 0 {
        if ctx.try_send(1, Box::new(tally)).is_err() {
            break;
        }
        left -= 1;
    }
    if left > 0 {
        let _ = ctx.spawn(move |ctx| pump(ctx, left));
    }
}

fn mesh_rate(opts: &Options) -> (Duration, String) {
    let mut config = RuntimeConfig::pinned(&[opts.cpu_a, opts.cpu_b]);
    config.spin = SpinPolicy { budget: Duration::from_secs(5), adaptive: false };
    config.mesh_capacity = PAIR_CAPACITY;
    let rt = Runtime::start(config).expect("runtime starts");
    let features = rt.ring_features()[0].describe();
    let done = Arc::new(AtomicBool::new(false));
    let (n, d) = (opts.messages, done.clone());
    rt.call(1, move |ctx| {
        ctx.insert_local(MeshTally { received: 0, target: n, done: d });
    })
    .expect("shard 1 answers");
    let start = Instant::now();
    rt.submit(0, move |ctx| pump(ctx, n)).expect("shard 0 takes the pump");
    while !done.load(Ordering::Acquire) {
        thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    rt.shutdown();
    (elapsed, features)
}

/// A round trip to one shard. `parked_idle` is `None` for a spinning shard;
/// otherwise the shard parks after every call and is left parked that long
/// before the next one.
fn shard_round_trip(opts: &Options, parked_idle: Option<Duration>) -> Percentiles {
    let spinning = parked_idle.is_none();
    let parked_idle = parked_idle.unwrap_or_default();
    let mut config = RuntimeConfig::pinned(&[opts.cpu_b]);
    config.spin = if spinning {
        SpinPolicy { budget: Duration::from_secs(60), adaptive: false }
    } else {
        SpinPolicy { budget: Duration::ZERO, adaptive: false }
    };
    let rt = Runtime::start(config).expect("runtime starts");
    let n = if spinning { opts.round_trips } else { opts.parked_round_trips };
    let latency = on_cpu(opts.cpu_a, || {
        // Warm up: create this thread's ring, fault in the code paths.
        for _ in 0..100 {
            rt.call(0, |_| ()).expect("warm-up call");
        }
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            if !spinning {
                // Let the shard run out its (zero) budget and park, then
                // leave it parked for `parked_idle`.
                let parks = rt.stats()[0].parks;
                let wait_start = Instant::now();
                while rt.stats()[0].parks == parks && wait_start.elapsed() < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                let parked_at = Instant::now();
                while parked_at.elapsed() < parked_idle {
                    std::hint::spin_loop();
                }
            }
            let start = Instant::now();
            rt.call(0, |_| ()).expect("call");
            samples.push(start.elapsed());
        }
        Percentiles::of(&mut samples)
    });
    rt.shutdown();
    latency
}

/// Runs `f` on a thread pinned to `cpu` and returns its result.
fn on_cpu<R: Send>(cpu: u32, f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        s.spawn(|| {
            pin_current(cpu);
            f()
        })
        .join()
        .expect("pinned bench thread")
    })
}

fn mpsc_round_trip(opts: &Options) -> Percentiles {
    let (to_worker, worker_rx) = std::sync::mpsc::channel::<u64>();
    let (to_caller, caller_rx) = std::sync::mpsc::channel::<u64>();
    let cpu_b = opts.cpu_b;
    let worker = thread::spawn(move || {
        pin_current(cpu_b);
        while let Ok(v) = worker_rx.recv() {
            if to_caller.send(v).is_err() {
                break;
            }
        }
    });
    let n = opts.parked_round_trips as u64;
    let latency = on_cpu(opts.cpu_a, move || {
        let mut samples = Vec::with_capacity(n as usize);
        for i in 0..n + 100 {
            // Give the worker time to block in recv, as a parked shard would.
            thread::sleep(Duration::from_micros(50));
            let start = Instant::now();
            to_worker.send(i).expect("worker alive");
            assert_eq!(caller_rx.recv().expect("worker replies"), i);
            if i >= 100 {
                samples.push(start.elapsed());
            }
        }
        Percentiles::of(&mut samples)
    });
    worker.join().expect("worker");
    latency
}

#[cfg(feature = "bench-anchors")]
fn rtrb_round_trip(opts: &Options) -> Percentiles {
    let (mut to_worker, mut worker_rx) = rtrb::RingBuffer::<u64>::new(64);
    let (mut to_caller, mut caller_rx) = rtrb::RingBuffer::<u64>::new(64);
    let stop = Arc::new(AtomicU64::new(0));
    let stop2 = stop.clone();
    let cpu_b = opts.cpu_b;
    let worker = thread::spawn(move || {
        pin_current(cpu_b);
        while stop2.load(Ordering::Relaxed) == 0 {
            if let Ok(v) = worker_rx.pop() {
                while to_caller.push(v).is_err() {
                    std::hint::spin_loop();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let n = opts.round_trips as u64;
    let latency = on_cpu(opts.cpu_a, move || {
        let mut samples = Vec::with_capacity(n as usize);
        for i in 0..n + 100 {
            let start = Instant::now();
            to_worker.push(i).expect("room");
            let v = loop {
                if let Ok(v) = caller_rx.pop() {
                    break v;
                }
                std::hint::spin_loop();
            };
            assert_eq!(v, i);
            if i >= 100 {
                samples.push(start.elapsed());
            }
        }
        Percentiles::of(&mut samples)
    });
    stop.store(1, Ordering::Relaxed);
    worker.join().expect("worker");
    latency
}

/// The floor under any parked design: a thread blocked in `read` on an
/// eventfd, woken by a write, signalling back through memory the caller
/// spins on. On a VM whose idle vCPUs halt, this is the halt exit.
fn eventfd_wake(opts: &Options) -> Percentiles {
    // SAFETY: plain syscall; the descriptor is closed below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(efd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    let cpu_b = opts.cpu_b;
    let worker = thread::spawn(move || {
        pin_current(cpu_b);
        let mut buf = 0u64;
        loop {
            // SAFETY: reads 8 bytes into a live u64 from our eventfd.
            let n = unsafe { libc::read(efd, (&mut buf as *mut u64).cast(), 8) };
            if n != 8 || seen2.load(Ordering::Acquire) == u64::MAX {
                break;
            }
            seen2.fetch_add(1, Ordering::AcqRel);
        }
    });
    let n = opts.parked_round_trips as u64;
    let write_one = move || {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(efd, (&one as *const u64).cast(), 8) };
    };
    let seen3 = seen.clone();
    let latency = on_cpu(opts.cpu_a, move || {
        let mut samples = Vec::with_capacity(n as usize);
        for i in 0..n + 100 {
            thread::sleep(Duration::from_micros(200));
            let start = Instant::now();
            write_one();
            while seen3.load(Ordering::Acquire) != i + 1 {
                std::hint::spin_loop();
            }
            if i >= 100 {
                samples.push(start.elapsed());
            }
        }
        Percentiles::of(&mut samples)
    });
    seen.store(u64::MAX, Ordering::Release);
    write_one();
    worker.join().expect("worker");
    // SAFETY: the worker has exited; nothing uses the descriptor any more.
    unsafe { libc::close(efd) };
    latency
}
