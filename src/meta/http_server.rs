//! `shardwire metadata-server`: an HTTP metadata server in Mooncake's
//! protocol, that Mooncake engines use unchanged, with the rules of the
//! wheel's `mooncake_http_metadata_server`:
//!
//! - `GET`, `PUT`, `DELETE` on `/metadata?key=<escaped key>`; the key is
//!   stripped of surrounding blanks;
//! - 400 for a missing, empty or blank key, whatever the method;
//! - 404 for an entry that is not there (`GET`, `DELETE`);
//! - 400 for a `PUT` of an `rpc_meta` key that is already present (an
//!   engine must delete its stale keys before it registers again);
//! - 405 for another method, 200 otherwise.
//!
//! Beyond Mooncake's:
//!
//! - with a state file, every change is on disk before it is acknowledged
//!   (written to a temporary file, synced, renamed over the old one, and
//!   the directory synced), so a crash or a restart loses nothing a client
//!   was told is done. Each change rewrites the whole file: fine for
//!   metadata (a few KiB per engine), not for a store of bulk data;
//! - a prober connects to the RPC port in each `rpc_meta` entry every
//!   interval; after `failures` refusals in a row it deletes that engine's
//!   `rpc_meta` and `ram` keys (Mooncake engines leave theirs behind when
//!   they die);
//! - everything has a bound: body bytes, keys, total bytes held,
//!   connections, and the time a client may take to send a request or sit
//!   idle.
//!
//! The protocol rules are sans-IO ([`Table::handle`] and [`take_request`]);
//! the threads that accept, read, write, save and probe are a thin driver.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::store::RpcMeta;
use crate::http::request::{self, BodyFraming, RequestHead};
use crate::http::{chunked, query};

/// The path the metadata is served at (as the wheel's server and
/// Mooncake's Go example do).
pub const PATH: &str = "/metadata";

/// The server's bounds and the prober's settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most bytes of one request body (a value).
    pub body_bytes_max: usize,
    /// Most keys held.
    pub keys_max: usize,
    /// Most bytes held, keys and values together.
    pub held_bytes_max: usize,
    /// Most connections open at once; more are answered 503 and closed.
    pub connections_max: usize,
    /// How long a client may take to send one whole request, from its
    /// first byte (a slow client holds a thread no longer than this).
    pub request_timeout_ms: u64,
    /// How long a kept connection may sit idle between requests.
    pub idle_timeout_ms: u64,
    /// Time between probes of each engine; 0 turns probing off.
    pub probe_interval_ms: u64,
    /// Refused probes in a row before an engine's keys are dropped.
    pub probe_failures: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes_max: 16 << 20,
            keys_max: 100_000,
            held_bytes_max: 1 << 30,
            connections_max: 256,
            request_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            probe_interval_ms: 5_000,
            probe_failures: 3,
        }
    }
}

/// What the server answers: a status and a short text (the wheel's
/// wording), or a stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// When the table changed (and must be saved before this is sent):
    /// the key and its value before, to undo the change if it cannot be.
    pub undo: Option<(String, Option<Vec<u8>>)>,
}

impl Answer {
    fn text(status: u16, text: &str) -> Self {
        Self { status, body: text.as_bytes().to_vec(), undo: None }
    }
}

/// The keys and values, and the rules of each request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    entries: BTreeMap<String, Vec<u8>>,
    held_bytes: usize,
}

impl Table {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    pub fn insert(&mut self, key: String, value: Vec<u8>) {
        self.held_bytes += key.len() + value.len();
        if let Some(old) = self.entries.insert(key.clone(), value) {
            self.held_bytes -= key.len() + old.len();
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
        let old = self.entries.remove(key)?;
        self.held_bytes -= key.len() + old.len();
        Some(old)
    }

    /// Sets `key` back to `value` (`None`: absent).
    pub fn restore(&mut self, key: String, value: Option<Vec<u8>>) {
        match value {
            Some(v) => self.insert(key, v),
            None => {
                self.remove(&key);
            }
        }
    }

