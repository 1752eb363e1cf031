//! The JSON bodies of Mooncake's RPC frames.
//!
//! Mooncake writes JSON with jsoncpp's FastWriter: keys in alphabetical order
//! (a `std::map`), no spaces, a trailing newline. The structs below declare
//! their fields alphabetically so serde writes the same bytes, and
//! [`to_wire`] adds the newline. Decoding is tolerant the way jsoncpp is:
//! unknown fields are ignored, and absent ones take Mooncake's defaults.
//! The RDMA fields (devices, keys, the priority matrix) are carried as
//! they come; [`super::rdma`] checks them.

use serde::{Deserialize, Deserializer, Serialize};

/// One registered buffer of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferDesc {
    pub addr: u64,
    pub length: u64,
    /// RDMA: the local key of each device, by the index of `devices`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lkey: Vec<u32>,
    /// The segment name for TCP; the location (`cpu:0`) for RDMA.
    #[serde(default)]
    pub name: String,
    /// RDMA: the remote key of each device, by the index of `devices`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rkey: Vec<u32>,
}

/// One RDMA device of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// 16 bytes in colon-separated hex (`fe:80:00:...`).
    #[serde(default)]
    pub gid: String,
    #[serde(default)]
    pub lid: u16,
    pub name: String,
}

/// A segment descriptor: the Metadata reply, and what a P2P requester sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDesc {
    #[serde(default)]
    pub buffers: Vec<BufferDesc>,
    /// RDMA: the segment's devices; their order indexes the key arrays.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceDesc>,
    pub name: String,
    /// RDMA: `{location: [[preferred...], [available...]]}`, as it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_matrix: Option<serde_json::Value>,
    /// `tcp`, `rdma`, ... (a JSON array in multi-protocol builds; the first
    /// entry is kept).
    #[serde(deserialize_with = "string_or_first")]
    pub protocol: String,
    #[serde(default)]
    pub rdma_server_name: String,
    /// shardwire's own field: how a peer on the same host reaches this
    /// engine's local transport. Mooncake ignores keys it does not know
    /// (jsoncpp reads fields by name), and never writes this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shardwire: Option<LocalDesc>,
    /// shardwire's own field: a random number drawn when the engine
    /// started, so a peer tells a restarted process from the one it
    /// replaced under the same name (and TCP requests carry a tag of it,
    /// see [`super::tcp`]). 0 (left out): a Mooncake peer, which never
    /// writes it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shardwire_instance: u64,
    /// shardwire's own field: this target takes TCP requests with CRC-32C
    /// framing (see [`super::tcp`]). Mooncake ignores it and never writes
    /// it, so its initiators never ask for the framing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shardwire_tcp_crc32c: bool,
    /// The host to reach the data port at (0.3.13 and later); older peers
    /// leave it out, and the segment name's host applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_data_host: Option<String>,
    #[serde(default)]
    pub tcp_data_port: u16,
    /// 2 for servers that send MCTV status frames; absent means 1.
    #[serde(default = "proto_v1")]
    pub tcp_proto_version: u32,
    #[serde(default)]
    pub timestamp: String,
}

impl SegmentDesc {
    /// Which process of a segment this descriptor describes: its
    /// `shardwire_instance`, or, for a Mooncake peer (which draws no
    /// such number), its TCP data port, which Mooncake picks at random
    /// per process (0 when it has none: an RDMA-only Mooncake peer, whose
    /// restarts only its queue pairs reveal). Two descriptors of one name
    /// with different incarnations come from two processes.
    pub fn incarnation(&self) -> u64 {
        if self.shardwire_instance != 0 {
            self.shardwire_instance
        } else {
            // Tagged, so a port never reads as a drawn number of the
            // same value (a 2^-48 chance otherwise, but free to rule out).
            (1 << 63) | u64::from(self.tcp_data_port)
        }
    }

    /// A descriptor of `name` with nothing in it yet (Mooncake's defaults).
    pub fn new(name: &str, protocol: &str) -> SegmentDesc {
        SegmentDesc {
            buffers: Vec::new(),
            devices: Vec::new(),
            name: name.to_string(),
            priority_matrix: None,
            protocol: protocol.to_string(),
            rdma_server_name: String::new(),
            shardwire: None,
            shardwire_instance: 0,
            shardwire_tcp_crc32c: false,
            tcp_data_host: None,
            tcp_data_port: 0,
            tcp_proto_version: 1,
            timestamp: String::new(),
        }
    }
}

/// Where and how a peer on this host reaches an engine's local transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDesc {
    /// `/proc/sys/kernel/random/boot_id` of the engine's host: the same
    /// boot id means the same kernel, so memory can be shared.
    pub boot_id: String,
    /// The engine's process.
    pub pid: u32,
    /// The Unix socket (abstract namespace, so it is tied to the network
    /// namespace) that hands out the engine's shared memory.
    pub socket: String,
    /// A random per-engine token, which the socket checks.
    pub token: u64,
}

fn proto_v1() -> u32 {
    1
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn string_or_first<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.into_iter().next().unwrap_or_default(),
    })
}

