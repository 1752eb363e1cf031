"""Fixtures for the pytest suite: real peer processes (shardwire's package
or the Mooncake wheel), talking P2P over loopback."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "interop", "peer.py")


def pattern(length, seed):
    """The byte pattern peer.py checks: (i*131 + seed*7 + (i>>8)) & 255."""
    return bytes(((i * 131 + seed * 7 + (i >> 8)) & 0xFF) for i in range(length))


class Peer:
    """A peer process driven over stdin/stdout (see tests/interop/peer.py)."""

    def __init__(self, impl, *args, hostname=None):
        env = dict(os.environ, PEER_IMPL=impl, MC_FORCE_TCP="1", GLOG_minloglevel="2")
        if hostname:
            env["PEER_HOSTNAME"] = hostname
        self.proc = subprocess.Popen([sys.executable, PEER, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", f"peer said {ready!r}"
        self.name, self.buffer = ready[1], int(ready[2])

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the peer exited during {line!r}"
        return answer.strip()

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except Exception:
                self.kill()


@pytest.fixture
def shardwire_target():
    peer = Peer("shardwire", "target", 16 << 20)
    yield peer
    peer.close()


@pytest.fixture
def mooncake_target():
    peer = Peer("mooncake", "target", 16 << 20)
    yield peer
    peer.close()


@pytest.fixture
def engine():
    from shardwire import TransferEngine

    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    yield e
    e.shutdown()
