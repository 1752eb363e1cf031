//! The RDMA [`Transport`]: the engine's requests, carried by a slice
//! engine on a shard, with endpoints made through Mooncake's Connection
//! RPC.
//!
//! One shard owns this engine's RDMA devices (placement by topology is to
//! come). Requests go to it over the runtime's rings and settle there,
//! through their tickets. The Connection RPC to a peer runs on a helper
//! thread per handshake (at most [`HANDSHAKES_MAX`] at once), so the shard
//! never waits on the network; a peer's Connection request to us is
//! answered on the owning shard. A request that fails on every rail goes
//! over TCP instead, when the peer serves it (as Mooncake's TENT does), on
//! a fallback thread of this transport (the shard never blocks on TCP's
//! queues); one log line per peer says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::fabric::{Fabric, PortState, Verb};
use super::shard::{self, Done};
use super::slices::{Answer, Connector, OurSide, PeerSide, RdmaConfig, RdmaRequest, SliceEngine};
use crate::error::{TeError, TeResult, code};
use crate::meta::p2p::{CallOptions, call};
use crate::proto::mooncake::frame::FrameType;
use crate::proto::mooncake::message::{HandshakeDesc, from_wire, to_wire};
use crate::proto::mooncake::rdma::{Connection, NicPath, RdmaSegment, rejection};
use crate::runtime::Runtime;
use crate::topo::PriorityMatrix;
use crate::transport::request::{Opcode, Request, Sink, TransferStatus};
use crate::transport::tcp::{self, TcpTransport};
use crate::transport::{PeerSegment, Route, Transport};

/// Connection RPCs in flight at once, per engine.
pub const HANDSHAKES_MAX: usize = 64;
/// Requests waiting for the fallback thread; past this, they fail.
pub const FALLBACK_QUEUE_MAX: usize = 4096;
/// Peers one engine routes over RDMA.
pub const PEERS_MAX: usize = 4096;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A handshake on its way: the request sent, and where the answer comes.
struct Asked {
    request: Connection,
    answer: mpsc::Receiver<Result<Vec<u8>, String>>,
    started: Instant,
}

/// Makes endpoints through the Connection RPC, on helper threads.
struct RpcConnector {
    me: String,
    opts: CallOptions,
    asked: HashMap<(String, usize, u32), Asked>,
}

impl Connector for RpcConnector {
    fn connect(&mut self, peer: &str, peer_dev: usize, peer_device: &str, ours: OurSide<'_>) -> Result<Answer, String> {
        let key = (peer.to_string(), peer_dev, ours.qps.first().map_or(0, |q| q.0));
        if let Some(asked) = self.asked.get(&key) {
            let body = match asked.answer.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return Ok(Answer::Pending),
                Err(mpsc::TryRecvError::Disconnected) => Err("the handshake thread ended without an answer".into()),
                Ok(r) => r,
            };
            let asked = self.asked.remove(&key).expect("looked up above");
            let reply: HandshakeDesc =
                from_wire(&body?).map_err(|e| format!("{peer}: a malformed Connection reply: {e}"))?;
            let theirs = asked.request.check_reply(&reply).map_err(|e| format!("{peer}: {e}"))?;
            let qps = theirs.qps.into_iter().map(super::fabric::QpNum).collect();
            return Ok(Answer::Ready(PeerSide { gid: theirs.gid, lid: theirs.lid, qps, mtu: theirs.mtu }));
        }
        if self.asked.len() >= HANDSHAKES_MAX {
            // Handshakes whose endpoint gave up on them (it timed out and
            // was closed) are never asked for again: let those go. The
            // RPC's own timeouts bound how long one can take.
            let stale = self.opts.connect_timeout + self.opts.io_timeout + Duration::from_secs(1);
            self.asked.retain(|_, a| a.started.elapsed() < stale);
        }
        if self.asked.len() >= HANDSHAKES_MAX {
            return Ok(Answer::Pending); // asked again once one ends
        }
        let request = Connection {
            local: NicPath { server: self.me.clone(), device: ours.device.name.clone() },
            peer: NicPath { server: peer.to_string(), device: peer_device.to_string() },
            lid: ours.device.lid,
            gid: ours.gid,
            qps: ours.qps.iter().map(|q| q.0).collect(),
            ready_ack: None,
            mtu: Some(ours.mtu),
        };
        let body = to_wire(&request.to_desc());
        let (tx, rx) = mpsc::channel();
        let (target, opts) = (peer.to_string(), self.opts);
        std::thread::Builder::new()
            .name("shardwire-rdma-hs".into())
            .spawn(move || {
                let r = call(&target, FrameType::Connection, &body, &opts).map_err(|e| e.to_string());
                let _ = tx.send(r);
            })
            .map_err(|e| format!("cannot start a handshake thread: {e}"))?;
        self.asked.insert(key, Asked { request, answer: rx, started: Instant::now() });
        Ok(Answer::Pending)
    }
}

