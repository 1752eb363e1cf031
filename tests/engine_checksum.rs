//! The opt-in end-to-end CRC-32C of TCP transfers (`SHARDWIRE_TCP_CRC32C`)
//! between shardwire engines, through a forwarder that flips one byte on
//! the way. The target's descriptor is served by a relay RPC port that
//! points the data port at the forwarder; everything else is real: two
//! engines, their shards, sockets, registered memory.
//!
//! The forwarder here is the smallest that flips a byte at an offset; it
//! has the shape of the "corrupt byte at offset N" fault of a
//! fault-injecting proxy, so these tests can move onto such a proxy by
//! replacing `Corrupter` and keeping the relay.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[path = "interop/poll.rs"]
mod poll;

use shardwire::engine::{EngineConfig, TransferEngine};
use shardwire::error::code;
use shardwire::meta::p2p::{self, CallOptions, RpcHandler, RpcServer};
use shardwire::proto::mooncake::frame;
use shardwire::proto::mooncake::message::{HandshakeDesc, NotifyDesc, SegmentDesc};

/// Which way a flipped byte travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Initiator to target: headers and WRITE payloads.
    Up,
    /// Target to initiator: statuses and READ payloads.
    Down,
}

/// A TCP forwarder to `upstream` that flips one byte when armed: the
/// byte `skip` bytes after the next one to pass in direction `dir`.
struct Corrupter {
    port: u16,
    stop: Arc<AtomicBool>,
    armed: Arc<Mutex<Option<(Dir, u64)>>>,
}

impl Corrupter {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let armed: Arc<Mutex<Option<(Dir, u64)>>> = Arc::default();
        let (s, a) = (stop.clone(), armed.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).unwrap();
                        let up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                        for (dir, from, to) in
                            [(Dir::Up, down.try_clone().unwrap(), up.try_clone().unwrap()), (Dir::Down, up, down)]
                        {
                            let (a, s) = (a.clone(), s.clone());
                            thread::spawn(move || pump(dir, from, to, &a, &s));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Corrupter { port, stop, armed }
    }

    fn arm(&self, dir: Dir, skip: u64) {
        *self.armed.lock().unwrap() = Some((dir, skip));
    }

    fn fired(&self) -> bool {
        self.armed.lock().unwrap().is_none()
    }
}

