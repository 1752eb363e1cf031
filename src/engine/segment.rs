//! Remote segments: a peer's buffers, and the transport and route that
//! reach it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::proto::mooncake::tcp;
use crate::transport::Route;

/// What the engine knows of a peer's segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    /// Which of the engine's transports reaches it, and how.
    pub transport: usize,
    pub route: Route,
    /// `(addr, length)` of its buffers, as published.
    pub buffers: Vec<(u64, u64)>,
}

impl Segment {
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
