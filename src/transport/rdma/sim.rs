//! The simulated fabric: deterministic, in one process, with real bytes.
//!
//! A [`SimNetwork`] is the wire and every NIC on it. Work requests carry
//! out at a virtual time (the device's latency plus bytes over its rate),
//! checked as hardware checks them: the queue pair must be in RTS, local
//! keys, bounds and access at the requester, remote keys, bounds and access
//! at the responder, completion queue room. A failure completes the work
//! request with the status hardware gives, puts the queue pair in error,
//! and flushes what it still holds. A seeded [`FaultPlan`] takes devices
//! down and up at chosen times, fails chosen work requests and slows
//! devices, so a test can replay any run from its seed.
//!
//! Virtual time moves with [`SimNetwork::advance`] or, in the default
//! [`Clock::Jump`] mode, jumps to the next due work request when a poll
//! finds none due, so a driver that only polls never stalls.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::fabric::{
    Access, Completion, Context, CqId, DeviceInfo, Fabric, FabricError, GidEntry, GidKind, Mr, PeerAddr, PortEvent,
    PortState, QpCaps, QpNum, QpState, Transition, Verb, WcStatus, WorkRequest,
};
use super::idhash::IdMap;
use super::rules;
use crate::proto::mooncake::rdma::Gid;

/// Queue pairs one context may have.
pub const QPS_PER_CONTEXT_MAX: usize = 4096;
/// Memory regions one context may have.
pub const MRS_PER_CONTEXT_MAX: usize = 65_536;
/// Completion queues one context may have.
pub const CQS_PER_CONTEXT_MAX: usize = 64;
/// The most inline bytes a queue pair may ask for.
pub const INLINE_MAX: u32 = 1024;
/// Port events kept per context before the oldest are dropped.
pub const EVENTS_MAX: usize = 1024;

/// How virtual time moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Only [`SimNetwork::advance`] moves it.
    Manual,
    /// A poll that finds nothing due jumps to the next due work request.
    Jump,
}

/// One simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimDevice {
    pub info: DeviceInfo,
    /// Fixed cost of a work request, in virtual nanoseconds.
    pub latency_ns: u64,
    /// Bytes per virtual nanosecond (25 is 200 Gb/s).
    pub bytes_per_ns: u64,
    /// Whether its work requests copy the bytes (they are checked either
    /// way); off for a NIC that costs nothing, to measure the software
    /// path alone (`shardwire bench rdma-sim`).
    pub moves_bytes: bool,
}

impl SimDevice {
    /// A 200 Gb/s RoCE v2 device named `name`, with a link-local GID at
    /// index 0 and `::ffff:10.0.0.<n>` at index 1.
    pub fn new(name: &str, n: u8) -> SimDevice {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 0, 0, n]);
        SimDevice {
            info: DeviceInfo {
                name: name.to_string(),
                port: 1,
                state: PortState::Active,
                lid: 0,
                gids: vec![
                    GidEntry {
                        gid: Gid([0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n]),
                        kind: GidKind::RoceV2,
                    },
                    GidEntry { gid: Gid(gid), kind: GidKind::RoceV2 },
                ],
                active_mtu: 4096,
                max_mr_size: 1 << 40,
                max_qp_wr: 16_384,
                max_cqe: 1 << 20,
                numa_node: None,
            },
            latency_ns: 2_000,
            bytes_per_ns: 25,
            moves_bytes: true,
        }
    }
}

/// Something the plan makes happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The device's port goes down at this virtual time: its queue pairs
    /// go to error, and work to or from it fails.
    Down { device: String, at_ns: u64 },
    /// And comes back.
    Up { device: String, at_ns: u64 },
    /// The device's `nth` work request (counting from 0, as they carry
    /// out) fails with `status`.
    FailNth { device: String, nth: u64, status: WcStatus },
    /// Every `every`th work request of the device fails with `status`.
    FailEvery { device: String, every: u64, status: WcStatus },
    /// The device runs `factor` times slower.
    Slow { device: String, factor: u64 },
    /// The two devices cannot reach each other (separate networks, as the
    /// rails of a rail-optimised cluster are): work between them is retried
    /// by the device, then fails (`RETRY_EXC_ERR`).
    Unreachable { a: String, b: String },
    /// The device never completes a work request, nor flushes one when its
    /// queue pair goes to error (a hung device; soft-RoCE on Linux 6.1
    /// can leave a queue pair in retransmission so): only destroying the
    /// queue pair ends them.
    Stuck { device: String },
}

/// The faults of a run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FaultPlan {
    pub faults: Vec<Fault>,
}

/// The wire and the NICs on it. Cloning shares them.
#[derive(Clone)]
pub struct SimNetwork {
    net: Arc<Mutex<Net>>,
}

struct Net {
    now_ns: u64,
    clock: Clock,
    devices: Vec<DeviceState>,
    contexts: Vec<Option<Ctx>>,
    plan: FaultPlan,
    /// The plan's timed faults, in time order: (time, device, up).
    timed: Vec<(u64, usize, bool)>,
    /// Time faults already applied.
    applied: usize,
    rng: u64,
    /// Work requests posted so far (orders those due at the same time).
    next_seq: u64,
    /// Pairs of devices that cannot reach each other (both orders).
    unreachable: Vec<(usize, usize)>,
}

struct DeviceState {
    sim: SimDevice,
    up: bool,
    /// Work requests carried out so far.
    executed: u64,
    /// The plan's slow-down factor for it (1: none) and whether it hangs.
    slow: u64,
    stuck: bool,
    /// Whether the plan fails any of its work requests.
    fails: bool,
}

struct Ctx {
    device: usize,
    next_key: u32,
    next_qp: u32,
    /// Regions by lkey (the rkey is the lkey with bits flipped).
    mrs: IdMap<u32, Region>,
    /// Completion queues by number.
    cqs: Vec<Cq>,
    qps: IdMap<u32, Qp>,
    events: VecDeque<PortEvent>,
}

struct Region {
    mr: Mr,
    access: Access,
    /// Work requests posted here that name it as local memory.
    in_use: usize,
}

