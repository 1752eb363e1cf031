"""What shardwire adds to Mooncake's Python API."""
import asyncio
import os
import threading
import time

import numpy as np
import pytest

from conftest import pattern
from shardwire import TransferEngine, TransferOpcode


def test_buffer_objects_as_addresses(engine, shardwire_target):
    target = shardwire_target
    # A numpy array registered through the object, then used as the source.
    array = np.frombuffer(pattern(4096, 3), dtype=np.uint8).copy()
    assert engine.register(array) == 0
    assert engine.transfer_sync_write(target.name, array, target.buffer, 4096) == 0
    assert target.cmd("check 0 4096 3") == "ok"
    # An unregistered bytearray receives a read: registered for the call.
    assert target.cmd("fill 0 100 4") == "ok"
    dest = bytearray(100)
    assert engine.transfer_sync_read(target.name, dest, target.buffer, 100) == 0
    assert bytes(dest) == pattern(100, 4)
    # bytes can be written from, not read into.
    assert engine.transfer_sync_write(target.name, pattern(64, 5), target.buffer, 64) == 0
    assert target.cmd("check 0 64 5") == "ok"
    with pytest.raises(ValueError):
        engine.transfer_sync_read(target.name, b"immutable", target.buffer, 9)
    # More bytes than the object holds is refused, not overrun.
    assert engine.transfer_sync_write(target.name, bytearray(8), target.buffer, 64) == -1
    assert engine.deregister(array) == 0


def test_tensor_like_objects_with_data_ptr(engine, shardwire_target):
    class FakeTensor:
        def __init__(self, array):
            self.array = array

        def data_ptr(self):
            return self.array.ctypes.data

        def numel(self):
            return self.array.size

        def element_size(self):
            return self.array.itemsize

        def is_contiguous(self):
            return True

    t = FakeTensor(np.frombuffer(pattern(2048, 8), dtype=np.uint8).copy())
    assert engine.transfer_sync_write(shardwire_target.name, t, shardwire_target.buffer, 2048) == 0
    assert shardwire_target.cmd("check 0 2048 8") == "ok"


def test_nowait_status_of_many_batches(engine, shardwire_target):
    local = engine.allocate_managed_buffer(1 << 20)
    ids = [engine.transfer_submit_write(shardwire_target.name, local + i * 4096, shardwire_target.buffer + i * 4096,
                                        4096) for i in range(16)]
    assert all(ids)
    deadline = time.time() + 30
    while True:
        codes = engine.get_batch_transfer_status_nowait(ids)
        assert all(c in (0, 1) for c in codes), codes
        if all(c == 1 for c in codes):
            break
        assert time.time() < deadline
    # _nowait frees nothing: the blocking call still works on the same ids.
    assert engine.get_batch_transfer_status(ids) == 0


def test_asyncio_awaitable_transfers(engine, shardwire_target):
    local = engine.allocate_managed_buffer(1 << 20)
    for i in range(8):
        engine.write_bytes_to_buffer(local + i * 8192, pattern(8192, 30 + i), 8192)

    async def main():
        results = await asyncio.gather(*[
            engine.transfer_async(shardwire_target.name, local + i * 8192, shardwire_target.buffer + i * 8192, 8192,
                                  TransferOpcode.Write) for i in range(8)])
        failed = await engine.transfer_async("127.0.0.1:1", local, 4096, 8)
        return results, failed

    results, failed = asyncio.run(main())
    assert results == [0] * 8
    assert failed == -1
    for i in range(8):
        assert shardwire_target.cmd(f"check {i * 8192} 8192 {30 + i}") == "ok"


def test_registered_context_manager(engine):
    array = np.zeros(1 << 16, dtype=np.uint8)
    with engine.registered(array) as address:
        assert address == array.ctypes.data
        assert engine.write_bytes_to_buffer(address, b"inside", 6) == 0
    assert bytes(array[:6]) == b"inside"
    assert engine.write_bytes_to_buffer(array.ctypes.data, b"x", 1) == -3, "unregistered on exit"


def test_blocking_calls_release_the_gil(monkeypatch):
    # A call to a peer that never answers blocks for the timeout; other
    # Python threads must keep running meanwhile.
    import socket

    monkeypatch.setenv("MC_TRANSFER_TIMEOUT", "2")
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.time())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    try:
        # Probing a port that accepts but never answers blocks in the RPC.
        started = time.time()
        code = engine.send_probe(f"127.0.0.1:{silent.getsockname()[1]}")
        elapsed = time.time() - started
    finally:
        stop.set()
        t.join()
        silent.close()
    assert code != 0
    during = [x for x in ticks if started < x < started + elapsed]
    assert len(during) > 10, f"only {len(during)} ticks in {elapsed:.1f} s: the GIL was held"


