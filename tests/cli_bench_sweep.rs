//! `shardwire bench sweep` as a user runs it: real target and initiator
//! processes on loopback, then its JSON and SVG checked, and `bench plot`
//! redrawing the JSON. No timing thresholds; every wait bounded.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let start = Instant::now();
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: signals the child this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("no exit within {:?} (started {:?} ago)", limit, start.elapsed());
        }
    }
}

#[test]
fn a_small_sweep_writes_every_point_and_the_plot() {
    let dir = std::env::temp_dir().join(format!("shardwire-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg, svg2) = (dir.join("s.json"), dir.join("s.svg"), dir.join("p.svg"));
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_shardwire")).args([
            "bench",
            "sweep",
            "--sizes",
            "4KiB,64KiB",
            "--duration",
            "0.2",
            "--paths",
            "tcp,local",
            "--buffer_size",
            "16777216",
            "--json-out",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ]),
        Duration::from_secs(240),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not a terminal: plain progress lines.
    assert!(stderr.contains("sweep: 8/8 "), "{stderr}");

    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["schema"], "shardwire-bench-sweep/1");
    let points = doc["points"].as_array().unwrap();
    assert_eq!(points.len(), 8, "{points:?}");
    for path in ["tcp", "local"] {
        for op in ["write", "read"] {
            for size in [4096, 65536] {
                let p = points
                    .iter()
                    .find(|p| p["path"] == path && p["op"] == op && p["block_size"] == size)
                    .unwrap_or_else(|| panic!("no {path} {op} {size} point"));
                assert_eq!(p["engine"], "shardwire");
                assert!(p["gbps"].as_f64().unwrap() > 0.0, "{p}");
                assert!(p["duration_s"].as_f64().unwrap() > 0.0, "{p}");
                assert!(p["p50_us"].as_f64().unwrap() > 0.0, "{p}");
            }
        }
    }

    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    for s in ["shardwire tcp", "shardwire local", "writes", "reads", "GB/s", "4 KiB", "64 KiB"] {
        assert!(text.contains(s), "no {s:?} in the SVG");
    }

    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_shardwire")).args([
            "bench",
            "plot",
            "--json-in",
            json.to_str().unwrap(),
            "--svg",
            svg2.to_str().unwrap(),
            "--title",
            "redrawn",
        ]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&svg2).unwrap();
    assert!(text.contains("redrawn") && text.contains("shardwire local"));
    let _ = std::fs::remove_dir_all(&dir);
}
