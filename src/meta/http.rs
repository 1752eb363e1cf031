//! HTTP metadata, Mooncake's protocol: `GET`, `PUT` and `DELETE` on
//! `<url>?key=<escaped key>`, JSON bodies (`PUT` with `Content-Type:
//! application/json`), and only 200 counts as success (404 on `GET`: no
//! such key). Mooncake's timeouts: 1500 ms to connect, 3000 ms per call.
//!
//! Servers: the Mooncake wheel's `mooncake_http_metadata_server`, its Go
//! example, and `shardwire metadata-server` ([`super::http_server`]).
//!
//! Beyond Mooncake, the connection is kept open between calls (HTTP/1.1
//! keep-alive): Mooncake's client closes it after each, and an engine that
//! registers memory often leaves a trail of sockets in TIME_WAIT. A call
//! on a kept connection that the server has closed meanwhile (nothing of
//! the answer came back) is sent once more on a fresh one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::store::KvStore;
use crate::error::{TeError, TeResult, code};
use crate::http::{query, request, response};

/// Mooncake's connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Mooncake's timeout for a whole call.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(3000);
/// Most bytes of a response body (a descriptor of many RDMA buffers is
/// large, but not this large).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Most bytes of a server's message quoted in an error.
const QUOTE_BYTES_MAX: usize = 200;

/// A metadata server's URL, taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port`, for the `Host` field and to connect to.
    pub authority: String,
    /// The path, `/` when the URL has none.
    pub path: String,
}

impl HttpUrl {
    /// `http://host[:port][/path]`; the port defaults to 80.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => return Err("https is not supported; use http://".into()),
            _ => return Err("expected http://host:port/path".into()),
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if path.contains(['?', '#', ' ']) {
            return Err("the path may not hold '?', '#' or spaces (the key is sent as ?key=)".into());
        }
        if authority.is_empty() || authority.contains('@') {
            return Err("expected a host (and no user) after http://".into());
        }
        let has_port = match authority.rfind(']') {
            Some(end) => authority[end..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port { authority.to_string() } else { format!("{authority}:80") };
        Ok(Self { authority, path: path.to_string() })
    }
}

/// A client of one HTTP metadata server.
pub struct HttpStore {
    /// The URL as given, for messages.
    url: String,
    parsed: HttpUrl,
    conn: Option<Conn>,
}

/// A kept connection and the bytes read past the last response.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Why an exchange failed; `Stale` when nothing came back on a kept
/// connection (the server may have closed it while it was idle).
enum Failure {
    Stale(String),
    Other(String),
}

impl HttpStore {
    /// A client of the server at `url` (`http://host:port/path`); nothing is
    /// sent until the first call.
    pub fn new(url: &str) -> TeResult<Self> {
        let parsed = HttpUrl::parse(url)
            .map_err(|why| TeError::invalid(format!("HTTP metadata server {:?}: {why}", url.trim())))?;
        Ok(Self { url: url.trim().to_string(), parsed, conn: None })
    }

    /// One request; the status and body of its answer.
    pub fn call(&mut self, method: &str, key: &str, body: Option<&[u8]>) -> TeResult<(u16, Vec<u8>)> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let target = format!("{}?key={}", self.parsed.path, query::escape(key));
        let length = body.map_or(0, <[u8]>::len).to_string();
        let mut fields = vec![("Host", self.parsed.authority.as_str())];
        if body.is_some() {
            fields.push(("Content-Type", "application/json"));
        }
        if body.is_some() || method != "GET" {
            fields.push(("Content-Length", length.as_str()));
        }
        let mut request = request::write_head(method, &target, &fields).map_err(|e| self.error(method, key, e))?;
        request.extend_from_slice(body.unwrap_or_default());
        let result = match self.exchange(&request, deadline) {
            Err(Failure::Stale(_)) => self.exchange(&request, deadline),
            other => other,
        };
        result.map_err(|(Failure::Stale(why) | Failure::Other(why))| self.error(method, key, why))
    }

    fn error(&self, method: &str, key: &str, why: impl std::fmt::Display) -> TeError {
        TeError::new(code::METADATA, format!("HTTP metadata server {}: {method} {key}: {why}", self.url))
    }

