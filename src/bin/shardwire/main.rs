//! The `shardwire` command line.

mod fail;
mod flags;
mod logger;
mod node;
mod stream_cmd;
mod sweep_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fail::Failure;

use shardwire::bench;
use shardwire::topo::{self, Plan, PlanOptions, PriorityMatrix};

#[derive(Parser)]
#[command(name = "shardwire", version, about = "A thread-per-core transfer engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the machine's topology and the shard placement plan.
    Topo(TopoArgs),
    /// The transfer benchmark (Mooncake transfer_engine_bench's flags), or
    /// another benchmark named by a subcommand.
    Bench(Box<BenchArgs>),
    /// Object streams (AIStore's transport): listen, send.
    #[command(subcommand)]
    Stream(stream_cmd::StreamCommand),
    /// A transfer node: serves a memory pool as a segment, receives object
    /// streams, serves /metrics, /healthz and /readyz; drains on SIGTERM.
    Node(Box<node::NodeArgs>),
    /// An HTTP metadata server for Mooncake and shardwire engines.
    #[command(name = "metadata-server", long_about = METADATA_SERVER_ABOUT)]
    MetadataServer(MetadataServerArgs),
}

const METADATA_SERVER_ABOUT: &str = "An HTTP metadata server in Mooncake's protocol, for Mooncake and shardwire \
engines alike: give them metadata_server=\"http://HOST:PORT/metadata\".

It follows the rules of the Mooncake wheel's mooncake_http_metadata_server: GET, PUT and DELETE on \
/metadata?key=KEY; 400 for a missing or blank key; 404 for a missing entry; 400 for a PUT over an rpc_meta key \
that is present. Beyond it: with --state, every change is on disk before it is acknowledged, so a restart loses \
nothing; and every --probe-interval-ms each engine's RPC port (from its rpc_meta key) is connected to, and after \
--probe-failures refusals in a row that engine's rpc_meta and ram keys are deleted (logged as a warning).";

#[derive(clap::Args)]
struct MetadataServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", value_name = "HOST:PORT")]
    listen: String,
    /// Keep the keys in this file (rewritten atomically on every change,
    /// read back at start). Without it, a restart forgets everything.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Milliseconds between probes of each registered engine; 0: no probes.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    probe_interval_ms: u64,
    /// Refused probes in a row before an engine's keys are dropped.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    probe_failures: u32,
    /// Most bytes of one value.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    body_bytes_max: usize,
    /// Most keys held.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    keys_max: usize,
    /// Most bytes held, keys and values together.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    held_bytes_max: usize,
    /// Most connections at once (more get 503).
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    connections_max: u64,
    /// Milliseconds a client may take to send one request.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    request_timeout_ms: u64,
    /// Milliseconds a kept connection may sit idle.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    idle_timeout_ms: u64,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    transfer: TransferBenchArgs,
}

