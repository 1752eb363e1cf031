//! Building what one send carries: a request head when a PUT starts, then
//! one HTTP chunk holding the frames of as many queued objects as fit, and
//! the body's end when the request ends.
//!
//! Object bytes are not copied: the batch points at them (and holds their
//! `Arc` until the send completes), whether they came as
//! [`Body::Bytes`] or as the chunks the sending thread read from a
//! [`Body::Reader`] (readers are never read on the shard). With LZ4,
//! everything in the chunk is compressed, and a block ends at every
//! object's end. Nothing here does I/O: the driver sends [`Batch::pieces`].

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use super::Outgoing;
use crate::proto::objstream::frame::{self, MAX_PDU_PAYLOAD};
use crate::proto::objstream::lz4::{self, BlockSize};

/// The most pieces one send takes (the kernel's IOV_MAX).
pub const IOV_MAX: usize = 1024;

/// Objects a batch may start on before the byte limit applies: small
/// objects cost per send, not per byte.
pub const BATCH_OBJECTS_MIN: usize = 256;
/// Most bytes the sending thread reads from a reader per chunk.
pub const STAGE_BYTES: usize = 256 << 10;

/// An object's bytes: none, bytes in memory, or a reader (read on the
/// thread that sends the object, never on the shard).
pub enum Body {
    Empty,
    Bytes(Arc<[u8]>),
    Reader(Box<dyn Read + Send>),
}

/// An object's bytes as the shard holds them.
pub enum Payload {
    Empty,
    Bytes(Arc<[u8]>),
    /// Chunks read by the sending thread, arriving as it reads them.
    Streamed(Streamed),
}

/// The chunks of a reader's bytes that have arrived.
#[derive(Debug, Default)]
pub struct Streamed {
    /// The object's number in its stream, which chunks are addressed by.
    pub seq: u64,
    chunks: VecDeque<Arc<[u8]>>,
    /// Bytes of the front chunk already framed.
    at: usize,
    /// The reader reached its end.
    pub ended: bool,
    /// The reader failed.
    pub error: Option<String>,
}

/// What the sending thread reports of a reader.
#[derive(Debug)]
pub enum Chunk {
    Data(Arc<[u8]>),
    End,
    Failed(String),
}

impl Streamed {
    pub fn new(seq: u64) -> Self {
        Self { seq, ..Self::default() }
    }

    /// Takes what the sending thread reported.
    pub fn give(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Data(d) if !d.is_empty() => self.chunks.push_back(d),
            Chunk::Data(_) => {}
            Chunk::End => self.ended = true,
            Chunk::Failed(e) => self.error = Some(e),
        }
    }

    /// Bytes arrived and not yet framed.
    fn available(&self) -> usize {
        self.chunks.iter().map(|c| c.len()).sum::<usize>() - self.at
    }

    /// Bytes still held (for the sending thread's budget, when the object
    /// goes).
    pub fn held(&self) -> usize {
        self.chunks.iter().map(|c| c.len()).sum()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Bytes(b) => write!(f, "Bytes({})", b.len()),
            Body::Reader(_) => f.write_str("Reader"),
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body::Bytes(v.into())
    }
}

impl From<Arc<[u8]>> for Body {
    fn from(v: Arc<[u8]>) -> Self {
        Body::Bytes(v)
    }
}

/// Where a piece of the batch lives.
enum Seg {
    /// A range of `owned`.
    Owned(usize, usize),
    /// Bytes of an object's `Arc`.
    Shared(Arc<[u8]>, usize, usize),
}

/// One send's bytes.
pub struct Batch {
    owned: Vec<u8>,
    segs: Vec<Seg>,
    /// Objects whose last byte is in this batch (completed when it is sent).
    pub completes: usize,
    /// Object (non-header) bytes carried, for stats.
    pub object_bytes: u64,
    /// Bytes of request body carried (the stream offset).
    pub body_bytes: u64,
    /// Bytes of streamed chunks framed whole (they leave the sending
    /// thread's budget once this batch is sent).
    pub chunk_bytes: usize,
}

