//! Frames read from a stream, for the soft NIC's threads: bytes gathered
//! until a [`wire`](super::wire) decoder sees a whole frame.

use std::io::{self, Read};

use super::wire::Decode;

/// Frames read from a stream: bytes gathered until a decoder sees a whole
/// frame. The buffer starts small and grows as frames need, to at most
/// twice the largest frame (so a frame is moved at most once), and goes
/// back to its starting size when its owner finds the connection idle
/// ([`FrameReader::shrink`]), so an idle connection costs little.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// What the buffer may grow to.
    cap: usize,
    /// Bytes read so far (to tell a quiet connection from a slow one).
    received_bytes: u64,
}

/// The buffer a reader starts with.
const START_BYTES: usize = 64 << 10;

impl FrameReader {
    /// A reader of frames of at most `frame_max` bytes.
    pub fn new(frame_max: usize) -> FrameReader {
        let cap = 2 * frame_max;
        FrameReader { buf: vec![0; START_BYTES.min(cap)], start: 0, end: 0, cap, received_bytes: 0 }
    }

    /// Bytes read from the stream so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// Gives back what a large frame made the buffer grow to, if nothing
    /// is buffered (a frame half in stays where it is).
    pub fn shrink(&mut self) {
        let start = START_BYTES.min(self.cap);
        if self.start == self.end && self.buf.len() > start {
            (self.start, self.end) = (0, 0);
            self.buf.truncate(start);
            self.buf.shrink_to_fit();
        }
    }

    /// The next frame and its length (its bytes are [`Self::frame`] until
    /// [`Self::consume`]d). Reads at most once: `None` if that read timed
    /// out or did not complete a frame, so that a caller waiting on a
    /// peer that trickles bytes still looks at its clock. Bytes that are
    /// no frame are an `InvalidData` error.
    pub fn next<T>(&mut self, src: &mut impl Read, decode: Decode<T>) -> io::Result<Option<(T, usize)>> {
        if let Some(found) = self.decoded(decode)? {
            return Ok(Some(found));
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else if self.buf.len() < self.cap {
                self.buf.resize((2 * self.buf.len()).min(self.cap), 0);
            } else {
                // A decoder bounds its frames to half the buffer: a full
                // buffer would hold a whole one.
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a frame larger than its decoder allows"));
            }
        }
        match src.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")),
            Ok(n) => {
                self.end += n;
                self.received_bytes += n as u64;
                self.decoded(decode)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The whole frame buffered, if there is one.
    fn decoded<T>(&self, decode: Decode<T>) -> io::Result<Option<(T, usize)>> {
        let found = decode(&self.buf[self.start..self.end])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if let Some((_, len)) = &found {
            assert!(2 * len <= self.cap, "a decoder bounds its frames");
        }
        Ok(found)
    }

    /// The bytes of the frame [`Self::next`] returned.
    pub fn frame(&self, len: usize) -> &[u8] {
        &self.buf[self.start..self.start + len]
    }

    pub fn consume(&mut self, len: usize) {
        self.start += len;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Whether a whole frame is buffered already.
    pub fn has<T>(&self, decode: Decode<T>) -> bool {
        matches!(decode(&self.buf[self.start..self.end]), Ok(Some(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{PAYLOAD_BYTES_MAX, RESPONSE_BYTES, Response, Status};
    use super::*;

    /// A reader that hands out its bytes a few at a time.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "no more now"));
            }
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_frame_reader_takes_frames_however_the_bytes_come() {
        let mut stream = Vec::new();
        for (i, len) in [0u32, 5, 70_000, 1].into_iter().enumerate() {
            stream.extend_from_slice(&Response { status: Status::Ok, data_len: len, tag: i as u64 }.encode());
            stream.extend((0..len).map(|b| (b as u8) ^ i as u8));
        }
        for step in [1, 7, 16, 4096, 1 << 20] {
            let mut src = Trickle(&stream, step);
            let mut input = FrameReader::new(RESPONSE_BYTES + PAYLOAD_BYTES_MAX as usize);
            let mut tags = Vec::new();
            // Each call reads at most once: as many calls as reads, and more.
            for _ in 0..stream.len() / step + 8 {
                let Some((r, n)) = input.next(&mut src, Response::decode).unwrap() else { continue };
                let data = &input.frame(n)[RESPONSE_BYTES..];
                assert!(data.iter().enumerate().all(|(b, &x)| x == (b as u8) ^ r.tag as u8), "step {step}");
                tags.push(r.tag);
                input.consume(n);
            }
            assert_eq!(tags, [0, 1, 2, 3], "step {step}");
            assert_eq!(input.received_bytes(), stream.len() as u64);
            // The 70 000-byte frame made it grow; idle, it goes back.
            assert!(input.buf.len() > START_BYTES);
            input.shrink();
            assert_eq!((input.buf.len(), input.buf.capacity()), (START_BYTES, START_BYTES), "step {step}");
        }
        // A frame half in is kept through a shrink: all but the last byte
        // of the large frame, then the byte.
        let cut = 2 * RESPONSE_BYTES + 5 + RESPONSE_BYTES + 70_000 - 1;
        let mut input = FrameReader::new(RESPONSE_BYTES + PAYLOAD_BYTES_MAX as usize);
        let mut src = Trickle(&stream[..cut], 4096);
        let mut tags = Vec::new();
        for _ in 0..cut / 4096 + 8 {
            if let Some((r, n)) = input.next(&mut src, Response::decode).unwrap() {
                tags.push(r.tag);
                input.consume(n);
            }
        }
        assert_eq!(tags, [0, 1]);
        input.shrink();
        assert!(input.buf.len() > START_BYTES, "the frame half in is kept");
        let mut rest = Trickle(&stream[cut..], 4096);
        let (r, n) = input.next(&mut rest, Response::decode).unwrap().expect("the large frame, whole");
        assert_eq!((r.tag, n), (2, RESPONSE_BYTES + 70_000));
        assert!(input.frame(n)[RESPONSE_BYTES..].iter().enumerate().all(|(b, &x)| x == (b as u8) ^ 2));
        let mut bad = Response { status: Status::Ok, data_len: 0, tag: 0 }.encode();
        bad[0] = 7;
        let mut input = FrameReader::new(64);
        let mut src = Trickle(&bad, 3);
        // Three bytes a read: not yet, not yet, then the whole bad header.
        for _ in 0..(RESPONSE_BYTES - 1) / 3 {
            assert!(matches!(input.next(&mut src, Response::decode), Ok(None)));
        }
        let e = input.next(&mut src, Response::decode).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = input.next(&mut &b""[..], Response::decode).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "the bad bytes stay bad");
    }
}
