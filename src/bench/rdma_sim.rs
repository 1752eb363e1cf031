//! `shardwire bench rdma-sim`: the RDMA software path of one shard, on a
//! simulated fabric whose NICs cost nothing (no latency, no bandwidth
//! limit, no copy). What it measures is ours alone: cutting requests into
//! slices, choosing each slice's rails, posting chains, polling
//! completions and settling, plus the simulated device's bookkeeping, per
//! 64 KiB slice. The target is 3 M slices/s per shard, 200 GB/s of 64 KiB
//! slices: enough for 4 × 400 Gb/s NICs from one core.
//!
//! Two ways, interleaved, medians reported:
//! - `shard`: a real shard polls the slice engine in its loop, and a caller
//!   thread on another CPU submits requests over the runtime's rings
//!   (what the engine does);
//! - `engine`: one thread submits and drives the slice engine itself (the
//!   slice engine's cost without the hand-over).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::pin_current;
use crate::proto::mooncake::message::{BufferDesc, DeviceDesc, SegmentDesc};
use crate::proto::mooncake::rdma::RdmaSegment;
use crate::runtime::{Runtime, RuntimeConfig};
use crate::topo::PriorityMatrix;
use crate::transport::rdma::fabric::{Access, Context, CqId, Fabric, Verb};
use crate::transport::rdma::plan::SliceRule;
use crate::transport::rdma::shard::{self, Done};
use crate::transport::rdma::sim::{FaultPlan, SimDevice, SimNetwork};
use crate::transport::rdma::slices::{Answer, Connector, OurSide, RdmaConfig, RdmaRequest, SliceEngine, answer_on};

/// The slices per second the design asks of one shard.
pub const TARGET_SLICES_PER_S: f64 = 3_000_000.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Length of each timed run.
    pub duration: Duration,
    /// Runs of each way (interleaved); medians are reported.
    pub repeats: usize,
    /// Local devices (and as many on the peer).
    pub devices: usize,
    /// Bytes per request.
    pub request_bytes: u64,
    /// `MC_SLICE_SIZE`.
    pub slice_bytes: u64,
    /// Requests kept in flight.
    pub depth: usize,
    pub operation: Verb,
    /// The caller's CPU and the shard's.
    pub cpu_caller: u32,
    pub cpu_shard: u32,
}

impl Default for Options {
    fn default() -> Self {
        let cpus = crate::topo::plan::current_affinity().unwrap_or_else(|| vec![0]);
        let cpu_caller = cpus.first().copied().unwrap_or(0);
        Self {
            duration: Duration::from_secs(2),
            repeats: 3,
            devices: 4,
            request_bytes: 1 << 20,
            slice_bytes: 64 << 10,
            depth: 64,
            operation: Verb::Write,
            cpu_caller,
            cpu_shard: cpus.get(1).copied().unwrap_or(cpu_caller),
        }
    }
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub way: &'static str,
    pub slices: u64,
    pub seconds: f64,
    pub slices_per_s: f64,
    pub ns_per_slice: f64,
    /// What the slices would carry per second, in GB/s.
    pub gbps: f64,
    /// Each local device's share of the slices.
    pub device_share: Vec<f64>,
}

/// The figures: medians of each way, and every run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub devices: usize,
    pub request_bytes: u64,
    pub slice_bytes: u64,
    pub depth: usize,
    pub operation: &'static str,
    /// The shard's median (the headline figure).
    pub slices_per_s: f64,
    pub ns_per_slice: f64,
    /// The slice engine driven by one thread alone, median.
    pub engine_slices_per_s: f64,
    pub engine_ns_per_slice: f64,
    pub target_slices_per_s: f64,
    pub runs: Vec<Run>,
}

