//! A receiver connection as a state machine: events in, actions out, no
//! I/O.
//!
//! [`RxConn`] holds the rules of one accepted connection between bodies:
//! it reads request heads (through [`crate::http::request`]), checks them
//! (a PUT under `/v1/objstream/`, a handled trname, a session id, a known
//! compression), answers what it refuses with a 4xx and a JSON error as
//! AIStore does, queues `100 Continue`, the 200 after a body, or the 400
//! that ends a broken one, and decides when the connection ends: after an
//! error answer it half-closes and drains ([`Linger`]) before closing.
//! Bodies themselves are decoded by the connection's decoding thread; the
//! driver (`shard.rs`) moves bytes between the socket, the pipe and this
//! core.

use std::collections::VecDeque;
use std::time::Instant;

use super::RecvError;
use crate::http::request::{self, BodyFraming};
use crate::proto::linger::{Linger, LingerLimits};
use crate::proto::objstream::Framing;

/// The URL path prefix of object streams (AIStore's `/v1/objstream/`).
pub const PATH_PREFIX: &str = "/v1/objstream/";
/// Responses queued at most (a 100, a 200 or an error, and a spare).
const RESPONSES_MAX: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head.
    Head,
    /// The body belongs to the decoding thread.
    Body,
    /// Answering an error: no more requests.
    Refused,
}

/// A body to hand to the decoding thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyStart {
    pub trname: String,
    pub caller: String,
    pub session_id: i64,
    pub compressed: bool,
    pub framing: Framing,
}

/// One connection's protocol state. See the module documentation.
pub struct RxConn {
    phase: Phase,
    keep_alive: bool,
    out: VecDeque<Vec<u8>>,
    /// Bytes of the front response already sent.
    out_sent: usize,
    close_after_send: bool,
    linger_limits: LingerLimits,
    linger: Option<Linger>,
    /// Why the connection ends now, once it does.
    closed: Option<String>,
}

impl RxConn {
    pub fn new(linger_limits: LingerLimits) -> Self {
        Self {
            phase: Phase::Head,
            keep_alive: true,
            out: VecDeque::new(),
            out_sent: 0,
            close_after_send: false,
            linger_limits,
            linger: None,
            closed: None,
        }
    }

    /// Whether request heads are read now (between bodies).
    pub fn reading_heads(&self) -> bool {
        self.phase == Phase::Head && self.linger.is_none() && self.closed.is_none()
    }

    /// Whether the connection's bytes are being drained (and dropped).
    pub fn lingering(&self) -> bool {
        self.linger.is_some() && self.closed.is_none()
    }

    /// Refuses the connection at once (too many): 503, then the close.
    pub fn refuse(&mut self, status: u16, message: &str, kind: &str) {
        self.respond(status, &error_json(status, message, kind), false);
    }

