//! Work handed to a shard, and the one-shot reply that carries a result back.
//!
//! A [`Task`] is a boxed closure run once on a shard with that shard's
//! [`ShardCtx`]. A task that never runs (the shard shut down first) is
//! dropped; whoever waits on it learns that through its reply slot, whose
//! sender reports [`CallError::Canceled`] when dropped unsent. So "pending
//! work fails with a clear error" needs no bookkeeping beyond ownership.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::ShardCtx;
use super::error::CallError;

/// A unit of work for a shard.
pub type Task = Box<dyn FnOnce(&mut ShardCtx) + Send + 'static>;

/// How long a waiter spins before it parks its thread. Long enough to catch a
/// spinning shard's reply (a few microseconds), short enough not to burn a
/// core when the shard is slow.
pub const WAIT_SPIN: Duration = Duration::from_micros(50);

const EMPTY: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;

struct Slot<T> {
    state: AtomicU8,
    /// Written once by the sender before `state` becomes DONE.
    value: UnsafeCell<Option<Result<T, CallError>>>,
    /// Written by the receiver only while `state` is EMPTY, read by the
    /// sender only after it saw WAITING.
    waiter: UnsafeCell<Option<Thread>>,
}

// SAFETY: `value` and `waiter` are each handed from one thread to the other
// through `state` (Release on the writer's transition, Acquire on the
// reader's), so no access to either is ever concurrent.
unsafe impl<T: Send> Sync for Slot<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Slot<T> {}

/// The sending half: completes the reply once.
pub struct ReplySender<T> {
    slot: Option<Arc<Slot<T>>>,
}

/// The receiving half: a result that will arrive.
pub struct Pending<T> {
    slot: Arc<Slot<T>>,
    taken: bool,
}

/// A connected sender and receiver.
pub fn reply_pair<T>() -> (ReplySender<T>, Pending<T>) {
    let slot =
        Arc::new(Slot { state: AtomicU8::new(EMPTY), value: UnsafeCell::new(None), waiter: UnsafeCell::new(None) });
    (ReplySender { slot: Some(slot.clone()) }, Pending { slot, taken: false })
}

impl<T> ReplySender<T> {
    /// Completes the reply.
    pub fn send(mut self, value: Result<T, CallError>) {
        if let Some(slot) = self.slot.take() {
            complete(&slot, value);
        }
    }
}

fn complete<T>(slot: &Slot<T>, value: Result<T, CallError>) {
    // SAFETY: only the sender writes `value`, once, before publishing DONE.
    unsafe { *slot.value.get() = Some(value) };
    if slot.state.swap(DONE, Ordering::AcqRel) == WAITING {
        // SAFETY: the receiver stored its Thread before its Release CAS to
        // WAITING, which our AcqRel swap observed; it never writes it again.
        if let Some(waiter) = unsafe { (*slot.waiter.get()).as_ref() } {
            waiter.unpark();
        }
    }
}

impl<T> Drop for ReplySender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let error =
                if thread::panicking() { CallError::Panicked("the job panicked".into()) } else { CallError::Canceled };
            complete(&slot, Err(error));
        }
    }
}

impl<T> Pending<T> {
    /// Whether the result has arrived.
    pub fn is_ready(&self) -> bool {
        self.slot.state.load(Ordering::Acquire) == DONE
    }

    /// Takes the result if it has arrived.
    pub fn try_take(&mut self) -> Option<Result<T, CallError>> {
        if self.taken || !self.is_ready() {
            return None;
        }
        self.taken = true;
        // SAFETY: DONE was published with Release after the value was
        // written; our Acquire load saw it, and the sender is finished.
        unsafe { (*self.slot.value.get()).take() }
    }

    /// Waits for the result: spins for [`WAIT_SPIN`], then parks.
    pub fn wait(self) -> Result<T, CallError> {
        self.wait_with_spin(WAIT_SPIN)
    }

    /// Waits for the result, spinning for `spin` before parking.
    pub fn wait_with_spin(mut self, spin: Duration) -> Result<T, CallError> {
        match self.wait_until(spin, None) {
            Some(result) => result,
            None => unreachable!("a wait without deadline returns only with a result"),
        }
    }

    /// Waits at most `timeout`; `None` if the result has not arrived by then,
    /// in which case waiting can resume later.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<T, CallError>> {
        self.wait_until(WAIT_SPIN.min(timeout), Some(Instant::now() + timeout))
    }

    fn wait_until(&mut self, spin: Duration, deadline: Option<Instant>) -> Option<Result<T, CallError>> {
        if self.taken {
            return Some(Err(CallError::Canceled));
        }
        let start = Instant::now();
        let mut polls = 0u32;
        while !self.is_ready() {
            polls = polls.wrapping_add(1);
            std::hint::spin_loop();
            if polls % 64 == 0 && start.elapsed() >= spin {
                break;
            }
        }
        if self.is_ready() {
            return self.try_take();
        }
        // SAFETY: state is EMPTY (DONE was not seen, and only we set
        // WAITING), so the sender does not read `waiter` yet.
        unsafe { *self.slot.waiter.get() = Some(thread::current()) };
        if self.slot.state.compare_exchange(EMPTY, WAITING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return self.try_take();
        }
        loop {
            match deadline {
                None => thread::park(),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        // Withdraw: if the sender got there first, take it.
                        return match self.slot.state.compare_exchange(
                            WAITING,
                            EMPTY,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => None,
                            Err(_) => self.try_take(),
                        };
                    }
                    thread::park_timeout(deadline - now);
                }
            }
            if self.is_ready() {
                return self.try_take();
            }
        }
    }
}

/// Wraps a closure with a result into a [`Task`] that sends the result, or
/// the panic message, to `reply`. The panic is then resumed so the shard
/// counts and reports it.
pub fn task_with_reply<R, F>(f: F, reply: ReplySender<R>) -> Task
where
    F: FnOnce(&mut ShardCtx) -> R + Send + 'static,
    R: Send + 'static,
{
    Box::new(move |ctx: &mut ShardCtx| match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
        Ok(value) => reply.send(Ok(value)),
        Err(payload) => {
            reply.send(Err(CallError::Panicked(panic_message(payload.as_ref()))));
            resume_unwind(payload);
        }
    })
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_crosses_threads() {
        let (tx, rx) = reply_pair::<u64>();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(5));
            tx.send(Ok(42));
        });
        assert_eq!(rx.wait().unwrap(), 42);
        t.join().unwrap();
    }

    #[test]
    fn dropped_sender_cancels() {
        let (tx, rx) = reply_pair::<u64>();
        drop(tx);
        assert_eq!(rx.wait(), Err(CallError::Canceled));
    }

    #[test]
    fn timeout_then_resume() {
        let (tx, mut rx) = reply_pair::<u64>();
        assert!(rx.wait_timeout(Duration::from_millis(2)).is_none());
        tx.send(Ok(7));
        assert_eq!(rx.wait_timeout(Duration::from_secs(5)), Some(Ok(7)));
        assert!(rx.try_take().is_none(), "a result is taken once");
    }

    #[test]
    fn many_round_trips_between_threads() {
        for i in 0..2000u64 {
            let (tx, rx) = reply_pair::<u64>();
            let t = thread::spawn(move || tx.send(Ok(i)));
            assert_eq!(rx.wait_with_spin(Duration::ZERO).unwrap(), i);
            t.join().unwrap();
        }
    }
}
