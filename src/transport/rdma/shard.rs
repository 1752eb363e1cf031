//! The RDMA work of a shard, polled in the shard's own loop next to its
//! io_uring ring.
//!
//! [`install`] puts a [`SliceEngine`] (with the [`Connector`] it makes
//! endpoints through) in a shard's locals, under a key (one per transfer
//! engine: several may share a runtime), and adds the poll hook once; the
//! hook drives every installed engine on every loop iteration and hands
//! each settled request to the callback it came with. A shard with RDMA work in flight
//! does not park: a completion queue polled without a completion channel
//! wakes nobody. [`submit`] hands a request to the shard from any thread,
//! over the runtime's rings; nothing is shared, nothing is locked.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Instant;

use super::idhash::IdMap;
use super::slices::{Connector, REQUESTS_MAX, RdmaRequest, Settled, SliceEngine};
use crate::runtime::{PollHook, Runtime, ShardCtx};

/// What is called once a request settles, on the shard's thread.
pub type Done = Box<dyn FnOnce(Settled) + Send>;

/// A request that failed without reaching a slice engine.
fn refused(id: u64, why: String) -> Settled {
    Settled { id, result: Err(why), rails_failed: false, peer_gone: false }
}

/// One engine's RDMA state on a shard.
struct ShardRdma {
    engine: SliceEngine,
    connector: Box<dyn Connector>,
    waiting: IdMap<u64, Done>,
}

/// A shard's RDMA states, by key, in its locals.
#[derive(Default)]
struct ShardRdmas {
    by_key: IdMap<u64, ShardRdma>,
}

/// Engines one shard may carry.
pub const ENGINES_PER_SHARD_MAX: usize = 256;

/// Drives the shard's [`ShardRdma`].
struct RdmaHook {
    /// Requests in flight after the last poll.
    in_flight: Rc<Cell<usize>>,
}

/// Nanoseconds since the first call in this process: the slice engine's
/// clock (rail pauses).
fn now_ns() -> u64 {
    clock_ns(Instant::now())
}

/// `at` on the slice engines' clock (a deadline, say).
pub fn clock_ns(at: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*START.get_or_init(Instant::now)).as_nanos() as u64
}

impl PollHook for RdmaHook {
    fn poll(&mut self, ctx: &mut ShardCtx) -> usize {
        let Some(all) = ctx.local_mut::<ShardRdmas>() else { return 0 };
        let (mut work, mut in_flight) = (0, 0);
        let now = now_ns();
        for s in all.by_key.values_mut() {
            work += usize::from(s.engine.progress(&mut *s.connector, now));
            for settled in s.engine.drain_settled() {
                work += 1;
                match s.waiting.remove(&settled.id) {
                    Some(done) => done(settled),
                    None => log::warn!("RDMA: request {} settled with nobody waiting", settled.id),
                }
            }
            in_flight += s.engine.in_flight();
        }
        self.in_flight.set(in_flight);
        work
    }

    fn can_park(&mut self) -> bool {
        self.in_flight.get() == 0
    }

    fn shutdown(&mut self, ctx: &mut ShardCtx) {
        if let Some(all) = ctx.take_local::<ShardRdmas>() {
            for s in all.by_key.into_values() {
                for (id, done) in s.waiting {
                    done(refused(id, "the shard is shutting down".into()));
                }
            }
        }
    }
}

/// Removes the engine under `key` from `shard`: requests still waiting
/// fail, and its contexts close.
pub fn uninstall(runtime: &Runtime, shard: usize, key: u64) {
    let _ = runtime.call(shard, move |ctx: &mut ShardCtx| {
        if let Some(s) = ctx.local_mut::<ShardRdmas>().and_then(|all| all.by_key.remove(&key)) {
            for (id, done) in s.waiting {
                done(refused(id, "the engine is shutting down".into()));
            }
        }
    });
}

/// Runs `f` on the engine under `key`, on its shard, and returns what it
/// returns.
pub fn with_engine<R, F>(runtime: &Runtime, shard: usize, key: u64, f: F) -> Result<R, String>
where
    F: FnOnce(&mut SliceEngine) -> R + Send + 'static,
    R: Send + 'static,
{
    let r = runtime.call(shard, move |ctx: &mut ShardCtx| {
        ctx.local_mut::<ShardRdmas>().and_then(|all| all.by_key.get_mut(&key)).map(|s| f(&mut s.engine))
    });
    r.map_err(|e| format!("shard {shard}: {e}"))?.ok_or_else(|| format!("shard {shard} carries no RDMA engine {key}"))
}

