//! How an RDMA request becomes work requests: the slices it is cut into
//! and the rail (local and peer device) each slice takes. Pure functions of
//! their inputs, so the rules are tested here and every driver (real verbs,
//! the simulated and the emulated fabric) follows the same ones.
//!
//! - **Slices** follow Mooncake's rule: `MC_SLICE_SIZE` bytes each, and the
//!   rest in one last slice once it is at most a slice and a fragment
//!   (`MC_SLICE_SIZE / MC_FRAGMENT_RATIO`) long, so no tiny tail goes out on
//!   its own. No slice crosses the end of a memory region on either side (a
//!   buffer above a device's `max_mr_size` is several regions).
//! - **Rails** are chosen per slice, not per request as Mooncake does:
//!   slices of one request spray round-robin over every preferred device of
//!   the buffer's location that is up, so one large request uses every
//!   rail. A retry moves to another rail, over the preferred devices and
//!   then the others.

use crate::topo::MatrixEntry;

/// Mooncake's default `MC_SLICE_SIZE`.
pub const SLICE_BYTES_DEFAULT: u64 = 64 << 10;
/// Mooncake's default `MC_FRAGMENT_RATIO`.
pub const FRAGMENT_RATIO_DEFAULT: u64 = 4;
/// The most slices one request is cut into; a larger request is refused
/// (at 64 KiB slices, 64 GiB).
pub const SLICES_PER_REQUEST_MAX: u64 = 1 << 20;

/// One slice of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Bytes into the request.
    pub offset: u64,
    pub len: u64,
    pub local: u64,
    pub remote: u64,
}

/// The slicing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceRule {
    pub slice_bytes: u64,
    pub fragment_ratio: u64,
}

impl Default for SliceRule {
    fn default() -> Self {
        SliceRule { slice_bytes: SLICE_BYTES_DEFAULT, fragment_ratio: FRAGMENT_RATIO_DEFAULT }
    }
}

/// Why a request cannot be cut.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceFault {
    #[error("a request of {len} bytes makes more than {SLICES_PER_REQUEST_MAX} slices of {slice_bytes}")]
    TooManySlices { len: u64, slice_bytes: u64 },
    #[error("{side} address {addr:#x} is not inside a registered memory region")]
    Unregistered { side: &'static str, addr: u64 },
    #[error("the request runs past the end of the address space")]
    Overflow,
}

impl SliceRule {
    /// The longest tail merged into the last slice.
    pub fn fragment_bytes(&self) -> u64 {
        self.slice_bytes / self.fragment_ratio.max(1)
    }

    /// Cuts `len` bytes from `local` to `remote` into slices.
    /// `local_end(a)` and `remote_end(a)` give the end of the memory region
    /// holding address `a` on each side (`None`: not registered); no slice
    /// crosses one.
    pub fn cut(
        &self,
        local: u64,
        remote: u64,
        len: u64,
        local_end: impl Fn(u64) -> Option<u64>,
        remote_end: impl Fn(u64) -> Option<u64>,
    ) -> Result<Vec<Slice>, SliceFault> {
        assert!(self.slice_bytes > 0, "a slice rule with empty slices");
        if local.checked_add(len).is_none() || remote.checked_add(len).is_none() {
            return Err(SliceFault::Overflow);
        }
        if len.div_ceil(self.slice_bytes) > SLICES_PER_REQUEST_MAX {
            return Err(SliceFault::TooManySlices { len, slice_bytes: self.slice_bytes });
        }
        let mut slices = Vec::with_capacity(len.div_ceil(self.slice_bytes) as usize);
        let mut offset = 0;
        while offset < len {
            let (l, r) = (local + offset, remote + offset);
            let l_end = local_end(l).filter(|&e| e > l).ok_or(SliceFault::Unregistered { side: "local", addr: l })?;
            let r_end = remote_end(r).filter(|&e| e > r).ok_or(SliceFault::Unregistered { side: "remote", addr: r })?;
            let rest = len - offset;
            let mut n = if rest <= self.slice_bytes + self.fragment_bytes() { rest } else { self.slice_bytes };
            n = n.min(l_end - l).min(r_end - r);
            debug_assert!(n > 0 && offset + n <= len);
            slices.push(Slice { offset, len: n, local: l, remote: r });
            offset += n;
            // Region boundaries may add slices; still bounded.
            if slices.len() as u64 > 2 * SLICES_PER_REQUEST_MAX {
                return Err(SliceFault::TooManySlices { len, slice_bytes: self.slice_bytes });
            }
        }
        Ok(slices)
    }
}

