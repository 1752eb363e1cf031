//! Per-shard poll hooks: how a transport with its own completion queue (an
//! RDMA CQ, say) is polled from the shard's loop, next to the io_uring CQ.

use super::ShardCtx;

/// Something the shard polls on every loop iteration.
pub trait PollHook {
    /// Polls once and handles what is ready. Returns how many events it
    /// handled; zero means idle, which lets the shard count towards parking.
    fn poll(&mut self, ctx: &mut ShardCtx) -> usize;

    /// Whether the shard may park now. A hook with work in flight that
    /// cannot wake a parked shard (a CQ without a completion channel) returns
    /// false, and the shard keeps spinning.
    fn can_park(&mut self) -> bool {
        true
    }

    /// Called once when the shard shuts down, before its ring is torn down.
    fn shutdown(&mut self, _ctx: &mut ShardCtx) {}
}

/// Identifies a hook for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HookId(pub(crate) u64);

/// Hook changes requested from inside the loop, applied between rounds.
pub(crate) enum HookChange {
    Add(HookId, Box<dyn PollHook>),
    Remove(HookId),
}
