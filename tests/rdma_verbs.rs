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
    Access, Completion, Context, CqId, Fabric, FabricError, Mr, PeerAddr, QpCaps, QpNum, QpState, Transition, Verb,
    WcStatus, WorkRequest, choose_gid,
};
use shardwire::transport::rdma::verbs::{LinkConfig, VerbsFabric};

/// Warnings and errors to stderr (the harness shows them for a failing
/// test): fallbacks, lost devices, retries.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Log lines on stderr, at info and above (once per test binary).
fn logging() {
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

fn in_vm() -> bool {
    std::env::var_os("RDMA_VM").is_some()
}

/// The active devices, or `None` (said on stderr) where there are none
/// and this is not the VM.
fn devices() -> Option<Vec<String>> {
    logging();
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
    WorkRequest::between(wr_id, verb, local, at, len, remote, to)
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

/// A shardwire engine over RDMA on `device`, its peers not on the local
/// transport.
fn rdma_engine(device: &str) -> TransferEngine {
    logging();
    let config = EngineConfig { local: false, ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", device).expect("initialize");
    e
}

/// The device of the Mooncake peer: across the veth from ours (rxe0) in
/// the wired VM, the same device (its loopback) elsewhere.
fn mooncake_device(devices: &[String]) -> &str {
    if std::env::var_os("RDMA_VM_WIRED").is_some() { "rxb0" } else { &devices[0] }
}

/// Mooncake's own RDMA descriptor, as its RPC port sends it: the shape
/// Mooncake documents, decoded, and written back field for field. With
/// `SHARDWIRE_CAPTURE_DESCRIPTOR=<file>` it is saved there (the golden
/// copy in `proto::mooncake::rdma`'s tests came so).
fn mooncakes_descriptor_decodes_and_writes_back_as_it_came(target: &str) {
    use shardwire::meta::p2p::{CallOptions, call};
    use shardwire::proto::mooncake::frame::FrameType;
    use shardwire::proto::mooncake::message::{SegmentDesc, from_wire, to_wire};
    use shardwire::proto::mooncake::rdma::RdmaSegment;
    let ours = to_wire(&SegmentDesc::new("127.0.0.1:1", "rdma"));
    let raw = call(target, FrameType::Metadata, &ours, &CallOptions::default()).expect("Mooncake's descriptor");
    if let Some(path) = std::env::var_os("SHARDWIRE_CAPTURE_DESCRIPTOR") {
        std::fs::write(path, &raw).unwrap();
    }
    let value: serde_json::Value = from_wire(&raw).expect("JSON");
    assert_eq!(value["protocol"], "rdma", "{value}");
    let devices = value["devices"].as_array().expect("a devices array");
    assert!(!devices.is_empty());
    for d in devices {
        assert!(d["name"].is_string() && d["lid"].is_u64() && d["gid"].is_string(), "{d}");
    }
    let buffers = value["buffers"].as_array().expect("a buffers array");
    assert!(!buffers.is_empty());
    for b in buffers {
        assert!(b["name"].is_string() && b["addr"].is_u64() && b["length"].is_u64(), "{b}");
        assert_eq!(b["lkey"].as_array().map(Vec::len), Some(devices.len()), "{b}");
        assert_eq!(b["rkey"].as_array().map(Vec::len), Some(devices.len()), "{b}");
    }
    assert!(value["priority_matrix"].is_object(), "{value}");
    let desc: SegmentDesc = from_wire(&raw).expect("a segment descriptor");
    let segment = RdmaSegment::from_desc(&desc).expect("an RDMA segment");
    let mut again = desc.clone();
    segment.write_into(&mut again);
    let again = serde_json::to_value(&again).unwrap();
    for field in ["devices", "buffers", "priority_matrix", "protocol", "name"] {
        assert_eq!(again[field], value[field], "{field} written back as it came");
    }
}

#[test]
fn a_shardwire_initiator_writes_and_reads_a_mooncake_rdma_target() {
    let Some(devices) = devices() else { return };
    let mut target = interop::MooncakePeer::rdma_target(8 << 20, mooncake_device(&devices));
    mooncakes_descriptor_decodes_and_writes_back_as_it_came(&target.name);
    let me = rdma_engine(&devices[0]);
    assert_eq!(me.transport_for(&target.name).unwrap(), "rdma", "Mooncake's descriptor is an RDMA one");
    let local = me.allocate_managed_buffer(8 << 20).unwrap();
    for (seed, (at, len)) in [(0u64, 4096u64), (4096, 65_537), (1 << 20, 3 << 20), (0, 8 << 20)].into_iter().enumerate()
    {
        let data = pattern(len as usize, seed as u64);
        me.write_bytes_to_buffer(local, &data).unwrap();
        me.transfer_sync_write(&target.name, local, target.buffer + at, len).unwrap();
        // The target checks the pattern at the same offset.
        assert_eq!(target.cmd(&format!("check {at} {len} {seed}")), "ok", "{len} bytes at {at}");
        target.cmd(&format!("fill {at} {len} {}", seed + 50));
        me.transfer_sync_read(&target.name, local, target.buffer + at, len).unwrap();
        assert!(me.read_bytes_from_buffer(local, len).unwrap() == pattern(len as usize, seed as u64 + 50));
    }
    let moved = me.rdma_device_bytes().unwrap();
    assert!(moved.iter().map(|(_, b)| b).sum::<u64>() >= 2 * (4096 + 65_537 + (3 << 20) + (8 << 20)), "{moved:?}");
    target.kill();
}

#[test]
fn a_mooncake_rdma_initiator_writes_and_reads_a_shardwire_target() {
    let Some(devices) = devices() else { return };
    let me = rdma_engine(&devices[0]);
    let name = me.segment_name().unwrap();
    let buffer = me.allocate_managed_buffer(8 << 20).unwrap();
    let mut peer = interop::MooncakePeer::rdma_initiator(&name, buffer, 8 << 20, mooncake_device(&devices));
    for (seed, (at, len)) in [(0u64, 4096u64), (4096, 65_537), (1 << 20, 3 << 20)].into_iter().enumerate() {
        let answer = peer.cmd(&format!("write {at} {len} {seed}"));
        assert!(answer.starts_with("ok"), "{answer}");
        let landed = me.read_bytes_from_buffer(buffer + at, len).unwrap();
        assert!(landed == pattern(len as usize, seed as u64), "{len} bytes at {at} landed");
        let answer = peer.cmd(&format!("read {at} {len} {seed}"));
        assert!(answer.starts_with("ok"), "{answer}");
    }
    peer.kill();
}

/// Runs a command of the VM's network setup (tools/rdma-vm), checked.
fn sh(line: &str) {
    let out = std::process::Command::new("sh").args(["-c", line]).output().expect("sh runs");
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Puts the VM's devices back as tools/rdma-vm made them, however a test
/// ends.
struct Restore(Vec<&'static str>);

impl Drop for Restore {
    fn drop(&mut self) {
        for line in &self.0 {
            let _ = std::process::Command::new("sh").args(["-c", line]).output();
        }
        // The ports take a moment to come back ACTIVE (a drop does not
        // panic: the test's own failure says more).
        let _ = interop::poll_for(interop::WAIT, || devices().filter(|d| d.len() >= 2).ok_or(()));
    }
}

/// A batch of `count` writes of `len` bytes from `initiator` to `name`,
/// asynchronously: its id, and the pattern it writes.
fn start_batch(
    initiator: &TransferEngine,
    name: &str,
    local: u64,
    remote: u64,
    count: u64,
    len: u64,
) -> (u64, Vec<u8>) {
    let data = pattern((count * len) as usize, 77);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let requests: Vec<shardwire::engine::TransferRequest> = (0..count)
        .map(|k| shardwire::engine::TransferRequest {
            opcode: shardwire::engine::TransferOpcode::Write,
            source: local + k * len,
            target_offset: remote + k * len,
            length: len,
        })
        .collect();
    (initiator.batch_transfer_async(name, &requests).unwrap(), data)
}

#[test]
fn a_netdev_downed_mid_transfer_moves_the_slices_to_the_other_rail_then_to_tcp() {
    let Some(devices) = devices() else { return };
    assert!(devices.len() >= 2, "two rails: tools/rdma-vm --devices 2");
    // A link down drops its routes: the wired VM's are put back too.
    let _restore = Restore(vec![
        "ip link set swa0 up",
        "ip link set swa1 up",
        "ip route replace 169.254.1.2 dev swa0 src 169.254.1.1 table 100",
        "ip route replace 169.254.2.2 dev swa1 src 169.254.2.1 table 102",
    ]);
    let (target, initiator) = (rdma_engine(""), rdma_engine(""));
    let name = target.segment_name().unwrap();
    let size = 32u64 << 20;
    let remote = target.allocate_managed_buffer(size).unwrap();
    let local = initiator.allocate_managed_buffer(size).unwrap();
    let (batch, data) = start_batch(&initiator, &name, local, remote, 128, size / 128);
    std::thread::sleep(Duration::from_millis(300));
    sh("ip link set swa1 down");
    initiator.get_batch_transfer_status(&[batch]).expect("the batch completes on the rail left");
    assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data, "every byte landed once the rail went");
    eprintln!(
        "after rxe1 went down: {:?}, {} retries",
        initiator.rdma_device_bytes().unwrap(),
        initiator.rdma_slice_retries().unwrap()
    );
    // The last rail down too: the next transfer goes over TCP.
    sh("ip link set swa0 down");
    let data = pattern(4 << 20, 78);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write(&name, local, remote, 4 << 20).expect("no rail works: TCP carries it");
    assert!(target.read_bytes_from_buffer(remote, 4 << 20).unwrap() == data);
}

/// Whether this is the VM of `tools/rdma-vm --wired`: devices rxb0.. on
/// the far ends of the veths, reached over them.
fn wired() -> bool {
    if std::env::var_os("RDMA_VM_WIRED").is_none() {
        eprintln!("not the wired VM: this test runs in tools/rdma-vm --wired");
        return false;
    }
    true
}

/// Two "hosts" of the wired VM: a target on rxb0,rxb1 and an initiator
/// on rxe0,rxe1, every packet between them over a veth.
fn two_hosts() -> (TransferEngine, TransferEngine, String) {
    let (target, initiator) = (rdma_engine("rxb0,rxb1"), rdma_engine("rxe0,rxe1"));
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "rdma");
    (target, initiator, name)
}

#[test]
fn two_hosts_move_bytes_over_two_rails_of_veth_wire() {
    if !wired() {
        return;
    }
    let (target, initiator, name) = two_hosts();
    interop::round_trips(&initiator, &target, &name, 8 << 20);
    let moved = initiator.rdma_device_bytes().unwrap();
    let names: Vec<&str> = moved.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["rxe0", "rxe1"], "device_name keeps the initiator to its own devices");
    assert!(moved.iter().all(|(_, b)| *b > 0), "both rails carried slices: {moved:?}");
    assert_eq!(initiator.rdma_slice_retries().unwrap(), 0, "a clean wire needs no retries");
}

#[test]
fn loss_on_the_wire_is_repaired_by_the_queue_pairs() {
    if !wired() {
        return;
    }
    let _restore = Restore(vec!["tc qdisc del dev swa0 root", "tc qdisc del dev swa1 root"]);
    sh("tc qdisc add dev swa0 root netem loss 2%");
    sh("tc qdisc add dev swa1 root netem loss 2%");
    let (target, initiator, name) = two_hosts();
    // RC retransmits what is lost (retry_cnt 7 per packet), so the bytes
    // land and a slice fails only if a packet is lost 8 times running.
    interop::round_trips(&initiator, &target, &name, 4 << 20);
    eprintln!(
        "2% loss: {:?}, {} slice retries",
        initiator.rdma_device_bytes().unwrap(),
        initiator.rdma_slice_retries().unwrap()
    );
}

#[test]
fn a_rail_that_goes_silent_mid_transfer_hands_its_slices_to_the_other() {
    if !wired() {
        return;
    }
    let _restore = Restore(vec!["tc qdisc del dev swa1 root", "tc qdisc del dev swb1 root"]);
    let (target, initiator, name) = two_hosts();
    let size = 32u64 << 20;
    let remote = target.allocate_managed_buffer(size).unwrap();
    let local = initiator.allocate_managed_buffer(size).unwrap();
    let (batch, data) = start_batch(&initiator, &name, local, remote, 128, size / 128);
    std::thread::sleep(Duration::from_millis(300));
    // Every packet on the second veth is dropped, both ways: the queue
    // pairs through it exhaust their retries, and their slices go again
    // through the first.
    sh("tc qdisc add dev swa1 root netem loss 100%");
    sh("tc qdisc add dev swb1 root netem loss 100%");
    initiator.get_batch_transfer_status(&[batch]).expect("the batch completes through the rail left");
    assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data, "every byte landed");
    let retries = initiator.rdma_slice_retries().unwrap();
    eprintln!("a silent rail: {:?}, {retries} slice retries", initiator.rdma_device_bytes().unwrap());
}
