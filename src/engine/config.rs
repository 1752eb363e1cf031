//! Engine settings: the `MC_*` variables Mooncake reads, and shardwire's
//! own, taken from [`crate::config::Settings`] (which checks them).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Settings;
use crate::error::{TeError, TeResult};
use crate::proto::mooncake::frame;
use crate::runtime::Runtime;
use crate::transport::tcp::ClientLimits;

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
    /// `SHARDWIRE_TCP_DATA_PORT`: the data listener's port (else random
    /// in `port_range`).
    pub data_port: Option<u16>,
    /// `SHARDWIRE_TCP_DATA_ADVERTISE`: the data address the descriptor
    /// publishes instead of the listener's (a proxy in front of it).
    pub data_advertise: Option<(String, u16)>,
    /// `MC_LEGACY_RPC_PORT_BINDING`: bind the port of `local_hostname`
    /// (shardwire always does when one is given).
    pub legacy_rpc_port_binding: bool,
    /// `MC_MIN_RPC_PORT` / `MC_MAX_RPC_PORT`: the random-port range.
    pub port_range: (u16, u16),
    /// `MC_HANDSHAKE_MAX_LENGTH`: the RPC frame limit.
    pub handshake_max_len: u64,
    /// `MC_FORCE_TCP`: use TCP even where RDMA devices exist.
    pub force_tcp: bool,
    /// `SHARDWIRE_LOCAL`: peers on this host copy through shared memory
    /// and cross-memory attach (off with `MC_FORCE_TCP` too).
    pub local: bool,
    /// `SHARDWIRE_LOCAL_THREADS`: threads (the caller among them) that
    /// share one large same-host copy.
    pub local_threads: usize,
    /// `MC_METADATA_CLUSTER_ID`: metadata keys under `mooncake/<id>/`.
    pub metadata_cluster_id: Option<String>,
    /// `SHARDWIRE_ETCD_TTL`: the lease the etcd keys hang off.
    pub etcd_ttl: Duration,
    /// `MC_REDIS_USERNAME`, `MC_REDIS_PASSWORD`, `MC_REDIS_DB_INDEX`.
    pub redis: crate::meta::redis::RedisAuth,
    /// Requests above this many bytes are striped over the shards, in
    /// pieces of this size (`SHARDWIRE_STRIPE_BYTES`).
    pub stripe_bytes: u64,
    /// Per-connection limits of the TCP client.
    pub client_limits: ClientLimits,
    /// The shards to run on; `None` for the process-wide shared runtime.
    pub runtime: Option<Arc<Runtime>>,
    /// The RDMA devices `protocol = "rdma"` uses; `None`: none (TCP).
    pub fabric: Option<Arc<dyn crate::transport::rdma::fabric::Fabric>>,
    /// Why there is no fabric, for the warning of a fallback to TCP.
    pub no_fabric_why: String,
    /// `MC_TE_FILTERS`: the RDMA devices that may be used (`None`: all).
    pub rdma_devices_allowed: Option<Vec<String>>,
    /// The RDMA transport's knobs (`MC_SLICE_SIZE` and the rest).
    pub rdma: crate::transport::rdma::slices::RdmaConfig,
    /// `MC_CUSTOM_TOPO_JSON`: the priority matrix the RDMA devices follow
    /// (`None`: made from the devices' NUMA nodes).
    pub topo_json: Option<std::path::PathBuf>,
    /// `SHARDWIRE_METRICS_ADDR`: where the process serves `/metrics`.
    pub metrics_addr: Option<String>,
    /// `MC_TE_METRIC` (with its interval): log Mooncake's metric line.
    pub te_metric: Option<Duration>,
    /// `SHARDWIRE_AUTH_KEY` / `SHARDWIRE_AUTH_KEY_FILE`: the key every
    /// connection to and from the RPC and data ports proves first.
    pub auth: Option<crate::proto::auth::AuthKey>,
}

impl Default for EngineConfig {
    /// Every variable unset.
    fn default() -> Self {
        Self::from_settings(&Settings::default())
    }
}

