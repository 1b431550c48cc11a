//! The verifier: proves a run's answers right from loadgen's ledger and the stock tables it
//! read back from every instance (spec: specs/loadgen.allium, "Rules: verification").
//!
//! It is a pure function of (ledger, tables): no IO and no clock, so `loadgen verify` can
//! re-check saved files and a doctored table must fail (spec: Loadgen.ExitNonZeroOnViolation).
//! The input may be hand-edited JSON, so nothing here panics on it: levels are `i128` (a
//! wrongly accepted command may drive a replayed level below zero or past `MAX_STOCK`, and
//! that must be reported, not wrap), sums saturate, and every map is a `BTreeMap` so the
//! same files give the same report, example for example.
//!
//! Each check is always present in [`Verification::checks`], in a fixed order:
//! `exactly_once`, `decisions_serializable`, `totals`, `conservation_per_sku`,
//! `non_negative`, `instances_identical`, `unresolved`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use tribunal_shards::inventory::{reject, InventoryCommand, MAX_STOCK};

use crate::ledger::{AnswerRecord, Decision, Ledger, LedgerEntry, StockRow, StockTable};

/// Examples kept per check: enough to start debugging, bounded so a run with millions of
/// violations still has a small report.
pub const MAX_EXAMPLES: usize = 10;

const EXACTLY_ONCE: &str = "exactly_once";
const DECISIONS_SERIALIZABLE: &str = "decisions_serializable";
const TOTALS: &str = "totals";
const CONSERVATION_PER_SKU: &str = "conservation_per_sku";
const NON_NEGATIVE: &str = "non_negative";
const INSTANCES_IDENTICAL: &str = "instances_identical";
const UNRESOLVED: &str = "unresolved";
const ANSWERS_WELL_FORMED: &str = "answers_well_formed";

const HTTP_OK: u16 = 200;
const HTTP_UNPROCESSABLE: u16 = 422;
const HTTP_CONFLICT: u16 = 409;
const HTTP_BAD_REQUEST: u16 = 400;

/// The outcome of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// One of `exactly_once`, `decisions_serializable`, `totals`, `conservation_per_sku`,
    /// `non_negative`, `instances_identical`, `unresolved`.
    pub name: &'static str,
    pub ok: bool,
    /// How many violations of this check.
    pub failures: u64,
    /// Human-readable, at most [`MAX_EXAMPLES`].
    pub examples: Vec<String>,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self { name, ok: true, failures: 0, examples: Vec::new() }
    }

    /// Counts one violation. The example is a closure so that past [`MAX_EXAMPLES`] a
    /// violation costs a counter increment, not a `format!`.
    fn fail(&mut self, example: impl FnOnce() -> String) {
        self.ok = false;
        self.failures = self.failures.saturating_add(1);
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }
}

/// Every check of a run, in the fixed order of the module documentation.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub checks: Vec<Check>,
}

impl Verification {
    /// True iff every check passed (spec: Loadgen.ExitNonZeroOnViolation).
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|check| check.ok)
    }

    /// The checks that failed, in order.
    pub fn failed(&self) -> impl Iterator<Item = &Check> + '_ {
        self.checks.iter().filter(|check| !check.ok)
    }
}

/// Checks a run's ledger against the stock tables read from every instance. Pure: no IO.
pub fn verify(ledger: &Ledger, tables: &[StockTable]) -> Verification {
    let (decisions, replays) = replay_partitions(ledger);
    let highest = highest_answered_offsets(ledger);
    Verification {
        checks: vec![
            check_exactly_once(ledger),
            decisions,
            check_totals(ledger, tables, &replays, &highest),
            check_conservation(ledger, tables, &replays),
            check_non_negative(tables),
            check_instances_identical(ledger, tables),
            check_unresolved(ledger),
            check_answers_well_formed(ledger),
        ],
    }
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// Whether the answer is a decision the log holds (200 accepted or replayed, 422 rejected).
/// A 409 or 400 names no command of ours in the log, so it takes no part in the offset
/// bookkeeping or the replay; ExactlyOnce reports it instead.
fn is_decided(answer: &AnswerRecord) -> bool {
    matches!(answer.http_status, HTTP_OK | HTTP_UNPROCESSABLE)
}

/// Every final answer to the entry's key: the first submission's, then the duplicates'.
fn answers(entry: &LedgerEntry) -> impl Iterator<Item = &AnswerRecord> {
    std::iter::once(&entry.answer).chain(entry.duplicates.iter())
}

/// The key's decision and reject code, from the first decided answer that carries one. An
/// evicted replay carries none; a later duplicate may still hold the original's.
fn answered_decision(entry: &LedgerEntry) -> Option<(Decision, Option<&str>)> {
    answers(entry)
        .filter(|answer| is_decided(answer))
        .find_map(|answer| answer.decision.map(|decision| (decision, answer.code.as_deref())))
}

fn decision_name(decision: Decision) -> &'static str {
    match decision {
        Decision::Accepted => "accepted",
        Decision::Rejected => "rejected",
    }
}

// ---------------------------------------------------------------------------------------
// ExactlyOnce
// ---------------------------------------------------------------------------------------

// spec: Loadgen.ExactlyOnce — one (partition, offset) and one decision per key, one key per
// offset, duplicates answered as replays of the original. With TotalsMatchLedger this proves
// each acknowledged command took effect once.
fn check_exactly_once(ledger: &Ledger) -> Check {
    let mut check = Check::new(EXACTLY_ONCE);
    let mut keys: BTreeSet<&str> = BTreeSet::new();
    let mut offsets: BTreeMap<(u32, u64), &str> = BTreeMap::new();
    for entry in &ledger.entries {
        check_statuses(&mut check, entry);
        check_answers_agree(&mut check, entry);
        if !keys.insert(&entry.key) {
            // The ledger folds every submission of a key into one entry.
            check.fail(|| format!("key {} has more than one ledger entry", entry.key));
        }
        if is_decided(&entry.answer) {
            let at = (entry.answer.partition, entry.answer.offset);
            match offsets.get(&at) {
                None => {
                    offsets.insert(at, &entry.key);
                }
                Some(other) if *other != entry.key => {
                    check.fail(|| format!("keys {other} and {} share partition {} offset {}", entry.key, at.0, at.1))
                }
                Some(_) => {}
            }
        }
    }
    check
}

