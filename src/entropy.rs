//! Random bytes from the kernel (`getrandom(2)`): the authentication's
//! nonces, and tokens that must differ between processes. Kept apart so
//! that the sans-IO layers (`proto`) take their nonces as arguments.

/// `N` random bytes. `getrandom(2)` without flags blocks until the kernel's
/// pool is seeded and then does not fail, short of a kernel older than
/// 3.17 (no such call) or an interrupting signal (retried, boundedly).
pub fn bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut filled = 0;
    // Bounded: a signal cuts a call short at most once per try.
    for _ in 0..16 {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `out`, which lives across the call.
        let n = unsafe { libc::getrandom(out[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
        if filled == N {
            return out;
        }
    }
    panic!("getrandom(2) failed to fill {N} bytes: {}", std::io::Error::last_os_error());
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ() {
        assert_ne!(super::bytes::<32>(), super::bytes::<32>());
    }
}
