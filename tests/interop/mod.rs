//! Helpers for the interop tests: a Mooncake peer process from the real
//! wheel, and the byte pattern both sides check.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The byte pattern of `peer.py`: `(i*131 + seed*7 + (i>>8)) & 255`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i as u64 * 131 + seed * 7 + (i as u64 >> 8)) & 0xff) as u8).collect()
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

/// The wheel's transfer_engine_bench.
pub fn mooncake_bench() -> PathBuf {
    let p = python().parent().expect("venv bin").join("transfer_engine_bench");
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
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(python())
            .arg(repo().join("tests/interop/peer.py"))
            .args(args)
            .env("MC_FORCE_TCP", "1")
            .env("GLOG_minloglevel", "2")
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
        Self::spawn(&["target".into(), bytes.to_string()])
    }

    /// A Mooncake initiator aimed at `segment`'s buffer at `remote`.
    pub fn initiator(segment: &str, remote: u64, bytes: u64) -> Self {
        Self::spawn(&["initiator".into(), segment.into(), remote.to_string(), bytes.to_string()])
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
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.kill();
    }
}

/// A tiny deterministic generator for test parameters.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}
