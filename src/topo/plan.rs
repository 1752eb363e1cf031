//! The placement plan: which CPUs run shards, and what each shard prefers.
//!
//! By default one shard runs on each physical core (the lowest-numbered online
//! hyperthread of the core), because two busy-polling shards on sibling
//! hyperthreads only steal each other's cycles. `SHARDWIRE_CORES` (a CPU list
//! such as `0-3,8`) names the CPUs exactly, siblings included.
//!
//! Each shard gets its NUMA node and two NIC choices:
//! - `hcas`, RDMA devices, from the priority matrix entry `cpu:<node>` (the
//!   discovered matrix, or `MC_CUSTOM_TOPO_JSON`);
//! - `netdevs`, network interfaces for TCP, local to the node first.
//!
//! Within each, shards of one node take turns for their `primary` device, so
//! eight shards on a node with four local NICs use each NIC twice.

use serde::Serialize;

use super::{NicKind, PriorityMatrix, TopoError, Topology, cpulist};

/// The environment variable that names the shard CPUs.
pub const ENV_CORES: &str = crate::config::CORES.name;
/// Most shards in one process.
pub const SHARDS_MAX: usize = 1024;

/// Inputs to the plan besides the topology.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// CPUs to run shards on; `None` for one per physical core.
    pub cores: Option<Vec<u32>>,
    /// CPUs this process may run on (its affinity mask); `None` for all.
    pub allowed: Option<Vec<u32>>,
}

impl PlanOptions {
    /// `SHARDWIRE_CORES` and the calling thread's affinity mask.
    pub fn from_env() -> Result<Self, TopoError> {
        let s = crate::config::Settings::from_env().map_err(|e| TopoError::Plan(e.to_string()))?;
        Ok(Self::from_settings(&s))
    }

    /// `SHARDWIRE_CORES` as `s` has it, and the calling thread's affinity
    /// mask.
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self { cores: s.cores.clone(), allowed: current_affinity() }
    }
}

/// Parses a `SHARDWIRE_CORES` value.
pub fn parse_cores(text: &str) -> Result<Vec<u32>, TopoError> {
    let cores = cpulist::parse(text).map_err(|e| TopoError::Plan(format!("{ENV_CORES}: {e}")))?;
    if cores.is_empty() {
        return Err(TopoError::Plan(format!("{ENV_CORES} is set but names no CPU")));
    }
    Ok(cores)
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> Option<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set, and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
        Some((0..max).filter(|&c| libc::CPU_ISSET(c, &set)).map(|c| c as u32).collect())
    }
}

/// One device choice for a shard.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NicChoice {
    /// Devices local to the shard, best first.
    pub preferred: Vec<String>,
    /// Devices to fall back on.
    pub available: Vec<String>,
    /// The device this shard uses first, spread over the shards of a node.
    pub primary: Option<String>,
}

/// One shard's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardPlan {
    pub shard: usize,
    pub cpu: u32,
    pub core_id: u32,
    pub package_id: u32,
    pub numa_node: u32,
    /// RDMA devices, from the priority matrix.
    pub hcas: NicChoice,
    /// Network interfaces, for TCP.
    pub netdevs: NicChoice,
    /// GPUs on the shard's NUMA node.
    pub gpus: Vec<String>,
}

/// Where the plan's CPUs and NIC preferences came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// `"one per physical core"` or `"SHARDWIRE_CORES"`.
    pub cores_from: String,
    /// `"discovered"` or the custom matrix file's path.
    pub matrix_from: String,
    pub shards: Vec<ShardPlan>,
}

