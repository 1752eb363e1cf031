//! Object checksums as AIStore names and writes them, and their
//! verification while an object's bytes stream through.
//!
//! The header's checksum is two strings: a type and a value. AIStore
//! (`cmn/cos/cksum.go`) defines the types `none`, `xxhash`, `xxhash2`,
//! `md5`, `crc32c`, `sha256` and `sha512`. The value is the lowercase hex of
//! Go's `hash.Hash.Sum`, which is big-endian for the integer hashes:
//!
//! | type | hash | value |
//! |---|---|---|
//! | `xxhash` | XXH64, seed 0 (OneOfOne's package) | 16 hex digits of the u64, big-endian |
//! | `xxhash2` | XXH64, seed 0 (cespare's package): the same digest | as `xxhash` |
//! | `crc32c` | CRC-32C (Castagnoli) | 8 hex digits of the u32, big-endian |
//! | `md5` | MD5 | 32 hex digits |
//! | `sha256` | SHA-256 | 64 hex digits |
//! | `sha512` | SHA-512 | 128 hex digits |
//!
//! An object carries no checksum when the type is empty or `none`, or the
//! value is empty (AIStore's `NoneC`). A type outside the list, or a value
//! that is not hex of the type's length, cannot be verified: that object
//! fails with [`ChecksumError::UnknownType`] or [`ChecksumError::BadValue`]
//! (AIStore's own `Validate` refuses both; none of its senders writes one).
//!
//! Crates: `crc32c` (SSE4.2 / ARMv8 CRC instructions, chosen at run time,
//! a table fallback), `xxhash-rust` (XXH64 only), RustCrypto's `md-5` and
//! `sha2`: small, pure Rust, no system library.

use std::fmt;

use md5::Digest;

/// A checksum type AIStore defines (other than `none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CksumType {
    Xxhash,
    Xxhash2,
    Crc32c,
    Md5,
    Sha256,
    Sha512,
}

impl CksumType {
    pub const ALL: [CksumType; 6] = [
        CksumType::Xxhash,
        CksumType::Xxhash2,
        CksumType::Crc32c,
        CksumType::Md5,
        CksumType::Sha256,
        CksumType::Sha512,
    ];

    /// AIStore's name for the type.
    pub fn as_str(self) -> &'static str {
        match self {
            CksumType::Xxhash => "xxhash",
            CksumType::Xxhash2 => "xxhash2",
            CksumType::Crc32c => "crc32c",
            CksumType::Md5 => "md5",
            CksumType::Sha256 => "sha256",
            CksumType::Sha512 => "sha512",
        }
    }

    /// The type AIStore calls `name` (exactly, as AIStore compares).
    pub fn parse(name: &str) -> Option<CksumType> {
        CksumType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Bytes of the digest (its value is twice as many hex digits).
    pub fn digest_bytes(self) -> usize {
        match self {
            CksumType::Xxhash | CksumType::Xxhash2 => 8,
            CksumType::Crc32c => 4,
            CksumType::Md5 => 16,
            CksumType::Sha256 => 32,
            CksumType::Sha512 => 64,
        }
    }
}

impl fmt::Display for CksumType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A digest being computed, fed in pieces.
#[derive(Clone)]
pub struct Hasher {
    ty: CksumType,
    state: State,
}

#[derive(Clone)]
enum State {
    Xxh64(Box<xxhash_rust::xxh64::Xxh64>),
    Crc32c(u32),
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
    Sha512(Box<sha2::Sha512>),
}

impl Hasher {
    pub fn new(ty: CksumType) -> Hasher {
        let state = match ty {
            CksumType::Xxhash | CksumType::Xxhash2 => State::Xxh64(Box::new(xxhash_rust::xxh64::Xxh64::new(0))),
            CksumType::Crc32c => State::Crc32c(0),
            CksumType::Md5 => State::Md5(md5::Md5::new()),
            CksumType::Sha256 => State::Sha256(sha2::Sha256::new()),
            CksumType::Sha512 => State::Sha512(Box::default()),
        };
        Hasher { ty, state }
    }

    pub fn cksum_type(&self) -> CksumType {
        self.ty
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Xxh64(h) => h.update(bytes),
            State::Crc32c(c) => *c = crc32c::crc32c_append(*c, bytes),
            State::Md5(h) => h.update(bytes),
            State::Sha256(h) => h.update(bytes),
            State::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest's bytes, in the order AIStore hex-encodes them.
    pub fn finish(self) -> Vec<u8> {
        let out = match self.state {
            State::Xxh64(h) => h.digest().to_be_bytes().to_vec(),
            State::Crc32c(c) => c.to_be_bytes().to_vec(),
            State::Md5(h) => h.finalize().to_vec(),
            State::Sha256(h) => h.finalize().to_vec(),
            State::Sha512(h) => h.finalize().to_vec(),
        };
        debug_assert_eq!(out.len(), self.ty.digest_bytes());
        out
    }

    /// The header's value: the digest as lowercase hex.
    pub fn finish_hex(self) -> String {
        hex(&self.finish())
    }
}

/// `bytes`' checksum of type `ty`, as the header's value.
pub fn compute_hex(ty: CksumType, bytes: &[u8]) -> String {
    let mut h = Hasher::new(ty);
    h.update(bytes);
    h.finish_hex()
}

/// Lowercase hex, as Go's `hex.EncodeToString`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Hex digits (either case, as Go's `hex.DecodeString` takes them) to bytes.
fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let b = text.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

/// Why an object's bytes do not pass its header's checksum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// The bytes' digest is not the header's.
    #[error("checksum mismatch: {ty} of the received bytes is {actual}, the header says {expected}")]
    Mismatch { ty: CksumType, expected: String, actual: String },
    /// A type AIStore does not define.
    #[error("unknown checksum type {ty:?} (known: xxhash, xxhash2, crc32c, md5, sha256, sha512, none)")]
    UnknownType { ty: String },
    /// A value that is not the type's length in hex digits.
    #[error("checksum value {value:?} is not a {ty} value ({} hex digits)", hex_digits(.ty))]
    BadValue { ty: CksumType, value: String },
}