/// What the stream needs to frame a batch.
pub struct Framing<'a> {
    /// The request head, when this batch opens a PUT.
    pub head: Option<&'a [u8]>,
    /// PDU payload size, for PDU streams.
    pub pdu: Option<usize>,
    pub compression: Option<BlockSize>,
    pub max_header: usize,
    /// Append the Fin frame after the objects.
    pub fin: bool,
    /// End the request body after this batch, if the batch takes every
    /// queued object.
    pub end_body: bool,
    /// Object bytes after which a batch of [`BATCH_OBJECTS_MIN`] objects
    /// or more ends (`SHARDWIRE_STREAM_BATCH`): large objects go out in
    /// pieces this big. Small sends keep the bytes between the two copies
    /// (into the socket, out of it) in cache: measured on loopback, 1 MiB
    /// objects ran at 3.8 GB/s with 4 MiB sends and 4.6-5.6 with 128 KiB.
    pub batch_bytes: usize,
    /// Object bytes after which any batch ends, whatever the object count
    /// (`SHARDWIRE_STREAM_BATCH_MAX`), and the largest piece of one object
    /// in a send: a send then completes within the send timeout on any
    /// link that moves.
    pub batch_bytes_max: usize,
}

/// Why an object cannot go on: it is completed with this error, and, if
/// some of it was already sent, the stream breaks.
pub struct ObjFailure {
    pub index: usize,
    pub error: String,
    /// Part of the object is already on the wire.
    pub breaks_stream: bool,
}

impl Batch {
    /// Frames the front of `queue`. Returns the batch and, if an object
    /// failed (a reader error or short read), which one.
    pub fn build(queue: &mut [Outgoing], f: &Framing<'_>) -> (Batch, Option<ObjFailure>) {
        let mut b =
            Batch { owned: Vec::new(), segs: Vec::new(), completes: 0, object_bytes: 0, body_bytes: 0, chunk_bytes: 0 };
        if let Some(head) = f.head {
            b.push_owned(head);
        }
        // The chunk-size line goes before the chunk's bytes: reserve its
        // segment, fill it at the end.
        let chunk_line_seg = b.segs.len();
        b.segs.push(Seg::Owned(0, 0));
        let chunk_start = b.segs.len();
        if f.head.is_some()
            && let Some(block) = f.compression
        {
            b.push_owned(&lz4::frame_header(block));
        }
        let mut failure = None;
        let mut started_bytes = 0usize;
        for (i, o) in queue.iter_mut().enumerate() {
            let full = started_bytes >= f.batch_bytes_max || (started_bytes >= f.batch_bytes && i >= BATCH_OBJECTS_MIN);
            // A failed object waits at the front for its completion.
            if b.segs.len() + 8 >= IOV_MAX || full || o.failed.is_some() {
                break;
            }
            let mut zstart = b.segs.len();
            match b.frame_object(o, f, &mut started_bytes) {
                Ok(true) => b.completes = i + 1,
                Ok(false) => {
                    b.compress_since(&mut zstart, f);
                    break;
                }
                Err(error) => {
                    failure = Some(ObjFailure { index: i, error, breaks_stream: o.started });
                    b.compress_since(&mut zstart, f);
                    break;
                }
            }
            b.compress_since(&mut zstart, f);
        }
        let all = failure.is_none() && b.completes == queue.len();
        if f.fin && all {
            let mut z = b.segs.len();
            b.push_owned(&frame::fin_frame());
            b.compress_since(&mut z, f);
        }
        // Fill in the chunk line (or drop it if the chunk is empty).
        let chunk_len: usize = b.segs[chunk_start..].iter().map(Seg::len).sum();
        b.body_bytes = chunk_len as u64;
        if chunk_len > 0 {
            let line = format!("{chunk_len:x}\r\n");
            let at = b.owned.len();
            b.owned.extend_from_slice(line.as_bytes());
            b.segs[chunk_line_seg] = Seg::Owned(at, line.len());
            b.push_owned(b"\r\n");
        }
        // The body ends only after everything queued (and the Fin frame).
        if f.end_body && all {
            b.push_owned(b"0\r\n\r\n");
        }
        (b, failure)
    }

    fn push_owned(&mut self, bytes: &[u8]) {
        let at = self.owned.len();
        self.owned.extend_from_slice(bytes);
        self.segs.push(Seg::Owned(at, bytes.len()));
    }

