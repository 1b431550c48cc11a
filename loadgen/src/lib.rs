//! Tribunal's load generator (spec: specs/loadgen.allium). The binary is `loadgen`
//! (src/main.rs); the modules are a library so the tests can reach the pure parts.

pub mod bulk;
pub mod chaos;
pub mod client;
pub mod ledger;
pub mod report;
pub mod run;
pub mod verify;
pub mod workload;
