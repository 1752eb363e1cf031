//! Mooncake's TCP data protocol (version 2).
//!
//! A request is a 24-byte header, little-endian:
//!
//! ```text
//! u64 size      bytes to move
//! u64 addr      absolute virtual address in the server's registered memory
//! u8  opcode    0 READ, 1 WRITE; bit 0x80 asks for v2 status frames
//! u8  pad[7]
//! ```
//!
//! A WRITE header is followed by `size` bytes. The v2 server answers every
//! request with an 8-byte status frame, `("MCTV" << 32) | code` as a
//! little-endian u64: for a WRITE once the bytes have landed, for a READ
//! before the `size` bytes it sends. A non-zero code means the request was
//! rejected, and the server closes the connection after sending it. A v1
//! server sends no status: it just closes on a bad request. Connections are
//! persistent, and requests may be pipelined: the server handles them in
//! order.
//!
//! **CRC-32C extension (shardwire's own).** Mooncake's protocol carries no
//! checksum. A shardwire target advertises `shardwire_tcp_crc32c` in its
//! segment descriptor (Mooncake ignores the key); an initiator with
//! `SHARDWIRE_TCP_CRC32C` on sets [`CRC32C_FLAG`] on the requests it sends
//! to such a target, and only then, so a Mooncake peer never sees it. A
//! flagged (v2-only) request:
//!
//! ```text
//! header   bytes 20..24 (padding in Mooncake's header) hold the CRC-32C of
//!          bytes 0..20, little-endian: a corrupted header (a wrong address
//!          or size) is refused before anything lands
//! WRITE    header, payload, then the payload's CRC-32C (u32 LE); the
//!          server checks it against the bytes as they landed
//! READ     status frame, payload, then the payload's CRC-32C (u32 LE),
//!          computed from the server's memory; the client checks it
//! ```
//!
//! **Instance tags (shardwire's own).** A shardwire target publishes
//! `shardwire_instance`, a number drawn when its engine started. An
//! initiator sets [`INSTANCE_FLAG`] on every request to such a target and
//! puts the number's low 24 bits in header bytes 17..20 (padding in
//! Mooncake's header; covered by the header's CRC-32C when that is on). A
//! target whose own tag differs answers [`STATUS_STALE_INSTANCE`] and ends
//! the session as after a rejection: the request was addressed to the
//! process this one replaced (its addresses describe that process's
//! memory), so nothing of it lands. A connection re-opened to a restarted
//! peer on the same data port can thus never carry an old request into
//! the new process. The tag tells two processes apart but for a 2^-24
//! chance; the engine also compares the whole number in the descriptors
//! it fetches. A Mooncake target publishes no number, so its initiators
//! never set the flag.
//!
//! A header that fails its check is answered with
//! [`STATUS_HEADER_CHECKSUM`], and the session ends as after a rejection
//! (the framing cannot be trusted). A WRITE whose payload fails is answered
//! with [`STATUS_PAYLOAD_CHECKSUM`] (its bytes have landed, wrong); the
//! framing is intact, so the session goes on. A READ that fails is the
//! client's to settle. Either way the request fails with its own error,
//! and is not retried (a retry could hide a path that corrupts).

/// Bytes in a request header.
pub const HEADER_BYTES: usize = 24;
/// Bytes in a status frame.
pub const STATUS_BYTES: usize = 8;
/// "MCTV", the high half of every status frame.
pub const STATUS_MAGIC: u32 = 0x4D43_5456;
/// Status code: done.
pub const STATUS_OK: u32 = 0;
/// Status code: rejected (what Mooncake sends for a bad address).
pub const STATUS_REJECTED: u32 = 1;
/// The opcode bit that asks for v2 framing.
pub const V2_FLAG: u8 = 0x80;
/// The opcode bit that asks for CRC-32C framing (shardwire's extension,
/// v2 only; see the module documentation).
pub const CRC32C_FLAG: u8 = 0x40;
/// The opcode bit that says bytes 17..20 carry the instance tag of the
/// target process the request is addressed to (shardwire's extension, v2
/// only; see the module documentation).
pub const INSTANCE_FLAG: u8 = 0x20;
/// Where a tagged header keeps its instance tag (3 bytes, little-endian).
const INSTANCE_AT: usize = 17;
/// The instance tag's bits.
pub const INSTANCE_TAG_MASK: u32 = 0x00ff_ffff;
/// Bytes of a CRC-32C on the wire (a payload's trailer, a header's check).
pub const CRC_BYTES: usize = 4;
/// Where a flagged header keeps its own CRC-32C (of the bytes before it).
const HEADER_CRC_AT: usize = 20;
/// Status (CRC-32C requests only): the header failed its check; the session
/// ends after it.
pub const STATUS_HEADER_CHECKSUM: u32 = 2;
/// Status (CRC-32C WRITEs only): the payload landed but does not match its
/// CRC-32C; the session goes on.
pub const STATUS_PAYLOAD_CHECKSUM: u32 = 3;
/// Status (tagged requests only): the request names another process of
/// this segment than the one answering, which replaced it; nothing of it
/// ran, and the session ends after it.
pub const STATUS_STALE_INSTANCE: u32 = 4;

