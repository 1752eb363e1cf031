//! Engines that find each other through a real etcd server (started by each
//! test on ports of its own), between shardwire engines and with the real
//! Mooncake wheel, in Mooncake's key layout.

mod interop;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interop::{EtcdServer, KillOnDrop, pattern};
use shardwire::engine::{TransferEngine, TransferNotify, TransferOpcode as Opcode, code};

fn engine(etcd: &EtcdServer, name: &str) -> TransferEngine {
    let e = TransferEngine::new();
    e.initialize(name, &etcd.url(), "tcp", "").unwrap_or_else(|err| panic!("initialize {name}: {err}"));
    e
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("the value is JSON")
}

/// Whether `cond` comes to hold within `limit` (polled).
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    interop::poll_for(limit, || if cond() { Ok(()) } else { Err(()) }).is_ok()
}

/// `shardwire bench --mode=target` registered through `etcd` as `name`,
/// with `env` set in its environment only; returns once it is registered.
fn bench_target(etcd: &EtcdServer, name: &str, env: &[(&str, &str)]) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["bench", "--mode=target", &format!("--metadata_server={}", etcd.url())])
        .args([&format!("--local_server_name={name}"), "--buffer_size=1048576"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(interop::die_with_parent(&mut cmd).spawn().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), format!("segment_id={name}"));
    child
}

#[test]
fn engines_meet_through_etcd() {
    let etcd = EtcdServer::start();
    let target = engine(&etcd, "127.0.0.1:7001");
    let initiator = engine(&etcd, "127.0.0.1:7002");
    // With a metadata server the name is only a name, as in Mooncake: the
    // RPC port is not 7001 but one of the kernel's choosing.
    assert_eq!(target.segment_name().unwrap(), "127.0.0.1:7001");
    let rpc_port = target.get_rpc_port().unwrap();
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();

    // The keys, in Mooncake's layout.
    let client = etcd.client();
    let rpc = json(&client.get("mooncake/rpc_meta/127.0.0.1:7001").unwrap().expect("rpc_meta key"));
    assert_eq!(rpc["ip_or_host_name"], "127.0.0.1");
    assert_eq!(rpc["rpc_port"], rpc_port);
    let desc = json(&client.get("mooncake/ram/127.0.0.1:7001").unwrap().expect("ram key"));
    assert_eq!(desc["name"], "127.0.0.1:7001");
    assert_eq!(desc["tcp_data_port"], target.data_port().unwrap());
    let buffers = desc["buffers"].as_array().unwrap();
    assert!(buffers.iter().any(|b| {
        let (addr, len) = (b["addr"].as_u64().unwrap(), b["length"].as_u64().unwrap());
        addr <= remote && remote + (1 << 20) <= addr + len
    }));

    // Small (direct path) and large (striped) transfers, both ways.
    for size in [4096u64, 1 << 20] {
        let data = pattern(size as usize, size);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write("127.0.0.1:7001", local, remote, size).unwrap();
        assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data, "{size} B written");
        initiator.write_bytes_to_buffer(local, &vec![0; size as usize]).unwrap();
        initiator.transfer_sync_read("127.0.0.1:7001", local, remote, size).unwrap();
        assert!(initiator.read_bytes_from_buffer(local, size).unwrap() == data, "{size} B read");
    }

    // Notifications and probes go to the RPC port that rpc_meta names.
    let note = TransferNotify { name: "etcd-test".into(), msg: "hello".into() };
    initiator.transfer_sync("127.0.0.1:7001", local, remote, 8, Opcode::Write, Some(&note)).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        target.get_notifies().unwrap().iter().any(|n| n.name == "etcd-test" && n.msg == "hello")
    }));
    initiator.send_probe("127.0.0.1:7001").unwrap();

    // Memory registered after the initiator cached the segment is found: the
    // descriptor in etcd is republished and the initiator looks again.
    let late = vec![0u8; 64 << 10];
    let late_addr = late.as_ptr() as u64;
    target.register_memory(late_addr, late.len() as u64, "cpu:0").unwrap();
    let data = pattern(late.len(), 99);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write("127.0.0.1:7001", local, late_addr, late.len() as u64).unwrap();
    assert!(target.read_bytes_from_buffer(late_addr, late.len() as u64).unwrap() == data);
    target.unregister_memory(late_addr).unwrap();
    let desc = json(&client.get("mooncake/ram/127.0.0.1:7001").unwrap().unwrap());
    assert!(!desc["buffers"].as_array().unwrap().iter().any(|b| b["addr"].as_u64() == Some(late_addr)));
    drop(late);

    // A name etcd does not know is a metadata error, at once.
    let err = initiator.transfer_sync_write("127.0.0.1:7999", local, remote, 8).unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
    assert!(initiator.send_probe("nobody").is_err());

    // Shutting down withdraws the keys; the peer then gets an error.
    target.shutdown();
    assert_eq!(client.get("mooncake/ram/127.0.0.1:7001").unwrap(), None);
    assert_eq!(client.get("mooncake/rpc_meta/127.0.0.1:7001").unwrap(), None);
    assert!(initiator.transfer_sync_write("127.0.0.1:7001", local, remote, 1 << 20).is_err());
}

