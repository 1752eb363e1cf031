//! The one way the tests wait for something to happen: poll a condition
//! until a deadline, never sleep a guessed time and hope. A test that
//! does not include `interop` takes this file alone
//! (`#[path = "interop/poll.rs"] mod poll;`).

#![allow(dead_code)]

use std::time::{Duration, Instant};

/// How long a wait may last by default: far beyond what any condition
/// needs on an idle machine, so a loaded one (two busy cores, a debug
/// build) still gets there; only a real hang runs into it.
pub const WAIT: Duration = Duration::from_secs(30);

/// Polls `check` until it returns `Ok`, for at most `limit`, and returns
/// its value; otherwise panics naming `what` and the last `Err`. The
/// polls start 1 ms apart and back off to 50 ms, so a condition met at
/// once costs little and a long wait does not spin.
pub fn poll_until<T, E: std::fmt::Debug>(what: &str, limit: Duration, check: impl FnMut() -> Result<T, E>) -> T {
    match poll_for(limit, check) {
        Ok(v) => v,
        Err(e) => panic!("{what}: not so after {limit:?}; last: {e:?}"),
    }
}

/// [`poll_until`] for a yes-or-no condition.
pub fn poll_true(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    poll_until(what, limit, || if ready() { Ok(()) } else { Err("not yet") })
}

/// Polls `check` as [`poll_until`] does, but hands back the last `Err`
/// when `limit` passes instead of panicking (a grace period before a
/// harder measure, such as a kill).
pub fn poll_for<T, E>(limit: Duration, mut check: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// Waits for `child` to exit, for at most `limit`: its status, or `None`
/// if it still runs then (the caller kills it, and fails if it must).
pub fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    poll_for(limit, || match child.try_wait() {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err(()),
        Err(e) => panic!("waiting for a child: {e}"),
    })
    .ok()
}
