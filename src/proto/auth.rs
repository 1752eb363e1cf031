//! Shared-key authentication of a connection: a challenge, a proof, a
//! verdict. Free of I/O; the RPC port's threads and the data port's
//! connection cores carry the bytes.
//!
//! Mooncake has no authentication: whoever reaches a port reads and writes
//! all registered memory. With a key configured (`SHARDWIRE_AUTH_KEY` or
//! `SHARDWIRE_AUTH_KEY_FILE`), every connection to the RPC port and to the
//! data port opens with this exchange, before any other byte:
//!
//! ```text
//!   server -> client  challenge  "SWAUTH1\0" | server nonce (32)              40 bytes
//!   client -> server  proof      client nonce (32) | HMAC(key, client, ..)    64 bytes
//!   server -> client  verdict    "SWAUTHOK" | HMAC(key, server, ..)            40 bytes
//!                          or    "SWAUTHNO" | zeros, then the server closes
//! ```
//!
//! Each MAC is HMAC-SHA256 over a label naming the side and the port, the
//! server's nonce and the client's nonce, so a proof is good for one
//! connection only (the server's fresh nonce) and for one direction and
//! one port only (the labels). The verdict proves the key to the client in
//! turn: a client never sends a request to a server that has not shown it
//! holds the key. Both MACs are compared in constant time.
//!
//! What it does not do: encrypt, or protect a connection after the
//! exchange from someone who can rewrite packets on the path. It keeps out
//! whoever can merely reach a port.
//!
//! A peer without the key cannot mistake the exchange for its protocol:
//! the challenge's first eight bytes, read as the RPC port's length prefix
//! or as a data status frame, are recognised ([`is_challenge`]) and named.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The challenge's first eight bytes.
pub const MAGIC: [u8; 8] = *b"SWAUTH1\0";
/// A verdict that accepts.
pub const ACCEPTED: [u8; 8] = *b"SWAUTHOK";
/// A verdict that refuses.
pub const REFUSED: [u8; 8] = *b"SWAUTHNO";
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
pub const CHALLENGE_BYTES: usize = MAGIC.len() + NONCE_BYTES;
pub const PROOF_BYTES: usize = NONCE_BYTES + MAC_BYTES;
pub const VERDICT_BYTES: usize = ACCEPTED.len() + MAC_BYTES;
/// A key shorter than this is refused: it could be guessed offline from
/// one captured exchange.
pub const KEY_BYTES_MIN: usize = 16;
/// A key longer than this is refused (a file named by mistake).
pub const KEY_BYTES_MAX: usize = 4096;

/// Which port a connection is on; part of what each MAC covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The RPC (handshake) port.
    Rpc,
    /// The TCP data port.
    Data,
}

impl Port {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Rpc => b"rpc",
            Self::Data => b"data",
        }
    }
}

/// The shared key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthKey(Box<[u8]>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey(<{} bytes hidden>)", self.0.len())
    }
}

impl AuthKey {
    /// A key of `KEY_BYTES_MIN..=KEY_BYTES_MAX` bytes.
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < KEY_BYTES_MIN || bytes.len() > KEY_BYTES_MAX {
            return Err(format!(
                "an authentication key of {} bytes; it must have {KEY_BYTES_MIN} to {KEY_BYTES_MAX}",
                bytes.len()
            ));
        }
        Ok(Self(bytes.into()))
    }

    fn mac(&self, side: &[u8], port: Port, server_nonce: &[u8], client_nonce: &[u8]) -> [u8; MAC_BYTES] {
        self.hmac(side, port, server_nonce, client_nonce).finalize().into_bytes().into()
    }

    fn verify(&self, side: &[u8], port: Port, server_nonce: &[u8], client_nonce: &[u8], mac: &[u8]) -> bool {
        // Constant time: a mismatch's position is not observable.
        self.hmac(side, port, server_nonce, client_nonce).verify_slice(mac).is_ok()
    }

    /// The HMAC state over what a MAC covers, ready to finish or verify.
    fn hmac(&self, side: &[u8], port: Port, server_nonce: &[u8], client_nonce: &[u8]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        for part in [b"shardwire-auth-v1 ".as_slice(), side, b" ", port.label(), server_nonce, client_nonce] {
            m.update(part);
        }
        m
    }
}

