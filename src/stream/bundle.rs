//! [`Bundle`]: streams from this node to a set of destinations, as
//! AIStore's stream bundle: `multiplier` streams per destination used in
//! turn, broadcast or multicast sends, one completion per object after its
//! last replica, and destinations that come and go at run time.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::tx::{Body, ObjCallback, SentCallback, Stream, StreamError, StreamOptions, Termination};
use crate::proto::objstream::ObjHdr;
use crate::runtime::Runtime;

/// The most streams per destination (AIStore's limit).
pub const MULTIPLIER_MAX: usize = 16;

/// Opens one more reader over the same bytes, for an extra replica.
pub type Reopen = Arc<dyn Fn() -> io::Result<Box<dyn Read + Send>> + Send + Sync>;

/// An object's bytes for a bundle send.
pub enum BundleBody {
    Empty,
    /// Shared by every replica (not copied).
    Bytes(Arc<[u8]>),
    /// The first replica reads `first`; each extra replica reads what
    /// `reopen` returns (called once per extra replica).
    Reader {
        first: Box<dyn Read + Send>,
        reopen: Reopen,
    },
}

impl From<Vec<u8>> for BundleBody {
    fn from(v: Vec<u8>) -> Self {
        BundleBody::Bytes(v.into())
    }
}

impl From<Arc<[u8]>> for BundleBody {
    fn from(v: Arc<[u8]>) -> Self {
        BundleBody::Bytes(v)
    }
}

struct Dest {
    streams: Vec<Stream>,
    robin: AtomicUsize,
}

/// Streams to many nodes.
pub struct Bundle {
    runtime: Arc<Runtime>,
    trname: String,
    local_id: String,
    multiplier: usize,
    options: StreamOptions,
    dests: RwLock<BTreeMap<String, Arc<Dest>>>,
}

/// One object's replicas: the completion runs when the last one is done.
struct Replicas {
    left: AtomicUsize,
    first_error: Mutex<Option<StreamError>>,
    cb: Mutex<Option<ObjCallback>>,
    stream_cb: Option<SentCallback>,
}

impl Replicas {
    fn done(&self, hdr: &ObjHdr, r: Result<(), &StreamError>) {
        if let Err(e) = r {
            self.first_error.lock().expect("replica lock").get_or_insert_with(|| e.clone());
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let err = self.first_error.lock().expect("replica lock").take();
        let result = match &err {
            Some(e) => Err(e),
            None => Ok(()),
        };
        match self.cb.lock().expect("replica lock").take() {
            Some(cb) => cb(hdr, result),
            None => {
                if let Some(cb) = &self.stream_cb {
                    cb(hdr, result);
                }
            }
        }
    }
}

impl Bundle {
    /// Streams to every node of `cluster` (node id -> base URL) but
    /// `local_id`, `multiplier` per node (1..=16), on the process runtime.
    pub fn new(
        cluster: &BTreeMap<String, String>,
        local_id: &str,
        trname: &str,
        multiplier: usize,
        options: StreamOptions,
    ) -> Result<Bundle, StreamError> {
        let rt = crate::runtime::shared::shared_runtime().map_err(|e| StreamError::Network(e.to_string()))?;
        Self::with_runtime(rt, cluster, local_id, trname, multiplier, options)
    }

    pub fn with_runtime(
        runtime: Arc<Runtime>,
        cluster: &BTreeMap<String, String>,
        local_id: &str,
        trname: &str,
        multiplier: usize,
        options: StreamOptions,
    ) -> Result<Bundle, StreamError> {
        if multiplier == 0 || multiplier > MULTIPLIER_MAX {
            return Err(StreamError::Object(format!("multiplier {multiplier} is outside 1..={MULTIPLIER_MAX}")));
        }
        let b = Bundle {
            runtime,
            trname: trname.into(),
            local_id: local_id.into(),
            multiplier,
            options,
            dests: RwLock::new(BTreeMap::new()),
        };
        for (id, url) in cluster {
            if id != local_id {
                b.add(id, url)?;
            }
        }
        Ok(b)
    }

    /// Adds a destination (its streams connect on first use).
    pub fn add(&self, id: &str, url: &str) -> Result<(), StreamError> {
        let mut streams = Vec::with_capacity(self.multiplier);
        for _ in 0..self.multiplier {
            // Completions are routed per object; the stream-wide callback
            // is the bundle's, run once per object by `Replicas`.
            let opts = StreamOptions { on_sent: None, caller_id: self.local_id.clone(), ..self.options.clone() };
            streams.push(Stream::with_runtime(self.runtime.clone(), url, &self.trname, opts)?);
        }
        let dest = Arc::new(Dest { streams, robin: AtomicUsize::new(0) });
        if let Some(old) = self.dests.write().expect("dests lock").insert(id.into(), dest) {
            retire(old);
        }
        Ok(())
    }

