#!/usr/bin/env python3
"""A transfer-engine peer process for shardwire's tests.

It runs `mooncake.engine.TransferEngine` from the real
mooncake-transfer-engine-non-cuda wheel (PEER_IMPL=mooncake, the default),
or shardwire's drop-in (PEER_IMPL=shardwire), over loopback, and talks to the
test over stdin/stdout, one command per line. Metadata is P2P, or the server
in PEER_METADATA (e.g. "etcd://127.0.0.1:2379"); PEER_HOSTNAME sets the
local_hostname (default "127.0.0.1"); PEER_PROTOCOL ("tcp" or "rdma") and
PEER_DEVICE (initialize's device_name) pick the transport. A target serves a managed buffer, or,
with PEER_MEMORY=registered, memory of its own that it registers.

  target mode:    python peer.py target BYTES
      prints      ready <segment name> <buffer address>
      then reads  fill OFFSET LEN SEED   -> writes the pattern, prints "ok"
                  check OFFSET LEN SEED  -> prints "ok" or "mismatch at N"
                  notifies               -> prints "notifies name=msg;..."
                  hex OFFSET LEN         -> prints the bytes, in hex
                  quit

  initiator mode: python peer.py initiator SEGMENT REMOTE_ADDR BYTES
      reads       write OFFSET LEN SEED  -> pattern into local, transfer_sync_write
                  read OFFSET LEN SEED   -> transfer_sync_read, check the pattern
                  batch COUNT LEN SEED   -> batch_transfer_sync_write then _read
                  async COUNT LEN SEED   -> batch_transfer_async_write + status
                  notify MSG             -> transfer_sync with a TransferNotify
                  probe TARGET           -> send_probe
                  quit
      each prints "ok ..." or "fail ...".

The byte pattern matches tests/interop/mod.rs: (i*131 + seed*7 + (i>>8)) & 255.
"""
import os
import sys

if os.environ.get("PEER_IMPL", "mooncake") == "shardwire":
    from shardwire import TransferEngine, TransferNotify
else:
    from mooncake.engine import TransferEngine, TransferNotify


def pattern(length, seed):
    return bytes(((i * 131 + seed * 7 + (i >> 8)) & 0xFF) for i in range(length))


METADATA = os.environ.get("PEER_METADATA", "P2PHANDSHAKE")
HOSTNAME = os.environ.get("PEER_HOSTNAME", "127.0.0.1")
PROTOCOL = os.environ.get("PEER_PROTOCOL", "tcp")
DEVICE = os.environ.get("PEER_DEVICE", "")


def segment_name(engine):
    """What peers pass as target_hostname: host:rpc_port in P2P mode, the
    local_hostname as given with a metadata server."""
    if METADATA == "P2PHANDSHAKE":
        return f"127.0.0.1:{engine.get_rpc_port()}"
    return HOSTNAME


def reply(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def target(size):
    engine = TransferEngine()
    # In P2P mode PEER_HOSTNAME="127.0.0.1:12346" gives a shardwire target
    # that fixed name (shardwire binds a port given; Mooncake picks its own).
    if engine.initialize(HOSTNAME, METADATA, PROTOCOL, DEVICE) != 0:
        reply("fail initialize")
        return
    if os.environ.get("PEER_MEMORY") == "registered":
        # Memory of its own (page-aligned, as tensors' storage is), registered.
        import ctypes
        import mmap
        own = mmap.mmap(-1, size)
        buf = ctypes.addressof(ctypes.c_char.from_buffer(own))
        if engine.register_memory(buf, size, "cpu:0") != 0:
            reply("fail register_memory")
            return
    else:
        buf = engine.allocate_managed_buffer(size)
    reply(f"ready {segment_name(engine)} {buf}")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "notifies":
            reply("notifies " + ";".join(f"{n.name}={n.msg}" for n in engine.get_notifies()))
            continue
        if cmd[0] == "hex":
            reply(engine.read_bytes_from_buffer(buf + int(cmd[1]), int(cmd[2])).hex())
            continue
        off, length, seed = int(cmd[1]), int(cmd[2]), int(cmd[3])
        if cmd[0] == "fill":
            engine.write_bytes_to_buffer(buf + off, pattern(length, seed), length)
            reply("ok")
        elif cmd[0] == "check":
            got = engine.read_bytes_from_buffer(buf + off, length)
            want = pattern(length, seed)
            bad = next((i for i in range(length) if got[i] != want[i]), None)
            reply("ok" if bad is None else f"mismatch at {bad}")


def initiator(segment, remote, size):
    engine = TransferEngine()
    if engine.initialize(HOSTNAME, METADATA, PROTOCOL, DEVICE) != 0:
        reply("fail initialize")
        return
    local = engine.allocate_managed_buffer(size)
    reply(f"ready {segment_name(engine)} {local}")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        op = cmd[0]
        if op == "quit":
            break
        if op == "probe":
            reply(f"ok {engine.send_probe(cmd[1])}")
            continue
        if op == "notify":
            ret = engine.transfer_sync(segment, local, remote, 8, TransferEngine.TransferOpcode.Write,
                                       TransferNotify("mooncake-peer", cmd[1]))
            reply(f"ok {ret}" if ret == 0 else f"fail {ret}")
            continue
        a, b, seed = int(cmd[1]), int(cmd[2]), int(cmd[3])
        if op == "write":
            engine.write_bytes_to_buffer(local + a, pattern(b, seed), b)
            ret = engine.transfer_sync_write(segment, local + a, remote + a, b)
            reply("ok" if ret == 0 else f"fail {ret}")
        elif op == "read":
            engine.write_bytes_to_buffer(local + a, bytes(b), b)
            ret = engine.transfer_sync_read(segment, local + a, remote + a, b)
            if ret != 0:
                reply(f"fail {ret}")
            else:
                got = engine.read_bytes_from_buffer(local + a, b)
                reply("ok" if got == pattern(b, seed) else "fail mismatch")
        elif op in ("batch", "async"):
            count, length = a, b
            bufs = [local + i * length for i in range(count)]
            peers = [remote + i * length for i in range(count)]
            lens = [length] * count
            for i in range(count):
                engine.write_bytes_to_buffer(bufs[i], pattern(length, seed + i), length)
            if op == "batch":
                ret = engine.batch_transfer_sync_write(segment, bufs, peers, lens)
            else:
                bid = engine.batch_transfer_async_write(segment, bufs, peers, lens)
                ret = -1 if bid == 0 else engine.get_batch_transfer_status([bid])
            if ret != 0:
                reply(f"fail write {ret}")
                continue
            for i in range(count):
                engine.write_bytes_to_buffer(bufs[i], bytes(length), length)
            ret = engine.batch_transfer_sync_read(segment, bufs, peers, lens)
            ok = ret == 0 and all(engine.read_bytes_from_buffer(bufs[i], length) == pattern(length, seed + i)
                                  for i in range(count))
            reply("ok" if ok else f"fail read {ret}")


if __name__ == "__main__":
    if sys.argv[1] == "target":
        target(int(sys.argv[2]))
    else:
        initiator(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
