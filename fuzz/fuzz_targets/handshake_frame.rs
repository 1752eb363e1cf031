#![no_main]
//! `cargo fuzz run handshake_frame`: see shardwire::proto::mooncake::fuzzing::handshake_frame.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::handshake_frame(data);
});
