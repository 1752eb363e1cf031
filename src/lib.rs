//! # shardwire: a thread-per-core transfer engine
//!
//! shardwire moves bytes between the registered memory of processes, on one
//! host or many, and streams objects between nodes over HTTP. It speaks
//! Mooncake's Transfer Engine protocols and AIStore's object-stream format,
//! so it can replace either peer without the other side noticing.
//!
//! ## The shape
//!
//! ```text
//!            caller threads (Rust, Python, CLI)       control thread
//!                 │ per-thread SPSC ring, made on first use    │
//!                 ▼                                             ▼
//!   ┌──────────── shard 0 ────────────┐   SPSC   ┌──────────── shard 1 ───────┐
//!   │ pinned to its planned CPU       │◀────────▶│ ...                        │
//!   │ one io_uring: SQ/CQ polled in   │  (one    │                            │
//!   │   userspace, enter only if due  │  ring    │                            │
//!   │ poll hooks (RDMA CQ)            │  per     │                            │
//!   │ timers, local queue             │  pair)   │                            │
//!   │ parks on an eventfd after the   │          │                            │
//!   │   spin budget                   │          │                            │
//!   └─────────────────────────────────┘          └────────────────────────────┘
//! ```
//!
//! - **[`topo`]** reads the machine (CPUs, NUMA nodes, NICs, GPUs) from a
//!   sysfs root, or the NIC matrix from `MC_CUSTOM_TOPO_JSON`, and derives a
//!   placement plan: one shard per physical core (or `SHARDWIRE_CORES`), each
//!   with its NUMA node and preferred NICs.
//! - **[`runtime`]** starts one shard per planned CPU. A shard is a pinned
//!   thread owning one io_uring (SINGLE_ISSUER + DEFER_TASKRUN where the
//!   kernel has them). Its loop reaps completions in userspace, drains its
//!   inbound SPSC rings, runs timers and poll hooks, enters the kernel only
//!   when it must, and parks on an eventfd after a spin budget that shrinks
//!   when the core is shared. Producers write the eventfd only when the shard
//!   is parked. A panicking job fails alone.
//! - **[`bench`]** measures the runtime against plain-thread anchors in the
//!   same run (`shardwire bench runtime`).
//!
//! Protocol logic is kept free of I/O, so codecs and state machines are
//! tested without sockets; the runtime is the only place that touches rings,
//! threads and descriptors. Every queue, frame and retry has a limit.
//!
//! ## Where to read next
//!
//! - [`runtime::shard`] for the loop, [`runtime::park`] for the wake
//!   protocol, [`runtime::spsc`] for the ring.
//! - [`topo::sysfs`] for discovery, [`topo::matrix`] for the Mooncake
//!   matrix format, [`topo::plan`] for placement.
//! - `README.md` for the commands, the environment variables and the latest
//!   benchmark figures.

pub mod bench;
pub mod engine;
pub mod meta;
pub mod proto;
pub mod runtime;
pub mod topo;
pub mod transport;
