//! Every environment variable shardwire reads, read and checked in one
//! place.
//!
//! [`VARS`] lists each `MC_*`, `SHARDWIRE_*` and `AIS_*` variable with what
//! it accepts; [`Settings::from_env`] reads them all and fails on the first
//! value outside its range, with an error that names the variable, the
//! value and what is accepted. The engine's `initialize`, the stream and
//! receiver constructors, the shared runtime and the CLI all start from
//! [`Settings`], so a bad value stops them with that message instead of
//! being replaced by a default in silence.
//!
//! Conventions, the same for every variable:
//! - unset and empty (or only spaces) are the same: the default;
//! - booleans are `1`/`0`, `true`/`false`, `t`/`f`, `yes`/`no`, `on`/`off`,
//!   in any case (Go's `ParseBool` spellings and Mooncake's both work);
//! - numbers are whole decimal numbers, with spaces around them allowed.
//!
//! Variables are read when a component starts (each `TransferEngine::new`,
//! `Stream::new`, `Receiver::bind`), not cached for the process.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What a variable accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole number in `min..=max`, in `unit`.
    Int {
        min: u64,
        max: u64,
        unit: &'static str,
    },
    /// A port for the random range: 1024..=65535, outside the usual
    /// ephemeral range 32768..=60999 (as Mooncake requires).
    Port,
    Bool,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// An IPv4 or IPv6 address (brackets allowed).
    Ip,
    /// A CPU list: `0-3,8`.
    CpuList,
    /// Any text (a path, a name, an address list).
    Text,
    /// Text in the form described, checked when read.
    Form(&'static str),
}

/// One environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    /// Other spellings read when `name` is unset (Mooncake's typos).
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    /// The default, as the README states it.
    pub default: &'static str,
    pub meaning: &'static str,
}

impl Var {
    /// What the variable accepts, in words.
    pub fn accepted(&self) -> String {
        match self.kind {
            Kind::Int { min, max, unit: "" } => format!("a whole number in {min}..={max}"),
            Kind::Int { min, max, unit } => format!("a whole number of {unit} in {min}..={max}"),
            Kind::Port => "a port in 1024..=65535 outside 32768..=60999".into(),
            Kind::Bool => "a boolean: 1/0, true/false, t/f, yes/no or on/off".into(),
            Kind::Choice(words) => format!("one of {}", words.join(", ")),
            Kind::Ip => "an IP address".into(),
            Kind::CpuList => "a CPU list such as 0-3,8".into(),
            Kind::Text => "any text".into(),
            Kind::Form(what) => what.into(),
        }
    }
}

const fn int(
    name: &'static str,
    min: u64,
    max: u64,
    unit: &'static str,
    default: &'static str,
    meaning: &'static str,
) -> Var {
    Var { name, aliases: &[], kind: Kind::Int { min, max, unit }, default, meaning }
}

const fn var(name: &'static str, kind: Kind, default: &'static str, meaning: &'static str) -> Var {
    Var { name, aliases: &[], kind, default, meaning }
}

pub const TRANSFER_TIMEOUT: Var = int(
    "MC_TRANSFER_TIMEOUT",
    1,
    86_400,
    "seconds",
    "30",
    "seconds that bound every transfer (plus 1 ns per byte, as Mooncake); also how long a caller waits for room in a full queue",
);
pub const METADATA_SERVER: Var = var(
    "MC_METADATA_SERVER",
    Kind::Text,
    "unset",
    "`metadata_server` when `initialize` gets an empty one (then `P2PHANDSHAKE`)",
);
pub const TCP_BIND_ADDRESS: Var =
    var("MC_TCP_BIND_ADDRESS", Kind::Ip, "unset", "the address the RPC and data ports bind, and the one advertised");
pub const TCP_DATA_PORT: Var = int(
    "SHARDWIRE_TCP_DATA_PORT",
    1,
    65_535,
    "",
    "random in `MC_MIN_RPC_PORT`..=`MC_MAX_RPC_PORT`",
    "the port the TCP data listener binds",
);
pub const TCP_DATA_ADVERTISE: Var = var(
    "SHARDWIRE_TCP_DATA_ADVERTISE",
    Kind::Form(ADVERTISE_FORM),
    "the address bound",
    "the `tcp_data_host` and `tcp_data_port` this engine's segment descriptor publishes, in place of the data listener's own (a proxy or NAT in front of it); the listener does not move",
);
/// What `SHARDWIRE_TCP_DATA_ADVERTISE` may hold.
const ADVERTISE_FORM: &str =
    "host:port, such as 10.0.0.5:16000 (a name, an IPv4 address or a bracketed IPv6 one; port 1 to 65535)";
pub const LEGACY_RPC_PORT_BINDING: Var = var(
    "MC_LEGACY_RPC_PORT_BINDING",
    Kind::Bool,
    "false",
    "with etcd, bind the port of `local_hostname` (12001 if it has none); in P2P mode shardwire always binds a port given",
);
pub const MIN_RPC_PORT: Var = Var {
    name: "MC_MIN_RPC_PORT",
    aliases: &["MC_MIN_PRC_PORT"],
    kind: Kind::Port,
    default: "15000",
    meaning: "the low end of the random port range (not above `MC_MAX_RPC_PORT`)",
};
pub const MAX_RPC_PORT: Var = Var {
    name: "MC_MAX_RPC_PORT",
    aliases: &["MC_MAX_PRC_PORT"],
    kind: Kind::Port,
    default: "17000",
    meaning: "the high end of the random port range",
};
pub const HANDSHAKE_MAX_LENGTH: Var =
    int("MC_HANDSHAKE_MAX_LENGTH", 1, 128 << 20, "bytes", "1048576", "the largest RPC frame");
pub const FORCE_TCP: Var =
    var("MC_FORCE_TCP", Kind::Bool, "false", "use TCP even where RDMA devices exist (always the case in this build)");
pub const CUSTOM_TOPO_JSON: Var = var(
    "MC_CUSTOM_TOPO_JSON",
    Kind::Text,
    "unset",
    "path of a NIC priority matrix in Mooncake's format; empty means discover",
);
pub const SLICE_SIZE: Var =
    int("MC_SLICE_SIZE", 4096, 64 << 20, "bytes", "65536", "RDMA slice size (the RDMA transport is not wired yet)");
pub const FRAGMENT_RATIO: Var = int(
    "MC_FRAGMENT_RATIO",
    1,
    1024,
    "",
    "4",
    "an RDMA request's tail of up to slice/ratio bytes rides in its last slice",
);
pub const RETRY_CNT: Var = int("MC_RETRY_CNT", 0, 100, "tries", "9", "retries of one RDMA slice, each on another rail");
pub const NUM_QP_PER_EP: Var = int("MC_NUM_QP_PER_EP", 1, 64, "queue pairs", "2", "queue pairs per RDMA endpoint");
pub const MAX_WR: Var =
    int("MC_MAX_WR", 1, 16_384, "work requests", "256", "outstanding RDMA work requests per queue pair");
pub const MAX_CQE_PER_CTX: Var =
    int("MC_MAX_CQE_PER_CTX", 64, 1 << 22, "entries", "4096", "entries of each RDMA completion queue");
pub const RDMA_RAIL_PAUSE_SECONDS: Var =
    int("MC_RDMA_RAIL_PAUSE_SECONDS", 0, 3600, "seconds", "30", "how long a peer rail with 5 errors in 5 s rests");