/// A 409 means a key was reused with another body and a 400 an invalid command: loadgen
/// does neither, so either one says the cluster mixed keys up (or the ledger is broken).
fn check_statuses(check: &mut Check, entry: &LedgerEntry) {
    for answer in answers(entry) {
        match answer.http_status {
            HTTP_OK | HTTP_UNPROCESSABLE => {}
            HTTP_CONFLICT => check.fail(|| {
                format!("key {} answered 409 (key reused with another body): loadgen never reuses a key", entry.key)
            }),
            HTTP_BAD_REQUEST => check.fail(|| {
                format!("key {} answered 400 (invalid command): loadgen only sends valid commands", entry.key)
            }),
            status => check.fail(|| format!("key {} has a final answer with unexpected status {status}", entry.key)),
        }
    }
}

/// Every decided answer of a key must agree with the first one. Digests are compared only
/// between answers that carry a decision: an evicted replay answers with the replay
/// output's own digest, not the original's.
fn check_answers_agree(check: &mut Check, entry: &LedgerEntry) {
    let reference = &entry.answer;
    let decision = answered_decision(entry).map(|(decision, _)| decision);
    let digest = answers(entry)
        .filter(|answer| is_decided(answer) && answer.decision.is_some() && !answer.digest.is_empty())
        .map(|answer| answer.digest.as_str())
        .next();
    for (i, duplicate) in entry.duplicates.iter().enumerate() {
        if !duplicate.replayed {
            check.fail(|| format!("key {} duplicate #{i} was not answered replayed: true", entry.key));
        }
        if (duplicate.partition, duplicate.offset) != (reference.partition, reference.offset) {
            check.fail(|| {
                format!(
                    "key {} duplicate #{i} names partition {} offset {}, the first answer partition {} offset {}",
                    entry.key, duplicate.partition, duplicate.offset, reference.partition, reference.offset
                )
            });
        }
    }
    for (i, answer) in answers(entry).enumerate().filter(|(_, answer)| is_decided(answer)) {
        if let (Some(expected), Some(got)) = (decision, answer.decision) {
            if expected != got {
                check.fail(|| {
                    format!(
                        "key {} answer #{i} is {}, an earlier one {}",
                        entry.key,
                        decision_name(got),
                        decision_name(expected)
                    )
                });
            }
        }
        if let Some(expected) = digest {
            if answer.decision.is_some() && !answer.digest.is_empty() && answer.digest != expected {
                check.fail(|| {
                    format!("key {} answer #{i} has digest {}, an earlier one {expected}", entry.key, answer.digest)
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The model of the Inventory rules
// ---------------------------------------------------------------------------------------

/// A decision with the rule's code, as the model (or the engine) makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Rejected(&'static str),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Accepted => f.write_str("accepted"),
            Outcome::Rejected(code) => write!(f, "rejected ({code})"),
        }
    }
}

/// Levels by (warehouse, SKU), as a table lists them.
type FlatLevels<'a> = BTreeMap<(&'a str, &'a str), i128>;

/// Stock levels of one partition, warehouse then SKU; an absent level is 0. Borrows the
/// names from the ledger, so a replay of millions of commands allocates per name, not per
/// command. Signed and wide: see the module documentation.
#[derive(Debug, Default)]
struct Levels<'a> {
    by_warehouse: BTreeMap<&'a str, BTreeMap<&'a str, i128>>,
}

impl<'a> Levels<'a> {
    fn get(&self, warehouse: &str, sku: &str) -> i128 {
        self.by_warehouse.get(warehouse).and_then(|skus| skus.get(sku)).copied().unwrap_or(0)
    }

    fn add(&mut self, warehouse: &'a str, sku: &'a str, delta: i128) {
        let level = self.by_warehouse.entry(warehouse).or_default().entry(sku).or_insert(0);
        *level = level.saturating_add(delta);
    }

    /// The non-zero levels, flat: what a table must hold (a zero row equals an absent one).
    fn nonzero(&self) -> FlatLevels<'a> {
        let mut flat = BTreeMap::new();
        for (warehouse, skus) in &self.by_warehouse {
            for (sku, qty) in skus.iter().filter(|(_, qty)| **qty != 0) {
                flat.insert((*warehouse, *sku), *qty);
            }
        }
        flat
    }

    /// The Inventory rules (`Inventory::decide`), checked in the engine's order so the
    /// reject code matches too: a transfer within one warehouse, then the stock, then the
    /// `MAX_STOCK` ceiling.
    fn decide(&self, command: &InventoryCommand) -> Outcome {
        let max = i128::from(MAX_STOCK);
        match command {
            InventoryCommand::Transfer { sku, from_warehouse, to_warehouse, qty } => {
                if from_warehouse == to_warehouse {
                    return Outcome::Rejected(reject::SAME_WAREHOUSE);
                }
                if !covers(self.get(from_warehouse, sku), u128::from(*qty)) {
                    return Outcome::Rejected(reject::INSUFFICIENT_STOCK);
                }
                if self.get(to_warehouse, sku).saturating_add(i128::from(*qty)) > max {
                    return Outcome::Rejected(reject::STOCK_OVERFLOW);
                }
            }
            InventoryCommand::Adjust { sku, warehouse, delta, .. } => {
                let next = self.get(warehouse, sku).saturating_add(i128::from(*delta));
                if next < 0 {
                    return Outcome::Rejected(reject::INSUFFICIENT_STOCK);
                }
                if next > max {
                    return Outcome::Rejected(reject::STOCK_OVERFLOW);
                }
            }
            InventoryCommand::AssembleKit { warehouse, kit_sku, qty, components } => {
                // Every component is checked before the kit's ceiling, as the engine does.
                for component in components {
                    let need = u128::from(*qty) * u128::from(component.qty_per_kit);
                    if !covers(self.get(warehouse, &component.sku), need) {
                        return Outcome::Rejected(reject::INSUFFICIENT_STOCK);
                    }
                }
                if self.get(warehouse, kit_sku).saturating_add(i128::from(*qty)) > max {
                    return Outcome::Rejected(reject::STOCK_OVERFLOW);
                }
            }
        }
        Outcome::Accepted
    }

    /// Applies an accepted command whatever the levels: the ledger side of the replay
    /// applies what the cluster answered, even where the rules say it should not have.
    fn apply(&mut self, command: &'a InventoryCommand) {
        match command {
            InventoryCommand::Transfer { sku, from_warehouse, to_warehouse, qty } => {
                self.add(from_warehouse, sku, -i128::from(*qty));
                self.add(to_warehouse, sku, i128::from(*qty));
            }
            InventoryCommand::Adjust { sku, warehouse, delta, .. } => self.add(warehouse, sku, i128::from(*delta)),
            InventoryCommand::AssembleKit { warehouse, kit_sku, qty, components } => {
                for component in components {
                    self.add(warehouse, &component.sku, -units(*qty, component.qty_per_kit));
                }
                self.add(warehouse, kit_sku, i128::from(*qty));
            }
        }
    }
}

/// Whether a level holds `need` units. A negative level (only reachable on the ledger side
/// of a broken run) holds nothing.
fn covers(level: i128, need: u128) -> bool {
    u128::try_from(level).is_ok_and(|level| level >= need)
}

/// `qty * qty_per_kit`, exact for any valid command and saturated for a doctored one.
fn units(qty: u64, qty_per_kit: u64) -> i128 {
    i128::try_from(u128::from(qty) * u128::from(qty_per_kit)).unwrap_or(i128::MAX)
}

/// The model's decision for a command. `reason_required` depends on the active version,
/// which the ledger does not record: when the cluster rejected an adjustment without a
/// reason for that, the model takes it as its own rejection rather than guess the version.
fn model_outcome(
    levels: &Levels<'_>,
    command: &InventoryCommand,
    answered: Option<(Decision, Option<&str>)>,
) -> Outcome {
    if let InventoryCommand::Adjust { reason, .. } = command {
        if reason.is_empty() && answered == Some((Decision::Rejected, Some(reject::REASON_REQUIRED))) {
            return Outcome::Rejected(reject::REASON_REQUIRED);
        }
    }
    levels.decide(command)
}

/// Whether an answered decision is the model's: accepted iff the model accepts; a rejection
/// with a code must carry the model's code, one without a code (none should) any code.
fn agrees(decision: Decision, code: Option<&str>, model: Outcome) -> bool {
    match (decision, model) {
        (Decision::Accepted, Outcome::Accepted) => true,
        (Decision::Rejected, Outcome::Rejected(expected)) => code.is_none_or(|code| code == expected),
        _ => false,
    }
}

fn answered_name(decision: Decision, code: Option<&str>) -> String {
    match (decision, code) {
        (Decision::Rejected, Some(code)) => format!("rejected ({code})"),
        _ => decision_name(decision).to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// DecisionsSerializable: the replay
// ---------------------------------------------------------------------------------------

/// One partition replayed in offset order. Two state machines run side by side:
/// - `model` applies its own decisions: an independent serial history from empty stock,
///   against which every answered decision is checked (DecisionsSerializable);
/// - `ledger` applies the *answered* decisions (the rules' own, on its levels, where the
///   answer has none): what the cluster says happened, which the tables must show
///   (TotalsMatchLedger, ConservationPerSku).
///
/// In a correct run they are the same; once an answer disagrees they part, and a single
/// wrong decision is reported once rather than cascading into later ones.
#[derive(Debug, Default)]
struct PartitionReplay<'a> {
    model: Levels<'a>,
    ledger: Levels<'a>,
    /// Units created per SKU by the accepted adjustments and kits (transfers create none).
    created: BTreeMap<&'a str, i128>,
    /// Commands accepted on the ledger side.
    accepted: u64,
}

impl<'a> PartitionReplay<'a> {
    // spec: Loadgen.DecisionsSerializable
    fn step(&mut self, entry: &'a LedgerEntry, check: &mut Check) {
        let answered = answered_decision(entry);
        let modelled = model_outcome(&self.model, &entry.command, answered);
        if let Some((decision, code)) = answered {
            if !agrees(decision, code, modelled) {
                check.fail(|| {
                    format!(
                        "partition {} offset {} key {}: answered {}, model says {modelled}",
                        entry.answer.partition,
                        entry.answer.offset,
                        entry.key,
                        answered_name(decision, code)
                    )
                });
            }
        }
        if modelled == Outcome::Accepted {
            self.model.apply(&entry.command);
        }
        let accepted = match answered {
            Some((decision, _)) => decision == Decision::Accepted,
            // An evicted replay: nothing says what happened, so the rules decide.
            None => self.ledger.decide(&entry.command) == Outcome::Accepted,
        };
        if accepted {
            self.ledger.apply(&entry.command);
            self.count_created(&entry.command);
            self.accepted = self.accepted.saturating_add(1);
        }
    }

    fn count_created(&mut self, command: &'a InventoryCommand) {
        let mut add = |sku: &'a str, delta: i128| {
            let net = self.created.entry(sku).or_insert(0);
            *net = net.saturating_add(delta);
        };
        match command {
            InventoryCommand::Transfer { .. } => {}
            InventoryCommand::Adjust { sku, delta, .. } => add(sku, i128::from(*delta)),
            InventoryCommand::AssembleKit { kit_sku, qty, components, .. } => {
                add(kit_sku, i128::from(*qty));
                for component in components {
                    add(&component.sku, -units(*qty, component.qty_per_kit));
                }
            }
        }
    }
}

/// Replays every partition of the ledger and returns the `decisions_serializable` check
/// with the replays (for the table checks).
fn replay_partitions(ledger: &Ledger) -> (Check, BTreeMap<u32, PartitionReplay<'_>>) {
    let mut check = Check::new(DECISIONS_SERIALIZABLE);
    let mut replays = BTreeMap::new();
    for (partition, order) in log_order(ledger) {
        let replay: &mut PartitionReplay<'_> = replays.entry(partition).or_default();
        for index in order {
            replay.step(&ledger.entries[index], &mut check);
        }
    }
    (check, replays)
}

/// Indexes of the entries the log holds (first answer decided), per partition, by offset.
/// The sort is stable: entries sharing an offset (an ExactlyOnce failure) keep ledger order.
fn log_order(ledger: &Ledger) -> BTreeMap<u32, Vec<usize>> {
    let mut order: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (index, entry) in ledger.entries.iter().enumerate().filter(|(_, entry)| is_decided(&entry.answer)) {
        order.entry(entry.answer.partition).or_default().push(index);
    }
    for indexes in order.values_mut() {
        indexes.sort_by_key(|index| ledger.entries[*index].answer.offset);
    }
    order
}

/// The highest offset any decided answer names, per partition: what a table's certified
/// watermark must have reached (spec: Loadgen.StockReadAfterLedger).
fn highest_answered_offsets(ledger: &Ledger) -> BTreeMap<u32, u64> {
    let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
    for answer in ledger.entries.iter().flat_map(answers).filter(|answer| is_decided(answer)) {
        let offset = highest.entry(answer.partition).or_insert(answer.offset);
        *offset = (*offset).max(answer.offset);
    }
    highest
}

// ---------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------

/// Whether a row belongs to this run. Names carry the run's prefix, so rows without it
/// are another client's stock and say nothing about this ledger. An empty prefix takes all.
fn is_run_row(row: &StockRow, prefix: &str) -> bool {
    row.warehouse.starts_with(prefix) && row.sku.starts_with(prefix)
}

fn run_rows<'t>(table: &'t StockTable, prefix: &'t str) -> impl Iterator<Item = &'t StockRow> + 't {
    table.levels.iter().filter(move |row| is_run_row(row, prefix))
}

