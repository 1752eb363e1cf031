"""shardwire: a thread-per-core transfer engine.

A drop-in for Mooncake's Python API::

    from shardwire import TransferEngine, TransferOpcode   # was: from mooncake.engine import ...

Same methods, argument names and order, defaults and return codes; blocking
calls release the GIL; calls Mooncake crashes on (a bogus batch id, anything
before ``initialize``) return its error codes instead.

Beyond Mooncake:

* addresses may be ints or objects: numpy arrays, torch tensors (``data_ptr()``),
  bytearray / memoryview / bytes;
* ``get_batch_transfer_status_nowait(ids)``: many batches' states without
  blocking;
* ``await engine.transfer_async(...)``: an asyncio-friendly transfer;
* ``with engine.registered(buf) as addr:``: registered memory as a context;
* ``cancel_transfer(batch_id)``: takes back what of an async batch has not
  gone out yet.
* ``transport_for(target_hostname)``: ``"local"`` for a shardwire engine on
  this host (shared memory, cross-memory attach), ``"rdma"`` or ``"tcp"``
  otherwise.
* ``rdma_device_bytes()``: bytes each local RDMA device has moved, by name.
"""

import asyncio
import contextlib
import ctypes
import os

from . import _native
from ._native import (
    SUPPORT_CUDA,
    SUPPORT_EFA,
    SUPPORT_HIP,
    SUPPORT_INTRA_NVLINK,
    SUPPORT_MNNVL,
    SUPPORT_MUSA,
    TransferNotify,
    TransferOpcode,
    __version__,
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


class TransferError(RuntimeError):
    """A failed call, for code that prefers exceptions: ``.code`` is
    Mooncake's error code."""

    def __init__(self, code, message):
        super().__init__(f"{message} (code {code})")
        self.code = code


def _buffer_address(obj, writable=False):
    """``(address, nbytes, keepalive)`` of an object's memory.

    Accepts objects with ``data_ptr()`` (torch tensors), with
    ``__array_interface__`` (numpy arrays), and buffers (bytearray,
    memoryview; bytes too when the memory is only read). The memory must be
    contiguous; ``keepalive`` must be held while the address is in use.
    """
    data_ptr = getattr(obj, "data_ptr", None)
    if callable(data_ptr):
        contiguous = getattr(obj, "is_contiguous", None)
        if callable(contiguous) and not contiguous():
            raise ValueError("the tensor must be contiguous")
        return int(data_ptr()), int(obj.numel() * obj.element_size()), obj
    interface = getattr(obj, "__array_interface__", None)
    if interface is not None:
        flags = getattr(obj, "flags", None)
        if flags is not None and not flags["C_CONTIGUOUS"]:
            raise ValueError("the array must be C-contiguous")
        address, readonly = interface["data"]
        if writable and readonly:
            raise ValueError("the array is read-only")
        return int(address), int(obj.nbytes), obj
    if isinstance(obj, bytes):
        if writable:
            raise ValueError("bytes are immutable: pass a bytearray to receive data")
        return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0, len(obj), obj
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"expected an address (int), a buffer, an array or a tensor, not {type(obj).__name__}"
        ) from None
    if not view.contiguous:
        raise ValueError("the buffer must be contiguous")
    if view.nbytes == 0:
        return 0, 0, view
    if view.readonly:
        if writable:
            raise ValueError("the buffer is read-only")
        source = view.obj
        if isinstance(source, bytes) and view.c_contiguous:
            base = ctypes.cast(ctypes.c_char_p(source), ctypes.c_void_p).value or 0
            offset = 0 if view.nbytes == len(source) else _offset_in(view, source)
            return base + offset, view.nbytes, (view, source)
        raise ValueError("read-only buffers other than bytes are not supported; pass a writable one")
    array = (ctypes.c_char * view.nbytes).from_buffer(view.cast("B"))
    return ctypes.addressof(array), view.nbytes, (view, array)


def _offset_in(view, source):
    # A read-only slice of bytes: find where it starts. memoryview keeps no
    # offset, so compare against the source (rare path).
    data = view.tobytes()
    offset = source.find(data)
    if offset < 0:
        raise ValueError("cannot locate the slice in its bytes object")
    return offset


