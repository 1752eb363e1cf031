//! Typed frames on the RPC (handshake) port.
//!
//! ```text
//! u64 length (little-endian; counts the type byte and the body)
//! u8  type    0 Connection, 1 Metadata, 2 Notify, 3 Probe
//! ..  body    JSON text, newline-terminated as jsoncpp's FastWriter writes it
//! ```
//!
//! One request per connection; the reply echoes the type byte. A frame whose
//! first byte after the length is above 3 (typically `{`) is the old untyped
//! protocol and means Connection, with that byte part of the body. Length 0
//! and lengths above the limit (`MC_HANDSHAKE_MAX_LENGTH`, 1 MiB by default)
//! are rejected, which is also what turns away an HTTP or TLS client that
//! connected to the wrong port: their first eight bytes read as an enormous
//! length. Those two are recognised and named.

/// Bytes in the length prefix.
pub const LEN_BYTES: usize = 8;
/// Default frame limit (Mooncake's `MC_HANDSHAKE_MAX_LENGTH` default).
pub const MAX_LEN_DEFAULT: u64 = 1 << 20;
/// Highest limit `MC_HANDSHAKE_MAX_LENGTH` may set.
pub const MAX_LEN_CEILING: u64 = 128 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// RDMA queue-pair exchange.
    Connection = 0,
    /// Segment descriptor request.
    Metadata = 1,
    /// A notification for `get_notifies`.
    Notify = 2,
    /// Liveness probe.
    Probe = 3,
}

impl FrameType {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Connection),
            1 => Some(Self::Metadata),
            2 => Some(Self::Notify),
            3 => Some(Self::Probe),
            _ => None,
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    /// True for the old untyped protocol (no type byte on the wire).
    pub legacy: bool,
    pub body: Vec<u8>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length 0")]
    ZeroLength,
    #[error("frame length {len} is above the limit of {max} bytes")]
    TooLong { len: u64, max: u64 },
    #[error("an HTTP request on the handshake port")]
    HttpProbe,
    #[error("a TLS handshake on the handshake port")]
    TlsProbe,
}

/// Encodes a frame.
pub fn encode(kind: FrameType, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN_BYTES + 1 + body.len());
    out.extend_from_slice(&(1 + body.len() as u64).to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(body);
    out
}

/// Checks the length prefix (the first 8 bytes of a frame) and returns how
/// many bytes follow it.
pub fn body_len(prefix: &[u8; LEN_BYTES], max: u64) -> Result<u64, FrameError> {
    const HTTP_METHODS: [&[u8]; 9] = [b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC"];
    let len = u64::from_le_bytes(*prefix);
    if len == 0 {
        return Err(FrameError::ZeroLength);
    }
    if len > max {
        if HTTP_METHODS.iter().any(|m| prefix.starts_with(m)) {
            return Err(FrameError::HttpProbe);
        }
        // A TLS record: content type 22 (handshake), version 3.x.
        if prefix[0] == 0x16 && prefix[1] == 0x03 {
            return Err(FrameError::TlsProbe);
        }
        return Err(FrameError::TooLong { len, max });
    }
    Ok(len)
}

/// Decodes one frame from the front of `buf`. `Ok(None)` means more bytes
/// are needed; `Ok(Some((frame, used)))` consumed `used` bytes.
pub fn decode(buf: &[u8], max: u64) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_BYTES>() else {
        return Ok(None);
    };
    let len = body_len(prefix, max)? as usize;
    let Some(rest) = buf[LEN_BYTES..].get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(rest), LEN_BYTES + len)))
}

/// Interprets the `len` bytes after the prefix (never empty: `body_len`
/// rejected zero).
pub fn decode_body(rest: &[u8]) -> Frame {
    match rest.first().copied().and_then(FrameType::from_byte) {
        Some(kind) => Frame { kind, legacy: false, body: rest[1..].to_vec() },
        None => Frame { kind: FrameType::Connection, legacy: true, body: rest.to_vec() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_frames_round_trip() {
        for kind in [FrameType::Connection, FrameType::Metadata, FrameType::Notify, FrameType::Probe] {
            let bytes = encode(kind, b"{\"status\":\"success\"}\n");
            let (frame, used) = decode(&bytes, MAX_LEN_DEFAULT).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame, Frame { kind, legacy: false, body: b"{\"status\":\"success\"}\n".to_vec() });
        }
    }

    #[test]
    fn length_is_little_endian_and_counts_the_type_byte() {
        let bytes = encode(FrameType::Probe, b"{}\n");
        assert_eq!(&bytes[..9], &[4, 0, 0, 0, 0, 0, 0, 0, 3]);
    }

    #[test]
    fn partial_input_needs_more() {
        let bytes = encode(FrameType::Metadata, b"{}\n");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], MAX_LEN_DEFAULT), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn old_untyped_protocol_means_connection() {
        let body = b"{\"local_nic_path\":\"x\"}\n";
        let mut bytes = (body.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        let (frame, _) = decode(&bytes, MAX_LEN_DEFAULT).unwrap().unwrap();
        assert_eq!(frame.kind, FrameType::Connection);
        assert!(frame.legacy);
        assert_eq!(frame.body, body);
    }

    #[test]
    fn rejects_zero_and_oversized_lengths() {
        assert_eq!(decode(&[0; 9], MAX_LEN_DEFAULT), Err(FrameError::ZeroLength));
        let big = (MAX_LEN_DEFAULT + 1).to_le_bytes();
        assert_eq!(
            decode(&big, MAX_LEN_DEFAULT),
            Err(FrameError::TooLong { len: MAX_LEN_DEFAULT + 1, max: MAX_LEN_DEFAULT })
        );
        assert!(decode(&(16u64).to_le_bytes(), 8).is_err(), "the limit is the caller's");
    }

    #[test]
    fn rejects_http_and_tls_probes() {
        assert_eq!(decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", MAX_LEN_DEFAULT), Err(FrameError::HttpProbe));
        assert_eq!(decode(b"POST /x HTTP/1.1\r\n", MAX_LEN_DEFAULT), Err(FrameError::HttpProbe));
        let client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        assert_eq!(decode(&client_hello, MAX_LEN_DEFAULT), Err(FrameError::TlsProbe));
    }
}
