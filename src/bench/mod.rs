//! Benchmarks that measure shardwire against its anchors in the same run and
//! report ratios. They back `shardwire bench ...` and `cargo bench`.

pub mod batches;
pub mod plot;
pub mod progress;
pub mod rdma_sim;
pub mod runtime;
pub mod stream;
pub mod sweep;
pub mod transfer;

use std::fmt;
use std::time::Duration;

use crate::engine::TeError;

/// Why a benchmark did not run or did not finish: a sentence for people
/// and a stable word for tools (`invalid_argument`, `failed`, or the name
/// of a Mooncake code for an engine's error: `socket`, `metadata`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchError {
    pub code: &'static str,
    pub message: String,
}

impl BenchError {
    /// The options cannot work (sizes that do not fit, counts of zero).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { code: "invalid_argument", message: message.into() }
    }

    /// The run failed part-way.
    pub fn failed(message: impl Into<String>) -> Self {
        Self { code: "failed", message: message.into() }
    }

    /// An engine call failed while doing `what`.
    pub fn engine(what: &str, e: &TeError) -> Self {
        Self { code: e.code_name(), message: format!("{what}: {e}") }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BenchError {}

impl From<String> for BenchError {
    fn from(message: String) -> Self {
        Self::failed(message)
    }
}

impl From<crate::stream::StreamError> for BenchError {
    fn from(e: crate::stream::StreamError) -> Self {
        Self { code: e.code(), message: e.to_string() }
    }
}

/// Latency percentiles of a sample, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// Sorts `samples` in place and reads the percentiles off it.
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i].as_nanos() as f64 / 1000.0
        };
        Self { samples: samples.len(), p50_us: at(0.50), p90_us: at(0.90), p99_us: at(0.99), max_us: at(1.0) }
    }
}

/// Pins the calling thread, quietly doing nothing if the CPU is not usable.
pub fn pin_current(cpu: u32) -> bool {
    crate::runtime::shard::pin_current_thread(cpu).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_sample() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let p = Percentiles::of(&mut s);
        assert_eq!(p.samples, 100);
        assert_eq!(p.p50_us, 51.0);
        assert_eq!(p.p99_us, 99.0);
        assert_eq!(p.max_us, 100.0);
        assert_eq!(Percentiles::of(&mut []).p50_us, 0.0);
    }
}
