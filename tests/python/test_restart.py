"""A peer that restarts under its name, as an application on Python meets
it: a transfer with the old process's address fails (-1), and
``last_error()`` says the peer process is gone (PEER_GONE, -401) and that a
new one answers; a transfer with the new process's address goes through at
its first try. Over the same-host path and over TCP."""

import pytest

from conftest import Peer, free_port

PEER_GONE = -401


@pytest.mark.parametrize("local", [True, False], ids=["local", "tcp"])
def test_a_restarted_peer_is_reached_with_its_new_addresses(engine, local):
    name = f"127.0.0.1:{free_port()}"
    env = None if local else {"SHARDWIRE_LOCAL": "0"}
    first = Peer("shardwire", "target", 1 << 20, hostname=name, env=env)
    assert first.name == name
    buf = engine.allocate_managed_buffer(1 << 20)
    engine.write_bytes_to_buffer(buf, b"before", 6)
    assert engine.transfer_sync_write(name, buf, first.buffer, 6) == 0
    first.kill()
    second = Peer("shardwire", "target", 1 << 20, hostname=name, env=env)
    try:
        assert second.name == name
        # Addressed to the process that was killed: never sent to the new one.
        assert engine.transfer_sync_write(name, buf, first.buffer, 6) == -1
        code, message = engine.last_error()
        assert code == PEER_GONE, message
        assert "answers as a new process now" in message, message
        # With the new process's address (asked of it): at the first try.
        assert engine.get_first_buffer_address(name) == second.buffer
        engine.write_bytes_to_buffer(buf, b"after!", 6)
        assert engine.transfer_sync_write(name, buf, second.buffer, 6) == 0
        assert engine.transfer_sync_read(name, buf + 4096, second.buffer, 6) == 0
        assert engine.read_bytes_from_buffer(buf + 4096, 6) == b"after!"
    finally:
        second.close()
