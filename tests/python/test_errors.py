"""Where Mooncake crashes, shardwire returns its error codes."""

import pytest

from shardwire import TransferEngine, TransferError


def test_calls_before_initialize_return_errors():
    e = TransferEngine()
    assert e.get_rpc_port() == -1  # Mooncake segfaults here
    assert e.allocate_managed_buffer(4096) == 0
    assert e.transfer_sync_write("127.0.0.1:1", 4096, 4096, 8) == -1
    assert e.transfer_check_status(1) == -1
    assert e.get_batch_transfer_status([1]) == -1
    assert e.register_memory(4096, 10) == -1
    assert "initialize" in e.last_error()[1]


def test_bogus_batch_ids(engine):
    assert engine.transfer_check_status(0xDEADBEEF) == -1  # Mooncake dereferences it
    assert engine.get_batch_transfer_status([1, 2, 3]) == -1
    assert engine.get_batch_transfer_status_nowait([7]) == [-1]


def test_unknown_metadata_schemes():
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "foo://bar", "tcp", "") == -1  # Mooncake aborts
    assert e.initialize_ext("127.0.0.1", "", "tcp", "", "p2p") == 0


def test_memory_errors(engine):
    buf = engine.allocate_managed_buffer(8192)
    assert engine.register_memory(buf, 100) == -7
    assert engine.unregister_memory(0x1234000) == -3
    assert engine.register_memory(0x1234000, 0) == -1
    assert engine.free_managed_buffer(buf, 8191) == -1  # Mooncake does not check
    assert engine.free_managed_buffer(buf, 8192) == 0
    with pytest.raises(ValueError):
        engine.read_bytes_from_buffer(0x10, 4)  # Mooncake reads wild memory
    assert engine.write_bytes_to_buffer(0x10, b"x", 1) == -3


def test_dead_peer(engine, shardwire_target):
    local = engine.allocate_managed_buffer(1 << 20)
    assert engine.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 4096) == 0
    shardwire_target.kill()  # and reaped
    # The next write fails at once (-1, as Mooncake's sync calls say it),
    # and last_error() says the peer process is gone (PEER_GONE, -401): the
    # local path looks at the target's pidfd after each copy, so a write
    # into the memory of a dead process is never reported done. The engine
    # then looks the name up again: nothing answers, so every later write
    # fails to reach it.
    assert engine.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 4096) == -1
    code, message = engine.last_error()
    assert code == -401, message
    assert "has exited" in message and "does not answer" in message, message
    for _ in range(10):
        assert engine.transfer_sync_write(shardwire_target.name, local, shardwire_target.buffer, 4096) == -1


def test_raising_variant(engine):
    assert engine.check(0) == 0
    with pytest.raises(TransferError) as info:
        engine.check(engine.unregister_memory(0x4000), "unregister_memory")
    assert info.value.code == -3


@pytest.mark.parametrize(
    "name,value,accepted",
    [
        ("MC_TRANSFER_TIMEOUT", "abc", "a whole number of seconds in 1..=86400"),
        ("SHARDWIRE_STREAM_RECV", "0", "a whole number of bytes in 4096..=67108864"),
        ("MC_TCP_BIND_ADDRESS", "not-an-address", "an IP address"),
        ("MC_LEGACY_RPC_PORT_BINDING", "perhaps", "a boolean"),
    ],
)
def test_bad_environment_values_fail_initialize(monkeypatch, name, value, accepted):
    monkeypatch.setenv(name, value)
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1
    code, message = e.last_error()
    assert code == -1
    assert f"{name}={value!r}".replace("'", '"') in message and accepted in message, message


def test_misuse_never_kills_the_process():
    import ctypes
    import mmap

    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    # Not memory of this process: refused, and the helpers fail cleanly.
    assert e.register_memory(0xDEADBEEF000, 4096) == -1
    assert "not mapped" in e.last_error()[1]
    with pytest.raises(ValueError):
        e.read_bytes_from_buffer(0xDEADBEEF000, 4096)
    # Registered, then unmapped behind the engine's back: an error, not SIGSEGV.
    m = mmap.mmap(-1, 8192)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert e.register_memory(addr, 8192) == 0
    assert e.write_bytes_to_buffer(addr, b"hello", 5) == 0
    assert e.read_bytes_from_buffer(addr, 5) == b"hello"
    ctypes.CDLL(None).munmap(ctypes.c_void_p(addr), ctypes.c_size_t(8192))
    with pytest.raises(ValueError, match="cannot read"):
        e.read_bytes_from_buffer(addr, 5)
    assert e.write_bytes_to_buffer(addr, b"x", 1) == -302
    assert e.unregister_memory(addr) == 0
    # A managed block is checked as itself, not as the slab around it.
    block = e.allocate_managed_buffer(1 << 20)
    assert len(e.read_bytes_from_buffer(block, 1 << 20)) == 1 << 20
    with pytest.raises(ValueError, match="runs past the managed buffer"):
        e.read_bytes_from_buffer(block, 2 << 20)
    assert e.write_bytes_to_buffer(block + (1 << 20) - 1, b"ab", 2) == -3
    assert e.free_managed_buffer(block, 1 << 20) == 0
    with pytest.raises(ValueError, match="no allocated buffer"):
        e.read_bytes_from_buffer(block, 16)
    e.shutdown()
