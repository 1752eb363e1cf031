//! Two shardwire engines talking Mooncake's P2P handshake and TCP v2 data
//! protocol over loopback.

use shardwire::engine::{TransferEngine, code};

fn engine() -> TransferEngine {
    let e = TransferEngine::new();
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

/// An engine whose peers on this host are reached over TCP.
fn tcp_engine() -> TransferEngine {
    let config =
        shardwire::engine::EngineConfig { local: false, ..shardwire::engine::EngineConfig::from_env().unwrap() };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

#[test]
fn write_then_read_back() {
    let target = engine();
    let initiator = engine();
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    let name = target.segment_name().unwrap();
    assert_eq!(target.get_rpc_port().unwrap().to_string(), name.rsplit(':').next().unwrap());
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write(&name, local, remote + 100, 4096).unwrap();
    assert_eq!(target.read_bytes_from_buffer(remote + 100, 4096).unwrap(), data);
    initiator.write_bytes_to_buffer(local, &[0u8; 4096]).unwrap();
    initiator.transfer_sync_read(&name, local + 8192, remote + 100, 4096).unwrap();
    assert_eq!(initiator.read_bytes_from_buffer(local + 8192, 4096).unwrap(), data);
    // The target's first buffer is the 2 GiB slab the managed buffer is in.
    let first = initiator.get_first_buffer_address(&name).unwrap();
    assert!(first <= remote && remote < first + (2 << 30), "{first:#x} {remote:#x}");
}

#[test]
fn large_striped_transfer() {
    let target = engine();
    let initiator = engine();
    let size = 16u64 << 20;
    let remote = target.allocate_managed_buffer(size).unwrap();
    let local = initiator.allocate_managed_buffer(size).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let name = target.segment_name().unwrap();
    initiator.transfer_sync_write(&name, local, remote, size).unwrap();
    assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data);
    initiator.write_bytes_to_buffer(local, &vec![0u8; size as usize]).unwrap();
    initiator.transfer_sync_read(&name, local, remote, size).unwrap();
    assert!(initiator.read_bytes_from_buffer(local, size).unwrap() == data);
}

#[test]
fn errors_are_codes_not_crashes() {
    let e = TransferEngine::new();
    assert_eq!(e.get_rpc_port().unwrap_err().code(), code::INVALID_ARGUMENT, "before initialize");
    assert_eq!(e.transfer_check_status(12345).unwrap_err().code(), code::INVALID_ARGUMENT);
    assert_eq!(e.initialize("127.0.0.1", "foo://x", "tcp", "").unwrap_err().code(), code::INVALID_ARGUMENT);
    // Nothing listens on port 1: etcd metadata fails with a metadata error, not a hang.
    assert_eq!(e.initialize("127.0.0.1", "etcd://127.0.0.1:1", "tcp", "").unwrap_err().code(), code::METADATA);
    assert_eq!(e.initialize("127.0.0.1", "redis://127.0.0.1:1", "tcp", "").unwrap_err().code(), code::METADATA);
    let err = e.initialize("127.0.0.1", "http://127.0.0.1:1/metadata", "tcp", "").unwrap_err();
    assert_eq!(err.code(), code::METADATA);
    assert!(err.message().contains("http://127.0.0.1:1/metadata"), "the error names the server: {err}");
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    assert!(e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").is_err(), "twice");
    assert_eq!(e.transfer_check_status(12345).unwrap_err().code(), code::INVALID_ARGUMENT, "bogus batch id");
    let buf = e.allocate_managed_buffer(8192).unwrap();
    assert_eq!(e.register_memory(buf, 10, "*").unwrap_err().code(), code::ADDRESS_OVERLAPPED);
    assert_eq!(e.unregister_memory(0x1000).unwrap_err().code(), code::ADDRESS_NOT_REGISTERED);
    assert_eq!(e.register_memory(0x1000, 0, "*").unwrap_err().code(), code::INVALID_ARGUMENT);
    // Unknown peer: a port nobody listens on.
    let err = e.transfer_sync_write("127.0.0.1:1", buf, 0x1000, 8).unwrap_err();
    assert_eq!(err.code(), code::SOCKET, "{err}");
    assert_eq!(e.send_probe("127.0.0.1:1").unwrap_err().code(), code::SOCKET);
    assert_eq!(e.send_probe(&e.segment_name().unwrap()), Ok(()));
}

/// The per-connection in-flight cap: with a cap smaller than one slice, a
/// batch of mixed reads and writes still completes, every byte in place
/// (one slice at a time per connection; a slice larger than the cap goes
/// alone).
#[test]
fn tiny_inflight_cap_still_moves_every_byte() {
    use shardwire::engine::{EngineConfig, TransferOpcode, TransferRequest};
    let mut config = EngineConfig::from_env().unwrap();
    config.client_limits.awaiting_bytes_local_max = 4096;
    config.client_limits.awaiting_bytes_max = 4096;
    let initiator = TransferEngine::with_config(config);
    initiator.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").unwrap();
    let target = engine();
    let size = 8u64 << 20;
    let remote = target.allocate_managed_buffer(size).unwrap();
    let local = initiator.allocate_managed_buffer(2 * size).unwrap();
    let name = target.segment_name().unwrap();
    let lens = [1u64, 4096, 4097, 300 << 10, 1 << 20, 3 << 20];
    let mut offsets = Vec::new();
    let mut at = 0;
    for len in lens {
        offsets.push(at);
        at += len;
    }
    let data: Vec<u8> = (0..at).map(|i| (i * 13 % 251) as u8).collect();
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let writes: Vec<TransferRequest> = lens
        .iter()
        .zip(&offsets)
        .map(|(&len, &off)| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + off,
            target_offset: remote + off,
            length: len,
        })
        .collect();
    initiator.batch_transfer_sync(&name, &writes, None).unwrap();
    assert!(target.read_bytes_from_buffer(remote, at).unwrap() == data);
    let reads: Vec<TransferRequest> = writes
        .iter()
        .map(|w| TransferRequest { opcode: TransferOpcode::Read, source: w.source + size, ..*w })
        .collect();
    initiator.batch_transfer_sync(&name, &reads, None).unwrap();
    assert!(initiator.read_bytes_from_buffer(local + size, at).unwrap() == data);
}

/// One batch far larger than what a shard may hold: the caller waits for
/// room as requests settle, the queues never pass their bound, and every
/// byte lands.
#[test]
fn a_huge_batch_is_submitted_within_the_queue_bound() {
    use shardwire::engine::{TransferOpcode, TransferRequest};
    use shardwire::transport::tcp::QUEUED_PER_SHARD_MAX;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    // The TCP transport's queues: the initiator must not take the local path.
    let (target, initiator) = (engine(), Arc::new(tcp_engine()));
    let block = 64u64;
    let requests = 4 * QUEUED_PER_SHARD_MAX as u64;
    let remote = target.allocate_managed_buffer(requests * block).unwrap();
    let local = initiator.allocate_managed_buffer(requests * block).unwrap();
    let data: Vec<u8> = (0..requests * block).map(|i| (i % 253) as u8).collect();
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    let batch: Vec<TransferRequest> = (0..requests)
        .map(|i| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + i * block,
            target_offset: remote + i * block,
            length: block,
        })
        .collect();
    let (done, most) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let (d, m, i) = (done.clone(), most.clone(), initiator.clone());
    let sampler = std::thread::spawn(move || {
        while !d.load(Ordering::Relaxed) {
            for q in i.queued_requests().unwrap() {
                m.fetch_max(q, Ordering::Relaxed);
            }
            std::thread::yield_now();
        }
    });
    initiator.batch_transfer_sync(&target.segment_name().unwrap(), &batch, None).unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(target.read_bytes_from_buffer(remote, requests * block).unwrap() == data);
    let most = most.load(Ordering::Relaxed);
    assert!(most > 0 && most <= QUEUED_PER_SHARD_MAX, "at most {most} queued per shard");
    assert!(initiator.queued_requests().unwrap().iter().all(|&q| q == 0), "every credit returned");
}

