//! `shardwire node`: a dedicated transfer node.
//!
//! It serves a memory pool as a segment that peers read and write (managed
//! memory: hugepages when free, one part per NUMA node of the shards),
//! registered in whichever metadata store it is given; receives object
//! streams; and serves `/metrics`, `/healthz` and `/readyz`. Settings come
//! from flags, a TOML file (`--config`, keys spelt as the flags) and the
//! usual `MC_*` / `SHARDWIRE_*` environment, flags first.
//!
//! Lifecycle: one line on stderr per event. On SIGTERM or SIGINT it stops
//! being ready, refuses new peers and streams, waits (up to `--drain-timeout`)
//! until the transfers and streams in flight have finished, then shuts the
//! engine down (its metadata keys go with it) and exits 0. A second signal
//! exits at once.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use shardwire::bench::stream::parse_size;
use shardwire::engine::TransferEngine;
use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{HandlerError, ObjReader, Receiver, RecvHandler, RxOptions};
use shardwire::telemetry::serve::{Endpoint, Page, metrics_page};

/// Largest part of the pool allocated at once (a managed slab).
const POOL_PART_BYTES_MAX: u64 = 1 << 31;
/// How long nothing must have moved before a drain counts as finished.
const QUIET: Duration = Duration::from_millis(300);
/// How often the main thread looks at signals and readiness.
const TICK: Duration = Duration::from_millis(50);
/// Most trnames a node serves.
const TRNAMES_MAX: usize = 256;

#[derive(clap::Args, Default, Debug)]
pub struct NodeArgs {
    /// A TOML file of settings, keys spelt as the flags (`pool = "4GiB"`,
    /// `trname = ["a", "b=dir:/srv/objs"]`); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's host[:port] (the segment name with P2P metadata).
    #[arg(long)]
    local_server_name: Option<String>,
    /// P2PHANDSHAKE (the default), etcd://..., http://..., redis://...
    #[arg(long)]
    metadata_server: Option<String>,
    /// tcp (the default) or rdma.
    #[arg(long)]
    protocol: Option<String>,
    /// RDMA devices to use (comma-separated; empty: all).
    #[arg(long)]
    device_name: Option<String>,
    /// The memory pool peers read and write: 4GiB, 512MiB, ... (default 1GiB).
    #[arg(long)]
    pool: Option<String>,
    /// HOST:PORT on which to receive object streams.
    #[arg(long)]
    stream_listen: Option<String>,
    /// A trname to accept, as NAME, NAME=discard, NAME=count or
    /// NAME=dir:PATH (objects written under PATH/<bucket>/<name>); repeat.
    #[arg(long = "trname")]
    trname: Vec<String>,
    /// HOST:PORT for /metrics, /healthz and /readyz.
    #[arg(long)]
    http: Option<String>,
    /// Seconds a drain may take after SIGTERM or SIGINT (default 10).
    #[arg(long)]
    drain_timeout: Option<f64>,
    /// For tools: a JSON line when ready (after `segment_id=`) and when
    /// stopped, and failures as `{"error": ...}` on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What `--config` may hold.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    local_server_name: Option<String>,
    metadata_server: Option<String>,
    protocol: Option<String>,
    device_name: Option<String>,
    pool: Option<String>,
    stream_listen: Option<String>,
    trname: Option<Vec<String>>,
    http: Option<String>,
    drain_timeout: Option<f64>,
}

/// What to do with a trname's objects.
#[derive(Debug, Clone, PartialEq)]
enum Sink {
    Discard,
    Count,
    Dir(PathBuf),
}

/// The settings, checked.
#[derive(Debug)]
struct Settings {
    local_server_name: String,
    metadata_server: String,
    protocol: String,
    device_name: String,
    pool_bytes: u64,
    stream_listen: Option<SocketAddr>,
    trnames: Vec<(String, Sink)>,
    http: Option<String>,
    drain_timeout: Duration,
}