/// `n % d` for `d` in 1..=64 without a division (one is called for twice
/// a slice, and a division costs tens of cycles): Lemire's multiply-based
/// remainder, on `n`'s low 32 bits (the spray's pattern restarts every
/// 2^32 slices, which is harmless).
fn mod_small(n: u64, d: u32) -> u32 {
    const fn reciprocals() -> [u64; 65] {
        let mut m = [0u64; 65];
        let mut d = 1;
        while d <= 64 {
            m[d] = (u64::MAX / d as u64).wrapping_add(1);
            d += 1;
        }
        m
    }
    const M: [u64; 65] = reciprocals();
    debug_assert!((1..=64).contains(&d));
    let low = M[d as usize].wrapping_mul(u64::from(n as u32));
    ((u128::from(low) * u128::from(d)) >> 64) as u32
}

/// The devices a location may use, by index: the preferred ones, then the
/// others.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rails {
    pub preferred: Vec<usize>,
    pub available: Vec<usize>,
}

impl Rails {
    /// A matrix entry's devices, by `index_of` (names it does not know are
    /// left out).
    pub fn from_entry(entry: &MatrixEntry, index_of: impl Fn(&str) -> Option<usize>) -> Rails {
        Rails {
            preferred: entry.preferred.iter().filter_map(|n| index_of(n)).collect(),
            available: entry.available.iter().filter_map(|n| index_of(n)).collect(),
        }
    }

    /// The rail for slice `n` on try `retry` (0 first), skipping the rails
    /// `down` says are paused or failed; `None` when every rail is down.
    ///
    /// First tries go round-robin over the preferred rails that are up (the
    /// others when none is). Try `k` takes the rail `k` places after the
    /// first try's, over all the rails that are up, preferred first: the
    /// next `len - 1` tries each land on a rail not tried yet.
    pub fn pick(&self, n: u64, retry: u32, down: impl Fn(usize) -> bool) -> Option<usize> {
        if self.preferred.len() > 64 || self.available.len() > 64 {
            return self.pick_long(n, retry, &down);
        }
        // First tries (nearly every slice) allocate nothing, and ask
        // `down` once per rail: which entries of a list are up is a mask.
        let up_mask =
            |list: &[usize]| list.iter().enumerate().filter(|(_, d)| !down(**d)).fold(0u64, |m, (i, _)| m | 1 << i);
        let (pool, mask) = match up_mask(&self.preferred) {
            0 => (&self.available, up_mask(&self.available)),
            m => (&self.preferred, m),
        };
        let count = mask.count_ones();
        if count == 0 {
            return None;
        }
        // The `at`-th rail that is up, in the list's order.
        let mut m = mask;
        for _ in 0..mod_small(n, count) {
            m &= m - 1;
        }
        let first = pool[m.trailing_zeros() as usize];
        if retry == 0 {
            return Some(first);
        }
        self.pick_retry(first, retry, &down)
    }

    /// [`Self::pick`] for lists of more than 64 rails.
    fn pick_long(&self, n: u64, retry: u32, down: &impl Fn(usize) -> bool) -> Option<usize> {
        let up = |list: &[usize]| -> Vec<usize> { list.iter().copied().filter(|&d| !down(d)).collect() };
        let preferred = up(&self.preferred);
        let pool = if preferred.is_empty() { up(&self.available) } else { preferred };
        let first = *pool.get((n % pool.len().max(1) as u64) as usize)?;
        if retry == 0 { Some(first) } else { self.pick_retry(first, retry, down) }
    }

