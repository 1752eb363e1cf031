//! Engines over RDMA on the simulated fabric, through the Mooncake API:
//! descriptors with devices and keys, endpoints made through the real
//! Connection RPC, the shard polling the completion queues, tickets
//! settled there. (Nothing here has run on RDMA hardware or soft-RoCE.)

mod interop;

use std::sync::Arc;

use interop::pattern;
use shardwire::engine::{EngineConfig, TransferEngine, TransferOpcode, TransferRequest};
use shardwire::transport::rdma::sim::{FaultPlan, SimDevice, SimNetwork};

fn network() -> SimNetwork {
    SimNetwork::new(vec![SimDevice::new("mlx5_0", 1), SimDevice::new("mlx5_1", 2)], FaultPlan::default(), 1)
}

/// An engine on `net` (`None`: no RDMA devices), peers on this host not
/// taken by the local transport, so RDMA (or TCP) carries the bytes.
fn engine(net: Option<&SimNetwork>, protocol: &str) -> TransferEngine {
    let fabric = net.map(|n| Arc::new(n.clone()) as Arc<dyn shardwire::transport::rdma::fabric::Fabric>);
    let config = EngineConfig { local: false, fabric, ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "").expect("initialize");
    e
}

/// An "rdma" engine on `net` whose shards are `runtime`'s (placement tests).
fn on_shards(net: &SimNetwork, runtime: &Arc<shardwire::runtime::Runtime>) -> TransferEngine {
    let fabric = Some(Arc::new(net.clone()) as Arc<dyn shardwire::transport::rdma::fabric::Fabric>);
    let config =
        EngineConfig { local: false, fabric, runtime: Some(runtime.clone()), ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "").expect("initialize");
    e
}

#[test]
fn two_engines_move_bytes_over_rdma() {
    let net = network();
    let target = engine(Some(&net), "rdma");
    let initiator = engine(Some(&net), "rdma");
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "rdma");
    let (local, remote, _) = interop::round_trips(&initiator, &target, &name, 8 << 20);
    // A batch of scattered pieces, asynchronously.
    let data = pattern(1 << 20, 99);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let requests: Vec<TransferRequest> = (0..64u64)
        .map(|k| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + k * 16_384,
            target_offset: remote + (63 - k) * 16_384,
            length: 16_384,
        })
        .collect();
    let batch = initiator.batch_transfer_async(&name, &requests).unwrap();
    initiator.get_batch_transfer_status(&[batch]).unwrap();
    let landed = target.read_bytes_from_buffer(remote, 1 << 20).unwrap();
    for k in 0..64usize {
        let at = (63 - k) * 16_384;
        assert!(landed[at..at + 16_384] == data[k * 16_384..(k + 1) * 16_384], "piece {k}");
    }
}

#[test]
fn out_of_bounds_and_unregistered_memory_fail_cleanly_over_rdma() {
    let net = network();
    let target = engine(Some(&net), "rdma");
    let initiator = engine(Some(&net), "rdma");
    let name = target.segment_name().unwrap();
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    let e = initiator.transfer_sync_write(&name, local, remote + (1 << 20) - 10, 4096).unwrap_err();
    assert!(e.message().contains("not inside a buffer"), "{e}");
    // Freed by the target: its devices refuse the keys, and the write
    // fails (it is not retried forever, nor does a byte land).
    target.free_managed_buffer(remote, 1 << 20).unwrap();
    let e = initiator.transfer_sync_write(&name, local, remote, 4096);
    assert!(e.is_err(), "a write to freed memory must fail");
}

#[test]
fn an_engine_without_rdma_reaches_an_rdma_one_over_tcp() {
    let net = network();
    let target = engine(Some(&net), "rdma");
    let tcp_only = engine(None, "rdma");
    let name = target.segment_name().unwrap();
    assert_eq!(tcp_only.transport_for(&name).unwrap(), "tcp", "no devices here: TCP, as Mooncake falls back");
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = tcp_only.allocate_managed_buffer(1 << 20).unwrap();
    let data = pattern(1 << 20, 5);
    tcp_only.write_bytes_to_buffer(local, &data).unwrap();
    tcp_only.transfer_sync_write(&name, local, remote, 1 << 20).unwrap();
    assert!(target.read_bytes_from_buffer(remote, 1 << 20).unwrap() == data);
    // And the other way: the RDMA engine sees a TCP descriptor.
    let back = tcp_only.segment_name().unwrap();
    assert_eq!(target.transport_for(&back).unwrap(), "tcp");
}

