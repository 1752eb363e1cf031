//! The RDMA transport, as it is built (issue 11). So far:
//!
//! - [`fabric`]: the `Fabric` seam, the verbs the transport uses;
//! - [`sim`]: a deterministic in-process fabric with a fault plan;
//! - [`plan`]: the rules that cut a request into slices and pick each
//!   slice's rail.
//!
//! The control plane it speaks is in [`crate::proto::mooncake::rdma`].
//! Until the shard driver lands, `protocol = "rdma"` is served over TCP.

pub mod fabric;
pub mod plan;
pub mod sim;
