//! In-process evaluation throughput of the sans-IO core, on one thread.
//!
//! Figures are events per second per core: everything (Usher, Warden, router, every
//! shard's Arbiter, output encoding and digests) runs on the bench thread.
//! - `transfers_decoded`: single-shard transfers from decoded envelopes, 1 shard.
//! - `kit_mix_10pct_decoded/{1,2}`: 90% transfers, 10% three-component kits; with 2
//!   shards most kits are cross-shard (lend, evaluate, write back).
//! - `transfers_from_json`: as `transfers_decoded`, plus JSON decoding of each record.
//! - `json_decode`: decoding alone.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput};
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::{Inventory, InventoryCommand, KitComponent};
use tribunal_shards::simulator::{Simulator, SimulatorConfig};
use tribunal_shards::usher::{Decoded, Record, Usher, UsherConfig};
use tribunal_shards::warden::WardenConfig;

const EVENTS: usize = 100_000;
const BATCH: usize = 1_000;
const SKUS: usize = 1_000;
const WAREHOUSES: usize = 10;

/// Small deterministic PRNG so every run benchmarks the same log.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound
    }
}

fn sku(i: usize) -> String {
    format!("SKU-{i:05}")
}
fn warehouse(i: usize) -> String {
    format!("WH-{i:02}")
}

/// Seed stock: one adjustment per (warehouse, SKU), so transfers are mostly accepted.
fn seed_log() -> Vec<Envelope<Inventory>> {
    let mut out = Vec::new();
    for s in 0..SKUS {
        for w in 0..WAREHOUSES {
            out.push(Envelope::domain(
                format!("seed-{s}-{w}"),
                InventoryCommand::Adjust {
                    sku: sku(s).into(),
                    warehouse: warehouse(w).into(),
                    delta: 1_000_000,
                    reason: "seed".into(),
                },
            ));
        }
    }
    out
}

fn workload(kit_share_pct: usize) -> Vec<Envelope<Inventory>> {
    let mut rng = Lcg(42);
    (0..EVENTS)
        .map(|i| {
            let command = if rng.next(100) < kit_share_pct {
                let kit = rng.next(SKUS);
                let components =
                    (1..=3).map(|j| KitComponent { sku: sku((kit + j * 7) % SKUS).into(), qty_per_kit: 1 }).collect();
                InventoryCommand::AssembleKit {
                    warehouse: warehouse(rng.next(WAREHOUSES)).into(),
                    kit_sku: format!("KIT-{kit}").into(),
                    qty: 1,
                    components,
                }
            } else {
                let from = rng.next(WAREHOUSES);
                let to = (from + 1 + rng.next(WAREHOUSES - 1)) % WAREHOUSES;
                InventoryCommand::Transfer {
                    sku: sku(rng.next(SKUS)).into(),
                    from_warehouse: warehouse(from).into(),
                    to_warehouse: warehouse(to).into(),
                    qty: 1 + rng.next(5) as u64,
                }
            };
            Envelope::domain(format!("req-{i:08}"), command)
        })
        .collect()
}

fn seeded_simulator(shards: u16) -> Simulator<Inventory> {
    let mut config = SimulatorConfig::new(shards, WardenConfig::default(), 1);
    config.keep_outputs = false;
    let mut sim = Simulator::new(config);
    let seed = seed_log();
    for (i, chunk) in seed.chunks(BATCH).enumerate() {
        let decoded = chunk
            .iter()
            .enumerate()
            .map(|(j, e)| Decoded { offset: (i * BATCH + j) as u64, timestamp_ms: 0, envelope: Ok(e.clone()) })
            .collect();
        sim.process_decoded(0, decoded).unwrap();
    }
    sim
}

fn run_decoded(sim: &mut Simulator<Inventory>, events: Vec<Envelope<Inventory>>) {
    let base = (SKUS * WAREHOUSES) as u64;
    let mut iter = events.into_iter().enumerate().peekable();
    while iter.peek().is_some() {
        let batch: Vec<_> = iter
            .by_ref()
            .take(BATCH)
            .map(|(i, e)| Decoded { offset: base + i as u64, timestamp_ms: (i / 10) as u64, envelope: Ok(e) })
            .collect();
        sim.process_decoded(0, batch).unwrap();
    }
}

/// Plans `events` in batches with the Usher alone; how many shard messages it made.
fn plan_only(mut usher: Usher<Inventory>, events: Vec<Envelope<Inventory>>) -> usize {
    let mut iter = events.into_iter().enumerate().peekable();
    let mut messages = 0usize;
    while iter.peek().is_some() {
        let batch: Vec<_> = iter
            .by_ref()
            .take(BATCH)
            .map(|(i, e)| Decoded { offset: i as u64, timestamp_ms: (i / 10) as u64, envelope: Ok(e) })
            .collect();
        messages += usher.plan_decoded(batch).unwrap().messages.len();
    }
    messages
}

/// Benchmarks from JSON records: the whole core (`transfers_from_json`), and the
/// decoding alone (`json_decode`).
fn bench_json(group: &mut BenchmarkGroup<'_, WallTime>, transfers: &[Envelope<Inventory>]) {
    let base = (SKUS * WAREHOUSES) as u64;
    let records: Vec<Record> = transfers
        .iter()
        .enumerate()
        .map(|(i, e)| Record {
            partition: 0,
            offset: base + i as u64,
            timestamp_ms: (i / 10) as u64,
            payload: e.encode(),
        })
        .collect();
    group.bench_function("transfers_from_json", |b| {
        b.iter_batched(
            || seeded_simulator(1),
            |mut sim| {
                for batch in records.chunks(BATCH) {
                    sim.process_batch(batch).unwrap();
                }
                sim
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| records.iter().filter(|r| Envelope::<Inventory>::decode(&r.payload).is_ok()).count())
    });
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("core");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));

    let transfers = workload(0);
    group.bench_function("transfers_decoded", |b| {
        b.iter_batched(
            || (seeded_simulator(1), transfers.clone()),
            |(mut sim, events)| run_decoded(&mut sim, events),
            BatchSize::PerIteration,
        )
    });

    // Stage breakdown: the Usher's part alone (stream time, Warden, router, dispatch
    // plan); the messages are dropped instead of evaluated.
    group.bench_function("usher_only_transfers", |b| {
        b.iter_batched(
            || {
                let usher = Usher::<Inventory>::new(UsherConfig {
                    partition: 0,
                    shard_count: 1,
                    warden: WardenConfig::default(),
                    initial_version: 1,
                });
                (usher, transfers.clone())
            },
            |(usher, events)| plan_only(usher, events),
            BatchSize::PerIteration,
        )
    });

    let mix = workload(10);
    for shards in [1u16, 2] {
        group.bench_function(format!("kit_mix_10pct_decoded/{shards}"), |b| {
            b.iter_batched(
                || (seeded_simulator(shards), mix.clone()),
                |(mut sim, events)| run_decoded(&mut sim, events),
                BatchSize::PerIteration,
            )
        });
    }

    bench_json(&mut group, &transfers);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