/// transfer_engine_bench's flags, spelt as it spells them.
#[derive(clap::Args)]
struct TransferBenchArgs {
    /// initiator or target; omit to run both in this process over loopback.
    #[arg(long, value_parser = ["initiator", "target"])]
    mode: Option<String>,
    /// P2PHANDSHAKE (no server), or a metadata server.
    #[arg(long = "metadata_server", default_value = "P2PHANDSHAKE")]
    metadata_server: String,
    /// This engine's host[:port].
    #[arg(long = "local_server_name", default_value = "127.0.0.1")]
    local_server_name: String,
    /// The target's segment name (what the target prints as segment_id=...).
    #[arg(long = "segment_id")]
    segment_id: Option<String>,
    #[arg(long, default_value = "tcp")]
    protocol: String,
    #[arg(long = "device_name", default_value = "")]
    device_name: String,
    /// read or write.
    #[arg(long, default_value = "read", value_parser = ["read", "write"])]
    operation: String,
    /// Bytes per request.
    #[arg(long = "block_size", default_value_t = 65536)]
    block_size: u64,
    /// Requests per batch.
    #[arg(long = "batch_size", default_value_t = 128)]
    batch_size: usize,
    /// Initiator threads.
    #[arg(long, default_value_t = 12)]
    threads: usize,
    /// Seconds to run (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Bytes of buffer on each side.
    #[arg(long = "buffer_size", default_value_t = 1 << 30)]
    buffer_size: u64,
    /// What the target serves: a managed buffer, or memory of its own it
    /// registers (peers on this host then copy by cross-memory attach).
    #[arg(long = "target_memory", default_value = "managed", value_parser = ["managed", "registered"])]
    target_memory: String,
    /// GB, GiB, Gb, MB, MiB, Mb or KB.
    #[arg(long = "report_unit", default_value = "GB", value_parser = ["GB", "GiB", "Gb", "MB", "MiB", "Mb", "KB"])]
    report_unit: String,
    #[arg(long = "report_precision", default_value_t = 2)]
    report_precision: usize,
    /// Print the report as JSON on the last line as well (a target: its
    /// segment as a JSON line after segment_id=...); a failure as
    /// {"error": {"code", "message"}}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TopoArgs {
    /// Print only the NIC priority matrix, in Mooncake's MC_CUSTOM_TOPO_JSON format.
    #[arg(long)]
    json: bool,
    /// Print the topology and the plan as JSON.
    #[arg(long, conflicts_with = "json")]
    plan_json: bool,
    /// Read this sysfs tree instead of /sys (a fixture such as topo/dgx-h100/sys).
    #[arg(long, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The shard runtime: SPSC message rate and foreign-thread round trips.
    Runtime(RuntimeBenchArgs),
    /// Object streams: a sender and a receiver on loopback.
    Stream(StreamBenchArgs),
    /// One huge batch against many batches of 1,000, the same bytes.
    Batches(BatchesBenchArgs),
    /// The RDMA software path of one shard on zero-cost simulated NICs.
    #[command(name = "rdma-sim")]
    RdmaSim(RdmaSimBenchArgs),
    /// The transfer bench over block sizes, reads and writes, and every
    /// path (TCP, same host, RDMA on the emu fabric): a JSON file and an SVG
    /// plot.
    Sweep(sweep_cmd::SweepArgs),
    /// Draws a sweep's JSON file (from `bench sweep` or
    /// tools/bench-vs-mooncake) as an SVG.
    Plot(sweep_cmd::PlotArgs),
}

