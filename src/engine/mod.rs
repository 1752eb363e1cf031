//! The transfer engine: Mooncake's Transfer Engine API, on the shards.
//!
//! [`TransferEngine`] has the surface of `mooncake.engine.TransferEngine`
//! (see `shared/seeds/mooncake-transfer-engine-python-api.md`), in Rust:
//! methods return `TeResult`, and [`TeError::code`] is the integer Mooncake
//! returns. Where Mooncake crashes (a bogus batch id, a call before
//! `initialize`, an unknown metadata scheme) this returns an error.
//!
//! ```
//! use shardwire::engine::TransferEngine;
//!
//! # fn main() -> Result<(), shardwire::engine::TeError> {
//! let target = TransferEngine::new();
//! target.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")?;
//! let remote = target.allocate_managed_buffer(1 << 20)?;
//! let name = target.segment_name()?; // "127.0.0.1:<rpc port>"
//!
//! let initiator = TransferEngine::new();
//! initiator.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")?;
//! let local = initiator.allocate_managed_buffer(1 << 20)?;
//! initiator.write_bytes_to_buffer(local, b"hello")?;
//! initiator.transfer_sync_write(&name, local, remote, 5)?;
//! assert_eq!(target.read_bytes_from_buffer(remote, 5)?, b"hello");
//! # Ok(())
//! # }
//! ```
//!
//! A transfer resolves the target segment (a P2P Metadata RPC, cached) and
//! the transport that reaches it (`Engine::route`, the one place a
//! transport is chosen), checks both ends against registered memory,
//! splits each request into slices of at most `SHARDWIRE_STRIPE_BYTES`, and
//! hands them, in bounded runs, to the transport, which settles each into
//! the batch (the batch is the requests' [`Sink`]). The caller waits on the
//! batch. One small synchronous request may instead be carried out on the
//! caller's thread, when the transport can (`Transport::run_inline`).
//!
//! A segment name reaches one process at a time, and the segment cache
//! ([`segment::SegmentCache`]) is the one place that says which: each
//! descriptor carries the process's instance number, and a lookup that
//! finds another one under a cached name has every transport let go of the
//! old process (`Transport::retire`) before the new one is routed. A
//! transfer addressed to a process that has gone fails with
//! [`code::PEER_GONE`] and is never re-sent to the new one (its addresses
//! describe the old one's memory); the engine looks the name up again at
//! once, so the application's next transfer, with the new process's
//! addresses, goes through (`docs/reliability.md`).

pub mod batch;
pub mod config;
pub mod rpc;
pub mod segment;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use crate::error::{TeError, TeResult, code};
pub use batch::{Batch, BatchState, TransferStatus};
pub use config::EngineConfig;
pub use rpc::TransferNotify;

use crate::liveness::Liveness;
use crate::mem::Registry;
use crate::mem::managed::ManagedPool;
use crate::meta::etcd::{EtcdClient, EtcdStore};
use crate::meta::p2p::{self, CallOptions, RpcServer};
use crate::meta::store::{KvStore, Registration, RpcMeta};
use crate::proto::mooncake::message::{self, NotifyDesc};
use crate::proto::mooncake::name::{self, HostPort};
use crate::proto::mooncake::tcp::Opcode;
use crate::runtime::Runtime;
use crate::telemetry::counters as metrics;
use crate::transport::local::LocalTransport;
use crate::transport::rdma::transport::RdmaTransport;
use crate::transport::request::{self as req, Sink, Ticket};
use crate::transport::tcp::{TcpOptions, TcpTransport, sock};
use crate::transport::{InlineRequest, PeerSegment, Route, Transport};
use rpc::{EngineRpc, NotifyQueue};
use segment::{Put, Segment, SegmentCache};

/// Read or write, as `TransferOpcode`.
pub type TransferOpcode = Opcode;

/// One request of a batch: `len` bytes between local `source` and the
/// peer's `target_offset` (an absolute address, as in Mooncake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRequest {
    pub opcode: Opcode,
    pub source: u64,
    pub target_offset: u64,
    pub length: u64,
}

/// Slices handed to a transport at once.
const SUBMIT_RUN_MAX: usize = 4096;
/// How long unregister waits for transfers in flight on a region.
const UNREGISTER_DRAIN: Duration = Duration::from_secs(5);
/// How long a waiter spins before sleeping.
const WAIT_SPIN: Duration = Duration::from_micros(50);
/// Extra time past a batch's deadline before a waiter gives up on the shards
/// (they fail the slices at the deadline; this only guards against a bug).
const SETTLE_GRACE: Duration = Duration::from_secs(5);

static NEXT_ENGINE_ID: AtomicU64 = AtomicU64::new(1);

/// Metadata back-ends `initialize` understands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Metadata {
    P2p,
    /// etcd endpoints, `h1:2379,h2:2379`.
    Etcd(String),
    /// `http://host:port/path`.
    Http(String),
    /// `redis://host:port[/db]`.
    Redis(String),
}

/// The metadata an initialized engine publishes to and looks peers up in.
enum Meta {
    P2p,
    /// A central store (etcd, HTTP, redis).
    Store(Box<Mutex<Registration>>),
}

/// A transfer engine. Create it, `initialize` it, then register memory and
/// transfer. It is `Sync`: share it between threads.
pub struct TransferEngine {
    config: EngineConfig,
    /// A bad environment value, reported by `initialize`.
    config_error: Option<TeError>,
    inner: RwLock<Option<Arc<Engine>>>,
}

/// An initialized engine.
struct Engine {
    name: String,
    rpc_port: u16,
    runtime: Arc<Runtime>,
    registry: Arc<Registry>,
    /// The TCP transport (also in `transports`): its data port is in the
    /// descriptor.
    tcp: Arc<TcpTransport>,
    /// The RDMA transport (also in `transports`), with `protocol = "rdma"`
    /// on a fabric.
    rdma: Option<Arc<RdmaTransport>>,
    /// The local transport (also in `transports`), unless it is off: what
    /// peers on this host may copy into, published and revoked here.
    local: Option<Arc<LocalTransport>>,
    /// Every transport, in order of preference; a segment takes the first
    /// that reaches it.
    transports: Vec<Arc<dyn Transport>>,
    rpc: Mutex<Option<RpcServer>>,
    handler: Arc<EngineRpc>,
    segments: SegmentCache,
    batches: batch::BatchTable,
    notifies: Arc<NotifyQueue>,
    managed: Mutex<ManagedPool>,
    timeout: Duration,
    stripe_bytes: u64,
    call_options: CallOptions,
    meta: Meta,
}

impl Default for TransferEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl TransferEngine {
    /// An engine configured from the environment (`MC_*`, `SHARDWIRE_*`).
    /// A value a variable does not accept makes `initialize` fail, naming
    /// the variable and what it accepts.
    pub fn new() -> Self {
        match EngineConfig::from_env() {
            Ok(config) => Self::with_config(config),
            Err(e) => Self { config: EngineConfig::default(), config_error: Some(e), inner: RwLock::new(None) },
        }
    }

