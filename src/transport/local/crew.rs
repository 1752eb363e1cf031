//! The copy crew: helper threads that share the pieces of one large local
//! copy with the thread that asked for it.
//!
//! One thread copies a 16 MiB block at the speed of one core; the same
//! block cut into pieces that several threads claim in turn moves up to
//! that many times faster, until memory bandwidth is the limit. The
//! calling thread always works too: it claims pieces like any helper, so a
//! busy (or absent: a forked child has none) crew only means it copies
//! alone. It returns when every piece has been copied, never before: its
//! lane in the target's table covers the helpers' pieces, and the lane is
//! given back only after the last byte has landed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Miss;

/// Jobs waiting for a helper at once; past this, callers copy alone.
const QUEUE_MAX: usize = 256;
/// The most pieces one job has (a copy's piece grows past that).
pub(super) const PIECES_MAX: u64 = 1024;
/// How long a caller waits on a helper's piece before saying so in the
/// log (and waiting on: the piece is one bounded memcpy or syscall, and
/// the caller may not leave while it runs).
const SLOW_PIECE: Duration = Duration::from_secs(5);

/// How a copy is cut for the crew.
#[derive(Debug, Clone, Copy)]
pub(super) struct Split {
    /// The smallest piece: a copy shorter than two is not shared.
    pub min_bytes: u64,
    /// Pieces meet where the address is a multiple of this (a power of two).
    pub align: u64,
}

/// How long a helper looks for more work before it parks: waking a parked
/// thread costs tens of µs here (a VM), as much as copying a MiB, and
/// large copies tend to come in runs.
const SPIN: Duration = Duration::from_micros(50);

/// Carries out piece `i` of a job.
type Piece = dyn Fn(u32) -> Result<(), Miss> + Send + Sync;

/// One job in pieces.
struct Job {
    piece: Box<Piece>,
    pieces: u32,
    /// The next piece to claim.
    next: AtomicU32,
    /// A piece failed: the ones not started are skipped.
    failed: AtomicBool,
    /// Pieces done (copied, failed or skipped), and the first miss.
    state: Mutex<(u32, Option<Miss>)>,
    all_done: Condvar,
}

impl Job {
    /// Claims and copies pieces until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.pieces {
                return;
            }
            let result = if self.failed.load(Ordering::Relaxed) { Ok(()) } else { (self.piece)(i) };
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(miss) = result {
                self.failed.store(true, Ordering::Relaxed);
                // A failure outranks a fallback: TCP would not fix it.
                if !matches!(state.1, Some(Miss::Fail(..))) {
                    state.1 = Some(miss);
                }
            }
            state.0 += 1;
            assert!(state.0 <= self.pieces, "more pieces done than the copy has");
            if state.0 == self.pieces {
                self.all_done.notify_all();
            }
        }
    }
}

/// What the helpers share with callers.
struct Shared {
    queue: Mutex<VecDeque<Weak<Job>>>,
    /// The queue's length, for helpers spinning without the lock.
    queued: AtomicUsize,
    wake: Condvar,
    stop: AtomicBool,
}

/// The helper threads of one local transport.
pub(super) struct Crew {
    shared: Arc<Shared>,
    /// Threads besides the caller.
    helpers: usize,
    /// Started on the first large copy.
    threads: Mutex<Option<Vec<JoinHandle<()>>>>,
    /// The process that made it: a forked child has no helpers.
    owner_pid: u32,
}

impl Crew {
    /// A crew where `threads` (the caller among them) share each large
    /// copy; one thread means no helpers.
    pub(super) fn new(threads: usize) -> Crew {
        assert!(threads >= 1, "a copy needs the caller's thread at least");
        Crew {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                queued: AtomicUsize::new(0),
                wake: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            helpers: threads - 1,
            threads: Mutex::new(None),
            owner_pid: std::process::id(),
        }
    }

