//! The receive side's frame decoder: body bytes in, objects out.
//!
//! Input is the request body after de-chunking (and decompression). The
//! decoder buffers only headers (at most [`MAX_HEADER_BYTES`]) and hands
//! object bytes out as slices of its input, so a large body is never
//! copied here. It yields, in order, for each object: its header, its bytes
//! in pieces, its end; and once, the end-of-stream frame.

use super::checksum::{Verdict, Verifier};
use super::error::{SbrCode, SbrError};
use super::frame::{
    BadChecksum, FLAG_MSG, FLAG_PDU, FLAG_PDU_LAST, FLAG_PDU_STREAM, MAX_PDU_PAYLOAD, PROTO_HDR_BYTES, ProtoHdr,
};
use super::header::{MAX_HEADER_BYTES, MIN_HEADER_BYTES, ObjHdr};

/// What one step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// An object begins.
    Header(Box<ObjHdr>),
    /// Some of the current object's bytes.
    Data(&'a [u8]),
    /// The current object ended after `received` bytes; `verdict` says
    /// whether they match its header's checksum.
    End { received: u64, verdict: Verdict },
    /// The end-of-stream frame (the body should end here).
    Fin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting an object's proto header.
    Proto,
    /// Expecting `hlen` header bytes.
    Header { hlen: usize, pdu: bool },
    /// A sized object's bytes, straight after its header.
    Body { left: u64 },
    /// Expecting a PDU header of the current object.
    PduProto,
    /// Inside a PDU's payload.
    Pdu { left: usize, last: bool },
    /// The object is complete; `End` is due.
    EndDue,
    /// After the end-of-stream frame.
    Finished,
    /// After an error: nothing more decodes.
    Broken,
}

/// An [`Event`] whose bytes are given as a range of the step's input, so
/// that callers whose input lives in their own buffer can keep stepping.
#[derive(Debug, PartialEq, Eq)]
pub enum RawEvent {
    Header(Box<ObjHdr>),
    Data { start: usize, len: usize },
    End { received: u64, verdict: Verdict },
    Fin,
}

impl RawEvent {
    /// The event, with its bytes taken from `input` (the step's input).
    pub fn resolve(self, input: &[u8]) -> Event<'_> {
        match self {
            RawEvent::Header(h) => Event::Header(h),
            RawEvent::Data { start, len } => Event::Data(&input[start..start + len]),
            RawEvent::End { received, verdict } => Event::End { received, verdict },
            RawEvent::Fin => Event::Fin,
        }
    }
}

/// The incremental decoder. Feed it with [`Decoder::step`].
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Bytes of a proto header seen so far.
    proto: [u8; PROTO_HDR_BYTES],
    proto_have: usize,
    /// Header bytes seen so far.
    hdr: Vec<u8>,
    max_header: usize,
    /// The current object: declared size (-1 if unsized) and bytes so far.
    declared: i64,
    received: u64,
    /// Objects decoded, for error context.
    objects: u64,
    /// Verify objects' checksums (on unless turned off).
    verify: bool,
    /// The current object's checksum, being computed over its bytes...
    verifier: Option<Verifier>,
    /// ... or the verdict already known (a checksum that cannot be checked).
    verdict: Option<Verdict>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(MAX_HEADER_BYTES)
    }
}

impl Decoder {
    /// A decoder refusing headers above `max_header` bytes (at most 128 KiB).
    pub fn new(max_header: usize) -> Self {
        Decoder {
            state: State::Proto,
            proto: [0; PROTO_HDR_BYTES],
            proto_have: 0,
            hdr: Vec::new(),
            max_header: max_header.clamp(MIN_HEADER_BYTES, MAX_HEADER_BYTES),
            declared: 0,
            received: 0,
            objects: 0,
            verify: true,
            verifier: None,
            verdict: None,
        }
    }

    /// Whether objects' checksums are verified (they are unless this turns
    /// it off): each object's end then carries the [`Verdict`].
    pub fn set_verify(&mut self, on: bool) {
        self.verify = on;
    }

