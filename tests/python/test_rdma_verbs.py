"""The drop-in over real RDMA verbs: soft-RoCE devices in the VM of
tools/rdma-vm (RDMA_VM=1), with a wheel built with the `verbs` feature.
Elsewhere these tests are skipped: tools/test runs them in the VM."""

import os

import numpy as np
import pytest

from conftest import pattern
from shardwire import TransferEngine

pytestmark = pytest.mark.skipif(not os.environ.get("RDMA_VM"), reason="runs in tools/rdma-vm")


def rdma_engine():
    os.environ["SHARDWIRE_LOCAL"] = "0"  # two engines of one host: keep RDMA on the bytes
    try:
        engine = TransferEngine()
    finally:
        del os.environ["SHARDWIRE_LOCAL"]
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    return engine


def test_two_engines_move_bytes_over_every_device_from_python():
    target, initiator = rdma_engine(), rdma_engine()
    name = f"127.0.0.1:{target.get_rpc_port()}"
    assert initiator.transport_for(name) == "rdma"
    size = 4 << 20
    remote = target.allocate_managed_buffer(size)
    array = np.frombuffer(pattern(size, 21), dtype=np.uint8).copy()
    back = np.zeros(size, dtype=np.uint8)
    assert initiator.register(array) == 0 and initiator.register(back) == 0
    for length in (1, 4096, 65_537, size):
        assert initiator.transfer_sync_write(name, array.ctypes.data, remote, length) == 0
        assert bytes(target.read_bytes_from_buffer(remote, length)) == bytes(array[:length])
        back[:] = 0
        assert initiator.transfer_sync_read(name, back.ctypes.data, remote, length) == 0
        assert bytes(back[:length]) == bytes(array[:length])
    moved = initiator.rdma_device_bytes()
    assert len(moved) >= 2 and all(b > 0 for b in moved.values()), moved
    for e in (initiator, target):
        e.shutdown()
