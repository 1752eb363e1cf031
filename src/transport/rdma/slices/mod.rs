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
//! The hot path allocates nothing in its steady state: requests and slices
//! live in slabs, peers and endpoints in vectors found by index, rails are
//! worked out once per location, chains are staged in vectors that keep
//! their room, and completions are polled into a reused buffer. Nothing
//! iterates a hash map, so under the simulated fabric a run is the same
//! run every time its seed is replayed.
//!
//! Time is the caller's (`now_ns`): virtual under the simulated fabric,
//! the clock in production. Connecting an endpoint needs the peer's queue
//! pairs: a [`Connector`] gets them (Mooncake's Connection RPC; in tests,
//! the simulated peer directly).

mod endpoint;
mod slab;

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::fabric::{
    Access, Completion, Context, CqId, DeviceInfo, FabricError, Mr, PeerAddr, PortEvent, PortState, QpNum, Sge, Sges,
    Transition, Verb, WcStatus, WorkRequest,
};
use super::plan::{Rails, Slice, SliceRule};
use crate::proto::mooncake::rdma::{Buffer, Connection, Device, Gid, QPS_PER_ENDPOINT_MAX, RdmaSegment};
use crate::topo::{MatrixEntry, PriorityMatrix};
pub use endpoint::answer_on;
use endpoint::{Endpoint, finish_endpoint, open_endpoint};
use slab::{Key, Slab};

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
/// Memory locations (`cpu:0`, ...) whose rails are kept worked out.
pub const LOCATIONS_MAX: usize = 1024;
/// How often posted slices are checked against their deadlines (ns).
const SWEEP_NS: u64 = 10_000_000;
/// How often device bytes are added to the metrics while busy.
const REPORT_NS: u64 = 100_000_000;
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
    /// Memory is registered in regions of at most this many bytes (and of
    /// at most every device's `max_mr_size`): engines that share a
    /// segment on several shards split it alike, so their buffers match.
    pub region_bytes_max: u64,
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
            region_bytes_max: u64::MAX,
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
    /// The instance number of the process that answered, if it said (a
    /// shardwire peer does).
    pub instance: Option<u64>,
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
    /// Bytes; the local devices are those the location of the memory at
    /// `local` prefers (as it was registered: `cpu:0`, `cuda:1`, ...).
    pub len: u64,
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
    /// The peer process it was addressed to is gone (another took its
    /// name): nothing may carry it.
    pub peer_gone: bool,
}

impl Settled {
    fn new(id: u64, fault: Option<Fault>) -> Settled {
        match fault {
            None => Settled { id, result: Ok(()), rails_failed: false, peer_gone: false },
            Some(f) => Settled { id, result: Err(f.why), rails_failed: f.rails, peer_gone: f.gone },
        }
    }
}

/// Why a slice failed, and whether the rails were to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    why: String,
    rails: bool,
    /// The peer process is gone.
    gone: bool,
}

impl Fault {
    fn rails(why: String) -> Fault {
        Fault { why, rails: true, gone: false }
    }

    fn request(why: String) -> Fault {
        Fault { why, rails: false, gone: false }
    }

    fn gone(why: String) -> Fault {
        Fault { why, rails: false, gone: true }
    }
}

/// Local memory registered on every device.
struct Region {
    addr: u64,
    len: u64,
    /// Its memory location (`cpu:0`), and that location's local rails (an
    /// index into `SliceEngine::locations`).
    location: String,
    rails: usize,
    mrs: Vec<Mr>,
}

pub(super) struct Nic {
    ctx: Box<dyn Context>,
    cq: CqId,
    info: DeviceInfo,
    up: bool,
    gid: Gid,
    /// Bytes moved through it.
    bytes: u64,
    /// Of `bytes`, how many the metrics have.
    reported_bytes: u64,
    /// Endpoints on it now.
    endpoints: usize,
    /// Its rail: its place among all the devices of the segment (the
    /// devices of several shards' engines together), which peer device it
    /// sends to first.
    rail: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SliceState {
    Ready,
    /// On queue pair `qp` (index `qi` of its endpoint) since `at_ns`.
    Posted {
        local_dev: usize,
        peer_dev: usize,
        qp: QpNum,
        qi: usize,
        at_ns: u64,
    },
}

struct SliceRec {
    request: Key,
    /// The slice's number in this engine: first tries spread over the
    /// rails by it.
    n: u64,
    slice: Slice,
    /// Tries made (0 before the first).
    tries: u32,
    state: SliceState,
}

struct RequestRec {
    id: u64,
    verb: Verb,
    peer: usize,
    deadline_ns: Option<u64>,
    /// Its location's rails, an index into `SliceEngine::locations`.
    rails: usize,
    left: usize,
    error: Option<Fault>,
}

/// A peer and what is kept of it: its segment, its rails by buffer, the
/// endpoints to it (local device × peer device), its rails' errors.
struct Peer {
    name: String,
    segment: RdmaSegment,
    /// The distinct buffer locations, each with its rails.
    locations: Vec<(String, Rails)>,
    /// For each buffer of the segment, an index into `locations`.
    buffer_rails: Vec<usize>,
    /// `endpoints[ld * devices + pd]`.
    endpoints: Vec<Option<Endpoint>>,
    /// Error times of each peer device, and when its pause ends (ns; 0
    /// when it never rested).
    errors: Vec<VecDeque<u64>>,
    paused_until: Vec<u64>,
    /// The instance number of the process its segment describes (0: not
    /// said, a Mooncake peer): a connection answered by another process of
    /// the name is refused, since the work waiting for it was addressed to
    /// this one.
    instance: u64,
}

/// Why an endpoint could not be had.
enum EndpointError {
    /// The rails' trouble (a failed or timed-out connection): the slice
    /// may go on another rail.
    Rails(String),
    /// Another process than the one the work was addressed to answered:
    /// the slice settles as gone.
    Gone(String),
}

impl From<String> for EndpointError {
    fn from(why: String) -> Self {
        EndpointError::Rails(why)
    }
}

impl Peer {
    fn devices(&self) -> usize {
        self.segment.devices.len()
    }

