//! Mooncake's TCP v2 data protocol, carried out by the shards.
//!
//! [`TcpTransport`] binds the data port, installs a client and a server
//! half on every shard, runs the accept loop on shard 0, and deals requests
//! out to the shards. After that everything happens on the shards' io_uring
//! rings ([`client`], [`server`]), which drive the sans-IO connection cores
//! of [`crate::proto::mooncake`]: bytes move between the sockets and
//! registered memory with no copy in between (small WRITE payloads on the
//! server excepted, which are copied out of a staging buffer so that a run
//! of them takes one receive). [`direct`] drives the same client core on
//! the caller's thread for one small synchronous request.
//!
//! Submission is bounded: each shard takes at most
//! [`QUEUED_PER_SHARD_MAX`] requests of an engine that have not settled;
//! past that, `submit` waits (up to the requests' deadline) for room.

pub mod client;
pub mod direct;
pub mod iov;
pub mod server;
pub mod sock;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use client::{ClientLimits, ClientShard};
pub use server::ServerShard;

use super::request::{Request, Sink, TransferStatus};
use super::{InlineRequest, PeerSegment, Route, Transport};
use crate::error::{TeError, TeResult, code};
use crate::liveness::Liveness;
use crate::mem::Registry;
use crate::proto::auth::AuthKey;
use crate::proto::mooncake::{name, tcp};
use crate::runtime::{OpId, Runtime, ShardCtx};

/// Most server sessions per shard.
pub const SESSIONS_PER_SHARD_MAX: usize = 4096;
/// Requests of one engine handed to one shard and not yet settled. A
/// caller past it waits: memory stays bounded however large a batch is.
pub const QUEUED_PER_SHARD_MAX: usize = 1 << 14;
/// Requests handed to a shard at once.
const HANDOFF_MAX: usize = 256;
/// Requests up to this size may be carried out on the caller's thread.
pub const INLINE_BYTES_MAX: u64 = direct::DIRECT_BYTES_MAX;

/// A peer's data port and the protocol version it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the peer sends v2 status frames (`tcp_proto_version >= 2`).
    pub v2: bool,
    /// Whether requests carry CRC-32Cs: the peer advertises it
    /// (`shardwire_tcp_crc32c`) and `SHARDWIRE_TCP_CRC32C` is on.
    pub crc32c: bool,
    /// The tag of the peer process's instance number, which every request
    /// carries (a v2 shardwire peer; `None` for Mooncake's). Part of the
    /// key of a shard's and a thread's connections, so a restarted peer
    /// never shares one with the process it replaced.
    pub instance: Option<u32>,
}

/// Requests handed to each shard and not yet settled (the back-pressure).
#[derive(Debug)]
pub struct Credits {
    queued: Box<[AtomicUsize]>,
}

impl Credits {
    fn new(shards: usize) -> Self {
        Self { queued: (0..shards).map(|_| AtomicUsize::new(0)).collect() }
    }

    /// Takes `n` slots on `shard` if they are free.
    fn try_take(&self, shard: usize, n: usize) -> bool {
        let q = &self.queued[shard];
        let mut now = q.load(Ordering::Acquire);
        loop {
            if now + n > QUEUED_PER_SHARD_MAX && now > 0 {
                return false;
            }
            match q.compare_exchange_weak(now, now + n, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(v) => now = v,
            }
        }
    }

    /// `n` requests of `shard` settled.
    pub fn release(&self, shard: usize, n: usize) {
        let before = self.queued[shard].fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "released more than was taken");
    }

    pub fn queued(&self, shard: usize) -> usize {
        self.queued[shard].load(Ordering::Acquire)
    }
}

/// One engine's TCP halves on one shard.
struct EngineTcp {
    client: Rc<RefCell<ClientShard>>,
    server: Rc<RefCell<ServerShard>>,
    accept: Option<OpId>,
    /// False once the engine stopped accepting (the loop is not re-armed).
    accepting: bool,
}

/// Every engine's TCP state on a shard (engines may share a runtime).
#[derive(Default)]
struct TcpShards(HashMap<u64, EngineTcp>);

type Halves = (Rc<RefCell<ClientShard>>, Rc<RefCell<ServerShard>>);

/// The engine's halves on this shard, if it is still installed.
fn halves(ctx: &mut ShardCtx, engine: u64) -> Option<Halves> {
    ctx.local_mut::<TcpShards>()?.0.get(&engine).map(|e| (e.client.clone(), e.server.clone()))
}