#[derive(clap::Args)]
struct RdmaSimBenchArgs {
    /// Seconds per timed run.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Runs of each way (interleaved; medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Local NICs (the peer has as many).
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Bytes per request.
    #[arg(long = "block_size", default_value_t = 1 << 20)]
    block_size: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    depth: usize,
    /// read or write.
    #[arg(long, default_value = "write", value_parser = ["read", "write"])]
    operation: String,
    /// Print the report as JSON too.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BatchesBenchArgs {
    /// Requests in all.
    #[arg(long, default_value_t = 1_000_000)]
    requests: usize,
    /// Requests per batch in the many-batches run.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Bytes per request.
    #[arg(long = "block_size", default_value_t = 4096)]
    block_size: u64,
    /// read or write.
    #[arg(long, default_value = "write", value_parser = ["read", "write"])]
    operation: String,
    /// Runs of each shape (interleaved; medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print the report as JSON too.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct StreamBenchArgs {
    /// Object size (4096, 4KiB, 1MiB, ...).
    #[arg(long, default_value = "1MiB")]
    size: String,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Streams, each sending from a thread of its own.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// LZ4 block size (64K, 256K, 1M, 4M) to compress with.
    #[arg(long)]
    compress: Option<String>,
    /// End with a JSON line (throughput_gbps, objects_per_s, ...).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RuntimeBenchArgs {
    /// Messages per SPSC-rate run.
    #[arg(long, default_value_t = 5_000_000)]
    messages: u64,
    /// Round trips per spinning latency run.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// Round trips per parked latency run.
    #[arg(long, default_value_t = 2_000)]
    parked_round_trips: usize,
    /// Runs of each SPSC-rate measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

impl Command {
    /// Whether the command was asked for JSON, and so for JSON errors.
    fn json(&self) -> bool {
        match self {
            // `topo --json` prints a file for MC_CUSTOM_TOPO_JSON, often
            // redirected into one: its failures stay off stdout.
            Command::Topo(a) => a.plan_json,
            Command::Stream(c) => c.json(),
            Command::Node(a) => a.json,
            Command::MetadataServer(_) => false,
            Command::Bench(b) => match &b.what {
                Some(BenchWhat::Runtime(r)) => r.json,
                Some(BenchWhat::Stream(s)) => s.json,
                Some(BenchWhat::Batches(b)) => b.json,
                Some(BenchWhat::RdmaSim(r)) => r.json,
                Some(BenchWhat::Sweep(_) | BenchWhat::Plot(_)) => false,
                None => b.transfer.json,
            },
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message (with its usage) for people; a JSON error for
            // tools that asked for JSON.
            let _ = e.print();
            // (args_os: a flag that is not UTF-8 must not panic here.)
            let topo = std::env::args_os().nth(1).is_some_and(|c| c == "topo");
            if std::env::args_os().skip(1).any(|a| (a == "--json" && !topo) || a == "--plan-json") {
                println!("{}", fail::error_json("usage", &fail::clap_message(&e)));
            }
            return ExitCode::from(2);
        }
    };
    let json = cli.command.json();
    // Every variable is checked before anything starts: a bad value stops
    // the command with the message initialize() would give.
    let settings = match shardwire::config::Settings::from_env() {
        Ok(s) => s,
        Err(e) => return Failure::from(e).report(json),
    };
    // MC_TE_METRIC's line is an info line: asking for it shows it.
    let level = settings.log.as_deref().or(settings.te_metric.map(|_| "info"));
    logger::init(level);
    let result = match cli.command {
        Command::Topo(args) => topo_command(&args),
        Command::Stream(cmd) => stream_cmd::run(&cmd),
        Command::Node(args) => node::run(&args).map_err(|m| Failure::new("node", m)),
        Command::MetadataServer(args) => metadata_server(&args),
        Command::Bench(args) => match &args.what {
            Some(BenchWhat::Runtime(r)) => runtime_bench(r),
            Some(BenchWhat::Stream(s)) => stream_bench(s),
            Some(BenchWhat::Batches(b)) => batches_bench(b),
            Some(BenchWhat::RdmaSim(r)) => rdma_sim_bench(r, &settings),
            Some(BenchWhat::Sweep(s)) => sweep_cmd::sweep(s).map_err(|m| Failure::new("bench", m)),
            Some(BenchWhat::Plot(p)) => sweep_cmd::plot(p).map_err(|m| Failure::new("bench", m)),
            None => transfer_bench(&args.transfer),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(json),
    }
}

fn metadata_server(args: &MetadataServerArgs) -> Result<(), Failure> {
    use shardwire::meta::http_server::{Limits, PATH, Server};
    let limits = Limits {
        body_bytes_max: args.body_bytes_max,
        keys_max: args.keys_max,
        held_bytes_max: args.held_bytes_max,
        connections_max: args.connections_max as usize,
        request_timeout_ms: args.request_timeout_ms.max(1),
        idle_timeout_ms: args.idle_timeout_ms.max(1),
        probe_interval_ms: args.probe_interval_ms,
        probe_failures: args.probe_failures,
    };
    let server = Server::start(&args.listen, args.state.as_deref(), limits)
        .map_err(|e| Failure::new("metadata_server", format!("cannot start the metadata server: {e}")))?;
    // One line for scripts and people: where to point engines.
    println!("metadata_server=http://{}{PATH}", server.local_addr());
    log::info!(
        "metadata-server: listening on {}, state {}",
        server.local_addr(),
        args.state.as_ref().map_or("in memory only".into(), |p| p.display().to_string())
    );
    server.wait();
    Ok(())
}

fn topo_command(args: &TopoArgs) -> Result<(), Failure> {
    let root = args.sysfs_root.clone().unwrap_or_else(|| PathBuf::from("/sys"));
    let topology = topo::discover(&root)?;
    let (matrix, matrix_from) = match PriorityMatrix::from_env()? {
        Some((path, matrix)) => (matrix, path.display().to_string()),
        None => (PriorityMatrix::discover(&topology), "discovered".to_string()),
    };
    if args.json {
        println!("{}", matrix.to_json());
        return Ok(());
    }
    let mut options = PlanOptions::from_env()?;
    if args.sysfs_root.is_some() {
        // A fixture's CPUs are not this process's: its affinity does not apply.
        options.allowed = None;
    }
    let plan = Plan::derive(&topology, &matrix, &matrix_from, &options)?;
    if args.plan_json {
        let doc = serde_json::json!({ "topology": topology, "plan": plan });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", topo::report::render(&topology, &matrix, &plan));
    }
    Ok(())
}

fn runtime_bench(args: &RuntimeBenchArgs) -> Result<(), Failure> {
    let options = bench::runtime::Options {
        messages: args.messages.max(1),
        round_trips: args.round_trips.max(1),
        parked_round_trips: args.parked_round_trips.max(1),
        repeats: args.repeats.max(1),
        ..bench::runtime::Options::default()
    };
    let report = bench::runtime::run(&options);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// Longest timed run, in seconds (a day).
const DURATION_S_MAX: f64 = 86_400.0;

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Release);
}

fn transfer_bench(args: &TransferBenchArgs) -> Result<(), Failure> {
    use bench::transfer::{self, Mode, Options};
    if !args.duration.is_finite() || args.duration <= 0.0 || args.duration > DURATION_S_MAX {
        return Err(Failure::usage(format!("--duration {}: seconds in (0, {DURATION_S_MAX}]", args.duration)));
    }
    let options = Options {
        mode: match args.mode.as_deref() {
            Some("initiator") => Some(Mode::Initiator),
            Some("target") => Some(Mode::Target),
            _ => None,
        },
        metadata_server: args.metadata_server.clone(),
        local_server_name: args.local_server_name.clone(),
        segment_id: args.segment_id.clone(),
        protocol: args.protocol.clone(),
        device_name: args.device_name.clone(),
        operation: if args.operation == "write" {
            shardwire::proto::mooncake::tcp::Opcode::Write
        } else {
            shardwire::proto::mooncake::tcp::Opcode::Read
        },
        block_size: args.block_size,
        batch_size: args.batch_size,
        threads: args.threads,
        duration: std::time::Duration::from_secs_f64(args.duration),
        buffer_size: args.buffer_size,
        target_registered: args.target_memory == "registered",
        report_unit: args.report_unit.clone(),
        report_precision: args.report_precision,
        // Only the target's: the initiator's report is printed below.
        json: args.json && args.mode.as_deref() == Some("target"),
    };
    let report = match options.mode {
        Some(Mode::Target) => {
            // SAFETY: installs a handler that only stores to an atomic.
            unsafe {
                libc::signal(libc::SIGINT, on_stop_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_stop_signal as *const () as libc::sighandler_t);
            }
            return Ok(transfer::run_target(&options, &STOP)?);
        }
        Some(Mode::Initiator) => {
            let segment = options.segment_id.clone().ok_or_else(|| {
                Failure::usage("--mode=initiator needs --segment_id: give the segment_id=... the target printed")
            })?;
            transfer::run_initiator(&options, &segment)?
        }
        None => transfer::run_loopback(&options)?,
    };
    println!("{}", report.latency_line());
    println!("{}", report.mooncake_line(&options.report_unit, options.report_precision));
    println!("{}", report.memcpy_line());
    if let Some(line) = report.devices_line() {
        println!("{line}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn rdma_sim_bench(a: &RdmaSimBenchArgs, settings: &shardwire::config::Settings) -> Result<(), Failure> {
    use shardwire::bench::rdma_sim::{Options, run};
    use shardwire::transport::rdma::fabric::Verb;
    let duration = flags::positive_seconds("--duration", a.duration)?;
    let o = Options {
        duration,
        repeats: a.repeats,
        devices: a.devices,
        request_bytes: a.block_size,
        slice_bytes: settings.rdma.slice_bytes,
        depth: a.depth,
        operation: if a.operation == "read" { Verb::Read } else { Verb::Write },
        ..Options::default()
    };
    let r = run(&o)?;
    print!("{}", r.render());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn batches_bench(a: &BatchesBenchArgs) -> Result<(), Failure> {
    use shardwire::bench::batches::{Options, run};
    let operation = if a.operation == "read" {
        shardwire::proto::mooncake::tcp::Opcode::Read
    } else {
        shardwire::proto::mooncake::tcp::Opcode::Write
    };
    let o = Options {
        requests: a.requests,
        batch: a.batch,
        block_size: a.block_size,
        operation,
        repeats: a.repeats,
        ..Options::default()
    };
    let r = run(&o)?;
    print!("{}", r.render());
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn stream_bench(a: &StreamBenchArgs) -> Result<(), Failure> {
    use shardwire::bench::stream::{StreamBenchOptions, run};
    let size = flags::size("--size", &a.size)?;
    let duration = flags::positive_seconds("--duration", a.duration)?;
    let compression = flags::compress(a.compress.as_deref())?;
    let o = StreamBenchOptions { size, duration, streams: a.streams.max(1), compression };
    let r = run(&o)?;
    println!(
        "stream bench: {} streams, {} B objects, {:.2} s: {} objects, {:.3} GB/s, {:.0} objects/s",
        r.streams, r.size, r.seconds, r.objects, r.throughput_gbps, r.objects_per_s
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
