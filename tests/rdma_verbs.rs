//! The `verbs` fabric on real devices: soft-RoCE in the VM of
//! `tools/rdma-vm` (where `RDMA_VM=1`), or whatever this machine has.
//!
//! Outside the VM, on a machine without devices, the tests that need one
//! say so and return; the fallback test runs everywhere (with devices, it
//! makes the fallback happen with a `device_name` no device has). In the
//! VM a missing device is a failure.

#![cfg(feature = "verbs")]

mod interop;

use std::time::{Duration, Instant};

use interop::pattern;
use shardwire::engine::{EngineConfig, TransferEngine};
use shardwire::transport::rdma::fabric::{
    Access, Completion, Context, CqId, Fabric, FabricError, Mr, PeerAddr, QpCaps, QpNum, QpState, Sge, Transition,
    Verb, WcStatus, WorkRequest, choose_gid,
};
use shardwire::transport::rdma::verbs::{LinkConfig, VerbsFabric};

fn in_vm() -> bool {
    std::env::var_os("RDMA_VM").is_some()
}

/// The active devices, or `None` (said on stderr) where there are none
/// and this is not the VM.
fn devices() -> Option<Vec<String>> {
    let fabric = VerbsFabric::new(LinkConfig::default());
    let names: Vec<String> = fabric
        .devices()
        .into_iter()
        .filter(|d| d.state == shardwire::transport::rdma::fabric::PortState::Active)
        .map(|d| d.name)
        .collect();
    if names.is_empty() {
        assert!(!in_vm(), "the VM must have soft-RoCE devices");
        eprintln!("no active RDMA device here: this test runs in tools/rdma-vm");
        return None;
    }
    Some(names)
}

/// Two contexts on `device`, each with a queue pair connected to the
/// other's through the device's own loopback, in RTS.
struct Pair {
    a: Box<dyn Context>,
    b: Box<dyn Context>,
    cq_a: CqId,
    qp_a: QpNum,
    qp_b: QpNum,
}

const CAPS: QpCaps = QpCaps { max_send_wr: 16, max_sge: 2, max_inline: 0 };

fn pair(device: &str) -> Pair {
    let fabric = VerbsFabric::new(LinkConfig::default());
    let (mut a, mut b) = (fabric.open(device).unwrap(), fabric.open(device).unwrap());
    let (cq_a, cq_b) = (a.create_cq(64).unwrap(), b.create_cq(64).unwrap());
    let (qp_a, qp_b) = (a.create_qp(cq_a, CAPS).unwrap(), b.create_qp(cq_b, CAPS).unwrap());
    let info = a.info();
    let gid = info.gids[choose_gid(&info.gids, None).unwrap()].gid;
    for (ctx, me, them) in [(&mut a, qp_a, qp_b), (&mut b, qp_b, qp_a)] {
        assert_eq!(ctx.qp_state(me).unwrap(), QpState::Reset);
        ctx.modify_qp(me, Transition::Init { access: Access::ALL }).unwrap();
        let peer = PeerAddr { gid, lid: info.lid, qp: them, mtu: info.active_mtu };
        ctx.modify_qp(me, Transition::Rtr { peer }).unwrap();
        ctx.modify_qp(me, Transition::Rts { timeout: 14, retry_cnt: 7, rnr_retry: 7 }).unwrap();
        assert_eq!(ctx.qp_state(me).unwrap(), QpState::Rts);
    }
    Pair { a, b, cq_a, qp_a, qp_b }
}

fn reg(ctx: &mut Box<dyn Context>, buf: &mut [u8], access: Access) -> Mr {
    // SAFETY: each test's buffers outlive the contexts that use them
    // (declared first, dropped last).
    unsafe { ctx.register(buf.as_mut_ptr() as u64, buf.len() as u64, access) }.unwrap()
}

fn wr(wr_id: u64, verb: Verb, local: &Mr, at: u64, len: u32, remote: &Mr, to: u64) -> WorkRequest {
    WorkRequest {
        wr_id,
        verb,
        sges: vec![Sge { addr: local.addr + at, len, lkey: local.lkey }],
        remote_addr: remote.addr + to,
        rkey: remote.rkey,
    }
}