/// The run's non-zero levels of a table, and the (warehouse, SKU) pairs listed more than
/// once (a read returns each level once; a repeated one is summed and reported).
fn table_levels<'t>(table: &'t StockTable, prefix: &'t str) -> (FlatLevels<'t>, Vec<(&'t str, &'t str)>) {
    let mut levels = FlatLevels::new();
    let mut repeated = Vec::new();
    for row in run_rows(table, prefix) {
        let at = (row.warehouse.as_str(), row.sku.as_str());
        match levels.get_mut(&at) {
            Some(level) => {
                *level = level.saturating_add(i128::from(row.qty));
                repeated.push(at);
            }
            None => {
                levels.insert(at, i128::from(row.qty));
            }
        }
    }
    levels.retain(|_, qty| *qty != 0);
    (levels, repeated)
}

/// Calls `mismatch` for every key whose value differs between two maps, an absent key
/// counting as 0.
fn diff<K: Ord + Copy>(left: &BTreeMap<K, i128>, right: &BTreeMap<K, i128>, mut mismatch: impl FnMut(K, i128, i128)) {
    for (key, l) in left {
        let r = right.get(key).copied().unwrap_or(0);
        if *l != r {
            mismatch(*key, *l, r);
        }
    }
    for (key, r) in right.iter().filter(|(key, _)| !left.contains_key(*key)) {
        if *r != 0 {
            mismatch(*key, 0, *r);
        }
    }
}

