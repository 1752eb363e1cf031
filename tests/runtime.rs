//! The shard runtime's behaviour: pinning, calls, the shard mesh, foreign
//! rings, timers, io_uring operations, poll hooks, parking, panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

#[path = "interop/poll.rs"]
mod poll;

use io_uring::{opcode, types};
use shardwire::runtime::{
    CallError, Completion, PollHook, Runtime, RuntimeConfig, ShardCtx, SpinPolicy, StartError, SubmitError, UringSetup,
};

/// Shards that park quickly, so parallel tests do not starve two cores.
fn config(shards: usize) -> RuntimeConfig {
    let mut c = RuntimeConfig::new(shards);
    c.spin = SpinPolicy { budget: Duration::from_micros(20), adaptive: false };
    c
}

fn online_cpus() -> Vec<u32> {
    shardwire::topo::plan::current_affinity().unwrap()
}

#[test]
fn shards_run_on_their_pinned_cpus() {
    let cpus = online_cpus();
    let rt = Runtime::start(RuntimeConfig { spin: config(1).spin, ..RuntimeConfig::pinned(&cpus) }).unwrap();
    for (shard, &cpu) in cpus.iter().enumerate() {
        // SAFETY: sched_getcpu has no preconditions.
        let (id, on) = rt.call(shard, |ctx| (ctx.id(), unsafe { libc::sched_getcpu() })).unwrap();
        assert_eq!((id, on), (shard, cpu as i32));
    }
    assert_eq!(rt.shard_count(), cpus.len());
    let features = rt.ring_features()[0];
    assert!(features.single_issuer && features.defer_taskrun, "this kernel has both: {features:?}");
}

#[test]
fn start_errors_are_clear() {
    let err = Runtime::start(RuntimeConfig::new(0)).err().unwrap();
    assert!(matches!(err, StartError::Config(_)), "{err}");
    let err = Runtime::start(RuntimeConfig::pinned(&[4000])).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("shard 0") && text.contains("CPU 4000") && text.contains("cannot pin"), "{text}");
    let mut c = config(1);
    c.mesh_capacity = 0;
    assert!(Runtime::start(c).is_err());
}

#[test]
fn call_errors_are_clear() {
    let rt = Runtime::start(config(2)).unwrap();
    assert_eq!(rt.call(7, |_| ()).unwrap_err(), CallError::Submit(SubmitError::NoSuchShard { shard: 7, count: 2 }));
    let rt = Arc::new(rt);
    let inner = rt.clone();
    // A shard blocking on a call to itself would never answer.
    let r = rt.call(1, move |_| inner.call(1, |_| 5)).unwrap();
    assert_eq!(r, Err(CallError::Submit(SubmitError::WouldDeadlock)));
    // Calling another shard from a shard is allowed.
    let inner = rt.clone();
    assert_eq!(rt.call(1, move |_| inner.call(0, |ctx| ctx.id())).unwrap(), Ok(0));
}

#[test]
fn mesh_keeps_order_and_loses_nothing() {
    // Every shard sends a numbered stream to every other shard; each
    // receiver checks per-sender order and the final counts.
    const PER_PAIR: u64 = 200_000;
    let n = 3;
    let rt = Runtime::start(config(n)).unwrap();
    struct Seen(Vec<u64>);
    for s in 0..n {
        rt.call(s, move |ctx| {
            ctx.insert_local(Seen(vec![0; n]));
        })
        .unwrap();
    }
    fn receive(ctx: &mut ShardCtx, from: usize, seq: u64) {
        let seen = ctx.local_mut::<Seen>().unwrap();
        assert_eq!(seen.0[from], seq, "out of order from shard {from}");
        seen.0[from] += 1;
    }
    fn pump(ctx: &mut ShardCtx, mut next: Vec<u64>) {
        let me = ctx.id();
        for (to, sent) in next.iter_mut().enumerate() {
            while to != me && *sent < PER_PAIR {
                let seq = *sent;
                if ctx.try_send(to, Box::new(move |ctx: &mut ShardCtx| receive(ctx, me, seq))).is_err() {
                    break; // Full: go on next iteration.
                }
                *sent += 1;
            }
        }
        if next.iter().enumerate().any(|(to, &sent)| to != me && sent < PER_PAIR) {
            ctx.spawn(move |ctx| pump(ctx, next)).unwrap();
        }
    }
    for s in 0..n {
        rt.submit(s, move |ctx| pump(ctx, vec![0; n])).unwrap();
    }
    for s in 0..n {
        poll::poll_until(&format!("shard {s} sees every message"), Duration::from_secs(120), || {
            let seen = rt.call(s, |ctx| ctx.local_mut::<Seen>().unwrap().0.clone()).unwrap();
            let want: Vec<u64> = (0..n).map(|from| if from == s { 0 } else { PER_PAIR }).collect();
            if seen == want { Ok(()) } else { Err(seen) }
        });
    }
    let stats = rt.stats();
    assert_eq!(stats.iter().map(|s| s.panics).sum::<u64>(), 0, "no receive assertion failed");
}