struct Cq {
    capacity: usize,
    done: VecDeque<Completion>,
    overrun: bool,
    /// The work requests of its queue pairs in posting order: (due, seq,
    /// queue pair). They are carried out in that order, each once due (or
    /// at once, flushed, if its queue pair is in error); entries whose work
    /// request left its queue otherwise (a reset, a destroy) are dropped
    /// when met.
    due: VecDeque<(u64, u64, u32)>,
}

/// The rkey of a region whose lkey is `lkey`, and back.
const RKEY_FLIP: u32 = 0x5a00_0000;

struct Qp {
    cq: u32,
    caps: QpCaps,
    state: QpState,
    access: Access,
    peer: Option<PeerAddr>,
    /// The context its peer queue pair lives in, once found.
    peer_ctx: Option<usize>,
    /// Posted, not yet carried out, in order.
    queue: VecDeque<Posted>,
    /// The due time of its last work request: a later one is never due
    /// before it (a queue pair carries its work out in order).
    last_due_ns: u64,
}

/// A work request on its queue pair.
struct Posted {
    /// Its place among all work requests posted (its due time is in its
    /// completion queue's heap).
    seq: u64,
    wr: WorkRequest,
    /// Inline data, taken at post.
    data: Option<Box<[u8]>>,
}

/// `p` leaves its queue: the regions it named are free of it.
fn release(mrs: &mut IdMap<u32, Region>, p: &Posted) {
    if p.data.is_some() {
        return; // inline: it named no region
    }
    for s in &p.wr.sges {
        if let Some(r) = mrs.get_mut(&s.lkey) {
            r.in_use = r.in_use.saturating_sub(1);
        }
    }
}

fn lock(net: &Mutex<Net>) -> MutexGuard<'_, Net> {
    net.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's own simulated network (`SHARDWIRE_FABRIC=sim`): made on
/// first use with `names`, every engine of the process on it. Later calls
/// get the same network, whatever names they pass.
pub fn shared(names: &[String]) -> SimNetwork {
    static NET: std::sync::OnceLock<SimNetwork> = std::sync::OnceLock::new();
    NET.get_or_init(|| {
        let devices = names.iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
        SimNetwork::new(devices, FaultPlan::default(), 1)
    })
    .clone()
}

impl SimNetwork {
    /// A network of `devices` under `plan`; `seed` varies the latencies a
    /// little (the same seed gives the same run).
    pub fn new(devices: Vec<SimDevice>, plan: FaultPlan, seed: u64) -> SimNetwork {
        // What the plan says of each device, worked out once (the plan
        // does not change).
        let devices: Vec<DeviceState> = devices
            .into_iter()
            .map(|sim| {
                let name = sim.info.name.clone();
                let of = |f: &Fault| match f {
                    Fault::Down { device, .. }
                    | Fault::Up { device, .. }
                    | Fault::FailNth { device, .. }
                    | Fault::FailEvery { device, .. }
                    | Fault::Slow { device, .. }
                    | Fault::Stuck { device } => *device == name,
                    Fault::Unreachable { .. } => false,
                };
                let mine: Vec<&Fault> = plan.faults.iter().filter(|f| of(f)).collect();
                let slow =
                    mine.iter().filter_map(|f| if let Fault::Slow { factor, .. } = f { Some(*factor) } else { None });
                DeviceState {
                    up: sim.info.state == PortState::Active,
                    executed: 0,
                    slow: slow.max().unwrap_or(1).max(1),
                    stuck: mine.iter().any(|f| matches!(f, Fault::Stuck { .. })),
                    fails: mine.iter().any(|f| matches!(f, Fault::FailNth { .. } | Fault::FailEvery { .. })),
                    sim,
                }
            })
            .collect();
        let index = |name: &str| devices.iter().position(|d| d.sim.info.name == name);
        let mut timed: Vec<(u64, usize, bool)> = plan
            .faults
            .iter()
            .filter_map(|f| match f {
                Fault::Down { device, at_ns } => index(device).map(|d| (*at_ns, d, false)),
                Fault::Up { device, at_ns } => index(device).map(|d| (*at_ns, d, true)),
                _ => None,
            })
            .collect();
        timed.sort();
        let mut unreachable = Vec::new();
        for f in &plan.faults {
            if let Fault::Unreachable { a, b } = f
                && let (Some(a), Some(b)) = (index(a), index(b))
            {
                unreachable.extend([(a, b), (b, a)]);
            }
        }
        SimNetwork {
            net: Arc::new(Mutex::new(Net {
                now_ns: 0,
                clock: Clock::Jump,
                devices,
                contexts: Vec::new(),
                plan,
                timed,
                applied: 0,
                rng: seed | 1,
                next_seq: 0,
                unreachable,
            })),
        }
    }

    pub fn set_clock(&self, clock: Clock) {
        lock(&self.net).clock = clock;
    }

    /// The virtual time, in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        lock(&self.net).now_ns
    }

    /// Moves virtual time on by `ns`, applying the plan's faults on the way.
    pub fn advance(&self, ns: u64) {
        let mut net = lock(&self.net);
        let to = net.now_ns.saturating_add(ns);
        net.set_time(to);
    }

    /// Takes device `name` down (`up == false`) or up now.
    pub fn set_device(&self, name: &str, up: bool) {
        let mut net = lock(&self.net);
        if let Some(d) = net.devices.iter().position(|d| d.sim.info.name == name) {
            net.set_up(d, up);
        }
    }
}

impl Net {
    /// The device of context `id`.
    fn device_of(&self, id: usize) -> usize {
        self.contexts[id].as_ref().expect("a context lives until dropped").device
    }

