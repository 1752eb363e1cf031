//! The `shardwire` command line.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Run a benchmark against its anchors and print ratios.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
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

fn main() -> ExitCode {
    logger::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Topo(args) => topo_command(&args),
        Command::Bench { what: BenchWhat::Runtime(args) } => runtime_bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("shardwire: {message}");
            ExitCode::FAILURE
        }
    }
}

fn topo_command(args: &TopoArgs) -> Result<(), String> {
    let root = args.sysfs_root.clone().unwrap_or_else(|| PathBuf::from("/sys"));
    let topology = topo::discover(&root).map_err(|e| e.to_string())?;
    let (matrix, matrix_from) = match PriorityMatrix::from_env().map_err(|e| e.to_string())? {
        Some((path, matrix)) => (matrix, path.display().to_string()),
        None => (PriorityMatrix::discover(&topology), "discovered".to_string()),
    };
    if args.json {
        println!("{}", matrix.to_json());
        return Ok(());
    }
    let mut options = PlanOptions::from_env().map_err(|e| e.to_string())?;
    if args.sysfs_root.is_some() {
        // A fixture's CPUs are not this process's: its affinity does not apply.
        options.allowed = None;
    }
    let plan = Plan::derive(&topology, &matrix, &matrix_from, &options).map_err(|e| e.to_string())?;
    if args.plan_json {
        let doc = serde_json::json!({ "topology": topology, "plan": plan });
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?);
    } else {
        print!("{}", topo::report::render(&topology, &matrix, &plan));
    }
    Ok(())
}

fn runtime_bench(args: &RuntimeBenchArgs) -> Result<(), String> {
    let options = bench::runtime::Options {
        messages: args.messages.max(1),
        round_trips: args.round_trips.max(1),
        parked_round_trips: args.parked_round_trips.max(1),
        repeats: args.repeats.max(1),
        ..bench::runtime::Options::default()
    };
    let report = bench::runtime::run(&options);
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
