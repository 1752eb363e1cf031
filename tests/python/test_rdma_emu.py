"""The drop-in over RDMA across processes, on the emulated fabric
(SHARDWIRE_FABRIC=emu): `initialize(..., "rdma", "")` in this process and
in peer processes (tests/interop/peer.py with shardwire's package), each
process with soft NICs of its own, reached through the Connection
handshake. Bytes are checked by the side that did not send them."""
import numpy as np
import pytest

from conftest import Peer, pattern
from shardwire import TransferEngine

SIZE = 16 << 20


@pytest.fixture
def on_emu(monkeypatch):
    """Peers started now, and engines made now, are on emu, without the
    same-host path (so RDMA carries the bytes)."""
    monkeypatch.setenv("SHARDWIRE_FABRIC", "emu")
    monkeypatch.setenv("SHARDWIRE_LOCAL", "0")
    monkeypatch.setenv("PEER_PROTOCOL", "rdma")
    monkeypatch.delenv("SHARDWIRE_EMU_FAULTS", raising=False)


@pytest.fixture
def emu_target(on_emu):
    peer = Peer("shardwire", "target", SIZE)
    yield peer
    peer.close()


def test_two_peer_processes_write_and_read_over_emu(emu_target):
    """Both ends in processes of their own, through the drop-in."""
    initiator = Peer("shardwire", "initiator", emu_target.name, emu_target.buffer, SIZE)
    try:
        assert initiator.cmd(f"write 0 {1 << 20} 3") == "ok"
        assert emu_target.cmd(f"check 0 {1 << 20} 3") == "ok"
        assert emu_target.cmd(f"fill 4096 65536 5") == "ok"
        assert initiator.cmd("read 4096 65536 5") == "ok"
        assert initiator.cmd("batch 16 65536 7") == "ok"
        assert initiator.cmd("async 8 131072 9") == "ok"
    finally:
        initiator.close()


def test_this_process_reaches_a_peer_over_emu(emu_target):
    """`from shardwire import TransferEngine`, `initialize(..., "rdma", "")`:
    RDMA carries the bytes, over both devices, to the peer's memory and
    back."""
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    name = emu_target.name
    assert engine.transport_for(name) == "rdma"
    data = np.frombuffer(pattern(4 << 20, 21), dtype=np.uint8).copy()
    assert engine.register(data) == 0
    assert engine.transfer_sync_write(name, data.ctypes.data, emu_target.buffer, 4 << 20) == 0
    assert emu_target.cmd(f"check 0 {4 << 20} 21") == "ok"
    assert emu_target.cmd(f"fill {8 << 20} {1 << 20} 22") == "ok"
    back = np.zeros(1 << 20, dtype=np.uint8)
    assert engine.register(back) == 0
    assert engine.transfer_sync_read(name, back.ctypes.data, emu_target.buffer + (8 << 20), 1 << 20) == 0
    assert bytes(back) == pattern(1 << 20, 22)
    moved = dict(engine.rdma_device_bytes())
    assert sorted(moved) == ["emu0", "emu1"] and all(b > 0 for b in moved.values()), moved
    for array in (data, back):
        assert engine.deregister(array) == 0
    engine.shutdown()
