//! The seam between the engine and a business domain.
//!
//! The engine (Usher, router, Arbiter, Registrar, Ledger, Clerk) never looks inside a
//! command or an entity: it only asks the domain which entities a command touches,
//! which shard owns an entity, and what evaluating a command yields. A second domain
//! is added by implementing [`Domain`]; nothing in the engine changes.
//!
//! Everything here must be deterministic (docs/design.md §3): no clocks, no randomness, no
//! floats in state, no iteration over hash maps that can reach an output.

use std::fmt::Debug;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Version of the domain logic. Switched only by an `activate_version` command in the
/// log, so every instance switches at the same offset (spec: Versioning).
pub type Version = u32;

/// Stream time: the maximum log timestamp seen so far in a partition, in milliseconds.
/// Never wall-clock time.
pub type StreamTimeMs = u64;

/// A stable, machine-readable reason for a rejected command (`insufficient_stock`, ...).
pub type RejectCode = &'static str;

/// An entity state read back from disk that the domain could never have produced
/// (spec: Inventory.RestoredLevelRefused): the reason, for the recovery error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidState(pub String);

/// A command that breaks a bound checked before evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Stable, machine-readable code (`quantity_out_of_range`, ...). It becomes the reason of
    /// the `Malformed` output, so it never depends on the input's bytes.
    pub code: &'static str,
    /// For humans (logs, CLI); never part of an output.
    pub detail: String,
}

/// What evaluating one command decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The command applies; the evaluator's changes to the entity states stand.
    Accepted,
    /// The command is refused; the Arbiter discards every change the evaluator made.
    Rejected(RejectCode),
}

/// A business domain that Tribunal can run.
pub trait Domain: Sized + Debug + 'static {
    /// A decoded, validated command. It travels in the JSON envelope, so it is serde.
    type Command: Clone + Debug + PartialEq + Serialize + DeserializeOwned;
    /// Identity of one entity. `Ord` because anything that reaches an output is sorted.
    /// Serde so the Ledger can store it (postcard).
    type EntityKey: Clone + Debug + Eq + Hash + Ord + Serialize + DeserializeOwned;
    /// State of one entity. `Default` is the state of an entity never seen, and an entity
    /// whose state returns to the default is indistinguishable from an absent one.
    type State: Copy + Debug + Eq + Default + Serialize + DeserializeOwned;

    /// Versions of the domain logic this binary can evaluate, ascending.
    const SUPPORTED_VERSIONS: &'static [Version];
    /// Most entities one command may touch. Bounds every per-command buffer.
    const MAX_ENTITIES_PER_COMMAND: usize;

    /// Checks the bounds that do not depend on state. A failure makes the record a
    /// `Malformed` output before any entity is read (spec: Usher.MalformedRecordRejected),
    /// whose reason is the error's `code`.
    fn validate(command: &Self::Command) -> Result<(), Invalid>;

    /// Checks one entity state read back from disk (Ledger, snapshot) against the bounds
    /// that every state the domain produces holds. Recovery refuses a state that fails:
    /// it is corruption, and evaluating it could break the domain's arithmetic.
    fn validate_state(key: &Self::EntityKey, state: &Self::State) -> Result<(), InvalidState>;

    /// Appends the entities `command` touches, without duplicates, in a deterministic
    /// order. The evaluator sees their states in this order.
    fn entities(command: &Self::Command, out: &mut Vec<Self::EntityKey>);

    /// Hash of the entity's affinity key; `shard = affinity_hash % shard_count`.
    /// Must be stable across processes and platforms: the Ledger layout depends on it.
    fn affinity_hash(key: &Self::EntityKey) -> u64;

    /// Digest of the canonical form of a command. Two commands with the same meaning
    /// must have the same digest whatever JSON they arrived in; the Warden uses it to
    /// tell a replay from a conflicting reuse of a key.
    fn command_digest(command: &Self::Command) -> u64;

    /// Contribution of one entity to the state digest. Must be 0 for the default state,
    /// so that absent and zero entities are the same state.
    fn entity_digest(key: &Self::EntityKey, state: &Self::State) -> u128;

    /// Evaluates `command` under `version`. `states[i]` is the state of
    /// `entities(command)[i]`; the evaluator mutates it in place. On `Rejected` the
    /// caller throws the mutations away. `body` receives the canonical encoding of the
    /// domain part of the output (resulting states, emitted events, or why it was
    /// rejected) and is empty on entry.
    fn evaluate(
        version: Version,
        keys: &[Self::EntityKey],
        states: &mut [Self::State],
        command: &Self::Command,
        stream_time_ms: StreamTimeMs,
        body: &mut Vec<u8>,
    ) -> Decision;

    /// Whether this binary can evaluate `version`.
    fn supports(version: Version) -> bool {
        Self::SUPPORTED_VERSIONS.contains(&version)
    }
}