impl EngineConfig {
    /// The settings of the environment; a bad value is an error that names
    /// the variable and what it accepts.
    pub fn from_env() -> TeResult<Self> {
        Settings::from_env().map(|s| Self::from_settings(&s)).map_err(|e| TeError::invalid(e.to_string()))
    }

    pub fn from_settings(s: &Settings) -> Self {
        let mut client_limits = ClientLimits::default();
        if let Some(b) = s.inflight_bytes {
            client_limits.awaiting_bytes_max = b;
            client_limits.awaiting_bytes_local_max = b;
        }
        client_limits.crc32c = s.tcp_crc32c;
        debug_assert!(s.handshake_max_len <= frame::MAX_LEN_CEILING);
        let (fabric, no_fabric_why) = fabric_of(s);
        Self {
            transfer_timeout: s.transfer_timeout,
            default_metadata_server: s.metadata_server.clone(),
            bind_address: s.tcp_bind_address,
            data_port: s.tcp_data_port,
            data_advertise: s.tcp_data_advertise.clone(),
            legacy_rpc_port_binding: s.legacy_rpc_port_binding,
            port_range: s.rpc_port_range,
            handshake_max_len: s.handshake_max_len,
            force_tcp: s.force_tcp,
            local: s.local,
            local_threads: s.local_threads,
            metadata_cluster_id: s.metadata_cluster_id.clone(),
            etcd_ttl: s.etcd_ttl,
            redis: crate::meta::redis::RedisAuth {
                username: s.redis_username.clone(),
                password: s.redis_password.as_ref().map(|p| p.0.clone()),
                db_index: s.redis_db_index,
            },
            stripe_bytes: s.stripe_bytes,
            client_limits,
            runtime: None,
            fabric,
            no_fabric_why,
            rdma_devices_allowed: s.rdma.te_filters.clone(),
            rdma: crate::transport::rdma::slices::RdmaConfig::from_settings(&s.rdma),
            topo_json: s.custom_topo_json.clone(),
            metrics_addr: s.metrics_addr.clone(),
            te_metric: s.te_metric,
            // The settings checked the length, the key's only rule.
            auth: s.auth_key.as_ref().and_then(|k| crate::proto::auth::AuthKey::new(&k.0).ok()),
        }
    }
}

/// The fabric `SHARDWIRE_FABRIC` names, or why there is none.
fn fabric_of(s: &Settings) -> (Option<Arc<dyn crate::transport::rdma::fabric::Fabric>>, String) {
    use crate::config::FabricChoice;
    use crate::transport::rdma::fabric::Fabric;
    match &s.fabric {
        FabricChoice::Sim(names) => {
            (Some(Arc::new(crate::transport::rdma::sim::shared(names)) as Arc<dyn Fabric>), String::new())
        }
        FabricChoice::Emu { .. } => match crate::transport::rdma::emu::shared(s) {
            Ok(fabric) => (Some(fabric as Arc<dyn Fabric>), String::new()),
            Err(why) => (None, format!("SHARDWIRE_FABRIC=emu: {why}")),
        },
        FabricChoice::None => (None, "SHARDWIRE_FABRIC=none".into()),
        FabricChoice::Auto | FabricChoice::Verbs => verbs_fabric(s),
    }
}

#[cfg(feature = "verbs")]
fn verbs_fabric(s: &Settings) -> (Option<Arc<dyn crate::transport::rdma::fabric::Fabric>>, String) {
    use crate::transport::rdma::verbs::{LinkConfig, VerbsFabric};
    let link = LinkConfig {
        port: s.rdma.ib_port,
        gid_index: s.rdma.gid_index,
        service_level: s.rdma.ib_sl,
        traffic_class: s.rdma.ib_tc,
    };
    (Some(Arc::new(VerbsFabric::new(link))), String::new())
}

#[cfg(not(feature = "verbs"))]
fn verbs_fabric(s: &Settings) -> (Option<Arc<dyn crate::transport::rdma::fabric::Fabric>>, String) {
    let why = match s.fabric {
        crate::config::FabricChoice::Verbs => "SHARDWIRE_FABRIC=verbs, but this build has no `verbs` feature",
        _ => "this build has no `verbs` feature (build with `--features verbs` for RDMA devices)",
    };
    (None, why.into())
}
