//! Where an engine's RDMA devices live: which shard owns each device (its
//! contexts, completion queue and queue pairs, polled in that shard's
//! loop), the local priority matrix, and the order in which work for a
//! memory location is dealt to the shards that own its devices. Pure
//! functions of the devices and the shards' NUMA nodes.
//!
//! - A device goes to a shard on its own NUMA node; the node's shards take
//!   its devices in turn (four NICs and eight shards on a node: every
//!   other shard owns one). A device whose node has no shard, or whose node
//!   is unknown, goes to the shard owning fewest devices.
//! - The matrix is `MC_CUSTOM_TOPO_JSON`'s when given; else `cpu:N`
//!   prefers the devices on node N (the others available), as Mooncake
//!   discovers it, and `*` prefers them all.
//! - Work for a location goes to each shard that owns one of the
//!   location's preferred devices, as often as it owns them, so the
//!   devices share the bytes evenly whichever shards own them.

use std::collections::BTreeSet;

use super::fabric::DeviceInfo;
use crate::topo::{MatrixEntry, PriorityMatrix};

/// The shard owning each device, in the devices' order. `shards` holds
/// each shard's NUMA node (`None`: unknown); there is at least one.
pub fn place(devices: &[Option<u32>], shards: &[Option<u32>]) -> Vec<usize> {
    assert!(!shards.is_empty(), "devices need a shard to live on");
    let mut owned = vec![0usize; shards.len()];
    let mut owners = Vec::with_capacity(devices.len());
    for &node in devices {
        let local: Vec<usize> = match node {
            Some(n) => (0..shards.len()).filter(|&s| shards[s] == Some(n)).collect(),
            None => Vec::new(),
        };
        let pool: Vec<usize> = if local.is_empty() { (0..shards.len()).collect() } else { local };
        // The pool's shard with the fewest devices, the first of them: the
        // node's shards take its devices in turn.
        let shard = *pool.iter().min_by_key(|&&s| (owned[s], s)).expect("a pool is never empty");
        owned[shard] += 1;
        owners.push(shard);
    }
    owners
}

/// The local matrix: `custom` when given (without the devices not in
/// use: the descriptor may name only devices it lists), else one made from
/// the devices' NUMA nodes (empty when no device knows its node: then every
/// device serves every location).
pub fn local_matrix(devices: &[DeviceInfo], custom: Option<&PriorityMatrix>) -> PriorityMatrix {
    if let Some(m) = custom {
        let known = |list: &[String]| -> Vec<String> {
            list.iter().filter(|n| devices.iter().any(|d| d.name == **n)).cloned().collect()
        };
        let mut used = PriorityMatrix::new();
        for (location, entry) in m.entries() {
            used.insert(
                location.to_string(),
                MatrixEntry { preferred: known(&entry.preferred), available: known(&entry.available) },
            );
        }
        return used;
    }
    let nodes: BTreeSet<u32> = devices.iter().filter_map(|d| d.numa_node).collect();
    let mut m = PriorityMatrix::new();
    if nodes.is_empty() {
        return m;
    }
    for &n in &nodes {
        let (preferred, available): (Vec<&DeviceInfo>, Vec<&DeviceInfo>) =
            devices.iter().partition(|d| d.numa_node == Some(n));
        let names = |list: Vec<&DeviceInfo>| list.into_iter().map(|d| d.name.clone()).collect();
        m.insert(format!("cpu:{n}"), MatrixEntry { preferred: names(preferred), available: names(available) });
    }
    let all = devices.iter().map(|d| d.name.clone()).collect();
    m.insert("*", MatrixEntry { preferred: all, available: vec![] });
    m
}