impl Drop for Corrupter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either ends, flipping the armed byte.
fn pump(dir: Dir, mut from: TcpStream, mut to: TcpStream, armed: &Mutex<Option<(Dir, u64)>>, stop: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        {
            let mut a = armed.lock().unwrap();
            if let Some((d, skip)) = *a
                && d == dir
            {
                if skip < n as u64 {
                    buf[skip as usize] ^= 0x01;
                    *a = None;
                } else {
                    *a = Some((d, skip - n as u64));
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Serves the target's descriptor with its data port moved to the
/// forwarder (and no same-host transport, so TCP carries every transfer).
struct Relay {
    target: String,
    data_port: u16,
}

impl RpcHandler for Relay {
    fn metadata(&self) -> SegmentDesc {
        let ours = SegmentDesc::new("relay", "tcp");
        let mut d = p2p::fetch_segment(&self.target, &ours, &CallOptions::default()).expect("the target answers");
        assert!(d.shardwire_tcp_crc32c, "a shardwire target advertises CRC-32C framing");
        d.tcp_data_host = Some("127.0.0.1".into());
        d.tcp_data_port = self.data_port;
        d.shardwire = None;
        d
    }
    fn notify(&self, _: NotifyDesc) {}
    fn connection(&self, h: HandshakeDesc) -> HandshakeDesc {
        h
    }
}

fn engine(crc32c: bool) -> TransferEngine {
    let mut config = EngineConfig { local: false, ..EngineConfig::from_env().unwrap() };
    config.client_limits.crc32c = crc32c;
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

/// A target engine with 4 MiB registered, reached through a corrupting
/// forwarder: the target, the forwarder, the relay's name, the target's
/// buffer.
struct Setup {
    target: TransferEngine,
    corrupter: Corrupter,
    _relay: RpcServer,
    name: String,
    remote: u64,
}

fn setup() -> Setup {
    let target = engine(false);
    let remote = target.allocate_managed_buffer(4 << 20).unwrap();
    let corrupter = Corrupter::start(target.data_port().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let name = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let handler = Arc::new(Relay { target: target.segment_name().unwrap(), data_port: corrupter.port });
    let relay = RpcServer::start(listener, handler, frame::MAX_LEN_DEFAULT, None).unwrap();
    Setup { target, corrupter, _relay: relay, name, remote }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Sizes that take the caller-thread direct path (64 KiB and less) and
/// the shards (more; below the stripe size, so one request).
const SIZES: [usize; 2] = [4096, 256 << 10];

#[test]
fn a_corrupted_byte_fails_the_transfer_with_the_checksum_code() {
    let s = setup();
    let e = engine(true);
    let local = e.allocate_managed_buffer(4 << 20).unwrap();
    for len in SIZES {
        let data = pattern(len, len as u8);
        e.write_bytes_to_buffer(local, &data).unwrap();
        // Clean: the bytes arrive, checked.
        e.transfer_sync_write(&s.name, local, s.remote, len as u64).unwrap();
        assert_eq!(s.target.read_bytes_from_buffer(s.remote, len as u64).unwrap(), data);

        // A WRITE payload byte flipped on the way: the target finds it.
        s.corrupter.arm(Dir::Up, 24 + 1000);
        let err = e.transfer_sync_write(&s.name, local, s.remote, len as u64).unwrap_err();
        assert!(s.corrupter.fired());
        assert_eq!(err.code(), code::CHECKSUM, "{len}: {err}");
        assert!(err.message().contains("CRC-32C"), "{err}");

        // A READ payload byte flipped on the way back: the initiator finds it.
        s.target.write_bytes_to_buffer(s.remote, &data).unwrap();
        s.corrupter.arm(Dir::Down, 8 + 2000);
        let err = e.transfer_sync_read(&s.name, local + (2 << 20), s.remote, len as u64).unwrap_err();
        assert!(s.corrupter.fired());
        assert_eq!(err.code(), code::CHECKSUM, "{len}: {err}");

        // A header byte (the address) flipped: refused before anything lands.
        s.corrupter.arm(Dir::Up, 9);
        let err = e.transfer_sync_write(&s.name, local, s.remote + (1 << 20), len as u64).unwrap_err();
        assert!(s.corrupter.fired());
        assert_eq!(err.code(), code::CHECKSUM, "{len}: {err}");
        let landed = s.target.read_bytes_from_buffer(s.remote + (1 << 20) + 256, len as u64).unwrap();
        assert!(landed.iter().all(|&b| b == 0), "nothing landed at the corrupted address");

        // And the next transfers go through, clean.
        e.transfer_sync_write(&s.name, local, s.remote, len as u64).unwrap();
        e.transfer_sync_read(&s.name, local + (2 << 20), s.remote, len as u64).unwrap();
        assert_eq!(e.read_bytes_from_buffer(local + (2 << 20), len as u64).unwrap(), data);
    }
    // The metrics count them (the process's: both ends are here, and the
    // other test of this file turns the checksum off): per size, the
    // target found two (the WRITE's payload, the header) and the
    // initiator failed three.
    let key = |side: &str| format!("shardwire_checksum_failures_total{{transport=\"tcp\",side=\"{side}\"}}");
    let want = (2.0 * SIZES.len() as f64, 3.0 * SIZES.len() as f64);
    poll::poll_until("checksum failures counted (target, initiator)", poll::WAIT, || {
        let m = e.metrics();
        let got = (m.get(&key("target")).copied().unwrap_or(0.0), m.get(&key("initiator")).copied().unwrap_or(0.0));
        if got == want { Ok(()) } else { Err(format!("{got:?}, want {want:?}")) }
    });
}

#[test]
fn without_the_option_the_same_corruption_goes_unseen() {
    // The control: the forwarder really corrupts, and only the CRC-32C
    // catches it. (Mooncake's protocol has nothing that would.)
    let s = setup();
    let e = engine(false);
    let local = e.allocate_managed_buffer(1 << 20).unwrap();
    for len in SIZES {
        let data = pattern(len, 7);
        e.write_bytes_to_buffer(local, &data).unwrap();
        s.corrupter.arm(Dir::Up, 24 + 1000);
        e.transfer_sync_write(&s.name, local, s.remote, len as u64).unwrap();
        assert!(s.corrupter.fired());
        let landed = s.target.read_bytes_from_buffer(s.remote, len as u64).unwrap();
        assert_ne!(landed, data);
        assert_eq!(landed[1000], data[1000] ^ 0x01);
    }
}