    fn device_index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.sim.info.name == name)
    }

    /// Moves time to `to`, applying the timed faults due by then in order.
    fn set_time(&mut self, to: u64) {
        while self.applied < self.timed.len() && self.timed[self.applied].0 <= to {
            let (at, d, up) = self.timed[self.applied];
            self.now_ns = self.now_ns.max(at);
            self.set_up(d, up);
            self.applied += 1;
        }
        self.now_ns = self.now_ns.max(to);
    }

    fn set_up(&mut self, d: usize, up: bool) {
        if self.devices[d].up == up {
            return;
        }
        self.devices[d].up = up;
        self.devices[d].sim.info.state = if up { PortState::Active } else { PortState::Down };
        for ctx in self.contexts.iter_mut().flatten().filter(|c| c.device == d) {
            push_event(ctx, if up { PortEvent::PortActive } else { PortEvent::PortDown });
            if !up {
                // In number order, so a replay raises the same events.
                let mut qps: Vec<u32> = ctx.qps.keys().copied().collect();
                qps.sort_unstable();
                for q in qps {
                    if let Some(qp) = ctx.qps.get_mut(&q)
                        && qp.state != QpState::Reset
                        && qp.state != QpState::Err
                    {
                        qp.state = QpState::Err;
                        push_event(ctx, PortEvent::QpFatal(QpNum(q)));
                    }
                }
            }
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// When a work request of `bytes` posted now on device `d` is due.
    fn due(&mut self, d: usize, bytes: u64) -> u64 {
        let (latency, rate) = (self.devices[d].sim.latency_ns, self.devices[d].sim.bytes_per_ns.max(1));
        let cost = latency + bytes / rate;
        let jitter = if latency == 0 { 0 } else { self.next_random() % (latency / 8 + 1) };
        self.now_ns + (cost + jitter) * self.devices[d].slow
    }

    /// The status the plan gives device `d`'s next work request, if any.
    fn planned_failure(&mut self, d: usize) -> Option<WcStatus> {
        let nth = self.devices[d].executed;
        self.devices[d].executed += 1;
        if !self.devices[d].fails {
            return None;
        }
        let name = &self.devices[d].sim.info.name;
        self.plan.faults.iter().find_map(|f| match f {
            Fault::FailNth { device, nth: n, status } if device == name && *n == nth => Some(*status),
            Fault::FailEvery { device, every, status } if device == name && *every > 0 && (nth + 1) % every == 0 => {
                Some(*status)
            }
            _ => None,
        })
    }

    /// The context and queue pair a peer address names.
    fn find_peer(&self, peer: &PeerAddr) -> Option<(usize, u32)> {
        self.contexts.iter().enumerate().find_map(|(i, c)| {
            let c = c.as_ref()?;
            let gid_ok = self.devices[c.device].sim.info.gids.iter().any(|e| e.gid == peer.gid);
            (gid_ok && c.qps.contains_key(&peer.qp.0)).then_some((i, peer.qp.0))
        })
    }

    /// Carries out what is due on the queue pairs completing into `cq` of
    /// context `me`, in each queue pair's order.
    fn run_due(&mut self, me: usize, cq: u32) {
        if self.devices[self.device_of(me)].stuck {
            return; // a hung device completes nothing, flushes nothing
        }
        loop {
            let now = self.now_ns;
            let ctx = self.contexts[me].as_mut().expect("a live context");
            let c = &mut ctx.cqs[cq as usize];
            let Some(&(due, seq, qpn)) = c.due.front() else { return };
            let state = match ctx.qps.get(&qpn) {
                Some(q) if q.queue.front().is_some_and(|p| p.seq == seq) => q.state,
                _ => {
                    c.due.pop_front(); // its work request left the queue otherwise
                    continue;
                }
            };
            if due > now && state != QpState::Err {
                return;
            }
            c.due.pop_front();
            let posted = ctx.qps.get_mut(&qpn).and_then(|q| q.queue.pop_front()).expect("its front, looked at above");
            let status = if state == QpState::Err { WcStatus::WrFlushErr } else { self.execute(me, qpn, &posted) };
            let ctx = self.contexts[me].as_mut().expect("a live context");
            release(&mut ctx.mrs, &posted);
            let wr = posted.wr;
            if status != WcStatus::Success
                && let Some(q) = ctx.qps.get_mut(&qpn)
            {
                q.state = QpState::Err;
            }
            let bytes = if status == WcStatus::Success { wr.len() } else { 0 };
            let c = &mut ctx.cqs[cq as usize];
            if c.done.len() >= c.capacity {
                if !c.overrun {
                    c.overrun = true;
                    push_event(ctx, PortEvent::CqOverrun(CqId(cq)));
                }
                for q in ctx.qps.values_mut().filter(|q| q.cq == cq) {
                    q.state = QpState::Err;
                }
                continue;
            }
            c.done.push_back(Completion { wr_id: wr.wr_id, qp: QpNum(qpn), status, bytes });
        }
    }

    /// One work request, checked as hardware checks it, and its bytes moved.
    fn execute(&mut self, me: usize, qpn: u32, posted: &Posted) -> WcStatus {
        let wr = &posted.wr;
        let my_device = self.contexts[me].as_ref().expect("a live context").device;
        if let Some(status) = self.planned_failure(my_device) {
            return status;
        }
        let ctx = self.contexts[me].as_ref().expect("a live context");
        let qp = &ctx.qps[&qpn];
        let Some(peer) = qp.peer else { return WcStatus::GeneralErr };
        // Local side: keys, bounds, access (inline data has none).
        for s in wr.sges.iter().filter(|_| posted.data.is_none()) {
            let region = ctx.mrs.get(&s.lkey).map(|r| (&r.mr, r.access));
            if let Err(status) = rules::check_local(s, region, wr.verb) {
                return status;
            }
        }
        let found = match qp.peer_ctx {
            Some(i) if self.contexts[i].as_ref().is_some_and(|c| c.qps.contains_key(&peer.qp.0)) => {
                Some((i, peer.qp.0))
            }
            _ => self.find_peer(&peer),
        };
        let Some((them, their_qp)) = found else { return WcStatus::RetryExcErr };
        if qp.peer_ctx != Some(them) {
            let q = self.contexts[me].as_mut().and_then(|c| c.qps.get_mut(&qpn)).expect("looked at above");
            q.peer_ctx = Some(them);
        }
        let theirs = self.contexts[them].as_ref().expect("found above");
        if !self.devices[my_device].up || !self.devices[theirs.device].up {
            return WcStatus::RetryExcErr;
        }
        if self.unreachable.contains(&(my_device, theirs.device)) {
            return WcStatus::RetryExcErr;
        }
        let tq = &theirs.qps[&their_qp];
        if !matches!(tq.state, QpState::Rtr | QpState::Rts) {
            return WcStatus::RetryExcErr;
        }
        // Packets larger than either port takes are dropped on the way:
        // the requester retries, then gives up.
        let mtus = (self.devices[my_device].sim.info.active_mtu, self.devices[theirs.device].sim.info.active_mtu);
        if peer.mtu > mtus.0.min(mtus.1) {
            return WcStatus::RetryExcErr;
        }
        let len = wr.len();
        let region = theirs.mrs.get(&(wr.rkey ^ RKEY_FLIP)).filter(|r| r.mr.rkey == wr.rkey).map(|r| (&r.mr, r.access));
        if let Err(status) = rules::check_remote(wr.verb, wr.remote_addr, len, region, tq.access) {
            return status;
        }
        if !self.devices[my_device].sim.moves_bytes {
            return WcStatus::Success;
        }
        if let Some(data) = &posted.data {
            // SAFETY: the range lies inside a registered region (checked
            // above), kept mapped by its registrant until deregistered;
            // the network's lock orders this copy against that.
            unsafe { std::ptr::copy(data.as_ptr(), wr.remote_addr as *mut u8, data.len()) };
            return WcStatus::Success;
        }
        let mut at = wr.remote_addr;
        for s in &wr.sges {
            // SAFETY: both ranges lie inside registered regions (checked
            // above), which their registrants keep mapped until they
            // deregister them (the contract of `Context::register`); the
            // network's lock orders this copy against deregistration.
            unsafe {
                match wr.verb {
                    Verb::Write | Verb::WriteImm(_) => {
                        std::ptr::copy(s.addr as *const u8, at as *mut u8, s.len as usize)
                    }
                    Verb::Read => std::ptr::copy(at as *const u8, s.addr as *mut u8, s.len as usize),
                }
            }
            at += u64::from(s.len);
        }
        WcStatus::Success
    }
}

fn push_event(ctx: &mut Ctx, e: PortEvent) {
    if ctx.events.len() >= EVENTS_MAX {
        ctx.events.pop_front();
    }
    ctx.events.push_back(e);
}

impl Fabric for SimNetwork {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        lock(&self.net).devices.iter().map(|d| d.sim.info.clone()).collect()
    }

    fn open(&self, name: &str) -> Result<Box<dyn Context>, FabricError> {
        let mut net = lock(&self.net);
        let device = net.device_index(name).ok_or_else(|| FabricError::NoDevice(name.to_string()))?;
        let id = net.contexts.len();
        net.contexts.push(Some(Ctx {
            device,
            next_key: 0x100 + (id as u32) * 0x10_0000,
            next_qp: 0x11 + (id as u32) * 0x1000,
            mrs: IdMap::default(),
            cqs: Vec::new(),
            qps: IdMap::default(),
            events: VecDeque::new(),
        }));
        Ok(Box::new(SimContext { net: self.net.clone(), id }))
    }
}

