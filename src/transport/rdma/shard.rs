//! The RDMA work of a shard, polled in the shard's own loop next to its
//! io_uring ring.
//!
//! [`install`] puts a [`SliceEngine`] (with the [`Connector`] it makes
//! endpoints through) in a shard's locals and adds a poll hook; the hook
//! drives the engine on every loop iteration and hands each settled
//! request to the callback it came with. A shard with RDMA work in flight
//! does not park: a completion queue polled without a completion channel
//! wakes nobody. [`submit`] hands a request to the shard from any thread,
//! over the runtime's rings; nothing is shared, nothing is locked.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Instant;

use super::slices::{Connector, REQUESTS_MAX, RdmaRequest, SliceEngine};
use crate::runtime::{PollHook, Runtime, ShardCtx};

/// What is called once a request settles, on the shard's thread.
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A shard's RDMA state, in its locals.
struct ShardRdma {
    engine: SliceEngine,
    connector: Box<dyn Connector>,
    waiting: HashMap<u64, Done>,
}

/// Drives the shard's [`ShardRdma`].
struct RdmaHook {
    /// Requests in flight after the last poll.
    in_flight: Rc<Cell<usize>>,
}

/// Nanoseconds since the first call in this process: the slice engine's
/// clock (rail pauses).
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl PollHook for RdmaHook {
    fn poll(&mut self, ctx: &mut ShardCtx) -> usize {
        let Some(s) = ctx.local_mut::<ShardRdma>() else { return 0 };
        let mut work = usize::from(s.engine.progress(&mut *s.connector, now_ns()));
        for settled in s.engine.take_settled() {
            work += 1;
            match s.waiting.remove(&settled.id) {
                Some(done) => done(settled.result),
                None => log::warn!("RDMA: request {} settled with nobody waiting", settled.id),
            }
        }
        self.in_flight.set(s.engine.in_flight());
        work
    }

    fn can_park(&mut self) -> bool {
        self.in_flight.get() == 0
    }

    fn shutdown(&mut self, ctx: &mut ShardCtx) {
        if let Some(s) = ctx.take_local::<ShardRdma>() {
            for (_, done) in s.waiting {
                done(Err("the shard is shutting down".into()));
            }
        }
    }
}

/// Installs RDMA on `shard`: `make` runs there and returns the engine
/// and its connector.
pub fn install<F>(runtime: &Runtime, shard: usize, make: F) -> Result<(), String>
where
    F: FnOnce() -> Result<(SliceEngine, Box<dyn Connector>), String> + Send + 'static,
{
    let installed = runtime.call(shard, move |ctx: &mut ShardCtx| -> Result<(), String> {
        if ctx.local_mut::<ShardRdma>().is_some() {
            return Err(format!("shard {} has RDMA installed already", ctx.id()));
        }
        let (engine, connector) = make()?;
        ctx.insert_local(ShardRdma { engine, connector, waiting: HashMap::new() });
        ctx.add_poll_hook(Box::new(RdmaHook { in_flight: Rc::new(Cell::new(0)) }));
        Ok(())
    });
    installed.map_err(|e| format!("shard {shard}: {e}"))?
}

