//! Stream breakage: why a received stream cannot go on.
//!
//! The codes are AIStore's (`ErrSBR`), so logs and error bodies read the
//! same on both sides.

use std::fmt;

/// What broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SbrCode {
    /// A proto header that is not one (flags, or the body ended inside it).
    ProtoHdr,
    /// A header length above the limit.
    ProtoHdrLong,
    /// A proto header's check word does not match.
    HdrChecksum,
    /// The body ended inside an object header.
    ObjHdrShort,
    /// An object header that does not decode.
    ObjHdrInval,
    /// The body ended inside an object's bytes.
    ObjDataEof,
    /// An object's bytes could not be read.
    ObjData,
    /// A PDU header that is not one.
    PduHdrInvalid,
    /// The body ended inside a PDU header.
    PduHdrShort,
    /// The body ended inside a PDU.
    PduData,
    /// The PDUs add up to another size than the header's.
    PduDataSize,
    /// The compressed framing is broken.
    Lz4,
    /// The HTTP body framing (chunks) is broken.
    Body,
}

impl SbrCode {
    /// AIStore's name for the code.
    pub fn as_str(self) -> &'static str {
        match self {
            SbrCode::ProtoHdr => "sbr_proto_hdr",
            SbrCode::ProtoHdrLong => "sbr_proto_hdr_long",
            SbrCode::HdrChecksum => "sbr_hdr_checksum",
            SbrCode::ObjHdrShort => "sbr_obj_hdr_short",
            SbrCode::ObjHdrInval => "sbr_obj_hdr_inval",
            SbrCode::ObjDataEof => "sbr_obj_data_eof",
            SbrCode::ObjData => "sbr_obj_data",
            SbrCode::PduHdrInvalid => "sbr_pdu_hdr_invalid",
            SbrCode::PduHdrShort => "sbr_pdu_hdr_short",
            SbrCode::PduData => "sbr_pdu_data",
            SbrCode::PduDataSize => "sbr_pdu_data_size",
            SbrCode::Lz4 => "sbr_lz4",
            SbrCode::Body => "sbr_http_body",
        }
    }
}

/// A stream breakage: the code and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbrError {
    pub code: SbrCode,
    pub context: String,
}

impl SbrError {
    pub fn new(code: SbrCode, context: impl Into<String>) -> Self {
        SbrError { code, context: context.into() }
    }
}

impl fmt::Display for SbrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:[{}]", self.code.as_str(), self.context)
    }
}

impl std::error::Error for SbrError {}