/// The engine's TCP transport.
pub struct TcpTransport {
    engine: u64,
    runtime: Arc<Runtime>,
    listener: Arc<TcpListener>,
    data_port: u16,
    rr: AtomicUsize,
    credits: Arc<Credits>,
    limits: ClientLimits,
    /// The key every data connection proves, both ways (`None`: none).
    auth: Option<AuthKey>,
    /// Keepalive and `TCP_USER_TIMEOUT` on every data connection, both
    /// ways, from the transfer timeout.
    liveness: Liveness,
    closed: Mutex<bool>,
}

/// What a [`TcpTransport`] is started with besides its runtime and memory.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub bind_ip: IpAddr,
    /// The ports to bind the data port in (a range of one: that port).
    pub ports: (u16, u16),
    pub limits: ClientLimits,
    /// The key every data connection proves, both ways (`None`: none).
    pub auth: Option<AuthKey>,
    /// This process's instance number: requests tagged for another are
    /// refused (see [`tcp`]'s instance tags).
    pub instance: u64,
    /// Keepalive and `TCP_USER_TIMEOUT` on every data connection.
    pub liveness: Liveness,
}

impl TcpTransport {
    /// Binds the data port (on `bind_ip`, at a random port of `ports`) and
    /// installs the shard halves. With `auth`, every connection either way
    /// opens with the key's exchange ([`crate::proto::auth`]).
    pub fn start(engine: u64, runtime: Arc<Runtime>, registry: Arc<Registry>, options: TcpOptions) -> TeResult<Self> {
        let TcpOptions { bind_ip, ports, limits, auth, instance, liveness } = options;
        let listener = sock::bind_listener(bind_ip, None, ports)
            .map_err(|e| TeError::new(code::SOCKET, format!("cannot bind the TCP data port on {bind_ip}: {e}")))?;
        let data_port = listener.local_addr().map_err(|e| TeError::new(code::SOCKET, e.to_string()))?.port();
        let credits = Arc::new(Credits::new(runtime.shard_count()));
        let transport = Self {
            engine,
            runtime: runtime.clone(),
            listener: Arc::new(listener),
            data_port,
            rr: AtomicUsize::new(0),
            credits: credits.clone(),
            limits,
            auth: auth.clone(),
            liveness,
            closed: Mutex::new(false),
        };
        for shard in 0..runtime.shard_count() {
            let (registry, credits, auth) = (registry.clone(), credits.clone(), auth.clone());
            runtime
                .call(shard, move |ctx| {
                    let state = EngineTcp {
                        client: ClientShard::new(limits, credits, ctx.id(), auth.clone(), liveness),
                        server: ServerShard::new(
                            registry,
                            SESSIONS_PER_SHARD_MAX,
                            auth,
                            tcp::instance_tag(instance),
                            liveness,
                        ),
                        accept: None,
                        accepting: true,
                    };
                    let mut shards = ctx.take_local::<TcpShards>().unwrap_or_default();
                    shards.0.insert(engine, state);
                    ctx.insert_local(shards);
                })
                .map_err(|e| TeError::new(code::CONTEXT, format!("shard {shard}: {e}")))?;
        }
        let l = transport.listener.clone();
        let cpus: Arc<[Option<u32>]> = runtime.shard_cpus().into();
        runtime
            .call(0, move |ctx| crate::transport::accept::start(ctx, l, cpus, DataPort(engine)))
            .map_err(|e| TeError::new(code::CONTEXT, format!("shard 0: {e}")))?;
        Ok(transport)
    }

    pub fn data_port(&self) -> u16 {
        self.data_port
    }

    /// The address the data listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Requests handed to each shard and not yet settled.
    pub fn queued(&self) -> Vec<usize> {
        (0..self.runtime.shard_count()).map(|s| self.credits.queued(s)).collect()
    }

    /// The calling thread's shard for lone small requests: a thread
    /// issuing small transfers one after another keeps one shard busy,
    /// not all of them half-busy (on few cores the idle ones' spinning
    /// costs latency).
    fn home_shard(&self) -> usize {
        thread_local! {
            static HOME: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
        }
        let shards = self.runtime.shard_count();
        HOME.with(|h| match h.get() {
            Some(s) if s < shards => s,
            _ => {
                let s = self.rr.fetch_add(1, Ordering::Relaxed) % shards;
                h.set(Some(s));
                s
            }
        })
    }

