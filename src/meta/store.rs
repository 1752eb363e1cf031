//! What every central metadata store shares: a key-value interface
//! ([`KvStore`]: get, put, delete) and an engine's registration in it
//! ([`Registration`]): its keys in Mooncake's layout, published, looked
//! up, and withdrawn.
//!
//! Mooncake's layout, the same in etcd, HTTP and redis:
//!
//! - `mooncake/ram/<segment name>`: the segment descriptor;
//! - `mooncake/rpc_meta/<segment name>`: `{"ip_or_host_name": ..., "rpc_port": N}`;
//! - with `MC_METADATA_CLUSTER_ID=<id>`, `mooncake/<id>/...` instead.

use serde::{Deserialize, Serialize};

use crate::error::{TeError, TeResult, code};
use crate::proto::mooncake::message::{SegmentDesc, to_wire};

/// What `rpc_meta/<name>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcMeta {
    pub ip_or_host_name: String,
    pub rpc_port: u16,
}

/// A key-value store that holds metadata. Calls block, each bounded by the
/// store's own timeouts; `&mut self` because a client may keep a
/// connection open between calls.
pub trait KvStore: Send {
    /// The value of `key`, or `None` when the store has no such key.
    fn get(&mut self, key: &str) -> TeResult<Option<Vec<u8>>>;
    fn put(&mut self, key: &str, value: &[u8]) -> TeResult<()>;
    /// Deletes `key`; a key that is already gone is not an error.
    fn delete(&mut self, key: &str) -> TeResult<()>;
    /// The store, as errors name it (`etcd 127.0.0.1:2379`).
    fn describe(&self) -> String;
    /// Releases what the store holds beyond keys (an etcd lease); called
    /// once, after this engine's keys are deleted.
    fn close(&mut self) {}
}

/// Mooncake's key prefix: `mooncake/`, or `mooncake/<cluster id>/`.
pub fn key_prefix(cluster_id: Option<&str>) -> String {
    match cluster_id.map(str::trim) {
        Some(id) if !id.is_empty() => format!("mooncake/{id}/"),
        _ => "mooncake/".into(),
    }
}

/// An engine's keys in a store.
pub struct Registration {
    store: Box<dyn KvStore>,
    prefix: String,
    name: String,
    /// The descriptor the store holds (timestamp cleared), to skip puts
    /// that change nothing.
    published: Option<SegmentDesc>,
    /// Whether this engine wrote its keys (and so may delete them).
    owns_keys: bool,
    closed: bool,
}

impl Registration {
    /// `name`'s registration in `store`, with keys under the cluster's
    /// prefix (`MC_METADATA_CLUSTER_ID`). Nothing is written yet.
    pub fn new(store: Box<dyn KvStore>, name: &str, cluster_id: Option<&str>) -> Self {
        Self {
            store,
            prefix: key_prefix(cluster_id),
            name: name.to_string(),
            published: None,
            owns_keys: false,
            closed: false,
        }
    }

    /// The key of `kind` (`ram`, `rpc_meta`) for segment `name`.
    pub fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Deletes the keys a dead engine left under this engine's name, so
    /// that they can be written anew (Mooncake's HTTP server refuses a PUT
    /// over an `rpc_meta` key that is present).
    pub fn clear_stale(&mut self) -> TeResult<()> {
        let (rpc, ram) = (self.key("rpc_meta", &self.name), self.key("ram", &self.name));
        self.store.delete(&rpc)?;
        self.store.delete(&ram)
    }

    /// Publishes the RPC address and the segment descriptor.
    pub fn publish(&mut self, rpc: &RpcMeta, descriptor: &SegmentDesc) -> TeResult<()> {
        let meta = to_wire(rpc);
        self.owns_keys = true;
        let key = self.key("rpc_meta", &self.name);
        self.store.put(&key, &meta)?;
        self.publish_descriptor(descriptor)
    }

    /// Publishes the descriptor, unless the store already holds the same
    /// one (but for its timestamp).
    pub fn publish_descriptor(&mut self, descriptor: &SegmentDesc) -> TeResult<()> {
        let mut same = descriptor.clone();
        same.timestamp.clear();
        if self.published.as_ref() == Some(&same) {
            return Ok(());
        }
        let key = self.key("ram", &self.name);
        self.store.put(&key, &to_wire(descriptor))?;
        self.published = Some(same);
        Ok(())
    }

    /// A peer's descriptor and RPC address.
    pub fn lookup(&mut self, name: &str) -> TeResult<(Vec<u8>, Option<RpcMeta>)> {
        let key = self.key("ram", name);
        let desc = self.store.get(&key)?.ok_or_else(|| {
            TeError::new(code::METADATA, format!("no segment named {name} in {} (key {key})", self.store.describe()))
        })?;
        let rpc = self.rpc_meta(name)?;
        Ok((desc, rpc))
    }

    pub fn rpc_meta(&mut self, name: &str) -> TeResult<Option<RpcMeta>> {
        let key = self.key("rpc_meta", name);
        match self.store.get(&key)? {
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| {
                TeError::new(
                    code::MALFORMED_JSON,
                    format!("{key} in {} is not an rpc_meta: {e}", self.store.describe()),
                )
            }),
            None => Ok(None),
        }
    }

    /// Deletes this engine's keys (if it wrote them) and closes the store
    /// (once).
    pub fn withdraw(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if self.owns_keys {
            for kind in ["rpc_meta", "ram"] {
                let key = self.key(kind, &self.name);
                if let Err(e) = self.store.delete(&key) {
                    log::warn!("engine {}: cannot delete {key}: {e}", self.name);
                }
            }
        }
        self.store.close();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.withdraw();
    }
}
