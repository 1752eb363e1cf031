//! Topology discovery from a sysfs tree.
//!
//! Every path is taken relative to a root given by the caller: `/sys` on a
//! live machine, `topo/<name>/sys` for a fixture. Files that are missing are
//! treated as "unknown", never as errors, because real machines omit them
//! (a virtio NIC has no `numa_node`; a VM may lack `topology/core_id`). Only a
//! root without `devices/system/cpu` is rejected: that is not a sysfs tree.
//!
//! What is read:
//! - `devices/system/cpu/online`, `cpuN/topology/{core_id,physical_package_id}`
//! - `devices/system/node/nodeN/cpulist`
//! - `class/infiniband/*` and `class/net/*`, following their `device` link,
//!   and searching `numa_node` / `local_cpulist` upwards from the device
//! - `devices/pci*/**/` directories named like PCI addresses, for GPUs by
//!   their `class` and `vendor`

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use super::{Cpu, Gpu, Nic, NicKind, NumaNode, TopoError, Topology, cpulist};

/// How deep discovery walks below `devices/pci*` looking for GPUs. Real PCIe
/// hierarchies behind switches are about 8 levels deep.
const PCI_WALK_DEPTH_MAX: usize = 16;
/// How many directories the PCI walk visits at most, so a pathological tree
/// cannot stall start-up.
const PCI_WALK_DIRS_MAX: usize = 200_000;
/// How far up from a NIC's device we look for `numa_node`/`local_cpulist`.
const LOCALITY_SEARCH_LEVELS_MAX: usize = 8;

/// Discovers the topology under `root`.
pub fn discover(root: &Path) -> Result<Topology, TopoError> {
    let cpu_dir = root.join("devices/system/cpu");
    if !cpu_dir.is_dir() {
        return Err(TopoError::Sysfs {
            root: root.to_path_buf(),
            fault: "no devices/system/cpu directory (is this a sysfs tree?)".into(),
        });
    }
    let online = online_cpus(root, &cpu_dir)?;
    let nodes = numa_nodes(root, &online)?;
    let cpus = online
        .iter()
        .map(|&id| {
            let topo = cpu_dir.join(format!("cpu{id}/topology"));
            Cpu {
                id,
                core_id: read_u32(&topo.join("core_id")).unwrap_or(id),
                package_id: read_u32(&topo.join("physical_package_id")).unwrap_or(0),
                numa_node: nodes.iter().find(|n| n.cpus.contains(&id)).map(|n| n.id).unwrap_or(0),
            }
        })
        .collect();
    let devices_root = fs::canonicalize(root.join("devices")).unwrap_or_else(|_| root.join("devices"));
    let mut nics = Vec::new();
    nics.extend(class_nics(root, &devices_root, "infiniband", NicKind::Rdma));
    nics.extend(class_nics(root, &devices_root, "net", NicKind::Net));
    link_rdma_and_net(&mut nics);
    nics.sort_by(|a, b| (a.kind != NicKind::Rdma).cmp(&(b.kind != NicKind::Rdma)).then(natural_cmp(&a.name, &b.name)));
    let gpus = gpus(&devices_root);
    Ok(Topology { cpus, nodes, nics, gpus })
}

fn online_cpus(root: &Path, cpu_dir: &Path) -> Result<Vec<u32>, TopoError> {
    if let Some(text) = read_trimmed(&cpu_dir.join("online")) {
        return cpulist::parse(&text).map_err(|e| TopoError::Sysfs {
            root: root.to_path_buf(),
            fault: format!("devices/system/cpu/online: {e}"),
        });
    }
    // No `online` file: every cpuN directory whose own `online` is not 0.
    let mut ids: Vec<u32> = numbered_entries(cpu_dir, "cpu")
        .into_iter()
        .filter(|(_, path)| read_u32(&path.join("online")) != Some(0))
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Err(TopoError::Sysfs { root: root.to_path_buf(), fault: "no online CPUs found".into() });
    }
    Ok(ids)
}

