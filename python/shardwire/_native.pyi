"""Type stubs for ``shardwire._native``, the compiled extension (PyO3).

The names mirror ``mooncake.engine``. Return codes are Mooncake's: 0 is
success, a negative number an error code (``last_error()`` says why).
``tests/python/test_stubs.py`` checks these stubs against the compiled
module, both ways.
"""

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, Protocol, final

from typing_extensions import Buffer, TypeAlias

__version__: Final[str]

SUPPORT_CUDA: Final[bool]
SUPPORT_EFA: Final[bool]
SUPPORT_HIP: Final[bool]
SUPPORT_INTRA_NVLINK: Final[bool]
SUPPORT_MNNVL: Final[bool]
SUPPORT_MUSA: Final[bool]

class _HasDataPtr(Protocol):
    """A torch tensor, or anything else with ``data_ptr()``."""

    def data_ptr(self) -> int: ...

class _HasArrayInterface(Protocol):
    """A numpy array, or anything else with ``__array_interface__``."""

    @property
    def __array_interface__(self) -> dict[str, Any]: ...

# An address: an int as in Mooncake, or an object whose memory is used
# (numpy array, tensor, bytearray, memoryview; bytes where it is only read).
_Address: TypeAlias = int | Buffer | _HasDataPtr | _HasArrayInterface

@final
class TransferOpcode:
    """``TransferOpcode.Read`` / ``.Write`` (also ``.READ`` / ``.WRITE``)."""

    Read: ClassVar[TransferOpcode]
    Write: ClassVar[TransferOpcode]
    READ: ClassVar[TransferOpcode]
    WRITE: ClassVar[TransferOpcode]
    def __int__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

_Opcode: TypeAlias = TransferOpcode | int
_OpcodeType: TypeAlias = TransferOpcode

@final
class TransferNotify:
    """A notification: ``name`` (who sent it) and ``msg``."""

    name: str
    msg: str
    def __init__(self, name: str = "", msg: str = "") -> None: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: ClassVar[None]  # type: ignore[assignment]

class TransferEngine:
    """Mooncake's ``TransferEngine``."""

    TransferOpcode: ClassVar[type[_OpcodeType]]
    def __init__(self) -> None: ...
    def initialize(self, local_hostname: str, metadata_server: str, protocol: str, device_name: str) -> int: ...
    def initialize_ext(
        self, local_hostname: str, metadata_server: str, protocol: str, device_name: str, metadata_type: str
    ) -> int: ...
    def get_rpc_port(self) -> int:
        """The RPC port; -1 before ``initialize``."""
    def get_segment_name(self) -> str:
        """``host:port``; raises ``ValueError`` before ``initialize``."""
    def allocate_managed_buffer(self, length: int) -> int:
        """The buffer's address, or 0."""
    def free_managed_buffer(self, buffer_addr: int, length: int) -> int: ...
    def get_first_buffer_address(self, segment_name: str) -> int:
        """The address of the segment's first buffer, or 0."""
    def transport_for(self, target_hostname: str) -> str:
        """``"local"``, ``"rdma"`` or ``"tcp"``; ``""`` on an error."""
    def rdma_device_bytes(self) -> dict[str, int]: ...
    def metrics(self) -> dict[str, float]:
        """Each Prometheus series (``name{label="value",...}``) to its value."""
    def metrics_address(self) -> str | None:
        """``host:port`` where ``/metrics`` is served (``SHARDWIRE_METRICS_ADDR``), or None."""
    def transfer_sync_write(
        self, target_hostname: str, buffer: _Address, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int: ...
    def transfer_sync_read(
        self, target_hostname: str, buffer: _Address, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int: ...
    def transfer_sync(
        self,
        target_hostname: str,
        buffer: _Address,
        peer_buffer_address: int,
        length: int,
        opcode: _Opcode,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int: ...
    def batch_transfer_sync_write(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int: ...
    def batch_transfer_sync_read(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int: ...
    def batch_transfer_sync(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        opcode: _Opcode,
        notify: TransferNotify | None = None,
        transport_hint: str = "",
    ) -> int: ...
    def batch_transfer_async_write(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        """A batch id, or 0."""
    def batch_transfer_async_read(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        transport_hint: str = "",
    ) -> int:
        """A batch id, or 0."""
    def batch_transfer_async(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        opcode: _Opcode,
        transport_hint: str = "",
    ) -> int:
        """A batch id, or 0."""
    def transfer_submit_write(
        self, target_hostname: str, buffer: _Address, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int:
        """A batch id, or 0."""
    def transfer_submit_read(
        self, target_hostname: str, buffer: _Address, peer_buffer_address: int, length: int, transport_hint: str = ""
    ) -> int:
        """A batch id, or 0."""
    def transfer_check_status(self, batch_id: int) -> int:
        """1 done, 0 pending, -1 failed (or a bogus id), -2 timed out."""
    def get_batch_transfer_status(self, batch_ids: Sequence[int]) -> int:
        """Blocks until every batch completes (0), or one fails (-1)."""
    def get_batch_transfer_status_nowait(self, batch_ids: Sequence[int]) -> list[int]:
        """Each batch's ``transfer_check_status`` code, without waiting."""
    def cancel_transfer(self, batch_id: int) -> int: ...
    def release_batches(self, batch_ids: Sequence[int]) -> None: ...
    def register_memory(self, buffer_addr: _Address, capacity: int, location: str = "*") -> int: ...
    def unregister_memory(self, buffer_addr: _Address) -> int: ...
    def batch_register_memory(
        self, buffer_addresses: Iterable[_Address], capacities: Sequence[int], location: str = "*"
    ) -> int: ...
    def batch_unregister_memory(self, buffer_addresses: Iterable[_Address]) -> int: ...
    def get_local_topology(self, device_name: str | None = None) -> str: ...
    def get_notifies(self) -> list[TransferNotify]: ...
    def send_probe(self, peer: str) -> int: ...
    def write_bytes_to_buffer(self, dest_address: _Address, src_ptr: bytes, length: int) -> int: ...
    def read_bytes_from_buffer(self, source_address: _Address, length: int) -> bytes:
        """Raises ``ValueError`` when the bytes cannot be read."""
    def warmup_efa_segment(self, segment_name: str) -> int: ...
    def last_error(self) -> tuple[int, str] | None:
        """The code and message of the last failure."""
    def shutdown(self) -> None: ...
    def _submit_notified(
        self,
        target_hostname: str,
        buffers: Iterable[_Address],
        peer_buffer_addresses: Sequence[int],
        lengths: Sequence[int],
        opcode: _Opcode,
    ) -> int: ...
    def _completion_fd(self) -> int: ...
