//! The `verbs` fabric: real RDMA devices, through `sideway` (which loads
//! `libibverbs` when the process starts using it, so a machine without
//! rdma-core runs the rest of shardwire unchanged).
//!
//! The slow, stateful calls (opening devices, protection domains, memory
//! regions, queues, queue pair transitions) go through sideway's safe
//! wrappers. The two hot calls, posting a chain and polling completions,
//! call the provider directly (`ibv_post_send`, `ibv_poll_cq` are inline
//! jumps through the context's table): no allocation per call, and the
//! completion's queue pair number, which sideway's poller does not show.
//!
//! What hardware does not keep for us, this keeps: which work requests are
//! outstanding on each queue pair (so `MC_MAX_WR` is a bound we check
//! before the device does, and a region is not given back under work that
//! names it), and each request's length (a requester's completion does not
//! carry its byte count for RDMA WRITE or READ).

use std::collections::HashMap;
use std::ptr::{NonNull, null_mut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdma_mummy_sys as sys;
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid as SwGid};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionQueue as _, GenericCompletionQueue};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu, PortState as SwPortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{BasicQueuePair, QueuePair as _, QueuePairAttribute, QueuePairState};

use super::fabric::{
    Access, Completion, Context, CqId, DeviceInfo, Fabric, FabricError, GidEntry, GidKind, Mr, PortEvent, PortState,
    QpCaps, QpNum, QpState, SGES_MAX, Transition, Verb, WcStatus, WorkRequest, choose_gid,
};
use crate::proto::mooncake::rdma::Gid;

/// GID table entries read per port at most (real tables hold up to 256;
/// the entries past the first empty run are never the chosen one).
const GIDS_MAX: u32 = 256;
/// Asynchronous events taken per [`Context::events`] call at most.
const EVENTS_PER_CALL_MAX: usize = 64;
/// How often the asynchronous event queue is read: it costs a system call
/// each time, and the shard asks on every turn of its loop.
const EVENTS_EVERY: Duration = Duration::from_millis(1);
/// Completions taken by one `ibv_poll_cq` call at most.
const POLL_MAX: usize = 256;
/// The GRH hop limit, as Mooncake sets it.
const HOP_LIMIT: u8 = 16;
/// RDMA READs a queue pair has in flight, as initiator and as target.
const READS_IN_FLIGHT: u8 = 16;
/// The RNR timer's code for 0.64 ms, Mooncake's choice.
const MIN_RNR_TIMER: u8 = 12;
/// Packet sequence numbers start here on both sides: the Connection
/// exchange carries no PSN, so both ends must agree without it.
const START_PSN: u32 = 0;

/// Link parameters of the `MC_IB_*` variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// The port used on every device (`MC_IB_PORT`).
    pub port: u8,
    /// `MC_GID_INDEX`, or `None` to choose (RoCE v2 on IPv4 first).
    pub gid_index: Option<usize>,
    /// Service level (`MC_IB_SL`).
    pub service_level: u8,
    /// Traffic class (`MC_IB_TC`).
    pub traffic_class: u8,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig { port: 1, gid_index: None, service_level: 0, traffic_class: 0 }
    }
}

/// The machine's RDMA devices.
pub struct VerbsFabric {
    link: LinkConfig,
}

impl VerbsFabric {
    pub fn new(link: LinkConfig) -> VerbsFabric {
        assert!(link.port >= 1, "ports count from 1");
        VerbsFabric { link }
    }
}

