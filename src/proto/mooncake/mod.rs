//! Mooncake Transfer Engine wire formats, bit for bit.
//!
//! - [`frame`]: the RPC (handshake) port's typed frames: a u64 little-endian
//!   length covering a type byte and a JSON body.
//! - [`message`]: the JSON bodies: segment descriptors, the RDMA connection
//!   descriptor, notifications, probes.
//! - [`tcp`]: the TCP data port's 24-byte request header, the v2 "MCTV"
//!   status frames, and the server's address validation.
//! - [`name`]: `host:port` segment names, IPv6 included.
//! - [`rdma`]: the RDMA control plane checked: devices, keys, the priority
//!   matrix, NIC paths, GIDs, the Connection exchange.
//! - [`client`] and [`server`]: the TCP v2 connection state machines
//!   (pipelining, answers, rejections, closes, drains), free of I/O.

pub mod client;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod harness;
pub mod message;
pub mod name;
pub mod rdma;
pub mod server;
pub mod tcp;
