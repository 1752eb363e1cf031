//! The soft NICs' wire: what one `emu` device sends another over a socket.
//! Pure codecs, no I/O; bad bytes are an error, never a panic.
//!
//! A connection carries one way of traffic: the requester (the device
//! whose queue pair posted the work) opens it with a [`Hello`] that says
//! which device it is, then sends [`Request`]s; the responder (the device
//! that owns the memory) answers each with a [`Response`], in order. A
//! work request larger than [`PAYLOAD_BYTES_MAX`] goes as several parts,
//! each a request of its own that names the whole work request's range
//! (which the responder checks, as a device checks the whole range a
//! message's first packet names) and the part's place in it.
//!
//! All integers are little-endian. Layouts:
//!
//! ```text
//! Hello (32 bytes)     0 magic "SWEM"  4 version u16  6 zero u16
//!                      8 gid [16]     24 lid u16     26 zero [6]
//! Request (56 bytes)   0 verb u8 (1 write, 2 read, 3 write with immediate)
//!                      1 zero u8       2 path MTU u16  4 destination QP u32
//!                      8 source QP u32 12 rkey u32    16 tag u64
//!                     24 remote address u64 (the whole work request's)
//!                     32 work request bytes u64       40 part offset u64
//!                     48 part bytes u32               52 immediate u32
//!                     then, for a write, the part's bytes
//! Response (16 bytes)  0 status u8     1 zero [3]      4 data bytes u32
//!                      8 tag u64
//!                     then, for a read that succeeded, the part's bytes
//! ```

use super::super::fabric::{QpNum, Verb};
use super::super::rules::WR_BYTES_MAX;
use crate::proto::mooncake::rdma::Gid;

/// What a connection opens with.
pub const MAGIC: [u8; 4] = *b"SWEM";
/// The wire's version; a peer of another one is refused.
pub const VERSION: u16 = 1;
pub const HELLO_BYTES: usize = 32;
pub const REQUEST_BYTES: usize = 56;
pub const RESPONSE_BYTES: usize = 16;
/// The most bytes one part (one request or response) carries: the bound
/// of every buffer a soft NIC keeps per connection.
pub const PAYLOAD_BYTES_MAX: u32 = 1 << 20;
/// The largest frame, header and payload.
pub const FRAME_BYTES_MAX: usize = REQUEST_BYTES + PAYLOAD_BYTES_MAX as usize;

/// A decoder of one kind of frame: the frame and its whole length, `None`
/// until it is all there.
pub type Decode<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not an emu connection (magic {0:02x?})")]
    Magic([u8; 4]),
    #[error("wire version {0}, expected {VERSION}")]
    Version(u16),
    #[error("byte {0} must be zero")]
    Reserved(usize),
    #[error("unknown verb {0}")]
    Verb(u8),
    #[error("unknown status {0}")]
    Status(u8),
    #[error("{what}: {value}")]
    Field { what: &'static str, value: u64 },
}

/// The requester's device, first on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub gid: Gid,
    pub lid: u16,
}

/// One part of a work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub verb: Verb,
    /// The requester's path MTU: a responder whose port takes less drops
    /// it, as a switch drops a packet too large.
    pub path_mtu: u16,
    pub dst_qp: QpNum,
    pub src_qp: QpNum,
    pub rkey: u32,
    /// The requester's token, echoed in the response.
    pub tag: u64,
    /// The whole work request's remote range.
    pub remote_addr: u64,
    pub wr_len: u64,
    /// This part's place in it.
    pub offset: u64,
    pub part_len: u32,
}

/// How the responder took a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The region refused it: key, bounds or access (`REM_ACCESS_ERR`).
    RemoteAccess,
    /// No queue pair took it: none by that number, not in RTR or RTS, not
    /// connected to the sender, or a path MTU the port does not take. A
    /// device drops such packets and the requester's retries run out
    /// (`RETRY_EXC_ERR`).
    NotConnected,
}

/// The answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    /// Bytes that follow (a read's data; 0 otherwise).
    pub data_len: u32,
    pub tag: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

fn zero(b: &[u8], range: std::ops::Range<usize>) -> Result<(), WireError> {
    match b[range.clone()].iter().position(|&x| x != 0) {
        Some(i) => Err(WireError::Reserved(range.start + i)),
        None => Ok(()),
    }
}

