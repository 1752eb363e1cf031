//! The layers look only down (the crate root's essay has the picture): a
//! module may name another only if that one sits at its level or below.
//! Library code never names `bench`; only the CLI does.

use std::path::{Path, PathBuf};

/// Each top-level module's level, lowest first.
const LEVELS: &[(&str, u8)] = &[
    ("error", 0),
    ("config", 0),
    ("topo", 0),
    ("http", 0),
    ("telemetry", 0),
    ("sync", 0),
    ("entropy", 0),
    ("liveness", 0),
    ("mem", 1),
    ("runtime", 1),
    ("proto", 2),
    ("meta", 3),
    ("transport", 4),
    ("stream", 5),
    ("engine", 6),
    ("python", 7),
    ("bench", 7),
];

fn level(module: &str) -> Option<u8> {
    LEVELS.iter().find(|(m, _)| *m == module).map(|&(_, l)| l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_looks_only_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if first == "bin" || first == "lib" {
            continue;
        }
        let own = level(&first).unwrap_or_else(|| panic!("src/{first} has no level in LEVELS"));
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + 7..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let Some(theirs) = level(&name) else { continue };
                if name == "bench" && first != "bench" {
                    wrong.push(format!("{}:{}: library code names bench", rel.display(), n + 1));
                } else if theirs > own {
                    wrong.push(format!(
                        "{}:{}: {first} (level {own}) names {name} (level {theirs})",
                        rel.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}
