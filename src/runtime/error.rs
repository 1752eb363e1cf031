//! Errors of the shard runtime.

/// The runtime could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("runtime configuration: {0}")]
    Config(String),
    #[error("shard {shard}{}: {fault}", cpu.map(|c| format!(" (CPU {c})")).unwrap_or_default())]
    Shard { shard: usize, cpu: Option<u32>, fault: String },
}

/// Work could not be handed to a shard from outside the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("no shard {shard}: the runtime has {count}")]
    NoSuchShard { shard: usize, count: usize },
    #[error("shard {shard}'s inbound ring is full")]
    Full { shard: usize },
    #[error("the runtime is shut down")]
    ShutDown,
    #[error("shard {shard} already has {limit} foreign threads feeding it (raise foreign_rings_max)")]
    TooManyThreads { shard: usize, limit: usize },
    #[error("shard {shard}'s inbound ring stayed full for {waited_ms} ms")]
    Timeout { shard: usize, waited_ms: u64 },
    #[error("a shard cannot block on a call to itself")]
    WouldDeadlock,
}

/// A job's result could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("the shard shut down before the job ran")]
    Canceled,
    #[error("the job panicked: {0}")]
    Panicked(String),
}

/// A shard could not pass work to another shard. The task comes back.
pub enum SendError<T> {
    /// The destination's ring from this shard is full.
    Full(T),
    /// The destination has shut down.
    Closed(T),
    /// There is no such shard.
    NoSuchShard(T),
}

impl<T> SendError<T> {
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(t) | SendError::Closed(t) | SendError::NoSuchShard(t) => t,
        }
    }
}

impl<T> std::fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::Full(_) => "Full",
            SendError::Closed(_) => "Closed",
            SendError::NoSuchShard(_) => "NoSuchShard",
        })
    }
}

/// A timer could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    #[error("the shard already has {0} timers")]
    TooMany(usize),
    #[error("the shard is shutting down")]
    ShuttingDown,
}

/// An io_uring operation could not be queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("the shard already has {0} operations in flight")]
    TooMany(usize),
    #[error("the submission queue is full and the kernel did not take entries: {0}")]
    QueueFull(String),
    #[error("the shard is shutting down")]
    ShuttingDown,
}
