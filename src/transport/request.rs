//! What every transport carries and how it reports back: a request (bytes
//! between local registered memory and a peer's), its ticket (the pin that
//! keeps the local region registered, and the sink to settle into), and the
//! status it settles with.
//!
//! The engine implements [`Sink`] for its batches, so transports report
//! completions without knowing what a batch is.

use std::sync::Arc;
use std::time::Instant;

use crate::mem::Pin;
use crate::proto::mooncake::client::Req;
pub use crate::proto::mooncake::tcp::Opcode;

/// Mooncake's `TransferStatusEnum`, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TransferStatus {
    Waiting = 0,
    Pending = 1,
    Invalid = 2,
    Canceled = 3,
    Completed = 4,
    Timeout = 5,
    Failed = 6,
}

impl TransferStatus {
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Waiting,
            1 => Self::Pending,
            2 => Self::Invalid,
            3 => Self::Canceled,
            4 => Self::Completed,
            5 => Self::Timeout,
            _ => Self::Failed,
        }
    }

    /// Whether a request may end in this state (a request never settles as
    /// waiting, pending, invalid or completed-with-an-error).
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::Timeout | Self::Canceled)
    }
}

/// Where a request's outcome goes: once per request, from whichever thread
/// settles it (a shard, or the caller's own thread).
pub trait Sink: Send + Sync {
    /// Request `task` of this sink moved `bytes` (`Ok`), or failed.
    fn settle(&self, task: usize, outcome: Result<u64, (TransferStatus, &str)>);

    /// Request `task` failed because its bytes did not match their CRC-32C
    /// (shardwire's TCP extension): a failure, which a sink may report
    /// with its own code.
    fn settle_corrupt(&self, task: usize, why: &str) {
        self.settle(task, Err((TransferStatus::Failed, why)));
    }

    /// Request `task` failed because the peer process it was addressed to
    /// has exited or been replaced by another under its name: a failure,
    /// which a sink may report with its own code.
    fn settle_gone(&self, task: usize, why: &str) {
        self.settle(task, Err((TransferStatus::Failed, why)));
    }
}

/// What a request carries besides its addresses: its sink and task index,
/// and the pin of its local region.
///
/// A ticket settles exactly once: through [`Ticket::done`] or
/// [`Ticket::fail`], or, if it is dropped without either (a shard shutting
/// down with it queued, a panic), as a failure from `Drop`. So whatever
/// waits on the sink always hears back.
pub struct Ticket {
    sink: Arc<dyn Sink>,
    task: usize,
    pin: Option<Pin>,
    armed: bool,
}

impl Ticket {
    pub fn new(sink: Arc<dyn Sink>, task: usize, pin: Pin) -> Self {
        Self { sink, task, pin: Some(pin), armed: true }
    }

    /// Whether this ticket settles into `sink`.
    pub fn is_for(&self, sink: &Arc<dyn Sink>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.sink), Arc::as_ptr(sink))
    }

    /// The request moved all its `bytes`.
    pub fn done(mut self, bytes: u64) {
        self.armed = false;
        self.pin.take();
        self.sink.settle(self.task, Ok(bytes));
    }

    /// The request's bytes failed their CRC-32C.
    pub fn fail_corrupt(mut self, why: &str) {
        self.armed = false;
        self.pin.take();
        self.sink.settle_corrupt(self.task, why);
    }

    /// The peer process the request was addressed to is gone (exited, or
    /// replaced under its name); it was not carried out.
    pub fn fail_gone(mut self, why: &str) {
        self.armed = false;
        self.pin.take();
        self.sink.settle_gone(self.task, why);
    }

    /// The request failed.
    pub fn fail(mut self, status: TransferStatus, why: &str) {
        debug_assert!(status.is_failure());
        self.armed = false;
        self.pin.take();
        self.sink.settle(self.task, Err((status, why)));
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            self.pin.take();
            self.sink.settle(
                self.task,
                Err((
                    TransferStatus::Failed,
                    "the transfer was dropped before it finished (engine or shard shutting down)",
                )),
            );
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket(task {})", self.task)
    }
}

/// A request as transports carry it.
pub type Request = Req<Ticket>;

/// A request for `len` bytes between local `local` and the peer's `remote`.
pub fn request(op: Opcode, local: u64, remote: u64, len: u64, deadline: Instant, ticket: Ticket) -> Request {
    Req { op, local, remote, len, deadline, retries: 1, ticket }
}
