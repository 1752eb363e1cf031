"""Mooncake's wheel tests (transfer_engine_initiator_test.py), written
afresh, with shardwire as the initiator and a real peer process as the
target: first shardwire's own package, then the Mooncake wheel."""
import random

import pytest

from conftest import Peer, pattern
from shardwire import TransferEngine, TransferOpcode


@pytest.fixture(params=["shardwire", "mooncake"])
def target(request):
    peer = Peer(request.param, "target", 16 << 20)
    yield peer
    peer.close()


def test_random_write_circle_times(engine, target):
    local = engine.allocate_managed_buffer(1 << 20)
    rng = random.Random(2024)
    for circle in range(1000):
        length = rng.randint(16, 256)
        offset = rng.randrange(0, (1 << 20) - 512)
        data = bytes(rng.getrandbits(8) for _ in range(length))
        assert engine.write_bytes_to_buffer(local, data, length) == 0
        assert engine.transfer_sync_write(target.name, local, target.buffer + offset, length) == 0
        engine.write_bytes_to_buffer(local, bytes(length), length)
        assert engine.transfer_sync_read(target.name, local, target.buffer + offset, length) == 0
        assert engine.read_bytes_from_buffer(local, length) == data, f"circle {circle}"


def test_batch_write_read(engine, target):
    local = engine.allocate_managed_buffer(1 << 20)
    bufs = [local + i * 1024 for i in range(100)]
    peers = [target.buffer + i * 1024 for i in range(100)]
    for i, b in enumerate(bufs):
        engine.write_bytes_to_buffer(b, pattern(1024, i), 1024)
    assert engine.batch_transfer_sync_write(target.name, bufs, peers, [1024] * 100) == 0
    for i in range(100):
        assert target.cmd(f"check {i * 1024} 1024 {i}") == "ok"
    engine.write_bytes_to_buffer(local, bytes(100 * 1024), 100 * 1024)
    assert engine.batch_transfer_sync_read(target.name, bufs, peers, [1024] * 100) == 0
    for i, b in enumerate(bufs):
        assert engine.read_bytes_from_buffer(b, 1024) == pattern(1024, i)


def test_async_batch_write_read(engine, target):
    local = engine.allocate_managed_buffer(1 << 20)
    bufs = [local + i * 4096 for i in range(32)]
    peers = [target.buffer + i * 4096 for i in range(32)]
    for i, b in enumerate(bufs):
        engine.write_bytes_to_buffer(b, pattern(4096, 100 + i), 4096)
    batch_id = engine.batch_transfer_async_write(target.name, bufs, peers, [4096] * 32)
    assert batch_id != 0
    assert engine.get_batch_transfer_status([batch_id]) == 0
    for i in range(32):
        assert target.cmd(f"check {i * 4096} 4096 {100 + i}") == "ok"
    batch_id = engine.batch_transfer_async(target.name, bufs, peers, [4096] * 32, TransferOpcode.Read)
    assert batch_id != 0
    while (status := engine.transfer_check_status(batch_id)) == 0:
        pass
    assert status == 1


def test_async_submit_to_unknown_peer_returns_zero(engine):
    local = engine.allocate_managed_buffer(8192)
    assert engine.transfer_submit_write("127.0.0.1:1", local, 4096, 64) == 0
    code, message = engine.last_error()
    assert code == -102 and "127.0.0.1:1" in message


def test_send_probe_reachable_peer(engine, target):
    assert engine.send_probe(target.name) == 0


def test_send_probe_unknown_peer(engine):
    assert engine.send_probe("127.0.0.1:1") != 0
    assert engine.send_probe("no-such-host.invalid:5555") == -101
