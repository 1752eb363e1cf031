//! Half-close, then drain: how a server that has answered with an error
//! ends a connection the client is still sending on.
//!
//! Closing a socket with unread bytes in it makes the kernel reset the
//! connection, and a reset can destroy the answer before the client reads
//! it. So after the answer is out the server shuts its write side (FIN),
//! reads and drops what the client still sends, and closes when the client
//! closes too, or when enough bytes or time have gone by. Both servers (the
//! TCP data port's sessions and the object-stream receiver) end this way,
//! through this one state machine.

use std::time::{Duration, Instant};

/// Bounds on a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LingerLimits {
    pub bytes_max: u64,
    pub time: Duration,
}

impl Default for LingerLimits {
    fn default() -> Self {
        Self { bytes_max: 64 << 20, time: Duration::from_secs(1) }
    }
}

/// A drain in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linger {
    limits: LingerLimits,
    deadline: Instant,
    drained: u64,
    half_closed: bool,
    done: Option<&'static str>,
}

impl Linger {
    /// Starts a drain at `now`.
    pub fn new(limits: LingerLimits, now: Instant) -> Self {
        Self { limits, deadline: now + limits.time, drained: 0, half_closed: false, done: None }
    }

    /// Once: the driver shuts the socket's write side now.
    pub fn poll_half_close(&mut self) -> bool {
        !std::mem::replace(&mut self.half_closed, true)
    }

    /// When the drain ends at the latest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `n` bytes were read and dropped (`n == 0`: the client closed).
    pub fn on_drained(&mut self, n: usize) {
        if n == 0 {
            self.done.get_or_insert("the client closed");
            return;
        }
        self.drained += n as u64;
        if self.drained >= self.limits.bytes_max {
            self.done.get_or_insert("drained enough");
        }
    }

    /// Time passed.
    pub fn on_timer(&mut self, now: Instant) {
        if now >= self.deadline {
            self.done.get_or_insert("the drain timed out");
        }
    }

    /// Why the drain is over, once it is: the driver closes.
    pub fn done(&self) -> Option<&'static str> {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_on_close_bytes_or_time() {
        let now = Instant::now();
        let limits = LingerLimits { bytes_max: 100, time: Duration::from_secs(1) };
        let mut l = Linger::new(limits, now);
        assert!(l.poll_half_close());
        assert!(!l.poll_half_close(), "once");
        l.on_drained(60);
        l.on_timer(now + Duration::from_millis(999));
        assert_eq!(l.done(), None);
        l.on_drained(40);
        assert_eq!(l.done(), Some("drained enough"));
        let mut l = Linger::new(limits, now);
        l.on_timer(now + Duration::from_secs(1));
        assert_eq!(l.done(), Some("the drain timed out"));
        let mut l = Linger::new(limits, now);
        l.on_drained(0);
        assert_eq!(l.done(), Some("the client closed"));
        assert_eq!(l.deadline(), now + Duration::from_secs(1));
    }
}