// ---------------------------------------------------------------------------------------
// TotalsMatchLedger, StockReadAfterLedger
// ---------------------------------------------------------------------------------------

// spec: Loadgen.TotalsMatchLedger — every table equals the levels the answers imply.
// spec: Loadgen.StockReadAfterLedger — a table behind the ledger cannot show them: by the
// time the verifier runs, the reads have waited stock_read_wait_ms, so it is a violation.
fn check_totals(
    ledger: &Ledger,
    tables: &[StockTable],
    replays: &BTreeMap<u32, PartitionReplay<'_>>,
    highest: &BTreeMap<u32, u64>,
) -> Check {
    let mut check = Check::new(TOTALS);
    check_tables_present(&mut check, tables, replays);
    let empty = BTreeMap::new();
    for table in tables {
        check_watermark(&mut check, table, highest);
        let expected = replays.get(&table.partition).map(|replay| replay.ledger.nonzero());
        let expected = expected.as_ref().unwrap_or(&empty);
        let (actual, repeated) = table_levels(table, &ledger.run_prefix);
        for (warehouse, sku) in repeated {
            check.fail(|| {
                format!(
                    "instance {} partition {} lists ({warehouse}, {sku}) more than once",
                    table.instance, table.partition
                )
            });
        }
        diff(expected, &actual, |(warehouse, sku), want, got| {
            check.fail(|| {
                format!(
                    "instance {} partition {} ({warehouse}, {sku}): table {got}, ledger {want}",
                    table.instance, table.partition
                )
            });
        });
    }
    check
}

/// A partition where commands were accepted must have been read from some instance;
/// otherwise the totals were never compared at all.
fn check_tables_present(check: &mut Check, tables: &[StockTable], replays: &BTreeMap<u32, PartitionReplay<'_>>) {
    let accepted: u64 = replays.values().map(|replay| replay.accepted).fold(0, u64::saturating_add);
    if tables.is_empty() {
        if accepted > 0 {
            check.fail(|| format!("no stock tables, but the ledger has {accepted} accepted commands"));
        }
        return;
    }
    for (partition, replay) in replays.iter().filter(|(_, replay)| replay.accepted > 0) {
        if !tables.iter().any(|table| table.partition == *partition) {
            check.fail(|| format!("no stock table of partition {partition} ({} accepted commands)", replay.accepted));
        }
    }
}

