//! The slice engine: one shard's RDMA work, from requests to work requests
//! and back, on any [`Fabric`](super::fabric::Fabric).
//!
//! It owns a context and a completion queue per local device, the
//! endpoints (queue pairs to one peer device) made on first use, and every
//! slice in flight. [`SliceEngine::progress`] posts what is ready (chains
//! per queue pair, at most `max_wr` outstanding on each) and polls the
//! completion queues in batches. A failed slice goes again on another rail
//! (see [`super::plan::Rails::pick`]) until `retry_cnt` tries are spent; a
//! peer rail with `pause_errors` errors inside `pause_window_ns` rests for
//! `pause_ns`; an endpoint whose queue pair went to error is rebuilt on
//! next use. Every slice settles exactly once, and a request settles when
//! its last slice does: done if all are, failed (saying why) otherwise.
//!
//! Its tables are ordered maps, so that under the simulated fabric a run
//! is the same run every time its seed is replayed.
//!
//! Time is the caller's (`now_ns`): virtual under the simulated fabric,
//! the clock in production. Connecting an endpoint needs the peer's queue
//! pairs: a [`Connector`] gets them (Mooncake's Connection RPC; in tests,
//! the simulated peer directly).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::fabric::{
    Access, Completion, Context, CqId, DeviceInfo, FabricError, Mr, PeerAddr, PortEvent, PortState, QpCaps, QpNum,
    QpState, Sge, Sges, Transition, Verb, WcStatus, WorkRequest,
};
use super::plan::{Rails, Slice, SliceRule};
use crate::proto::mooncake::rdma::{Buffer, Connection, Device, Gid, QPS_PER_ENDPOINT_MAX, RdmaSegment};
use crate::topo::{MatrixEntry, PriorityMatrix};

/// Queue pairs sets kept for peers not known yet.
pub const PASSIVE_MAX: usize = 1024;
/// Requests in flight at once.
pub const REQUESTS_MAX: usize = 1 << 16;
/// Slices in flight at once (queued or posted).
pub const SLICES_MAX: usize = 1 << 20;
/// Completions taken per poll of one queue.
pub const POLL_BATCH: usize = 64;
/// Peers one engine keeps endpoints to.
pub const PEERS_MAX: usize = 4096;
/// How often posted slices are checked against their deadlines (ns).
const SWEEP_NS: u64 = 10_000_000;
/// How long an endpoint may hold work without a completion (ns) before it
/// is taken for broken: four times what a device's own retries take with
/// Mooncake's settings (timeout 14, about 67 ms, times 8 tries).
const STALL_NS: u64 = 2_000_000_000;
/// How long a broken endpoint may hold work before it is destroyed (ns):
/// a device flushes at once; this is for one that does not.
const DRAIN_MAX_NS: u64 = 2_000_000_000;

/// The knobs, with Mooncake's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaConfig {
    pub slice: SliceRule,
    /// Tries of one slice after the first (`MC_RETRY_CNT`).
    pub retry_cnt: u32,
    /// Queue pairs per endpoint (`MC_NUM_QP_PER_EP`).
    pub qps_per_endpoint: usize,
    /// Outstanding work requests per queue pair (`MC_MAX_WR`).
    pub max_wr: u32,
    /// Entries of each completion queue (`MC_MAX_CQE_PER_CTX`).
    pub cqe: u32,
    pub pause_errors: usize,
    pub pause_window_ns: u64,
    /// How long a failing peer rail rests (`MC_RDMA_RAIL_PAUSE_SECONDS`).
    pub pause_ns: u64,
    /// The largest path MTU (`MC_MTU`).
    pub mtu: u32,
    /// The GID index to use (`MC_GID_INDEX`), or `None` to choose.
    pub gid_index: Option<usize>,
    /// Endpoints per local device at most (`MC_MAX_EP_PER_CTX`).
    pub max_endpoints: usize,
    /// How long an endpoint may wait for its peer's side.
    pub connect_timeout_ns: u64,
    /// Scatter-gather entries and inline bytes per work request
    /// (`MC_MAX_SGE`, `MC_MAX_INLINE`): queue pair capabilities.
    pub max_sge: u32,
    pub max_inline: u32,
    /// A slice posted this long breaks its queue pair (`MC_SLICE_TIMEOUT`).
    pub slice_timeout_ns: Option<u64>,
}

impl RdmaConfig {
    /// The `MC_*` RDMA variables' values.
    pub fn from_settings(s: &crate::config::RdmaSettings) -> RdmaConfig {
        RdmaConfig {
            slice: SliceRule { slice_bytes: s.slice_bytes, fragment_ratio: s.fragment_ratio },
            retry_cnt: s.retry_cnt,
            qps_per_endpoint: s.qps_per_endpoint,
            max_wr: s.max_wr,
            cqe: s.cqe,
            pause_ns: s.rail_pause_s.saturating_mul(1_000_000_000),
            mtu: s.mtu,
            gid_index: s.gid_index,
            max_endpoints: s.max_endpoints,
            max_sge: s.max_sge,
            max_inline: s.max_inline,
            slice_timeout_ns: s.slice_timeout.map(|t| t.as_nanos().min(u128::from(u64::MAX)) as u64),
            ..RdmaConfig::default()
        }
    }
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            slice: SliceRule::default(),
            retry_cnt: 9,
            qps_per_endpoint: 2,
            max_wr: 256,
            cqe: 4096,
            pause_errors: 5,
            pause_window_ns: 5_000_000_000,
            pause_ns: 30_000_000_000,
            mtu: 4096,
            gid_index: None,
            max_endpoints: 65_536,
            connect_timeout_ns: 10_000_000_000,
            max_sge: 4,
            max_inline: 64,
            slice_timeout_ns: None,
        }
    }
}

/// The peer's side of a new endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSide {
    pub gid: Gid,
    pub lid: u16,
    /// As many as ours, already in RTR.
    pub qps: Vec<QpNum>,
    /// Its active MTU, if it said (a shardwire peer does).
    pub mtu: Option<u32>,
}

