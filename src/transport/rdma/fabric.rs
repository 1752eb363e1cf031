//! The `Fabric` seam: the verbs the RDMA transport uses, and nothing else.
//!
//! A [`Fabric`] lists devices and opens a [`Context`] on one; a context is
//! owned by one shard and is driven without locks: memory regions, one or
//! more completion queues, RC queue pairs moved through their states, work
//! request chains posted, completions polled in batches, port events read.
//! The calls mirror verbs closely (so the real backend is a thin wrapper)
//! and their rules are the hardware's: a chain posts only in RTS, keys and
//! bounds and access flags are checked, a queue pair in error flushes what
//! it holds. Implementations: `verbs` (the machine's devices, through
//! sideway; feature `verbs`), `sim` (deterministic, in-process, with a
//! fault plan), and `emu` (across processes, over sockets).

use std::fmt;

use crate::proto::mooncake::rdma::Gid;

/// The most scatter-gather entries one work request may carry here.
pub const SGES_MAX: usize = 4;

/// Access a memory region grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub local_write: bool,
    pub remote_read: bool,
    pub remote_write: bool,
}

impl Access {
    /// What Mooncake registers with: local write, remote read and write.
    pub const ALL: Access = Access { local_write: true, remote_read: true, remote_write: true };
}

/// A port's state, as `ibv_port_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Down,
    Active,
}

/// What a device offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// The port used (Mooncake: `MC_IB_PORT`, 1).
    pub port: u8,
    pub state: PortState,
    pub lid: u16,
    /// The GID table; index `MC_GID_INDEX` (or [`choose_gid`]'s) is used.
    pub gids: Vec<GidEntry>,
    /// The active path MTU, in bytes (256 to 4096).
    pub active_mtu: u32,
    pub max_mr_size: u64,
    pub max_qp_wr: u32,
    pub max_cqe: u32,
    /// The device's NUMA node, if known.
    pub numa_node: Option<u32>,
}

/// What a GID table entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    /// InfiniBand.
    Ib,
    /// RoCE v1 (Ethernet, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    pub gid: Gid,
    pub kind: GidKind,
}

/// The GID index to use: `forced` (`MC_GID_INDEX`) if given and usable,
/// or else the best entry: RoCE v2 on an IPv4 address first, then other
/// routable RoCE v2, then RoCE v1 or InfiniBand; link-local (`fe80::`)
/// addresses after all routable ones; empty entries never.
pub fn choose_gid(gids: &[GidEntry], forced: Option<usize>) -> Result<usize, String> {
    if let Some(i) = forced {
        return match gids.get(i) {
            None => Err(format!("GID index {i} is past the table's {} entries", gids.len())),
            Some(e) if e.gid.is_zero() => Err(format!("GID index {i} is empty")),
            Some(_) => Ok(i),
        };
    }
    let rank = |e: &GidEntry| {
        let v4 = e.gid.0[..10] == [0; 10] && e.gid.0[10..12] == [0xff, 0xff];
        let link_local = e.gid.0[0] == 0xfe && e.gid.0[1] & 0xc0 == 0x80;
        match (e.kind, v4, link_local) {
            (GidKind::RoceV2, true, _) => 0,
            (GidKind::RoceV2, false, false) => 1,
            (GidKind::RoceV1, _, false) | (GidKind::Ib, _, false) => 2,
            (_, _, true) => 3,
        }
    };
    gids.iter()
        .enumerate()
        .filter(|(_, e)| !e.gid.is_zero())
        .min_by_key(|(i, e)| (rank(e), *i))
        .map(|(i, _)| i)
        .ok_or_else(|| "the port's GID table is empty".to_string())
}

/// The path MTU of a queue pair: the smaller of the two sides' active
/// MTUs and the `MC_MTU` cap, rounded down to a size verbs knows (256 to
/// 4096, powers of two). Mooncake uses its own side's only, so a 1024-byte
/// peer is sent 4096-byte packets it drops (its issue #3868).
pub fn path_mtu(local: u32, peer: Option<u32>, cap: u32) -> u32 {
    let m = local.min(peer.unwrap_or(local)).min(cap).clamp(256, 4096);
    1 << (31 - m.leading_zeros())
}

