//! The inventory domain: stock levels per (warehouse, SKU), moved by transfers,
//! adjustments and kit assemblies. Specified in `specs/inventory.allium`.
//!
//! The affinity key is the SKU, so a transfer (one SKU, two warehouses) always lands
//! on one shard, while a kit assembly (several SKUs) usually spans shards.

use compact_str::CompactString;
use rkyv::with::InlineAsBox;
use rkyv::{Archive, Serialize as RkyvSerialize};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use xxhash_rust::xxh3::xxh3_128;

use crate::digest::{affinity_hash, CanonicalHasher};
use crate::domain::{Decision, Domain, Invalid, InvalidState, StreamTimeMs, Version};

/// Highest stock level of one (warehouse, SKU). Keeps every sum in `u64` far from
/// overflow: 16 components x 10^9 units each still fits.
pub const MAX_STOCK: u64 = 1_000_000_000_000;
/// Largest quantity one transfer or adjustment moves.
pub const MAX_MOVEMENT_QTY: u64 = 1_000_000_000;
/// Largest number of kits assembled by one command.
pub const MAX_KIT_QTY: u64 = 1_000_000;
/// Largest number of distinct component SKUs in a kit.
pub const MAX_KIT_COMPONENTS: usize = 16;
/// Longest warehouse or SKU identifier, in bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest adjustment reason, in bytes (printable ASCII only).
pub const MAX_REASON_BYTES: usize = 256;

/// Stable reject codes (they reach HTTP answers and Kafka outputs).
pub mod reject {
    pub const INSUFFICIENT_STOCK: &str = "insufficient_stock";
    pub const SAME_WAREHOUSE: &str = "same_warehouse";
    pub const STOCK_OVERFLOW: &str = "stock_overflow";
    pub const REASON_REQUIRED: &str = "reason_required";
}

/// Stable codes of broken command bounds: the reason of a `Malformed` output
/// (spec: Inventory.BoundsViolationIsMalformed). Never change one.
pub mod invalid {
    /// A warehouse or SKU is not 1..=64 bytes of `[A-Za-z0-9._:-]` (spec: Inventory.IdentifierBounds).
    pub const INVALID_NAME: &str = "invalid_name";
    /// A quantity, delta or `qty * qty_per_kit` is out of its range (spec: Inventory.QuantityBounds).
    pub const QUANTITY_OUT_OF_RANGE: &str = "quantity_out_of_range";
    /// An adjustment reason is too long or not printable ASCII (spec: Inventory.ReasonBound).
    pub const INVALID_REASON: &str = "invalid_reason";
    /// A kit's components are empty, too many, repeated or include the kit (spec: Inventory.KitComposition).
    pub const INVALID_KIT: &str = "invalid_kit";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitComponent {
    pub sku: CompactString,
    pub qty_per_kit: u64,
}

/// A stock movement, as carried in the JSON envelope (`"type": "transfer"`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum InventoryCommand {
    Transfer {
        sku: CompactString,
        from_warehouse: CompactString,
        to_warehouse: CompactString,
        qty: u64,
    },
    Adjust {
        sku: CompactString,
        warehouse: CompactString,
        delta: i64,
        #[serde(default)]
        reason: CompactString,
    },
    AssembleKit {
        warehouse: CompactString,
        kit_sku: CompactString,
        qty: u64,
        components: Vec<KitComponent>,
    },
}

/// One entity: the stock level of a SKU in a warehouse.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StockKey {
    pub sku: CompactString,
    pub warehouse: CompactString,
}

impl StockKey {
    pub fn new(warehouse: &str, sku: &str) -> Self {
        Self { sku: sku.into(), warehouse: warehouse.into() }
    }
}

/// Domain part of an output, as serialised: the stock level of every touched entity
/// (after the command if accepted, unchanged if rejected) and the domain event
/// emitted, if any. Events refer to levels by index, so names appear once.
#[derive(Debug, Archive, RkyvSerialize)]
pub struct InventoryBodyRef<'a> {
    #[rkyv(with = InlineAsBox)]
    pub levels: &'a [StockLevelRef<'a>],
    pub event: Option<InventoryEventRef<'a>>,
}

#[derive(Debug, Archive, RkyvSerialize)]
pub struct StockLevelRef<'a> {
    #[rkyv(with = InlineAsBox)]
    pub warehouse: &'a str,
    #[rkyv(with = InlineAsBox)]
    pub sku: &'a str,
    pub qty: u64,
}

#[derive(Debug, Archive, RkyvSerialize)]
pub enum InventoryEventRef<'a> {
    /// `qty` moved from level `from` to level `to`.
    StockMoved { from: u8, to: u8, qty: u64 },
    /// Level `level` changed by `delta`.
    StockAdjusted {
        level: u8,
        delta: i64,
        #[rkyv(with = InlineAsBox)]
        reason: &'a str,
    },
    /// `qty` kits were added to level `kit`; every other level gave its components.
    KitAssembled { kit: u8, qty: u64 },
}

