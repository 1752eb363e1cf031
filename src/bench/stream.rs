//! `shardwire bench stream`: a sender and a receiver on loopback, in one
//! process, moving objects of one size for a while.
//!
//! The receiver's handler takes each object's bytes without copying them
//! (`BufRead`), as a storage target that hashes or forwards would; the
//! sender sends one shared buffer, so the figures are the transport's own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::proto::objstream::ObjHdr;
use crate::stream::{ObjReader, Receiver, RxOptions, Stats, Stream, StreamOptions, Termination};

/// What to run.
#[derive(Debug, Clone)]
pub struct StreamBenchOptions {
    pub size: usize,
    pub duration: Duration,
    pub streams: usize,
    pub compression: Option<crate::proto::objstream::lz4::BlockSize>,
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct StreamBenchReport {
    pub size: usize,
    pub streams: usize,
    pub seconds: f64,
    pub objects: u64,
    pub bytes: u64,
    /// Object bytes received per second, in GB/s (1e9).
    pub throughput_gbps: f64,
    pub objects_per_s: f64,
    /// The first stream's statistics at the end.
    pub stream_stats: Stats,
}

/// Parses "4096", "4K", "4KiB", "1M", "1MiB", "2G" (binary multiples).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: usize = s[..digits].parse().ok()?;
    let unit = s[digits..].trim().to_ascii_lowercase();
    let mult = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Runs the benchmark.
pub fn run(o: &StreamBenchOptions) -> Result<StreamBenchReport, super::BenchError> {
    let rx = Receiver::bind("127.0.0.1:0".parse().expect("literal"), RxOptions::default())
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let objects = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let (n, b) = (objects.clone(), bytes.clone());
    rx.handle("bench", move |_h: &ObjHdr, body: &mut ObjReader<'_>| {
        let got = body.discard()?;
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(got, Ordering::Relaxed);
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    let payload: Arc<[u8]> = (0..o.size).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>().into();
    let url = rx.url();
    let start = Instant::now();
    let deadline = start + o.duration;
    let mut threads = Vec::new();
    for k in 0..o.streams.max(1) {
        let (url, payload, compression) = (url.clone(), payload.clone(), o.compression);
        threads.push(std::thread::spawn(move || -> Result<Stats, super::BenchError> {
            let opts = StreamOptions { compression, ..StreamOptions::default() };
            let s = Stream::new(&url, "bench", opts)?;
            let hdr = ObjHdr::new("bench", &format!("s{k}"), payload.len() as i64);
            let mut i = 0u64;
            while i % 64 != 0 || Instant::now() < deadline {
                s.send(hdr.clone(), payload.clone())?;
                i += 1;
            }
            match s.fin() {
                Termination::EndOfStream => Ok(s.stats()),
                Termination::Stopped => Err(super::BenchError::failed(format!("stream {k} was stopped"))),
                Termination::Error(e) => {
                    Err(super::BenchError { message: format!("stream {k} failed: {e}"), ..e.into() })
                }
            }
        }));
    }
    let mut first = None;
    for t in threads {
        let st = t.join().map_err(|_| super::BenchError::failed("a sender panicked"))??;
        first.get_or_insert(st);
    }
    let seconds = start.elapsed().as_secs_f64();
    let objects = objects.load(Ordering::Relaxed);
    let bytes = bytes.load(Ordering::Relaxed);
    rx.close();
    Ok(StreamBenchReport {
        size: o.size,
        streams: o.streams.max(1),
        seconds,
        objects,
        bytes,
        throughput_gbps: bytes as f64 / seconds / 1e9,
        objects_per_s: objects as f64 / seconds,
        stream_stats: first.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("1mb"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("1Q"), None);
    }
}
