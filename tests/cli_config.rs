//! Bad environment values stop the CLI before it starts, with the message
//! `shardwire::config` gives (the same one `initialize` returns).

#[path = "interop/poll.rs"]
mod poll;

use std::process::Command;
use std::time::Duration;

/// Runs `shardwire <args>` with one variable set; it must fail at once.
fn refused(args: &[&str], var: &str, value: &str, expect: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .args(args)
        .env(var, value)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shardwire starts");
    let Some(status) = poll::exit_within(&mut child, Duration::from_secs(20)) else {
        let _ = child.kill();
        panic!("shardwire {args:?} with {var}={value:?} kept running");
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err).expect("stderr");
    assert_eq!(status.code(), Some(2), "{args:?} {var}={value:?}: {err}");
    let line = format!("shardwire: {var}={value:?} is not valid: expected {expect}");
    assert!(err.contains(&line), "{args:?}: {err:?} lacks {line:?}");
}

#[test]
fn bad_values_stop_every_command_with_the_variable_and_its_range() {
    refused(&["bench", "--duration=1"], "MC_TRANSFER_TIMEOUT", "abc", "a whole number of seconds in 1..=86400");
    refused(
        &["stream", "listen", "--listen=127.0.0.1:0", "--trname=t"],
        "SHARDWIRE_STREAM_RECV",
        "0",
        "a whole number of bytes in 4096..=67108864",
    );
    refused(&["topo"], "SHARDWIRE_CORES", "many", "a CPU list such as 0-3,8");
    refused(&["topo"], "MC_FORCE_TCP", "maybe", "a boolean: 1/0, true/false, t/f, yes/no or on/off");
    refused(&["topo"], "AIS_STREAM_BURST_NUM", "5000", "a whole number of objects in 1..=4096");
}