/// The tag of a target's instance number that requests carry.
pub fn instance_tag(instance: u64) -> u32 {
    (instance as u32) & INSTANCE_TAG_MASK
}

/// The CRC-32C (Castagnoli) of `bytes`: SSE4.2's `crc32` instruction where
/// the CPU has it (the `crc32c` crate picks at run time).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Which way the bytes go, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Server to client.
    Read = 0,
    /// Client to server.
    Write = 1,
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub size: u64,
    pub addr: u64,
    pub opcode: Opcode,
    pub v2: bool,
    /// CRC-32C framing (shardwire's extension; needs `v2`).
    pub crc32c: bool,
    /// The tag of the target instance it is addressed to (shardwire's
    /// extension; needs `v2`; at most [`INSTANCE_TAG_MASK`]).
    pub instance: Option<u32>,
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("zero-length request")]
    ZeroSize,
    #[error("address {addr:#x} plus size {size} overflows")]
    Overflow { addr: u64, size: u64 },
    #[error("request header fails its CRC-32C check: it says {carried:#010x}, its bytes give {actual:#010x}")]
    HeaderChecksum { carried: u32, actual: u32 },
    #[error("CRC-32C framing asked for without v2 framing")]
    Crc32cWithoutV2,
    #[error("an instance tag without v2 framing")]
    InstanceWithoutV2,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        out[16] = self.opcode as u8 | if self.v2 { V2_FLAG } else { 0 };
        if let Some(tag) = self.instance {
            debug_assert!(self.v2, "instance tags are v2 only");
            debug_assert!(tag <= INSTANCE_TAG_MASK, "a tag is 24 bits");
            out[16] |= INSTANCE_FLAG;
            out[INSTANCE_AT..INSTANCE_AT + 3].copy_from_slice(&(tag & INSTANCE_TAG_MASK).to_le_bytes()[..3]);
        }
        if self.crc32c {
            debug_assert!(self.v2, "CRC-32C framing is v2 only");
            out[16] |= CRC32C_FLAG;
            let check = crc32c(&out[..HEADER_CRC_AT]);
            out[HEADER_CRC_AT..].copy_from_slice(&check.to_le_bytes());
        }
        out
    }

    /// Decodes a header. The opcode must be READ or WRITE (a v1 server would
    /// take anything else for READ; refusing it is safer), the size non-zero,
    /// and the range must not wrap. Padding is ignored, as Mooncake does.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, (Self, HeaderError)> {
        let size = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let addr = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let raw = bytes[16];
        let v2 = raw & V2_FLAG != 0;
        let crc = raw & CRC32C_FLAG != 0;
        let instance = (raw & INSTANCE_FLAG != 0).then(|| {
            let mut tag = [0u8; 4];
            tag[..3].copy_from_slice(&bytes[INSTANCE_AT..INSTANCE_AT + 3]);
            u32::from_le_bytes(tag)
        });
        let partial = Self { size, addr, opcode: Opcode::Read, v2, crc32c: crc, instance };
        if crc {
            // Checked first: nothing else in a header that fails is trusted.
            let carried = u32::from_le_bytes(bytes[HEADER_CRC_AT..].try_into().expect("4 bytes"));
            let actual = crc32c(&bytes[..HEADER_CRC_AT]);
            if carried != actual {
                return Err((partial, HeaderError::HeaderChecksum { carried, actual }));
            }
            if !v2 {
                return Err((partial, HeaderError::Crc32cWithoutV2));
            }
        }
        if instance.is_some() && !v2 {
            return Err((partial, HeaderError::InstanceWithoutV2));
        }
        let opcode = match raw & !(V2_FLAG | CRC32C_FLAG | INSTANCE_FLAG) {
            0 => Opcode::Read,
            1 => Opcode::Write,
            other => return Err((partial, HeaderError::UnknownOpcode(other))),
        };
        let header = Self { opcode, ..partial };
        if size == 0 {
            return Err((header, HeaderError::ZeroSize));
        }
        if addr.checked_add(size).is_none() {
            return Err((header, HeaderError::Overflow { addr, size }));
        }
        Ok(header)
    }
}