    /// Adds as much of `o` as this batch takes. True when the object is
    /// complete.
    fn frame_object(&mut self, o: &mut Outgoing, f: &Framing<'_>, started: &mut usize) -> Result<bool, String> {
        if !o.started {
            // Straight into the batch's buffer (it leaves nothing on error).
            let at = self.owned.len();
            let n = frame::encode_obj_frame(&o.hdr, f.pdu.is_some(), &mut self.owned, f.max_header)
                .map_err(|e| e.to_string())?;
            self.segs.push(Seg::Owned(at, n));
            o.started = true;
        }
        let size = o.hdr.attrs.size;
        if size == 0 {
            return Ok(true);
        }
        loop {
            let left = if size < 0 { usize::MAX } else { (size as u64 - o.sent) as usize };
            if size >= 0 && left == 0 && f.pdu.is_none() {
                return Ok(true);
            }
            if self.segs.len() + 4 >= IOV_MAX || (*started >= f.batch_bytes_max && o.sent > 0) {
                return Ok(false);
            }
            let cap = f.pdu.map_or(usize::MAX, |p| p.min(MAX_PDU_PAYLOAD));
            let want = left.min(cap).min(f.batch_bytes_max.saturating_sub(*started).max(1));
            let piece = match &mut o.body {
                Payload::Empty => return Err(format!("object {} has size {size} and no body", o.hdr.name)),
                Payload::Bytes(bytes) => {
                    let from = o.sent as usize;
                    let n = want.min(bytes.len().saturating_sub(from));
                    if n == 0 && size >= 0 && left > 0 {
                        return Err(format!("object {}: body of {} bytes, {size} declared", o.hdr.name, bytes.len()));
                    }
                    Piece::Shared(bytes.clone(), from, n)
                }
                Payload::Streamed(st) => {
                    if let Some(e) = &st.error {
                        return Err(format!("object {}: read: {e}", o.hdr.name));
                    }
                    let available = st.available();
                    if available == 0 && !st.ended {
                        return Ok(false); // the sending thread has not read more yet
                    }
                    if available == 0 && size >= 0 && left > 0 {
                        return Err(format!(
                            "object {}: the reader ended after {} of {size} bytes",
                            o.hdr.name, o.sent
                        ));
                    }
                    match st.chunks.front().cloned() {
                        None => Piece::Owned(Vec::new()),
                        Some(front) => {
                            let n = want.min(front.len() - st.at);
                            let piece = Piece::Shared(front.clone(), st.at, n);
                            st.at += n;
                            if st.at == front.len() {
                                st.chunks.pop_front();
                                st.at = 0;
                                self.chunk_bytes += front.len();
                            }
                            piece
                        }
                    }
                }
            };
            let n = piece.len();
            o.sent += n as u64;
            *started += n;
            self.object_bytes += n as u64;
            let last = match (&o.body, f.pdu) {
                // Unsized: the last PDU is the one after which the reader
                // has ended and nothing is left.
                (Payload::Streamed(st), Some(_)) if size < 0 => st.ended && st.available() == 0,
                (_, Some(_)) if size < 0 => n < want,
                _ => o.sent == size as u64,
            };
            if f.pdu.is_some() {
                self.push_owned(&frame::pdu_header(n, last));
            }
            match piece {
                Piece::Shared(a, from, n) => {
                    if n > 0 {
                        self.segs.push(Seg::Shared(a, from, n));
                    }
                }
                Piece::Owned(v) => self.push_owned(&v),
            }
            if last {
                return Ok(true);
            }
        }
    }

    /// Replaces the segments from `*from` on with their LZ4 blocks.
    fn compress_since(&mut self, from: &mut usize, f: &Framing<'_>) {
        let Some(block) = f.compression else { return };
        let mut plain = Vec::new();
        for s in self.segs.drain(*from..) {
            match s {
                Seg::Owned(at, n) => plain.extend_from_slice(&self.owned[at..at + n]),
                Seg::Shared(a, at, n) => plain.extend_from_slice(&a[at..at + n]),
            }
        }
        let mut z = Vec::with_capacity(plain.len() / 2 + 64);
        for piece in plain.chunks(block.bytes()) {
            lz4::encode_block(piece, &mut z);
        }
        if !z.is_empty() {
            self.push_owned(&z);
        }
        *from = self.segs.len();
    }

    /// The batch's bytes as `(pointer, length)` pieces, in order. They stay
    /// valid while the batch lives: its own buffer, and the `Arc`s it holds.
    pub fn pieces(&self) -> Vec<(*const u8, usize)> {
        self.segs
            .iter()
            .filter(|s| s.len() > 0)
            .map(|s| match s {
                Seg::Owned(at, n) => (self.owned[*at..].as_ptr(), *n),
                Seg::Shared(a, at, n) => (a[*at..].as_ptr(), *n),
            })
            .collect()
    }

