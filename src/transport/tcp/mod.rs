//! Mooncake's TCP v2 data protocol, carried out by the shards.
//!
//! [`TcpTransport`] is the engine's handle: it binds the data port, installs
//! a client and a server half on every shard, runs the accept loop on shard
//! 0, and hands slices to shards. Everything after that happens on the
//! shards' io_uring rings ([`client`], [`server`]): bytes move between the
//! sockets and registered memory with no copy in between.

pub mod client;
pub mod direct;
pub mod iov;
pub mod server;
pub mod slice;
pub mod sock;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use client::{ClientLimits, ClientShard};
pub use server::ServerShard;
pub use slice::{Peer, Slice};

use crate::engine::error::{TeError, TeResult, code};
use crate::engine::registry::Registry;
use crate::runtime::{OpId, Runtime, ShardCtx};

/// Most server sessions per shard.
pub const SESSIONS_PER_SHARD_MAX: usize = 4096;

/// One engine's TCP halves on one shard.
struct EngineTcp {
    client: Rc<RefCell<ClientShard>>,
    server: Rc<RefCell<ServerShard>>,
    accept: Option<OpId>,
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
}

impl TcpTransport {
    /// Binds the data port (on `bind_ip`, at a random port of `ports`) and
    /// installs the shard halves.
    pub fn start(
        engine: u64,
        runtime: Arc<Runtime>,
        registry: Arc<Registry>,
        bind_ip: IpAddr,
        ports: (u16, u16),
        limits: ClientLimits,
    ) -> TeResult<Self> {
        let listener = sock::bind_listener(bind_ip, None, ports)
            .map_err(|e| TeError::new(code::SOCKET, format!("cannot bind the TCP data port on {bind_ip}: {e}")))?;
        let data_port = listener.local_addr().map_err(|e| TeError::new(code::SOCKET, e.to_string()))?.port();
        let listener = Arc::new(listener);
        let transport = Self { engine, runtime: runtime.clone(), listener, data_port, rr: AtomicUsize::new(0) };
        for shard in 0..runtime.shard_count() {
            let registry = registry.clone();
            runtime
                .call(shard, move |ctx| {
                    let state = EngineTcp {
                        client: ClientShard::new(limits),
                        server: ServerShard::new(registry, SESSIONS_PER_SHARD_MAX),
                        accept: None,
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
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shard_count(&self) -> usize {
        self.runtime.shard_count()
    }

    /// The next shard in turn.
    pub fn next_shard(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % self.runtime.shard_count()
    }

    /// Hands slices for `peer` to `shard`. If the shard cannot take them
    /// (shut down), they fail.
    pub fn submit(&self, shard: usize, peer: Peer, slices: Vec<Slice>) {
        let engine = self.engine;
        // Slices that cannot be delivered are dropped, which fails them.
        let result = self.runtime.submit(shard, move |ctx| {
            if let Some((client, _)) = halves(ctx, engine) {
                ClientShard::submit(&client, ctx, peer, slices);
            }
        });
        if let Err(e) = result {
            log::warn!("shard {shard} refused transfer work: {e}");
        }
    }

    /// Per-shard connection and session counts (for tests and stats).
    pub fn counts(&self) -> Vec<(usize, usize)> {
        let engine = self.engine;
        (0..self.runtime.shard_count())
            .map(|s| {
                self.runtime
                    .call(s, move |ctx| {
                        halves(ctx, engine).map_or((0, 0), |(c, s)| (c.borrow().connections(), s.borrow().sessions()))
                    })
                    .unwrap_or((0, 0))
            })
            .collect()
    }

    /// Closes every connection and session of this engine and stops
    /// accepting. Transfers still running fail.
    pub fn close(&self) {
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
        halves(ctx, self.0).is_some()
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