/// A request handed to TCP, and where.
type Fallback = (tcp::Peer, Request);

/// The RDMA transport of one engine.
pub struct RdmaTransport {
    runtime: Arc<Runtime>,
    shard: usize,
    key: u64,
    tcp: Arc<TcpTransport>,
    /// Feeds the fallback thread; `None` once closed.
    fallback: Mutex<Option<mpsc::SyncSender<Fallback>>>,
    /// Peers whose fallback to TCP was logged.
    fell_back: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Peers routed here, by route id.
    peers: Mutex<Vec<String>>,
    next_request: AtomicU64,
    closed: AtomicBool,
}

impl RdmaTransport {
    /// Opens every active device of `fabric` that is on each list of
    /// `allowed` (`device_name`, `MC_TE_FILTERS`) on a shard of `runtime`,
    /// for the engine whose segment is `me`.
    pub fn start(
        runtime: Arc<Runtime>,
        fabric: Arc<dyn Fabric>,
        allowed: &[Vec<String>],
        tcp: Arc<TcpTransport>,
        me: &str,
        config: RdmaConfig,
        opts: CallOptions,
    ) -> Result<RdmaTransport, String> {
        let all = fabric.devices();
        let devices: Vec<String> = all
            .iter()
            .filter(|d| d.state == PortState::Active && allowed.iter().all(|l| l.contains(&d.name)))
            .map(|d| d.name.clone())
            .collect();
        if devices.is_empty() {
            let seen: Vec<String> = all
                .iter()
                .map(|d| format!("{} ({})", d.name, if d.state == PortState::Active { "active" } else { "down" }))
                .collect();
            let filters = if allowed.is_empty() {
                String::new()
            } else {
                let lists: Vec<String> = allowed.iter().map(|l| l.join(",")).collect();
                format!(" allowed by device_name / MC_TE_FILTERS ({})", lists.join("; "))
            };
            let seen = if seen.is_empty() { "none".to_string() } else { seen.join(", ") };
            return Err(format!("the {} fabric has no active RDMA device{filters} (devices: {seen})", fabric.kind()));
        }
        let (shard, key) = (0, NEXT_KEY.fetch_add(1, Ordering::Relaxed));
        let me = me.to_string();
        shard::install(&runtime, shard, key, move || {
            let mut contexts = Vec::with_capacity(devices.len());
            for name in &devices {
                contexts.push(fabric.open(name).map_err(|e| e.to_string())?);
            }
            let engine = SliceEngine::new(config, contexts, PriorityMatrix::new()).map_err(|e| e.to_string())?;
            let connector = RpcConnector { me, opts, asked: HashMap::new() };
            Ok((engine, Box::new(connector) as Box<dyn Connector>))
        })?;
        let (tx, rx) = mpsc::sync_channel::<Fallback>(FALLBACK_QUEUE_MAX);
        let over_tcp = tcp.clone();
        std::thread::Builder::new()
            .name("shardwire-rdma-tcp".into())
            .spawn(move || {
                // Ends when the transport closes (the sender goes).
                while let Ok((peer, request)) = rx.recv() {
                    over_tcp.submit(&Route::Tcp(peer), vec![request]);
                }
            })
            .map_err(|e| format!("cannot start the TCP fallback thread: {e}"))?;
        Ok(RdmaTransport {
            runtime,
            shard,
            key,
            tcp,
            fallback: Mutex::new(Some(tx)),
            fell_back: Arc::new(Mutex::new(std::collections::HashSet::new())),
            peers: Mutex::new(Vec::new()),
            next_request: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        })
    }

