//! The Python extension module `shardwire._native` (feature `python`).
//!
//! It mirrors `mooncake.engine`: the same class and method names, argument
//! names and order, defaults and return codes, so `from shardwire import
//! TransferEngine` can replace `from mooncake.engine import TransferEngine`.
//! Every call that may wait releases the GIL. Where Mooncake crashes (a bogus
//! batch id, a call before `initialize`) this returns its error code.
//!
//! An address argument may be an `int`, as in Mooncake, or an object with
//! `data_ptr()` (a torch tensor), `__array_interface__` (numpy), or the
//! buffer protocol (bytearray, memoryview, bytes): `shardwire._buffer_address`
//! resolves those, in Python, which keeps the wheel on the stable ABI of
//! CPython 3.10. A buffer object that is not inside registered memory is
//! registered for the length of a synchronous call.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::engine::{self, BatchState, TeError, TeResult, TransferEngine, TransferRequest, code};
use crate::proto::mooncake::tcp::Opcode;

/// `TransferOpcode.Read` / `.Write` (also `.READ` / `.WRITE`, as the API
/// document spells them).
#[pyclass(name = "TransferOpcode", module = "shardwire._native", eq, eq_int, from_py_object)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PyOpcode {
    Read = 0,
    Write = 1,
}

#[pymethods]
impl PyOpcode {
    #[classattr]
    #[pyo3(name = "READ")]
    fn read_upper() -> Self {
        Self::Read
    }

    #[classattr]
    #[pyo3(name = "WRITE")]
    fn write_upper() -> Self {
        Self::Write
    }
}

/// A notification: `name` (who sent it) and `msg`.
#[pyclass(name = "TransferNotify", module = "shardwire._native", get_all, set_all, eq, from_py_object)]
#[derive(Clone, PartialEq, Eq)]
pub struct PyNotify {
    pub name: String,
    pub msg: String,
}

#[pymethods]
impl PyNotify {
    #[new]
    #[pyo3(signature = (name = String::new(), msg = String::new()))]
    fn new(name: String, msg: String) -> Self {
        Self { name, msg }
    }

    fn __repr__(&self) -> String {
        format!("TransferNotify(name={:?}, msg={:?})", self.name, self.msg)
    }
}

fn opcode_of(obj: &Bound<'_, PyAny>) -> PyResult<Opcode> {
    if let Ok(op) = obj.extract::<PyOpcode>() {
        return Ok(if op == PyOpcode::Read { Opcode::Read } else { Opcode::Write });
    }
    match obj.extract::<i64>() {
        Ok(0) => Ok(Opcode::Read),
        Ok(1) => Ok(Opcode::Write),
        _ => Err(PyTypeError::new_err("opcode must be TransferOpcode.Read or TransferOpcode.Write")),
    }
}

/// An address from an argument, and what keeps its memory alive.
struct Address {
    addr: u64,
    /// The buffer's length when the argument was an object; `None` for ints.
    len: Option<u64>,
    _keep: Option<Py<PyAny>>,
}

