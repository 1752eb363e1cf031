//! Transports: how bytes move between this process's registered memory and
//! a peer's.
//!
//! Every data plane implements [`Transport`]: it says whether it reaches a
//! peer segment (from the segment's descriptor), carries out requests to
//! it, settling each exactly once through its [`request::Ticket`], cancels
//! what has not gone out, and closes. The engine holds its transports in
//! order of preference and picks one per segment, in one place
//! (`Engine::route`); nothing above this layer knows what a shard, a socket
//! or a queue pair is.
//!
//! - [`request`]: the request, its ticket, the status it settles with and
//!   the [`request::Sink`] the engine implements.
//! - [`tcp`]: Mooncake's TCP v2 data protocol, driven on the shards'
//!   io_uring rings and, for one small synchronous request, on the
//!   caller's thread; both drive the same sans-IO connection cores
//!   ([`crate::proto::mooncake::client`], [`crate::proto::mooncake::server`]).
//! - [`local`]: same-host transfers by memory copies in the caller's
//!   thread (shared memfds, cross-memory attach), safe against late writes.
//! - [`rdma`]: being built; so far the rules that cut a request into
//!   slices and choose each slice's rail.
//! - `accept`: the accept loop the listeners share.

pub(crate) mod accept;
pub mod local;
pub mod rdma;
pub mod request;
pub mod tcp;

use std::sync::Arc;
use std::time::Instant;

use crate::error::TeResult;
use crate::proto::mooncake::message::SegmentDesc;
use request::{Opcode, Request, Sink};

/// A peer segment as the metadata describes it.
#[derive(Debug, Clone, Copy)]
pub struct PeerSegment<'a> {
    /// The name it was looked up under.
    pub name: &'a str,
    pub desc: &'a SegmentDesc,
    /// Where its RPC port lives, when the metadata store says (etcd).
    pub rpc_host: Option<&'a str>,
}

/// Where one transport reaches a peer, in that transport's own terms.
/// Each transport reads only its own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// A TCP v2 (or v1) data port.
    Tcp(tcp::Peer),
    /// A target on this host, by its local transport's token; `tcp` is
    /// where what the local path cannot carry goes.
    Local { token: u64, tcp: tcp::Peer },
    /// A peer over RDMA, by the RDMA transport's id for it; `tcp` is where
    /// a request goes when no rail to it works (if it serves TCP).
    Rdma { peer: u32, tcp: Option<tcp::Peer> },
}

impl Route {
    /// The TCP data port this route reaches, or falls back to.
    pub fn tcp(&self) -> Option<tcp::Peer> {
        match *self {
            Route::Tcp(p) | Route::Local { tcp: p, .. } => Some(p),
            Route::Rdma { tcp, .. } => tcp,
        }
    }
}

/// One small request the caller waits for.
#[derive(Debug, Clone, Copy)]
pub struct InlineRequest {
    pub op: Opcode,
    /// Local memory, already checked and pinned by the caller.
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    pub deadline: Instant,
}

/// A data plane. See the module documentation.
pub trait Transport: Send + Sync {
    /// What it is called, for messages (`tcp`, `local`, `rdma`).
    fn name(&self) -> &'static str;

    /// How this transport reaches `peer`: `Ok(None)` if it does not (the
    /// next transport is asked), an error if the descriptor is unusable.
    fn route(&self, peer: &PeerSegment<'_>) -> TeResult<Option<Route>>;

    /// Carries out `requests` to the peer at `route`. Each settles exactly
    /// once through its ticket, from whichever thread finishes it. Blocks
    /// while this transport's queues are full, up to each request's
    /// deadline (a request still waiting then times out).
    fn submit(&self, route: &Route, requests: Vec<Request>);

    /// Carries out one small request on the calling thread, if this
    /// transport does that better than handing it off; `None` if not (the
    /// caller then submits it).
    fn run_inline(&self, route: &Route, request: &InlineRequest) -> Option<TeResult<()>> {
        let _ = (route, request);
        None
    }

    /// Whether `submit` wants requests cut into stripes of
    /// `SHARDWIRE_STRIPE_BYTES` (TCP spreads the stripes over its shards);
    /// a transport that shares one request among threads itself takes
    /// them whole.
    fn stripes(&self) -> bool {
        true
    }

    /// Fails with `Canceled` every request of `sink` that has not gone out.
    fn cancel(&self, sink: &Arc<dyn Sink>);

    /// The peer process `route` reaches is gone: the engine learnt that
    /// another process took its segment name. Lets go of what is kept for
    /// it (connections, mappings, endpoints), and settles what is queued
    /// or in flight to it as gone ([`request::Ticket::fail_gone`]); a
    /// request that still names it later fails the same way, never
    /// reaching the new process. The part of `route` another transport
    /// reads is left to that one (the engine tells every transport).
    fn retire(&self, route: &Route) {
        let _ = route;
    }

    /// Stops: requests in flight fail; new ones fail at once.
    fn close(&self);

    /// Takes no new connections from peers (a draining node): what is
    /// open carries on until [`Transport::close`]. Transports that do not
    /// listen have nothing to do.
    fn stop_accepting(&self) {}
}