    /// Removes a destination: its streams finish what they hold, then end.
    pub fn remove(&self, id: &str) -> bool {
        let old = self.dests.write().expect("dests lock").remove(id);
        old.map(retire).is_some()
    }

    /// The destinations' ids.
    pub fn destinations(&self) -> Vec<String> {
        self.dests.read().expect("dests lock").keys().cloned().collect()
    }

    /// Sends to every destination.
    pub fn send(&self, hdr: ObjHdr, body: BundleBody, cb: Option<ObjCallback>) -> Result<(), StreamError> {
        let dests: Vec<Arc<Dest>> = self.dests.read().expect("dests lock").values().cloned().collect();
        self.send_dests(hdr, body, cb, dests)
    }

    /// Sends to the named destinations; a name not in the bundle fails
    /// the object (and nothing is sent).
    pub fn send_to(
        &self,
        hdr: ObjHdr,
        body: BundleBody,
        nodes: &[&str],
        cb: Option<ObjCallback>,
    ) -> Result<(), StreamError> {
        let map = self.dests.read().expect("dests lock");
        let mut dests = Vec::with_capacity(nodes.len());
        for n in nodes {
            match map.get(*n) {
                Some(d) => dests.push(d.clone()),
                None => {
                    drop(map);
                    return self.fail(hdr, cb, StreamError::Object(format!("destination {n:?} is not in the bundle")));
                }
            }
        }
        drop(map);
        self.send_dests(hdr, body, cb, dests)
    }

    fn fail(&self, hdr: ObjHdr, cb: Option<ObjCallback>, e: StreamError) -> Result<(), StreamError> {
        match cb {
            Some(cb) => cb(&hdr, Err(&e)),
            None => {
                if let Some(cb) = &self.options.on_sent {
                    cb(&hdr, Err(&e));
                }
            }
        }
        Err(e)
    }

    fn send_dests(
        &self,
        mut hdr: ObjHdr,
        body: BundleBody,
        cb: Option<ObjCallback>,
        dests: Vec<Arc<Dest>>,
    ) -> Result<(), StreamError> {
        if dests.is_empty() {
            return self.fail(hdr, cb, StreamError::Object("no destinations".into()));
        }
        hdr.sid = self.local_id.clone();
        let replicas = Arc::new(Replicas {
            left: AtomicUsize::new(dests.len()),
            first_error: Mutex::new(None),
            cb: Mutex::new(cb),
            stream_cb: self.options.on_sent.clone(),
        });
        let (mut first, reopen, shared) = match body {
            BundleBody::Empty => (None, None, None),
            BundleBody::Bytes(b) => (None, None, Some(b)),
            BundleBody::Reader { first, reopen } => (Some(first), Some(reopen), None),
        };
        let mut sent_any = false;
        for (i, d) in dests.iter().enumerate() {
            let body = if hdr.is_header_only() {
                Body::Empty
            } else if let Some(b) = &shared {
                Body::Bytes(b.clone())
            } else if i == 0 {
                Body::Reader(first.take().expect("the first reader"))
            } else {
                match (reopen.as_ref().expect("a reader body has an opener"))() {
                    Ok(r) => Body::Reader(r),
                    Err(e) => {
                        replicas.done(&hdr, Err(&StreamError::Object(format!("reopening the reader: {e}"))));
                        continue;
                    }
                }
            };
            let k = d.robin.fetch_add(1, Ordering::Relaxed) % d.streams.len();
            let r = replicas.clone();
            // Each replica's stream completes it exactly once (inline if
            // the stream refuses it), so `Replicas` fires once.
            if d.streams[k].send_with(hdr.clone(), body, move |h, res| r.done(h, res)).is_ok() {
                sent_any = true;
            }
        }
        if sent_any { Ok(()) } else { Err(StreamError::Object("no replica could be sent".into())) }
    }

    /// Ends every stream: gracefully (`fin`, waiting for each) or not
    /// (`stop`).
    pub fn close(&self, graceful: bool) -> Vec<(String, Termination)> {
        let dests = std::mem::take(&mut *self.dests.write().expect("dests lock"));
        let mut out = Vec::new();
        for (id, d) in dests {
            for s in &d.streams {
                let t = if graceful {
                    s.fin()
                } else {
                    s.stop();
                    s.wait()
                };
                out.push((id.clone(), t));
            }
        }
        out
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let dests = std::mem::take(&mut *self.dests.write().unwrap_or_else(|e| e.into_inner()));
        for d in dests.into_values() {
            retire(d);
        }
    }
}

/// Ends a removed destination's streams without blocking the caller.
fn retire(d: Arc<Dest>) {
    let _ = std::thread::Builder::new().name("shardwire-retire".into()).spawn(move || {
        for s in &d.streams {
            s.fin();
        }
    });
}
