//! Machine topology: which CPUs, NUMA nodes, NICs and GPUs exist, how they sit
//! relative to each other, and the placement plan derived from that.
//!
//! - [`sysfs`] discovers a [`Topology`] from a sysfs root given as a parameter,
//!   so that the fixture trees under `topo/` test it exactly like a live `/sys`.
//! - [`matrix`] reads and writes Mooncake's NIC priority matrix, the format of
//!   `MC_CUSTOM_TOPO_JSON`. Unlike Mooncake, a malformed file is an error that
//!   names the file and the fault; it never silently degrades the transport.
//! - [`plan`] decides which CPUs run shards and which NICs each shard prefers.
//! - [`report`] renders all of it as the table `shardwire topo` prints.

pub mod cache;
pub mod cpulist;
pub mod matrix;
pub mod plan;
pub mod report;
pub mod sysfs;

use std::path::PathBuf;

use serde::Serialize;

pub use matrix::{MatrixEntry, MatrixFault, PriorityMatrix};
pub use plan::{NicChoice, Plan, PlanOptions, ShardPlan};
pub use sysfs::discover;

/// One online logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cpu {
    /// The kernel's CPU number (`cpuN`).
    pub id: u32,
    /// `topology/core_id`: hyperthreads of one physical core share it.
    pub core_id: u32,
    /// `topology/physical_package_id`: the socket.
    pub package_id: u32,
    /// The NUMA node whose `cpulist` holds this CPU.
    pub numa_node: u32,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of the node; empty for memory-only nodes.
    pub cpus: Vec<u32>,
}

/// Where a NIC was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NicKind {
    /// `/sys/class/infiniband/<dev>`: an RDMA device (HCA), as Mooncake's
    /// priority matrix names them (`mlx5_0`).
    Rdma,
    /// `/sys/class/net/<if>` backed by a device: a network interface usable
    /// for TCP. Virtual interfaces (lo, veth, bridges) have no device and are
    /// left out.
    Net,
}

/// One NIC: an RDMA device or a network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    /// `mlx5_0` for RDMA devices, `eth0` for interfaces.
    pub name: String,
    pub kind: NicKind,
    /// PCI address (`0000:18:00.0`) of the nearest PCI device, if any.
    pub pci_address: Option<String>,
    /// `numa_node`, searched upwards from the device; `None` when the file is
    /// missing or says `-1`.
    pub numa_node: Option<u32>,
    /// `local_cpulist`, searched upwards from the device; `None` when missing.
    pub local_cpus: Option<Vec<u32>>,
    /// For an RDMA device, its network interfaces (`device/net/*`); for an
    /// interface, the RDMA devices that share its PCI function.
    pub linked: Vec<String>,
    /// The device's resolved sysfs path, used for PCIe distances.
    #[serde(skip)]
    pub device_path: PathBuf,
}

/// One GPU, found by PCI class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// The location name Mooncake uses: `cuda:0`, `hip:1`.
    pub location: String,
    pub pci_address: String,
    /// PCI vendor id (0x10de NVIDIA, 0x1002 AMD).
    pub vendor: u16,
    /// PCI class code, e.g. 0x030200 for a 3D controller.
    pub class: u32,
    pub numa_node: Option<u32>,
    #[serde(skip)]
    pub device_path: PathBuf,
}

/// Everything discovery found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Online CPUs, ordered by id.
    pub cpus: Vec<Cpu>,
    /// NUMA nodes, ordered by id. Always at least one.
    pub nodes: Vec<NumaNode>,
    /// NICs, RDMA devices first, each group ordered by name.
    pub nics: Vec<Nic>,
    /// GPUs, ordered by location prefix, then by PCI address.
    pub gpus: Vec<Gpu>,
}

impl Topology {
    /// The CPU with this id, if it is online.
    pub fn cpu(&self, id: u32) -> Option<&Cpu> {
        self.cpus.iter().find(|c| c.id == id)
    }

    /// The RDMA devices, in order.
    pub fn hcas(&self) -> impl Iterator<Item = &Nic> {
        self.nics.iter().filter(|n| n.kind == NicKind::Rdma)
    }

    /// The network interfaces, in order.
    pub fn netdevs(&self) -> impl Iterator<Item = &Nic> {
        self.nics.iter().filter(|n| n.kind == NicKind::Net)
    }

    /// The NUMA nodes a NIC is local to.
    ///
    /// `numa_node` wins when the kernel reports it. Otherwise `local_cpulist`
    /// says which nodes' CPUs are near. With neither, a single-node machine
    /// has only one answer; on a multi-node machine the NIC is local to none.
    pub fn nic_nodes(&self, nic: &Nic) -> Vec<u32> {
        if let Some(node) = nic.numa_node {
            return vec![node];
        }
        if let Some(local) = &nic.local_cpus {
            let mut nodes: Vec<u32> =
                self.nodes.iter().filter(|n| n.cpus.iter().any(|c| local.contains(c))).map(|n| n.id).collect();
            // A cpulist that names every CPU is the kernel's way of saying
            // "no locality", unless there is only one node anyway.
            if nodes.len() == self.nodes_with_cpus() && self.nodes_with_cpus() > 1 {
                nodes.clear();
            }
            return nodes;
        }
        if self.nodes_with_cpus() == 1 {
            return self.nodes.iter().filter(|n| !n.cpus.is_empty()).map(|n| n.id).collect();
        }
        Vec::new()
    }

    fn nodes_with_cpus(&self) -> usize {
        self.nodes.iter().filter(|n| !n.cpus.is_empty()).count()
    }
}

/// What can go wrong while reading the topology or its override.
#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    /// The sysfs root lacks what every Linux sysfs has.
    #[error("sysfs root {root}: {fault}")]
    Sysfs { root: PathBuf, fault: String },
    /// `MC_CUSTOM_TOPO_JSON` names a file that cannot be used.
    #[error("MC_CUSTOM_TOPO_JSON file {path}: {fault}")]
    CustomMatrix { path: PathBuf, fault: MatrixFault },
    /// The placement could not be derived (for example a bad `SHARDWIRE_CORES`).
    #[error("placement: {0}")]
    Plan(String),
}