fn numa_nodes(root: &Path, online: &[u32]) -> Result<Vec<NumaNode>, TopoError> {
    let node_dir = root.join("devices/system/node");
    let mut nodes = Vec::new();
    for (id, path) in numbered_entries(&node_dir, "node") {
        let text = read_trimmed(&path.join("cpulist")).unwrap_or_default();
        let cpus = cpulist::parse(&text).map_err(|e| TopoError::Sysfs {
            root: root.to_path_buf(),
            fault: format!("devices/system/node/node{id}/cpulist: {e}"),
        })?;
        nodes.push(NumaNode { id, cpus: cpus.into_iter().filter(|c| online.contains(c)).collect() });
    }
    nodes.sort_by_key(|n| n.id);
    if nodes.is_empty() {
        // A kernel without CONFIG_NUMA: one node holds everything.
        nodes.push(NumaNode { id: 0, cpus: online.to_vec() });
    }
    // CPUs no node claims go to the first node, so every CPU has a home.
    let orphans: Vec<u32> = online.iter().copied().filter(|c| !nodes.iter().any(|n| n.cpus.contains(c))).collect();
    nodes[0].cpus.extend(orphans);
    nodes[0].cpus.sort_unstable();
    Ok(nodes)
}

fn class_nics(root: &Path, devices_root: &Path, class: &str, kind: NicKind) -> Vec<Nic> {
    let mut nics = Vec::new();
    let Ok(entries) = fs::read_dir(root.join("class").join(class)) else {
        return nics;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(device) = fs::canonicalize(entry.path().join("device")) else {
            // No backing device: lo, veth, bridges, tunnels.
            continue;
        };
        let linked_dir = if kind == NicKind::Rdma { "net" } else { "infiniband" };
        let mut linked: Vec<String> = fs::read_dir(device.join(linked_dir))
            .map(|it| it.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        linked.sort_by(|a, b| natural_cmp(a, b));
        nics.push(Nic {
            name,
            kind,
            pci_address: nearest_pci_address(&device, devices_root),
            numa_node: search_up(&device, devices_root, "numa_node").and_then(|t| parse_numa(&t)),
            local_cpus: search_up(&device, devices_root, "local_cpulist").and_then(|t| cpulist::parse(&t).ok()),
            linked,
            device_path: device,
        });
    }
    nics
}

/// Completes the RDMA ↔ interface links where only one side lists them
/// (`device/net` exists under the HCA, but the interface's PCI function may
/// not list `infiniband`).
fn link_rdma_and_net(nics: &mut [Nic]) {
    let pairs: Vec<(String, String)> = nics
        .iter()
        .filter(|n| n.kind == NicKind::Rdma)
        .flat_map(|hca| hca.linked.iter().map(move |net| (hca.name.clone(), net.clone())))
        .collect();
    for (hca, net) in pairs {
        if let Some(nic) = nics.iter_mut().find(|n| n.kind == NicKind::Net && n.name == net)
            && !nic.linked.contains(&hca)
        {
            nic.linked.push(hca);
            nic.linked.sort_by(|a, b| natural_cmp(a, b));
        }
    }
}

fn gpus(devices_root: &Path) -> Vec<Gpu> {
    // `location` holds just the prefix until the GPUs are numbered below.
    let mut found: Vec<Gpu> = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = fs::read_dir(devices_root)
        .map(|it| {
            it.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("pci")).map(|e| (e.path(), 0)).collect()
        })
        .unwrap_or_default();
    let mut visited = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > PCI_WALK_DIRS_MAX {
            log::warn!("topology: stopped the PCI walk after {PCI_WALK_DIRS_MAX} directories");
            break;
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if is_pci_address(&name)
            && let (Some(class), Some(vendor)) = (read_hex(&dir.join("class")), read_hex(&dir.join("vendor")))
            && let Some(prefix) = gpu_prefix(class as u32, vendor as u16)
        {
            found.push(Gpu {
                location: prefix.to_string(),
                pci_address: name,
                vendor: vendor as u16,
                class: class as u32,
                numa_node: read_trimmed(&dir.join("numa_node")).and_then(|t| parse_numa(&t)),
                device_path: dir.clone(),
            });
        }
        if depth >= PCI_WALK_DEPTH_MAX {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                // DirEntry::file_type does not follow symlinks, so the walk
                // stays a tree walk.
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }
    found.sort_by(|a, b| a.location.cmp(&b.location).then(a.pci_address.cmp(&b.pci_address)));
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for gpu in &mut found {
        let index = counts.entry(gpu.location.clone()).or_default();
        gpu.location = format!("{}:{index}", gpu.location);
        *index += 1;
    }
    found
}

/// Maps a PCI (class, vendor) to a Mooncake location prefix, for display
/// controllers (class 0x03) and processing accelerators (0x12) of vendors
/// whose runtimes Mooncake names. A BMC's VGA (ASPEED) or an NVSwitch bridge
/// is not a GPU.
fn gpu_prefix(class: u32, vendor: u16) -> Option<&'static str> {
    let base = class >> 16;
    if base != 0x03 && base != 0x12 {
        return None;
    }
    match vendor {
        0x10de => Some("cuda"),
        0x1002 => Some("hip"),
        0x1ed5 => Some("musa"),
        0xcabc => Some("mlu"),
        _ => None,
    }
}

