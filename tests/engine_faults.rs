//! Faults: a peer that never answers, a peer killed mid-transfer, shutdown
//! with transfers in flight. Every transfer ends within its bound; nothing
//! hangs; other transfers are not corrupted; later transfers reconnect.

mod interop;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use interop::{free_port, pattern};
use shardwire::engine::{BatchState, EngineConfig, TransferEngine};
use shardwire::meta::p2p::{RpcHandler, RpcServer};
use shardwire::proto::mooncake::frame;
use shardwire::proto::mooncake::message::{BufferDesc, HandshakeDesc, NotifyDesc, SegmentDesc};

fn engine_with_timeout(timeout: Duration) -> TransferEngine {
    let e =
        TransferEngine::with_config(EngineConfig { transfer_timeout: timeout, ..EngineConfig::from_env().unwrap() });
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

/// A peer whose RPC port answers, but whose data port accepts and then
/// never says a word.
struct SilentPeer {
    _rpc: RpcServer,
    name: String,
    stop: Arc<AtomicBool>,
}

struct SilentHandler {
    name: String,
    data_port: u16,
}

impl RpcHandler for SilentHandler {
    fn metadata(&self) -> SegmentDesc {
        SegmentDesc {
            buffers: vec![BufferDesc {
                addr: 1 << 32,
                length: 1 << 30,
                lkey: vec![],
                name: self.name.clone(),
                rkey: vec![],
            }],
            devices: vec![],
            name: self.name.clone(),
            priority_matrix: None,
            protocol: "tcp".into(),
            rdma_server_name: String::new(),
            shardwire: None,
            shardwire_instance: 0,
            shardwire_tcp_crc32c: false,
            tcp_data_host: Some("127.0.0.1".into()),
            tcp_data_port: self.data_port,
            tcp_proto_version: 2,
            timestamp: String::new(),
        }
    }
    fn notify(&self, _: NotifyDesc) {}
    fn connection(&self, h: HandshakeDesc) -> HandshakeDesc {
        h
    }
}

impl SilentPeer {
    fn start() -> Self {
        let data = TcpListener::bind("127.0.0.1:0").unwrap();
        let data_port = data.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        data.set_nonblocking(true).unwrap();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Ok((conn, _)) = data.accept() {
                    conn.set_nonblocking(true).unwrap();
                    held.push(conn);
                }
                // Swallow whatever arrives, answer nothing.
                let mut sink = [0u8; 65536];
                for c in &mut held {
                    while let Ok(n) = c.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                // The fake server's own pace (non-blocking sockets).
                thread::sleep(Duration::from_millis(5));
            }
        });
        let rpc_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let name = format!("127.0.0.1:{}", rpc_listener.local_addr().unwrap().port());
        let handler = Arc::new(SilentHandler { name: name.clone(), data_port });
        let rpc = RpcServer::start(rpc_listener, handler, frame::MAX_LEN_DEFAULT, None).unwrap();
        Self { _rpc: rpc, name, stop }
    }
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_silent_peer_times_out_within_the_bound() {
    let peer = SilentPeer::start();
    let timeout = Duration::from_secs(2);
    let e = engine_with_timeout(timeout);
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    for (op, len) in [("write", 4096u64), ("read", 4096), ("write", 1 << 20)] {
        let start = Instant::now();
        let result = if op == "write" {
            e.transfer_sync_write(&peer.name, local, 1 << 32, len)
        } else {
            e.transfer_sync_read(&peer.name, local, 1 << 32, len)
        };
        let err = result.unwrap_err();
        let took = start.elapsed();
        assert!(took >= timeout, "{op} failed before the timeout: {took:?} ({err})");
        assert!(err.message().contains("within the transfer timeout") || err.message().contains("timed out"), "{err}");
    }
    // Async: the status turns to TIMEOUT (-2).
    let id = e.transfer_submit_write(&peer.name, local, 1 << 32, 4096).unwrap();
    let state =
        interop::poll_until("the batch settles", interop::WAIT, || match e.transfer_check_status(id).unwrap() {
            BatchState::Pending => Err("pending"),
            s => Ok(s),
        });
    assert_eq!((state, state.code()), (BatchState::TimedOut, -2));
}

/// A shardwire target in its own process, on a fixed RPC port.
fn spawn_target(port: u16) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(["bench", "--mode=target", &format!("--local_server_name=127.0.0.1:{port}"), "--buffer_size=268435456"])
        .env("SHARDWIRE_SPIN_US", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("shardwire runs");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let name = line.trim().strip_prefix("segment_id=").expect("the target prints its segment").to_string();
    (child, name)
}

