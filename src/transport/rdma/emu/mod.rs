//! The emulated fabric: RDMA across processes, over sockets, for tests of
//! several processes and for the benchmark where no RDMA device exists.
//!
//! Each device of a process is a "soft NIC" ([`nic`]): it listens on a TCP
//! port of its own and serves one-sided READ and WRITE on the memory
//! regions registered with it, from its own threads, without the
//! application. Its GID table holds the listener's address (IPv4-mapped,
//! RoCE v2, at index 1, the one [`choose_gid`](super::fabric::choose_gid)
//! picks) and its LID is the listener's port, so the `PeerAddr` a
//! Connection handshake gives a queue pair says where to connect.
//!
//! The hardware's rules are [`super::rules`]'s, as for `sim`: queue pair
//! states, post checks (inline data is taken at post), local keys, bounds
//! and access at the requester (`LOC_PROT_ERR`, `LOC_LEN_ERR`), remote
//! ones at the responder (`REM_ACCESS_ERR`); a peer that cannot be
//! reached, has died, whose port is down or that does not answer within
//! the queue pair's retry time gives `RETRY_EXC_ERR`; a queue pair in ERR
//! flushes (`WR_FLUSH_ERR`). Completions of a queue pair come in posting
//! order ([`queues`]); a completion queue that overflows is overrun. A
//! WRITE with immediate lands as a WRITE (there are no receive queues).
//!
//! `post` and `poll` never wait on the network: `post` hands work to the
//! device's threads, which complete it into the completion queue that
//! `poll` reads. One fabric serves every engine of a process
//! ([`shared`], `SHARDWIRE_FABRIC=emu`); tests make independent ones
//! ([`EmuFabric::new`]), each a "process" with listeners of its own.
//! Faults (`SHARDWIRE_EMU_FAULTS`): a port down or up at a time after the
//! fabric is made, every nth work request of a device failed.
//!
//! Nothing lingers: connections and links that stay quiet close
//! ([`nic::IdleLimits`]), every thread looks at its device at least every
//! [`nic::TICK`], and dropping the fabric ends them all.

pub mod frames;
pub mod link;
pub mod nic;
pub mod queues;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::fabric::{
    Access, Completion, Context, CqId, DeviceInfo, Fabric, FabricError, Mr, PortEvent, QpCaps, QpNum, QpState,
    Transition, WcStatus, WorkRequest,
};
use super::rules;
use crate::config::{EmuFault, FabricChoice, Settings};
use link::Op;
use nic::{Device, IdleLimits};
use queues::{Cq, Posted, Qp, Queues, Region, RegionGuard};

/// Devices one fabric has at most.
pub const DEVICES_MAX: usize = 16;
/// Queue pairs one context may have.
pub const QPS_PER_CONTEXT_MAX: usize = 4096;
/// Memory regions one context may have.
pub const MRS_PER_CONTEXT_MAX: usize = 65_536;
/// Completion queues one context may have.
pub const CQS_PER_CONTEXT_MAX: usize = 64;
/// Bytes a work request may carry inline (what `MC_MAX_INLINE` allows).
pub const INLINE_BYTES_MAX: u32 = 1024;
/// The shortest a part may go unanswered before its queue pair gives up,
/// whatever RTS said: the requester and responder are threads on a host
/// that may be busy, not a NIC.
pub const RETRY_FLOOR_NS: u64 = 100_000_000;
/// And the longest (verbs' timeout 0, "wait forever", is this).
pub const RETRY_CAP_NS: u64 = 30_000_000_000;
/// rkeys differ from lkeys by this, so that one is not taken for the other.
const RKEY_MASK: u32 = 0x5a00_0000;

/// How long a part may go unanswered on a queue pair moved to RTS with
/// `timeout` and `retry_cnt`: 4.096 µs × 2^timeout per try, `retry_cnt`
/// + 1 tries, within [`RETRY_FLOOR_NS`] and [`RETRY_CAP_NS`].
pub fn retry_ns(timeout: u8, retry_cnt: u8) -> u64 {
    if timeout == 0 {
        return RETRY_CAP_NS;
    }
    let one = 4096u64 << timeout.min(31);
    one.saturating_mul(u64::from(retry_cnt.min(7)) + 1).clamp(RETRY_FLOOR_NS, RETRY_CAP_NS)
}

/// One device of a fabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuDevice {
    pub name: String,
    pub numa_node: Option<u32>,
}