#[test]
fn many_foreign_threads_and_their_rings_are_reclaimed() {
    let rt = Arc::new(Runtime::start(config(2)).unwrap());
    let total = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..12)
        .map(|t| {
            let (rt, total) = (rt.clone(), total.clone());
            thread::spawn(move || {
                for i in 0..2_000usize {
                    let v = rt.call(i % 2, move |_| t * 10_000 + i).unwrap();
                    assert_eq!(v, t * 10_000 + i);
                    total.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(total.load(Ordering::Relaxed), 24_000);
    // The threads have exited, so their rings are abandoned; the shards drop
    // them. Only this thread's own rings (one per shard, made by the calls
    // below) remain.
    poll::poll_until("the exited threads' rings are dropped", poll::WAIT, || {
        let rings: Vec<usize> = (0..2).map(|s| rt.call(s, |ctx| ctx.stats().foreign_rings as usize).unwrap()).collect();
        if rings == vec![1, 1] { Ok(()) } else { Err(rings) }
    });
}

#[test]
fn foreign_ring_limit_is_enforced() {
    let mut c = config(1);
    c.foreign_rings_max = 2;
    let rt = Arc::new(Runtime::start(c).unwrap());
    let hold = Arc::new(Barrier::new(3));
    let holders: Vec<_> = (0..2)
        .map(|_| {
            let (rt, hold) = (rt.clone(), hold.clone());
            thread::spawn(move || {
                rt.call(0, |_| ()).unwrap();
                hold.wait(); // keep the thread, and its ring, alive
                hold.wait();
            })
        })
        .collect();
    hold.wait();
    assert_eq!(rt.call(0, |_| ()).unwrap_err(), CallError::Submit(SubmitError::TooManyThreads { shard: 0, limit: 2 }));
    hold.wait();
    for h in holders {
        h.join().unwrap();
    }
}

#[test]
fn a_full_ring_pushes_back_and_submit_waits_for_room() {
    let mut c = config(1);
    c.inbox_capacity = 4;
    let rt = Runtime::start(c).unwrap();
    let (block_tx, block_rx) = std::sync::mpsc::channel::<()>();
    let (stuck_tx, stuck_rx) = std::sync::mpsc::channel::<()>();
    rt.submit(0, move |_| {
        stuck_tx.send(()).unwrap();
        let _ = block_rx.recv_timeout(Duration::from_secs(30));
    })
    .unwrap();
    // The shard has taken the job off its ring and is stuck in it.
    stuck_rx.recv_timeout(poll::WAIT).expect("the shard runs the job");
    let mut accepted = 0;
    let refused = loop {
        match rt.try_submit(0, |_| ()) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 4, "a ring of 4 took more");
    };
    assert_eq!(refused, SubmitError::Full { shard: 0 });
    assert_eq!(accepted, 4);
    // Released a moment later, so the call below most likely finds the
    // ring full and waits; it must succeed whichever comes first.
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(20));
        block_tx.send(()).unwrap();
    });
    // The blocking form waits for room instead of failing.
    assert_eq!(rt.call(0, |_| 9).unwrap(), 9);
    releaser.join().unwrap();
}

#[test]
fn a_panicking_job_fails_alone() {
    let rt = Runtime::start(config(1)).unwrap();
    let err = rt.call(0, |_| -> u32 { panic!("boom in a job") }).unwrap_err();
    assert_eq!(err, CallError::Panicked("boom in a job".into()));
    rt.submit(0, |_| panic!("fire and forget")).unwrap();
    // The shard goes on, with its state intact.
    rt.call(0, |ctx| {
        ctx.insert_local(41u32);
    })
    .unwrap();
    assert_eq!(rt.call(0, |ctx| *ctx.local_mut::<u32>().unwrap() + 1).unwrap(), 42);
    // A panicking timer callback too.
    rt.call(0, |ctx| ctx.set_timer(Duration::ZERO, |_| panic!("boom in a timer")).map(|_| ())).unwrap().unwrap();
    poll::poll_true("three panics counted", poll::WAIT, || rt.call(0, |ctx| ctx.stats().panics).unwrap() >= 3);
    assert_eq!(rt.call(0, |_| "alive").unwrap(), "alive");
}

