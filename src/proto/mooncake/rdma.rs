//! Mooncake's RDMA control plane, checked: a segment's devices, their
//! per-buffer keys and the NIC priority matrix; NIC paths
//! (`<server>@<device>`); GIDs; and the Connection (queue pair) exchange.
//!
//! [`super::message`] carries these fields as they come off the wire; the
//! types here say whether they make sense, and name what does not, so the
//! RDMA transport works from values it can trust: every buffer has a key
//! for every device it may use, every device the matrix names exists, a
//! GID is 16 bytes, a NIC path has both halves.

use std::collections::BTreeSet;
use std::fmt;

use super::message::{BufferDesc, DeviceDesc, HandshakeDesc, SegmentDesc};
use crate::topo::{MatrixFault, PriorityMatrix};

/// Most devices one segment may list (a DGX has 8-10 RDMA NICs).
pub const DEVICES_MAX: usize = 64;
/// Most queue pairs one endpoint may have (`MC_NUM_QP_PER_EP`, 2 by default).
pub const QPS_PER_ENDPOINT_MAX: usize = 64;
/// Longest device name (Linux caps IB device names at 64 bytes).
pub const DEVICE_NAME_BYTES_MAX: usize = 64;
/// Longest server half of a NIC path (a host name and a port).
pub const SERVER_BYTES_MAX: usize = 300;
/// Bytes of a GID.
pub const GID_BYTES: usize = 16;

/// What is wrong with the RDMA part of a descriptor or a handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RdmaFault {
    #[error("the segment lists no RDMA device")]
    NoDevices,
    #[error("the segment lists {0} devices, above the limit of {DEVICES_MAX}")]
    TooManyDevices(usize),
    #[error("device {index} has a bad name {name:?}: {why}")]
    BadDeviceName { index: usize, name: String, why: String },
    #[error("device {0:?} is listed twice")]
    DuplicateDevice(String),
    #[error("GID {gid:?}{of}: {why}", of = of_device(.device))]
    BadGid { device: String, gid: String, why: String },
    #[error("buffer at {addr:#x} has {lkeys} lkeys and {rkeys} rkeys for {devices} devices")]
    Keys { addr: u64, lkeys: usize, rkeys: usize, devices: usize },
    #[error("buffer at {addr:#x} of {length} bytes runs past the end of the address space")]
    BufferOverflow { addr: u64, length: u64 },
    #[error("buffers at {0:#x} and {1:#x} overlap")]
    BuffersOverlap(u64, u64),
    #[error("the priority matrix: {0}")]
    Matrix(#[from] MatrixFault),
    #[error("the priority matrix names device {device:?} under {location:?}, which the segment does not list")]
    UnknownMatrixDevice { location: String, device: String },
    #[error("NIC path {path:?}: {why}")]
    BadNicPath { path: String, why: String },
    #[error("{0} queue pair numbers, expected 1 to {QPS_PER_ENDPOINT_MAX}")]
    QpCount(usize),
    #[error("queue pair number {0:#x} does not fit in 24 bits")]
    QpNumber(u32),
    #[error("an MTU of {0} bytes, not in 256..=4096")]
    BadMtu(u32),
    #[error("the peer rejected the connection: {0}")]
    Rejected(String),
    #[error("the reply is for {got}, not for {wanted}")]
    WrongReply { wanted: String, got: String },
    #[error("the peer answered with {got} queue pairs for our {wanted}")]
    QpMismatch { wanted: usize, got: usize },
}

fn of_device(device: &str) -> String {
    if device.is_empty() { String::new() } else { format!(" of device {device:?}") }
}

/// A 16-byte global identifier, written as Mooncake writes it: two
/// lower-case hex digits per byte, joined by colons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Gid(pub [u8; GID_BYTES]);