/// What a fabric is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuConfig {
    pub devices: Vec<EmuDevice>,
    /// Where the devices listen (each on a port of its own).
    pub bind: IpAddr,
    pub faults: Vec<EmuFault>,
    /// When quiet links and connections close.
    pub idle: IdleLimits,
}

impl EmuConfig {
    /// Devices `names` on loopback, without faults.
    pub fn new(names: &[&str]) -> EmuConfig {
        EmuConfig {
            devices: names.iter().map(|n| EmuDevice { name: n.to_string(), numa_node: None }).collect(),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            faults: Vec::new(),
            idle: IdleLimits::default(),
        }
    }

    /// `SHARDWIRE_EMU_DEVICES` and `SHARDWIRE_EMU_FAULTS`, listening on
    /// `MC_TCP_BIND_ADDRESS` (or loopback), each device on the NUMA node
    /// whose `cpu:N` entry of `MC_CUSTOM_TOPO_JSON` prefers it.
    pub fn from_settings(s: &Settings) -> Result<EmuConfig, String> {
        let FabricChoice::Emu { devices, faults } = &s.fabric else {
            return Err("SHARDWIRE_FABRIC is not emu".into());
        };
        let matrix = crate::topo::PriorityMatrix::from_settings(s).map_err(|e| e.to_string())?;
        let node_of = |name: &str| {
            let (_, m) = matrix.as_ref()?;
            m.entries().into_iter().find_map(|(key, entry)| {
                let node = key.strip_prefix("cpu:")?.parse::<u32>().ok()?;
                entry.preferred.iter().any(|d| d == name).then_some(node)
            })
        };
        Ok(EmuConfig {
            devices: devices.iter().map(|n| EmuDevice { name: n.clone(), numa_node: node_of(n) }).collect(),
            bind: s.tcp_bind_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            faults: faults.clone(),
            idle: IdleLimits::default(),
        })
    }
}

/// A context's shared part: what its owner (a shard) and the device's
/// threads both reach.
pub struct CtxShared {
    device: Arc<Device>,
    queues: Mutex<Queues>,
}

fn lock(q: &Mutex<Queues>) -> MutexGuard<'_, Queues> {
    q.lock().unwrap_or_else(|e| e.into_inner())
}

/// The devices of one process (or of one "process" in a test).
pub struct EmuFabric {
    devices: Vec<Arc<Device>>,
    /// Stops the fault timer.
    stop: Arc<AtomicBool>,
    /// The process that made it (a forked child makes its own).
    pid: u32,
    /// Its threads running, all devices' and the timer's.
    threads: Arc<AtomicUsize>,
}

impl EmuFabric {
    /// Starts the devices of `config`: a listener and its thread each, and
    /// a timer thread if the faults take ports down or up.
    pub fn new(config: EmuConfig) -> Result<EmuFabric, FabricError> {
        let names: std::collections::BTreeSet<&str> = config.devices.iter().map(|d| d.name.as_str()).collect();
        if config.devices.is_empty() || config.devices.len() > DEVICES_MAX || names.len() != config.devices.len() {
            return Err(FabricError::Limit { what: "devices, or the same one twice".into(), max: DEVICES_MAX as u64 });
        }
        if let Some(device) = config.faults.iter().find_map(|f| match f {
            EmuFault::ErrorEvery { device, every: 0 } => Some(device),
            _ => None,
        }) {
            return Err(FabricError::Call {
                call: "EmuFabric::new",
                why: format!("fault error_every=0 on {device}: every nth work request fails, n at least 1"),
            });
        }
        // Devices go into the fabric as they start: if a later one cannot,
        // dropping the fabric shuts down those started.
        let mut fabric = EmuFabric {
            devices: Vec::with_capacity(config.devices.len()),
            stop: Arc::new(AtomicBool::new(false)),
            pid: std::process::id(),
            threads: Arc::new(AtomicUsize::new(0)),
        };
        for d in &config.devices {
            let every = config.faults.iter().find_map(|f| match f {
                EmuFault::ErrorEvery { device, every } if *device == d.name => Some(*every),
                _ => None,
            });
            fabric.devices.push(Device::start(&d.name, config.bind, d.numa_node, every, config.idle, &fabric.threads)?);
        }
        let mut timed: Vec<(Duration, Weak<Device>, bool)> = config
            .faults
            .iter()
            .filter_map(|f| match f {
                EmuFault::Down { device, after } => Some((*after, device, false)),
                EmuFault::Up { device, after } => Some((*after, device, true)),
                EmuFault::ErrorEvery { .. } => None,
            })
            .filter_map(|(after, name, up)| fabric.device(name).map(|d| (after, Arc::downgrade(d), up)))
            .collect();
        timed.sort_by_key(|t| t.0);
        if !timed.is_empty() {
            let (stop, made) = (fabric.stop.clone(), Instant::now());
            nic::spawn(&fabric.threads, "sw-emu-faults", move || apply_in_time(&timed, made, &stop))
                .map_err(|e| FabricError::Call { call: "spawn", why: e.to_string() })?;
        }
        Ok(fabric)
    }

