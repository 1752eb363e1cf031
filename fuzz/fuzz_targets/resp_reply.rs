#![no_main]
//! `cargo fuzz run resp_reply`: see shardwire::proto::resp::fuzz.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::resp::fuzz(data);
});
