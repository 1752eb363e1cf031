#![no_main]
//! `cargo fuzz run emu_wire`: see shardwire::transport::rdma::emu::wire::fuzz.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::transport::rdma::emu::wire::fuzz(data);
});
