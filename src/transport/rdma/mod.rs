//! The RDMA transport, as it is built (issue 11). So far: the rules that
//! turn a request into slices and pick each slice's rail ([`plan`]); the
//! control plane it speaks is in [`crate::proto::mooncake::rdma`]. Until
//! the fabric and the shard driver land, `protocol = "rdma"` is served over
//! TCP.

pub mod plan;
