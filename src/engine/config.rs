//! Engine settings, with the `MC_*` environment variables Mooncake reads.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::mooncake::frame;
use crate::runtime::Runtime;
use crate::transport::tcp::{ClientLimits, sock};

/// Default `MC_TRANSFER_TIMEOUT`.
pub const TRANSFER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// How an engine is set up.
#[derive(Clone)]
pub struct EngineConfig {
    /// `MC_TRANSFER_TIMEOUT` (seconds): bounds every transfer, plus 1 ns
    /// per byte as in Mooncake.
    pub transfer_timeout: Duration,
    /// `MC_METADATA_SERVER`: used when `initialize` gets an empty server.
    pub default_metadata_server: Option<String>,
    /// `MC_TCP_BIND_ADDRESS`: where the RPC and data ports listen, and the
    /// address the segment advertises. Mooncake only advertises it.
    pub bind_address: Option<IpAddr>,
    /// `MC_LEGACY_RPC_PORT_BINDING`: bind the port of `local_hostname`
    /// (shardwire always does when one is given).
    pub legacy_rpc_port_binding: bool,
    /// `MC_MIN_RPC_PORT` / `MC_MAX_RPC_PORT`: the random-port range.
    pub port_range: (u16, u16),
    /// `MC_HANDSHAKE_MAX_LENGTH`: the RPC frame limit.
    pub handshake_max_len: u64,
    /// `MC_FORCE_TCP`: use TCP even where RDMA devices exist.
    pub force_tcp: bool,
    /// Requests above this many bytes are striped over the shards, in
    /// pieces of this size (`SHARDWIRE_STRIPE_BYTES`).
    pub stripe_bytes: u64,
    /// Per-connection limits of the TCP client.
    pub client_limits: ClientLimits,
    /// The shards to run on; `None` for the process-wide shared runtime.
    pub runtime: Option<Arc<Runtime>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            transfer_timeout: TRANSFER_TIMEOUT_DEFAULT,
            default_metadata_server: None,
            bind_address: None,
            legacy_rpc_port_binding: false,
            port_range: sock::PORT_RANGE_DEFAULT,
            handshake_max_len: frame::MAX_LEN_DEFAULT,
            force_tcp: false,
            stripe_bytes: 512 << 10,
            client_limits: ClientLimits::default(),
            runtime: None,
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

impl EngineConfig {
    /// The defaults with the environment applied. Malformed values keep the
    /// default and are logged, as Mooncake's config parser does.
    pub fn from_env() -> Self {
        let mut c = Self::default();
        if let Ok(v) = std::env::var("MC_TRANSFER_TIMEOUT") {
            match v.trim().parse::<u64>() {
                Ok(s) if (1..=86_400).contains(&s) => c.transfer_timeout = Duration::from_secs(s),
                _ => log::warn!("MC_TRANSFER_TIMEOUT={v:?} is not 1..=86400 seconds; using 30"),
            }
        }
        c.default_metadata_server = std::env::var("MC_METADATA_SERVER").ok().filter(|s| !s.trim().is_empty());
        if let Ok(v) = std::env::var("MC_TCP_BIND_ADDRESS")
            && !v.trim().is_empty()
        {
            match v.trim().trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
                Ok(ip) => c.bind_address = Some(ip),
                Err(_) => log::warn!("MC_TCP_BIND_ADDRESS={v:?} is not an IP address; ignoring it"),
            }
        }
        c.legacy_rpc_port_binding = env_flag("MC_LEGACY_RPC_PORT_BINDING");
        c.port_range = sock::port_range_from_env();
        c.handshake_max_len = frame::max_len_from_env();
        c.force_tcp = env_flag("MC_FORCE_TCP");
        if let Ok(v) = std::env::var("SHARDWIRE_INFLIGHT_BYTES") {
            match v.trim().parse::<u64>() {
                Ok(b) if (4096..=(1 << 34)).contains(&b) => {
                    c.client_limits.awaiting_bytes_max = b;
                    c.client_limits.awaiting_bytes_local_max = b;
                }
                _ => log::warn!("SHARDWIRE_INFLIGHT_BYTES={v:?} is not 4096..=17179869184; using the default"),
            }
        }
        if let Ok(v) = std::env::var("SHARDWIRE_STRIPE_BYTES") {
            match v.trim().parse::<u64>() {
                Ok(b) if (4096..=(1 << 30)).contains(&b) => c.stripe_bytes = b,
                _ => log::warn!("SHARDWIRE_STRIPE_BYTES={v:?} is not 4096..=1073741824; using 512 KiB"),
            }
        }
        c
    }
}