impl Settings {
    /// Flags over the file over defaults; an error names the key.
    fn resolve(a: &NodeArgs) -> Result<Settings, String> {
        let file = match &a.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
                toml::from_str(&text).map_err(|e| {
                    // The line at fault names the key (toml's message alone
                    // may not).
                    let at = e.span().map(|span| {
                        let start = span.start.min(text.len());
                        let line = text[..start].matches('\n').count() + 1;
                        let shown = text.lines().nth(line - 1).unwrap_or_default().trim();
                        format!(", line {line} ({shown})")
                    });
                    format!("config file {}{}: {}", path.display(), at.unwrap_or_default(), e.message())
                })?
            }
        };
        let pick = |flag: &Option<String>, key: &Option<String>| flag.clone().or_else(|| key.clone());
        let pool = pick(&a.pool, &file.pool).unwrap_or_else(|| "1GiB".into());
        let pool_bytes = parse_size(&pool)
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("pool: {pool:?} is not a size such as 4GiB or 512MiB"))?
            as u64;
        let stream_listen = match pick(&a.stream_listen, &file.stream_listen) {
            None => None,
            Some(s) => {
                Some(s.parse().map_err(|_| format!("stream-listen: {s:?} is not HOST:PORT (an IP and a port)"))?)
            }
        };
        let list = if a.trname.is_empty() { file.trname.clone().unwrap_or_default() } else { a.trname.clone() };
        if list.len() > TRNAMES_MAX {
            return Err(format!("trname: at most {TRNAMES_MAX} names"));
        }
        let mut trnames = Vec::with_capacity(list.len());
        for t in &list {
            let parsed = parse_trname(t)?;
            if trnames.iter().any(|(n, _): &(String, Sink)| *n == parsed.0) {
                return Err(format!("trname: {:?} is given twice", parsed.0));
            }
            trnames.push(parsed);
        }
        if stream_listen.is_none() && !trnames.is_empty() {
            return Err("trname: needs stream-listen (where to receive the streams)".into());
        }
        if stream_listen.is_some() && trnames.is_empty() {
            return Err("stream-listen: needs at least one trname to accept".into());
        }
        let drain = a.drain_timeout.or(file.drain_timeout).unwrap_or(10.0);
        if !drain.is_finite() || !(0.0..=3600.0).contains(&drain) {
            return Err(format!("drain-timeout: {drain} is not a number of seconds in 0..=3600"));
        }
        let protocol = pick(&a.protocol, &file.protocol).unwrap_or_else(|| "tcp".into());
        if !["tcp", "rdma"].contains(&protocol.as_str()) {
            return Err(format!("protocol: {protocol:?} is neither tcp nor rdma"));
        }
        Ok(Settings {
            local_server_name: pick(&a.local_server_name, &file.local_server_name)
                .unwrap_or_else(|| "127.0.0.1".into()),
            // Empty: MC_METADATA_SERVER, then P2P (as initialize reads it).
            metadata_server: pick(&a.metadata_server, &file.metadata_server).unwrap_or_default(),
            protocol,
            device_name: pick(&a.device_name, &file.device_name).unwrap_or_default(),
            pool_bytes,
            stream_listen,
            trnames,
            http: pick(&a.http, &file.http),
            drain_timeout: Duration::from_secs_f64(drain),
        })
    }
}

/// `NAME`, `NAME=discard`, `NAME=count` or `NAME=dir:PATH`.
fn parse_trname(text: &str) -> Result<(String, Sink), String> {
    let (name, how) = text.split_once('=').unwrap_or((text, "count"));
    let name = name.trim();
    if name.is_empty() || name.contains(['/', ' ', '\r', '\n']) {
        return Err(format!("trname: {text:?} needs a name without '/' or spaces"));
    }
    let sink = match how.trim() {
        "discard" => Sink::Discard,
        "count" => Sink::Count,
        d if d.starts_with("dir:") && d.len() > 4 => Sink::Dir(PathBuf::from(&d[4..])),
        other => return Err(format!("trname {name}: {other:?} is not discard, count or dir:PATH")),
    };
    Ok((name.to_string(), sink))
}

/// A path component from a sender: refused unless it names one plain
/// entry (no `..`, no `/`, not empty), so nothing lands outside the
/// directory.
fn component(what: &str, s: &str) -> Result<String, HandlerError> {
    if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\0']) {
        return Err(HandlerError(format!("the {what} {s:?} cannot be a file name under the node's directory")));
    }
    Ok(s.to_string())
}

/// Receives one trname's objects.
struct NodeHandler {
    sink: Sink,
    objects: AtomicU64,
    bytes: AtomicU64,
}

impl NodeHandler {
    fn object(&self, hdr: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError> {
        let n = match &self.sink {
            Sink::Discard | Sink::Count => body.discard()?,
            Sink::Dir(root) => {
                let dir = root.join(component("bucket", &hdr.bucket.name)?);
                let file = component("object name", &hdr.name)?;
                std::fs::create_dir_all(&dir).map_err(|e| HandlerError(format!("{}: {e}", dir.display())))?;
                // Written aside, then renamed: a reader never sees half an
                // object, and a failed one leaves nothing behind.
                let tmp = dir.join(format!(".{file}.part"));
                let result = (|| -> std::io::Result<u64> {
                    let mut out = std::fs::File::create(&tmp)?;
                    let n = std::io::copy(body, &mut out)?;
                    out.sync_all()?;
                    std::fs::rename(&tmp, dir.join(&file))?;
                    Ok(n)
                })();
                result.map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    HandlerError(format!("{}: {e}", dir.join(&file).display()))
                })?
            }
        };
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Signals received (SIGTERM, SIGINT).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        // The second: out at once. _exit is async-signal-safe.
        // SAFETY: ends the process; no state of ours is touched.
        unsafe { libc::_exit(130) };
    }
}