    /// Every byte of the batch, in order.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for s in &self.segs {
            match s {
                Seg::Owned(at, n) => out.extend_from_slice(&self.owned[*at..*at + *n]),
                Seg::Shared(a, at, n) => out.extend_from_slice(&a[*at..*at + *n]),
            }
        }
        out
    }

    pub fn total(&self) -> usize {
        self.segs.iter().map(Seg::len).sum()
    }
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Owned(_, n) | Seg::Shared(_, _, n) => *n,
        }
    }
}

enum Piece {
    Shared(Arc<[u8]>, usize, usize),
    Owned(Vec<u8>),
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Shared(_, _, n) => *n,
            Piece::Owned(v) => v.len(),
        }
    }
}

/// Reads `r` as the sending thread does: at most `size` bytes (until its
/// end, when `size` is -1, unsized), [`STAGE_BYTES`] a chunk, each handed
/// to `give`; then `End`, or `Failed` if the reader failed or ended short.
/// Stops early when `give` returns false (the stream ended).
pub fn read_chunks(r: &mut dyn Read, size: i64, mut give: impl FnMut(Chunk) -> bool) {
    let mut sent = 0u64;
    loop {
        let want = if size < 0 { STAGE_BYTES } else { (size as u64 - sent).min(STAGE_BYTES as u64) as usize };
        if want == 0 {
            give(Chunk::End);
            return;
        }
        let mut buf = vec![0u8; want];
        let n = match read_full(r, &mut buf) {
            Ok(n) => n,
            Err(e) => {
                give(Chunk::Failed(e.to_string()));
                return;
            }
        };
        buf.truncate(n);
        sent += n as u64;
        if n > 0 && !give(Chunk::Data(buf.into())) {
            return;
        }
        if n < want {
            give(if size < 0 {
                Chunk::End
            } else {
                Chunk::Failed(format!("the reader ended after {sent} of {size} bytes"))
            });
            return;
        }
    }
}

/// Reads until `buf` is full or the reader ends. A reader that panics is
/// an error of its object, not of the shard.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_full_inner(r, buf))).unwrap_or_else(|p| {
        let why = crate::runtime::task::panic_message(p.as_ref());
        Err(std::io::Error::other(format!("the reader panicked: {why}")))
    })
}

