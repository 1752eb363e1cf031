//! How long an idle shard spins before it parks.
//!
//! Spinning buys latency: a spinning shard sees new work within a loop
//! iteration, a parked one only after an eventfd write and a kernel wake-up.
//! But on an oversubscribed machine (an initiator and a target on the same
//! two cores) a spinning shard steals the very time its peer needs. The
//! adaptive policy watches the shard thread's involuntary context switches
//! (`getrusage(RUSAGE_THREAD).ru_nivcsw`): if the scheduler had to preempt
//! the shard since the last check, the core is shared and the budget halves;
//! if not, it doubles back towards the configured maximum.

use std::time::{Duration, Instant};

/// Spin configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinPolicy {
    /// The longest an idle shard spins before parking. Zero parks at once.
    pub budget: Duration,
    /// Shrink the budget while the core is contended.
    pub adaptive: bool,
}

impl Default for SpinPolicy {
    fn default() -> Self {
        Self { budget: Duration::from_micros(20), adaptive: true }
    }
}

/// How often the adaptive policy samples the context-switch counter.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// The adaptive floor is the budget divided by this.
const SHRINK_FLOOR_DIVISOR: u32 = 32;

pub(crate) struct SpinState {
    policy: SpinPolicy,
    current: Duration,
    last_sample: Instant,
    last_nivcsw: i64,
}

impl SpinState {
    pub(crate) fn new(policy: SpinPolicy, now: Instant) -> Self {
        Self { policy, current: policy.budget, last_sample: now, last_nivcsw: involuntary_switches() }
    }

    /// The budget now in force.
    pub(crate) fn budget(&self) -> Duration {
        self.current
    }

    /// Called once per loop iteration with the loop's clock.
    #[inline]
    pub(crate) fn tick(&mut self, now: Instant) {
        if !self.policy.adaptive || now.duration_since(self.last_sample) < SAMPLE_INTERVAL {
            return;
        }
        self.last_sample = now;
        let nivcsw = involuntary_switches();
        let preempted = nivcsw > self.last_nivcsw;
        self.last_nivcsw = nivcsw;
        let floor = self.policy.budget / SHRINK_FLOOR_DIVISOR;
        self.current = if preempted {
            (self.current / 2).max(floor)
        } else {
            (self.current * 2).min(self.policy.budget).max(floor)
        };
    }
}

fn involuntary_switches() -> i64 {
    // SAFETY: rusage is plain data, and getrusage fills it for this thread.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) != 0 {
            return 0;
        }
        usage.ru_nivcsw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_policy_never_changes() {
        let now = Instant::now();
        let mut s = SpinState::new(SpinPolicy { budget: Duration::from_micros(100), adaptive: false }, now);
        s.tick(now + Duration::from_secs(1));
        assert_eq!(s.budget(), Duration::from_micros(100));
    }

    #[test]
    fn adaptive_budget_stays_between_floor_and_max() {
        let start = Instant::now();
        let policy = SpinPolicy { budget: Duration::from_micros(320), adaptive: true };
        let mut s = SpinState::new(policy, start);
        for i in 1..200u32 {
            // Pretend to be preempted on every sample.
            s.last_nivcsw = -1;
            s.tick(start + SAMPLE_INTERVAL * i);
        }
        assert_eq!(s.budget(), Duration::from_micros(10));
        for i in 200..400u32 {
            s.last_nivcsw = i64::MAX;
            s.tick(start + SAMPLE_INTERVAL * i);
        }
        assert_eq!(s.budget(), Duration::from_micros(320));
    }
}