fn lifecycle(event: &str) {
    eprintln!("shardwire node: {event}");
}

pub fn run(a: &NodeArgs) -> Result<(), String> {
    let s = Settings::resolve(a)?;
    // SAFETY: installs a handler that only counts in an atomic (and ends
    // the process on the second signal).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let ready = Arc::new(AtomicBool::new(false));
    let http = match &s.http {
        None => None,
        Some(addr) => {
            let r = ready.clone();
            let pages: Vec<(&'static str, Page)> = vec![
                ("/metrics", metrics_page()),
                ("/healthz", Box::new(|| (200, "text/plain", "alive\n".to_string()))),
                (
                    "/readyz",
                    Box::new(move || match r.load(Ordering::Acquire) {
                        true => (200, "text/plain", "ready\n".to_string()),
                        false => (503, "text/plain", "not ready\n".to_string()),
                    }),
                ),
            ];
            let ep = Endpoint::start(addr, pages).map_err(|e| format!("http: {e}"))?;
            lifecycle(&format!("serving http://{}/metrics, /healthz, /readyz", ep.addr()));
            Some(ep)
        }
    };

    let engine = TransferEngine::new();
    engine
        .initialize(&s.local_server_name, &s.metadata_server, &s.protocol, &s.device_name)
        .map_err(|e| format!("cannot start the engine: {e}"))?;
    let name = engine.segment_name().map_err(|e| e.to_string())?;
    lifecycle(&format!("engine up: segment {name}, protocol {}", s.protocol));
    let parts = allocate_pool(&engine, s.pool_bytes)?;
    lifecycle(&format!("pool of {} bytes registered in {} part(s)", s.pool_bytes, parts.len()));

    let mut handlers: BTreeMap<String, Arc<NodeHandler>> = BTreeMap::new();
    let receiver = match s.stream_listen {
        None => None,
        Some(addr) => {
            let mut list: Vec<(String, Arc<dyn RecvHandler>)> = Vec::new();
            for (trname, sink) in &s.trnames {
                let h =
                    Arc::new(NodeHandler { sink: sink.clone(), objects: AtomicU64::new(0), bytes: AtomicU64::new(0) });
                handlers.insert(trname.clone(), h.clone());
                let f = move |hdr: &ObjHdr, body: &mut ObjReader<'_>| h.object(hdr, body);
                list.push((trname.clone(), Arc::new(f)));
            }
            let rx = Receiver::bind_with(addr, RxOptions::default(), list)
                .map_err(|e| format!("stream-listen: cannot listen on {addr}: {e}"))?;
            let names: Vec<&str> = s.trnames.iter().map(|(n, _)| n.as_str()).collect();
            lifecycle(&format!("receiving streams at {} for {}", rx.url(), names.join(", ")));
            Some(rx)
        }
    };

    // Ready first, then the line peers and scripts wait for: whoever has
    // read it finds /readyz saying so.
    ready.store(true, Ordering::Release);
    lifecycle("ready");
    println!("segment_id={name}");
    if a.json {
        let line = serde_json::json!({
            "segment_id": name,
            "http": http.as_ref().map(|ep| ep.addr().to_string()),
            "streams": receiver.as_ref().map(Receiver::url),
            "pool_bytes": s.pool_bytes,
            "pool_parts": parts.len(),
        });
        println!("{line}");
    }
    let _ = std::io::stdout().flush();

    while SIGNALS.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(TICK);
    }
    ready.store(false, Ordering::Release);
    // New peers and streams are refused from here; what is open goes on.
    if let Err(e) = engine.stop_accepting() {
        lifecycle(&format!("cannot stop accepting transfers: {e}"));
    }
    if let Some(rx) = &receiver {
        rx.stop_accepting();
    }
    lifecycle(&format!("stopping: no new peers; draining for up to {:?}", s.drain_timeout));
    let drained = drain(receiver.as_ref(), s.drain_timeout);
    lifecycle(if drained { "drained" } else { "drain timeout: closing what is still open" });
    drop(receiver);
    for (trname, h) in &handlers {
        if h.sink == Sink::Count || matches!(h.sink, Sink::Dir(_)) {
            let (n, b) = (h.objects.load(Ordering::Relaxed), h.bytes.load(Ordering::Relaxed));
            lifecycle(&format!("trname {trname}: {n} objects, {b} bytes"));
        }
    }
    // Shutting down withdraws the metadata keys.
    engine.shutdown();
    drop(http);
    lifecycle("stopped");
    if a.json {
        let trnames: BTreeMap<&String, serde_json::Value> = handlers
            .iter()
            .map(|(t, h)| {
                let (n, b) = (h.objects.load(Ordering::Relaxed), h.bytes.load(Ordering::Relaxed));
                (t, serde_json::json!({ "objects": n, "bytes": b }))
            })
            .collect();
        println!("{}", serde_json::json!({ "stopped": true, "drained": drained, "trnames": trnames }));
    }
    Ok(())
}