fn hex_digits(ty: &CksumType) -> usize {
    2 * ty.digest_bytes()
}

/// Checks one object's bytes against its header's checksum.
#[derive(Clone)]
pub struct Verifier {
    hasher: Hasher,
    expected: Vec<u8>,
}

impl Verifier {
    /// The verifier an object with this checksum needs: `Ok(None)` when it
    /// carries none (AIStore's `NoneC`: an empty or `none` type, or an empty
    /// value).
    pub fn for_header(ty: &str, value: &str) -> Result<Option<Verifier>, ChecksumError> {
        if ty.is_empty() || ty == "none" || value.is_empty() {
            return Ok(None);
        }
        let Some(t) = CksumType::parse(ty) else {
            return Err(ChecksumError::UnknownType { ty: ty.into() });
        };
        match unhex(value) {
            Some(expected) if expected.len() == t.digest_bytes() => {
                Ok(Some(Verifier { hasher: Hasher::new(t), expected }))
            }
            _ => Err(ChecksumError::BadValue { ty: t, value: value.into() }),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
    }

    /// All the bytes are in: do they match?
    pub fn finish(self) -> Result<CksumType, ChecksumError> {
        let ty = self.hasher.cksum_type();
        let actual = self.hasher.finish();
        if actual == self.expected {
            Ok(ty)
        } else {
            Err(ChecksumError::Mismatch { ty, expected: hex(&self.expected), actual: hex(&actual) })
        }
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier({}, expecting {})", self.hasher.cksum_type(), hex(&self.expected))
    }
}

/// What became of an object's checksum, reported with its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The header carried none, or verification is off.
    Unchecked,
    /// The bytes match.
    Verified(CksumType),
    /// They do not, or the checksum cannot be verified.
    Failed(Box<ChecksumError>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_vectors() {
        // The CRC-32C check value (RFC 3720's catalogue entry), and XXH64's
        // empty-input and "abc" digests from its reference test suite.
        assert_eq!(compute_hex(CksumType::Crc32c, b"123456789"), "e3069283");
        assert_eq!(compute_hex(CksumType::Xxhash, b""), "ef46db3751d8e999");
        assert_eq!(compute_hex(CksumType::Xxhash2, b"abc"), "44bc2cf5ad770999");
        assert_eq!(compute_hex(CksumType::Md5, b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(
            compute_hex(CksumType::Sha256, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(&compute_hex(CksumType::Sha512, b"abc")[..16], "ddaf35a193617aba");
    }

    #[test]
    fn pieces_give_the_whole_digest() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for ty in CksumType::ALL {
            let whole = compute_hex(ty, &data);
            for cut in [0, 1, 31, 32, 33, 500, 999, 1000] {
                let mut h = Hasher::new(ty);
                h.update(&data[..cut]);
                h.update(&data[cut..]);
                assert_eq!(h.finish_hex(), whole, "{ty} cut at {cut}");
            }
        }
    }

    #[test]
    fn headers_without_a_checksum_need_no_verifier() {
        for (ty, value) in [("", ""), ("none", ""), ("none", "abcd"), ("xxhash", ""), ("", "00")] {
            assert!(Verifier::for_header(ty, value).unwrap().is_none(), "{ty:?} {value:?}");
        }
    }

    #[test]
    fn bad_types_and_values_are_named() {
        let e = Verifier::for_header("blake3", "00").unwrap_err();
        assert_eq!(e, ChecksumError::UnknownType { ty: "blake3".into() });
        assert!(e.to_string().contains("\"blake3\""), "{e}");
        // Type names are compared exactly, as AIStore does.
        assert!(matches!(Verifier::for_header("CRC32C", "e3069283"), Err(ChecksumError::UnknownType { .. })));
        for value in ["e306928", "e30692830", "e306928g", "+3069283"] {
            let e = Verifier::for_header("crc32c", value).unwrap_err();
            assert_eq!(e, ChecksumError::BadValue { ty: CksumType::Crc32c, value: value.into() });
            assert!(e.to_string().contains("8 hex digits"), "{e}");
        }
        // Upper-case hex is hex.
        let mut v = Verifier::for_header("crc32c", "E3069283").unwrap().unwrap();
        v.update(b"123456789");
        assert_eq!(v.finish(), Ok(CksumType::Crc32c));
    }

    #[test]
    fn a_mismatch_names_both_values() {
        let mut v = Verifier::for_header("crc32c", "e3069283").unwrap().unwrap();
        v.update(b"123456780");
        let e = v.finish().unwrap_err();
        let ChecksumError::Mismatch { ty, expected, actual } = &e else { panic!("{e:?}") };
        assert_eq!((*ty, expected.as_str()), (CksumType::Crc32c, "e3069283"));
        assert_eq!(actual, &compute_hex(CksumType::Crc32c, b"123456780"));
        assert!(e.to_string().contains(actual) && e.to_string().contains("e3069283"), "{e}");
    }
}