pub const TCP_CRC32C: Var = var(
    "SHARDWIRE_TCP_CRC32C",
    Kind::Bool,
    "false",
    "an end-to-end CRC-32C on TCP transfers to shardwire targets that advertise it (Mooncake peers never see it); a mismatch fails the request with code -400",
);
pub const FABRIC: Var = var(
    "SHARDWIRE_FABRIC",
    Kind::Choice(&["auto", "none", "verbs", "sim", "emu"]),
    "auto",
    "the RDMA devices `protocol = \"rdma\"` uses: `verbs` (the machine's, in builds with the `verbs` feature), `sim` (simulated, inside this process), `emu` (emulated, across processes over sockets), `none` (TCP); `auto` is `verbs` where built in, else `none`",
);
pub const IB_PORT: Var = int("MC_IB_PORT", 1, 255, "", "1", "the port of each RDMA device used");
pub const IB_SL: Var = int("MC_IB_SL", 0, 15, "", "0", "the InfiniBand service level of RDMA queue pairs");
pub const IB_TC: Var = var(
    "MC_IB_TC",
    Kind::Form("a traffic class in 0..=255, or -1 for none"),
    "-1 (none)",
    "the traffic class of RDMA queue pairs' packets: 0 to 255, or -1 for none",
);
pub const MAX_SGE: Var =
    int("MC_MAX_SGE", 1, 4, "entries", "4", "scatter-gather entries per RDMA work request at most");
pub const MAX_INLINE: Var = int(
    "MC_MAX_INLINE",
    0,
    1024,
    "bytes",
    "64",
    "RDMA writes of at most this many bytes go inline (the device takes them at post)",
);
pub const SLICE_TIMEOUT: Var = int(
    "MC_SLICE_TIMEOUT",
    1,
    86_400,
    "seconds",
    "off",
    "an RDMA slice posted this long breaks its queue pair (the flush retries it on another rail)",
);
pub const TE_FILTERS: Var = var(
    "MC_TE_FILTERS",
    Kind::Form(DEVICE_NAMES),
    "all devices",
    "the RDMA devices that may be used, comma-separated (with `initialize`'s `device_name`, both must allow one)",
);
pub const SIM_DEVICES: Var = var(
    "SHARDWIRE_SIM_DEVICES",
    Kind::Form(DEVICE_NAMES),
    "sim0,sim1",
    "the devices of the `sim` fabric, comma-separated",
);
pub const EMU_DEVICES: Var = var(
    "SHARDWIRE_EMU_DEVICES",
    Kind::Form(DEVICE_NAMES),
    "emu0,emu1",
    "the devices of the `emu` fabric, comma-separated: each serves RDMA reads and writes on a port of `MC_TCP_BIND_ADDRESS` (127.0.0.1 when unset); NUMA nodes from `MC_CUSTOM_TOPO_JSON`",
);
pub const EMU_FAULTS: Var = var(
    "SHARDWIRE_EMU_FAULTS",
    Kind::Form(EMU_FAULTS_FORM),
    "none",
    "faults the `emu` fabric injects, comma-separated: `<device>:down@<s>` and `<device>:up@<s>` (the port, that many seconds after the fabric is made), `<device>:error_every=<n>` (every nth work request fails, its queue pair to ERR)",
);
/// What `SHARDWIRE_EMU_FAULTS` may hold.
const EMU_FAULTS_FORM: &str = "comma-separated faults <device>:down@<seconds>, <device>:up@<seconds> (0 to 86400, decimals allowed) or <device>:error_every=<n> (n >= 1), on devices of SHARDWIRE_EMU_DEVICES, at most 64";
/// What a list of device names may hold.
const DEVICE_NAMES: &str = "1 to 16 distinct device names of letters, digits, _, - and ., comma-separated";
pub const MAX_EP_PER_CTX: Var =
    int("MC_MAX_EP_PER_CTX", 1, 1 << 20, "endpoints", "65536", "RDMA endpoints per local device at most");
pub const MTU: Var = int("MC_MTU", 256, 4096, "bytes", "4096", "the largest RDMA path MTU");
pub const GID_INDEX: Var = Var {
    name: "MC_GID_INDEX",
    aliases: &["NCCL_IB_GID_INDEX"],
    kind: Kind::Int { min: 0, max: 255, unit: "" },
    default: "chosen: routable RoCE v2 on IPv4 first",
    meaning: "the GID table entry RDMA uses",
};
pub const METADATA_CLUSTER_ID: Var = var(
    "MC_METADATA_CLUSTER_ID",
    Kind::Text,
    "unset",
    "metadata keys (etcd, HTTP, redis) go under `mooncake/<id>/` instead of `mooncake/`",
);
pub const REDIS_USERNAME: Var =
    var("MC_REDIS_USERNAME", Kind::Text, "unset", "the ACL user of `redis://` metadata (sent with `AUTH`)");
pub const REDIS_PASSWORD: Var =
    var("MC_REDIS_PASSWORD", Kind::Text, "unset", "the password of `redis://` metadata (sent with `AUTH`)");
pub const REDIS_DB_INDEX: Var =
    int("MC_REDIS_DB_INDEX", 0, 255, "", "0", "the database of `redis://` metadata (sent with `SELECT`)");
pub const ETCD_TTL: Var =
    int("SHARDWIRE_ETCD_TTL", 1, 86_400, "seconds", "30", "seconds of the lease the etcd keys hang off");
pub const LOCAL: Var = var(
    "SHARDWIRE_LOCAL",
    Kind::Bool,
    "true",
    "carry transfers to engines on this host through shared memory or cross-memory attach; false keeps them on TCP (so does `MC_FORCE_TCP`)",
);
pub const LOCAL_THREADS: Var = int(
    "SHARDWIRE_LOCAL_THREADS",
    1,
    64,
    "threads",
    "the cores this process may run on, at most 4",
    "threads (the calling one among them) that share one large copy to an engine on this host; 1 copies in the calling thread alone",
);
pub const CORES: Var =
    var("SHARDWIRE_CORES", Kind::CpuList, "one per physical core", "CPU list for the shards, e.g. `0-3,8`");
pub const SPIN_US: Var =
    int("SHARDWIRE_SPIN_US", 0, 1_000_000, "microseconds", "20", "µs an idle shard spins before parking");
pub const SPIN_ADAPTIVE: Var =
    var("SHARDWIRE_SPIN_ADAPTIVE", Kind::Bool, "true", "shrink the spin budget while the core is contended");
