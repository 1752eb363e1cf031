//! Transports: how bytes move between registered memory on two hosts.
//!
//! - [`tcp`]: Mooncake's TCP v2 data protocol on the shards' io_uring rings.
//! - `accept`: the accept loop the listeners share.

pub(crate) mod accept;
pub mod tcp;