impl Plan {
    /// Derives the plan. `matrix_from` says where `matrix` came from.
    pub fn derive(
        topo: &Topology,
        matrix: &PriorityMatrix,
        matrix_from: &str,
        opts: &PlanOptions,
    ) -> Result<Plan, TopoError> {
        let (cpus, cores_from) = match &opts.cores {
            Some(cores) => (checked_cores(topo, cores, opts.allowed.as_deref())?, ENV_CORES.to_string()),
            None => (one_per_core(topo, opts.allowed.as_deref())?, "one per physical core".to_string()),
        };
        if cpus.len() > SHARDS_MAX {
            return Err(TopoError::Plan(format!("{} shards requested, above the limit of {SHARDS_MAX}", cpus.len())));
        }
        let mut shards = Vec::with_capacity(cpus.len());
        for (index, &cpu_id) in cpus.iter().enumerate() {
            let cpu = topo.cpu(cpu_id).expect("checked above: every planned CPU is online");
            // The k-th shard of a node takes the k-th device, round-robin.
            let turn =
                cpus[..index].iter().filter(|&&c| topo.cpu(c).is_some_and(|o| o.numa_node == cpu.numa_node)).count();
            let hca_entry = matrix.for_cpu_node(cpu.numa_node).cloned().unwrap_or_default();
            let hcas = choice(hca_entry.preferred, hca_entry.available, turn);
            let (local, remote): (Vec<_>, Vec<_>) = topo
                .nics
                .iter()
                .filter(|n| n.kind == NicKind::Net)
                .partition(|n| topo.nic_nodes(n).contains(&cpu.numa_node));
            let netdevs = choice(
                local.iter().map(|n| n.name.clone()).collect(),
                remote.iter().map(|n| n.name.clone()).collect(),
                turn,
            );
            let gpus =
                topo.gpus.iter().filter(|g| g.numa_node == Some(cpu.numa_node)).map(|g| g.location.clone()).collect();
            shards.push(ShardPlan {
                shard: index,
                cpu: cpu.id,
                core_id: cpu.core_id,
                package_id: cpu.package_id,
                numa_node: cpu.numa_node,
                hcas,
                netdevs,
                gpus,
            });
        }
        Ok(Plan { cores_from, matrix_from: matrix_from.to_string(), shards })
    }

    /// The CPUs, in shard order.
    pub fn cpus(&self) -> Vec<u32> {
        self.shards.iter().map(|s| s.cpu).collect()
    }
}

fn choice(preferred: Vec<String>, available: Vec<String>, turn: usize) -> NicChoice {
    let pool = if preferred.is_empty() { &available } else { &preferred };
    let primary = (!pool.is_empty()).then(|| pool[turn % pool.len()].clone());
    NicChoice { preferred, available, primary }
}

fn checked_cores(topo: &Topology, cores: &[u32], allowed: Option<&[u32]>) -> Result<Vec<u32>, TopoError> {
    let online: Vec<u32> = topo.cpus.iter().map(|c| c.id).collect();
    for &cpu in cores {
        if topo.cpu(cpu).is_none() {
            return Err(TopoError::Plan(format!(
                "{ENV_CORES} lists CPU {cpu}, which is not online (online: {})",
                cpulist::format(&online)
            )));
        }
        if let Some(allowed) = allowed
            && !allowed.contains(&cpu)
        {
            return Err(TopoError::Plan(format!(
                "{ENV_CORES} lists CPU {cpu}, which this process may not run on (allowed: {})",
                cpulist::format(allowed)
            )));
        }
    }
    Ok(cores.to_vec())
}

fn one_per_core(topo: &Topology, allowed: Option<&[u32]>) -> Result<Vec<u32>, TopoError> {
    let mut seen = std::collections::BTreeSet::new();
    let mut cpus = Vec::new();
    for cpu in &topo.cpus {
        if allowed.is_some_and(|a| !a.contains(&cpu.id)) {
            continue;
        }
        if seen.insert((cpu.package_id, cpu.core_id)) {
            cpus.push(cpu.id);
        }
    }
    if cpus.is_empty() {
        return Err(TopoError::Plan("no online CPU is in this process's affinity mask".into()));
    }
    Ok(cpus)
}