/// Resolves an address argument; `writable` when the memory will receive
/// bytes (a READ's destination, registered memory).
fn address_of(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<Address> {
    if let Ok(addr) = obj.extract::<u64>() {
        return Ok(Address { addr, len: None, _keep: None });
    }
    let helper = obj.py().import("shardwire")?.getattr("_buffer_address")?;
    let resolved = helper.call1((obj, writable))?;
    let (addr, len, keep): (u64, u64, Py<PyAny>) = resolved.extract()?;
    Ok(Address { addr, len: Some(len), _keep: Some(keep) })
}

/// The Mooncake-compatible engine.
#[pyclass(name = "TransferEngine", module = "shardwire._native", subclass)]
pub struct PyEngine {
    inner: Arc<TransferEngine>,
    last_error: Mutex<Option<(i32, String)>>,
    completions: Mutex<Option<Arc<OwnedFd>>>,
}

impl PyEngine {
    /// Records an error for `last_error()` and returns its code.
    fn fail(&self, e: &TeError) -> i32 {
        log::debug!("{e}");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some((e.code(), e.message().to_string()));
        e.code()
    }

    /// Mooncake's convention for most calls: 0, or the error's code.
    fn code(&self, r: TeResult<()>) -> i32 {
        match r {
            Ok(()) => 0,
            Err(e) => self.fail(&e),
        }
    }

    /// The value, or, on an error, `fallback` after recording the error
    /// for `last_error()`: how every method reports a failure.
    fn value_or<T>(&self, r: TeResult<T>, fallback: T) -> T {
        r.unwrap_or_else(|e| {
            self.fail(&e);
            fallback
        })
    }

    /// The sync transfer calls collapse every failure to -1, as Mooncake's
    /// Python binding does.
    fn sync_code(&self, r: TeResult<()>) -> i32 {
        self.value_or(r.map(|()| 0), -1)
    }

    /// Registers an object's memory for the duration of a call if it is not
    /// inside registered memory already. Returns the address to unregister.
    fn lend(&self, a: &Address, len: u64) -> TeResult<Option<u64>> {
        let Some(obj_len) = a.len else { return Ok(None) };
        if len > obj_len {
            return Err(TeError::invalid(format!("length {len} is larger than the buffer object ({obj_len} bytes)")));
        }
        if len == 0 || self.inner.is_registered(a.addr, len)? {
            return Ok(None);
        }
        self.inner.register_memory(a.addr, obj_len, "*")?;
        Ok(Some(a.addr))
    }

    fn completion_fd(&self) -> PyResult<Arc<OwnedFd>> {
        let mut slot = self.completions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = slot.as_ref() {
            return Ok(fd.clone());
        }
        // SAFETY: plain syscall; the descriptor is wrapped at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(PyOSError::new_err(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: fd is fresh and owned by nothing else.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        *slot = Some(fd.clone());
        Ok(fd)
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer_one(
        &self,
        py: Python<'_>,
        target: &str,
        buffer: &Bound<'_, PyAny>,
        peer: u64,
        length: u64,
        opcode: Opcode,
        notify: Option<PyNotify>,
    ) -> PyResult<i32> {
        let a = address_of(buffer, opcode == Opcode::Read)?;
        let engine = self.inner.clone();
        let lent = match self.lend(&a, length) {
            Ok(l) => l,
            Err(e) => return Ok(self.sync_code(Err(e))),
        };
        let note = notify.map(|n| engine::TransferNotify { name: n.name, msg: n.msg });
        let result = py.detach(|| {
            let r = engine.transfer_sync(target, a.addr, peer, length, opcode, note.as_ref());
            if let Some(addr) = lent {
                let _ = engine.unregister_memory(addr);
            }
            r
        });
        Ok(self.sync_code(result))
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_sync(
        &self,
        py: Python<'_>,
        target: &str,
        buffers: &Bound<'_, PyAny>,
        peers: Vec<u64>,
        lengths: Vec<u64>,
        opcode: Opcode,
        notify: Option<PyNotify>,
    ) -> PyResult<i32> {
        let addrs = addresses(buffers, opcode == Opcode::Read)?;
        let mut lent = Vec::new();
        for (a, &len) in addrs.iter().zip(&lengths) {
            match self.lend(a, len) {
                Ok(Some(addr)) => lent.push(addr),
                Ok(None) => {}
                Err(e) => {
                    for addr in lent {
                        let _ = self.inner.unregister_memory(addr);
                    }
                    return Ok(self.sync_code(Err(e)));
                }
            }
        }
        let raw: Vec<u64> = addrs.iter().map(|a| a.addr).collect();
        let engine = self.inner.clone();
        let note = notify.map(|n| engine::TransferNotify { name: n.name, msg: n.msg });
        let result = py.detach(|| {
            let r = engine.batch_transfer_sync_lists(target, &raw, &peers, &lengths, opcode, note.as_ref());
            for addr in lent {
                let _ = engine.unregister_memory(addr);
            }
            r
        });
        Ok(self.sync_code(result))
    }

    fn batch_async(
        &self,
        py: Python<'_>,
        target: &str,
        buffers: &Bound<'_, PyAny>,
        peers: Vec<u64>,
        lengths: Vec<u64>,
        opcode: Opcode,
    ) -> PyResult<u64> {
        let addrs = addresses(buffers, opcode == Opcode::Read)?;
        let raw: Vec<u64> = addrs.iter().map(|a| a.addr).collect();
        let engine = self.inner.clone();
        let result = py.detach(|| engine.batch_transfer_async_lists(target, &raw, &peers, &lengths, opcode));
        Ok(self.value_or(result, 0))
    }
}

fn addresses(list: &Bound<'_, PyAny>, writable: bool) -> PyResult<Vec<Address>> {
    list.try_iter()?.map(|item| address_of(&item?, writable)).collect()
}

fn state_code(r: TeResult<BatchState>) -> i32 {
    match r {
        Ok(s) => s.code(),
        Err(_) => -1,
    }
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new() -> Self {
        Self { inner: Arc::new(TransferEngine::new()), last_error: Mutex::new(None), completions: Mutex::new(None) }
    }

    /// `TransferEngine.TransferOpcode`, as Mooncake's class has it.
    #[classattr]
    #[pyo3(name = "TransferOpcode")]
    fn opcode_type(py: Python<'_>) -> Py<pyo3::types::PyType> {
        py.get_type::<PyOpcode>().unbind()
    }

    fn initialize(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> i32 {
        let e = self.inner.clone();
        let r = py.detach(|| e.initialize(local_hostname, metadata_server, protocol, device_name));
        // Mooncake's initialize returns 0 or -1; last_error() keeps the code.
        self.sync_code(r)
    }

    fn initialize_ext(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
        metadata_type: &str,
    ) -> i32 {
        let e = self.inner.clone();
        let r = py.detach(|| e.initialize_ext(local_hostname, metadata_server, protocol, device_name, metadata_type));
        self.sync_code(r)
    }

    /// The RPC port; -1 before `initialize` (Mooncake segfaults).
    fn get_rpc_port(&self) -> i32 {
        match self.inner.get_rpc_port() {
            Ok(p) => i32::from(p),
            Err(e) => self.fail(&e),
        }
    }

    /// This engine's segment name, `host:port` (beyond Mooncake).
    fn get_segment_name(&self) -> PyResult<String> {
        self.inner.segment_name().map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn allocate_managed_buffer(&self, length: u64) -> u64 {
        self.value_or(self.inner.allocate_managed_buffer(length), 0)
    }

    fn free_managed_buffer(&self, buffer_addr: u64, length: u64) -> i32 {
        self.code(self.inner.free_managed_buffer(buffer_addr, length))
    }

    fn get_first_buffer_address(&self, py: Python<'_>, segment_name: &str) -> u64 {
        let e = self.inner.clone();
        self.value_or(py.detach(|| e.get_first_buffer_address(segment_name)), 0)
    }

    /// The transport that carries transfers to `target_hostname`: "local"
    /// (a shardwire engine on this host) or "tcp"; "" on an error (beyond
    /// Mooncake).
    fn transport_for(&self, py: Python<'_>, target_hostname: &str) -> String {
        let e = self.inner.clone();
        self.value_or(py.detach(|| e.transport_for(target_hostname).map(str::to_string)), String::new())
    }

    /// Bytes each local RDMA device has moved, by device name (empty
    /// without the RDMA transport; beyond Mooncake).
    fn rdma_device_bytes(&self, py: Python<'_>) -> std::collections::BTreeMap<String, u64> {
        let e = self.inner.clone();
        self.value_or(py.detach(|| e.rdma_device_bytes().map(|v| v.into_iter().collect())), Default::default())
    }

    /// The process's metrics (beyond Mooncake): each Prometheus series,
    /// written as `/metrics` writes it (`name{label="value",...}`), to its
    /// value. The same figures `SHARDWIRE_METRICS_ADDR` serves.
    fn metrics(&self, py: Python<'_>) -> std::collections::BTreeMap<String, f64> {
        let e = self.inner.clone();
        py.detach(move || e.metrics())
    }

    /// `host:port` where the process serves `/metrics`
    /// (`SHARDWIRE_METRICS_ADDR`), or None.
    fn metrics_address(&self) -> Option<String> {
        self.inner.metrics_address().map(|a| a.to_string())
    }

    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: &Bound<'_, PyAny>,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.transfer_one(py, target_hostname, buffer, peer_buffer_address, length, Opcode::Write, None)
    }

    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: &Bound<'_, PyAny>,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.transfer_one(py, target_hostname, buffer, peer_buffer_address, length, Opcode::Read, None)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, opcode, notify = None, transport_hint = ""))]
    fn transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: &Bound<'_, PyAny>,
        peer_buffer_address: u64,
        length: u64,
        opcode: &Bound<'_, PyAny>,
        notify: Option<PyNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = opcode_of(opcode)?;
        self.transfer_one(py, target_hostname, buffer, peer_buffer_address, length, op, notify)
    }

    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.batch_sync(py, target_hostname, buffers, peer_buffer_addresses, lengths, Opcode::Write, None)
    }

    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        self.batch_sync(py, target_hostname, buffers, peer_buffer_addresses, lengths, Opcode::Read, None)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify = None, transport_hint = ""))]
    fn batch_transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: &Bound<'_, PyAny>,
        notify: Option<PyNotify>,
        transport_hint: &str,
    ) -> PyResult<i32> {
        let _ = transport_hint;
        let op = opcode_of(opcode)?;
        self.batch_sync(py, target_hostname, buffers, peer_buffer_addresses, lengths, op, notify)
    }

    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        self.batch_async(py, target_hostname, buffers, peer_buffer_addresses, lengths, Opcode::Write)
    }

    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        self.batch_async(py, target_hostname, buffers, peer_buffer_addresses, lengths, Opcode::Read)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint = ""))]
    fn batch_transfer_async(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let op = opcode_of(opcode)?;
        self.batch_async(py, target_hostname, buffers, peer_buffer_addresses, lengths, op)
    }

    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_submit_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: &Bound<'_, PyAny>,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let list = PyList::new(py, [buffer])?;
        self.batch_async(py, target_hostname, list.as_any(), vec![peer_buffer_address], vec![length], Opcode::Write)
    }

    /// The read form of `transfer_submit_write` (beyond Mooncake).
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_submit_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: &Bound<'_, PyAny>,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let list = PyList::new(py, [buffer])?;
        self.batch_async(py, target_hostname, list.as_any(), vec![peer_buffer_address], vec![length], Opcode::Read)
    }

    /// 1 done, 0 pending, -1 failed (or a bogus id), -2 timed out. A finished
    /// batch's id is freed.
    fn transfer_check_status(&self, batch_id: u64) -> i32 {
        self.value_or(self.inner.transfer_check_status(batch_id).map(BatchState::code), -1)
    }

    /// Blocks until every batch completes (0), or one fails or times out
    /// (-1). The GIL is released while waiting.
    fn get_batch_transfer_status(&self, py: Python<'_>, batch_ids: Vec<u64>) -> i32 {
        let e = self.inner.clone();
        let r = py.detach(|| e.get_batch_transfer_status(&batch_ids));
        self.sync_code(r)
    }

    /// The state of each batch now, as `transfer_check_status` codes, without
    /// waiting and without freeing any id (beyond Mooncake, whose
    /// `get_batch_transfer_status` blocks).
    fn get_batch_transfer_status_nowait(&self, batch_ids: Vec<u64>) -> Vec<i32> {
        let states = self.inner.batch_states(&batch_ids).map(|s| s.into_iter().map(state_code).collect());
        self.value_or(states, vec![-1; batch_ids.len()])
    }

    /// Takes back what of an async batch has not gone out yet: those
    /// requests settle as canceled, and the batch then reports failed
    /// (beyond Mooncake). 0, or -1 for an unknown id.
    fn cancel_transfer(&self, batch_id: u64) -> i32 {
        self.code(self.inner.cancel_transfer(batch_id))
    }

    /// Frees the ids of batches that have finished (after `_nowait`).
    fn release_batches(&self, batch_ids: Vec<u64>) {
        for id in batch_ids {
            let _ = self.inner.transfer_check_status(id);
        }
    }

    #[pyo3(signature = (buffer_addr, capacity, location = "*"))]
    fn register_memory(&self, buffer_addr: &Bound<'_, PyAny>, capacity: u64, location: &str) -> PyResult<i32> {
        let a = address_of(buffer_addr, true)?;
        Ok(self.code(self.inner.register_memory(a.addr, capacity, location)))
    }

    fn unregister_memory(&self, py: Python<'_>, buffer_addr: &Bound<'_, PyAny>) -> PyResult<i32> {
        let a = address_of(buffer_addr, false)?;
        let e = self.inner.clone();
        let r = py.detach(|| e.unregister_memory(a.addr));
        Ok(self.code(r))
    }

    #[pyo3(signature = (buffer_addresses, capacities, location = "*"))]
    fn batch_register_memory(
        &self,
        buffer_addresses: &Bound<'_, PyAny>,
        capacities: Vec<u64>,
        location: &str,
    ) -> PyResult<i32> {
        let addrs: Vec<u64> = addresses(buffer_addresses, true)?.iter().map(|a| a.addr).collect();
        Ok(self.code(self.inner.batch_register_memory(&addrs, &capacities, location)))
    }

    fn batch_unregister_memory(&self, py: Python<'_>, buffer_addresses: &Bound<'_, PyAny>) -> PyResult<i32> {
        let addrs: Vec<u64> = addresses(buffer_addresses, false)?.iter().map(|a| a.addr).collect();
        let e = self.inner.clone();
        let r = py.detach(|| e.batch_unregister_memory(&addrs));
        Ok(self.code(r))
    }

    #[pyo3(signature = (device_name = None))]
    fn get_local_topology(&self, device_name: Option<&str>) -> PyResult<String> {
        self.inner.get_local_topology(device_name.unwrap_or("")).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    fn get_notifies(&self) -> Vec<PyNotify> {
        let notes =
            self.inner.get_notifies().map(|n| n.into_iter().map(|n| PyNotify { name: n.name, msg: n.msg }).collect());
        self.value_or(notes, Vec::new())
    }

    fn send_probe(&self, py: Python<'_>, peer: &str) -> i32 {
        let e = self.inner.clone();
        let r = py.detach(|| e.send_probe(peer));
        self.code(r)
    }

    #[pyo3(signature = (dest_address, src_ptr, length))]
    fn write_bytes_to_buffer(&self, dest_address: &Bound<'_, PyAny>, src_ptr: &[u8], length: usize) -> PyResult<i32> {
        let a = address_of(dest_address, true)?;
        if length > src_ptr.len() {
            return Ok(self
                .fail(&TeError::invalid(format!("length {length} is larger than the {} bytes given", src_ptr.len()))));
        }
        Ok(self.code(self.inner.write_bytes_to_buffer(a.addr, &src_ptr[..length])))
    }

    fn read_bytes_from_buffer<'py>(
        &self,
        py: Python<'py>,
        source_address: &Bound<'py, PyAny>,
        length: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let a = address_of(source_address, false)?;
        match self.inner.read_bytes_from_buffer(a.addr, length) {
            Ok(v) => Ok(PyBytes::new(py, &v)),
            Err(e) => {
                self.fail(&e);
                Err(PyValueError::new_err(e.to_string()))
            }
        }
    }

    /// Mooncake's EFA warm-up: nothing to do over TCP.
    fn warmup_efa_segment(&self, segment_name: &str) -> i32 {
        let _ = segment_name;
        0
    }

    /// The code and message of the last failure (beyond Mooncake).
    fn last_error(&self) -> Option<(i32, String)> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Submits a transfer whose completion writes to the engine's completion
    /// eventfd (`_completion_fd()`); for the asyncio helpers.
    #[allow(clippy::too_many_arguments)]
    fn _submit_notified(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: &Bound<'_, PyAny>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let op = opcode_of(opcode)?;
        let raw: Vec<u64> = addresses(buffers, op == Opcode::Read)?.iter().map(|a| a.addr).collect();
        let fd = self.completion_fd()?;
        let Some(requests) = self.value_or(zip(&raw, &peer_buffer_addresses, &lengths, op).map(Some), None) else {
            return Ok(0);
        };
        let e = self.inner.clone();
        let hook: engine::batch::SettleHook = Box::new(move || {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd the Arc
            // keeps open.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        });
        Ok(self.value_or(py.detach(|| e.batch_transfer_async_hooked(target_hostname, &requests, Some(hook))), 0))
    }

    /// The eventfd that becomes readable when a `_submit_notified` batch
    /// settles.
    fn _completion_fd(&self) -> PyResult<i32> {
        Ok(self.completion_fd()?.as_raw_fd())
    }

    /// Stops the engine now (also done when it is garbage-collected).
    fn shutdown(&self, py: Python<'_>) {
        let e = self.inner.clone();
        py.detach(|| e.shutdown());
    }
}

fn zip(bufs: &[u64], peers: &[u64], lens: &[u64], op: Opcode) -> TeResult<Vec<TransferRequest>> {
    if bufs.len() != peers.len() || bufs.len() != lens.len() {
        return Err(TeError::new(code::INVALID_ARGUMENT, "buffers, peer addresses and lengths differ in length"));
    }
    Ok(bufs
        .iter()
        .zip(peers)
        .zip(lens)
        .map(|((&source, &target_offset), &length)| TransferRequest { opcode: op, source, target_offset, length })
        .collect())
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyOpcode>()?;
    m.add_class::<PyNotify>()?;
    for flag in ["SUPPORT_CUDA", "SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_MNNVL", "SUPPORT_MUSA", "SUPPORT_INTRA_NVLINK"]
    {
        m.add(flag, false)?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
