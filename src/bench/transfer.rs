//! `shardwire bench`: the initiator/target benchmark, with the flags and the
//! closing line of Mooncake's `transfer_engine_bench`, so either side can be
//! Mooncake's and the numbers compare directly.
//!
//! - `--mode=target` registers a buffer, prints `segment_id=<name>` and
//!   serves until interrupted.
//! - `--mode=initiator --segment_id=<name>` runs `--threads` threads, each
//!   submitting batches of `--batch_size` requests of `--block_size` bytes
//!   and waiting for each batch, for `--duration` seconds; then prints
//!   `Test completed: duration D, batch count N, throughput X GB/s` and the
//!   batch latency percentiles.
//! - With no `--mode`, both run in this process on loopback: the embedded
//!   default.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, Percentiles};
use crate::engine::{TeError, TransferEngine, TransferRequest};
use crate::proto::mooncake::tcp::Opcode;

/// The benchmark's settings (the flags).
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Option<Mode>,
    pub metadata_server: String,
    pub local_server_name: String,
    pub segment_id: Option<String>,
    pub protocol: String,
    pub device_name: String,
    pub operation: Opcode,
    pub block_size: u64,
    pub batch_size: usize,
    pub threads: usize,
    pub duration: Duration,
    pub buffer_size: u64,
    /// The target registers memory of its own instead of allocating a
    /// managed buffer.
    pub target_registered: bool,
    pub report_unit: String,
    pub report_precision: usize,
    /// A target also prints `{"segment_id", "buffer", "buffer_size"}` as
    /// a JSON line, after `segment_id=<name>`.
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Initiator,
    Target,
}

/// What an initiator measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub operation: String,
    pub block_size: u64,
    pub batch_size: usize,
    pub threads: usize,
    pub duration_s: f64,
    pub batches: u64,
    pub bytes: u64,
    pub throughput_gbps: f64,
    pub failed_batches: u64,
    pub batch_latency: Percentiles,
    /// The anchor: a cache-hot `memcpy` of one block, in this process.
    pub memcpy_gbps: f64,
    /// What carried the transfers: "rdma", "tcp" or "local".
    pub transport: String,
    /// Bytes each local RDMA device moved during the run (empty unless
    /// RDMA carried it).
    pub device_bytes: std::collections::BTreeMap<String, u64>,
}

impl Report {
    /// Mooncake's closing line, in the unit asked for.
    pub fn mooncake_line(&self, unit: &str, precision: usize) -> String {
        let (scale, label) = unit_scale(unit);
        format!(
            "Test completed: duration {:.2}, batch count {}, throughput {:.*} {label}",
            self.duration_s,
            self.batches,
            precision,
            self.bytes as f64 / self.duration_s.max(1e-9) / scale,
        )
    }

    pub fn memcpy_line(&self) -> String {
        format!(
            "Anchor: memcpy of one {}-byte block, cache-hot: {:.2} GB/s; this run: {:.2} of it",
            self.block_size,
            self.memcpy_gbps,
            self.throughput_gbps / self.memcpy_gbps.max(1e-9)
        )
    }

    /// The bytes each RDMA device moved, or `None` without RDMA.
    pub fn devices_line(&self) -> Option<String> {
        if self.device_bytes.is_empty() {
            return None;
        }
        let parts: Vec<String> =
            self.device_bytes.iter().map(|(d, b)| format!("{d} {:.3} GB", *b as f64 / 1e9)).collect();
        Some(format!("Devices: {}", parts.join(", ")))
    }

    pub fn latency_line(&self) -> String {
        let p = &self.batch_latency;
        format!(
            "Batch latency: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us ({} batches, {} failed)",
            p.p50_us, p.p90_us, p.p99_us, p.max_us, p.samples, self.failed_batches
        )
    }
}

/// Bytes per unit for `--report_unit`, as Mooncake names them.
pub fn unit_scale(unit: &str) -> (f64, &'static str) {
    match unit {
        "GiB" => (1024.0 * 1024.0 * 1024.0, "GiB/s"),
        "Gb" => (1e9 / 8.0, "Gb/s"),
        "MB" => (1e6, "MB/s"),
        "MiB" => (1024.0 * 1024.0, "MiB/s"),
        "Mb" => (1e6 / 8.0, "Mb/s"),
        "KB" => (1e3, "KB/s"),
        _ => (1e9, "GB/s"),
    }
}

