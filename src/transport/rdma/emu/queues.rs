//! One context's queues: its memory regions, completion queues and queue
//! pairs with their send queues, and the rule that turns each work
//! request's outcome into a completion in posting order. No I/O and no
//! threads: the shard (posting, polling) and the soft NIC's threads
//! (outcomes) call in under the context's lock.
//!
//! A work request's outcome may be known out of order (a local check fails
//! while the one before it is still on the wire); completions still come
//! out in order, because a send queue gives up only its head, and only
//! once the head's outcome is known. A failure puts the queue pair in ERR
//! and flushes what was posted after it; moving it to ERR flushes all.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use super::super::fabric::{
    Access, Completion, CqId, Mr, PeerAddr, PortEvent, QpCaps, QpNum, QpState, Sge, WcStatus, WorkRequest,
};
use super::link::LinkUse;

/// Port events kept per context before the oldest are dropped.
pub const EVENTS_MAX: usize = 1024;

/// Whether a region's memory may still be touched. Copies hold it shared
/// for as long as they copy (a bounded memcpy, never a wait on the
/// network); [`RegionGuard::retire`] takes it exclusively, so once it
/// returns no copy is under way and none will start.
#[derive(Debug)]
pub struct RegionGuard(RwLock<bool>);

impl RegionGuard {
    pub fn new() -> Arc<RegionGuard> {
        Arc::new(RegionGuard(RwLock::new(true)))
    }

    /// Runs `copy` if the region is still registered.
    pub fn with<R>(&self, copy: impl FnOnce() -> R) -> Option<R> {
        let alive = self.0.read().unwrap_or_else(|e| e.into_inner());
        alive.then(copy)
    }

    /// The region goes: waits out the copies under way.
    pub fn retire(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = false;
    }
}

pub struct Region {
    pub mr: Mr,
    pub access: Access,
    /// Work requests posted that name it as local memory.
    pub in_use: usize,
    pub guard: Arc<RegionGuard>,
}

pub struct Cq {
    pub capacity: usize,
    pub done: VecDeque<Completion>,
    pub overrun: bool,
}

/// A work request on its send queue.
pub struct Posted {
    /// Its place in the queue pair's life: never reused, so a late answer
    /// cannot be taken for a later request's.
    pub seq: u64,
    pub wr: WorkRequest,
    /// Inline data, taken at post.
    pub data: Option<Box<[u8]>>,
    /// How it ended, once known.
    pub status: Option<WcStatus>,
}

pub struct Qp {
    pub cq: u32,
    pub caps: QpCaps,
    pub state: QpState,
    pub access: Access,
    pub peer: Option<PeerAddr>,
    /// The connection to the peer's device, from RTR.
    pub link: Option<LinkUse>,
    /// How long a part may go unanswered (from RTS's timeout and retries).
    pub retry_ns: u64,
    /// Posted and not completed, in posting order.
    pub queue: VecDeque<Posted>,
    pub next_seq: u64,
}

/// A context's state, behind its lock.
#[derive(Default)]
pub struct Queues {
    pub mrs: HashMap<u32, Region>,
    /// rkey to lkey.
    pub rkeys: HashMap<u32, u32>,
    pub cqs: HashMap<u32, Cq>,
    pub qps: BTreeMap<u32, Qp>,
    pub events: VecDeque<PortEvent>,
    pub next_key: u32,
    pub next_cq: u32,
    /// The context was dropped: nothing is served from it any more.
    pub closed: bool,
}

impl Queues {
    pub fn push_event(&mut self, e: PortEvent) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// The work request `seq` of queue pair `qpn`, if it is still waiting
    /// for its outcome.
    pub fn pending(&self, qpn: u32, seq: u64) -> Option<(&Qp, &Posted)> {
        let qp = self.qps.get(&qpn)?;
        let i = qp.queue.binary_search_by_key(&seq, |p| p.seq).ok()?;
        let p = &qp.queue[i];
        p.status.is_none().then_some((qp, p))
    }

    /// The region local key `lkey` names, with its access, as the rules
    /// want it.
    pub fn local(&self, lkey: u32) -> Option<(&Mr, Access)> {
        self.mrs.get(&lkey).map(|r| (&r.mr, r.access))
    }

    /// Work request `seq` of `qpn` ended with `status` (ignored if it had
    /// ended already, or is gone). A failure puts the queue pair in ERR
    /// and flushes what was posted after it, whatever those had ended
    /// with: outcomes may be learnt out of order (a link that ends fails
    /// the request its sender held before the ones it had on the wire),
    /// and the first failure in posting order is the one reported, the
    /// rest flushed, as a device reports them.
    pub fn finish(&mut self, qpn: u32, seq: u64, status: WcStatus) {
        let Some(qp) = self.qps.get_mut(&qpn) else { return };
        let Ok(i) = qp.queue.binary_search_by_key(&seq, |p| p.seq) else { return };
        if qp.queue[i].status.is_some() {
            return;
        }
        qp.queue[i].status = Some(status);
        if status != WcStatus::Success {
            qp.state = QpState::Err;
            // Not completed yet (the head is this one or before it), so
            // still free to be told apart.
            for p in qp.queue.iter_mut().skip(i + 1) {
                p.status = Some(WcStatus::WrFlushErr);
            }
        }
        self.complete(qpn);
    }