/// The shards that work for memory at `location` is dealt to, in turn:
/// each owner of one of the location's preferred devices (its available
/// ones when none is preferred, every device when the matrix names none
/// of them), once per such device. `names[i]` is owned by `owners[i]`.
pub fn deal_order(location: &str, matrix: &PriorityMatrix, names: &[String], owners: &[usize]) -> Vec<usize> {
    assert_eq!(names.len(), owners.len());
    let known =
        |list: &[String]| -> Vec<usize> { list.iter().filter_map(|n| names.iter().position(|m| m == n)).collect() };
    let devices = match matrix.get(location).or_else(|| matrix.get("*")) {
        Some(entry) => {
            let preferred = known(&entry.preferred);
            if preferred.is_empty() { known(&entry.available) } else { preferred }
        }
        None => Vec::new(),
    };
    let devices = if devices.is_empty() { (0..names.len()).collect() } else { devices };
    devices.into_iter().map(|d| owners[d]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topo;

    #[test]
    fn devices_go_to_shards_on_their_node_in_turn() {
        // Two nodes of two shards each; four devices on node 1, one on 0,
        // one nowhere known.
        let shards = [Some(0), Some(0), Some(1), Some(1)];
        let devices = [Some(1), Some(1), Some(1), Some(1), Some(0), None];
        assert_eq!(place(&devices, &shards), [2, 3, 2, 3, 0, 1]);
        // A node without shards: its devices go where there are fewest.
        assert_eq!(place(&[Some(7), Some(7), Some(7)], &[Some(0), Some(1)]), [0, 1, 0]);
        // One shard owns everything.
        assert_eq!(place(&[Some(0), None, Some(3)], &[None]), [0, 0, 0]);
    }

    fn fixture(name: &str) -> (topo::Topology, PriorityMatrix) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topo").join(name).join("sys");
        let t = topo::discover(&root).unwrap();
        let m = PriorityMatrix::discover(&t);
        (t, m)
    }

    #[test]
    fn on_a_dgx_h100_each_nic_lives_on_a_shard_of_its_own_node() {
        let (t, m) = fixture("dgx-h100");
        let plan = topo::Plan::derive(&t, &m, "discovered", &topo::PlanOptions::default()).unwrap();
        let shards: Vec<Option<u32>> = plan.shards.iter().map(|s| Some(s.numa_node)).collect();
        let hcas: Vec<&topo::Nic> = t.hcas().collect();
        let nodes: Vec<Option<u32>> = hcas.iter().map(|n| n.numa_node).collect();
        let owners = place(&nodes, &shards);
        for (nic, &shard) in hcas.iter().zip(&owners) {
            assert_eq!(Some(plan.shards[shard].numa_node), nic.numa_node, "{} on shard {shard}", nic.name);
        }
        let distinct: BTreeSet<usize> = owners.iter().copied().collect();
        assert_eq!(distinct.len(), 8, "eight NICs, eight shards: {owners:?}");
        // Memory on node 1 is dealt to the owners of mlx5_4..7 only.
        let names: Vec<String> = hcas.iter().map(|n| n.name.clone()).collect();
        let order = deal_order("cpu:1", &m, &names, &owners);
        assert_eq!(order, owners[4..8]);
        assert!(order.iter().all(|&s| plan.shards[s].numa_node == 1));
        // A GPU's memory goes to the owner of its own NIC.
        assert_eq!(deal_order("cuda:2", &m, &names, &owners), [owners[2]]);
    }

    fn device(name: &str, node: Option<u32>) -> DeviceInfo {
        let mut d = super::super::sim::SimDevice::new(name, 1).info;
        d.numa_node = node;
        d
    }

    #[test]
    fn the_local_matrix_prefers_the_memorys_own_node() {
        let devices = [device("a", Some(0)), device("b", Some(1)), device("c", Some(0))];
        let m = local_matrix(&devices, None);
        assert_eq!(m.get("cpu:0").unwrap().preferred, ["a", "c"]);
        assert_eq!(m.get("cpu:0").unwrap().available, ["b"]);
        assert_eq!(m.get("cpu:1").unwrap().preferred, ["b"]);
        assert_eq!(m.get("*").unwrap().preferred, ["a", "b", "c"]);
        assert!(local_matrix(&[device("x", None)], None).is_empty(), "no node known: no matrix, every device");
        let mut custom = PriorityMatrix::new();
        custom.insert("cpu:0", MatrixEntry { preferred: vec!["b".into(), "gone".into()], available: vec![] });
        let mut used = PriorityMatrix::new();
        used.insert("cpu:0", MatrixEntry { preferred: vec!["b".into()], available: vec![] });
        assert_eq!(local_matrix(&devices, Some(&custom)), used, "MC_CUSTOM_TOPO_JSON wins, less devices not in use");
        // Dealing: the owners of the preferred devices, once each.
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(deal_order("cpu:0", &m, &names, &[0, 1, 1]), [0, 1]);
        assert_eq!(deal_order("cuda:5", &PriorityMatrix::new(), &names, &[0, 1, 1]), [0, 1, 1], "no matrix: all");
        assert_eq!(deal_order("cpu:0", &custom, &names, &[0, 1, 1]), [1]);
    }
}
