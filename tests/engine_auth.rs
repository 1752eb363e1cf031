//! Opt-in authentication (`SHARDWIRE_AUTH_KEY`): engines that share a key
//! move bytes as before, on the shards' path and the direct one; a peer
//! without it, or with another, is refused on the RPC port and on the data
//! port with an error that says so, and receives nothing of the segment.
//! The target is a real process; the peers without the key are engines
//! and raw sockets, as a Mooncake peer would be.

mod interop;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interop::{KillOnDrop, die_with_parent, pattern};
use shardwire::engine::{EngineConfig, TransferEngine};
use shardwire::meta::p2p::{self, CallOptions};
use shardwire::proto::auth::{AuthKey, CHALLENGE_BYTES, VERDICT_BYTES};
use shardwire::proto::mooncake::frame::{self, FrameType};
use shardwire::proto::mooncake::message::{self, SegmentDesc};
use shardwire::proto::mooncake::tcp::{Opcode, RequestHeader};

const KEY: &str = "engine-auth-test-key-0123456789";
const TIMEOUT: Duration = Duration::from_secs(10);

/// An engine over TCP (the local transport would not touch the ports),
/// with `key` or none.
fn engine(key: Option<&str>) -> TransferEngine {
    let config = EngineConfig {
        auth: key.map(|k| AuthKey::new(k.as_bytes()).unwrap()),
        local: false,
        transfer_timeout: TIMEOUT,
        ..EngineConfig::from_env().unwrap()
    };
    interop::p2p_engine(config, "tcp")
}

/// A `shardwire bench --mode=target` process with `key` or none.
fn target(key: Option<&str>) -> (KillOnDrop, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", "--local_server_name=127.0.0.1", "--buffer_size=16777216"])
        .env_remove("SHARDWIRE_AUTH_KEY")
        .env_remove("SHARDWIRE_AUTH_KEY_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(k) = key {
        cmd.env("SHARDWIRE_AUTH_KEY", k);
    }
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let name = line.trim().strip_prefix("segment_id=").expect("the target prints its segment").to_string();
    (child, name)
}

fn with_key(key: &str) -> CallOptions {
    CallOptions { auth: Some(AuthKey::new(key.as_bytes()).unwrap()), ..CallOptions::default() }
}

/// Everything a server sends until it closes (bounded in time and size).
fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < 1 << 20 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed within {TIMEOUT:?}: {e}"),
        }
    }
    out
}

#[test]
fn engines_with_the_same_key_move_bytes_both_ways_on_every_path() {
    let (_target, name) = target(Some(KEY));
    let a = engine(Some(KEY));
    let b = engine(Some(KEY));
    let remote = a.get_first_buffer_address(&name).unwrap();
    let local = a.allocate_managed_buffer(4 << 20).unwrap();
    let back = a.allocate_managed_buffer(4 << 20).unwrap();
    // 4 MiB goes through the shards; 4 KiB synchronously takes the direct
    // path (one blocking connection per thread); both authenticate.
    for (len, seed) in [(4usize << 20, 1u64), (4096, 2)] {
        let bytes = pattern(len, seed);
        a.write_bytes_to_buffer(local, &bytes).unwrap();
        a.transfer_sync_write(&name, local, remote, len as u64).unwrap();
        a.transfer_sync_read(&name, back, remote, len as u64).unwrap();
        assert!(a.read_bytes_from_buffer(back, len as u64).unwrap() == bytes, "{len} bytes came back changed");
    }
    // And between two engines of this process, each way.
    let b_buf = b.allocate_managed_buffer(1 << 20).unwrap();
    let a_name = a.segment_name().unwrap();
    let b_name = b.segment_name().unwrap();
    let bytes = pattern(1 << 20, 3);
    a.write_bytes_to_buffer(local, &bytes).unwrap();
    a.transfer_sync_write(&b_name, local, b_buf, 1 << 20).unwrap();
    // B, initiating towards A, writes them back into A's other buffer.
    b.transfer_sync_write(&a_name, b_buf, back, 1 << 20).unwrap();
    assert!(a.read_bytes_from_buffer(back, 1 << 20).unwrap() == bytes);
}