fn check_watermark(check: &mut Check, table: &StockTable, highest: &BTreeMap<u32, u64>) {
    let Some(offset) = highest.get(&table.partition).copied() else { return };
    let behind = match table.certified_watermark {
        Some(watermark) => watermark < offset,
        None => true,
    };
    if behind {
        check.fail(|| {
            let watermark = table.certified_watermark.map_or_else(|| "none".to_owned(), |w| w.to_string());
            format!(
                "instance {} partition {} watermark {watermark} behind ledger offset {offset}",
                table.instance, table.partition
            )
        });
    }
}

// ---------------------------------------------------------------------------------------
// ConservationPerSku
// ---------------------------------------------------------------------------------------

// spec: Loadgen.ConservationPerSku — per SKU, the sum over warehouses equals the accepted
// adjustments plus kits assembled minus components used. Computed from the ledger's
// commands, not from the replayed levels, so it cross-checks the replay too: a transfer
// that created or lost stock shows here even if it is wrong in the same way everywhere.
fn check_conservation(ledger: &Ledger, tables: &[StockTable], replays: &BTreeMap<u32, PartitionReplay<'_>>) -> Check {
    let mut check = Check::new(CONSERVATION_PER_SKU);
    let empty = BTreeMap::new();
    for table in tables {
        let expected = replays.get(&table.partition).map_or(&empty, |replay| &replay.created);
        let mut actual: BTreeMap<&str, i128> = BTreeMap::new();
        for row in run_rows(table, &ledger.run_prefix) {
            let sum = actual.entry(row.sku.as_str()).or_insert(0);
            *sum = sum.saturating_add(i128::from(row.qty));
        }
        diff(expected, &actual, |sku, want, got| {
            check.fail(|| {
                format!(
                    "instance {} partition {} sku {sku}: table total {got}, adjustments and kits {want}",
                    table.instance, table.partition
                )
            });
        });
    }
    check
}

// ---------------------------------------------------------------------------------------
// NoNegativeStock, InstancesIdentical, UnresolvedIsViolation
// ---------------------------------------------------------------------------------------

// spec: Loadgen.NoNegativeStock — every row, the run's or not: a negative level is a bug
// whoever wrote it.
fn check_non_negative(tables: &[StockTable]) -> Check {
    let mut check = Check::new(NON_NEGATIVE);
    for table in tables {
        for row in table.levels.iter().filter(|row| row.qty < 0) {
            check.fail(|| {
                format!(
                    "instance {} partition {} ({}, {}) qty {}",
                    table.instance, table.partition, row.warehouse, row.sku, row.qty
                )
            });
        }
    }
    check
}

// spec: Loadgen.InstancesIdentical — per partition, every instance's table equals the
// first one read (zero rows ignored). One failure per differing level per instance.
fn check_instances_identical(ledger: &Ledger, tables: &[StockTable]) -> Check {
    let mut check = Check::new(INSTANCES_IDENTICAL);
    let mut by_partition: BTreeMap<u32, Vec<&StockTable>> = BTreeMap::new();
    for table in tables {
        by_partition.entry(table.partition).or_default().push(table);
    }
    for (partition, tables) in &by_partition {
        let Some((first, others)) = tables.split_first() else { continue };
        let (reference, _) = table_levels(first, &ledger.run_prefix);
        for other in others {
            let (levels, _) = table_levels(other, &ledger.run_prefix);
            diff(&reference, &levels, |(warehouse, sku), want, got| {
                check.fail(|| {
                    format!(
                        "partition {partition} ({warehouse}, {sku}): instance {} has {want}, instance {} has {got}",
                        first.instance, other.instance
                    )
                });
            });
        }
    }
    check
}

// spec: Loadgen.UnresolvedIsViolation — a command without a final answer has an unknown effect.
fn check_unresolved(ledger: &Ledger) -> Check {
    let mut check = Check::new(UNRESOLVED);
    for unresolved in &ledger.unresolved {
        check.fail(|| format!("key {} has no final answer (last error: {})", unresolved.key, unresolved.last_error));
    }
    check
}

