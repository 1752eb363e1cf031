//! Object streams: AIStore's transport, on the shards.
//!
//! A stream carries many objects (a header and a body each) from a sender
//! to a receiver over one long-lived HTTP PUT to `/v1/objstream/<trname>`,
//! in AIStore's objstream framing ([`crate::proto::objstream`]).
//!
//! - [`rx`]: the receiver. Shards accept, receive and parse HTTP; each
//!   connection's bodies are decoded by a thread of its own that calls the
//!   handler registered for the trname once per object.
//! - [`tx`]: the sender, [`tx::Stream`]: a queue with back-pressure, framed
//!   into HTTP chunks on its shard, with one completion per object.
//! - [`bundle`]: streams to many nodes, `multiplier` per node, with one
//!   completion per object after its last replica.
//! - [`pipe`]: the byte ring between a shard and that thread.
//! - [`stats`]: per-stream and per-endpoint figures.

pub mod bundle;
#[doc(hidden)]
pub mod fuzzing;
pub mod pipe;
pub mod rx;
pub mod stats;
pub mod tx;

pub use bundle::{Bundle, BundleBody};
pub use rx::{EndpointStats, HandlerError, ObjReader, Receiver, RecvError, RecvHandler, RegError, RxOptions, Session};
pub use stats::{RxStats, Stats};
pub use tx::{Body, Stream, StreamError, StreamOptions, Termination};