    /// Hands `requests` to `shard`, waiting for room first. Whatever cannot
    /// be handed over fails.
    fn hand_off(&self, shard: usize, peer: Peer, requests: Vec<Request>) {
        let n = requests.len();
        debug_assert!(n > 0 && n <= HANDOFF_MAX);
        let deadline = requests.iter().map(|r| r.deadline).min().expect("not empty");
        let mut waited = 0u32;
        while !self.credits.try_take(shard, n) {
            if *self.closed.lock().unwrap_or_else(|e| e.into_inner()) {
                for r in requests {
                    r.ticket.fail(TransferStatus::Failed, "the engine is shutting down");
                }
                return;
            }
            if Instant::now() >= deadline {
                let why = format!("shard {shard} stayed full ({QUEUED_PER_SHARD_MAX} requests) until the deadline");
                for r in requests {
                    r.ticket.fail(TransferStatus::Timeout, &why);
                }
                return;
            }
            waited = waited.saturating_add(1);
            if waited < 64 {
                std::hint::spin_loop();
            } else if waited < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        let (engine, credits) = (self.engine, self.credits.clone());
        let result = self.runtime.submit(shard, move |ctx| match halves(ctx, engine) {
            Some((client, _)) => ClientShard::submit(&client, ctx, peer, requests),
            None => {
                credits.release(shard, requests.len());
                for r in requests {
                    r.ticket.fail(TransferStatus::Failed, "the engine is shutting down");
                }
            }
        });
        if let Err(e) = result {
            // The closure, and the requests in it, were dropped: each
            // ticket failed as it went.
            self.credits.release(shard, n);
            log::warn!("shard {shard} refused transfer work: {e}");
        }
    }
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn route(&self, peer: &PeerSegment<'_>) -> TeResult<Option<Route>> {
        let desc = peer.desc;
        // A shardwire engine with RDMA on serves TCP too, and says so with
        // its data port; Mooncake's RDMA engines publish none.
        let serves_tcp = desc.protocol == "tcp" || (desc.protocol == "rdma" && desc.tcp_data_port != 0);
        if !serves_tcp {
            return Ok(None);
        }
        if desc.tcp_data_port == 0 {
            return Err(TeError::new(code::METADATA, format!("segment {} publishes no TCP data port", peer.name)));
        }
        let host = match (desc.tcp_data_host.as_deref().map(str::trim), peer.rpc_host) {
            (Some(h), _) if !h.is_empty() && h != "0.0.0.0" && h != "::" => h.to_string(),
            (_, Some(h)) => h.to_string(),
            _ => name::parse(peer.name).map_err(TeError::invalid)?.host,
        };
        let target = name::HostPort::with_port(&host, desc.tcp_data_port);
        let addr = crate::meta::p2p::resolve(&target, desc.tcp_data_port)?[0];
        let v2 = desc.tcp_proto_version >= 2;
        let crc32c = self.limits.crc32c && v2 && desc.shardwire_tcp_crc32c;
        let instance = (v2 && desc.shardwire_instance != 0).then(|| tcp::instance_tag(desc.shardwire_instance));
        Ok(Some(Route::Tcp(Peer { addr, v2, crc32c, instance })))
    }

    fn submit(&self, route: &Route, requests: Vec<Request>) {
        let Route::Tcp(peer) = *route else {
            for r in requests {
                r.ticket.fail(TransferStatus::Failed, "a request for another transport reached the TCP one");
            }
            return;
        };
        if requests.is_empty() {
            return;
        }
        let shards = self.runtime.shard_count();
        // A lone small request goes to the caller's own shard; everything
        // else is dealt out in turn, so stripes of a large one run at once.
        let lone = requests.len() == 1 && requests[0].len <= INLINE_BYTES_MAX;
        let mut next = if lone { self.home_shard() } else { self.rr.fetch_add(1, Ordering::Relaxed) };
        let mut per_shard: Vec<Vec<Request>> = (0..shards).map(|_| Vec::new()).collect();
        for r in requests {
            let s = next % shards;
            next += 1;
            per_shard[s].push(r);
            if per_shard[s].len() == HANDOFF_MAX {
                self.hand_off(s, peer, std::mem::take(&mut per_shard[s]));
            }
        }
        for (s, batch) in per_shard.into_iter().enumerate() {
            if !batch.is_empty() {
                self.hand_off(s, peer, batch);
            }
        }
        if !lone {
            // Start the next submission where this one stopped.
            self.rr.store(next, Ordering::Relaxed);
        }
    }

    fn run_inline(&self, route: &Route, r: &InlineRequest) -> Option<TeResult<()>> {
        let Route::Tcp(peer) = *route else { return None };
        if !peer.v2 || r.len == 0 || r.len > INLINE_BYTES_MAX {
            return None;
        }
        let dial = direct::Dial {
            connect_timeout: self.limits.connect_timeout,
            liveness: self.liveness,
            auth: self.auth.as_ref(),
        };
        Some(direct::transfer(self.engine, peer, r, dial).map_err(|e| {
            let code = match e.failure {
                direct::Failure::Corrupt => {
                    crate::telemetry::counters::event(crate::telemetry::Event::TcpChecksumInitiator);
                    code::CHECKSUM
                }
                direct::Failure::PeerGone => code::PEER_GONE,
                direct::Failure::Rejected | direct::Failure::TimedOut => code::INVALID_ARGUMENT,
                direct::Failure::Failed => code::SOCKET,
            };
            TeError::new(code, e.message)
        }))
    }

    /// Closes every shard's connection to the route's data port (their
    /// requests settle as gone), and has every thread prune its kept
    /// direct-path connections that hung up.
    fn retire(&self, route: &Route) {
        let Some(peer) = route.tcp() else { return };
        let engine = self.engine;
        for shard in 0..self.runtime.shard_count() {
            let _ = self.runtime.submit(shard, move |ctx| {
                if let Some((client, _)) = halves(ctx, engine) {
                    ClientShard::retire(&client, ctx, peer);
                }
            });
        }
        direct::retired();
    }

    fn cancel(&self, sink: &Arc<dyn Sink>) {
        let engine = self.engine;
        for shard in 0..self.runtime.shard_count() {
            let sink = sink.clone();
            let _ = self.runtime.submit(shard, move |ctx| {
                if let Some((client, _)) = halves(ctx, engine) {
                    ClientShard::cancel(&client, ctx, &sink);
                }
            });
        }
    }

    /// Ends the accept loop, then shuts the listening socket's receive
    /// side: Linux then answers new connections (and those waiting in the
    /// backlog) with a reset, so a peer learns at once rather than waiting
    /// in a queue nobody reads. Sessions already open go on.
    fn stop_accepting(&self) {
        let engine = self.engine;
        let _ = self.runtime.call(0, move |ctx| {
            if let Some(e) = ctx.local_mut::<TcpShards>().and_then(|s| s.0.get_mut(&engine)) {
                e.accepting = false;
                if let Some(op) = e.accept.take() {
                    let _ = ctx.cancel_op(op);
                }
            }
        });
        // SAFETY: shutdown(2) on our own listening socket, which the Arc
        // keeps open; it changes no memory.
        unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&*self.listener), libc::SHUT_RD) };
    }

    /// Closes every connection and session of this engine and stops
    /// accepting. Transfers still running fail.
    fn close(&self) {
        {
            let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
            if *closed {
                return;
            }
            *closed = true;
        }
        let engine = self.engine;
        for shard in 0..self.runtime.shard_count() {
            let _ = self.runtime.call(shard, move |ctx| {
                let Some(mut shards) = ctx.take_local::<TcpShards>() else { return };
                let state = shards.0.remove(&engine);
                ctx.insert_local(shards);
                if let Some(state) = state {
                    if let Some(op) = state.accept {
                        let _ = ctx.cancel_op(op);
                    }
                    ClientShard::close(&state.client, ctx);
                    ServerShard::close(&state.server, ctx);
                }
            });
        }
        direct::forget(engine);
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.close();
    }
}

