//! The rules an RDMA device enforces, for the fabrics that enforce them in
//! software (`sim` in one process, `emu` across processes): one statement
//! of each rule, so the two cannot drift apart. Pure functions, no state.
//!
//! - a queue pair moves RESET → INIT → RTR → RTS, to ERR from anywhere and
//!   back to RESET from anywhere;
//! - a chain posts on a queue pair in RTS (or in ERR, where it flushes);
//!   each work request has 1 to `max_sge` entries, at most 2^31 bytes, and
//!   inline data only for writes of at most `max_inline` bytes;
//! - the requester checks each entry's local key, bounds and access
//!   (`LOC_PROT_ERR`, `LOC_LEN_ERR`); the responder checks the remote key,
//!   bounds and access of the region and of its queue pair
//!   (`REM_ACCESS_ERR`);
//! - regions, completion queues and queue pairs are made within the
//!   device's limits (`max_mr_size`, `max_cqe`, `max_qp_wr`, the
//!   scatter-gather entries a work request can carry).

use super::fabric::{Access, FabricError, Mr, QpCaps, QpState, SGES_MAX, Sge, Transition, Verb, WcStatus, WorkRequest};

/// The largest work request (verbs caps a message at 2^31 bytes).
pub const WR_BYTES_MAX: u64 = 1 << 31;

/// The state transition `to` leads to from `from`, or which move it is
/// that the state does not allow.
pub fn next_state(from: QpState, to: &Transition) -> Result<QpState, &'static str> {
    match (from, to) {
        (QpState::Reset, Transition::Init { .. }) => Ok(QpState::Init),
        (QpState::Init, Transition::Rtr { .. }) => Ok(QpState::Rtr),
        (QpState::Rtr, Transition::Rts { .. }) => Ok(QpState::Rts),
        (_, Transition::Err) => Ok(QpState::Err),
        (_, Transition::Reset) => Ok(QpState::Reset),
        (_, Transition::Init { .. }) => Err("INIT"),
        (_, Transition::Rtr { .. }) => Err("RTR"),
        (_, Transition::Rts { .. }) => Err("RTS"),
    }
}

/// Whether a queue pair in `state` takes posts: in RTS it carries them
/// out; in ERR it takes them and flushes them.
pub fn takes_posts(state: QpState) -> bool {
    matches!(state, QpState::Rts | QpState::Err)
}

/// What is wrong with `wr` for a queue pair of `caps`, checked when it is
/// posted (the provider refuses it, nothing is sent).
pub fn check_post(wr: &WorkRequest, caps: &QpCaps) -> Result<(), String> {
    let max_sge = caps.max_sge.max(1) as usize;
    if wr.sges.is_empty() || wr.sges.len() > max_sge {
        return Err(format!("{} scatter-gather entries, expected 1 to {max_sge}", wr.sges.len()));
    }
    let len = wr.len();
    if len > WR_BYTES_MAX {
        return Err(format!("{len} bytes, above {WR_BYTES_MAX}"));
    }
    if wr.inline {
        if !matches!(wr.verb, Verb::Write | Verb::WriteImm(_)) {
            return Err("inline data on a read".into());
        }
        if len > u64::from(caps.max_inline) {
            return Err(format!("{len} bytes inline, above the queue pair's {}", caps.max_inline));
        }
    }
    Ok(())
}

/// Where the bytes of an inline write come from: each entry must lie in
/// the region its lkey names. Hardware does not look (the provider copies
/// from any address); the software fabrics and our verbs backend check, so
/// that a safe `post` can never read memory nobody registered.
pub fn check_inline_source<'a>(
    wr: &WorkRequest,
    region: impl Fn(u32) -> Option<(&'a Mr, Access)>,
) -> Result<(), String> {
    for (i, s) in wr.sges.iter().enumerate() {
        check_local(s, region(s.lkey), Verb::Write).map_err(|_| {
            format!("inline entry {i} ([{:#x}, +{}]) is not inside the region of lkey {:#x}", s.addr, s.len, s.lkey)
        })?;
    }
    Ok(())
}

