//! Mooncake's NIC priority matrix: the format of `MC_CUSTOM_TOPO_JSON`, of a
//! segment's `priority_matrix`, and of `get_local_topology()`.
//!
//! ```json
//! { "cpu:0":  [["mlx5_0", "mlx5_1"], ["mlx5_2", "mlx5_3"]],
//!   "cuda:0": [["mlx5_0"], ["mlx5_1", "mlx5_2", "mlx5_3"]] }
//! ```
//!
//! Each key is a memory location; its value is exactly two lists of RDMA
//! device names, the preferred ones and the other usable ones. Mooncake
//! ignores a malformed file and silently ends up on TCP; here every fault is
//! reported with the key it concerns, and the caller names the file.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::sysfs::natural_cmp;
use super::{TopoError, Topology};

/// The environment variable that names a custom matrix file.
pub const ENV_CUSTOM_TOPO_JSON: &str = crate::config::CUSTOM_TOPO_JSON.name;
/// Largest matrix file we read. A full DGX matrix is about 2 KiB.
pub const FILE_BYTES_MAX: u64 = 16 << 20;
/// Most location keys in one matrix.
pub const KEYS_MAX: usize = 4096;
/// Most device names in one list.
pub const NAMES_PER_LIST_MAX: usize = 1024;
/// Longest device name (Linux caps IB device names at 64 bytes).
pub const NAME_BYTES_MAX: usize = 64;

/// Location prefixes Mooncake understands, besides the wildcard `*`.
pub const LOCATION_PREFIXES: [&str; 6] = ["cpu", "cuda", "hip", "musa", "maca", "mlu"];

/// One location's NIC preference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct MatrixEntry {
    /// Devices to use first.
    pub preferred: Vec<String>,
    /// Devices to fall back on.
    pub available: Vec<String>,
}

/// A NIC priority matrix, keyed by location (`cpu:0`, `cuda:3`, `*`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriorityMatrix {
    entries: BTreeMap<String, MatrixEntry>,
}

/// What is wrong with a matrix file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixFault {
    #[error("cannot read it: {0}")]
    Unreadable(String),
    #[error("it is {0} bytes, above the {FILE_BYTES_MAX}-byte limit")]
    TooLarge(u64),
    #[error("it is empty; write {{}} for an empty matrix, or unset the variable to discover the topology")]
    Empty,
    #[error("it is not valid JSON: {0}")]
    Json(String),
    #[error("the top level must be a JSON object mapping locations to [[preferred], [available]], not {0}")]
    NotAnObject(&'static str),
    #[error("key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("it has {0} keys, above the limit of {KEYS_MAX}")]
    TooManyKeys(usize),
    #[error("unknown location key {0:?}: expected \"*\" or cpu:N, cuda:N, hip:N, musa:N, maca:N, mlu:N")]
    UnknownKey(String),
    #[error("{key:?} must be an array of exactly two arrays, [[preferred...], [available...]]; {found}")]
    BadShape { key: String, found: String },
    #[error("{key:?}: {fault}")]
    BadName { key: String, fault: String },
    #[error("{key:?} lists device {name:?} more than once")]
    DuplicateName { key: String, name: String },
}

impl PriorityMatrix {
    /// An empty matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one location's entry.
    pub fn insert(&mut self, location: impl Into<String>, entry: MatrixEntry) {
        self.entries.insert(location.into(), entry);
    }

    /// The entry for a location, exactly as keyed.
    pub fn get(&self, location: &str) -> Option<&MatrixEntry> {
        self.entries.get(location)
    }

    /// The entry that applies to memory on a NUMA node: `cpu:N`, else `*`.
    pub fn for_cpu_node(&self, node: u32) -> Option<&MatrixEntry> {
        self.entries.get(&format!("cpu:{node}")).or_else(|| self.entries.get("*"))
    }

