//! A connection's decoding thread: it runs request bodies through the
//! sans-IO [`BodyDecoder`] straight out of the connection's pipe and calls
//! the handler once per object, with an [`ObjReader`] bounded to it.

use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{RecvError, RecvHandler, Session};
use crate::proto::objstream::{
    BodyDecoder, BodyEvent, ChecksumError, Event, Framing, ObjHdr, SbrCode, SbrError, Verdict,
};
use crate::stream::pipe::Pipe;
use crate::stream::stats::RxCounters;
use crate::telemetry::{Direction, StreamDelta, counters as telemetry};

/// One request body to decode.
pub(crate) struct Job {
    pub handler: Arc<dyn RecvHandler>,
    pub session: Session,
    pub framing: Framing,
    pub compressed: bool,
    pub counters: Arc<RxCounters>,
    pub dry_run: bool,
    pub max_header: usize,
    /// Verify objects' checksums.
    pub verify: bool,
}

/// The hand-over point between the shard and the thread.
pub(crate) struct Link {
    job: Mutex<Option<Job>>,
    quit: AtomicBool,
    thread: Mutex<Option<std::thread::Thread>>,
}

impl Link {
    pub fn new() -> Arc<Link> {
        Arc::new(Link { job: Mutex::new(None), quit: AtomicBool::new(false), thread: Mutex::new(None) })
    }

    pub fn give(&self, job: Job) {
        *self.job.lock().expect("job lock") = Some(job);
        self.wake();
    }

    pub fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if let Some(t) = self.thread.lock().expect("thread lock").as_ref() {
            t.unpark();
        }
    }
}

/// Starts the thread; `done` reports each body's result to the shard.
pub(crate) fn spawn(
    link: Arc<Link>,
    pipe: Arc<Pipe>,
    done: Box<dyn Fn(Result<(), RecvError>) + Send>,
    cpu: Option<u32>,
) -> io::Result<()> {
    let l = link.clone();
    let handle = std::thread::Builder::new().name("shardwire-rx".into()).spawn(move || {
        // Share the receiving shard's core: on a small machine, a decoding
        // thread scheduled onto the sender's core slows the whole stream.
        if let Some(cpu) = cpu {
            let _ = crate::runtime::shard::pin_current_thread(cpu);
        }
        pipe.set_consumer(std::thread::current());
        loop {
            let job = l.job.lock().expect("job lock").take();
            match job {
                Some(job) => done(run(&pipe, job)),
                None if l.quit.load(Ordering::SeqCst) => return,
                None => std::thread::park_timeout(Duration::from_millis(200)),
            }
        }
    })?;
    *link.thread.lock().expect("thread lock") = Some(handle.thread().clone());
    handle.thread().unpark();
    Ok(())
}

/// Decodes one body, calling the handler per object.
fn run(pipe: &Arc<Pipe>, job: Job) -> Result<(), RecvError> {
    let mut dec = BodyDecoder::new(job.framing, job.compressed, job.max_header);
    dec.set_verify(job.verify);
    let mut body = Body { pipe: pipe.clone(), dec, owed: 0, offset: 0, error: None };
    let trname = job.session.trname.clone();
    telemetry::stream(&trname, Direction::Rx, StreamDelta { sessions: 1, ..StreamDelta::default() });
    let result = objects(&mut body, &job);
    if result.is_err() {
        telemetry::stream(&trname, Direction::Rx, StreamDelta { errors: 1, ..StreamDelta::default() });
    }
    // The body is done: what this thread counted is published now, not
    // when the next body comes.
    telemetry::flush(true);
    // Free what the last object's bytes still held.
    body.pipe.consume(std::mem::take(&mut body.owed));
    if let Err(e) = &result {
        let call = std::panic::AssertUnwindSafe(|| job.handler.error(&job.session, e));
        if std::panic::catch_unwind(call).is_err() {
            log::error!("stream receiver: the error hook of {} panicked", job.session.trname);
        }
    }
    result
}

