"""Type stubs for the ``shardwire`` package: a drop-in for
``mooncake.engine`` (see ``_native.pyi`` for the engine's methods) and the
conveniences beyond it."""

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from . import _native
from ._native import (
    SUPPORT_CUDA as SUPPORT_CUDA,
    SUPPORT_EFA as SUPPORT_EFA,
    SUPPORT_HIP as SUPPORT_HIP,
    SUPPORT_INTRA_NVLINK as SUPPORT_INTRA_NVLINK,
    SUPPORT_MNNVL as SUPPORT_MNNVL,
    SUPPORT_MUSA as SUPPORT_MUSA,
    TransferNotify as TransferNotify,
    TransferOpcode as TransferOpcode,
    __version__ as __version__,
    _Address,
    _Opcode,
)

__all__ = [
    "TransferEngine",
    "TransferOpcode",
    "TransferNotify",
    "TransferError",
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MNNVL",
    "SUPPORT_MUSA",
]

_T = TypeVar("_T")

class TransferError(RuntimeError):
    """A failed call; ``code`` is Mooncake's error code."""

    code: int
    def __init__(self, code: int, message: str) -> None: ...

class TransferEngine(_native.TransferEngine):
    """Mooncake's ``TransferEngine``, on shardwire's shards."""

    def __init__(self) -> None: ...
    def register(self, buffer: _Address, length: int | None = None, location: str = "*") -> int:
        """``register_memory`` for an address (with ``length``) or a buffer object."""
    def deregister(self, buffer: _Address) -> int:
        """``unregister_memory`` for an address or a buffer object."""
    def registered(
        self, buffer: _Address, length: int | None = None, location: str = "*"
    ) -> AbstractContextManager[int]:
        """Registers ``buffer`` for a ``with`` block and yields its address;
        raises ``TransferError`` if it cannot be registered."""
    async def transfer_async(
        self,
        target_hostname: str,
        buffer: _Address,
        peer_buffer_address: int,
        length: int,
        opcode: _Opcode = ...,
    ) -> int:
        """An awaitable transfer: 0, -1 on failure, -2 on timeout."""
    async def batch_transfer_async_await(
        self,
        target_hostname: str,
        buffers: Sequence[_Address],
        peer_buffer_addresses: Iterable[int],
        lengths: Iterable[int],
        opcode: _Opcode = ...,
    ) -> int:
        """An awaitable batch: 0 when every transfer completed, else -1 or -2."""
    def check(self, code: _T, what: str = "call") -> _T:
        """Raises ``TransferError`` if ``code`` is None or negative; returns it otherwise."""