    /// Its threads running now: listeners, responders, links' senders
    /// and receivers, the fault timer.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Acquire)
    }

    /// The count [`Self::threads`] reads, to watch it after the fabric is
    /// dropped (test support).
    #[cfg(test)]
    fn thread_count(&self) -> Arc<AtomicUsize> {
        self.threads.clone()
    }

    /// Links device `name` has to peer devices now.
    pub fn links(&self, name: &str) -> Option<usize> {
        self.device(name).map(|d| d.links())
    }

    fn device(&self, name: &str) -> Option<&Arc<Device>> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Takes device `name`'s port down (`up == false`) or up now; false if
    /// there is no such device.
    pub fn set_device(&self, name: &str, up: bool) -> bool {
        self.device(name).map(|d| d.set_up(up)).is_some()
    }

    /// Where device `name` listens.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.device(name).map(|d| d.addr)
    }
}

/// The fault timer: each port change at its time after `made`.
fn apply_in_time(timed: &[(Duration, Weak<Device>, bool)], made: Instant, stop: &AtomicBool) {
    for (after, device, up) in timed {
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let left = after.saturating_sub(made.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
        if let Some(d) = device.upgrade() {
            d.set_up(*up);
        }
    }
}

impl Drop for EmuFabric {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for d in &self.devices {
            d.shutdown();
        }
    }
}

/// The process's own emulated fabric (`SHARDWIRE_FABRIC=emu`): made on
/// first use from `s`, every engine of the process on it. Later calls get
/// the same fabric, whatever settings they pass.
pub fn shared(s: &Settings) -> Result<Arc<EmuFabric>, String> {
    static SHARED: Mutex<Option<Arc<EmuFabric>>> = Mutex::new(None);
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = shared.as_ref() {
        if f.pid == std::process::id() {
            return Ok(f.clone());
        }
        // A forked child: the parent's threads are not here, and its
        // sockets are the parent's as well (shutting them down would cut
        // the parent's connections). Left alone; the child makes its own.
        std::mem::forget(shared.take());
    }
    let fabric = Arc::new(EmuFabric::new(EmuConfig::from_settings(s)?).map_err(|e| format!("emu fabric: {e}"))?);
    *shared = Some(fabric.clone());
    Ok(fabric)
}

impl Fabric for EmuFabric {
    fn kind(&self) -> &'static str {
        "emu"
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(|d| d.info()).collect()
    }

    fn open(&self, name: &str) -> Result<Box<dyn Context>, FabricError> {
        let device = self.device(name).ok_or_else(|| FabricError::NoDevice(name.to_string()))?;
        if device.is_shut() {
            return Err(FabricError::PortDown(name.to_string()));
        }
        let queues = Queues { next_key: nic::start_value(0x6b65_7973) | 1, ..Queues::default() };
        let shared = Arc::new(CtxShared { device: device.clone(), queues: Mutex::new(queues) });
        device.add_context(&shared);
        Ok(Box::new(EmuContext { shared }))
    }
}

/// A context on an emulated device.
pub struct EmuContext {
    shared: Arc<CtxShared>,
}

impl EmuContext {
    fn queues(&self) -> MutexGuard<'_, Queues> {
        lock(&self.shared.queues)
    }
}

impl Drop for EmuContext {
    fn drop(&mut self) {
        let (qps, guards): (Vec<u32>, Vec<Arc<RegionGuard>>) = {
            let mut q = self.queues();
            q.closed = true;
            let qps = q.qps.keys().copied().collect();
            q.qps.clear();
            q.rkeys.clear();
            (qps, q.mrs.drain().map(|(_, r)| r.guard).collect())
        };
        for n in qps {
            self.shared.device.forget_qp(n);
        }
        // Waits out copies under way: then the memory may go.
        for g in guards {
            g.retire();
        }
    }
}