/// Our side of a new endpoint, as the peer is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurSide<'a> {
    pub device: &'a DeviceInfo,
    pub gid: Gid,
    pub qps: &'a [QpNum],
    /// The MTU we can take (our active one, capped by `MC_MTU`).
    pub mtu: u32,
}

/// What a connector says of a connection it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ready(PeerSide),
    /// Still on its way: ask again (with the same queue pairs) later.
    Pending,
}

/// Gets the peer's side of an endpoint, without blocking the shard.
pub trait Connector {
    /// `ours` wants device `peer_dev` (named `peer_device`) of `peer`'s
    /// segment: its side, or
    /// `Pending` (the engine asks again on a later progress, with the same
    /// queue pairs, until `connect_timeout_ns`), or why not.
    fn connect(&mut self, peer: &str, peer_dev: usize, peer_device: &str, ours: OurSide<'_>) -> Result<Answer, String>;
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaRequest {
    pub id: u64,
    pub verb: Verb,
    /// The peer's segment name.
    pub peer: String,
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    /// Where the local memory is (`cpu:0`): picks the local devices.
    pub location: String,
    /// When it must have settled (the caller's clock, ns): slices not yet
    /// sent by then fail, so the request settles soon after, failed.
    pub deadline_ns: Option<u64>,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub id: u64,
    pub result: Result<(), String>,
    /// It failed because no rail carried it (devices down, retries spent
    /// on unreachable peers, connections refused): another transport may.
    /// Not so for a refusal of the memory (keys, bounds, access) or a
    /// deadline.
    pub rails_failed: bool,
}

impl Settled {
    fn new(id: u64, fault: Option<Fault>) -> Settled {
        match fault {
            None => Settled { id, result: Ok(()), rails_failed: false },
            Some(f) => Settled { id, result: Err(f.why), rails_failed: f.rails },
        }
    }
}

/// Why a slice failed, and whether the rails were to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    why: String,
    rails: bool,
}

impl Fault {
    fn rails(why: String) -> Fault {
        Fault { why, rails: true }
    }

    fn request(why: String) -> Fault {
        Fault { why, rails: false }
    }
}

/// Local memory registered on every device.
struct Region {
    addr: u64,
    len: u64,
    /// Its memory location (`cpu:0`).
    location: String,
    mrs: Vec<Mr>,
}

struct Nic {
    ctx: Box<dyn Context>,
    cq: CqId,
    info: DeviceInfo,
    up: bool,
    gid: Gid,
    /// Bytes moved through it.
    bytes: u64,
    /// Endpoints on it now.
    endpoints: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SliceState {
    Ready,
    /// On queue pair `qp` since `at_ns`.
    Posted {
        local_dev: usize,
        peer_dev: usize,
        qp: QpNum,
        at_ns: u64,
    },
    Settled,
}

struct SliceRec {
    request: u64,
    slice: Slice,
    /// Tries made (0 before the first).
    tries: u32,
    state: SliceState,
    /// The local and peer rails of its last try.
    last: Option<(usize, usize)>,
}

struct RequestRec {
    req: RdmaRequest,
    left: usize,
    error: Option<Fault>,
}

struct Endpoint {
    qps: Vec<QpNum>,
    outstanding: Vec<u32>,
    next: usize,
    broken: bool,
    /// When it broke (ns): past [`DRAIN_MAX_NS`] undrained, its queue
    /// pairs are destroyed and what they held is taken back as flushed.
    broken_at_ns: u64,
    /// When it last made progress (ns): work posted to it idle, or a
    /// completion. Holding work past [`STALL_NS`] without one breaks it.
    progress_at_ns: u64,
    /// When it was last chosen (a count of choices).
    last_use: u64,
    /// Waiting for the peer's side since this time (ns); `None` once connected.
    connecting_since: Option<u64>,
}

struct Peer {
    segment: RdmaSegment,
    endpoints: BTreeMap<(usize, usize), Endpoint>,
    /// Error times of each peer device, and when its pause ends.
    errors: BTreeMap<usize, VecDeque<u64>>,
    paused_until: BTreeMap<usize, u64>,
}

/// One shard's RDMA work.
pub struct SliceEngine {
    config: RdmaConfig,
    devices: Vec<Nic>,
    matrix: PriorityMatrix,
    /// Registered local memory.
    regions: Vec<Region>,
    /// Queue pairs made for peers this engine does not know (yet): kept
    /// so they are not lost, at most `PASSIVE_MAX`.
    passive: VecDeque<(usize, Vec<QpNum>)>,
    peers: BTreeMap<String, Peer>,
    requests: BTreeMap<u64, RequestRec>,
    slices: BTreeMap<u64, SliceRec>,
    ready: VecDeque<u64>,
    next_slice: u64,
    settled: Vec<Settled>,
    /// Tries of slices after their first.
    retries: u64,
    /// Endpoint choices so far (the clock of `Endpoint::last_use`).
    uses: u64,
    /// When posted slices are next checked against their deadlines (ns).
    next_sweep_ns: u64,
}

impl SliceEngine {
    /// An engine over `contexts` (one per local device, in the order the
    /// local `matrix` and key arrays index them).
    pub fn new(
        config: RdmaConfig,
        contexts: Vec<Box<dyn Context>>,
        matrix: PriorityMatrix,
    ) -> Result<SliceEngine, FabricError> {
        assert!(config.qps_per_endpoint >= 1 && config.max_wr >= 1 && config.slice.slice_bytes > 0);
        let mut devices = Vec::with_capacity(contexts.len());
        for mut ctx in contexts {
            let info = ctx.info();
            let gid = super::fabric::choose_gid(&info.gids, config.gid_index)
                .map(|i| info.gids[i].gid)
                .map_err(|why| FabricError::NoGid(info.name.clone(), why))?;
            let cq = ctx.create_cq(config.cqe)?;
            devices.push(Nic { up: info.state == PortState::Active, ctx, cq, info, gid, bytes: 0, endpoints: 0 });
        }
        Ok(SliceEngine {
            config,
            devices,
            matrix,
            regions: Vec::new(),
            passive: VecDeque::new(),
            peers: BTreeMap::new(),
            requests: BTreeMap::new(),
            slices: BTreeMap::new(),
            ready: VecDeque::new(),
            next_slice: 0,
            settled: Vec::new(),
            retries: 0,
            uses: 0,
            next_sweep_ns: 0,
        })
    }

