//! Flags that clap takes as text and the commands check: a bad one is a
//! usage error (exit 2) that names the flag, the value and what it takes.

use std::time::Duration;

use shardwire::bench::stream::parse_size;
use shardwire::proto::objstream::lz4::BlockSize;

use crate::fail::Failure;

/// A positive, finite number of seconds.
pub fn positive_seconds(flag: &str, seconds: f64) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Failure::usage(format!("{flag} {seconds} is not valid: give a positive number of seconds")))
}

/// A size in bytes: 4096, 4K, 4KiB, 1MiB, 2G ...
pub fn size(flag: &str, text: &str) -> Result<usize, Failure> {
    parse_size(text).ok_or_else(|| {
        Failure::usage(format!("{flag} {text:?} is not a size: give bytes, or a number with K, KiB, M, MiB or G"))
    })
}

/// An LZ4 block size, if the flag was given.
pub fn compress(text: Option<&str>) -> Result<Option<BlockSize>, Failure> {
    text.map(|b| {
        BlockSize::parse(b).ok_or_else(|| {
            Failure::usage(format!("--compress {b:?} is not an LZ4 block size: give 64K, 256K, 1M or 4M"))
        })
    })
    .transpose()
}