/// Hands `req` to `shard`; `done` is called there once it settles (or at
/// once, failed, if the shard cannot take it).
pub fn submit(runtime: &Runtime, shard: usize, req: RdmaRequest, done: Done) -> Result<(), String> {
    runtime
        .submit(shard, move |ctx: &mut ShardCtx| {
            let Some(s) = ctx.local_mut::<ShardRdma>() else {
                return done(Err("this shard has no RDMA".into()));
            };
            if s.waiting.contains_key(&req.id) || s.waiting.len() >= REQUESTS_MAX {
                return done(Err(format!("request {} refused: its id is in use, or the shard is full", req.id)));
            }
            s.waiting.insert(req.id, done);
            // A request that cannot be cut settles at once; the next poll
            // hands it to `done`.
            s.engine.submit(req);
        })
        .map_err(|e| format!("shard {shard}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::super::fabric::{Access, Context, CqId, Fabric, Verb};
    use super::super::sim::{FaultPlan, SimDevice, SimNetwork};
    use super::super::slices::{Answer, OurSide, RdmaConfig, answer_on};
    use super::*;
    use crate::proto::mooncake::message::{BufferDesc, DeviceDesc, SegmentDesc};
    use crate::proto::mooncake::rdma::RdmaSegment;
    use crate::runtime::RuntimeConfig;
    use crate::topo::PriorityMatrix;

    /// A passive peer on the simulated network: its contexts answer
    /// connections directly.
    struct SimPeer {
        ctxs: Vec<(Box<dyn Context>, CqId)>,
    }

    impl Connector for SimPeer {
        fn connect(&mut self, _peer: &str, peer_dev: usize, ours: OurSide<'_>) -> Result<Answer, String> {
            let (ctx, cq) = &mut self.ctxs[peer_dev];
            answer_on(ctx.as_mut(), *cq, &ours).map(Answer::Ready)
        }
    }

    #[test]
    fn a_shard_polls_its_rdma_work_beside_its_ring_and_settles_every_request_there() {
        let runtime = Runtime::start(RuntimeConfig::new(2)).unwrap();
        let devices =
            ["l0", "l1", "t0", "t1"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
        let net = SimNetwork::new(devices, FaultPlan::default(), 21);
        let bytes = 4usize << 20;
        let src: Vec<u8> = (0..bytes).map(|i| (i % 247) as u8).collect();
        let mut dst = vec![0u8; bytes];
        let (src_addr, dst_addr) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        // The peer's side: its devices register `dst`.
        let mut ctxs = Vec::new();
        let mut mrs = Vec::new();
        for n in ["t0", "t1"] {
            let mut c = net.open(n).unwrap();
            let cq = c.create_cq(4096).unwrap();
            // SAFETY: `dst` outlives the runtime, shut down below.
            mrs.push(unsafe { c.register(dst_addr, bytes as u64, Access::ALL) }.unwrap());
            ctxs.push((c, cq));
        }
        let desc = SegmentDesc {
            buffers: vec![BufferDesc {
                addr: dst_addr,
                length: bytes as u64,
                lkey: mrs.iter().map(|m| m.lkey).collect(),
                name: "cpu:0".into(),
                rkey: mrs.iter().map(|m| m.rkey).collect(),
            }],
            devices: ctxs
                .iter()
                .zip(["t0", "t1"])
                .map(|((c, _), n)| DeviceDesc { gid: c.info().gids[1].gid.to_string(), lid: 0, name: n.into() })
                .collect(),
            priority_matrix: None,
            ..SegmentDesc::new("peer", "rdma")
        };
        let segment = RdmaSegment::from_desc(&desc).unwrap();
        let n2 = net.clone();
        install(&runtime, 1, move || {
            let contexts = ["l0", "l1"].iter().map(|n| n2.open(n).unwrap()).collect();
            let mut e =
                SliceEngine::new(RdmaConfig::default(), contexts, PriorityMatrix::new()).map_err(|e| e.to_string())?;
            // SAFETY: `src` outlives the runtime, shut down below.
            unsafe { e.register(src_addr, bytes as u64, "cpu:0") }.map_err(|e| e.to_string())?;
            e.add_peer("peer", segment)?;
            Ok((e, Box::new(SimPeer { ctxs }) as Box<dyn Connector>))
        })
        .unwrap();
        assert!(install(&runtime, 1, || Err("unused".into())).unwrap_err().contains("installed already"));
        let (tx, rx) = mpsc::channel();
        let piece = (bytes / 16) as u64;
        for i in 0..16u64 {
            let req = RdmaRequest {
                id: i,
                verb: Verb::Write,
                peer: "peer".into(),
                local: src_addr + i * piece,
                remote: dst_addr + i * piece,
                len: piece,
                location: "cpu:0".into(),
                deadline_ns: None,
            };
            let tx = tx.clone();
            let done: Done = Box::new(move |r| {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                let _ = tx.send((i, r, thread));
            });
            submit(&runtime, 1, req, done).unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..16 {
            let (i, r, thread) = rx.recv_timeout(Duration::from_secs(30)).expect("a request never settled");
            assert_eq!(r, Ok(()), "request {i}");
            assert_eq!(thread, "shardwire-shard-1", "settled on the shard that owns the devices");
            seen.push(i);
        }
        seen.sort();
        assert_eq!(seen, (0..16).collect::<Vec<_>>(), "each request settles once");
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "and only once");
        assert!(dst == src);
        // A shard without RDMA says so.
        let (tx, rx) = mpsc::channel();
        let req = RdmaRequest {
            id: 99,
            verb: Verb::Write,
            peer: "peer".into(),
            local: src_addr,
            remote: dst_addr,
            len: 8,
            location: "cpu:0".into(),
            deadline_ns: None,
        };
        submit(&runtime, 0, req, Box::new(move |r| drop(tx.send(r)))).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Err("this shard has no RDMA".into()));
        runtime.shutdown();
        drop((src, dst));
    }
}
