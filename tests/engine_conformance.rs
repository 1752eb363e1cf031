//! The transfer engine against Mooncake's own test cases (tcp_write_visibility,
//! the wheel's transfer_engine_initiator_test, the negative cases of the
//! Python API), shardwire to shardwire over P2P on loopback.

mod interop;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use interop::{Rng, pattern};
use shardwire::engine::{BatchState, EngineConfig, TransferEngine, TransferNotify, TransferRequest, code};
use shardwire::proto::mooncake::tcp::Opcode;

fn engine() -> TransferEngine {
    let e = TransferEngine::new();
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

/// A target and an initiator, each with a managed buffer of `bytes`.
fn pair(bytes: u64) -> (TransferEngine, u64, TransferEngine, u64, String) {
    let target = engine();
    let remote = target.allocate_managed_buffer(bytes).unwrap();
    let initiator = engine();
    let local = initiator.allocate_managed_buffer(bytes).unwrap();
    let name = target.segment_name().unwrap();
    (target, remote, initiator, local, name)
}

#[test]
fn completed_write_is_visible_to_subsequent_read() {
    let (target, remote, initiator, local, name) = pair(1 << 20);
    for round in 0..200u64 {
        let len = 1 + (round * 997) % 65_536;
        let data = pattern(len as usize, round);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write(&name, local, remote, len).unwrap();
        // Visible to the target at once: the ack came after the bytes landed.
        assert!(target.read_bytes_from_buffer(remote, len).unwrap() == data, "round {round}");
        initiator.transfer_sync_read(&name, local + (1 << 19), remote, len).unwrap();
        assert!(initiator.read_bytes_from_buffer(local + (1 << 19), len).unwrap() == data);
    }
}

#[test]
fn rejected_write_and_read_fail_and_the_next_transfer_works() {
    // The initiator's cached descriptor goes stale: the target unregisters a
    // region after the initiator saw it. The target's server rejects.
    let target = engine();
    let stale: &'static mut [u8] = Box::leak(vec![0u8; 1 << 16].into_boxed_slice());
    let stale_addr = stale.as_ptr() as u64;
    target.register_memory(stale_addr, 1 << 16, "cpu:0").unwrap();
    let good = target.allocate_managed_buffer(1 << 16).unwrap();
    let initiator = engine();
    let local = initiator.allocate_managed_buffer(1 << 16).unwrap();
    let name = target.segment_name().unwrap();
    initiator.transfer_sync_write(&name, local, stale_addr, 64).unwrap();
    target.unregister_memory(stale_addr).unwrap();
    let err = initiator.transfer_sync_write(&name, local, stale_addr, 4096).unwrap_err();
    assert!(err.message().contains("rejected"), "{err}");
    let err = initiator.transfer_sync_read(&name, local, stale_addr, 4096).unwrap_err();
    assert!(err.message().contains("rejected") || err.message().contains("not inside"), "{err}");
    // The connection the server closed is replaced; valid transfers go on.
    initiator.write_bytes_to_buffer(local, &pattern(4096, 9)).unwrap();
    initiator.transfer_sync_write(&name, local, good, 4096).unwrap();
    assert_eq!(target.read_bytes_from_buffer(good, 4096).unwrap(), pattern(4096, 9));
}

#[test]
fn random_small_writes_each_read_back() {
    let (_target, remote, initiator, local, name) = pair(1 << 20);
    let mut rng = Rng(0xfeed_beef);
    for round in 0..1000u64 {
        let len = rng.range(16, 257);
        let offset = rng.range(0, (1 << 20) - 512);
        let data = pattern(len as usize, round);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write(&name, local, remote + offset, len).unwrap();
        initiator.write_bytes_to_buffer(local, &vec![0; len as usize]).unwrap();
        initiator.transfer_sync_read(&name, local, remote + offset, len).unwrap();
        assert_eq!(initiator.read_bytes_from_buffer(local, len).unwrap(), data, "round {round}");
    }
}

#[test]
fn batch_write_read_of_100_entries() {
    let (target, remote, initiator, local, name) = pair(1 << 20);
    let bufs: Vec<u64> = (0..100).map(|i| local + i * 1024).collect();
    let peers: Vec<u64> = (0..100).map(|i| remote + i * 1024).collect();
    for (i, &b) in bufs.iter().enumerate() {
        initiator.write_bytes_to_buffer(b, &pattern(1024, i as u64)).unwrap();
    }
    initiator.batch_transfer_sync_lists(&name, &bufs, &peers, &[1024; 100], Opcode::Write, None).unwrap();
    for (i, &p) in peers.iter().enumerate() {
        assert_eq!(target.read_bytes_from_buffer(p, 1024).unwrap(), pattern(1024, i as u64));
    }
    initiator.write_bytes_to_buffer(local, &vec![0; 100 * 1024]).unwrap();
    initiator.batch_transfer_sync_lists(&name, &bufs, &peers, &[1024; 100], Opcode::Read, None).unwrap();
    for (i, &b) in bufs.iter().enumerate() {
        assert_eq!(initiator.read_bytes_from_buffer(b, 1024).unwrap(), pattern(1024, i as u64));
    }
    let err = initiator.batch_transfer_sync_lists(&name, &bufs, &peers[..99], &[1024; 100], Opcode::Read, None);
    assert_eq!(err.unwrap_err().code(), code::INVALID_ARGUMENT, "list lengths differ");
}

#[test]
fn async_batches_poll_and_wait() {
    let (target, remote, initiator, local, name) = pair(4 << 20);
    let mut ids = Vec::new();
    for b in 0..8u64 {
        let reqs: Vec<TransferRequest> = (0..16u64)
            .map(|i| {
                let off = (b * 16 + i) * 8192;
                initiator.write_bytes_to_buffer(local + off, &pattern(8192, b * 16 + i)).unwrap();
                TransferRequest {
                    opcode: Opcode::Write,
                    source: local + off,
                    target_offset: remote + off,
                    length: 8192,
                }
            })
            .collect();
        ids.push(initiator.batch_transfer_async(&name, &reqs).unwrap());
    }
    // One id polled to completion; the rest waited for together.
    let first = ids.remove(0);
    let state = interop::poll_until("the first batch settles", interop::WAIT, || {
        match initiator.transfer_check_status(first).unwrap() {
            BatchState::Pending => Err("pending"),
            s => Ok(s),
        }
    });
    assert_eq!(state, BatchState::Completed);
    assert_eq!(state.code(), 1);
    assert!(initiator.transfer_check_status(first).is_err(), "a finished batch is forgotten");
    let states = initiator.batch_states(&ids).unwrap();
    assert!(states.iter().all(|s| s.is_ok()));
    initiator.get_batch_transfer_status(&ids).unwrap();
    for i in 0..128u64 {
        assert_eq!(target.read_bytes_from_buffer(remote + i * 8192, 8192).unwrap(), pattern(8192, i));
    }
    assert!(initiator.get_batch_transfer_status(&ids).is_err(), "ids are freed after the wait");
    // A single async read, polled.
    let id = initiator.transfer_submit_read(&name, local, remote, 8192).unwrap();
    initiator.get_batch_transfer_status(&[id]).unwrap();
    assert_eq!(initiator.read_bytes_from_buffer(local, 8192).unwrap(), pattern(8192, 0));
}

#[test]
fn unknown_peer_and_probes() {
    let e = engine();
    let buf = e.allocate_managed_buffer(8192).unwrap();
    // Nothing listens on port 1.
    let err = e.transfer_submit_write("127.0.0.1:1", buf, 4096, 8).unwrap_err();
    assert_eq!(err.code(), code::SOCKET, "{err}");
    assert_eq!(e.send_probe("127.0.0.1:1").unwrap_err().code(), code::SOCKET);
    assert_eq!(e.send_probe("no-such-host.invalid:12345").unwrap_err().code(), code::DNS);
    assert_eq!(e.send_probe("not a name:x").unwrap_err().code(), code::INVALID_ARGUMENT);
    let other = engine();
    assert_eq!(e.send_probe(&other.segment_name().unwrap()), Ok(()));
}

#[test]
fn local_and_remote_ranges_are_checked_before_sending() {
    let (_target, remote, initiator, local, name) = pair(1 << 16);
    let unregistered = [0u8; 64];
    let err = initiator.transfer_sync_write(&name, unregistered.as_ptr() as u64, remote, 64).unwrap_err();
    assert_eq!(err.code(), code::ADDRESS_NOT_REGISTERED);
    let err = initiator.transfer_sync_write(&name, local, remote + (3 << 30), 64).unwrap_err();
    assert_eq!(err.code(), code::INVALID_ARGUMENT);
    assert!(err.message().contains("not inside a buffer registered at"), "{err}");
    initiator.transfer_sync_write(&name, local, remote, 0).expect("zero bytes is a no-op, as in Mooncake");
    assert_eq!(initiator.write_bytes_to_buffer(0x10, b"x").unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
    let err = initiator.read_bytes_from_buffer(unregistered.as_ptr() as u64, 8).unwrap_err();
    assert_eq!(err.code(), code::ADDRESS_NOT_REGISTERED);
}

#[test]
fn notifications_arrive_after_the_transfer() {
    let (target, remote, initiator, local, name) = pair(1 << 16);
    let note = TransferNotify { name: initiator.segment_name().unwrap(), msg: "layer 7 done".into() };
    initiator.transfer_sync(&name, local, remote, 4096, Opcode::Write, Some(&note)).unwrap();
    assert_eq!(target.get_notifies().unwrap(), vec![note]);
    assert!(target.get_notifies().unwrap().is_empty(), "drained");
}

#[test]
fn a_given_port_is_honoured_and_bind_address_restricts_the_listeners() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let config =
        EngineConfig { bind_address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), ..EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize(&format!("127.0.0.1:{port}"), "P2PHANDSHAKE", "tcp", "").unwrap();
    assert_eq!(e.get_rpc_port().unwrap(), port);
    assert_eq!(e.segment_name().unwrap(), format!("127.0.0.1:{port}"));
    let (rpc, data) = e.listen_addresses().unwrap();
    assert_eq!(rpc.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(data.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    // The port is now taken: a second engine asking for it fails clearly.
    let again = TransferEngine::new();
    let err = again.initialize(&format!("127.0.0.1:{port}"), "P2PHANDSHAKE", "tcp", "").unwrap_err();
    assert_eq!(err.code(), code::SOCKET, "{err}");
    // Without a port, P2P picks one from the range, as Mooncake does.
    let any = engine();
    assert!((15000..=17000).contains(&any.get_rpc_port().unwrap()));
}

#[test]
fn register_memory_rules() {
    let e = engine();
    let region: &'static mut [u8] = Box::leak(vec![0u8; 1 << 16].into_boxed_slice());
    let base = region.as_ptr() as u64;
    e.register_memory(base, 4096, "cpu:0").unwrap();
    assert_eq!(e.register_memory(base + 100, 10, "*").unwrap_err().code(), code::ADDRESS_OVERLAPPED);
    assert_eq!(e.register_memory(base + 8192, 0, "*").unwrap_err().code(), code::INVALID_ARGUMENT);
    e.batch_register_memory(&[base + 8192, base + 4096], &[4096, 4096], "*").expect("adjacent regions");
    assert_eq!(e.batch_register_memory(&[base + 20_000], &[1, 2], "*").unwrap_err().code(), code::INVALID_ARGUMENT);
    assert_eq!(e.unregister_memory(base + 1).unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
    let err = e.batch_unregister_memory(&[base, base + 1, base + 4096, base + 8192]).unwrap_err();
    assert_eq!(err.code(), code::ADDRESS_NOT_REGISTERED, "the first error, after unregistering the rest");
    assert_eq!(e.unregister_memory(base + 8192).unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
    // Managed buffers check the length given to free.
    let m = e.allocate_managed_buffer(10_000).unwrap();
    assert_eq!(e.free_managed_buffer(m, 10_001).unwrap_err().code(), code::INVALID_ARGUMENT);
    e.free_managed_buffer(m, 10_000).unwrap();
    assert!(e.free_managed_buffer(m, 10_000).is_err(), "double free");
}

#[test]
fn calls_before_initialize_are_errors() {
    let e = TransferEngine::new();
    for err in [
        e.get_rpc_port().map(|_| ()),
        e.register_memory(0x1000, 10, "*"),
        e.allocate_managed_buffer(10).map(|_| ()),
        e.transfer_sync_write("127.0.0.1:1", 0, 0, 1),
        e.transfer_check_status(1).map(|_| ()),
        e.get_batch_transfer_status(&[1]),
        e.get_notifies().map(|_| ()),
        e.send_probe("127.0.0.1:1"),
        e.write_bytes_to_buffer(0x1000, b"x"),
    ] {
        let err = err.unwrap_err();
        assert_eq!(err.code(), code::INVALID_ARGUMENT);
        assert!(err.message().contains("initialize"), "{err}");
    }
    // Mooncake aborts the process on an unknown scheme.
    for bad in ["foo://x", "ftp://h:1", "://x"] {
        assert!(e.initialize("127.0.0.1", bad, "tcp", "").is_err(), "{bad}");
    }
    assert_eq!(e.initialize_ext("127.0.0.1", "127.0.0.1:1", "tcp", "", "etcd").unwrap_err().code(), code::METADATA);
    // Nothing listens on port 1: every store fails with a metadata error.
    assert_eq!(e.initialize_ext("127.0.0.1", "127.0.0.1:1", "tcp", "", "redis").unwrap_err().code(), code::METADATA);
    assert_eq!(e.initialize_ext("127.0.0.1", "127.0.0.1:1/m", "tcp", "", "http").unwrap_err().code(), code::METADATA);
    assert_eq!(e.initialize("127.0.0.1", "https://h:1/m", "tcp", "").unwrap_err().code(), code::NOT_IMPLEMENTED);
    assert_eq!(e.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink", "").unwrap_err().code(), code::INVALID_ARGUMENT);
    assert_eq!(e.initialize("[::1", "P2PHANDSHAKE", "tcp", "").unwrap_err().code(), code::INVALID_ARGUMENT);
    // After all those failures the engine still initializes.
    e.initialize_ext("127.0.0.1", "", "tcp", "", "p2p").unwrap();
}

#[test]
fn local_topology_is_mooncakes_matrix() {
    let e = TransferEngine::new();
    let json = e.get_local_topology("").expect("works before initialize");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v.get("cpu:0").is_some(), "{json}");
    assert_eq!(v["cpu:0"].as_array().unwrap().len(), 2);
    assert!(e.get_local_topology("mlx5_9").is_ok(), "filtering to an absent device leaves empty lists");
}

/// A large READ the server rejects: the client waits for the whole answer
/// with a raised low-water mark, and the short rejection (status, then
/// close) must still wake it at once, not at the transfer timeout.
#[test]
fn a_rejected_large_read_fails_with_the_rejection() {
    let target = engine();
    let stale: &'static mut [u8] = Box::leak(vec![0u8; 4 << 20].into_boxed_slice());
    let stale_addr = stale.as_ptr() as u64;
    target.register_memory(stale_addr, 4 << 20, "cpu:0").unwrap();
    let config = EngineConfig { transfer_timeout: Duration::from_secs(120), ..EngineConfig::from_env().unwrap() };
    let initiator = TransferEngine::with_config(config);
    initiator.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    let local = initiator.allocate_managed_buffer(4 << 20).unwrap();
    let name = target.segment_name().unwrap();
    initiator.transfer_sync_read(&name, local, stale_addr, 64).unwrap();
    target.unregister_memory(stale_addr).unwrap();
    for len in [1u64 << 20, 4 << 20] {
        let err = initiator.transfer_sync_read(&name, local, stale_addr, len).unwrap_err();
        assert!(err.message().contains("rejected"), "{len}: {err}");
        // Refresh the stale view for the next round.
        target.register_memory(stale_addr, 4 << 20, "cpu:0").unwrap();
        initiator.transfer_sync_read(&name, local, stale_addr, 64).unwrap();
        target.unregister_memory(stale_addr).unwrap();
    }
}
