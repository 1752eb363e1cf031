//! The 16-byte proto header in front of every frame, and the frames built
//! from it: object headers, PDUs, and the end-of-stream frame.
//!
//! `word1` (u64 BE) is `length | flags`, and `check` (u64 BE) is
//! [`super::hash::hash`]`(word1)`. The flags are the top four bits.

use super::hash::hash;
use super::header::{MAX_HEADER_BYTES, OPC_FIN, ObjHdr};

/// Bytes of a proto header.
pub const PROTO_HDR_BYTES: usize = 16;
/// Legacy message frame (removed from AIStore in 2023; rejected here).
pub const FLAG_MSG: u64 = 1 << 63;
/// The frame is a PDU of an object's body.
pub const FLAG_PDU: u64 = 1 << 62;
/// The PDU is the object's last.
pub const FLAG_PDU_LAST: u64 = 1 << 61;
/// An object header on a PDU stream: the body follows in PDUs.
pub const FLAG_PDU_STREAM: u64 = 1 << 60;
const ALL_FLAGS: u64 = FLAG_MSG | FLAG_PDU | FLAG_PDU_LAST | FLAG_PDU_STREAM;

/// The largest PDU, its 16-byte header included (AIStore's receive buffer).
pub const MAX_PDU_BYTES: usize = 128 * 1024;
/// The most payload one PDU carries.
pub const MAX_PDU_PAYLOAD: usize = MAX_PDU_BYTES - PROTO_HDR_BYTES;

/// A decoded proto header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoHdr {
    pub len: u64,
    pub flags: u64,
}

impl ProtoHdr {
    /// The wire form.
    pub fn encode(&self) -> [u8; PROTO_HDR_BYTES] {
        debug_assert_eq!(self.len & ALL_FLAGS, 0);
        let word1 = self.len | self.flags;
        let mut out = [0u8; PROTO_HDR_BYTES];
        out[..8].copy_from_slice(&word1.to_be_bytes());
        out[8..].copy_from_slice(&hash(word1).to_be_bytes());
        out
    }

    /// Reads a proto header, checking its hash.
    pub fn decode(bytes: &[u8; PROTO_HDR_BYTES]) -> Result<ProtoHdr, BadChecksum> {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[..8]);
        let word1 = u64::from_be_bytes(w);
        w.copy_from_slice(&bytes[8..]);
        let check = u64::from_be_bytes(w);
        if hash(word1) != check {
            return Err(BadChecksum { word1, check });
        }
        Ok(ProtoHdr { len: word1 & !ALL_FLAGS, flags: word1 & ALL_FLAGS })
    }

    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }
}

/// A proto header whose check word does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChecksum {
    pub word1: u64,
    pub check: u64,
}

/// Appends an object header frame (proto header, then the header) to `out`.
/// `pdu_stream` marks a header whose body follows in PDUs.
pub fn encode_obj_frame(
    hdr: &ObjHdr,
    pdu_stream: bool,
    out: &mut Vec<u8>,
    max_bytes: usize,
) -> Result<usize, super::header::EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; PROTO_HDR_BYTES]);
    let hlen = match hdr.encode(out, max_bytes.min(MAX_HEADER_BYTES)) {
        Ok(n) => n,
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    let flags = if pdu_stream { FLAG_PDU_STREAM } else { 0 };
    let proto = ProtoHdr { len: hlen as u64, flags }.encode();
    out[start..start + PROTO_HDR_BYTES].copy_from_slice(&proto);
    Ok(PROTO_HDR_BYTES + hlen)
}

/// The proto header of a PDU carrying `len` payload bytes.
pub fn pdu_header(len: usize, last: bool) -> [u8; PROTO_HDR_BYTES] {
    debug_assert!(len <= MAX_PDU_PAYLOAD);
    let flags = FLAG_PDU | if last { FLAG_PDU_LAST } else { 0 };
    ProtoHdr { len: len as u64, flags }.encode()
}

/// The end-of-stream frame: a header-only object with opcode `OPC_FIN` and
/// every other field empty (58 bytes).
pub fn fin_frame() -> Vec<u8> {
    let hdr = ObjHdr { opcode: OPC_FIN, ..ObjHdr::default() };
    let mut out = Vec::with_capacity(PROTO_HDR_BYTES + 42);
    encode_obj_frame(&hdr, false, &mut out, MAX_HEADER_BYTES).expect("the Fin header is 42 bytes");
    out
}
