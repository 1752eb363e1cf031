//! Engines that find each other through an HTTP metadata server in
//! Mooncake's protocol: the real `mooncake_http_metadata_server` of the
//! Mooncake wheel, and `shardwire metadata-server`, each a process of its
//! own; shardwire and Mooncake engines meet through both, both ways.

mod interop;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use interop::{HttpMetaServer, MooncakePeer, pattern};
use shardwire::engine::{TransferEngine, code};
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
    let name = |i: u16| format!("127.0.0.1:{}", port_base + i);
    let e = engine(&url, &name(1));
    let mut client = server.client();
    interop::mooncake_and_shardwire_meet(&url, &e, &name(1), (&name(0), &name(2)), |peer| {
        let key = format!("mooncake/rpc_meta/{}", peer.name);
        let rpc = json(&client.get(&key).unwrap().expect("Mooncake's rpc_meta"));
        assert_eq!(rpc["ip_or_host_name"], "127.0.0.1");
    });
    e.shutdown();
    assert_eq!(client.get(&format!("mooncake/rpc_meta/{}", name(1))).unwrap(), None, "withdrawn");
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

#[test]
fn shardwire_engines_meet_through_shardwire_metadata_server() {
    shardwire_engines_meet(&HttpMetaServer::shardwire(&[]), 7631);
}

#[test]
fn mooncake_and_shardwire_meet_through_shardwire_metadata_server() {
    mooncake_and_shardwire_meet(&HttpMetaServer::shardwire(&[]), 7641);
}

