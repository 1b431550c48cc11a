//! Runs N single-shard transfers (decoded) through the core once, for instruction
//! counting under `valgrind --tool=callgrind`, which, unlike wall-clock time on a
//! shared VM, repeats exactly. Instructions per event = (count at 2N - count at N) / N.
//!
//! `cargo build --release --example core_instructions -p tribunal-shards`
//! `valgrind --tool=callgrind target/release/examples/core_instructions 20000 [kits%] [shards]`

use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::{Inventory, InventoryCommand, KitComponent};
use tribunal_shards::simulator::{Simulator, SimulatorConfig};
use tribunal_shards::usher::Decoded;
use tribunal_shards::warden::WardenConfig;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("numeric arguments")).collect();
    let events = args.first().copied().unwrap_or(20_000);
    let kit_pct = args.get(1).copied().unwrap_or(0);
    let shards = args.get(2).copied().unwrap_or(1) as u16;
    let mut config = SimulatorConfig::new(shards, WardenConfig::default(), 1);
    config.keep_outputs = false;
    let mut sim = Simulator::<Inventory>::new(config);
    let mut offset = 0u64;
    let mut batch = Vec::new();
    let mut push = |sim: &mut Simulator<Inventory>, batch: &mut Vec<Decoded<Inventory>>, command, flush: bool| {
        batch.push(Decoded {
            offset,
            timestamp_ms: offset / 10,
            envelope: Ok(Envelope::domain(format!("k{offset}"), command)),
        });
        offset += 1;
        if flush || batch.len() == 1_000 {
            sim.process_decoded(0, std::mem::take(batch)).unwrap();
        }
    };
    for s in 0..100u64 {
        for w in 0..10u64 {
            let c = InventoryCommand::Adjust {
                sku: format!("SKU-{s}").into(),
                warehouse: format!("WH-{w}").into(),
                delta: 1_000_000,
                reason: "seed".into(),
            };
            push(&mut sim, &mut batch, c, s == 99 && w == 9);
        }
    }
    let mut x = 7u64;
    for i in 0..events {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = x >> 33;
        let c = if r % 100 < kit_pct {
            InventoryCommand::AssembleKit {
                warehouse: format!("WH-{}", r % 10).into(),
                kit_sku: format!("KIT-{}", r % 100).into(),
                qty: 1,
                components: (1..=3u64)
                    .map(|j| KitComponent { sku: format!("SKU-{}", (r + j * 7) % 100).into(), qty_per_kit: 1 })
                    .collect(),
            }
        } else {
            InventoryCommand::Transfer {
                sku: format!("SKU-{}", r % 100).into(),
                from_warehouse: format!("WH-{}", r % 10).into(),
                to_warehouse: format!("WH-{}", (r + 1 + (r >> 8) % 9) % 10).into(),
                qty: 1,
            }
        };
        push(&mut sim, &mut batch, c, i + 1 == events);
    }
    assert_eq!(sim.outputs_seen(), 1_000 + events);
}