class _AsyncWaiter:
    """Resolves futures of transfers submitted with ``_submit_notified``
    when the engine's completion eventfd fires."""

    def __init__(self, engine, loop):
        self.engine = engine
        self.loop = loop
        self.fd = engine._completion_fd()
        self.pending = {}
        loop.add_reader(self.fd, self._on_readable)

    def add(self, batch_id, future, keepalive):
        self.pending[batch_id] = (future, keepalive)
        # A batch may have settled before it was filed here.
        self._on_readable()

    def _on_readable(self):
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        if not self.pending:
            return
        ids = list(self.pending)
        codes = self.engine.get_batch_transfer_status_nowait(ids)
        done = [(i, c) for i, c in zip(ids, codes) if c != 0]
        if done:
            self.engine.release_batches([i for i, _ in done])
        for batch_id, code in done:
            future, _ = self.pending.pop(batch_id)
            if not future.done():
                future.set_result(0 if code == 1 else code)

    def close(self):
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.fd)


class TransferEngine(_native.TransferEngine):
    """Mooncake's ``TransferEngine``, on shardwire's shards."""

    def __init__(self):
        super().__init__()
        self._waiters = {}

    # --- conveniences the API document's examples use -----------------------

    def register(self, buffer, length=None, location="*"):
        """``register_memory`` for an address or a buffer object."""
        if isinstance(buffer, int):
            if length is None:
                raise TypeError("register(address, length): the length is needed for a bare address")
            return self.register_memory(buffer, length, location)
        address, nbytes, _ = _buffer_address(buffer, writable=True)
        return self.register_memory(address, nbytes if length is None else length, location)

    def deregister(self, buffer):
        """``unregister_memory`` for an address or a buffer object."""
        if isinstance(buffer, int):
            return self.unregister_memory(buffer)
        address, _, _ = _buffer_address(buffer)
        return self.unregister_memory(address)

    @contextlib.contextmanager
    def registered(self, buffer, length=None, location="*"):
        """Registers ``buffer`` (an address with ``length``, or a buffer
        object) for the ``with`` block and yields its address::

            with engine.registered(array) as addr:
                engine.transfer_sync_write(peer, addr, remote, array.nbytes)
        """
        if isinstance(buffer, int):
            if length is None:
                raise TypeError("registered(address, length): the length is needed for a bare address")
            address, keep = buffer, None
        else:
            address, nbytes, keep = _buffer_address(buffer, writable=True)
            length = nbytes if length is None else length
        code = self.register_memory(address, length, location)
        if code != 0:
            raise TransferError(code, self._why("register_memory"))
        try:
            yield address
        finally:
            self.unregister_memory(address)
            del keep

    # --- asyncio ---------------------------------------------------------

    async def transfer_async(self, target_hostname, buffer, peer_buffer_address, length,
                             opcode=TransferOpcode.Write):
        """Awaitable transfer: 0 on success, -1 on failure, -2 on timeout.
        The event loop is woken through an eventfd when the transfer
        settles; no thread waits on it."""
        return await self.batch_transfer_async_await(target_hostname, [buffer], [peer_buffer_address], [length],
                                                     opcode)

    async def batch_transfer_async_await(self, target_hostname, buffers, peer_buffer_addresses, lengths,
                                         opcode=TransferOpcode.Write):
        """Awaitable batch: 0 when every transfer completed, else -1 or -2."""
        loop = asyncio.get_running_loop()
        waiter = self._waiters.get(loop)
        if waiter is None:
            waiter = self._waiters[loop] = _AsyncWaiter(self, loop)
        keepalive = [b for b in buffers if not isinstance(b, int)]
        batch_id = self._submit_notified(target_hostname, buffers, list(peer_buffer_addresses), list(lengths),
                                         opcode)
        if batch_id == 0:
            return -1
        future = loop.create_future()
        waiter.add(batch_id, future, keepalive)
        return await future

    # --- errors as exceptions ----------------------------------------------

    def _why(self, what):
        last = self.last_error()
        return f"{what} failed: {last[1]}" if last else f"{what} failed"

    def check(self, code, what="call"):
        """Raises ``TransferError`` if ``code`` is a failure; returns it
        otherwise. ``engine.check(engine.transfer_sync_write(...))``."""
        if code is None or (isinstance(code, int) and code < 0):
            last = self.last_error()
            raise TransferError(last[0] if last else (code or -1), self._why(what))
        return code

    def __del__(self):
        for waiter in getattr(self, "_waiters", {}).values():
            waiter.close()
