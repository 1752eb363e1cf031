//! redis metadata, Mooncake's layout: the same keys as etcd and HTTP
//! ([`super::store`]), written with plain `SET`, read with `GET`, removed
//! with `DEL`. The protocol is RESP2 ([`crate::proto::resp`]); this is
//! its thin blocking driver, one connection kept open between calls.
//!
//! `redis://host[:port][/db]` (port 6379 by default). As in Mooncake,
//! `MC_REDIS_PASSWORD` (with `MC_REDIS_USERNAME` for an ACL user) is sent
//! with `AUTH`, and `MC_REDIS_DB_INDEX` picks the database with `SELECT`;
//! a database in the URL must agree with it.
//!
//! Timeouts are those of the HTTP client: 1500 ms to connect, 3000 ms for
//! a call (the connection's set-up, `AUTH` and `SELECT`, included).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::store::KvStore;
use crate::error::{TeError, TeResult, code};
use crate::proto::resp::{self, Limits, Reply};

pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
pub const CALL_TIMEOUT: Duration = Duration::from_millis(3000);
const PORT_DEFAULT: u16 = 6379;

/// `MC_REDIS_USERNAME`, `MC_REDIS_PASSWORD` and `MC_REDIS_DB_INDEX`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub db_index: Option<u8>,
}

/// Without the password, so that logs and panics never show it.
impl std::fmt::Debug for RedisAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("db_index", &self.db_index)
            .finish()
    }
}

/// A client of one redis server.
pub struct RedisStore {
    /// The URL as given, for messages.
    url: String,
    authority: String,
    auth: RedisAuth,
    db: u8,
    conn: Option<Conn>,
    limits: Limits,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// `redis://host[:port][/db]`: `host:port` and the database, if given.
pub fn parse_url(url: &str) -> Result<(String, Option<u8>), String> {
    let rest = url.trim().strip_prefix("redis://").ok_or("expected redis://host:port")?;
    let (authority, db) = match rest.split_once('/') {
        Some((a, "")) => (a, None),
        Some((a, db)) => (a, Some(db.parse::<u8>().map_err(|_| format!("the database {db:?} is not in 0..=255"))?)),
        None => (rest, None),
    };
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err("expected redis://host:port (credentials go in MC_REDIS_USERNAME / MC_REDIS_PASSWORD)".into());
    }
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port { authority.to_string() } else { format!("{authority}:{PORT_DEFAULT}") };
    Ok((authority, db))
}

impl RedisStore {
    /// Connects to the server at `url`, authenticates and selects the
    /// database, so that a wrong password or database fails here.
    pub fn connect(url: &str, auth: RedisAuth) -> TeResult<Self> {
        let url = url.trim().to_string();
        let (authority, url_db) =
            parse_url(&url).map_err(|why| TeError::invalid(format!("redis metadata server {url:?}: {why}")))?;
        let db = match (url_db, auth.db_index) {
            (Some(a), Some(b)) if a != b => {
                return Err(TeError::invalid(format!(
                    "redis metadata server {url:?} names database {a}, but MC_REDIS_DB_INDEX={b}"
                )));
            }
            (a, b) => a.or(b).unwrap_or(0),
        };
        let mut store = Self { url, authority, auth, db, conn: None, limits: Limits::default() };
        let deadline = Instant::now() + CALL_TIMEOUT;
        store.conn = Some(store.open(deadline)?);
        Ok(store)
    }

    fn error(&self, what: &str, why: impl std::fmt::Display) -> TeError {
        TeError::new(code::METADATA, format!("redis metadata server {}: {what}: {why}", self.url))
    }

