//! CPU cache sizes, from `<root>/devices/system/cpu/cpu<N>/cache/index*/`.

use std::path::Path;

/// The size in bytes of CPU `cpu`'s level-2 cache (unified or data), if
/// sysfs says.
pub fn l2_bytes(root: &Path, cpu: u32) -> Option<u64> {
    let dir = root.join(format!("devices/system/cpu/cpu{cpu}/cache"));
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
        let level = read("level").and_then(|l| l.trim().parse::<u32>().ok());
        let kind = read("type").unwrap_or_default();
        if level == Some(2) && matches!(kind.trim(), "Unified" | "Data") {
            return read("size").and_then(|s| parse_size(s.trim()));
        }
    }
    None
}

/// `2048K`, `2M`, `512` (bytes).
fn parse_size(text: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.trim() {
        "" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("12X"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn reads_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("shardwire-cache-{}", std::process::id()));
        let l1 = root.join("devices/system/cpu/cpu3/cache/index0");
        let l2 = root.join("devices/system/cpu/cpu3/cache/index2");
        for (dir, level, kind, size) in [(&l1, "1", "Data", "48K"), (&l2, "2", "Unified", "1280K")] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(dir.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(dir.join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(l2_bytes(&root, 3), Some(1280 << 10));
        assert_eq!(l2_bytes(&root, 4), None, "no such CPU");
        let _ = std::fs::remove_dir_all(&root);
    }
}