/// A registered memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mr {
    pub addr: u64,
    pub len: u64,
    pub lkey: u32,
    pub rkey: u32,
}

/// A completion queue of a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CqId(pub u32);

/// A queue pair's number (24 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QpNum(pub u32);

/// The states of an RC queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QpState {
    Reset,
    Init,
    /// Ready to receive: connected to its peer.
    Rtr,
    /// Ready to send.
    Rts,
    Err,
}

/// Limits a queue pair is created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    /// Outstanding send work requests at most (`MC_MAX_WR`).
    pub max_send_wr: u32,
    pub max_sge: u32,
    pub max_inline: u32,
}

/// Where a queue pair's peer is, and how to talk to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr {
    pub gid: Gid,
    pub lid: u16,
    pub qp: QpNum,
    /// The path MTU, in bytes: the smaller of the two sides' active MTUs.
    pub mtu: u32,
}

/// A move between queue pair states, with what each needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// RESET -> INIT.
    Init { access: Access },
    /// INIT -> RTR.
    Rtr { peer: PeerAddr },
    /// RTR -> RTS.
    Rts { timeout: u8, retry_cnt: u8, rnr_retry: u8 },
    /// Any state -> ERR.
    Err,
    /// Any state -> RESET (outstanding work is dropped, not completed).
    Reset,
}

/// One scatter-gather entry: local memory under `lkey`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// What a work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Write,
    Read,
    /// A write whose completion at the peer carries `imm`.
    WriteImm(u32),
}

/// A work request's scatter-gather list: at most [`SGES_MAX`] entries,
/// held inline so that building and posting a work request allocates
/// nothing. It reads as a slice of [`Sge`].
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Sges {
    count: u8,
    items: [Sge; SGES_MAX],
}

impl Sges {
    /// A list of one entry (what the slice engine posts).
    pub fn one(sge: Sge) -> Sges {
        let mut s = Sges::default();
        s.items[0] = sge;
        s.count = 1;
        s
    }

    /// The entries of `sges`, or `None` if there are more than
    /// [`SGES_MAX`].
    pub fn of(sges: &[Sge]) -> Option<Sges> {
        if sges.len() > SGES_MAX {
            return None;
        }
        let mut s = Sges::default();
        s.items[..sges.len()].copy_from_slice(sges);
        s.count = sges.len() as u8;
        Some(s)
    }

    /// Adds an entry; false (and nothing added) when full.
    pub fn push(&mut self, sge: Sge) -> bool {
        let n = usize::from(self.count);
        if n == SGES_MAX {
            return false;
        }
        self.items[n] = sge;
        self.count += 1;
        true
    }
}

impl<'a> IntoIterator for &'a Sges {
    type Item = &'a Sge;
    type IntoIter = std::slice::Iter<'a, Sge>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::ops::Deref for Sges {
    type Target = [Sge];

    fn deref(&self) -> &[Sge] {
        &self.items[..usize::from(self.count)]
    }
}

impl std::ops::DerefMut for Sges {
    fn deref_mut(&mut self) -> &mut [Sge] {
        &mut self.items[..usize::from(self.count)]
    }
}

impl fmt::Debug for Sges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// One send work request. `Copy`: chains are built in reused buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkRequest {
    pub wr_id: u64,
    pub verb: Verb,
    pub sges: Sges,
    pub remote_addr: u64,
    pub rkey: u32,
    /// The bytes are taken at post (`IBV_SEND_INLINE`): the local memory
    /// may change as soon as `post` returns, and its key is not checked.
    /// Only for writes of at most the queue pair's `max_inline` bytes.
    pub inline: bool,
}