    /// Entries in natural key order (`cpu:2` before `cpu:10`).
    pub fn entries(&self) -> Vec<(&str, &MatrixEntry)> {
        let mut all: Vec<(&str, &MatrixEntry)> = self.entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
        all.sort_by(|a, b| natural_cmp(a.0, b.0));
        all
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Derives the matrix Mooncake's discovery would build from this
    /// topology. Only RDMA devices take part, so a machine without any yields
    /// `{"cpu:0": [[], []]}`, as Mooncake prints there.
    ///
    /// - `cpu:N`: preferred are the HCAs local to node N, available the rest.
    /// - GPU `x:i`: the candidates are the HCAs on the GPU's node (all HCAs if
    ///   none); preferred are the candidates nearest in the PCIe tree,
    ///   available every other HCA.
    pub fn discover(topo: &Topology) -> Self {
        let hcas: Vec<_> = topo.hcas().collect();
        let mut matrix = Self::new();
        for node in &topo.nodes {
            let (preferred, available): (Vec<_>, Vec<_>) =
                hcas.iter().partition(|h| topo.nic_nodes(h).contains(&node.id));
            matrix.insert(
                format!("cpu:{}", node.id),
                MatrixEntry { preferred: names(&preferred), available: names(&available) },
            );
        }
        for gpu in &topo.gpus {
            let mut candidates: Vec<_> =
                hcas.iter().filter(|h| gpu.numa_node.is_some_and(|n| topo.nic_nodes(h).contains(&n))).collect();
            if candidates.is_empty() {
                candidates = hcas.iter().collect();
            }
            let nearest = candidates.iter().map(|h| pcie_distance(&gpu.device_path, &h.device_path)).min();
            let preferred: Vec<String> = candidates
                .iter()
                .filter(|h| Some(pcie_distance(&gpu.device_path, &h.device_path)) == nearest)
                .map(|h| h.name.clone())
                .collect();
            let available = hcas.iter().map(|h| h.name.clone()).filter(|n| !preferred.contains(n)).collect();
            matrix.insert(gpu.location.clone(), MatrixEntry { preferred, available });
        }
        matrix
    }

    /// Parses matrix text, checking every key and list.
    ///
    /// ```
    /// use shardwire::topo::PriorityMatrix;
    /// let m = PriorityMatrix::parse(r#"{"cpu:0": [["mlx5_0"], ["mlx5_1"]]}"#).unwrap();
    /// assert_eq!(m.for_cpu_node(0).unwrap().preferred, ["mlx5_0"]);
    /// let err = PriorityMatrix::parse(r#"{"cpu:0": [["mlx5_0"]]}"#).unwrap_err();
    /// assert!(err.to_string().contains("exactly two arrays"));
    /// ```
    pub fn parse(text: &str) -> Result<Self, MatrixFault> {
        if text.trim().is_empty() {
            return Err(MatrixFault::Empty);
        }
        let value: Value = serde_json::from_str(text).map_err(|e| MatrixFault::Json(e.to_string()))?;
        if value.is_object() {
            // serde_json keeps the last of two equal keys; look for them first.
            let keys: KeyList = serde_json::from_str(text).map_err(|e| MatrixFault::Json(e.to_string()))?;
            let mut seen = BTreeSet::new();
            for key in &keys.0 {
                if !seen.insert(key.as_str()) {
                    return Err(MatrixFault::DuplicateKey(key.clone()));
                }
            }
        }
        Self::from_value(value)
    }

    /// Checks a matrix already parsed as JSON (a segment descriptor's
    /// `priority_matrix`), with the rules of [`PriorityMatrix::parse`].
    pub fn from_value(value: Value) -> Result<Self, MatrixFault> {
        let Value::Object(object) = value else {
            return Err(MatrixFault::NotAnObject(kind_of(&value)));
        };
        if object.len() > KEYS_MAX {
            return Err(MatrixFault::TooManyKeys(object.len()));
        }
        let mut matrix = Self::new();
        for (key, value) in object {
            if !is_location(&key) {
                return Err(MatrixFault::UnknownKey(key));
            }
            let entry = parse_entry(&key, &value)?;
            matrix.insert(key, entry);
        }
        Ok(matrix)
    }

    /// Reads and parses a matrix file. The error names the file.
    pub fn load(path: &Path) -> Result<Self, TopoError> {
        let fail = |fault| TopoError::CustomMatrix { path: path.to_path_buf(), fault };
        let meta = std::fs::metadata(path).map_err(|e| fail(MatrixFault::Unreadable(e.to_string())))?;
        if meta.is_dir() {
            return Err(fail(MatrixFault::Unreadable("it is a directory".into())));
        }
        if meta.len() > FILE_BYTES_MAX {
            return Err(fail(MatrixFault::TooLarge(meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(MatrixFault::Unreadable(e.to_string())))?;
        Self::parse(&text).map_err(fail)
    }

    /// Loads the file `MC_CUSTOM_TOPO_JSON` names, if the variable is set and
    /// not empty (Mooncake's topology dump sets it empty to force discovery).
    pub fn from_env() -> Result<Option<(PathBuf, Self)>, TopoError> {
        let s = crate::config::Settings::from_env().map_err(|e| TopoError::Plan(e.to_string()))?;
        Self::from_settings(&s)
    }

    /// Loads the file `s.custom_topo_json` names, if any.
    pub fn from_settings(s: &crate::config::Settings) -> Result<Option<(PathBuf, Self)>, TopoError> {
        match &s.custom_topo_json {
            Some(path) => Ok(Some((path.clone(), Self::load(path)?))),
            None => Ok(None),
        }
    }

    /// The matrix as a JSON value (keys in byte order, as jsoncpp writes a
    /// `std::map`).
    pub fn to_value(&self) -> Value {
        let list = |names: &[String]| Value::Array(names.iter().cloned().map(Value::String).collect());
        Value::Object(
            self.entries
                .iter()
                .map(|(k, e)| (k.clone(), Value::Array(vec![list(&e.preferred), list(&e.available)])))
                .collect(),
        )
    }

    /// Writes the matrix as JSON, one location per line, in natural key
    /// order. The text parses back to an equal matrix, with Mooncake and here.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (key, entry)) in self.entries().into_iter().enumerate() {
            out.push_str(if i == 0 { "\n  " } else { ",\n  " });
            out.push_str(&json_string(key));
            out.push_str(": [");
            out.push_str(&json_list(&entry.preferred));
            out.push_str(", ");
            out.push_str(&json_list(&entry.available));
            out.push(']');
        }
        out.push_str(if self.entries.is_empty() { "}" } else { "\n}" });
        out
    }
}

fn names(nics: &[&&super::Nic]) -> Vec<String> {
    nics.iter().map(|n| n.name.clone()).collect()
}

/// Path components from each device up to their common ancestor, added up.
/// A GPU and a NIC behind the same PCIe switch are closer than a pair that
/// meets only at the root complex.
fn pcie_distance(a: &Path, b: &Path) -> usize {
    let (ac, bc): (Vec<_>, Vec<_>) = (a.components().collect(), b.components().collect());
    let common = ac.iter().zip(&bc).take_while(|(x, y)| x == y).count();
    (ac.len() - common) + (bc.len() - common)
}

fn is_location(key: &str) -> bool {
    if key == "*" {
        return true;
    }
    let Some((prefix, index)) = key.split_once(':') else {
        return false;
    };
    LOCATION_PREFIXES.contains(&prefix)
        && !index.is_empty()
        && index.len() <= 5
        && index.bytes().all(|b| b.is_ascii_digit())
        && index.parse::<u32>().is_ok_and(|i| i <= u32::from(u16::MAX))
}

fn parse_entry(key: &str, value: &Value) -> Result<MatrixEntry, MatrixFault> {
    let shape = |found: String| MatrixFault::BadShape { key: key.to_string(), found };
    let Value::Array(lists) = value else {
        return Err(shape(format!("found {}", kind_of(value))));
    };
    if lists.len() != 2 {
        return Err(shape(format!("found an array of {} elements", lists.len())));
    }
    let mut seen = BTreeSet::new();
    let mut parsed = Vec::with_capacity(2);
    for (which, list) in ["preferred", "available"].iter().zip(lists) {
        let Value::Array(items) = list else {
            return Err(shape(format!("its {which} list is {}", kind_of(list))));
        };
        if items.len() > NAMES_PER_LIST_MAX {
            return Err(MatrixFault::BadName {
                key: key.to_string(),
                fault: format!("its {which} list has {} names, above the limit of {NAMES_PER_LIST_MAX}", items.len()),
            });
        }
        let mut names = Vec::with_capacity(items.len());
        for item in items {
            let name = check_name(item).map_err(|fault| MatrixFault::BadName {
                key: key.to_string(),
                fault: format!("in its {which} list, {fault}"),
            })?;
            if !seen.insert(name.clone()) {
                return Err(MatrixFault::DuplicateName { key: key.to_string(), name });
            }
            names.push(name);
        }
        parsed.push(names);
    }
    let available = parsed.pop().unwrap_or_default();
    let preferred = parsed.pop().unwrap_or_default();
    Ok(MatrixEntry { preferred, available })
}

fn check_name(item: &Value) -> Result<String, String> {
    let Value::String(name) = item else {
        return Err(format!("a device name must be a string, found {}", kind_of(item)));
    };
    if name.is_empty() {
        return Err("a device name is empty".into());
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!("device name {name:?} is longer than {NAME_BYTES_MAX} bytes"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("device name {name:?} contains white space or control characters"));
    }
    Ok(name.clone())
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"))
}

fn json_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| json_string(n)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The keys of a JSON object in document order, duplicates kept.
struct KeyList(Vec<String>);

impl<'de> Deserialize<'de> for KeyList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyList, A::Error> {
                let mut keys = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(key);
                    if keys.len() > KEYS_MAX + 1 {
                        break;
                    }
                }
                Ok(KeyList(keys))
            }
        }
        deserializer.deserialize_map(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DGX_LIKE: &str = r#"{ "cpu:0":  [["mlx5_0","mlx5_1"], ["mlx5_2","mlx5_3"]],
  "cpu:1":  [["mlx5_2","mlx5_3"], ["mlx5_0","mlx5_1"]],
  "cuda:0": [["mlx5_0"],           ["mlx5_1","mlx5_2","mlx5_3"]] }"#;

    #[test]
    fn parses_mooncakes_example_and_round_trips() {
        let m = PriorityMatrix::parse(DGX_LIKE).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m.get("cuda:0").unwrap().preferred, vec!["mlx5_0"]);
        assert_eq!(m.for_cpu_node(1).unwrap().available, vec!["mlx5_0", "mlx5_1"]);
        assert_eq!(PriorityMatrix::parse(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn wildcard_applies_to_unlisted_nodes() {
        let m = PriorityMatrix::parse(r#"{"*": [["a"], []], "cpu:0": [[], ["a"]]}"#).unwrap();
        assert_eq!(m.for_cpu_node(0).unwrap().available, vec!["a"]);
        assert_eq!(m.for_cpu_node(7).unwrap().preferred, vec!["a"]);
    }

    #[test]
    fn empty_object_is_an_empty_matrix() {
        let m = PriorityMatrix::parse("{}").unwrap();
        assert!(m.is_empty());
        assert_eq!(m.to_json(), "{}");
    }

    #[test]
    fn every_fault_is_named() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("  \n", "empty"),
            ("{", "not valid JSON"),
            ("[[\"a\"],[]]", "not an array"),
            ("{\"cpu:0\": [[], []], \"cpu:0\": [[], []]}", "appears twice"),
            ("{\"gpu:0\": [[], []]}", "unknown location key \"gpu:0\""),
            ("{\"cpu\": [[], []]}", "unknown location key"),
            ("{\"cpu:x\": [[], []]}", "unknown location key"),
            ("{\"cpu:0\": [[]]}", "array of 1 elements"),
            ("{\"cpu:0\": [[], [], []]}", "array of 3 elements"),
            ("{\"cpu:0\": \"mlx5_0\"}", "found a string"),
            ("{\"cpu:0\": [\"mlx5_0\", []]}", "preferred list is a string"),
            ("{\"cpu:0\": [[], {}]}", "available list is an object"),
            ("{\"cpu:0\": [[1], []]}", "must be a string, found a number"),
            ("{\"cpu:0\": [[\"\"], []]}", "is empty"),
            ("{\"cpu:0\": [[\"a b\"], []]}", "white space"),
            ("{\"cpu:0\": [[\"a\"], [\"a\"]]}", "more than once"),
        ];
        for (text, expected) in cases {
            let err = PriorityMatrix::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?} gave {err:?}, wanted {expected:?}");
        }
    }

    #[test]
    fn location_keys() {
        for ok in ["*", "cpu:0", "cuda:7", "hip:1", "musa:0", "maca:2", "mlu:3", "cpu:65535"] {
            assert!(is_location(ok), "{ok}");
        }
        for bad in ["", "cpu:", "cpu:-1", "cpu:+1", "cpu:65536", "CPU:0", "cuda:0:1", "npu:0", "cpu: 0"] {
            assert!(!is_location(bad), "{bad}");
        }
    }

    #[test]
    fn pcie_distance_counts_hops_to_the_common_ancestor() {
        let gpu = Path::new("/sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:01.0/0000:18:00.0");
        let near = Path::new("/sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:19:00.0");
        let far = Path::new("/sys/devices/pci0000:9a/0000:9a:01.0/0000:9b:00.0");
        assert_eq!(pcie_distance(gpu, near), 4);
        assert!(pcie_distance(gpu, far) > pcie_distance(gpu, near));
    }
}
