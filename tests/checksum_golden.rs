//! Object checksums checked against an independent implementation:
//! `tests/python/checksum_ref.py` (hashlib for md5 and the SHA-2s, CRC-32C
//! and XXH64 written out from their specifications), over inputs that
//! cross every block and lane boundary of the hashes.

use std::io::Write;
use std::process::{Command, Stdio};

use shardwire::proto::objstream::checksum::{CksumType, Hasher, compute_hex};

fn inputs() -> Vec<Vec<u8>> {
    let lens = [0usize, 1, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 55, 56, 63, 64, 65, 127, 128, 129, 1000, 65_537];
    lens.iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(k as u32) as u8).collect())
        .collect()
}

#[test]
fn digests_match_an_independent_implementation() {
    let inputs = inputs();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/checksum_ref.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the reference");
    {
        let mut stdin = child.stdin.take().unwrap();
        for data in &inputs {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(stdin, "{hex}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference failed");
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), inputs.len());
    let mut checked = 0;
    for (data, line) in inputs.iter().zip(lines) {
        let want: serde_json::Value = serde_json::from_str(line).unwrap();
        for ty in CksumType::ALL {
            let reference = want[ty.as_str()].as_str().expect("the reference has every type");
            assert_eq!(compute_hex(ty, data), reference, "{ty} of {} bytes", data.len());
            // Fed in uneven pieces, the digest is the same.
            let mut h = Hasher::new(ty);
            for piece in data.chunks(7) {
                h.update(piece);
            }
            assert_eq!(h.finish_hex(), reference, "{ty} of {} bytes in pieces", data.len());
            checked += 1;
        }
    }
    assert_eq!(checked, inputs.len() * CksumType::ALL.len());
}