/// Decoded body (owned), for readers: HTTP answers, Kafka JSON, tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InventoryBody {
    pub levels: Vec<StockLevel>,
    pub event: Option<InventoryEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockLevel {
    pub warehouse: String,
    pub sku: String,
    pub qty: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InventoryEvent {
    StockMoved { sku: String, from_warehouse: String, to_warehouse: String, qty: u64 },
    StockAdjusted { sku: String, warehouse: String, delta: i64, reason: String },
    KitAssembled { warehouse: String, kit_sku: String, qty: u64 },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyDecodeError {
    #[error("inventory body does not decode: {0}")]
    Invalid(String),
    /// The bytes decode, but they are not the one encoding of what they decode to (a
    /// junk prefix, stray bytes in an unused enum payload, ...).
    #[error("inventory body is not the canonical encoding")]
    NotCanonical,
}

/// Appends the one canonical encoding of `record` to `body`.
fn encode_body(record: &InventoryBodyRef<'_>, body: &mut Vec<u8>) {
    rkyv::util::with_arena(|arena| {
        rkyv::api::low::to_bytes_in_with_alloc::<_, _, rkyv::rancor::Error>(record, &mut *body, arena.acquire())
            .expect("an in-memory body always encodes");
    });
}

/// The canonical body of an output that carries `levels` and no event: what a reader of
/// outputs (the Gateway's certified view) is fed, built the way the Arbiter builds it.
pub fn levels_body(levels: &[StockLevel]) -> Vec<u8> {
    let refs: Vec<StockLevelRef<'_>> =
        levels.iter().map(|l| StockLevelRef { warehouse: &l.warehouse, sku: &l.sku, qty: l.qty }).collect();
    let mut body = Vec::new();
    encode_body(&InventoryBodyRef { levels: &refs, event: None }, &mut body);
    body
}

impl InventoryBody {
    /// Decodes and validates a body produced by [`Inventory::evaluate`]; never panics.
    /// Only the canonical encoding decodes (spec: Inventory.CanonicalBody).
    pub fn decode(bytes: &[u8]) -> Result<Self, BodyDecodeError> {
        let archived = rkyv::access::<ArchivedInventoryBodyRef<'_>, rkyv::rancor::Error>(bytes)
            .map_err(|e| BodyDecodeError::Invalid(e.to_string()))?;
        let levels: Vec<StockLevel> = archived
            .levels
            .iter()
            .map(|l| StockLevel {
                warehouse: l.warehouse.as_ref().to_owned(),
                sku: l.sku.as_ref().to_owned(),
                qty: l.qty.to_native(),
            })
            .collect();
        let level = |i: u8| {
            levels.get(i as usize).ok_or_else(|| BodyDecodeError::Invalid(format!("level index {i} out of range")))
        };
        let event = match archived.event.as_ref() {
            None => None,
            Some(ArchivedInventoryEventRef::StockMoved { from, to, qty }) => {
                let (from, to) = (level(*from)?, level(*to)?);
                Some(InventoryEvent::StockMoved {
                    sku: from.sku.clone(),
                    from_warehouse: from.warehouse.clone(),
                    to_warehouse: to.warehouse.clone(),
                    qty: qty.to_native(),
                })
            }
            Some(ArchivedInventoryEventRef::StockAdjusted { level: i, delta, reason }) => {
                let l = level(*i)?;
                Some(InventoryEvent::StockAdjusted {
                    sku: l.sku.clone(),
                    warehouse: l.warehouse.clone(),
                    delta: delta.to_native(),
                    reason: reason.as_ref().to_owned(),
                })
            }
            Some(ArchivedInventoryEventRef::KitAssembled { kit, qty }) => {
                let l = level(*kit)?;
                Some(InventoryEvent::KitAssembled {
                    warehouse: l.warehouse.clone(),
                    kit_sku: l.sku.clone(),
                    qty: qty.to_native(),
                })
            }
        };
        // The owned body drops the level indices, so re-encode from the archive itself.
        let level_refs: Vec<StockLevelRef<'_>> = archived
            .levels
            .iter()
            .map(|l| StockLevelRef { warehouse: l.warehouse.as_ref(), sku: l.sku.as_ref(), qty: l.qty.to_native() })
            .collect();
        let event_ref = archived.event.as_ref().map(|event| match event {
            ArchivedInventoryEventRef::StockMoved { from, to, qty } => {
                InventoryEventRef::StockMoved { from: *from, to: *to, qty: qty.to_native() }
            }
            ArchivedInventoryEventRef::StockAdjusted { level, delta, reason } => {
                InventoryEventRef::StockAdjusted { level: *level, delta: delta.to_native(), reason: reason.as_ref() }
            }
            ArchivedInventoryEventRef::KitAssembled { kit, qty } => {
                InventoryEventRef::KitAssembled { kit: *kit, qty: qty.to_native() }
            }
        });
        let mut canonical = Vec::with_capacity(bytes.len());
        encode_body(&InventoryBodyRef { levels: &level_refs, event: event_ref }, &mut canonical);
        if canonical != bytes {
            return Err(BodyDecodeError::NotCanonical);
        }
        Ok(Self { levels, event })
    }
}

/// The inventory domain (see the module docs).
#[derive(Debug)]
pub struct Inventory;

fn bound_error(code: &'static str, detail: String) -> Invalid {
    Invalid { code, detail }
}

// spec: Inventory.IdentifierBounds
fn validate_name(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(bound_error(invalid::INVALID_NAME, format!("{field} must be 1..={MAX_NAME_BYTES} bytes")));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    if !value.bytes().all(allowed) {
        return Err(bound_error(invalid::INVALID_NAME, format!("{field} may only contain A-Z a-z 0-9 . _ : -")));
    }
    Ok(())
}

fn validate_range(field: &str, value: u64, max: u64) -> Result<(), Invalid> {
    if value == 0 || value > max {
        return Err(bound_error(invalid::QUANTITY_OUT_OF_RANGE, format!("{field} must be 1..={max}")));
    }
    Ok(())
}

// spec: Inventory.ReasonBound — 0..=256 bytes of printable ASCII.
fn validate_reason(reason: &str) -> Result<(), Invalid> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(bound_error(invalid::INVALID_REASON, format!("reason must be at most {MAX_REASON_BYTES} bytes")));
    }
    if !reason.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(bound_error(
            invalid::INVALID_REASON,
            "reason may only contain printable ASCII (0x20..=0x7E)".into(),
        ));
    }
    Ok(())
}