    /// Copies `len` bytes with `piece`, in pieces shared with the helpers
    /// when it is at least two minimum pieces long; returns once every
    /// piece has ended. Pieces meet where `base + at` is a multiple of
    /// `split.align`.
    pub(super) fn copy<F>(&self, len: u64, base: u64, split: Split, piece: F) -> Result<(), Miss>
    where
        F: Fn(u64, u64) -> Result<(), Miss> + Send + Sync + 'static,
    {
        let Split { min_bytes, align } = split;
        assert!(
            align.is_power_of_two() && min_bytes >= 4096,
            "{split:?}: pieces under a page cost more than they share"
        );
        if len < 2 * min_bytes || !self.shares(2) {
            return piece(0, len);
        }
        let step = min_bytes.max(len.div_ceil(PIECES_MAX - 1)).next_multiple_of(align);
        // The first piece runs up to the first multiple of `step`.
        let head = (step - base % step) % step;
        let pieces = u64::from(head > 0) + (len - head.min(len)).div_ceil(step);
        debug_assert!(pieces <= PIECES_MAX, "{pieces} pieces of {step} bytes for {len}");
        if pieces < 2 {
            return piece(0, len);
        }
        self.run(pieces as u32, move |i| {
            let i = u64::from(i);
            let at = match (head, i) {
                (0, i) => i * step,
                (_, 0) => 0,
                (h, i) => h + (i - 1) * step,
            };
            let end = if head > 0 && i == 0 { head } else { (at + step).min(len) };
            debug_assert!(at < end && end <= len, "piece {i} is [{at}, {end}) of {len}");
            piece(at, end - at)
        })
    }

    /// Whether a job of `pieces` is shared (else the caller does it alone).
    fn shares(&self, pieces: u64) -> bool {
        self.helpers > 0 && pieces >= 2 && std::process::id() == self.owner_pid && self.started()
    }

    /// Carries out pieces `0..pieces` with `piece`, shared with the
    /// helpers when there are two or more; returns once every piece has
    /// ended. The first miss is returned, and pieces not started by then
    /// are skipped.
    pub(super) fn run<F>(&self, pieces: u32, piece: F) -> Result<(), Miss>
    where
        F: Fn(u32) -> Result<(), Miss> + Send + Sync + 'static,
    {
        assert!(u64::from(pieces) <= PIECES_MAX, "{pieces} pieces: more than a job may have");
        if !self.shares(u64::from(pieces)) {
            return (0..pieces).try_for_each(piece);
        }
        let job = Arc::new(Job {
            piece: Box::new(piece),
            pieces,
            next: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            state: Mutex::new((0, None)),
            all_done: Condvar::new(),
        });
        // Never block on the queue: a caller that cannot post copies alone.
        let wanted = self.helpers.min(pieces as usize - 1);
        if let Ok(mut queue) = self.shared.queue.try_lock()
            && queue.len() + wanted <= QUEUE_MAX
        {
            for _ in 0..wanted {
                queue.push_back(Arc::downgrade(&job));
            }
            self.shared.queued.store(queue.len(), Ordering::Release);
            drop(queue);
            for _ in 0..wanted {
                self.shared.wake.notify_one();
            }
        }
        job.work();
        let mut state = job.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut waited = Duration::ZERO;
        while state.0 < job.pieces {
            let (s, timeout) = job.all_done.wait_timeout(state, SLOW_PIECE).unwrap_or_else(|e| e.into_inner());
            state = s;
            if timeout.timed_out() {
                waited += SLOW_PIECE;
                log::warn!("local transport: a copy has waited {waited:?} on a helper's piece");
            }
        }
        state.1.take().map_or(Ok(()), Err)
    }

    /// Starts the helpers once; false if none could start.
    fn started(&self) -> bool {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = threads.as_ref() {
            return !t.is_empty();
        }
        let mut started = Vec::with_capacity(self.helpers);
        for i in 0..self.helpers {
            let shared = self.shared.clone();
            match std::thread::Builder::new().name(format!("sw-copy-{i}")).spawn(move || help(&shared)) {
                Ok(h) => started.push(h),
                Err(e) => {
                    log::warn!("local transport: copy helper {i} cannot start ({e}); large copies use fewer threads");
                    break;
                }
            }
        }
        let any = !started.is_empty();
        *threads = Some(started);
        any
    }
}

