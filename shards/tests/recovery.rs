//! Deterministic crash simulation: run a log through the core with an in-memory
//! Ledger, crash (cut every shard's Ledger at an arbitrary byte, sometimes corrupt a
//! byte), recover, resume from the durable watermark + 1, crash and recover once more,
//! and finish. Every offset's output, durable before the crash or produced after it,
//! and the final state must equal the sequential reference's: nothing lost, nothing
//! applied twice.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::{Inventory, InventoryCommand, KitComponent};
use tribunal_shards::ledger::{scan, LedgerRecord};
use tribunal_shards::recovery::{recover, Recovered, SegmentScan, ShardLog};
use tribunal_shards::reference::Reference;
use tribunal_shards::simulator::{Simulator, SimulatorConfig};
use tribunal_shards::usher::{Record, UsherConfig};
use tribunal_shards::warden::WardenConfig;

const WAREHOUSES: &[&str] = &["A", "B", "C"];
const SKUS: &[&str] = &["S1", "S2", "S3", "S4", "S5", "S6"];

fn log(seed: u64, len: usize) -> Vec<Record> {
    let mut x = seed | 1;
    let mut next = |bound: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % bound
    };
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for i in 0..len {
        let roll = next(100);
        let payload = if roll < 8 && !payloads.is_empty() {
            payloads[next(payloads.len() as u64) as usize].clone()
        } else if roll < 11 {
            b"\xffnot a record".to_vec()
        } else {
            let command = match roll % 4 {
                0 => InventoryCommand::Adjust {
                    sku: SKUS[next(6) as usize].into(),
                    warehouse: WAREHOUSES[next(3) as usize].into(),
                    delta: next(40) as i64 - 10,
                    reason: "count".into(),
                },
                1 => InventoryCommand::AssembleKit {
                    warehouse: WAREHOUSES[next(3) as usize].into(),
                    kit_sku: "KIT".into(),
                    qty: 1,
                    components: vec![
                        KitComponent { sku: SKUS[0].into(), qty_per_kit: 1 },
                        KitComponent { sku: SKUS[3 + next(3) as usize].into(), qty_per_kit: 2 },
                    ],
                },
                _ => InventoryCommand::Transfer {
                    sku: SKUS[next(6) as usize].into(),
                    from_warehouse: WAREHOUSES[next(3) as usize].into(),
                    to_warehouse: WAREHOUSES[next(3) as usize].into(),
                    qty: 1 + next(8),
                },
            };
            let command = match command {
                InventoryCommand::Adjust { delta: 0, sku, warehouse, reason } => {
                    InventoryCommand::Adjust { delta: 5, sku, warehouse, reason }
                }
                other => other,
            };
            Envelope::<Inventory>::domain(format!("k{i}"), command).encode()
        };
        payloads.push(payload);
    }
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Record { partition: 0, offset: i as u64, timestamp_ms: (i as u64) * 7, payload })
        .collect()
}

const WARDEN: WardenConfig = WardenConfig { ttl_ms: 200, max_entries: 1_000_000 };

fn config(shards: u16, seed: u64) -> SimulatorConfig {
    SimulatorConfig::new(shards, WARDEN, seed)
}

fn recover_from(ledgers: &[Vec<u8>], shards: u16) -> Recovered<Inventory> {
    let logs = ledgers
        .iter()
        .enumerate()
        .map(|(shard, bytes)| {
            let (records, end) = scan::<Inventory>(bytes);
            ShardLog { shard: shard as u16, segments: vec![SegmentScan { segment: 0, records, end }] }
        })
        .collect();
    let usher = |partition| UsherConfig { partition, shard_count: shards, warden: WARDEN, initial_version: 1 };
    recover(shards, usher, logs, BTreeMap::new()).expect("the Ledger is recoverable")
}

/// Outputs durable in the kept part of the Ledger, by offset.
fn durable_outputs(ledgers: &[Vec<u8>], recovered: &Recovered<Inventory>) -> BTreeMap<u64, Vec<u8>> {
    let watermark = recovered.watermarks.get(&0).copied();
    let mut outputs = BTreeMap::new();
    for bytes in ledgers {
        for scanned in scan::<Inventory>(bytes).0 {
            if let LedgerRecord::Entry { offset, output, .. } = scanned.record {
                if watermark.is_some_and(|w| offset <= w) {
                    outputs.insert(offset, output);
                }
            }
        }
    }
    outputs
}

/// Applies the recovery's cuts: what a restarted process keeps of each shard's Ledger.
fn apply_cuts(ledgers: &[Vec<u8>], recovered: &Recovered<Inventory>) -> Vec<Vec<u8>> {
    ledgers
        .iter()
        .enumerate()
        .map(|(shard, bytes)| match recovered.cuts.iter().find(|c| c.shard as usize == shard) {
            Some(cut) => bytes[..cut.position].to_vec(),
            None => bytes.clone(),
        })
        .collect()
}

