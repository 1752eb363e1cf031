//! Discovery and placement on the sysfs fixture trees under `topo/`.

use std::path::PathBuf;

use shardwire::topo::{self, NicKind, Plan, PlanOptions, PriorityMatrix, Topology};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topo").join(name).join("sys")
}

fn load(name: &str) -> (Topology, PriorityMatrix) {
    let topology = topo::discover(&fixture(name)).expect("fixture discovers");
    let matrix = PriorityMatrix::discover(&topology);
    (topology, matrix)
}

fn plan(name: &str, cores: Option<&str>) -> Plan {
    let (topology, matrix) = load(name);
    let options = PlanOptions { cores: cores.map(|c| topo::plan::parse_cores(c).unwrap()), allowed: None };
    Plan::derive(&topology, &matrix, "discovered", &options).expect("plan derives")
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_fixture_has_a_devices_folder() {
    for name in ["this-vm", "dgx-h100", "one-socket-2nic"] {
        assert!(fixture(name).join("devices").is_dir(), "{name}");
    }
}

#[test]
fn this_vm_two_cpus_one_virtio_nic() {
    let (t, m) = load("this-vm");
    assert_eq!(t.cpus.iter().map(|c| c.id).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(t.nodes[0].cpus, vec![0, 1]);
    // eth0 is virtio: its device has no numa_node; the PCI parent says -1.
    assert_eq!(t.nics.len(), 1, "lo and ifb* are virtual and left out: {:?}", t.nics);
    let eth0 = &t.nics[0];
    assert_eq!((eth0.name.as_str(), eth0.kind), ("eth0", NicKind::Net));
    assert_eq!(eth0.numa_node, None);
    assert_eq!(eth0.local_cpus, Some(vec![0, 1]));
    assert_eq!(eth0.pci_address.as_deref(), Some("0000:00:03.0"));
    assert!(t.gpus.is_empty());
    // Mooncake prints exactly this on a machine without HCAs.
    assert_eq!(m.to_json(), "{\n  \"cpu:0\": [[], []]\n}");

    let p = plan("this-vm", None);
    assert_eq!(p.cpus(), vec![0, 1]);
    for s in &p.shards {
        assert_eq!(s.numa_node, 0);
        assert_eq!(s.netdevs.primary.as_deref(), Some("eth0"));
        assert_eq!(s.hcas.primary, None);
    }
}

#[test]
fn dgx_h100_discovery() {
    let (t, _) = load("dgx-h100");
    assert_eq!(t.cpus.len(), 224);
    assert_eq!(t.nodes.len(), 2);
    assert_eq!(topo::cpulist::format(&t.nodes[0].cpus), "0-55,112-167");
    assert_eq!(topo::cpulist::format(&t.nodes[1].cpus), "56-111,168-223");
    let sibling = t.cpu(112).unwrap();
    assert_eq!((sibling.core_id, sibling.package_id, sibling.numa_node), (0, 0, 0));
    let hcas: Vec<_> = t.hcas().map(|n| n.name.clone()).collect();
    assert_eq!(hcas, (0..8).map(|i| format!("mlx5_{i}")).collect::<Vec<_>>());
    assert_eq!(t.netdevs().count(), 8);
    let mlx5_5 = t.nics.iter().find(|n| n.name == "mlx5_5").unwrap();
    assert_eq!(mlx5_5.numa_node, Some(1));
    assert_eq!(mlx5_5.linked, names(&["ibp172s0"]));
    // 8 GPUs; the NVSwitches and the BMC VGA are not GPUs.
    let gpus: Vec<_> = t.gpus.iter().map(|g| (g.location.as_str(), g.pci_address.as_str(), g.numa_node)).collect();
    assert_eq!(gpus.len(), 8);
    assert_eq!(gpus[0], ("cuda:0", "0000:18:00.0", Some(0)));
    assert_eq!(gpus[7], ("cuda:7", "0000:db:00.0", Some(1)));
}

#[test]
fn dgx_h100_matrix_pairs_each_gpu_with_its_switch_neighbour() {
    let (_, m) = load("dgx-h100");
    assert_eq!(m.len(), 10);
    let cpu0 = m.get("cpu:0").unwrap();
    assert_eq!(cpu0.preferred, names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]));
    assert_eq!(cpu0.available, names(&["mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"]));
    for i in 0..8 {
        let e = m.get(&format!("cuda:{i}")).unwrap();
        assert_eq!(e.preferred, vec![format!("mlx5_{i}")], "cuda:{i}");
        assert_eq!(e.available.len(), 7);
        assert!(!e.available.contains(&format!("mlx5_{i}")));
    }
    // What we print, Mooncake's parser (and ours) reads back.
    assert_eq!(PriorityMatrix::parse(&m.to_json()).unwrap(), m);
}

