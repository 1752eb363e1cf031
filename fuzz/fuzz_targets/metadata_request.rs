#![no_main]
//! `cargo fuzz run metadata_request`: see shardwire::meta::http_server::fuzz.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::meta::http_server::fuzz(data);
});