/// A context on a simulated device.
pub struct SimContext {
    net: Arc<Mutex<Net>>,
    id: usize,
}

impl SimContext {
    fn with<T>(&self, f: impl FnOnce(&mut Net, usize) -> T) -> T {
        let mut net = lock(&self.net);
        f(&mut net, self.id)
    }
}

fn ctx(net: &mut Net, id: usize) -> &mut Ctx {
    net.contexts[id].as_mut().expect("a context lives until dropped")
}

impl Drop for SimContext {
    fn drop(&mut self) {
        lock(&self.net).contexts[self.id] = None;
    }
}

impl Context for SimContext {
    fn info(&self) -> DeviceInfo {
        self.with(|net, id| {
            let d = ctx(net, id).device;
            net.devices[d].sim.info.clone()
        })
    }

    unsafe fn register(&mut self, addr: u64, len: u64, access: Access) -> Result<Mr, FabricError> {
        self.with(|net, id| {
            let max = net.devices[net.device_of(id)].sim.info.max_mr_size;
            let c = ctx(net, id);
            rules::check_region(addr, len, max)?;
            rules::check_room("memory regions", c.mrs.len(), MRS_PER_CONTEXT_MAX)?;
            let key = c.next_key;
            c.next_key += 1;
            let mr = Mr { addr, len, lkey: key, rkey: key ^ RKEY_FLIP };
            c.mrs.insert(key, Region { mr, access, in_use: 0 });
            Ok(mr)
        })
    }

    fn deregister(&mut self, lkey: u32) -> Result<(), FabricError> {
        self.with(|net, id| {
            let c = ctx(net, id);
            match c.mrs.get(&lkey) {
                None => Err(FabricError::NoRegion(lkey)),
                Some(r) if r.in_use > 0 => Err(FabricError::RegionBusy(lkey, r.in_use)),
                Some(_) => {
                    c.mrs.remove(&lkey);
                    Ok(())
                }
            }
        })
    }

    fn create_cq(&mut self, cqe: u32) -> Result<CqId, FabricError> {
        self.with(|net, id| {
            let max = net.devices[net.device_of(id)].sim.info.max_cqe;
            let c = ctx(net, id);
            rules::check_cq(cqe, max)?;
            rules::check_room("completion queues", c.cqs.len(), CQS_PER_CONTEXT_MAX)?;
            let n = c.cqs.len() as u32;
            c.cqs.push(Cq { capacity: cqe as usize, done: VecDeque::new(), overrun: false, due: VecDeque::new() });
            Ok(CqId(n))
        })
    }

