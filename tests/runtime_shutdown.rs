//! Shutdown: every shard joins, queued work fails with a clear error, io in
//! flight is cancelled, and no descriptor or thread is left behind.
//!
//! These tests count the process's descriptors and threads, so they run one
//! at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use io_uring::{opcode, types};
use shardwire::runtime::{CallError, Runtime, RuntimeConfig, ShardCtx, SpinPolicy, SubmitError};

#[path = "interop/poll.rs"]
mod poll;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What each descriptor of this process is open on (`"5 -> pipe:[123]"`),
/// leaving out the handle this listing itself holds.
fn fd_targets() -> Vec<String> {
    let own = format!("/proc/{}/fd", std::process::id());
    let mut out: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).map_or_else(|e| e.to_string(), |t| t.display().to_string());
            (target != own).then(|| format!("{} -> {target}", e.file_name().to_string_lossy()))
        })
        .collect();
    out.sort();
    out
}

/// Descriptors open now that were not open (on the same thing) in
/// `before`. A leak shows here; a descriptor that was in `before` and has
/// closed since does not (another thread of the harness may have had one
/// open for a moment when `before` was taken).
fn opened_since(before: &[String]) -> Vec<String> {
    fd_targets().into_iter().filter(|t| !before.contains(t)).collect()
}

/// Shard threads alive in this process (the test harness's own threads
/// come and go, so only ours are counted).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("shardwire-shar")))
        .count()
}

/// Waits until `f` holds, failing after a generous bound (hang guard only).
fn eventually(what: &str, f: impl Fn() -> bool) {
    poll::poll_true(what, poll::WAIT, f);
}

fn config(shards: usize) -> RuntimeConfig {
    let mut c = RuntimeConfig::new(shards);
    c.spin = SpinPolicy { budget: Duration::from_micros(20), adaptive: false };
    c
}

/// Ping-pong between two shards forever: keeps the mesh busy.
fn ping(ctx: &mut ShardCtx, hops: Arc<AtomicU64>) {
    hops.fetch_add(1, Ordering::Relaxed);
    let other = 1 - ctx.id();
    let h = hops.clone();
    if ctx.send_to(other, move |ctx| ping(ctx, h)).is_err() {
        let _ = ctx.spawn(move |ctx| ping(ctx, hops));
    }
}