fn crash(ledgers: &[Vec<u8>], cut_fractions: &[u16], flip: Option<(usize, u16)>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = ledgers
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let keep = bytes.len() * cut_fractions[i % cut_fractions.len()] as usize / 1000;
            bytes[..keep.max(bytes.len().min(1))].to_vec()
        })
        .collect();
    if let Some((shard, at)) = flip {
        let bytes = &mut out[shard % ledgers.len()];
        if !bytes.is_empty() {
            let last = bytes.len() - 1;
            let i = (bytes.len() * at as usize / 1000).min(last);
            bytes[i] ^= 0x40;
        }
    }
    out
}

fn run_batches(sim: &mut Simulator<Inventory>, records: &[Record], batch: usize) {
    for chunk in records.chunks(batch) {
        sim.process_batch(chunk).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// spec: Recovery.TornTailTruncated
    /// spec: Recovery.DurableWatermarkRecomputed
    /// spec: Recovery.ReplayBoundedByWatermark
    /// spec: Recovery.RegistrarRebuilt
    /// spec: Recovery.WardenRebuilt
    /// spec: Recovery.InputResumesAfterWatermark
    #[test]
    fn crash_anywhere_recover_and_finish_like_the_reference(
        seed in any::<u64>(),
        len in 20usize..300,
        shards in 1u16..=4,
        batch in 1usize..40,
        first_crash_pct in 0u64..100,
        cuts1 in proptest::collection::vec(0u16..=1000, 4),
        cuts2 in proptest::collection::vec(0u16..=1000, 4),
        flip in proptest::option::of((0usize..4, 0u16..1000)),
    ) {
        let records = log(seed, len);
        let mut reference = Reference::<Inventory>::new(WARDEN, 1);
        let expected: Vec<Vec<u8>> = records.iter().map(|r| reference.apply(r).unwrap().bytes).collect();

        // Run up to the first crash.
        let crash_at = (len as u64 * first_crash_pct / 100) as usize;
        let mut sim = Simulator::<Inventory>::new(config(shards, seed)).with_ledgers();
        run_batches(&mut sim, &records[..crash_at], batch);
        let ledgers = crash(sim.ledgers().unwrap(), &cuts1, flip);

        // Recover and run to a second crash half-way through the rest.
        let recovered = recover_from(&ledgers, shards);
        let mut outputs = durable_outputs(&ledgers, &recovered);
        let resume = recovered.watermarks.get(&0).map_or(0, |w| w + 1) as usize;
        prop_assert!(resume <= crash_at, "the watermark never passes what was processed");
        let kept = apply_cuts(&ledgers, &recovered);
        let second_crash = resume + (len - resume) / 2;
        let mut sim = Simulator::from_recovered(config(shards, seed ^ 1), recovered).with_ledgers();
        run_batches(&mut sim, &records[resume..second_crash], batch);
        let combined: Vec<Vec<u8>> =
            kept.iter().zip(sim.ledgers().unwrap()).map(|(a, b)| [a.as_slice(), b.as_slice()].concat()).collect();
        let ledgers = crash(&combined, &cuts2, None);

        // Recover again and finish.
        let recovered = recover_from(&ledgers, shards);
        outputs.extend(durable_outputs(&ledgers, &recovered));
        let resume = recovered.watermarks.get(&0).map_or(0, |w| w + 1) as usize;
        let mut sim = Simulator::from_recovered(config(shards, seed ^ 2), recovered);
        run_batches(&mut sim, &records[resume..], batch);
        for (&(_, offset), output) in sim.outputs() {
            outputs.insert(offset, output.bytes.clone());
        }

        prop_assert_eq!(outputs.len(), len, "every offset has exactly one output");
        for (offset, bytes) in &outputs {
            prop_assert_eq!(bytes, &expected[*offset as usize], "output at offset {} differs", offset);
        }
        prop_assert_eq!(sim.state_digest(), reference.state_digest(), "final state differs");
    }
}

#[test]
fn a_halt_leaves_nothing_of_the_halting_record_in_the_journal() {
    // spec: Versioning.UnknownVersionHalts
    // spec: Recovery.WardenRebuilt
    // The halting record must not reach the journal: a restart re-reads it and must
    // halt there again, not trip over a Warden that already saw it.
    use tribunal_shards::envelope::AdminCommand;
    let adjust = InventoryCommand::Adjust { sku: "S1".into(), warehouse: "A".into(), delta: 5, reason: "r".into() };
    let payloads = [
        Envelope::<Inventory>::domain("k0", adjust).encode(),
        Envelope::<Inventory>::admin("upgrade", AdminCommand::ActivateVersion { version: 9 }).encode(),
    ];
    let records: Vec<Record> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Record { partition: 0, offset: i as u64, timestamp_ms: 10 * i as u64, payload })
        .collect();
    for shards in [1u16, 2] {
        let mut sim = Simulator::<Inventory>::new(config(shards, 1)).with_ledgers();
        let halted = sim.process_batch(&records).unwrap_err();
        assert_eq!(halted.offset, 1);
        let recovered = recover_from(sim.ledgers().unwrap(), shards);
        assert_eq!(recovered.watermarks.get(&0), Some(&0));
        let mut sim = Simulator::from_recovered(config(shards, 2), recovered);
        let again = sim.process_batch(&records[1..]).unwrap_err();
        assert_eq!(again.offset, 1, "the restarted instance halts at the same record");
    }
}
