//! Metadata: how engines find each other's segments.
//!
//! - [`p2p`]: Mooncake's P2P handshake, the embedded default. No server:
//!   a segment's name is the address of its engine's RPC port, and a
//!   Metadata frame to that port returns the segment descriptor.

pub mod p2p;