    /// Queue pair `qpn` goes to ERR: everything outstanding is flushed.
    pub fn flush(&mut self, qpn: u32) {
        let Some(qp) = self.qps.get_mut(&qpn) else { return };
        qp.state = QpState::Err;
        for p in qp.queue.iter_mut().filter(|p| p.status.is_none()) {
            p.status = Some(WcStatus::WrFlushErr);
        }
        self.complete(qpn);
    }

    /// Moves the send queue's head into its completion queue while the
    /// head's outcome is known. A full completion queue loses the
    /// completion and is overrun: an event, and its queue pairs to ERR.
    pub fn complete(&mut self, qpn: u32) {
        let mut overran = None;
        loop {
            let Some(qp) = self.qps.get_mut(&qpn) else { return };
            let Some(status) = qp.queue.front().and_then(|p| p.status) else { break };
            let p = qp.queue.pop_front().expect("looked at above");
            let cq_id = qp.cq;
            hold(&mut self.mrs, &p.wr, false);
            let bytes = if status == WcStatus::Success { p.wr.len() } else { 0 };
            let cq = self.cqs.get_mut(&cq_id).expect("a queue pair's completion queue outlives it");
            if cq.done.len() >= cq.capacity {
                if !cq.overrun {
                    cq.overrun = true;
                    overran = Some(cq_id);
                }
                continue;
            }
            cq.done.push_back(Completion { wr_id: p.wr.wr_id, qp: QpNum(qpn), status, bytes });
            assert!(cq.done.len() <= cq.capacity);
        }
        if let Some(cq) = overran {
            self.push_event(PortEvent::CqOverrun(CqId(cq)));
            let on: Vec<u32> = self.qps.iter().filter(|(_, q)| q.cq == cq).map(|(&n, _)| n).collect();
            for n in on {
                // The completion queue is marked overrun already: these
                // drop their completions without coming back here.
                self.flush(n);
            }
        }
    }

    /// Drops queue pair `qpn`'s outstanding work without completions (a
    /// move to RESET, or its end), freeing the regions it named.
    pub fn drop_queue(&mut self, qpn: u32) {
        let Some(qp) = self.qps.get_mut(&qpn) else { return };
        let queue = std::mem::take(&mut qp.queue);
        for p in &queue {
            hold(&mut self.mrs, &p.wr, false);
        }
    }
}

/// Counts `wr`'s hold on the regions its entries name: taken when it is
/// posted, let go when it leaves its queue. Inline data holds none (its
/// bytes were taken at post).
pub fn hold(mrs: &mut HashMap<u32, Region>, wr: &WorkRequest, take: bool) {
    for s in wr.sges.iter().filter(|_| !wr.inline) {
        if let Some(r) = mrs.get_mut(&s.lkey) {
            r.in_use = if take { r.in_use + 1 } else { r.in_use.saturating_sub(1) };
        }
    }
}

/// Appends `len` bytes at `addr` to `out`: a raw copy, through no Rust
/// reference to that memory, which peers and the application may write
/// meanwhile (as they may while a device reads it).
///
/// # Safety
/// `[addr, addr + len)` must be mapped and readable for the call (a
/// registered region whose guard the caller holds).
pub unsafe fn append_from(out: &mut Vec<u8>, addr: u64, len: usize) {
    out.reserve(len);
    let at = out.len();
    // SAFETY: the caller vouches for the source; the destination is the
    // `len` bytes just reserved past the end of `out`, writable and ours
    // (`copy`, a memmove, would be right even if the two overlapped);
    // `set_len` then covers exactly the bytes written.
    unsafe {
        std::ptr::copy(addr as *const u8, out.as_mut_ptr().add(at), len);
        out.set_len(at + len);
    }
}

