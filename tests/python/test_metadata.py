"""Central metadata from Python: `initialize(..., "http://...")` through the
Mooncake wheel's own HTTP metadata server, with a Mooncake engine (the
wheel) on the other side, both ways; and `redis://` through a real
redis-server with a password."""
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import Peer, die_with_parent, free_port, pattern
from shardwire import TransferEngine


def http_ready(url):
    """True once the server answers (404 for a key nobody wrote)."""
    try:
        urllib.request.urlopen(f"{url}?key=shardwire-test%2Fready", timeout=2)
    except urllib.error.HTTPError as e:
        return e.code == 404
    except OSError:
        return False
    return True


@pytest.fixture
def mooncake_http_metadata():
    """The wheel's `mooncake_http_metadata_server` on a free port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mooncake.http_metadata_server", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}/metadata"
    deadline = time.monotonic() + 30
    while not http_ready(url):
        assert proc.poll() is None and time.monotonic() < deadline, "the metadata server did not start"
        time.sleep(0.05)
    yield url
    proc.kill()
    proc.wait()


def test_http_metadata_with_a_mooncake_peer_both_ways(mooncake_http_metadata):
    url = mooncake_http_metadata
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1:7801", url, "tcp", "") == 0
    try:
        # The key, in Mooncake's layout, as the wheel's server holds it.
        with urllib.request.urlopen(f"{url}?key=mooncake%2Frpc_meta%2F127.0.0.1%3A7801", timeout=3) as r:
            assert b'"rpc_port"' in r.read()
        local = engine.allocate_managed_buffer(4 << 20)
        target = Peer("mooncake", "target", 4 << 20, hostname="127.0.0.1:7802", metadata=url)
        try:
            for i, length in enumerate([1, 4096, 3 << 20]):
                engine.write_bytes_to_buffer(local, pattern(length, i), length)
                assert engine.transfer_sync_write(target.name, local, target.buffer, length) == 0
                assert target.cmd(f"check 0 {length} {i}") == "ok"
                assert target.cmd(f"fill 0 {length} {10 + i}") == "ok"
                assert engine.transfer_sync_read(target.name, local, target.buffer, length) == 0
                assert engine.read_bytes_from_buffer(local, length) == pattern(length, 10 + i)
        finally:
            target.close()
        remote = engine.allocate_managed_buffer(4 << 20)
        initiator = Peer("mooncake", "initiator", "127.0.0.1:7801", remote, 4 << 20, hostname="127.0.0.1:7803",
                         metadata=url)
        try:
            assert initiator.cmd("write 0 65536 3") == "ok"
            assert engine.read_bytes_from_buffer(remote, 65536) == pattern(65536, 3)
            engine.write_bytes_to_buffer(remote, pattern(65536, 4), 65536)
            assert initiator.cmd("read 0 65536 4") == "ok"
        finally:
            initiator.close()
        # A name the server does not know: an error code, not a crash.
        assert engine.transfer_sync_write("127.0.0.1:1", local, 0, 8) != 0
    finally:
        engine.shutdown()


def test_http_metadata_errors_are_codes():
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1:7811", f"http://127.0.0.1:{free_port()}/metadata", "tcp", "") != 0
    assert engine.initialize("127.0.0.1:7811", "https://127.0.0.1:1/metadata", "tcp", "") != 0
    assert engine.initialize("127.0.0.1:7811", "gopher://127.0.0.1:1", "tcp", "") != 0


def test_redis_metadata_between_two_engines():
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        url = f"redis://127.0.0.1:{port}"
        a, b = TransferEngine(), TransferEngine()
        deadline = time.monotonic() + 30
        while a.initialize("127.0.0.1:7821", url, "tcp", "") != 0:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        assert b.initialize("127.0.0.1:7822", url, "tcp", "") == 0
        remote, local = a.allocate_managed_buffer(1 << 20), b.allocate_managed_buffer(1 << 20)
        b.write_bytes_to_buffer(local, pattern(65536, 5), 65536)
        assert b.transfer_sync_write("127.0.0.1:7821", local, remote, 65536) == 0
        assert a.read_bytes_from_buffer(remote, 65536) == pattern(65536, 5)
        a.shutdown()
        b.shutdown()
    finally:
        proc.kill()
        proc.wait()
