#![no_main]
//! `cargo fuzz run obj_checksum`: see shardwire::proto::objstream::fuzzing::obj_checksum.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::objstream::fuzzing::obj_checksum(data);
});