fn objects(body: &mut Body, job: &Job) -> Result<(), RecvError> {
    loop {
        match body.step()? {
            Step::Header(hdr) => {
                let mut reader = ObjReader {
                    body: &mut *body,
                    cur: (std::ptr::null(), 0),
                    done: false,
                    received: 0,
                    bad: None,
                    bad_seen: false,
                };
                let handled = if job.dry_run { Ok(()) } else { call_handler(job, &hdr, &mut reader) };
                // Whether the handler's own reads met a checksum failure
                // (the drain below may meet it too).
                let bad_seen = reader.bad_seen;
                if reader.body.error.is_none() {
                    // A failure here is recorded in body.error (or, for a
                    // checksum, in reader.bad), read below.
                    let _ = reader.discard();
                }
                let (received, bad) = (reader.received, reader.bad.take());
                if let Some(e) = body.error.take() {
                    return Err(e);
                }
                if let Some(bad) = bad {
                    // The object failed; the stream goes on. A handler error
                    // that came of reading the failure is that failure, not
                    // a refusal of the stream.
                    object_failed(job, &hdr, &bad);
                    if let Err(e) = handled
                        && !bad_seen
                    {
                        return Err(RecvError::Handler(e.0));
                    }
                    job.counters.offset.store(body.offset as i64, Ordering::Relaxed);
                    continue;
                }
                handled.map_err(|e| RecvError::Handler(e.0))?;
                let c = &job.counters;
                if !hdr.is_control() {
                    c.num.fetch_add(1, Ordering::Relaxed);
                    c.size.fetch_add(received as i64, Ordering::Relaxed);
                    let delta = StreamDelta { objects: 1, bytes: received, ..StreamDelta::default() };
                    telemetry::stream(&job.session.trname, Direction::Rx, delta);
                    telemetry::flush(false);
                }
            }
            Step::Fin => {}
            Step::BodyEnd => return Ok(()),
            Step::Data(..) | Step::ObjEnd(..) => {
                let e = RecvError::Broken(SbrError::new(SbrCode::ProtoHdr, "object bytes outside an object"));
                return Err(e);
            }
        }
        job.counters.offset.store(body.offset as i64, Ordering::Relaxed);
    }
}

/// An object failed its checksum: counted as a stream error, logged, and
/// reported to the handler's hook (a panic there is logged, nothing more).
fn object_failed(job: &Job, hdr: &ObjHdr, bad: &ChecksumError) {
    job.counters.bad_checksums.fetch_add(1, Ordering::Relaxed);
    telemetry::stream(&job.session.trname, Direction::Rx, StreamDelta { errors: 1, ..StreamDelta::default() });
    log::warn!("stream {}: object {}/{} failed: {bad}", job.session.trname, hdr.bucket.name, hdr.name);
    if job.dry_run {
        return;
    }
    let call = std::panic::AssertUnwindSafe(|| job.handler.bad_checksum(&job.session, hdr, bad));
    if std::panic::catch_unwind(call).is_err() {
        log::error!("stream receiver: the bad_checksum hook of {} panicked", job.session.trname);
    }
}

/// Calls the handler; a panic in it is that object's error (the stream ends
/// with a 400), not the end of this thread.
fn call_handler(job: &Job, hdr: &ObjHdr, reader: &mut ObjReader<'_>) -> Result<(), super::HandlerError> {
    let call = std::panic::AssertUnwindSafe(|| job.handler.object(&job.session, hdr, reader));
    std::panic::catch_unwind(call).unwrap_or_else(|p| {
        let why = crate::runtime::task::panic_message(p.as_ref());
        Err(super::HandlerError(format!("the handler panicked: {why}")))
    })
}

/// What the body yields, with object bytes as a raw slice (valid until the
/// next step; see [`Body::step`]).
enum Step {
    Header(Box<ObjHdr>),
    Data(*const u8, usize),
    ObjEnd(u64, Verdict),
    Fin,
    BodyEnd,
}

/// A body being decoded out of the pipe.
struct Body {
    pipe: Arc<Pipe>,
    dec: BodyDecoder,
    /// Pipe bytes behind the data last handed out, freed at the next step.
    owed: usize,
    /// Body bytes taken so far.
    offset: u64,
    /// The breakage that made a read fail, reported once the handler returns.
    error: Option<RecvError>,
}