/// An RDMA Connection request, as a Mooncake engine sends it to open a
/// queue pair, gets a well-formed rejection that says why: the paths
/// swapped, no queue pairs, and `reply_msg` naming the device asked for;
/// a malformed request is told what is wrong with it.
#[test]
fn an_rdma_connection_request_is_rejected_clearly() {
    use shardwire::meta::p2p::{CallOptions, call};
    use shardwire::proto::mooncake::frame::FrameType;
    use shardwire::proto::mooncake::message::{HandshakeDesc, from_wire};
    use shardwire::proto::mooncake::rdma::{Connection, RdmaFault};
    let target = engine();
    let name = target.segment_name().unwrap();
    let request = format!(
        r#"{{"local_gid":"fe:80:00:00:00:00:00:00:02:42:ac:ff:fe:11:00:02","local_lid":0,"local_nic_path":"10.0.0.9:16049@mlx5_0","payload":"","peer_nic_path":"{name}@mlx5_1","qp_num":[297,298],"ready_ack":true,"reply_msg":""}}"#
    );
    let body = call(&name, FrameType::Connection, request.as_bytes(), &CallOptions::default()).unwrap();
    let reply: HandshakeDesc = from_wire(&body).unwrap();
    assert_eq!(
        (reply.local_nic_path.as_str(), reply.peer_nic_path.as_str()),
        (&*format!("{name}@mlx5_1"), "10.0.0.9:16049@mlx5_0")
    );
    assert!(reply.qp_num.is_empty());
    assert!(reply.reply_msg.contains("no RDMA device \"mlx5_1\""), "{}", reply.reply_msg);
    let ours = Connection::from_desc(&from_wire(request.as_bytes()).unwrap()).unwrap();
    assert!(matches!(ours.check_reply(&reply), Err(RdmaFault::Rejected(_))));
    let bad = request.replace("@mlx5_1", "");
    let body = call(&name, FrameType::Connection, bad.as_bytes(), &CallOptions::default()).unwrap();
    let reply: HandshakeDesc = from_wire(&body).unwrap();
    assert!(reply.reply_msg.contains("malformed") && reply.reply_msg.contains("no '@'"), "{}", reply.reply_msg);
    // The RPC port still answers afterwards.
    shardwire::meta::p2p::probe(&name, &CallOptions::default()).unwrap();
}

