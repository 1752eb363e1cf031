#![no_main]
//! `cargo fuzz run objstream_body`: see shardwire::proto::objstream::fuzzing::objstream_body.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::objstream::fuzzing::objstream_body(data);
});