impl Fabric for VerbsFabric {
    fn kind(&self) -> &'static str {
        "verbs"
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        // No libibverbs, or no devices: an empty list, and the caller
        // says so (the engine falls back to TCP with that reason).
        let Ok(list) = DeviceList::new() else { return Vec::new() };
        let mut out = Vec::with_capacity(list.len());
        for dev in list.iter() {
            let name = dev.name();
            match dev.open() {
                Ok(ctx) => match describe(&ctx, &name, self.link.port) {
                    Ok(info) => out.push(info),
                    Err(e) => log::warn!("RDMA device {name}: {e}; not used"),
                },
                Err(e) => log::warn!("RDMA device {name}: cannot open it: {e}; not used"),
            }
        }
        out
    }

    fn open(&self, name: &str) -> Result<Box<dyn Context>, FabricError> {
        let list = DeviceList::new().map_err(|e| FabricError::NoDevice(format!("{name} ({e})")))?;
        let dev = list.iter().find(|d| d.name() == name).ok_or_else(|| FabricError::NoDevice(name.to_string()))?;
        let ctx = dev.open().map_err(|e| call("ibv_open_device", name, e))?;
        let info = describe(&ctx, name, self.link.port)?;
        let gid_index = choose_gid(&info.gids, self.link.gid_index).map_err(|e| FabricError::NoGid(name.into(), e))?;
        let pd = ctx.alloc_pd().map_err(|e| call("ibv_alloc_pd", name, e))?;
        // SAFETY: the context is open and stays so while `ctx` lives; its
        // asynchronous event descriptor belongs to it, and making it
        // non-blocking only changes how reads of it wait.
        let async_fd = unsafe { ctx.context().as_ref().async_fd };
        // SAFETY: fcntl on a descriptor the context owns, no memory passed.
        let nonblocking = unsafe {
            let flags = libc::fcntl(async_fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(async_fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(call("fcntl(async_fd, O_NONBLOCK)", name, std::io::Error::last_os_error()));
        }
        Ok(Box::new(VerbsContext {
            link: self.link,
            gid_index: gid_index as u8,
            info,
            ctx,
            pd,
            regions: HashMap::new(),
            cqs: Vec::new(),
            qps: HashMap::new(),
            work: HashMap::new(),
            wcs: Vec::with_capacity(POLL_MAX),
            events_at: None,
            dead: false,
        }))
    }
}

/// A verbs call that failed, named.
fn call(what: &'static str, device: &str, e: impl std::fmt::Display) -> FabricError {
    FabricError::Call { call: what, why: format!("{device}: {e}") }
}

fn mtu_bytes(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

fn mtu_of(bytes: u32) -> Mtu {
    match bytes {
        ..=256 => Mtu::Mtu256,
        257..=512 => Mtu::Mtu512,
        513..=1024 => Mtu::Mtu1024,
        1025..=2048 => Mtu::Mtu2048,
        _ => Mtu::Mtu4096,
    }
}

/// What an open device offers on `port`.
fn describe(ctx: &Arc<DeviceContext>, name: &str, port: u8) -> Result<DeviceInfo, FabricError> {
    let dev = ctx.query_device().map_err(|e| call("ibv_query_device", name, e))?;
    if port == 0 || port > dev.phys_port_cnt() {
        return Err(FabricError::Limit {
            what: format!("{name}: port {port} (MC_IB_PORT)"),
            max: dev.phys_port_cnt().into(),
        });
    }
    let attr = ctx.query_port(port).map_err(|e| call("ibv_query_port", name, e))?;
    let ethernet = attr.link_layer() == LinkLayer::Ethernet;
    let table = u32::try_from(attr.gid_tbl_len()).unwrap_or(0).min(GIDS_MAX);
    let mut gids = Vec::with_capacity(table as usize);
    for i in 0..table {
        // An entry that cannot be read is empty: choose_gid skips it.
        let raw = ctx.query_gid(port, i).map(|g| g.raw).unwrap_or([0; 16]);
        let kind = match ctx.query_gid_type(port, i) {
            Ok(1) => GidKind::RoceV2,
            _ if ethernet => GidKind::RoceV1,
            _ => GidKind::Ib,
        };
        gids.push(GidEntry { gid: Gid(raw), kind });
    }
    let numa_node = std::fs::read_to_string(format!("/sys/class/infiniband/{name}/device/numa_node"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok());
    Ok(DeviceInfo {
        name: name.to_string(),
        port,
        state: if attr.port_state() == SwPortState::Active { PortState::Active } else { PortState::Down },
        lid: attr.lid(),
        gids,
        active_mtu: mtu_bytes(attr.active_mtu()),
        max_mr_size: dev.max_mr_size(),
        max_qp_wr: u32::try_from(dev.max_qp_wr()).unwrap_or(0),
        max_cqe: u32::try_from(dev.max_cqe()).unwrap_or(0),
        numa_node,
    })
}

struct Region {
    mr: Arc<MemoryRegion>,
    /// What was registered, and with which access (inline writes are
    /// checked against it: the provider itself copies from any address).
    range: Mr,
    access: Access,
    /// Outstanding work requests naming it.
    uses: usize,
}

struct Qp {
    qp: BasicQueuePair,
    cq: CqId,
    caps: QpCaps,
    /// The state as the last transition left it; the device may have
    /// moved it to error since (completions and events say so).
    state: QpState,
    outstanding: u32,
}

/// One outstanding work request.
struct Posted {
    qp: u32,
    len: u64,
    lkeys: [u32; SGES_MAX],
    sges: u8,
}

/// One device, opened for one shard.
pub struct VerbsContext {
    link: LinkConfig,
    gid_index: u8,
    info: DeviceInfo,
    ctx: Arc<DeviceContext>,
    pd: Arc<ProtectionDomain>,
    regions: HashMap<u32, Region>,
    cqs: Vec<Arc<BasicCompletionQueue>>,
    qps: HashMap<u32, Qp>,
    work: HashMap<u64, Posted>,
    wcs: Vec<sys::ibv_wc>,
    events_at: Option<Instant>,
    /// The device is gone (`IBV_EVENT_DEVICE_FATAL`, e.g. `rdma link
    /// delete`): it will complete nothing more, so its outstanding work is
    /// completed here, as flushed, and nothing more is posted.
    dead: bool,
}

impl VerbsContext {
    /// Forgets the outstanding work of `qp` (after RESET or destroy: the
    /// device drops it without completions).
    fn forget_work(&mut self, qp: u32) {
        let regions = &mut self.regions;
        self.work.retain(|_, p| {
            if p.qp != qp {
                return true;
            }
            for lkey in &p.lkeys[..usize::from(p.sges)] {
                if let Some(r) = regions.get_mut(lkey) {
                    r.uses -= 1;
                }
            }
            false
        });
        if let Some(q) = self.qps.get_mut(&qp) {
            q.outstanding = 0;
        }
    }

    /// Completes up to `max` outstanding work requests of queue pairs on
    /// `cq` as flushed (the device is gone and will not).
    fn flush_dead(&mut self, cq: CqId, max: usize, out: &mut Vec<Completion>) -> usize {
        let on_cq: Vec<u64> = {
            let qps = &self.qps;
            let mut ids: Vec<u64> = self
                .work
                .iter()
                .filter(|(_, p)| qps.get(&p.qp).is_some_and(|q| q.cq == cq))
                .map(|(&id, _)| id)
                .collect();
            ids.sort_unstable(); // posting order, as a flush would report them
            ids.truncate(max);
            ids
        };
        for &id in &on_cq {
            let p = self.settle_work(id).expect("listed above");
            if let Some(q) = self.qps.get_mut(&p.qp) {
                q.state = QpState::Err;
            }
            out.push(Completion { wr_id: id, qp: QpNum(p.qp), status: WcStatus::WrFlushErr, bytes: 0 });
        }
        on_cq.len()
    }

    fn settle_work(&mut self, wr_id: u64) -> Option<Posted> {
        let p = self.work.remove(&wr_id)?;
        for lkey in &p.lkeys[..usize::from(p.sges)] {
            if let Some(r) = self.regions.get_mut(lkey) {
                assert!(r.uses > 0, "region {lkey:#x}: a use settled twice");
                r.uses -= 1;
            }
        }
        if let Some(q) = self.qps.get_mut(&p.qp) {
            q.outstanding = q.outstanding.saturating_sub(1);
        }
        Some(p)
    }
}

fn wc_status(s: u32) -> WcStatus {
    use sys::ibv_wc_status as st;
    match s {
        st::IBV_WC_SUCCESS => WcStatus::Success,
        st::IBV_WC_LOC_LEN_ERR => WcStatus::LocLenErr,
        // soft-RoCE reports a bad local key as a local queue pair
        // operation error: the same fault, seen from the same side.
        st::IBV_WC_LOC_PROT_ERR | st::IBV_WC_LOC_ACCESS_ERR | st::IBV_WC_LOC_QP_OP_ERR => WcStatus::LocProtErr,
        // An invalid request (a length past the region, say) is refused
        // by the peer's memory checks, as a bad key is.
        st::IBV_WC_REM_ACCESS_ERR | st::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemAccessErr,
        st::IBV_WC_RETRY_EXC_ERR | st::IBV_WC_RNR_RETRY_EXC_ERR | st::IBV_WC_RESP_TIMEOUT_ERR => WcStatus::RetryExcErr,
        st::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushErr,
        _ => WcStatus::GeneralErr,
    }
}

impl Context for VerbsContext {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    unsafe fn register(&mut self, addr: u64, len: u64, access: Access) -> Result<Mr, FabricError> {
        if len > self.info.max_mr_size {
            return Err(FabricError::Limit { what: format!("a region of {len} bytes"), max: self.info.max_mr_size });
        }
        let mut flags = AccessFlags::none();
        if access.local_write {
            flags |= AccessFlags::LocalWrite;
        }
        if access.remote_read {
            flags |= AccessFlags::RemoteRead;
        }
        if access.remote_write {
            flags |= AccessFlags::RemoteWrite;
        }
        // SAFETY: the caller keeps the memory mapped until deregister
        // returns for it (this function's contract).
        let mr = unsafe { self.pd.reg_mr(addr as usize, len as usize, flags) }.map_err(|e| FabricError::Register {
            addr,
            len,
            why: e.to_string(),
        })?;
        let out = Mr { addr, len, lkey: mr.lkey(), rkey: mr.rkey() };
        assert!(
            self.regions.insert(out.lkey, Region { mr, range: out, access, uses: 0 }).is_none(),
            "the device reused a live lkey"
        );
        Ok(out)
    }

    fn deregister(&mut self, lkey: u32) -> Result<(), FabricError> {
        let r = self.regions.get(&lkey).ok_or(FabricError::NoRegion(lkey))?;
        if r.uses > 0 {
            return Err(FabricError::RegionBusy(lkey, r.uses));
        }
        let r = self.regions.remove(&lkey).expect("looked up above");
        drop(r.mr); // ibv_dereg_mr
        Ok(())
    }

    fn create_cq(&mut self, cqe: u32) -> Result<CqId, FabricError> {
        if cqe > self.info.max_cqe {
            return Err(FabricError::Limit {
                what: format!("a completion queue of {cqe} entries"),
                max: self.info.max_cqe.into(),
            });
        }
        let cq = self
            .ctx
            .create_cq_builder()
            .setup_cqe(cqe)
            .build()
            .map_err(|e| call("ibv_create_cq", &self.info.name, e))?;
        self.cqs.push(cq);
        Ok(CqId(self.cqs.len() as u32 - 1))
    }

    fn create_qp(&mut self, cq: CqId, caps: QpCaps) -> Result<QpNum, FabricError> {
        let c = self.cqs.get(cq.0 as usize).ok_or(FabricError::NoCq(cq))?.clone();
        if caps.max_send_wr > self.info.max_qp_wr {
            return Err(FabricError::Limit {
                what: format!("{} work requests (MC_MAX_WR)", caps.max_send_wr),
                max: self.info.max_qp_wr.into(),
            });
        }
        if caps.max_sge as usize > SGES_MAX {
            return Err(FabricError::Limit {
                what: format!("{} scatter-gather entries", caps.max_sge),
                max: SGES_MAX as u64,
            });
        }
        let qp = self
            .pd
            .create_qp_builder()
            .setup_max_send_wr(caps.max_send_wr)
            // No receives are posted yet (WRITE with immediate will).
            .setup_max_recv_wr(1)
            .setup_max_send_sge(caps.max_sge.max(1))
            .setup_max_recv_sge(1)
            .setup_max_inline_data(caps.max_inline)
            .setup_send_cq(GenericCompletionQueue::from(c.clone()))
            .setup_recv_cq(GenericCompletionQueue::from(c))
            .build()
            .map_err(|e| call("ibv_create_qp", &self.info.name, e))?;
        let n = qp.qp_number();
        self.qps.insert(n, Qp { qp, cq, caps, state: QpState::Reset, outstanding: 0 });
        Ok(QpNum(n))
    }

    fn destroy_qp(&mut self, qp: QpNum) -> Result<(), FabricError> {
        if !self.qps.contains_key(&qp.0) {
            return Err(FabricError::NoQp(qp));
        }
        self.forget_work(qp.0);
        self.qps.remove(&qp.0); // ibv_destroy_qp
        Ok(())
    }

    fn modify_qp(&mut self, qp: QpNum, to: Transition) -> Result<(), FabricError> {
        let link = self.link;
        let gid_index = self.gid_index;
        let q = self.qps.get_mut(&qp.0).ok_or(FabricError::NoQp(qp))?;
        let bad = |by: &'static str| FabricError::BadTransition { qp, from: q.state, by };
        let mut attr = QueuePairAttribute::new();
        let next =
            match (q.state, to) {
                (QpState::Reset, Transition::Init { access }) => {
                    let mut flags = AccessFlags::LocalWrite;
                    if access.remote_read {
                        flags |= AccessFlags::RemoteRead;
                    }
                    if access.remote_write {
                        flags |= AccessFlags::RemoteWrite;
                    }
                    attr.setup_state(QueuePairState::Init)
                        .setup_pkey_index(0)
                        .setup_port(link.port)
                        .setup_access_flags(flags);
                    QpState::Init
                }
                (QpState::Init, Transition::Rtr { peer }) => {
                    let mut ah = AddressHandleAttribute::new();
                    ah.setup_dest_lid(peer.lid)
                        .setup_port(link.port)
                        .setup_service_level(link.service_level)
                        .setup_grh(&SwGid { raw: peer.gid.0 }, 0, gid_index, HOP_LIMIT, link.traffic_class);
                    attr.setup_state(QueuePairState::ReadyToReceive)
                        .setup_path_mtu(mtu_of(peer.mtu))
                        .setup_dest_qp_num(peer.qp.0)
                        .setup_rq_psn(START_PSN)
                        .setup_max_dest_read_atomic(READS_IN_FLIGHT)
                        .setup_min_rnr_timer(MIN_RNR_TIMER)
                        .setup_address_vector(&ah);
                    QpState::Rtr
                }
                (QpState::Rtr, Transition::Rts { timeout, retry_cnt, rnr_retry }) => {
                    attr.setup_state(QueuePairState::ReadyToSend)
                        .setup_sq_psn(START_PSN)
                        .setup_timeout(timeout)
                        .setup_retry_cnt(retry_cnt.min(7))
                        .setup_rnr_retry(rnr_retry.min(7))
                        .setup_max_read_atomic(READS_IN_FLIGHT);
                    QpState::Rts
                }
                (_, Transition::Err) => {
                    attr.setup_state(QueuePairState::Error);
                    QpState::Err
                }
                (_, Transition::Reset) => {
                    attr.setup_state(QueuePairState::Reset);
                    QpState::Reset
                }
                (_, Transition::Init { .. }) => return Err(bad("INIT")),
                (_, Transition::Rtr { .. }) => return Err(bad("RTR")),
                (_, Transition::Rts { .. }) => return Err(bad("RTS")),
            };
        q.qp.modify(&attr)
            .map_err(|e| FabricError::Call { call: "ibv_modify_qp", why: format!("{qp:?} to {next:?}: {e}") })?;
        q.state = next;
        if next == QpState::Reset {
            self.forget_work(qp.0);
        }
        Ok(())
    }

    fn qp_state(&self, qp: QpNum) -> Result<QpState, FabricError> {
        self.qps.get(&qp.0).map(|q| q.state).ok_or(FabricError::NoQp(qp))
    }

    fn post(&mut self, qp: QpNum, chain: &[WorkRequest]) -> Result<(), FabricError> {
        if self.dead {
            return Err(FabricError::PortDown(self.info.name.clone()));
        }
        let q = self.qps.get_mut(&qp.0).ok_or(FabricError::NoQp(qp))?;
        if q.state != QpState::Rts {
            return Err(FabricError::NotReady { qp, state: q.state });
        }
        let room = q.caps.max_send_wr - q.outstanding;
        if chain.len() > room as usize {
            return Err(FabricError::QueueFull { qp, outstanding: q.outstanding, max: q.caps.max_send_wr });
        }
        if chain.is_empty() {
            return Ok(());
        }
        for (index, wr) in chain.iter().enumerate() {
            if wr.sges.is_empty() || wr.sges.len() > q.caps.max_sge.max(1) as usize {
                let why = format!("{} scatter-gather entries, of 1 to {}", wr.sges.len(), q.caps.max_sge.max(1));
                return Err(FabricError::BadWorkRequest { qp, index, why });
            }
            if wr.inline
                && (wr.len() > u64::from(q.caps.max_inline) || !matches!(wr.verb, Verb::Write | Verb::WriteImm(_)))
            {
                let why = format!(
                    "inline {:?} of {} bytes (inline: writes of at most {})",
                    wr.verb,
                    wr.len(),
                    q.caps.max_inline
                );
                return Err(FabricError::BadWorkRequest { qp, index, why });
            }
            if wr.inline {
                let regions = &self.regions;
                super::rules::check_inline_source(wr, |k| regions.get(&k).map(|r| (&r.range, r.access)))
                    .map_err(|why| FabricError::BadWorkRequest { qp, index, why })?;
            }
            if self.work.contains_key(&wr.wr_id) {
                return Err(FabricError::BadWorkRequest {
                    qp,
                    index,
                    why: format!("wr_id {} is outstanding", wr.wr_id),
                });
            }
        }
        // The chain as the provider takes it: entries first (their
        // addresses must not move), then requests linked in order.
        let mut sges: Vec<sys::ibv_sge> = Vec::with_capacity(chain.len() * SGES_MAX);
        for wr in chain {
            sges.extend(wr.sges.iter().map(|s| sys::ibv_sge { addr: s.addr, length: s.len, lkey: s.lkey }));
        }
        // SAFETY: ibv_send_wr is a plain C struct; all-zero is its "no
        // options" value (no flags, no inline data, no next).
        let mut wrs: Vec<sys::ibv_send_wr> = (0..chain.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut at = 0usize;
        for (i, wr) in chain.iter().enumerate() {
            let w = &mut wrs[i];
            w.wr_id = wr.wr_id;
            w.num_sge = wr.sges.len() as i32;
            w.sg_list = sges[at..].as_mut_ptr();
            at += wr.sges.len();
            w.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
            if wr.inline {
                w.send_flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
            }
            w.opcode = match wr.verb {
                Verb::Write => sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                Verb::Read => sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
                Verb::WriteImm(imm) => {
                    w.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                    sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
                }
            };
            w.wr.rdma = sys::rdma_t { remote_addr: wr.remote_addr, rkey: wr.rkey };
        }
        for i in 0..wrs.len() - 1 {
            let next: *mut sys::ibv_send_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let mut bad: *mut sys::ibv_send_wr = null_mut();
        // SAFETY: the queue pair is alive (held in `q`); the chain and its
        // entries live until the call returns, and the provider copies
        // what it needs (it does not keep pointers into them). The memory
        // the entries name is registered; the device checks the keys.
        let rc = unsafe { sys::ibv_post_send(q.qp.qp().as_ptr(), wrs.as_mut_ptr(), &mut bad) };
        let posted = if rc == 0 {
            chain.len()
        } else if bad.is_null() {
            0
        } else {
            // SAFETY: `bad` points into `wrs` (the provider names the first
            // request it did not take).
            (unsafe { bad.offset_from(wrs.as_ptr()) }).clamp(0, chain.len() as isize) as usize
        };
        q.outstanding += posted as u32;
        for wr in &chain[..posted] {
            let mut lkeys = [0u32; SGES_MAX];
            // Inline data was copied at post: the memory is not used after.
            let named = if wr.inline { 0 } else { wr.sges.len() };
            for (k, s) in lkeys.iter_mut().zip(&wr.sges[..named]) {
                *k = s.lkey;
                if let Some(r) = self.regions.get_mut(&s.lkey) {
                    r.uses += 1;
                }
            }
            self.work.insert(wr.wr_id, Posted { qp: qp.0, len: wr.len(), lkeys, sges: named as u8 });
        }
        if rc == 0 {
            Ok(())
        } else {
            let why = format!("ibv_post_send: {}", std::io::Error::from_raw_os_error(rc));
            Err(FabricError::BadWorkRequest { qp, index: posted, why })
        }
    }

    fn poll(&mut self, cq: CqId, max: usize, out: &mut Vec<Completion>) -> Result<usize, FabricError> {
        if self.dead {
            return Ok(self.flush_dead(cq, max, out));
        }
        let c = self.cqs.get(cq.0 as usize).ok_or(FabricError::NoCq(cq))?;
        let cq_ptr: NonNull<sys::ibv_cq> = {
            // SAFETY: the queue is alive while `self.cqs` holds it.
            unsafe { c.cq() }
        };
        let want = max.min(POLL_MAX);
        self.wcs.clear();
        // SAFETY: `wcs` has room for `want` entries; the provider writes
        // that many at most and returns how many it wrote.
        let n = unsafe { sys::ibv_poll_cq(cq_ptr.as_ptr(), want as i32, self.wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(call("ibv_poll_cq", &self.info.name, std::io::Error::from_raw_os_error(-n)));
        }
        // SAFETY: the provider initialised the first `n` entries.
        unsafe { self.wcs.set_len(n as usize) };
        let wcs = std::mem::take(&mut self.wcs);
        for wc in &wcs {
            let status = wc_status(wc.status);
            if status == WcStatus::GeneralErr {
                log::warn!("{}: completion status {} (vendor error {:#x})", self.info.name, wc.status, wc.vendor_err);
            }
            // Work forgotten by a RESET may still complete: it is dropped.
            let Some(p) = self.settle_work(wc.wr_id) else { continue };
            debug_assert_eq!(p.qp, wc.qp_num);
            if status != WcStatus::Success
                && let Some(q) = self.qps.get_mut(&p.qp)
            {
                q.state = QpState::Err; // a failed completion moves the queue pair to error
            }
            let bytes = if status == WcStatus::Success { p.len } else { 0 };
            out.push(Completion { wr_id: wc.wr_id, qp: QpNum(p.qp), status, bytes });
        }
        self.wcs = wcs;
        Ok(n as usize)
    }

    fn events(&mut self, out: &mut Vec<PortEvent>) -> usize {
        let now = Instant::now();
        if self.events_at.is_some_and(|t| now.duration_since(t) < EVENTS_EVERY) {
            return 0;
        }
        self.events_at = Some(now);
        let mut n = 0;
        while n < EVENTS_PER_CALL_MAX {
            // SAFETY: ibv_async_event is plain data the call fills in.
            let mut ev: sys::ibv_async_event = unsafe { std::mem::zeroed() };
            // SAFETY: the context is open; its descriptor is non-blocking,
            // so the call returns -1 at once when nothing is queued.
            let rc = unsafe { sys::ibv_get_async_event(self.ctx.context().as_ptr(), &mut ev) };
            if rc != 0 {
                break;
            }
            use sys::ibv_event_type as et;
            if ev.event_type == et::IBV_EVENT_DEVICE_FATAL {
                log::warn!("RDMA device {} is gone: its outstanding work completes as flushed", self.info.name);
                self.dead = true;
            }
            let event = match ev.event_type {
                et::IBV_EVENT_PORT_ERR | et::IBV_EVENT_DEVICE_FATAL => Some(PortEvent::PortDown),
                et::IBV_EVENT_PORT_ACTIVE => Some(PortEvent::PortActive),
                et::IBV_EVENT_QP_FATAL | et::IBV_EVENT_QP_REQ_ERR | et::IBV_EVENT_QP_ACCESS_ERR => {
                    // SAFETY: for queue pair events, the element is the
                    // queue pair, alive until the event is acknowledged.
                    let num = unsafe { (*ev.element.qp).qp_num };
                    Some(PortEvent::QpFatal(QpNum(num)))
                }
                et::IBV_EVENT_CQ_ERR => {
                    // SAFETY: for a queue event, the element is the queue.
                    let ptr = unsafe { ev.element.cq };
                    // SAFETY: each queue is alive while `self.cqs` holds it.
                    let at = self.cqs.iter().position(|c| unsafe { c.cq() }.as_ptr() == ptr);
                    at.map(|i| PortEvent::CqOverrun(CqId(i as u32)))
                }
                _ => None,
            };
            // SAFETY: every event taken is acknowledged once.
            unsafe { sys::ibv_ack_async_event(&mut ev) };
            match event {
                Some(PortEvent::PortDown) => self.info.state = PortState::Down,
                Some(PortEvent::PortActive) => self.info.state = PortState::Active,
                Some(PortEvent::QpFatal(q)) => {
                    if let Some(q) = self.qps.get_mut(&q.0) {
                        q.state = QpState::Err;
                    }
                }
                _ => {}
            }
            if let Some(e) = event {
                out.push(e);
                n += 1;
            }
        }
        n
    }
}
