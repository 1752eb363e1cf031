//! Helpers for the interop tests: a Mooncake peer process from the real
//! wheel, a real etcd server, the byte pattern both sides check, and a
//! fault-injecting TCP proxy ([`proxy`]).

#![allow(dead_code)]

pub mod faults;
pub mod netns;
pub mod poll;
pub mod proxy;

#[allow(unused_imports)]
pub use poll::{WAIT, poll_for, poll_true, poll_until};

/// The generator of test parameters (it lives with the proxy, whose
/// random schedules use it).
#[allow(unused_imports)]
pub use proxy::Rng;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// Makes the child die with the thread that spawns it, so a test runner
/// that is killed leaves no peer behind.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the
    // parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Makes `cmd` (a `shardwire bench --mode=target`) serve over RDMA on the
/// emulated fabric, with its default devices and no injected faults, and
/// without the same-host path (so RDMA carries the bytes).
pub fn rdma_emu_target(cmd: &mut Command) -> &mut Command {
    cmd.arg("--protocol=rdma")
        .env("SHARDWIRE_FABRIC", "emu")
        .env("SHARDWIRE_LOCAL", "0")
        .env_remove("SHARDWIRE_EMU_DEVICES")
        .env_remove("SHARDWIRE_EMU_FAULTS")
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback TCP port (free when asked; the caller binds it soon),
/// below the kernel's ephemeral range (32768 and up): no outgoing
/// connection of any process is given it as its own meanwhile, so a
/// target restarted on it binds it again. Each call of a process takes
/// the next of a sequence that starts at a place drawn from the pid, so
/// two tests of one binary are not handed the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    const FIRST: u64 = 20_000;
    const SPAN: u64 = 12_000;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = (u64::from(std::process::id()) * 0x9e37_79b9) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed) * 7919) % SPAN) as u16;
        // Bindable on every address (a target binds the wildcard).
        let free = std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// A real etcd server (Debian's etcd-server, installed by tools/setup) on
/// loopback ports of its own, with its data in a fresh directory. Dropping
/// it kills the server and removes the directory.
pub struct EtcdServer {
    child: KillOnDrop,
    dir: PathBuf,
    /// `127.0.0.1:PORT`, the client endpoint.
    pub endpoint: String,
}

