//! The object header: what travels in front of every object's bytes.
//!
//! All integers are big-endian. A string is a u16 length and that many
//! bytes. Field order (reference §1.3): sender id, opcode, bucket name,
//! provider, namespace name, namespace uuid, object name, opaque, demux,
//! size, atime, checksum type, checksum value, version, then custom metadata
//! as (key, value) pairs ended by an empty key. The smallest header is 42
//! bytes.

use std::fmt;

/// The largest header a receiver accepts (AIStore's `MaxPageSlabSize`).
pub const MAX_HEADER_BYTES: usize = 128 * 1024;
/// The smallest possible header: 13 string lengths, an opcode, two i64s.
pub const MIN_HEADER_BYTES: usize = 42;
/// `size` of an unsized object (sent in PDUs, its length known at the end).
pub const SIZE_UNKNOWN: i64 = -1;

/// Application opcodes AIStore gives meaning to (`Opcode >= OPC_DONE` marks
/// a control object, which carries no body).
pub const OPC_DONE: u16 = 27182;
pub const OPC_ABORT: u16 = 27183;
pub const OPC_REQUEST: u16 = 27184;
pub const OPC_RESPONSE: u16 = 27185;
pub const OPC_RECONNECT: u16 = 46351;
/// The end-of-stream frame's opcode (`MaxUint16 - 16`). Opcodes from here up
/// are reserved for the transport.
pub const OPC_FIN: u16 = 65519;

/// A bucket: name, provider ("ais", "aws", ...), namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub provider: String,
    pub ns_name: String,
    pub ns_uuid: String,
}

/// What the object is, apart from its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjAttrs {
    /// Bytes of body; 0 for a header-only object, [`SIZE_UNKNOWN`] for an
    /// unsized one (PDU streams only).
    pub size: i64,
    /// Access time, nanoseconds since the Unix epoch.
    pub atime: i64,
    pub cksum_type: String,
    pub cksum_value: String,
    pub version: String,
    /// Custom metadata, in wire order. Keys are non-empty.
    pub custom: Vec<(String, String)>,
}

/// One object's header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjHdr {
    /// The sending node's id (bundles set it; plain streams leave it empty).
    pub sid: String,
    pub opcode: u16,
    pub bucket: Bucket,
    pub name: String,
    /// Application bytes, carried as they are.
    pub opaque: Vec<u8>,
    /// Demultiplexing key of AIStore's shared data mover.
    pub demux: String,
    pub attrs: ObjAttrs,
}

impl ObjHdr {
    /// A data object `bucket/name` of `size` bytes in the "ais" provider.
    pub fn new(bucket: &str, name: &str, size: i64) -> Self {
        ObjHdr {
            bucket: Bucket { name: bucket.into(), provider: "ais".into(), ..Bucket::default() },
            name: name.into(),
            attrs: ObjAttrs { size, ..ObjAttrs::default() },
            ..ObjHdr::default()
        }
    }

    /// True for the transport's own end-of-stream header.
    pub fn is_fin(&self) -> bool {
        self.opcode == OPC_FIN
    }

    /// True for application control objects (`opcode >= OPC_DONE`); they
    /// carry no body and are left out of data statistics.
    pub fn is_control(&self) -> bool {
        self.opcode >= OPC_DONE
    }

    /// True when no body follows the header.
    pub fn is_header_only(&self) -> bool {
        self.attrs.size == 0
    }

    /// True when the size is learnt at the end (PDU streams only).
    pub fn is_unsized(&self) -> bool {
        self.attrs.size == SIZE_UNKNOWN
    }

    /// Bytes [`encode`](Self::encode) appends.
    pub fn encoded_len(&self) -> usize {
        let strs = [
            &self.sid,
            &self.bucket.name,
            &self.bucket.provider,
            &self.bucket.ns_name,
            &self.bucket.ns_uuid,
            &self.name,
            &self.demux,
            &self.attrs.cksum_type,
            &self.attrs.cksum_value,
            &self.attrs.version,
        ];
        let custom: usize = self.attrs.custom.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
        strs.iter().map(|s| 2 + s.len()).sum::<usize>() + 2 + self.opaque.len() + 2 + 16 + custom + 2
    }

    /// Appends the header's wire form to `out`. Fails, leaving `out` as it
    /// was, when a field does not fit its u16 length, a custom key is empty,
    /// or the whole exceeds `max_bytes`.
    pub fn encode(&self, out: &mut Vec<u8>, max_bytes: usize) -> Result<usize, EncodeError> {
        let len = self.encoded_len();
        if len > max_bytes {
            return Err(EncodeError::TooLong { len, max: max_bytes });
        }
        let start = out.len();
        out.reserve(len);
        let result = self.encode_fields(out);
        if result.is_err() {
            out.truncate(start);
        }
        result.map(|()| {
            debug_assert_eq!(out.len() - start, len);
            len
        })
    }

    fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        put_str(out, "sid", self.sid.as_bytes())?;
        out.extend_from_slice(&self.opcode.to_be_bytes());
        put_str(out, "bucket", self.bucket.name.as_bytes())?;
        put_str(out, "provider", self.bucket.provider.as_bytes())?;
        put_str(out, "namespace name", self.bucket.ns_name.as_bytes())?;
        put_str(out, "namespace uuid", self.bucket.ns_uuid.as_bytes())?;
        put_str(out, "name", self.name.as_bytes())?;
        put_str(out, "opaque", &self.opaque)?;
        put_str(out, "demux", self.demux.as_bytes())?;
        out.extend_from_slice(&self.attrs.size.to_be_bytes());
        out.extend_from_slice(&self.attrs.atime.to_be_bytes());
        put_str(out, "checksum type", self.attrs.cksum_type.as_bytes())?;
        put_str(out, "checksum value", self.attrs.cksum_value.as_bytes())?;
        put_str(out, "version", self.attrs.version.as_bytes())?;
        for (k, v) in &self.attrs.custom {
            if k.is_empty() {
                return Err(EncodeError::EmptyCustomKey);
            }
            put_str(out, "custom key", k.as_bytes())?;
            put_str(out, "custom value", v.as_bytes())?;
        }
        out.extend_from_slice(&0u16.to_be_bytes());
        Ok(())
    }

    /// Decodes a header that must fill `body` exactly.
    pub fn decode(body: &[u8]) -> Result<ObjHdr, HeaderError> {
        let mut r = Cursor { buf: body, off: 0 };
        let sid = r.string("sid")?;
        let opcode = r.u16()?;
        let bucket = Bucket {
            name: r.string("bucket")?,
            provider: r.string("provider")?,
            ns_name: r.string("namespace name")?,
            ns_uuid: r.string("namespace uuid")?,
        };
        let name = r.string("name")?;
        let opaque = r.bytes()?.to_vec();
        let demux = r.string("demux")?;
        let size = r.i64()?;
        let atime = r.i64()?;
        let cksum_type = r.string("checksum type")?;
        let cksum_value = r.string("checksum value")?;
        let version = r.string("version")?;
        let mut custom = Vec::new();
        loop {
            let key = r.string("custom key")?;
            if key.is_empty() {
                break;
            }
            let value = r.string("custom value")?;
            custom.push((key, value));
        }
        if r.off != body.len() {
            return Err(HeaderError::Length { decoded: r.off, declared: body.len() });
        }
        if size < SIZE_UNKNOWN {
            return Err(HeaderError::Size(size));
        }
        let attrs = ObjAttrs { size, atime, cksum_type, cksum_value, version, custom };
        Ok(ObjHdr { sid, opcode, bucket, name, opaque, demux, attrs })
    }
}

fn put_str(out: &mut Vec<u8>, field: &'static str, s: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::FieldTooLong { field, len: s.len() })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
    Ok(())
}

/// Reads fields strictly inside one header body.
struct Cursor<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HeaderError> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.off..end];
                self.off = end;
                Ok(s)
            }
            None => Err(HeaderError::Truncated { offset: self.off }),
        }
    }

    fn u16(&mut self) -> Result<u16, HeaderError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn i64(&mut self) -> Result<i64, HeaderError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], HeaderError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self, field: &'static str) -> Result<String, HeaderError> {
        let at = self.off;
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| HeaderError::NotUtf8 { field, offset: at })
    }
}

/// Why a header cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("header field {field} is {len} bytes; at most 65535 fit")]
    FieldTooLong { field: &'static str, len: usize },
    #[error("custom metadata keys must not be empty")]
    EmptyCustomKey,
    #[error("header is {len} bytes; the limit is {max}")]
    TooLong { len: usize, max: usize },
}

/// Why header bytes are not a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// A length ran past the end of the header.
    Truncated { offset: usize },
    /// The fields ended before the declared length.
    Length { decoded: usize, declared: usize },
    /// A string field holds bytes that are not UTF-8.
    NotUtf8 { field: &'static str, offset: usize },
    /// A size below -1.
    Size(i64),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The wording of AIStore's ErrHdrMalformed and ErrHdrLength.
            HeaderError::Truncated { offset } => {
                write!(f, "malformed object header: at offset {offset}: unexpected EOF")
            }
            HeaderError::Length { decoded, declared } => {
                write!(f, "object header length mismatch: decoded {decoded} of {declared} bytes")
            }
            HeaderError::NotUtf8 { field, offset } => {
                write!(f, "malformed object header: {field} at offset {offset} is not UTF-8")
            }
            HeaderError::Size(size) => write!(f, "malformed object header: size {size}"),
        }
    }
}

impl std::error::Error for HeaderError {}

#[cfg(test)]
pub(crate) mod tests;
