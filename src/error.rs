//! Mooncake's error codes (`mooncake-transfer-engine/include/error.h`), and
//! the engine's error type that carries one.

use std::fmt;

/// Mooncake's return codes. The Python surface returns these integers; the
/// Rust API returns [`TeError`], whose [`TeError::code`] is one of them.
pub mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = -1;
    pub const TOO_MANY_REQUESTS: i32 = -2;
    pub const ADDRESS_NOT_REGISTERED: i32 = -3;
    pub const BATCH_BUSY: i32 = -4;
    pub const DEVICE_NOT_FOUND: i32 = -6;
    pub const ADDRESS_OVERLAPPED: i32 = -7;
    pub const DNS: i32 = -101;
    pub const SOCKET: i32 = -102;
    pub const MALFORMED_JSON: i32 = -103;
    pub const REJECT_HANDSHAKE: i32 = -104;
    pub const METADATA: i32 = -200;
    pub const ENDPOINT: i32 = -201;
    pub const CONTEXT: i32 = -202;
    pub const NUMA: i32 = -300;
    pub const CLOCK: i32 = -301;
    pub const MEMORY: i32 = -302;
    pub const NOT_IMPLEMENTED: i32 = -303;
    /// shardwire's own (Mooncake has no checksum): a transfer's bytes did
    /// not match their CRC-32C (`SHARDWIRE_TCP_CRC32C`).
    pub const CHECKSUM: i32 = -400;
    /// shardwire's own: the request was addressed to a peer process that
    /// has since exited or been replaced by a new process under the same
    /// segment name. It is not re-sent to the new process (whose memory
    /// the request's addresses do not describe); the engine has looked
    /// the name up again, so a transfer with addresses from the new
    /// process goes through.
    pub const PEER_GONE: i32 = -401;
}

/// The name of a Mooncake return code, in snake case (`-102` is
/// `"socket"`): a stable word for tools, such as the CLI's JSON errors.
/// A code Mooncake does not define is `"error"`.
pub fn code_name(c: i32) -> &'static str {
    match c {
        code::OK => "ok",
        code::INVALID_ARGUMENT => "invalid_argument",
        code::TOO_MANY_REQUESTS => "too_many_requests",
        code::ADDRESS_NOT_REGISTERED => "address_not_registered",
        code::BATCH_BUSY => "batch_busy",
        code::DEVICE_NOT_FOUND => "device_not_found",
        code::ADDRESS_OVERLAPPED => "address_overlapped",
        code::DNS => "dns",
        code::SOCKET => "socket",
        code::MALFORMED_JSON => "malformed_json",
        code::REJECT_HANDSHAKE => "reject_handshake",
        code::METADATA => "metadata",
        code::ENDPOINT => "endpoint",
        code::CONTEXT => "context",
        code::NUMA => "numa",
        code::CLOCK => "clock",
        code::MEMORY => "memory",
        code::NOT_IMPLEMENTED => "not_implemented",
        code::CHECKSUM => "checksum",
        code::PEER_GONE => "peer_gone",
        _ => "error",
    }
}

/// An engine error: a Mooncake code and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeError {
    code: i32,
    message: String,
}

impl TeError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The Mooncake return code (always negative).
    pub fn code(&self) -> i32 {
        self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The code's name ([`code_name`]): `"socket"`, `"metadata"`, ...
    pub fn code_name(&self) -> &'static str {
        code_name(self.code)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_ARGUMENT, message)
    }

    pub fn not_initialized() -> Self {
        Self::invalid("the engine is not initialized: call initialize() first")
    }
}

impl fmt::Display for TeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for TeError {}

/// The engine's result type.
pub type TeResult<T> = Result<T, TeError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_names() {
        assert_eq!(code_name(code::SOCKET), "socket");
        assert_eq!(code_name(code::METADATA), "metadata");
        assert_eq!(code_name(-9999), "error");
        let e = TeError::new(code::DNS, "cannot resolve x");
        assert_eq!((e.code_name(), e.to_string().as_str()), ("dns", "cannot resolve x (code -101)"));
    }
}