impl Context for EmuContext {
    fn info(&self) -> DeviceInfo {
        self.shared.device.info()
    }

    unsafe fn register(&mut self, addr: u64, len: u64, access: Access) -> Result<Mr, FabricError> {
        rules::check_region(addr, len, self.shared.device.info().max_mr_size)?;
        let mut q = self.queues();
        rules::check_room("memory regions", q.mrs.len(), MRS_PER_CONTEXT_MAX)?;
        // Keys are not reused within a context: a late answer cannot
        // reach a region registered since.
        let lkey = q.next_key;
        q.next_key = q.next_key.wrapping_add(1);
        let mr = Mr { addr, len, lkey, rkey: lkey ^ RKEY_MASK };
        q.rkeys.insert(mr.rkey, lkey);
        q.mrs.insert(lkey, Region { mr, access, in_use: 0, guard: RegionGuard::new() });
        Ok(mr)
    }

    fn deregister(&mut self, lkey: u32) -> Result<(), FabricError> {
        let guard = {
            let mut q = self.queues();
            match q.mrs.get(&lkey) {
                None => return Err(FabricError::NoRegion(lkey)),
                Some(r) if r.in_use > 0 => return Err(FabricError::RegionBusy(lkey, r.in_use)),
                Some(_) => {}
            }
            let r = q.mrs.remove(&lkey).expect("looked up above");
            q.rkeys.remove(&r.mr.rkey);
            r.guard
        };
        // A peer's copy into it may be under way: it ends first.
        guard.retire();
        Ok(())
    }

    fn create_cq(&mut self, cqe: u32) -> Result<CqId, FabricError> {
        rules::check_cq(cqe, self.shared.device.info().max_cqe)?;
        let mut q = self.queues();
        rules::check_room("completion queues", q.cqs.len(), CQS_PER_CONTEXT_MAX)?;
        let n = q.next_cq;
        q.next_cq += 1;
        q.cqs.insert(n, Cq { capacity: cqe as usize, done: VecDeque::new(), overrun: false });
        Ok(CqId(n))
    }

    fn create_qp(&mut self, cq: CqId, caps: QpCaps) -> Result<QpNum, FabricError> {
        rules::check_qp(&caps, self.shared.device.info().max_qp_wr, INLINE_BYTES_MAX)?;
        let mut q = self.queues();
        if !q.cqs.contains_key(&cq.0) {
            return Err(FabricError::NoCq(cq));
        }
        rules::check_room("queue pairs", q.qps.len(), QPS_PER_CONTEXT_MAX)?;
        let n = self.shared.device.new_qp(&self.shared)?;
        let qp = Qp {
            cq: cq.0,
            caps,
            state: QpState::Reset,
            access: Access::default(),
            peer: None,
            link: None,
            retry_ns: RETRY_CAP_NS,
            queue: VecDeque::new(),
            next_seq: 0,
        };
        q.qps.insert(n, qp);
        Ok(QpNum(n))
    }

    fn destroy_qp(&mut self, qp: QpNum) -> Result<(), FabricError> {
        let mut q = self.queues();
        if !q.qps.contains_key(&qp.0) {
            return Err(FabricError::NoQp(qp));
        }
        q.drop_queue(qp.0);
        q.qps.remove(&qp.0);
        self.shared.device.forget_qp(qp.0);
        Ok(())
    }

    fn modify_qp(&mut self, qp: QpNum, to: Transition) -> Result<(), FabricError> {
        let device = self.shared.device.clone();
        let mut q = self.queues();
        let from = q.qps.get(&qp.0).ok_or(FabricError::NoQp(qp))?.state;
        let next = rules::next_state(from, &to).map_err(|by| FabricError::BadTransition { qp, from, by })?;
        match to {
            Transition::Err => {
                q.flush(qp.0);
                return Ok(());
            }
            Transition::Reset => q.drop_queue(qp.0),
            _ => {}
        }
        let p = q.qps.get_mut(&qp.0).expect("looked up above");
        match to {
            Transition::Init { access } => p.access = access,
            Transition::Rtr { peer } => {
                if !device.is_up() {
                    return Err(FabricError::BadTransition { qp, from, by: "RTR while the port is down" });
                }
                let Some(addr) = nic::address_of(&peer.gid, peer.lid) else {
                    return Err(FabricError::Call {
                        call: "modify_qp(RTR)",
                        why: format!("GID {} with LID {} names no emu device", peer.gid, peer.lid),
                    });
                };
                p.link = Some(device.link_to(addr)?);
                p.peer = Some(peer);
            }
            Transition::Rts { timeout, retry_cnt, .. } => p.retry_ns = retry_ns(timeout, retry_cnt),
            Transition::Reset => {
                p.peer = None;
                p.link = None;
            }
            Transition::Err => unreachable!("handled above"),
        }
        p.state = next;
        Ok(())
    }