/// The data port's side of the shared accept loop.
#[derive(Clone, Copy)]
struct DataPort(u64);

impl crate::transport::accept::Owner for DataPort {
    fn live(&self, ctx: &mut ShardCtx) -> bool {
        ctx.local_mut::<TcpShards>().and_then(|s| s.0.get(&self.0)).is_some_and(|e| e.accepting)
    }

    fn set_op(&self, ctx: &mut ShardCtx, op: Option<OpId>) {
        if let Some(e) = ctx.local_mut::<TcpShards>().and_then(|s| s.0.get_mut(&self.0)) {
            e.accept = op;
        }
    }

    fn hand_over(&self, ctx: &mut ShardCtx, target: usize, fd: OwnedFd) {
        let engine = self.0;
        if target == ctx.id() {
            adopt(ctx, engine, fd);
        } else {
            let _ = ctx.send_to(target, move |ctx| adopt(ctx, engine, fd));
        }
    }

    fn name(&self) -> &'static str {
        "the data port"
    }
}

fn adopt(ctx: &mut ShardCtx, engine: u64, fd: OwnedFd) {
    // With the engine gone, dropping fd closes the connection.
    if let Some((_, server)) = halves(ctx, engine) {
        ServerShard::adopt(&server, ctx, fd);
    }
}
