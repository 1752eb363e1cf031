//! The RDMA [`Transport`]: the engine's requests, carried by slice engines
//! on the shards that own the devices, with endpoints made through
//! Mooncake's Connection RPC.
//!
//! Each device belongs to one shard, on its own NUMA node where the plan
//! has one ([`super::placement`]); every shard owning devices runs a slice
//! engine over them, polled in its loop. A request goes, over the
//! runtime's rings, to a shard owning one of the devices its memory's
//! location prefers (when several shards do, the engine cuts requests in
//! stripes and they are dealt to those shards in turn, each as often as it
//! owns such devices), and settles there, through its ticket. The
//! segment's descriptor lists every device, whichever shard owns it, and
//! a peer's Connection request is answered by the shard owning the device
//! it names. The Connection RPC to a peer runs on a helper thread per
//! handshake (at most [`HANDSHAKES_MAX`] at once per shard), so no shard
//! waits on the network. A request that fails on every rail goes over TCP
//! instead, when the peer serves it (as Mooncake's TENT does), on a
//! fallback thread of this transport (a shard never blocks on TCP's
//! queues); one log line per peer says so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use super::fabric::{DeviceInfo, Fabric, PortState, Verb};
use super::placement;
use super::shard::{self, Done};
use super::slices::{Answer, Connector, OurSide, PeerSide, RdmaConfig, RdmaRequest, SliceEngine};
use crate::error::{TeError, TeResult, code};
use crate::meta::p2p::{CallOptions, call};
use crate::proto::mooncake::frame::FrameType;
use crate::proto::mooncake::message::{HandshakeDesc, from_wire, to_wire};
use crate::proto::mooncake::rdma::{Connection, NicPath, RdmaSegment, rejection};
use crate::runtime::Runtime;
use crate::topo::PriorityMatrix;
use crate::transport::request::{Opcode, Request, Sink, Ticket, TransferStatus};
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
            return Ok(Answer::Ready(PeerSide {
                gid: theirs.gid,
                lid: theirs.lid,
                qps,
                mtu: theirs.mtu,
                instance: theirs.instance,
            }));
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
            instance: None,
        };
        let body = to_wire(&request.to_desc());
        let (tx, rx) = mpsc::channel();
        let (target, opts) = (peer.to_string(), self.opts.clone());
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

/// A slice engine on a shard, and the devices (by index into the
/// transport's list) it owns.
struct ShardEngine {
    shard: usize,
    key: u64,
    devices: Vec<usize>,
    /// How many of its devices are up (kept by the slice engine): work is
    /// not dealt to an engine whose devices are all down.
    up: Arc<AtomicUsize>,
}

/// Registered memory, by address: where it is.
struct Placed {
    addr: u64,
    end: u64,
    location: String,
}

/// The RDMA transport of one engine.
pub struct RdmaTransport {
    runtime: Arc<Runtime>,
    engines: Vec<ShardEngine>,
    /// Every device, in the descriptor's order: its name and (engine,
    /// index in that engine).
    devices: Vec<(String, usize, usize)>,
    matrix: PriorityMatrix,
    /// The engines that work for a location goes to, in turn.
    deal: Mutex<Vec<(String, Arc<[usize]>)>>,
    next_deal: AtomicU64,
    regions: RwLock<Vec<Placed>>,
    tcp: Arc<TcpTransport>,
    /// Feeds the fallback thread; `None` once closed.
    fallback: Mutex<Option<mpsc::SyncSender<Fallback>>>,
    /// Peers routed here, by route id (every slice engine knows them by
    /// the same id).
    peers: Mutex<Vec<String>>,
    dispatch: Arc<Dispatch>,
    closed: AtomicBool,
    /// This process's instance number, told to each peer that connects.
    instance: u64,
}

/// Locations whose deal order is kept.
const LOCATIONS_MAX: usize = 1024;