fn read_full_inner(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::proto::objstream::{BodyDecoder, BodyEvent, Event, Framing as BodyFraming, ObjHdr, SIZE_UNKNOWN};

    /// What the shard holds for `body` once the sending thread read it all.
    fn payload(body: Body, size: i64) -> Payload {
        match body {
            Body::Empty => Payload::Empty,
            Body::Bytes(b) => Payload::Bytes(b),
            Body::Reader(mut r) => {
                let mut st = Streamed::new(1);
                read_chunks(r.as_mut(), size, |c| {
                    st.give(c);
                    true
                });
                Payload::Streamed(st)
            }
        }
    }

    fn out(hdr: ObjHdr, body: Body) -> Outgoing {
        let size = hdr.attrs.size;
        Outgoing { hdr, body: payload(body, size), cb: None, started: false, sent: 0, failed: None }
    }

    /// Frames the queue in batches until empty; returns the request bytes
    /// after the head.
    fn frame_all(mut queue: Vec<Outgoing>, pdu: Option<usize>, z: Option<BlockSize>) -> Vec<u8> {
        let head = b"HEAD".to_vec();
        let mut wire = Vec::new();
        let mut first = true;
        loop {
            let f = Framing {
                head: first.then_some(&head[..]),
                pdu,
                compression: z,
                max_header: 4096,
                fin: true,
                end_body: true,
                batch_bytes: Settings::default().stream_batch_bytes,
                batch_bytes_max: Settings::default().stream_batch_bytes_max,
            };
            let (b, failure) = Batch::build(&mut queue, &f);
            assert!(failure.is_none());
            wire.extend(b.to_vec());
            let done = b.completes == queue.len();
            queue.drain(..b.completes);
            first = false;
            if done {
                break;
            }
        }
        assert!(wire.starts_with(b"HEAD"));
        wire.split_off(4)
    }

    fn decode(wire: &[u8], z: bool) -> Vec<(ObjHdr, Vec<u8>)> {
        let mut d = BodyDecoder::new(BodyFraming::Chunked, z, 4096);
        let mut rest = wire;
        let mut got: Vec<(ObjHdr, Vec<u8>)> = Vec::new();
        loop {
            let (n, ev) = d.step(rest).unwrap();
            let mut end = false;
            match ev {
                BodyEvent::Obj(Event::Header(h)) => got.push((*h, Vec::new())),
                BodyEvent::Obj(Event::Data(b)) => got.last_mut().unwrap().1.extend_from_slice(b),
                BodyEvent::Obj(_) => {}
                BodyEvent::NeedMore => panic!("the body is whole"),
                BodyEvent::End => end = true,
            }
            rest = &rest[n..];
            if end {
                assert!(rest.is_empty());
                return got;
            }
        }
    }

    #[test]
    fn batches_decode_back_to_the_objects() {
        let sizes = [0usize, 5, 4096, 200_000, 3 << 20, 1];
        for (pdu, z) in
            [(None, None), (Some(32 << 10), None), (None, Some(BlockSize::K64)), (Some(1000), Some(BlockSize::M1))]
        {
            let queue: Vec<Outgoing> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let data: Vec<u8> = (0..n).map(|k| (k * 7 + i) as u8).collect();
                    let body = if i % 2 == 0 && n > 0 {
                        Body::Reader(Box::new(std::io::Cursor::new(data)))
                    } else {
                        Body::from(data)
                    };
                    out(ObjHdr::new("b", &i.to_string(), n as i64), body)
                })
                .collect();
            let got = decode(&frame_all(queue, pdu, z), z.is_some());
            assert_eq!(got.len(), sizes.len());
            for (i, (h, b)) in got.iter().enumerate() {
                assert_eq!(h.name, i.to_string());
                assert_eq!(b.len(), sizes[i], "{pdu:?} {z:?}");
                assert!(b.iter().enumerate().all(|(k, &x)| x == (k * 7 + i) as u8));
            }
        }
    }

    #[test]
    fn reads_are_clamped_and_short_bodies_fail() {
        // A reader longer than the declared size: only `size` bytes go.
        let q = vec![out(ObjHdr::new("b", "long", 10), Body::Reader(Box::new(std::io::Cursor::new(vec![1u8; 100]))))];
        let got = decode(&frame_all(q, None, None), false);
        assert_eq!(got[0].1, vec![1u8; 10]);
        // Bytes longer than the size, likewise.
        let q = vec![out(ObjHdr::new("b", "long", 3), Body::from(vec![2u8; 50]))];
        assert_eq!(decode(&frame_all(q, None, None), false)[0].1, vec![2u8; 3]);
        // A short reader fails its object, and the stream (bytes are out).
        let mut q = vec![
            out(ObjHdr::new("b", "ok", 1), Body::from(vec![1u8])),
            out(ObjHdr::new("b", "short", 10), Body::Reader(Box::new(std::io::Cursor::new(vec![0u8; 4])))),
        ];
        let f = Framing {
            head: None,
            pdu: None,
            compression: None,
            max_header: 4096,
            fin: false,
            end_body: false,
            batch_bytes: Settings::default().stream_batch_bytes,
            batch_bytes_max: Settings::default().stream_batch_bytes_max,
        };
        let (b, failure) = Batch::build(&mut q, &f);
        let failure = failure.expect("the short reader fails");
        assert_eq!((failure.index, failure.breaks_stream, b.completes), (1, true, 1));
        assert!(failure.error.contains("ended after 4 of 10"), "{}", failure.error);
        // A header that cannot be encoded fails alone, before any byte.
        let mut big = ObjHdr::new("b", "big", 0);
        big.opaque = vec![0; 5000];
        let mut q = vec![out(big, Body::Empty)];
        let (_, failure) = Batch::build(&mut q, &f);
        assert!(!failure.unwrap().breaks_stream);
        // Unsized PDU bodies end with a short (possibly empty) PDU.
        let q = vec![out(
            ObjHdr::new("b", "u", SIZE_UNKNOWN),
            Body::Reader(Box::new(std::io::Cursor::new(vec![5u8; 2000]))),
        )];
        assert_eq!(decode(&frame_all(q, Some(1000), None), false)[0].1, vec![5u8; 2000]);
    }
}