fn field(what: &'static str, value: u64) -> WireError {
    WireError::Field { what, value }
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..24].copy_from_slice(&self.gid.0);
        b[24..26].copy_from_slice(&self.lid.to_le_bytes());
        b
    }

    /// The hello at the start of `buf`, with its length; `None` until it
    /// is all there.
    pub fn decode(buf: &[u8]) -> Result<Option<(Hello, usize)>, WireError> {
        let Some(b) = buf.first_chunk::<HELLO_BYTES>() else { return Ok(None) };
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let version = u16_at(b, 4);
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        zero(b, 6..8)?;
        zero(b, 26..32)?;
        let gid = Gid(b[8..24].try_into().expect("sixteen bytes"));
        Ok(Some((Hello { gid, lid: u16_at(b, 24) }, HELLO_BYTES)))
    }
}

/// Whether `mtu` is a path MTU verbs knows.
fn is_mtu(mtu: u16) -> bool {
    matches!(mtu, 256 | 512 | 1024 | 2048 | 4096)
}

impl Request {
    /// Whether the part's bytes follow the header.
    pub fn carries_data(&self) -> bool {
        matches!(self.verb, Verb::Write | Verb::WriteImm(_))
    }

    /// The header; a write's part bytes follow it.
    pub fn encode(&self) -> [u8; REQUEST_BYTES] {
        let (verb, imm) = match self.verb {
            Verb::Write => (1u8, 0u32),
            Verb::Read => (2, 0),
            Verb::WriteImm(imm) => (3, imm),
        };
        let mut b = [0u8; REQUEST_BYTES];
        b[0] = verb;
        b[2..4].copy_from_slice(&self.path_mtu.to_le_bytes());
        b[4..8].copy_from_slice(&self.dst_qp.0.to_le_bytes());
        b[8..12].copy_from_slice(&self.src_qp.0.to_le_bytes());
        b[12..16].copy_from_slice(&self.rkey.to_le_bytes());
        b[16..24].copy_from_slice(&self.tag.to_le_bytes());
        b[24..32].copy_from_slice(&self.remote_addr.to_le_bytes());
        b[32..40].copy_from_slice(&self.wr_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.part_len.to_le_bytes());
        b[52..56].copy_from_slice(&imm.to_le_bytes());
        b
    }