impl Inventory {
    fn decide(version: Version, states: &mut [u64], command: &InventoryCommand) -> Decision {
        match command {
            InventoryCommand::Transfer { qty, .. } => {
                // spec: Inventory.TransferMovesStock
                if states.len() == 1 {
                    return Decision::Rejected(reject::SAME_WAREHOUSE);
                }
                let (from, to) = (states[0], states[1]);
                if from < *qty {
                    return Decision::Rejected(reject::INSUFFICIENT_STOCK);
                }
                // spec: Inventory.CheckedArithmetic — a corrupt level must not wrap.
                let Some(next_to) = to.checked_add(*qty).filter(|next| *next <= MAX_STOCK) else {
                    return Decision::Rejected(reject::STOCK_OVERFLOW);
                };
                states[0] = from - qty;
                states[1] = next_to;
            }
            InventoryCommand::Adjust { delta, reason, .. } => {
                if version >= 2 && reason.is_empty() {
                    return Decision::Rejected(reject::REASON_REQUIRED);
                }
                let next = i128::from(states[0]) + i128::from(*delta);
                if next < 0 {
                    return Decision::Rejected(reject::INSUFFICIENT_STOCK);
                }
                if next > i128::from(MAX_STOCK) {
                    return Decision::Rejected(reject::STOCK_OVERFLOW);
                }
                states[0] = u64::try_from(next).expect("0 <= next <= MAX_STOCK");
            }
            InventoryCommand::AssembleKit { qty, components, .. } => {
                // spec: Inventory.AssembleKitAtomic — check every component before changing any.
                // spec: Inventory.CheckedArithmetic — a need past u64 is more than any stock.
                for (i, component) in components.iter().enumerate() {
                    match qty.checked_mul(component.qty_per_kit) {
                        Some(need) if need <= states[1 + i] => {}
                        _ => return Decision::Rejected(reject::INSUFFICIENT_STOCK),
                    }
                }
                let Some(next_kit) = states[0].checked_add(*qty).filter(|next| *next <= MAX_STOCK) else {
                    return Decision::Rejected(reject::STOCK_OVERFLOW);
                };
                for (i, component) in components.iter().enumerate() {
                    // Cannot overflow or underflow: checked in the loop above.
                    states[1 + i] -= qty * component.qty_per_kit;
                }
                states[0] = next_kit;
            }
        }
        Decision::Accepted
    }
}

impl Domain for Inventory {
    type Command = InventoryCommand;
    type EntityKey = StockKey;
    type State = u64;

    const SUPPORTED_VERSIONS: &'static [Version] = &[1, 2];
    const MAX_ENTITIES_PER_COMMAND: usize = 1 + MAX_KIT_COMPONENTS;