pub const URING_SETUP: Var = var(
    "SHARDWIRE_URING_SETUP",
    Kind::Choice(&["auto", "plain"]),
    "auto",
    "`plain` forces the io_uring set-up without SINGLE_ISSUER/DEFER_TASKRUN/COOP_TASKRUN",
);
pub const INFLIGHT_BYTES: Var = int(
    "SHARDWIRE_INFLIGHT_BYTES",
    4096,
    1 << 34,
    "bytes",
    "a quarter of L2 to peers on this host, 64 MiB to others",
    "payload bytes one connection may have awaiting answers",
);
pub const STRIPE_BYTES: Var = int(
    "SHARDWIRE_STRIPE_BYTES",
    4096,
    1 << 30,
    "bytes",
    "524288",
    "requests larger than this are striped over the shards in pieces of this size",
);
pub const STREAM_BATCH: Var = int(
    "SHARDWIRE_STREAM_BATCH",
    4096,
    64 << 20,
    "bytes",
    "131072",
    "object bytes per stream send once 256 objects are in (tuning)",
);
pub const STREAM_BATCH_MAX: Var = int(
    "SHARDWIRE_STREAM_BATCH_MAX",
    4096,
    64 << 20,
    "bytes",
    "4194304",
    "the most object bytes one stream send carries (tuning)",
);
pub const STREAM_SNDBUF: Var = int(
    "SHARDWIRE_STREAM_SNDBUF",
    0,
    1 << 30,
    "bytes",
    "half the in-flight cap to peers on this host; autotuned to others",
    "a stream socket's send buffer; 0 leaves it to the kernel's autotuning",
);
pub const STREAM_PIPE: Var =
    int("SHARDWIRE_STREAM_PIPE", 4096, 1 << 30, "bytes", "262144", "bytes of each received stream's pipe");
pub const STREAM_RECV: Var = int(
    "SHARDWIRE_STREAM_RECV",
    4096,
    64 << 20,
    "bytes",
    "65536",
    "the most one receive of a stream receiver asks for",
);
pub const STREAM_PLACEMENT: Var = var(
    "SHARDWIRE_STREAM_PLACEMENT",
    Kind::Choice(&["auto", "same", "other"]),
    "auto",
    "the shard serving an accepted stream: the one its packets arrive on (`same`), the next (`other`), or `auto`: the next for a peer on this host, the same for others",
);
pub const STREAM_PIN: Var =
    var("SHARDWIRE_STREAM_PIN", Kind::Bool, "true", "pin each decoding thread to its shard's core");
pub const LOG: Var = var(
    "SHARDWIRE_LOG",
    Kind::Choice(&["error", "warn", "info", "debug", "trace", "off"]),
    "warn",
    "the CLI's log level",
);
pub const METRICS_ADDR: Var = var(
    "SHARDWIRE_METRICS_ADDR",
    Kind::Form("host:port, such as 127.0.0.1:9100 (port 0 picks one)"),
    "unset",
    "serve Prometheus metrics at `http://host:port/metrics` from any engine of the process, Python included",
);
pub const AUTH_KEY: Var = var(
    "SHARDWIRE_AUTH_KEY",
    Kind::Form("a key of 16 to 4096 bytes"),
    "unset",
    "require every connection to the RPC and data ports, both ways, to prove this shared key first (Mooncake peers cannot)",
);
pub const AUTH_KEY_FILE: Var = var(
    "SHARDWIRE_AUTH_KEY_FILE",
    Kind::Form("the path of a file holding a key of 16 to 4096 bytes (one trailing newline is dropped)"),
    "unset",
    "`SHARDWIRE_AUTH_KEY`, read from a file that only its owner may read",
);
pub const TE_METRIC: Var = var(
    "MC_TE_METRIC",
    Kind::Bool,
    "false",
    "log Mooncake's metric line (throughput, latency distribution) every `MC_TE_METRIC_INTERVAL_SECONDS`",
);
pub const TE_METRIC_INTERVAL_SECONDS: Var =
    int("MC_TE_METRIC_INTERVAL_SECONDS", 1, 86_400, "seconds", "5", "the period of `MC_TE_METRIC`'s line");
pub const STREAM_BURST_NUM: Var = int(
    "AIS_STREAM_BURST_NUM",
    1,
    4096,
    "objects",
    "1024",
    "objects a stream may hold queued or in flight before `send` blocks",
);
pub const STREAM_DRY_RUN: Var = var(
    "AIS_STREAM_DRY_RUN",
    Kind::Bool,
    "false",
    "a receiver reads and discards every object without calling handlers",
);

/// Every variable, in the README's order.
pub const VARS: &[Var] = &[
    TRANSFER_TIMEOUT,
    METADATA_SERVER,
    TCP_BIND_ADDRESS,
    TCP_DATA_PORT,
    TCP_DATA_ADVERTISE,
    LEGACY_RPC_PORT_BINDING,
    METADATA_CLUSTER_ID,
    ETCD_TTL,
    REDIS_USERNAME,
    REDIS_PASSWORD,
    REDIS_DB_INDEX,
    MIN_RPC_PORT,
    MAX_RPC_PORT,
    HANDSHAKE_MAX_LENGTH,
    FORCE_TCP,
    CUSTOM_TOPO_JSON,
    SLICE_SIZE,
    FRAGMENT_RATIO,
    RETRY_CNT,
    NUM_QP_PER_EP,
    MAX_WR,
    MAX_CQE_PER_CTX,
    RDMA_RAIL_PAUSE_SECONDS,
    FABRIC,
    SIM_DEVICES,
    EMU_DEVICES,
    EMU_FAULTS,
    MAX_EP_PER_CTX,
    MTU,
    GID_INDEX,
    IB_PORT,
    IB_SL,
    IB_TC,
    MAX_SGE,
    MAX_INLINE,
    SLICE_TIMEOUT,
    TE_FILTERS,
    LOCAL,
    LOCAL_THREADS,
    CORES,
    SPIN_US,
    SPIN_ADAPTIVE,
    URING_SETUP,
    INFLIGHT_BYTES,
    STRIPE_BYTES,
    TCP_CRC32C,
    STREAM_BURST_NUM,
    STREAM_DRY_RUN,
    STREAM_BATCH,
    STREAM_BATCH_MAX,
    STREAM_SNDBUF,
    STREAM_PIPE,
    STREAM_RECV,
    STREAM_PLACEMENT,
    STREAM_PIN,
    METRICS_ADDR,
    TE_METRIC,
    TE_METRIC_INTERVAL_SECONDS,
    AUTH_KEY,
    AUTH_KEY_FILE,
    LOG,
];

/// The README's table of variables, from [`VARS`].
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | accepts | meaning |\n|---|---|---|---|\n");
    for v in VARS {
        let mut names = format!("`{}`", v.name);
        if !v.aliases.is_empty() {
            let others: Vec<String> = v.aliases.iter().map(|n| format!("`{n}`")).collect();
            names = format!("{names} (or {})", others.join(", "));
        }
        out.push_str(&format!("| {names} | {} | {} | {} |\n", v.default, v.accepted(), v.meaning));
    }
    out
}

/// A value a variable does not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable, as it was spelt in the environment.
    pub var: String,
    pub value: String,
    /// What it accepts.
    pub accepted: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?} is not valid: expected {}", self.var, self.value, self.accepted)
    }
}

impl std::error::Error for ConfigError {}

/// A value that is never shown (a password): `Debug` prints `<hidden>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

/// Bytes that are never shown (a key): `Debug` prints their length only.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes hidden>", self.0.len())
    }
}

/// Where a received stream is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// By where the peer is (another core for a peer on this host).
    Auto,
    /// On the shard its packets arrive on.
    Same,
    /// On the next shard.
    Other,
}

