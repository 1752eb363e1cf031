"""The usage examples of the API document (shared/seeds/
mooncake-transfer-engine-python-api.md), as written: with the etcd server
they name (127.0.0.1:2379, started by the fixture) and a real peer process
registered there as 127.0.0.1:12346, once a shardwire peer and once the
Mooncake wheel.

Copied verbatim below, with these substitutions only, each marked:
- `from mooncake.engine import` -> `from shardwire import` (the drop-in);
- `import numpy as np`, which the document uses but never imports;
- `remote_addr = ??` (a placeholder in the document) -> the peer's buffer.
The asynchronous example continues the first one, as in the document, with
`local_addr` the buffer the first one registered.
"""
import pytest

from conftest import Peer

BASIC = '''
from mooncake.engine import TransferEngine
import os

# Create transfer engine instance
engine = TransferEngine()

# Initialize with basic configuration
ret = engine.initialize(
    local_hostname="127.0.0.1:12345",
    metadata_server="127.0.0.1:2379",
    protocol="rdma",
    device_name=""
)

if ret != 0:
    raise RuntimeError(f"Initialization failed with code {ret}")

# Allocate and initialize client buffer (1MB)
client_buffer = np.ones(1024 * 1024, dtype=np.uint8)  # Fill with ones
buffer_data = client_buffer.ctypes.data
buffer_data_len = client_buffer.nbytes

# Prepare data
data = b"Hello, Transfer Engine!"
data_len = len(data)

engine.register(buffer_data, buffer_data_len)

# Get Remote Addr from ZMQ or upper-layer inference framework
remote_addr = ??

# Transfer data to remote node
ret = engine.transfer_sync_write(
    target_hostname="127.0.0.1:12346",
    buffer=data,
    peer_buffer_address=remote_addr,
    length=data_len
)

if ret == 0:
    print("Data transfer completed successfully")
else:
    print(f"Data transfer failed with code {ret}")

engine.deregister(data)
'''

ASYNC = '''
# Submit asynchronous write
batch_id = engine.transfer_submit_write(
    target_hostname="127.0.0.1:12346",
    buffer=local_addr,
    peer_buffer_address=remote_addr,
    length=data_len
)

if batch_id < 0:
    print(f"Failed to submit transfer with code {batch_id}")
else:
    # Poll for completion
    while True:
        status = engine.transfer_check_status(batch_id)
        if status == 1:
            print("Transfer completed successfully")
            break
        elif status == -1:
            print("Transfer failed")
            break
        elif status == -2:
            print("Transfer timed out")
            break
        # Transfer still in progress, continue polling
        import time
        time.sleep(0.001)  # Small delay to avoid busy waiting
'''

MANAGED = '''
# Allocate managed buffer
buffer_size = 1024 * 1024  # 1MB
buffer_addr = engine.allocate_managed_buffer(buffer_size)

if buffer_addr == 0:
    print("Failed to allocate buffer")
else:
    # Use the buffer
    test_data = b"Test data for managed buffer"
    engine.write_bytes_to_buffer(buffer_addr, test_data, len(test_data))
    
    # Read back
    read_data = engine.read_bytes_from_buffer(buffer_addr, len(test_data))
    print(f"Read data: {read_data}")
    
    # Free the buffer when done
    engine.free_managed_buffer(buffer_addr, buffer_size)
'''


@pytest.fixture(params=["shardwire", "mooncake"])
def peer_12346(request, etcd_2379):
    peer = Peer(request.param, "target", 1 << 20, hostname="127.0.0.1:12346", metadata=etcd_2379)
    assert peer.name == "127.0.0.1:12346"
    yield peer
    peer.close()


def substituted(text, remote):
    out = text.replace("from mooncake.engine import", "from shardwire import")  # the drop-in
    out = out.replace("remote_addr = ??", f"remote_addr = {remote}")  # the document's placeholder
    return "import numpy as np\n" + out  # used, never imported, by the document


def test_the_documents_examples_run_as_written(peer_12346, capsys):
    namespace = {}
    exec(compile(substituted(BASIC, peer_12346.buffer), "basic-example", "exec"), namespace)
    assert "Data transfer completed successfully" in capsys.readouterr().out
    assert bytes.fromhex(peer_12346.cmd("hex 0 23")) == b"Hello, Transfer Engine!"
    namespace["local_addr"] = namespace["buffer_data"]
    exec(compile(ASYNC, "async-example", "exec"), namespace)
    assert "Transfer completed successfully" in capsys.readouterr().out
    assert bytes.fromhex(peer_12346.cmd("hex 0 23")) == b"\x01" * 23, "the ones of client_buffer"
    exec(compile(MANAGED, "managed-example", "exec"), namespace)
    assert "Read data: b'Test data for managed buffer'" in capsys.readouterr().out
    namespace["engine"].shutdown()
