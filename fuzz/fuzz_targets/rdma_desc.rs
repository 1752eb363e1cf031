#![no_main]
//! `cargo fuzz run rdma_desc`: see shardwire::proto::mooncake::fuzzing::rdma_desc.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardwire::proto::mooncake::fuzzing::rdma_desc(data);
});
