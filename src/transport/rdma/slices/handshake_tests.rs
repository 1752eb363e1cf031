//! Two slice engines joined the way two hosts are: endpoints made through
//! Mooncake's Connection exchange, each message written as the wire JSON
//! and checked on arrival.

use super::super::sim::{FaultPlan, SimDevice, SimNetwork};
use super::*;
use crate::proto::mooncake::message::{HandshakeDesc, from_wire, to_wire};
use crate::proto::mooncake::rdma::{NicPath, RdmaFault, rejection};
use crate::transport::rdma::fabric::Fabric;

/// Carries the Connection exchange to another engine in this process.
struct Handshake<'a> {
    me: &'a str,
    them: &'a mut SliceEngine,
    rounds: usize,
    /// Whether the MTU goes along (false: as with a Mooncake peer).
    send_mtu: bool,
}

impl Connector for Handshake<'_> {
    fn connect(&mut self, peer: &str, peer_dev: usize, peer_device: &str, ours: OurSide<'_>) -> Result<Answer, String> {
        assert_eq!(self.them.describe().devices[peer_dev].name, peer_device);
        let their_device = peer_device.to_string();
        let request = Connection {
            local: NicPath { server: self.me.to_string(), device: ours.device.name.clone() },
            peer: NicPath { server: peer.to_string(), device: their_device },
            lid: ours.device.lid,
            gid: ours.gid,
            qps: ours.qps.iter().map(|q| q.0).collect(),
            ready_ack: Some(true),
            mtu: self.send_mtu.then_some(ours.mtu),
            instance: None,
        };
        // The passive side, as its RPC handler will: decode, check,
        // accept or refuse with a reason.
        let arrived: HandshakeDesc = from_wire(&to_wire(&request.to_desc())).map_err(|e| e.to_string())?;
        let reply = match Connection::from_desc(&arrived).map_err(|e| e.to_string()).and_then(|c| self.them.accept(&c))
        {
            Ok(c) => c.to_desc(),
            Err(why) => rejection(&arrived, &why),
        };
        let back: HandshakeDesc = from_wire(&to_wire(&reply)).map_err(|e| e.to_string())?;
        let theirs = request.check_reply(&back).map_err(|e| e.to_string())?;
        assert_eq!(theirs.ready_ack, Some(true), "the passive side echoes ready_ack");
        self.rounds += 1;
        let qps = theirs.qps.into_iter().map(QpNum).collect();
        Ok(Answer::Ready(PeerSide {
            gid: theirs.gid,
            lid: theirs.lid,
            qps,
            mtu: theirs.mtu.filter(|_| self.send_mtu),
            instance: theirs.instance,
        }))
    }
}

fn engine(net: &SimNetwork, names: [&str; 2], mem: &mut [u8]) -> SliceEngine {
    let contexts = names.iter().map(|n| net.open(n).unwrap()).collect();
    let mut e = SliceEngine::new(RdmaConfig::default(), contexts, PriorityMatrix::new()).unwrap();
    // SAFETY: the test's memory outlives the engine.
    unsafe { e.register(mem.as_mut_ptr() as u64, mem.len() as u64, "cpu:0") }.unwrap();
    e
}

fn drive(e: &mut SliceEngine, c: &mut dyn Connector, net: &SimNetwork) -> Vec<Settled> {
    let mut settled = Vec::new();
    for _ in 0..100_000 {
        settled.extend(e.drain_settled());
        if e.in_flight() == 0 {
            return settled;
        }
        e.progress(c, net.now_ns());
    }
    panic!("{} requests never settled", e.in_flight());
}

