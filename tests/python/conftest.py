"""Fixtures for the pytest suite: real peer processes (shardwire's package
or the Mooncake wheel) talking over loopback, P2P or through a real etcd
server that the fixture starts."""
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "..", "interop", "peer.py")


def die_with_parent():
    """preexec_fn: the child gets SIGKILL when pytest dies, and leaks nothing."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)


def pattern(length, seed):
    """The byte pattern peer.py checks: (i*131 + seed*7 + (i>>8)) & 255."""
    return bytes(((i * 131 + seed * 7 + (i >> 8)) & 0xFF) for i in range(length))


class Peer:
    """A peer process driven over stdin/stdout (see tests/interop/peer.py)."""

    def __init__(self, impl, *args, hostname=None, metadata=None, env=None):
        env = dict(os.environ, PEER_IMPL=impl, GLOG_minloglevel="2", **(env or {}))
        if impl == "mooncake":
            env["MC_FORCE_TCP"] = "1"  # the wheel has no RDMA here; a shardwire peer keeps its local path
        if hostname:
            env["PEER_HOSTNAME"] = hostname
        if metadata:
            env["PEER_METADATA"] = metadata
            env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"  # where Mooncake's data port binds
        self.proc = subprocess.Popen([sys.executable, PEER, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent)
        ready = self.proc.stdout.readline().split()
        assert ready and ready[0] == "ready", f"peer said {ready!r}"
        self.name, self.buffer = ready[1], int(ready[2])

    def cmd(self, line, timeout=120):
        """Sends a command and returns the answer; a peer silent for
        `timeout` seconds fails the test instead of hanging it."""
        import select
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer to {line!r} within {timeout} s"
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


def port_free(port):
    s = socket.socket()
    # As servers bind: connections lingering in TIME_WAIT do not count.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_next_port = [(os.getpid() * 0x9E3779B9) % 12000]


def free_port():
    """A free loopback port below the kernel's ephemeral range (32768 and
    up), so no outgoing connection is given it meanwhile: a process
    restarted on it binds it again. Each call takes the next of a sequence
    that starts at a place drawn from the pid."""
    for _ in range(12000):
        _next_port[0] = (_next_port[0] + 7919) % 12000
        port = 20000 + _next_port[0]
        if port_free(port):
            return port
    raise AssertionError("no free port in 20000..32000")


def etcd_version(port):
    """The etcd version answering on 127.0.0.1:port, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=2) as r:
            return json.loads(r.read()).get("etcdserver")
    except Exception:
        return None


class EtcdServer:
    """A real etcd server (tools/setup installs Debian's etcd-server) on
    127.0.0.1:port, with its data in a fresh directory."""

    def __init__(self, port):
        self.port, self.endpoint = port, f"127.0.0.1:{port}"
        self.dir = tempfile.mkdtemp(prefix="shardwire-etcd-")
        peer_url = f"http://127.0.0.1:{free_port()}"
        client_url = f"http://{self.endpoint}"
        self.proc = subprocess.Popen(
            ["etcd", "--name=shardwire-test", f"--data-dir={self.dir}", f"--listen-client-urls={client_url}",
             f"--advertise-client-urls={client_url}", f"--listen-peer-urls={peer_url}",
             f"--initial-advertise-peer-urls={peer_url}", f"--initial-cluster=shardwire-test={peer_url}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 30
        while etcd_version(port) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"etcd did not start on {self.endpoint}")
            time.sleep(0.05)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def etcd():
    server = EtcdServer(free_port())
    yield server
    server.close()


@pytest.fixture
def etcd_2379():
    """An etcd server where the API document's examples look for one,
    127.0.0.1:2379: one already running there, else one started here."""
    if not port_free(2379):
        if etcd_version(2379) is None:
            pytest.fail("127.0.0.1:2379 is taken by something that is not etcd")
        yield "127.0.0.1:2379"
        return
    server = EtcdServer(2379)
    yield server.endpoint
    server.close()
