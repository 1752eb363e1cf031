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
