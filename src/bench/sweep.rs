//! `shardwire bench sweep`'s results: one point per engine, path,
//! operation and block size, in a JSON file that `shardwire bench plot`
//! (and `tools/bench-vs-mooncake --plot`) turns into an SVG.
//!
//! The file is the interface between whoever measures (the CLI's sweep, the
//! Python script that adds Mooncake and iperf3) and the one plotting
//! implementation (`super::plot`), so it is kept small and versioned:
//!
//! ```json
//! {"schema": "shardwire-bench-sweep/1", "title": "...", "command": "...", "date": "...",
//!  "points": [{"engine": "shardwire", "path": "tcp", "op": "write", "block_size": 65536,
//!              "gbps": 2.31, "p50_us": 812.0, "p99_us": 1650.2, "duration_s": 1.0}]}
//! ```

use serde::{Deserialize, Serialize};

/// The `schema` field of a sweep file.
pub const SCHEMA: &str = "shardwire-bench-sweep/1";

/// Most block sizes one sweep measures (each is a timed run per operation
/// and path).
pub const SIZES_MAX: usize = 32;

/// One measured point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Who moved the bytes: "shardwire", "mooncake", "iperf3", ...
    pub engine: String,
    /// How: "tcp", "local", "rdma-emu", ...
    pub path: String,
    /// "read" or "write".
    pub op: String,
    pub block_size: u64,
    /// 1e9 bytes per second.
    pub gbps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// Seconds the (median) run took.
    pub duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Every run's rate when the point is a median of several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs_gbps: Vec<f64>,
    /// A ceiling to compare against (iperf3), drawn dashed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ceiling: bool,
}

impl Point {
    /// The name of the line this point belongs to.
    pub fn series(&self) -> String {
        if self.path.is_empty() { self.engine.clone() } else { format!("{} {}", self.engine, self.path) }
    }
}

/// A whole sweep file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    pub schema: String,
    #[serde(default)]
    pub title: String,
    /// The command that measured it.
    #[serde(default)]
    pub command: String,
    /// When (UTC).
    #[serde(default)]
    pub date: String,
    pub points: Vec<Point>,
}

impl Sweep {
    pub fn new(title: &str, command: &str) -> Self {
        Self {
            schema: SCHEMA.to_string(),
            title: title.to_string(),
            command: command.to_string(),
            date: crate::engine::rpc::timestamp_now().chars().take(16).collect::<String>() + " UTC",
            points: Vec::new(),
        }
    }

    /// Reads a sweep file's text, checking its schema.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let sweep: Sweep = serde_json::from_str(text).map_err(|e| format!("not a sweep file: {e}"))?;
        if sweep.schema != SCHEMA {
            return Err(format!("schema {:?}: this build reads {SCHEMA:?}", sweep.schema));
        }
        if let Some(p) = sweep.points.iter().find(|p| p.block_size == 0 || !p.gbps.is_finite() || p.gbps < 0.0) {
            return Err(format!(
                "point {} {} {}: block size and rate must be positive",
                p.series(),
                p.op,
                p.block_size
            ));
        }
        Ok(sweep)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a sweep always serialises")
    }
}

/// 4 KiB to 16 MiB in powers of 4.
pub fn default_sizes() -> Vec<u64> {
    (0..7).map(|i| 4096u64 << (2 * i)).collect()
}

/// `4KiB,64KiB,1MiB` (or bytes) to sizes, in the order given, duplicates
/// dropped.
pub fn parse_sizes(text: &str) -> Result<Vec<u64>, String> {
    let mut sizes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let size = super::stream::parse_size(part)
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("--sizes: {part:?} is not a size (4096, 4KiB, 1MiB, ...)"))?;
        if !sizes.contains(&(size as u64)) {
            sizes.push(size as u64);
        }
    }
    if sizes.is_empty() {
        return Err("--sizes: no sizes given".into());
    }
    if sizes.len() > SIZES_MAX {
        return Err(format!("--sizes: {} sizes, at most {SIZES_MAX}", sizes.len()));
    }
    Ok(sizes)
}

/// `4 KiB`, `1 MiB`, `1536 B`: whole binary units where they fit.
pub fn size_label(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} B")
}

/// The middle value (the lower of the two middle ones for an even count);
/// 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[(v.len() - 1) / 2] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(default_sizes().first(), Some(&4096));
        assert_eq!(default_sizes().last(), Some(&(16 << 20)));
        assert_eq!(parse_sizes("4KiB, 64KiB,1MiB,4KiB").unwrap(), vec![4096, 65536, 1 << 20]);
        assert!(parse_sizes("4KiB,lots").is_err());
        assert!(parse_sizes("0").is_err());
        assert!(parse_sizes("").is_err());
        assert_eq!(size_label(4096), "4 KiB");
        assert_eq!(size_label(16 << 20), "16 MiB");
        assert_eq!(size_label(1536), "1536 B");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn a_sweep_round_trips_and_its_schema_is_checked() {
        let mut s = Sweep::new("t", "shardwire bench sweep");
        s.points.push(Point {
            engine: "shardwire".into(),
            path: "tcp".into(),
            op: "write".into(),
            block_size: 4096,
            gbps: 1.5,
            p50_us: Some(10.0),
            p99_us: None,
            duration_s: 1.0,
            batch_size: Some(32),
            threads: Some(2),
            runs_gbps: vec![],
            ceiling: false,
        });
        let back = Sweep::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        assert!(Sweep::from_json(&s.to_json().replace(SCHEMA, "other/9")).unwrap_err().contains("schema"));
        assert!(Sweep::from_json("{").is_err());
        assert!(Sweep::from_json(&s.to_json().replace("1.5", "-1.5")).is_err());
    }
}