/// Every RDMA device goes down: the transfers that find no rail go over
/// TCP instead (the peer serves it), and every byte still lands.
#[test]
fn with_every_rail_down_transfers_fail_over_to_tcp() {
    let net = network();
    let target = engine(Some(&net), "rdma");
    let initiator = engine(Some(&net), "rdma");
    let name = target.segment_name().unwrap();
    let remote = target.allocate_managed_buffer(4 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(4 << 20).unwrap();
    let data = pattern(4 << 20, 8);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write(&name, local, remote, 1 << 20).unwrap();
    net.set_device("mlx5_0", false);
    net.set_device("mlx5_1", false);
    initiator.transfer_sync_write(&name, local, remote, 4 << 20).unwrap();
    assert!(target.read_bytes_from_buffer(remote, 4 << 20).unwrap() == data);
    assert_eq!(initiator.transport_for(&name).unwrap(), "rdma", "the route stays; each request falls back");
}

/// `shardwire bench --protocol=rdma --json` on the simulated fabric says
/// what carried it and what each device moved.
#[test]
fn the_cli_bench_reports_the_bytes_of_each_device() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args([
            "bench",
            "--protocol=rdma",
            "--operation=write",
            "--duration=1",
            "--threads=1",
            "--batch_size=16",
            "--buffer_size=16777216",
            "--json",
        ])
        .env("SHARDWIRE_FABRIC", "sim")
        .env("SHARDWIRE_LOCAL", "0")
        .output()
        .expect("the CLI runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Devices: sim0 "), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["transport"], "rdma", "{report}");
    let devices = report["device_bytes"].as_object().unwrap();
    let names: Vec<&str> = devices.keys().map(String::as_str).collect();
    assert_eq!(names, ["sim0", "sim1"]);
    assert!(devices.values().all(|b| b.as_u64().unwrap() > 0), "both devices carried slices: {report}");
    let sum: u64 = devices.values().map(|b| b.as_u64().unwrap()).sum();
    assert!(sum >= report["bytes"].as_u64().unwrap() && report["bytes"].as_u64().unwrap() > 0, "{report}");
}

/// Four devices, two on each NUMA node, and a runtime with a shard on each
/// node: each device lives on the shard of its node, work from memory on a
/// node goes to that node's devices only (through the shard owning them),
/// and memory whose node the devices do not know is dealt to both shards.
#[test]
fn devices_live_on_the_shards_of_their_node_and_memory_uses_its_own_nodes_devices() {
    use shardwire::runtime::{Runtime, RuntimeConfig};
    let mut config = RuntimeConfig::new(2);
    config.numa_nodes = vec![Some(0), Some(1)];
    let runtime = Arc::new(Runtime::start(config).unwrap());
    let device = |name: &str, n: u8, node: u32| {
        let mut d = SimDevice::new(name, n);
        d.info.numa_node = Some(node);
        d
    };
    let devices = vec![device("mlx5_0", 1, 0), device("mlx5_1", 2, 0), device("mlx5_2", 3, 1), device("mlx5_3", 4, 1)];
    let net = SimNetwork::new(devices, FaultPlan::default(), 7);
    let (target, initiator) = (on_shards(&net, &runtime), on_shards(&net, &runtime));
    let placed = initiator.rdma_placement().unwrap();
    let expect: Vec<(String, usize)> =
        [("mlx5_0", 0), ("mlx5_1", 0), ("mlx5_2", 1), ("mlx5_3", 1)].iter().map(|(n, s)| (n.to_string(), *s)).collect();
    assert_eq!(placed, expect, "each device on the shard of its node");
    let name = target.segment_name().unwrap();
    assert_eq!(initiator.transport_for(&name).unwrap(), "rdma");
    let remote = target.allocate_managed_buffer(16 << 20).unwrap();
    let moved = |e: &TransferEngine| -> Vec<u64> { e.rdma_device_bytes().unwrap().iter().map(|(_, b)| *b).collect() };
    // Memory on node 1: only mlx5_2 and mlx5_3 carry it.
    let mut on_node_1 = pattern(8 << 20, 5);
    let at = on_node_1.as_mut_ptr() as u64;
    initiator.register_memory(at, 8 << 20, "cpu:1").unwrap();
    let before = moved(&initiator);
    initiator.transfer_sync_write(&name, at, remote, 8 << 20).unwrap();
    let delta: Vec<u64> = moved(&initiator).iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(&delta[..2], [0, 0], "node 0's devices stay out of node 1's work: {delta:?}");
    assert!(delta[2] > 0 && delta[3] > 0, "both of node 1's devices carry it: {delta:?}");
    assert!(target.read_bytes_from_buffer(remote, 8 << 20).unwrap() == on_node_1);
    // Memory on node 0, read back into: only mlx5_0 and mlx5_1.
    let mut on_node_0 = vec![0u8; 8 << 20];
    let back = on_node_0.as_mut_ptr() as u64;
    initiator.register_memory(back, 8 << 20, "cpu:0").unwrap();
    let before = moved(&initiator);
    initiator.transfer_sync_read(&name, back, remote, 8 << 20).unwrap();
    let delta: Vec<u64> = moved(&initiator).iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(delta[0] > 0 && delta[1] > 0 && delta[2] == 0 && delta[3] == 0, "{delta:?}");
    assert!(on_node_0 == on_node_1);
    initiator.unregister_memory(at).unwrap();
    initiator.unregister_memory(back).unwrap();
    drop((initiator, target));
}

