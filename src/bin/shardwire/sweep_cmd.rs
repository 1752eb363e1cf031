//! `shardwire bench sweep` and `shardwire bench plot`.
//!
//! A sweep runs the transfer bench's initiator as a child process
//! (`shardwire bench --mode=initiator ... --json`) once per block size,
//! operation and path, against a target: the one `--segment_id` names, or
//! targets it starts itself on loopback (one for TCP and the same-host
//! path, one on the emu fabric for RDMA). Each path is a matter of the
//! environment the processes get, so each initiator is a process of its
//! own, as Mooncake's bench is run.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use shardwire::bench::plot;
use shardwire::bench::progress::Progress;
use shardwire::bench::sweep::{Point, Sweep, default_sizes, median, parse_sizes, size_label};

/// A target that prints no segment_id within this long has failed.
const TARGET_START_TIMEOUT: Duration = Duration::from_secs(30);
/// An initiator gets this long beyond its --duration to set up, report
/// and exit.
const INITIATOR_SLACK: Duration = Duration::from_secs(60);
/// Most repeats of each point.
const REPEATS_MAX: usize = 100;

#[derive(clap::Args)]
pub struct SweepArgs {
    /// Block sizes, comma-separated (4096, 4KiB, 1MiB, ...); default 4 KiB
    /// to 16 MiB in powers of 4.
    #[arg(long, value_name = "SIZES")]
    sizes: Option<String>,
    /// Operations, comma-separated.
    #[arg(long, default_value = "write,read", value_name = "OPS")]
    ops: String,
    /// shardwire's paths, comma-separated: tcp (SHARDWIRE_LOCAL=0,
    /// MC_FORCE_TCP=1), local (the same-host transport), rdma-emu
    /// (protocol rdma on SHARDWIRE_FABRIC=emu).
    #[arg(long, default_value = "tcp,local,rdma-emu", value_name = "PATHS")]
    paths: String,
    /// Seconds per point.
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// Runs of each point (interleaved across paths; the median is kept).
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Requests per batch (fewer where a batch would not fit the buffer).
    #[arg(long = "batch_size", default_value_t = 32)]
    batch_size: usize,
    /// Initiator threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Bytes of buffer on each side; default 256 MiB, or one block per
    /// thread of the largest size if that is more.
    #[arg(long = "buffer_size")]
    buffer_size: Option<u64>,
    /// A running target's segment (what it printed as segment_id=...);
    /// without it the sweep starts its own on loopback.
    #[arg(long = "segment_id")]
    segment_id: Option<String>,
    /// P2PHANDSHAKE (no server), or a metadata server.
    #[arg(long = "metadata_server", default_value = "P2PHANDSHAKE")]
    metadata_server: String,
    /// This engine's host[:port].
    #[arg(long = "local_server_name", default_value = "127.0.0.1")]
    local_server_name: String,
    /// Write every point here as JSON.
    #[arg(long = "json-out", value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Draw the sweep here as an SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// The plot's title.
    #[arg(long)]
    title: Option<String>,
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// A sweep file (`bench sweep --json-out`, or tools/bench-vs-mooncake).
    #[arg(long = "json-in", value_name = "FILE")]
    json_in: PathBuf,
    /// Where to write the SVG.
    #[arg(long, value_name = "FILE")]
    svg: PathBuf,
    /// Replace the file's title.
    #[arg(long)]
    title: Option<String>,
}

pub fn plot(args: &PlotArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.json_in).map_err(|e| format!("{}: {e}", args.json_in.display()))?;
    let mut sweep = Sweep::from_json(&text).map_err(|e| format!("{}: {e}", args.json_in.display()))?;
    if let Some(title) = &args.title {
        sweep.title = title.clone();
    }
    plot::write_svg(&sweep, &args.svg)?;
    eprintln!("plot: {} points drawn in {}", sweep.points.len(), args.svg.display());
    Ok(())
}