    /// Registers `[addr, addr + len)`, at memory `location`, on every
    /// device: as one region, or as several when it is larger than a
    /// device's `max_mr_size` (each its own buffer in [`Self::describe`]).
    /// Returns how many regions it made.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Self::unregister`] returns `Ok`
    /// for it, or the engine is dropped.
    pub unsafe fn register(&mut self, addr: u64, len: u64, location: &str) -> Result<usize, FabricError> {
        let max = self.devices.iter().map(|d| d.info.max_mr_size).min().unwrap_or(u64::MAX).max(4096);
        if addr.checked_add(len).is_none() || len == 0 {
            return Err(FabricError::Register { addr, len, why: "an empty or wrapping range".into() });
        }
        if self.regions.iter().any(|r| addr < r.addr + r.len && r.addr < addr + len) {
            return Err(FabricError::Register { addr, len, why: "it overlaps memory registered already".into() });
        }
        let mut made: Vec<Region> = Vec::new();
        let mut at = addr;
        while at < addr + len {
            let n = max.min(addr + len - at);
            let mut mrs = Vec::with_capacity(self.devices.len());
            for d in &mut self.devices {
                // SAFETY: the caller keeps the memory mapped (this
                // function's contract).
                match unsafe { d.ctx.register(at, n, Access::ALL) } {
                    Ok(mr) => mrs.push(mr),
                    Err(e) => {
                        made.push(Region { addr: at, len: n, location: String::new(), mrs });
                        for r in made {
                            for (d, mr) in self.devices.iter_mut().zip(&r.mrs) {
                                let _ = d.ctx.deregister(mr.lkey);
                            }
                        }
                        return Err(e);
                    }
                }
            }
            made.push(Region { addr: at, len: n, location: location.to_string(), mrs });
            at += n;
        }
        let count = made.len();
        self.regions.extend(made);
        self.regions.sort_by_key(|r| r.addr);
        Ok(count)
    }

    /// Takes back the memory registered at `addr` (every region it was
    /// split into). Refused, with the count, while slices of requests in
    /// flight use it; the caller waits and asks again.
    pub fn unregister(&mut self, addr: u64) -> Result<(), String> {
        let Some(first) = self.regions.iter().position(|r| r.addr == addr) else {
            return Err(format!("no memory registered at {addr:#x}"));
        };
        // The regions one register call made are adjacent, in order.
        let mut last = first;
        while last + 1 < self.regions.len()
            && self.regions[last + 1].addr == self.regions[last].addr + self.regions[last].len
        {
            last += 1;
        }
        let (start, end) = (addr, self.regions[last].addr + self.regions[last].len);
        let busy = self.slices.values().filter(|s| s.slice.local < end && start < s.slice.local + s.slice.len).count();
        if busy > 0 {
            return Err(format!("{busy} slices in flight use the memory at {addr:#x}"));
        }
        for r in self.regions.drain(first..=last) {
            for (d, mr) in self.devices.iter_mut().zip(&r.mrs) {
                if let Err(e) = d.ctx.deregister(mr.lkey) {
                    log::warn!("RDMA: deregistering {:#x} on {}: {e}", r.addr, d.info.name);
                }
            }
        }
        Ok(())
    }

    /// Learns (or learns again) a peer's segment.
    pub fn add_peer(&mut self, name: &str, segment: RdmaSegment) -> Result<(), String> {
        if !self.peers.contains_key(name) && self.peers.len() >= PEERS_MAX {
            return Err(format!("{PEERS_MAX} peers already"));
        }
        let peer = self.peers.entry(name.to_string()).or_insert_with(|| Peer {
            segment: segment.clone(),
            endpoints: BTreeMap::new(),
            errors: BTreeMap::new(),
            paused_until: BTreeMap::new(),
        });
        peer.segment = segment;
        Ok(())
    }

    /// What this engine publishes of itself: its devices, its registered
    /// memory with every device's keys, and its priority matrix (every
    /// device preferred for every location, when it has none).
    pub fn describe(&self) -> RdmaSegment {
        let devices: Vec<Device> =
            self.devices.iter().map(|d| Device { name: d.info.name.clone(), lid: d.info.lid, gid: d.gid }).collect();
        let buffers = self
            .regions
            .iter()
            .map(|r| Buffer {
                location: r.location.clone(),
                addr: r.addr,
                length: r.len,
                lkey: r.mrs.iter().map(|m| m.lkey).collect(),
                rkey: r.mrs.iter().map(|m| m.rkey).collect(),
            })
            .collect();
        let matrix = if self.matrix.is_empty() {
            let mut m = PriorityMatrix::new();
            let all: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
            m.insert("*", MatrixEntry { preferred: all, available: vec![] });
            m
        } else {
            self.matrix.clone()
        };
        RdmaSegment { devices, buffers, matrix }
    }