    /// The `rpc_meta` entries: key and value.
    pub fn rpc_metas(&self) -> Vec<(String, Vec<u8>)> {
        self.entries.iter().filter(|(k, _)| k.contains("rpc_meta")).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Answers one request (`target` is the path and query as sent).
    pub fn handle(&mut self, method: &str, target: &str, body: &[u8], limits: &Limits) -> Answer {
        let (path, query_text) = query::split_target(target);
        if path != PATH {
            return Answer::text(404, &format!("no such path {path:?}; metadata is served at {PATH}"));
        }
        let key = match query::param(query_text, "key") {
            Ok(k) => k.unwrap_or_default(),
            Err(e) => return Answer::text(400, &format!("the key cannot be decoded: {e}")),
        };
        let key = key.trim();
        if key.is_empty() {
            return Answer::text(400, "metadata key is required");
        }
        match method {
            "GET" => match self.entries.get(key) {
                Some(v) => Answer { status: 200, body: v.clone(), undo: None },
                None => Answer::text(404, "metadata not found"),
            },
            "PUT" => {
                if key.contains("rpc_meta") && self.entries.contains_key(key) {
                    return Answer::text(400, "Duplicate rpc_meta key not allowed");
                }
                let old = self.entries.get(key).map_or(0, |v| key.len() + v.len());
                if old == 0 && self.entries.len() >= limits.keys_max {
                    return Answer::text(507, &format!("the server holds {} keys, its limit", limits.keys_max));
                }
                if self.held_bytes - old + key.len() + body.len() > limits.held_bytes_max {
                    return Answer::text(507, &format!("the server holds {} bytes, its limit", limits.held_bytes_max));
                }
                let before = self.entries.get(key).cloned();
                self.insert(key.to_string(), body.to_vec());
                Answer { status: 200, body: b"metadata updated".to_vec(), undo: Some((key.to_string(), before)) }
            }
            "DELETE" => match self.entries.get(key).cloned() {
                Some(before) => {
                    self.remove(key);
                    Answer {
                        status: 200,
                        body: b"metadata deleted".to_vec(),
                        undo: Some((key.to_string(), Some(before))),
                    }
                }
                None => Answer::text(404, "metadata not found"),
            },
            _ => Answer::text(405, "Method not allowed"),
        }
    }

    /// The state file's text: JSON, values in base64 (they are bytes).
    pub fn to_json(&self) -> Vec<u8> {
        let entries: serde_json::Map<String, serde_json::Value> =
            self.entries.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(B64.encode(v)))).collect();
        serde_json::to_vec(&serde_json::json!({ "version": 1, "entries": entries })).expect("a map of strings")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if v.get("version").and_then(|v| v.as_u64()) != Some(1) {
            return Err("not a version 1 state file".into());
        }
        let entries = v.get("entries").and_then(|e| e.as_object()).ok_or("no \"entries\" object")?;
        let mut table = Table::default();
        for (k, v) in entries {
            let text = v.as_str().ok_or_else(|| format!("the value of {k:?} is not a string"))?;
            let value = B64.decode(text).map_err(|e| format!("the value of {k:?} is not base64: {e}"))?;
            table.insert(k.clone(), value);
        }
        Ok(table)
    }
}

/// One whole request taken from the front of a connection's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: RequestHead,
    pub body: Vec<u8>,
}

/// What [`take_request`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Not all there yet; `continue_wanted` once the head is in and asks
    /// for `100 Continue` (libcurl does for bodies above 1 KiB).
    Partial { continue_wanted: bool },
    /// A request and the bytes it used.
    Whole(Request, usize),
}

/// Why a request is refused before it is handled, with its status.
pub type Refusal = request::HeadError;

