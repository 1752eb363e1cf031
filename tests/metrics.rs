//! Metrics: what two engines count for real transfers, read back through
//! `engine.metrics()` and through a scrape of `/metrics`, checked to be
//! valid Prometheus text.
//!
//! The counters are the process's, so this file holds one test that runs
//! its steps in order: nothing else in this process counts, and every
//! figure is compared exactly.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use shardwire::engine::{EngineConfig, TransferEngine, TransferRequest};
use shardwire::proto::mooncake::tcp::Opcode;

#[path = "interop/poll.rs"]
mod poll;
mod prom_text;
use prom_text::parse_prometheus;

/// How long figures may take to be published (they are about 100 ms old
/// at most; this is the bound of the wait, not an expectation).
const PUBLISH_WAIT: Duration = poll::WAIT;

fn tcp_engine(metrics_addr: Option<&str>) -> TransferEngine {
    let config = EngineConfig {
        local: false,
        metrics_addr: metrics_addr.map(str::to_string),
        ..EngineConfig::from_env().unwrap()
    };
    let e = TransferEngine::with_config(config);
    e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "").expect("initialize");
    e
}

fn key(name: &str, labels: &str) -> String {
    format!("{name}{{{labels}}}")
}

/// Waits until `want` holds of the figures, or fails with the last ones.
fn wait_for(e: &TransferEngine, what: &str, want: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    poll::poll_until(what, PUBLISH_WAIT, || {
        let m = e.metrics();
        if want(&m) { Ok(m) } else { Err(m) }
    })
}

fn get(m: &BTreeMap<String, f64>, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(0.0)
}

fn scrape(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let kind = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: ").or_else(|| l.strip_prefix("Content-Type: ")))
        .unwrap_or_default()
        .to_string();
    (status, kind, body.to_string())
}

