//! Metadata: how engines find each other's segments.
//!
//! - [`p2p`]: Mooncake's P2P handshake, the embedded default. No server:
//!   a segment's name is the address of its engine's RPC port, and a
//!   Metadata frame to that port returns the segment descriptor.
//! - [`etcd`]: descriptors in etcd, under Mooncake's keys, through etcd's
//!   v3 JSON gateway, with a lease so dead engines leave no keys behind.

pub mod etcd;
pub mod p2p;