    /// True once the end-of-stream frame was decoded.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// True between objects: the body may end here cleanly (idle teardown).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Proto | State::Finished) && self.proto_have == 0
    }

    /// True while an object is open (between its header and its end).
    pub fn in_object(&self) -> bool {
        matches!(self.state, State::Body { .. } | State::PduProto | State::Pdu { .. } | State::EndDue)
    }

    /// Takes bytes from `input`; returns how many it used and the event, if
    /// one completed. `(n, None)` means the input was used up (`n` is its
    /// length) and more is needed. An error breaks the decoder for good.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Event<'a>>), SbrError> {
        let (n, ev) = self.step_raw(input)?;
        Ok((n, ev.map(|e| e.resolve(input))))
    }

    /// [`step`](Self::step), with the bytes as a range of `input`.
    pub fn step_raw(&mut self, input: &[u8]) -> Result<(usize, Option<RawEvent>), SbrError> {
        let r = self.step_inner(input);
        if r.is_err() {
            self.state = State::Broken;
        }
        r
    }

    /// True when an event is due without more input (an object's end).
    pub fn has_due(&self) -> bool {
        self.state == State::EndDue
    }

    /// Called when the body ended: fine at an object boundary, a typed
    /// error anywhere else.
    pub fn finish(&self) -> Result<(), SbrError> {
        match self.state {
            State::Proto | State::Finished if self.proto_have == 0 => Ok(()),
            State::Proto => {
                Err(self.err(SbrCode::ProtoHdr, format!("body ended {} bytes into a proto header", self.proto_have)))
            }
            State::Header { hlen, .. } => Err(self.err(
                SbrCode::ObjHdrShort,
                format!("body ended {} of {hlen} bytes into an object header", self.hdr.len()),
            )),
            State::Body { left } => {
                Err(self.err(SbrCode::ObjDataEof, format!("body ended {left} bytes before the object's end")))
            }
            State::PduProto => Err(self.err(SbrCode::PduHdrShort, "body ended at a PDU header")),
            State::Pdu { left, .. } => {
                Err(self.err(SbrCode::PduData, format!("body ended {left} bytes before the PDU's end")))
            }
            State::EndDue => Err(self.err(SbrCode::ObjDataEof, "body ended before the object was taken")),
            State::Broken => Err(self.err(SbrCode::ProtoHdr, "the stream broke earlier")),
            State::Finished => Ok(()),
        }
    }

    fn err(&self, code: SbrCode, what: impl Into<String>) -> SbrError {
        SbrError::new(code, format!("object #{}: {}", self.objects, what.into()))
    }

    /// Collects a proto header; `Some` once all 16 bytes are in.
    fn take_proto(&mut self, input: &[u8], used: &mut usize) -> Option<Result<ProtoHdr, BadChecksum>> {
        let n = (PROTO_HDR_BYTES - self.proto_have).min(input.len());
        self.proto[self.proto_have..self.proto_have + n].copy_from_slice(&input[..n]);
        self.proto_have += n;
        *used += n;
        if self.proto_have < PROTO_HDR_BYTES {
            return None;
        }
        self.proto_have = 0;
        Some(ProtoHdr::decode(&self.proto))
    }

    fn step_inner(&mut self, input: &[u8]) -> Result<(usize, Option<RawEvent>), SbrError> {
        let mut used = 0;
        loop {
            match self.state {
                State::Broken => return Err(self.err(SbrCode::ProtoHdr, "the stream broke earlier")),
                State::Finished => {
                    if input.is_empty() {
                        return Ok((0, None));
                    }
                    return Err(self.err(SbrCode::ProtoHdr, "bytes after the end-of-stream frame"));
                }
                State::EndDue => {
                    self.state = State::Proto;
                    self.objects += 1;
                    let verdict = match (self.verdict.take(), self.verifier.take()) {
                        (Some(v), _) => v,
                        (None, Some(v)) => v.finish().map_or_else(|e| Verdict::Failed(Box::new(e)), Verdict::Verified),
                        (None, None) => Verdict::Unchecked,
                    };
                    return Ok((used, Some(RawEvent::End { received: self.received, verdict })));
                }
                State::Proto => {
                    let Some(proto) = self.take_proto(&input[used..], &mut used) else {
                        return Ok((used, None));
                    };
                    let p = proto.map_err(|b| {
                        self.err(SbrCode::HdrChecksum, format!("word1 {:#018x}, check {:#018x}", b.word1, b.check))
                    })?;
                    if p.has(FLAG_MSG) || p.has(FLAG_PDU) || p.has(FLAG_PDU_LAST) {
                        return Err(
                            self.err(SbrCode::ProtoHdr, format!("flags {:#x} where an object header belongs", p.flags))
                        );
                    }
                    if p.len == 0 || p.len < MIN_HEADER_BYTES as u64 {
                        return Err(self.err(SbrCode::ObjHdrInval, format!("hlen={}", p.len)));
                    }
                    if p.len > self.max_header as u64 {
                        return Err(
                            self.err(SbrCode::ProtoHdrLong, format!("hlen={} above {}", p.len, self.max_header))
                        );
                    }
                    self.hdr.clear();
                    self.state = State::Header { hlen: p.len as usize, pdu: p.has(FLAG_PDU_STREAM) };
                }
                State::Header { hlen, pdu } => {
                    let n = (hlen - self.hdr.len()).min(input.len() - used);
                    self.hdr.extend_from_slice(&input[used..used + n]);
                    used += n;
                    if self.hdr.len() < hlen {
                        return Ok((used, None));
                    }
                    let hdr = ObjHdr::decode(&self.hdr)
                        .map_err(|e| self.err(SbrCode::ObjHdrInval, format!("hlen={hlen} err: {e}")))?;
                    if hdr.is_fin() {
                        self.state = State::Finished;
                        return Ok((used, Some(RawEvent::Fin)));
                    }
                    self.declared = hdr.attrs.size;
                    self.received = 0;
                    self.verifier = None;
                    self.verdict = None;
                    if self.verify {
                        match Verifier::for_header(&hdr.attrs.cksum_type, &hdr.attrs.cksum_value) {
                            Ok(v) => self.verifier = v,
                            Err(e) => self.verdict = Some(Verdict::Failed(Box::new(e))),
                        }
                    }
                    self.state = if hdr.is_header_only() {
                        State::EndDue
                    } else if pdu {
                        State::PduProto
                    } else if hdr.is_unsized() {
                        return Err(self.err(SbrCode::ObjHdrInval, "an unsized object outside PDU mode"));
                    } else {
                        State::Body { left: hdr.attrs.size as u64 }
                    };
                    return Ok((used, Some(RawEvent::Header(Box::new(hdr)))));
                }
                State::Body { left } => {
                    let n = (left.min((input.len() - used) as u64)) as usize;
                    if n == 0 {
                        return Ok((used, None));
                    }
                    self.received += n as u64;
                    if let Some(v) = &mut self.verifier {
                        v.update(&input[used..used + n]);
                    }
                    self.state = if left == n as u64 { State::EndDue } else { State::Body { left: left - n as u64 } };
                    return Ok((used + n, Some(RawEvent::Data { start: used, len: n })));
                }
                State::PduProto => {
                    let Some(proto) = self.take_proto(&input[used..], &mut used) else {
                        return Ok((used, None));
                    };
                    let p = proto.map_err(|b| {
                        self.err(SbrCode::HdrChecksum, format!("PDU word1 {:#018x}, check {:#018x}", b.word1, b.check))
                    })?;
                    if !p.has(FLAG_PDU) || p.has(FLAG_MSG) || p.has(FLAG_PDU_STREAM) || p.len > MAX_PDU_PAYLOAD as u64 {
                        return Err(self.err(SbrCode::PduHdrInvalid, format!("flags {:#x}, plen {}", p.flags, p.len)));
                    }
                    let last = p.has(FLAG_PDU_LAST);
                    let total = self.received + p.len;
                    if self.declared >= 0 && (total > self.declared as u64 || (last && total != self.declared as u64)) {
                        return Err(self.err(
                            SbrCode::PduDataSize,
                            format!("PDUs carry {total} bytes of an object of {}", self.declared),
                        ));
                    }
                    self.state = if p.len == 0 {
                        if last { State::EndDue } else { State::PduProto }
                    } else {
                        State::Pdu { left: p.len as usize, last }
                    };
                }
                State::Pdu { left, last } => {
                    let n = left.min(input.len() - used);
                    if n == 0 {
                        return Ok((used, None));
                    }
                    self.received += n as u64;
                    if let Some(v) = &mut self.verifier {
                        v.update(&input[used..used + n]);
                    }
                    self.state = if n < left {
                        State::Pdu { left: left - n, last }
                    } else if last {
                        State::EndDue
                    } else {
                        State::PduProto
                    };
                    return Ok((used + n, Some(RawEvent::Data { start: used, len: n })));
                }
            }
        }
    }
}