    // spec: Inventory.QuantityBounds
    // spec: Inventory.BoundsViolationIsMalformed — the first failing check, in field order.
    fn validate(command: &InventoryCommand) -> Result<(), Invalid> {
        match command {
            InventoryCommand::Transfer { sku, from_warehouse, to_warehouse, qty } => {
                validate_name("sku", sku)?;
                validate_name("from_warehouse", from_warehouse)?;
                validate_name("to_warehouse", to_warehouse)?;
                validate_range("qty", *qty, MAX_MOVEMENT_QTY)
            }
            InventoryCommand::Adjust { sku, warehouse, delta, reason } => {
                validate_name("sku", sku)?;
                validate_name("warehouse", warehouse)?;
                validate_range("|delta|", delta.unsigned_abs(), MAX_MOVEMENT_QTY)?;
                validate_reason(reason)
            }
            InventoryCommand::AssembleKit { warehouse, kit_sku, qty, components } => {
                validate_name("warehouse", warehouse)?;
                validate_name("kit_sku", kit_sku)?;
                validate_range("qty", *qty, MAX_KIT_QTY)?;
                // spec: Inventory.KitComposition
                if components.is_empty() || components.len() > MAX_KIT_COMPONENTS {
                    return Err(bound_error(
                        invalid::INVALID_KIT,
                        format!("components must have 1..={MAX_KIT_COMPONENTS} entries"),
                    ));
                }
                for (i, component) in components.iter().enumerate() {
                    validate_name("components[].sku", &component.sku)?;
                    validate_range("components[].qty_per_kit", component.qty_per_kit, MAX_KIT_QTY)?;
                    if component.sku == *kit_sku {
                        return Err(bound_error(
                            invalid::INVALID_KIT,
                            "a kit cannot be one of its own components".into(),
                        ));
                    }
                    if components[..i].iter().any(|earlier| earlier.sku == component.sku) {
                        // The SKU passed validate_name: short, and only [A-Za-z0-9._:-].
                        return Err(bound_error(
                            invalid::INVALID_KIT,
                            format!("component sku {} is listed twice", component.sku),
                        ));
                    }
                    if qty.checked_mul(component.qty_per_kit).is_none_or(|need| need > MAX_MOVEMENT_QTY) {
                        return Err(bound_error(
                            invalid::QUANTITY_OUT_OF_RANGE,
                            format!("qty * qty_per_kit must be at most {MAX_MOVEMENT_QTY}"),
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    // spec: Inventory.RestoredLevelRefused
    fn validate_state(key: &StockKey, qty: &u64) -> Result<(), InvalidState> {
        if *qty > MAX_STOCK {
            return Err(InvalidState(format!("stock level {qty} is above the {MAX_STOCK} maximum")));
        }
        validate_name("warehouse", &key.warehouse).map_err(|invalid| InvalidState(invalid.detail))?;
        validate_name("sku", &key.sku).map_err(|invalid| InvalidState(invalid.detail))
    }

    fn entities(command: &InventoryCommand, out: &mut Vec<StockKey>) {
        match command {
            InventoryCommand::Transfer { sku, from_warehouse, to_warehouse, .. } => {
                out.push(StockKey { sku: sku.clone(), warehouse: from_warehouse.clone() });
                if to_warehouse != from_warehouse {
                    out.push(StockKey { sku: sku.clone(), warehouse: to_warehouse.clone() });
                }
            }
            InventoryCommand::Adjust { sku, warehouse, .. } => {
                out.push(StockKey { sku: sku.clone(), warehouse: warehouse.clone() });
            }
            InventoryCommand::AssembleKit { warehouse, kit_sku, components, .. } => {
                out.push(StockKey { sku: kit_sku.clone(), warehouse: warehouse.clone() });
                for component in components {
                    out.push(StockKey { sku: component.sku.clone(), warehouse: warehouse.clone() });
                }
            }
        }
    }

    // spec: Registrar.OwnershipByAffinity — the SKU is the affinity key.
    fn affinity_hash(key: &StockKey) -> u64 {
        affinity_hash(key.sku.as_bytes())
    }

    fn command_digest(command: &InventoryCommand) -> u64 {
        let mut h = CanonicalHasher::new();
        match command {
            InventoryCommand::Transfer { sku, from_warehouse, to_warehouse, qty } => {
                h.tag(1).str(sku).str(from_warehouse).str(to_warehouse).u64(*qty);
            }
            InventoryCommand::Adjust { sku, warehouse, delta, reason } => {
                h.tag(2).str(sku).str(warehouse).i64(*delta).str(reason);
            }
            InventoryCommand::AssembleKit { warehouse, kit_sku, qty, components } => {
                h.tag(3).str(warehouse).str(kit_sku).u64(*qty).u64(components.len() as u64);
                for component in components {
                    h.str(&component.sku).u64(component.qty_per_kit);
                }
            }
        }
        h.finish64()
    }

    // spec: Registrar.AbsentIsZero
    fn entity_digest(key: &StockKey, qty: &u64) -> u128 {
        if *qty == 0 {
            return 0;
        }
        // spec: Registrar.LevelHash — one xxh3_128 over the canonical bytes (u32 LE
        // length and bytes of the warehouse, of the SKU, then u64 LE qty), built on the
        // stack: names are at most 64 bytes, so 144 bytes always fit.
        let mut bytes = [0u8; 4 + MAX_NAME_BYTES + 4 + MAX_NAME_BYTES + 8];
        let mut at = 0;
        for name in [key.warehouse.as_bytes(), key.sku.as_bytes()] {
            bytes[at..at + 4].copy_from_slice(&(name.len() as u32).to_le_bytes());
            bytes[at + 4..at + 4 + name.len()].copy_from_slice(name);
            at += 4 + name.len();
        }
        bytes[at..at + 8].copy_from_slice(&qty.to_le_bytes());
        xxh3_128(&bytes[..at + 8])
    }

    fn evaluate(
        version: Version,
        keys: &[StockKey],
        states: &mut [u64],
        command: &InventoryCommand,
        _stream_time_ms: StreamTimeMs,
        body: &mut Vec<u8>,
    ) -> Decision {
        debug_assert_eq!(keys.len(), states.len());
        let decision = Self::decide(version, states, command);
        // On rejection `decide` returned before mutating, so these are the unchanged levels.
        let levels: SmallVec<[StockLevelRef<'_>; 4]> = keys
            .iter()
            .zip(states.iter())
            .map(|(key, qty)| StockLevelRef { warehouse: &key.warehouse, sku: &key.sku, qty: *qty })
            .collect();
        let event = match (decision, command) {
            (Decision::Rejected(_), _) => None,
            (Decision::Accepted, InventoryCommand::Transfer { qty, .. }) => {
                Some(InventoryEventRef::StockMoved { from: 0, to: 1, qty: *qty })
            }
            (Decision::Accepted, InventoryCommand::Adjust { delta, reason, .. }) => {
                Some(InventoryEventRef::StockAdjusted { level: 0, delta: *delta, reason })
            }
            (Decision::Accepted, InventoryCommand::AssembleKit { qty, .. }) => {
                Some(InventoryEventRef::KitAssembled { kit: 0, qty: *qty })
            }
        };
        encode_body(&InventoryBodyRef { levels: &levels, event }, body);
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(sku: &str, from: &str, to: &str, qty: u64) -> InventoryCommand {
        InventoryCommand::Transfer { sku: sku.into(), from_warehouse: from.into(), to_warehouse: to.into(), qty }
    }

    fn run(version: Version, command: &InventoryCommand, states: &mut Vec<u64>) -> (Decision, InventoryBody) {
        let mut keys = Vec::new();
        Inventory::entities(command, &mut keys);
        states.resize(keys.len(), 0);
        let mut body = Vec::new();
        let decision = Inventory::evaluate(version, &keys, states, command, 0, &mut body);
        (decision, InventoryBody::decode(&body).unwrap())
    }

    #[test]
    fn transfer_moves_and_conserves() {
        // spec: Inventory.TransferMovesStock
        // spec: Inventory.TransferConservesSku
        let mut states = vec![10, 5];
        let (decision, body) = run(1, &transfer("S", "A", "B", 4), &mut states);
        assert_eq!(decision, Decision::Accepted);
        assert_eq!(states, vec![6, 9]);
        assert_eq!(body.levels.iter().map(|l| l.qty).sum::<u64>(), 15);
        assert!(matches!(body.event, Some(InventoryEvent::StockMoved { qty: 4, .. })));
    }

    #[test]
    fn transfer_without_stock_is_rejected_and_changes_nothing() {
        // spec: Inventory.NoNegativeStock
        let mut states = vec![3, 0];
        let (decision, body) = run(1, &transfer("S", "A", "B", 4), &mut states);
        assert_eq!(decision, Decision::Rejected(reject::INSUFFICIENT_STOCK));
        assert_eq!(states, vec![3, 0]);
        assert!(body.event.is_none());
        assert_eq!(body.levels[0].qty, 3);
    }

    #[test]
    fn transfer_to_same_warehouse_is_rejected() {
        let mut states = vec![3];
        let (decision, _) = run(1, &transfer("S", "A", "A", 1), &mut states);
        assert_eq!(decision, Decision::Rejected(reject::SAME_WAREHOUSE));
    }

    #[test]
    fn transfer_past_max_stock_is_rejected() {
        let mut states = vec![10, MAX_STOCK - 5];
        let (decision, _) = run(1, &transfer("S", "A", "B", 6), &mut states);
        assert_eq!(decision, Decision::Rejected(reject::STOCK_OVERFLOW));
        assert_eq!(states, vec![10, MAX_STOCK - 5]);
    }

    #[test]
    fn adjust_below_zero_is_rejected() {
        // spec: Inventory.AdjustAppliesDelta
        let adjust =
            |delta| InventoryCommand::Adjust { sku: "S".into(), warehouse: "A".into(), delta, reason: "count".into() };
        let mut states = vec![5];
        assert_eq!(run(1, &adjust(-6), &mut states).0, Decision::Rejected(reject::INSUFFICIENT_STOCK));
        assert_eq!(states, vec![5]);
        assert_eq!(run(1, &adjust(-5), &mut states).0, Decision::Accepted);
        assert_eq!(states, vec![0]);
        assert_eq!(run(1, &adjust(7), &mut states).0, Decision::Accepted);
        assert_eq!(states, vec![7]);
    }

    #[test]
    fn version_2_requires_an_adjust_reason() {
        // spec: Inventory.ReasonRequiredFromV2
        let command = InventoryCommand::Adjust { sku: "S".into(), warehouse: "A".into(), delta: 1, reason: "".into() };
        assert_eq!(run(1, &command, &mut vec![0]).0, Decision::Accepted);
        assert_eq!(run(2, &command, &mut vec![0]).0, Decision::Rejected(reject::REASON_REQUIRED));
    }

    #[test]
    fn kit_assembly_is_all_or_nothing() {
        // spec: Inventory.AssembleKitAtomic
        let kit = InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty: 2,
            components: vec![
                KitComponent { sku: "C1".into(), qty_per_kit: 1 },
                KitComponent { sku: "C2".into(), qty_per_kit: 3 },
            ],
        };
        let mut states = vec![0, 2, 5];
        assert_eq!(run(1, &kit, &mut states).0, Decision::Rejected(reject::INSUFFICIENT_STOCK));
        assert_eq!(states, vec![0, 2, 5]);
        let mut states = vec![1, 2, 6];
        assert_eq!(run(1, &kit, &mut states).0, Decision::Accepted);
        assert_eq!(states, vec![3, 0, 0]);
    }

    #[test]
    fn bounds_are_validated() {
        // spec: Inventory.QuantityBounds
        assert!(Inventory::validate(&transfer("S", "A", "B", 0)).is_err());
        assert!(Inventory::validate(&transfer("S", "A", "B", MAX_MOVEMENT_QTY + 1)).is_err());
        assert!(Inventory::validate(&transfer("", "A", "B", 1)).is_err());
        assert!(Inventory::validate(&transfer("S S", "A", "B", 1)).is_err());
        assert!(Inventory::validate(&transfer(&"x".repeat(65), "A", "B", 1)).is_err());
        assert!(Inventory::validate(&transfer("S", "A", "B", 1)).is_ok());
        let kit = |components: Vec<KitComponent>| InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty: 1,
            components,
        };
        let c = |sku: &str| KitComponent { sku: sku.into(), qty_per_kit: 1 };
        assert!(Inventory::validate(&kit(vec![])).is_err());
        assert!(Inventory::validate(&kit(vec![c("C1"), c("C1")])).is_err());
        assert!(Inventory::validate(&kit(vec![c("KIT")])).is_err());
        assert!(Inventory::validate(&kit((0..17).map(|i| c(&format!("C{i}"))).collect())).is_err());
        assert!(Inventory::validate(&kit(vec![c("C1"), c("C2")])).is_ok());
    }

    fn code(command: &InventoryCommand) -> Result<(), &'static str> {
        Inventory::validate(command).map_err(|invalid| invalid.code)
    }

    #[test]
    fn each_broken_bound_has_its_code() {
        // spec: Inventory.BoundsViolationIsMalformed
        // spec: Inventory.IdentifierBounds
        // spec: Inventory.KitComposition
        assert_eq!(code(&transfer("S", "A", "B", 0)), Err(invalid::QUANTITY_OUT_OF_RANGE));
        assert_eq!(code(&transfer("S", "A", "B", MAX_MOVEMENT_QTY + 1)), Err(invalid::QUANTITY_OUT_OF_RANGE));
        assert_eq!(code(&transfer("", "A", "B", 1)), Err(invalid::INVALID_NAME));
        assert_eq!(code(&transfer("S", "A/B", "B", 1)), Err(invalid::INVALID_NAME));
        assert_eq!(code(&transfer("S", "A", &"x".repeat(MAX_NAME_BYTES + 1), 1)), Err(invalid::INVALID_NAME));
        assert_eq!(code(&transfer(&"x".repeat(MAX_NAME_BYTES), "A", "B", 1)), Ok(()));
        // Names are checked before quantities: the first failing check gives the code.
        assert_eq!(code(&transfer("S S", "A", "B", 0)), Err(invalid::INVALID_NAME));
        let kit = |components: Vec<KitComponent>| InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty: 1,
            components,
        };
        let c = |sku: &str| KitComponent { sku: sku.into(), qty_per_kit: 1 };
        assert_eq!(code(&kit(vec![])), Err(invalid::INVALID_KIT));
        assert_eq!(code(&kit(vec![c("C1"), c("C1")])), Err(invalid::INVALID_KIT));
        assert_eq!(code(&kit(vec![c("KIT")])), Err(invalid::INVALID_KIT));
        assert_eq!(code(&kit((0..17).map(|i| c(&format!("C{i}"))).collect())), Err(invalid::INVALID_KIT));
        assert_eq!(code(&kit((0..16).map(|i| c(&format!("C{i}"))).collect())), Ok(()));
        assert_eq!(code(&kit(vec![c("C 1")])), Err(invalid::INVALID_NAME));
        let zero = KitComponent { sku: "C1".into(), qty_per_kit: 0 };
        assert_eq!(code(&kit(vec![zero])), Err(invalid::QUANTITY_OUT_OF_RANGE));
    }

    #[test]
    fn kit_qty_times_qty_per_kit_is_bounded() {
        // spec: Inventory.QuantityBounds — each factor alone is within max_kit_qty; only the
        // product breaks max_move_qty.
        let kit = |qty, qty_per_kit| InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty,
            components: vec![
                KitComponent { sku: "C1".into(), qty_per_kit: 1 },
                KitComponent { sku: "C2".into(), qty_per_kit },
            ],
        };
        assert_eq!(MAX_KIT_QTY * 1_000, MAX_MOVEMENT_QTY);
        assert_eq!(code(&kit(1_000, MAX_KIT_QTY)), Ok(()));
        assert_eq!(code(&kit(1_001, MAX_KIT_QTY)), Err(invalid::QUANTITY_OUT_OF_RANGE));
        assert_eq!(code(&kit(MAX_KIT_QTY, 1_001)), Err(invalid::QUANTITY_OUT_OF_RANGE));
    }

    #[test]
    fn reason_is_at_most_256_printable_ascii_bytes() {
        // spec: Inventory.ReasonBound
        let adjust = |reason: &str| InventoryCommand::Adjust {
            sku: "S".into(),
            warehouse: "A".into(),
            delta: 1,
            reason: reason.into(),
        };
        assert_eq!(code(&adjust(&"r".repeat(MAX_REASON_BYTES))), Ok(()));
        assert_eq!(code(&adjust(&"r".repeat(MAX_REASON_BYTES + 1))), Err(invalid::INVALID_REASON));
        assert_eq!(code(&adjust("")), Ok(()), "empty is a bound question only from v2, at evaluation");
        assert_eq!(code(&adjust("damaged, box 3 (see #12) ~ ok")), Ok(()));
        for bad in ["a\0b", "line\nbreak", "tab\t", "del\u{7f}", "besch\u{e4}digt", "\u{202e}rtl"] {
            assert_eq!(code(&adjust(bad)), Err(invalid::INVALID_REASON), "{bad:?}");
        }
    }

    #[test]
    fn corrupt_levels_never_wrap() {
        // spec: Inventory.CheckedArithmetic
        // spec: Inventory.TransferOverflowRejected
        // spec: Inventory.AssembleKitOverflowRejected
        // States as a corrupt disk could restore them: far above MAX_STOCK.
        let mut states = vec![10, u64::MAX - 1];
        let (decision, _) = run(1, &transfer("S", "A", "B", 5), &mut states);
        assert_eq!(decision, Decision::Rejected(reject::STOCK_OVERFLOW));
        assert_eq!(states, vec![10, u64::MAX - 1]);
        let kit = InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty: 2,
            components: vec![KitComponent { sku: "C1".into(), qty_per_kit: 1 }],
        };
        let mut states = vec![u64::MAX, 5];
        assert_eq!(run(1, &kit, &mut states).0, Decision::Rejected(reject::STOCK_OVERFLOW));
        assert_eq!(states, vec![u64::MAX, 5]);
        // A need past u64 (never valid, but evaluate must not trust validation) is more than any stock.
        let greedy = InventoryCommand::AssembleKit {
            warehouse: "A".into(),
            kit_sku: "KIT".into(),
            qty: u64::MAX / 2,
            components: vec![KitComponent { sku: "C1".into(), qty_per_kit: 3 }],
        };
        let mut states = vec![0, u64::MAX];
        assert_eq!(run(1, &greedy, &mut states).0, Decision::Rejected(reject::INSUFFICIENT_STOCK));
        assert_eq!(states, vec![0, u64::MAX]);
    }

    #[test]
    fn restored_states_are_validated() {
        // spec: Inventory.RestoredLevelRefused
        // spec: Inventory.StockBelowMax
        let key = StockKey::new("WH-A", "SKU-1");
        assert!(Inventory::validate_state(&key, &0).is_ok());
        assert!(Inventory::validate_state(&key, &MAX_STOCK).is_ok());
        let error = Inventory::validate_state(&key, &(MAX_STOCK + 1)).unwrap_err();
        assert!(error.to_string().contains("above"), "{error}");
        assert!(Inventory::validate_state(&StockKey::new("WH A", "SKU-1"), &1).is_err());
        assert!(Inventory::validate_state(&StockKey::new("WH-A", ""), &1).is_err());
        assert!(Inventory::validate_state(&StockKey::new(&"w".repeat(MAX_NAME_BYTES + 1), "S"), &1).is_err());
    }

    fn encode(levels: &[StockLevelRef<'_>], event: Option<InventoryEventRef<'_>>) -> Vec<u8> {
        let mut body = Vec::new();
        encode_body(&InventoryBodyRef { levels, event }, &mut body);
        body
    }

    #[test]
    fn an_event_level_index_out_of_range_is_an_error() {
        // spec: Inventory.CanonicalBody
        let levels = [StockLevelRef { warehouse: "A", sku: "S", qty: 1 }];
        let ok = encode(&levels, Some(InventoryEventRef::KitAssembled { kit: 0, qty: 1 }));
        assert!(InventoryBody::decode(&ok).is_ok());
        for event in [
            InventoryEventRef::StockMoved { from: 0, to: 1, qty: 1 },
            InventoryEventRef::StockAdjusted { level: 1, delta: 1, reason: "" },
            InventoryEventRef::KitAssembled { kit: 200, qty: 1 },
        ] {
            let bytes = encode(&levels, Some(event));
            let error = InventoryBody::decode(&bytes).unwrap_err();
            assert!(error.to_string().contains("out of range"), "{error}");
        }
    }

    #[test]
    fn only_the_canonical_body_decodes() {
        // spec: Inventory.CanonicalBody
        let levels =
            [StockLevelRef { warehouse: "A", sku: "S", qty: 1 }, StockLevelRef { warehouse: "B", sku: "S", qty: 2 }];
        let bytes = encode(&levels, Some(InventoryEventRef::KitAssembled { kit: 1, qty: 3 }));
        assert!(InventoryBody::decode(&bytes).is_ok());
        let mut prefixed = vec![0x5A; 8];
        prefixed.extend_from_slice(&bytes);
        assert_eq!(InventoryBody::decode(&prefixed).unwrap_err(), BodyDecodeError::NotCanonical);
        // KitAssembled is smaller than StockAdjusted, so the event payload has unused bytes
        // that validation alone would accept whatever they hold.
        let mut stray = 0;
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x40;
            if rkyv::access::<ArchivedInventoryBodyRef<'_>, rkyv::rancor::Error>(&changed).is_ok() {
                match InventoryBody::decode(&changed) {
                    Err(BodyDecodeError::NotCanonical) => stray += 1,
                    Err(BodyDecodeError::Invalid(_)) => {}
                    // A change that rkyv accepts and that is canonical is a different value.
                    Ok(decoded) => assert_ne!(decoded, InventoryBody::decode(&bytes).unwrap(), "byte {i}"),
                }
            }
        }
        assert!(stray > 0, "some byte changes pass rkyv's validation and only the canonical check refuses them");
    }

    #[test]
    fn level_hash_is_xxh3_128_of_the_canonical_bytes() {
        // spec: Registrar.LevelHash
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&4u32.to_le_bytes());
        bytes.extend_from_slice(b"WH-1");
        bytes.extend_from_slice(&5u32.to_le_bytes());
        bytes.extend_from_slice(b"SKU-9");
        bytes.extend_from_slice(&42u64.to_le_bytes());
        assert_eq!(Inventory::entity_digest(&StockKey::new("WH-1", "SKU-9"), &42), xxh3_128(&bytes));
        let long = "x".repeat(MAX_NAME_BYTES);
        assert_ne!(Inventory::entity_digest(&StockKey::new(&long, &long), &1), 0);
    }

    #[test]
    fn unknown_pairs_start_at_zero_and_zero_digests_as_absent() {
        // spec: Inventory.UnknownPairStartsAtZero
        // spec: Registrar.AbsentIsZero
        assert_eq!(Inventory::entity_digest(&StockKey::new("A", "S"), &0), 0);
        assert_ne!(Inventory::entity_digest(&StockKey::new("A", "S"), &1), 0);
        let mut states = vec![];
        assert_eq!(run(1, &transfer("S", "A", "B", 1), &mut states).0, Decision::Rejected(reject::INSUFFICIENT_STOCK));
    }

    #[test]
    fn command_digest_ignores_json_layout() {
        let a: InventoryCommand =
            serde_json::from_str(r#"{"type":"transfer","sku":"S","from_warehouse":"A","to_warehouse":"B","qty":1}"#)
                .unwrap();
        let b: InventoryCommand = serde_json::from_str(
            r#"{ "qty": 1, "to_warehouse":"B", "from_warehouse":"A", "sku":"S", "type":"transfer" }"#,
        )
        .unwrap();
        assert_eq!(Inventory::command_digest(&a), Inventory::command_digest(&b));
        assert_ne!(Inventory::command_digest(&a), Inventory::command_digest(&transfer("S", "A", "B", 2)));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r = serde_json::from_str::<InventoryCommand>(
            r#"{"type":"transfer","sku":"S","from_warehouse":"A","to_warehouse":"B","qty":1,"extra":1}"#,
        );
        assert!(r.is_err());
    }
}