    /// Takes a request head from `buf`, if it is complete. `lookup` finds
    /// the handler of a trname. Returns the body to hand over, its handler,
    /// and the bytes of the head; `None` if the head is not complete or
    /// was refused (an answer is then queued).
    pub fn on_head<H>(
        &mut self,
        buf: &[u8],
        lookup: impl FnOnce(&str) -> Result<H, String>,
    ) -> Option<(BodyStart, H, usize)> {
        if !self.reading_heads() {
            return None;
        }
        let (head, len) = match request::parse_head(buf) {
            Ok(None) => return None,
            Err(e) => {
                self.respond(e.status, &error_json(e.status, &e.message, "ErrHTTP"), false);
                return None;
            }
            Ok(Some(parsed)) => parsed,
        };
        let mut refuse = |status: u16, msg: String| {
            self.respond(status, &error_json(status, &msg, "ErrHTTP"), false);
            None
        };
        if head.method != "PUT" {
            return refuse(405, format!("{} {}: object streams are PUT", head.method, head.path));
        }
        let Some(trname) = head.path.strip_prefix(PATH_PREFIX).map(|t| t.split('?').next().unwrap_or(t)) else {
            return refuse(404, format!("{}: not under {PATH_PREFIX}", head.path));
        };
        let trname = trname.trim_end_matches('/').to_string();
        let handler = match lookup(&trname) {
            Ok(h) => h,
            Err(msg) => return refuse(400, msg),
        };
        let session_id = match head.field("ais-session-id") {
            None => 0,
            Some(v) => match v.parse::<i64>() {
                Ok(id) => id,
                Err(_) => return refuse(400, format!("bad Ais-Session-Id {v:?}")),
            },
        };
        let compressed = match head.field("ais-compress") {
            None | Some("") => false,
            Some(v) if v.eq_ignore_ascii_case("lz4") => true,
            Some(v) => return refuse(400, format!("unsupported Ais-Compress {v:?}")),
        };
        let framing = match head.framing {
            BodyFraming::Chunked => Framing::Chunked,
            BodyFraming::Length(n) => Framing::Length(n),
            BodyFraming::None => Framing::Length(0),
        };
        let caller = head.field("ais-caller-id").unwrap_or_default().to_string();
        self.phase = Phase::Body;
        self.keep_alive = head.keep_alive;
        if head.expect_continue {
            self.queue(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
        }
        Some((BodyStart { trname, caller, session_id, compressed, framing }, handler, len))
    }

    /// The decoding thread could not be started: 503, then the close.
    pub fn on_no_decoder(&mut self, why: &str) {
        self.respond(503, &error_json(503, &format!("no decoding thread: {why}"), "ErrBusy"), false);
    }

    /// The decoding thread finished a body; `ended` if the connection's
    /// bytes have ended too. A good body gets 200 and, on a keep-alive
    /// connection, the next head is read; a broken one gets 400 naming
    /// the session and what went wrong (AIStore's `ErrSBR`, or the
    /// handler's error).
    pub fn on_body_done(&mut self, result: Result<(), RecvError>, ended: bool, who: &str) {
        if self.phase != Phase::Body {
            return;
        }
        match result {
            Ok(()) => {
                let keep = self.keep_alive && !ended;
                self.respond(200, "", keep);
                if keep {
                    self.phase = Phase::Head;
                }
            }
            Err(e) => {
                let msg = format!("{who} {e}");
                log::warn!("stream receiver: {msg}");
                let kind = if matches!(e, RecvError::Handler(_)) { "ErrHandler" } else { "ErrSBR" };
                self.respond(400, &error_json(400, &msg, kind), false);
            }
        }
    }

    /// What to send next: the unsent part of the front response.
    pub fn poll_send(&self) -> Option<&[u8]> {
        self.out.front().map(|r| &r[self.out_sent..])
    }

    /// `n` more bytes went out.
    pub fn on_sent(&mut self, n: usize, now: Instant) {
        let Some(front) = self.out.front() else {
            debug_assert!(false, "on_sent without a response");
            return;
        };
        assert!(self.out_sent + n <= front.len(), "sent past the response");
        self.out_sent += n;
        if self.out_sent == front.len() {
            self.out.pop_front();
            self.out_sent = 0;
        }
        if self.out.is_empty() && self.close_after_send && self.linger.is_none() {
            // The answer is out: half-close and drain, so the client reads
            // it rather than a reset.
            self.linger = Some(Linger::new(self.linger_limits, now));
        }
    }

    /// Once, when the drain starts: the driver shuts the write side.
    pub fn poll_half_close(&mut self) -> bool {
        self.linger.as_mut().is_some_and(Linger::poll_half_close)
    }

    /// `n` drained bytes were dropped (0: the client closed).
    pub fn on_drained(&mut self, n: usize) {
        if let Some(l) = &mut self.linger {
            l.on_drained(n);
            if let Some(why) = l.done() {
                self.close(why);
            }
        }
    }

    /// When [`on_timer`](Self::on_timer) is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.linger.as_ref().map(Linger::deadline)
    }

    pub fn on_timer(&mut self, now: Instant) {
        if let Some(l) = &mut self.linger {
            l.on_timer(now);
            if let Some(why) = l.done() {
                self.close(why);
            }
        }
    }

    /// Ends the connection now.
    pub fn close(&mut self, why: &str) {
        self.closed.get_or_insert_with(|| why.to_string());
    }

