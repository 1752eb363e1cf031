//! Remote segments: a peer's buffers and where its data port is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::error::{TeError, TeResult, code};
use crate::meta::p2p;
use crate::proto::mooncake::message::SegmentDesc;
use crate::proto::mooncake::name;
use crate::proto::mooncake::tcp;
use crate::transport::tcp::Peer;

/// What the engine knows of a peer's segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    pub peer: Peer,
    /// `(addr, length)` of its buffers, as published.
    pub buffers: Vec<(u64, u64)>,
}

impl Segment {
    /// Builds a segment from a descriptor fetched under `name`; `rpc_host`
    /// is where the peer's RPC port lives, if known (etcd's rpc_meta).
    pub fn from_desc(name: &str, desc: &SegmentDesc, rpc_host: Option<&str>) -> TeResult<Self> {
        if desc.protocol != "tcp" {
            return Err(TeError::invalid(format!(
                "segment {name} uses the {:?} transport; this engine speaks TCP (set MC_FORCE_TCP=1 on the peer)",
                desc.protocol
            )));
        }
        if desc.tcp_data_port == 0 {
            return Err(TeError::new(code::METADATA, format!("segment {name} publishes no TCP data port")));
        }
        let host = match (desc.tcp_data_host.as_deref().map(str::trim), rpc_host) {
            (Some(h), _) if !h.is_empty() && h != "0.0.0.0" && h != "::" => h.to_string(),
            (_, Some(h)) => h.to_string(),
            _ => name::parse(name).map_err(TeError::invalid)?.host,
        };
        let target = name::HostPort::with_port(&host, desc.tcp_data_port);
        let addr: SocketAddr = p2p::resolve(&target, desc.tcp_data_port)?[0];
        Ok(Self {
            name: name.to_string(),
            peer: Peer { addr, v2: desc.tcp_proto_version >= 2 },
            buffers: desc.buffers.iter().map(|b| (b.addr, b.length)).collect(),
        })
    }

    /// Whether `[addr, addr + len)` lies inside one published buffer.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        tcp::locate(self.buffers.iter().copied(), addr, len).is_some()
    }
}

/// Segments opened so far, by name.
#[derive(Debug, Default)]
pub struct SegmentCache {
    map: Mutex<HashMap<String, Arc<Segment>>>,
}

/// Most segments cached; past it the cache starts over.
pub const SEGMENTS_MAX: usize = 65_536;

impl SegmentCache {
    pub fn get(&self, name: &str) -> Option<Arc<Segment>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    pub fn put(&self, segment: Arc<Segment>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SEGMENTS_MAX {
            map.clear();
        }
        map.insert(segment.name.clone(), segment);
    }

    pub fn forget(&self, name: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
}
