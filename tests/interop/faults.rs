//! What the fault tests share (tests/faults_proxy.rs, tests/netem.rs): a
//! bound on every wait, a batch watched until it settles (once), a round
//! trip checked byte for byte, transfers to a peer no fault touches, and
//! a child's output read line by line without hanging.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use shardwire::engine::{BatchState, TeResult, TransferEngine, TransferOpcode, TransferRequest};
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions, Termination};

use super::pattern;

/// How long past its own bound a call may take before a test calls it a
/// hang: the bound of every wait here, not an expectation.
pub const SLACK: Duration = Duration::from_secs(15);

/// Runs `f` on a thread of its own and waits for it at most `limit`: a
/// call that hangs fails the test instead of stopping it.
pub fn bounded<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: no answer within {limit:?} (a hang)"))
}

/// Transfers to a peer no fault touches, on a thread of their own until
/// stopped; each must succeed with its bytes intact.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: Option<JoinHandle<u64>>,
}

impl Bystander {
    /// Starts it (`e` writes to and reads from the engine `peer` makes, on
    /// the bystander's thread) and returns once its first round went
    /// through.
    pub fn start(e: Arc<TransferEngine>, peer: impl FnOnce() -> TransferEngine + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, done) = (stop.clone(), rounds.clone());
        let thread = thread::spawn(move || {
            let peer = peer();
            let (len, name) = (256u64 << 10, peer.segment_name().unwrap());
            let remote = peer.allocate_managed_buffer(len).unwrap();
            let (out, back) = (e.allocate_managed_buffer(len).unwrap(), e.allocate_managed_buffer(len).unwrap());
            let mut rounds = 0u64;
            while !s.load(Ordering::Acquire) {
                let data = pattern(len as usize, rounds);
                e.write_bytes_to_buffer(out, &data).unwrap();
                e.transfer_sync_write(&name, out, remote, len).expect("the bystander's write");
                e.transfer_sync_read(&name, back, remote, len).expect("the bystander's read");
                assert!(e.read_bytes_from_buffer(back, len).unwrap() == data, "the bystander's bytes, round {rounds}");
                rounds += 1;
                done.store(rounds, Ordering::Release);
            }
            peer.shutdown();
            rounds
        });
        let b = Self { stop, rounds, thread: Some(thread) };
        b.wait_rounds(1);
        b
    }

    /// Waits (bounded) until `n` rounds went through.
    fn wait_rounds(&self, n: u64) {
        super::poll_true(&format!("the bystander reaches {n} rounds"), SLACK, || {
            let finished = self.thread.as_ref().is_none_or(|t| t.is_finished());
            assert!(!finished, "the bystander stopped short of {n} rounds");
            self.rounds.load(Ordering::Acquire) >= n
        });
    }

    /// Lets one more round go through, then stops it; returns how many
    /// went through (panics if one failed).
    pub fn finish(mut self) -> u64 {
        let more = self.rounds.load(Ordering::Acquire) + 1;
        let last = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.wait_rounds(more)));
        self.stop.store(true, Ordering::Release);
        let rounds = self.thread.take().unwrap().join().expect("the bystander's transfers all succeeded");
        last.expect("the bystander's rounds go on");
        rounds
    }
}

/// Submits `n` requests of `len` bytes as one batch, waits for it to
/// settle (at most `timeout`, the initiator's transfer timeout, plus
/// [`SLACK`]), and returns its state; its settle hook must run once. The
/// error is the submission's (when it had to connect and could not).
#[allow(clippy::too_many_arguments)]
pub fn settle(
    e: &TransferEngine,
    name: &str,
    op: TransferOpcode,
    local: u64,
    remote: u64,
    n: u64,
    len: u64,
    timeout: Duration,
) -> TeResult<BatchState> {
    let requests: Vec<TransferRequest> = (0..n)
        .map(|i| TransferRequest { opcode: op, source: local + i * len, target_offset: remote + i * len, length: len })
        .collect();
    let hooks = Arc::new(AtomicU32::new(0));
    let h = hooks.clone();
    let hook = Box::new(move || {
        h.fetch_add(1, Ordering::AcqRel);
    });
    let id = e.batch_transfer_async_hooked(name, &requests, Some(hook))?;
    let state = super::poll_until("the batch settles within its timeout and some slack", timeout + SLACK, || {
        let s = *e.batch_states(&[id]).unwrap()[0].as_ref().unwrap();
        if s != BatchState::Pending { Ok(s) } else { Err(s) }
    });
    super::poll_true("the settled batch's hook runs", SLACK, || hooks.load(Ordering::Acquire) > 0);
    assert_eq!(e.transfer_check_status(id).unwrap(), state, "a settled batch keeps its state");
    assert_eq!(hooks.load(Ordering::Acquire), 1, "settled once");
    Ok(state)
}

