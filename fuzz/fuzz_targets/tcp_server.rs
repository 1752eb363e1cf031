#![no_main]
//! `cargo fuzz run tcp_server`: see shardwire::proto::mooncake::fuzzing::tcp_server.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::tcp_server(data);
});
