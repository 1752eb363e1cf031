//! `shardwire bench batches`: the same bytes submitted as one huge batch
//! and as many batches of 1,000, in one run, on loopback. Submission is
//! bounded (the transport takes a bounded number of requests per shard and
//! makes the caller wait for room), so one batch of a million requests
//! should take about as long as a thousand batches of a thousand, with
//! memory that grows by a bounded amount per request (the batch's task
//! table), not by what is queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{TransferEngine, TransferRequest};
use crate::proto::mooncake::tcp::Opcode;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Requests in all.
    pub requests: usize,
    /// Requests per batch in the many-batches run.
    pub batch: usize,
    pub block_size: u64,
    pub operation: Opcode,
    /// Runs of each shape, interleaved; medians are reported.
    pub repeats: usize,
    /// Bytes of buffer on each side (requests cycle through it).
    pub buffer_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            requests: 1_000_000,
            batch: 1000,
            block_size: 4096,
            operation: Opcode::Write,
            repeats: 3,
            buffer_size: 64 << 20,
        }
    }
}

/// One shape's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub shape: String,
    pub batches: usize,
    pub requests_per_batch: usize,
    /// Median wall time.
    pub seconds: f64,
    pub throughput_gbps: f64,
    /// Most resident memory above the start, over the runs, per request.
    pub rss_bytes_per_request: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub block_size: u64,
    pub requests: usize,
    pub rows: Vec<Row>,
    /// One batch's time over the many batches' time.
    pub ratio: f64,
}

impl Report {
    /// The table the README carries.
    pub fn render(&self) -> String {
        let mut out = String::from("| shape | batches | requests each | seconds | GB/s | RSS bytes/request |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.0} |\n",
                r.shape, r.batches, r.requests_per_batch, r.seconds, r.throughput_gbps, r.rss_bytes_per_request
            ));
        }
        out.push_str(&format!("\none batch / many batches: {:.2}x the time\n", self.ratio));
        out
    }
}

/// This process's resident memory, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = text.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// Runs `f` while a thread samples the resident memory; returns its
/// duration and the most memory above the start.
fn measured(f: impl FnOnce() -> Result<(), String>) -> Result<(Duration, u64), String> {
    let base = rss_bytes();
    let (stop, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(base)));
    let (s, p) = (stop.clone(), peak.clone());
    let sampler = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            p.fetch_max(rss_bytes(), Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    r?;
    Ok((took, peak.load(Ordering::Relaxed).saturating_sub(base)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs both shapes, interleaved.
pub fn run(opts: &Options) -> Result<Report, super::BenchError> {
    let err = |e: crate::engine::TeError| e.to_string();
    let per_buffer = (opts.buffer_size / opts.block_size.max(1)).max(1);
    if opts.requests == 0 || opts.batch == 0 || opts.block_size == 0 || opts.block_size > opts.buffer_size {
        return Err(super::BenchError::invalid(format!(
            "--requests, --batch and --block_size must be positive, and --block_size at most {} bytes",
            opts.buffer_size
        )));
    }
    let target = TransferEngine::new();
    target.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").map_err(err)?;
    let remote = target.allocate_managed_buffer(opts.buffer_size).map_err(err)?;
    let name = target.segment_name().map_err(err)?;
    let initiator = TransferEngine::new();
    initiator.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").map_err(err)?;
    let local = initiator.allocate_managed_buffer(opts.buffer_size).map_err(err)?;
    let requests: Vec<TransferRequest> = (0..opts.requests as u64)
        .map(|i| {
            let at = (i % per_buffer) * opts.block_size;
            TransferRequest {
                opcode: opts.operation,
                source: local + at,
                target_offset: remote + at,
                length: opts.block_size,
            }
        })
        .collect();
    // Warm up: the connections, the pages.
    initiator.batch_transfer_sync(&name, &requests[..opts.batch.min(requests.len())], None).map_err(err)?;
    let (mut one, mut many) = (Vec::new(), Vec::new());
    let (mut one_rss, mut many_rss) = (0u64, 0u64);
    for _ in 0..opts.repeats.max(1) {
        let (t, rss) = measured(|| initiator.batch_transfer_sync(&name, &requests, None).map_err(err))?;
        one.push(t.as_secs_f64());
        one_rss = one_rss.max(rss);
        let (t, rss) = measured(|| {
            for chunk in requests.chunks(opts.batch) {
                initiator.batch_transfer_sync(&name, chunk, None).map_err(err)?;
            }
            Ok(())
        })?;
        many.push(t.as_secs_f64());
        many_rss = many_rss.max(rss);
    }
    let bytes = opts.requests as f64 * opts.block_size as f64;
    let (one_s, many_s) = (median(one), median(many));
    let n = opts.requests as f64;
    let rows = vec![
        Row {
            shape: "one batch".into(),
            batches: 1,
            requests_per_batch: opts.requests,
            seconds: one_s,
            throughput_gbps: bytes / one_s / 1e9,
            rss_bytes_per_request: one_rss as f64 / n,
        },
        Row {
            shape: format!("batches of {}", opts.batch),
            batches: opts.requests.div_ceil(opts.batch),
            requests_per_batch: opts.batch,
            seconds: many_s,
            throughput_gbps: bytes / many_s / 1e9,
            rss_bytes_per_request: many_rss as f64 / n,
        },
    ];
    Ok(Report { block_size: opts.block_size, requests: opts.requests, rows, ratio: one_s / many_s.max(1e-9) })
}