/// Devices that do not know their node are spread over the shards, and
/// one request's stripes are dealt to every shard that owns a device.
#[test]
fn devices_without_a_node_spread_over_the_shards_and_share_each_request() {
    use shardwire::runtime::{Runtime, RuntimeConfig};
    let runtime = Arc::new(Runtime::start(RuntimeConfig::new(2)).unwrap());
    let net = SimNetwork::new(
        (0..4).map(|i| SimDevice::new(&format!("mlx5_{i}"), i as u8 + 1)).collect(),
        FaultPlan::default(),
        8,
    );
    let (target, initiator) = (on_shards(&net, &runtime), on_shards(&net, &runtime));
    let shards: Vec<usize> = initiator.rdma_placement().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(shards, [0, 1, 0, 1]);
    let name = target.segment_name().unwrap();
    interop::round_trips(&initiator, &target, &name, 16 << 20);
    let moved = initiator.rdma_device_bytes().unwrap();
    let total: u64 = moved.iter().map(|(_, b)| b).sum();
    for (device, bytes) in &moved {
        let share = *bytes as f64 / total as f64;
        assert!((0.15..=0.35).contains(&share), "{device} carried {share:.3} of the bytes: {moved:?}");
    }
    assert_eq!(initiator.rdma_slice_retries().unwrap(), 0);
}

/// Two devices on two shards, one of which reaches nothing (its port is up,
/// so work is still dealt to its shard): what fails there on every rail is
/// sent once more, to the other shard's device, rather than over TCP.
#[test]
fn work_no_rail_of_one_shard_carries_goes_to_the_other_shards_device() {
    use shardwire::runtime::{Runtime, RuntimeConfig};
    use shardwire::transport::rdma::sim::Fault;
    let runtime = Arc::new(Runtime::start(RuntimeConfig::new(2)).unwrap());
    let cut = |b: &str| Fault::Unreachable { a: "mlx5_1".into(), b: b.into() };
    let plan = FaultPlan { faults: vec![cut("mlx5_0"), cut("mlx5_1")] };
    let net = SimNetwork::new(vec![SimDevice::new("mlx5_0", 1), SimDevice::new("mlx5_1", 2)], plan, 3);
    let (target, initiator) = (on_shards(&net, &runtime), on_shards(&net, &runtime));
    let shards: Vec<usize> = initiator.rdma_placement().unwrap().iter().map(|(_, s)| *s).collect();
    assert_eq!(shards, [0, 1], "one device on each shard");
    let name = target.segment_name().unwrap();
    let local = initiator.allocate_managed_buffer(4 << 20).unwrap();
    let remote = target.allocate_managed_buffer(4 << 20).unwrap();
    let before = initiator.rdma_device_bytes().unwrap();
    for seed in 0..4u64 {
        let data = pattern(4 << 20, 300 + seed);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write(&name, local, remote, 4 << 20).expect("the other shard's device carries it");
        assert!(target.read_bytes_from_buffer(remote, 4 << 20).unwrap() == data);
    }
    let after = initiator.rdma_device_bytes().unwrap();
    assert_eq!(after[1].1, before[1].1, "nothing over the lost device: {before:?} -> {after:?}");
    assert!(after[0].1 >= before[0].1 + 4 * (4 << 20), "mlx5_0 carried all 16 MiB, none went over TCP: {after:?}");
    assert!(initiator.rdma_slice_retries().unwrap() > 0, "mlx5_1's slices were tried and failed first");
}