fn init_engine(opts: &Options) -> Result<TransferEngine, BenchError> {
    let engine = TransferEngine::new();
    engine.initialize(&opts.local_server_name, &opts.metadata_server, &opts.protocol, &opts.device_name).map_err(
        |e| {
            let what = format!("cannot start the engine ({} with metadata {})", opts.protocol, opts.metadata_server);
            BenchError::engine(&what, &e)
        },
    )?;
    Ok(engine)
}

/// An engine with a `buffer_size` buffer, its segment name printed as
/// `segment_id=<name>` on a line of its own.
fn serve(opts: &Options) -> Result<(TransferEngine, u64, String), BenchError> {
    let engine = init_engine(opts)?;
    let buffer = if opts.target_registered {
        // Page-aligned, as tensors' storage usually is (cross-memory
        // attach copies several times slower when the two sides' addresses
        // differ modulo 64). Lives as long as the process: a target serves
        // until it exits.
        let layout = std::alloc::Layout::from_size_align(opts.buffer_size.max(1) as usize, 4096)
            .map_err(|e| BenchError::invalid(format!("buffer_size {} cannot be allocated: {e}", opts.buffer_size)))?;
        // SAFETY: a non-zero size (max(1) above); the memory is never freed.
        let addr = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
        if addr == 0 {
            return Err(BenchError::failed(format!("cannot allocate {} bytes", opts.buffer_size)));
        }
        let what = format!("cannot register the target's {} bytes", opts.buffer_size);
        engine.register_memory(addr, opts.buffer_size, "cpu:0").map_err(|e| BenchError::engine(&what, &e))?;
        addr
    } else {
        let what = format!("cannot allocate the target's {} bytes", opts.buffer_size);
        engine.allocate_managed_buffer(opts.buffer_size).map_err(|e| BenchError::engine(&what, &e))?
    };
    let name = engine.segment_name().map_err(|e| BenchError::engine("the target has no segment name", &e))?;
    println!("segment_id={name}");
    if opts.json {
        let doc = serde_json::json!({ "segment_id": name, "buffer": buffer, "buffer_size": opts.buffer_size });
        println!("{doc}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok((engine, buffer, name))
}

/// Runs a target until `stop` is set. Prints the segment name first.
pub fn run_target(opts: &Options, stop: &AtomicBool) -> Result<(), BenchError> {
    let (engine, buffer, name) = serve(opts)?;
    eprintln!("target: segment {name}, buffer {buffer:#x} ({} bytes); interrupt to stop", opts.buffer_size);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    engine.shutdown();
    Ok(())
}

/// Runs an initiator against `segment` and measures it.
pub fn run_initiator(opts: &Options, segment: &str) -> Result<Report, BenchError> {
    let engine = Arc::new(init_engine(opts)?);
    initiate(&engine, opts, segment)
}

fn initiate(engine: &Arc<TransferEngine>, opts: &Options, segment: &str) -> Result<Report, BenchError> {
    let threads = opts.threads.max(1);
    let span = opts.block_size.saturating_mul(opts.batch_size as u64).saturating_mul(threads as u64);
    if opts.block_size == 0 || opts.batch_size == 0 || span > opts.buffer_size {
        return Err(BenchError::invalid(format!(
            "block_size {} x batch_size {} x threads {threads} must be non-zero and fit in buffer_size {}",
            opts.block_size, opts.batch_size, opts.buffer_size
        )));
    }
    let what = format!("cannot allocate the initiator's {} bytes", opts.buffer_size);
    let local = engine.allocate_managed_buffer(opts.buffer_size).map_err(|e| BenchError::engine(&what, &e))?;
    let remote = engine
        .get_first_buffer_address(segment)
        .map_err(|e| BenchError::engine(&format!("cannot look up segment {segment}"), &e))?;
    // SAFETY: the engine just allocated these bytes; fill them so a write
    // carries something recognisable.
    unsafe { std::ptr::write_bytes(local as *mut u8, 0x5a, opts.buffer_size as usize) };
    let memcpy_gbps = memcpy_rate(local, opts.buffer_size, opts.block_size, Duration::from_millis(500));
    let transport = engine
        .transport_for(segment)
        .map_err(|e| BenchError::engine(&format!("cannot look up segment {segment}"), &e))?
        .to_string();
    let devices_before = engine.rdma_device_bytes().unwrap_or_default();
    let stop = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // The first failure, said in full if no batch at all succeeds.
    let first_error: Arc<Mutex<Option<TeError>>> = Arc::default();
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, stop, batches, failed) = (engine.clone(), stop.clone(), batches.clone(), failed.clone());
            let first_error = first_error.clone();
            let (segment, opts) = (segment.to_string(), opts.clone());
            std::thread::spawn(move || {
                let base = (t * opts.batch_size) as u64 * opts.block_size;
                let requests: Vec<TransferRequest> = (0..opts.batch_size as u64)
                    .map(|i| TransferRequest {
                        opcode: opts.operation,
                        source: local + base + i * opts.block_size,
                        target_offset: remote + base + i * opts.block_size,
                        length: opts.block_size,
                    })
                    .collect();
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let r = engine
                        .batch_transfer_async(&segment, &requests)
                        .and_then(|id| engine.get_batch_transfer_status(&[id]));
                    samples.push(t0.elapsed());
                    if let Err(e) = r {
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        failed.fetch_add(1, Ordering::Relaxed);
                        if failed.load(Ordering::Relaxed) > 100 {
                            break;
                        }
                    } else {
                        batches.fetch_add(1, Ordering::Relaxed);
                    }
                }
                samples
            })
        })
        .collect();
    std::thread::sleep(opts.duration);
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.join().map_err(|_| BenchError::failed("an initiator thread panicked"))?);
    }
    let failed_batches = failed.load(Ordering::Relaxed);
    if batches.load(Ordering::Relaxed) == 0
        && let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take()
    {
        let _ = engine.free_managed_buffer(local, opts.buffer_size);
        let what = format!("every batch to segment {segment} failed ({failed_batches} tried); the first");
        return Err(BenchError::engine(&what, &e));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = batches.load(Ordering::Relaxed);
    let bytes = n * opts.batch_size as u64 * opts.block_size;
    let device_bytes = engine
        .rdma_device_bytes()
        .unwrap_or_default()
        .into_iter()
        .map(|(d, b)| {
            let before = devices_before.iter().find(|(n, _)| *n == d).map_or(0, |(_, b)| *b);
            (d, b.saturating_sub(before))
        })
        .collect();
    let _ = engine.free_managed_buffer(local, opts.buffer_size);
    Ok(Report {
        operation: if opts.operation == Opcode::Write { "write".into() } else { "read".into() },
        block_size: opts.block_size,
        batch_size: opts.batch_size,
        threads,
        duration_s: elapsed,
        batches: n,
        bytes,
        throughput_gbps: bytes as f64 / elapsed / 1e9,
        failed_batches,
        batch_latency: Percentiles::of(&mut samples),
        memcpy_gbps,
        transport,
        device_bytes,
    })
}

/// The embedded default: a target and an initiator in this process, over
/// loopback with P2P metadata.
pub fn run_loopback(opts: &Options) -> Result<Report, BenchError> {
    let (target, buffer, name) = serve(opts)?;
    let report = run_initiator(opts, &name);
    if !opts.target_registered {
        let _ = target.free_managed_buffer(buffer, opts.buffer_size);
    }
    report
}

/// Bytes per second of a cache-hot `memcpy` of `block` bytes within
/// `[base, base + len)` (between its first two blocks), for about `time`.
fn memcpy_rate(base: u64, len: u64, block: u64, time: Duration) -> f64 {
    if block == 0 || 2 * block > len {
        return 0.0;
    }
    let (src, dst) = (base as *const u8, (base + block) as *mut u8);
    let start = Instant::now();
    let mut copies = 0u64;
    while start.elapsed() < time || copies == 0 {
        for _ in 0..16 {
            // SAFETY: both blocks lie inside the engine's managed buffer
            // (checked above) and do not overlap; nothing else uses it yet.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, block as usize) };
            std::hint::black_box(dst);
        }
        copies += 16;
    }
    (copies * block) as f64 / start.elapsed().as_secs_f64() / 1e9
}