impl Body {
    /// The next event. Data points into the pipe (not yet freed) or into
    /// the decoder's LZ4 output; either stays put until the next call.
    fn step(&mut self) -> Result<Step, RecvError> {
        self.pipe.consume(std::mem::take(&mut self.owed));
        loop {
            let buf = self.pipe.readable();
            let len = buf.len();
            let (used, ev) = self.dec.step(buf).map_err(RecvError::Broken)?;
            let step = match ev {
                BodyEvent::NeedMore => None,
                BodyEvent::End => Some(Step::BodyEnd),
                BodyEvent::Obj(Event::Data(d)) => {
                    let s = Step::Data(d.as_ptr(), d.len());
                    self.owed = used;
                    self.offset += used as u64;
                    return Ok(s);
                }
                BodyEvent::Obj(Event::Header(h)) => Some(Step::Header(h)),
                BodyEvent::Obj(Event::End { received, verdict }) => Some(Step::ObjEnd(received, verdict)),
                BodyEvent::Obj(Event::Fin) => Some(Step::Fin),
            };
            self.pipe.consume(used);
            self.offset += used as u64;
            if let Some(s) = step {
                return Ok(s);
            }
            // Everything offered was taken, or a partial line stays in the
            // pipe: wait for more than that.
            if !self.pipe.wait_more(len - used) {
                let why = self.pipe.error().unwrap_or_else(|| "EOF".into());
                return Err(RecvError::PeerClosed(why));
            }
        }
    }
}

/// One object's bytes, as the handler reads them (`Read` and `BufRead`).
/// Reads end (return 0) at the object's end, never past it; a broken stream
/// makes them fail, and the stream then ends with that error whatever the
/// handler returns.
///
/// An object whose bytes do not match its header's checksum: the read that
/// reaches its end fails instead of returning 0, with an
/// [`io::ErrorKind::InvalidData`] error whose inner error is the
/// [`ChecksumError`] (expected and actual values), and so does every read
/// after it. The object is failed whether or not the handler read that far
/// ([`RecvHandler::bad_checksum`](super::RecvHandler::bad_checksum) is
/// told), and the stream goes on.
pub struct ObjReader<'b> {
    body: &'b mut Body,
    cur: (*const u8, usize),
    done: bool,
    received: u64,
    /// The object failed its checksum.
    bad: Option<ChecksumError>,
    /// The handler was given that failure by a read.
    bad_seen: bool,
}

impl ObjReader<'_> {
    /// Bytes of this object read so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Reads and drops the rest of the object, without copying it;
    /// returns how many bytes that was.
    pub fn discard(&mut self) -> io::Result<u64> {
        let mut dropped = 0u64;
        loop {
            let n = self.fill_buf()?.len();
            if n == 0 {
                return Ok(dropped);
            }
            self.consume(n);
            dropped += n as u64;
        }
    }
}

impl BufRead for ObjReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some(bad) = &self.bad {
            self.bad_seen = true;
            return Err(io::Error::new(io::ErrorKind::InvalidData, bad.clone()));
        }
        if self.cur.1 == 0 && !self.done {
            if let Some(e) = &self.body.error {
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
            match self.body.step() {
                Ok(Step::Data(p, n)) => self.cur = (p, n),
                Ok(Step::ObjEnd(n, verdict)) => {
                    debug_assert_eq!(n, self.received);
                    self.done = true;
                    if let Verdict::Failed(bad) = verdict {
                        self.bad_seen = true;
                        let e = io::Error::new(io::ErrorKind::InvalidData, (*bad).clone());
                        self.bad = Some(*bad);
                        return Err(e);
                    }
                }
                Ok(_) => {
                    let e = RecvError::Broken(SbrError::new(SbrCode::ProtoHdr, "an object ended without its end"));
                    self.body.error = Some(e);
                }
                Err(e) => self.body.error = Some(e),
            }
            if let Some(e) = &self.body.error {
                let kind = match e {
                    RecvError::PeerClosed(_) => io::ErrorKind::UnexpectedEof,
                    _ => io::ErrorKind::InvalidData,
                };
                return Err(io::Error::new(kind, e.to_string()));
            }
        }
        if self.cur.1 == 0 {
            return Ok(&[]);
        }
        // SAFETY: `cur` came from Body::step and points into the pipe's
        // unfreed data or the decoder's LZ4 output; neither changes until
        // the next step, which happens only once `cur` is used up.
        Ok(unsafe { std::slice::from_raw_parts(self.cur.0, self.cur.1) })
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.cur.1);
        // SAFETY: advancing within the slice described by `cur`.
        self.cur = (unsafe { self.cur.0.add(n) }, self.cur.1 - n);
        self.received += n as u64;
    }
}

impl Read for ObjReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let src = self.fill_buf()?;
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        self.consume(n);
        Ok(n)
    }
}
