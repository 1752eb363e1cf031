//! Sans-IO protocol codecs and state machines. Nothing here touches a socket:
//! each codec takes bytes and returns values (or the reverse), so every one
//! is tested, and fuzzed, without I/O.
//!
//! - [`mooncake`]: Mooncake Transfer Engine's P2P handshake frames, its JSON
//!   messages, and the TCP v2 data protocol.
//! - [`linger`]: half-close-then-drain, how both servers end a connection
//!   after an error answer.
//! - [`objstream`]: AIStore's object-stream frames, headers, PDUs and LZ4
//!   framing.
//! - [`resp`]: RESP2, the redis protocol (commands out, replies in).

pub mod linger;
pub mod mooncake;
pub mod objstream;
pub mod resp;