    /// A new connection, authenticated, on the database.
    fn open(&self, deadline: Instant) -> TeResult<Conn> {
        let addrs: Vec<SocketAddr> = self
            .authority
            .to_socket_addrs()
            .map_err(|e| self.error("connect", format!("cannot resolve {}: {e}", self.authority)))?
            .collect();
        let mut last = format!("{} resolves to no address", self.authority);
        let mut conn = None;
        for addr in addrs {
            let wait = CONNECT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, wait) {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    // A kept connection to a host that vanished ends by
                    // itself, rather than failing the next call first.
                    crate::liveness::Liveness::for_timeout(CALL_TIMEOUT).apply_or_log(&stream, "a redis connection");
                    conn = Some(Conn { stream, buf: Vec::new() });
                    break;
                }
                Err(e) => last = format!("cannot connect to {addr}: {e}"),
            }
        }
        let mut conn = conn.ok_or_else(|| self.error("connect", last))?;
        match (&self.auth.username, &self.auth.password) {
            (user, Some(password)) => {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                if let Some(u) = user {
                    args.push(u.as_bytes());
                }
                args.push(password.as_bytes());
                let who = user.as_deref().map_or(String::new(), |u| format!(" as {u}"));
                match self.exchange(&mut conn, &args, deadline).map_err(|why| self.error("AUTH", why))? {
                    Reply::Simple(_) => {}
                    Reply::Error(e) => {
                        return Err(self.error(
                            &format!("AUTH{who} (MC_REDIS_USERNAME / MC_REDIS_PASSWORD)"),
                            format!("refused: {e}"),
                        ));
                    }
                    other => return Err(self.error("AUTH", format!("unexpected reply {other:?}"))),
                }
            }
            (Some(user), None) => log::warn!("MC_REDIS_USERNAME={user} without MC_REDIS_PASSWORD: not sending AUTH"),
            (None, None) => {}
        }
        if self.db != 0 {
            let db = self.db.to_string();
            match self
                .exchange(&mut conn, &[b"SELECT", db.as_bytes()], deadline)
                .map_err(|w| self.error("SELECT", w))?
            {
                Reply::Simple(_) => {}
                Reply::Error(e) => {
                    return Err(self.error(&format!("SELECT {db} (MC_REDIS_DB_INDEX)"), format!("refused: {e}")));
                }
                other => return Err(self.error("SELECT", format!("unexpected reply {other:?}"))),
            }
        }
        Ok(conn)
    }

    /// Sends one command on `conn` and reads its reply.
    fn exchange(&self, conn: &mut Conn, args: &[&[u8]], deadline: Instant) -> Result<Reply, String> {
        let left = || {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() { Err(format!("no answer within {} ms", CALL_TIMEOUT.as_millis())) } else { Ok(d) }
        };
        conn.stream.set_write_timeout(Some(left()?)).map_err(|e| e.to_string())?;
        conn.stream.write_all(&resp::encode(args)).map_err(|e| format!("sending: {e}"))?;
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some((reply, used)) = resp::decode(&conn.buf, &self.limits).map_err(|e| e.to_string())? {
                conn.buf.drain(..used);
                return Ok(reply);
            }
            conn.stream.set_read_timeout(Some(left()?)).map_err(|e| e.to_string())?;
            match conn.stream.read(&mut chunk) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(format!("no answer within {} ms", CALL_TIMEOUT.as_millis()));
                }
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    }

    /// One command on the kept connection (a new one if there is none, or
    /// if the kept one fails: the server may have closed it when idle).
    fn command(&mut self, args: &[&[u8]]) -> TeResult<Reply> {
        let what = String::from_utf8_lossy(args.first().copied().unwrap_or_default()).into_owned();
        let deadline = Instant::now() + CALL_TIMEOUT;
        let (mut conn, reused) = match self.conn.take() {
            Some(c) => (c, true),
            None => (self.open(deadline)?, false),
        };
        let result = match self.exchange(&mut conn, args, deadline) {
            Err(_) if reused && conn.buf.is_empty() => {
                conn = self.open(deadline)?;
                self.exchange(&mut conn, args, deadline)
            }
            other => other,
        };
        match result {
            Ok(Reply::Error(e)) => {
                self.conn = Some(conn);
                Err(self.error(&what, format!("refused: {e}")))
            }
            Ok(reply) => {
                self.conn = Some(conn);
                Ok(reply)
            }
            // The connection's state is unknown: it is dropped.
            Err(why) => Err(self.error(&what, why)),
        }
    }
}

impl KvStore for RedisStore {
    fn get(&mut self, key: &str) -> TeResult<Option<Vec<u8>>> {
        match self.command(&[b"GET", key.as_bytes()])? {
            Reply::Bulk(value) => Ok(value),
            other => Err(self.error(&format!("GET {key}"), format!("unexpected reply {other:?}"))),
        }
    }

    fn put(&mut self, key: &str, value: &[u8]) -> TeResult<()> {
        match self.command(&[b"SET", key.as_bytes(), value])? {
            Reply::Simple(_) => Ok(()),
            other => Err(self.error(&format!("SET {key}"), format!("unexpected reply {other:?}"))),
        }
    }

    fn delete(&mut self, key: &str) -> TeResult<()> {
        match self.command(&[b"DEL", key.as_bytes()])? {
            Reply::Integer(_) => Ok(()),
            other => Err(self.error(&format!("DEL {key}"), format!("unexpected reply {other:?}"))),
        }
    }

    fn describe(&self) -> String {
        format!("the redis metadata server {} (database {})", self.url, self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(parse_url("redis://127.0.0.1:6380").unwrap(), ("127.0.0.1:6380".into(), None));
        assert_eq!(parse_url("redis://h/3").unwrap(), ("h:6379".into(), Some(3)));
        assert_eq!(parse_url("redis://h:1/").unwrap(), ("h:1".into(), None));
        assert_eq!(parse_url("redis://[::1]/0").unwrap(), ("[::1]:6379".into(), Some(0)));
        for bad in ["redis://", "redis://h/256", "redis://h/x", "redis://u:p@h", "http://h", "redis://h?db=1"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_database_in_the_url_must_agree_with_the_variable() {
        let auth = RedisAuth { db_index: Some(2), ..Default::default() };
        let e = RedisStore::connect("redis://127.0.0.1:1/3", auth).err().unwrap();
        assert!(e.message().contains("MC_REDIS_DB_INDEX=2") && e.message().contains("database 3"), "{e}");
    }
}
