//! Endpoints: the queue pairs of one local device to one peer device,
//! made on first use, connected through a [`Connector`], and the chains
//! staged on them between posts.

use super::super::fabric::{Access, Context, CqId, PeerAddr, QpCaps, QpNum, QpState, Transition, WorkRequest};
use super::{Nic, OurSide, PeerSide, RdmaConfig};

pub(super) struct Endpoint {
    pub qps: Vec<QpNum>,
    /// Work requests outstanding on each queue pair (at most `max_wr`).
    pub outstanding: Vec<u32>,
    /// Work requests staged for each queue pair, posted as one chain at
    /// the end of a round; the vectors keep their room between rounds.
    pub pending: Vec<Vec<WorkRequest>>,
    /// The queue pair tried first next time.
    pub next: usize,
    pub broken: bool,
    /// When it broke (ns): past [`super::DRAIN_MAX_NS`] undrained, its
    /// queue pairs are destroyed and what they held is taken back.
    pub broken_at_ns: u64,
    /// When it last made progress (ns): work posted to it idle, or a
    /// completion. Holding work past [`super::STALL_NS`] without one
    /// breaks it.
    pub progress_at_ns: u64,
    /// When it was last chosen (a count of choices).
    pub last_use: u64,
    /// Waiting for the peer's side since this time (ns); `None` once connected.
    pub connecting_since: Option<u64>,
}

impl Endpoint {
    pub fn new(qps: Vec<QpNum>, now_ns: u64, connecting_since: Option<u64>) -> Endpoint {
        let n = qps.len();
        Endpoint {
            qps,
            outstanding: vec![0; n],
            pending: (0..n).map(|_| Vec::new()).collect(),
            next: 0,
            broken: false,
            broken_at_ns: 0,
            progress_at_ns: now_ns,
            last_use: 0,
            connecting_since,
        }
    }

    /// Whether any of its queue pairs holds work.
    pub fn holding(&self) -> bool {
        self.outstanding.iter().any(|&o| o > 0)
    }

    /// A queue pair with room for one more work request, counted as
    /// taken; round-robin over the queue pairs.
    pub fn take_room(&mut self, max_wr: u32) -> Option<usize> {
        let n = self.qps.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.outstanding[i] < max_wr {
                self.outstanding[i] += 1;
                self.next = i + 1;
                return Some(i);
            }
        }
        None
    }
}

/// The caps every queue pair of an engine gets, active or passive, so
/// that any of them can carry any slice (inline writes included).
pub(super) fn caps(config: &RdmaConfig) -> QpCaps {
    QpCaps { max_send_wr: config.max_wr, max_sge: config.max_sge, max_inline: config.max_inline }
}

/// Starts an endpoint: queue pairs on `device`, in INIT, waiting for the
/// peer's side.
pub(super) fn open_endpoint(device: &mut Nic, config: &RdmaConfig, now_ns: u64) -> Result<Endpoint, String> {
    let mut qps = Vec::with_capacity(config.qps_per_endpoint);
    let mut made = || -> Result<(), String> {
        for _ in 0..config.qps_per_endpoint {
            let q = device.ctx.create_qp(device.cq, caps(config)).map_err(|e| e.to_string())?;
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
    Ok(Endpoint::new(qps, now_ns, Some(now_ns)))
}

/// Connects an endpoint's queue pairs to the peer's `side`: RTR, then RTS,
/// at the path MTU the two sides agree on.
pub(super) fn finish_endpoint(
    device: &mut Nic,
    config: &RdmaConfig,
    ep: &mut Endpoint,
    peer: &str,
    side: &PeerSide,
) -> Result<(), String> {
    if side.qps.len() != ep.qps.len() {
        return Err(format!("{peer} answered with {} queue pairs for our {}", side.qps.len(), ep.qps.len()));
    }
    let mtu = super::super::fabric::path_mtu(device.info.active_mtu, side.mtu, config.mtu);
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
    Ok(PeerSide { gid: info.gids[1].gid, lid: 0, qps, mtu: Some(info.active_mtu), instance: None })
}