    fn create_qp(&mut self, cq: CqId, caps: QpCaps) -> Result<QpNum, FabricError> {
        self.with(|net, id| {
            let max_wr = net.devices[net.device_of(id)].sim.info.max_qp_wr;
            let c = ctx(net, id);
            if cq.0 as usize >= c.cqs.len() {
                return Err(FabricError::NoCq(cq));
            }
            rules::check_qp(&caps, max_wr, INLINE_MAX)?;
            rules::check_room("queue pairs", c.qps.len(), QPS_PER_CONTEXT_MAX)?;
            let n = c.next_qp & 0xff_ffff;
            c.next_qp += 1;
            c.qps.insert(
                n,
                Qp {
                    cq: cq.0,
                    caps,
                    state: QpState::Reset,
                    access: Access::default(),
                    peer: None,
                    peer_ctx: None,
                    queue: VecDeque::new(),
                    last_due_ns: 0,
                },
            );
            Ok(QpNum(n))
        })
    }

    fn destroy_qp(&mut self, qp: QpNum) -> Result<(), FabricError> {
        self.with(|net, id| {
            let c = ctx(net, id);
            let q = c.qps.remove(&qp.0).ok_or(FabricError::NoQp(qp))?;
            for p in &q.queue {
                release(&mut c.mrs, p);
            }
            Ok(())
        })
    }

    fn modify_qp(&mut self, qp: QpNum, to: Transition) -> Result<(), FabricError> {
        self.with(|net, id| {
            let device_up = net.devices[net.device_of(id)].up;
            let c = ctx(net, id);
            let q = c.qps.get_mut(&qp.0).ok_or(FabricError::NoQp(qp))?;
            let from = q.state;
            let next = rules::next_state(from, &to).map_err(|by| FabricError::BadTransition { qp, from, by })?;
            match to {
                Transition::Init { access } => q.access = access,
                Transition::Rtr { peer } => {
                    if !device_up {
                        return Err(FabricError::BadTransition { qp, from, by: "RTR while the port is down" });
                    }
                    q.peer = Some(peer);
                }
                Transition::Reset => {
                    q.peer = None;
                    for p in q.queue.drain(..) {
                        release(&mut c.mrs, &p);
                    }
                }
                Transition::Rts { .. } | Transition::Err => {}
            }
            c.qps.get_mut(&qp.0).expect("looked up above").state = next;
            Ok(())
        })
    }

    fn qp_state(&self, qp: QpNum) -> Result<QpState, FabricError> {
        self.with(|net, id| ctx(net, id).qps.get(&qp.0).map(|q| q.state).ok_or(FabricError::NoQp(qp)))
    }

    fn post(&mut self, qp: QpNum, chain: &[WorkRequest]) -> Result<(), FabricError> {
        self.with(|net, id| {
            let device = ctx(net, id).device;
            for (index, wr) in chain.iter().enumerate() {
                let c = ctx(net, id);
                let q = c.qps.get(&qp.0).ok_or(FabricError::NoQp(qp))?;
                if !rules::takes_posts(q.state) {
                    return Err(FabricError::NotReady { qp, state: q.state });
                }
                if q.queue.len() >= q.caps.max_send_wr as usize {
                    return Err(FabricError::QueueFull {
                        qp,
                        outstanding: q.queue.len() as u32,
                        max: q.caps.max_send_wr,
                    });
                }
                rules::check_post(wr, &q.caps).map_err(|why| FabricError::BadWorkRequest { qp, index, why })?;
                let data = if wr.inline {
                    // The bytes are taken now, as the provider copies them
                    // into the send queue; only from registered memory.
                    rules::check_inline_source(wr, |k| c.mrs.get(&k).map(|r| (&r.mr, r.access)))
                        .map_err(|why| FabricError::BadWorkRequest { qp, index, why })?;
                    let mut bytes = vec![0u8; wr.len() as usize];
                    let mut at = 0;
                    for s in &wr.sges {
                        // SAFETY: the entry lies inside a region registered
                        // here (checked above), which its registrant keeps
                        // mapped until it deregisters it; the network's lock
                        // orders this copy against that. A raw copy: peers
                        // may write the memory meanwhile.
                        unsafe {
                            std::ptr::copy(s.addr as *const u8, bytes[at..].as_mut_ptr(), s.len as usize);
                        }
                        at += s.len as usize;
                    }
                    Some(bytes.into_boxed_slice())
                } else {
                    for s in &wr.sges {
                        if let Some(r) = c.mrs.get_mut(&s.lkey) {
                            r.in_use += 1;
                        }
                    }
                    None
                };
                let due = net.due(device, wr.len());
                let seq = net.next_seq;
                net.next_seq += 1;
                let c = ctx(net, id);
                let q = c.qps.get_mut(&qp.0).expect("looked up above");
                // In order: never due before the one ahead of it.
                let due = due.max(q.last_due_ns);
                q.last_due_ns = due;
                q.queue.push_back(Posted { seq, wr: *wr, data });
                c.cqs[q.cq as usize].due.push_back((due, seq, qp.0));
            }
            Ok(())
        })
    }

    fn poll(&mut self, cq: CqId, max: usize, out: &mut Vec<Completion>) -> Result<usize, FabricError> {
        self.with(|net, id| {
            if cq.0 as usize >= ctx(net, id).cqs.len() {
                return Err(FabricError::NoCq(cq));
            }
            net.run_due(id, cq.0);
            let c = &ctx(net, id).cqs[cq.0 as usize];
            if c.done.is_empty() && net.clock == Clock::Jump {
                // Nothing due yet: time jumps to the next work request's
                // due time (past stale entries, which run_due drops first).
                for _ in 0..2 {
                    let Some(&(due, _, _)) = ctx(net, id).cqs[cq.0 as usize].due.front() else { break };
                    net.set_time(due);
                    net.run_due(id, cq.0);
                    if !ctx(net, id).cqs[cq.0 as usize].done.is_empty() {
                        break;
                    }
                }
            }
            let c = &mut ctx(net, id).cqs[cq.0 as usize];
            let n = max.min(c.done.len());
            out.extend(c.done.drain(..n));
            Ok(n)
        })
    }

