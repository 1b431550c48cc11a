//! Tribunal's load generator (spec: specs/loadgen.allium). The binary is `loadgen`
//! (src/main.rs); the modules are a library so the tests can reach the pure parts.

pub mod bulk;
pub mod chaos;
pub mod client;
pub mod cost;
pub mod ledger;
pub mod open_loop;
pub mod report;
pub mod requests;
pub mod run;
pub mod verify;
pub mod workload;

use std::path::Path;

use anyhow::Context;

/// Reads a JSON file another part of loadgen (or the engine) wrote; the error names the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not the JSON expected", path.display()))
}