/// The RDMA variables, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    pub slice_bytes: u64,
    pub fragment_ratio: u64,
    pub retry_cnt: u32,
    pub qps_per_endpoint: usize,
    pub max_wr: u32,
    pub cqe: u32,
    pub rail_pause_s: u64,
    pub max_endpoints: usize,
    pub mtu: u32,
    pub gid_index: Option<usize>,
    /// `MC_IB_PORT`, `MC_IB_SL`, `MC_IB_TC` (-1 is 0: no class).
    pub ib_port: u8,
    pub ib_sl: u8,
    pub ib_tc: u8,
    /// `MC_MAX_SGE`, `MC_MAX_INLINE`.
    pub max_sge: u32,
    pub max_inline: u32,
    /// `MC_SLICE_TIMEOUT`, if set.
    pub slice_timeout: Option<Duration>,
    /// `MC_TE_FILTERS`: the devices allowed, or `None` for all.
    pub te_filters: Option<Vec<String>>,
}

/// Which RDMA devices `protocol = "rdma"` uses (`SHARDWIRE_FABRIC`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FabricChoice {
    /// The machine's devices where the build has the `verbs` feature.
    #[default]
    Auto,
    None,
    Verbs,
    /// The simulated fabric, with these devices (`SHARDWIRE_SIM_DEVICES`).
    Sim(Vec<String>),
    /// The emulated fabric, across processes: these devices
    /// (`SHARDWIRE_EMU_DEVICES`) under these faults (`SHARDWIRE_EMU_FAULTS`).
    Emu {
        devices: Vec<String>,
        faults: Vec<EmuFault>,
    },
}

/// Faults in one `SHARDWIRE_EMU_FAULTS` at most.
pub const EMU_FAULTS_MAX: usize = 64;

/// A fault the `emu` fabric injects (`SHARDWIRE_EMU_FAULTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmuFault {
    /// `<device>:down@<seconds>`: the device's port goes down this long
    /// after the fabric is made.
    Down { device: String, after: Duration },
    /// `<device>:up@<seconds>`: and comes back.
    Up { device: String, after: Duration },
    /// `<device>:error_every=<n>`: every `n`th work request the device
    /// carries out fails with a rail error, its queue pair going to ERR.
    ErrorEvery { device: String, every: u64 },
}

/// Every variable's value, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub transfer_timeout: Duration,
    pub metadata_server: Option<String>,
    pub tcp_bind_address: Option<IpAddr>,
    /// `SHARDWIRE_TCP_DATA_PORT`, if set.
    pub tcp_data_port: Option<u16>,
    /// `SHARDWIRE_TCP_DATA_ADVERTISE`: host (without brackets) and port.
    pub tcp_data_advertise: Option<(String, u16)>,
    pub legacy_rpc_port_binding: bool,
    pub metadata_cluster_id: Option<String>,
    pub etcd_ttl: Duration,
    pub redis_username: Option<String>,
    pub redis_password: Option<Secret>,
    /// `SHARDWIRE_AUTH_KEY`, or the contents of `SHARDWIRE_AUTH_KEY_FILE`.
    pub auth_key: Option<SecretBytes>,
    pub redis_db_index: Option<u8>,
    pub rpc_port_range: (u16, u16),
    pub handshake_max_len: u64,
    pub force_tcp: bool,
    /// `SHARDWIRE_TCP_CRC32C`.
    pub tcp_crc32c: bool,
    pub custom_topo_json: Option<PathBuf>,
    /// `MC_SLICE_SIZE`, `MC_FRAGMENT_RATIO`, `MC_RETRY_CNT`,
    /// `MC_NUM_QP_PER_EP`, `MC_MAX_WR`, `MC_MAX_CQE_PER_CTX`,
    /// `MC_RDMA_RAIL_PAUSE_SECONDS` in seconds, `MC_MAX_EP_PER_CTX`,
    /// `MC_MTU` and `MC_GID_INDEX`.
    pub rdma: RdmaSettings,
    /// `SHARDWIRE_FABRIC` (with `SHARDWIRE_SIM_DEVICES` for `sim`, and
    /// `SHARDWIRE_EMU_DEVICES` and `SHARDWIRE_EMU_FAULTS` for `emu`).
    pub fabric: FabricChoice,
    /// `SHARDWIRE_LOCAL`.
    pub local: bool,
    /// `SHARDWIRE_LOCAL_THREADS`, or its default.
    pub local_threads: usize,
    /// `SHARDWIRE_CORES`, parsed.
    pub cores: Option<Vec<u32>>,
    /// `SHARDWIRE_SPIN_US`, if set.
    pub spin: Option<Duration>,
    pub spin_adaptive: Option<bool>,
    /// `SHARDWIRE_URING_SETUP=plain`.
    pub uring_plain: bool,
    pub inflight_bytes: Option<u64>,
    pub stripe_bytes: u64,
    pub stream_burst: usize,
    pub stream_dry_run: bool,
    pub stream_batch_bytes: usize,
    pub stream_batch_bytes_max: usize,
    /// `SHARDWIRE_STREAM_SNDBUF`, if set (0: autotune).
    pub stream_sndbuf: Option<usize>,
    pub stream_pipe_bytes: usize,
    pub stream_recv_bytes: usize,
    pub stream_placement: Placement,
    pub stream_pin: bool,
    /// `SHARDWIRE_METRICS_ADDR`, checked to be `host:port`.
    pub metrics_addr: Option<String>,
    /// `MC_TE_METRIC`: the period of the metric line, if on.
    pub te_metric: Option<Duration>,
    pub log: Option<String>,
}