/// The pool as managed buffers of at most [`POOL_PART_BYTES_MAX`], dealt
/// over the NUMA nodes the machine has online (each part preferring its
/// node), so every shard finds memory on its own node.
fn allocate_pool(engine: &TransferEngine, bytes: u64) -> Result<Vec<(u64, u64)>, String> {
    let nodes = online_nodes();
    let parts = bytes.div_ceil(POOL_PART_BYTES_MAX).max(nodes.len() as u64).min(bytes.div_ceil(4096));
    let per = bytes.div_ceil(parts).next_multiple_of(4096);
    let mut out = Vec::new();
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let len = per.min(left).next_multiple_of(4096);
        let addr = engine
            .allocate_managed_buffer(len)
            .map_err(|e| format!("pool: cannot allocate {len} bytes ({} of {bytes} so far): {e}", bytes - left))?;
        if nodes.len() > 1 {
            let node = nodes[i % nodes.len()];
            let start = addr & !4095;
            if let Err(e) = shardwire::mem::probe::prefer_node(start, len, node) {
                lifecycle(&format!("pool part {i}: cannot prefer NUMA node {node} ({e}); pages go where touched"));
            }
        }
        out.push((addr, len));
        left = left.saturating_sub(len);
        i += 1;
    }
    Ok(out)
}

/// The NUMA nodes online (`/sys/devices/system/node/online`, `0-1,3`);
/// node 0 alone when the file says nothing.
fn online_nodes() -> Vec<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/node/online").unwrap_or_default();
    let mut nodes = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.trim().parse::<u32>(), hi.trim().parse::<u32>()) {
            nodes.extend((lo..=hi.min(lo + 1023)).take(1024));
        }
    }
    if nodes.is_empty() { vec![0] } else { nodes }
}

/// Waits until nothing moves (no request served, no object received) for
/// [`QUIET`], or `timeout` passes. True when it went quiet. A stream left
/// open but idle counts as finished: senders keep streams open between
/// objects.
fn drain(rx: Option<&Receiver>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let activity = || {
        // The counters themselves, not engine.metrics(): no map of series
        // names built and searched every tick.
        let c = shardwire::telemetry::counters::snapshot();
        use shardwire::telemetry::{Op, Side, Via};
        let target: u64 =
            Op::ALL.iter().flat_map(|&op| Via::ALL.map(|via| c.series(op, via, Side::Target).requests)).sum();
        let served = target + c.streams.iter().map(|s| s.objects).sum::<u64>();
        let offsets: i64 =
            rx.map_or(0, |rx| rx.stats().values().flat_map(|e| e.sessions.iter().map(|s| s.offset)).sum::<i64>());
        (served, offsets)
    };
    let mut last = activity();
    let mut quiet_since = Instant::now();
    loop {
        let now = Instant::now();
        let seen = activity();
        if seen != last {
            last = seen;
            quiet_since = now;
        }
        if now.duration_since(quiet_since) >= QUIET {
            return true;
        }
        if now >= deadline {
            return false;
        }
        std::thread::sleep(TICK.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trnames_and_their_sinks() {
        assert_eq!(parse_trname("a").unwrap(), ("a".into(), Sink::Count));
        assert_eq!(parse_trname("a=discard").unwrap().1, Sink::Discard);
        assert_eq!(parse_trname("a=dir:/tmp/x").unwrap().1, Sink::Dir("/tmp/x".into()));
        for bad in ["", "=count", "a/b", "a=dir:", "a=keep"] {
            assert!(parse_trname(bad).is_err(), "{bad}");
        }
        assert!(component("bucket", "..").is_err());
        assert!(component("object name", "a/b").is_err());
        assert_eq!(component("object name", "a.b").unwrap(), "a.b");
    }
}
