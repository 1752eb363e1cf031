#![no_main]
//! `cargo fuzz run tcp_header`: see shardwire::proto::mooncake::fuzzing::tcp_header.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::tcp_header(data);
});
