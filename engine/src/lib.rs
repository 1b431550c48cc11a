//! Tribunal's engine: the IO shells around the sans-IO cores of `tribunal-shards` and
//! `tribunal-federation`, and the `tribunal` command line. A library, so tests can run
//! it in-process; `main.rs` only calls [`cli::main`]. The code map is ARCHITECTURE.md.
//!
//! Modules, from the top down (each uses only those below it):
//! - [`cli`]: the commands;
//! - [`node`]: one running instance: open, recover, wire, start, supervise;
//! - [`gateway`]: the REST API;
//! - [`status`]: an instance's status, typed (`status.json`, `/v1/cluster`);
//! - [`clerk`]: the Clerk's IO shell and the peer links;
//! - [`publish`]: where certified outputs go;
//! - [`log`]: the input logs (local and Kafka) and the Gateway's appender;
//! - [`storage`]: the data directory: Ledger segments, snapshots, checkpoint, quarantine.

pub mod clerk;
pub mod cli;
pub mod gateway;
pub mod log;
pub mod node;
pub mod pacing;
pub mod publish;
pub mod status;
pub mod storage;
