"""Opt-in authentication from Python: SHARDWIRE_AUTH_KEY in the
environment of processes running the package. Peers with the key move
bytes; the real Mooncake wheel, which cannot speak it, gets a failure (not a
hang) and none of the target's bytes."""
import os
import time

from conftest import Peer, pattern

KEY = "python-auth-test-key-0123456789"


def test_shardwire_peers_with_the_key_transfer(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o600)
    target = Peer("shardwire", "target", 1 << 20, env={"SHARDWIRE_AUTH_KEY": KEY})
    # The initiator reads the same key from a file; TCP, so the ports are used.
    initiator = Peer("shardwire", "initiator", target.name, target.buffer, 1 << 20,
                     env={"SHARDWIRE_AUTH_KEY_FILE": str(key_file), "SHARDWIRE_LOCAL": "0"})
    try:
        assert initiator.cmd("write 0 65536 5") == "ok"
        assert target.cmd("check 0 65536 5") == "ok"
        assert initiator.cmd("read 0 65536 5") == "ok"
        assert initiator.cmd("batch 8 4096 9") == "ok"
    finally:
        initiator.close()
        target.close()


def test_a_mooncake_peer_is_refused_and_reads_nothing():
    target = Peer("shardwire", "target", 1 << 20, env={"SHARDWIRE_AUTH_KEY": KEY})
    mooncake = Peer("mooncake", "initiator", target.name, target.buffer, 1 << 20)
    try:
        assert target.cmd("fill 0 4096 3") == "ok"
        started = time.monotonic()
        answer = mooncake.cmd("read 0 4096 3")
        assert answer.startswith("fail"), answer
        write = mooncake.cmd("write 0 4096 4")
        assert write.startswith("fail"), write
        assert time.monotonic() - started < 60
        # Nothing the Mooncake peer sent landed.
        assert target.cmd("check 0 4096 3") == "ok"
        assert target.cmd("hex 0 16") == pattern(16, 3).hex()
    finally:
        mooncake.close()
        target.close()