/// A shardwire path: how its processes are set up, and what the
/// initiator's report must name as its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Tcp,
    Local,
    RdmaEmu,
}

impl Path {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "tcp" => Ok(Self::Tcp),
            "local" => Ok(Self::Local),
            "rdma-emu" | "rdma" => Ok(Self::RdmaEmu),
            _ => Err(format!("--paths: {name:?} is none of tcp, local, rdma-emu")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Local => "local",
            Self::RdmaEmu => "rdma-emu",
        }
    }

    fn protocol(self) -> &'static str {
        if self == Self::RdmaEmu { "rdma" } else { "tcp" }
    }

    fn transport(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Local => "local",
            Self::RdmaEmu => "rdma",
        }
    }

    /// The variables that choose this path, set on both sides (the
    /// caller's own settings of them are overridden).
    fn env(self, cmd: &mut Command) {
        for var in ["MC_FORCE_TCP", "SHARDWIRE_LOCAL", "SHARDWIRE_FABRIC"] {
            cmd.env_remove(var);
        }
        match self {
            Self::Tcp => cmd.env("SHARDWIRE_LOCAL", "0").env("MC_FORCE_TCP", "1"),
            Self::Local => cmd.env("SHARDWIRE_LOCAL", "1").env("SHARDWIRE_FABRIC", "none"),
            Self::RdmaEmu => cmd.env("SHARDWIRE_LOCAL", "0").env("SHARDWIRE_FABRIC", "emu"),
        };
    }
}

fn list(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty())
}