#[test]
fn a_peer_without_the_key_is_refused_and_learns_nothing() {
    let (_target, name) = target(Some(KEY));
    // The segment holds a pattern that must not leak.
    let keyed = engine(Some(KEY));
    let remote = keyed.get_first_buffer_address(&name).unwrap();
    let secret = pattern(4096, 7);
    let buf = keyed.allocate_managed_buffer(4096).unwrap();
    keyed.write_bytes_to_buffer(buf, &secret).unwrap();
    keyed.transfer_sync_write(&name, buf, remote, 4096).unwrap();

    // Engines: no key, and another key.
    let started = Instant::now();
    let e = engine(None).get_first_buffer_address(&name).unwrap_err().to_string();
    assert!(e.contains("requires authentication") && e.contains("SHARDWIRE_AUTH_KEY"), "{e}");
    let e = engine(Some("another-key-of-enough-length")).get_first_buffer_address(&name).unwrap_err().to_string();
    assert!(e.contains("refused this process's authentication key"), "{e}");
    assert!(started.elapsed() < TIMEOUT, "refusals took {:?}", started.elapsed());

    // A liveness probe needs no key: the challenge shows the engine lives.
    p2p::probe(&name, &CallOptions::default()).expect("a keyed engine is alive to a probe without the key");

    // The RPC port, as a Mooncake client asks it: a Metadata frame, padded
    // past the proof's 64 bytes. The challenge and a refusal come back.
    let ours = format!("{{\"name\":\"{}\"}}\n", "m".repeat(100));
    let mut rpc = TcpStream::connect(&name).unwrap();
    rpc.write_all(&frame::encode(FrameType::Metadata, ours.as_bytes())).unwrap();
    let got = read_to_close(&mut rpc);
    assert_eq!(got.len(), CHALLENGE_BYTES + VERDICT_BYTES, "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(&got[..7], b"SWAUTH1");
    assert_eq!(&got[CHALLENGE_BYTES..CHALLENGE_BYTES + 8], b"SWAUTHNO");

    // The data port, found with the key, asked without it: three READ
    // headers of the secret (72 bytes, the first 64 read as a proof).
    let reply = p2p::call(&name, FrameType::Metadata, b"{}\n", &with_key(KEY)).unwrap();
    let desc: SegmentDesc = message::from_wire(&reply).unwrap();
    let host = desc.tcp_data_host.clone().unwrap_or_else(|| "127.0.0.1".into());
    let mut data = TcpStream::connect((host.as_str(), desc.tcp_data_port)).unwrap();
    let header =
        RequestHeader { size: 4096, addr: remote, opcode: Opcode::Read, v2: true, crc32c: false, instance: None }
            .encode();
    data.write_all(&[header, header, header].concat()).unwrap();
    let got = read_to_close(&mut data);
    assert_eq!(got.len(), CHALLENGE_BYTES + VERDICT_BYTES, "the data port said more than a refusal");
    assert_eq!(&got[CHALLENGE_BYTES..CHALLENGE_BYTES + 8], b"SWAUTHNO");
    assert!(!got.windows(64).any(|w| secret.windows(64).any(|s| s == w)), "segment bytes reached a keyless peer");

    // The keyed peer carries on, undisturbed.
    keyed.transfer_sync_read(&name, buf, remote, 4096).unwrap();
    assert!(keyed.read_bytes_from_buffer(buf, 4096).unwrap() == secret);
}

#[test]
fn a_keyed_engine_meets_a_peer_without_a_key_with_a_clear_error() {
    let (_target, name) = target(None);
    let started = Instant::now();
    let e = engine(Some(KEY)).get_first_buffer_address(&name).unwrap_err().to_string();
    assert!(e.contains("did not open with an authentication challenge"), "{e}");
    // The keyless server waits for a request until its own I/O timeout,
    // then closes: bounded, not a hang.
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(5), "took {:?}", started.elapsed());
}
