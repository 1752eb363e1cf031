//! Frames read from a stream, for the soft NIC's threads: bytes gathered
//! until a [`wire`](super::wire) decoder sees a whole frame.

use std::io::{self, Read};

use super::wire::Decode;

/// Frames read from a stream: bytes gathered until a decoder sees a whole
/// frame, in a buffer of twice the largest frame (so a frame is never
/// moved more than once).
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    frame_max: usize,
}

impl FrameReader {
    pub fn new(frame_max: usize) -> FrameReader {
        FrameReader { buf: vec![0; 2 * frame_max], start: 0, end: 0, frame_max }
    }

    /// The next frame and its length (its bytes are [`Self::frame`] until
    /// [`Self::consume`]d), reading as needed; `None` if a read timed out
    /// first. Bytes that are no frame are an `InvalidData` error.
    pub fn next<T>(&mut self, src: &mut impl Read, decode: Decode<T>) -> io::Result<Option<(T, usize)>> {
        loop {
            let found = decode(&self.buf[self.start..self.end])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if let Some((frame, len)) = found {
                assert!(len <= self.frame_max, "a decoder bounds its frames");
                return Ok(Some((frame, len)));
            }
            if self.buf.len() - self.start < self.frame_max {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match src.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
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
            while let Some((r, n)) = input.next(&mut src, Response::decode).unwrap() {
                let data = &input.frame(n)[RESPONSE_BYTES..];
                assert!(data.iter().enumerate().all(|(b, &x)| x == (b as u8) ^ r.tag as u8), "step {step}");
                tags.push(r.tag);
                input.consume(n);
            }
            assert_eq!(tags, [0, 1, 2, 3], "step {step}");
        }
        let mut bad = Response { status: Status::Ok, data_len: 0, tag: 0 }.encode();
        bad[0] = 7;
        let mut input = FrameReader::new(64);
        let e = input.next(&mut Trickle(&bad, 3), Response::decode).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = input.next(&mut &b""[..], Response::decode).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "the bad bytes stay bad");
    }
}