/// Encodes a status frame.
pub fn encode_status(code: u32) -> [u8; STATUS_BYTES] {
    ((u64::from(STATUS_MAGIC) << 32) | u64::from(code)).to_le_bytes()
}

/// Decodes a status frame into its code; `Err` if the magic is wrong (the
/// peer is not speaking v2, or the stream is out of step).
pub fn decode_status(bytes: &[u8; STATUS_BYTES]) -> Result<u32, u64> {
    let raw = u64::from_le_bytes(*bytes);
    if (raw >> 32) as u32 == STATUS_MAGIC { Ok(raw as u32) } else { Err(raw) }
}

/// Finds the one buffer that holds all of `[addr, addr + size)`, given
/// `(addr, length)` pairs. A range that spans two adjacent buffers is not
/// inside one buffer and is refused, as Mooncake refuses it; so are empty
/// and wrapping ranges.
pub fn locate(buffers: impl IntoIterator<Item = (u64, u64)>, addr: u64, size: u64) -> Option<usize> {
    let end = addr.checked_add(size)?;
    if size == 0 {
        return None;
    }
    buffers.into_iter().position(|(base, len)| match base.checked_add(len) {
        Some(limit) => addr >= base && end <= limit,
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = RequestHeader {
            size: 100,
            addr: 0x1_0000_0010,
            opcode: Opcode::Write,
            v2: true,
            crc32c: false,
            instance: None,
        };
        let bytes = h.encode();
        assert_eq!(bytes[16], 0x81);
        assert_eq!(&bytes[17..], &[0; 7]);
        assert_eq!(&bytes[..8], &100u64.to_le_bytes());
        assert_eq!(RequestHeader::decode(&bytes), Ok(h));
        let r = RequestHeader { opcode: Opcode::Read, v2: false, ..h };
        assert_eq!(r.encode()[16], 0x00);
        assert_eq!(RequestHeader::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn bad_headers_are_named() {
        let mut b =
            RequestHeader { size: 8, addr: 64, opcode: Opcode::Read, v2: true, crc32c: false, instance: None }.encode();
        b[16] = 0x82;
        assert_eq!(RequestHeader::decode(&b).unwrap_err().1, HeaderError::UnknownOpcode(2));
        let z = RequestHeader { size: 0, addr: 64, opcode: Opcode::Write, v2: true, crc32c: false, instance: None }
            .encode();
        assert_eq!(RequestHeader::decode(&z).unwrap_err().1, HeaderError::ZeroSize);
        let o =
            RequestHeader { size: 2, addr: u64::MAX, opcode: Opcode::Write, v2: true, crc32c: false, instance: None }
                .encode();
        assert!(matches!(RequestHeader::decode(&o).unwrap_err().1, HeaderError::Overflow { .. }));
        // The partial header still says whether to answer with a v2 status.
        assert!(RequestHeader::decode(&o).unwrap_err().0.v2);
    }

    #[test]
    fn crc32c_headers_carry_their_own_check() {
        let h = RequestHeader {
            size: 4096,
            addr: 0x7f00_0000_1000,
            opcode: Opcode::Read,
            v2: true,
            crc32c: true,
            instance: None,
        };
        let b = h.encode();
        assert_eq!(b[16], 0xc0);
        assert_eq!(&b[17..20], &[0; 3]);
        assert_eq!(u32::from_le_bytes(b[20..].try_into().unwrap()), crc32c(&b[..20]));
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        // Every single-bit error anywhere in the header is caught.
        for bit in 0..8 * HEADER_BYTES {
            let mut bad = b;
            bad[bit / 8] ^= 1 << (bit % 8);
            if bit / 8 == 16 && bit % 8 == 6 {
                // The flag itself: the header reads as a plain one whose
                // padding is ignored (the trailer then desynchronises the
                // stream, which the status frames catch).
                assert!(!RequestHeader::decode(&bad).unwrap().crc32c);
                continue;
            }
            let e = RequestHeader::decode(&bad).unwrap_err().1;
            assert!(matches!(e, HeaderError::HeaderChecksum { .. }), "bit {bit}: {e:?}");
        }
        // The flag without v2 is refused.
        let mut v1 = RequestHeader { v2: false, crc32c: false, ..h }.encode();
        v1[16] |= CRC32C_FLAG;
        let check = crc32c(&v1[..20]);
        v1[20..].copy_from_slice(&check.to_le_bytes());
        assert_eq!(RequestHeader::decode(&v1).unwrap_err().1, HeaderError::Crc32cWithoutV2);
        // The catalogue check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn instance_tags_ride_in_the_padding() {
        let h = RequestHeader {
            size: 64,
            addr: 0x7f00_0000_2000,
            opcode: Opcode::Write,
            v2: true,
            crc32c: false,
            instance: Some(instance_tag(0x1234_5678_9abc_def1)),
        };
        let b = h.encode();
        assert_eq!(b[16], 0xa1);
        assert_eq!(&b[17..20], &[0xf1, 0xde, 0xbc]);
        assert_eq!(&b[20..], &[0; 4]);
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        // With CRC-32C framing too: the tag is covered by the check.
        let c = RequestHeader { crc32c: true, ..h };
        let mut cb = c.encode();
        assert_eq!(cb[16], 0xe1);
        assert_eq!(RequestHeader::decode(&cb), Ok(c));
        cb[18] ^= 1;
        assert!(matches!(RequestHeader::decode(&cb).unwrap_err().1, HeaderError::HeaderChecksum { .. }));
        // A tag without v2 framing is refused; a plain header has no tag.
        let mut v1 = RequestHeader { v2: false, instance: None, ..h }.encode();
        v1[16] |= INSTANCE_FLAG;
        assert_eq!(RequestHeader::decode(&v1).unwrap_err().1, HeaderError::InstanceWithoutV2);
        assert_eq!(RequestHeader::decode(&RequestHeader { instance: None, ..h }.encode()).unwrap().instance, None);
        assert_eq!(instance_tag(u64::MAX), INSTANCE_TAG_MASK);
    }

    #[test]
    fn status_frames_match_the_wheel() {
        // Bytes captured from mooncake-transfer-engine-non-cuda 0.3.13.post1.
        assert_eq!(encode_status(STATUS_OK), [0, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]);
        assert_eq!(encode_status(STATUS_REJECTED), [1, 0, 0, 0, 0x56, 0x54, 0x43, 0x4d]);
        assert_eq!(decode_status(&encode_status(7)), Ok(7));
        assert!(decode_status(b"hello wo").is_err());
    }

    // Mirrors Mooncake's tcp_address_validation_test.
    const BUFS: [(u64, u64); 2] = [(0x1000, 0x1000), (0x2000, 0x1000)];

    #[test]
    fn exact_match_and_within_bounds() {
        assert_eq!(locate(BUFS, 0x1000, 0x1000), Some(0));
        assert_eq!(locate(BUFS, 0x1800, 0x10), Some(0));
        assert_eq!(locate(BUFS, 0x2fff, 1), Some(1), "single byte at the end");
    }

    #[test]
    fn out_of_bounds_and_partial_overlap() {
        assert_eq!(locate(BUFS, 0x3000, 1), None);
        assert_eq!(locate(BUFS, 0x0fff, 2), None, "starts before the first buffer");
        assert_eq!(locate(BUFS, 0x2f00, 0x200), None, "runs past the end");
    }

    #[test]
    fn spanning_adjacent_buffers_is_refused() {
        assert_eq!(locate(BUFS, 0x1f00, 0x200), None);
    }

    #[test]
    fn zero_size_overflow_and_no_buffers() {
        assert_eq!(locate(BUFS, 0x1000, 0), None);
        assert_eq!(locate(BUFS, u64::MAX, 2), None);
        assert_eq!(locate([(u64::MAX - 4, 100)], u64::MAX - 2, 1), None, "a buffer that wraps matches nothing");
        assert_eq!(locate(std::iter::empty(), 0x1000, 1), None);
    }

    #[test]
    fn large_buffer() {
        let big = [(0x7f00_0000_0000, 1 << 40)];
        assert_eq!(locate(big, 0x7f00_0000_0000 + (1 << 39), 1 << 39), Some(0));
        assert_eq!(locate(big, 0x7f00_0000_0000 + (1 << 39), (1 << 39) + 1), None);
    }
}
