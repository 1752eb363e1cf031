//! # shardwire: a thread-per-core transfer engine
//!
//! shardwire moves bytes between the registered memory of processes, on one
//! host or many, and streams objects between nodes over HTTP. It speaks
//! Mooncake's Transfer Engine protocols and AIStore's object-stream
//! framing, so it can replace either peer without the other side noticing.
//!
//! ```text
//!   caller threads (Rust, Python, CLI)          RPC thread (P2P handshake)
//!        │ TransferEngine: check, slice, stripe        │ Metadata/Notify/Probe
//!        │ per-thread SPSC ring, made on first use     │
//!        ▼                                             ▼
//!   ┌────────────── shard 0 ──────────────┐ SPSC ┌──────── shard 1 ────────┐
//!   │ pinned to its planned CPU           │◀────▶│ ...                     │
//!   │ one io_uring, CQ reaped in userspace│      │                         │
//!   │ TCP client: a pipelined connection  │      │                         │
//!   │   per peer; TCP server sessions     │      │                         │
//!   │ object streams: send batches, HTTP  │      │                         │
//!   │   heads, receives into pipes        │      │                         │
//!   │ timers, poll hooks, local queue     │      │                         │
//!   │ parks on an eventfd when idle       │      │                         │
//!   └─────────────────────────────────────┘      └─────────────────────────┘
//!        │ pipe (one per received stream)
//!        ▼
//!   decoding thread: frames -> handler calls, one object at a time
//! ```
//!
//! - **[`topo`]** reads the machine (CPUs, NUMA nodes, NICs, GPUs) from a
//!   sysfs root, or the NIC matrix from `MC_CUSTOM_TOPO_JSON`, and derives a
//!   placement plan: one shard per physical core (or `SHARDWIRE_CORES`).
//! - **[`runtime`]** starts one shard per planned CPU: a pinned thread owning
//!   one io_uring (SINGLE_ISSUER + DEFER_TASKRUN where the kernel has them).
//!   Its loop reaps completions in userspace, drains its inbound SPSC rings,
//!   runs timers and poll hooks, enters the kernel only when it must, and
//!   parks on an eventfd after an adaptive spin budget. Producers write the
//!   eventfd only when the shard is parked. A panicking job fails alone.
//! - **[`proto`]** holds the sans-IO codecs: Mooncake's handshake frames and
//!   JSON messages, its TCP v2 header and status frames, and AIStore's
//!   objstream frames, PDUs and LZ4 framing.
//! - **[`engine`]** is the Mooncake-shaped API: registered memory (pinned
//!   while in use), managed buffers (a merging buddy allocator), batches with
//!   ids that are table keys, segments found through [`meta`].
//! - **[`transport`]** carries transfers on the shards: each shard keeps one
//!   pipelined TCP connection per peer and serves the sessions the data port
//!   accepts, moving bytes straight between sockets and registered memory.
//! - **[`meta`]** finds peers: the P2P handshake (a concurrent RPC server
//!   and client) or etcd, in Mooncake's key layout, with leased keys.
//! - **[`stream`]** carries AIStore-style object streams: a sender whose
//!   shard frames queued objects into one long HTTP PUT, a receiver whose
//!   shards parse HTTP and fill per-connection pipes that a decoding thread
//!   turns into handler calls, and bundles of streams to many nodes.
//! - **[`http`]** is our sans-IO HTTP/1.1 layer on `httparse`.
//! - **[`bench`](mod@bench)** measures against anchors in the same run.
//!
//! Protocol logic is free of I/O, so codecs are tested and fuzzed without
//! sockets. Every queue, frame and retry has a limit, and every transfer
//! settles exactly once: done, failed, or timed out.
//!
//! ## Where to read next
//!
//! - [`engine`] for the API, [`transport::tcp::client`] and
//!   [`transport::tcp::server`] for the data plane.
//! - [`runtime::shard`] for the loop, [`runtime::park`] for the wake
//!   protocol, [`runtime::spsc`] for the ring.
//! - `README.md` for the commands, the environment variables and the latest
//!   benchmark figures.

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;

pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod mem;
pub mod meta;
pub mod proto;
#[cfg(feature = "python")]
pub mod python;
pub mod runtime;
pub mod stream;
pub mod topo;
pub mod transport;