/// The requester's check of one entry of a `verb`: `region` is the region
/// its lkey names, with the access it was registered with (`None`: no
/// region has that key).
pub fn check_local(sge: &Sge, region: Option<(&Mr, Access)>, verb: Verb) -> Result<(), WcStatus> {
    let Some((mr, access)) = region else { return Err(WcStatus::LocProtErr) };
    let end = sge.addr.checked_add(u64::from(sge.len));
    if sge.addr < mr.addr || end.is_none_or(|e| e > mr.addr + mr.len) {
        return Err(WcStatus::LocLenErr);
    }
    // A read lands in local memory: the region must take local writes.
    if matches!(verb, Verb::Read) && !access.local_write {
        return Err(WcStatus::LocProtErr);
    }
    Ok(())
}

/// The responder's check of `len` bytes at `remote_addr` for a `verb`:
/// `region` is the region its rkey names, with its access (`None`: no
/// region has that key); `qp_access` is what the responder's queue pair
/// allows (set at INIT).
pub fn check_remote(
    verb: Verb,
    remote_addr: u64,
    len: u64,
    region: Option<(&Mr, Access)>,
    qp_access: Access,
) -> Result<(), WcStatus> {
    let Some((mr, access)) = region else { return Err(WcStatus::RemAccessErr) };
    let inside = remote_addr >= mr.addr && remote_addr.checked_add(len).is_some_and(|e| e <= mr.addr + mr.len);
    let allowed = match verb {
        Verb::Read => access.remote_read && qp_access.remote_read,
        Verb::Write | Verb::WriteImm(_) => access.remote_write && qp_access.remote_write,
    };
    if inside && allowed { Ok(()) } else { Err(WcStatus::RemAccessErr) }
}

/// What is wrong with registering `[addr, addr + len)` on a device whose
/// regions hold at most `max_mr_size` bytes.
pub fn check_region(addr: u64, len: u64, max_mr_size: u64) -> Result<(), FabricError> {
    let why = if len == 0 || addr.checked_add(len).is_none() {
        "an empty or wrapping range".to_string()
    } else if len > max_mr_size {
        format!("above max_mr_size ({max_mr_size})")
    } else {
        return Ok(());
    };
    Err(FabricError::Register { addr, len, why })
}

/// What is wrong with a completion queue of `cqe` entries on a device
/// that makes them of at most `max_cqe`.
pub fn check_cq(cqe: u32, max_cqe: u32) -> Result<(), FabricError> {
    let fits = (1..=max_cqe).contains(&cqe);
    let what = || format!("a completion queue of {cqe} entries");
    if fits { Ok(()) } else { Err(FabricError::Limit { what: what(), max: max_cqe.into() }) }
}

/// What is wrong with a queue pair of `caps` on a device that queues at
/// most `max_qp_wr` work requests per queue pair and takes at most
/// `max_inline` bytes inline.
pub fn check_qp(caps: &QpCaps, max_qp_wr: u32, max_inline: u32) -> Result<(), FabricError> {
    let (wrs, sges, inline) = (caps.max_send_wr, caps.max_sge, caps.max_inline);
    match () {
        _ if wrs == 0 || wrs > max_qp_wr => {
            Err(FabricError::Limit { what: format!("{wrs} send work requests"), max: max_qp_wr.into() })
        }
        _ if sges as usize > SGES_MAX => {
            Err(FabricError::Limit { what: format!("{sges} scatter-gather entries"), max: SGES_MAX as u64 })
        }
        _ if inline > max_inline => {
            Err(FabricError::Limit { what: format!("{inline} bytes inline"), max: max_inline.into() })
        }
        _ => Ok(()),
    }
}

/// Whether one more of `what` fits beside the `count` made, at most `max`.
pub fn check_room(what: &str, count: usize, max: usize) -> Result<(), FabricError> {
    if count < max { Ok(()) } else { Err(FabricError::Limit { what: what.into(), max: max as u64 }) }
}