    /// The request at the start of `buf` and the length of its frame
    /// (header and a write's bytes, which are `buf[REQUEST_BYTES..len]`);
    /// `None` until the frame is all there. The header is judged as soon
    /// as it is complete.
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, WireError> {
        let Some(b) = buf.first_chunk::<REQUEST_BYTES>() else { return Ok(None) };
        let imm = u32_at(b, 52);
        let verb = match b[0] {
            1 => Verb::Write,
            2 => Verb::Read,
            3 => Verb::WriteImm(imm),
            v => return Err(WireError::Verb(v)),
        };
        if !matches!(verb, Verb::WriteImm(_)) && imm != 0 {
            return Err(WireError::Reserved(52));
        }
        zero(b, 1..2)?;
        let path_mtu = u16_at(b, 2);
        if !is_mtu(path_mtu) {
            return Err(field("path MTU", path_mtu.into()));
        }
        let (dst, src) = (u32_at(b, 4), u32_at(b, 8));
        for (what, qp) in [("destination queue pair", dst), ("source queue pair", src)] {
            if qp >> 24 != 0 {
                return Err(field(what, qp.into()));
            }
        }
        let r = Request {
            verb,
            path_mtu,
            dst_qp: QpNum(dst),
            src_qp: QpNum(src),
            rkey: u32_at(b, 12),
            tag: u64_at(b, 16),
            remote_addr: u64_at(b, 24),
            wr_len: u64_at(b, 32),
            offset: u64_at(b, 40),
            part_len: u32_at(b, 48),
        };
        if r.wr_len > WR_BYTES_MAX {
            return Err(field("work request bytes", r.wr_len));
        }
        if r.remote_addr.checked_add(r.wr_len).is_none() {
            return Err(field("remote address", r.remote_addr));
        }
        if r.part_len > PAYLOAD_BYTES_MAX {
            return Err(field("part bytes", r.part_len.into()));
        }
        if r.offset.checked_add(r.part_len.into()).is_none_or(|end| end > r.wr_len) {
            return Err(field("part offset", r.offset));
        }
        let len = REQUEST_BYTES + if r.carries_data() { r.part_len as usize } else { 0 };
        Ok((buf.len() >= len).then_some((r, len)))
    }
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_BYTES] {
        let mut b = [0u8; RESPONSE_BYTES];
        b[0] = match self.status {
            Status::Ok => 0,
            Status::RemoteAccess => 1,
            Status::NotConnected => 2,
        };
        b[4..8].copy_from_slice(&self.data_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// The response at the start of `buf` and the length of its frame (a
    /// read's bytes are `buf[RESPONSE_BYTES..len]`); `None` until it is
    /// all there.
    pub fn decode(buf: &[u8]) -> Result<Option<(Response, usize)>, WireError> {
        let Some(b) = buf.first_chunk::<RESPONSE_BYTES>() else { return Ok(None) };
        let status = match b[0] {
            0 => Status::Ok,
            1 => Status::RemoteAccess,
            2 => Status::NotConnected,
            s => return Err(WireError::Status(s)),
        };
        zero(b, 1..4)?;
        let data_len = u32_at(b, 4);
        if data_len > PAYLOAD_BYTES_MAX || (data_len > 0 && status != Status::Ok) {
            return Err(field("response data bytes", data_len.into()));
        }
        let len = RESPONSE_BYTES + data_len as usize;
        Ok((buf.len() >= len).then_some((Response { status, data_len, tag: u64_at(b, 8) }, len)))
    }
}

/// The fuzz target's body (`fuzz/fuzz_targets/emu_wire.rs`), also run by
/// the unit tests: every decoder over arbitrary bytes, never a panic;
/// what decodes encodes back to the same header, and every shorter prefix
/// of a whole frame is "not yet".
pub fn fuzz(data: &[u8]) {
    fn check<T>(data: &[u8], header: usize, decode: Decode<T>, encode: impl Fn(&T) -> Vec<u8>) {
        match decode(data) {
            Ok(Some((frame, len))) => {
                assert!(len >= header && len <= data.len() && len <= FRAME_BYTES_MAX);
                assert_eq!(encode(&frame), data[..header]);
                for cut in [0, header.saturating_sub(1), header, len - 1] {
                    if cut < len {
                        assert!(matches!(decode(&data[..cut]), Ok(None)), "a prefix of {cut} bytes");
                    }
                }
            }
            Ok(None) => assert!(data.len() < FRAME_BYTES_MAX),
            Err(_) => assert!(data.len() >= header, "judged only once the header is in"),
        }
    }
    check(data, HELLO_BYTES, Hello::decode, |h| h.encode().to_vec());
    check(data, REQUEST_BYTES, Request::decode, |r| r.encode().to_vec());
    check(data, RESPONSE_BYTES, Response::decode, |r| r.encode().to_vec());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(verb: Verb, part_len: u32) -> Request {
        Request {
            verb,
            path_mtu: 4096,
            dst_qp: QpNum(0x12_3456),
            src_qp: QpNum(0x11),
            rkey: 0x5a00_0101,
            tag: 77,
            remote_addr: 0x7f00_0000_1000,
            wr_len: 3 << 20,
            offset: 2 << 20,
            part_len,
        }
    }

    /// A stream of every kind of frame, with payloads.
    fn stream() -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut out = Vec::new();
        let mut frames = Vec::new();
        let mut push = |bytes: Vec<u8>| {
            frames.push((out.len(), bytes.len()));
            out.extend(bytes);
        };
        push(Hello { gid: Gid([7; 16]), lid: 40_000 }.encode().to_vec());
        let mut w = request(Verb::Write, 5).encode().to_vec();
        w.extend(b"hello");
        push(w);
        push(request(Verb::Read, 1 << 20).encode().to_vec());
        push(request(Verb::WriteImm(9), 0).encode().to_vec());
        push(Response { status: Status::NotConnected, data_len: 0, tag: 3 }.encode().to_vec());
        let mut r = Response { status: Status::Ok, data_len: 3, tag: 4 }.encode().to_vec();
        r.extend(b"abc");
        push(r);
        (out, frames)
    }

    /// Decodes the frame at `at` by the decoder its place calls for.
    fn decode_at(data: &[u8], index: usize) -> Result<Option<usize>, WireError> {
        match index {
            0 => Hello::decode(data).map(|f| f.map(|(_, n)| n)),
            1..=3 => Request::decode(data).map(|f| f.map(|(_, n)| n)),
            _ => Response::decode(data).map(|f| f.map(|(_, n)| n)),
        }
    }

    #[test]
    fn frames_round_trip() {
        let h = Hello { gid: Gid([0xfe; 16]), lid: 1 };
        assert_eq!(Hello::decode(&h.encode()), Ok(Some((h, HELLO_BYTES))));
        for verb in [Verb::Write, Verb::Read, Verb::WriteImm(0xdead_beef)] {
            let r = request(verb, 1000);
            let mut bytes = r.encode().to_vec();
            let len = if r.carries_data() { REQUEST_BYTES + 1000 } else { REQUEST_BYTES };
            bytes.resize(len + 10, 0xaa);
            assert_eq!(Request::decode(&bytes), Ok(Some((r, len))), "{verb:?}");
        }
        for status in [Status::Ok, Status::RemoteAccess, Status::NotConnected] {
            let r = Response { status, data_len: 0, tag: u64::MAX };
            assert_eq!(Response::decode(&r.encode()), Ok(Some((r, RESPONSE_BYTES))));
        }
    }

    /// The stream split at every byte: each frame comes out whole exactly
    /// when its last byte is in, never earlier.
    #[test]
    fn a_stream_split_at_every_boundary_decodes_the_same() {
        let (data, frames) = stream();
        for (i, &(at, len)) in frames.iter().enumerate() {
            for cut in 0..len {
                assert_eq!(decode_at(&data[at..at + cut], i), Ok(None), "frame {i} cut at {cut}");
            }
            assert_eq!(decode_at(&data[at..at + len], i), Ok(Some(len)), "frame {i}");
            assert_eq!(decode_at(&data[at..], i), Ok(Some(len)), "frame {i} with more behind it");
        }
    }

    #[test]
    fn bad_headers_are_errors_that_say_what() {
        let mut h = Hello { gid: Gid([1; 16]), lid: 2 }.encode();
        h[0] = b'X';
        assert!(matches!(Hello::decode(&h), Err(WireError::Magic(_))));
        let mut h = Hello { gid: Gid([1; 16]), lid: 2 }.encode();
        h[4] = 9;
        assert_eq!(Hello::decode(&h), Err(WireError::Version(9)));
        h[4] = 1;
        h[30] = 1;
        assert_eq!(Hello::decode(&h), Err(WireError::Reserved(30)));

        let good = request(Verb::Read, 4096).encode();
        let with = |at: usize, bytes: &[u8]| {
            let mut b = good;
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Request::decode(&b)
        };
        assert_eq!(with(0, &[9]), Err(WireError::Verb(9)));
        assert_eq!(with(1, &[1]), Err(WireError::Reserved(1)));
        assert_eq!(with(52, &[1]), Err(WireError::Reserved(52)), "an immediate only with WriteImm");
        assert!(matches!(with(2, &1500u16.to_le_bytes()), Err(WireError::Field { what: "path MTU", .. })));
        assert!(matches!(with(4, &(1u32 << 24).to_le_bytes()), Err(WireError::Field { .. })));
        assert!(matches!(with(8, &u32::MAX.to_le_bytes()), Err(WireError::Field { .. })));
        assert!(matches!(with(32, &(WR_BYTES_MAX + 1).to_le_bytes()), Err(WireError::Field { .. })));
        assert!(matches!(with(24, &u64::MAX.to_le_bytes()), Err(WireError::Field { what: "remote address", .. })));
        assert!(matches!(with(48, &(PAYLOAD_BYTES_MAX + 1).to_le_bytes()), Err(WireError::Field { .. })));
        assert!(matches!(with(40, &(3u64 << 20).to_le_bytes()), Err(WireError::Field { what: "part offset", .. })));
        assert!(matches!(with(40, &u64::MAX.to_le_bytes()), Err(WireError::Field { what: "part offset", .. })));

        let r = Response { status: Status::Ok, data_len: 8, tag: 1 }.encode();
        let with = |at: usize, bytes: &[u8]| {
            let mut b = r;
            b[at..at + bytes.len()].copy_from_slice(bytes);
            Response::decode(&b)
        };
        assert_eq!(with(0, &[3]), Err(WireError::Status(3)));
        assert_eq!(with(2, &[1]), Err(WireError::Reserved(2)));
        assert!(matches!(with(0, &[1]), Err(WireError::Field { .. })), "data only with success");
        assert!(matches!(with(4, &(PAYLOAD_BYTES_MAX + 1).to_le_bytes()), Err(WireError::Field { .. })));
        // A bad header is judged before its payload arrives.
        assert!(with(0, &[1]).is_err());
    }

    /// The fuzz target over generated inputs: the valid stream's frames
    /// cut and mutated, and random bytes.
    #[test]
    fn the_fuzz_target_survives_generated_inputs() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (data, frames) = stream();
        for round in 0..40_000u32 {
            let mut input = if round % 2 == 0 {
                let (at, len) = frames[round as usize / 2 % frames.len()];
                data[at..at + len + (next() % 8) as usize % (data.len() - at - len + 1)].to_vec()
            } else {
                (0..next() % 96).map(|_| next() as u8).collect()
            };
            for _ in 0..next() % 3 {
                if !input.is_empty() {
                    let i = (next() as usize) % input.len();
                    input[i] = next() as u8;
                }
            }
            fuzz(&input);
        }
    }
}