/// Installs an RDMA engine on `shard` under `key`: `make` runs there and
/// returns the engine and its connector.
pub fn install<F>(runtime: &Runtime, shard: usize, key: u64, make: F) -> Result<(), String>
where
    F: FnOnce() -> Result<(SliceEngine, Box<dyn Connector>), String> + Send + 'static,
{
    let installed = runtime.call(shard, move |ctx: &mut ShardCtx| -> Result<(), String> {
        if ctx.local_mut::<ShardRdmas>().is_none() {
            ctx.insert_local(ShardRdmas::default());
            ctx.add_poll_hook(Box::new(RdmaHook { in_flight: Rc::new(Cell::new(0)) }));
        }
        let all = ctx.local_mut::<ShardRdmas>().expect("inserted above");
        if all.by_key.contains_key(&key) {
            return Err(format!("RDMA engine {key} is installed already"));
        }
        if all.by_key.len() >= ENGINES_PER_SHARD_MAX {
            return Err(format!("{ENGINES_PER_SHARD_MAX} RDMA engines on this shard already"));
        }
        let (engine, connector) = make()?;
        all.by_key.insert(key, ShardRdma { engine, connector, waiting: IdMap::default() });
        Ok(())
    });
    installed.map_err(|e| format!("shard {shard}: {e}"))?
}

/// [`submit`] that does not wait for room in the ring (from a shard's own
/// thread, which must not block): refused at once when it is full.
pub fn try_submit(runtime: &Runtime, shard: usize, key: u64, req: RdmaRequest, done: Done) -> Result<(), String> {
    runtime.try_submit(shard, take(key, req, done)).map_err(|e| format!("shard {shard}: {e}"))
}

/// The task that hands `req` to the engine under `key` on its shard.
fn take(key: u64, req: RdmaRequest, done: Done) -> impl FnOnce(&mut ShardCtx) + Send + 'static {
    move |ctx: &mut ShardCtx| {
        let Some(s) = ctx.local_mut::<ShardRdmas>().and_then(|all| all.by_key.get_mut(&key)) else {
            return done(refused(req.id, "this shard has no RDMA".into()));
        };
        if s.waiting.contains_key(&req.id) || s.waiting.len() >= REQUESTS_MAX {
            return done(refused(
                req.id,
                format!("request {} refused: its id is in use, or the shard is full", req.id),
            ));
        }
        s.waiting.insert(req.id, done);
        // A request that cannot be cut settles at once; the next poll
        // hands it to `done`.
        s.engine.submit(req);
    }
}

/// Hands `req` to the engine under `key` on `shard`; `done` is called
/// there once it settles (or at once, failed, if it cannot be taken).
pub fn submit(runtime: &Runtime, shard: usize, key: u64, req: RdmaRequest, done: Done) -> Result<(), String> {
    runtime.submit(shard, take(key, req, done)).map_err(|e| format!("shard {shard}: {e}"))
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
        fn connect(
            &mut self,
            _peer: &str,
            peer_dev: usize,
            _peer_device: &str,
            ours: OurSide<'_>,
        ) -> Result<Answer, String> {
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
        install(&runtime, 1, 7, move || {
            let contexts = ["l0", "l1"].iter().map(|n| n2.open(n).unwrap()).collect();
            let mut e =
                SliceEngine::new(RdmaConfig::default(), contexts, PriorityMatrix::new()).map_err(|e| e.to_string())?;
            // SAFETY: `src` outlives the runtime, shut down below.
            unsafe { e.register(src_addr, bytes as u64, "cpu:0") }.map_err(|e| e.to_string())?;
            e.add_peer("peer", segment, 0)?;
            Ok((e, Box::new(SimPeer { ctxs }) as Box<dyn Connector>))
        })
        .unwrap();
        assert!(install(&runtime, 1, 7, || Err("unused".into())).unwrap_err().contains("installed already"));
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
                deadline_ns: None,
            };
            let tx = tx.clone();
            let done: Done = Box::new(move |r| {
                let thread = std::thread::current().name().unwrap_or("").to_string();
                let _ = tx.send((i, r.result, thread));
            });
            submit(&runtime, 1, 7, req, done).unwrap();
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
            deadline_ns: None,
        };
        submit(&runtime, 0, 7, req, Box::new(move |r| drop(tx.send(r.result)))).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Err("this shard has no RDMA".into()));
        runtime.shutdown();
        drop((src, dst));
    }
}