    pub fn with_config(config: EngineConfig) -> Self {
        Self { config, config_error: None, inner: RwLock::new(None) }
    }

    fn engine(&self) -> TeResult<Arc<Engine>> {
        let engine =
            self.inner.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(TeError::not_initialized)?;
        if engine.runtime.is_forked_copy() {
            // Its threads stayed in the parent, and its sockets are shared
            // with it: using them here would tangle both processes' traffic.
            return Err(TeError::invalid(
                "this engine was created before fork(); create and initialize a new one in the child",
            ));
        }
        Ok(engine)
    }

    /// Initializes the engine: `local_hostname` is `host[:port]`,
    /// `metadata_server` is `P2PHANDSHAKE` (or empty for `MC_METADATA_SERVER`,
    /// then P2P), `protocol` is `tcp` or `rdma` (on the fabric of
    /// `EngineConfig::fabric`, `SHARDWIRE_FABRIC`; without devices, TCP with
    /// a warning), `device_name` filters RDMA devices (not yet).
    pub fn initialize(
        &self,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> TeResult<()> {
        self.initialize_ext(local_hostname, metadata_server, protocol, device_name, "")
    }

    /// [`TransferEngine::initialize`] with a metadata type (`p2p`, `etcd`,
    /// `http`, `redis`) for a server given without a scheme.
    pub fn initialize_ext(
        &self,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
        metadata_type: &str,
    ) -> TeResult<()> {
        if let Some(e) = &self.config_error {
            return Err(e.clone());
        }
        let mut slot = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Err(TeError::invalid("the engine is already initialized"));
        }
        let metadata = parse_metadata(metadata_server, metadata_type, self.config.default_metadata_server.as_deref())?;
        if let Some(addr) = &self.config.metrics_addr {
            crate::telemetry::serve::process_metrics(addr).map_err(|e| {
                TeError::invalid(format!("SHARDWIRE_METRICS_ADDR={addr}: cannot serve metrics there: {e}"))
            })?;
        }
        if let Some(every) = self.config.te_metric {
            crate::telemetry::mc_log::start_process(every)
                .map_err(|e| TeError::invalid(format!("MC_TE_METRIC: cannot start the metric log thread: {e}")))?;
        }
        let want_rdma = match protocol.trim() {
            "tcp" | "" => false,
            "rdma" if self.config.force_tcp => false,
            "rdma" if self.config.fabric.is_none() => {
                log::warn!("protocol \"rdma\": {}; serving this segment over TCP", self.config.no_fabric_why);
                false
            }
            "rdma" => true,
            other => return Err(TeError::invalid(format!("protocol {other:?} is not available; use \"tcp\""))),
        };
        let allowed = allowed_devices(device_name, self.config.rdma_devices_allowed.as_deref());
        let hp = name::parse(local_hostname).map_err(|e| TeError::invalid(format!("local_hostname: {e}")))?;
        let bind_ip = self.config.bind_address.unwrap_or_else(sock::any_address);
        let advertised = match self.config.bind_address {
            Some(ip) => ip.to_string(),
            None => hp.host.clone(),
        };
        // P2P: beyond Mooncake, a port given is the port bound. With a
        // metadata server, as in Mooncake, the name is only a name and the
        // port is random, unless MC_LEGACY_RPC_PORT_BINDING asks to bind it
        // (12001 when the name has none).
        let rpc_port_wanted = match metadata {
            Metadata::P2p => hp.port,
            _ if self.config.legacy_rpc_port_binding => Some(hp.port.unwrap_or(p2p::HANDSHAKE_PORT_DEFAULT)),
            _ => None,
        };
        let rpc_listener = sock::bind_listener(bind_ip, rpc_port_wanted, self.config.port_range).map_err(|e| {
            TeError::new(code::SOCKET, format!("cannot bind the RPC port for {local_hostname} on {bind_ip}: {e}"))
        })?;
        let rpc_port = rpc_listener.local_addr().map_err(|e| TeError::new(code::SOCKET, e.to_string()))?.port();
        let runtime = match &self.config.runtime {
            Some(rt) => rt.clone(),
            None => crate::runtime::shared::shared_runtime().map_err(|e| TeError::new(code::CONTEXT, e.to_string()))?,
        };
        let registry = Arc::new(Registry::new());
        let engine_id = NEXT_ENGINE_ID.fetch_add(1, Ordering::Relaxed);
        // Which process this is, for peers: drawn anew each time, never 0,
        // top bit clear (see `SegmentDesc::incarnation`).
        let instance = (u64::from_le_bytes(crate::entropy::bytes()) >> 1) | 1;
        let tcp = Arc::new(TcpTransport::start(
            engine_id,
            runtime.clone(),
            registry.clone(),
            TcpOptions {
                bind_ip,
                // SHARDWIRE_TCP_DATA_PORT: a range of one port.
                ports: self.config.data_port.map_or(self.config.port_range, |p| (p, p)),
                limits: self.config.client_limits,
                auth: self.config.auth.clone(),
                instance,
                liveness: Liveness::for_timeout(self.config.transfer_timeout),
            },
        )?);
        let managed = ManagedPool::new(registry.clone(), UNREGISTER_DRAIN);
        let local = if self.config.local && !self.config.force_tcp {
            match LocalTransport::start(
                managed.files(),
                tcp.clone(),
                self.config.transfer_timeout,
                self.config.local_threads,
            ) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    log::warn!("the local transport cannot start ({e}); peers on this host use TCP");
                    None
                }
            }
        } else {
            None
        };
        let name = match metadata {
            Metadata::P2p => HostPort::with_port(&advertised, rpc_port),
            _ => local_hostname.trim().to_string(),
        };
        let call_options = CallOptions {
            connect_timeout: Duration::from_secs(5).min(self.config.transfer_timeout),
            io_timeout: Duration::from_secs(60).min(self.config.transfer_timeout),
            max_frame: self.config.handshake_max_len,
            auth: self.config.auth.clone(),
        };
        let rdma = match (&self.config.fabric, want_rdma) {
            (Some(fabric), true) => {
                let custom = match &self.config.topo_json {
                    Some(path) => crate::topo::PriorityMatrix::load(path)
                        .map(Some)
                        .map_err(|e| format!("MC_CUSTOM_TOPO_JSON ({}): {e}", path.display())),
                    None => Ok(None),
                };
                let started = custom.and_then(|custom| {
                    RdmaTransport::start(
                        runtime.clone(),
                        fabric.clone(),
                        &allowed,
                        tcp.clone(),
                        &name,
                        instance,
                        self.config.rdma,
                        call_options.clone(),
                        custom.as_ref(),
                    )
                });
                match started {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) => {
                        log::warn!("protocol \"rdma\": {e}; serving this segment over TCP");
                        None
                    }
                }
            }
            _ => None,
        };
        let mut transports: Vec<Arc<dyn Transport>> = Vec::with_capacity(3);
        if let Some(l) = &local {
            transports.push(l.clone());
        }
        if let Some(r) = &rdma {
            transports.push(r.clone());
        }
        transports.push(tcp.clone());
        let notifies = Arc::new(NotifyQueue::default());
        // What peers are told of the data port: the listener's, unless
        // SHARDWIRE_TCP_DATA_ADVERTISE names something in front of it.
        let (data_host, data_port) =
            self.config.data_advertise.clone().unwrap_or_else(|| (advertised.clone(), tcp.data_port()));
        let handler = Arc::new(EngineRpc {
            name: name.clone(),
            data_host,
            data_port,
            registry: registry.clone(),
            notifies: notifies.clone(),
            local: local.as_ref().map(|l| l.descriptor()),
            rdma: rdma.clone(),
            instance,
        });
        let rpc =
            RpcServer::start(rpc_listener, handler.clone(), self.config.handshake_max_len, self.config.auth.clone())
                .map_err(|e| TeError::new(code::SOCKET, format!("cannot start the RPC server: {e}")))?;
        let store: Option<Box<dyn KvStore>> = match &metadata {
            Metadata::P2p => None,
            Metadata::Etcd(endpoints) => {
                Some(Box::new(EtcdStore::start(EtcdClient::new(endpoints)?, self.config.etcd_ttl)?))
            }
            Metadata::Http(url) => Some(Box::new(crate::meta::http::HttpStore::new(url)?)),
            Metadata::Redis(url) => {
                Some(Box::new(crate::meta::redis::RedisStore::connect(url, self.config.redis.clone())?))
            }
        };
        let meta = match store {
            None => Meta::P2p,
            Some(store) => {
                let mut registration = Registration::new(store, &name, self.config.metadata_cluster_id.as_deref());
                refuse_live_name(&mut registration, &name)?;
                let rpc = RpcMeta { ip_or_host_name: advertised.clone(), rpc_port };
                registration.publish(&rpc, &handler.descriptor())?;
                Meta::Store(Box::new(Mutex::new(registration)))
            }
        };
        log::info!(
            "engine {name}: RPC port {rpc_port}, TCP data port {} (advertised as {}:{})",
            tcp.data_port(),
            handler.data_host,
            handler.data_port
        );
        *slot = Some(Arc::new(Engine {
            name,
            rpc_port,
            runtime,
            registry: registry.clone(),
            tcp,
            local,
            rdma,
            transports,
            rpc: Mutex::new(Some(rpc)),
            handler,
            segments: SegmentCache::default(),
            batches: batch::BatchTable::new(),
            notifies,
            managed: Mutex::new(managed),
            timeout: self.config.transfer_timeout,
            stripe_bytes: self.config.stripe_bytes,
            call_options,
            meta,
        }));
        Ok(())
    }

    /// The RPC (handshake) port.
    pub fn get_rpc_port(&self) -> TeResult<u16> {
        Ok(self.engine()?.rpc_port)
    }

    /// This engine's segment name, `host:rpc_port`: what peers pass as
    /// `target_hostname`.
    pub fn segment_name(&self) -> TeResult<String> {
        Ok(self.engine()?.name.clone())
    }

    /// The TCP data port.
    pub fn data_port(&self) -> TeResult<u16> {
        Ok(self.engine()?.tcp.data_port())
    }

    /// Where the RPC and data listeners are bound.
    pub fn listen_addresses(&self) -> TeResult<(std::net::SocketAddr, std::net::SocketAddr)> {
        let engine = self.engine()?;
        let io = |e: std::io::Error| TeError::new(code::SOCKET, e.to_string());
        let rpc = engine.rpc.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|r| r.local_addr());
        let rpc = rpc.ok_or_else(TeError::not_initialized)?.map_err(io)?;
        Ok((rpc, engine.tcp.local_addr().map_err(io)?))
    }

    /// The shards transfers run on.
    pub fn runtime(&self) -> TeResult<Arc<Runtime>> {
        Ok(self.engine()?.runtime.clone())
    }

    /// Registers `[addr, addr + len)` for transfers. `location` is `cpu:N`,
    /// `cuda:N` or `*`.
    pub fn register_memory(&self, addr: u64, len: u64, location: &str) -> TeResult<()> {
        let engine = self.engine()?;
        check_mapped(addr, len)?;
        engine.registry.register(addr, len, location)?;
        if let Err(e) = engine.share(addr, len, None, location) {
            let _ = engine.unregister_region(addr);
            return Err(e);
        }
        // Memory peers cannot find is no use: undo, so a retry starts clean.
        engine.publish().inspect_err(|_| {
            let _ = engine.unregister_region(addr);
        })
    }

    /// Unregisters the region starting at `addr`, after transfers in flight
    /// on it finish.
    pub fn unregister_memory(&self, addr: u64) -> TeResult<()> {
        let engine = self.engine()?;
        engine.unregister_region(addr)?;
        engine.publish_after_release();
        Ok(())
    }

    /// Registers several regions, all or none.
    pub fn batch_register_memory(&self, addrs: &[u64], lens: &[u64], location: &str) -> TeResult<()> {
        if addrs.len() != lens.len() {
            return Err(TeError::invalid(format!("{} addresses but {} lengths", addrs.len(), lens.len())));
        }
        let items: Vec<(u64, u64)> = addrs.iter().copied().zip(lens.iter().copied()).collect();
        let engine = self.engine()?;
        for &(addr, len) in &items {
            check_mapped(addr, len)?;
        }
        engine.registry.register_batch(&items, location)?;
        for &(addr, len) in &items {
            if let Err(e) = engine.share(addr, len, None, location) {
                for &(a, _) in &items {
                    let _ = engine.unregister_region(a);
                }
                return Err(e);
            }
        }
        engine.publish().inspect_err(|_| {
            for &(addr, _) in &items {
                let _ = engine.unregister_region(addr);
            }
        })
    }

    /// Unregisters several regions, going on past errors; returns the first.
    pub fn batch_unregister_memory(&self, addrs: &[u64]) -> TeResult<()> {
        let engine = self.engine()?;
        let mut first = Ok(());
        for &addr in addrs {
            if let Err(e) = engine.unregister_region(addr)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        engine.publish_after_release();
        first
    }

    /// Allocates `len` bytes of registered memory.
    pub fn allocate_managed_buffer(&self, len: u64) -> TeResult<u64> {
        let engine = self.engine()?;
        let place = {
            let mut managed = engine.managed.lock().unwrap_or_else(|e| e.into_inner());
            let addr = managed.allocate(len)?;
            (addr, managed.place_of(addr))
        };
        let addr = place.0;
        if let Err(e) = engine.share(addr, len, place.1, "cpu:0") {
            let _ = engine.managed.lock().unwrap_or_else(|e| e.into_inner()).free(addr, len);
            return Err(e);
        }
        engine.publish().inspect_err(|_| {
            if engine.unshare(addr).is_ok() {
                let _ = engine.managed.lock().unwrap_or_else(|e| e.into_inner()).free(addr, len);
            }
        })?;
        Ok(addr)
    }

    /// Frees a managed buffer; `len` must be its allocated length.
    pub fn free_managed_buffer(&self, addr: u64, len: u64) -> TeResult<()> {
        let engine = self.engine()?;
        engine.managed.lock().unwrap_or_else(|e| e.into_inner()).check_free(addr, len)?;
        // Peers on this host stop first: once this returns, no byte of
        // theirs lands in the block, whoever gets it next.
        engine.unshare(addr)?;
        engine.managed.lock().unwrap_or_else(|e| e.into_inner()).free(addr, len)?;
        engine.publish_after_release();
        Ok(())
    }

    /// The address of the first buffer of a (possibly remote) segment.
    pub fn get_first_buffer_address(&self, segment: &str) -> TeResult<u64> {
        let engine = self.engine()?;
        let seg = engine.open_segment(segment, false)?;
        seg.buffers.first().map(|b| b.0).ok_or_else(|| TeError::invalid(format!("segment {segment} has no buffers")))
    }

    /// Takes no new peers, for a drain: the RPC port (metadata requests,
    /// handshakes, notifications) closes and the data listeners refuse new
    /// connections, while connections already open carry on until
    /// [`TransferEngine::shutdown`]. The metadata keys stay until then.
    pub fn stop_accepting(&self) -> TeResult<()> {
        let engine = self.engine()?;
        let rpc = engine.rpc.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut rpc) = rpc {
            rpc.stop();
        }
        for t in &engine.transports {
            t.stop_accepting();
        }
        Ok(())
    }

    /// The process's metrics, as the Prometheus text format writes them:
    /// `name{label="value",...}` to a number (histograms as their
    /// `_bucket`, `_sum` and `_count` series). The counters are the
    /// process's, not this engine's: every engine of a process (and every
    /// stream) counts into them, as one `/metrics` endpoint serves them.
    /// Figures are at most about 100 ms old.
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        crate::telemetry::prom::figures()
    }

    /// Where the process serves `/metrics` (`SHARDWIRE_METRICS_ADDR`), once
    /// an engine has started it.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        crate::telemetry::serve::process_metrics_addr()
    }

    /// Writes `len` bytes from local `buffer` to `peer_addr` of `target`.
    pub fn transfer_sync_write(&self, target: &str, buffer: u64, peer_addr: u64, len: u64) -> TeResult<()> {
        self.transfer_sync(target, buffer, peer_addr, len, Opcode::Write, None)
    }

    /// Reads `len` bytes from `peer_addr` of `target` into local `buffer`.
    pub fn transfer_sync_read(&self, target: &str, buffer: u64, peer_addr: u64, len: u64) -> TeResult<()> {
        self.transfer_sync(target, buffer, peer_addr, len, Opcode::Read, None)
    }

    /// One transfer, waited for; then, if given, a notification to the peer.
    pub fn transfer_sync(
        &self,
        target: &str,
        buffer: u64,
        peer_addr: u64,
        len: u64,
        opcode: Opcode,
        notify: Option<&TransferNotify>,
    ) -> TeResult<()> {
        let req = TransferRequest { opcode, source: buffer, target_offset: peer_addr, length: len };
        self.batch_transfer_sync(target, &[req], notify)
    }

    /// Several transfers, waited for together.
    pub fn batch_transfer_sync(
        &self,
        target: &str,
        requests: &[TransferRequest],
        notify: Option<&TransferNotify>,
    ) -> TeResult<()> {
        let engine = self.engine()?;
        let done = match requests {
            [one] if one.length > 0 && one.length <= crate::transport::tcp::INLINE_BYTES_MAX => {
                engine.transfer_inline(target, one)
            }
            _ => engine.submit(target, requests).and_then(|batch| {
                engine.wait_settled(&batch)?;
                engine.settle(&batch, true)
            }),
        };
        // What this thread counted (submissions; requests it carried out
        // itself) is published before the call returns.
        metrics::flush(true);
        done?;
        if let Some(note) = notify {
            let desc = NotifyDesc { name: note.name.clone(), notify_msg: note.msg.clone() };
            p2p::send_notify(&engine.rpc_target(target)?, &desc, &engine.call_options)?;
        }
        Ok(())
    }

    /// [`TransferEngine::batch_transfer_sync`] from parallel lists, as the
    /// Python API takes them.
    pub fn batch_transfer_sync_lists(
        &self,
        target: &str,
        buffers: &[u64],
        peer_addrs: &[u64],
        lens: &[u64],
        opcode: Opcode,
        notify: Option<&TransferNotify>,
    ) -> TeResult<()> {
        let requests = zip_requests(buffers, peer_addrs, lens, opcode)?;
        self.batch_transfer_sync(target, &requests, notify)
    }

    /// Submits transfers and returns a batch id at once.
    pub fn batch_transfer_async(&self, target: &str, requests: &[TransferRequest]) -> TeResult<u64> {
        self.batch_transfer_async_hooked(target, requests, None)
    }

    /// [`TransferEngine::batch_transfer_async`], running `on_settle` when
    /// the batch settles (on a shard thread: keep it quick).
    pub fn batch_transfer_async_hooked(
        &self,
        target: &str,
        requests: &[TransferRequest],
        on_settle: Option<batch::SettleHook>,
    ) -> TeResult<u64> {
        let engine = self.engine()?;
        let batch = engine.submit(target, requests)?;
        // The caller may not call again for a while: what it counted
        // (submissions, settled inline work) is published now.
        metrics::flush(true);
        if let Some(hook) = on_settle {
            batch.set_on_settle(hook);
        }
        engine.batches.insert(batch, Instant::now() + engine.timeout)
    }

    /// [`TransferEngine::batch_transfer_async`] from parallel lists.
    pub fn batch_transfer_async_lists(
        &self,
        target: &str,
        buffers: &[u64],
        peer_addrs: &[u64],
        lens: &[u64],
        opcode: Opcode,
    ) -> TeResult<u64> {
        let requests = zip_requests(buffers, peer_addrs, lens, opcode)?;
        self.batch_transfer_async(target, &requests)
    }

    /// Submits one write and returns its batch id.
    pub fn transfer_submit_write(&self, target: &str, buffer: u64, peer_addr: u64, len: u64) -> TeResult<u64> {
        self.batch_transfer_async(
            target,
            &[TransferRequest { opcode: Opcode::Write, source: buffer, target_offset: peer_addr, length: len }],
        )
    }

    /// Submits one read and returns its batch id (Mooncake has only the
    /// write form).
    pub fn transfer_submit_read(&self, target: &str, buffer: u64, peer_addr: u64, len: u64) -> TeResult<u64> {
        self.batch_transfer_async(
            target,
            &[TransferRequest { opcode: Opcode::Read, source: buffer, target_offset: peer_addr, length: len }],
        )
    }

    /// A batch's state now, without waiting. A batch that has finished,
    /// well or not, is forgotten: its id is then invalid.
    pub fn transfer_check_status(&self, batch_id: u64) -> TeResult<BatchState> {
        let engine = self.engine()?;
        let batch = engine.batches.get(batch_id)?;
        let state = batch.state();
        if state != BatchState::Pending {
            engine.batches.remove(batch_id);
            // Not looked up again here (a status check does not block):
            // the next transfer to it does that.
            let _ = engine.settle(&batch, false);
        }
        Ok(state)
    }

    /// The state of each batch now, without waiting or forgetting any (a
    /// bogus id reports as `Err` in its place).
    pub fn batch_states(&self, batch_ids: &[u64]) -> TeResult<Vec<TeResult<BatchState>>> {
        let engine = self.engine()?;
        Ok(batch_ids.iter().map(|&id| engine.batches.get(id).map(|b| b.state())).collect())
    }

    /// Waits until every batch completes (then forgets them all), or one
    /// fails or times out (then forgets all, and returns its error).
    pub fn get_batch_transfer_status(&self, batch_ids: &[u64]) -> TeResult<()> {
        let engine = self.engine()?;
        let batches: Vec<Arc<Batch>> = batch_ids.iter().map(|&id| engine.batches.get(id)).collect::<TeResult<_>>()?;
        let mut outcome = Ok(());
        for b in &batches {
            engine.wait_settled(b)?;
            if let Err(e) = engine.settle(b, true) {
                outcome = Err(e);
                break;
            }
        }
        for &id in batch_ids {
            engine.batches.remove(id);
        }
        outcome
    }

    /// Notifications received since the last call.
    pub fn get_notifies(&self) -> TeResult<Vec<TransferNotify>> {
        Ok(self.engine()?.notifies.drain())
    }

    /// Checks that `peer` (`host:port`) answers on its RPC port.
    pub fn send_probe(&self, peer: &str) -> TeResult<()> {
        let engine = self.engine()?;
        p2p::probe(&engine.rpc_target(peer)?, &engine.call_options)
    }

    /// Whether `[addr, addr + len)` lies inside one registered region.
    pub fn is_registered(&self, addr: u64, len: u64) -> TeResult<bool> {
        Ok(self.engine()?.registry.contains(addr, len))
    }

    /// Copies `bytes` to `addr`, which must lie in registered memory (and,
    /// in managed memory, inside one managed buffer). Memory that is no
    /// longer mapped is an error, not a crash.
    pub fn write_bytes_to_buffer(&self, addr: u64, bytes: &[u8]) -> TeResult<()> {
        let engine = self.engine()?;
        if bytes.is_empty() {
            return Ok(());
        }
        let len = bytes.len() as u64;
        let _pin = engine.helper_pin(addr, len)?;
        crate::mem::probe::write(addr, bytes)
            .map_err(|e| TeError::new(code::MEMORY, format!("cannot write [{addr:#x}, +{len}): {e}")))
    }

    /// Copies `len` bytes from `addr`, which must lie in registered memory
    /// (and, in managed memory, inside one managed buffer). Memory that is
    /// no longer mapped is an error, not a crash.
    pub fn read_bytes_from_buffer(&self, addr: u64, len: u64) -> TeResult<Vec<u8>> {
        let engine = self.engine()?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let _pin = engine.helper_pin(addr, len)?;
        let mut out = vec![0u8; len as usize];
        crate::mem::probe::read(addr, &mut out)
            .map_err(|e| TeError::new(code::MEMORY, format!("cannot read [{addr:#x}, +{len}): {e}")))?;
        Ok(out)
    }

    /// The NIC priority matrix of this machine as Mooncake's JSON (what
    /// `get_local_topology` returns): `MC_CUSTOM_TOPO_JSON` if set, otherwise
    /// discovered from sysfs, keeping only the RDMA devices `device_name`
    /// lists (comma-separated; empty keeps all). Needs no `initialize`, and
    /// unlike Mooncake's binds no port.
    pub fn get_local_topology(&self, device_name: &str) -> TeResult<String> {
        use crate::topo::{self, MatrixEntry, PriorityMatrix};
        let matrix = match PriorityMatrix::from_env().map_err(|e| TeError::invalid(e.to_string()))? {
            Some((_, m)) => m,
            None => {
                let t = topo::discover(std::path::Path::new("/sys")).map_err(|e| TeError::invalid(e.to_string()))?;
                PriorityMatrix::discover(&t)
            }
        };
        let wanted: Vec<&str> = device_name.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
        if wanted.is_empty() {
            return Ok(matrix.to_json());
        }
        let keep = |names: &[String]| names.iter().filter(|n| wanted.contains(&n.as_str())).cloned().collect();
        let mut filtered = PriorityMatrix::new();
        for (key, entry) in matrix.entries() {
            filtered.insert(key, MatrixEntry { preferred: keep(&entry.preferred), available: keep(&entry.available) });
        }
        Ok(filtered.to_json())
    }

    /// Cancels what has not gone out of an async batch: those requests
    /// settle as canceled (the batch then reports failed); what is on the
    /// wire finishes, or times out, on its own. Beyond Mooncake, which has
    /// no way to take a submitted transfer back.
    pub fn cancel_transfer(&self, batch_id: u64) -> TeResult<()> {
        let engine = self.engine()?;
        let batch = engine.batches.get(batch_id)?;
        let sink: Arc<dyn Sink> = batch;
        for t in &engine.transports {
            t.cancel(&sink);
        }
        Ok(())
    }

    /// The transport that carries transfers to `segment` (`local`, `tcp`),
    /// looking the segment up if it is not cached (diagnostics).
    pub fn transport_for(&self, segment: &str) -> TeResult<&'static str> {
        let engine = self.engine()?;
        let seg = engine.open_segment(segment, false)?;
        Ok(engine.transports[seg.transport].name())
    }

    /// Bytes each local RDMA device has moved, by device name (empty
    /// without the RDMA transport).
    pub fn rdma_device_bytes(&self) -> TeResult<Vec<(String, u64)>> {
        Ok(self.engine()?.rdma.as_ref().map_or_else(Vec::new, |r| r.device_bytes()))
    }

    /// The shard that owns each local RDMA device, by device name (empty
    /// without the RDMA transport).
    pub fn rdma_placement(&self) -> TeResult<Vec<(String, usize)>> {
        Ok(self.engine()?.rdma.as_ref().map_or_else(Vec::new, |r| r.shards()))
    }

    /// RDMA slices sent again after a failed try, since the start (0
    /// without the RDMA transport).
    pub fn rdma_slice_retries(&self) -> TeResult<u64> {
        Ok(self.engine()?.rdma.as_ref().map_or(0, |r| r.retries()))
    }

    /// Copies by peers on this host running into or out of this engine's
    /// memory right now (diagnostics; 0 with the local transport off).
    pub fn local_copies_running(&self) -> TeResult<usize> {
        Ok(self.engine()?.local.as_ref().map_or(0, |l| l.copies_running()))
    }

    /// Requests handed to each shard's TCP client and not yet settled
    /// (diagnostics: submission keeps each at most
    /// [`QUEUED_PER_SHARD_MAX`](crate::transport::tcp::QUEUED_PER_SHARD_MAX)).
    pub fn queued_requests(&self) -> TeResult<Vec<usize>> {
        Ok(self.engine()?.tcp.queued())
    }

    /// Stops the engine: no new transfers; connections close; memory the
    /// engine manages is released. Also done on drop.
    pub fn shutdown(&self) {
        let engine = self.inner.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(engine) = engine {
            engine.stop();
        }
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Refuses memory that is not mapped readable and writable in this
/// process: registering it would fault the first transfer that touched it.
/// The lists a device must be on to be used: `initialize`'s
/// `device_name` (comma-separated; empty allows all) and `MC_TE_FILTERS`.
fn allowed_devices(device_name: &str, filters: Option<&[String]>) -> Vec<Vec<String>> {
    let mut lists = Vec::with_capacity(2);
    let named: Vec<String> =
        device_name.split(',').map(str::trim).filter(|d| !d.is_empty()).map(String::from).collect();
    if !named.is_empty() {
        lists.push(named);
    }
    if let Some(f) = filters {
        lists.push(f.to_vec());
    }
    lists
}

fn check_mapped(addr: u64, len: u64) -> TeResult<()> {
    if len == 0 || addr == 0 {
        return Ok(()); // the registry names these
    }
    crate::mem::probe::check_mapped(addr, len)
        .map_err(|why| TeError::invalid(format!("cannot register [{addr:#x}, +{len}): {why}")))
}

fn not_registered(addr: u64, len: u64) -> TeError {
    TeError::new(code::ADDRESS_NOT_REGISTERED, format!("[{addr:#x}, +{len}) is not inside one registered buffer"))
}

fn zip_requests(buffers: &[u64], peer_addrs: &[u64], lens: &[u64], opcode: Opcode) -> TeResult<Vec<TransferRequest>> {
    if buffers.len() != peer_addrs.len() || buffers.len() != lens.len() {
        return Err(TeError::invalid(format!(
            "list lengths differ: {} buffers, {} peer addresses, {} lengths",
            buffers.len(),
            peer_addrs.len(),
            lens.len()
        )));
    }
    Ok(buffers
        .iter()
        .zip(peer_addrs)
        .zip(lens)
        .map(|((&source, &target_offset), &length)| TransferRequest { opcode, source, target_offset, length })
        .collect())
}

fn parse_metadata(server: &str, metadata_type: &str, default: Option<&str>) -> TeResult<Metadata> {
    let mut server = server.trim().to_string();
    if server.is_empty() {
        server = default.unwrap_or("P2PHANDSHAKE").trim().to_string();
    }
    if server == "P2PHANDSHAKE" {
        return Ok(Metadata::P2p);
    }
    let kind = metadata_type.trim();
    if !server.contains("://") && !kind.is_empty() {
        if kind == "p2p" {
            return Ok(Metadata::P2p);
        }
        server = format!("{kind}://{server}");
    }
    let scheme = server.split_once("://").map_or("etcd", |(s, _)| s);
    match scheme {
        "p2p" => Ok(Metadata::P2p),
        // A bare host:port means etcd, as in Mooncake.
        "etcd" => Ok(Metadata::Etcd(server.trim_start_matches("etcd://").to_string())),
        "http" => Ok(Metadata::Http(server)),
        "redis" => Ok(Metadata::Redis(server)),
        "https" => Err(TeError::new(
            code::NOT_IMPLEMENTED,
            format!("metadata server {server:?}: https metadata is not supported; use http://"),
        )),
        other => Err(TeError::invalid(format!(
            "metadata server {server:?}: unknown scheme {other:?} (expected P2PHANDSHAKE, etcd://, http://, redis://)"
        ))),
    }
}

/// Mooncake lets a second engine overwrite the keys of a name in use, and
/// both then break. Here a name whose registered RPC port still answers is
/// refused; keys left by an engine that died are taken over.
fn refuse_live_name(registration: &mut Registration, name: &str) -> TeResult<()> {
    let Some(prev) = registration.rpc_meta(name)? else { return Ok(()) };
    let addr = HostPort::with_port(&prev.ip_or_host_name, prev.rpc_port);
    // No key: a live engine that requires one answers with its challenge,
    // which is all a liveness probe needs.
    let quick = CallOptions {
        connect_timeout: Duration::from_secs(1),
        io_timeout: Duration::from_secs(2),
        max_frame: 4096,
        auth: None,
    };
    if p2p::probe(&addr, &quick).is_ok() {
        return Err(TeError::new(
            code::METADATA,
            format!("segment name {name} is taken: a live engine answers at {addr}; choose another local_hostname"),
        ));
    }
    log::info!("segment name {name}: taking over the keys of an engine at {addr} that no longer answers");
    // Mooncake's HTTP server refuses to overwrite an rpc_meta key.
    registration.clear_stale()
}

impl Engine {
    /// The segment `name`, from the cache unless `refresh` (or unless a
    /// transfer to it failed since).
    ///
    /// This is the one place that decides which process a name reaches:
    /// a lookup that finds another process than the one cached (it
    /// restarted) has every transport let go of the old one first, so no
    /// connection, mapping or endpoint of it is used again, and whatever
    /// is still queued or in flight to it settles as gone.
    fn open_segment(&self, name: &str, refresh: bool) -> TeResult<Arc<Segment>> {
        if !refresh && let Some(seg) = self.segments.get(name) {
            return Ok(seg);
        }
        let looked_up = Instant::now();
        let (desc, rpc_host) = self.fetch_descriptor(name).inspect_err(|_| self.segments.forget(name))?;
        let instance = desc.incarnation();
        // Before the new process is routed: a transport may keep state by
        // name (RDMA's peers), which must start afresh for it.
        if let Some(known) = self.segments.instance(name)
            && known != instance
            && let Some(old) = self.segments.take_if(name, known)
        {
            self.retire(&old);
        }
        let peer = PeerSegment { name, desc: &desc, rpc_host: rpc_host.as_deref() };
        let (transport, route) = self.route(&peer)?;
        let buffers = desc.buffers.iter().map(|b| (b.addr, b.length)).collect();
        let seg = Arc::new(Segment { name: name.to_string(), instance, transport, route, buffers, looked_up });
        match self.segments.put(seg.clone()) {
            Put::Fresh => Ok(seg),
            // Another thread's lookup put the old process in meanwhile.
            Put::Replaced(old) => {
                self.retire(&old);
                Ok(seg)
            }
            Put::Outdated(now) => Ok(now),
        }
    }

    /// The process `old` describes is gone (another answers under its
    /// name): every transport lets go of it.
    fn retire(&self, old: &Segment) {
        log::info!(
            "segment {}: a new process answers under its name; letting go of the one it replaced (instance {:#x})",
            old.name,
            old.instance
        );
        for t in &self.transports {
            t.retire(&old.route);
        }
    }

    /// A transfer to `target` failed: it is looked up again before its
    /// next use. If the failure says the peer process is gone
    /// ([`code::PEER_GONE`]) and `now`, it is looked up at once (the
    /// caller is waiting anyway), so the application's next transfer, with
    /// addresses from the new process, goes straight to it; the error then
    /// says what the lookup found.
    fn after_failure(&self, target: &str, addressed: u64, err: TeError, now: bool) -> TeError {
        self.segments.forget_if(target, addressed);
        if err.code() != code::PEER_GONE || !now {
            return err;
        }
        // Compared with the process the request was addressed to: another
        // thread may have looked the name up since.
        let found = match self.open_segment(target, true) {
            Ok(seg) if seg.instance != addressed => {
                format!("{target} answers as a new process now: transfers with the addresses it gives go through")
            }
            Ok(_) => format!("{target} answers as the same process"),
            Err(e) => format!("{target} does not answer ({}): it has exited", e.message()),
        };
        TeError::new(code::PEER_GONE, format!("{}; {found}", err.message()))
    }

    /// The transport for a peer segment: the first, in order of
    /// preference, that reaches it. The one place a transport is chosen.
    fn route(&self, peer: &PeerSegment<'_>) -> TeResult<(usize, Route)> {
        for (i, t) in self.transports.iter().enumerate() {
            if let Some(route) = t.route(peer)? {
                return Ok((i, route));
            }
        }
        let names: Vec<&str> = self.transports.iter().map(|t| t.name()).collect();
        Err(TeError::invalid(format!(
            "segment {} uses the {:?} transport; this engine speaks {} (set MC_FORCE_TCP=1 on the peer)",
            peer.name,
            peer.desc.protocol,
            names.join(", ")
        )))
    }

    /// A peer's descriptor, and the host of its RPC port when the metadata
    /// store says.
    fn fetch_descriptor(&self, name: &str) -> TeResult<(message::SegmentDesc, Option<String>)> {
        match &self.meta {
            Meta::P2p => Ok((p2p::fetch_segment(name, &self.handler.descriptor(), &self.call_options)?, None)),
            Meta::Store(reg) => {
                let mut reg = reg.lock().unwrap_or_else(|e| e.into_inner());
                let (bytes, rpc) = reg.lookup(name)?;
                let desc = message::from_wire(&bytes).map_err(|e| {
                    let store = reg.describe();
                    TeError::new(code::MALFORMED_JSON, format!("segment {name} in {store} is not a descriptor: {e}"))
                })?;
                Ok((desc, rpc.map(|r| r.ip_or_host_name)))
            }
        }
    }

    /// Where `name`'s RPC port is: the name itself in P2P mode; with a store,
    /// its `rpc_meta` entry (or the name, if it is an address there is no
    /// entry for).
    fn rpc_target(&self, name: &str) -> TeResult<String> {
        match &self.meta {
            Meta::P2p => Ok(name.to_string()),
            Meta::Store(reg) => match reg.lock().unwrap_or_else(|e| e.into_inner()).rpc_meta(name)? {
                Some(r) => Ok(HostPort::with_port(&r.ip_or_host_name, r.rpc_port)),
                None if name::parse(name).is_ok_and(|hp| hp.port.is_some()) => Ok(name.to_string()),
                None => Err(TeError::new(code::METADATA, format!("{name} is not known to the metadata server"))),
            },
        }
    }

    /// Lets peers on this host copy into and out of `[addr, +len)`
    /// (managed memory at `place`, or other registered memory), and
    /// registers it on the RDMA devices.
    fn share(&self, addr: u64, len: u64, place: Option<crate::mem::managed::ShmPlace>, location: &str) -> TeResult<()> {
        if let Some(r) = &self.rdma {
            r.register(addr, len, location)?;
        }
        if let Some(l) = &self.local {
            l.publish(addr, len, place);
        }
        Ok(())
    }

    /// Unregisters the region at `addr`: peers on this host stop first (see
    /// `free_managed_buffer`). Managed memory is left to the pool: a call
    /// naming it fails in the registry without taking a buffer from peers.
    fn unregister_region(&self, addr: u64) -> TeResult<()> {
        if self.managed.lock().unwrap_or_else(|e| e.into_inner()).buffer_at(addr).is_none() {
            self.unshare(addr)?;
        }
        self.registry.unregister(addr, UNREGISTER_DRAIN)
    }

    /// Takes `[addr, ...)` back from peers on this host: when this returns
    /// `Ok`, no copy of theirs touches it again.
    fn unshare(&self, addr: u64) -> TeResult<()> {
        self.local.as_ref().map_or(Ok(()), |l| l.revoke(addr))?;
        self.rdma.as_ref().map_or(Ok(()), |r| r.unregister(addr, self.timeout))
    }

    /// Republishes this engine's descriptor if registrations changed since
    /// the last time (a central store; P2P peers ask for it).
    fn publish(&self) -> TeResult<()> {
        let Meta::Store(reg) = &self.meta else { return Ok(()) };
        let mut reg = reg.lock().unwrap_or_else(|e| e.into_inner());
        // Built under the lock, so the last publisher writes the newest state.
        reg.publish_descriptor(&self.handler.descriptor())
    }

    /// Publishes after memory was released: that cannot be undone, so a
    /// failure is only logged (peers that still see the region are refused
    /// by the data server; the next successful publish corrects the store).
    fn publish_after_release(&self) {
        if let Err(e) = self.publish() {
            log::warn!("engine {}: the metadata server still lists released memory: {e}", self.name);
        }
    }

    /// Pins `[addr, addr + len)` for a byte helper: inside one registered
    /// region, and, in managed memory, inside the one buffer that holds
    /// `addr` (the slab around it is registered whole).
    fn helper_pin(&self, addr: u64, len: u64) -> TeResult<crate::mem::Pin> {
        // Managed memory first: a freed buffer is withdrawn from the
        // registry too, and the managed pool says why more precisely.
        let held = self.managed.lock().unwrap_or_else(|e| e.into_inner()).buffer_at(addr);
        let pin = || self.registry.pin(addr, len).ok_or_else(|| not_registered(addr, len));
        match held {
            None => pin(),
            Some(Some((start, size))) if addr + len <= start + size => pin(),
            Some(Some((start, size))) => Err(TeError::new(
                code::ADDRESS_NOT_REGISTERED,
                format!("[{addr:#x}, +{len}) runs past the managed buffer [{start:#x}, +{size})"),
            )),
            Some(None) => Err(TeError::new(
                code::ADDRESS_NOT_REGISTERED,
                format!("{addr:#x} is managed memory that no allocated buffer holds"),
            )),
        }
    }

    /// One small synchronous request, carried out on the calling thread
    /// if its segment's transport can (TCP v2: the direct path); otherwise
    /// submitted and waited for.
    fn transfer_inline(&self, target: &str, r: &TransferRequest) -> TeResult<()> {
        let mut seg = self.open_segment(target, false)?;
        if !seg.contains(r.target_offset, r.length) {
            seg = self.open_segment(target, true)?;
        }
        let _pin = self.registry.pin(r.source, r.length).ok_or_else(|| not_registered(r.source, r.length))?;
        if !seg.contains(r.target_offset, r.length) {
            return Err(TeError::invalid(format!(
                "[{:#x}, +{}) is not inside a buffer registered at {target}",
                r.target_offset, r.length
            )));
        }
        let inline = InlineRequest {
            op: r.opcode,
            local: r.source,
            remote: r.target_offset,
            len: r.length,
            deadline: Instant::now() + self.timeout + Duration::from_nanos(r.length),
        };
        let transport = &self.transports[seg.transport];
        let start = Instant::now();
        match transport.run_inline(&seg.route, &inline) {
            Some(result) => {
                let now = Instant::now();
                let via = metrics::Via::from_name(transport.name());
                metrics::submitted(via, 1);
                let bytes = if result.is_ok() { r.length } else { 0 };
                metrics::record(
                    op_of(r.opcode),
                    via,
                    metrics::Side::Initiator,
                    bytes,
                    result.is_ok(),
                    Some(now - start),
                    now,
                );
                result.map_err(|e| self.after_failure(target, seg.instance, e, true))
            }
            None => {
                let batch = self.submit(target, std::slice::from_ref(r))?;
                self.wait_settled(&batch)?;
                self.settle(&batch, true)
            }
        }
    }

    /// Validates requests, splits them into slices and hands them out.
    fn submit(&self, target: &str, requests: &[TransferRequest]) -> TeResult<Arc<Batch>> {
        let mut seg = self.open_segment(target, false)?;
        for r in requests {
            if r.length > 0 && !seg.contains(r.target_offset, r.length) {
                // The peer may have registered memory since: look again once.
                seg = self.open_segment(target, true)?;
                break;
            }
        }
        let transport = &self.transports[seg.transport];
        let stripe = if transport.stripes() { self.stripe_bytes.max(1) } else { u64::MAX };
        let mut slice_counts = Vec::with_capacity(requests.len());
        let mut total = 0u64;
        for r in requests {
            if r.length == 0 {
                slice_counts.push(0);
                continue;
            }
            if !self.registry.contains(r.source, r.length) {
                return Err(not_registered(r.source, r.length));
            }
            if !seg.contains(r.target_offset, r.length) {
                return Err(TeError::invalid(format!(
                    "[{:#x}, +{}) is not inside a buffer registered at {target}",
                    r.target_offset, r.length
                )));
            }
            total += r.length;
            slice_counts.push(r.length.div_ceil(stripe).min(u64::from(u32::MAX)) as u32);
        }
        let deadline = Instant::now() + self.timeout + Duration::from_nanos(total);
        let lens: Vec<u64> = requests.iter().map(|r| r.length).collect();
        let ops: Vec<metrics::Op> = requests.iter().map(|r| op_of(r.opcode)).collect();
        let via = metrics::Via::from_name(transport.name());
        let batch = Batch::counted(target, seg.instance, Some(via), &ops, &lens, &slice_counts, deadline);
        metrics::submitted(via, slice_counts.iter().filter(|&&n| n > 0).count() as u64);
        let sink: Arc<dyn Sink> = batch.clone();
        // Slices go out in bounded runs: the transport waits for room, so
        // however large the batch, only a bounded number of slices exists
        // at once.
        let mut run = Vec::with_capacity(SUBMIT_RUN_MAX.min(slice_counts.iter().map(|&n| n as usize).sum()));
        for (task, r) in requests.iter().enumerate() {
            let mut offset = 0;
            while offset < r.length {
                let len = (r.length - offset).min(stripe);
                let Some(pin) = self.registry.pin(r.source + offset, len) else {
                    // Unregistered since the check above: this slice fails.
                    batch.slice_failed(task, TransferStatus::Failed, "the local buffer was unregistered");
                    offset += len;
                    continue;
                };
                let ticket = Ticket::new(sink.clone(), task, pin);
                run.push(req::request(r.opcode, r.source + offset, r.target_offset + offset, len, deadline, ticket));
                if run.len() == SUBMIT_RUN_MAX {
                    transport.submit(&seg.route, std::mem::replace(&mut run, Vec::with_capacity(SUBMIT_RUN_MAX)));
                }
                offset += len;
            }
        }
        if !run.is_empty() {
            transport.submit(&seg.route, run);
        }
        Ok(batch)
    }

    /// The batch's result; a failure also has the target looked up again
    /// before its next transfer (it may have restarted, with a new data
    /// port), and at once if the caller waited for the batch (`waited`)
    /// and the peer process is gone (see [`Engine::after_failure`]).
    fn settle(&self, batch: &Batch, waited: bool) -> TeResult<()> {
        batch.result().map_err(|e| self.after_failure(&batch.target, batch.instance, e, waited))
    }

    /// Waits until every slice of `batch` has finished.
    fn wait_settled(&self, batch: &Batch) -> TeResult<()> {
        if batch.wait(WAIT_SPIN, batch.deadline + SETTLE_GRACE) {
            Ok(())
        } else {
            Err(TeError::invalid("transfer did not settle after its deadline (shards unresponsive)"))
        }
    }

    fn stop(&self) {
        let rpc = self.rpc.lock().unwrap_or_else(|e| e.into_inner()).take();
        if self.runtime.is_forked_copy() {
            // A forked child: the RPC thread is the parent's, and shutting
            // the listener down would close the parent's socket too. Leave
            // it all alone.
            std::mem::forget(rpc);
            return;
        }
        if let Some(mut rpc) = rpc {
            rpc.stop();
        }
        for t in &self.transports {
            t.close();
        }
        if let Meta::Store(reg) = &self.meta {
            reg.lock().unwrap_or_else(|e| e.into_inner()).withdraw();
        }
    }
}

/// The metrics' name for an operation.
fn op_of(op: Opcode) -> metrics::Op {
    match op {
        Opcode::Read => metrics::Op::Read,
        Opcode::Write => metrics::Op::Write,
    }
}