#[test]
fn dgx_h100_plan_one_shard_per_core_with_nics_spread() {
    let p = plan("dgx-h100", None);
    assert_eq!(p.shards.len(), 112, "one shard per physical core, not per hyperthread");
    assert_eq!(p.cpus(), (0..112).collect::<Vec<u32>>());
    for s in &p.shards {
        let node = if s.cpu < 56 { 0 } else { 1 };
        assert_eq!(s.numa_node, node, "shard {}", s.shard);
        assert_eq!(s.package_id, node);
        let local: Vec<String> = (0..4).map(|i| format!("mlx5_{}", i + 4 * node)).collect();
        assert_eq!(s.hcas.preferred, local);
        // The k-th shard of a node takes the k-th local HCA, round-robin.
        let k = (s.cpu % 56) as usize;
        assert_eq!(s.hcas.primary, Some(local[k % 4].clone()), "shard {}", s.shard);
        assert_eq!(s.gpus.len(), 4);
        assert_eq!(s.gpus[0], format!("cuda:{}", 4 * node));
        assert_eq!(s.netdevs.preferred.len(), 4);
    }
}

#[test]
fn dgx_h100_plan_honours_explicit_cores_siblings_included() {
    let p = plan("dgx-h100", Some("0,56,112"));
    assert_eq!(p.cores_from, "SHARDWIRE_CORES");
    let got: Vec<_> =
        p.shards.iter().map(|s| (s.cpu, s.numa_node, s.core_id, s.hcas.primary.clone().unwrap())).collect();
    assert_eq!(got, vec![(0, 0, 0, "mlx5_0".into()), (56, 1, 0, "mlx5_4".into()), (112, 0, 0, "mlx5_1".into())]);
}

#[test]
fn one_socket_box_handles_missing_files() {
    let (t, m) = load("one-socket-2nic");
    // No cpu/online: per-CPU online files; CPU 15 is offline.
    assert_eq!(t.cpus.len(), 15);
    assert!(t.cpu(15).is_none());
    // No node directory: one node holds every CPU.
    assert_eq!(t.nodes.len(), 1);
    assert_eq!(t.nodes[0].cpus.len(), 15);
    let names_kinds: Vec<_> = t.nics.iter().map(|n| (n.name.as_str(), n.kind)).collect();
    assert_eq!(names_kinds, vec![("mlx5_0", NicKind::Rdma), ("eno1", NicKind::Net), ("ens1f0np0", NicKind::Net)]);
    let mlx = &t.nics[0];
    assert_eq!(mlx.numa_node, None, "numa_node -1 means unknown");
    assert_eq!(mlx.linked, names(&["ens1f0np0"]));
    let eno1 = &t.nics[1];
    assert_eq!((eno1.numa_node, eno1.local_cpus.as_ref()), (None, None));
    assert_eq!(m.to_json(), "{\n  \"cpu:0\": [[\"mlx5_0\"], []]\n}");

    let p = plan("one-socket-2nic", None);
    assert_eq!(p.cpus(), (0..8).collect::<Vec<u32>>());
    for s in &p.shards {
        assert_eq!(s.hcas.primary.as_deref(), Some("mlx5_0"));
        assert_eq!(s.netdevs.preferred, names(&["eno1", "ens1f0np0"]));
        let expected = if s.shard % 2 == 0 { "eno1" } else { "ens1f0np0" };
        assert_eq!(s.netdevs.primary.as_deref(), Some(expected));
    }
}

#[test]
fn plan_rejects_offline_disallowed_and_too_many_cores() {
    let (t, m) = load("one-socket-2nic");
    let derive = |cores: &str, allowed: Option<Vec<u32>>| {
        let options = PlanOptions { cores: Some(topo::plan::parse_cores(cores).unwrap()), allowed };
        Plan::derive(&t, &m, "discovered", &options).map(|_| ()).unwrap_err().to_string()
    };
    assert!(derive("15", None).contains("CPU 15, which is not online"), "{}", derive("15", None));
    assert!(derive("0-3", Some(vec![0, 1])).contains("may not run on"));
    assert!(topo::plan::parse_cores("").is_err());
    assert!(topo::plan::parse_cores("0-x").unwrap_err().to_string().contains("SHARDWIRE_CORES"));
    let options = PlanOptions { cores: None, allowed: Some(vec![100]) };
    assert!(Plan::derive(&t, &m, "discovered", &options).is_err());
}

#[test]
fn custom_matrix_overrides_hca_preferences() {
    let (t, _) = load("dgx-h100");
    let custom = PriorityMatrix::parse(r#"{"cpu:0": [["mlx5_7"], []], "*": [["mlx5_0"], ["mlx5_1"]]}"#).unwrap();
    let p = Plan::derive(&t, &custom, "/etc/custom.json", &PlanOptions::default()).unwrap();
    assert_eq!(p.matrix_from, "/etc/custom.json");
    assert_eq!(p.shards[0].hcas.primary.as_deref(), Some("mlx5_7"));
    // Node 1 has no entry of its own: the wildcard applies.
    let s = p.shards.iter().find(|s| s.numa_node == 1).unwrap();
    assert_eq!(s.hcas.preferred, names(&["mlx5_0"]));
    assert_eq!(s.hcas.available, names(&["mlx5_1"]));
}
