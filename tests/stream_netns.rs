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
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interop::netns::Link;
use interop::{KillOnDrop, Rng, die_with_parent};
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Stream, StreamOptions, Termination};

#[test]
fn a_stream_over_a_rate_limited_link() {
    let tag = std::process::id() % 10_000;
    let link = Link::new(tag, Some("tbf rate 2gbit burst 256kb latency 20ms"));
    let addr = format!("{}:9555", link.peer());
    let mut cmd = link.exec(env!("CARGO_BIN_EXE_shardwire"));
    cmd.args(["stream", "listen", "--listen", &addr])
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
    interop::poll_until("the listener in the namespace comes up", interop::WAIT, || {
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
    });
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
    interop::poll_until("every object arrives", interop::WAIT, || {
        let n = lines.lock().unwrap().len();
        if n >= want.len() { Ok(()) } else { Err(format!("{n} of {}", want.len())) }
    });
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