#[test]
fn transfers_are_counted_on_both_sides_and_scraped() {
    let target = tcp_engine(None);
    let initiator = tcp_engine(Some("127.0.0.1:0"));
    let addr = initiator.metrics_address().expect("the endpoint is up after initialize");
    let remote = target.allocate_managed_buffer(4 << 20).unwrap();
    let local = initiator.allocate_managed_buffer(4 << 20).unwrap();
    let name = target.segment_name().unwrap();

    // Three small writes (the caller's direct path), a batch of two 1 MiB
    // writes (through the shards), one 1 MiB read.
    for i in 0..3u64 {
        initiator.transfer_sync_write(&name, local, remote + i * 4096, 4096).unwrap();
    }
    let write = |off: u64| TransferRequest {
        opcode: Opcode::Write,
        source: local + off,
        target_offset: remote + off,
        length: 1 << 20,
    };
    initiator.batch_transfer_sync(&name, &[write(0), write(1 << 20)], None).unwrap();
    initiator.transfer_sync_read(&name, local, remote, 1 << 20).unwrap();
    // One request the target refuses: memory it no longer has.
    let stale: &'static mut [u8] = Box::leak(vec![0u8; 1 << 16].into_boxed_slice());
    let stale_addr = stale.as_ptr() as u64;
    target.register_memory(stale_addr, 1 << 16, "cpu:0").unwrap();
    initiator.transfer_sync_write(&name, local, stale_addr, 64).unwrap();
    target.unregister_memory(stale_addr).unwrap();
    initiator.transfer_sync_write(&name, local, stale_addr, 4096).unwrap_err();

    let w_init = "op=\"write\",transport=\"tcp\",side=\"initiator\"";
    let w_tgt = "op=\"write\",transport=\"tcp\",side=\"target\"";
    let r_init = "op=\"read\",transport=\"tcp\",side=\"initiator\"";
    let r_tgt = "op=\"read\",transport=\"tcp\",side=\"target\"";
    let writes = 3 + 2 + 1 + 1;
    let written = 3 * 4096 + (2 << 20) + 64;
    // The target counts requests as they come on the wire: a 1 MiB request
    // comes as stripes of SHARDWIRE_STRIPE_BYTES (512 KiB by default).
    let stripes = (1u64 << 20).div_ceil(EngineConfig::from_env().unwrap().stripe_bytes);
    let (wire_writes, wire_reads) = (3 + 2 * stripes + 1 + 1, stripes);
    let m = wait_for(&initiator, "every request settled on both sides", |m| {
        get(m, &key("shardwire_transfer_requests_total", w_tgt)) == wire_writes as f64
            && get(m, &key("shardwire_transfer_requests_total", r_tgt)) == wire_reads as f64
    });
    assert_eq!(get(&m, &key("shardwire_transfer_requests_total", w_init)), writes as f64);
    assert_eq!(get(&m, &key("shardwire_transfer_failures_total", w_init)), 1.0);
    assert_eq!(get(&m, &key("shardwire_transfer_bytes_total", w_init)), written as f64);
    assert_eq!(get(&m, &key("shardwire_transfer_requests_total", r_init)), 1.0);
    assert_eq!(get(&m, &key("shardwire_transfer_bytes_total", r_init)), (1u64 << 20) as f64);
    // The target counted the same bytes, and the refusal as a failure.
    assert_eq!(get(&m, &key("shardwire_transfer_bytes_total", w_tgt)), written as f64);
    assert_eq!(get(&m, &key("shardwire_transfer_failures_total", w_tgt)), 1.0);
    assert_eq!(get(&m, &key("shardwire_transfer_bytes_total", r_tgt)), (1u64 << 20) as f64);
    // Latencies: one per initiator request, summing to a positive time.
    let lat = "op=\"write\",transport=\"tcp\"";
    assert_eq!(get(&m, &key("shardwire_transfer_duration_seconds_count", lat)), writes as f64);
    assert_eq!(get(&m, &format!("shardwire_transfer_duration_seconds_bucket{{{lat},le=\"+Inf\"}}")), writes as f64);
    assert!(get(&m, &key("shardwire_transfer_duration_seconds_sum", lat)) > 0.0);
    assert_eq!(get(&m, "shardwire_transfer_in_flight{transport=\"tcp\"}"), 0.0);
    let connects = get(&m, "shardwire_connections_total{transport=\"tcp\",side=\"initiator\"}");
    let accepts = get(&m, "shardwire_connections_total{transport=\"tcp\",side=\"target\"}");
    assert!(connects >= 2.0, "the direct path and a shard each connected: {connects}");
    assert_eq!(accepts, connects, "every connection opened was accepted");

    // The scrape: valid text, and the same figures.
    let (status, kind, body) = scrape(addr, "/metrics");
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let scraped = parse_prometheus(&body);
    for (k, v) in &m {
        let got = scraped.get(k).unwrap_or_else(|| panic!("{k} is not in the scrape:\n{body}"));
        if k.ends_with("_sum}") || k.contains("_sum{") {
            assert!((got - v).abs() <= 1e-6 * v.abs().max(1.0), "{k}: scraped {got}, metrics() {v}");
        } else {
            assert_eq!(got, v, "{k}");
        }
    }
    assert!(body.contains("# TYPE shardwire_transfer_duration_seconds histogram"), "{body}");
    assert!(body.contains("# HELP shardwire_transfer_bytes_total "), "{body}");
    let (status, _, body) = scrape(addr, "/nothing");
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "the 404 says what is served: {body}");

    // Garbage instead of a request: a 400, and the endpoint still serves.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x01 not http\r\n\r\n").unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw:?}");
    assert_eq!(scrape(addr, "/metrics").0, 200);
}

/// `MC_TE_METRIC=1`: the CLI logs Mooncake's line every interval, with the
/// throughput and the latency distribution of that interval.
#[test]
fn mc_te_metric_logs_mooncakes_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(["bench", "--duration", "3", "--block_size", "65536", "--threads", "1"])
        .env("MC_TE_METRIC", "1")
        .env("MC_TE_METRIC_INTERVAL_SECONDS", "1")
        .env("SHARDWIRE_LOCAL", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> =
        err.lines().filter(|l| l.contains("[Metrics] Transfer Engine Stats (over last 1s)")).collect();
    assert!(!lines.is_empty(), "no metric line in:\n{err}");
    for l in &lines {
        let rest = l.split("Throughput: ").nth(1).unwrap_or_else(|| panic!("{l}"));
        let (mbps, dist) = rest.split_once(" MB/s | Latency Distribution (count=").unwrap_or_else(|| panic!("{l}"));
        assert!(mbps.parse::<f64>().unwrap() > 0.0, "{l}");
        let (count, bins) = dist.split_once("): ").unwrap_or_else(|| panic!("{l}"));
        assert!(count.parse::<u64>().unwrap() > 0, "{l}");
        let total: f64 =
            bins.split(", ").map(|b| b.rsplit_once(':').unwrap().1.trim_end_matches('%').parse::<f64>().unwrap()).sum();
        // Bins under 0.1% are left out, as Mooncake does; each is rounded.
        assert!(total <= 100.5 && total > 97.5, "the bins cover the requests: {l}");
    }
}