    fn events(&mut self, out: &mut Vec<PortEvent>) -> usize {
        self.with(|net, id| {
            let c = ctx(net, id);
            let n = c.events.len();
            out.extend(c.events.drain(..));
            n
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fabric::Sges;
    use super::*;

    const CAPS: QpCaps = QpCaps { max_send_wr: 8, max_sge: 2, max_inline: 64 };

    /// Two contexts on devices `d0` and `d1`, each with a queue pair
    /// connected to the other's, in RTS.
    struct Pair {
        net: SimNetwork,
        a: Box<dyn Context>,
        b: Box<dyn Context>,
        cq_a: CqId,
        qp_a: QpNum,
        qp_b: QpNum,
    }

    fn pair(plan: FaultPlan, seed: u64, cqe: u32) -> Pair {
        let net = SimNetwork::new(vec![SimDevice::new("d0", 1), SimDevice::new("d1", 2)], plan, seed);
        let (mut a, mut b) = (net.open("d0").unwrap(), net.open("d1").unwrap());
        let (cq_a, cq_b) = (a.create_cq(cqe).unwrap(), b.create_cq(cqe).unwrap());
        let (qp_a, qp_b) = (a.create_qp(cq_a, CAPS).unwrap(), b.create_qp(cq_b, CAPS).unwrap());
        for (ctx, me, them, other) in [(&mut a, qp_a, qp_b, 2u8), (&mut b, qp_b, qp_a, 1)] {
            let gid = SimDevice::new("x", other).info.gids[1].gid;
            ctx.modify_qp(me, Transition::Init { access: Access::ALL }).unwrap();
            ctx.modify_qp(me, Transition::Rtr { peer: PeerAddr { gid, lid: 0, qp: them, mtu: 4096 } }).unwrap();
            ctx.modify_qp(me, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 }).unwrap();
        }
        Pair { net, a, b, cq_a, qp_a, qp_b }
    }

    fn reg(ctx: &mut Box<dyn Context>, buf: &mut [u8], access: Access) -> Mr {
        // SAFETY: the test's buffers outlive the contexts that use them.
        unsafe { ctx.register(buf.as_mut_ptr() as u64, buf.len() as u64, access) }.unwrap()
    }

    fn write(wr_id: u64, local: &Mr, at: u64, len: u32, remote: &Mr, to: u64) -> WorkRequest {
        WorkRequest {
            wr_id,
            verb: Verb::Write,
            sges: Sges::one(super::super::fabric::Sge { addr: local.addr + at, len, lkey: local.lkey }),
            remote_addr: remote.addr + to,
            rkey: remote.rkey,
            inline: false,
        }
    }

    /// Polls until `n` completions are in, with a bound on the tries.
    fn take(ctx: &mut Box<dyn Context>, cq: CqId, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            if out.len() >= n {
                break;
            }
            ctx.poll(cq, 16, &mut out).unwrap();
        }
        assert_eq!(out.len(), n, "completions: {out:?}");
        out
    }

    #[test]
    fn writes_and_reads_move_real_bytes() {
        let mut p = pair(FaultPlan::default(), 1, 64);
        let mut src: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; 65_536];
        let (ls, rd) = (reg(&mut p.a, &mut src, Access::ALL), reg(&mut p.b, &mut dst, Access::ALL));
        let mut two = write(1, &ls, 0, 1000, &rd, 0);
        assert!(two.sges.push(super::super::fabric::Sge { addr: ls.addr + 5000, len: 24, lkey: ls.lkey }));
        p.a.post(p.qp_a, &[two, write(2, &ls, 1000, 64_000, &rd, 1024)]).unwrap();
        let done = take(&mut p.a, p.cq_a, 2);
        assert_eq!(
            done.iter().map(|c| (c.wr_id, c.status, c.bytes)).collect::<Vec<_>>(),
            [(1, WcStatus::Success, 1024), (2, WcStatus::Success, 64_000)]
        );
        assert_eq!(dst[..1000], src[..1000]);
        assert_eq!(dst[1000..1024], src[5000..5024], "the second entry of the gather list follows the first");
        assert_eq!(dst[1024..65_024], src[1000..65_000]);
        let mut back = vec![0u8; 4096];
        let lb = reg(&mut p.a, &mut back, Access::ALL);
        let read = WorkRequest { verb: Verb::Read, ..write(3, &lb, 0, 4096, &rd, 1024) };
        p.a.post(p.qp_a, &[read]).unwrap();
        assert_eq!(take(&mut p.a, p.cq_a, 1)[0].status, WcStatus::Success);
        assert_eq!(back[..], src[1000..5096]);
        assert!(p.net.now_ns() > 0, "virtual time moved");
    }

    #[test]
    fn inline_data_is_taken_at_post() {
        let mut p = pair(FaultPlan::default(), 1, 64);
        let mut src = vec![7u8; 128];
        let mut dst = vec![0u8; 128];
        let (ls, rd) = (reg(&mut p.a, &mut src, Access::ALL), reg(&mut p.b, &mut dst, Access::ALL));
        let too_long = WorkRequest { inline: true, ..write(2, &ls, 0, 65, &rd, 0) };
        let e = p.a.post(p.qp_a, &[too_long]).unwrap_err();
        assert!(matches!(&e, FabricError::BadWorkRequest { index: 0, why, .. } if why.contains("inline")), "{e}");
        // Inline bytes come only from registered memory: a safe post reads
        // nothing else.
        let outside = WorkRequest { inline: true, ..write(3, &ls, 120, 16, &rd, 0) };
        let e = p.a.post(p.qp_a, &[outside]).unwrap_err();
        assert!(matches!(&e, FabricError::BadWorkRequest { why, .. } if why.contains("not inside the region")), "{e}");
        p.a.post(p.qp_a, &[WorkRequest { inline: true, ..write(1, &ls, 0, 32, &rd, 0) }]).unwrap();
        // The memory changes, and even goes from the device, before the
        // write is carried out: what was posted is what lands.
        src.fill(9);
        p.a.deregister(ls.lkey).unwrap();
        let done = take(&mut p.a, p.cq_a, 1);
        assert_eq!((done[0].wr_id, done[0].status, done[0].bytes), (1, WcStatus::Success, 32));
        assert_eq!(dst[..32], [7u8; 32]);
        assert_eq!(dst[32..], [0u8; 96]);
    }

