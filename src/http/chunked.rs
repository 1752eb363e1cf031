//! Incremental `Transfer-Encoding: chunked` decoding (RFC 9112 §7.1).
//!
//! [`Decoder::step`] takes whatever bytes have arrived and reports how many
//! it consumed plus what they held: body bytes (a borrowed slice of the
//! input), a need for more input, or the end of the body. Chunk extensions
//! are skipped; trailer fields are read and dropped. Size lines and trailers
//! are bounded, so a peer cannot make the decoder buffer without limit.

use super::HttpError;

/// Longest chunk-size line (size, extensions, CRLF) accepted.
pub const SIZE_LINE_MAX: usize = 1024;
/// Most trailer bytes accepted after the last chunk.
pub const TRAILER_MAX: usize = 8 * 1024;

/// What one [`Decoder::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Body bytes.
    Data(&'a [u8]),
    /// Nothing complete in the input; call again with more bytes appended.
    NeedMore,
    /// The body ended (last chunk and trailers consumed).
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers { seen: usize },
    Done,
}

/// The decoder's state between calls.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Self { state: State::Size }
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Returns the last `n` bytes of the latest `Data` step, unread: the
    /// next step hands them out again (the caller offers them again, at the
    /// start of its input). For consumers that take only part of a slice.
    pub fn give_back(&mut self, n: u64) {
        if n == 0 {
            return;
        }
        self.state = match self.state {
            State::Data(left) => State::Data(left + n),
            State::DataEnd => State::Data(n),
            other => {
                debug_assert!(false, "give_back outside chunk data");
                other
            }
        };
    }

    /// Decodes from the start of `input`. Returns the bytes consumed and the
    /// step; on `NeedMore` the caller keeps the unconsumed bytes and appends.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Step<'a>), HttpError> {
        match self.state {
            State::Done => Ok((0, Step::Done)),
            State::Size => {
                let Some(end) = find_crlf(input, SIZE_LINE_MAX) else {
                    if input.len() >= SIZE_LINE_MAX {
                        return Err(HttpError::Chunk("chunk-size line too long"));
                    }
                    return Ok((0, Step::NeedMore));
                };
                let line = &input[..end];
                let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = parse_hex(trim(digits)).ok_or(HttpError::Chunk("bad chunk size"))?;
                self.state = if size == 0 { State::Trailers { seen: 0 } } else { State::Data(size) };
                let (n, step) = self.step(&input[end + 2..])?;
                Ok((end + 2 + n, step))
            }
            State::Data(left) => {
                if input.is_empty() {
                    return Ok((0, Step::NeedMore));
                }
                let take = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let left = left - take as u64;
                self.state = if left == 0 { State::DataEnd } else { State::Data(left) };
                Ok((take, Step::Data(&input[..take])))
            }
            State::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = State::Size;
                    let (n, step) = self.step(&input[2..])?;
                    Ok((2 + n, step))
                }
                [] | [b'\r'] => Ok((0, Step::NeedMore)),
                _ => Err(HttpError::Chunk("chunk data not followed by CRLF")),
            },
            State::Trailers { mut seen } => {
                let mut used = 0;
                loop {
                    let rest = &input[used..];
                    let Some(end) = find_crlf(rest, TRAILER_MAX - seen) else {
                        if seen + rest.len() >= TRAILER_MAX {
                            return Err(HttpError::Chunk("trailers too long"));
                        }
                        self.state = State::Trailers { seen };
                        return Ok((used, Step::NeedMore));
                    };
                    used += end + 2;
                    if end == 0 {
                        self.state = State::Done;
                        return Ok((used, Step::Done));
                    }
                    if !rest[..end].contains(&b':') {
                        return Err(HttpError::Chunk("malformed trailer field"));
                    }
                    seen += end + 2;
                }
            }
        }
    }
}

/// Decodes a whole chunked body; errors if it is cut short or exceeds `max`.
pub fn decode_all(mut input: &[u8], max: usize) -> Result<Vec<u8>, HttpError> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    loop {
        let (used, step) = decoder.step(input)?;
        input = &input[used..];
        match step {
            Step::Data(d) => {
                if out.len() + d.len() > max {
                    return Err(HttpError::TooLarge(max));
                }
                out.extend_from_slice(d);
            }
            Step::Done => return Ok(out),
            Step::NeedMore => return Err(HttpError::Truncated("chunked body without its last chunk")),
        }
    }
}

fn find_crlf(input: &[u8], limit: usize) -> Option<usize> {
    let window = &input[..input.len().min(limit)];
    window.windows(2).position(|w| w == b"\r\n")
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &s[start..end]
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| Some(acc * 16 + u64::from((b as char).to_digit(16)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = b"4\r\nWiki\r\n7;ext=1\r\npedia i\r\nB\r\nn \r\nchunks.\r\n0\r\nX-Sum: 1\r\n\r\n";

    #[test]
    fn decodes_whole() {
        assert_eq!(decode_all(BODY, 1024).unwrap(), b"Wikipedia in \r\nchunks.");
    }

    #[test]
    fn decodes_byte_by_byte() {
        // Feed one more byte at a time, keeping what was not consumed.
        let mut decoder = Decoder::new();
        let (mut pending, mut out) = (Vec::new(), Vec::new());
        for &b in BODY {
            pending.push(b);
            loop {
                let (used, step) = decoder.step(&pending).unwrap();
                let done = match step {
                    Step::Data(d) => {
                        out.extend_from_slice(d);
                        false
                    }
                    Step::NeedMore => true,
                    Step::Done => true,
                };
                pending.drain(..used);
                if done {
                    break;
                }
            }
        }
        assert!(decoder.is_done());
        assert!(pending.is_empty());
        assert_eq!(out, b"Wikipedia in \r\nchunks.");
    }

    #[test]
    fn rejects_bad_input() {
        for (bad, why) in [
            (&b"zz\r\n"[..], "bad chunk size"),
            (b"\r\n", "bad chunk size"),
            (b"3\r\nabcX", "chunk data not followed by CRLF"),
            (b"0\r\nno colon\r\n\r\n", "malformed trailer field"),
            (b"10000000000000000\r\n", "bad chunk size"),
        ] {
            assert_eq!(decode_all(bad, 1024).unwrap_err(), HttpError::Chunk(why), "{bad:?}");
        }
        assert!(matches!(decode_all(b"3\r\nab", 1024), Err(HttpError::Truncated(_))));
        assert_eq!(decode_all(b"5\r\nhello\r\n0\r\n\r\n", 4).unwrap_err(), HttpError::TooLarge(4));
        let long = vec![b'1'; SIZE_LINE_MAX];
        assert_eq!(Decoder::new().step(&long).unwrap_err(), HttpError::Chunk("chunk-size line too long"));
        let mut trailers = b"0\r\n".to_vec();
        trailers.extend(std::iter::repeat_n(b"A: b\r\n", TRAILER_MAX / 6 + 1).flatten());
        assert_eq!(decode_all(&trailers, 1024).unwrap_err(), HttpError::Chunk("trailers too long"));
    }
}