impl EtcdServer {
    pub fn start() -> Self {
        let binary = std::env::var("SHARDWIRE_ETCD").unwrap_or_else(|_| "etcd".into());
        let (client, peer) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("shardwire-etcd-{}-{client}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(&binary);
        cmd.arg("--name=shardwire-test")
            .arg(format!("--data-dir={}", dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=shardwire-test={peer_url}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = die_with_parent(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {binary} ({e}): tools/setup installs etcd-server"));
        let server = Self { child: KillOnDrop(child), dir, endpoint: format!("127.0.0.1:{client}") };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let client = shardwire::meta::etcd::EtcdClient::new(&self.endpoint).unwrap();
        poll_until(&format!("etcd at {} answers", self.endpoint), WAIT, || client.get("shardwire-test/ready"));
    }

    /// `etcd://127.0.0.1:PORT`, what `initialize` takes.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }

    pub fn client(&self) -> shardwire::meta::etcd::EtcdClient {
        shardwire::meta::etcd::EtcdClient::new(&self.endpoint).unwrap()
    }

    /// Kills the server now (its data directory goes on drop).
    pub fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `shardwire stream listen` for `trname` on 127.0.0.1:`port`, a process
/// of its own (killed on drop) whose stdout (a JSON line per object) is
/// piped; returns once it accepts connections.
pub fn stream_listener(port: u16, trname: &str) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["stream", "listen", "--listen", &format!("127.0.0.1:{port}"), "--trname", trname])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let child = KillOnDrop(die_with_parent(&mut cmd).spawn().expect("shardwire runs"));
    wait_until("the stream listener", || std::net::TcpStream::connect(("127.0.0.1", port)).map(|_| ()));
    child
}

/// Waits until `ready` says yes, for at most [`WAIT`]; panics with `what`
/// and the last answer otherwise.
pub fn wait_until<E: std::fmt::Debug>(what: &str, ready: impl FnMut() -> Result<(), E>) {
    poll_until(what, WAIT, ready)
}

/// An HTTP metadata server, a process of its own on a loopback port: the
/// Mooncake wheel's `mooncake_http_metadata_server`, or `shardwire
/// metadata-server`. Dropping it kills the process.
pub struct HttpMetaServer {
    child: KillOnDrop,
    pub port: u16,
}

impl HttpMetaServer {
    /// The wheel's server (aiohttp; serves `/metadata`).
    pub fn mooncake() -> Self {
        let port = free_port();
        let mut cmd = Command::new(python());
        cmd.args(["-m", "mooncake.http_metadata_server", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = die_with_parent(&mut cmd).spawn().expect("python runs");
        Self::ready(child, port)
    }

    /// `shardwire metadata-server` with `args` added.
    pub fn shardwire(args: &[&str]) -> Self {
        Self::shardwire_on(free_port(), args)
    }

    pub fn shardwire_on(port: u16, args: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
        cmd.args(["metadata-server", "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = die_with_parent(&mut cmd).spawn().expect("shardwire runs");
        Self::ready(child, port)
    }

    fn ready(child: Child, port: u16) -> Self {
        let server = Self { child: KillOnDrop(child), port };
        let mut client = server.client();
        wait_until(&server.url(), || {
            use shardwire::meta::store::KvStore;
            client.get("shardwire-test/ready").map(|_| ())
        });
        server
    }

    /// `http://127.0.0.1:PORT/metadata`, what `initialize` takes.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/metadata", self.port)
    }

    pub fn client(&self) -> shardwire::meta::http::HttpStore {
        shardwire::meta::http::HttpStore::new(&self.url()).unwrap()
    }

    /// The child process (to read its stderr, or to kill it).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child.0
    }
}

/// A real redis server (Debian's redis-server, installed by tools/setup)
/// on a loopback port of its own, keeping nothing on disk, with a
/// password if given. Dropping it kills the server.
pub struct RedisServer {
    _child: KillOnDrop,
    pub port: u16,
}

impl RedisServer {
    pub fn start(password: Option<&str>) -> Self {
        let binary = std::env::var("SHARDWIRE_REDIS").unwrap_or_else(|_| "redis-server".into());
        let port = free_port();
        let mut cmd = Command::new(&binary);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = die_with_parent(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {binary} ({e}): tools/setup installs redis-server"));
        let server = Self { _child: KillOnDrop(child), port };
        let auth = shardwire::meta::redis::RedisAuth { password: password.map(str::to_string), ..Default::default() };
        wait_until(&server.url(), || {
            shardwire::meta::redis::RedisStore::connect(&server.url(), auth.clone()).map(|_| ())
        });
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// The byte pattern of `peer.py`: `(i*131 + seed*7 + (i>>8)) & 255`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 131 + seed * 7 + (i as u64 >> 8)) & 0xff) as u8).collect()
}

/// An engine of this process made from `config`, initialized on loopback
/// with P2P metadata over `protocol`.
pub fn p2p_engine(config: shardwire::engine::EngineConfig, protocol: &str) -> shardwire::engine::TransferEngine {
    let e = shardwire::engine::TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "").expect("initialize");
    e
}

/// Bytes that name the transfer they belong to: every 512-byte block opens
/// with the sequence number, so a stale or misplaced block is caught, not
/// only a wrong byte.
pub fn stamped(len: usize, seq: u64) -> Vec<u8> {
    let mut out: Vec<u8> =
        (0..len).map(|i| ((i as u64 * 131 + (i as u64 >> 8) + seq * 7 + (seq >> 8) * 13) & 0xff) as u8).collect();
    for block in out.chunks_mut(512) {
        let n = block.len().min(8);
        block[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    }
    out
}

/// Writes and reads back one block of each size (up to `max` bytes) from
/// `initiator` to `target`'s segment `name`, checking every byte both
/// ways; returns the three buffers (local, remote, back) for more work.
pub fn round_trips(
    initiator: &shardwire::engine::TransferEngine,
    target: &shardwire::engine::TransferEngine,
    name: &str,
    max: u64,
) -> (u64, u64, u64) {
    let remote = target.allocate_managed_buffer(max).unwrap();
    let local = initiator.allocate_managed_buffer(max).unwrap();
    let back = initiator.allocate_managed_buffer(max).unwrap();
    for (round, len) in [1u64, 4096, 65_537, 1 << 20, max].into_iter().filter(|&l| l <= max).enumerate() {
        let data = pattern(len as usize, round as u64);
        initiator.write_bytes_to_buffer(local, &data).unwrap();
        initiator.transfer_sync_write(name, local, remote, len).unwrap();
        assert!(target.read_bytes_from_buffer(remote, len).unwrap() == data, "{len} bytes written");
        initiator.transfer_sync_read(name, back, remote, len).unwrap();
        assert!(initiator.read_bytes_from_buffer(back, len).unwrap() == data, "{len} bytes read back");
    }
    (local, remote, back)
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtual environment's Python, where tools/setup installed the wheel.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SHARDWIRE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run tools/setup to install the Mooncake wheel", p.display());
    p
}

/// The wheel's transfer_engine_bench: the binary itself, not the console
/// script in `.venv/bin`, which runs it as a grandchild that a kill of the
/// script would leave behind.
pub fn mooncake_bench() -> PathBuf {
    let out = Command::new(python())
        .args(["-c", "import mooncake, os; print(os.path.dirname(mooncake.__file__))"])
        .output()
        .expect("python runs");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("transfer_engine_bench");
    assert!(p.exists(), "{} is missing: run tools/setup", p.display());
    p
}

/// A running tests/interop/peer.py with the Mooncake wheel.
pub struct MooncakePeer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The peer's segment name.
    pub name: String,
    /// Its buffer's address.
    pub buffer: u64,
}

impl MooncakePeer {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/interop/peer.py")).args(args).env("GLOG_minloglevel", "2");
        // Over TCP unless the test asks for RDMA.
        if !env.iter().any(|(k, v)| *k == "PEER_PROTOCOL" && *v == "rdma") {
            cmd.env("MC_FORCE_TCP", "1");
        }
        cmd.envs(env.iter().copied());
        let mut child = die_with_parent(&mut cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python runs");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("the peer answers");
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(parts.first(), Some(&"ready"), "peer said {line:?}");
        Self { child, stdin, stdout, name: parts[1].to_string(), buffer: parts[2].parse().unwrap() }
    }

    /// A Mooncake target with `bytes` of managed buffer.
    pub fn target(bytes: u64) -> Self {
        Self::spawn(&["target".into(), bytes.to_string()], &[])
    }

    /// A Mooncake initiator aimed at `segment`'s buffer at `remote`.
    pub fn initiator(segment: &str, remote: u64, bytes: u64) -> Self {
        Self::spawn(&["initiator".into(), segment.into(), remote.to_string(), bytes.to_string()], &[])
    }

    /// A Mooncake target over RDMA on `device` (P2P metadata).
    pub fn rdma_target(bytes: u64, device: &str) -> Self {
        Self::spawn(&["target".into(), bytes.to_string()], &[("PEER_PROTOCOL", "rdma"), ("PEER_DEVICE", device)])
    }

    /// A Mooncake initiator over RDMA on `device`, aimed at `segment`.
    pub fn rdma_initiator(segment: &str, remote: u64, bytes: u64, device: &str) -> Self {
        let args = ["initiator".into(), segment.into(), remote.to_string(), bytes.to_string()];
        Self::spawn(&args, &[("PEER_PROTOCOL", "rdma"), ("PEER_DEVICE", device)])
    }

    /// A Mooncake target that registers as `name` with the etcd server at
    /// `metadata` (`etcd://host:port`).
    pub fn target_via(metadata: &str, name: &str, bytes: u64) -> Self {
        Self::spawn(&["target".into(), bytes.to_string()], &Self::meta_env(metadata, name))
    }

    /// A Mooncake initiator named `name`, finding `segment` through etcd.
    pub fn initiator_via(metadata: &str, name: &str, segment: &str, remote: u64, bytes: u64) -> Self {
        let args = ["initiator".into(), segment.into(), remote.to_string(), bytes.to_string()];
        Self::spawn(&args, &Self::meta_env(metadata, name))
    }

    fn meta_env<'a>(metadata: &'a str, name: &'a str) -> [(&'a str, &'a str); 3] {
        // Mooncake's TCP transport binds this address for its data port.
        [("PEER_METADATA", metadata), ("PEER_HOSTNAME", name), ("MC_TCP_BIND_ADDRESS", "127.0.0.1")]
    }

    /// Sends a command and returns the peer's one-line answer.
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("peer alive");
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("peer answers");
        assert!(!answer.is_empty(), "the peer exited during {line:?}");
        answer.trim().to_string()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MooncakePeer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        // A second to leave on its own, then the kill.
        if poll::exit_within(&mut self.child, Duration::from_secs(1)).is_none() {
            self.kill();
        }
    }
}

/// A Mooncake engine (the wheel's Python API) and the shardwire engine `e`,
/// registered as `e_name`, meeting through the metadata server that
/// Mooncake spells `mooncake_meta`: a Mooncake target named `names.0`
/// (checked by `check_target` while it runs), then a Mooncake initiator
/// named `names.1`; each side writes and reads the other's memory, every
/// byte checked, with notifications and a probe.
pub fn mooncake_and_shardwire_meet(
    mooncake_meta: &str,
    e: &shardwire::engine::TransferEngine,
    e_name: &str,
    names: (&str, &str),
    check_target: impl FnOnce(&MooncakePeer),
) {
    use shardwire::engine::{TransferNotify, TransferOpcode as Opcode};
    // A Mooncake target, a shardwire initiator.
    let mut peer = MooncakePeer::target_via(mooncake_meta, names.0, 4 << 20);
    assert_eq!(peer.name, names.0);
    check_target(&peer);
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
    let note = TransferNotify { name: "from-shardwire".into(), msg: "via-metadata".into() };
    e.transfer_sync(&peer.name, local, peer.buffer, 8, Opcode::Write, Some(&note)).unwrap();
    assert!(peer.cmd("notifies").contains("from-shardwire=via-metadata"));
    drop(peer);

    // A shardwire target, a Mooncake initiator.
    let remote = e.allocate_managed_buffer(4 << 20).unwrap();
    let mut peer = MooncakePeer::initiator_via(mooncake_meta, names.1, e_name, remote, 4 << 20);
    assert_eq!(peer.cmd("write 0 65536 3"), "ok");
    assert!(e.read_bytes_from_buffer(remote, 65536).unwrap() == pattern(65536, 3));
    assert_eq!(peer.cmd("read 0 2097152 3"), "fail mismatch", "the pattern differs past 64 KiB");
    assert_eq!(peer.cmd("write 0 2097152 4"), "ok");
    assert!(e.read_bytes_from_buffer(remote, 2 << 20).unwrap() == pattern(2 << 20, 4));
    e.write_bytes_to_buffer(remote, &pattern(2 << 20, 5)).unwrap();
    assert_eq!(peer.cmd("read 0 2097152 5"), "ok");
    assert_eq!(peer.cmd("batch 4 65536 6"), "ok");
    assert_eq!(peer.cmd("notify ping"), "ok 0");
    assert!(e.get_notifies().unwrap().iter().any(|n| n.name == "mooncake-peer" && n.msg == "ping"));
    assert_eq!(peer.cmd(&format!("probe {e_name}")), "ok 0");
}
