//! Registered memory: the regions transfers may touch, the pins that keep
//! them registered while an operation uses them, and the managed buffers the
//! engine maps and hands out.
//!
//! - [`registry`]: regions, pins, and unregistration that waits for pins
//!   to drain (so no byte lands in memory after it was released).
//! - [`buddy`]: the merging buddy allocator behind managed buffers.
//! - [`managed`]: slabs (and large mappings) registered and carved up.
//! - [`probe`]: whether a range is mapped, and copies that fail instead
//!   of faulting.
//!
//! This layer sits below the transports and the engine: both look down at
//! it, and it looks at nothing above the runtime.

pub mod buddy;
pub mod managed;
pub mod probe;
pub mod registry;

pub use registry::{Pin, Region, Registry};