/// Writes and reads back `len` bytes at `remote` (sync), checking them.
pub fn round_trip(e: &TransferEngine, name: &str, local: u64, remote: u64, len: u64, seed: u64) {
    let data = pattern(len as usize, seed);
    e.write_bytes_to_buffer(local, &data).unwrap();
    e.transfer_sync_write(name, local, remote, len).unwrap_or_else(|err| panic!("write of {len} after a heal: {err}"));
    e.write_bytes_to_buffer(local, &vec![0; len as usize]).unwrap();
    e.transfer_sync_read(name, local, remote, len).unwrap_or_else(|err| panic!("read of {len} after a heal: {err}"));
    assert!(e.read_bytes_from_buffer(local, len).unwrap() == data, "{len} bytes intact after a heal");
}

/// Lines of a child's output, each wait bounded.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub fn of(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// Waits (at most `limit`) for the next line.
    pub fn next(&self, limit: Duration) -> Option<String> {
        self.0.recv_timeout(limit).ok()
    }

    /// Waits until a line contains `needle`.
    pub fn find(&self, needle: &str) {
        let deadline = Instant::now() + SLACK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.0.recv_timeout(left).unwrap_or_else(|_| panic!("no line with {needle} within {SLACK:?}"));
            if line.contains(needle) {
                return;
            }
        }
    }
}

/// A stream to `url` (endpoint `trname`) that a fault must break: up to 40
/// objects of 64 KiB named `{prefix}{i}`, until one is refused. Checks that
/// it ends with an error within its bound and that every object handed to
/// it completes exactly once (a refused one too), waiting for that at most
/// [`SLACK`]. Returns how many were handed to it, how many of those
/// failed, and the stream's end. `opts` gives the timeouts; its `on_sent`
/// is replaced.
pub fn broken_stream(
    what: &str,
    url: &str,
    trname: &str,
    prefix: &str,
    opts: StreamOptions,
) -> (usize, usize, Termination) {
    let done: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let d = done.clone();
    let limit = opts.connect_timeout + opts.send_timeout * 4 + SLACK;
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| d.lock().unwrap().push((h.name.clone(), r.is_ok())))),
        ..opts
    };
    let (url, trname, prefix) = (url.to_string(), trname.to_string(), prefix.to_string());
    let (sent, end) = bounded(what, limit, move || {
        let s = Stream::new(&url, &trname, opts).unwrap();
        let mut sent = 0usize;
        for i in 0..40 {
            sent += 1;
            if s.send(ObjHdr::new("b", &format!("{prefix}{i}"), 65_536), vec![i as u8; 65_536]).is_err() {
                break;
            }
        }
        (sent, s.fin())
    });
    assert!(matches!(end, Termination::Error(_)), "{what}: the stream ends with an error, not {end:?}");
    super::poll_until(&format!("{what}: every object completes"), SLACK, || {
        let n = done.lock().unwrap().len();
        if n >= sent { Ok(()) } else { Err(format!("{n} of {sent}")) }
    });
    let done = done.lock().unwrap().clone();
    let mut names: Vec<&String> = done.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!((names.len(), done.len()), (sent, sent), "{what}: each object completes exactly once");
    (sent, done.iter().filter(|(_, ok)| !ok).count(), end)
}
