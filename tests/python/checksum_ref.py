"""Reference digests for AIStore's checksum types, written independently of
shardwire (tests/checksum_golden.rs compares them with the Rust ones).

md5, sha256 and sha512 come from hashlib; CRC-32C and XXH64 are written out
here from their specifications (bitwise CRC with the reflected Castagnoli
polynomial; XXH64 as the xxHash spec describes it, seed 0). The output is
AIStore's value: lowercase hex of the big-endian digest.

Input on stdin: one hex-encoded byte string per line. Output: one JSON
object per line, {type: value}.
"""

import hashlib
import json
import sys

M64 = (1 << 64) - 1
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63
P5 = 0x27D4EB2F165667C5


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def round_(acc: int, lane: int) -> int:
    acc = (acc + lane * P2) & M64
    return (rotl(acc, 31) * P1) & M64


def merge(acc: int, val: int) -> int:
    acc ^= round_(0, val)
    return (acc * P1 + P4) & M64


def xxh64(data: bytes, seed: int = 0) -> int:
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        while i + 32 <= n:
            for k in range(4):
                v[k] = round_(v[k], int.from_bytes(data[i + 8 * k : i + 8 * k + 8], "little"))
            i += 32
        acc = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M64
        for k in range(4):
            acc = merge(acc, v[k])
    else:
        acc = (seed + P5) & M64
    acc = (acc + n) & M64
    while i + 8 <= n:
        acc ^= round_(0, int.from_bytes(data[i : i + 8], "little"))
        acc = (rotl(acc, 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        acc ^= (int.from_bytes(data[i : i + 4], "little") * P1) & M64
        acc = (rotl(acc, 23) * P2 + P3) & M64
        i += 4
    while i < n:
        acc ^= (data[i] * P5) & M64
        acc = (rotl(acc, 11) * P1) & M64
        i += 1
    acc ^= acc >> 33
    acc = (acc * P2) & M64
    acc ^= acc >> 29
    acc = (acc * P3) & M64
    acc ^= acc >> 32
    return acc


def digests(data: bytes) -> dict:
    x = xxh64(data).to_bytes(8, "big").hex()
    return {
        "xxhash": x,
        "xxhash2": x,
        "crc32c": crc32c(data).to_bytes(4, "big").hex(),
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sha512": hashlib.sha512(data).hexdigest(),
    }


if __name__ == "__main__":
    for line in sys.stdin:
        print(json.dumps(digests(bytes.fromhex(line.strip()))))