/// Reads `file` in `start` or the nearest ancestor that has it, without
/// leaving `devices_root`.
fn search_up(start: &Path, devices_root: &Path, file: &str) -> Option<String> {
    let mut dir = start;
    for _ in 0..LOCALITY_SEARCH_LEVELS_MAX {
        if !dir.starts_with(devices_root) {
            return None;
        }
        if let Some(text) = read_trimmed(&dir.join(file)) {
            return Some(text);
        }
        dir = dir.parent()?;
    }
    None
}

fn nearest_pci_address(start: &Path, devices_root: &Path) -> Option<String> {
    start
        .ancestors()
        .take_while(|p| p.starts_with(devices_root))
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .find(|n| is_pci_address(n))
}

/// `dddd:bb:dd.f` in hex.
fn is_pci_address(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter().enumerate().all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// `numa_node` holds `-1` when the firmware does not say.
fn parse_numa(text: &str) -> Option<u32> {
    text.trim().parse::<i64>().ok().filter(|n| (0..=i64::from(u16::MAX)).contains(n)).map(|n| n as u32)
}

fn numbered_entries(dir: &Path, prefix: &str) -> Vec<(u32, PathBuf)> {
    fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let digits = name.strip_prefix(prefix)?;
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    Some((digits.parse().ok()?, e.path()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u32(path: &Path) -> Option<u32> {
    read_trimmed(path)?.parse().ok()
}

fn read_hex(path: &Path) -> Option<u64> {
    let text = read_trimmed(path)?;
    u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()
}

/// Orders `mlx5_2` before `mlx5_10`: runs of digits compare as numbers.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then(na.cmp(nb));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits.iter().position(|&d| d != b'0').unwrap_or(digits.len());
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_compares_numbers_by_value() {
        let mut names = vec!["mlx5_10", "mlx5_2", "eth1", "eth0", "mlx5_02x"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, vec!["eth0", "eth1", "mlx5_2", "mlx5_02x", "mlx5_10"]);
    }

    #[test]
    fn pci_addresses_are_recognised() {
        assert!(is_pci_address("0000:18:00.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("virtio2"));
        assert!(!is_pci_address("0000:18:00:0"));
    }

    #[test]
    fn numa_minus_one_is_unknown() {
        assert_eq!(parse_numa("-1"), None);
        assert_eq!(parse_numa("1\n"), Some(1));
        assert_eq!(parse_numa("junk"), None);
    }

    #[test]
    fn gpu_classes() {
        assert_eq!(gpu_prefix(0x030200, 0x10de), Some("cuda"));
        assert_eq!(gpu_prefix(0x030000, 0x1002), Some("hip"));
        assert_eq!(gpu_prefix(0x030000, 0x1a03), None); // ASPEED BMC VGA
        assert_eq!(gpu_prefix(0x068000, 0x10de), None); // NVSwitch bridge
        assert_eq!(gpu_prefix(0x040300, 0x10de), None); // HDMI audio
    }

    #[test]
    fn a_root_without_cpus_is_rejected() {
        let err = discover(Path::new("/nonexistent-sysfs-root")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-sysfs-root"), "{err}");
    }
}
