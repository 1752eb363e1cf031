//! A shard's inbox for threads that are not shards: each such thread hands
//! work in over an SPSC ring of its own, registered here on its first use.
//!
//! The protocol, between any number of registering threads and the shard:
//! - a thread registers under the lock: refused once the inbox is closed or
//!   holds `live_max` rings; otherwise its consumer end waits in `pending`
//!   and `has_new` is raised (still under the lock);
//! - the shard, between loop iterations, sees `has_new` without the lock and
//!   adopts what waits (clearing the flag under the lock, so a registration
//!   cannot slip between the take and the clear);
//! - the shard drops a ring once its thread has gone and everything it
//!   pushed was popped ([`Consumer::is_finished`]), and retires it here;
//! - at shutdown the shard closes the inbox and takes every ring not yet
//!   adopted, then closes and drains them all: each value pushed is run,
//!   dropped by that drain, or handed back to its producer
//!   ([`Producer::push`]), and no ring registers after the drain.
//!
//! The `loom` tests below check that no value is stranded.

use super::spsc::{self, Consumer, Producer};
use crate::sync::atomic::{AtomicBool, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// Why a thread could not register a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegisterError {
    /// The shard has stopped.
    Closed,
    /// `limit` rings are live already.
    Full { limit: usize },
}

struct Registry<T> {
    /// Registered, not yet adopted by the shard.
    pending: Vec<Consumer<T>>,
    /// Rings registered (pending or adopted) and not yet retired.
    live: usize,
    /// The shard has stopped: no more registrations.
    closed: bool,
}

pub(crate) struct ForeignInbox<T> {
    registry: Mutex<Registry<T>>,
    /// Set while `registry.pending` holds rings for the shard to adopt.
    has_new: AtomicBool,
}

impl<T> ForeignInbox<T> {
    pub(crate) fn new() -> Self {
        Self {
            registry: Mutex::new(Registry { pending: Vec::new(), live: 0, closed: false }),
            has_new: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry<T>> {
        // The registry holds no invariant a panic could break halfway.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread's new ring of `capacity` slots into this shard.
    pub(crate) fn register(&self, capacity: usize, live_max: usize) -> Result<Producer<T>, RegisterError> {
        let mut registry = self.lock();
        if registry.closed {
            return Err(RegisterError::Closed);
        }
        if registry.live >= live_max {
            return Err(RegisterError::Full { limit: live_max });
        }
        let (producer, consumer) = spsc::channel(capacity);
        registry.pending.push(consumer);
        registry.live += 1;
        self.has_new.store(true, Ordering::Release);
        Ok(producer)
    }

    /// Shard side: whether rings wait to be adopted (no lock taken).
    #[inline]
    pub(crate) fn has_new(&self) -> bool {
        self.has_new.load(Ordering::Acquire)
    }

    /// Shard side: moves the rings registered since the last call into
    /// `rings`.
    #[inline]
    pub(crate) fn adopt(&self, rings: &mut Vec<Consumer<T>>) {
        if !self.has_new() {
            return;
        }
        let mut registry = self.lock();
        rings.append(&mut registry.pending);
        self.has_new.store(false, Ordering::Release);
    }

    /// Shard side: a finished ring was dropped.
    pub(crate) fn retire(&self) {
        let mut registry = self.lock();
        debug_assert!(registry.live > 0, "a ring retired twice");
        registry.live = registry.live.saturating_sub(1);
    }

    /// Shard side, at shutdown: refuses registrations from now on, and moves
    /// every ring not yet adopted into `rings` for the final drain.
    pub(crate) fn close(&self, rings: &mut Vec<Consumer<T>>) {
        let mut registry = self.lock();
        registry.closed = true;
        rings.append(&mut registry.pending);
        registry.live = 0;
        self.has_new.store(false, Ordering::Release);
    }
}

/// Model checks (`RUSTFLAGS="--cfg loom" cargo test --profile loom --lib
/// loom`): a thread registering and pushing while the shard polls and shuts
/// down. Every value is accounted for exactly once before any producer is
/// dropped: run by the shard, dropped by its final drain, or handed back.
/// How it fails when broken: `close` not taking the pending rings, or
/// `register` not checking `closed` under the lock, leaves a value in a
/// ring nobody will read (the count stays 0).
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::runtime::spsc::{Counted, PushError};
    use crate::sync::Arc;
    use crate::sync::atomic::AtomicUsize;
    use loom::thread;

    /// The shard: `polls` rounds of adopt, pop, retire; then shutdown.
    fn shard(inbox: &ForeignInbox<Counted>, polls: usize) {
        let mut rings = Vec::new();
        for _ in 0..polls {
            inbox.adopt(&mut rings);
            let mut i = 0;
            while i < rings.len() {
                if let Some(task) = rings[i].pop() {
                    drop(task); // "runs" it
                    continue;
                }
                if rings[i].is_finished() {
                    drop(rings.swap_remove(i));
                    inbox.retire();
                    continue;
                }
                i += 1;
            }
            thread::yield_now();
        }
        inbox.close(&mut rings);
        for ring in rings {
            ring.close_and_drain();
        }
    }

    fn check(polls: usize) {
        crate::sync::model(move || {
            let inbox = Arc::new(ForeignInbox::<Counted>::new());
            let done = Arc::new(AtomicUsize::new(0));
            let foreign = {
                let (inbox, done) = (inbox.clone(), done.clone());
                thread::spawn(move || {
                    let value = Counted(done);
                    match inbox.register(2, 4) {
                        Ok(mut producer) => match producer.push(value) {
                            Ok(()) => Some(producer),
                            Err(PushError::Closed(v)) => {
                                drop(v);
                                Some(producer)
                            }
                            Err(PushError::Full(_)) => panic!("a new ring of two is not full"),
                        },
                        Err(RegisterError::Closed) => None, // the value drops here
                        Err(e) => panic!("{e:?}: one thread cannot reach the limit"),
                    }
                })
            };
            shard(&inbox, polls);
            let producer = foreign.join().unwrap();
            assert_eq!(done.load(Ordering::Relaxed), 1, "a value was stranded (or dropped twice)");
            assert_eq!(inbox.register(2, 4).err(), Some(RegisterError::Closed), "closed for good");
            drop(producer);
        });
    }

    #[test]
    fn loom_a_value_races_shutdown() {
        check(0);
    }

    #[test]
    fn loom_a_value_races_adoption_then_shutdown() {
        check(1);
    }
}