#[test]
fn cluster_id_scopes_the_keys() {
    let etcd = EtcdServer::start();
    // MC_METADATA_CLUSTER_ID moves the keys; a child process has it set, so
    // this test's process environment stays as it is.
    let target = bench_target(&etcd, "127.0.0.1:7101", &[("MC_METADATA_CLUSTER_ID", "blue")]);
    let client = etcd.client();
    assert!(client.get("mooncake/blue/ram/127.0.0.1:7101").unwrap().is_some());
    assert!(client.get("mooncake/blue/rpc_meta/127.0.0.1:7101").unwrap().is_some());
    assert_eq!(client.get("mooncake/ram/127.0.0.1:7101").unwrap(), None, "not in the default cluster");
    // This process is in the default cluster: it cannot see the blue one.
    let e = engine(&etcd, "127.0.0.1:7102");
    let local = e.allocate_managed_buffer(4096).unwrap();
    assert_eq!(e.transfer_sync_write("127.0.0.1:7101", local, 0, 8).unwrap_err().code(), code::METADATA);
    drop(target);
}

#[test]
fn a_killed_engine_leaves_no_keys_past_its_lease() {
    let etcd = EtcdServer::start();
    let mut target = bench_target(&etcd, "127.0.0.1:7201", &[("SHARDWIRE_ETCD_TTL", "2")]);
    let client = etcd.client();
    // The lease is kept alive past its TTL while the process lives...
    // Time itself must pass here (more than the TTL): no event to wait on.
    std::thread::sleep(Duration::from_secs(3));
    assert!(client.get("mooncake/ram/127.0.0.1:7201").unwrap().is_some(), "kept alive");
    // ... and lapses once it is killed without a chance to clean up.
    target.0.kill().unwrap();
    let gone = eventually(Duration::from_secs(15), || {
        client.get("mooncake/ram/127.0.0.1:7201").unwrap().is_none()
            && client.get("mooncake/rpc_meta/127.0.0.1:7201").unwrap().is_none()
    });
    assert!(gone, "the keys outlived the lease");
}