    fn endpoint(&self, ld: usize, pd: usize) -> Option<&Endpoint> {
        self.endpoints.get(ld * self.devices() + pd).and_then(Option::as_ref)
    }

    fn endpoint_mut(&mut self, ld: usize, pd: usize) -> Option<&mut Endpoint> {
        let n = self.devices();
        self.endpoints.get_mut(ld * n + pd).and_then(Option::as_mut)
    }

    /// The index of the buffer holding `[addr, +len)`.
    fn buffer_at(&self, addr: u64, len: u64) -> Option<usize> {
        let i = self.segment.buffers.partition_point(|b| b.addr <= addr);
        let i = i.checked_sub(1)?;
        self.segment.buffers[i].contains(addr, len).then_some(i)
    }

    /// Works out the rails of each buffer location (the peer's matrix, its
    /// `*` entry, or every device).
    fn learn(&mut self, segment: RdmaSegment) {
        let names: Vec<&str> = segment.devices.iter().map(|d| d.name.as_str()).collect();
        let rails_of = |location: &str| match segment.matrix.get(location).or_else(|| segment.matrix.get("*")) {
            Some(entry) => Rails::from_entry(entry, |n| names.iter().position(|&m| m == n)),
            None => Rails { preferred: (0..names.len()).collect(), available: vec![] },
        };
        let mut locations: Vec<(String, Rails)> = Vec::new();
        let mut buffer_rails = Vec::with_capacity(segment.buffers.len());
        for b in &segment.buffers {
            let i = match locations.iter().position(|(l, _)| *l == b.location) {
                Some(i) => i,
                None => {
                    locations.push((b.location.clone(), rails_of(&b.location)));
                    locations.len() - 1
                }
            };
            buffer_rails.push(i);
        }
        drop(names);
        self.locations = locations;
        self.buffer_rails = buffer_rails;
        self.errors.resize_with(segment.devices.len(), VecDeque::new);
        self.paused_until.resize(segment.devices.len(), 0);
        self.segment = segment;
    }
}

/// A work request's id: the slice's slot, its generation (24 bits) and its
/// try (8 bits), so that a completion of an earlier try, or of a slice
/// settled since, is seen as stale rather than taken for the slice's.
fn wr_id(key: Key, tries: u32) -> u64 {
    let (index, generation) = (key.0 & 0xffff_ffff, (key.0 >> 32) & 0xff_ffff);
    index | (generation << 32) | (u64::from(tries & 0xff) << 56)
}

/// One shard's RDMA work.
pub struct SliceEngine {
    config: RdmaConfig,
    devices: Vec<Nic>,
    matrix: PriorityMatrix,
    /// The local rails of each memory location seen, worked out once.
    locations: Vec<(String, Rails)>,
    /// Registered local memory, by address.
    regions: Vec<Region>,
    /// Queue pairs made for peers this engine does not know (yet): kept
    /// so they are not lost, at most `PASSIVE_MAX`.
    passive: VecDeque<(usize, Vec<QpNum>)>,
    peer_ids: BTreeMap<String, usize>,
    peers: Vec<Peer>,
    requests: Slab<RequestRec>,
    /// Requests in flight by their caller's id (refuses an id in use).
    request_ids: HashMap<u64, Key>,
    slices: Slab<SliceRec>,
    ready: VecDeque<Key>,
    /// Slices whose endpoint had no room this round.
    later: VecDeque<Key>,
    /// Queue pairs with a chain staged: (peer, endpoint index, queue pair).
    staged: Vec<(usize, usize, usize)>,
    /// Completions of one poll, and port events (reused).
    completions: Vec<Completion>,
    events: Vec<PortEvent>,
    next_slice: u64,
    settled: Vec<Settled>,
    /// Tries of slices after their first.
    retries: u64,
    /// Endpoint choices so far (the clock of `Endpoint::last_use`).
    uses: u64,
    /// When posted slices are next checked against their deadlines (ns).
    next_sweep_ns: u64,
    /// When device bytes next go to the metrics.
    next_report_ns: u64,
    /// The segment's devices in all (this engine's, and other shards').
    rails_total: u64,
    /// Where the count of devices up is kept for others to read.
    up_watch: Option<std::sync::Arc<std::sync::atomic::AtomicUsize>>,
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
        assert!(config.qps_per_endpoint <= QPS_PER_ENDPOINT_MAX, "{} queue pairs an endpoint", config.qps_per_endpoint);
        let mut devices = Vec::with_capacity(contexts.len());
        for mut ctx in contexts {
            let info = ctx.info();
            let gid = super::fabric::choose_gid(&info.gids, config.gid_index)
                .map(|i| info.gids[i].gid)
                .map_err(|why| FabricError::NoGid(info.name.clone(), why))?;
            let cq = ctx.create_cq(config.cqe)?;
            let rail = devices.len() as u64;
            devices.push(Nic {
                up: info.state == PortState::Active,
                ctx,
                cq,
                info,
                gid,
                bytes: 0,
                reported_bytes: 0,
                endpoints: 0,
                rail,
            });
        }
        Ok(SliceEngine {
            config,
            devices,
            matrix,
            locations: Vec::new(),
            regions: Vec::new(),
            passive: VecDeque::new(),
            peer_ids: BTreeMap::new(),
            peers: Vec::new(),
            requests: Slab::new(REQUESTS_MAX),
            request_ids: HashMap::new(),
            slices: Slab::new(SLICES_MAX),
            ready: VecDeque::new(),
            later: VecDeque::new(),
            staged: Vec::new(),
            completions: Vec::with_capacity(POLL_BATCH),
            events: Vec::new(),
            next_slice: 0,
            settled: Vec::new(),
            retries: 0,
            uses: 0,
            next_sweep_ns: 0,
            next_report_ns: 0,
            rails_total: 0,
            up_watch: None,
        })
        .map(|mut e| {
            e.rails_total = e.devices.len() as u64;
            e
        })
    }