def test_engine_created_in_a_child_after_fork_works(shardwire_target):
    parent = TransferEngine()
    assert parent.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    local = parent.allocate_managed_buffer(8192)
    assert parent.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 64) == 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            child = TransferEngine()
            ok = child.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
            buf = child.allocate_managed_buffer(8192)
            ok = ok and child.write_bytes_to_buffer(buf, pattern(64, 77), 64) == 0
            ok = ok and child.transfer_sync_write(shardwire_target.name, buf, shardwire_target.buffer, 64) == 0
            # The parent's engine, inherited without its threads, refuses
            # work instead of hanging.
            ok = ok and parent.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 64) == -1
            status = 0 if ok else 2
        finally:
            os.write(w, bytes([status]))
            os._exit(0)
    os.close(w)
    result = os.read(r, 1)
    os.waitpid(pid, 0)
    assert result == b"\x00", f"child status {result!r}"
    assert shardwire_target.cmd("check 0 64 77") == "ok"
    # And the parent's engine still works.
    assert parent.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 64) == 0


def test_cancel_transfer(engine, shardwire_target):
    import time

    local = engine.allocate_managed_buffer(1 << 20)
    bid = engine.batch_transfer_async_write(shardwire_target.name, [local], [shardwire_target.buffer], [4096])
    assert bid != 0
    deadline = time.monotonic() + 30
    while engine.get_batch_transfer_status_nowait([bid]) == [0]:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # Finished: nothing left to take back, and the outcome stands.
    assert engine.cancel_transfer(bid) == 0
    assert engine.get_batch_transfer_status_nowait([bid]) == [1]
    engine.release_batches([bid])
    assert engine.cancel_transfer(bid) == -1, "a released id is unknown"
    assert "no batch" in engine.last_error()[1]


def engine_made_with(env):
    """A TransferEngine made while `env` is set (the settings are read when
    it is made); the variables are unset again."""
    os.environ.update(env)
    try:
        return TransferEngine()
    finally:
        for name in env:
            del os.environ[name]


def test_a_shardwire_peer_on_this_host_is_reached_locally(engine, shardwire_target, mooncake_target):
    """The local transport from Python: a shardwire target on this host is
    reached by memory copies (and the bytes land), a Mooncake one over TCP;
    SHARDWIRE_LOCAL=0 keeps a shardwire one on TCP too."""
    assert engine.transport_for(shardwire_target.name) == "local"
    assert engine.transport_for(mooncake_target.name) == "tcp"
    array = np.frombuffer(pattern(1 << 20, 6), dtype=np.uint8).copy()
    assert engine.register(array) == 0
    assert engine.transfer_sync_write(shardwire_target.name, array, shardwire_target.buffer, 1 << 20) == 0
    assert shardwire_target.cmd(f"check 0 {1 << 20} 6") == "ok"
    assert engine.transfer_sync_write(mooncake_target.name, array, mooncake_target.buffer, 1 << 20) == 0
    assert mooncake_target.cmd(f"check 0 {1 << 20} 6") == "ok"
    assert engine.deregister(array) == 0
    assert engine.transport_for("127.0.0.1:1") == ""
    tcp_only = engine_made_with({"SHARDWIRE_LOCAL": "0"})
    assert tcp_only.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert tcp_only.transport_for(shardwire_target.name) == "tcp"
    tcp_only.shutdown()


def test_rdma_on_the_simulated_fabric_from_python():
    """protocol "rdma" through the drop-in: two engines of this process on
    the simulated fabric (SHARDWIRE_FABRIC=sim), the local path off so RDMA
    carries the bytes, and an engine without devices reaching them over TCP."""
    on_sim = {"SHARDWIRE_FABRIC": "sim", "SHARDWIRE_LOCAL": "0"}
    target, initiator = engine_made_with(on_sim), engine_made_with(on_sim)
    for e in (target, initiator):
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    name = f"127.0.0.1:{target.get_rpc_port()}"
    assert initiator.transport_for(name) == "rdma"
    remote = target.allocate_managed_buffer(1 << 20)
    array = np.frombuffer(pattern(1 << 20, 9), dtype=np.uint8).copy()
    assert initiator.register(array) == 0
    assert initiator.transfer_sync_write(name, array.ctypes.data, remote, 1 << 20) == 0
    assert bytes(target.read_bytes_from_buffer(remote, 1 << 20)) == bytes(array)
    back = np.zeros(1 << 20, dtype=np.uint8)
    assert initiator.register(back) == 0
    assert initiator.transfer_sync_read(name, back.ctypes.data, remote, 1 << 20) == 0
    assert bytes(back) == bytes(array)
    plain = engine_made_with({"SHARDWIRE_LOCAL": "0"})
    assert plain.initialize("127.0.0.1", "P2PHANDSHAKE", "rdma", "") == 0
    assert plain.transport_for(name) == "tcp", "no devices here: TCP, with a warning"
    for e in (plain, initiator, target):
        e.shutdown()