impl Gid {
    /// Parses `fe:80:00:...` (either case); `device` names its owner in
    /// the error.
    pub fn parse(text: &str, device: &str) -> Result<Gid, RdmaFault> {
        let bad = |why: String| RdmaFault::BadGid { device: device.to_string(), gid: text.to_string(), why };
        let mut gid = [0u8; GID_BYTES];
        let mut n = 0;
        for part in text.split(':') {
            if n == GID_BYTES {
                return Err(bad(format!("more than {GID_BYTES} bytes")));
            }
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("byte {n} is {part:?}, not two hex digits")));
            }
            gid[n] = u8::from_str_radix(part, 16).map_err(|e| bad(e.to_string()))?;
            n += 1;
        }
        if n != GID_BYTES {
            return Err(bad(format!("{n} bytes, expected {GID_BYTES}")));
        }
        Ok(Gid(gid))
    }

    /// All zero: a device without a GID (InfiniBand addressed by LID).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; GID_BYTES]
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Where an RDMA device of an engine is: `<server>@<device>`, the server
/// being the segment name (or `rdma_server_name`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NicPath {
    pub server: String,
    pub device: String,
}

impl NicPath {
    /// Parses `10.0.0.1:16049@mlx5_0`. The device is what follows the last
    /// `@` (a server name may hold one; a device name may not).
    pub fn parse(text: &str) -> Result<NicPath, RdmaFault> {
        let bad = |why: &str| RdmaFault::BadNicPath { path: text.to_string(), why: why.to_string() };
        let (server, device) = text.rsplit_once('@').ok_or_else(|| bad("no '@' between server and device"))?;
        if server.is_empty() {
            return Err(bad("the server half is empty"));
        }
        if server.len() > SERVER_BYTES_MAX || server.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("the server half is too long or holds white space"));
        }
        check_device_name(device).map_err(|why| bad(&why))?;
        Ok(NicPath { server: server.to_string(), device: device.to_string() })
    }
}

impl fmt::Display for NicPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.server, self.device)
    }
}

/// A device name as the kernel allows it: 1 to 64 bytes, no white space,
/// no `@` or `/`.
fn check_device_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the device name is empty".into());
    }
    if name.len() > DEVICE_NAME_BYTES_MAX {
        return Err(format!("the device name is longer than {DEVICE_NAME_BYTES_MAX} bytes"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '/') {
        return Err("the device name holds white space, '@' or '/'".into());
    }
    Ok(())
}

/// An RDMA device of a segment, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub lid: u16,
    pub gid: Gid,
}

/// A registered buffer of an RDMA segment, checked: one key of each kind
/// per device, by the index of [`RdmaSegment::devices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffer {
    /// Its memory location (`cpu:0`, `cuda:3`).
    pub location: String,
    pub addr: u64,
    pub length: u64,
    pub lkey: Vec<u32>,
    pub rkey: Vec<u32>,
}

impl Buffer {
    /// Whether `[addr, addr + len)` lies inside it.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.addr + self.length)
    }
}

/// The RDMA side of a segment descriptor, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSegment {
    pub devices: Vec<Device>,
    /// By address; no two overlap.
    pub buffers: Vec<Buffer>,
    pub matrix: PriorityMatrix,
}