impl RdmaTransport {
    /// Opens every active device of `fabric` that is on each list of
    /// `allowed` (`device_name`, `MC_TE_FILTERS`), each on the shard of
    /// `runtime` placed for it, for the engine whose segment is `me`.
    /// `custom` is the matrix of `MC_CUSTOM_TOPO_JSON`, when set.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        runtime: Arc<Runtime>,
        fabric: Arc<dyn Fabric>,
        allowed: &[Vec<String>],
        tcp: Arc<TcpTransport>,
        me: &str,
        instance: u64,
        config: RdmaConfig,
        opts: CallOptions,
        custom: Option<&PriorityMatrix>,
    ) -> Result<RdmaTransport, String> {
        let all = fabric.devices();
        let active: Vec<DeviceInfo> = all
            .iter()
            .filter(|d| d.state == PortState::Active && allowed.iter().all(|l| l.contains(&d.name)))
            .cloned()
            .collect();
        if active.is_empty() {
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
        let matrix = placement::local_matrix(&active, custom);
        let nodes: Vec<Option<u32>> = active.iter().map(|d| d.numa_node).collect();
        let owners = placement::place(&nodes, &runtime.shard_numa_nodes());
        // Every engine splits memory alike, so their buffers match.
        let config =
            RdmaConfig { region_bytes_max: active.iter().map(|d| d.max_mr_size).min().unwrap_or(u64::MAX), ..config };
        let mut engines: Vec<ShardEngine> = Vec::new();
        let mut devices = Vec::with_capacity(active.len());
        for (i, d) in active.iter().enumerate() {
            let e = match engines.iter().position(|e| e.shard == owners[i]) {
                Some(e) => e,
                None => {
                    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
                    let up = Arc::new(AtomicUsize::new(0));
                    engines.push(ShardEngine { shard: owners[i], key, devices: Vec::new(), up });
                    engines.len() - 1
                }
            };
            devices.push((d.name.clone(), e, engines[e].devices.len()));
            engines[e].devices.push(i);
        }
        for (n, e) in engines.iter().enumerate() {
            let names: Vec<String> = e.devices.iter().map(|&i| active[i].name.clone()).collect();
            let (rails, total, up) = (e.devices.clone(), active.len(), e.up.clone());
            let (fabric, me, m, opts) = (fabric.clone(), me.to_string(), matrix.clone(), opts.clone());
            let installed = shard::install(&runtime, e.shard, e.key, move || {
                let mut contexts = Vec::with_capacity(names.len());
                for name in &names {
                    contexts.push(fabric.open(name).map_err(|e| e.to_string())?);
                }
                let mut engine = SliceEngine::new(config, contexts, m).map_err(|e| e.to_string())?;
                engine.set_rails(&rails, total);
                engine.watch_up(up);
                let connector = RpcConnector { me, opts, asked: HashMap::new() };
                Ok((engine, Box::new(connector) as Box<dyn Connector>))
            });
            if let Err(e) = installed {
                for done in &engines[..n] {
                    shard::uninstall(&runtime, done.shard, done.key);
                }
                return Err(e);
            }
        }
        let placed: Vec<String> =
            devices.iter().map(|(name, e, _)| format!("{name} on shard {}", engines[*e].shard)).collect();
        log::info!("RDMA: {}", placed.join(", "));
        let (tx, rx) = mpsc::sync_channel::<Fallback>(FALLBACK_QUEUE_MAX);
        let over_tcp = tcp.clone();
        let thread = std::thread::Builder::new().name("shardwire-rdma-tcp".into()).spawn(move || {
            // Ends when the transport closes (the sender goes).
            while let Ok((peer, request)) = rx.recv() {
                over_tcp.submit(&Route::Tcp(peer), vec![request]);
            }
        });
        if let Err(e) = thread {
            for done in &engines {
                shard::uninstall(&runtime, done.shard, done.key);
            }
            return Err(format!("cannot start the TCP fallback thread: {e}"));
        }
        let dispatch = Arc::new(Dispatch {
            runtime: runtime.clone(),
            engines: engines.iter().map(|e| (e.shard, e.key, e.up.clone())).collect(),
            next_request: AtomicU64::new(1),
            fell_back: Mutex::new(std::collections::HashSet::new()),
        });
        Ok(RdmaTransport {
            runtime,
            engines,
            devices,
            matrix,
            deal: Mutex::new(Vec::new()),
            next_deal: AtomicU64::new(0),
            regions: RwLock::new(Vec::new()),
            tcp,
            fallback: Mutex::new(Some(tx)),
            peers: Mutex::new(Vec::new()),
            dispatch,
            closed: AtomicBool::new(false),
            instance,
        })
    }

    /// Runs `f` on engine `e`, on its shard.
    fn with<R, F>(&self, e: usize, f: F) -> Result<R, String>
    where
        F: FnOnce(&mut SliceEngine) -> R + Send + 'static,
        R: Send + 'static,
    {
        shard::with_engine(&self.runtime, self.engines[e].shard, self.engines[e].key, f)
    }

    /// Runs `f` on every engine; the results in engine order.
    fn with_all<R, F>(&self, f: F) -> Result<Vec<R>, String>
    where
        F: Fn(&mut SliceEngine) -> R + Send + Clone + 'static,
        R: Send + 'static,
    {
        (0..self.engines.len()).map(|e| self.with(e, f.clone())).collect()
    }

    /// The shards owning this engine's devices (tests look at placement).
    pub fn shards(&self) -> Vec<(String, usize)> {
        self.devices.iter().map(|(n, e, _)| (n.clone(), self.engines[*e].shard)).collect()
    }

    /// Registers `[addr, +len)` at `location` on every device. A location
    /// that is not `cpu:N` or `cuda:N` (Mooncake's `*`, say) is the NUMA
    /// node the memory is on, `cpu:0` where the kernel does not say.
    ///
    /// The caller (the engine's registry) holds the memory mapped while it
    /// is registered: the engine's contract with its user.
    pub fn register(&self, addr: u64, len: u64, location: &str) -> TeResult<()> {
        let location = if location.starts_with("cpu:") || location.starts_with("cuda:") {
            location.to_string()
        } else {
            format!("cpu:{}", crate::mem::probe::numa_node_of(addr).unwrap_or(0))
        };
        let fail = |e: String| TeError::invalid(format!("RDMA registration of [{addr:#x}, +{len}): {e}"));
        for e in 0..self.engines.len() {
            let at = location.clone();
            // SAFETY: the engine registers only memory it checked is
            // mapped, and its user keeps it mapped until unregistering it
            // (the API's contract), which comes here first.
            let r = self.with(e, move |eng| unsafe { eng.register(addr, len, &at) }.map_err(|e| e.to_string()));
            if let Err(why) = r.and_then(|r| r) {
                for undo in 0..e {
                    let _ = self.with(undo, move |eng| eng.unregister(addr));
                }
                return Err(fail(why));
            }
        }
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let at = regions.partition_point(|r| r.addr < addr);
        regions.insert(at, Placed { addr, end: addr + len, location });
        Ok(())
    }

    /// Takes `[addr, ...)` back from the devices, once no slice uses it
    /// (waiting up to `drain`).
    pub fn unregister(&self, addr: u64, drain: Duration) -> TeResult<()> {
        let deadline = Instant::now() + drain;
        for e in 0..self.engines.len() {
            loop {
                match self.with(e, move |eng| eng.unregister(addr)) {
                    Ok(Ok(())) => break,
                    Ok(Err(why)) if why.starts_with("no memory registered") => break,
                    Ok(Err(why)) if Instant::now() < deadline => {
                        log::debug!("RDMA: {why}; waiting");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(Err(why)) => return Err(TeError::new(code::BATCH_BUSY, why)),
                    Err(e) => return Err(TeError::invalid(e)),
                }
            }
        }
        self.regions.write().unwrap_or_else(|e| e.into_inner()).retain(|r| r.addr != addr);
        Ok(())
    }

    /// Bytes each local device has moved, by name.
    pub fn device_bytes(&self) -> Vec<(String, u64)> {
        let per = self.with_all(|e| e.device_bytes()).unwrap_or_default();
        self.devices
            .iter()
            .map(|(name, e, i)| (name.clone(), per.get(*e).and_then(|d| d.get(*i)).map_or(0, |(_, b)| *b)))
            .collect()
    }

    /// Slices sent again after a failed try.
    pub fn retries(&self) -> u64 {
        self.with_all(|e| e.retries()).map(|r| r.iter().sum()).unwrap_or(0)
    }

    /// What the descriptor says of this engine's RDMA side: every device
    /// in order, each buffer with every device's keys (the engines split
    /// memory alike, so their buffers match one for one), the matrix.
    pub fn describe(&self) -> Option<RdmaSegment> {
        let parts = self.with_all(|e| e.describe()).ok()?;
        let devices = self.devices.iter().map(|(_, e, i)| parts[*e].devices[*i].clone()).collect();
        let first = &parts[0];
        let mut buffers = first.buffers.clone();
        for (k, b) in buffers.iter_mut().enumerate() {
            b.lkey.clear();
            b.rkey.clear();
            for (_, e, i) in &self.devices {
                let theirs = parts[*e].buffers.get(k).filter(|t| t.addr == b.addr && t.length == b.length)?;
                b.lkey.push(theirs.lkey[*i]);
                b.rkey.push(theirs.rkey[*i]);
            }
        }
        let matrix = if self.matrix.is_empty() { first.matrix.clone() } else { self.matrix.clone() };
        let matrix = if self.engines.len() > 1 && self.matrix.is_empty() {
            let mut m = PriorityMatrix::new();
            let all = self.devices.iter().map(|(n, _, _)| n.clone()).collect();
            m.insert("*", crate::topo::MatrixEntry { preferred: all, available: vec![] });
            m
        } else {
            matrix
        };
        Some(RdmaSegment { devices, buffers, matrix })
    }

    /// Answers a peer's Connection request (on the shard owning the device
    /// it names).
    pub fn accept(&self, request: &HandshakeDesc) -> HandshakeDesc {
        let asked = match Connection::from_desc(request) {
            Ok(c) => c,
            Err(e) => return rejection(request, &format!("rejected: a malformed Connection request ({e})")),
        };
        let Some(&(_, e, _)) = self.devices.iter().find(|(n, _, _)| *n == asked.peer.device) else {
            return rejection(request, &format!("rejected: no RDMA device {:?} here", asked.peer.device));
        };
        match self.with(e, move |eng| eng.accept(&asked)) {
            Ok(Ok(reply)) => {
                // Which process answers: the initiator's queue pairs must
                // reach the one its requests were addressed to.
                HandshakeDesc { shardwire_instance: Some(self.instance), ..reply.to_desc() }
            }
            Ok(Err(why)) | Err(why) => rejection(request, &format!("rejected: {why}")),
        }
    }

    /// The engine the next request from memory at `local` goes to.
    fn engine_for(&self, local: u64) -> usize {
        if self.engines.len() == 1 {
            return 0;
        }
        let location = {
            let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
            let i = regions.partition_point(|r| r.addr <= local);
            i.checked_sub(1).map(|i| &regions[i]).filter(|r| local < r.end).map(|r| r.location.clone())
        };
        let location = location.unwrap_or_else(|| "cpu:0".to_string());
        let order = {
            let mut deal = self.deal.lock().unwrap_or_else(|e| e.into_inner());
            match deal.iter().find(|(l, _)| *l == location) {
                Some((_, o)) => o.clone(),
                None => {
                    let names: Vec<String> = self.devices.iter().map(|(n, _, _)| n.clone()).collect();
                    let owners: Vec<usize> = self.devices.iter().map(|(_, e, _)| *e).collect();
                    let o: Arc<[usize]> = placement::deal_order(&location, &self.matrix, &names, &owners).into();
                    if deal.len() < LOCATIONS_MAX {
                        deal.push((location, o.clone()));
                    }
                    o
                }
            }
        };
        // Engines whose devices are all down are passed over (their work
        // would only fall back to TCP); if every one is, the turn stands.
        let turn = self.next_deal.fetch_add(1, Ordering::Relaxed);
        (0..order.len() as u64)
            .map(|k| order[((turn + k) % order.len() as u64) as usize])
            .find(|&e| self.engines[e].up.load(Ordering::Relaxed) > 0)
            .unwrap_or(order[(turn % order.len() as u64) as usize])
    }
}

/// A request's own fields, kept so it can be sent again elsewhere.
struct Job {
    op: Opcode,
    local: u64,
    remote: u64,
    len: u64,
    deadline: Instant,
    ticket: Ticket,
}

/// What sending a request to a shard's slice engine needs, shared by the
/// transport and the requests in flight (which may send themselves again).
struct Dispatch {
    runtime: Arc<Runtime>,
    /// Each engine's shard, key, and count of devices up.
    engines: Vec<(usize, u64, Arc<AtomicUsize>)>,
    next_request: AtomicU64,
    /// Peers whose fallback to TCP was logged.
    fell_back: Mutex<std::collections::HashSet<String>>,
}

impl Dispatch {
    /// Sends `job` for `peer` to engine `e`. If no rail of that engine
    /// carries it, it goes once to another engine with devices up (its
    /// rails are other devices), then over TCP where the peer serves it.
    /// `again` says it is that second send, made from a shard's thread:
    /// that may not wait for room in a ring.
    fn send(
        self: &Arc<Self>,
        e: usize,
        peer: &Arc<str>,
        job: Job,
        over_tcp: Option<(tcp::Peer, mpsc::SyncSender<Fallback>)>,
        again: bool,
    ) {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let req = RdmaRequest {
            id,
            verb: verb(job.op),
            peer: peer.to_string(),
            local: job.local,
            remote: job.remote,
            len: job.len,
            deadline_ns: Some(shard::clock_ns(job.deadline)),
        };
        let (me, name) = (self.clone(), peer.clone());
        let done: Done = Box::new(move |settled| match settled.result {
            Ok(()) => job.ticket.done(job.len),
            Err(why) if settled.peer_gone => job.ticket.fail_gone(&why),
            Err(why) if settled.rails_failed => {
                let other = (1..me.engines.len())
                    .map(|k| (e + k) % me.engines.len())
                    .find(|&o| me.engines[o].2.load(Ordering::Relaxed) > 0);
                match other {
                    Some(o) if !again => me.send(o, &name, job, over_tcp, true),
                    _ => me.fall_back(&name, &why, job, over_tcp),
                }
            }
            Err(why) if why.contains("timed out") => job.ticket.fail(TransferStatus::Timeout, &why),
            Err(why) => job.ticket.fail(TransferStatus::Failed, &why),
        });
        // If the shard cannot take it, the ticket inside `done` is
        // dropped, and a dropped ticket settles as failed.
        let (shard, key, _) = &self.engines[e];
        let sent = if again {
            shard::try_submit(&self.runtime, *shard, *key, req, done)
        } else {
            shard::submit(&self.runtime, *shard, *key, req, done)
        };
        if let Err(e) = sent {
            log::warn!("RDMA: {e}");
        }
    }

    /// No rail carried `job`: over TCP if the peer serves it, else failed.
    fn fall_back(&self, peer: &str, why: &str, job: Job, over_tcp: Option<(tcp::Peer, mpsc::SyncSender<Fallback>)>) {
        let Some((p, tx)) = over_tcp else {
            return job.ticket.fail(TransferStatus::Failed, why);
        };
        if self.fell_back.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.to_string()) {
            log::warn!("RDMA to {peer}: {why}; using TCP");
        }
        let request =
            crate::transport::request::request(job.op, job.local, job.remote, job.len, job.deadline, job.ticket);
        match tx.try_send((p, request)) {
            Ok(()) => crate::telemetry::counters::event(crate::telemetry::Event::RdmaToTcp),
            Err(mpsc::TrySendError::Full((_, r)) | mpsc::TrySendError::Disconnected((_, r))) => {
                r.ticket.fail(TransferStatus::Failed, &format!("{why}; and TCP's fallback queue is full"))
            }
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
        let instance = peer.desc.shardwire_instance;
        let learned = self.with_all(move |eng| eng.add_peer(&known, segment.clone(), instance));
        if let Err(e) = learned.and_then(|all| all.into_iter().collect::<Result<Vec<()>, String>>()) {
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
        let peer: Arc<str> = peer.into();
        for r in requests {
            let job =
                Job { op: r.op, local: r.local, remote: r.remote, len: r.len, deadline: r.deadline, ticket: r.ticket };
            let e = self.engine_for(r.local);
            self.dispatch.send(e, &peer, job, over_tcp.clone(), false);
        }
    }

    /// Whole requests when one shard owns every device (its slice engine
    /// cuts them); stripes, dealt to the owning shards, when several do.
    fn stripes(&self) -> bool {
        self.engines.len() > 1
    }

    fn cancel(&self, _sink: &Arc<dyn Sink>) {
        // Requests settle by their deadline; nothing waits outside a shard.
    }

    /// Every shard's slice engine destroys its endpoints to the old
    /// process and settles what it held for it as gone; the name is learnt
    /// afresh when the new process is routed.
    fn retire(&self, route: &Route) {
        let Route::Rdma { peer, .. } = *route else { return };
        let Some(name) = self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(peer as usize).cloned() else {
            return;
        };
        let known = name.clone();
        match self.with_all(move |eng| eng.retire_peer(&known)) {
            Ok(n) => log::debug!(
                "RDMA: {name}: let go of the process it replaced ({} requests settled)",
                n.iter().sum::<usize>()
            ),
            Err(e) => log::warn!("RDMA: {name}: letting go of the process it replaced: {e}"),
        }
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) && !self.runtime.is_forked_copy() {
            for e in &self.engines {
                shard::uninstall(&self.runtime, e.shard, e.key);
            }
        }
        self.fallback.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        self.close();
    }
}
