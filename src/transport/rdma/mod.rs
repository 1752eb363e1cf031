//! The RDMA transport: Mooncake's RDMA data path and control plane, on
//! any fabric.
//!
//! - [`fabric`]: the `Fabric` seam, the verbs the transport uses;
//! - [`sim`]: a deterministic in-process fabric with a fault plan;
//! - [`emu`]: an emulated fabric across processes: each device a "soft
//!   NIC" serving one-sided reads and writes over sockets, addressed by
//!   the real Connection handshake, with faults to inject
//!   (`SHARDWIRE_FABRIC=emu`);
//! - [`rules`]: what a device enforces, stated once for the fabrics
//!   that enforce it in software;
//! - [`plan`]: the rules that cut a request into slices and pick each
//!   slice's rail;
//! - [`slices`]: one shard's RDMA work on any fabric: endpoints, chains,
//!   completions, retries on other rails, rail pauses; every slice settles
//!   once (tested under a thousand seeded fault plans on `sim`).
//! - [`shard`]: a slice engine installed on a shard, polled by the shard's
//!   loop beside its io_uring ring (no parking while work is in flight),
//!   fed from any thread over the runtime's rings;
//! - [`placement`]: which shard owns each device (its own NUMA node), the
//!   local priority matrix, and how work is dealt to the owning shards;
//! - [`transport`]: the engine's RDMA transport: slice engines on the
//!   owning shards, endpoints through the Connection RPC on helper threads;
//! - [`idhash`]: a cheap hasher for the maps keyed by our own ids.
//! - `verbs` (feature `verbs`): the machine's devices through sideway,
//!   tested on soft-RoCE in `tools/rdma-vm`.
//!
//! The control plane it speaks is in [`crate::proto::mooncake::rdma`].

pub mod emu;
pub mod fabric;
pub mod idhash;
pub mod placement;
pub mod plan;
pub mod rules;
pub mod shard;
pub mod sim;
pub mod slices;
pub mod transport;
#[cfg(feature = "verbs")]
pub mod verbs;