impl RdmaSegment {
    /// Checks the RDMA fields of `desc`. Mooncake rejects a buffer with
    /// more keys than devices; here the counts must match exactly (a
    /// missing key would leave a device unusable without saying so).
    pub fn from_desc(desc: &SegmentDesc) -> Result<RdmaSegment, RdmaFault> {
        if desc.devices.is_empty() {
            return Err(RdmaFault::NoDevices);
        }
        if desc.devices.len() > DEVICES_MAX {
            return Err(RdmaFault::TooManyDevices(desc.devices.len()));
        }
        let mut names = BTreeSet::new();
        let mut devices = Vec::with_capacity(desc.devices.len());
        for (index, d) in desc.devices.iter().enumerate() {
            check_device_name(&d.name).map_err(|why| RdmaFault::BadDeviceName { index, name: d.name.clone(), why })?;
            if !names.insert(d.name.as_str()) {
                return Err(RdmaFault::DuplicateDevice(d.name.clone()));
            }
            devices.push(Device { name: d.name.clone(), lid: d.lid, gid: Gid::parse(&d.gid, &d.name)? });
        }
        let mut buffers = Vec::with_capacity(desc.buffers.len());
        for b in &desc.buffers {
            if b.lkey.len() != devices.len() || b.rkey.len() != devices.len() {
                return Err(RdmaFault::Keys {
                    addr: b.addr,
                    lkeys: b.lkey.len(),
                    rkeys: b.rkey.len(),
                    devices: devices.len(),
                });
            }
            if b.addr.checked_add(b.length).is_none() {
                return Err(RdmaFault::BufferOverflow { addr: b.addr, length: b.length });
            }
            buffers.push(Buffer {
                location: b.name.clone(),
                addr: b.addr,
                length: b.length,
                lkey: b.lkey.clone(),
                rkey: b.rkey.clone(),
            });
        }
        buffers.sort_by_key(|b| b.addr);
        for pair in buffers.windows(2) {
            if pair[0].addr + pair[0].length > pair[1].addr {
                return Err(RdmaFault::BuffersOverlap(pair[0].addr, pair[1].addr));
            }
        }
        let matrix = match &desc.priority_matrix {
            Some(value) => PriorityMatrix::from_value(value.clone())?,
            None => PriorityMatrix::new(),
        };
        for (location, entry) in matrix.entries() {
            if let Some(device) = entry.preferred.iter().chain(&entry.available).find(|n| !names.contains(n.as_str())) {
                return Err(RdmaFault::UnknownMatrixDevice { location: location.to_string(), device: device.clone() });
            }
        }
        Ok(RdmaSegment { devices, buffers, matrix })
    }

    /// Writes these fields into `desc`, as Mooncake lays them out.
    pub fn write_into(&self, desc: &mut SegmentDesc) {
        desc.devices = self
            .devices
            .iter()
            .map(|d| DeviceDesc { gid: d.gid.to_string(), lid: d.lid, name: d.name.clone() })
            .collect();
        desc.buffers = self
            .buffers
            .iter()
            .map(|b| BufferDesc {
                addr: b.addr,
                length: b.length,
                lkey: b.lkey.clone(),
                name: b.location.clone(),
                rkey: b.rkey.clone(),
            })
            .collect();
        desc.priority_matrix = Some(self.matrix.to_value());
    }

    /// The index of device `name`, which keys are looked up by.
    pub fn device_index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.name == name)
    }

    /// The buffer `[addr, addr + len)` lies in.
    pub fn buffer(&self, addr: u64, len: u64) -> Option<&Buffer> {
        let i = self.buffers.partition_point(|b| b.addr <= addr);
        self.buffers[..i].last().filter(|b| b.contains(addr, len))
    }
}

/// One side of a Connection exchange, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The sender's NIC.
    pub local: NicPath,
    /// The NIC it wants to reach.
    pub peer: NicPath,
    pub lid: u16,
    pub gid: Gid,
    /// Its queue pair numbers, one per queue pair of the endpoint.
    pub qps: Vec<u32>,
    /// Whether it takes part in the ready acknowledgement.
    pub ready_ack: Option<bool>,
    /// The sender's active MTU, when it is a shardwire engine.
    pub mtu: Option<u32>,
    /// The sender's instance number, in a shardwire engine's reply.
    pub instance: Option<u64>,
}