    /// Try `retry` (1 or more) of a slice whose first try took `first`.
    fn pick_retry(&self, first: usize, retry: u32, down: &impl Fn(usize) -> bool) -> Option<usize> {
        let up = |list: &[usize]| -> Vec<usize> { list.iter().copied().filter(|&d| !down(d)).collect() };
        let mut all = up(&self.preferred);
        for d in up(&self.available) {
            if !all.contains(&d) {
                all.push(d);
            }
        }
        let at = all.iter().position(|&d| d == first).expect("the first pick is among the rails that are up");
        Some(all[(at + retry as usize) % all.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(end: u64) -> impl Fn(u64) -> Option<u64> {
        move |a| (a < end).then_some(end)
    }

    #[test]
    fn slices_follow_mooncakes_tail_rule() {
        let rule = SliceRule::default();
        let cut = |len| rule.cut(0, 1 << 40, len, flat(1 << 30), flat((1 << 40) + (1 << 30))).unwrap();
        assert!(cut(0).is_empty());
        let lens = |len| cut(len).iter().map(|s| s.len).collect::<Vec<_>>();
        assert_eq!(lens(1), [1]);
        assert_eq!(lens(64 << 10), [64 << 10]);
        // Up to a slice and a fragment (80 KiB) goes as one.
        assert_eq!(lens(80 << 10), [80 << 10]);
        assert_eq!(lens((80 << 10) + 1), [64 << 10, (16 << 10) + 1]);
        assert_eq!(lens(200 << 10), [64 << 10, 64 << 10, 72 << 10]);
        for len in [1u64, 4095, 65_536, 81_920, 81_921, 1 << 20, (1 << 20) + 12_345] {
            let s = cut(len);
            assert_eq!(s.iter().map(|x| x.len).sum::<u64>(), len);
            assert!(s.iter().all(|x| x.len <= (80 << 10) && x.remote == (1 << 40) + x.offset && x.local == x.offset));
            assert!(s.windows(2).all(|w| w[0].offset + w[0].len == w[1].offset));
        }
    }

    #[test]
    fn no_slice_crosses_a_region_end_on_either_side() {
        let rule = SliceRule::default();
        // Local regions of 100 KiB; remote regions of 48 KiB, offset.
        let local_end = |a: u64| Some((a / 102_400 + 1) * 102_400);
        let remote_end = |a: u64| Some(((a - 7) / 49_152 + 1) * 49_152 + 7);
        let s = rule.cut(1000, 7 + 3000, 1 << 20, local_end, remote_end).unwrap();
        assert_eq!(s.iter().map(|x| x.len).sum::<u64>(), 1 << 20);
        for x in &s {
            assert!(x.local / 102_400 == (x.local + x.len - 1) / 102_400, "{x:?} crosses a local region");
            assert!((x.remote - 7) / 49_152 == (x.remote + x.len - 8) / 49_152, "{x:?} crosses a remote region");
        }
    }

    #[test]
    fn bad_requests_are_named() {
        let rule = SliceRule::default();
        assert_eq!(
            rule.cut(0, 0, 1 << 20, flat(4096), flat(1 << 30)),
            Err(SliceFault::Unregistered { side: "local", addr: 4096 })
        );
        assert_eq!(rule.cut(0, 0, 10, flat(4096), |_| None), Err(SliceFault::Unregistered { side: "remote", addr: 0 }));
        assert_eq!(rule.cut(u64::MAX - 5, 0, 10, flat(u64::MAX), flat(u64::MAX)), Err(SliceFault::Overflow));
        let tiny = SliceRule { slice_bytes: 1, fragment_ratio: 4 };
        assert!(matches!(tiny.cut(0, 0, 1 << 21, flat(1 << 30), flat(1 << 30)), Err(SliceFault::TooManySlices { .. })));
    }

    #[test]
    fn the_small_remainder_is_the_remainder() {
        for d in 1..=64u32 {
            for n in (0..5000u64).chain([u64::from(u32::MAX) - 3, u64::from(u32::MAX)]) {
                assert_eq!(u64::from(mod_small(n, d)), (n & 0xffff_ffff) % u64::from(d), "{n} % {d}");
            }
        }
    }

    #[test]
    fn slices_spray_evenly_over_the_preferred_rails() {
        let rails = Rails { preferred: vec![0, 1, 2, 3], available: vec![4] };
        let mut count = [0u32; 5];
        for n in 0..1000 {
            count[rails.pick(n, 0, |_| false).unwrap()] += 1;
        }
        assert_eq!(count, [250, 250, 250, 250, 0]);
        // A rail down: the others share its slices; none goes to the
        // available rail while a preferred one is up.
        let mut count = [0u32; 5];
        for n in 0..999 {
            count[rails.pick(n, 0, |d| d == 2).unwrap()] += 1;
        }
        assert_eq!(count, [333, 333, 0, 333, 0]);
        assert_eq!(rails.pick(7, 0, |d| d < 4), Some(4), "the available rail when every preferred one is down");
        assert_eq!(rails.pick(7, 0, |_| true), None);
    }

    #[test]
    fn a_retry_lands_on_a_rail_not_tried_yet() {
        // Rail 1 is listed twice; it counts once.
        let rails = Rails { preferred: vec![0, 1], available: vec![2, 1] };
        for n in 0..20 {
            let tries: Vec<usize> = (0..3).map(|k| rails.pick(n, k, |_| false).unwrap()).collect();
            let distinct: std::collections::BTreeSet<&usize> = tries.iter().collect();
            assert_eq!(distinct.len(), 3, "slice {n}: {tries:?}");
            assert_eq!(rails.pick(n, 3, |_| false), Some(tries[0]), "the cycle starts again");
        }
        // A rail down is skipped on retries too.
        assert!((1..4).all(|k| rails.pick(0, k, |d| d == 2) != Some(2)));
        let single = Rails { preferred: vec![5], available: vec![] };
        assert_eq!(single.pick(3, 4, |_| false), Some(5), "one rail: a retry can only use it again");
    }

    #[test]
    fn rails_come_from_a_matrix_entry_by_device_index() {
        let entry = MatrixEntry { preferred: vec!["mlx5_1".into(), "gone".into()], available: vec!["mlx5_0".into()] };
        let names = ["mlx5_0", "mlx5_1"];
        let rails = Rails::from_entry(&entry, |n| names.iter().position(|&m| m == n));
        assert_eq!(rails, Rails { preferred: vec![1], available: vec![0] });
    }
}