pub fn sweep(args: &SweepArgs) -> Result<(), String> {
    let sizes = match &args.sizes {
        Some(text) => parse_sizes(text)?,
        None => default_sizes(),
    };
    let mut ops = Vec::new();
    for op in list(&args.ops) {
        if op != "read" && op != "write" {
            return Err(format!("--ops: {op:?} is neither read nor write"));
        }
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    let mut paths = Vec::new();
    for name in list(&args.paths) {
        let path = Path::parse(name)?;
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    if ops.is_empty() || paths.is_empty() {
        return Err("--ops and --paths need at least one each".into());
    }
    if !args.duration.is_finite() || args.duration <= 0.0 || args.duration > 3600.0 {
        return Err(format!("--duration {}: seconds in (0, 3600]", args.duration));
    }
    if args.repeats == 0 || args.repeats > REPEATS_MAX {
        return Err(format!("--repeats {}: 1 to {REPEATS_MAX}", args.repeats));
    }
    let threads = args.threads.max(1);
    let largest = *sizes.iter().max().expect("sizes is never empty");
    let buffer_size = args.buffer_size.unwrap_or((256u64 << 20).max(largest * threads as u64));
    if largest * threads as u64 > buffer_size {
        return Err(format!(
            "--buffer_size {buffer_size}: {threads} threads need {} bytes for one {} block each",
            largest * threads as u64,
            size_label(largest)
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let command: Vec<String> = std::iter::once("shardwire".to_string()).chain(std::env::args().skip(1)).collect();
    let title = args.title.clone().unwrap_or_else(|| "shardwire bench sweep, loopback".to_string());
    let mut sweep = Sweep::new(&title, &command.join(" "));

    let total = sizes.len() * ops.len() * paths.len() * args.repeats;
    let mut progress = Progress::stderr("sweep: ", total);
    // The targets: the one given, or one per kind of path, started here.
    let mut targets: Vec<(Path, Option<Target>, String)> = Vec::new();
    for &path in &paths {
        if let Some(segment) = &args.segment_id {
            targets.push((path, None, segment.clone()));
            continue;
        }
        // TCP and the same-host path share a target (the initiator's
        // settings choose); RDMA needs one on the emu fabric.
        let shared = targets.iter().find(|(p, t, _)| t.is_some() && *p != Path::RdmaEmu).map(|(_, _, s)| s.clone());
        if let Some(segment) = shared.filter(|_| path != Path::RdmaEmu) {
            targets.push((path, None, segment));
            continue;
        }
        match Target::start(&exe, path, buffer_size, args) {
            Ok(target) => {
                let segment = target.segment.clone();
                targets.push((path, Some(target), segment));
            }
            Err(e) if path == Path::RdmaEmu => progress.note(&format!("rdma-emu left out: {e}")),
            Err(e) => return Err(e),
        }
    }

    let mut failures = Vec::new();
    for &size in &sizes {
        for &op in &ops {
            let mut runs: Vec<Vec<Run>> = vec![Vec::new(); targets.len()];
            for _ in 0..args.repeats {
                // Paths alternate, so drift on a shared machine hits all alike.
                for (i, (path, _, segment)) in targets.iter().enumerate() {
                    let what = format!("{op} {} {}", size_label(size), path.name());
                    progress.start(&what);
                    match initiate(&exe, *path, segment, op, size, buffer_size, args) {
                        Ok(run) => {
                            progress.finish(&what, &format!("{:.2} GB/s", run.gbps));
                            runs[i].push(run);
                        }
                        Err(e) => {
                            progress.finish(&what, "failed");
                            progress.note(&format!("{what}: {e}"));
                            failures.push(what);
                        }
                    }
                }
            }
            for ((path, _, _), mut runs) in targets.iter().zip(runs) {
                if runs.is_empty() {
                    continue;
                }
                let rates: Vec<f64> = runs.iter().map(|r| r.gbps).collect();
                let m = median(&rates);
                let at = runs.iter().position(|r| r.gbps == m).unwrap_or(0);
                let run = runs.swap_remove(at);
                sweep.points.push(Point {
                    engine: "shardwire".into(),
                    path: path.name().into(),
                    op: op.into(),
                    block_size: size,
                    gbps: run.gbps,
                    p50_us: run.p50_us,
                    p99_us: run.p99_us,
                    duration_s: run.duration_s,
                    batch_size: Some(run.batch_size),
                    threads: Some(threads),
                    runs_gbps: if rates.len() > 1 { rates } else { Vec::new() },
                    ceiling: false,
                });
            }
        }
    }
    progress.end();
    drop(targets);

    println!("| path | op | block | GB/s | batch p50 µs | batch p99 µs |");
    println!("|---|---|---:|---:|---:|---:|");
    for p in &sweep.points {
        let us = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.1}"));
        println!(
            "| {} | {} | {} | {:.2} | {} | {} |",
            p.path,
            p.op,
            size_label(p.block_size),
            p.gbps,
            us(p.p50_us),
            us(p.p99_us)
        );
    }
    if let Some(file) = &args.json_out {
        std::fs::write(file, sweep.to_json() + "\n").map_err(|e| format!("{}: {e}", file.display()))?;
    }
    if let Some(file) = &args.svg {
        plot::write_svg(&sweep, file)?;
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {total} runs failed: {}", failures.len(), failures.join(", ")))
    }
}

/// One initiator run's figures.
#[derive(Debug, Clone)]
struct Run {
    gbps: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    duration_s: f64,
    batch_size: usize,
}

/// Requests per batch for `size`: as asked, or fewer so that every thread's
/// batch fits the buffer.
fn batch_for(size: u64, threads: usize, asked: usize, buffer_size: u64) -> usize {
    let fit = buffer_size / (size * threads as u64).max(1);
    (asked as u64).min(fit).max(1) as usize
}

fn initiate(
    exe: &std::path::Path,
    path: Path,
    segment: &str,
    op: &str,
    size: u64,
    buffer_size: u64,
    args: &SweepArgs,
) -> Result<Run, String> {
    let threads = args.threads.max(1);
    let batch = batch_for(size, threads, args.batch_size.max(1), buffer_size);
    let mut cmd = Command::new(exe);
    cmd.args(["bench", "--mode=initiator", "--json"])
        .arg(format!("--segment_id={segment}"))
        .arg(format!("--metadata_server={}", args.metadata_server))
        .arg(format!("--local_server_name={}", args.local_server_name))
        .arg(format!("--protocol={}", path.protocol()))
        .arg(format!("--operation={op}"))
        .arg(format!("--block_size={size}"))
        .arg(format!("--batch_size={batch}"))
        .arg(format!("--threads={threads}"))
        .arg(format!("--duration={}", args.duration))
        .arg(format!("--buffer_size={buffer_size}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    path.env(&mut cmd);
    let child = cmd.spawn().map_err(|e| format!("cannot start an initiator: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs_f64(args.duration) + INITIATOR_SLACK;
    let output = match rx.recv_timeout(limit) {
        Ok(output) => output.map_err(|e| format!("initiator: {e}"))?,
        Err(_) => {
            // SAFETY: signals the child this function started (its waiter
            // thread has not reaped it: no answer came).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(format!("the initiator gave no answer within {} s; killed", limit.as_secs()));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let Some(report) = report.filter(|_| output.status.success()) else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        return Err(format!("initiator {}: {tail}", output.status));
    };
    let transport = report["transport"].as_str().unwrap_or("");
    if transport != path.transport() {
        return Err(format!("carried by {transport:?}, not {}", path.transport()));
    }
    let failed = report["failed_batches"].as_u64().unwrap_or(0);
    if failed > 0 {
        return Err(format!("{failed} batches failed"));
    }
    let latency = &report["batch_latency"];
    Ok(Run {
        gbps: report["throughput_gbps"].as_f64().ok_or("the report has no throughput_gbps")?,
        p50_us: latency["p50_us"].as_f64(),
        p99_us: latency["p99_us"].as_f64(),
        duration_s: report["duration_s"].as_f64().unwrap_or(args.duration),
        batch_size: batch,
    })
}

/// A target process this sweep started; stopped (SIGINT, then SIGKILL)
/// when dropped.
struct Target {
    child: Child,
    segment: String,
}

impl Target {
    fn start(exe: &std::path::Path, path: Path, buffer_size: u64, args: &SweepArgs) -> Result<Self, String> {
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "--mode=target"])
            .arg(format!("--metadata_server={}", args.metadata_server))
            .arg(format!("--local_server_name={}", args.local_server_name))
            .arg(format!("--protocol={}", path.protocol()))
            .arg(format!("--buffer_size={buffer_size}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // The target of TCP and the same-host path allows both; the
        // initiator's settings choose.
        path.env(&mut cmd);
        if path != Path::RdmaEmu {
            cmd.env("SHARDWIRE_LOCAL", "1").env_remove("MC_FORCE_TCP");
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start a target: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let segment =
                lines.by_ref().map_while(Result::ok).find_map(|l| l.strip_prefix("segment_id=").map(str::to_string));
            let _ = tx.send(segment);
            // Keep draining so the target never blocks on a full pipe.
            for _ in lines {}
        });
        let mut target = Self { child, segment: String::new() };
        match rx.recv_timeout(TARGET_START_TIMEOUT) {
            Ok(Some(segment)) => {
                target.segment = segment;
                Ok(target)
            }
            Ok(None) => Err(format!("the {} target exited without a segment_id", path.name())),
            Err(_) => Err(format!(
                "the {} target printed no segment_id within {} s",
                path.name(),
                TARGET_START_TIMEOUT.as_secs()
            )),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: signals the child this process started and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_to_fit_the_buffer() {
        assert_eq!(batch_for(4096, 2, 32, 256 << 20), 32);
        assert_eq!(batch_for(16 << 20, 2, 32, 256 << 20), 8);
        assert_eq!(batch_for(16 << 20, 2, 32, 32 << 20), 1);
    }

    #[test]
    fn paths_parse() {
        assert_eq!(Path::parse("rdma").unwrap(), Path::RdmaEmu);
        assert_eq!(Path::parse("local").unwrap().protocol(), "tcp");
        assert!(Path::parse("carrier-pigeon").is_err());
    }
}
