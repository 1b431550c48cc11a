//! Tribunal's per-core shard: the deterministic, sans-IO core.
//!
//! Every module here is a pure state machine or pure function: no sockets, files,
//! clocks or executors (docs/design.md §5). The engine's IO shells drive them; the
//! [`simulator`] drives them in one thread for tests. See `ARCHITECTURE.md`.

pub mod arbiter;
pub mod digest;
pub mod domain;
pub mod envelope;
pub mod inventory;
pub mod ledger;
pub mod output;
pub mod prng;
pub mod recovery;
pub mod reference;
pub mod registrar;
pub mod router;
pub mod shard_core;
pub mod simulator;
pub mod snapshot_cadence;
pub mod usher;
pub mod warden;