#[cfg(test)]
mod tests {
    use super::super::fabric::{PeerAddr, QpNum, Sges};
    use super::*;
    use crate::proto::mooncake::rdma::Gid;

    const ALL: Access = Access::ALL;
    const READ_ONLY: Access = Access { local_write: false, remote_read: true, remote_write: false };

    #[test]
    fn queue_pairs_move_in_the_hardwares_order() {
        let init = Transition::Init { access: ALL };
        let peer = PeerAddr { gid: Gid([0; 16]), lid: 0, qp: QpNum(1), mtu: 4096 };
        let rtr = Transition::Rtr { peer };
        let rts = Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 };
        assert_eq!(next_state(QpState::Reset, &init), Ok(QpState::Init));
        assert_eq!(next_state(QpState::Init, &rtr), Ok(QpState::Rtr));
        assert_eq!(next_state(QpState::Rtr, &rts), Ok(QpState::Rts));
        assert_eq!(next_state(QpState::Reset, &rtr), Err("RTR"));
        assert_eq!(next_state(QpState::Init, &rts), Err("RTS"));
        assert_eq!(next_state(QpState::Rts, &init), Err("INIT"));
        assert_eq!(next_state(QpState::Err, &rts), Err("RTS"), "out of ERR only through RESET");
        for s in [QpState::Reset, QpState::Init, QpState::Rtr, QpState::Rts, QpState::Err] {
            assert_eq!(next_state(s, &Transition::Err), Ok(QpState::Err));
            assert_eq!(next_state(s, &Transition::Reset), Ok(QpState::Reset));
        }
        assert!(takes_posts(QpState::Rts) && takes_posts(QpState::Err));
        assert!(!takes_posts(QpState::Rtr) && !takes_posts(QpState::Init) && !takes_posts(QpState::Reset));
    }

    fn wr(verb: Verb, len: u32, inline: bool) -> WorkRequest {
        let sges = Sges::one(Sge { addr: 4096, len, lkey: 1 });
        WorkRequest { wr_id: 1, verb, sges, remote_addr: 0, rkey: 2, inline }
    }

    #[test]
    fn posts_are_checked_against_the_queue_pairs_caps() {
        let caps = QpCaps { max_send_wr: 4, max_sge: 2, max_inline: 64 };
        assert_eq!(check_post(&wr(Verb::Write, 4096, false), &caps), Ok(()));
        assert_eq!(check_post(&wr(Verb::Write, 64, true), &caps), Ok(()));
        assert!(check_post(&wr(Verb::Write, 65, true), &caps).unwrap_err().contains("above the queue pair's 64"));
        assert!(check_post(&wr(Verb::Read, 8, true), &caps).unwrap_err().contains("read"));
        let mut none = wr(Verb::Write, 8, false);
        none.sges = Sges::default();
        assert!(check_post(&none, &caps).unwrap_err().contains("0 scatter-gather entries"));
        let mut three = wr(Verb::Write, 8, false);
        assert!(three.sges.push(Sge { addr: 0, len: 1, lkey: 1 }) && three.sges.push(Sge { addr: 0, len: 1, lkey: 1 }));
        assert!(check_post(&three, &caps).unwrap_err().contains("expected 1 to 2"));
        let mut huge = wr(Verb::Write, u32::MAX, false);
        assert!(huge.sges.push(Sge { addr: 0, len: 2, lkey: 1 }));
        assert!(check_post(&huge, &caps).unwrap_err().contains("above 2147483648"));
    }

    #[test]
    fn local_and_remote_checks_give_the_hardwares_statuses() {
        let mr = Mr { addr: 4096, len: 4096, lkey: 1, rkey: 2 };
        let sge = |addr, len| Sge { addr, len, lkey: 1 };
        assert_eq!(check_local(&sge(4096, 4096), Some((&mr, ALL)), Verb::Read), Ok(()));
        assert_eq!(check_local(&sge(4096, 8), None, Verb::Write), Err(WcStatus::LocProtErr));
        assert_eq!(check_local(&sge(8000, 200), Some((&mr, ALL)), Verb::Write), Err(WcStatus::LocLenErr));
        assert_eq!(check_local(&sge(4000, 8), Some((&mr, ALL)), Verb::Write), Err(WcStatus::LocLenErr));
        assert_eq!(check_local(&sge(u64::MAX, 8), Some((&mr, ALL)), Verb::Write), Err(WcStatus::LocLenErr));
        assert_eq!(check_local(&sge(4096, 8), Some((&mr, READ_ONLY)), Verb::Read), Err(WcStatus::LocProtErr));
        assert_eq!(check_local(&sge(4096, 8), Some((&mr, READ_ONLY)), Verb::Write), Ok(()));

        assert_eq!(check_remote(Verb::Write, 4096, 4096, Some((&mr, ALL)), ALL), Ok(()));
        assert_eq!(check_remote(Verb::Write, 4096, 8, None, ALL), Err(WcStatus::RemAccessErr));
        assert_eq!(check_remote(Verb::Write, 8000, 200, Some((&mr, ALL)), ALL), Err(WcStatus::RemAccessErr));
        assert_eq!(check_remote(Verb::Read, u64::MAX - 1, 8, Some((&mr, ALL)), ALL), Err(WcStatus::RemAccessErr));
        assert_eq!(check_remote(Verb::Write, 4096, 8, Some((&mr, READ_ONLY)), ALL), Err(WcStatus::RemAccessErr));
        assert_eq!(check_remote(Verb::WriteImm(7), 4096, 8, Some((&mr, READ_ONLY)), ALL), Err(WcStatus::RemAccessErr));
        assert_eq!(check_remote(Verb::Read, 4096, 8, Some((&mr, READ_ONLY)), ALL), Ok(()));
        assert_eq!(check_remote(Verb::Read, 4096, 8, Some((&mr, ALL)), READ_ONLY), Ok(()));
        assert_eq!(check_remote(Verb::Write, 4096, 8, Some((&mr, ALL)), READ_ONLY), Err(WcStatus::RemAccessErr));
    }

    #[test]
    fn things_are_made_within_the_devices_limits() {
        assert_eq!(check_region(4096, 4096, 1 << 20), Ok(()));
        for (addr, len) in [(4096, 0), (u64::MAX, 2)] {
            let e = check_region(addr, len, 1 << 20).unwrap_err();
            assert!(matches!(&e, FabricError::Register { why, .. } if why.contains("empty or wrapping")), "{e}");
        }
        assert!(check_region(0, (1 << 20) + 1, 1 << 20).unwrap_err().to_string().contains("max_mr_size (1048576)"));
        assert_eq!(check_cq(1, 64), Ok(()));
        assert_eq!(check_cq(64, 64), Ok(()));
        assert!(matches!(check_cq(0, 64), Err(FabricError::Limit { max: 64, .. })));
        assert!(matches!(check_cq(65, 64), Err(FabricError::Limit { max: 64, .. })));
        let caps = QpCaps { max_send_wr: 8, max_sge: 4, max_inline: 64 };
        assert_eq!(check_qp(&caps, 8, 64), Ok(()));
        assert!(check_qp(&QpCaps { max_send_wr: 0, ..caps }, 8, 64).unwrap_err().to_string().contains("0 send work"));
        assert!(check_qp(&caps, 7, 64).unwrap_err().to_string().contains("8 send work requests"));
        assert!(check_qp(&caps, 8, 63).unwrap_err().to_string().contains("64 bytes inline"));
        let e = check_qp(&QpCaps { max_sge: 5, ..caps }, 8, 64).unwrap_err();
        assert!(e.to_string().contains("5 scatter-gather entries") && e.to_string().contains("limit of 4"), "{e}");
        assert_eq!(check_room("queue pairs", 3, 4), Ok(()));
        assert!(check_room("queue pairs", 4, 4).unwrap_err().to_string().contains("queue pairs: above"));
    }
}
