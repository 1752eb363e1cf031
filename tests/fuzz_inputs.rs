//! The fuzz inputs kept in the repository, replayed through the targets'
//! bodies on every test run: the seeds each fuzz run starts from
//! (`fuzz/seeds/<target>/`) and every input a fuzz run crashed, hung or
//! exhausted a target with (`fuzz/regressions/<target>/`, written there by
//! `tools/fuzz`). A crash that was fixed stays fixed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use shardwire::{meta, proto, stream, transport};

/// A fuzz target's body: any bytes, never a panic.
type Body = fn(&[u8]);

/// Every target of `fuzz/Cargo.toml`, by name, with the body it runs.
const TARGETS: &[(&str, Body)] = &[
    ("handshake_frame", proto::mooncake::fuzzing::handshake_frame),
    ("tcp_header", proto::mooncake::fuzzing::tcp_header),
    ("segment_name", proto::mooncake::fuzzing::segment_name),
    ("http_response", proto::mooncake::fuzzing::http_response),
    ("rdma_desc", proto::mooncake::fuzzing::rdma_desc),
    ("tcp_client", proto::mooncake::fuzzing::tcp_client),
    ("tcp_server", proto::mooncake::fuzzing::tcp_server),
    ("obj_header", proto::objstream::fuzzing::obj_header),
    ("objstream_body", proto::objstream::fuzzing::objstream_body),
    ("lz4_frame", proto::objstream::fuzzing::lz4_frame),
    ("obj_checksum", proto::objstream::fuzzing::obj_checksum),
    ("http_request", proto::objstream::fuzzing::http_request),
    ("objstream_sender", stream::fuzzing::objstream_sender),
    ("objstream_receiver", stream::fuzzing::objstream_receiver),
    ("emu_wire", transport::rdma::emu::wire::fuzz),
    ("resp_reply", proto::resp::fuzz),
    ("metadata_request", meta::http_server::fuzz),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&manifest).unwrap();
    let mut declared: Vec<&str> = manifest["bin"]
        .as_array()
        .expect("fuzz/Cargo.toml has [[bin]] tables")
        .iter()
        .map(|b| b["name"].as_str().expect("each [[bin]] has a name"))
        .collect();
    let mut here: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    declared.sort_unstable();
    here.sort_unstable();
    assert_eq!(declared, here, "fuzz/Cargo.toml's targets and this file's TARGETS differ");
}

#[test]
fn every_target_has_seeds() {
    for (name, _) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name}/ holds no seed: a fuzz run would start from nothing");
    }
}

#[test]
fn kept_inputs_replay_without_a_panic() {
    let mut replayed = 0;
    let mut failed = Vec::new();
    for (name, body) in TARGETS {
        for kind in ["seeds", "regressions"] {
            for file in inputs(&fuzz_dir().join(kind).join(name)) {
                let data = std::fs::read(&file).unwrap();
                if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
                    failed.push(format!("{name}: {}", file.display()));
                }
                replayed += 1;
            }
        }
    }
    assert!(replayed >= TARGETS.len(), "only {replayed} inputs replayed");
    assert!(failed.is_empty(), "these kept inputs still make their target panic:\n{}", failed.join("\n"));
}