    fn connect(&self, deadline: Instant) -> Result<Conn, String> {
        let addrs: Vec<SocketAddr> = self
            .parsed
            .authority
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.parsed.authority))?
            .collect();
        let mut last = format!("{} resolves to no address", self.parsed.authority);
        for addr in addrs {
            let wait = CONNECT_TIMEOUT.min(remaining(deadline).map_err(|_| last.clone())?);
            match TcpStream::connect_timeout(&addr, wait) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    // A kept connection to a host that vanished ends by
                    // itself, rather than failing the next call first.
                    crate::liveness::Liveness::for_timeout(CALL_TIMEOUT)
                        .apply_or_log(&stream, "an HTTP metadata connection");
                    return Ok(Conn { stream, buf: Vec::new() });
                }
                Err(e) => last = format!("cannot connect to {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// Sends `request` and reads its answer, on the kept connection if
    /// there is one.
    fn exchange(&mut self, request: &[u8], deadline: Instant) -> Result<(u16, Vec<u8>), Failure> {
        let (mut conn, reused) = match self.conn.take() {
            Some(c) => (c, true),
            None => (self.connect(deadline).map_err(Failure::Other)?, false),
        };
        // A kept connection that fails before any byte of the answer came
        // back is worth one more try on a fresh one.
        let fail = |why: String, got_bytes: bool| {
            if reused && !got_bytes { Failure::Stale(why) } else { Failure::Other(why) }
        };
        let wait = remaining(deadline).map_err(Failure::Other)?;
        let _ = conn.stream.set_write_timeout(Some(wait));
        conn.stream.write_all(request).map_err(|e| fail(format!("sending: {e}"), false))?;
        let mut chunk = vec![0u8; 64 << 10];
        let mut at_eof = false;
        loop {
            match response::take(&conn.buf, at_eof, RESPONSE_BYTES_MAX) {
                Err(e) => return Err(Failure::Other(e.to_string())),
                Ok(Some((head, body, used))) => {
                    conn.buf.drain(..used);
                    if (100..200).contains(&head.status) {
                        continue;
                    }
                    let keep = !at_eof && !head.close && head.framing != response::Framing::ToEof;
                    if keep && conn.buf.is_empty() {
                        self.conn = Some(conn);
                    }
                    return Ok((head.status, body));
                }
                Ok(None) if at_eof => return Err(fail("the server closed the connection".into(), false)),
                Ok(None) => {}
            }
            let wait = remaining(deadline).map_err(Failure::Other)?;
            let _ = conn.stream.set_read_timeout(Some(wait));
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    if conn.buf.is_empty() {
                        return Err(fail("the server closed the connection".into(), false));
                    }
                    at_eof = true;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(Failure::Other(format!("no answer within {} ms", CALL_TIMEOUT.as_millis())));
                }
                Err(e) => {
                    let got = !conn.buf.is_empty();
                    return Err(fail(format!("reading: {e}"), got));
                }
            }
        }
    }

    fn refused(&self, method: &str, key: &str, status: u16, body: &[u8]) -> TeError {
        let text = String::from_utf8_lossy(&body[..body.len().min(QUOTE_BYTES_MAX)]);
        self.error(method, key, format!("HTTP {status}: {}", text.trim()))
    }
}

/// The time left before `deadline`, or an error once it has passed.
fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(format!("no answer within {} ms", CALL_TIMEOUT.as_millis())) } else { Ok(left) }
}

impl KvStore for HttpStore {
    fn get(&mut self, key: &str) -> TeResult<Option<Vec<u8>>> {
        match self.call("GET", key, None)? {
            (200, body) => Ok(Some(body)),
            (404, _) => Ok(None),
            (status, body) => Err(self.refused("GET", key, status, &body)),
        }
    }

    fn put(&mut self, key: &str, value: &[u8]) -> TeResult<()> {
        match self.call("PUT", key, Some(value))? {
            (200, _) => Ok(()),
            (status, body) => Err(self.refused("PUT", key, status, &body)),
        }
    }

    fn delete(&mut self, key: &str) -> TeResult<()> {
        match self.call("DELETE", key, None)? {
            (200 | 404, _) => Ok(()),
            (status, body) => Err(self.refused("DELETE", key, status, &body)),
        }
    }

    fn describe(&self) -> String {
        format!("the HTTP metadata server {}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/metadata").unwrap();
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("127.0.0.1:8080", "/metadata"));
        let u = HttpUrl::parse(" http://meta ").unwrap();
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("meta:80", "/"));
        assert_eq!(HttpUrl::parse("http://[::1]/m").unwrap().authority, "[::1]:80");
        assert_eq!(HttpUrl::parse("http://[::1]:9/m").unwrap().authority, "[::1]:9");
        for bad in ["https://h/m", "ftp://h", "http://", "http:///m", "http://h/m?x=1", "http://u@h/m"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
        let e = HttpStore::new("https://h:1/metadata").err().unwrap();
        assert!(e.message().contains("https") && e.message().contains("h:1"), "{e}");
    }
}