fn refusal(status: u16, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

/// Takes one request (head and body, `Content-Length` or chunked) from the
/// front of `buf`, refusing bodies above `body_bytes_max`.
pub fn take_request(buf: &[u8], body_bytes_max: usize) -> Result<Taken, Refusal> {
    let Some((head, head_len)) = request::parse_head(buf)? else {
        return Ok(Taken::Partial { continue_wanted: false });
    };
    let rest = &buf[head_len..];
    let partial = Ok(Taken::Partial { continue_wanted: head.expect_continue });
    match head.framing {
        BodyFraming::None => Ok(Taken::Whole(Request { head, body: Vec::new() }, head_len)),
        BodyFraming::Length(n) => {
            if n > body_bytes_max as u64 {
                return Err(refusal(413, format!("a body of {n} bytes, above the limit of {body_bytes_max}")));
            }
            match rest.get(..n as usize) {
                Some(body) => Ok(Taken::Whole(Request { body: body.to_vec(), head }, head_len + n as usize)),
                None => partial,
            }
        }
        BodyFraming::Chunked => {
            let mut decoder = chunked::Decoder::new();
            let (mut used, mut body) = (0, Vec::new());
            loop {
                let (n, step) = decoder.step(&rest[used..]).map_err(|e| refusal(400, e.to_string()))?;
                used += n;
                match step {
                    chunked::Step::Data(d) => {
                        if body.len() + d.len() > body_bytes_max {
                            return Err(refusal(413, format!("a body above the limit of {body_bytes_max} bytes")));
                        }
                        body.extend_from_slice(d);
                    }
                    chunked::Step::Done => return Ok(Taken::Whole(Request { head, body }, head_len + used)),
                    chunked::Step::NeedMore => return partial,
                }
            }
        }
    }
}

/// A whole response with `body` (JSON or the wheel's short texts, sent as
/// `application/json` as the wheel does).
pub fn response(status: u16, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        reason(status),
        body.len()
    );
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        413 => "Content Too Large",
        507 => "Insufficient Storage",
        s => request::reason(s),
    }
}

/// For the fuzz target: any bytes as a connection's input, whole and cut
/// at every length, never panic; a request found in a prefix is the one
/// found in the whole; handling it keeps the table's byte count right.
pub fn fuzz(data: &[u8]) {
    let whole = take_request(data, 1 << 16);
    for cut in 0..data.len().min(1024) {
        if let Ok(Taken::Whole(r, used)) = take_request(&data[..cut], 1 << 16) {
            assert!(used <= cut);
            assert_eq!(Ok(Taken::Whole(r, used)), whole);
        }
    }
    if let Ok(Taken::Whole(r, used)) = whole {
        assert!(used <= data.len());
        let limits = Limits { keys_max: 4, held_bytes_max: 1 << 12, ..Limits::default() };
        let mut table = Table::default();
        for method in [r.head.method.as_str(), "PUT", "GET", "DELETE"] {
            let a = table.handle(method, &r.head.path, &r.body, &limits);
            assert!(matches!(a.status, 200 | 400 | 404 | 405 | 507), "{a:?}");
            let held: usize = table.entries.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert_eq!(held, table.held_bytes);
        }
    }
}

/// The table, and the file it is kept in.
struct State {
    table: Table,
    file: Option<PathBuf>,
}