impl Connection {
    /// Checks a Connection request (or the fields of a reply).
    pub fn from_desc(h: &HandshakeDesc) -> Result<Connection, RdmaFault> {
        let local = NicPath::parse(&h.local_nic_path)?;
        let peer = NicPath::parse(&h.peer_nic_path)?;
        if h.qp_num.is_empty() || h.qp_num.len() > QPS_PER_ENDPOINT_MAX {
            return Err(RdmaFault::QpCount(h.qp_num.len()));
        }
        if let Some(&q) = h.qp_num.iter().find(|&&q| q >= 1 << 24) {
            return Err(RdmaFault::QpNumber(q));
        }
        let gid = Gid::parse(&h.local_gid, &local.device)?;
        if let Some(m) = h.shardwire_mtu
            && !(256..=4096).contains(&m)
        {
            return Err(RdmaFault::BadMtu(m));
        }
        Ok(Connection {
            local,
            peer,
            lid: h.local_lid,
            gid,
            qps: h.qp_num.clone(),
            ready_ack: h.ready_ack,
            mtu: h.shardwire_mtu,
            instance: h.shardwire_instance,
        })
    }

    /// The message for the wire.
    pub fn to_desc(&self) -> HandshakeDesc {
        HandshakeDesc {
            local_gid: self.gid.to_string(),
            local_lid: self.lid,
            local_nic_path: self.local.to_string(),
            payload: String::new(),
            peer_nic_path: self.peer.to_string(),
            qp_num: self.qps.clone(),
            ready_ack: self.ready_ack,
            reply_msg: String::new(),
            shardwire_instance: self.instance,
            shardwire_mtu: self.mtu,
        }
    }

    /// Checks the peer's `reply` to this request: not a rejection, from
    /// the NIC asked for and to ours, with as many queue pairs.
    pub fn check_reply(&self, reply: &HandshakeDesc) -> Result<Connection, RdmaFault> {
        if !reply.reply_msg.is_empty() {
            return Err(RdmaFault::Rejected(reply.reply_msg.clone()));
        }
        let them = Connection::from_desc(reply)?;
        if them.local != self.peer || them.peer != self.local {
            return Err(RdmaFault::WrongReply {
                wanted: format!("{} -> {}", self.peer, self.local),
                got: format!("{} -> {}", them.local, them.peer),
            });
        }
        if them.qps.len() != self.qps.len() {
            return Err(RdmaFault::QpMismatch { wanted: self.qps.len(), got: them.qps.len() });
        }
        Ok(them)
    }
}

