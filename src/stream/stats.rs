//! Stream statistics, as the seed describes them.
//!
//! Send side, per stream: objects and bytes sent, the stream offset, and the
//! idle and total time since the previous read of the stats. Receive side,
//! per endpoint (trname), per session: objects, bytes, offset.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// One stream's figures (`transport.Stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Stats {
    /// Objects transferred (data objects; control objects are left out).
    pub num: i64,
    /// Object bytes transferred.
    pub size: i64,
    /// The stream offset: every byte of the body, headers included.
    pub offset: i64,
    /// Nanoseconds the stream was idle since the previous read.
    pub idle_dur: i64,
    /// Nanoseconds since the previous read.
    pub totl_dur: i64,
    /// `idle_dur` as a percentage of `totl_dur`.
    pub idle_pct: f64,
}

/// The send side's running counters, kept by the shard.
#[derive(Debug)]
pub struct TxCounters {
    pub num: i64,
    pub size: i64,
    pub offset: i64,
    /// When the stream last went idle (nothing queued or in flight).
    idle_since: Option<Instant>,
    /// Idle time accumulated since the previous read.
    idle: Duration,
    /// The previous read.
    since: Instant,
}

impl TxCounters {
    pub fn new(now: Instant) -> Self {
        TxCounters { num: 0, size: 0, offset: 0, idle_since: Some(now), idle: Duration::ZERO, since: now }
    }

    pub fn set_idle(&mut self, idle: bool, now: Instant) {
        match (idle, self.idle_since) {
            (true, None) => self.idle_since = Some(now),
            (false, Some(t)) => {
                self.idle += now.saturating_duration_since(t.max(self.since));
                self.idle_since = None;
            }
            _ => {}
        }
    }

    /// The figures, and a new measuring period for the durations.
    pub fn read(&mut self, now: Instant) -> Stats {
        let mut idle = self.idle;
        if let Some(t) = self.idle_since {
            idle += now.saturating_duration_since(t.max(self.since));
        }
        let total = now.saturating_duration_since(self.since);
        let idle = idle.min(total);
        self.idle = Duration::ZERO;
        self.since = now;
        let pct = if total.is_zero() { 0.0 } else { 100.0 * idle.as_secs_f64() / total.as_secs_f64() };
        Stats {
            num: self.num,
            size: self.size,
            offset: self.offset,
            idle_dur: idle.as_nanos() as i64,
            totl_dur: total.as_nanos() as i64,
            idle_pct: pct,
        }
    }
}

/// One received session's counters, updated by its decoding thread.
#[derive(Debug, Default)]
pub struct RxCounters {
    pub num: AtomicI64,
    pub size: AtomicI64,
    pub offset: AtomicI64,
    /// Objects that failed their header's checksum (not in `num`).
    pub bad_checksums: AtomicI64,
}

/// A received session's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RxStats {
    pub caller: String,
    pub session: i64,
    #[serde(rename = "Num")]
    pub num: i64,
    #[serde(rename = "Size")]
    pub size: i64,
    #[serde(rename = "Offset")]
    pub offset: i64,
    /// Objects that failed their header's checksum (not counted in `num`).
    #[serde(rename = "BadChecksums")]
    pub bad_checksums: i64,
}

impl RxCounters {
    pub fn snapshot(&self, caller: &str, session: i64) -> RxStats {
        RxStats {
            caller: caller.to_string(),
            session,
            num: self.num.load(Ordering::Relaxed),
            size: self.size.load(Ordering::Relaxed),
            offset: self.offset.load(Ordering::Relaxed),
            bad_checksums: self.bad_checksums.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_is_measured_per_period() {
        let t0 = Instant::now();
        let mut c = TxCounters::new(t0);
        c.set_idle(false, t0 + Duration::from_millis(30)); // idle 30 ms
        c.set_idle(true, t0 + Duration::from_millis(80)); // busy 50 ms
        let s = c.read(t0 + Duration::from_millis(100)); // idle 20 ms more
        assert_eq!(s.totl_dur, 100_000_000);
        assert_eq!(s.idle_dur, 50_000_000);
        assert!((s.idle_pct - 50.0).abs() < 1e-9);
        // The next period starts at the read; still idle throughout.
        let s = c.read(t0 + Duration::from_millis(150));
        assert_eq!((s.idle_dur, s.totl_dur), (50_000_000, 50_000_000));
    }
}