impl State {
    /// Writes the table to the file (if any) so that it survives a crash:
    /// a temporary file, synced, renamed over the old one, and the
    /// directory synced so that the rename itself is on disk.
    fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        // Next to the file (a rename does not cross file systems), and
        // never the file itself whatever its name.
        let mut tmp = file.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.table.to_json())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, file)?;
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Loads `state_file` (if given and present), binds `listen`, and
    /// starts accepting (and probing, unless the interval is 0).
    pub fn start(listen: &str, state_file: Option<&Path>, limits: Limits) -> Result<Self, String> {
        assert!(limits.probe_failures >= 1 && limits.connections_max >= 1);
        let table = match state_file {
            Some(path) if path.exists() => {
                let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Table::from_json(&bytes).map_err(|e| format!("the state file {}: {e}", path.display()))?
            }
            _ => Table::default(),
        };
        let state = State { table, file: state_file.map(Path::to_path_buf) };
        // Written now, so that a state file that cannot be written is an
        // error at start and not at the first PUT.
        state.save().map_err(|e| format!("cannot write the state file: {e}"))?;
        let listener = TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(Mutex::new(state));
        let stop = Arc::new(AtomicBool::new(false));
        let limits = Arc::new(limits);
        let mut threads = Vec::new();
        {
            let (state, stop, limits) = (state.clone(), stop.clone(), limits.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("meta-accept".into())
                    .spawn(move || accept_loop(&listener, &state, &stop, &limits))
                    .map_err(|e| e.to_string())?,
            );
        }
        if limits.probe_interval_ms > 0 {
            let (state, stop, limits) = (state.clone(), stop.clone(), limits.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("meta-probe".into())
                    .spawn(move || probe_loop(&state, &stop, &limits))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Self { addr, stop, threads })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until the process ends.
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting and probing (connections open finish their request).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop out of accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for t in self.threads.drain(..) {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<Mutex<State>>, stop: &Arc<AtomicBool>, limits: &Arc<Limits>) {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut stream) = conn else { continue };
        if open.fetch_add(1, Ordering::AcqRel) >= limits.connections_max {
            open.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(&response(503, b"too many connections", false));
            continue;
        }
        let (state, limits, open2) = (state.clone(), limits.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("meta-conn".into()).spawn(move || {
            serve(stream, &state, &limits);
            open2.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Serves one connection: requests one after another while it is kept
/// alive, each within the request timeout, with idle gaps of at most the
/// idle timeout.
fn serve(mut stream: TcpStream, state: &Mutex<State>, limits: &Limits) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(limits.request_timeout_ms)));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut continued = false;
    // The deadline of the request under way, set at its first byte.
    let mut deadline: Option<Instant> = None;
    loop {
        match take_request(&buf, limits.body_bytes_max) {
            Err(refused) => {
                let body = serde_json::json!({ "error": refused.message }).to_string();
                let _ = stream.write_all(&response(refused.status, body.as_bytes(), false));
                let _ = stream.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(Taken::Whole(req, used)) => {
                buf.drain(..used);
                let answer = answer(state, &req, limits);
                let keep = req.head.keep_alive && answer.status != 500;
                if stream.write_all(&response(answer.status, &answer.body, keep)).is_err() || !keep {
                    return;
                }
                continued = false;
                deadline = (!buf.is_empty()).then(|| Instant::now() + Duration::from_millis(limits.request_timeout_ms));
                continue;
            }
            Ok(Taken::Partial { continue_wanted }) => {
                if continue_wanted && !continued {
                    continued = true;
                    if stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                        return;
                    }
                }
            }
        }
        let wait = match deadline {
            None => Duration::from_millis(limits.idle_timeout_ms),
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        if wait.is_zero() {
            let _ = stream.write_all(&response(408, b"the request took too long", false));
            return;
        }
        let _ = stream.set_read_timeout(Some(wait));
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                if buf.is_empty() && deadline.is_none() {
                    deadline = Some(Instant::now() + Duration::from_millis(limits.request_timeout_ms));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Idle too long, or too slow: the connection is closed.
            Err(_) => {
                if deadline.is_some() {
                    let _ = stream.write_all(&response(408, b"the request took too long", false));
                }
                return;
            }
        }
    }
}

/// Handles a request under the lock, saving a change before answering.
fn answer(state: &Mutex<State>, req: &Request, limits: &Limits) -> Answer {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let mut answer = state.table.handle(&req.head.method, &req.head.path, &req.body, limits);
    if let Some((key, before)) = answer.undo.take()
        && let Err(e) = state.save()
    {
        // Not on disk: undone, and the client told.
        log::error!("metadata-server: cannot save the state: {e}");
        state.table.restore(key, before);
        return Answer::text(500, &format!("the change could not be saved: {e}"));
    }
    answer
}

/// Probes every engine that has an `rpc_meta` key, every interval, and
/// drops the keys of one refused `probe_failures` times in a row.
fn probe_loop(state: &Mutex<State>, stop: &AtomicBool, limits: &Limits) {
    let interval = Duration::from_millis(limits.probe_interval_ms);
    // A probe never takes longer than the interval, nor than 1 s.
    let timeout = interval.min(Duration::from_secs(1));
    let mut failures: HashMap<String, (Vec<u8>, u32)> = HashMap::new();
    let mut next = Instant::now() + interval;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        next = now + interval;
        let metas = state.lock().unwrap_or_else(|e| e.into_inner()).table.rpc_metas();
        failures.retain(|k, _| metas.iter().any(|(m, _)| m == k));
        for (key, value) in metas {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let Ok(meta) = serde_json::from_slice::<RpcMeta>(&value) else { continue };
            let alive = probe(&meta, timeout);
            let entry = failures.entry(key.clone()).or_insert_with(|| (value.clone(), 0));
            if alive || entry.0 != value {
                *entry = (value.clone(), 0);
                if alive {
                    continue;
                }
            }
            entry.1 += 1;
            if entry.1 >= limits.probe_failures {
                failures.remove(&key);
                drop_engine(state, &key, &value, &meta, limits);
            }
        }
    }
}

/// Whether something accepts connections at the engine's RPC port.
fn probe(meta: &RpcMeta, timeout: Duration) -> bool {
    let host = meta.ip_or_host_name.trim_matches(|c| c == '[' || c == ']');
    let Ok(addrs) = (host, meta.rpc_port).to_socket_addrs() else { return false };
    addrs.into_iter().any(|a| TcpStream::connect_timeout(&a, timeout).is_ok())
}

/// The `ram` key that goes with an `rpc_meta` key:
/// `<prefix>rpc_meta/<name>` → `<prefix>ram/<name>`.
pub fn ram_key_of(rpc_meta_key: &str) -> Option<String> {
    let at = rpc_meta_key.find("rpc_meta/")?;
    Some(format!("{}ram/{}", &rpc_meta_key[..at], &rpc_meta_key[at + "rpc_meta/".len()..]))
}

fn drop_engine(state: &Mutex<State>, key: &str, probed: &[u8], meta: &RpcMeta, limits: &Limits) {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    // Re-registered meanwhile: a new engine, not the dead one.
    if state.table.get(key) != Some(probed) {
        return;
    }
    let ram = ram_key_of(key);
    let removed: Vec<(String, Option<Vec<u8>>)> = std::iter::once(key.to_string())
        .chain(ram.clone())
        .map(|k| {
            let old = state.table.remove(&k);
            (k, old)
        })
        .collect();
    if let Err(e) = state.save() {
        log::error!("metadata-server: cannot save the state: {e}; keeping {key}");
        for (k, old) in removed {
            state.table.restore(k, old);
        }
        return;
    }
    log::warn!(
        "metadata-server: dropped {key} and {} ({}:{} refused {} probes in a row, {} ms apart)",
        ram.as_deref().unwrap_or("no ram key"),
        meta.ip_or_host_name,
        meta.rpc_port,
        limits.probe_failures,
        limits.probe_interval_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(t: &mut Table, key: &str, body: &[u8]) -> u16 {
        t.handle("PUT", &format!("{PATH}?key={}", query::escape(key)), body, &Limits::default()).status
    }

    /// The cases of the wheel's `test_http_metadata_server.py`, and ours.
    #[test]
    fn the_wheels_rules() {
        let mut t = Table::default();
        let l = Limits::default();
        // A missing, empty or blank key: 400, whatever the method.
        for method in ["GET", "PUT", "DELETE", "POST"] {
            for target in ["/metadata", "/metadata?key=", "/metadata?key=%20%20", "/metadata?key=+", "/metadata?x=1"] {
                let a = t.handle(method, target, b"{}", &l);
                assert_eq!((a.status, a.body.as_slice()), (400, &b"metadata key is required"[..]), "{method} {target}");
            }
        }
        // Round trip; the key is stripped.
        assert_eq!(put(&mut t, " k1 ", b"{\"a\":1}"), 200);
        let a = t.handle("GET", "/metadata?key=k1", b"", &l);
        assert_eq!((a.status, a.body.as_slice()), (200, &b"{\"a\":1}"[..]));
        assert_eq!(t.handle("GET", "/metadata?key=%20k1%09", b"", &l).status, 200);
        assert_eq!(put(&mut t, "k1", b"2"), 200, "other keys may be overwritten");
        assert_eq!(t.get("k1"), Some(&b"2"[..]));
        // Missing entries: 404.
        assert_eq!(t.handle("GET", "/metadata?key=nope", b"", &l).status, 404);
        assert_eq!(t.handle("DELETE", "/metadata?key=nope", b"", &l).status, 404);
        assert_eq!(t.handle("DELETE", "/metadata?key=k1", b"", &l).status, 200);
        assert_eq!(t.handle("GET", "/metadata?key=k1", b"", &l).status, 404);
        // rpc_meta keys: a second PUT is refused until the key is deleted.
        assert_eq!(put(&mut t, "mooncake/rpc_meta/a", b"1"), 200);
        assert_eq!(put(&mut t, "mooncake/rpc_meta/a", b"2"), 400);
        assert_eq!(t.get("mooncake/rpc_meta/a"), Some(&b"1"[..]));
        assert_eq!(t.handle("DELETE", "/metadata?key=mooncake%2Frpc_meta%2Fa", b"", &l).status, 200);
        assert_eq!(put(&mut t, "mooncake/rpc_meta/a", b"2"), 200);
        // Other methods, other paths, bad escapes.
        assert_eq!(t.handle("POST", "/metadata?key=k", b"", &l).status, 405);
        assert_eq!(t.handle("GET", "/other?key=k", b"", &l).status, 404);
        assert_eq!(t.handle("GET", "/metadata?key=%zz", b"", &l).status, 400);
    }

    #[test]
    fn limits_hold() {
        let l = Limits { keys_max: 2, held_bytes_max: 20, ..Limits::default() };
        let mut t = Table::default();
        let put = |t: &mut Table, k: &str, v: &[u8]| t.handle("PUT", &format!("/metadata?key={k}"), v, &l).status;
        assert_eq!(put(&mut t, "a", b"12345"), 200);
        assert_eq!(put(&mut t, "b", b"1"), 200);
        assert_eq!(put(&mut t, "c", b"1"), 507, "a third key");
        assert_eq!(put(&mut t, "a", b"12345678901234567890"), 507, "too many bytes");
        assert_eq!(put(&mut t, "a", b"1234567890"), 200, "a replaced value counts once");
        assert_eq!(t.held_bytes, 1 + 10 + 1 + 1);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut t = Table::default();
        put(&mut t, "mooncake/ram/x", b"{\"buffers\":[]}\n");
        put(&mut t, "bin", &[0, 255, 10]);
        assert_eq!(Table::from_json(&t.to_json()).unwrap(), t);
        assert!(Table::from_json(b"{}").is_err());
        assert!(Table::from_json(b"{\"version\":1,\"entries\":{\"k\":\"!!\"}}").is_err());
        assert!(Table::from_json(b"nope").is_err());
    }

    #[test]
    fn requests_are_taken_at_every_split() {
        let two = b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /metadata?key=k HTTP/1.1\r\n\r\n";
        let first = two.len() - 32;
        for cut in 0..first {
            assert!(matches!(take_request(&two[..cut], 64), Ok(Taken::Partial { .. })), "cut {cut}");
        }
        let Ok(Taken::Whole(r, used)) = take_request(two, 64) else { panic!() };
        assert_eq!((r.head.method.as_str(), r.body.as_slice(), used), ("PUT", &b"{}"[..], first));
        let Ok(Taken::Whole(r, _)) = take_request(&two[used..], 64) else { panic!() };
        assert_eq!(r.head.method, "GET");
        let chunked = b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
        let Ok(Taken::Whole(r, used)) = take_request(chunked, 64) else { panic!() };
        assert_eq!((r.body.as_slice(), used), (&b"{}"[..], chunked.len()));
        let expect = b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(take_request(expect, 64), Ok(Taken::Partial { continue_wanted: true }));
    }

    #[test]
    fn bad_requests_are_refused_with_a_status() {
        let status = |raw: &[u8]| take_request(raw, 8).unwrap_err().status;
        assert_eq!(status(b"GARBAGE\x01\r\n\r\n"), 400);
        assert_eq!(status(b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 9\r\n\r\n"), 413);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n123456789\r\n"), 413);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
    }

    #[test]
    fn ram_keys_follow_rpc_meta_keys() {
        assert_eq!(ram_key_of("mooncake/rpc_meta/h:1").as_deref(), Some("mooncake/ram/h:1"));
        assert_eq!(ram_key_of("mooncake/blue/rpc_meta/a/b").as_deref(), Some("mooncake/blue/ram/a/b"));
        assert_eq!(ram_key_of("x/rpc_meta"), None);
    }

    /// The fuzz target over generated inputs: valid requests and their
    /// mutants.
    #[test]
    fn the_fuzz_target_holds_on_generated_inputs() {
        let seeds: [&[u8]; 3] = [
            b"PUT /metadata?key=mooncake%2Frpc_meta%2Fa HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"DELETE /metadata?key=+k+ HTTP/1.0\r\n\r\n",
        ];
        for seed in seeds {
            for m in crate::proto::mutants(seed, &[0, b'\r', b'\n', b'%', b'9', b' ', 0xff]) {
                fuzz(&m);
            }
        }
    }
}