impl Default for Settings {
    /// Every variable unset.
    fn default() -> Self {
        Self::from_lookup(|_| None).expect("the defaults are valid")
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `get` (for tests, and for a CLI that
    /// takes them from elsewhere).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { get: &get };
        let min_port = r.port(&MIN_RPC_PORT)?.unwrap_or(15000);
        let max_port = r.port(&MAX_RPC_PORT)?.unwrap_or(17000);
        if min_port > max_port {
            let (name, value) = r.raw(&MIN_RPC_PORT).unwrap_or((MIN_RPC_PORT.name.into(), min_port.to_string()));
            return Err(ConfigError {
                var: name,
                value,
                accepted: format!("a port not above MC_MAX_RPC_PORT ({max_port})"),
            });
        }
        let placement = match r.choice(&STREAM_PLACEMENT)?.as_deref() {
            Some("same") => Placement::Same,
            Some("other") => Placement::Other,
            _ => Placement::Auto,
        };
        Ok(Self {
            transfer_timeout: Duration::from_secs(r.int(&TRANSFER_TIMEOUT)?.unwrap_or(30)),
            metadata_server: r.text(&METADATA_SERVER),
            tcp_bind_address: r.ip(&TCP_BIND_ADDRESS)?,
            tcp_data_port: r.int(&TCP_DATA_PORT)?.map(|p| p as u16),
            tcp_data_advertise: match r.text(&TCP_DATA_ADVERTISE) {
                None => None,
                Some(t) => Some(advertised(&t)?),
            },
            legacy_rpc_port_binding: r.boolean(&LEGACY_RPC_PORT_BINDING)?.unwrap_or(false),
            metadata_cluster_id: r.text(&METADATA_CLUSTER_ID),
            etcd_ttl: Duration::from_secs(r.int(&ETCD_TTL)?.unwrap_or(30)),
            redis_username: r.text(&REDIS_USERNAME),
            redis_password: r.raw(&REDIS_PASSWORD).map(|(_, p)| Secret(p)),
            auth_key: auth_key(&r)?,
            redis_db_index: r.int(&REDIS_DB_INDEX)?.map(|i| i as u8),
            rpc_port_range: (min_port, max_port),
            handshake_max_len: r.int(&HANDSHAKE_MAX_LENGTH)?.unwrap_or(1 << 20),
            force_tcp: r.boolean(&FORCE_TCP)?.unwrap_or(false),
            tcp_crc32c: r.boolean(&TCP_CRC32C)?.unwrap_or(false),
            custom_topo_json: r.text(&CUSTOM_TOPO_JSON).map(PathBuf::from),
            fabric: match r.choice(&FABRIC)?.as_deref() {
                Some("sim") => FabricChoice::Sim(device_names(
                    &SIM_DEVICES,
                    r.text(&SIM_DEVICES).as_deref().unwrap_or("sim0,sim1"),
                )?),
                Some("emu") => {
                    let devices = device_names(&EMU_DEVICES, r.text(&EMU_DEVICES).as_deref().unwrap_or("emu0,emu1"))?;
                    let faults = match r.text(&EMU_FAULTS) {
                        None => Vec::new(),
                        Some(t) => emu_faults(&t, &devices)?,
                    };
                    FabricChoice::Emu { devices, faults }
                }
                Some("none") => FabricChoice::None,
                Some("verbs") => FabricChoice::Verbs,
                _ => FabricChoice::Auto,
            },
            rdma: RdmaSettings {
                slice_bytes: r.int(&SLICE_SIZE)?.unwrap_or(65_536),
                fragment_ratio: r.int(&FRAGMENT_RATIO)?.unwrap_or(4),
                retry_cnt: r.int(&RETRY_CNT)?.unwrap_or(9) as u32,
                qps_per_endpoint: r.int(&NUM_QP_PER_EP)?.unwrap_or(2) as usize,
                max_wr: r.int(&MAX_WR)?.unwrap_or(256) as u32,
                cqe: r.int(&MAX_CQE_PER_CTX)?.unwrap_or(4096) as u32,
                rail_pause_s: r.int(&RDMA_RAIL_PAUSE_SECONDS)?.unwrap_or(30),
                max_endpoints: r.int(&MAX_EP_PER_CTX)?.unwrap_or(65_536) as usize,
                mtu: r.int(&MTU)?.unwrap_or(4096) as u32,
                gid_index: r.int(&GID_INDEX)?.map(|i| i as usize),
                ib_port: r.int(&IB_PORT)?.unwrap_or(1) as u8,
                ib_sl: r.int(&IB_SL)?.unwrap_or(0) as u8,
                ib_tc: match r.text(&IB_TC) {
                    None => 0,
                    Some(t) => traffic_class(&t)?,
                },
                max_sge: r.int(&MAX_SGE)?.unwrap_or(4) as u32,
                max_inline: r.int(&MAX_INLINE)?.unwrap_or(64) as u32,
                slice_timeout: r.int(&SLICE_TIMEOUT)?.map(Duration::from_secs),
                te_filters: match r.text(&TE_FILTERS) {
                    None => None,
                    Some(t) => Some(device_names(&TE_FILTERS, &t)?),
                },
            },
            local: r.boolean(&LOCAL)?.unwrap_or(true),
            local_threads: r.int(&LOCAL_THREADS)?.map_or_else(default_local_threads, |n| n as usize),
            cores: r.cpu_list(&CORES)?,
            spin: r.int(&SPIN_US)?.map(Duration::from_micros),
            spin_adaptive: r.boolean(&SPIN_ADAPTIVE)?,
            uring_plain: r.choice(&URING_SETUP)?.as_deref() == Some("plain"),
            inflight_bytes: r.int(&INFLIGHT_BYTES)?,
            stripe_bytes: r.int(&STRIPE_BYTES)?.unwrap_or(512 << 10),
            stream_burst: r.int(&STREAM_BURST_NUM)?.unwrap_or(1024) as usize,
            stream_dry_run: r.boolean(&STREAM_DRY_RUN)?.unwrap_or(false),
            stream_batch_bytes: r.int(&STREAM_BATCH)?.unwrap_or(128 << 10) as usize,
            stream_batch_bytes_max: r.int(&STREAM_BATCH_MAX)?.unwrap_or(4 << 20) as usize,
            stream_sndbuf: r.int(&STREAM_SNDBUF)?.map(|b| b as usize),
            stream_pipe_bytes: r.int(&STREAM_PIPE)?.unwrap_or(256 << 10) as usize,
            stream_recv_bytes: r.int(&STREAM_RECV)?.unwrap_or(64 << 10) as usize,
            stream_placement: placement,
            stream_pin: r.boolean(&STREAM_PIN)?.unwrap_or(true),
            metrics_addr: match r.text(&METRICS_ADDR) {
                None => None,
                Some(t) => Some(host_port(&METRICS_ADDR, &t)?),
            },
            te_metric: {
                let every = Duration::from_secs(r.int(&TE_METRIC_INTERVAL_SECONDS)?.unwrap_or(5));
                r.boolean(&TE_METRIC)?.unwrap_or(false).then_some(every)
            },
            log: r.choice(&LOG)?,
        })
    }
}

/// Same-host copy threads when `SHARDWIRE_LOCAL_THREADS` is unset: as many
/// as the cores this process may run on, up to 4 (past that, memory
/// bandwidth is the limit and the cores are better left to the caller).
fn default_local_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// `host:port`: a host (a name, an IPv4 address, or an IPv6 one in
/// brackets) and a port number.
fn host_port(var: &Var, text: &str) -> Result<String, ConfigError> {
    let t = text.trim();
    let bad = || ConfigError { var: var.name.into(), value: text.into(), accepted: var.accepted() };
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && !host.contains(char::is_whitespace)
        && (host.starts_with('[') == host.ends_with(']'))
        && (host.starts_with('[') || !host.contains(':'));
    if !host_ok || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(t.to_string())
}

/// `SHARDWIRE_TCP_DATA_ADVERTISE`: `host:port` with a port that can be
/// connected to (not 0), split; an IPv6 host loses its brackets, as
/// `tcp_data_host` carries it.
fn advertised(text: &str) -> Result<(String, u16), ConfigError> {
    let bad =
        || ConfigError { var: TCP_DATA_ADVERTISE.name.into(), value: text.into(), accepted: ADVERTISE_FORM.into() };
    let checked = host_port(&TCP_DATA_ADVERTISE, text)?;
    let (host, port) = checked.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// `MC_IB_TC`: -1 (Mooncake's "none", sent as 0) or a class of 0 to 255.
fn traffic_class(text: &str) -> Result<u8, ConfigError> {
    match text.trim() {
        "-1" => Ok(0),
        t => t.parse::<u8>().map_err(|_| ConfigError {
            var: IB_TC.name.into(),
            value: text.into(),
            accepted: "a traffic class in 0..=255, or -1 for none".into(),
        }),
    }
}

/// A list of device names (`SHARDWIRE_SIM_DEVICES`, `MC_TE_FILTERS`): 1
/// to 16 names, each 1 to 64 bytes of letters, digits, `_`, `-` and `.`,
/// none twice.
fn device_names(var: &Var, text: &str) -> Result<Vec<String>, ConfigError> {
    let bad = || ConfigError { var: var.name.into(), value: text.into(), accepted: DEVICE_NAMES.into() };
    let names: Vec<String> = text.split(',').map(|n| n.trim().to_string()).collect();
    let good = |n: &String| {
        !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    };
    let distinct = names.iter().collect::<std::collections::BTreeSet<_>>().len() == names.len();
    if names.is_empty() || names.len() > 16 || !distinct || !names.iter().all(good) {
        return Err(bad());
    }
    Ok(names)
}

/// `SHARDWIRE_EMU_FAULTS`: faults on `devices`, comma-separated; an error
/// names the entry at fault and why.
fn emu_faults(text: &str, devices: &[String]) -> Result<Vec<EmuFault>, ConfigError> {
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    let bad = |entry: &str, why: String| ConfigError {
        var: EMU_FAULTS.name.into(),
        value: text.into(),
        accepted: format!("{EMU_FAULTS_FORM}; entry {entry:?}: {why}"),
    };
    if entries.len() > EMU_FAULTS_MAX {
        return Err(bad(entries[EMU_FAULTS_MAX], format!("more than {EMU_FAULTS_MAX} faults")));
    }
    let mut faults = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some((device, what)) = entry.split_once(':') else {
            return Err(bad(entry, "expected <device>:<fault>".into()));
        };
        let device = device.trim().to_string();
        if !devices.contains(&device) {
            return Err(bad(entry, format!("no device {device:?} in SHARDWIRE_EMU_DEVICES ({})", devices.join(","))));
        }
        let what = what.trim();
        let seconds = |text: &str| match text.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
            _ => Err(bad(entry, format!("{:?} is not a number of seconds in 0..=86400", text.trim()))),
        };
        let fault = if let Some(at) = what.strip_prefix("down@") {
            EmuFault::Down { device, after: seconds(at)? }
        } else if let Some(at) = what.strip_prefix("up@") {
            EmuFault::Up { device, after: seconds(at)? }
        } else if let Some(n) = what.strip_prefix("error_every=") {
            match n.trim().parse::<u64>() {
                Ok(every) if every >= 1 => EmuFault::ErrorEvery { device, every },
                _ => return Err(bad(entry, format!("{:?} is not a whole number of at least 1", n.trim()))),
            }
        } else {
            return Err(bad(entry, format!("unknown fault {what:?}: expected down@, up@ or error_every=")));
        };
        faults.push(fault);
    }
    Ok(faults)
}

