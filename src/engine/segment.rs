//! Remote segments: a peer's buffers, and the transport and route that
//! reach it; and the directory of them, the one place that says which
//! process a segment name reaches now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::proto::mooncake::tcp;
use crate::transport::Route;

/// What the engine knows of a peer's segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    /// Which process of that name it describes
    /// ([`crate::proto::mooncake::message::SegmentDesc::incarnation`]).
    pub instance: u64,
    /// Which of the engine's transports reaches it, and how.
    pub transport: usize,
    pub route: Route,
    /// `(addr, length)` of its buffers, as published.
    pub buffers: Vec<(u64, u64)>,
    /// When the lookup that found it began: of two lookups that found
    /// different processes, the later one says which answers now.
    pub looked_up: Instant,
}

impl Segment {
    /// Whether `[addr, addr + len)` lies inside one published buffer.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        tcp::locate(self.buffers.iter().copied(), addr, len).is_some()
    }
}

/// The segments opened so far, by name: for each name, the process it
/// reaches now. An entry marked stale (a transfer to it failed) is looked
/// up again before its next use, but kept until then, so that the lookup
/// can tell a restarted process from the same one.
#[derive(Debug, Default)]
pub struct SegmentCache {
    map: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    segment: Arc<Segment>,
    stale: bool,
}

/// What [`SegmentCache::put`] did.
#[derive(Debug)]
pub enum Put {
    /// The name reaches the segment put (as before, or for the first time).
    Fresh,
    /// It reaches the segment put, which replaced another process: what
    /// was kept for that one must go.
    Replaced(Arc<Segment>),
    /// A later lookup found another process, which stays: use this one.
    Outdated(Arc<Segment>),
}

/// Most segments cached; past it the cache starts over.
pub const SEGMENTS_MAX: usize = 65_536;

impl SegmentCache {
    /// The segment `name` reaches, unless it is stale or unknown.
    pub fn get(&self, name: &str) -> Option<Arc<Segment>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).filter(|e| !e.stale).map(|e| e.segment.clone())
    }

    /// The process `name` reached when last looked up, stale or not.
    pub fn instance(&self, name: &str) -> Option<u64> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).get(name).map(|e| e.segment.instance)
    }

    /// Records `segment` as what its name reaches now, unless a lookup
    /// that began later found another process (then that one stays).
    pub fn put(&self, segment: Arc<Segment>) -> Put {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(&segment.name)
            && e.segment.instance != segment.instance
            && e.segment.looked_up > segment.looked_up
        {
            return Put::Outdated(e.segment.clone());
        }
        if map.len() >= SEGMENTS_MAX && !map.contains_key(&segment.name) {
            map.clear();
        }
        let old = map.insert(segment.name.clone(), Entry { segment: segment.clone(), stale: false });
        debug_assert!(map.len() <= SEGMENTS_MAX);
        match old.map(|e| e.segment) {
            Some(old) if old.instance != segment.instance => Put::Replaced(old),
            _ => Put::Fresh,
        }
    }

    /// Takes out the entry for `name` if it describes process `instance`
    /// (the process a lookup just found gone): its routes are the
    /// caller's to retire.
    pub fn take_if(&self, name: &str, instance: u64) -> Option<Arc<Segment>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|e| e.segment.instance == instance) {
            return map.remove(name).map(|e| e.segment);
        }
        None
    }

    /// Looks `name` up again before its next use (a lookup of it failed:
    /// it may have restarted, or moved).
    pub fn forget(&self, name: &str) {
        if let Some(e) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name) {
            e.stale = true;
        }
    }

    /// Looks `name` up again before its next use, if it still reaches
    /// process `instance` (a transfer to that one failed); a process found
    /// since by another lookup stays as it is.
    pub fn forget_if(&self, name: &str, instance: u64) {
        if let Some(e) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get_mut(name)
            && e.segment.instance == instance
        {
            e.stale = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp::Peer;

    fn seg(name: &str, instance: u64, looked_up: Instant) -> Arc<Segment> {
        let peer = Peer { addr: "127.0.0.1:1".parse().unwrap(), v2: true, crc32c: false, instance: None };
        let route = Route::Tcp(peer);
        Arc::new(Segment { name: name.into(), instance, transport: 0, route, buffers: vec![(64, 64)], looked_up })
    }

    #[test]
    fn a_new_process_replaces_the_old_one_and_says_so() {
        let cache = SegmentCache::default();
        let t0 = Instant::now();
        let (t1, t2) = (t0 + std::time::Duration::from_millis(1), t0 + std::time::Duration::from_millis(2));
        assert!(matches!(cache.put(seg("a", 1, t0)), Put::Fresh), "a first lookup replaces nothing");
        assert!(matches!(cache.put(seg("a", 1, t1)), Put::Fresh), "the same process again");
        cache.forget("a");
        assert!(cache.get("a").is_none(), "stale: looked up again");
        assert_eq!(cache.instance("a"), Some(1), "but remembered, to compare with");
        assert!(matches!(cache.put(seg("a", 2, t2)), Put::Replaced(old) if old.instance == 1), "a restart");
        assert_eq!(cache.get("a").map(|s| s.instance), Some(2));
        // A lookup that began before the one that found process 2, and
        // found process 1, does not bring it back.
        assert!(matches!(cache.put(seg("a", 1, t1)), Put::Outdated(now) if now.instance == 2));
        assert_eq!(cache.get("a").map(|s| s.instance), Some(2));
        // A failure of a transfer to process 1 leaves process 2 alone.
        cache.forget_if("a", 1);
        assert_eq!(cache.get("a").map(|s| s.instance), Some(2));
        cache.forget_if("a", 2);
        assert!(cache.get("a").is_none());
        assert!(matches!(cache.put(seg("a", 2, t2)), Put::Fresh));
        assert!(cache.take_if("a", 1).is_none(), "only the process named is taken out");
        assert_eq!(cache.take_if("a", 2).map(|s| s.instance), Some(2));
        assert!(cache.get("a").is_none() && cache.instance("a").is_none());
    }
}