    /// The passive side of a Connection: `req`'s queue pairs want our
    /// device `req.peer.device`. Makes as many queue pairs there, in RTR
    /// and RTS against theirs, and answers with them. They serve this
    /// engine's own sends to that peer too, once it knows the peer.
    pub fn accept(&mut self, req: &Connection) -> Result<Connection, String> {
        let ld = self
            .devices
            .iter()
            .position(|d| d.info.name == req.peer.device)
            .ok_or_else(|| format!("no RDMA device {:?} here", req.peer.device))?;
        if !self.devices[ld].up {
            return Err(format!("device {:?} is down", req.peer.device));
        }
        if !self.make_room(ld) {
            return Err(format!("every endpoint of {:?} is busy", req.peer.device));
        }
        if req.qps.len() > QPS_PER_ENDPOINT_MAX {
            return Err(format!("{} queue pairs asked for", req.qps.len()));
        }
        let d = &mut self.devices[ld];
        let caps = QpCaps { max_send_wr: self.config.max_wr, max_sge: 1, max_inline: 0 };
        let cap = self.config.mtu;
        let mut mine = Vec::with_capacity(req.qps.len());
        let mut made = || -> Result<(), String> {
            for &theirs in &req.qps {
                let q = d.ctx.create_qp(d.cq, caps).map_err(|e| e.to_string())?;
                mine.push(q);
                d.ctx.modify_qp(q, Transition::Init { access: Access::ALL }).map_err(|e| e.to_string())?;
                let mtu = super::fabric::path_mtu(d.info.active_mtu, req.mtu, cap);
                let peer = PeerAddr { gid: req.gid, lid: req.lid, qp: QpNum(theirs), mtu };
                d.ctx.modify_qp(q, Transition::Rtr { peer }).map_err(|e| e.to_string())?;
                d.ctx
                    .modify_qp(q, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 })
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        if let Err(e) = made() {
            for &q in &mine {
                let _ = self.devices[ld].ctx.destroy_qp(q);
            }
            return Err(e);
        }
        let (gid, lid) = (self.devices[ld].gid, self.devices[ld].info.lid);
        let known = self.peers.get(&req.local.server).and_then(|p| p.segment.device_index(&req.local.device));
        match known {
            Some(pd) => {
                let n = mine.len();
                let peer = self.peers.get_mut(&req.local.server).expect("looked up above");
                let fresh = Endpoint {
                    qps: mine.clone(),
                    outstanding: vec![0; n],
                    next: 0,
                    broken: false,
                    broken_at_ns: 0,
                    progress_at_ns: 0,
                    last_use: 0,
                    connecting_since: None,
                };
                match peer.endpoints.insert((ld, pd), fresh) {
                    // The peer made the endpoint again (it restarted, or
                    // saw an error): the old queue pairs go.
                    Some(old) => {
                        for q in old.qps {
                            let _ = self.devices[ld].ctx.destroy_qp(q);
                        }
                    }
                    None => self.devices[ld].endpoints += 1,
                }
            }
            None => {
                if self.passive.len() >= PASSIVE_MAX
                    && let Some((dev, qps)) = self.passive.pop_front()
                {
                    for q in qps {
                        let _ = self.devices[dev].ctx.destroy_qp(q);
                    }
                }
                self.passive.push_back((ld, mine.clone()));
            }
        }
        Ok(Connection {
            local: req.peer.clone(),
            peer: req.local.clone(),
            lid,
            gid,
            qps: mine.iter().map(|q| q.0).collect(),
            ready_ack: req.ready_ack,
            mtu: Some(self.devices[ld].info.active_mtu.min(cap)),
        })
    }

    /// Bytes moved through each local device so far.
    pub fn device_bytes(&self) -> Vec<(String, u64)> {
        self.devices.iter().map(|d| (d.info.name.clone(), d.bytes)).collect()
    }

    /// Tries of slices after their first, so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Requests not settled yet.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Takes what has settled since the last call.
    pub fn take_settled(&mut self) -> Vec<Settled> {
        std::mem::take(&mut self.settled)
    }

    /// Cuts `req` into slices and queues them. A request that cannot be
    /// cut settles at once, failed.
    pub fn submit(&mut self, req: RdmaRequest) {
        if self.requests.len() >= REQUESTS_MAX || self.requests.contains_key(&req.id) {
            let why = format!("request {} refused: {} in flight, or the id is in use", req.id, self.requests.len());
            self.settled.push(Settled::new(req.id, Some(Fault::request(why))));
            return;
        }
        let Some(peer) = self.peers.get(&req.peer) else {
            self.settled.push(Settled::new(req.id, Some(Fault::request(format!("unknown peer {:?}", req.peer)))));
            return;
        };
        let regions = &self.regions;
        let local_end = |a: u64| regions.iter().find(|r| a >= r.addr && a < r.addr + r.len).map(|r| r.addr + r.len);
        let remote_end = |a: u64| peer.segment.buffer(a, 1).map(|b| b.addr + b.length);
        let cut = self.config.slice.cut(req.local, req.remote, req.len, local_end, remote_end);
        let slices = match cut {
            Ok(s) if self.slices.len() + s.len() <= SLICES_MAX => s,
            Ok(s) => {
                let why = format!("{} slices would pass the limit of {SLICES_MAX} in flight", s.len());
                self.settled.push(Settled::new(req.id, Some(Fault::request(why))));
                return;
            }
            Err(e) => {
                self.settled.push(Settled::new(req.id, Some(Fault::request(e.to_string()))));
                return;
            }
        };
        if slices.is_empty() {
            self.settled.push(Settled::new(req.id, None));
            return;
        }
        for slice in &slices {
            let id = self.next_slice;
            self.next_slice += 1;
            self.slices.insert(
                id,
                SliceRec { request: req.id, slice: *slice, tries: 0, state: SliceState::Ready, last: None },
            );
            self.ready.push_back(id);
        }
        self.requests.insert(req.id, RequestRec { left: slices.len(), req, error: None });
    }

    /// Posts what is ready and takes completions; true if anything moved.
    pub fn progress(&mut self, connector: &mut dyn Connector, now_ns: u64) -> bool {
        let mut moved = self.take_events();
        moved |= self.post_ready(connector, now_ns);
        moved |= self.poll_all(now_ns);
        if now_ns >= self.next_sweep_ns {
            self.next_sweep_ns = now_ns.saturating_add(SWEEP_NS);
            moved |= self.sweep_late(now_ns);
        }
        moved
    }

    /// Marks the endpoint `ld -> pd` of `peer` broken and moves its queue
    /// pairs to ERR, so that everything posted on them completes now, as
    /// flushed (then goes again), rather than each waiting out its own
    /// queue pair's retries; it is made again once drained.
    fn break_endpoint(&mut self, peer: &str, ld: usize, pd: usize, now_ns: u64) {
        let Some(ep) = self.peers.get_mut(peer).and_then(|p| p.endpoints.get_mut(&(ld, pd))) else { return };
        if ep.broken {
            return;
        }
        ep.broken = true;
        ep.broken_at_ns = now_ns;
        let outstanding: u32 = ep.outstanding.iter().sum();
        log::info!(
            "RDMA: endpoint {} -> {peer} device {pd} broken; {outstanding} work requests flushed",
            self.devices[ld].info.name
        );
        for (i, &qp) in ep.qps.iter().enumerate() {
            if ep.outstanding[i] > 0 {
                // A queue pair the device already holds in error refuses
                // nothing here; one it cannot move flushes on its own.
                let _ = self.devices[ld].ctx.modify_qp(qp, Transition::Err);
            }
        }
    }

    /// Breaks the endpoints of slices posted past their request's deadline
    /// or longer than `MC_SLICE_TIMEOUT`: the flush settles them (a late
    /// request fails, a slow slice goes again on another rail), so every
    /// slice settles in bounded time even where a device never reports a
    /// lost packet. Returns whether it broke any.
    fn sweep_late(&mut self, now_ns: u64) -> bool {
        let mut late: BTreeSet<(String, usize, usize)> = BTreeSet::new();
        for rec in self.slices.values() {
            let SliceState::Posted { local_dev, peer_dev, at_ns, .. } = rec.state else { continue };
            let req = &self.requests[&rec.request].req;
            let past_deadline = req.deadline_ns.is_some_and(|d| now_ns >= d);
            let too_slow = self.config.slice_timeout_ns.is_some_and(|t| now_ns.saturating_sub(at_ns) >= t);
            if past_deadline || too_slow {
                late.insert((req.peer.clone(), local_dev, peer_dev));
            }
        }
        let mut any = !late.is_empty();
        for (peer, ld, pd) in late {
            self.break_endpoint(&peer, ld, pd, now_ns);
        }
        // Endpoints holding work with no completion for STALL_NS: the
        // device should have failed it by now (its retries take well under
        // a second), so the endpoint is broken as if it had.
        let mut stalled: Vec<(String, usize, usize)> = Vec::new();
        for (name, p) in &self.peers {
            for (&(ld, pd), ep) in &p.endpoints {
                let holding = ep.outstanding.iter().any(|&o| o > 0);
                if !ep.broken && holding && now_ns.saturating_sub(ep.progress_at_ns) >= STALL_NS {
                    stalled.push((name.clone(), ld, pd));
                }
            }
        }
        for (peer, ld, pd) in stalled {
            any = true;
            log::warn!(
                "RDMA: endpoint {} -> {peer} device {pd} completed nothing in {} ms: broken",
                self.devices[ld].info.name,
                STALL_NS / 1_000_000
            );
            self.break_endpoint(&peer, ld, pd, now_ns);
        }
        // Endpoints broken long ago and still holding work: the device
        // did not flush it (soft-RoCE on Linux 6.1 may not, for a queue
        // pair deep in retransmission). Destroying a queue pair ends the
        // device's use of its work requests, so they are taken back here.
        let mut stuck: Vec<(String, usize, usize)> = Vec::new();
        for (name, p) in &self.peers {
            for (&(ld, pd), ep) in &p.endpoints {
                let holding = ep.outstanding.iter().any(|&o| o > 0);
                if ep.broken && holding && now_ns.saturating_sub(ep.broken_at_ns) >= DRAIN_MAX_NS {
                    stuck.push((name.clone(), ld, pd));
                }
            }
        }
        for (peer, ld, pd) in stuck {
            any = true;
            let qps = self.peers[&peer].endpoints[&(ld, pd)].qps.clone();
            log::warn!(
                "RDMA: endpoint {} -> {peer} device {pd} did not drain within {} ms of breaking: destroyed",
                self.devices[ld].info.name,
                DRAIN_MAX_NS / 1_000_000
            );
            self.close_endpoint(&peer, ld, pd);
            let held: Vec<u64> = self
                .slices
                .iter()
                .filter(|(_, r)| matches!(r.state, SliceState::Posted { local_dev, peer_dev, qp, .. } if local_dev == ld && peer_dev == pd && qps.contains(&qp)))
                .filter(|(_, r)| self.requests.get(&r.request).is_some_and(|q| q.req.peer == peer))
                .map(|(&id, _)| id)
                .collect();
            for id in held {
                self.flushed(
                    id,
                    format!("{} -> {peer} device {pd}: the queue pair never drained", self.devices[ld].info.name),
                );
            }
        }
        any
    }

    fn take_events(&mut self) -> bool {
        let mut any = false;
        for d in &mut self.devices {
            let mut events = Vec::new();
            d.ctx.events(&mut events);
            for e in events {
                any = true;
                match e {
                    PortEvent::PortDown => d.up = false,
                    PortEvent::PortActive => d.up = true,
                    PortEvent::QpFatal(_) | PortEvent::CqOverrun(_) => {}
                }
            }
        }
        any
    }

    /// Settles slice `id` once; its request settles with its last slice.
    fn settle(&mut self, id: u64, error: Option<Fault>) {
        let rec = self.slices.remove(&id).expect("a slice settles once");
        assert_ne!(rec.state, SliceState::Settled, "slice {id} settled twice");
        let r = self.requests.get_mut(&rec.request).expect("a slice's request is in flight");
        // The first failure says why, except that the memory's refusal
        // outranks the rails' trouble (a flush is often the echo of a
        // refused key on the same queue pair).
        match (&r.error, &error) {
            (None, _) => r.error = error,
            (Some(old), Some(new)) if old.rails && !new.rails => r.error = error,
            _ => {}
        }
        assert!(r.left > 0, "request {} has no slices left to settle", rec.request);
        r.left -= 1;
        if r.left == 0 {
            let r = self.requests.remove(&rec.request).expect("looked up above");
            self.settled.push(Settled::new(r.req.id, r.error));
        }
    }

    /// Chooses rails, builds work requests and posts them in chains.
    fn post_ready(&mut self, connector: &mut dyn Connector, now_ns: u64) -> bool {
        let mut chains: BTreeMap<(String, usize, usize, usize), Vec<WorkRequest>> = BTreeMap::new();
        let mut moved = false;
        let mut later = VecDeque::new();
        while let Some(id) = self.ready.pop_front() {
            moved = true;
            let rec = &self.slices[&id];
            let req = &self.requests[&rec.request].req;
            if req.deadline_ns.is_some_and(|d| now_ns >= d) {
                let why = format!("request {} timed out before all its slices were sent", req.id);
                self.settle(id, Some(Fault::request(why)));
                continue;
            }
            let (peer_name, verb, location) = (req.peer.clone(), req.verb, req.location.clone());
            let (slice, tries) = (rec.slice, rec.tries);
            match self.choose_rails(&peer_name, &location, &slice, id, tries, now_ns) {
                Err(fault) => self.settle(id, Some(fault)),
                Ok((ld, pd, rkey)) => {
                    let qp = match self.endpoint_qp(connector, &peer_name, ld, pd, now_ns) {
                        Ok(Some(qp)) => qp,
                        Ok(None) => {
                            later.push_back(id); // every queue pair is full
                            continue;
                        }
                        Err(why) => {
                            // A connection that failed counts as a try.
                            self.count_try(id);
                            self.fail_try(id, pd, Fault::rails(why), now_ns);
                            continue;
                        }
                    };
                    let lkey = self.lkey(slice.local, ld).expect("the slice was cut inside a region");
                    let wr = WorkRequest {
                        wr_id: id,
                        verb,
                        sges: Sges::one(Sge { addr: slice.local, len: slice.len as u32, lkey }),
                        remote_addr: slice.remote,
                        rkey,
                        inline: false,
                    };
                    self.count_try(id);
                    let rec = self.slices.get_mut(&id).expect("looked up above");
                    rec.state = SliceState::Posted { local_dev: ld, peer_dev: pd, qp, at_ns: now_ns };
                    rec.last = Some((ld, pd));
                    chains.entry((peer_name, ld, pd, qp.0 as usize)).or_default().push(wr);
                }
            }
        }
        self.ready = later;
        for ((peer, ld, pd, qp), chain) in chains {
            let qp = QpNum(qp as u32);
            if let Err(e) = self.devices[ld].ctx.post(qp, &chain) {
                // The queue pair broke since: those not posted go again.
                let posted = match &e {
                    FabricError::BadWorkRequest { index, .. } => *index,
                    _ => 0,
                };
                if let Some(ep) = self.peers.get_mut(&peer).and_then(|p| p.endpoints.get_mut(&(ld, pd)))
                    && let Some(i) = ep.qps.iter().position(|&q| q == qp)
                {
                    ep.outstanding[i] -= (chain.len() - posted) as u32;
                }
                self.break_endpoint(&peer, ld, pd, now_ns);
                for wr in &chain[posted..] {
                    self.fail_try(wr.wr_id, pd, Fault::rails(e.to_string()), now_ns);
                }
            }
        }
        moved
    }

    /// The local device, peer device and rkey for try `tries` of a slice.
    fn choose_rails(
        &self,
        peer_name: &str,
        location: &str,
        slice: &Slice,
        n: u64,
        tries: u32,
        now_ns: u64,
    ) -> Result<(usize, usize, u32), Fault> {
        let peer = self.peers.get(peer_name).ok_or_else(|| Fault::request(format!("unknown peer {peer_name:?}")))?;
        let names: Vec<&str> = self.devices.iter().map(|d| d.info.name.as_str()).collect();
        let local = match self.matrix.get(location).or_else(|| self.matrix.get("*")) {
            Some(entry) => Rails::from_entry(entry, |n| names.iter().position(|&m| m == n)),
            None => Rails { preferred: (0..self.devices.len()).collect(), available: vec![] },
        };
        let ld = local
            .pick(n, tries, |d| !self.devices[d].up)
            .ok_or_else(|| Fault::rails(format!("no local RDMA device is up for {location}")))?;
        let buffer = peer.segment.buffer(slice.remote, slice.len).ok_or_else(|| {
            Fault::request(format!(
                "{peer_name}: [{:#x}, +{}) is not inside a buffer it registered",
                slice.remote, slice.len
            ))
        })?;
        let peer_names: Vec<&str> = peer.segment.devices.iter().map(|d| d.name.as_str()).collect();
        let remote = match peer.segment.matrix.get(&buffer.location).or_else(|| peer.segment.matrix.get("*")) {
            Some(entry) => Rails::from_entry(entry, |n| peer_names.iter().position(|&m| m == n)),
            None => Rails { preferred: (0..peer_names.len()).collect(), available: vec![] },
        };
        let paused = |d: usize| peer.paused_until.get(&d).is_some_and(|&until| until > now_ns);
        // A broken endpoint drains before it is made again: its slices go
        // elsewhere meanwhile, if there is an elsewhere.
        let draining = |d: usize| peer.endpoints.get(&(ld, d)).is_some_and(|ep| ep.broken);
        let pd = remote
            .pick(n, tries, |d| paused(d) || draining(d))
            .or_else(|| remote.pick(n, tries, paused))
            .ok_or_else(|| Fault::rails(format!("{peer_name}: every rail is paused or down")))?;
        Ok((ld, pd, buffer.rkey[pd]))
    }

    fn lkey(&self, addr: u64, device: usize) -> Option<u32> {
        self.regions.iter().find(|r| addr >= r.addr && addr < r.addr + r.len).map(|r| r.mrs[device].lkey)
    }

    /// A queue pair of the endpoint `ld -> pd` of `peer` with room, the
    /// endpoint made (or made again) if needed; `None` while it connects,
    /// drains or is full.
    fn endpoint_qp(
        &mut self,
        connector: &mut dyn Connector,
        peer_name: &str,
        ld: usize,
        pd: usize,
        now_ns: u64,
    ) -> Result<Option<QpNum>, String> {
        let peer = self.peers.get_mut(peer_name).expect("chosen above");
        let stale = peer.endpoints.get(&(ld, pd)).is_some_and(|ep| ep.broken && ep.outstanding.iter().all(|&n| n == 0));
        if stale {
            self.close_endpoint(peer_name, ld, pd);
        }
        if !self.peers[peer_name].endpoints.contains_key(&(ld, pd)) {
            if !self.make_room(ld) {
                return Ok(None); // every endpoint of the device is busy: wait
            }
            let ep = open_endpoint(&mut self.devices[ld], &self.config, now_ns)?;
            self.devices[ld].endpoints += 1;
            self.peers.get_mut(peer_name).expect("chosen above").endpoints.insert((ld, pd), ep);
        }
        let since = self.peers[peer_name].endpoints[&(ld, pd)].connecting_since;
        if let Some(since) = since {
            if now_ns.saturating_sub(since) > self.config.connect_timeout_ns {
                self.close_endpoint(peer_name, ld, pd);
                return Err(format!(
                    "{peer_name} did not answer a connection within {} ms",
                    self.config.connect_timeout_ns / 1_000_000
                ));
            }
            let peer_device = self.peers[peer_name].segment.devices[pd].name.clone();
            let device = &mut self.devices[ld];
            let ep = self.peers.get_mut(peer_name).and_then(|p| p.endpoints.get_mut(&(ld, pd))).expect("made above");
            let mtu = device.info.active_mtu.min(self.config.mtu);
            let ours = OurSide { device: &device.info, gid: device.gid, qps: &ep.qps, mtu };
            let answer = connector.connect(peer_name, pd, &peer_device, ours);
            let done = match answer {
                Ok(Answer::Pending) => return Ok(None),
                Ok(Answer::Ready(side)) => finish_endpoint(device, &self.config, ep, peer_name, &side),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                self.close_endpoint(peer_name, ld, pd);
                return Err(e);
            }
        }
        self.uses += 1;
        let uses = self.uses;
        let ep = self.peers.get_mut(peer_name).and_then(|p| p.endpoints.get_mut(&(ld, pd))).expect("made above");
        ep.last_use = uses;
        if ep.broken {
            return Ok(None); // drains before it is made again
        }
        if ep.outstanding.iter().all(|&o| o == 0) {
            ep.progress_at_ns = now_ns; // the stall clock starts with the first work
        }
        for k in 0..ep.qps.len() {
            let i = (ep.next + k) % ep.qps.len();
            if ep.outstanding[i] < self.config.max_wr {
                ep.outstanding[i] += 1;
                ep.next = i + 1;
                return Ok(Some(ep.qps[i]));
            }
        }
        Ok(None)
    }

    /// Closes the endpoint `ld -> pd` of `peer`: its queue pairs go.
    fn close_endpoint(&mut self, peer_name: &str, ld: usize, pd: usize) {
        if let Some(ep) = self.peers.get_mut(peer_name).and_then(|p| p.endpoints.remove(&(ld, pd))) {
            self.devices[ld].endpoints -= 1;
            for qp in ep.qps {
                let _ = self.devices[ld].ctx.destroy_qp(qp);
            }
        }
    }

    /// A try of slice `id` begins (a post, or a connection attempt).
    fn count_try(&mut self, id: u64) {
        let rec = self.slices.get_mut(&id).expect("a slice in flight");
        if rec.tries > 0 {
            self.retries += 1;
        }
        rec.tries += 1;
    }

    /// Below the endpoint bound on device `ld`, after closing the idle
    /// endpoint used longest ago if need be; false if all are busy.
    fn make_room(&mut self, ld: usize) -> bool {
        if self.devices[ld].endpoints < self.config.max_endpoints {
            return true;
        }
        let victim = self
            .peers
            .iter()
            .flat_map(|(name, p)| p.endpoints.iter().map(move |(&k, ep)| (name, k, ep)))
            .filter(|(_, (l, _), ep)| {
                *l == ld && ep.connecting_since.is_none() && ep.outstanding.iter().all(|&n| n == 0)
            })
            .min_by_key(|(_, _, ep)| ep.last_use)
            .map(|(name, k, _)| (name.clone(), k));
        let Some((name, (l, p))) = victim else { return false };
        self.close_endpoint(&name, l, p);
        true
    }

    /// A try of slice `id` failed on rails `ld -> pd`: count it against
    /// the peer rail, and queue the slice again or settle it failed.
    fn fail_try(&mut self, id: u64, pd: usize, fault: Fault, now_ns: u64) {
        let request = self.slices[&id].request;
        let peer_name = self.requests[&request].req.peer.clone();
        // Only the rail's own faults count against it: a key the target
        // refused says nothing about the rail.
        if let Some(peer) = self.peers.get_mut(&peer_name).filter(|_| fault.rails) {
            let errors = peer.errors.entry(pd).or_default();
            errors.push_back(now_ns);
            while errors.front().is_some_and(|&t| t + self.config.pause_window_ns < now_ns) {
                errors.pop_front();
            }
            if errors.len() >= self.config.pause_errors {
                log::warn!(
                    "RDMA: {peer_name} device {pd} failed {} times within {} ms: paused for {} s (the last: {})",
                    errors.len(),
                    self.config.pause_window_ns / 1_000_000,
                    self.config.pause_ns / 1_000_000_000,
                    fault.why
                );
                peer.paused_until.insert(pd, now_ns + self.config.pause_ns);
                errors.clear();
            }
        }
        let rec = self.slices.get_mut(&id).expect("a slice in flight");
        rec.state = SliceState::Ready;
        if rec.tries > self.config.retry_cnt {
            let why = format!("a slice failed {} times; the last: {}", rec.tries, fault.why);
            self.settle(id, Some(Fault { why, rails: fault.rails }));
        } else {
            self.ready.push_back(id);
        }
    }

    /// Slice `id` was flushed off its queue pair: it goes again, unless
    /// its tries are used up.
    fn flushed(&mut self, id: u64, why: String) {
        let rec = self.slices.get_mut(&id).expect("a flushed slice is in flight");
        rec.state = SliceState::Ready;
        if rec.tries > self.config.retry_cnt {
            let why = format!("a slice failed {} times; the last: {why}", rec.tries);
            self.settle(id, Some(Fault::rails(why)));
        } else {
            self.ready.push_back(id);
        }
    }

    fn poll_all(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        let mut done: Vec<(usize, Completion)> = Vec::new();
        for (i, d) in self.devices.iter_mut().enumerate() {
            let mut out = Vec::with_capacity(POLL_BATCH);
            if d.ctx.poll(d.cq, POLL_BATCH, &mut out).is_ok() {
                done.extend(out.into_iter().map(|c| (i, c)));
            }
        }
        for (ld, c) in done {
            moved = true;
            let Some(rec) = self.slices.get(&c.wr_id) else { continue };
            let SliceState::Posted { local_dev, peer_dev, .. } = rec.state else { continue };
            debug_assert_eq!(local_dev, ld);
            let peer_name = self.requests[&rec.request].req.peer.clone();
            if let Some(ep) = self.peers.get_mut(&peer_name).and_then(|p| p.endpoints.get_mut(&(ld, peer_dev)))
                && let Some(i) = ep.qps.iter().position(|&q| q == c.qp)
            {
                ep.outstanding[i] = ep.outstanding[i].saturating_sub(1);
                ep.progress_at_ns = now_ns;
            }
            if c.status != WcStatus::Success {
                self.break_endpoint(&peer_name, ld, peer_dev, now_ns);
            }
            if c.status == WcStatus::Success {
                self.devices[ld].bytes += c.bytes;
                self.settle(c.wr_id, None);
            } else {
                let why = format!("{} -> {peer_name} device {peer_dev}: {}", self.devices[ld].info.name, c.status);
                // A flush is the queue pair's fault, not the rail's.
                if c.status == WcStatus::WrFlushErr {
                    self.flushed(c.wr_id, why);
                } else {
                    // A refused key, bound or access is the memory's fault:
                    // no rail (nor TCP) would carry it.
                    let rails =
                        !matches!(c.status, WcStatus::RemAccessErr | WcStatus::LocProtErr | WcStatus::LocLenErr);
                    self.fail_try(c.wr_id, peer_dev, Fault { why, rails }, now_ns);
                }
            }
        }
        moved
    }
}

/// Starts an endpoint: queue pairs on `device`, in INIT, waiting for the
/// peer's side.
fn open_endpoint(device: &mut Nic, config: &RdmaConfig, now_ns: u64) -> Result<Endpoint, String> {
    let caps = QpCaps { max_send_wr: config.max_wr, max_sge: config.max_sge, max_inline: config.max_inline };
    let mut qps = Vec::with_capacity(config.qps_per_endpoint);
    let mut made = || -> Result<(), String> {
        for _ in 0..config.qps_per_endpoint {
            let q = device.ctx.create_qp(device.cq, caps).map_err(|e| e.to_string())?;
            qps.push(q);
            device.ctx.modify_qp(q, Transition::Init { access: Access::ALL }).map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    if let Err(e) = made() {
        for &q in &qps {
            let _ = device.ctx.destroy_qp(q);
        }
        return Err(e);
    }
    let n = qps.len();
    Ok(Endpoint {
        qps,
        outstanding: vec![0; n],
        next: 0,
        broken: false,
        broken_at_ns: 0,
        progress_at_ns: now_ns,
        last_use: 0,
        connecting_since: Some(now_ns),
    })
}

/// Connects an endpoint's queue pairs to the peer's `side`: RTR, then RTS,
/// at the path MTU the two sides agree on.
fn finish_endpoint(
    device: &mut Nic,
    config: &RdmaConfig,
    ep: &mut Endpoint,
    peer: &str,
    side: &PeerSide,
) -> Result<(), String> {
    if side.qps.len() != ep.qps.len() {
        return Err(format!("{peer} answered with {} queue pairs for our {}", side.qps.len(), ep.qps.len()));
    }
    let mtu = super::fabric::path_mtu(device.info.active_mtu, side.mtu, config.mtu);
    for (&q, &t) in ep.qps.iter().zip(&side.qps) {
        let addr = PeerAddr { gid: side.gid, lid: side.lid, qp: t, mtu };
        device.ctx.modify_qp(q, Transition::Rtr { peer: addr }).map_err(|e| e.to_string())?;
        device
            .ctx
            .modify_qp(q, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 })
            .map_err(|e| e.to_string())?;
        debug_assert_eq!(device.ctx.qp_state(q).ok(), Some(QpState::Rts));
    }
    ep.connecting_since = None;
    Ok(())
}

/// The passive side of a connection made directly on a simulated device
/// (tests without a second engine, and `shardwire bench rdma-sim`): queue
/// pairs on `ctx`, in RTR against `ours`.
pub fn answer_on(ctx: &mut dyn Context, cq: CqId, ours: &OurSide<'_>) -> Result<PeerSide, String> {
    let caps = QpCaps { max_send_wr: 16, max_sge: 1, max_inline: 0 };
    let mut qps = Vec::new();
    for &q in ours.qps {
        let m = ctx.create_qp(cq, caps).map_err(|e| e.to_string())?;
        ctx.modify_qp(m, Transition::Init { access: Access::ALL }).map_err(|e| e.to_string())?;
        let peer = PeerAddr { gid: ours.gid, lid: 0, qp: q, mtu: ours.mtu };
        ctx.modify_qp(m, Transition::Rtr { peer }).map_err(|e| e.to_string())?;
        qps.push(m);
    }
    let info = ctx.info();
    Ok(PeerSide { gid: info.gids[1].gid, lid: 0, qps, mtu: Some(info.active_mtu) })
}

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod tests;