    /// Why the connection ends, once it does: the driver closes it.
    pub fn closed(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Queues a response; unless `keep`, the connection ends once it is
    /// sent (after the drain).
    fn respond(&mut self, status: u16, body: &str, keep: bool) {
        if !keep {
            self.phase = Phase::Refused;
            self.close_after_send = true;
        }
        self.queue(request::response(status, body, keep));
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        if self.out.len() >= RESPONSES_MAX {
            // Only a bug queues this many; end rather than grow.
            return self.close("too many responses queued");
        }
        self.out.push_back(bytes);
    }
}

/// AIStore's JSON error body.
pub fn error_json(status: u16, message: &str, type_code: &str) -> String {
    serde_json::json!({ "message": message, "status": status, "type_code": type_code }).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const HEAD: &[u8] = b"PUT /v1/objstream/t HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nAis-Session-Id: 101\r\nAis-Caller-Id: c\r\n\r\n";

    fn known(name: &str) -> Result<u32, String> {
        if name == "t" { Ok(7) } else { Err(format!("unknown trname {name:?}")) }
    }

    fn sent_all(c: &mut RxConn) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = c.poll_send().map(<[u8]>::to_vec) {
            out.extend_from_slice(&b);
            c.on_sent(b.len(), Instant::now());
        }
        out
    }

    #[test]
    fn a_head_split_at_every_byte_boundary_starts_the_same_body() {
        for cut in 0..HEAD.len() {
            let mut c = RxConn::new(LingerLimits::default());
            assert!(c.on_head(&HEAD[..cut], known).is_none(), "cut {cut}: not complete yet");
            assert!(c.poll_send().is_none());
            let (body, handler, used) = c.on_head(HEAD, known).expect("complete");
            assert_eq!((handler, used), (7, HEAD.len()));
            assert_eq!(body.trname, "t");
            assert_eq!((body.session_id, body.caller.as_str(), body.framing), (101, "c", Framing::Chunked));
            assert!(!c.reading_heads(), "the body is the decoder's now");
        }
    }

    #[test]
    fn refusals_answer_4xx_then_drain_then_close() {
        let cases: [(&[u8], u16, &str); 6] = [
            (b"GET /v1/objstream/t HTTP/1.1\r\n\r\n", 405, "are PUT"),
            (b"PUT /elsewhere HTTP/1.1\r\n\r\n", 404, "not under"),
            (b"PUT /v1/objstream/nope HTTP/1.1\r\n\r\n", 400, "unknown trname"),
            (b"PUT /v1/objstream/t HTTP/1.1\r\nAis-Session-Id: x\r\n\r\n", 400, "Ais-Session-Id"),
            (b"PUT /v1/objstream/t HTTP/1.1\r\nAis-Compress: zstd\r\n\r\n", 400, "Ais-Compress"),
            (b"PUT /\x01 HTTP/1.1\r\n\r\n", 400, "HTTP"),
        ];
        for (raw, status, says) in cases {
            let mut c = RxConn::new(LingerLimits { bytes_max: 100, time: Duration::from_secs(1) });
            assert!(c.on_head(raw, known).is_none());
            let answer = String::from_utf8(sent_all(&mut c)).unwrap();
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{answer}");
            assert!(answer.contains(says) && answer.contains("Connection: close"), "{answer}");
            assert!(c.poll_half_close(), "the write side shuts once the answer is out");
            assert!(c.lingering() && c.closed().is_none());
            c.on_drained(60);
            assert!(c.closed().is_none());
            c.on_drained(60);
            assert_eq!(c.closed(), Some("drained enough"));
        }
    }

    #[test]
    fn bodies_end_with_200_keep_alive_or_400_close() {
        let mut c = RxConn::new(LingerLimits::default());
        let expect = b"PUT /v1/objstream/t HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
        let (body, _, _) = c.on_head(expect, known).unwrap();
        assert_eq!(body.framing, Framing::Length(5));
        assert_eq!(sent_all(&mut c), b"HTTP/1.1 100 Continue\r\n\r\n");
        c.on_body_done(Ok(()), false, "t[c]");
        assert!(String::from_utf8(sent_all(&mut c)).unwrap().starts_with("HTTP/1.1 200 OK"));
        assert!(c.reading_heads(), "keep-alive: the next head");
        c.on_head(HEAD, known).unwrap();
        c.on_body_done(Err(RecvError::Handler("disk full".into())), false, "t[c]");
        let answer = String::from_utf8(sent_all(&mut c)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("ErrHandler") && answer.contains("disk full"));
        assert!(c.lingering());
        c.on_timer(Instant::now() + Duration::from_secs(2));
        assert_eq!(c.closed(), Some("the drain timed out"));
        // A body whose connection ended: 200 without keep-alive.
        let mut c = RxConn::new(LingerLimits::default());
        c.on_head(HEAD, known).unwrap();
        c.on_body_done(Ok(()), true, "t[c]");
        assert!(String::from_utf8(sent_all(&mut c)).unwrap().contains("Connection: close"));
    }
}