/// Raw bytes to the server; its answer's status and body.
fn raw(port: u16, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    // The server closes after its answer (Connection: close is asked).
    let _ = s.read_to_end(&mut out);
    let r = shardwire::http::response::parse(&out, 1 << 20).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// The cases of the wheel's test_http_metadata_server.py, run against the
/// wheel's server and against ours: the same answers from both.
#[test]
fn both_servers_follow_the_same_rules() {
    for server in [HttpMetaServer::mooncake(), HttpMetaServer::shardwire(&[])] {
        let port = server.port;
        let req = |method: &str, query: &str, body: &str| {
            let text = format!(
                "{method} /metadata{query} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            raw(port, text.as_bytes())
        };
        // A missing, empty or blank key: 400, for every method.
        for method in ["GET", "PUT", "DELETE"] {
            for query in ["", "?key=", "?key=%20%20%20", "?other=1"] {
                assert_eq!(req(method, query, "{}").0, 400, "{method} {query} on {}", server.url());
            }
        }
        // Round trip, with the key stripped.
        assert_eq!(req("PUT", "?key=%20test_key%20", "{\"v\":1}").0, 200);
        assert_eq!(req("GET", "?key=test_key", ""), (200, "{\"v\":1}".into()));
        assert_eq!(req("GET", "?key=%20test_key", "").0, 200);
        assert_eq!(req("DELETE", "?key=test_key", "").0, 200);
        assert_eq!(req("GET", "?key=test_key", "").0, 404);
        assert_eq!(req("DELETE", "?key=test_key", "").0, 404);
        // An rpc_meta key: a second PUT refused until it is deleted.
        let key = "?key=mooncake%2Frpc_meta%2Fh%3A1";
        assert_eq!(req("PUT", key, "{\"rpc_port\":1}").0, 200);
        assert_eq!(req("PUT", key, "{\"rpc_port\":2}").0, 400);
        assert_eq!(req("GET", key, ""), (200, "{\"rpc_port\":1}".into()));
        assert_eq!(req("DELETE", key, "").0, 200);
        assert_eq!(req("PUT", key, "{\"rpc_port\":2}").0, 200);
        // Other keys may be overwritten.
        assert_eq!(req("PUT", "?key=mooncake%2Fram%2Fh%3A1", "1").0, 200);
        assert_eq!(req("PUT", "?key=mooncake%2Fram%2Fh%3A1", "2").0, 200);
        assert_eq!(req("GET", "?key=mooncake%2Fram%2Fh%3A1", ""), (200, "2".into()));
    }
}

#[test]
fn malformed_http_gets_a_clear_400_and_the_server_goes_on() {
    let mut server = HttpMetaServer::shardwire(&["--body-bytes-max", "1024", "--connections-max", "4"]);
    let port = server.port;
    let (status, body) = raw(port, b"NOT HTTP AT ALL\x01\r\n\r\n");
    assert_eq!(status, 400);
    assert!(body.contains("malformed"), "{body}");
    let (status, _) = raw(port, b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: zz\r\n\r\n");
    assert_eq!(status, 400);
    let (status, body) = raw(port, b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 4096\r\n\r\n");
    assert_eq!(status, 413, "{body}");
    let (status, _) = raw(port, b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n");
    assert_eq!(status, 400);
    let (status, _) = raw(port, b"GET /metadata?key=%zz HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 400);
    // Too many connections: the one past the limit gets 503.
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let (status, _) = raw(port, b"GET /metadata?key=k HTTP/1.1\r\n\r\n");
    assert_eq!(status, 503);
    drop(held);
    // Still serving, and still alive.
    let mut client = server.client();
    interop::wait_until("the server after the connections closed", || client.put("k", b"{}"));
    assert_eq!(client.get("k").unwrap().as_deref(), Some(&b"{}"[..]));
    assert!(server.child().try_wait().unwrap().is_none(), "the server is still running");
}

#[test]
fn a_restart_keeps_the_state() {
    let dir = std::env::temp_dir().join(format!("shardwire-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let _ = std::fs::remove_file(&file);
    let state = file.to_str().unwrap();
    // No probes: the engine stays registered while the server is down.
    let args = ["--state", state, "--probe-interval-ms", "0"];
    let mut server = HttpMetaServer::shardwire(&args);
    let port = server.port;
    let url = server.url();
    let target = engine(&url, "127.0.0.1:7651");
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let mut client = server.client();
    client.put("plain/key", b"{\"kept\":true}").unwrap();
    // Killed without a chance to flush anything.
    server.child().kill().unwrap();
    server.child().wait().unwrap();
    drop(server);
    let server = HttpMetaServer::shardwire_on(port, &args);
    let mut client = server.client();
    assert_eq!(client.get("plain/key").unwrap().as_deref(), Some(&b"{\"kept\":true}"[..]));
    assert!(client.get("mooncake/rpc_meta/127.0.0.1:7651").unwrap().is_some());
    // An engine started after the restart finds the one from before it.
    let initiator = engine(&url, "127.0.0.1:7652");
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();
    initiator.write_bytes_to_buffer(local, &pattern(4096, 8)).unwrap();
    initiator.transfer_sync_write("127.0.0.1:7651", local, remote, 4096).unwrap();
    assert!(target.read_bytes_from_buffer(remote, 4096).unwrap() == pattern(4096, 8));
    drop(initiator);
    drop(target);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_engines_keys_are_dropped() {
    let mut server = HttpMetaServer::shardwire(&["--probe-interval-ms", "200", "--probe-failures", "2"]);
    let live = engine(&server.url(), "127.0.0.1:7661");
    // A Mooncake engine, killed without a chance to delete its keys.
    let mut dead = MooncakePeer::target_via(&server.url(), "127.0.0.1:7662", 1 << 20);
    let mut client = server.client();
    assert!(client.get("mooncake/rpc_meta/127.0.0.1:7662").unwrap().is_some());
    dead.kill();
    interop::wait_until("the dead engine's keys to go", || -> Result<(), String> {
        let rpc = client.get("mooncake/rpc_meta/127.0.0.1:7662").map_err(|e| e.to_string())?;
        let ram = client.get("mooncake/ram/127.0.0.1:7662").map_err(|e| e.to_string())?;
        if rpc.is_none() && ram.is_none() { Ok(()) } else { Err("the keys are still there".into()) }
    });
    // The live engine, probed all along, keeps its keys.
    assert!(client.get("mooncake/rpc_meta/127.0.0.1:7661").unwrap().is_some());
    assert!(client.get("mooncake/ram/127.0.0.1:7661").unwrap().is_some());
    // And the dead one's name can be registered again (no stale rpc_meta).
    let heir = MooncakePeer::target_via(&server.url(), "127.0.0.1:7662", 1 << 20);
    assert_eq!(heir.name, "127.0.0.1:7662");
    drop(heir);
    drop(live);
    // The drop was logged, naming the keys and the address.
    server.child().kill().unwrap();
    let mut log = String::new();
    server.child().stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("dropped mooncake/rpc_meta/127.0.0.1:7662 and mooncake/ram/127.0.0.1:7662"), "{log}");
    assert!(!log.contains("7661"), "the live engine was left alone: {log}");
}