// spec: Loadgen.AnswersWellFormed
fn check_answers_well_formed(ledger: &Ledger) -> Check {
    let mut check = Check::new(ANSWERS_WELL_FORMED);
    for bad in &ledger.bad_answers {
        check.fail(|| bad.clone());
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Unresolved;
    use tribunal_shards::inventory::KitComponent;

    const PREFIX: &str = "r1-";
    const ALL_CHECKS: [&str; 8] = [
        EXACTLY_ONCE,
        DECISIONS_SERIALIZABLE,
        TOTALS,
        CONSERVATION_PER_SKU,
        NON_NEGATIVE,
        INSTANCES_IDENTICAL,
        UNRESOLVED,
        ANSWERS_WELL_FORMED,
    ];

    fn transfer(sku: &str, from: &str, to: &str, qty: u64) -> InventoryCommand {
        InventoryCommand::Transfer { sku: sku.into(), from_warehouse: from.into(), to_warehouse: to.into(), qty }
    }

    fn adjust(sku: &str, warehouse: &str, delta: i64) -> InventoryCommand {
        InventoryCommand::Adjust { sku: sku.into(), warehouse: warehouse.into(), delta, reason: "count".into() }
    }

    fn kit(warehouse: &str, kit_sku: &str, qty: u64, components: &[(&str, u64)]) -> InventoryCommand {
        InventoryCommand::AssembleKit {
            warehouse: warehouse.into(),
            kit_sku: kit_sku.into(),
            qty,
            components: components
                .iter()
                .map(|(sku, qty_per_kit)| KitComponent { sku: (*sku).into(), qty_per_kit: *qty_per_kit })
                .collect(),
        }
    }

    fn answer(partition: u32, offset: u64, decision: Option<Decision>) -> AnswerRecord {
        let (http_status, code) = match decision {
            Some(Decision::Rejected) => (422, Some(reject::INSUFFICIENT_STOCK.to_owned())),
            _ => (200, None),
        };
        AnswerRecord {
            http_status,
            partition,
            offset,
            decision,
            code,
            replayed: decision.is_none(),
            digest: format!("{partition:x}{offset:031x}"),
        }
    }

    fn entry(key: &str, command: InventoryCommand, answer: AnswerRecord) -> LedgerEntry {
        LedgerEntry { key: key.to_owned(), command, answer, duplicates: Vec::new() }
    }

    fn table(instance: &str, partition: u32, watermark: u64, rows: &[(&str, &str, i64)]) -> StockTable {
        StockTable {
            instance: instance.to_owned(),
            partition,
            certified_watermark: Some(watermark),
            levels: rows
                .iter()
                .map(|(warehouse, sku, qty)| StockRow { warehouse: (*warehouse).into(), sku: (*sku).into(), qty: *qty })
                .collect(),
        }
    }

    const ACCEPTED: Option<Decision> = Some(Decision::Accepted);
    const REJECTED: Option<Decision> = Some(Decision::Rejected);

    /// A small consistent run over two partitions: adjustments, transfers (one rejected),
    /// a kit, a rejected adjustment, a duplicate and an evicted replay. Entries are out of
    /// offset order on purpose: the replay must sort them.
    fn consistent_ledger() -> Ledger {
        let mut duplicated = entry("r1-0-1", transfer("r1-a", "r1-w1", "r1-w2", 4), answer(0, 1, ACCEPTED));
        duplicated.duplicates.push(AnswerRecord { replayed: true, ..answer(0, 1, ACCEPTED) });
        Ledger {
            run_prefix: PREFIX.to_owned(),
            entries: vec![
                duplicated,
                entry("r1-0-0", adjust("r1-a", "r1-w1", 10), answer(0, 0, ACCEPTED)),
                // w1 holds 6 of a: 7 do not go.
                entry("r1-0-2", transfer("r1-a", "r1-w1", "r1-w2", 7), answer(0, 2, REJECTED)),
                // 3 kits of 2 a each use the 6 left.
                entry("r1-0-3", kit("r1-w1", "r1-k", 3, &[("r1-a", 2)]), answer(0, 3, ACCEPTED)),
                entry("r1-0-4", adjust("r1-b", "r1-w1", -1), answer(0, 4, REJECTED)),
                entry("r1-1-0", adjust("r1-c", "r1-w1", 5), answer(1, 0, ACCEPTED)),
                // An evicted replay: the rules decide (accepted: 5 - 2 = 3).
                entry("r1-1-1", adjust("r1-c", "r1-w1", -2), answer(1, 1, None)),
            ],
            unresolved: Vec::new(),
            bad_answers: Vec::new(),
        }
    }

    /// Both instances' tables of the consistent run, with a zero row and another
    /// client's row, which must both be ignored.
    fn consistent_tables() -> Vec<StockTable> {
        let mut tables = Vec::new();
        for instance in ["http://a", "http://b"] {
            tables.push(table(
                instance,
                0,
                4,
                &[("r1-w1", "r1-a", 0), ("r1-w2", "r1-a", 4), ("r1-w1", "r1-k", 3), ("other-w", "other-s", 99)],
            ));
            tables.push(table(instance, 1, 1, &[("r1-w1", "r1-c", 3)]));
        }
        tables
    }

    fn get<'v>(verification: &'v Verification, name: &str) -> &'v Check {
        verification.checks.iter().find(|check| check.name == name).expect("every check is present")
    }

    /// The names of the failed checks, for exact assertions.
    fn failed(verification: &Verification) -> Vec<&'static str> {
        verification.failed().map(|check| check.name).collect()
    }

    fn set_qty(tables: &mut [StockTable], instance: &str, partition: u32, warehouse: &str, sku: &str, qty: i64) {
        let table = tables.iter_mut().find(|t| t.instance == instance && t.partition == partition).expect("table");
        let row = table.levels.iter_mut().find(|r| r.warehouse == warehouse && r.sku == sku).expect("row");
        row.qty = qty;
    }

    #[test]
    fn consistent_run_passes_every_check() {
        let verification = verify(&consistent_ledger(), &consistent_tables());
        let names: Vec<&str> = verification.checks.iter().map(|check| check.name).collect();
        assert_eq!(names, ALL_CHECKS);
        assert!(verification.ok(), "{verification:#?}");
        assert_eq!(failed(&verification), Vec::<&str>::new());
        assert!(verification.checks.iter().all(|check| check.failures == 0 && check.examples.is_empty()));
    }

    #[test]
    fn empty_run_passes() {
        let verification = verify(&Ledger::default(), &[]);
        assert!(verification.ok(), "{verification:#?}");
        assert_eq!(verification.checks.len(), ALL_CHECKS.len());
    }

    // spec: Loadgen.TotalsMatchLedger
    // spec: Loadgen.ConservationPerSku
    // spec: Loadgen.InstancesIdentical
    #[test]
    fn doctored_qty_fails_totals_conservation_and_instances_identical() {
        let mut tables = consistent_tables();
        set_qty(&mut tables, "http://b", 0, "r1-w2", "r1-a", 5);
        let verification = verify(&consistent_ledger(), &tables);
        assert_eq!(failed(&verification), [TOTALS, CONSERVATION_PER_SKU, INSTANCES_IDENTICAL]);
        assert_eq!(get(&verification, TOTALS).failures, 1);
        assert_eq!(get(&verification, CONSERVATION_PER_SKU).failures, 1);
        assert_eq!(get(&verification, INSTANCES_IDENTICAL).failures, 1);
        assert!(get(&verification, TOTALS).examples[0].contains("table 5, ledger 4"), "{verification:#?}");
        assert!(!verification.ok());
    }

    // spec: Loadgen.TotalsMatchLedger — instances that agree on a wrong level are still wrong.
    #[test]
    fn doctored_identically_everywhere_still_fails_totals() {
        let mut tables = consistent_tables();
        set_qty(&mut tables, "http://a", 1, "r1-w1", "r1-c", 4);
        set_qty(&mut tables, "http://b", 1, "r1-w1", "r1-c", 4);
        let verification = verify(&consistent_ledger(), &tables);
        assert_eq!(failed(&verification), [TOTALS, CONSERVATION_PER_SKU]);
        assert_eq!(get(&verification, TOTALS).failures, 2, "one per instance");
    }

    // spec: Loadgen.TotalsMatchLedger — a missing row is a level of 0, an extra row of the run counts.
    #[test]
    fn missing_and_extra_rows_fail_totals() {
        let mut tables = consistent_tables();
        tables[0].levels.retain(|row| row.sku != "r1-k");
        tables[0].levels.push(StockRow { warehouse: "r1-w3".into(), sku: "r1-a".into(), qty: 1 });
        let verification = verify(&consistent_ledger(), &tables);
        assert!(!get(&verification, TOTALS).ok);
        assert_eq!(get(&verification, TOTALS).failures, 2);
    }

    // spec: Loadgen.ConservationPerSku — stock that appears from nowhere, the same on every
    // instance, breaks the SKU's total.
    #[test]
    fn created_stock_fails_conservation() {
        let mut tables = consistent_tables();
        for instance in ["http://a", "http://b"] {
            set_qty(&mut tables, instance, 0, "r1-w1", "r1-a", 1);
        }
        let verification = verify(&consistent_ledger(), &tables);
        assert!(!get(&verification, CONSERVATION_PER_SKU).ok);
        assert_eq!(get(&verification, CONSERVATION_PER_SKU).failures, 2);
        assert!(get(&verification, INSTANCES_IDENTICAL).ok);
    }

    // spec: Loadgen.NoNegativeStock
    #[test]
    fn negative_qty_fails_non_negative() {
        let mut tables = consistent_tables();
        for instance in ["http://a", "http://b"] {
            set_qty(&mut tables, instance, 0, "r1-w1", "r1-a", -1);
        }
        // Another client's negative level is a bug too.
        tables[1].levels.push(StockRow { warehouse: "other-w".into(), sku: "other-s".into(), qty: -7 });
        let verification = verify(&consistent_ledger(), &tables);
        let check = get(&verification, NON_NEGATIVE);
        assert!(!check.ok);
        assert_eq!(check.failures, 3);
        assert!(check.examples[0].contains("qty -1"), "{check:#?}");
    }

    // spec: Loadgen.ExactlyOnce
    #[test]
    fn duplicate_with_another_offset_fails_exactly_once() {
        let mut ledger = consistent_ledger();
        // Below the watermarks, so only ExactlyOnce can notice.
        ledger.entries[0].duplicates[0].offset = 0;
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [EXACTLY_ONCE]);
        let check = get(&verification, EXACTLY_ONCE);
        assert_eq!(check.failures, 1);
        assert!(check.examples[0].contains("duplicate #0 names partition 0 offset 0"), "{check:#?}");
    }

    // spec: Loadgen.ExactlyOnce — a duplicate is a resubmission: it must be answered as a replay.
    #[test]
    fn duplicate_not_replayed_fails_exactly_once() {
        let mut ledger = consistent_ledger();
        ledger.entries[0].duplicates[0].replayed = false;
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [EXACTLY_ONCE]);
    }

    // spec: Loadgen.ExactlyOnce
    #[test]
    fn duplicate_with_another_decision_or_digest_fails_exactly_once() {
        let mut ledger = consistent_ledger();
        ledger.entries[0].duplicates[0].decision = REJECTED;
        ledger.entries[0].duplicates[0].digest = "ff".into();
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [EXACTLY_ONCE]);
        assert_eq!(get(&verification, EXACTLY_ONCE).failures, 2);
    }

    // spec: Loadgen.ExactlyOnce — an evicted replay has its own digest and no decision: no failure.
    #[test]
    fn evicted_replay_duplicate_passes() {
        let mut ledger = consistent_ledger();
        ledger.entries[0].duplicates[0].decision = None;
        ledger.entries[0].duplicates[0].digest = "ff".into();
        let verification = verify(&ledger, &consistent_tables());
        assert!(verification.ok(), "{verification:#?}");
    }

    // spec: Loadgen.ExactlyOnce
    #[test]
    fn two_keys_sharing_an_offset_fail_exactly_once() {
        let mut ledger = consistent_ledger();
        // A rejected command that claims the offset of the accepted adjustment.
        ledger.entries.push(entry("r1-0-5", adjust("r1-b", "r1-w1", -3), answer(0, 0, REJECTED)));
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [EXACTLY_ONCE]);
        let check = get(&verification, EXACTLY_ONCE);
        assert_eq!(check.failures, 1);
        assert!(check.examples[0].contains("share partition 0 offset 0"), "{check:#?}");
    }

    // spec: Loadgen.ExactlyOnce — loadgen never reuses a key with another body, nor sends an invalid command.
    #[test]
    fn conflict_and_bad_request_fail_exactly_once() {
        let mut ledger = consistent_ledger();
        let conflict = AnswerRecord { http_status: 409, decision: None, ..answer(0, 7, None) };
        let bad = AnswerRecord { http_status: 400, decision: None, ..answer(0, 8, None) };
        ledger.entries.push(entry("r1-0-7", adjust("r1-b", "r1-w1", 3), conflict));
        ledger.entries.push(entry("r1-0-8", adjust("r1-b", "r1-w1", 3), bad));
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [EXACTLY_ONCE]);
        let check = get(&verification, EXACTLY_ONCE);
        assert_eq!(check.failures, 2);
        assert!(check.examples[0].contains("409"), "{check:#?}");
        assert!(check.examples[1].contains("400"), "{check:#?}");
    }

    // spec: Loadgen.DecisionsSerializable
    #[test]
    fn wrongly_accepted_transfer_fails_decisions_serializable() {
        let mut ledger = consistent_ledger();
        // w1 holds 6 of a at offset 2: a transfer of 7 must be rejected.
        ledger.entries[2].answer = answer(0, 2, ACCEPTED);
        let verification = verify(&ledger, &consistent_tables());
        let check = get(&verification, DECISIONS_SERIALIZABLE);
        assert!(!check.ok);
        assert_eq!(check.failures, 1, "the model keeps its own history: one wrong answer, one failure");
        assert!(check.examples[0].contains("model says rejected (insufficient_stock)"), "{check:#?}");
        // The tables do not show the transfer the cluster claims to have made.
        assert!(!get(&verification, TOTALS).ok);
    }

    // spec: Loadgen.DecisionsSerializable
    #[test]
    fn wrongly_rejected_command_fails_decisions_serializable() {
        let mut ledger = consistent_ledger();
        ledger.entries[1].answer = answer(0, 0, REJECTED);
        let verification = verify(&ledger, &[]);
        let check = get(&verification, DECISIONS_SERIALIZABLE);
        assert!(!check.ok);
        assert!(
            check.examples[0].contains("answered rejected (insufficient_stock), model says accepted"),
            "{check:#?}"
        );
    }

    // spec: Loadgen.DecisionsSerializable — the reject code must be the model's too.
    #[test]
    fn reject_codes_must_match_the_model() {
        let same = transfer("r1-a", "r1-w1", "r1-w1", 1);
        let answered = AnswerRecord { code: Some(reject::SAME_WAREHOUSE.into()), ..answer(0, 0, REJECTED) };
        let ledger =
            Ledger { run_prefix: PREFIX.into(), entries: vec![entry("r1-0-0", same, answered)], ..Ledger::default() };
        assert!(verify(&ledger, &[]).ok());

        let mut wrong = ledger.clone();
        wrong.entries[0].command = transfer("r1-a", "r1-w1", "r1-w2", 1);
        let verification = verify(&wrong, &[]);
        assert_eq!(failed(&verification), [DECISIONS_SERIALIZABLE]);
    }

    // spec: Loadgen.DecisionsSerializable — a kit needs every component.
    #[test]
    fn kit_short_of_one_component_is_rejected_by_the_model() {
        let setup = [adjust("r1-a", "r1-w1", 4), adjust("r1-b", "r1-w1", 1)];
        let mut levels = Levels::default();
        for command in &setup {
            assert_eq!(levels.decide(command), Outcome::Accepted);
            levels.apply(command);
        }
        let short = kit("r1-w1", "r1-k", 2, &[("r1-a", 2), ("r1-b", 1)]);
        assert_eq!(levels.decide(&short), Outcome::Rejected(reject::INSUFFICIENT_STOCK));
        let enough = kit("r1-w1", "r1-k", 1, &[("r1-a", 2), ("r1-b", 1)]);
        assert_eq!(levels.decide(&enough), Outcome::Accepted);
        let overflow = adjust("r1-a", "r1-w1", i64::try_from(MAX_STOCK).expect("fits"));
        assert_eq!(levels.decide(&overflow), Outcome::Rejected(reject::STOCK_OVERFLOW));
    }

    // spec: Loadgen.UnresolvedIsViolation
    #[test]
    fn unresolved_entry_fails_unresolved() {
        let mut ledger = consistent_ledger();
        ledger.unresolved.push(Unresolved {
            key: "r1-0-9".into(),
            command: adjust("r1-a", "r1-w1", 1),
            last_error: "timeout".into(),
        });
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [UNRESOLVED]);
        let check = get(&verification, UNRESOLVED);
        assert_eq!(check.failures, 1);
        assert!(check.examples[0].contains("r1-0-9"), "{check:#?}");
    }

    #[test]
    fn a_bad_answer_fails_answers_well_formed() {
        // spec: Loadgen.AnswersWellFormed
        let mut ledger = consistent_ledger();
        ledger.bad_answers.push("key r1-0-3: 200 with an unreadable body".into());
        let verification = verify(&ledger, &consistent_tables());
        assert_eq!(failed(&verification), [ANSWERS_WELL_FORMED]);
        assert!(!verification.ok());
    }

    #[test]
    fn examples_are_bounded() {
        let mut ledger = consistent_ledger();
        for n in 0..25 {
            ledger.unresolved.push(Unresolved {
                key: format!("r1-9-{n}"),
                command: adjust("r1-a", "r1-w1", 1),
                last_error: "503".into(),
            });
        }
        let verification = verify(&ledger, &consistent_tables());
        let check = get(&verification, UNRESOLVED);
        assert_eq!(check.failures, 25);
        assert_eq!(check.examples.len(), MAX_EXAMPLES);
    }

    // spec: Loadgen.StockReadAfterLedger
    #[test]
    fn table_behind_the_ledger_fails_totals() {
        let mut tables = consistent_tables();
        tables[3].certified_watermark = Some(0);
        let verification = verify(&consistent_ledger(), &tables);
        assert_eq!(failed(&verification), [TOTALS]);
        let check = get(&verification, TOTALS);
        assert_eq!(check.failures, 1);
        assert_eq!(check.examples[0], "instance http://b partition 1 watermark 0 behind ledger offset 1");

        tables[3].certified_watermark = None;
        let verification = verify(&consistent_ledger(), &tables);
        assert!(get(&verification, TOTALS).examples[0].contains("watermark none behind"), "{verification:#?}");
    }

    // spec: Loadgen.TotalsMatchLedger
    #[test]
    fn no_tables_fails_totals() {
        let verification = verify(&consistent_ledger(), &[]);
        assert_eq!(failed(&verification), [TOTALS]);
        assert!(get(&verification, TOTALS).examples[0].starts_with("no stock tables"));

        let mut tables = consistent_tables();
        tables.retain(|table| table.partition == 0);
        let verification = verify(&consistent_ledger(), &tables);
        assert_eq!(failed(&verification), [TOTALS]);
        assert!(get(&verification, TOTALS).examples[0].contains("no stock table of partition 1"));
    }

    // spec: Loadgen.TotalsMatchLedger — a row listed twice is reported even when its sum is right.
    #[test]
    fn repeated_row_fails_totals() {
        let mut tables = consistent_tables();
        set_qty(&mut tables, "http://a", 1, "r1-w1", "r1-c", 1);
        tables[1].levels.push(StockRow { warehouse: "r1-w1".into(), sku: "r1-c".into(), qty: 2 });
        let verification = verify(&consistent_ledger(), &tables);
        let check = get(&verification, TOTALS);
        assert_eq!(check.failures, 1);
        assert!(check.examples[0].contains("more than once"), "{check:#?}");
    }
}
