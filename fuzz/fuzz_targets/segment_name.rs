#![no_main]
//! `cargo fuzz run segment_name`: see shardwire::proto::mooncake::fuzzing::segment_name.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::segment_name(data);
});
