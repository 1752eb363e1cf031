#![no_main]
//! `cargo fuzz run objstream_receiver`: see shardwire::stream::fuzzing::objstream_receiver.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::stream::fuzzing::objstream_receiver(data);
});