impl Report {
    pub fn render(&self) -> String {
        let mut s = format!(
            "rdma-sim: one shard, {} zero-cost NICs, {} B requests in {} B slices, {} in flight, {}\n",
            self.devices, self.request_bytes, self.slice_bytes, self.depth, self.operation
        );
        for r in &self.runs {
            s += &format!(
                "  {:<6} {:>10.0} slices/s  {:>6.1} ns/slice  {:>7.1} GB/s of slices\n",
                r.way, r.slices_per_s, r.ns_per_slice, r.gbps
            );
        }
        s += &format!(
            "median: shard {:.2} M slices/s ({:.1} ns/slice), engine alone {:.2} M slices/s ({:.1} ns/slice); \
             target {:.1} M ({:.0}% of it)\n",
            self.slices_per_s / 1e6,
            self.ns_per_slice,
            self.engine_slices_per_s / 1e6,
            self.engine_ns_per_slice,
            self.target_slices_per_s / 1e6,
            100.0 * self.slices_per_s / self.target_slices_per_s
        );
        s
    }
}

/// The peer: its contexts answer connections directly, on the same
/// simulated network.
struct Peer {
    ctxs: Vec<(Box<dyn Context>, CqId)>,
}

impl Connector for Peer {
    fn connect(&mut self, _peer: &str, peer_dev: usize, _name: &str, ours: OurSide<'_>) -> Result<Answer, String> {
        let (ctx, cq) = self.ctxs.get_mut(peer_dev).ok_or("no such peer device")?;
        answer_on(ctx.as_mut(), *cq, &ours).map(Answer::Ready)
    }
}

/// Memory on each side: allocated zeroed and never touched (the NICs do
/// not copy), so it costs address space, not RAM.
struct Buffers {
    local: Vec<u8>,
    remote: Vec<u8>,
}

const BUFFER_BYTES: usize = 256 << 20;