/// The one boolean convention.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// The authentication key, from `SHARDWIRE_AUTH_KEY` or the file
/// `SHARDWIRE_AUTH_KEY_FILE` names (not both). Errors never show the key.
fn auth_key(r: &Reader<'_>) -> Result<Option<SecretBytes>, ConfigError> {
    const BYTES: std::ops::RangeInclusive<usize> = 16..=4096;
    let bad = |v: &Var, name: String, value: String, why: String| ConfigError {
        var: name,
        value,
        accepted: format!("{} ({why})", v.accepted()),
    };
    let inline = r.raw(&AUTH_KEY);
    let file = r.raw(&AUTH_KEY_FILE);
    let (var, name, key) = match (inline, file) {
        (None, None) => return Ok(None),
        (Some((name, _)), Some(_)) => {
            return Err(bad(&AUTH_KEY, name, "<hidden>".into(), "set it or SHARDWIRE_AUTH_KEY_FILE, not both".into()));
        }
        (Some((name, key)), None) => (&AUTH_KEY, name, key.into_bytes()),
        (None, Some((name, path))) => {
            let path = path.trim().to_string();
            let mut key =
                std::fs::read(&path).map_err(|e| bad(&AUTH_KEY_FILE, name.clone(), path.clone(), e.to_string()))?;
            // A key others may read is no secret: refuse it, as ssh does.
            let mode =
                std::fs::metadata(&path).map_or(0, |m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
            if mode & 0o077 != 0 {
                let why = format!("mode {:o}: others may read it; chmod 600 it", mode & 0o777);
                return Err(bad(&AUTH_KEY_FILE, name, path, why));
            }
            if key.last() == Some(&b'\n') {
                key.pop();
            }
            (&AUTH_KEY_FILE, name, key)
        }
    };
    if !BYTES.contains(&key.len()) {
        return Err(bad(var, name, "<hidden>".into(), format!("it has {} bytes", key.len())));
    }
    Ok(Some(SecretBytes(key)))
}

struct Reader<'a> {
    get: &'a dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    /// The variable's name as found and its value, if set and not empty.
    fn raw(&self, v: &Var) -> Option<(String, String)> {
        std::iter::once(v.name)
            .chain(v.aliases.iter().copied())
            .find_map(|n| (self.get)(n).filter(|t| !t.trim().is_empty()).map(|t| (n.to_string(), t)))
    }

    fn bad(&self, v: &Var, name: String, value: String) -> ConfigError {
        ConfigError { var: name, value, accepted: v.accepted() }
    }

    fn int(&self, v: &Var) -> Result<Option<u64>, ConfigError> {
        let Kind::Int { min, max, .. } = v.kind else { unreachable!("{} is not a number", v.name) };
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(self.bad(v, name, text)),
        }
    }

    fn port(&self, v: &Var) -> Result<Option<u16>, ConfigError> {
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        match text.trim().parse::<u16>() {
            Ok(p) if p >= 1024 && !(32768..=60999).contains(&p) => Ok(Some(p)),
            _ => Err(self.bad(v, name, text)),
        }
    }

    fn boolean(&self, v: &Var) -> Result<Option<bool>, ConfigError> {
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        parse_bool(&text).map(Some).ok_or_else(|| self.bad(v, name, text))
    }

    fn choice(&self, v: &Var) -> Result<Option<String>, ConfigError> {
        let Kind::Choice(words) = v.kind else { unreachable!("{} is not a choice", v.name) };
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        let word = text.trim().to_ascii_lowercase();
        if words.contains(&word.as_str()) { Ok(Some(word)) } else { Err(self.bad(v, name, text)) }
    }

    fn ip(&self, v: &Var) -> Result<Option<IpAddr>, ConfigError> {
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        match text.trim().trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
            Ok(ip) => Ok(Some(ip)),
            Err(_) => Err(self.bad(v, name, text)),
        }
    }

    fn cpu_list(&self, v: &Var) -> Result<Option<Vec<u32>>, ConfigError> {
        let Some((name, text)) = self.raw(v) else { return Ok(None) };
        match crate::topo::cpulist::parse(text.trim()) {
            Ok(cpus) if !cpus.is_empty() => Ok(Some(cpus)),
            _ => Err(self.bad(v, name, text)),
        }
    }

    fn text(&self, v: &Var) -> Option<String> {
        self.raw(v).map(|(_, t)| t.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(name: &str, value: &str) -> Result<Settings, ConfigError> {
        let (name, value) = (name.to_string(), value.to_string());
        Settings::from_lookup(move |n| (n == name).then(|| value.clone()))
    }

    #[test]
    fn the_auth_key_is_checked_and_never_shown() {
        let key = "a-shared-key-of-some-length";
        assert_eq!(with("SHARDWIRE_AUTH_KEY", key).unwrap().auth_key.unwrap().0, key.as_bytes());
        let e = with("SHARDWIRE_AUTH_KEY", "too-short").unwrap_err();
        assert!(e.to_string().contains("9 bytes") && !e.to_string().contains("too-short"), "{e}");
        assert!(!format!("{:?}", with("SHARDWIRE_AUTH_KEY", key).unwrap()).contains(key));

        let dir = std::env::temp_dir().join(format!("sw-auth-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, format!("{key}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = file.to_string_lossy().to_string();
        let e = with("SHARDWIRE_AUTH_KEY_FILE", &path).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // One trailing newline is not part of the key.
        assert_eq!(with("SHARDWIRE_AUTH_KEY_FILE", &path).unwrap().auth_key.unwrap().0, key.as_bytes());
        let e = with("SHARDWIRE_AUTH_KEY_FILE", "/nonexistent/key").unwrap_err();
        assert!(e.var == "SHARDWIRE_AUTH_KEY_FILE" && e.to_string().contains("No such file"), "{e}");
        let both = |n: &str| match n {
            "SHARDWIRE_AUTH_KEY" => Some(key.to_string()),
            "SHARDWIRE_AUTH_KEY_FILE" => Some(path.clone()),
            _ => None,
        };
        let e = Settings::from_lookup(both).unwrap_err();
        assert!(e.to_string().contains("not both") && !e.to_string().contains(key), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn refused(v: &Var, value: &str) {
        let e = with(v.name, value).expect_err(&format!("{}={value:?} must be refused", v.name));
        assert_eq!(e.var, v.name);
        let text = e.to_string();
        assert!(text.contains(v.name) && text.contains(&v.accepted()), "{text}");
    }

    #[test]
    fn the_advertised_data_address_is_host_and_a_port() {
        let got = |v: &str| with(TCP_DATA_ADVERTISE.name, v).unwrap().tcp_data_advertise;
        assert_eq!(got("127.0.0.1:16000"), Some(("127.0.0.1".into(), 16000)));
        assert_eq!(got(" [::1]:7 "), Some(("::1".into(), 7)));
        assert_eq!(got("node-1:65535"), Some(("node-1".into(), 65535)));
        for bad in ["16000", "h:0", "::1:80", "[]:80", "h:port", "h:65536", ":80", "a b:1"] {
            refused(&TCP_DATA_ADVERTISE, bad);
        }
        assert_eq!(with(TCP_DATA_PORT.name, "40000").unwrap().tcp_data_port, Some(40000));
        refused(&TCP_DATA_PORT, "0");
    }

    #[test]
    fn the_metrics_address_is_host_and_port() {
        for ok in ["127.0.0.1:9100", " [::1]:0 ", "node-1:80"] {
            assert_eq!(with(METRICS_ADDR.name, ok).unwrap().metrics_addr.as_deref(), Some(ok.trim()));
        }
        for bad in ["9100", "::1:80", "host:port", "host:65536", ":80", "a b:1"] {
            refused(&METRICS_ADDR, bad);
        }
        assert_eq!(with(TE_METRIC.name, "on").unwrap().te_metric, Some(Duration::from_secs(5)));
        assert_eq!(with(TE_METRIC_INTERVAL_SECONDS.name, "7").unwrap().te_metric, None, "off unless MC_TE_METRIC");
    }

    /// Every variable: its bounds, one past them, and garbage.
    #[test]
    fn each_variable_takes_its_range_and_refuses_the_rest() {
        for v in VARS {
            assert!(with(v.name, "").is_ok(), "{}: empty is unset", v.name);
            assert!(with(v.name, "   ").is_ok(), "{}: blank is unset", v.name);
            match v.kind {
                Kind::Int { min, max, .. } => {
                    assert!(with(v.name, &min.to_string()).is_ok(), "{} min", v.name);
                    assert!(with(v.name, &format!(" {max} ")).is_ok(), "{} max", v.name);
                    if min > 0 {
                        refused(v, &(min - 1).to_string());
                    }
                    refused(v, &(max + 1).to_string());
                    refused(v, "abc");
                    refused(v, "-1");
                    refused(v, "1.5");
                }
                Kind::Port => {
                    // The other end of the range out of the way, so only
                    // this value is judged.
                    let other = |n: &str| match n {
                        "MC_MIN_RPC_PORT" => Some("1024".to_string()),
                        "MC_MAX_RPC_PORT" => Some("65535".to_string()),
                        _ => None,
                    };
                    for ok in ["1024", "32767", "61000", "65535"] {
                        let got = Settings::from_lookup(|n| if n == v.name { Some(ok.to_string()) } else { other(n) });
                        assert!(got.is_ok(), "{}={ok}: {got:?}", v.name);
                    }
                    for bad in ["1023", "32768", "60999", "65536", "port"] {
                        refused(v, bad);
                    }
                }
                Kind::Bool => {
                    for ok in ["1", "0", "true", "FALSE", "t", "F", "yes", "No", "on", "off"] {
                        assert!(with(v.name, ok).is_ok(), "{}={ok}", v.name);
                    }
                    refused(v, "maybe");
                    refused(v, "2");
                }
                Kind::Choice(words) => {
                    for w in words {
                        assert!(with(v.name, w).is_ok(), "{}={w}", v.name);
                        assert!(with(v.name, &w.to_ascii_uppercase()).is_ok());
                    }
                    refused(v, "bogus");
                }
                Kind::Ip => {
                    assert!(with(v.name, "10.1.2.3").is_ok());
                    assert!(with(v.name, "[::1]").is_ok());
                    refused(v, "not-an-ip");
                    refused(v, "10.1.2.256");
                }
                Kind::CpuList => {
                    assert!(with(v.name, "0-1,3").is_ok());
                    refused(v, "one");
                    refused(v, "3-1");
                }
                Kind::Text => assert!(with(v.name, "anything at all").is_ok()),
                // The fabrics' own lists are read only with their fabric.
                Kind::Form(_) if [SIM_DEVICES.name, EMU_DEVICES.name, EMU_FAULTS.name].contains(&v.name) => {}
                Kind::Form(_) => refused(v, "anything at all"),
            }
        }
    }

    #[test]
    fn the_issue_examples_name_the_variable_and_the_range() {
        let e = with("MC_TRANSFER_TIMEOUT", "abc").unwrap_err();
        assert_eq!(
            e.to_string(),
            "MC_TRANSFER_TIMEOUT=\"abc\" is not valid: expected a whole number of seconds in 1..=86400"
        );
        let e = with("SHARDWIRE_STREAM_RECV", "0").unwrap_err();
        assert!(e.to_string().contains("SHARDWIRE_STREAM_RECV=\"0\"") && e.to_string().contains("4096..=67108864"));
    }

    #[test]
    fn values_land_in_their_fields() {
        let s = with("MC_TRANSFER_TIMEOUT", " 7 ").unwrap();
        assert_eq!(s.transfer_timeout, Duration::from_secs(7));
        assert!(with("AIS_STREAM_DRY_RUN", "T").unwrap().stream_dry_run);
        assert_eq!(with("MC_TCP_BIND_ADDRESS", "[::1]").unwrap().tcp_bind_address, Some("::1".parse().unwrap()));
        assert_eq!(with("SHARDWIRE_CORES", "0-2").unwrap().cores, Some(vec![0, 1, 2]));
        assert_eq!(with("SHARDWIRE_STREAM_PLACEMENT", "other").unwrap().stream_placement, Placement::Other);
        assert_eq!(with("SHARDWIRE_LOCAL_THREADS", "3").unwrap().local_threads, 3);
        assert_eq!(with("MC_SLICE_SIZE", "131072").unwrap().rdma.slice_bytes, 131_072);
        assert_eq!(with("MC_REDIS_DB_INDEX", "255").unwrap().redis_db_index, Some(255));
        assert!(with("MC_REDIS_DB_INDEX", "256").unwrap_err().to_string().contains("MC_REDIS_DB_INDEX=\"256\""));
        // A password is taken as it is, spaces and all.
        let s = with("MC_REDIS_PASSWORD", " p w ").unwrap();
        assert_eq!(s.redis_password.as_ref().map(|p| p.0.as_str()), Some(" p w "));
        assert!(!format!("{s:?}").contains(" p w "), "never in a Debug dump");
        assert!(with("MC_MAX_WR", "0").unwrap_err().to_string().contains("MC_MAX_WR=\"0\""));
        assert_eq!(Settings::default().rdma.retry_cnt, 9);
        assert_eq!(with("NCCL_IB_GID_INDEX", "3").unwrap().rdma.gid_index, Some(3));
        assert_eq!(
            with("SHARDWIRE_FABRIC", "sim").unwrap().fabric,
            FabricChoice::Sim(vec!["sim0".into(), "sim1".into()])
        );
        assert_eq!(Settings::default().fabric, FabricChoice::Auto);
        assert_eq!(with("SHARDWIRE_FABRIC", "verbs").unwrap().fabric, FabricChoice::Verbs);
        assert_eq!(with("SHARDWIRE_FABRIC", "none").unwrap().fabric, FabricChoice::None);
        assert_eq!(with("MC_IB_TC", "-1").unwrap().rdma.ib_tc, 0);
        assert_eq!(with("MC_IB_TC", "106").unwrap().rdma.ib_tc, 106);
        assert!(with("MC_IB_TC", "256").unwrap_err().to_string().contains("MC_IB_TC"));
        assert_eq!(
            with("MC_TE_FILTERS", "rxe0, rxe1").unwrap().rdma.te_filters,
            Some(vec!["rxe0".into(), "rxe1".into()])
        );
        assert!(with("MC_TE_FILTERS", "rxe0,rxe0").unwrap_err().to_string().contains("MC_TE_FILTERS"));
        assert_eq!(with("MC_SLICE_TIMEOUT", "3").unwrap().rdma.slice_timeout, Some(Duration::from_secs(3)));
        assert_eq!(Settings::default().rdma.slice_timeout, None);
        assert_eq!(with("MC_MAX_SGE", "2").unwrap().rdma.max_sge, 2);
        assert!(with("MC_MAX_SGE", "5").is_err());
        let both = |n: &str| match n {
            "SHARDWIRE_FABRIC" => Some("sim".to_string()),
            "SHARDWIRE_SIM_DEVICES" => Some("a,a".to_string()),
            _ => None,
        };
        assert!(Settings::from_lookup(both).unwrap_err().to_string().contains("SHARDWIRE_SIM_DEVICES"));
        assert!(with("MC_MTU", "9000").unwrap_err().to_string().contains("256..=4096"));
        assert!(with("SHARDWIRE_LOCAL_THREADS", "0").unwrap_err().to_string().contains("1..=64"));
        let d = Settings::default();
        assert!((1..=4).contains(&d.local_threads), "{}", d.local_threads);
        assert_eq!((d.rpc_port_range, d.stream_burst, d.stripe_bytes), ((15000, 17000), 1024, 512 << 10));
    }

    #[test]
    fn the_readme_lists_every_variable_as_this_module_checks_it() {
        let readme = include_str!("../README.md");
        let table = markdown_table();
        assert!(readme.contains(&table), "README.md's environment table is out of date; it should read:\n{table}");
    }

    /// `SHARDWIRE_FABRIC=emu`: its devices and faults, and errors that
    /// name the entry at fault.
    #[test]
    fn the_emu_fabric_its_devices_and_its_faults() {
        let emu = |devices: Option<&str>, faults: Option<&str>| {
            let (devices, faults) = (devices.map(str::to_string), faults.map(str::to_string));
            Settings::from_lookup(move |n| match n {
                "SHARDWIRE_FABRIC" => Some("emu".to_string()),
                "SHARDWIRE_EMU_DEVICES" => devices.clone(),
                "SHARDWIRE_EMU_FAULTS" => faults.clone(),
                _ => None,
            })
        };
        let two = vec!["emu0".to_string(), "emu1".to_string()];
        assert_eq!(emu(None, None).unwrap().fabric, FabricChoice::Emu { devices: two, faults: vec![] });
        let s = emu(Some("mlx5_0, mlx5_1"), Some("mlx5_1:down@1, mlx5_1:up@2.5,mlx5_0:error_every=7")).unwrap();
        let FabricChoice::Emu { devices, faults } = s.fabric else { panic!("{:?}", s.fabric) };
        assert_eq!(devices, ["mlx5_0", "mlx5_1"]);
        assert_eq!(
            faults,
            [
                EmuFault::Down { device: "mlx5_1".into(), after: Duration::from_secs(1) },
                EmuFault::Up { device: "mlx5_1".into(), after: Duration::from_millis(2500) },
                EmuFault::ErrorEvery { device: "mlx5_0".into(), every: 7 },
            ]
        );
        for (faults, entry, why) in [
            ("emu0:down@1,emu9:down@1", "emu9:down@1", "no device \"emu9\""),
            ("emu0:down@soon", "emu0:down@soon", "not a number of seconds"),
            ("emu0:down@-1", "emu0:down@-1", "not a number of seconds"),
            ("emu0:down@inf", "emu0:down@inf", "not a number of seconds"),
            ("emu1:error_every=0", "emu1:error_every=0", "at least 1"),
            ("emu1:sideways", "emu1:sideways", "unknown fault"),
            ("emu1", "emu1", "<device>:<fault>"),
            ("emu0:up@1,,emu0:up@2", "", "<device>:<fault>"),
        ] {
            let e = emu(None, Some(faults)).unwrap_err();
            let text = e.to_string();
            assert_eq!(e.var, "SHARDWIRE_EMU_FAULTS");
            assert!(text.contains(&format!("entry {entry:?}")) && text.contains(why), "{faults}: {text}");
        }
        let many = vec!["emu0:up@1"; EMU_FAULTS_MAX + 1].join(",");
        assert!(emu(None, Some(&many)).unwrap_err().to_string().contains("more than 64 faults"));
        assert!(emu(Some("a,a"), None).unwrap_err().to_string().contains("SHARDWIRE_EMU_DEVICES"));
        // Read only with their fabric.
        assert_eq!(with("SHARDWIRE_EMU_FAULTS", "garbage").unwrap().fabric, FabricChoice::Auto);
    }

    #[test]
    fn mooncakes_misspelt_port_names_and_the_ordering_rule() {
        assert_eq!(with("MC_MIN_PRC_PORT", "16000").unwrap().rpc_port_range, (16000, 17000));
        let e = with("MC_MAX_PRC_PORT", "40000").unwrap_err();
        assert_eq!(e.var, "MC_MAX_PRC_PORT", "the error names the spelling that was set");
        let both = |n: &str| match n {
            "MC_MIN_RPC_PORT" => Some("16500".to_string()),
            "MC_MAX_RPC_PORT" => Some("16000".to_string()),
            _ => None,
        };
        let e = Settings::from_lookup(both).unwrap_err();
        assert!(e.to_string().contains("not above MC_MAX_RPC_PORT (16000)"), "{e}");
    }
}