    #[test]
    fn queue_pairs_move_through_their_states_in_order() {
        let net = SimNetwork::new(vec![SimDevice::new("d0", 1)], FaultPlan::default(), 1);
        let mut c = net.open("d0").unwrap();
        assert_eq!(net.open("mlx5_9").err(), Some(FabricError::NoDevice("mlx5_9".into())));
        let cq = c.create_cq(16).unwrap();
        let qp = c.create_qp(cq, CAPS).unwrap();
        assert_eq!(c.qp_state(qp).unwrap(), QpState::Reset);
        let mut buf = vec![0u8; 64];
        let mr = reg(&mut c, &mut buf, Access::ALL);
        let e = c.post(qp, &[write(1, &mr, 0, 8, &mr, 0)]).unwrap_err();
        assert_eq!(e, FabricError::NotReady { qp, state: QpState::Reset });
        let peer = PeerAddr { gid: Gid::default(), lid: 0, qp, mtu: 1024 };
        assert!(matches!(c.modify_qp(qp, Transition::Rtr { peer }), Err(FabricError::BadTransition { .. })));
        c.modify_qp(qp, Transition::Init { access: Access::ALL }).unwrap();
        assert!(matches!(
            c.modify_qp(qp, Transition::Rts { timeout: 1, retry_cnt: 1, rnr_retry: 1 }),
            Err(FabricError::BadTransition { .. })
        ));
        c.modify_qp(qp, Transition::Rtr { peer }).unwrap();
        assert!(matches!(
            c.post(qp, &[write(1, &mr, 0, 8, &mr, 0)]),
            Err(FabricError::NotReady { state: QpState::Rtr, .. })
        ));
        c.modify_qp(qp, Transition::Rts { timeout: 1, retry_cnt: 1, rnr_retry: 1 }).unwrap();
        c.modify_qp(qp, Transition::Reset).unwrap();
        assert_eq!(c.qp_state(qp).unwrap(), QpState::Reset);
        assert!(matches!(c.create_qp(CqId(99), CAPS), Err(FabricError::NoCq(_))));
        assert!(matches!(c.create_qp(cq, QpCaps { max_sge: 9, ..CAPS }), Err(FabricError::Limit { .. })));
        assert!(matches!(c.create_cq(0), Err(FabricError::Limit { .. })));
    }

    /// The regions of a check: local memory of `a` (read-write and
    /// read-only), remote memory of `b` (read-write and read-only).
    struct Regions {
        l: Mr,
        l_ro: Mr,
        r: Mr,
        r_ro: Mr,
    }

