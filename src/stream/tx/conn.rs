//! A stream's sending side as a state machine: events in, actions out, no
//! I/O.
//!
//! [`TxConn`] holds every rule of the sender: the FIFO of objects, when a
//! PUT opens (lazily, on the first object) and when it ends (after
//! `idle_teardown` without objects, or with `fin`), what one send carries,
//! what the receiver's answers mean (through [`crate::http::response`]),
//! when a send or an answer has taken too long, and how the stream ends.
//! The shard's driver (`shard.rs`) carries out its [`Action`]s with
//! io_uring and timers, and feeds back what happened.
//!
//! Every object leaves exactly once, as an [`Action::Complete`], in the
//! order it was queued: when its last byte was handed to the kernel, or
//! with the error that stopped it. The tests below drive the core with
//! scripted receiver bytes split at every boundary; the fuzz target
//! `objstream_sender` feeds it arbitrary ones.

use std::collections::VecDeque;
use std::time::Duration;

use super::batch::{Batch, Chunk, Framing, Payload};
use super::{Outgoing, StreamError, Termination};
use crate::http::response;
use crate::proto::objstream::lz4::BlockSize;

/// Bytes of a receiver's answer read at most (status, a JSON error).
pub const RESPONSE_MAX: usize = 64 << 10;

/// What the driver is asked to do.
pub enum Action {
    /// Open a connection for generation [`TxConn::generation`]; report with
    /// `on_connected` or `on_connect_failed`.
    Connect,
    /// Send [`TxConn::batch`]; report with `on_sent` (and `on_send_failed`).
    Send,
    /// Shut the connection down and forget it (its generation is over).
    Close,
    /// Shut the connection down, so a stuck send fails.
    Abort,
    /// Call `on_idle` after this long.
    IdleTimer(Duration),
    /// Call `on_watchdog(seen)` after this long.
    Watchdog(Duration, u64),
    /// The next object of [`TxConn::take_completed`] is done with.
    Complete,
    /// A batch of this many body bytes went out.
    Sent { body_bytes: u64 },
    /// The stream went idle (true) or busy.
    Idle(bool),
    /// Streamed bytes left the shard: the sending thread may read more.
    ChunkBytes(usize),
    /// The stream ended; nothing else follows.
    Terminate(Termination),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    Closed,
    Connecting,
    Ready,
}

/// How the stream frames its objects.
#[derive(Debug, Clone)]
pub struct TxFraming {
    /// The request head each PUT opens with.
    pub head: Vec<u8>,
    pub pdu: Option<usize>,
    pub compression: Option<BlockSize>,
    pub max_header: usize,
    pub batch_bytes: usize,
    pub batch_bytes_max: usize,
    pub idle_teardown: Duration,
    pub send_timeout: Duration,
}

/// One stream's sending state. See the module documentation.
pub struct TxConn {
    framing: TxFraming,
    queue: VecDeque<Outgoing>,
    conn: ConnState,
    /// Bumped per connection; the driver drops reports of older ones.
    generation: u64,
    /// A PUT is open (its head was sent, its body not ended).
    in_request: bool,
    /// The send out, and whether it ends the request body.
    batch: Option<(Box<Batch>, bool)>,
    /// Bytes of the send out that went so far.
    batch_done: usize,
    /// The body was ended; the receiver's status is due.
    awaiting_response: bool,
    fin_requested: bool,
    fin_sent: bool,
    /// The receiver's 200 arrived while the last batch's completion was
    /// still due (`Connection: close` with it, or not).
    answered: Option<bool>,
    response: Vec<u8>,
    idle_armed: bool,
    /// What the stats were last told: idle (true) or busy.
    stats_idle: bool,
    /// Bumped per batch, for the watchdog.
    send_gen: u64,
    watchdog: bool,
    ended: bool,
    actions: VecDeque<Action>,
    /// Objects done with, in order; one [`Action::Complete`] each.
    completed: VecDeque<(Outgoing, Result<(), StreamError>)>,
}

impl TxConn {
    pub fn new(framing: TxFraming) -> Self {
        assert!(framing.batch_bytes >= 1 && framing.batch_bytes_max >= 1);
        Self {
            framing,
            queue: VecDeque::new(),
            conn: ConnState::Closed,
            generation: 0,
            in_request: false,
            batch: None,
            batch_done: 0,
            awaiting_response: false,
            fin_requested: false,
            fin_sent: false,
            answered: None,
            response: Vec::new(),
            idle_armed: false,
            stats_idle: true,
            send_gen: 0,
            watchdog: false,
            ended: false,
            actions: VecDeque::new(),
            completed: VecDeque::new(),
        }
    }