#[test]
fn timers_fire_in_order_after_their_deadline_and_cancel() {
    let rt = Runtime::start(config(1)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    rt.call(0, move |ctx| {
        for (ms, tag) in [(30u64, "c"), (10, "a"), (20, "b")] {
            let tx = tx.clone();
            ctx.set_timer(Duration::from_millis(ms), move |_| tx.send((tag, Instant::now())).unwrap()).unwrap();
        }
        let tx = tx.clone();
        let id = ctx.set_timer(Duration::from_millis(15), move |_| tx.send(("cancelled", Instant::now())).unwrap());
        assert!(ctx.cancel_timer(id.unwrap()));
        assert_eq!(ctx.timers_pending(), 3);
    })
    .unwrap();
    // The shard parks between timers (20 µs spin budget); the park must wake
    // for each deadline.
    let got: Vec<_> = (0..3).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert_eq!(got.iter().map(|(t, _)| *t).collect::<Vec<_>>(), vec!["a", "b", "c"]);
    for ((_, at), ms) in got.iter().zip([10u64, 20, 30]) {
        assert!(at.duration_since(start) >= Duration::from_millis(ms), "fired early");
    }
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "the cancelled timer never fires");
    assert!(rt.stats()[0].parks > 0);
}

#[test]
fn timer_limit_is_enforced() {
    let mut c = config(1);
    c.timers_max = 3;
    let rt = Runtime::start(c).unwrap();
    let results = rt
        .call(0, |ctx| (0..4).map(|_| ctx.set_timer(Duration::from_secs(60), |_| {}).is_ok()).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(results, vec![true, true, true, false]);
}

/// Submits an io_uring timeout of `ms` and returns its completion.
fn uring_timeout(rt: &Runtime, ms: u64) -> Completion {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.call(0, move |ctx| {
        let ts = Box::new(types::Timespec::from(Duration::from_millis(ms)));
        let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        // SAFETY: the timespec is owned by the callback, which the shard
        // keeps until the completion arrives.
        unsafe {
            ctx.submit_op(entry, move |_, c| {
                drop(ts);
                tx.send(c).unwrap();
            })
        }
        .unwrap();
    })
    .unwrap();
    rx.recv_timeout(Duration::from_secs(10)).expect("the operation completes")
}

#[test]
fn io_uring_ops_complete_spinning_and_parked_with_both_setups() {
    for setup in [UringSetup::Auto, UringSetup::Plain] {
        for spin in [Duration::from_secs(30), Duration::ZERO] {
            let mut c = config(1);
            c.uring_setup = setup;
            c.spin = SpinPolicy { budget: spin, adaptive: false };
            let rt = Runtime::start(c).unwrap();
            let start = Instant::now();
            let done = uring_timeout(&rt, 15);
            assert_eq!(done.result, -libc::ETIME, "{setup:?} {spin:?}");
            assert!(start.elapsed() >= Duration::from_millis(15));
            // A nop completes at once.
            let (tx, rx) = std::sync::mpsc::channel();
            rt.call(0, move |ctx| {
                // SAFETY: a nop points at nothing.
                unsafe { ctx.submit_op(opcode::Nop::new().build(), move |_, c| tx.send(c.result).unwrap()) }.unwrap();
            })
            .unwrap();
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0);
            let plain = rt.ring_features()[0].describe() == "plain";
            assert_eq!(plain, setup == UringSetup::Plain);
            if spin.is_zero() {
                assert!(rt.stats()[0].parks > 0, "{setup:?}: parked while waiting");
            }
        }
    }
}

#[test]
fn cancelled_op_completes_with_ecanceled() {
    let rt = Runtime::start(config(1)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    rt.call(0, move |ctx| {
        let ts = Box::new(types::Timespec::from(Duration::from_secs(3600)));
        let entry = opcode::Timeout::new(&*ts as *const types::Timespec).build();
        // SAFETY: the callback owns the timespec until completion.
        let id = unsafe {
            ctx.submit_op(entry, move |_, c| {
                drop(ts);
                tx.send(c.result).unwrap();
            })
        }
        .unwrap();
        assert_eq!(ctx.ops_in_flight(), 1);
        ctx.cancel_op(id).unwrap();
    })
    .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), -libc::ECANCELED);
    assert_eq!(rt.call(0, |ctx| ctx.ops_in_flight()).unwrap(), 0);
}

struct CountingHook {
    polls: Arc<AtomicUsize>,
    allow_park: bool,
    panic_after: Option<usize>,
}

