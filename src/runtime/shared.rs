//! The process-wide shard runtime that engines and streams share by
//! default: one shard per planned core, however many engines and streams
//! the process creates.

use std::sync::{Arc, Mutex, Weak};

use super::{Runtime, RuntimeConfig, StartError};
use crate::config::Settings;
use crate::topo::{self, Plan, PlanOptions, PriorityMatrix};

static SHARED: Mutex<Option<(u32, Weak<Runtime>)>> = Mutex::new(None);

/// The placement plan for this machine: sysfs topology, `MC_CUSTOM_TOPO_JSON`
/// and `SHARDWIRE_CORES`.
pub fn machine_plan(settings: &Settings) -> Result<Plan, StartError> {
    let config = |e: String| StartError::Config(e);
    let topology = topo::discover(std::path::Path::new("/sys")).map_err(|e| config(e.to_string()))?;
    let (matrix, from) = match PriorityMatrix::from_settings(settings).map_err(|e| config(e.to_string()))? {
        Some((path, m)) => (m, path.display().to_string()),
        None => (PriorityMatrix::discover(&topology), "discovered".to_string()),
    };
    let options = PlanOptions::from_settings(settings);
    Plan::derive(&topology, &matrix, &from, &options).map_err(|e| config(e.to_string()))
}

/// The shared runtime, started on first use (and again in a forked child,
/// which inherits no threads).
pub fn shared_runtime() -> Result<Arc<Runtime>, StartError> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if let Some((owner, weak)) = shared.as_ref()
        && *owner == pid
        && let Some(rt) = weak.upgrade()
    {
        return Ok(rt);
    }
    let settings = Settings::from_env().map_err(|e| StartError::Config(e.to_string()))?;
    let plan = machine_plan(&settings)?;
    let config = RuntimeConfig::from_plan(&plan).apply_settings(&settings);
    let rt = Arc::new(Runtime::start(config)?);
    *shared = Some((pid, Arc::downgrade(&rt)));
    Ok(rt)
}
