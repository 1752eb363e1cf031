//! Metrics: counted per thread on the hot path, published about every
//! 100 ms, read as Prometheus text, as a dict, or as Mooncake's log line.
//!
//! - [`counters`]: the plain per-thread counters every layer records into
//!   (transfers by operation, transport and side, latencies, connections,
//!   fallbacks, RDMA devices, object streams), and the snapshot that sums
//!   them.
//! - [`prom`]: metric names and help; the snapshot as samples and as a
//!   flat map (`engine.metrics()`); the `metrics-exporter-prometheus`
//!   recorder they feed.
//! - [`serve`]: the HTTP endpoint (`SHARDWIRE_METRICS_ADDR`, and
//!   `shardwire node --http`).
//! - [`mc_log`]: `MC_TE_METRIC=1`'s periodic log line, in Mooncake's shape.

pub mod counters;
pub mod mc_log;
pub mod prom;
pub mod serve;

pub use counters::{Direction, Event, Op, Side, StreamDelta, Via};
