//! A whole request body, as the receiver sees it: HTTP framing (chunked or
//! a known length), then optional LZ4, then the object frames.
//!
//! Sans-IO: [`BodyDecoder::step`] takes the bytes read from the socket and
//! returns how many it used and what they completed. Object bytes come out
//! as slices of the input (or of the LZ4 output): no copy on the plain path.

use super::decoder::{Decoder, Event, RawEvent};
use super::error::{SbrCode, SbrError};
use super::lz4;
use crate::http::chunked::{self, Step};

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Chunked,
    Length(u64),
}

#[derive(Debug)]
enum FramingState {
    Chunked(chunked::Decoder),
    Length { left: u64 },
}

/// What a step completed.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyEvent<'a> {
    /// An object event (header, bytes, end, or the end-of-stream frame).
    Obj(Event<'a>),
    /// The input was used up; call again with more.
    NeedMore,
    /// The body ended cleanly.
    End,
}

/// Decodes one request body.
#[derive(Debug)]
pub struct BodyDecoder {
    framing: FramingState,
    lz4: Option<lz4::Decoder>,
    objs: Decoder,
    ended: bool,
}

impl BodyDecoder {
    /// `compressed` is true for `Ais-Compress: lz4`; `max_header` bounds
    /// object headers.
    pub fn new(framing: Framing, compressed: bool, max_header: usize) -> Self {
        BodyDecoder {
            framing: match framing {
                Framing::Chunked => FramingState::Chunked(chunked::Decoder::new()),
                Framing::Length(n) => FramingState::Length { left: n },
            },
            lz4: compressed.then(lz4::Decoder::new),
            objs: Decoder::new(max_header),
            ended: false,
        }
    }

    /// Whether objects' checksums are verified (on by default).
    pub fn set_verify(&mut self, on: bool) {
        self.objs.set_verify(on);
    }

    /// True once the body's end was decoded.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// True while an object is open.
    pub fn in_object(&self) -> bool {
        self.objs.in_object()
    }

    /// Decodes from the start of `input`; returns the bytes used and the
    /// event. After [`BodyEvent::End`], the rest of the input belongs to
    /// the next request on the connection.
    pub fn step<'a>(&'a mut self, input: &'a [u8]) -> Result<(usize, BodyEvent<'a>), SbrError> {
        if self.ended {
            return Ok((0, BodyEvent::End));
        }
        let mut used = 0;
        loop {
            // An object's end that needs no more bytes comes first.
            if self.objs.has_due() {
                let (_, ev) = self.objs.step(&[])?;
                let ev = ev.expect("a due event");
                return Ok((used, BodyEvent::Obj(ev)));
            }
            // Then decompressed bytes already there.
            if let Some(z) = self.lz4.as_mut()
                && !z.output().is_empty()
            {
                let (n, raw) = self.objs.step_raw(z.output())?;
                let base = z.output_base();
                z.consume(n);
                match raw {
                    Some(raw) => {
                        let z = self.lz4.as_ref().expect("checked");
                        let ev = match raw {
                            RawEvent::Data { start, len } => Event::Data(z.block_bytes(base, start, len)),
                            other => other.resolve(&[]),
                        };
                        return Ok((used, BodyEvent::Obj(ev)));
                    }
                    None => continue,
                }
            }
            let (u, data) = self.framed(&input[used..])?;
            let Some(data) = data else {
                used += u;
                return match self.body_done() {
                    Some(done) => done.map(|()| (used, BodyEvent::End)),
                    None => Ok((used, BodyEvent::NeedMore)),
                };
            };
            let data_start = used + u - data.len();
            match self.lz4.as_mut() {
                Some(z) => {
                    let m = z.feed(data).map_err(|e| SbrError::new(SbrCode::Lz4, e.to_string()))?;
                    let back = data.len() - m;
                    self.give_back_framing(back as u64);
                    used += u - back;
                }
                None => {
                    let (n, raw) = self.objs.step_raw(data)?;
                    let back = data.len() - n;
                    self.give_back_framing(back as u64);
                    used += u - back;
                    if let Some(raw) = raw {
                        return Ok((used, BodyEvent::Obj(raw.resolve(&input[data_start..]))));
                    }
                }
            }
        }
    }

    fn give_back_framing(&mut self, n: u64) {
        match &mut self.framing {
            FramingState::Chunked(d) => d.give_back(n),
            FramingState::Length { left } => *left += n,
        }
    }

    /// The next framed body bytes: `(used, Some(data))`, or `(used, None)`
    /// when more input is needed or the body is done.
    fn framed<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<&'a [u8]>), SbrError> {
        match &mut self.framing {
            FramingState::Chunked(d) => {
                let (u, step) = d.step(input).map_err(|e| SbrError::new(SbrCode::Body, e.to_string()))?;
                match step {
                    Step::Data(data) => Ok((u, Some(data))),
                    Step::NeedMore | Step::Done => Ok((u, None)),
                }
            }
            FramingState::Length { left } => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                Ok((n, (n > 0).then(|| &input[..n])))
            }
        }
    }

    /// `Some` when the framing says the body is over: clean, or an error if
    /// it ended inside a frame.
    fn body_done(&mut self) -> Option<Result<(), SbrError>> {
        let done = match &self.framing {
            FramingState::Chunked(d) => d.is_done(),
            FramingState::Length { left } => *left == 0,
        };
        if !done {
            return None;
        }
        self.ended = true;
        if let Some(z) = &self.lz4
            && let Err(e) = z.finish()
        {
            return Some(Err(SbrError::new(SbrCode::Lz4, e.to_string())));
        }
        Some(self.objs.finish())
    }
}
