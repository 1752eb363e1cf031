//! The 64-bit mixer that guards every proto header.
//!
//! AIStore computes `check = Hash(word1)` with its xoshiro256 package's seed
//! mixer: two rounds of the splitmix64 finaliser, then a final scramble
//! (`rotl(z * 5, 7) * 9`, as xoshiro256** scrambles its output). All
//! arithmetic wraps at 64 bits.

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
const MIX_1: u64 = 0xbf58_476d_1ce4_e5b9;
const MIX_2: u64 = 0x94d0_49bb_1331_11eb;

/// One splitmix64 finaliser round.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(MIX_1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_2);
    z ^ (z >> 31)
}

/// The check word of a proto header whose first word is `seed`.
pub fn hash(seed: u64) -> u64 {
    let z = mix(seed.wrapping_add(GOLDEN_GAMMA)).wrapping_add(GOLDEN_GAMMA);
    let z = mix(z).wrapping_mul(5);
    z.rotate_left(7).wrapping_mul(9)
}

#[cfg(test)]
mod tests {
    use super::hash;

    #[test]
    fn matches_the_published_vectors() {
        // cmn/xoshiro256 test vectors, quoted in the reference §1.2.
        assert_eq!(hash(4_573_842), 5_026_071_747_115_404_967);
        assert_eq!(hash(0), 1_905_207_664_160_064_169);
    }

    #[test]
    fn matches_the_golden_frames() {
        // Reference §1.6 (Fin, hlen 42) and §1.8 (hlen 72).
        assert_eq!(hash(42), 0x5c89_61e1_f205_5d33);
        assert_eq!(hash(72), 0xfadc_5c11_e201_42b1);
    }
}