/// An engine on `o.devices` zero-cost local devices, knowing a peer with as
/// many, both sides' memory registered.
fn world(o: &Options, bufs: &mut Buffers) -> Result<(SliceEngine, Peer), String> {
    let zero_cost = |name: String, n: u8| SimDevice {
        latency_ns: 0,
        bytes_per_ns: u64::MAX,
        moves_bytes: false,
        ..SimDevice::new(&name, n)
    };
    let mut devices: Vec<SimDevice> = (0..o.devices).map(|i| zero_cost(format!("l{i}"), i as u8 + 1)).collect();
    devices.extend((0..o.devices).map(|i| zero_cost(format!("p{i}"), 100 + i as u8)));
    let net = SimNetwork::new(devices, FaultPlan::default(), 1);
    let (local, remote) = (bufs.local.as_mut_ptr() as u64, bufs.remote.as_mut_ptr() as u64);
    let mut peer = Peer { ctxs: Vec::new() };
    let mut keys = Vec::new();
    for i in 0..o.devices {
        let mut c = net.open(&format!("p{i}")).map_err(|e| e.to_string())?;
        let cq = c.create_cq(1 << 16).map_err(|e| e.to_string())?;
        // SAFETY: the buffers outlive the engine and the peer (the caller
        // drops them after both).
        keys.push(unsafe { c.register(remote, BUFFER_BYTES as u64, Access::ALL) }.map_err(|e| e.to_string())?);
        peer.ctxs.push((c, cq));
    }
    let desc = SegmentDesc {
        buffers: vec![BufferDesc {
            addr: remote,
            length: BUFFER_BYTES as u64,
            lkey: keys.iter().map(|m| m.lkey).collect(),
            name: "cpu:0".into(),
            rkey: keys.iter().map(|m| m.rkey).collect(),
        }],
        devices: peer
            .ctxs
            .iter()
            .enumerate()
            .map(|(i, (c, _))| DeviceDesc { gid: c.info().gids[1].gid.to_string(), lid: 0, name: format!("p{i}") })
            .collect(),
        priority_matrix: None,
        ..SegmentDesc::new("peer", "rdma")
    };
    let contexts =
        (0..o.devices).map(|i| net.open(&format!("l{i}")).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let config = RdmaConfig {
        slice: SliceRule { slice_bytes: o.slice_bytes, ..SliceRule::default() },
        cqe: 1 << 16,
        ..RdmaConfig::default()
    };
    let mut engine = SliceEngine::new(config, contexts, PriorityMatrix::new()).map_err(|e| e.to_string())?;
    // SAFETY: as above.
    unsafe { engine.register(local, BUFFER_BYTES as u64, "cpu:0") }.map_err(|e| e.to_string())?;
    engine.add_peer("peer", RdmaSegment::from_desc(&desc).map_err(|e| e.to_string())?, 0)?;
    Ok((engine, peer))
}

/// Request `id` of a run: requests walk through the buffers.
fn request(o: &Options, bufs: (u64, u64), id: u64) -> RdmaRequest {
    let slots = BUFFER_BYTES as u64 / o.request_bytes;
    let at = (id % slots) * o.request_bytes;
    RdmaRequest {
        id,
        verb: o.operation,
        peer: "peer".into(),
        local: bufs.0 + at,
        remote: bufs.1 + at,
        len: o.request_bytes,
        deadline_ns: None,
    }
}

fn slices_per_request(o: &Options) -> Result<u64, String> {
    let rule = SliceRule { slice_bytes: o.slice_bytes, ..SliceRule::default() };
    let cut = rule.cut(0, 0, o.request_bytes, |_| Some(u64::MAX), |_| Some(u64::MAX)).map_err(|e| e.to_string())?;
    Ok(cut.len() as u64)
}

fn shares(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<f64> {
    let moved: Vec<u64> = after.iter().zip(before).map(|(a, b)| a.1 - b.1).collect();
    let total = moved.iter().sum::<u64>().max(1) as f64;
    moved.iter().map(|&m| m as f64 / total).collect()
}

fn finish(way: &'static str, o: &Options, slices: u64, seconds: f64, device_share: Vec<f64>) -> Run {
    let per_s = slices as f64 / seconds;
    Run {
        way,
        slices,
        seconds,
        slices_per_s: per_s,
        ns_per_slice: 1e9 / per_s.max(1e-9),
        gbps: per_s * o.slice_bytes as f64 / 1e9,
        device_share,
    }
}

/// One thread submits and drives the slice engine.
fn run_engine(o: &Options, per_request: u64) -> Result<Run, String> {
    let mut bufs = Buffers { local: vec![0; BUFFER_BYTES], remote: vec![0; BUFFER_BYTES] };
    let addrs = (bufs.local.as_ptr() as u64, bufs.remote.as_ptr() as u64);
    let (mut engine, mut peer) = world(o, &mut bufs)?;
    pin_current(o.cpu_shard);
    let start = Instant::now();
    let now = || start.elapsed().as_nanos() as u64;
    let mut next = 0u64;
    let mut drive = |engine: &mut SliceEngine, until: Instant| -> Result<u64, String> {
        let mut settled = 0u64;
        loop {
            while engine.in_flight() < o.depth {
                engine.submit(request(o, addrs, next));
                next += 1;
            }
            engine.progress(&mut peer, now());
            for s in engine.drain_settled() {
                s.result.map_err(|e| format!("request {} failed: {e}", s.id))?;
                settled += 1;
            }
            if settled % 64 == 0 && Instant::now() >= until {
                return Ok(settled);
            }
        }
    };
    drive(&mut engine, Instant::now() + Duration::from_millis(200))?; // endpoints made, caches warm
    let before = engine.device_bytes();
    let t0 = Instant::now();
    let settled = drive(&mut engine, t0 + o.duration)?;
    let seconds = t0.elapsed().as_secs_f64();
    let share = shares(&before, &engine.device_bytes());
    drop(engine);
    drop(peer);
    drop(bufs);
    Ok(finish("engine", o, settled * per_request, seconds, share))
}

/// A shard polls the slice engine; this thread submits over the rings.
fn run_shard(o: &Options, per_request: u64) -> Result<Run, String> {
    let mut bufs = Buffers { local: vec![0; BUFFER_BYTES], remote: vec![0; BUFFER_BYTES] };
    let addrs = (bufs.local.as_ptr() as u64, bufs.remote.as_ptr() as u64);
    let (engine, peer) = world(o, &mut bufs)?;
    let mut config = RuntimeConfig::new(1);
    config.cpus = vec![Some(o.cpu_shard)];
    let runtime = Runtime::start(config).map_err(|e| format!("the runtime: {e}"))?;
    let key = 1;
    let mut parts = Some((engine, peer));
    let result = (|| {
        let (engine, peer) = parts.take().expect("once");
        shard::install(&runtime, 0, key, move || Ok((engine, Box::new(peer) as Box<dyn Connector>)))?;
        pin_current(o.cpu_caller);
        let settled = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut submitted = 0u64;
        let mut drive = |until: Instant| -> Result<(), String> {
            while Instant::now() < until {
                while submitted - settled.load(Ordering::Acquire) < o.depth as u64 {
                    let (s, f) = (settled.clone(), failed.clone());
                    let done: Done = Box::new(move |r| {
                        if r.result.is_err() {
                            f.fetch_add(1, Ordering::Relaxed);
                        }
                        s.fetch_add(1, Ordering::Release);
                    });
                    shard::submit(&runtime, 0, key, request(o, addrs, submitted), done)?;
                    submitted += 1;
                }
                std::hint::spin_loop();
            }
            Ok(())
        };
        drive(Instant::now() + Duration::from_millis(200))?;
        let before = shard::with_engine(&runtime, 0, key, |e| e.device_bytes())?;
        let (t0, n0) = (Instant::now(), settled.load(Ordering::Acquire));
        drive(t0 + o.duration)?;
        let (seconds, n) = (t0.elapsed().as_secs_f64(), settled.load(Ordering::Acquire) - n0);
        let after = shard::with_engine(&runtime, 0, key, |e| e.device_bytes())?;
        // Let what is in flight settle before the memory goes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while settled.load(Ordering::Acquire) < submitted && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if failed.load(Ordering::Relaxed) > 0 {
            return Err(format!("{} requests failed", failed.load(Ordering::Relaxed)));
        }
        Ok(finish("shard", o, n * per_request, seconds, shares(&before, &after)))
    })();
    shard::uninstall(&runtime, 0, key);
    runtime.shutdown();
    drop(bufs);
    result
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

/// Runs both ways `repeats` times, interleaved.
pub fn run(o: &Options) -> Result<Report, super::BenchError> {
    if o.devices == 0 || o.devices > 16 || o.depth == 0 || o.request_bytes == 0 || o.slice_bytes == 0 {
        return Err(super::BenchError::invalid(
            "rdma-sim needs 1 to 16 --devices, and --depth, --block_size and the slice size above 0",
        ));
    }
    if o.request_bytes > BUFFER_BYTES as u64 {
        return Err(super::BenchError::invalid(format!("rdma-sim: --block_size can be at most {BUFFER_BYTES} bytes")));
    }
    let per_request = slices_per_request(o)?;
    let mut runs = Vec::new();
    for _ in 0..o.repeats.max(1) {
        runs.push(run_shard(o, per_request)?);
        runs.push(run_engine(o, per_request)?);
    }
    let of = |way: &str, f: fn(&Run) -> f64| median(runs.iter().filter(|r| r.way == way).map(f).collect());
    let (shard, engine) = (of("shard", |r| r.slices_per_s), of("engine", |r| r.slices_per_s));
    Ok(Report {
        devices: o.devices,
        request_bytes: o.request_bytes,
        slice_bytes: o.slice_bytes,
        depth: o.depth,
        operation: if o.operation == Verb::Read { "read" } else { "write" },
        slices_per_s: shard,
        ns_per_slice: 1e9 / shard.max(1e-9),
        engine_slices_per_s: engine,
        engine_ns_per_slice: 1e9 / engine.max(1e-9),
        target_slices_per_s: TARGET_SLICES_PER_S,
        runs,
    })
}
