//! Mooncake's metric log line (`MC_TE_METRIC=1`), with correct latencies.
//!
//! Every `MC_TE_METRIC_INTERVAL_SECONDS` a thread logs the initiator
//! throughput and latency distribution of the interval, in Mooncake's
//! shape: `[Metrics] Transfer Engine Stats (over last 5s): Throughput:
//! 12.34 MB/s | Latency Distribution (count=N): 0-10μs:58.3%, ...`. Idle
//! intervals and buckets under 0.1% are left out, as Mooncake does. Unlike
//! Mooncake's, a latency runs from submission to settlement, measured where
//! the request settles, not when a status poll happens to see it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::counters::{self, BUCKETS, Counters, Histogram, LATENCY_BOUNDS_US, Op, Side, Via};

/// Initiator bytes and latencies, summed over operations and transports.
fn initiator_totals(c: &Counters) -> (u64, Histogram) {
    let mut bytes = 0;
    let mut h = Histogram::default();
    for op in Op::ALL {
        for via in Via::ALL {
            let s = c.series(op, via, Side::Initiator);
            bytes += s.bytes;
            for b in 0..BUCKETS {
                h.counts[b] += s.latency.counts[b];
            }
        }
    }
    (bytes, h)
}

/// The line for an interval of `elapsed` between two snapshots, or `None`
/// when nothing settled in it. MB are 10^6 bytes.
pub fn line(before: &Counters, after: &Counters, elapsed: Duration) -> Option<String> {
    let (b0, h0) = initiator_totals(before);
    let (b1, h1) = initiator_totals(after);
    let counts: Vec<u64> = (0..BUCKETS).map(|b| h1.counts[b].saturating_sub(h0.counts[b])).collect();
    let count: u64 = counts.iter().sum();
    if count == 0 {
        return None;
    }
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mb_per_s = b1.saturating_sub(b0) as f64 / 1e6 / secs;
    let mut bins = Vec::new();
    for (b, &n) in counts.iter().enumerate() {
        let pct = n as f64 * 100.0 / count as f64;
        if n == 0 || pct < 0.1 {
            continue;
        }
        let lo = if b == 0 { 0 } else { LATENCY_BOUNDS_US[b - 1] };
        let range = match LATENCY_BOUNDS_US.get(b) {
            Some(hi) => format!("{lo}-{hi}μs"),
            None => format!(">{lo}μs"),
        };
        bins.push(format!("{range}:{pct:.1}%"));
    }
    Some(format!(
        "[Metrics] Transfer Engine Stats (over last {}s): Throughput: {mb_per_s:.2} MB/s | Latency Distribution (count={count}): {}",
        elapsed.as_secs(),
        bins.join(", ")
    ))
}

/// Starts the process's metric line, unless it runs already (one line per
/// process: the counters are the process's).
pub fn start_process(interval: Duration) -> std::io::Result<()> {
    static PROCESS: std::sync::Mutex<Option<MetricLog>> = std::sync::Mutex::new(None);
    let mut slot = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = Some(MetricLog::start(interval)?);
    }
    Ok(())
}

/// The thread that logs the line; stops when dropped.
pub struct MetricLog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the thread looks at its stop flag while it waits.
const STOP_POLL: Duration = Duration::from_millis(50);

impl MetricLog {
    /// Logs every `interval` (at least a second).
    pub fn start(interval: Duration) -> std::io::Result<Self> {
        let interval = interval.max(Duration::from_secs(1));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("sw-metric-log".into()).spawn(move || {
            let mut before = counters::snapshot();
            let mut since = Instant::now();
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(STOP_POLL);
                if since.elapsed() < interval {
                    continue;
                }
                let after = counters::snapshot();
                if let Some(text) = line(&before, &after, interval) {
                    log::info!("{text}");
                }
                before = after;
                since = Instant::now();
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for MetricLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::counters::series_index;

    #[test]
    fn the_line_has_mooncakes_shape_and_right_latencies() {
        let before = Counters::default();
        let mut after = Counters::default();
        let i = series_index(Op::Write, Via::Tcp, Side::Initiator);
        after.series[i].bytes = 10_000_000;
        for _ in 0..3 {
            after.series[i].latency.observe(Duration::from_micros(3_000));
        }
        after.series[i].latency.observe(Duration::from_micros(5));
        let text = line(&before, &after, Duration::from_secs(5)).unwrap();
        assert_eq!(
            text,
            "[Metrics] Transfer Engine Stats (over last 5s): Throughput: 2.00 MB/s | Latency Distribution (count=4): 0-10μs:25.0%, 2000-5000μs:75.0%"
        );
        assert_eq!(line(&after, &after, Duration::from_secs(5)), None, "idle intervals are left out");
    }

    #[test]
    fn rare_buckets_are_left_out_and_overflow_is_named() {
        let before = Counters::default();
        let mut after = Counters::default();
        let i = series_index(Op::Read, Via::Rdma, Side::Initiator);
        after.series[i].latency.counts[0] = 2000;
        after.series[i].latency.counts[1] = 1;
        after.series[i].latency.counts[BUCKETS - 1] = 10;
        let text = line(&before, &after, Duration::from_secs(1)).unwrap();
        assert!(text.ends_with("0-10μs:99.5%, >10000000μs:0.5%"), "{text}");
    }
}
