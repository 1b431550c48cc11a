//! loadgen's own record of what the cluster answered, and the stock it read back.
//!
//! Both are plain data, saved as JSON next to the report, so `loadgen verify` can re-check
//! a run offline (and a doctored table can be fed to it: spec Loadgen.ExitNonZeroOnViolation).

use serde::{Deserialize, Serialize};
use tribunal_shards::inventory::InventoryCommand;

/// What the cluster decided for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Accepted,
    Rejected,
}

/// One final answer (200, 422, 409 or 400) to one submission of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerRecord {
    pub http_status: u16,
    pub partition: u32,
    /// The offset of the command's *original* record: for a replay whose original the
    /// instance still held, the offset of that original.
    pub offset: u64,
    /// None when the answer could not say (a 409/400, or a replay whose original the
    /// instance had evicted from its answer store: `verdict: "replay"`).
    pub decision: Option<Decision>,
    /// The rule's code of a 422 (`insufficient_stock`, ...).
    pub code: Option<String>,
    pub replayed: bool,
    /// xxh3-128 of the certified output (hex); a replay carries the original's.
    pub digest: String,
}

/// A command loadgen submitted, with every final answer it got for its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub key: String,
    pub command: InventoryCommand,
    /// The answer to the first submission (after its retries).
    pub answer: AnswerRecord,
    /// Answers to later submissions of the same key and body (spec: Loadgen.UniqueKeys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<AnswerRecord>,
}

/// A command that never got a final answer before the drain deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unresolved {
    pub key: String,
    pub command: InventoryCommand,
    pub last_error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Every name (warehouse, SKU) of the run starts with it (`lg1a2b3c4d-`, separator
    /// included), so the run's stock starts empty.
    pub run_prefix: String,
    pub entries: Vec<LedgerEntry>,
    #[serde(default)]
    pub unresolved: Vec<Unresolved>,
    /// Answers that were not what the API promises: an unreadable body, a verdict that does
    /// not fit the status, or a replay on a key's very first submission (the key existed
    /// before the run, so the command was never applied by it).
    #[serde(default)]
    pub bad_answers: Vec<String>,
}

/// One stock level as read through `GET /v1/stock?sku=`. Signed, so a doctored or broken
/// table with a negative level parses and is reported rather than refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StockRow {
    pub warehouse: String,
    pub sku: String,
    pub qty: i64,
}

/// One instance's certified stock of one partition, for every SKU of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockTable {
    /// The instance's base URL.
    pub instance: String,
    pub partition: u32,
    /// The lowest `certified_watermark` among the reads that made the table.
    pub certified_watermark: Option<u64>,
    pub levels: Vec<StockRow>,
}
