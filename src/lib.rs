//! # shardwire: a thread-per-core transfer engine
//!
//! shardwire moves bytes between the registered memory of processes, on one
//! host or many, and streams objects between nodes over HTTP. It speaks
//! Mooncake's Transfer Engine protocols and AIStore's object-stream
//! framing, so it can replace either peer without the other side noticing.
//!
//! ## Layers (each looks only down)
//!
//! ```text
//!   python/, bin/        the PyO3 module, the CLI; bench/ (anchored measurements)
//!   engine/              Mooncake's API: batches, status, segments; picks a transport per segment
//!   stream/              object streams: tx and rx (a sans-IO core + a shard driver each), bundles
//!   transport/           the Transport trait; requests, tickets, the Sink the engine implements;
//!                        tcp/: io_uring client and server drivers, and the caller-thread driver;
//!                        local/: same-host copies (shared memfds, cross-memory attach), a control table,
//!                        the helper crew for large copies;
//!                        rdma/: the Fabric seam, its verbs (sideway, feature `verbs`), sim and emu backends, the slice engine a shard polls, the transport
//!   meta/                P2P handshake, etcd
//!   proto/, http/        sans-IO: codecs AND connection cores (events in, actions out), fuzzed
//!   runtime/, topo/, mem/  shards and rings, the shared runtime; topology; registry, pins, managed memory
//!   config, error        every environment variable, checked; the error type and Mooncake's codes
//!   entropy              random bytes from the kernel (nonces, tokens); proto takes them as arguments
//!   liveness             keepalive and TCP_USER_TIMEOUT from a timeout: every TCP socket notices a
//!                        peer whose host vanished without a word
//!   sync                 std's atomics, or loom's under `--cfg loom`, for the structures loom checks
//!   telemetry/           metrics: plain per-thread counters every layer records into, published
//!                        every ~100 ms; Prometheus text, engine.metrics(), Mooncake's metric line
//! ```
//!
//! A transfer: the engine checks both ends, slices the requests (and
//! stripes them, for a transport that wants stripes), and hands each (with
//! a [`transport::request::Ticket`]: its pin and the batch to settle into)
//! to the segment's transport. TCP deals them
//! to the shards, at most a bounded number per shard (the caller waits for
//! room), where a driver feeds one [`proto::mooncake::client::ClientConn`]
//! per peer; the peer's shard drives one
//! [`proto::mooncake::server::ServerSession`] per connection. One small
//! synchronous request skips the shards: the calling thread drives the same
//! client core over a blocking socket (the direct path). A peer on this
//! host takes the local transport instead: the calling thread copies into
//! the target's shared memfd (managed memory) or through cross-memory
//! attach (other registered memory), inside the lane protocol of the
//! target's control table, so nothing lands after the target withdraws the
//! memory; a large copy or batch it shares with a few helper threads, and
//! returns when they are done. An RDMA peer (`protocol = "rdma"` on a
//! fabric: real devices through verbs, the simulated one, or the emulated
//! one across processes) is served by slice engines on the shards that own
//! the devices (each on its own NUMA node), whose poll hooks drive the
//! completion queues beside the io_uring ring; requests are dealt to the
//! shards owning their memory's devices, endpoints that fail, stall or
//! outlive a deadline are flushed, and work no rail of a shard carries
//! goes to another shard, then to TCP, so every request settles exactly
//! once. A request addressed to a peer process that has since exited or
//! been replaced under its name settles as gone (`PEER_GONE`), never in
//! the new process: every shardwire descriptor carries an instance number,
//! and every TCP request a tag of it.
//!
//! ```text
//!   caller threads (Rust, Python, CLI)            RPC thread (P2P handshake)
//!     │ TransferEngine: check, slice, stripe, route     │ Metadata/Notify/Probe
//!     │──── one small sync request ─────┐               │
//!     ▼ bounded hand-off (SPSC ring)    ▼ direct path: ClientConn over a blocking socket
//!   ┌────────────── shard 0 ──────────────┐ SPSC ┌──────── shard 1 ────────┐
//!   │ pinned; one io_uring, CQ in userspace│◀────▶│ ...                     │
//!   │ TCP: ClientConn per peer,            │      │                         │
//!   │      ServerSession per connection    │      │                         │
//!   │ streams: TxConn per stream,          │      │                         │
//!   │      RxConn per connection (+ pipe)  │      │                         │
//!   │ timers, poll hooks; parks when idle  │      │                         │
//!   └──────────────────────────────────────┘      └─────────────────────────┘
//!        │ pipe (one per received stream)      ▲ chunks read by the sending thread
//!        ▼                                     │ (readers never run on a shard)
//!   decoding thread: frames -> handler calls
//! ```
//!
//! - **[`config`]** reads and range-checks every `MC_*`, `SHARDWIRE_*` and
//!   `AIS_*` variable; a bad value stops `initialize`, a stream, a receiver
//!   or the CLI with a message naming it.
//! - **[`topo`]** reads the machine from a sysfs root (or the NIC matrix
//!   from `MC_CUSTOM_TOPO_JSON`) and derives a placement plan.
//! - **[`runtime`]** runs one pinned shard per planned CPU, each owning one
//!   io_uring; its loop reaps completions in userspace, drains its SPSC
//!   rings, runs timers and poll hooks, and parks on an eventfd after an
//!   adaptive spin.
//! - **[`mem`]** keeps registered regions and their pins (unregistering
//!   waits for pins to drain), managed buffers, and fault-safe probes.
//! - **[`proto`]** and **[`http`]** hold every protocol rule without I/O:
//!   Mooncake's handshake and TCP v2 codecs and connection cores, AIStore's
//!   objstream frames, half-close-and-drain, HTTP heads and bodies.
//! - **[`transport`]** carries requests: [`transport::Transport`] is the
//!   seam every data plane implements (TCP, same-host, RDMA).
//! - **[`meta`]** finds peers: the P2P handshake or etcd.
//! - **[`stream`]** carries AIStore-style object streams.
//! - **[`engine`]** is the Mooncake-shaped API on top.
//! - **[`telemetry`]** counts what every layer does, per thread and without
//!   a shared atomic on the hot path, and serves it as Prometheus metrics.
//!
//! Every queue, frame and retry has a limit, and every transfer and object
//! settles exactly once: done, failed, canceled or timed out.
//!
//! ## Where to read next
//!
//! - [`engine`] for the API; [`transport`] for the seam;
//!   [`proto::mooncake::client`] and [`proto::mooncake::server`] for the
//!   data protocol's rules, [`transport::tcp`] for their drivers;
//!   [`transport::rdma`] for the RDMA transport (its slice engine, fabrics
//!   and placement).
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
pub(crate) mod entropy;
pub mod error;
pub mod http;
pub mod liveness;
pub mod mem;
pub mod meta;
pub mod proto;
#[cfg(feature = "python")]
pub mod python;
pub mod runtime;
pub mod stream;
pub(crate) mod sync;
pub mod telemetry;
pub mod topo;
pub mod transport;