    /// What is checked, the work request, and how it must end.
    type Case = (&'static str, fn(&Regions) -> WorkRequest, WcStatus);

    #[test]
    fn keys_bounds_and_access_are_the_hardwares() {
        let cases: [Case; 7] = [
            (
                "a bad rkey",
                |m| WorkRequest { rkey: m.r.rkey ^ 1, ..write(1, &m.l, 0, 8, &m.r, 0) },
                WcStatus::RemAccessErr,
            ),
            ("past the remote end", |m| write(1, &m.l, 0, 16, &m.r, 4090), WcStatus::RemAccessErr),
            ("a write to read-only memory", |m| write(1, &m.l, 0, 8, &m.r_ro, 0), WcStatus::RemAccessErr),
            ("past the local end", |m| write(1, &m.l, 4090, 16, &m.r, 0), WcStatus::LocLenErr),
            (
                "a bad lkey",
                |m| WorkRequest {
                    sges: Sges::one(super::super::fabric::Sge { addr: m.l.addr, len: 8, lkey: 7 }),
                    ..write(1, &m.l, 0, 8, &m.r, 0)
                },
                WcStatus::LocProtErr,
            ),
            (
                "a read into read-only memory",
                |m| WorkRequest { verb: Verb::Read, ..write(1, &m.l_ro, 0, 8, &m.r, 0) },
                WcStatus::LocProtErr,
            ),
            (
                "a read of read-only remote memory",
                |m| WorkRequest { verb: Verb::Read, ..write(1, &m.l, 0, 8, &m.r_ro, 0) },
                WcStatus::Success,
            ),
        ];
        let read_only = Access { local_write: false, remote_read: true, remote_write: false };
        for (what, wr, want) in cases {
            let mut p = pair(FaultPlan::default(), 3, 64);
            let (mut l, mut l_ro, mut r, mut r_ro) =
                (vec![1u8; 4096], vec![1u8; 4096], vec![0u8; 4096], vec![0u8; 4096]);
            let m = Regions {
                l: reg(&mut p.a, &mut l, Access::ALL),
                l_ro: reg(&mut p.a, &mut l_ro, read_only),
                r: reg(&mut p.b, &mut r, Access::ALL),
                r_ro: reg(&mut p.b, &mut r_ro, read_only),
            };
            let next = write(2, &m.l, 0, 8, &m.r, 100);
            p.a.post(p.qp_a, &[wr(&m), next]).unwrap();
            let done = take(&mut p.a, p.cq_a, 2);
            assert_eq!(done[0].status, want, "{what}");
            if want == WcStatus::Success {
                assert_eq!(done[1].status, WcStatus::Success, "{what}");
                continue;
            }
            assert_eq!(done[1].status, WcStatus::WrFlushErr, "{what}: the next one is flushed");
            assert_eq!(p.a.qp_state(p.qp_a).unwrap(), QpState::Err, "{what}");
            assert!(r.iter().chain(&r_ro).all(|&b| b == 0), "{what}: nothing landed");
            assert!(l_ro.iter().all(|&b| b == 1), "{what}: nothing was read into read-only memory");
        }
    }

    #[test]
    fn queues_and_completion_queues_have_bounds() {
        let mut p = pair(FaultPlan::default(), 4, 4);
        p.net.set_clock(Clock::Manual);
        let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
        let (lm, rm) = (reg(&mut p.a, &mut l, Access::ALL), reg(&mut p.b, &mut r, Access::ALL));
        let chain: Vec<WorkRequest> = (0..10).map(|i| write(i, &lm, 0, 8, &rm, 0)).collect();
        let e = p.a.post(p.qp_a, &chain).unwrap_err();
        assert_eq!(e, FabricError::QueueFull { qp: p.qp_a, outstanding: 8, max: 8 });
        assert_eq!(p.a.deregister(lm.lkey), Err(FabricError::RegionBusy(lm.lkey, 8)), "work outstanding names it");
        // Eight completions into a queue of four, none polled: an overrun.
        p.net.advance(1_000_000_000);
        let mut out = Vec::new();
        p.a.poll(p.cq_a, 64, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        let mut events = Vec::new();
        p.a.events(&mut events);
        assert_eq!(events, [PortEvent::CqOverrun(p.cq_a)]);
        assert_eq!(p.a.qp_state(p.qp_a).unwrap(), QpState::Err);
        p.a.deregister(lm.lkey).unwrap();
        assert_eq!(p.a.deregister(lm.lkey), Err(FabricError::NoRegion(lm.lkey)));
    }

    #[test]
    fn a_device_down_mid_run_fails_its_work_and_flushes_the_rest() {
        let plan = FaultPlan { faults: vec![Fault::Down { device: "d1".into(), at_ns: 10_000 }] };
        let mut p = pair(plan, 5, 256);
        p.net.set_clock(Clock::Manual);
        let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
        let (lm, rm) = (reg(&mut p.a, &mut l, Access::ALL), reg(&mut p.b, &mut r, Access::ALL));
        p.a.post(p.qp_a, &[write(1, &lm, 0, 8, &rm, 0)]).unwrap();
        p.net.advance(5_000);
        assert_eq!(take(&mut p.a, p.cq_a, 1)[0].status, WcStatus::Success);
        p.a.post(p.qp_a, &[write(2, &lm, 0, 8, &rm, 8), write(3, &lm, 0, 8, &rm, 16)]).unwrap();
        p.net.advance(20_000);
        let done = take(&mut p.a, p.cq_a, 2);
        assert_eq!((done[0].status, done[1].status), (WcStatus::RetryExcErr, WcStatus::WrFlushErr));
        let mut events = Vec::new();
        p.b.events(&mut events);
        assert_eq!(events, [PortEvent::PortDown, PortEvent::QpFatal(p.qp_b)]);
        assert_eq!(p.b.info().state, PortState::Down);
        assert_eq!(r[8..24], [0; 16], "nothing landed after the device went down");
    }

    #[test]
    fn the_plan_fails_chosen_work_requests() {
        let plan =
            FaultPlan { faults: vec![Fault::FailNth { device: "d0".into(), nth: 2, status: WcStatus::GeneralErr }] };
        let mut p = pair(plan, 6, 64);
        let (mut l, mut r) = (vec![1u8; 4096], vec![0u8; 4096]);
        let (lm, rm) = (reg(&mut p.a, &mut l, Access::ALL), reg(&mut p.b, &mut r, Access::ALL));
        let chain: Vec<WorkRequest> = (0..5).map(|i| write(i, &lm, 0, 8, &rm, i * 8)).collect();
        p.a.post(p.qp_a, &chain).unwrap();
        let s: Vec<WcStatus> = take(&mut p.a, p.cq_a, 5).iter().map(|c| c.status).collect();
        use WcStatus::*;
        assert_eq!(s, [Success, Success, GeneralErr, WrFlushErr, WrFlushErr]);
    }

    /// A random run: the completions and their virtual times.
    fn run(seed: u64) -> Vec<(u64, u64, WcStatus)> {
        let plan = FaultPlan {
            faults: vec![Fault::FailEvery { device: "d0".into(), every: 7, status: WcStatus::RemAccessErr }],
        };
        let mut p = pair(plan, seed, 1024);
        let (mut l, mut r) = (vec![1u8; 1 << 16], vec![0u8; 1 << 16]);
        let (lm, rm) = (reg(&mut p.a, &mut l, Access::ALL), reg(&mut p.b, &mut r, Access::ALL));
        let mut out = Vec::new();
        for round in 0..20u64 {
            if p.a.qp_state(p.qp_a).unwrap() == QpState::Err {
                p.a.modify_qp(p.qp_a, Transition::Reset).unwrap();
                p.a.modify_qp(p.qp_a, Transition::Init { access: Access::ALL }).unwrap();
                let gid = SimDevice::new("x", 2).info.gids[1].gid;
                p.a.modify_qp(p.qp_a, Transition::Rtr { peer: PeerAddr { gid, lid: 0, qp: p.qp_b, mtu: 4096 } })
                    .unwrap();
                p.a.modify_qp(p.qp_a, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 }).unwrap();
            }
            let chain: Vec<WorkRequest> =
                (0..4).map(|i| write(round * 4 + i, &lm, 0, 4096 * (i as u32 + 1), &rm, 0)).collect();
            p.a.post(p.qp_a, &chain).unwrap();
            for c in take(&mut p.a, p.cq_a, 4) {
                out.push((c.wr_id, p.net.now_ns(), c.status));
            }
        }
        out
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let one = run(42);
        assert_eq!(one, run(42));
        assert!(one.iter().any(|c| c.2 == WcStatus::RemAccessErr) && one.iter().any(|c| c.2 == WcStatus::Success));
    }

    #[test]
    fn a_slow_device_completes_later() {
        let time = |plan: FaultPlan| {
            let mut p = pair(plan, 7, 64);
            let (mut l, mut r) = (vec![1u8; 1 << 16], vec![0u8; 1 << 16]);
            let (lm, rm) = (reg(&mut p.a, &mut l, Access::ALL), reg(&mut p.b, &mut r, Access::ALL));
            p.a.post(p.qp_a, &[write(1, &lm, 0, 1 << 16, &rm, 0)]).unwrap();
            take(&mut p.a, p.cq_a, 1);
            p.net.now_ns()
        };
        let fast = time(FaultPlan::default());
        let slow = time(FaultPlan { faults: vec![Fault::Slow { device: "d0".into(), factor: 10 }] });
        assert_eq!(slow, fast * 10);
    }
}