#[test]
fn two_engines_connect_through_the_handshake_and_write_both_ways() {
    let devices = ["a0", "a1", "b0", "b1"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
    let net = SimNetwork::new(devices, FaultPlan::default(), 9);
    let mut mem_a: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    let mut mem_b: Vec<u8> = (0..1 << 20).map(|i| (i % 239) as u8).collect();
    let (want_a, want_b) = (mem_a.clone(), mem_b.clone());
    let mut a = engine(&net, ["a0", "a1"], &mut mem_a);
    let mut b = engine(&net, ["b0", "b1"], &mut mem_b);
    a.add_peer("B", b.describe(), 0).unwrap();
    b.add_peer("A", a.describe(), 0).unwrap();
    let (pa, pb) = (mem_a.as_ptr() as u64, mem_b.as_ptr() as u64);
    let write = |id, from: u64, to: u64, peer: &str| RdmaRequest {
        id,
        verb: Verb::Write,
        peer: peer.into(),
        local: from,
        remote: to + (512 << 10),
        len: 512 << 10,
        deadline_ns: None,
    };
    a.submit(write(1, pa, pb, "B"));
    let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
    assert_eq!(drive(&mut a, &mut h, &net), [Settled { id: 1, result: Ok(()), rails_failed: false, peer_gone: false }]);
    let made_by_a = h.rounds;
    assert!(made_by_a >= 2, "both of A's rails were connected ({made_by_a})");
    // B writes back over the endpoints A's handshakes made, and makes
    // the ones it still lacks the same way.
    b.submit(write(2, pb, pa, "A"));
    let mut h = Handshake { me: "B", them: &mut a, rounds: 0, send_mtu: true };
    assert_eq!(drive(&mut b, &mut h, &net), [Settled { id: 2, result: Ok(()), rails_failed: false, peer_gone: false }]);
    assert!(mem_b[512 << 10..] == want_a[..512 << 10], "A's bytes landed in B");
    assert!(mem_a[512 << 10..] == want_b[..512 << 10], "B's bytes landed in A");
    assert!(mem_a[..512 << 10] == want_a[..512 << 10] && mem_b[..512 << 10] == want_b[..512 << 10]);
}

/// B's ports take 1024-byte packets, A's 4096. With the MTU in the
/// handshake, both sides use 1024 and the write goes through; without
/// it (as between Mooncake engines, its issue #3868), A sends 4096-byte
/// packets that B's port drops, and the request fails.
#[test]
fn the_path_mtu_is_agreed_in_the_handshake() {
    for send_mtu in [true, false] {
        let mut devices: Vec<SimDevice> =
            ["a0", "b0"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
        devices[1].info.active_mtu = 1024;
        let net = SimNetwork::new(devices, FaultPlan::default(), 11);
        let mut mem_a = vec![7u8; 256 << 10];
        let mut mem_b = vec![0u8; 256 << 10];
        let contexts = |n: &str| vec![net.open(n).unwrap()];
        let config = RdmaConfig { retry_cnt: 2, ..RdmaConfig::default() };
        let mut a = SliceEngine::new(config, contexts("a0"), PriorityMatrix::new()).unwrap();
        let mut b = SliceEngine::new(config, contexts("b0"), PriorityMatrix::new()).unwrap();
        // SAFETY: the memory outlives the engines.
        unsafe {
            a.register(mem_a.as_mut_ptr() as u64, mem_a.len() as u64, "cpu:0").unwrap();
            b.register(mem_b.as_mut_ptr() as u64, mem_b.len() as u64, "cpu:0").unwrap();
        }
        a.add_peer("B", b.describe(), 0).unwrap();
        a.submit(RdmaRequest {
            id: 1,
            verb: Verb::Write,
            peer: "B".into(),
            local: mem_a.as_ptr() as u64,
            remote: mem_b.as_ptr() as u64,
            len: 256 << 10,
            deadline_ns: None,
        });
        let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu };
        let settled = drive(&mut a, &mut h, &net);
        if send_mtu {
            assert_eq!(settled[0].result, Ok(()));
            assert!(mem_b.iter().all(|&x| x == 7));
        } else {
            let why = settled[0].result.clone().unwrap_err();
            assert!(why.contains("retry counter exceeded"), "{why}");
        }
    }
}

/// Two engines on `devices` (names starting `a` are A's), each with
/// `bytes` of memory (a pattern in A's, zeros in B's), knowing each
/// other.
fn two(
    devices: Vec<SimDevice>,
    config: RdmaConfig,
    bytes: usize,
) -> (SimNetwork, SliceEngine, SliceEngine, Vec<u8>, Vec<u8>) {
    let names: Vec<String> = devices.iter().map(|d| d.info.name.clone()).collect();
    let net = SimNetwork::new(devices, FaultPlan::default(), 13);
    let open = |first: char| names.iter().filter(|n| n.starts_with(first)).map(|n| net.open(n).unwrap()).collect();
    let mut a = SliceEngine::new(config, open('a'), PriorityMatrix::new()).unwrap();
    let mut b = SliceEngine::new(config, open('b'), PriorityMatrix::new()).unwrap();
    let mut mem_a: Vec<u8> = (0..bytes).map(|i| (i % 241) as u8).collect();
    let mut mem_b = vec![0u8; bytes];
    // SAFETY: the memory is returned with the engines and outlives them
    // in every test.
    unsafe {
        a.register(mem_a.as_mut_ptr() as u64, bytes as u64, "cpu:0").unwrap();
        b.register(mem_b.as_mut_ptr() as u64, bytes as u64, "cpu:0").unwrap();
    }
    a.add_peer("B", b.describe(), 0).unwrap();
    b.add_peer("A", a.describe(), 0).unwrap();
    (net, a, b, mem_a, mem_b)
}

fn write_all(id: u64, from: &[u8], to: &[u8]) -> RdmaRequest {
    RdmaRequest {
        id,
        verb: Verb::Write,
        peer: "B".into(),
        local: from.as_ptr() as u64,
        remote: to.as_ptr() as u64,
        len: from.len() as u64,
        deadline_ns: None,
    }
}

#[test]
fn memory_above_max_mr_size_is_several_regions_and_slices_stay_inside_each() {
    let mut devices: Vec<SimDevice> =
        ["a0", "b0"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
    for d in &mut devices {
        d.info.max_mr_size = 1 << 20;
    }
    let (net, mut a, mut b, mem_a, mem_b) = two(devices, RdmaConfig::default(), (4 << 20) + 5000);
    assert_eq!(a.describe().buffers.len(), 5, "four full regions and a tail");
    assert!(a.describe().buffers.iter().all(|b| b.length <= 1 << 20));
    a.submit(write_all(1, &mem_a, &mem_b));
    let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
    assert_eq!(drive(&mut a, &mut h, &net)[0].result, Ok(()));
    assert!(mem_b == mem_a);
}

#[test]
fn unregister_waits_for_the_slices_that_use_the_memory() {
    let devices = ["a0", "b0"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
    let (net, mut a, mut b, mem_a, mem_b) = two(devices, RdmaConfig::default(), 1 << 20);
    let addr = mem_a.as_ptr() as u64;
    a.submit(write_all(1, &mem_a, &mem_b));
    let e = a.unregister(addr).unwrap_err();
    assert!(e.contains("slices in flight use the memory"), "{e}");
    let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
    assert_eq!(drive(&mut a, &mut h, &net)[0].result, Ok(()));
    a.unregister(addr).unwrap();
    assert!(a.unregister(addr).unwrap_err().contains("no memory registered"));
    a.submit(write_all(2, &mem_a, &mem_b));
    let why = a.drain_settled().next().unwrap().result.unwrap_err();
    assert!(why.contains("local address") && why.contains("not inside a registered memory region"), "{why}");
}

/// The target takes its memory back in the middle of a write: from
/// then on its devices refuse the keys, the write fails, and not one
/// byte lands after `unregister` returned.
#[test]
fn no_byte_lands_after_the_target_unregisters() {
    let devices = ["a0", "a1", "b0", "b1"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
    let (net, mut a, mut b, mem_a, mem_b) = two(devices, RdmaConfig { max_wr: 4, ..RdmaConfig::default() }, 8 << 20);
    a.submit(write_all(1, &mem_a, &mem_b));
    for _ in 0..3 {
        let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
        a.progress(&mut h, net.now_ns());
    }
    b.unregister(mem_b.as_ptr() as u64).unwrap();
    let snapshot = mem_b.clone();
    let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
    let settled = drive(&mut a, &mut h, &net);
    let why = settled[0].result.clone().unwrap_err();
    assert!(why.contains("remote access error"), "{why}");
    assert!(!settled[0].rails_failed, "a refused key is the memory's fault, not the rails'");
    assert!(mem_b == snapshot, "a byte landed after unregister returned");
    assert!(mem_b.iter().any(|&x| x != 0), "some slices landed before it");
}

#[test]
fn endpoints_stay_within_their_bound() {
    let devices = ["a0", "b0", "b1", "b2"].iter().enumerate().map(|(i, n)| SimDevice::new(n, i as u8 + 1)).collect();
    let (net, mut a, mut b, mem_a, mem_b) =
        two(devices, RdmaConfig { max_endpoints: 1, ..RdmaConfig::default() }, 2 << 20);
    a.submit(write_all(1, &mem_a, &mem_b));
    let mut h = Handshake { me: "A", them: &mut b, rounds: 0, send_mtu: true };
    let mut most = 0;
    let mut settled = Vec::new();
    for _ in 0..100_000 {
        settled.extend(a.drain_settled());
        if a.in_flight() == 0 {
            break;
        }
        a.progress(&mut h, net.now_ns());
        most = most.max(a.devices[0].endpoints);
    }
    assert_eq!(settled[0].result, Ok(()));
    assert_eq!(most, 1, "never more than the bound");
    assert!(h.rounds >= 3, "endpoints were closed and made again ({})", h.rounds);
    assert!(mem_b == mem_a);
}

#[test]
fn a_request_for_a_device_that_is_not_there_is_refused_with_the_reason() {
    let net = SimNetwork::new(vec![SimDevice::new("b0", 1)], FaultPlan::default(), 1);
    let mut mem = vec![0u8; 4096];
    let mut b = SliceEngine::new(RdmaConfig::default(), vec![net.open("b0").unwrap()], PriorityMatrix::new()).unwrap();
    // SAFETY: the memory outlives the engine.
    unsafe { b.register(mem.as_mut_ptr() as u64, 4096, "cpu:0") }.unwrap();
    let req = Connection {
        local: NicPath { server: "A".into(), device: "a0".into() },
        peer: NicPath { server: "B".into(), device: "mlx5_7".into() },
        lid: 0,
        gid: Gid::default(),
        qps: vec![17, 18],
        ready_ack: None,
        mtu: None,
        instance: None,
    };
    let why = b.accept(&req).unwrap_err();
    assert_eq!(why, "no RDMA device \"mlx5_7\" here");
    let reply = rejection(&req.to_desc(), &why);
    assert_eq!(req.check_reply(&reply), Err(RdmaFault::Rejected(why)));
    // Accepted from a peer it does not know yet: kept, and answered.
    let ok =
        b.accept(&Connection { peer: NicPath { server: "B".into(), device: "b0".into() }, ..req.clone() }).unwrap();
    assert_eq!((ok.local.device.as_str(), ok.peer.device.as_str(), ok.qps.len()), ("b0", "a0", 2));
    assert_eq!(b.passive.len(), 1);
}