/// Where bytes `[offset, offset + len)` of a work request lie in its
/// scatter-gather list: `(entry, address, bytes)` for each piece, in order.
pub fn spans(sges: &[Sge], offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, usize)> + '_ {
    let end = offset.saturating_add(len);
    let mut at = 0u64;
    sges.iter().enumerate().filter_map(move |(i, s)| {
        let (start, stop) = (at, at + u64::from(s.len));
        at = stop;
        let (from, to) = (start.max(offset), stop.min(end));
        (from < to).then(|| (i, s.addr + (from - start), (to - from) as usize))
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::fabric::{Sges, Verb};
    use super::*;

    #[test]
    fn spans_cut_a_gather_list_at_any_offset() {
        let sges = [
            Sge { addr: 1000, len: 10, lkey: 1 },
            Sge { addr: 5000, len: 0, lkey: 1 },
            Sge { addr: 9000, len: 20, lkey: 2 },
        ];
        let all: Vec<_> = spans(&sges, 0, 30).collect();
        assert_eq!(all, [(0, 1000, 10), (2, 9000, 20)]);
        assert_eq!(spans(&sges, 5, 10).collect::<Vec<_>>(), [(0, 1005, 5), (2, 9000, 5)]);
        assert_eq!(spans(&sges, 12, 100).collect::<Vec<_>>(), [(2, 9002, 18)]);
        assert_eq!(spans(&sges, 30, 5).count(), 0);
    }

    fn queues(capacity: usize) -> Queues {
        let mut q = Queues::default();
        q.cqs.insert(0, Cq { capacity, done: VecDeque::new(), overrun: false });
        for n in [1, 2] {
            q.qps.insert(
                n,
                Qp {
                    cq: 0,
                    caps: QpCaps { max_send_wr: 16, max_sge: 1, max_inline: 0 },
                    state: QpState::Rts,
                    access: Access::ALL,
                    peer: None,
                    link: None,
                    retry_ns: 0,
                    queue: VecDeque::new(),
                    next_seq: 0,
                },
            );
        }
        q
    }

    fn post(q: &mut Queues, qpn: u32, wr_id: u64) -> u64 {
        let qp = q.qps.get_mut(&qpn).unwrap();
        let seq = qp.next_seq;
        qp.next_seq += 1;
        let sges = Sges::one(Sge { addr: 0, len: 8, lkey: 1 });
        let wr = WorkRequest { wr_id, verb: Verb::Write, sges, remote_addr: 0, rkey: 0, inline: false };
        qp.queue.push_back(Posted { seq, wr, data: None, status: None });
        seq
    }

    fn done(q: &mut Queues) -> Vec<(u64, WcStatus)> {
        q.cqs.get_mut(&0).unwrap().done.drain(..).map(|c| (c.wr_id, c.status)).collect()
    }

    #[test]
    fn completions_come_in_posting_order_whatever_order_outcomes_come_in() {
        use WcStatus::*;
        let mut q = queues(64);
        let s: Vec<u64> = (0..4).map(|i| post(&mut q, 1, i)).collect();
        q.finish(1, s[1], Success);
        assert_eq!(done(&mut q), [], "the head is still out");
        q.finish(1, s[2], LocProtErr);
        assert_eq!(q.qps[&1].state, QpState::Err);
        q.finish(1, s[3], Success); // too late: flushed already
        q.finish(1, s[0], Success);
        assert_eq!(done(&mut q), [(0, Success), (1, Success), (2, LocProtErr), (3, WrFlushErr)]);
        q.finish(1, s[0], RetryExcErr); // gone: ignored
        assert_eq!(done(&mut q), []);
        let s = post(&mut q, 2, 9);
        q.flush(2);
        q.finish(2, s, Success);
        assert_eq!(done(&mut q), [(9, WrFlushErr)]);
    }

    /// A later request's failure learnt first (a link's sender fails the
    /// request it held, then the receiver the ones on the wire): the
    /// earliest failure is reported and everything after it flushed, so
    /// the queue reads as a device's would.
    #[test]
    fn the_first_failure_in_posting_order_is_the_one_reported() {
        use WcStatus::*;
        let mut q = queues(64);
        let s: Vec<u64> = (0..6).map(|i| post(&mut q, 1, i)).collect();
        q.finish(1, s[3], RetryExcErr);
        q.finish(1, s[1], Success);
        assert_eq!(done(&mut q), []);
        q.finish(1, s[0], Success);
        q.finish(1, s[2], RemAccessErr);
        assert_eq!(
            done(&mut q),
            [(0, Success), (1, Success), (2, RemAccessErr), (3, WrFlushErr), (4, WrFlushErr), (5, WrFlushErr)]
        );
        let s: Vec<u64> = (0..3).map(|i| post(&mut q, 2, 10 + i)).collect();
        q.finish(2, s[2], RetryExcErr);
        q.finish(2, s[1], Success);
        q.finish(2, s[0], RetryExcErr);
        assert_eq!(done(&mut q), [(10, RetryExcErr), (11, WrFlushErr), (12, WrFlushErr)]);
    }

    #[test]
    fn a_full_completion_queue_is_overrun_and_its_queue_pairs_go_to_err() {
        let mut q = queues(2);
        let s: Vec<u64> = (0..3).map(|i| post(&mut q, 1, i)).collect();
        let other = post(&mut q, 2, 10);
        for seq in s {
            q.finish(1, seq, WcStatus::Success);
        }
        assert_eq!(q.events, [PortEvent::CqOverrun(CqId(0))]);
        assert!(q.qps.values().all(|p| p.state == QpState::Err && p.queue.is_empty()));
        assert_eq!(done(&mut q).len(), 2, "the third completion and the flush are lost");
        assert!(q.pending(2, other).is_none());
    }
}
