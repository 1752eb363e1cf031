//! Metadata: how engines find each other's segments.
//!
//! - [`p2p`]: Mooncake's P2P handshake, the embedded default. No server:
//!   a segment's name is the address of its engine's RPC port, and a
//!   Metadata frame to that port returns the segment descriptor.
//! - A central store, in Mooncake's key layout ([`store`]: the
//!   [`store::KvStore`] interface and an engine's [`store::Registration`]):
//!   - [`etcd`]: etcd's v3 JSON gateway (`etcd://h1:2379,h2:2379`, or a
//!     bare `host:port`), with a lease so dead engines leave no keys
//!     behind;
//!   - [`http`]: Mooncake's HTTP protocol (`http://host:port/path`), with
//!     its timeouts, on a kept connection;
//!   - [`redis`]: `redis://host:port[/db]` with `GET`/`SET`/`DEL`,
//!     `MC_REDIS_USERNAME`, `MC_REDIS_PASSWORD` and `MC_REDIS_DB_INDEX`.
//!
//! `MC_METADATA_CLUSTER_ID=<id>` moves every store's keys under
//! `mooncake/<id>/`.
//!
//! [`http_server`] is the other side of [`http`]: `shardwire
//! metadata-server`, a server Mooncake engines use unchanged, that keeps
//! its state in a file and drops the keys of engines that no longer answer.

pub mod etcd;
pub mod http;
pub mod http_server;
pub mod p2p;
pub mod redis;
pub mod store;