impl WorkRequest {
    /// A work request of one entry, not inline: `len` bytes at offset `at`
    /// of region `local`, to or from offset `to` of region `remote`.
    pub fn between(wr_id: u64, verb: Verb, local: &Mr, at: u64, len: u32, remote: &Mr, to: u64) -> WorkRequest {
        WorkRequest {
            wr_id,
            verb,
            sges: Sges::one(Sge { addr: local.addr + at, len, lkey: local.lkey }),
            remote_addr: remote.addr + to,
            rkey: remote.rkey,
            inline: false,
        }
    }

    /// Bytes it moves.
    pub fn len(&self) -> u64 {
        self.sges.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a work request ended, as `ibv_wc_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcStatus {
    Success,
    /// A scatter-gather entry outside its local region.
    LocLenErr,
    /// A bad local key, or a region without the access needed.
    LocProtErr,
    /// The peer refused: bad rkey, out of bounds, or access not granted.
    RemAccessErr,
    /// The peer could not be reached within the retries (a rail down).
    RetryExcErr,
    /// Flushed: the queue pair was in error.
    WrFlushErr,
    /// Anything else the device reports.
    GeneralErr,
}

impl WcStatus {
    /// Whether the fault is on this side (so another local device may
    /// carry the slice), as Mooncake sorts them.
    pub fn is_local(self) -> bool {
        matches!(self, WcStatus::LocLenErr | WcStatus::LocProtErr)
    }
}

impl fmt::Display for WcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WcStatus::Success => "success",
            WcStatus::LocLenErr => "local length error",
            WcStatus::LocProtErr => "local protection error",
            WcStatus::RemAccessErr => "remote access error",
            WcStatus::RetryExcErr => "transport retry counter exceeded",
            WcStatus::WrFlushErr => "work request flushed",
            WcStatus::GeneralErr => "general error",
        })
    }
}

/// One completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    pub qp: QpNum,
    pub status: WcStatus,
    pub bytes: u64,
}

/// Something a device says on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortEvent {
    PortDown,
    PortActive,
    /// A queue pair went to error outside a completion (its peer vanished).
    QpFatal(QpNum),
    /// A completion queue overflowed: its queue pairs are in error.
    CqOverrun(CqId),
}

/// Why a verb call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FabricError {
    #[error("no RDMA device {0:?}")]
    NoDevice(String),
    #[error("device {0:?}: {1}")]
    NoGid(String, String),
    #[error("{0}: the port is down")]
    PortDown(String),
    #[error("registering [{addr:#x}, +{len}): {why}")]
    Register { addr: u64, len: u64, why: String },
    #[error("no memory region with lkey {0:#x}")]
    NoRegion(u32),
    #[error("memory region {0:#x} is in use by {1} outstanding work requests")]
    RegionBusy(u32, usize),
    #[error("no completion queue {0:?}")]
    NoCq(CqId),
    #[error("no queue pair {0:?}")]
    NoQp(QpNum),
    #[error("{what}: above the device's limit of {max}")]
    Limit { what: String, max: u64 },
    #[error("queue pair {qp:?}: cannot go from {from:?} by {by}")]
    BadTransition { qp: QpNum, from: QpState, by: &'static str },
    #[error("queue pair {qp:?} is {state:?}: work is posted only in RTS")]
    NotReady { qp: QpNum, state: QpState },
    #[error("queue pair {qp:?}: work request {index} of the chain: {why}")]
    BadWorkRequest { qp: QpNum, index: usize, why: String },
    #[error("{call} failed: {why}")]
    Call { call: &'static str, why: String },
    #[error("queue pair {qp:?} is full: {outstanding} outstanding of {max}")]
    QueueFull { qp: QpNum, outstanding: u32, max: u32 },
}

/// The devices of a machine.
pub trait Fabric: Send + Sync {
    /// What it is called in messages (`verbs`, `sim`, `emu`).
    fn kind(&self) -> &'static str;

    /// The devices there are, active or not.
    fn devices(&self) -> Vec<DeviceInfo>;

    /// Opens a context on device `name`, for one shard to drive.
    fn open(&self, name: &str) -> Result<Box<dyn Context>, FabricError>;
}

/// One device, opened: the protection domain, regions, queues and queue
/// pairs of one shard. Nothing here blocks.
pub trait Context: Send {
    fn info(&self) -> DeviceInfo;

    /// Registers `[addr, addr + len)`.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Context::deregister`] returns for
    /// it: peers (and this device) read and write it meanwhile.
    unsafe fn register(&mut self, addr: u64, len: u64, access: Access) -> Result<Mr, FabricError>;

