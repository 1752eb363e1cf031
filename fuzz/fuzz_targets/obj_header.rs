#![no_main]
//! `cargo fuzz run obj_header`: see shardwire::proto::objstream::fuzzing::obj_header.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::objstream::fuzzing::obj_header(data);
});
