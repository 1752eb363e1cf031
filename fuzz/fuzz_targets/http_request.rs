#![no_main]
//! `cargo fuzz run http_request`: see shardwire::proto::objstream::fuzzing::http_request.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::objstream::fuzzing::http_request(data);
});
