#![no_main]
//! `cargo fuzz run http_response`: see shardwire::proto::mooncake::fuzzing::http_response.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::http_response(data);
});
