//! What this engine answers on its RPC port, and the notifications it keeps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::mem::Registry;
use crate::meta::p2p::RpcHandler;
use crate::proto::mooncake::message::{BufferDesc, HandshakeDesc, LocalDesc, NotifyDesc, SegmentDesc};
use crate::proto::mooncake::rdma;
use crate::transport::rdma::transport::RdmaTransport;

/// Most notifications kept until `get_notifies`; past it the oldest go.
pub const NOTIFIES_MAX: usize = 65_536;

/// A notification, as `get_notifies` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferNotify {
    pub name: String,
    pub msg: String,
}

/// Notifications received, bounded.
#[derive(Debug, Default)]
pub struct NotifyQueue {
    queue: Mutex<VecDeque<TransferNotify>>,
    dropped: AtomicU64,
}

impl NotifyQueue {
    pub fn push(&self, note: TransferNotify) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= NOTIFIES_MAX {
            q.pop_front();
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!("{n} notifications dropped: nobody calls get_notifies");
            }
        }
        q.push_back(note);
    }

    pub fn drain(&self) -> Vec<TransferNotify> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect()
    }
}

/// The engine's answers.
pub struct EngineRpc {
    pub name: String,
    pub data_host: String,
    pub data_port: u16,
    pub registry: Arc<Registry>,
    pub notifies: Arc<NotifyQueue>,
    /// How peers on this host reach the local transport, if it is on.
    pub local: Option<LocalDesc>,
    /// The RDMA transport, with `protocol = "rdma"` on a fabric.
    pub rdma: Option<Arc<RdmaTransport>>,
    /// This process's instance number (see
    /// [`SegmentDesc::shardwire_instance`]).
    pub instance: u64,
}

impl EngineRpc {
    pub fn descriptor(&self) -> SegmentDesc {
        let mut desc = SegmentDesc {
            buffers: self
                .registry
                .ranges()
                .into_iter()
                .map(|(addr, length)| BufferDesc {
                    addr,
                    length,
                    name: self.name.clone(),
                    lkey: Vec::new(),
                    rkey: Vec::new(),
                })
                .collect(),
            devices: Vec::new(),
            name: self.name.clone(),
            priority_matrix: None,
            protocol: "tcp".into(),
            rdma_server_name: String::new(),
            shardwire: self.local.clone(),
            shardwire_instance: self.instance,
            shardwire_tcp_crc32c: true,
            tcp_data_host: Some(self.data_host.clone()),
            tcp_data_port: self.data_port,
            tcp_proto_version: 2,
            timestamp: timestamp_now(),
        };
        // With RDMA on, the descriptor is Mooncake's RDMA one: devices, a
        // buffer per region with every device's keys, the matrix. The TCP
        // fields stay, for peers without RDMA.
        if let Some(seg) = self.rdma.as_ref().and_then(|r| r.describe()) {
            desc.protocol = "rdma".into();
            seg.write_into(&mut desc);
        }
        desc
    }
}

impl RpcHandler for EngineRpc {
    fn metadata(&self) -> SegmentDesc {
        self.descriptor()
    }

    fn notify(&self, note: NotifyDesc) {
        self.notifies.push(TransferNotify { name: note.name, msg: note.notify_msg });
    }

    fn connection(&self, request: HandshakeDesc) -> HandshakeDesc {
        if let Some(r) = &self.rdma {
            return r.accept(&request);
        }
        let why = match rdma::Connection::from_desc(&request) {
            Err(e) => format!("rejected: a malformed Connection request ({e})"),
            Ok(c) => format!(
                "rejected: {} has no RDMA device {:?}; shardwire serves this segment over TCP only",
                self.name, c.peer.device
            ),
        };
        log::warn!("answering an RDMA connection request from {:?}: {why}", request.local_nic_path);
        rdma::rejection(&request, &why)
    }
}

/// `YYYY-mm-dd HH:MM:SS.uuuuuu` in UTC (Mooncake writes local time; peers
/// ignore the field).
pub fn timestamp_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_micros())
}

/// Days since 1970-01-01 to a Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(timestamp_now().len(), 26);
    }

    #[test]
    fn notify_queue_is_bounded_and_keeps_the_newest() {
        let q = NotifyQueue::default();
        for i in 0..NOTIFIES_MAX + 5 {
            q.push(TransferNotify { name: "p".into(), msg: i.to_string() });
        }
        let all = q.drain();
        assert_eq!(all.len(), NOTIFIES_MAX);
        assert_eq!(all[0].msg, "5");
        assert!(q.drain().is_empty());
    }
}