    fn qp_state(&self, qp: QpNum) -> Result<QpState, FabricError> {
        self.queues().qps.get(&qp.0).map(|q| q.state).ok_or(FabricError::NoQp(qp))
    }

    fn post(&mut self, qp: QpNum, chain: &[WorkRequest]) -> Result<(), FabricError> {
        let ctx = Arc::downgrade(&self.shared);
        let mut q = self.queues();
        let mut result = Ok(());
        for (index, wr) in chain.iter().enumerate() {
            let Queues { qps, mrs, .. } = &mut *q;
            let Some(p) = qps.get_mut(&qp.0) else {
                result = Err(FabricError::NoQp(qp));
                break;
            };
            if !rules::takes_posts(p.state) {
                result = Err(FabricError::NotReady { qp, state: p.state });
                break;
            }
            if p.queue.len() >= p.caps.max_send_wr as usize {
                let outstanding = p.queue.len() as u32;
                result = Err(FabricError::QueueFull { qp, outstanding, max: p.caps.max_send_wr });
                break;
            }
            if let Err(why) = rules::check_post(wr, &p.caps) {
                result = Err(FabricError::BadWorkRequest { qp, index, why });
                break;
            }
            let data = if wr.inline {
                // The bytes are taken now, as a provider copies them into
                // the send queue; only from memory registered here.
                let regions = &*mrs;
                if let Err(why) = rules::check_inline_source(wr, |lkey| regions.get(&lkey).map(|r| (&r.mr, r.access))) {
                    result = Err(FabricError::BadWorkRequest { qp, index, why });
                    break;
                }
                let mut bytes = Vec::with_capacity(wr.len() as usize);
                for s in &wr.sges {
                    // SAFETY: the entry lies inside a region registered on
                    // this context (checked above), which its registrant
                    // keeps mapped until it deregisters it; deregistering
                    // takes this context's lock, held here, so it cannot
                    // happen during the copy. A raw copy, through no
                    // reference: peers may write the memory meanwhile.
                    unsafe { queues::append_from(&mut bytes, s.addr, s.len as usize) };
                }
                Some(bytes.into_boxed_slice())
            } else {
                queues::hold(mrs, wr, true);
                None
            };
            let seq = p.next_seq;
            p.next_seq += 1;
            let in_error = p.state == QpState::Err;
            let status = in_error.then_some(WcStatus::WrFlushErr);
            assert!(p.queue.back().is_none_or(|b| b.seq < seq), "a send queue is in posting order");
            p.queue.push_back(Posted { seq, wr: *wr, data, status });
            assert!(p.queue.len() <= p.caps.max_send_wr as usize);
            if in_error {
                continue;
            }
            let op = Op { ctx: ctx.clone(), qpn: qp.0, seq };
            let handed = match &mut p.link {
                Some(link) => match link.link().send(op) {
                    Ok(()) => true,
                    // It closed for having nothing to do (nothing of this
                    // queue pair's is on it): connected again, as a device
                    // reaches its peer again after a quiet spell.
                    Err(op) if link.link().closed_idle() => match self.shared.device.link_to(link.link().peer) {
                        Ok(new) => {
                            *link = new;
                            link.link().send(op).is_ok()
                        }
                        Err(_) => false,
                    },
                    Err(_) => false,
                },
                None => false,
            };
            if !handed {
                // The connection to the peer has ended (or is congested
                // past its bound): it is not reached.
                q.finish(qp.0, seq, WcStatus::RetryExcErr);
            }
        }
        q.complete(qp.0);
        result
    }

    fn poll(&mut self, cq: CqId, max: usize, out: &mut Vec<Completion>) -> Result<usize, FabricError> {
        let mut q = self.queues();
        let c = q.cqs.get_mut(&cq.0).ok_or(FabricError::NoCq(cq))?;
        let n = max.min(c.done.len());
        out.extend(c.done.drain(..n));
        Ok(n)
    }

    fn events(&mut self, out: &mut Vec<PortEvent>) -> usize {
        let mut q = self.queues();
        let n = q.events.len();
        out.extend(q.events.drain(..));
        n
    }
}
