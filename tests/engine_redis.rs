//! Engines that find each other through a real redis server (Debian's
//! redis-server, started by each test on a port of its own), in Mooncake's
//! key layout, with a password and a database index.

mod interop;

use std::process::{Command, Stdio};

use interop::{KillOnDrop, RedisServer, pattern};
use shardwire::engine::{EngineConfig, TransferEngine, code};
use shardwire::meta::redis::{RedisAuth, RedisStore};
use shardwire::meta::store::KvStore;

fn engine(url: &str, name: &str, auth: &RedisAuth) -> TransferEngine {
    let config = EngineConfig { redis: auth.clone(), ..EngineConfig::default() };
    let e = TransferEngine::with_config(config);
    e.initialize(name, url, "tcp", "").unwrap_or_else(|err| panic!("initialize {name}: {err}"));
    e
}

#[test]
fn engines_meet_through_redis_with_a_password_and_a_database() {
    let redis = RedisServer::start(Some("s3cret pass"));
    let auth = RedisAuth { password: Some("s3cret pass".into()), db_index: Some(3), ..Default::default() };
    let target = engine(&redis.url(), "127.0.0.1:7701", &auth);
    let initiator = engine(&redis.url(), "127.0.0.1:7702", &auth);
    let remote = target.allocate_managed_buffer(1 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(1 << 20).unwrap();

    // The keys, in Mooncake's layout, in database 3 and not in 0.
    let mut db3 = RedisStore::connect(&redis.url(), auth.clone()).unwrap();
    let rpc: serde_json::Value =
        serde_json::from_slice(&db3.get("mooncake/rpc_meta/127.0.0.1:7701").unwrap().expect("rpc_meta")).unwrap();
    assert_eq!(rpc["rpc_port"], target.get_rpc_port().unwrap());
    assert!(db3.get("mooncake/ram/127.0.0.1:7701").unwrap().is_some());
    let mut db0 = RedisStore::connect(&redis.url(), RedisAuth { db_index: None, ..auth.clone() }).unwrap();
    assert_eq!(db0.get("mooncake/ram/127.0.0.1:7701").unwrap(), None);

    for size in [4096u64, 1 << 20] {
        let data = pattern(size as usize, size);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write("127.0.0.1:7701", local, remote, size).unwrap();
        assert!(target.read_bytes_from_buffer(remote, size).unwrap() == data, "{size} B written");
        initiator.write_bytes_to_buffer(local, &vec![0; size as usize]).unwrap();
        initiator.transfer_sync_read("127.0.0.1:7701", local, remote, size).unwrap();
        assert!(initiator.read_bytes_from_buffer(local, size).unwrap() == data, "{size} B read");
    }
    // Unknown name: a metadata error naming the server and the key.
    let err = initiator.transfer_sync_write("127.0.0.1:7799", local, remote, 8).unwrap_err();
    assert_eq!(err.code(), code::METADATA);
    assert!(err.message().contains(&redis.url()) && err.message().contains("mooncake/ram/127.0.0.1:7799"), "{err}");

    target.shutdown();
    assert_eq!(db3.get("mooncake/ram/127.0.0.1:7701").unwrap(), None);
    assert_eq!(db3.get("mooncake/rpc_meta/127.0.0.1:7701").unwrap(), None);

    // The database may be in the URL as well.
    let in_url = engine(&format!("{}/3", redis.url()), "127.0.0.1:7703", &RedisAuth { db_index: None, ..auth });
    assert!(db3.get("mooncake/ram/127.0.0.1:7703").unwrap().is_some());
    drop(in_url);
}

#[test]
fn a_wrong_password_is_a_clear_error_from_initialize() {
    let redis = RedisServer::start(Some("right"));
    for auth in [
        RedisAuth { password: Some("wrong".into()), ..Default::default() },
        RedisAuth { username: Some("nobody".into()), password: Some("right".into()), ..Default::default() },
        RedisAuth::default(),
    ] {
        let e = TransferEngine::with_config(EngineConfig { redis: auth.clone(), ..EngineConfig::default() });
        let err = e.initialize("127.0.0.1:7711", &redis.url(), "tcp", "").unwrap_err();
        assert_eq!(err.code(), code::METADATA, "{err}");
        assert!(err.message().contains(&redis.url()), "{err}");
        if auth.password.is_some() {
            assert!(err.message().contains("MC_REDIS_PASSWORD") && err.message().contains("refused"), "{err}");
            assert!(!err.message().contains("right") && !err.message().contains("wrong"), "no password in {err}");
        } else {
            assert!(err.message().contains("NOAUTH"), "{err}");
        }
    }
}

/// The variables, as a process reads them: `shardwire bench --mode=target`
/// with `MC_REDIS_*` in its environment registers; a bad index is refused
/// naming the variable.
#[test]
fn the_environment_variables_are_read() {
    let redis = RedisServer::start(Some("pw"));
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
        cmd.args(["bench", "--mode=target", &format!("--metadata_server={}", redis.url())])
            .args(["--local_server_name=127.0.0.1:7721", "--buffer_size=65536"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        KillOnDrop(interop::die_with_parent(&mut cmd).spawn().unwrap())
    };
    let mut good = run(&[("MC_REDIS_PASSWORD", "pw"), ("MC_REDIS_DB_INDEX", "7")]);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(good.0.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "segment_id=127.0.0.1:7721");
    let auth = RedisAuth { password: Some("pw".into()), db_index: Some(7), ..Default::default() };
    assert!(RedisStore::connect(&redis.url(), auth).unwrap().get("mooncake/ram/127.0.0.1:7721").unwrap().is_some());
    drop(good);

    let mut bad = run(&[("MC_REDIS_PASSWORD", "pw"), ("MC_REDIS_DB_INDEX", "256")]);
    let status = interop::poll::exit_within(&mut bad.0, interop::WAIT).expect("a bad variable must end the process");
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(bad.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("MC_REDIS_DB_INDEX=\"256\""), "{err}");
}
