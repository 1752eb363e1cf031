//! etcd metadata, through etcd's v3 JSON gateway (`POST /v3/kv/put`,
//! `/v3/kv/range`, `/v3/kv/deleterange`, `/v3/lease/...` on the client port).
//!
//! The gateway speaks plain HTTP/1.1 and JSON with base64 keys and values,
//! so no gRPC stack (and no tokio, no protoc) is needed for the few calls the
//! engine makes: publish its descriptor, read a peer's, delete on exit.
//!
//! Keys follow Mooncake's layout ([`super::store`]), so shardwire and
//! Mooncake engines find each other through one etcd.
//!
//! Beyond Mooncake, both keys hang off a lease that a background thread
//! keeps alive ([`EtcdStore`]): a process that dies leaves no stale keys
//! past the TTL.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::store::KvStore;
use crate::error::{TeError, TeResult, code};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// Most bytes of an etcd response read.
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// How long one etcd call may take (Mooncake's client allows about 5 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one etcd cluster (a list of endpoints, tried in turn).
#[derive(Debug, Clone)]
pub struct EtcdClient {
    endpoints: Vec<String>,
}

impl EtcdClient {
    /// `etcd://h1:2379,h2:2379`, or the same without the scheme.
    pub fn new(spec: &str) -> TeResult<Self> {
        let list = spec.trim().strip_prefix("etcd://").unwrap_or(spec.trim());
        let endpoints: Vec<String> = list
            .split(',')
            .map(|e| e.trim().trim_start_matches("http://").trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(TeError::invalid(format!("metadata server {spec:?} names no etcd endpoint")));
        }
        Ok(Self { endpoints })
    }

    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> TeResult<()> {
        let mut body = serde_json::json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(id) = lease {
            body["lease"] = serde_json::json!(id.to_string());
        }
        self.post("/v3/kv/put", &body).map(|_| ())
    }

    pub fn get(&self, key: &str) -> TeResult<Option<Vec<u8>>> {
        let reply = self.post("/v3/kv/range", &serde_json::json!({ "key": B64.encode(key) }))?;
        let Some(value) = reply.get("kvs").and_then(|k| k.get(0)).and_then(|kv| kv.get("value")) else {
            return Ok(None);
        };
        let text = value.as_str().unwrap_or_default();
        B64.decode(text)
            .map(Some)
            .map_err(|e| TeError::new(code::METADATA, format!("etcd sent a value that is not base64: {e}")))
    }

    pub fn delete(&self, key: &str) -> TeResult<()> {
        self.post("/v3/kv/deleterange", &serde_json::json!({ "key": B64.encode(key) })).map(|_| ())
    }

    /// A lease of `ttl`; returns its id.
    pub fn grant(&self, ttl: Duration) -> TeResult<i64> {
        let reply = self.post("/v3/lease/grant", &serde_json::json!({ "TTL": ttl.as_secs().max(1).to_string() }))?;
        reply
            .get("ID")
            .and_then(|id| id.as_str().and_then(|s| s.parse().ok()).or_else(|| id.as_i64()))
            .ok_or_else(|| TeError::new(code::METADATA, "etcd granted a lease without an ID"))
    }

    pub fn keepalive(&self, lease: i64) -> TeResult<()> {
        self.post("/v3/lease/keepalive", &serde_json::json!({ "ID": lease.to_string() })).map(|_| ())
    }

    pub fn revoke(&self, lease: i64) -> TeResult<()> {
        self.post("/v3/lease/revoke", &serde_json::json!({ "ID": lease.to_string() })).map(|_| ())
    }

    /// POSTs to the first endpoint that answers.
    fn post(&self, path: &str, body: &serde_json::Value) -> TeResult<serde_json::Value> {
        let mut last = String::new();
        for endpoint in &self.endpoints {
            match post_once(endpoint, path, body) {
                Ok(v) => return Ok(v),
                Err(e) => last = format!("{endpoint}: {e}"),
            }
        }
        Err(TeError::new(code::METADATA, format!("etcd {path} failed: {last}")))
    }
}

fn post_once(endpoint: &str, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, String> {
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(endpoint).map_err(|e| e.to_string())?.collect();
    let addr = addrs.first().ok_or("no address")?;
    let mut stream = TcpStream::connect_timeout(addr, CALL_TIMEOUT).map_err(|e| e.to_string())?;
    crate::liveness::Liveness::for_timeout(CALL_TIMEOUT).apply_or_log(&stream, "an etcd connection");
    stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
    let payload = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.take(RESPONSE_BYTES_MAX as u64 + 1).read_to_end(&mut raw).map_err(|e| e.to_string())?;
    if raw.len() > RESPONSE_BYTES_MAX {
        return Err(format!("response above {RESPONSE_BYTES_MAX} bytes"));
    }
    let crate::http::response::Response { status, body } =
        crate::http::response::parse(&raw, RESPONSE_BYTES_MAX).map_err(|e| e.to_string())?;
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("bad JSON ({e})"))?;
    if status != 200 {
        let message = json.get("message").and_then(|m| m.as_str()).unwrap_or("no message");
        return Err(format!("HTTP {status}: {message}"));
    }
    Ok(json)
}

/// etcd as a [`KvStore`]: every key put hangs off one lease that a
/// background thread keeps alive, so a process that dies leaves no stale
/// keys past the TTL.
pub struct EtcdStore {
    client: EtcdClient,
    lease: Option<i64>,
    stop: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
}

impl EtcdStore {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub fn start(client: EtcdClient, ttl: Duration) -> TeResult<Self> {
        let lease = client.grant(ttl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (client.clone(), stop.clone());
        let keeper = std::thread::Builder::new()
            .name("shardwire-etcd".into())
            .spawn(move || keep_alive(&c, lease, ttl, &s))
            .map_err(|e| TeError::new(code::CONTEXT, e.to_string()))?;
        Ok(Self { client, lease: Some(lease), stop, keeper: Some(keeper) })
    }
}

impl KvStore for EtcdStore {
    fn get(&mut self, key: &str) -> TeResult<Option<Vec<u8>>> {
        self.client.get(key)
    }

    fn put(&mut self, key: &str, value: &[u8]) -> TeResult<()> {
        self.client.put(key, value, self.lease)
    }

    fn delete(&mut self, key: &str) -> TeResult<()> {
        self.client.delete(key)
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.client.endpoints.join(","))
    }

    /// Stops the keeper and revokes the lease (once).
    fn close(&mut self) {
        if self.stop.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(k) = self.keeper.take() {
            k.thread().unpark();
            let _ = k.join();
        }
        if let Some(lease) = self.lease.take() {
            let _ = self.client.revoke(lease);
        }
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn keep_alive(client: &EtcdClient, lease: i64, ttl: Duration, stop: &AtomicBool) {
    let every = ttl / 3;
    let mut next = Instant::now() + every;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now < next {
            std::thread::park_timeout(next - now);
            continue;
        }
        if let Err(e) = client.keepalive(lease) {
            log::warn!("etcd lease keep-alive: {e}");
        }
        next = Instant::now() + every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let c = EtcdClient::new("etcd://h1:2379, http://h2:2379/").unwrap();
        assert_eq!(c.endpoints, vec!["h1:2379", "h2:2379"]);
        assert!(EtcdClient::new("etcd://").is_err());
    }
}