    /// The current connection's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The send out, if any.
    pub fn batch(&self) -> Option<&Batch> {
        self.batch.as_ref().map(|(b, _)| b.as_ref())
    }

    /// Whether a receive should be posted: connected, and not ended.
    pub fn wants_recv(&self) -> bool {
        self.conn == ConnState::Ready && !self.ended
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The object an [`Action::Complete`] stands for.
    pub fn take_completed(&mut self) -> Option<(Outgoing, Result<(), StreamError>)> {
        self.completed.pop_front()
    }

    /// A new object from `send`.
    pub fn enqueue(&mut self, obj: Outgoing) {
        if self.ended {
            // The driver checks the stream's termination first; this is the
            // race with an end on the shard.
            let e = StreamError::Terminated(Box::new(StreamError::Stopped));
            return self.complete(obj, Err(e));
        }
        self.queue.push_back(obj);
        if self.stats_idle {
            self.stats_idle = false;
            self.actions.push_back(Action::Idle(false));
        }
        self.kick();
    }

    /// More of a streamed object's bytes (or its end, or its failure).
    pub fn chunk(&mut self, seq: u64, chunk: Chunk) {
        let found = self.queue.iter_mut().rev().find_map(|o| match &mut o.body {
            Payload::Streamed(st) if st.seq == seq => Some(st),
            _ => None,
        });
        match found {
            Some(st) => st.give(chunk),
            // The object is gone (failed, or the stream ended): the bytes
            // leave the sending thread's budget at once.
            None => {
                if let Chunk::Data(d) = chunk {
                    self.actions.push_back(Action::ChunkBytes(d.len()));
                }
                return;
            }
        }
        self.kick();
    }

    /// `fin`: send what is queued, then the end-of-stream frame.
    pub fn fin(&mut self) {
        if self.ended {
            return;
        }
        self.fin_requested = true;
        self.kick();
    }

    /// `stop`: abort.
    pub fn stop(&mut self) {
        self.end(Termination::Stopped);
    }

    pub fn on_connected(&mut self) {
        if self.ended || self.conn != ConnState::Connecting {
            return;
        }
        self.conn = ConnState::Ready;
        self.kick();
    }

    pub fn on_connect_failed(&mut self, why: impl Into<String>) {
        if self.conn == ConnState::Connecting {
            self.end(Termination::Error(StreamError::Network(why.into())));
        }
    }

    /// `n` more bytes of the send went out.
    pub fn on_sent(&mut self, n: usize) {
        let Some((batch, ends_body)) = self.batch.as_ref() else {
            debug_assert!(false, "on_sent without a send");
            return;
        };
        let total = batch.total();
        assert!(n > 0 && self.batch_done + n <= total, "sent {n} past the batch's {total}");
        self.batch_done += n;
        if self.batch_done < total {
            return;
        }
        let ends_body = *ends_body;
        let (batch, _) = self.batch.take().expect("checked");
        self.batch_done = 0;
        if batch.chunk_bytes > 0 {
            self.actions.push_back(Action::ChunkBytes(batch.chunk_bytes));
        }
        if self.ended {
            return; // held only until the kernel let go of it
        }
        // The whole batch is with the kernel: its objects are complete.
        let n = batch.completes.min(self.queue.len());
        if ends_body {
            self.in_request = false;
        }
        self.actions.push_back(Action::Sent { body_bytes: batch.body_bytes });
        for _ in 0..n {
            let o = self.queue.pop_front().expect("counted");
            self.complete(o, Ok(()));
        }
        if let Some(close) = self.answered.take() {
            return self.answer_ok(close);
        }
        self.kick();
    }

    /// The send failed.
    pub fn on_send_failed(&mut self, why: impl Into<String>) {
        let Some((batch, _)) = self.batch.take() else { return };
        self.batch_done = 0;
        if batch.chunk_bytes > 0 {
            self.actions.push_back(Action::ChunkBytes(batch.chunk_bytes));
        }
        self.end(Termination::Error(StreamError::Network(why.into())));
    }

    /// Bytes of the receiver's answers arrived.
    pub fn on_received(&mut self, bytes: &[u8]) {
        if self.ended {
            return;
        }
        self.response.extend_from_slice(bytes);
        loop {
            match response::take(&self.response, false, RESPONSE_MAX) {
                Err(e) => {
                    let e = StreamError::Network(format!("the receiver's answer is not HTTP: {e}"));
                    return self.end(Termination::Error(e));
                }
                Ok(None) => {
                    if self.response.len() > RESPONSE_MAX {
                        let e = StreamError::Network("the receiver's answer is too long".into());
                        return self.end(Termination::Error(e));
                    }
                    return;
                }
                Ok(Some((head, body, used))) => {
                    self.response.drain(..used);
                    if head.status == 100 {
                        continue;
                    }
                    if head.status != 200 {
                        let message = String::from_utf8_lossy(&body).into_owned();
                        return self.end(Termination::Error(StreamError::Rejected { status: head.status, message }));
                    }
                    if !self.awaiting_response {
                        let e = StreamError::Network("the receiver answered before the body ended".into());
                        return self.end(Termination::Error(e));
                    }
                    if self.batch.is_some() {
                        // Complete the last batch's objects first.
                        self.answered = Some(head.close);
                        return;
                    }
                    return self.answer_ok(head.close);
                }
            }
        }
    }

    /// The receiver closed the connection.
    pub fn on_eof(&mut self) {
        if self.ended {
            return;
        }
        // An answer framed by the end of the connection is complete now.
        if let Ok(Some((head, body, _))) = response::take(&self.response, true, RESPONSE_MAX)
            && head.status != 200
            && head.status != 100
        {
            let message = String::from_utf8_lossy(&body).into_owned();
            return self.end(Termination::Error(StreamError::Rejected { status: head.status, message }));
        }
        if self.in_request || self.batch.is_some() || self.awaiting_response {
            let e = StreamError::Network("the receiver closed the connection".into());
            return self.end(Termination::Error(e));
        }
        // An idle keep-alive connection closed by the receiver: reconnect
        // when there is something to send.
        self.drop_conn();
        self.kick();
    }

    pub fn on_recv_failed(&mut self, why: impl Into<String>) {
        self.end(Termination::Error(StreamError::Network(format!("receive: {}", why.into()))));
    }

    /// The idle timer fired: end the PUT if nothing came since.
    pub fn on_idle(&mut self) {
        self.idle_armed = false;
        let idle =
            !self.ended && self.in_request && self.batch.is_none() && self.queue.is_empty() && !self.fin_requested;
        if idle {
            self.end_body();
        }
    }

    /// The watchdog fired: a send still out, or an answer still due, for
    /// the same batch as at the previous look has taken at least
    /// `send_timeout`. The send is aborted (it then fails), or the stream
    /// ends for want of an answer.
    pub fn on_watchdog(&mut self, seen: u64) {
        if self.ended {
            return;
        }
        let (sending, waiting) = (self.batch.is_some(), self.awaiting_response);
        if self.send_gen == seen && sending {
            self.actions.push_back(Action::Abort);
        } else if self.send_gen == seen && waiting {
            let e = StreamError::Network(format!("the receiver did not answer within {:?}", self.framing.send_timeout));
            return self.end(Termination::Error(e));
        }
        if !sending && !waiting {
            // Idle: stop looking until the next send.
            self.watchdog = false;
            return;
        }
        self.actions.push_back(Action::Watchdog(self.framing.send_timeout, self.send_gen));
    }

    /// The watchdog could not be armed (the timer table is full).
    pub fn watchdog_failed(&mut self) {
        self.watchdog = false;
    }

    /// Moves the stream forward: connect, or frame and send the next batch.
    fn kick(&mut self) {
        // Bounded: each round either sends, waits, or drops a failed object.
        for _ in 0..=self.queue.len() + 1 {
            if self.ended || self.batch.is_some() || self.awaiting_response {
                return;
            }
            // Objects that failed framing complete once those ahead of them
            // have, which is now: nothing is in flight.
            while self.queue.front().is_some_and(|o| o.failed.is_some()) {
                let mut o = self.queue.pop_front().expect("checked");
                let e = o.failed.take().expect("checked");
                self.complete(o, Err(e));
            }
            let work = !self.queue.is_empty() || (self.fin_requested && !self.fin_sent);
            if !work {
                return self.arm_idle();
            }
            match self.conn {
                ConnState::Connecting => return,
                ConnState::Closed => return self.connect(),
                ConnState::Ready => {}
            }
            let opening = !self.in_request;
            let f = &self.framing;
            let fin_now = self.fin_requested;
            let framing = Framing {
                head: opening.then_some(f.head.as_slice()),
                pdu: f.pdu,
                compression: f.compression,
                max_header: f.max_header,
                fin: fin_now,
                end_body: fin_now,
                batch_bytes: f.batch_bytes,
                batch_bytes_max: f.batch_bytes_max,
            };
            let head_len = if opening { f.head.len() } else { 0 };
            let (batch, failure) = Batch::build(self.queue.make_contiguous(), &framing);
            // A batch cut short by a failed object carries no Fin: that goes next.
            let cut_short = failure.is_some();
            if let Some(fail) = failure {
                let e = StreamError::Object(fail.error);
                if fail.breaks_stream {
                    return self.end(Termination::Error(e));
                }
                // The object never reached the wire: it fails alone, in its turn.
                self.queue[fail.index].failed = Some(e);
                if batch.completes == 0 && batch.total() == head_len {
                    continue; // nothing else in this batch: go on from the next object
                }
            }
            let whole = fin_now && !cut_short && batch.completes == self.queue.len();
            if batch.total() == 0 {
                return; // a streamed object waits for its next chunk
            }
            self.in_request = !whole;
            if whole {
                self.fin_sent = true;
                // The answer may be read before this send's completion.
                self.awaiting_response = true;
            }
            return self.send(batch, whole);
        }
    }

    fn send(&mut self, batch: Batch, ends_body: bool) {
        debug_assert!(self.batch.is_none());
        self.send_gen += 1;
        self.batch = Some((Box::new(batch), ends_body));
        self.batch_done = 0;
        self.actions.push_back(Action::Send);
        if !self.watchdog {
            self.watchdog = true;
            self.actions.push_back(Action::Watchdog(self.framing.send_timeout, self.send_gen));
        }
    }

    /// The receiver said 200 to an ended body.
    fn answer_ok(&mut self, close: bool) {
        self.awaiting_response = false;
        if self.fin_sent {
            return self.end(Termination::EndOfStream);
        }
        if close {
            self.drop_conn();
        }
        self.kick();
    }

    fn connect(&mut self) {
        self.generation += 1;
        self.conn = ConnState::Connecting;
        self.response.clear();
        self.actions.push_back(Action::Connect);
    }

    fn drop_conn(&mut self) {
        self.actions.push_back(Action::Close);
        self.conn = ConnState::Closed;
        self.generation += 1;
        self.in_request = false;
        self.awaiting_response = false;
        self.response.clear();
    }

    /// Ends the PUT after `idle_teardown` without objects.
    fn arm_idle(&mut self) {
        if !self.in_request || self.idle_armed {
            return;
        }
        self.idle_armed = true;
        if !self.stats_idle {
            self.stats_idle = true;
            self.actions.push_back(Action::Idle(true));
        }
        self.actions.push_back(Action::IdleTimer(self.framing.idle_teardown));
    }

    /// Ends the request body (idle teardown): the receiver then answers.
    fn end_body(&mut self) {
        let framing = Framing {
            head: None,
            pdu: None,
            compression: None,
            max_header: self.framing.max_header,
            fin: false,
            end_body: true,
            batch_bytes: self.framing.batch_bytes,
            batch_bytes_max: self.framing.batch_bytes_max,
        };
        let (batch, _) = Batch::build(&mut [], &framing);
        self.in_request = false;
        self.awaiting_response = true;
        self.send(batch, true);
    }

    /// Terminates the stream: every object still queued or in flight
    /// completes with the reason, in order.
    fn end(&mut self, how: Termination) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.actions.push_back(Action::Close);
        self.conn = ConnState::Closed;
        let err = match &how {
            Termination::EndOfStream => StreamError::Finished,
            Termination::Stopped => StreamError::Stopped,
            Termination::Error(e) => e.clone(),
        };
        while let Some(mut o) = self.queue.pop_front() {
            let e = o.failed.take().unwrap_or_else(|| err.clone());
            self.complete(o, Err(e));
        }
        self.actions.push_back(Action::Idle(true));
        self.actions.push_back(Action::Terminate(how));
    }

    fn complete(&mut self, o: Outgoing, result: Result<(), StreamError>) {
        if let Payload::Streamed(st) = &o.body {
            let held = st.held();
            if held > 0 {
                self.actions.push_back(Action::ChunkBytes(held));
            }
        }
        self.completed.push_back((o, result));
        self.actions.push_back(Action::Complete);
    }
}

#[cfg(test)]
mod tests;
