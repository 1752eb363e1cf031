#![no_main]
//! `cargo fuzz run lz4_frame`: see shardwire::proto::objstream::fuzzing::lz4_frame.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::objstream::fuzzing::lz4_frame(data);
});