    fn with<R, F>(&self, f: F) -> Result<R, String>
    where
        F: FnOnce(&mut SliceEngine) -> R + Send + 'static,
        R: Send + 'static,
    {
        shard::with_engine(&self.runtime, self.shard, self.key, f)
    }

    /// Registers `[addr, +len)` at `location` on every device.
    ///
    /// The caller (the engine's registry) holds the memory mapped while it
    /// is registered: the engine's contract with its user.
    pub fn register(&self, addr: u64, len: u64, location: &str) -> TeResult<()> {
        let location = if location.starts_with("cpu:") || location.starts_with("cuda:") { location } else { "cpu:0" };
        let location = location.to_string();
        // SAFETY: the engine registers only memory it checked is mapped,
        // and its user keeps it mapped until unregistering it (the API's
        // contract), which comes here first.
        let r = self.with(move |e| unsafe { e.register(addr, len, &location) }.map_err(|e| e.to_string()));
        r.and_then(|r| r)
            .map(|_| ())
            .map_err(|e| TeError::invalid(format!("RDMA registration of [{addr:#x}, +{len}): {e}")))
    }

    /// Takes `[addr, ...)` back from the devices, once no slice uses it
    /// (waiting up to `drain`).
    pub fn unregister(&self, addr: u64, drain: Duration) -> TeResult<()> {
        let deadline = Instant::now() + drain;
        loop {
            match self.with(move |e| e.unregister(addr)) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(why)) if why.starts_with("no memory registered") => return Ok(()),
                Ok(Err(why)) if Instant::now() < deadline => {
                    log::debug!("RDMA: {why}; waiting");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(Err(why)) => return Err(TeError::new(code::BATCH_BUSY, why)),
                Err(e) => return Err(TeError::invalid(e)),
            }
        }
    }

    /// Bytes each local device has moved, by name.
    pub fn device_bytes(&self) -> Vec<(String, u64)> {
        self.with(|e| e.device_bytes()).unwrap_or_default()
    }

    /// Slices sent again after a failed try.
    pub fn retries(&self) -> u64 {
        self.with(|e| e.retries()).unwrap_or(0)
    }

    /// What the descriptor says of this engine's RDMA side.
    pub fn describe(&self) -> Option<RdmaSegment> {
        self.with(|e| e.describe()).ok()
    }

    /// Answers a peer's Connection request (on the owning shard).
    pub fn accept(&self, request: &HandshakeDesc) -> HandshakeDesc {
        let asked = match Connection::from_desc(request) {
            Ok(c) => c,
            Err(e) => return rejection(request, &format!("rejected: a malformed Connection request ({e})")),
        };
        match self.with(move |e| e.accept(&asked)) {
            Ok(Ok(reply)) => reply.to_desc(),
            Ok(Err(why)) | Err(why) => rejection(request, &format!("rejected: {why}")),
        }
    }
}