/// The Connection (RDMA queue-pair) exchange. A TCP-only engine answers it
/// with empty fields; a non-empty `reply_msg` means "rejected".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HandshakeDesc {
    #[serde(default)]
    pub local_gid: String,
    #[serde(default)]
    pub local_lid: u16,
    #[serde(default)]
    pub local_nic_path: String,
    #[serde(default)]
    pub payload: String,
    #[serde(default)]
    pub peer_nic_path: String,
    #[serde(default)]
    pub qp_num: Vec<u32>,
    /// Present when the sender supports the ready acknowledgement; `true`
    /// in the second Connection request, the acknowledgement itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ack: Option<bool>,
    #[serde(default)]
    pub reply_msg: String,
    /// shardwire's own field, in a reply: the instance number of the
    /// process that answers (see [`SegmentDesc::shardwire_instance`]), so
    /// the initiator knows its queue pairs reach the process it addressed
    /// (Mooncake peers leave it out, and ignore it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shardwire_instance: Option<u64>,
    /// shardwire's own field: the sender's active path MTU, so the two
    /// sides agree on the smaller (Mooncake peers leave it out, and ignore
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shardwire_mtu: Option<u32>,
}

/// A notification: who sent it and what it says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NotifyDesc {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub notify_msg: String,
}

/// The reply to a Probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReply {
    pub status: String,
}

/// What a Notify is answered with.
pub fn notify_ack() -> NotifyDesc {
    NotifyDesc { name: String::new(), notify_msg: "success".into() }
}

/// Serialises a message the way jsoncpp's FastWriter does.
pub fn to_wire<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).expect("plain structs always serialise");
    out.push(b'\n');
    out
}

/// Parses a message body.
pub fn from_wire<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real Metadata reply from the mooncake-transfer-engine-non-cuda
    /// 0.3.13.post1 wheel.
    const WHEEL_REPLY: &str = r#"{"buffers":[{"addr":140623738826768,"length":2147483648,"name":"127.0.0.1:16830"}],"name":"127.0.0.1:16830","protocol":"tcp","rdma_server_name":"","tcp_data_host":"127.0.0.1","tcp_data_port":16824,"tcp_proto_version":2,"timestamp":"2026-11-23 13:31:39.220754"}"#;

    #[test]
    fn decodes_the_wheels_descriptor_and_writes_the_same_bytes() {
        let desc: SegmentDesc = from_wire(WHEEL_REPLY.as_bytes()).unwrap();
        assert_eq!(
            desc.buffers,
            vec![BufferDesc {
                addr: 140623738826768,
                length: 2 << 30,
                lkey: vec![],
                name: "127.0.0.1:16830".into(),
                rkey: vec![]
            }]
        );
        assert_eq!((desc.tcp_data_port, desc.tcp_proto_version), (16824, 2));
        assert_eq!(desc.tcp_data_host.as_deref(), Some("127.0.0.1"));
        let mut expected = WHEEL_REPLY.as_bytes().to_vec();
        expected.push(b'\n');
        assert_eq!(to_wire(&desc), expected);
    }

    #[test]
    fn older_and_rdma_descriptors_decode() {
        let old: SegmentDesc = from_wire(br#"{"name":"h:1","protocol":"tcp","tcp_data_port":5,"buffers":[]}"#).unwrap();
        assert_eq!((old.tcp_proto_version, old.tcp_data_host), (1, None));
        let rdma: SegmentDesc = from_wire(
            br#"{"name":"h:1","protocol":["rdma","tcp"],"devices":[{"name":"mlx5_0","lid":0,"gid":"fe:80"}],
                "buffers":[{"name":"cpu:0","addr":4096,"length":8192,"rkey":[1],"lkey":[2]}],
                "priority_matrix":{"cpu:0":[["mlx5_0"],[]]}}"#,
        )
        .unwrap();
        assert_eq!(rdma.protocol, "rdma");
        assert_eq!(rdma.buffers[0].addr, 4096);
    }

    #[test]
    fn the_local_field_round_trips_and_stays_out_when_absent() {
        let mut desc: SegmentDesc = from_wire(WHEEL_REPLY.as_bytes()).unwrap();
        assert!(desc.shardwire.is_none());
        desc.shardwire = Some(LocalDesc { boot_id: "b-1".into(), pid: 42, socket: "@shardwire-7".into(), token: 7 });
        let wire = to_wire(&desc);
        let text = String::from_utf8(wire.clone()).unwrap();
        // Alphabetical, as jsoncpp writes: after rdma_server_name.
        assert!(text.contains(r#""rdma_server_name":"","shardwire":{"boot_id":"b-1","pid":42,"socket":"@shardwire-7","token":7},"tcp_data_host""#), "{text}");
        assert_eq!(from_wire::<SegmentDesc>(&wire).unwrap(), desc);
    }

    #[test]
    fn small_messages_match_the_wheel() {
        assert_eq!(to_wire(&ProbeReply { status: "success".into() }), b"{\"status\":\"success\"}\n");
        assert_eq!(to_wire(&notify_ack()), b"{\"name\":\"\",\"notify_msg\":\"success\"}\n");
        assert_eq!(
            to_wire(&HandshakeDesc::default()),
            b"{\"local_gid\":\"\",\"local_lid\":0,\"local_nic_path\":\"\",\"payload\":\"\",\"peer_nic_path\":\"\",\"qp_num\":[],\"reply_msg\":\"\"}\n"
        );
        let n: NotifyDesc = from_wire(br#"{"name":"whoami","notify_msg":"hi there"}"#).unwrap();
        assert_eq!((n.name.as_str(), n.notify_msg.as_str()), ("whoami", "hi there"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [&b""[..], b"{", b"[]", b"{\"name\":5}", b"{\"name\":\"x\"}", b"\xff\xfe"] {
            assert!(from_wire::<SegmentDesc>(bad).is_err(), "{bad:?}");
        }
    }
}
