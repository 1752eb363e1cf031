//! A small HTTP endpoint for operators: `GET /metrics` (Prometheus text)
//! and whatever other read-only pages its owner adds (`shardwire node`
//! adds `/healthz` and `/readyz`).
//!
//! One thread accepts and answers one request per connection, then closes
//! it. Every wait is bounded: a client has [`CLIENT_TIMEOUT`] to send its
//! head and take the answer, so a stuck client delays others by at most
//! that. Heads are parsed by [`crate::http::request`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::request::{self, HEAD_BYTES_MAX};

/// How long a client has to send its request head, and to take the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A page: status, content type and body, made when asked for.
pub type Page = Box<dyn Fn() -> (u16, &'static str, String) + Send + Sync>;

/// The Prometheus text format's content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `/metrics` page: the process's figures.
pub fn metrics_page() -> Page {
    Box::new(|| (200, PROMETHEUS_TEXT, super::prom::exporter().render()))
}

/// The process's `/metrics` endpoint (`SHARDWIRE_METRICS_ADDR`), once
/// started.
static PROCESS: Mutex<Option<Endpoint>> = Mutex::new(None);

/// Serves `/metrics` on `addr` for the rest of the process, unless an
/// earlier engine started it already (then its address is returned, and a
/// different `addr` is only logged: one process, one endpoint).
pub fn process_metrics(addr: &str) -> std::io::Result<SocketAddr> {
    let mut slot = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ep) = slot.as_ref() {
        if addr.rsplit_once(':').is_none_or(|(_, p)| p != "0" && p != ep.addr.port().to_string()) {
            log::warn!("metrics: already served at {}; SHARDWIRE_METRICS_ADDR={addr} is not bound again", ep.addr);
        }
        return Ok(ep.addr);
    }
    let ep = Endpoint::start(addr, vec![("/metrics", metrics_page())])?;
    log::info!("metrics: serving http://{}/metrics", ep.addr);
    let bound = ep.addr;
    *slot = Some(ep);
    Ok(bound)
}

/// Where the process's `/metrics` endpoint listens, if it was started.
pub fn process_metrics_addr() -> Option<SocketAddr> {
    PROCESS.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|ep| ep.addr)
}

/// A running endpoint; stops when dropped.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `addr` (`host:port`; port 0 picks one) and serves `pages`
    /// (path, page) until dropped.
    pub fn start(addr: &str, pages: Vec<(&'static str, Page)>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} for metrics: {e}")))?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("sw-http".into()).spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &pages) {
                    log::debug!("metrics endpoint: a client went away: {e}");
                }
            }
        })?;
        Ok(Self { addr: local, stop, thread: Some(thread) })
    }

    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accepting thread with a connection of our own; if that
        // fails the listener is gone already and the thread has ended.
        let _ = TcpStream::connect_timeout(&self.addr, CLIENT_TIMEOUT);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head and answers it.
fn answer(mut conn: TcpStream, pages: &[(&'static str, Page)]) -> std::io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = vec![0u8; HEAD_BYTES_MAX];
    let mut have = 0;
    let head = loop {
        let n = conn.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(());
        }
        have += n;
        match request::parse_head(&buf[..have]) {
            Ok(Some((head, _))) => break head,
            Ok(None) if have < buf.len() => continue,
            Ok(None) => {
                let text = format!("request head above {HEAD_BYTES_MAX} bytes\n");
                return conn.write_all(&request::response_typed(431, "text/plain", &text, false));
            }
            Err(e) => {
                let text = format!("{}\n", e.message);
                return conn.write_all(&request::response_typed(e.status, "text/plain", &text, false));
            }
        }
    };
    let path = head.path.split('?').next().unwrap_or_default();
    let reply = match (head.method.as_str(), pages.iter().find(|(p, _)| *p == path)) {
        ("GET" | "HEAD", Some((_, page))) => {
            let (status, kind, body) = page();
            let mut out = request::response_typed(status, kind, &body, false);
            if head.method == "HEAD" {
                out.truncate(out.len() - body.len());
            }
            out
        }
        (_, Some(_)) => request::response_typed(405, "text/plain", "only GET and HEAD are served here\n", false),
        (_, None) => {
            let known: Vec<&str> = pages.iter().map(|(p, _)| *p).collect();
            let text = format!("no page {path}; this endpoint serves {}\n", known.join(", "));
            request::response_typed(404, "text/plain", &text, false)
        }
    };
    conn.write_all(&reply)
}
