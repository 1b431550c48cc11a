//! `tribunal sample`: a deterministic mixed workload (adjustments to stock the
//! warehouses, then transfers, kit assemblies, duplicate submissions and a few
//! conflicting key reuses), one JSON envelope per line.

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::{Inventory, InventoryCommand, KitComponent};
use tribunal_shards::simulator::SplitMix64;

#[derive(clap::Args)]
pub struct Args {
    /// Number of commands to print.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Number of SKUs (4..=1000000).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(4..=MAX_SKUS))]
    skus: u64,
    /// Number of warehouses (2..=10000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=MAX_WAREHOUSES))]
    warehouses: u64,
    /// Seed of the workload; the same seed prints the same log.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Most SKUs and warehouses: far below anything that could overflow the index arithmetic
/// below (`skus * 2`, `kit + 21`, `from + warehouses`).
const MAX_SKUS: u64 = 1_000_000;
const MAX_WAREHOUSES: u64 = 10_000;

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    write_workload(&args, &mut out)?;
    out.flush().context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn write_workload(args: &Args, out: &mut impl Write) -> anyhow::Result<()> {
    // Also enforced by clap; checked here so the arithmetic below can never overflow.
    anyhow::ensure!(
        (4..=MAX_SKUS).contains(&args.skus) && (2..=MAX_WAREHOUSES).contains(&args.warehouses),
        "need 4..={MAX_SKUS} SKUs and 2..={MAX_WAREHOUSES} warehouses"
    );
    let mut rng = SplitMix64(args.seed);
    // (key, line) of earlier commands, for duplicate submissions and key reuse.
    let mut previous: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..args.events {
        let key = format!("sample-{}-{i}", args.seed);
        let line = if i < args.skus * args.warehouses.min(2) {
            // Opening stock for the first two warehouses.
            let command = InventoryCommand::Adjust {
                sku: sku(i % args.skus).into(),
                warehouse: warehouse(i / args.skus).into(),
                delta: 1_000,
                reason: "opening-stock".into(),
            };
            Envelope::<Inventory>::domain(key.clone(), command).encode()
        } else {
            mixed_line(args, &mut rng, &key, &previous)
        };
        if previous.len() < 1_000 {
            previous.push((key, line.clone()));
        }
        out.write_all(&line).and_then(|_| out.write_all(b"\n")).context("writing to stdout")?;
    }
    Ok(())
}

/// The name of SKU `i`.
fn sku(i: u64) -> String {
    format!("SKU-{i:05}")
}

/// The name of warehouse `i`.
fn warehouse(i: u64) -> String {
    format!("WH-{i:02}")
}

/// One line after the opening stock, drawn from the mix: a duplicate of an earlier
/// line, an earlier key reused with another body, a kit, a cycle count or a transfer.
fn mixed_line(args: &Args, rng: &mut SplitMix64, key: &str, previous: &[(String, Vec<u8>)]) -> Vec<u8> {
    match rng.below(100) {
        // A duplicate submission: same key, same body (a replay).
        0..=2 if !previous.is_empty() => previous[rng.below(previous.len() as u64) as usize].1.clone(),
        // A key reused with another body (a conflict).
        3 if !previous.is_empty() => {
            let (reused, _) = &previous[rng.below(previous.len() as u64) as usize];
            let command = InventoryCommand::Adjust {
                sku: sku(rng.below(args.skus)).into(),
                warehouse: warehouse(rng.below(args.warehouses)).into(),
                delta: 1,
                reason: "reused-key".into(),
            };
            Envelope::<Inventory>::domain(reused.clone(), command).encode()
        }
        4..=12 => Envelope::<Inventory>::domain(key, kit_assembly(args, rng)).encode(),
        13..=27 => Envelope::<Inventory>::domain(key, cycle_count(args, rng)).encode(),
        _ => Envelope::<Inventory>::domain(key, transfer(args, rng)).encode(),
    }
}

/// A kit of three SKUs, seven apart, assembled in a random warehouse.
fn kit_assembly(args: &Args, rng: &mut SplitMix64) -> InventoryCommand {
    let kit = rng.below(args.skus);
    let components = (1..=3)
        .map(|j| KitComponent { sku: sku((kit + j * 7) % args.skus).into(), qty_per_kit: 1 + rng.below(2) })
        .collect();
    InventoryCommand::AssembleKit {
        warehouse: warehouse(rng.below(args.warehouses)).into(),
        kit_sku: format!("KIT-{kit:05}").into(),
        qty: 1 + rng.below(3),
        components,
    }
}

/// A cycle-count adjustment of -20..=20, never 0.
fn cycle_count(args: &Args, rng: &mut SplitMix64) -> InventoryCommand {
    let delta = rng.below(41) as i64 - 20;
    InventoryCommand::Adjust {
        sku: sku(rng.below(args.skus)).into(),
        warehouse: warehouse(rng.below(args.warehouses)).into(),
        delta: if delta == 0 { 1 } else { delta },
        reason: "cycle-count".into(),
    }
}

/// A transfer of 1..=20 between two different warehouses.
fn transfer(args: &Args, rng: &mut SplitMix64) -> InventoryCommand {
    let from = rng.below(args.warehouses);
    let to = (from + 1 + rng.below(args.warehouses - 1)) % args.warehouses;
    InventoryCommand::Transfer {
        sku: sku(rng.below(args.skus)).into(),
        from_warehouse: warehouse(from).into(),
        to_warehouse: warehouse(to).into(),
        qty: 1 + rng.below(20),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tribunal_shards::envelope::Envelope;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn sizes_are_bounded_by_clap() {
        for (flag, bad) in [
            ("--skus", "18446744073709551615"),
            ("--skus", "1000001"),
            ("--skus", "3"),
            ("--warehouses", "18446744073709551615"),
            ("--warehouses", "10001"),
            ("--warehouses", "1"),
        ] {
            let error = Cli::try_parse_from(["sample", flag, bad]).err().unwrap_or_else(|| panic!("{flag} {bad}"));
            assert!(error.to_string().contains(flag), "{error}");
        }
        assert!(Cli::try_parse_from(["sample", "--skus", "1000000", "--warehouses", "10000"]).is_ok());
    }

    #[test]
    fn the_largest_sizes_give_a_valid_workload_and_larger_ones_an_error() {
        // Largest SKU count (only opening stock fits in a short run), then the largest
        // warehouse count past the opening stock (transfers, kits, replays, conflicts).
        for (skus, events) in [("1000000", 300), ("4", 3_000)] {
            let mut args = Cli::try_parse_from(["sample", "--skus", skus, "--warehouses", "10000"]).unwrap().args;
            args.events = events;
            let mut out = Vec::new();
            write_workload(&args, &mut out).unwrap();
            let lines: Vec<&[u8]> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
            assert_eq!(lines.len() as u64, events);
            for line in lines {
                let decoded = Envelope::<Inventory>::decode(line);
                decoded.unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
            }
            args.skus = u64::MAX;
            let error = write_workload(&args, &mut Vec::new()).unwrap_err();
            assert!(error.to_string().contains("SKUs"), "{error}");
        }
    }
}
