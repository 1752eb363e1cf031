//! Engines that find each other through an HTTP metadata server in
//! Mooncake's protocol: the real `mooncake_http_metadata_server` of the
//! Mooncake wheel, and `shardwire metadata-server`, each a process of its
//! own; shardwire and Mooncake engines meet through both, both ways.

mod interop;

use interop::{HttpMetaServer, MooncakePeer, pattern};
use shardwire::engine::{TransferEngine, TransferNotify, TransferOpcode as Opcode, code};
use shardwire::meta::store::KvStore;

fn engine(url: &str, name: &str) -> TransferEngine {
    let e = TransferEngine::new();
    e.initialize(name, url, "tcp", "").unwrap_or_else(|err| panic!("initialize {name}: {err}"));
    e
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("the value is JSON")
}

/// Two shardwire engines through `server`: the keys in Mooncake's layout,
/// transfers both ways, and the keys gone after shutdown.
fn shardwire_engines_meet(server: &HttpMetaServer, port_base: u16) {
    let (a, b) = (format!("127.0.0.1:{port_base}"), format!("127.0.0.1:{}", port_base + 1));
    let target = engine(&server.url(), &a);
    let initiator = engine(&server.url(), &b);
    let mut client = server.client();
    let rpc = json(&client.get(&format!("mooncake/rpc_meta/{a}")).unwrap().expect("rpc_meta key"));
    assert_eq!(rpc["ip_or_host_name"], "127.0.0.1");
    assert_eq!(rpc["rpc_port"], target.get_rpc_port().unwrap());
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    let desc = json(&client.get(&format!("mooncake/ram/{a}")).unwrap().expect("ram key"));
    assert_eq!(desc["name"], a.as_str());
    assert!(desc["buffers"].as_array().unwrap().iter().any(|b| {
        let (addr, len) = (b["addr"].as_u64().unwrap(), b["length"].as_u64().unwrap());
        addr <= remote && remote + (1 << 20) <= addr + len
    }));
    for size in [4096u64, 1 << 20] {
        let data = pattern(size as usize, size);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write(&a, local, remote, size).unwrap();
        assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data, "{size} B written");
        initiator.write_bytes_to_buffer(local, &vec![0; size as usize]).unwrap();
        initiator.transfer_sync_read(&a, local, remote, size).unwrap();
        assert!(initiator.read_bytes_from_buffer(local, size).unwrap() == data, "{size} B read");
    }
    // Memory registered later is republished and found.
    let late = vec![0u8; 64 << 10];
    let late_addr = late.as_ptr() as u64;
    target.register_memory(late_addr, late.len() as u64, "cpu:0").unwrap();
    let data = pattern(late.len(), 99);
    initiator.write_bytes_to_buffer(local, &data).unwrap();
    initiator.transfer_sync_write(&a, local, late_addr, late.len() as u64).unwrap();
    assert!(target.read_bytes_from_buffer(late_addr, late.len() as u64).unwrap() == data);
    target.unregister_memory(late_addr).unwrap();
    drop(late);
    // A name the server does not know: a metadata error naming the server.
    let err = initiator.transfer_sync_write("127.0.0.1:1", local, remote, 8).unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
    assert!(err.message().contains(&server.url()), "{err}");
    // A live name is refused.
    let twin = TransferEngine::new();
    let err = twin.initialize(&a, &server.url(), "tcp", "").unwrap_err();
    assert!(err.message().contains("taken"), "{err}");
    target.shutdown();
    assert_eq!(client.get(&format!("mooncake/ram/{a}")).unwrap(), None);
    assert_eq!(client.get(&format!("mooncake/rpc_meta/{a}")).unwrap(), None);
    // The name is free again: a new engine takes it.
    let again = engine(&server.url(), &a);
    assert!(client.get(&format!("mooncake/rpc_meta/{a}")).unwrap().is_some());
    drop(again);
}

