//! How a command reports that it failed: one sentence on stderr for
//! people (`shardwire: <what failed>: <why>`) and, when the command was
//! given `--json`, `{"error": {"code": ..., "message": ...}}` on stdout for
//! tools. The sentence is the library error's `Display`; the code is a
//! stable word (`usage`, `config`, a Mooncake code's name such as
//! `socket`, a stream error's kind such as `rejected`, ...).

use std::process::ExitCode;

use shardwire::bench::BenchError;
use shardwire::config::ConfigError;
use shardwire::engine::TeError;
use shardwire::stream::StreamError;
use shardwire::topo::TopoError;

/// A command's failure.
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
    /// 2 for a command that could not start as given (flags, environment),
    /// 1 for one that failed while running.
    pub exit: u8,
    /// The command put the error in its own JSON result already.
    json_printed: bool,
}

impl Failure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), exit: 1, json_printed: false }
    }

    /// A flag or argument that cannot work: exits 2, as clap does.
    pub fn usage(message: impl Into<String>) -> Self {
        Self { code: "usage", message: message.into(), exit: 2, json_printed: false }
    }

    /// The command printed its JSON result with this error in it.
    pub fn json_printed(mut self) -> Self {
        self.json_printed = true;
        self
    }

    fn exiting(mut self, exit: u8) -> Self {
        self.exit = exit;
        self
    }

    /// Puts what was being done in front of the reason.
    pub fn context(mut self, what: impl std::fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The JSON form, `{"error": {"code": ..., "message": ...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        error_json(self.code, &self.message)
    }

    /// Says it (stderr; stdout too with `json`) and gives the exit code.
    pub fn report(&self, json: bool) -> ExitCode {
        eprintln!("shardwire: {}", self.message);
        if json && !self.json_printed {
            println!("{}", self.to_json());
        }
        ExitCode::from(self.exit)
    }
}

/// `{"error": {"code": code, "message": message}}`.
pub fn error_json(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "code": code, "message": message } })
}

impl From<TeError> for Failure {
    fn from(e: TeError) -> Self {
        Self::new(e.code_name(), e.to_string())
    }
}

impl From<StreamError> for Failure {
    fn from(e: StreamError) -> Self {
        let exit = if matches!(e, StreamError::Config(_) | StreamError::InvalidArgument(_)) { 2 } else { 1 };
        Self::new(e.code(), e.to_string()).exiting(exit)
    }
}

impl From<BenchError> for Failure {
    fn from(e: BenchError) -> Self {
        let exit = if e.code == "invalid_argument" { 2 } else { 1 };
        Self::new(e.code, e.message).exiting(exit)
    }
}

impl From<TopoError> for Failure {
    fn from(e: TopoError) -> Self {
        Self::new("topology", e.to_string())
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::new("config", e.to_string()).exiting(2)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        Self::new("internal", format!("cannot write the report as JSON: {e}"))
    }
}

/// A flag clap refused, as one line: clap's own message without its
/// `error: ` prefix and the `--help` hint.
pub fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let mut lines = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("For more information") || line.starts_with("Usage:") {
            break;
        }
        lines.push(line.strip_prefix("error: ").unwrap_or(line).to_string());
    }
    lines.join(" ")
}