/// No late writes over TCP either: once `free_managed_buffer` returns, a
/// peer's write into the freed buffer is refused (the slab around it stays
/// registered for the others), and lands again once the bytes are
/// allocated anew.
#[test]
fn a_freed_managed_buffer_takes_no_tcp_write_until_allocated_again() {
    let target = tcp_engine();
    let initiator = tcp_engine();
    let name = target.segment_name().unwrap();
    let keep = target.allocate_managed_buffer(4096).unwrap(); // keeps the slab
    let block = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    initiator.write_bytes_to_buffer(local, &vec![0xab; 1 << 20]).unwrap();
    initiator.transfer_sync_write(&name, local, block, 4096).unwrap();
    target.free_managed_buffer(block, 1 << 20).unwrap();
    let e = initiator.transfer_sync_write(&name, local, block, 4096).unwrap_err();
    assert!(e.code() < 0, "{e}");
    initiator.transfer_sync_write(&name, local, keep, 4096).unwrap();
    let again = target.allocate_managed_buffer(1 << 20).unwrap();
    assert_eq!(again, block, "the same bytes, handed out again");
    target.write_bytes_to_buffer(again, &vec![0; 1 << 20]).unwrap();
    initiator.transfer_sync_write(&name, local, again, 1 << 20).unwrap();
    assert!(target.read_bytes_from_buffer(again, 1 << 20).unwrap().iter().all(|&b| b == 0xab));
}

/// A draining engine (`stop_accepting`) keeps serving the connections it
/// has and refuses new peers at once: its RPC port and its data port both
/// refuse connections.
#[test]
fn a_draining_engine_serves_open_connections_and_refuses_new_ones() {
    let target = tcp_engine();
    let early = tcp_engine();
    let remote = target.allocate_managed_buffer(4 << 20).unwrap();
    let local = early.allocate_managed_buffer(4 << 20).unwrap();
    let name = target.segment_name().unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8).collect();
    early.write_bytes_to_buffer(local, &data).unwrap();
    // Connections opened before: the direct path's and the shards'.
    early.transfer_sync_write(&name, local, remote, 4096).unwrap();
    early.transfer_sync_write(&name, local, remote, 1 << 20).unwrap();
    let (rpc_port, data_port) = (target.get_rpc_port().unwrap(), target.data_port().unwrap());

    target.stop_accepting().unwrap();
    for port in [rpc_port, data_port] {
        let refused = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_secs(5),
        );
        assert!(refused.is_err(), "port {port} still takes connections");
    }
    // What was open carries on.
    early.write_bytes_to_buffer(local, &vec![0u8; 1 << 20]).unwrap();
    early.transfer_sync_read(&name, local, remote, 1 << 20).unwrap();
    assert!(early.read_bytes_from_buffer(local, 1 << 20).unwrap() == data);
    early.transfer_sync_write(&name, local, remote, 4096).unwrap();
    // A newcomer cannot even learn the segment.
    let late = tcp_engine();
    let buf = late.allocate_managed_buffer(4096).unwrap();
    let err = late.transfer_sync_write(&name, buf, remote, 4096).unwrap_err();
    assert!(err.code() < 0, "{err}");
}