#[test]
fn shutdown_while_busy_fails_pending_work_and_leaks_nothing() {
    let _serial = serial();
    let (fds_before, threads_before) = (fd_targets(), threads());
    {
        let rt = Arc::new(Runtime::start(config(2)).unwrap());

        // 1. Mesh traffic.
        let hops = Arc::new(AtomicU64::new(0));
        let h = hops.clone();
        rt.submit(0, move |ctx| ping(ctx, h)).unwrap();
        eventually("mesh traffic", || hops.load(Ordering::Relaxed) > 1000);

        // 2. An io_uring read that never completes on its own: a pipe nobody
        //    writes. Its buffer and descriptor belong to the callback.
        let mut pipe = [0i32; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (read_fd, write_fd) = (pipe[0], pipe[1]);
        let (io_tx, io_rx) = mpsc::channel();
        rt.call(1, move |ctx| {
            let mut buf = Box::new([0u8; 64]);
            let entry = opcode::Read::new(types::Fd(read_fd), buf.as_mut_ptr(), 64).build();
            // SAFETY: the buffer is owned by the callback, which the shard
            // keeps until the read completes.
            unsafe {
                ctx.submit_op(entry, move |ctx, c| {
                    drop(buf);
                    io_tx.send((c.result, ctx.is_stopping())).unwrap();
                })
            }
            .unwrap();
        })
        .unwrap();

        // 3. A long timer whose callback owns a sender: dropped unrun, the
        //    receiver sees the disconnect.
        let (timer_tx, timer_rx) = mpsc::channel::<()>();
        rt.call(0, move |ctx| ctx.set_timer(Duration::from_secs(3600), move |_| drop(timer_tx)).map(|_| ()))
            .unwrap()
            .unwrap();

        // 4. Foreign threads hammering both shards until shutdown.
        let stop_hammer = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let hammers: Vec<_> = (0..4)
            .map(|t| {
                let (rt, stop, answered) = (rt.clone(), stop_hammer.clone(), answered.clone());
                thread::spawn(move || {
                    let (mut ok, mut canceled) = (0u64, 0u64);
                    for i in 0u64.. {
                        match rt.call(((t + i) % 2) as usize, move |_| i) {
                            Ok(v) => {
                                assert_eq!(v, i);
                                ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(CallError::Canceled) => canceled += 1,
                            Err(CallError::Submit(SubmitError::ShutDown)) => break,
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                        assert!(!stop.load(Ordering::Relaxed) || i < 10_000_000);
                    }
                    (ok, canceled)
                })
            })
            .collect();
        eventually("every hammer answered", || answered.load(Ordering::Relaxed) > 400);

        // 5. Shard 0 stuck in a job, with calls queued behind it.
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        rt.submit(0, move |_| {
            while !r.load(Ordering::Acquire) {
                thread::sleep(Duration::from_micros(100));
            }
        })
        .unwrap();
        // Behind it (or behind the stop, if the shard has not taken the
        // stuck job yet): these are canceled either way.
        let queued: Vec<_> = (0..100).map(|i| rt.call_async(0, move |_| i).unwrap()).collect();

        // Shut down from another thread while shard 0 is stuck; release it
        // once the stop is visible.
        let rt2 = rt.clone();
        let stopper = thread::spawn(move || rt2.shutdown());
        eventually("stop requested", || rt.is_shut_down());
        release.store(true, Ordering::Release);
        let reports = stopper.join().unwrap();
        stop_hammer.store(true, Ordering::Relaxed);

        assert_eq!(reports.len(), 2);
        for r in &reports {
            assert_eq!(r.thread_panic, None);
            assert_eq!(r.leaked_ops, 0, "{r:?}");
        }
        assert!(reports[0].stats.jobs_canceled >= 100, "{:?}", reports[0].stats);
        for p in queued {
            assert_eq!(p.wait(), Err(CallError::Canceled));
        }
        let (result, stopping) = io_rx.recv_timeout(Duration::from_secs(5)).expect("the read's callback ran");
        assert_eq!(result, -libc::ECANCELED);
        assert!(stopping, "the callback saw the shard stopping");
        assert_eq!(timer_rx.recv_timeout(Duration::from_secs(5)), Err(RecvTimeoutError::Disconnected));
        for h in hammers {
            let (ok, canceled) = h.join().unwrap();
            assert!(ok + canceled > 0);
        }

        // After shutdown: clear errors, at once.
        assert_eq!(rt.submit(0, |_| ()), Err(SubmitError::ShutDown));
        assert_eq!(rt.call(1, |_| ()), Err(CallError::Submit(SubmitError::ShutDown)));
        assert!(rt.shutdown().is_empty(), "a second shutdown has nothing to join");
        // SAFETY: closing our own pipe ends; the read end's op is finished.
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
    }
    assert_eq!(opened_since(&fds_before), Vec::<String>::new(), "descriptors leaked");
    eventually("threads exit", || threads() == threads_before);
}

#[test]
fn dropping_a_runtime_joins_every_shard() {
    let _serial = serial();
    let (fds_before, threads_before) = (fd_targets(), threads());
    for round in 0..20 {
        let rt = Runtime::start(config(3)).unwrap();
        for s in 0..3 {
            assert_eq!(rt.call(s, move |ctx| ctx.id() + round).unwrap(), s + round);
        }
        drop(rt);
    }
    assert_eq!(opened_since(&fds_before), Vec::<String>::new(), "descriptors leaked");
    eventually("threads exit", || threads() == threads_before);
}

#[test]
fn a_failed_start_leaks_nothing() {
    let _serial = serial();
    let (fds_before, threads_before) = (fd_targets(), threads());
    let mut c = RuntimeConfig::pinned(&[0, 4000]);
    c.spin = config(1).spin;
    let err = Runtime::start(c).err().expect("CPU 4000 cannot be pinned");
    assert!(err.to_string().contains("shard 1"), "{err}");
    assert_eq!(opened_since(&fds_before), Vec::<String>::new(), "descriptors leaked");
    eventually("threads exit", || threads() == threads_before);
}

#[test]
fn shutdown_requested_from_a_shard_does_not_deadlock() {
    let _serial = serial();
    let (fds_before, threads_before) = (fd_targets(), threads());
    let rt = Arc::new(Runtime::start(config(2)).unwrap());
    let inner = rt.clone();
    let reports = rt.call(0, move |_| inner.shutdown().len()).unwrap();
    assert_eq!(reports, 0, "a shard cannot join itself");
    eventually("stop seen", || rt.is_shut_down());
    assert_eq!(rt.shutdown().len(), 2, "joined from outside");
    drop(rt);
    // Shard 0 asked for the stop itself: its thread (and its ring) may
    // still be on the way out.
    poll::poll_until("the descriptors close", poll::WAIT, || {
        let opened = opened_since(&fds_before);
        if opened.is_empty() {
            Ok(())
        } else {
            Err(format!("before {fds_before:#?}, opened since {opened:#?}; shard threads {}", threads()))
        }
    });
    eventually("threads exit", || threads() == threads_before);
}