fn verb(op: Opcode) -> Verb {
    match op {
        Opcode::Write => Verb::Write,
        Opcode::Read => Verb::Read,
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn route(&self, peer: &PeerSegment<'_>) -> TeResult<Option<Route>> {
        if self.closed.load(Ordering::Acquire) || peer.desc.protocol != "rdma" || peer.desc.devices.is_empty() {
            return Ok(None);
        }
        let segment = match RdmaSegment::from_desc(peer.desc) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("RDMA: {}'s descriptor: {e}; using TCP", peer.name);
                return Ok(None);
            }
        };
        let name = peer.name.to_string();
        let known = name.clone();
        if let Err(e) = self.with(move |eng| eng.add_peer(&known, segment)).and_then(|r| r) {
            log::warn!("RDMA: {}: {e}; using TCP", peer.name);
            return Ok(None);
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let id = match peers.iter().position(|p| *p == name) {
            Some(i) => i,
            None if peers.len() < PEERS_MAX => {
                peers.push(name);
                peers.len() - 1
            }
            None => return Ok(None),
        };
        let tcp = match self.tcp.route(peer) {
            Ok(Some(Route::Tcp(p))) => Some(p),
            _ => None,
        };
        Ok(Some(Route::Rdma { peer: id as u32, tcp }))
    }

    fn submit(&self, route: &Route, requests: Vec<Request>) {
        let (peer, tcp_peer) = match route {
            Route::Rdma { peer, tcp } => {
                (self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(*peer as usize).cloned(), *tcp)
            }
            _ => (None, None),
        };
        let Some(peer) = peer else {
            for r in requests {
                r.ticket.fail(TransferStatus::Failed, "a request for another transport reached the RDMA one");
            }
            return;
        };
        // Where requests go if no rail carries them: looked up once a call.
        let over_tcp =
            tcp_peer.and_then(|p| Some((p, self.fallback.lock().unwrap_or_else(|e| e.into_inner()).clone()?)));
        for r in requests {
            let id = self.next_request.fetch_add(1, Ordering::Relaxed);
            let req = RdmaRequest {
                id,
                verb: verb(r.op),
                peer: peer.clone(),
                local: r.local,
                remote: r.remote,
                len: r.len,
                location: "cpu:0".into(),
                deadline_ns: Some(shard::clock_ns(r.deadline)),
            };
            let (op, local, remote, len, deadline, ticket) = (r.op, r.local, r.remote, r.len, r.deadline, r.ticket);
            let fallback = over_tcp.as_ref().map(|(p, tx)| (*p, tx.clone(), self.fell_back.clone(), peer.clone()));
            let done: Done = Box::new(move |settled| match (settled.result, fallback) {
                (Ok(()), _) => ticket.done(len),
                (Err(why), Some((p, tx, logged, name))) if settled.rails_failed => {
                    if logged.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone()) {
                        log::warn!("RDMA to {name}: {why}; using TCP");
                    }
                    let request = crate::transport::request::request(op, local, remote, len, deadline, ticket);
                    if let Err(mpsc::TrySendError::Full((_, r)) | mpsc::TrySendError::Disconnected((_, r))) =
                        tx.try_send((p, request))
                    {
                        r.ticket.fail(TransferStatus::Failed, &format!("{why}; and TCP's fallback queue is full"));
                    }
                }
                (Err(why), _) if why.contains("timed out") => ticket.fail(TransferStatus::Timeout, &why),
                (Err(why), _) => ticket.fail(TransferStatus::Failed, &why),
            });
            // If the shard cannot take it, the ticket inside `done` is
            // dropped, and a dropped ticket settles as failed.
            if let Err(e) = shard::submit(&self.runtime, self.shard, self.key, req, done) {
                log::warn!("RDMA: {e}");
            }
        }
    }

    /// Whole requests: the slice engine cuts them.
    fn stripes(&self) -> bool {
        false
    }

    fn cancel(&self, _sink: &Arc<dyn Sink>) {
        // Requests settle by their deadline; nothing waits outside a shard.
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) && !self.runtime.is_forked_copy() {
            shard::uninstall(&self.runtime, self.shard, self.key);
        }
        self.fallback.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.close();
    }
}