/// The reply that turns a Connection request down, saying why: the paths
/// swapped (as Mooncake's passive side writes them) and `reply_msg` set.
pub fn rejection(request: &HandshakeDesc, why: &str) -> HandshakeDesc {
    debug_assert!(!why.is_empty(), "a rejection must say why");
    HandshakeDesc {
        local_nic_path: request.peer_nic_path.clone(),
        peer_nic_path: request.local_nic_path.clone(),
        reply_msg: if why.is_empty() { "rejected".into() } else { why.to_string() },
        ..HandshakeDesc::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::{from_wire, to_wire};
    use super::*;

    /// Mooncake's own RDMA descriptor, captured from the
    /// mooncake-transfer-engine-non-cuda 0.3.13.post1 wheel serving a
    /// buffer over soft-RoCE device rxb0 (tools/rdma-vm --wired,
    /// `SHARDWIRE_CAPTURE_DESCRIPTOR`): the memory's node has no device, so
    /// rxb0 is only "available" for `cpu:0`.
    const WHEEL_RDMA_REPLY: &str = r#"{"buffers":[{"addr":139933255725072,"length":2147483648,"lkey":[575],"name":"cpu:0","rkey":[575]}],"devices":[{"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:a9:fe:01:02","lid":0,"name":"rxb0"}],"name":"127.0.0.1:15559","priority_matrix":{"cpu:0":[[],["rxb0"]]},"protocol":"rdma","tcp_data_port":0,"tcp_proto_version":1,"timestamp":"2026-12-03 07:10:17.817636"}"#;

    #[test]
    fn mooncakes_own_rdma_descriptor_decodes_and_writes_back_as_it_came() {
        let desc: SegmentDesc = crate::proto::mooncake::message::from_wire(WHEEL_RDMA_REPLY.as_bytes()).unwrap();
        let seg = RdmaSegment::from_desc(&desc).unwrap();
        assert_eq!(seg.devices.len(), 1);
        assert_eq!((seg.devices[0].name.as_str(), seg.devices[0].lid), ("rxb0", 0));
        assert_eq!(seg.devices[0].gid.to_string(), "00:00:00:00:00:00:00:00:00:00:ff:ff:a9:fe:01:02");
        let b = seg.buffer(139_933_255_725_072 + 4096, 65_536).expect("inside the buffer");
        assert_eq!((b.location.as_str(), b.lkey.as_slice(), b.rkey.as_slice()), ("cpu:0", &[575][..], &[575][..]));
        let entry = seg.matrix.get("cpu:0").unwrap();
        assert!(entry.preferred.is_empty() && entry.available == ["rxb0"]);
        let mut again = desc.clone();
        seg.write_into(&mut again);
        let (mut again, came): (serde_json::Value, serde_json::Value) =
            (serde_json::to_value(&again).unwrap(), serde_json::from_str(WHEEL_RDMA_REPLY).unwrap());
        // The one field more: Mooncake's TCP descriptors carry an empty
        // `rdma_server_name` and ours always do; every parser skips it.
        assert_eq!(again.as_object_mut().unwrap().remove("rdma_server_name"), Some(serde_json::json!("")));
        assert_eq!(again, came, "every field written back as it came");
    }

    const GID0: &str = "fe:80:00:00:00:00:00:00:02:42:ac:ff:fe:11:00:02";
    const GID1: &str = "00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:02";

    /// A descriptor in the shape Mooncake's `encodeSegmentDesc` writes for
    /// two devices (keys sorted, as jsoncpp's FastWriter writes a
    /// `std::map`). Not captured from hardware: built from the documented
    /// layout, until the soft-RoCE VM gives us a real one.
    fn mooncake_rdma_descriptor() -> String {
        format!(
            concat!(
                r#"{{"buffers":[{{"addr":139964180758528,"length":1073741824,"lkey":[2049,4097],"name":"cpu:0","rkey":[2049,4097]}},"#,
                r#"{{"addr":139965254500352,"length":4096,"lkey":[2050,4098],"name":"cpu:1","rkey":[2050,4098]}}],"#,
                r#""devices":[{{"gid":"{}","lid":0,"name":"mlx5_0"}},{{"gid":"{}","lid":7,"name":"mlx5_1"}}],"#,
                r#""name":"10.0.0.1:16049","priority_matrix":{{"cpu:0":[["mlx5_0"],["mlx5_1"]],"cpu:1":[["mlx5_1"],["mlx5_0"]]}},"#,
                r#""protocol":"rdma","rdma_server_name":"","tcp_data_port":0,"tcp_proto_version":1,"timestamp":"2026-12-02 10:00:00.000001"}}"#
            ),
            GID0, GID1
        )
    }

    #[test]
    fn a_mooncake_rdma_descriptor_decodes_checks_and_writes_the_same_bytes() {
        let text = mooncake_rdma_descriptor();
        let desc: SegmentDesc = from_wire(text.as_bytes()).unwrap();
        let mut wire = text.clone().into_bytes();
        wire.push(b'\n');
        assert_eq!(to_wire(&desc), wire, "the same bytes back");
        let seg = RdmaSegment::from_desc(&desc).unwrap();
        assert_eq!(seg.devices.len(), 2);
        assert_eq!(seg.devices[1].lid, 7);
        assert_eq!(seg.devices[0].gid.to_string(), GID0);
        assert_eq!(seg.device_index("mlx5_1"), Some(1));
        let b = seg.buffer(139964180758528 + 4096, 65536).unwrap();
        assert_eq!((b.location.as_str(), b.rkey[1]), ("cpu:0", 4097));
        assert!(seg.buffer(139964180758528 + (1 << 30) - 1, 2).is_none(), "runs past the buffer");
        assert_eq!(seg.matrix.get("cpu:1").unwrap().preferred, ["mlx5_1"]);
        // Written back from the checked form: the same fields again.
        let mut again = desc.clone();
        seg.write_into(&mut again);
        assert_eq!(to_wire(&again), wire);
    }

    #[test]
    fn the_tcp_descriptor_is_unchanged_by_the_rdma_fields() {
        let tcp = r#"{"buffers":[{"addr":1,"length":2,"name":"h:1"}],"name":"h:1","protocol":"tcp","rdma_server_name":"","tcp_data_port":5,"tcp_proto_version":2,"timestamp":""}"#;
        let desc: SegmentDesc = from_wire(tcp.as_bytes()).unwrap();
        assert_eq!(to_wire(&desc), format!("{tcp}\n").into_bytes());
        let seg = RdmaSegment::from_desc(&desc);
        assert_eq!(seg, Err(RdmaFault::NoDevices));
    }

    fn with(edit: impl Fn(&mut serde_json::Value)) -> Result<RdmaSegment, RdmaFault> {
        let mut v: serde_json::Value = serde_json::from_str(&mooncake_rdma_descriptor()).unwrap();
        edit(&mut v);
        RdmaSegment::from_desc(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn each_fault_of_a_descriptor_is_named() {
        let e = with(|v| v["buffers"][0]["rkey"] = serde_json::json!([1, 2, 3])).unwrap_err();
        assert_eq!(e.to_string(), "buffer at 0x7f4bf3468000 has 2 lkeys and 3 rkeys for 2 devices");
        let e = with(|v| v["devices"][1]["gid"] = "fe:80".into()).unwrap_err();
        assert!(e.to_string().contains("of device \"mlx5_1\": 2 bytes, expected 16"), "{e}");
        let e = with(|v| v["devices"][0]["gid"] = GID0.replace("fe", "fg").into()).unwrap_err();
        assert!(e.to_string().contains("byte 0 is \"fg\""), "{e}");
        let e = with(|v| v["devices"][1]["name"] = "mlx5_0".into()).unwrap_err();
        assert_eq!(e, RdmaFault::DuplicateDevice("mlx5_0".into()));
        let e = with(|v| v["devices"][1]["name"] = "a b".into()).unwrap_err();
        assert!(matches!(e, RdmaFault::BadDeviceName { index: 1, .. }), "{e}");
        let e = with(|v| v["priority_matrix"]["cpu:0"][1] = serde_json::json!(["mlx5_9"])).unwrap_err();
        assert!(e.to_string().contains("\"mlx5_9\" under \"cpu:0\""), "{e}");
        let e = with(|v| v["priority_matrix"]["gpu:0"] = serde_json::json!([[], []])).unwrap_err();
        assert!(matches!(e, RdmaFault::Matrix(MatrixFault::UnknownKey(_))), "{e}");
        let e = with(|v| v["priority_matrix"]["cpu:0"] = serde_json::json!([["mlx5_0"]])).unwrap_err();
        assert!(e.to_string().contains("exactly two arrays"), "{e}");
        let e = with(|v| v["buffers"][1]["addr"] = serde_json::json!(139964180758528u64 + 4096)).unwrap_err();
        assert!(matches!(e, RdmaFault::BuffersOverlap(..)), "{e}");
        let e = with(|v| v["buffers"][1]["addr"] = serde_json::json!(u64::MAX - 10)).unwrap_err();
        assert!(matches!(e, RdmaFault::BufferOverflow { .. }), "{e}");
        let e = with(|v| v["devices"] = serde_json::json!(vec![serde_json::json!({"name": "x"}); 65])).unwrap_err();
        assert_eq!(e, RdmaFault::TooManyDevices(65));
    }

    #[test]
    fn gids_and_nic_paths_parse_and_print_back() {
        let g = Gid::parse(&GID0.to_uppercase(), "d").unwrap();
        assert_eq!(g.to_string(), GID0);
        assert!(!g.is_zero() && Gid::default().is_zero());
        for bad in
            ["", "fe", &format!("{GID0}:00"), &GID0.replace(':', "-"), "fe:80:0:00:00:00:00:00:00:00:00:00:00:00:00:00"]
        {
            assert!(Gid::parse(bad, "").is_err(), "{bad:?}");
        }
        let p = NicPath::parse("10.0.0.1:16049@mlx5_0").unwrap();
        assert_eq!((p.server.as_str(), p.device.as_str()), ("10.0.0.1:16049", "mlx5_0"));
        assert_eq!(p.to_string(), "10.0.0.1:16049@mlx5_0");
        assert_eq!(NicPath::parse("user@host:1@rxe0").unwrap().server, "user@host:1");
        for bad in ["mlx5_0", "@mlx5_0", "h:1@", "h:1@a/b", "h 1@x", &format!("h@{}", "x".repeat(65))] {
            let e = NicPath::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with(&format!("NIC path {bad:?}")), "{e}");
        }
    }

    fn request() -> HandshakeDesc {
        from_wire(
            format!(
                r#"{{"local_gid":"{GID0}","local_lid":0,"local_nic_path":"10.0.0.1:16049@mlx5_0","payload":"","peer_nic_path":"10.0.0.2:16050@mlx5_1","qp_num":[297,298],"ready_ack":true,"reply_msg":""}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_connection_request_checks_and_round_trips() {
        let h = request();
        let c = Connection::from_desc(&h).unwrap();
        assert_eq!((c.qps.as_slice(), c.ready_ack), (&[297, 298][..], Some(true)));
        assert_eq!(c.to_desc(), h);
        let mut no_ack = h.clone();
        no_ack.ready_ack = None;
        assert!(!String::from_utf8(to_wire(&no_ack)).unwrap().contains("ready_ack"), "absent, as older peers send it");
        for (edit, want) in [
            (Box::new(|h: &mut HandshakeDesc| h.qp_num.clear()) as Box<dyn Fn(&mut HandshakeDesc)>, "0 queue pair"),
            (Box::new(|h: &mut HandshakeDesc| h.qp_num[1] = 1 << 24), "24 bits"),
            (Box::new(|h: &mut HandshakeDesc| h.local_nic_path = "nohost".into()), "no '@'"),
            (Box::new(|h: &mut HandshakeDesc| h.local_gid = String::new()), "GID \"\""),
        ] {
            let mut bad = h.clone();
            edit(&mut bad);
            let e = Connection::from_desc(&bad).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want:?})");
        }
    }

    #[test]
    fn a_reply_must_come_from_the_nic_asked_for() {
        let ours = Connection::from_desc(&request()).unwrap();
        let mut theirs = ours.clone();
        std::mem::swap(&mut theirs.local, &mut theirs.peer);
        theirs.qps = vec![11, 12];
        assert_eq!(ours.check_reply(&theirs.to_desc()).unwrap().qps, [11, 12]);
        let mut wrong = theirs.clone();
        wrong.local.device = "mlx5_3".into();
        assert!(matches!(ours.check_reply(&wrong.to_desc()), Err(RdmaFault::WrongReply { .. })));
        let mut fewer = theirs.clone();
        fewer.qps = vec![11];
        assert_eq!(ours.check_reply(&fewer.to_desc()), Err(RdmaFault::QpMismatch { wanted: 2, got: 1 }));
        let no = rejection(&request(), "no such device");
        assert_eq!(ours.check_reply(&no), Err(RdmaFault::Rejected("no such device".into())));
        assert_eq!(
            (no.local_nic_path.as_str(), no.peer_nic_path.as_str()),
            ("10.0.0.2:16050@mlx5_1", "10.0.0.1:16049@mlx5_0")
        );
    }
}
