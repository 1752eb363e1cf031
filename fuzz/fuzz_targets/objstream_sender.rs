#![no_main]
//! `cargo fuzz run objstream_sender`: see shardwire::stream::fuzzing::objstream_sender.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::stream::fuzzing::objstream_sender(data);
});