/// Why an exchange failed. Each names what a person must check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the peer did not open with an authentication challenge: it has no SHARDWIRE_AUTH_KEY, or is not shardwire"
    )]
    NoChallenge,
    #[error("the peer refused this process's authentication key (the keys differ)")]
    Refused,
    #[error("the peer's answer to the challenge is wrong: it does not hold the same key")]
    BadProof,
    #[error("the peer's verdict is malformed")]
    BadVerdict,
    #[error("the peer accepted, but could not prove it holds the key: not the expected peer")]
    BadServerProof,
    #[error("the peer requires authentication: set SHARDWIRE_AUTH_KEY (or SHARDWIRE_AUTH_KEY_FILE) to its key")]
    Required,
}

/// Whether `bytes` (at least its first eight) open a challenge: what a
/// client without a key sees from a server that requires one.
pub fn is_challenge(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

/// The server's side of one exchange.
#[derive(Debug)]
pub struct Verifier {
    key: AuthKey,
    port: Port,
    nonce: [u8; NONCE_BYTES],
}

impl Verifier {
    /// `nonce` must be fresh and unpredictable (the driver draws it from
    /// the kernel, `crate::entropy`; tests pass fixed ones).
    pub fn new(key: AuthKey, port: Port, nonce: [u8; NONCE_BYTES]) -> Self {
        Self { key, port, nonce }
    }

    /// What the server sends first.
    pub fn challenge(&self) -> [u8; CHALLENGE_BYTES] {
        let mut out = [0u8; CHALLENGE_BYTES];
        out[..MAGIC.len()].copy_from_slice(&MAGIC);
        out[MAGIC.len()..].copy_from_slice(&self.nonce);
        out
    }

    /// Checks the client's proof. Either way the verdict is sent; on an
    /// error the server closes after it, having taken nothing else in.
    pub fn check(&self, proof: &[u8; PROOF_BYTES]) -> Result<[u8; VERDICT_BYTES], (AuthError, [u8; VERDICT_BYTES])> {
        let (client_nonce, mac) = proof.split_at(NONCE_BYTES);
        let mut verdict = [0u8; VERDICT_BYTES];
        if !self.key.verify(b"client", self.port, &self.nonce, client_nonce, mac) {
            verdict[..REFUSED.len()].copy_from_slice(&REFUSED);
            return Err((AuthError::BadProof, verdict));
        }
        verdict[..ACCEPTED.len()].copy_from_slice(&ACCEPTED);
        verdict[ACCEPTED.len()..].copy_from_slice(&self.key.mac(b"server", self.port, &self.nonce, client_nonce));
        Ok(verdict)
    }
}

/// The client's side of one exchange.
#[derive(Debug)]
pub struct Prover {
    key: AuthKey,
    port: Port,
    nonce: [u8; NONCE_BYTES],
    /// The server's nonce, once the challenge is in.
    server_nonce: Option<[u8; NONCE_BYTES]>,
}

impl Prover {
    /// `nonce` must be fresh and unpredictable, as for [`Verifier::new`].
    pub fn new(key: AuthKey, port: Port, nonce: [u8; NONCE_BYTES]) -> Self {
        Self { key, port, nonce, server_nonce: None }
    }

    /// Answers the server's challenge.
    pub fn answer(&mut self, challenge: &[u8; CHALLENGE_BYTES]) -> Result<[u8; PROOF_BYTES], AuthError> {
        if !is_challenge(challenge) {
            return Err(AuthError::NoChallenge);
        }
        let server_nonce: [u8; NONCE_BYTES] = challenge[MAGIC.len()..].try_into().expect("sized above");
        let mut out = [0u8; PROOF_BYTES];
        out[..NONCE_BYTES].copy_from_slice(&self.nonce);
        out[NONCE_BYTES..].copy_from_slice(&self.key.mac(b"client", self.port, &server_nonce, &self.nonce));
        self.server_nonce = Some(server_nonce);
        Ok(out)
    }

    /// Checks the server's verdict; `Ok` means both sides hold the key.
    pub fn check_verdict(&self, verdict: &[u8; VERDICT_BYTES]) -> Result<(), AuthError> {
        let server_nonce = self.server_nonce.as_ref().ok_or(AuthError::BadVerdict)?;
        let (word, mac) = verdict.split_at(ACCEPTED.len());
        if word == REFUSED {
            return Err(AuthError::Refused);
        }
        if word != ACCEPTED {
            return Err(AuthError::BadVerdict);
        }
        if !self.key.verify(b"server", self.port, server_nonce, &self.nonce, mac) {
            return Err(AuthError::BadServerProof);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> AuthKey {
        AuthKey::new(s.as_bytes()).unwrap()
    }

    fn exchange(server_key: &str, client_key: &str, sp: Port, cp: Port) -> Result<(), AuthError> {
        let v = Verifier::new(key(server_key), sp, [7; NONCE_BYTES]);
        let mut p = Prover::new(key(client_key), cp, [9; NONCE_BYTES]);
        let proof = p.answer(&v.challenge())?;
        let verdict = match v.check(&proof) {
            Ok(verdict) => verdict,
            Err((e, verdict)) => {
                assert_eq!(e, AuthError::BadProof);
                assert_eq!(p.check_verdict(&verdict), Err(AuthError::Refused));
                return Err(e);
            }
        };
        p.check_verdict(&verdict)
    }

    #[test]
    fn the_same_key_passes_and_another_is_refused() {
        let k = "0123456789abcdef-shared";
        assert_eq!(exchange(k, k, Port::Data, Port::Data), Ok(()));
        assert_eq!(exchange(k, "0123456789abcdef-other!", Port::Data, Port::Data), Err(AuthError::BadProof));
        // A proof for one port is no proof for the other.
        assert_eq!(exchange(k, k, Port::Rpc, Port::Data), Err(AuthError::BadProof));
    }

    #[test]
    fn a_proof_is_good_for_one_challenge_only() {
        let k = key("0123456789abcdef");
        let first = Verifier::new(k.clone(), Port::Rpc, [1; NONCE_BYTES]);
        let mut p = Prover::new(k.clone(), Port::Rpc, [2; NONCE_BYTES]);
        let proof = p.answer(&first.challenge()).unwrap();
        assert!(first.check(&proof).is_ok());
        // Replayed against a connection with a fresh nonce: refused.
        let second = Verifier::new(k, Port::Rpc, [3; NONCE_BYTES]);
        assert!(second.check(&proof).is_err());
    }

    #[test]
    fn every_flipped_bit_of_proof_or_verdict_is_caught() {
        let k = key("0123456789abcdef");
        let v = Verifier::new(k.clone(), Port::Data, [5; NONCE_BYTES]);
        let mut p = Prover::new(k, Port::Data, [6; NONCE_BYTES]);
        let proof = p.answer(&v.challenge()).unwrap();
        let verdict = v.check(&proof).unwrap();
        for i in 0..PROOF_BYTES * 8 {
            let mut bad = proof;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(v.check(&bad).is_err(), "bit {i} of the proof");
        }
        for i in 0..VERDICT_BYTES * 8 {
            let mut bad = verdict;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(p.check_verdict(&bad).is_err(), "bit {i} of the verdict");
        }
    }

    #[test]
    fn a_verdict_before_a_challenge_and_a_non_challenge_are_errors() {
        let mut p = Prover::new(key("0123456789abcdef"), Port::Data, [1; NONCE_BYTES]);
        let mut verdict = [0u8; VERDICT_BYTES];
        verdict[..8].copy_from_slice(&ACCEPTED);
        assert_eq!(p.check_verdict(&verdict), Err(AuthError::BadVerdict));
        // A Mooncake status frame where the challenge belongs.
        let mut not = [0u8; CHALLENGE_BYTES];
        not[..4].copy_from_slice(b"MCTV");
        assert_eq!(p.answer(&not), Err(AuthError::NoChallenge));
        assert!(!is_challenge(&not) && !is_challenge(&MAGIC[..7]));
    }

    #[test]
    fn keys_are_bounded_and_never_printed() {
        assert!(AuthKey::new(b"short").unwrap_err().contains("5 bytes"));
        assert!(AuthKey::new(&[0u8; KEY_BYTES_MAX + 1]).is_err());
        let k = key("0123456789abcdef-secret");
        assert!(!format!("{k:?}").contains("secret"));
    }
}
