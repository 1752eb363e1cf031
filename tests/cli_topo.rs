//! `shardwire topo`, run as a process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topo").join(name).join("sys")
}

fn topo(args: &[&str], custom: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardwire"));
    cmd.arg("topo").args(args).env_remove("SHARDWIRE_CORES");
    match custom {
        Some(path) => cmd.env("MC_CUSTOM_TOPO_JSON", path),
        None => cmd.env_remove("MC_CUSTOM_TOPO_JSON"),
    };
    cmd.output().expect("shardwire runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shardwire-cli-topo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn table_for_the_live_machine() {
    let o = topo(&[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for heading in ["CPUs:", "NUMA nodes", "NICs", "GPUs", "NIC priority matrix (discovered)", "Placement plan:"] {
        assert!(out.contains(heading), "missing {heading:?} in\n{out}");
    }
}

#[test]
fn table_for_a_fixture() {
    let root = fixture("dgx-h100");
    let o = topo(&["--sysfs-root", root.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("224 online"), "{out}");
    assert!(out.contains("Placement plan: 112 shards, CPUs from one per physical core"), "{out}");
    assert!(out.contains("cuda:7"), "{out}");
}

#[test]
fn json_is_the_mooncake_matrix_and_feeds_back_as_custom_topology() {
    let root = fixture("dgx-h100");
    let o = topo(&["--json", "--sysfs-root", root.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let value: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("valid JSON");
    let cpu1 = &value["cpu:1"];
    assert_eq!(cpu1[0], serde_json::json!(["mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7"]));
    assert_eq!(value.as_object().unwrap().len(), 10);

    // The printed matrix is a valid MC_CUSTOM_TOPO_JSON: feed it back in.
    let path = temp_file("roundtrip.json", &stdout(&o));
    let again = topo(&["--json", "--sysfs-root", fixture("this-vm").to_str().unwrap()], Some(&path));
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again), stdout(&o), "a custom matrix is printed as loaded");
    let table = topo(&["--sysfs-root", fixture("this-vm").to_str().unwrap()], Some(&path));
    assert!(stdout(&table).contains(&format!("NIC priority matrix ({})", path.display())));
}

#[test]
fn plan_json_carries_topology_and_plan() {
    let root = fixture("one-socket-2nic");
    let o = topo(&["--plan-json", "--sysfs-root", root.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["plan"]["shards"].as_array().unwrap().len(), 8);
    assert_eq!(v["topology"]["nics"][0]["name"], "mlx5_0");
}

#[test]
fn malformed_custom_topology_fails_and_names_the_file() {
    let cases = [
        ("bad-json.json", "{\"cpu:0\": [[\"mlx5_0\"], ", "not valid JSON"),
        ("wrong-shape.json", "{\"cpu:0\": [[\"mlx5_0\"]]}", "exactly two arrays"),
        ("not-object.json", "[[\"mlx5_0\"], []]", "must be a JSON object"),
        ("unknown-key.json", "{\"socket0\": [[], []]}", "unknown location key \"socket0\""),
        ("empty.json", "", "empty"),
        ("number-name.json", "{\"cpu:0\": [[7], []]}", "must be a string"),
    ];
    for (name, text, fault) in cases {
        let path = temp_file(name, text);
        for args in [&["--json"][..], &[][..]] {
            let o = topo(args, Some(&path));
            assert!(!o.status.success(), "{name} {args:?} should fail");
            let err = stderr(&o);
            assert!(err.contains(&path.display().to_string()), "{name}: {err}");
            assert!(err.contains("MC_CUSTOM_TOPO_JSON"), "{name}: {err}");
            assert!(err.contains(fault), "{name}: wanted {fault:?} in {err}");
            assert!(stdout(&o).is_empty(), "nothing printed on failure");
        }
    }
}

#[test]
fn missing_custom_topology_file_is_an_error() {
    let path = std::env::temp_dir().join("shardwire-no-such-topology.json");
    let o = topo(&["--json"], Some(&path));
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(&path.display().to_string()) && err.contains("cannot read"), "{err}");
}

#[test]
fn empty_variable_means_discover() {
    let o = topo(&["--json"], Some(Path::new("")));
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bad_sysfs_root_is_an_error() {
    let o = topo(&["--sysfs-root", "/nonexistent/sys"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/sys"));
}

#[test]
fn bad_shardwire_cores_is_an_error() {
    let o = Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(["topo", "--sysfs-root", fixture("this-vm").to_str().unwrap()])
        .env("SHARDWIRE_CORES", "0-9")
        .env_remove("MC_CUSTOM_TOPO_JSON")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SHARDWIRE_CORES lists CPU 2, which is not online"), "{}", stderr(&o));
}