    /// Gives a region back; refused while work requests that name it are
    /// outstanding.
    fn deregister(&mut self, lkey: u32) -> Result<(), FabricError>;

    fn create_cq(&mut self, cqe: u32) -> Result<CqId, FabricError>;

    /// An RC queue pair in RESET, completing into `cq`.
    fn create_qp(&mut self, cq: CqId, caps: QpCaps) -> Result<QpNum, FabricError>;

    fn destroy_qp(&mut self, qp: QpNum) -> Result<(), FabricError>;

    fn modify_qp(&mut self, qp: QpNum, to: Transition) -> Result<(), FabricError>;

    fn qp_state(&self, qp: QpNum) -> Result<QpState, FabricError>;

    /// Posts a chain in order. On an error, the requests before the bad
    /// one are posted and the rest are not (the error says which).
    fn post(&mut self, qp: QpNum, chain: &[WorkRequest]) -> Result<(), FabricError>;

    /// Moves up to `max` completions of `cq` into `out`; returns how many.
    fn poll(&mut self, cq: CqId, max: usize, out: &mut Vec<Completion>) -> Result<usize, FabricError>;

    /// Moves the port events since the last call into `out`.
    fn events(&mut self, out: &mut Vec<PortEvent>) -> usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(bytes: [u8; 16], kind: GidKind) -> GidEntry {
        GidEntry { gid: Gid(bytes), kind }
    }

    #[test]
    fn the_gid_is_routable_roce_v2_on_ipv4_first() {
        let mut v4 = [0u8; 16];
        v4[10] = 0xff;
        v4[11] = 0xff;
        v4[12..].copy_from_slice(&[10, 0, 0, 2]);
        let link_local = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 0x42, 0xac, 0xff, 0xfe, 0x11, 0, 2];
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let table = [
            entry(link_local, GidKind::RoceV1),
            entry(link_local, GidKind::RoceV2),
            entry([0; 16], GidKind::RoceV2),
            entry(v4, GidKind::RoceV1),
            entry(v6, GidKind::RoceV2),
            entry(v4, GidKind::RoceV2),
        ];
        assert_eq!(choose_gid(&table, None), Ok(5));
        assert_eq!(choose_gid(&table[..5], None), Ok(4), "then routable RoCE v2");
        assert_eq!(choose_gid(&table[..4], None), Ok(3), "then RoCE v1 on a routable address");
        assert_eq!(choose_gid(&table[..2], None), Ok(0), "link-local last, the first of them");
        assert_eq!(choose_gid(&table, Some(1)), Ok(1), "MC_GID_INDEX wins");
        assert!(choose_gid(&table, Some(2)).unwrap_err().contains("empty"));
        assert!(choose_gid(&table, Some(9)).unwrap_err().contains("past the table's 6 entries"));
        assert!(choose_gid(&[], None).is_err());
    }

    #[test]
    fn the_path_mtu_is_the_smaller_side_and_a_size_verbs_knows() {
        assert_eq!(path_mtu(4096, Some(1024), 4096), 1024);
        assert_eq!(path_mtu(1024, Some(4096), 4096), 1024);
        assert_eq!(path_mtu(4096, None, 4096), 4096, "a peer that does not say: our own, as Mooncake");
        assert_eq!(path_mtu(4096, Some(4096), 2048), 2048, "MC_MTU caps it");
        assert_eq!(path_mtu(4096, Some(1500), 4096), 1024, "rounded down to a power of two");
        assert_eq!(path_mtu(100, None, 4096), 256);
    }
}
