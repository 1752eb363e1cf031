#![no_main]
//! `cargo fuzz run tcp_client`: see shardwire::proto::mooncake::fuzzing::tcp_client.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::tcp_client(data);
});