/// A Mooncake engine (the wheel's Python API) and a shardwire engine
/// through `server`, each writing and reading the other's memory.
fn mooncake_and_shardwire_meet(server: &HttpMetaServer, port_base: u16) {
    let url = server.url();
    let (m1, s, m2) = (
        format!("127.0.0.1:{port_base}"),
        format!("127.0.0.1:{}", port_base + 1),
        format!("127.0.0.1:{}", port_base + 2),
    );
    // A Mooncake target, a shardwire initiator.
    let mut peer = MooncakePeer::target_via(&url, &m1, 4 << 20);
    assert_eq!(peer.name, m1);
    let mut client = server.client();
    let rpc = json(&client.get(&format!("mooncake/rpc_meta/{m1}")).unwrap().expect("Mooncake's rpc_meta"));
    assert_eq!(rpc["ip_or_host_name"], "127.0.0.1");
    let e = engine(&url, &s);
    let local = e.allocate_managed_buffer(4 << 20).unwrap();
    for (size, seed) in [(4096u64, 1u64), (3 << 20, 2)] {
        let data = pattern(size as usize, seed);
        e.write_bytes_to_buffer(local, &data).unwrap();
        e.transfer_sync_write(&peer.name, local, peer.buffer, size).unwrap();
        assert_eq!(peer.cmd(&format!("check 0 {size} {seed}")), "ok", "{size} B into Mooncake");
    }
    assert_eq!(peer.cmd("fill 0 65536 7"), "ok");
    e.transfer_sync_read(&peer.name, local, peer.buffer, 65536).unwrap();
    assert!(e.read_bytes_from_buffer(local, 65536).unwrap() == pattern(65536, 7));
    let note = TransferNotify { name: "from-shardwire".into(), msg: "via-http".into() };
    e.transfer_sync(&peer.name, local, peer.buffer, 8, Opcode::Write, Some(&note)).unwrap();
    assert!(peer.cmd("notifies").contains("from-shardwire=via-http"));
    drop(peer);

    // A shardwire target, a Mooncake initiator.
    let remote = e.allocate_managed_buffer(4 << 20).unwrap();
    let mut peer = MooncakePeer::initiator_via(&url, &m2, &s, remote, 4 << 20);
    assert_eq!(peer.cmd("write 0 65536 3"), "ok");
    assert!(e.read_bytes_from_buffer(remote, 65536).unwrap() == pattern(65536, 3));
    assert_eq!(peer.cmd("write 0 2097152 4"), "ok");
    assert!(e.read_bytes_from_buffer(remote, 2 << 20).unwrap() == pattern(2 << 20, 4));
    e.write_bytes_to_buffer(remote, &pattern(2 << 20, 5)).unwrap();
    assert_eq!(peer.cmd("read 0 2097152 5"), "ok");
    assert_eq!(peer.cmd("batch 4 65536 6"), "ok");
    assert_eq!(peer.cmd("notify ping"), "ok 0");
    assert!(e.get_notifies().unwrap().iter().any(|n| n.name == "mooncake-peer" && n.msg == "ping"));
    drop(peer);
    e.shutdown();
    assert_eq!(client.get(&format!("mooncake/rpc_meta/{s}")).unwrap(), None, "withdrawn");
}

#[test]
fn shardwire_engines_meet_through_mooncakes_server() {
    shardwire_engines_meet(&HttpMetaServer::mooncake(), 7601);
}

#[test]
fn mooncake_and_shardwire_meet_through_mooncakes_server() {
    mooncake_and_shardwire_meet(&HttpMetaServer::mooncake(), 7611);
}

#[test]
fn a_server_going_away_is_an_error_naming_it() {
    let server = HttpMetaServer::mooncake();
    let url = server.url();
    let e = engine(&url, "127.0.0.1:7621");
    let local = e.allocate_managed_buffer(4096).unwrap();
    drop(server);
    let err = e.transfer_sync_write("127.0.0.1:7622", local, 0, 8).unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
    assert!(err.message().contains(&url), "{err}");
    let fresh = TransferEngine::new();
    let err = fresh.initialize("127.0.0.1:7623", &url, "tcp", "").unwrap_err();
    assert_eq!(err.code(), code::METADATA, "{err}");
}