/// A helper's life: take a job, share its pieces, wait for the next.
fn help(shared: &Shared) {
    loop {
        let looking = std::time::Instant::now();
        while shared.queued.load(Ordering::Acquire) == 0 && looking.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        let job = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(job) = queue.pop_front() {
                    shared.queued.store(queue.len(), Ordering::Release);
                    break job;
                }
                queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
        };
        // A job whose caller has returned is gone: nothing left to do.
        if let Some(job) = job.upgrade() {
            job.work();
        }
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            // Taken so that no helper misses the wake between its look at
            // `stop` and its wait.
            let _queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        let threads = self.threads.get_mut().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
        if std::process::id() != self.owner_pid {
            return; // a forked child: the helpers live in the parent only
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::request::TransferStatus;

    /// Pieces of a page or more, anywhere.
    const PAGES: Split = Split { min_bytes: 4096, align: 1 };

    fn pieces_of(crew: &Crew, len: u64, base: u64, align: u64) -> (Result<(), Miss>, Vec<(u64, u64)>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let r = crew.copy(len, base, Split { min_bytes: 4096, align }, move |at, n| {
            s.lock().unwrap().push((at, n));
            Ok(())
        });
        let mut v = seen.lock().unwrap().clone();
        v.sort();
        (r, v)
    }

    #[test]
    fn pieces_cover_the_copy_once_and_meet_at_aligned_addresses() {
        let crew = Crew::new(3);
        let lens = [1, 4096, 8191, 8192, 8193, 1 << 20, (1 << 20) + 1, 4096 * PIECES_MAX * 3 + 7];
        for (len, base, align) in lens.iter().flat_map(|&l| {
            [(0, 1), (0x7f00_0000_0000, 4096), (0x7f00_0000_1234, 4096), (0x7f00_0010_0800, 2 << 20)]
                .map(|(b, a)| (l, b, a))
        }) {
            let (r, v) = pieces_of(&crew, len, base, align);
            assert!(r.is_ok());
            let mut end = 0;
            for (at, n) in &v {
                assert_eq!(*at, end, "len {len}: a gap or an overlap at {at}");
                assert!(*n > 0);
                end = at + n;
            }
            assert_eq!(end, len, "len {len}: pieces end short");
            assert!(v.len() as u64 <= PIECES_MAX);
            // One piece: too short to share, or inside one aligned window.
            let one_window = base / align == (base + len - 1) / align;
            assert!((v.len() == 1) == (len < 8192 || one_window), "len {len}, base {base:#x}: {} pieces", v.len());
            // Pieces meet at multiples of the alignment, and all but the
            // first and the last are at least the minimum.
            for (i, &(at, n)) in v.iter().enumerate() {
                assert!(i == 0 || (base + at) % align == 0, "len {len}: piece {i} at {:#x}", base + at);
                assert!(i == 0 || i == v.len() - 1 || n >= 4096, "len {len}: piece {i} of {n} bytes");
            }
        }
    }

    #[test]
    fn one_thread_copies_in_one_piece() {
        let crew = Crew::new(1);
        let (r, v) = pieces_of(&crew, 1 << 20, 0, 1);
        assert!(r.is_ok());
        assert_eq!(v, vec![(0, 1 << 20)]);
    }

    #[test]
    fn helpers_take_pieces_and_the_caller_waits_for_them() {
        let crew = Crew::new(2);
        let caller = std::thread::current().id();
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let done = Arc::new(AtomicU32::new(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Pieces that sleep give the helper time to wake and take some.
        while threads.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "no helper ever took a piece");
            let (t, d) = (threads.clone(), done.clone());
            done.store(0, Ordering::Relaxed);
            let r = crew.copy(64 * 4096, 0, PAGES, move |_, _| {
                std::thread::sleep(Duration::from_millis(1));
                t.lock().unwrap().insert(std::thread::current().id());
                d.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
            assert!(r.is_ok());
            // Every piece had ended when `copy` returned.
            assert_eq!(done.load(Ordering::Relaxed), 64);
        }
        assert!(threads.lock().unwrap().contains(&caller));
    }

    #[test]
    fn a_miss_is_reported_and_stops_the_pieces_not_started() {
        let crew = Crew::new(2);
        let r = crew.copy(64 * 4096, 0, PAGES, |_, _| Err(Miss::Fallback));
        assert!(matches!(r, Err(Miss::Fallback)));
        let r = crew.copy(64 * 4096, 0, PAGES, |_, _| Err(Miss::Fail(TransferStatus::Failed, "all".into())));
        assert!(matches!(r, Err(Miss::Fail(_, ref w)) if w == "all"));
        // The first piece fails at once; the others take a millisecond
        // each, so the skip shows long before they could all have run.
        let ran = Arc::new(AtomicU32::new(0));
        let r2 = ran.clone();
        let r = crew.copy(1000 * 4096, 0, PAGES, move |at, _| {
            if at == 0 {
                return Err(Miss::Fail(TransferStatus::Failed, "first".into()));
            }
            r2.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
            Ok(())
        });
        assert!(matches!(r, Err(Miss::Fail(_, ref w)) if w == "first"));
        assert!(ran.load(Ordering::Relaxed) < 999, "every piece ran after a failure");
    }

    #[test]
    fn dropping_the_crew_ends_its_helpers() {
        let crew = Crew::new(3);
        assert!(pieces_of(&crew, 1 << 20, 0, 1).0.is_ok());
        let shared = Arc::downgrade(&crew.shared);
        drop(crew);
        assert!(shared.upgrade().is_none(), "a helper outlived its crew");
    }
}