#[test]
fn etcd_going_away_is_an_error_not_a_hang() {
    let mut etcd = EtcdServer::start();
    let target = engine(&etcd, "127.0.0.1:7301");
    let initiator = engine(&etcd, "127.0.0.1:7302");
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    initiator.transfer_sync_write("127.0.0.1:7301", local, remote, 4096).unwrap();
    etcd.kill();
    // A cached segment needs no metadata: transfers go on.
    initiator.transfer_sync_write("127.0.0.1:7301", local, remote, 1 << 20).unwrap();
    // A lookup, or a registration that must be published, fails cleanly;
    // the registration is undone, so nothing half-done is left behind.
    let start = Instant::now();
    let err = initiator.transfer_sync_write("127.0.0.1:7399", local, remote, 8).unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
    let region = vec![0u8; 8192];
    let err = target.register_memory(region.as_ptr() as u64, 8192, "cpu:0").unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
    assert!(!target.is_registered(region.as_ptr() as u64, 8192).unwrap(), "rolled back");
    // A managed buffer carved from the slab already published needs no
    // publishing; unregistering works and only logs that etcd is stale.
    let small = target.allocate_managed_buffer(4096).unwrap();
    target.free_managed_buffer(small, 4096).unwrap();
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    // And a new engine cannot start without its metadata server.
    let e = TransferEngine::new();
    assert_eq!(e.initialize("127.0.0.1:7303", &etcd.url(), "tcp", "").unwrap_err().code(), code::METADATA);
}

#[test]
fn mooncake_and_shardwire_meet_through_etcd() {
    let etcd = EtcdServer::start();
    // Mooncake's own spelling of an etcd server: a bare host:port.
    let mooncake_meta = etcd.endpoint.clone();

    let e = engine(&etcd, "127.0.0.1:7402");
    let client = etcd.client();
    interop::mooncake_and_shardwire_meet(
        &mooncake_meta,
        &e,
        "127.0.0.1:7402",
        ("127.0.0.1:7401", "127.0.0.1:7403"),
        |_| {
            let rpc = json(&client.get("mooncake/rpc_meta/127.0.0.1:7401").unwrap().expect("Mooncake's rpc_meta"));
            assert_eq!(rpc["ip_or_host_name"], "127.0.0.1");
        },
    );
}

#[test]
fn a_live_name_is_refused_and_a_dead_ones_is_reused() {
    let etcd = EtcdServer::start();
    let client = etcd.client();
    let first = engine(&etcd, "127.0.0.1:7501");
    let rpc_port = first.get_rpc_port().unwrap();
    // A second engine under a name in use: refused, and the first keeps its keys.
    let second = TransferEngine::new();
    let err = second.initialize("127.0.0.1:7501", &etcd.url(), "tcp", "").unwrap_err();
    assert_eq!(err.code(), code::METADATA);
    assert!(err.message().contains("taken"), "{err}");
    let rpc = json(&client.get("mooncake/rpc_meta/127.0.0.1:7501").unwrap().expect("still there"));
    assert_eq!(rpc["rpc_port"], rpc_port);
    assert!(client.get("mooncake/ram/127.0.0.1:7501").unwrap().is_some());

    // A process that dies without cleaning up leaves its keys until its
    // lease lapses; its name can be taken over at once all the same, and
    // the old lease lapsing does not take the new keys with it.
    let mut dead = bench_target(&etcd, "127.0.0.1:7502", &[("SHARDWIRE_ETCD_TTL", "2")]);
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    assert!(client.get("mooncake/rpc_meta/127.0.0.1:7502").unwrap().is_some(), "stale keys");
    let heir = engine(&etcd, "127.0.0.1:7502");
    let buf = heir.allocate_managed_buffer(4096).unwrap();
    heir.write_bytes_to_buffer(buf, b"heir").unwrap();
    // Past the old lease's TTL (time must pass: a lapse has no event).
    std::thread::sleep(Duration::from_secs(4));
    let rpc = json(&client.get("mooncake/rpc_meta/127.0.0.1:7502").unwrap().expect("the heir's keys"));
    assert_eq!(rpc["rpc_port"], heir.get_rpc_port().unwrap());
    let local = first.allocate_managed_buffer(4096).unwrap();
    first.transfer_sync_read("127.0.0.1:7502", local, buf, 4).unwrap();
    assert_eq!(first.read_bytes_from_buffer(local, 4).unwrap(), b"heir");
}
