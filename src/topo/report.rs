//! The readable table that `shardwire topo` prints.

use std::fmt::Write as _;

use super::{Plan, PriorityMatrix, Topology, cpulist};

/// A left-aligned text table.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|s| s.to_string()).collect()] }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
            .collect();
        for row in &self.rows {
            let mut line = String::from("  ");
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

fn list(names: &[String]) -> String {
    or_dash(names.join(","))
}

/// Renders the topology, the priority matrix and the plan.
pub fn render(topo: &Topology, matrix: &PriorityMatrix, plan: &Plan) -> String {
    let mut out = String::new();
    let packages: std::collections::BTreeSet<u32> = topo.cpus.iter().map(|c| c.package_id).collect();
    let cores: std::collections::BTreeSet<(u32, u32)> = topo.cpus.iter().map(|c| (c.package_id, c.core_id)).collect();
    let _ = writeln!(
        out,
        "CPUs: {} online ({}), {}, {}, {}",
        topo.cpus.len(),
        cpulist::format(&topo.cpus.iter().map(|c| c.id).collect::<Vec<_>>()),
        count(cores.len(), "physical core"),
        count(packages.len(), "package"),
        count(topo.nodes.len(), "NUMA node")
    );

    out.push_str("\nNUMA nodes\n");
    let mut t = Table::new(&["node", "cpus"]);
    for node in &topo.nodes {
        t.row(vec![node.id.to_string(), or_dash(cpulist::format(&node.cpus))]);
    }
    t.render(&mut out);

    out.push_str("\nNICs\n");
    if topo.nics.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut t = Table::new(&["name", "kind", "numa", "local cpus", "pci", "linked"]);
        for nic in &topo.nics {
            t.row(vec![
                nic.name.clone(),
                format!("{:?}", nic.kind).to_lowercase(),
                nic.numa_node.map_or("-".into(), |n| n.to_string()),
                nic.local_cpus.as_ref().map_or("-".into(), |c| or_dash(cpulist::format(c))),
                nic.pci_address.clone().unwrap_or_else(|| "-".into()),
                list(&nic.linked),
            ]);
        }
        t.render(&mut out);
    }

    out.push_str("\nGPUs\n");
    if topo.gpus.is_empty() {
        out.push_str("  (none)\n");
    } else {
        let mut t = Table::new(&["location", "pci", "vendor", "numa"]);
        for gpu in &topo.gpus {
            t.row(vec![
                gpu.location.clone(),
                gpu.pci_address.clone(),
                format!("{:04x}", gpu.vendor),
                gpu.numa_node.map_or("-".into(), |n| n.to_string()),
            ]);
        }
        t.render(&mut out);
    }

    let _ = writeln!(out, "\nNIC priority matrix ({})", plan.matrix_from);
    let mut t = Table::new(&["location", "preferred", "available"]);
    for (key, entry) in matrix.entries() {
        t.row(vec![key.to_string(), list(&entry.preferred), list(&entry.available)]);
    }
    t.render(&mut out);

    let _ = writeln!(out, "\nPlacement plan: {}, CPUs from {}", count(plan.shards.len(), "shard"), plan.cores_from);
    let mut t = Table::new(&[
        "shard",
        "cpu",
        "core",
        "pkg",
        "numa",
        "hca",
        "hcas (preferred)",
        "netdev",
        "netdevs (preferred)",
        "gpus",
    ]);
    for s in &plan.shards {
        t.row(vec![
            s.shard.to_string(),
            s.cpu.to_string(),
            s.core_id.to_string(),
            s.package_id.to_string(),
            s.numa_node.to_string(),
            s.hcas.primary.clone().unwrap_or_else(|| "-".into()),
            list(&s.hcas.preferred),
            s.netdevs.primary.clone().unwrap_or_else(|| "-".into()),
            list(&s.netdevs.preferred),
            list(&s.gpus),
        ]);
    }
    t.render(&mut out);
    out
}