/// Polls until `n` completions are in, or 20 s have passed (the CPU in
/// the VM is emulated: slow, but never this slow).
fn take(ctx: &mut Box<dyn Context>, cq: CqId, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        ctx.poll(cq, 16, &mut out).unwrap();
    }
    assert_eq!(out.len(), n, "completions within 20 s: {out:?}");
    out
}

#[test]
fn writes_and_reads_land_byte_for_byte_on_a_real_device() {
    let Some(devices) = devices() else { return };
    let (mut src, mut dst, mut back) = (pattern(1 << 20, 7), vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut p = pair(&devices[0]);
    let (ms, mb) = (reg(&mut p.a, &mut src, Access::ALL), reg(&mut p.a, &mut back, Access::ALL));
    let md = reg(&mut p.b, &mut dst, Access::ALL);
    // A chain of 16 writes of 64 KiB, posted in one call.
    let chain: Vec<WorkRequest> = (0..16u64).map(|i| wr(i, Verb::Write, &ms, i << 16, 1 << 16, &md, i << 16)).collect();
    p.a.post(p.qp_a, &chain).unwrap();
    let done = take(&mut p.a, p.cq_a, 16);
    assert!(done.iter().all(|c| c.status == WcStatus::Success && c.bytes == 1 << 16 && c.qp == p.qp_a), "{done:?}");
    assert!(dst == src, "every byte written");
    // Read it back, in two pieces of a chain.
    let reads =
        [wr(100, Verb::Read, &mb, 0, 1 << 19, &md, 0), wr(101, Verb::Read, &mb, 1 << 19, 1 << 19, &md, 1 << 19)];
    p.a.post(p.qp_a, &reads).unwrap();
    let done = take(&mut p.a, p.cq_a, 2);
    assert!(done.iter().all(|c| c.status == WcStatus::Success), "{done:?}");
    assert!(back == src, "every byte read back");
    // The regions are free again: both can go.
    p.a.deregister(mb.lkey).unwrap();
    p.b.deregister(md.lkey).unwrap();
    assert!(matches!(p.b.deregister(md.lkey), Err(FabricError::NoRegion(_))));
}

#[test]
fn the_device_refuses_bad_keys_and_bounds_and_flushes_after_an_error() {
    let Some(devices) = devices() else { return };
    let (mut src, mut dst, mut ro) = (pattern(1 << 16, 3), vec![0u8; 1 << 16], vec![0u8; 4096]);
    let mut p = pair(&devices[0]);
    let ms = reg(&mut p.a, &mut src, Access::ALL);
    let md = reg(&mut p.b, &mut dst, Access::ALL);
    let read_only = reg(&mut p.b, &mut ro, Access { local_write: true, remote_read: true, remote_write: false });
    // Posting before RTS is refused by us, precisely.
    let idle = p.a.create_qp(p.cq_a, CAPS).unwrap();
    let e = p.a.post(idle, &[wr(1, Verb::Write, &ms, 0, 64, &md, 0)]).unwrap_err();
    assert!(matches!(e, FabricError::NotReady { state: QpState::Reset, .. }), "{e}");
    // More than MC_MAX_WR outstanding is refused before the device sees it.
    let many: Vec<WorkRequest> = (0..17u64).map(|i| wr(i, Verb::Write, &ms, 0, 64, &md, 0)).collect();
    assert!(matches!(p.a.post(p.qp_a, &many), Err(FabricError::QueueFull { .. })));
    // A write into a region without remote write: the peer refuses it; the
    // queue pair is in error and flushes what follows.
    let chain = [wr(10, Verb::Write, &ms, 0, 64, &read_only, 0), wr(11, Verb::Write, &ms, 0, 64, &md, 0)];
    p.a.post(p.qp_a, &chain).unwrap();
    // The region cannot go while work naming it is outstanding (or it
    // completed already: then it can, later).
    let done = take(&mut p.a, p.cq_a, 2);
    assert_eq!(done[0].wr_id, 10);
    assert_eq!(done[0].status, WcStatus::RemAccessErr, "{done:?}");
    assert_eq!(done[1].status, WcStatus::WrFlushErr, "{done:?}");
    assert_eq!(p.a.qp_state(p.qp_a).unwrap(), QpState::Err);
    assert!(dst.iter().all(|&b| b == 0) && ro.iter().all(|&b| b == 0), "no byte landed");
    let e = p.a.post(p.qp_a, &[wr(12, Verb::Write, &ms, 0, 64, &md, 0)]).unwrap_err();
    assert!(matches!(e, FabricError::NotReady { state: QpState::Err, .. }), "{e}");
    // A bad rkey on a fresh pair; then a length past the peer's region.
    let mut p = pair(&devices[0]);
    let ms = reg(&mut p.a, &mut src, Access::ALL);
    let md = reg(&mut p.b, &mut dst, Access::ALL);
    let mut bad = wr(20, Verb::Write, &ms, 0, 64, &md, 0);
    bad.rkey ^= 0x5a5a_0000;
    p.a.post(p.qp_a, &[bad]).unwrap();
    assert_eq!(take(&mut p.a, p.cq_a, 1)[0].status, WcStatus::RemAccessErr);
    let mut p = pair(&devices[0]);
    let ms = reg(&mut p.a, &mut src, Access::ALL);
    let md = reg(&mut p.b, &mut dst, Access::ALL);
    p.a.post(p.qp_a, &[wr(30, Verb::Write, &ms, 0, 4096, &md, (1 << 16) - 100)]).unwrap();
    assert_eq!(take(&mut p.a, p.cq_a, 1)[0].status, WcStatus::RemAccessErr, "past the region's end");
    // A local entry outside its region.
    let mut p = pair(&devices[0]);
    let ms = reg(&mut p.a, &mut src, Access::ALL);
    let md = reg(&mut p.b, &mut dst, Access::ALL);
    let mut outside = wr(40, Verb::Write, &ms, 0, 64, &md, 0);
    outside.sges[0].lkey ^= 0x0101_0000;
    p.a.post(p.qp_a, &[outside]).unwrap();
    let s = take(&mut p.a, p.cq_a, 1)[0].status;
    assert!(s.is_local(), "a bad lkey is this side's fault: {s}");
    let _ = p.qp_b;
}

#[test]
fn two_engines_move_bytes_over_every_soft_roce_device() {
    let Some(devices) = devices() else { return };
    let engine = || {
        let config = EngineConfig { local: false, ..EngineConfig::from_env().unwrap() };
        let e = TransferEngine::with_config(config);
        e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "").expect("initialize");
        e
    };
    let (target, initiator) = (engine(), engine());
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "rdma");
    interop::round_trips(&initiator, &target, &name, 4 << 20);
    let moved = initiator.rdma_device_bytes().unwrap();
    assert_eq!(moved.len(), devices.len(), "{moved:?}");
    assert!(moved.iter().all(|(_, b)| *b > 0), "every device carried slices: {moved:?}");
    assert!(moved.iter().map(|(_, b)| b).sum::<u64>() >= 2 * (5 << 20), "{moved:?}");
}

#[test]
fn with_no_device_to_use_rdma_falls_back_to_tcp() {
    // Without devices, any name; with them, one no device has.
    let device_name = if devices().is_some() { "no_such_device" } else { "" };
    let engine = || {
        let config = EngineConfig { local: false, ..EngineConfig::from_env().unwrap() };
        let e = TransferEngine::with_config(config);
        e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", device_name).expect("initialize falls back");
        e
    };
    let (target, initiator) = (engine(), engine());
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "tcp");
    assert!(initiator.rdma_device_bytes().unwrap().is_empty());
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    let data = pattern(1 << 20, 5);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write(&name, local, remote, 1 << 20).unwrap();
    assert!(target.read_bytes_from_buffer(remote, 1 << 20).unwrap() == data);
}