#[test]
fn a_peer_killed_mid_transfer_fails_it_in_bounds_and_later_transfers_reconnect() {
    let port = free_port();
    let (mut child, name) = spawn_target(port);
    assert_eq!(name, format!("127.0.0.1:{port}"));
    let timeout = Duration::from_secs(10);
    let e = Arc::new(engine_with_timeout(timeout));
    let size = 64u64 << 20;
    let local = e.allocate_managed_buffer(size).unwrap();
    let remote = e.get_first_buffer_address(&name).unwrap();
    e.write_bytes_to_buffer(local, &pattern(size as usize, 1)).unwrap();

    // Meanwhile, a healthy peer in this process must not be disturbed.
    let healthy = engine_with_timeout(timeout);
    let healthy_buf = healthy.allocate_managed_buffer(size).unwrap();
    let healthy_name = healthy.segment_name().unwrap();

    let written = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writer = {
        let (e, name, written) = (e.clone(), name.clone(), written.clone());
        thread::spawn(move || {
            loop {
                match e.transfer_sync_write(&name, local, remote, size) {
                    Ok(()) => written.fetch_add(1, Ordering::Release),
                    Err(err) => return (err, Instant::now()),
                };
                assert!(written.load(Ordering::Relaxed) < 100_000, "the target never died?");
            }
        })
    };
    // Killed once writes are going: some finished, one is on its way.
    interop::poll_true("the first write", interop::WAIT, || written.load(Ordering::Acquire) > 0);
    let killed_at = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let (err, failed_at) = writer.join().unwrap();
    let took = failed_at.saturating_duration_since(killed_at);
    assert!(took <= timeout + Duration::from_secs(5), "failed {took:?} after the kill: {err}");

    // The healthy peer's transfers are intact.
    let other = e.allocate_managed_buffer(size).unwrap();
    e.write_bytes_to_buffer(other, &pattern(size as usize, 2)).unwrap();
    e.transfer_sync_write(&healthy_name, other, healthy_buf, size).unwrap();
    assert!(healthy.read_bytes_from_buffer(healthy_buf, size).unwrap() == pattern(size as usize, 2));

    // The target comes back on the same port: later transfers reconnect.
    let (mut child, again) = spawn_target(port);
    assert_eq!(again, name);
    let remote = e.get_first_buffer_address(&name).unwrap();
    e.transfer_sync_write(&name, local, remote, size).unwrap();
    e.write_bytes_to_buffer(other, &vec![0; size as usize]).unwrap();
    e.transfer_sync_read(&name, other, remote, size).unwrap();
    assert!(e.read_bytes_from_buffer(other, size).unwrap() == pattern(size as usize, 1));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn shutdown_with_transfers_in_flight_settles_them_and_returns() {
    let peer = SilentPeer::start();
    let e = engine_with_timeout(Duration::from_secs(60));
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    let ids: Vec<u64> = (0..8).map(|_| e.transfer_submit_write(&peer.name, local, 1 << 32, 65536).unwrap()).collect();
    let start = Instant::now();
    e.shutdown();
    assert!(start.elapsed() < Duration::from_secs(30), "shutdown hung");
    assert!(e.transfer_check_status(ids[0]).is_err(), "the engine is gone");
    assert!(e.get_rpc_port().is_err());
}

/// `cancel_transfer` takes back what has not gone out: against a peer that
/// never answers, the queued requests settle as canceled at once (the batch
/// fails, it does not wait for the transfer timeout); shutdown ends the rest.
#[test]
fn cancel_takes_back_what_is_still_queued() {
    use shardwire::engine::{TransferOpcode, TransferRequest};
    let peer = SilentPeer::start();
    let e = engine_with_timeout(Duration::from_secs(60));
    let local = e.allocate_managed_buffer(4 << 20).unwrap();
    // 8,192 writes of 4 KiB (32 MiB): far more than the in-flight caps let
    // out (at most 1,024 requests and 4 MiB per connection, on any machine).
    let requests: Vec<TransferRequest> = (0..8192u64)
        .map(|i| TransferRequest {
            opcode: TransferOpcode::Write,
            source: local + (i % 1024) * 4096,
            target_offset: (1 << 32) + i * 4096,
            length: 4096,
        })
        .collect();
    let id = e.batch_transfer_async(&peer.name, &requests).unwrap();
    assert_eq!(e.batch_states(&[id]).unwrap()[0], Ok(BatchState::Pending));
    e.cancel_transfer(id).unwrap();
    interop::poll_true("the cancel lands", interop::WAIT, || {
        e.batch_states(&[id]).unwrap()[0] != Ok(BatchState::Pending)
    });
    assert_eq!(e.batch_states(&[id]).unwrap()[0], Ok(BatchState::Failed), "canceled, not timed out");
    assert!(e.cancel_transfer(0xdead).is_err(), "a bogus id is an error");
    e.shutdown();
    peer.stop.store(true, Ordering::Relaxed);
}
