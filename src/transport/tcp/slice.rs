//! A slice: the unit one TCP request carries, and how it reports back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::batch::{Batch, TransferStatus};
use crate::engine::registry::Pin;
use crate::proto::mooncake::tcp::Opcode;

/// A peer's data port and the protocol version it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Whether the peer sends v2 status frames (`tcp_proto_version >= 2`).
    pub v2: bool,
}

/// One request's worth of bytes between local and remote memory.
///
/// A slice always reports exactly once: `complete`, `fail`, or, if it is
/// dropped without either (a shard shutting down with it queued, a panic),
/// a failure from `Drop`. So a batch always settles.
pub struct Slice {
    pub op: Opcode,
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    pub batch: Arc<Batch>,
    pub task: usize,
    pub deadline: Instant,
    /// Times the slice may still be re-sent on a fresh connection.
    pub retries: u8,
    /// Keeps the local region registered while the slice is in flight.
    pub pin: Option<Pin>,
    armed: bool,
}

impl Slice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        op: Opcode,
        local: u64,
        remote: u64,
        len: u64,
        batch: Arc<Batch>,
        task: usize,
        deadline: Instant,
        pin: Pin,
    ) -> Self {
        Self { op, local, remote, len, batch, task, deadline, retries: 1, pin: Some(pin), armed: true }
    }

    /// Bytes this slice puts on the wire after its header.
    pub fn send_payload(&self) -> u64 {
        if self.op == Opcode::Write { self.len } else { 0 }
    }

    /// The slice moved all its bytes.
    pub fn complete(mut self) {
        self.armed = false;
        self.pin.take();
        self.batch.slice_done(self.task, self.len);
    }

    /// The slice failed.
    pub fn fail(mut self, status: TransferStatus, why: &str) {
        self.armed = false;
        self.pin.take();
        self.batch.slice_failed(self.task, status, why);
    }
}

impl Drop for Slice {
    fn drop(&mut self) {
        if self.armed {
            self.pin.take();
            self.batch.slice_failed(
                self.task,
                TransferStatus::Failed,
                "the transfer was dropped before it finished (engine or shard shutting down)",
            );
        }
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({:?} {} bytes local {:#x} remote {:#x})", self.op, self.len, self.local, self.remote)
    }
}
