//! Sans-IO protocol codecs and state machines. Nothing here touches a socket:
//! each codec takes bytes and returns values (or the reverse), so every one
//! is tested, and fuzzed, without I/O.
//!
//! - [`mooncake`]: Mooncake Transfer Engine's P2P handshake frames, its JSON
//!   messages, and the TCP v2 data protocol.
//! - [`linger`]: half-close-then-drain, how both servers end a connection
//!   after an error answer.
//! - [`objstream`]: AIStore's object-stream frames, headers, PDUs and LZ4
//!   framing.
//! - [`resp`]: RESP2, the redis protocol (commands out, replies in).
//! - [`auth`]: the opt-in shared-key challenge and proof that opens a
//!   connection when a key is configured.

pub mod auth;
pub mod linger;
pub mod mooncake;
pub mod objstream;
pub mod resp;

/// For tests that run a fuzz target over generated inputs: `seed`, and
/// `seed` with each byte in turn replaced by each of `swaps`, dropped, or
/// doubled.
#[cfg(test)]
pub fn mutants(seed: &[u8], swaps: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![seed.to_vec()];
    for at in 0..seed.len() {
        for &b in swaps {
            let mut m = seed.to_vec();
            m[at] = b;
            out.push(m);
        }
        let mut m = seed.to_vec();
        m.remove(at);
        out.push(m);
        let mut m = seed.to_vec();
        m.insert(at, seed[at]);
        out.push(m);
    }
    out
}
