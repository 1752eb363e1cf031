//! Object streams between two network namespaces joined by a veth pair
//! whose rate `tc tbf` limits: a receiver on another "host", reached over a
//! link with a queue instead of loopback (the sender's buffers autotune,
//! the receiver serves the stream where its packets land).
//!
//! Needs root (network namespaces); tools/setup installs iproute2. This
//! kernel has no `netem` (CONFIG_NET_SCH_NETEM is off), so no loss or
//! added delay here.

mod interop;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use interop::{KillOnDrop, Rng, die_with_parent};
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions, Termination};

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A namespace and a veth pair, removed on drop.
struct Link {
    ns: String,
    host_if: String,
}

impl Link {
    fn new(tag: u32, qdisc: &str) -> Link {
        let ns = format!("swt{tag}");
        let (a, b) = (format!("swa{tag}"), format!("swb{tag}"));
        let l = Link { ns: ns.clone(), host_if: a.clone() };
        let sub = 100 + tag % 100;
        assert!(ip(&["netns", "add", &ns]), "ip netns add (the test needs root)");
        assert!(ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]));
        assert!(ip(&["link", "set", &b, "netns", &ns]));
        assert!(ip(&["addr", "add", &format!("10.211.{sub}.1/24"), "dev", &a]));
        assert!(ip(&["link", "set", &a, "up"]));
        assert!(ip(&["-n", &ns, "addr", "add", &format!("10.211.{sub}.2/24"), "dev", &b]));
        assert!(ip(&["-n", &ns, "link", "set", &b, "up"]));
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        let mut tc = vec!["qdisc", "add", "dev", &a, "root"];
        tc.extend(qdisc.split(' '));
        assert!(Command::new("tc").args(&tc).status().unwrap().success(), "tc {tc:?}");
        l
    }

    fn peer(&self, tag: u32) -> String {
        format!("10.211.{}.2", 100 + tag % 100)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.ns]);
    }
}

#[test]
fn a_stream_over_a_rate_limited_link() {
    let tag = std::process::id() % 10_000;
    let link = Link::new(tag, "tbf rate 2gbit burst 256kb latency 20ms");
    let addr = format!("{}:9555", link.peer(tag));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &link.ns, env!("CARGO_BIN_EXE_shardwire"), "stream", "listen", "--listen", &addr])
        .args(["--trname", "far"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = KillOnDrop(die_with_parent(&mut cmd).spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let lines: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            l2.lock().unwrap().push(serde_json::from_str(&line).unwrap());
        }
    });
    // Wait for the listener inside the namespace.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "the listener in the namespace did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s =
        Stream::new(&format!("http://{addr}"), "far", StreamOptions { burst: 64, ..StreamOptions::default() }).unwrap();
    let mut rng = Rng(7);
    let mut want = Vec::new();
    for i in 0..150u64 {
        let len = if i % 10 == 0 { 0 } else { rng.range(1, 400_000) as usize };
        let mut h = ObjHdr::new("b", &format!("far-{i}"), len as i64);
        h.opaque = i.to_be_bytes().to_vec();
        s.send(h, vec![(i % 251) as u8; len]).unwrap();
        want.push((format!("far-{i}"), len as u64));
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines.lock().unwrap().len() < want.len() {
        assert!(Instant::now() < deadline, "only {} of {} objects arrived", lines.lock().unwrap().len(), want.len());
        std::thread::sleep(Duration::from_millis(20));
    }
    let got: Vec<(String, u64)> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v["received"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want, "every object, whole, in order");
    drop(child);
    drop(link);
}