impl PollHook for CountingHook {
    fn poll(&mut self, _ctx: &mut ShardCtx) -> usize {
        let n = self.polls.fetch_add(1, Ordering::Relaxed) + 1;
        if self.panic_after.is_some_and(|limit| n > limit) {
            panic!("hook gave up");
        }
        0
    }

    fn can_park(&mut self) -> bool {
        self.allow_park
    }
}

#[test]
fn poll_hooks_run_every_iteration_and_can_keep_the_shard_awake() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let mut c = config(1);
    c.hooks = Some(Arc::new(move |_shard| -> Vec<Box<dyn PollHook>> {
        vec![Box::new(CountingHook { polls: p.clone(), allow_park: false, panic_after: None })]
    }));
    let rt = Runtime::start(c).unwrap();
    // Long enough for a shard free to park to have parked many times over.
    poll::poll_true("the shard loops", poll::WAIT, || rt.stats()[0].loops >= 10_000);
    let s = rt.stats()[0];
    assert_eq!(s.parks, 0, "a hook that vetoes parking keeps the shard spinning");
    assert!(polls.load(Ordering::Relaxed) as u64 >= s.loops.min(1000), "polled every loop");
    drop(rt);

    // Hooks added at run time; a panicking hook is removed, the shard goes on.
    let rt = Runtime::start(config(1)).unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    rt.call(0, move |ctx| {
        ctx.add_poll_hook(Box::new(CountingHook { polls: p, allow_park: true, panic_after: Some(5) }));
    })
    .unwrap();
    poll::poll_true("the hook panics", poll::WAIT, || {
        let _ = rt.call(0, |_| ());
        rt.stats()[0].panics > 0
    });
    let after = polls.load(Ordering::Relaxed);
    for _ in 0..50 {
        rt.call(0, |_| ()).unwrap();
    }
    assert_eq!(polls.load(Ordering::Relaxed), after, "the panicked hook is no longer polled");

    // A hook removed by id is no longer polled.
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let id = rt
        .call(0, move |ctx| ctx.add_poll_hook(Box::new(CountingHook { polls: p, allow_park: true, panic_after: None })))
        .unwrap();
    poll::poll_true("the new hook is polled", poll::WAIT, || {
        rt.call(0, |_| ()).unwrap();
        polls.load(Ordering::Relaxed) > 0
    });
    rt.call(0, move |ctx| ctx.remove_poll_hook(id)).unwrap();
    rt.call(0, |_| ()).unwrap();
    let after = polls.load(Ordering::Relaxed);
    for _ in 0..50 {
        rt.call(0, |_| ()).unwrap();
    }
    assert_eq!(polls.load(Ordering::Relaxed), after, "the removed hook is no longer polled");
}

#[test]
fn producers_wake_a_shard_only_when_it_is_parked() {
    // A shard that never parks is never woken.
    let mut c = config(1);
    c.spin = SpinPolicy { budget: Duration::from_secs(60), adaptive: false };
    let rt = Runtime::start(c).unwrap();
    for _ in 0..2_000 {
        rt.call(0, |_| ()).unwrap();
    }
    let s = rt.stats()[0];
    assert_eq!((s.parks, s.wake_writes), (0, 0), "{s:?}");
    drop(rt);

    // A shard that parks at once is woken by (about) every call, and never
    // more often than it parked.
    let mut c = config(1);
    c.spin = SpinPolicy { budget: Duration::ZERO, adaptive: false };
    let rt = Runtime::start(c).unwrap();
    poll::poll_true("the shard parks", poll::WAIT, || rt.stats()[0].parks > 0);
    for _ in 0..50 {
        // Each call finds the shard parked (it parks again after each), so
        // each must wake it.
        let parks = rt.stats()[0].parks;
        rt.call(0, |_| ()).unwrap();
        poll::poll_true("the shard parks again", poll::WAIT, || rt.stats()[0].parks > parks);
    }
    let s = rt.stats()[0];
    assert!(s.wake_writes > 0 && s.wakeups > 0, "{s:?}");
    assert!(s.wake_writes <= s.parks + 1, "woke more often than it parked: {s:?}");
}

#[test]
fn shard_local_state_is_per_shard() {
    let rt = Runtime::start(config(2)).unwrap();
    rt.call(0, |ctx| ctx.insert_local(String::from("zero"))).unwrap();
    assert_eq!(rt.call(1, |ctx| ctx.local_mut::<String>().cloned()).unwrap(), None);
    assert_eq!(rt.call(0, |ctx| ctx.take_local::<String>()).unwrap().as_deref(), Some("zero"));
    assert_eq!(rt.call(0, |ctx| ctx.local_mut::<String>().cloned()).unwrap(), None);
}