    /// Places this engine's devices among `total` devices of the segment,
    /// at `rails` (one per device, in order): an engine that owns some of
    /// a segment's devices on one shard, beside others on other shards.
    pub fn set_rails(&mut self, rails: &[usize], total: usize) {
        assert_eq!(rails.len(), self.devices.len(), "one rail per device");
        assert!(rails.iter().all(|&r| r < total), "rails {rails:?} of {total}");
        for (d, &r) in self.devices.iter_mut().zip(rails) {
            d.rail = r as u64;
        }
        self.rails_total = total as u64;
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
        let max = self.devices.iter().map(|d| d.info.max_mr_size).min().unwrap_or(u64::MAX);
        let max = max.min(self.config.region_bytes_max).max(4096);
        if addr.checked_add(len).is_none() || len == 0 {
            return Err(FabricError::Register { addr, len, why: "an empty or wrapping range".into() });
        }
        if self.regions.iter().any(|r| addr < r.addr + r.len && r.addr < addr + len) {
            return Err(FabricError::Register { addr, len, why: "it overlaps memory registered already".into() });
        }
        let rails = self.rails_for(location).map_err(|why| FabricError::Register { addr, len, why })?;
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
                        made.push(Region { addr: at, len: n, location: String::new(), rails, mrs });
                        for r in made {
                            for (d, mr) in self.devices.iter_mut().zip(&r.mrs) {
                                let _ = d.ctx.deregister(mr.lkey);
                            }
                        }
                        return Err(e);
                    }
                }
            }
            made.push(Region { addr: at, len: n, location: location.to_string(), rails, mrs });
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
        let busy =
            self.slices.iter().filter(|(_, s)| s.slice.local < end && start < s.slice.local + s.slice.len).count();
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

    /// Learns (or learns again) a peer's segment. A peer that comes back
    /// with another number of devices has its old endpoints destroyed and
    /// their work taken back (to go again on the new ones).
    ///
    /// `instance` is the process's number from its descriptor (0 if it
    /// gives none); learning another for a known name lets go of the old
    /// process first ([`retire_peer`](Self::retire_peer)).
    pub fn add_peer(&mut self, name: &str, segment: RdmaSegment, instance: u64) -> Result<(), String> {
        if let Some(&p) = self.peer_ids.get(name)
            && self.peers[p].instance != 0
            && instance != 0
            && self.peers[p].instance != instance
        {
            self.retire_peer(name);
        }
        let p = match self.peer_ids.get(name) {
            Some(&p) => p,
            None if self.peers.len() >= PEERS_MAX => return Err(format!("{PEERS_MAX} peers already")),
            None => {
                self.peers.push(Peer {
                    name: name.to_string(),
                    segment: RdmaSegment { devices: vec![], buffers: vec![], matrix: PriorityMatrix::new() },
                    locations: Vec::new(),
                    buffer_rails: Vec::new(),
                    endpoints: Vec::new(),
                    errors: Vec::new(),
                    paused_until: Vec::new(),
                    instance,
                });
                self.peer_ids.insert(name.to_string(), self.peers.len() - 1);
                self.peers.len() - 1
            }
        };
        if self.peers[p].devices() != segment.devices.len() {
            let old = self.peers[p].devices();
            for ld in 0..self.devices.len() {
                for pd in 0..old {
                    self.destroy_endpoint(p, ld, pd, "the peer's devices changed");
                }
            }
            let n = self.devices.len() * segment.devices.len();
            self.peers[p].endpoints = (0..n).map(|_| None).collect();
            self.peers[p].errors.clear();
            self.peers[p].paused_until.clear();
        }
        self.peers[p].learn(segment);
        self.peers[p].instance = instance;
        Ok(())
    }

    /// The process `name` reached is gone (another took its name): its
    /// endpoints are destroyed, and every slice of a request to it, posted
    /// or waiting, settles as gone (none goes again: its keys and
    /// addresses are the old process's). The peer is learnt afresh by the
    /// next [`add_peer`](Self::add_peer). Returns the requests settled.
    pub fn retire_peer(&mut self, name: &str) -> usize {
        let Some(&p) = self.peer_ids.get(name) else { return 0 };
        debug_assert!(self.later.is_empty() && self.staged.is_empty(), "between rounds");
        let n = self.peers[p].devices();
        for ld in 0..self.devices.len() {
            for pd in 0..n {
                // Completions of its queue pairs name no slice from now on.
                self.close_endpoint(p, ld, pd);
            }
        }
        let doomed: std::collections::HashSet<Key> = self
            .slices
            .iter()
            .filter(|(_, r)| self.requests.get(r.request).is_some_and(|q| q.peer == p))
            .map(|(k, _)| k)
            .collect();
        self.ready.retain(|k| !doomed.contains(k));
        let settled_before = self.settled.len();
        let why = format!("{name} is another process now: the one this request was addressed to is gone");
        for key in doomed {
            self.settle(key, Some(Fault::gone(why.clone())));
        }
        let peer = &mut self.peers[p];
        peer.instance = 0;
        peer.segment = RdmaSegment { devices: vec![], buffers: vec![], matrix: PriorityMatrix::new() };
        peer.locations.clear();
        peer.buffer_rails.clear();
        peer.endpoints.clear();
        peer.errors.clear();
        peer.paused_until.clear();
        self.settled.len() - settled_before
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
        let caps = endpoint::caps(&self.config);
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
        let known = self
            .peer_ids
            .get(&req.local.server)
            .and_then(|&p| self.peers[p].segment.device_index(&req.local.device).map(|pd| (p, pd)));
        match known {
            Some((p, pd)) => {
                // The peer made the endpoint again (it restarted, or saw
                // an error): the old one goes, its work taken back.
                if self.peers[p].endpoint(ld, pd).is_some() {
                    self.destroy_endpoint(p, ld, pd, "the peer connected again");
                }
                let n = self.peers[p].devices();
                self.peers[p].endpoints[ld * n + pd] = Some(Endpoint::new(mine.clone(), 0, None));
                self.devices[ld].endpoints += 1;
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
            instance: None,
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

    /// Takes what has settled since the last call (the list keeps its
    /// room for the next).
    pub fn drain_settled(&mut self) -> std::vec::Drain<'_, Settled> {
        self.settled.drain(..)
    }

    /// The index of `location`'s local rails (the engine's matrix entry
    /// for it, its `*` entry, or every device when neither names a device
    /// of this engine), worked out on first use.
    fn rails_for(&mut self, location: &str) -> Result<usize, String> {
        if let Some(i) = self.locations.iter().position(|(l, _)| l == location) {
            return Ok(i);
        }
        if self.locations.len() >= LOCATIONS_MAX {
            return Err(format!("{LOCATIONS_MAX} memory locations already"));
        }
        let names: Vec<&str> = self.devices.iter().map(|d| d.info.name.as_str()).collect();
        let rails = match self.matrix.get(location).or_else(|| self.matrix.get("*")) {
            Some(entry) => Rails::from_entry(entry, |n| names.iter().position(|&m| m == n)),
            None => Rails::default(),
        };
        let rails = if rails.preferred.is_empty() && rails.available.is_empty() {
            Rails { preferred: (0..self.devices.len()).collect(), available: vec![] }
        } else {
            rails
        };
        self.locations.push((location.to_string(), rails));
        Ok(self.locations.len() - 1)
    }

    /// Cuts `req` into slices and queues them. A request that cannot be
    /// cut settles at once, failed.
    pub fn submit(&mut self, req: RdmaRequest) {
        let refuse = |this: &mut Self, why: String| this.settled.push(Settled::new(req.id, Some(Fault::request(why))));
        if !self.requests.has_room(1) || self.request_ids.contains_key(&req.id) {
            let why = format!("request {} refused: {} in flight, or the id is in use", req.id, self.requests.len());
            return refuse(self, why);
        }
        let Some(&p) = self.peer_ids.get(&req.peer) else {
            return refuse(self, format!("unknown peer {:?}", req.peer));
        };
        let (regions, peer) = (&self.regions, &self.peers[p]);
        let local_end = |a: u64| {
            let i = regions.partition_point(|r| r.addr <= a).checked_sub(1)?;
            (a < regions[i].addr + regions[i].len).then(|| regions[i].addr + regions[i].len)
        };
        let remote_end =
            |a: u64| peer.buffer_at(a, 1).map(|b| peer.segment.buffers[b].addr + peer.segment.buffers[b].length);
        let slices = match self.config.slice.cut(req.local, req.remote, req.len, local_end, remote_end) {
            Ok(s) if self.slices.has_room(s.len()) => s,
            Ok(s) => return refuse(self, format!("{} slices would pass the limit of {SLICES_MAX} in flight", s.len())),
            Err(e) => return refuse(self, e.to_string()),
        };
        if slices.is_empty() {
            self.settled.push(Settled::new(req.id, None));
            return;
        }
        // The cut found the local memory registered: its region says where
        // it is, and so which devices are local to it.
        let at = self.regions.partition_point(|r| r.addr <= req.local) - 1;
        let rails = self.regions[at].rails;
        let record = RequestRec {
            id: req.id,
            verb: req.verb,
            peer: p,
            deadline_ns: req.deadline_ns,
            rails,
            left: slices.len(),
            error: None,
        };
        let key = self.requests.insert(record).expect("room checked above");
        self.request_ids.insert(req.id, key);
        for slice in slices {
            let n = self.next_slice;
            self.next_slice += 1;
            let rec = SliceRec { request: key, n, slice, tries: 0, state: SliceState::Ready };
            self.ready.push_back(self.slices.insert(rec).expect("room checked above"));
        }
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
        // Device bytes reach the metrics in sums, not per completion: every
        // so often, and whenever the engine falls idle (before its shard
        // parks).
        if now_ns >= self.next_report_ns || (moved && self.requests.len() == 0) {
            self.next_report_ns = now_ns.saturating_add(REPORT_NS);
            for d in &mut self.devices {
                if d.bytes > d.reported_bytes {
                    crate::telemetry::counters::device_bytes(&d.info.name, d.bytes - d.reported_bytes);
                    d.reported_bytes = d.bytes;
                }
            }
        }
        moved
    }

    /// Marks the endpoint `ld -> pd` of peer `p` broken and moves its queue
    /// pairs to ERR, so that everything posted on them completes now, as
    /// flushed (then goes again), rather than each waiting out its own
    /// queue pair's retries; it is made again once drained.
    fn break_endpoint(&mut self, p: usize, ld: usize, pd: usize, now_ns: u64, cause: &str) {
        let peer = &mut self.peers[p];
        let name = &peer.name;
        let n = peer.segment.devices.len();
        let Some(ep) = peer.endpoints.get_mut(ld * n + pd).and_then(Option::as_mut) else { return };
        if ep.broken {
            return;
        }
        ep.broken = true;
        ep.broken_at_ns = now_ns;
        let outstanding: u32 = ep.outstanding.iter().sum();
        log::info!(
            "RDMA: endpoint {} -> {name} device {pd} broken ({cause}); {outstanding} work requests flushed",
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

    /// Closes the endpoint `ld -> pd` of peer `p` and takes back, as
    /// flushed, the slices it still held: destroying a queue pair ends the
    /// device's use of its work requests, which never complete after.
    fn destroy_endpoint(&mut self, p: usize, ld: usize, pd: usize, why: &str) {
        let Some(qps) = self.peers[p].endpoint(ld, pd).map(|ep| ep.qps.clone()) else { return };
        self.close_endpoint(p, ld, pd);
        let held: Vec<Key> = self
            .slices
            .iter()
            .filter(|(_, r)| matches!(r.state, SliceState::Posted { local_dev, peer_dev, qp, .. } if local_dev == ld && peer_dev == pd && qps.contains(&qp)))
            .filter(|(_, r)| self.requests.get(r.request).is_some_and(|q| q.peer == p))
            .map(|(k, _)| k)
            .collect();
        let name = format!("{} -> {} device {pd}", self.devices[ld].info.name, self.peers[p].name);
        for key in held {
            self.flushed(key, format!("{name}: {why}"));
        }
    }

    /// Breaks the endpoints of slices posted past their request's deadline
    /// or longer than `MC_SLICE_TIMEOUT`: the flush settles them (a late
    /// request fails, a slow slice goes again on another rail), so every
    /// slice settles in bounded time even where a device never reports a
    /// lost packet. Returns whether it broke any.
    fn sweep_late(&mut self, now_ns: u64) -> bool {
        let mut late: Vec<(usize, usize, usize)> = Vec::new();
        for (_, rec) in self.slices.iter() {
            let SliceState::Posted { local_dev, peer_dev, at_ns, .. } = rec.state else { continue };
            let req = self.requests.get(rec.request).expect("a slice's request is in flight");
            let past_deadline = req.deadline_ns.is_some_and(|d| now_ns >= d);
            let too_slow = self.config.slice_timeout_ns.is_some_and(|t| now_ns.saturating_sub(at_ns) >= t);
            if past_deadline || too_slow {
                late.push((req.peer, local_dev, peer_dev));
            }
        }
        late.sort_unstable();
        late.dedup();
        let mut any = !late.is_empty();
        for (p, ld, pd) in late {
            self.break_endpoint(p, ld, pd, now_ns, "a slice outlived its deadline or MC_SLICE_TIMEOUT");
        }
        // Endpoints holding work with no completion for STALL_NS: the
        // device should have failed it by now (its retries take well under
        // a second), so the endpoint is broken as if it had. Endpoints
        // broken long ago and still holding work: the device did not flush
        // it (soft-RoCE on Linux 6.1 may not, for a queue pair deep in
        // retransmission), so they are destroyed and their work taken back.
        let (mut stalled, mut stuck) = (Vec::new(), Vec::new());
        for (p, peer) in self.peers.iter().enumerate() {
            let n = peer.devices();
            for (i, ep) in peer.endpoints.iter().enumerate() {
                let Some(ep) = ep.as_ref().filter(|ep| ep.holding()) else { continue };
                let (ld, pd) = (i / n, i % n);
                if !ep.broken && now_ns.saturating_sub(ep.progress_at_ns) >= STALL_NS {
                    stalled.push((p, ld, pd));
                } else if ep.broken && now_ns.saturating_sub(ep.broken_at_ns) >= DRAIN_MAX_NS {
                    stuck.push((p, ld, pd));
                }
            }
        }
        for (p, ld, pd) in stalled {
            any = true;
            log::warn!(
                "RDMA: endpoint {} -> {} device {pd} completed nothing in {} ms: broken",
                self.devices[ld].info.name,
                self.peers[p].name,
                STALL_NS / 1_000_000
            );
            self.break_endpoint(p, ld, pd, now_ns, "stalled");
        }
        for (p, ld, pd) in stuck {
            any = true;
            log::warn!(
                "RDMA: endpoint {} -> {} device {pd} did not drain within {} ms of breaking: destroyed",
                self.devices[ld].info.name,
                self.peers[p].name,
                DRAIN_MAX_NS / 1_000_000
            );
            self.destroy_endpoint(p, ld, pd, "the queue pair never drained");
        }
        any
    }

    fn take_events(&mut self) -> bool {
        let mut any = false;
        for d in &mut self.devices {
            self.events.clear();
            d.ctx.events(&mut self.events);
            for e in &self.events {
                any = true;
                match e {
                    PortEvent::PortDown => d.up = false,
                    PortEvent::PortActive => d.up = true,
                    PortEvent::QpFatal(_) | PortEvent::CqOverrun(_) => {}
                }
            }
        }
        if any && let Some(w) = &self.up_watch {
            w.store(self.devices.iter().filter(|d| d.up).count(), std::sync::atomic::Ordering::Relaxed);
        }
        any
    }

    /// Keeps `watch` at the number of this engine's devices that are up
    /// (for a transport choosing among engines on several shards).
    pub fn watch_up(&mut self, watch: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        watch.store(self.devices.iter().filter(|d| d.up).count(), std::sync::atomic::Ordering::Relaxed);
        self.up_watch = Some(watch);
    }

    /// Settles slice `key` once; its request settles with its last slice.
    fn settle(&mut self, key: Key, error: Option<Fault>) {
        let rec = self.slices.remove(key).expect("a slice settles once");
        let r = self.requests.get_mut(rec.request).expect("a slice's request is in flight");
        // The first failure says why, except that the memory's refusal
        // outranks the rails' trouble (a flush is often the echo of a
        // refused key on the same queue pair).
        match (&r.error, &error) {
            (None, _) => r.error = error,
            (Some(old), Some(new)) if old.rails && !new.rails => r.error = error,
            _ => {}
        }
        assert!(r.left > 0, "request {} has no slices left to settle", r.id);
        r.left -= 1;
        if r.left == 0 {
            let r = self.requests.remove(rec.request).expect("looked up above");
            self.request_ids.remove(&r.id);
            self.settled.push(Settled::new(r.id, r.error));
        }
    }

    /// Chooses rails, builds work requests, stages them per queue pair and
    /// posts each queue pair's chain in one call.
    fn post_ready(&mut self, connector: &mut dyn Connector, now_ns: u64) -> bool {
        let mut moved = false;
        debug_assert!(self.later.is_empty() && self.staged.is_empty());
        while let Some(key) = self.ready.pop_front() {
            moved = true;
            let rec = self.slices.get(key).expect("a ready slice is in flight");
            let req = self.requests.get(rec.request).expect("a slice's request is in flight");
            if req.deadline_ns.is_some_and(|d| now_ns >= d) {
                let why = format!("request {} timed out before all its slices were sent", req.id);
                self.settle(key, Some(Fault::request(why)));
                continue;
            }
            let (p, verb, rails) = (req.peer, req.verb, req.rails);
            let (slice, tries, n) = (rec.slice, rec.tries, rec.n);
            let (ld, pd, rkey) = match self.choose_rails(p, rails, &slice, n, tries, now_ns) {
                Ok(chosen) => chosen,
                Err(fault) => {
                    self.settle(key, Some(fault));
                    continue;
                }
            };
            let qi = match self.endpoint_qp(connector, p, ld, pd, now_ns) {
                Ok(Some(qi)) => qi,
                Ok(None) => {
                    self.later.push_back(key); // connecting, draining or full
                    continue;
                }
                Err(EndpointError::Gone(why)) => {
                    self.settle(key, Some(Fault::gone(why)));
                    continue;
                }
                Err(EndpointError::Rails(why)) => {
                    // A connection that failed counts as a try.
                    log::warn!("RDMA: {} -> {} device {pd}: {why}", self.devices[ld].info.name, self.peers[p].name);
                    self.count_try(key);
                    self.fail_try(key, p, pd, Fault::rails(why), now_ns);
                    continue;
                }
            };
            let lkey = self.lkey(slice.local, ld).expect("the slice was cut inside a region");
            self.count_try(key);
            let rec = self.slices.get_mut(key).expect("looked up above");
            let wr = WorkRequest {
                wr_id: wr_id(key, rec.tries),
                verb,
                sges: Sges::one(Sge { addr: slice.local, len: slice.len as u32, lkey }),
                remote_addr: slice.remote,
                rkey,
                // Small writes go inline: the device reads no memory for them.
                inline: verb == Verb::Write && slice.len <= u64::from(self.config.max_inline),
            };
            let ei = ld * self.peers[p].devices() + pd;
            let ep = self.peers[p].endpoints[ei].as_mut().expect("made above");
            rec.state = SliceState::Posted { local_dev: ld, peer_dev: pd, qp: ep.qps[qi], qi, at_ns: now_ns };
            if ep.pending[qi].is_empty() {
                self.staged.push((p, ei, qi));
            }
            ep.pending[qi].push(wr);
        }
        std::mem::swap(&mut self.ready, &mut self.later);
        let staged = std::mem::take(&mut self.staged);
        for &(p, ei, qi) in &staged {
            let n = self.peers[p].devices();
            let (ld, pd) = (ei / n, ei % n);
            let ep = self.peers[p].endpoints[ei].as_mut().expect("staged on a live endpoint");
            let mut chain = std::mem::take(&mut ep.pending[qi]);
            let qp = ep.qps[qi];
            if let Err(e) = self.devices[ld].ctx.post(qp, &chain) {
                // The queue pair broke since: those not posted go again.
                let posted = match &e {
                    FabricError::BadWorkRequest { index, .. } => *index,
                    _ => 0,
                };
                let ep = self.peers[p].endpoints[ei].as_mut().expect("staged on a live endpoint");
                ep.outstanding[qi] -= (chain.len() - posted) as u32;
                self.break_endpoint(p, ld, pd, now_ns, &format!("posting failed: {e}"));
                for wr in &chain[posted..] {
                    let key = self.key_of(wr.wr_id).expect("a slice staged this round is in flight");
                    self.fail_try(key, p, pd, Fault::rails(e.to_string()), now_ns);
                }
            }
            chain.clear();
            if let Some(ep) = self.peers[p].endpoints[ei].as_mut() {
                ep.pending[qi] = chain; // its room, for the next round
            }
        }
        self.staged = staged;
        self.staged.clear();
        moved
    }

    /// The slice a work request id names, if it is still that slice's
    /// current try.
    fn key_of(&self, wr_id: u64) -> Option<Key> {
        let (index, generation, tries) = (wr_id & 0xffff_ffff, (wr_id >> 32) & 0xff_ffff, (wr_id >> 56) as u32);
        let key = self.slices.key_at(index as usize)?;
        let rec = self.slices.get(key)?;
        ((key.0 >> 32) & 0xff_ffff == generation && rec.tries & 0xff == tries).then_some(key)
    }

    /// The local device, peer device and rkey for try `tries` of a slice.
    fn choose_rails(
        &self,
        p: usize,
        rails: usize,
        slice: &Slice,
        n: u64,
        tries: u32,
        now_ns: u64,
    ) -> Result<(usize, usize, u32), Fault> {
        let (location, local) = &self.locations[rails];
        let ld = local
            .pick(n, tries, |d| !self.devices[d].up)
            .ok_or_else(|| Fault::rails(format!("no local RDMA device is up for {location}")))?;
        let peer = &self.peers[p];
        let b = peer.buffer_at(slice.remote, slice.len).ok_or_else(|| {
            Fault::request(format!(
                "{}: [{:#x}, +{}) is not inside a buffer it registered",
                peer.name, slice.remote, slice.len
            ))
        })?;
        let remote = &peer.locations[peer.buffer_rails[b]].1;
        let paused = |d: usize| peer.paused_until[d] > now_ns;
        // A broken endpoint drains before it is made again: its slices go
        // elsewhere meanwhile, if there is an elsewhere.
        let draining = |d: usize| peer.endpoint(ld, d).is_some_and(|ep| ep.broken);
        // Rails line up: local rail r sends to the peer's r-th device first
        // (where rails are separate networks, rail r reaches only rail r),
        // and a side with fewer devices sprays over the other's.
        let m = self.devices[ld].rail.wrapping_add(self.rails_total.wrapping_mul(n));
        let pd = remote
            .pick(m, tries, |d| paused(d) || draining(d))
            .or_else(|| remote.pick(m, tries, paused))
            .ok_or_else(|| Fault::rails(format!("{}: every rail is paused or down", peer.name)))?;
        Ok((ld, pd, peer.segment.buffers[b].rkey[pd]))
    }

    fn lkey(&self, addr: u64, device: usize) -> Option<u32> {
        let i = self.regions.partition_point(|r| r.addr <= addr).checked_sub(1)?;
        let r = &self.regions[i];
        (addr < r.addr + r.len).then(|| r.mrs[device].lkey)
    }

    /// A queue pair (its index) of the endpoint `ld -> pd` of peer `p` with
    /// room, the endpoint made (or made again) if needed; `None` while it
    /// connects, drains or is full.
    fn endpoint_qp(
        &mut self,
        connector: &mut dyn Connector,
        p: usize,
        ld: usize,
        pd: usize,
        now_ns: u64,
    ) -> Result<Option<usize>, EndpointError> {
        let stale = self.peers[p].endpoint(ld, pd).is_some_and(|ep| ep.broken && !ep.holding());
        if stale {
            self.close_endpoint(p, ld, pd);
        }
        if self.peers[p].endpoint(ld, pd).is_none() {
            if !self.make_room(ld) {
                return Ok(None); // every endpoint of the device is busy: wait
            }
            let ep = open_endpoint(&mut self.devices[ld], &self.config, now_ns)?;
            self.devices[ld].endpoints += 1;
            let n = self.peers[p].devices();
            self.peers[p].endpoints[ld * n + pd] = Some(ep);
        }
        let peer = &mut self.peers[p];
        let n = peer.segment.devices.len();
        let ep = peer.endpoints[ld * n + pd].as_mut().expect("made above");
        if let Some(since) = ep.connecting_since {
            if now_ns.saturating_sub(since) > self.config.connect_timeout_ns {
                self.close_endpoint(p, ld, pd);
                return Err(EndpointError::Rails(format!(
                    "{} did not answer a connection within {} ms",
                    self.peers[p].name,
                    self.config.connect_timeout_ns / 1_000_000
                )));
            }
            let device = &mut self.devices[ld];
            let mtu = device.info.active_mtu.min(self.config.mtu);
            let ours = OurSide { device: &device.info, gid: device.gid, qps: &ep.qps, mtu };
            let answer = connector.connect(&peer.name, pd, &peer.segment.devices[pd].name, ours);
            let done = match answer {
                Ok(Answer::Pending) => return Ok(None),
                Ok(Answer::Ready(side))
                    if side.instance.is_some_and(|theirs| peer.instance != 0 && theirs != peer.instance) =>
                {
                    // The name answers with another process: its queue
                    // pairs must not carry work addressed to the old one
                    // (whose keys and addresses they would hand it).
                    Err(EndpointError::Gone(format!(
                        "{} is another process now (instance {:#x}, not {:#x}): the one this request was addressed to is gone",
                        peer.name,
                        side.instance.unwrap_or(0),
                        peer.instance
                    )))
                }
                Ok(Answer::Ready(side)) => {
                    finish_endpoint(device, &self.config, ep, &peer.name, &side).map_err(EndpointError::Rails)
                }
                Err(e) => Err(EndpointError::Rails(e)),
            };
            if let Err(e) = done {
                self.close_endpoint(p, ld, pd);
                return Err(e);
            }
            crate::telemetry::counters::event(crate::telemetry::Event::RdmaConnect);
        }
        self.uses += 1;
        ep.last_use = self.uses;
        if ep.broken {
            return Ok(None); // drains before it is made again
        }
        if !ep.holding() {
            ep.progress_at_ns = now_ns; // the stall clock starts with the first work
        }
        Ok(ep.take_room(self.config.max_wr))
    }

    /// Closes the endpoint `ld -> pd` of peer `p`: its queue pairs go.
    fn close_endpoint(&mut self, p: usize, ld: usize, pd: usize) {
        let n = self.peers[p].devices();
        if let Some(ep) = self.peers[p].endpoints.get_mut(ld * n + pd).and_then(Option::take) {
            self.devices[ld].endpoints -= 1;
            for qp in ep.qps {
                let _ = self.devices[ld].ctx.destroy_qp(qp);
            }
        }
    }

    /// A try of slice `key` begins (a post, or a connection attempt).
    fn count_try(&mut self, key: Key) {
        let rec = self.slices.get_mut(key).expect("a slice in flight");
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
        let mut victim: Option<(u64, usize, usize)> = None;
        for (p, peer) in self.peers.iter().enumerate() {
            let n = peer.devices();
            for pd in 0..n {
                let Some(ep) = peer.endpoints[ld * n + pd].as_ref() else { continue };
                if ep.connecting_since.is_none() && !ep.holding() && victim.is_none_or(|(u, _, _)| ep.last_use < u) {
                    victim = Some((ep.last_use, p, pd));
                }
            }
        }
        let Some((_, p, pd)) = victim else { return false };
        self.close_endpoint(p, ld, pd);
        true
    }

    /// A try of slice `key` failed on a rail to peer device `pd` of peer
    /// `p`: count it against the peer rail, and queue the slice again or
    /// settle it failed.
    fn fail_try(&mut self, key: Key, p: usize, pd: usize, fault: Fault, now_ns: u64) {
        // Only the rail's own faults count against it: a key the target
        // refused says nothing about the rail.
        if fault.rails {
            let peer = &mut self.peers[p];
            let errors = &mut peer.errors[pd];
            errors.push_back(now_ns);
            while errors.front().is_some_and(|&t| t + self.config.pause_window_ns < now_ns) {
                errors.pop_front();
            }
            if errors.len() >= self.config.pause_errors {
                log::warn!(
                    "RDMA: {} device {pd} failed {} times within {} ms: paused for {} s (the last: {})",
                    peer.name,
                    errors.len(),
                    self.config.pause_window_ns / 1_000_000,
                    self.config.pause_ns / 1_000_000_000,
                    fault.why
                );
                peer.paused_until[pd] = now_ns + self.config.pause_ns;
                errors.clear();
                crate::telemetry::counters::rail_paused(&peer.segment.devices[pd].name);
            }
        }
        let rec = self.slices.get_mut(key).expect("a slice in flight");
        rec.state = SliceState::Ready;
        if rec.tries > self.config.retry_cnt {
            let why = format!("a slice failed {} times; the last: {}", rec.tries, fault.why);
            self.settle(key, Some(Fault { why, rails: fault.rails, gone: fault.gone }));
        } else {
            self.ready.push_back(key);
        }
    }

    /// Slice `key` was flushed off its queue pair: it goes again, unless
    /// its tries are used up.
    fn flushed(&mut self, key: Key, why: String) {
        let rec = self.slices.get_mut(key).expect("a flushed slice is in flight");
        rec.state = SliceState::Ready;
        if rec.tries > self.config.retry_cnt {
            let why = format!("a slice failed {} times; the last: {why}", rec.tries);
            self.settle(key, Some(Fault::rails(why)));
        } else {
            self.ready.push_back(key);
        }
    }

    fn poll_all(&mut self, now_ns: u64) -> bool {
        let mut moved = false;
        let mut batch = std::mem::take(&mut self.completions);
        for ld in 0..self.devices.len() {
            batch.clear();
            let d = &mut self.devices[ld];
            if d.ctx.poll(d.cq, POLL_BATCH, &mut batch).is_err() {
                continue;
            }
            for c in &batch {
                moved = true;
                self.complete(ld, c, now_ns);
            }
        }
        batch.clear();
        self.completions = batch;
        moved
    }

    /// One completion from local device `ld`.
    fn complete(&mut self, ld: usize, c: &Completion, now_ns: u64) {
        // A completion of an earlier try, or of a queue pair destroyed
        // since, names no slice now: it is dropped.
        let Some(key) = self.key_of(c.wr_id) else { return };
        let rec = self.slices.get(key).expect("found above");
        let SliceState::Posted { local_dev, peer_dev: pd, qp, qi, .. } = rec.state else { return };
        if local_dev != ld || qp != c.qp {
            return;
        }
        let p = self.requests.get(rec.request).expect("a slice's request is in flight").peer;
        if let Some(ep) = self.peers[p].endpoint_mut(ld, pd) {
            debug_assert_eq!(ep.qps[qi], qp);
            ep.outstanding[qi] = ep.outstanding[qi].saturating_sub(1);
            ep.progress_at_ns = now_ns;
        }
        if c.status == WcStatus::Success {
            self.devices[ld].bytes += c.bytes;
            self.settle(key, None);
            return;
        }
        self.break_endpoint(p, ld, pd, now_ns, &format!("a completion: {}", c.status));
        let why = format!("{} -> {} device {pd}: {}", self.devices[ld].info.name, self.peers[p].name, c.status);
        if c.status == WcStatus::WrFlushErr {
            // A flush is the queue pair's fault, not the rail's.
            self.flushed(key, why);
        } else {
            // A refused key, bound or access is the memory's fault: no
            // rail (nor TCP) would carry it.
            let rails = !matches!(c.status, WcStatus::RemAccessErr | WcStatus::LocProtErr | WcStatus::LocLenErr);
            self.fail_try(key, p, pd, Fault { why, rails, gone: false }, now_ns);
        }
    }

    /// Peer `name`'s state (tests look at rail pauses).
    #[cfg(test)]
    fn peer(&self, name: &str) -> &Peer {
        &self.peers[self.peer_ids[name]]
    }
}

#[cfg(test)]
mod handshake_tests;
#[cfg(test)]
mod tests;
