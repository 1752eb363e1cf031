//! Per-shard timers: a min-heap of deadlines with lazy cancellation.
//!
//! The shard checks the earliest deadline on every loop iteration and sleeps
//! no longer than it when parked, so timer resolution is the loop's (about a
//! microsecond when spinning) or the kernel's timed wait when parked.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use super::ShardCtx;
use super::error::TimerError;

/// What a timer runs when it fires.
pub type TimerCallback = Box<dyn FnOnce(&mut ShardCtx)>;

/// Identifies a timer for cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    live: HashMap<u64, TimerCallback>,
    next_id: u64,
    max: usize,
}

impl Timers {
    pub(crate) fn new(max: usize) -> Self {
        Self { heap: BinaryHeap::new(), live: HashMap::new(), next_id: 0, max }
    }

    pub(crate) fn insert(&mut self, deadline: Instant, callback: TimerCallback) -> Result<TimerId, TimerError> {
        if self.live.len() >= self.max {
            return Err(TimerError::TooMany(self.max));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.heap.push(Reverse((deadline, id)));
        self.live.insert(id, callback);
        Ok(TimerId(id))
    }

    /// Cancels a timer; false if it already fired or was cancelled.
    pub(crate) fn cancel(&mut self, id: TimerId) -> bool {
        let removed = self.live.remove(&id.0).is_some();
        // Cancelled entries stay in the heap until they surface; rebuild when
        // they dominate so the heap stays bounded by live timers.
        if removed && self.heap.len() > 64 && self.heap.len() > 2 * self.live.len() {
            let live = &self.live;
            self.heap.retain(|Reverse((_, id))| live.contains_key(id));
        }
        removed
    }

    /// The earliest live deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((deadline, id))) = self.heap.peek() {
            if self.live.contains_key(id) {
                return Some(*deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Removes and returns one timer due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<TimerCallback> {
        while let Some(Reverse((deadline, id))) = self.heap.peek().copied() {
            if deadline > now {
                return None;
            }
            self.heap.pop();
            if let Some(callback) = self.live.remove(&id) {
                return Some(callback);
            }
        }
        None
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Drops every pending callback (shutdown); returns how many.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.live.len();
        self.heap.clear();
        self.live.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn noop() -> TimerCallback {
        Box::new(|_| {})
    }

    #[test]
    fn fires_in_deadline_order_and_honours_cancel() {
        let mut t = Timers::new(16);
        let now = Instant::now();
        let late = t.insert(now + Duration::from_millis(30), noop()).unwrap();
        let _early = t.insert(now + Duration::from_millis(10), noop()).unwrap();
        let mid = t.insert(now + Duration::from_millis(20), noop()).unwrap();
        assert!(t.cancel(mid));
        assert!(!t.cancel(mid));
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(10)));
        assert!(t.pop_due(now).is_none());
        assert!(t.pop_due(now + Duration::from_millis(25)).is_some());
        assert!(t.pop_due(now + Duration::from_millis(25)).is_none(), "the cancelled one never fires");
        assert_eq!(t.next_deadline(), Some(now + Duration::from_millis(30)));
        assert!(t.cancel(late));
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn limit_is_enforced() {
        let mut t = Timers::new(2);
        let now = Instant::now();
        t.insert(now, noop()).unwrap();
        t.insert(now, noop()).unwrap();
        assert_eq!(t.insert(now, noop()).unwrap_err(), TimerError::TooMany(2));
    }

    #[test]
    fn heap_stays_bounded_under_churn() {
        let mut t = Timers::new(1000);
        let now = Instant::now();
        for _ in 0..10_000 {
            let id = t.insert(now + Duration::from_secs(60), noop()).unwrap();
            t.cancel(id);
        }
        assert!(t.heap.len() <= 130, "heap grew to {}", t.heap.len());
    }
}
