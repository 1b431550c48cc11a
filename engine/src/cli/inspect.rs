//! `tribunal inspect --data-dir DIR`: the state a restart would recover, offline and
//! read-only (nothing is cut or written). Tests and operators read state through it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use tribunal_shards::digest::{output_digest, outputs_digest};
use tribunal_shards::inventory::Inventory;
use tribunal_shards::recovery::Recovered;
use tribunal_shards::registrar::combine_partition_digests;
use tribunal_shards::usher::UsherConfig;
use tribunal_shards::warden::WardenConfig;

use crate::storage::loader::LedgerOnDisk;
use crate::storage::Layout;

#[derive(clap::Args)]
pub struct Args {
    /// The instance's data directory (`tribunal run --data-dir`).
    #[arg(long)]
    data_dir: PathBuf,
    /// Print JSON (state digest, outputs digest, the whole stock table).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct CutReport {
    shard: u16,
    segment: u64,
    position: usize,
    reason: String,
}

/// One partition's recovered state.
#[derive(Serialize)]
struct PartitionReport {
    partition: u32,
    durable_watermark: Option<u64>,
    snapshot_marker: Option<u64>,
    /// Order-free sum of entity digests, comparable with the reference interpreter's.
    partition_digest: String,
    /// Outputs still in the Ledger (those after the snapshot marker) and their digest.
    outputs: u64,
    outputs_digest: String,
    stock: Vec<crate::cli::stock_table::StockRow>,
}

/// The top-level fields are partition 0's (the default, and the local log's only
/// partition); `partitions` has every partition the Ledger holds.
#[derive(Serialize)]
struct Report {
    shards: u16,
    durable_watermark: Option<u64>,
    /// The committed snapshot's marker; outputs are those after it.
    snapshot_marker: Option<u64>,
    state_digest: String,
    outputs: u64,
    outputs_digest: String,
    replayed_entries: u64,
    would_cut: Vec<CutReport>,
    stock: Vec<crate::cli::stock_table::StockRow>,
    partitions: Vec<PartitionReport>,
    federation: FederationReport,
}

/// What the Clerk recorded in the data dir: detected faults (spec: Clerk.FaultReported)
/// and quarantines (spec: Clerk.QuarantinePersisted).
#[derive(Serialize)]
struct FederationReport {
    faults_detected: u64,
    /// The last few, as logged (with the fields that differ).
    last_faults: Vec<serde_json::Value>,
    self_quarantined: bool,
    quarantined_peers: Vec<u32>,
}

const LAST_FAULTS: usize = 5;

fn federation_report(data_dir: &std::path::Path) -> anyhow::Result<FederationReport> {
    let path = data_dir.join("faults.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A line torn by a crash mid-append is shown as it is rather than refused.
    let last_faults = lines[lines.len().saturating_sub(LAST_FAULTS)..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| serde_json::Value::String((*l).to_string())))
        .collect();
    let quarantine = crate::storage::quarantine::read_quarantine(data_dir)?;
    Ok(FederationReport {
        faults_detected: lines.len() as u64,
        last_faults,
        self_quarantined: quarantine.self_quarantined,
        quarantined_peers: quarantine.peers.iter().map(|p| p.0).collect(),
    })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(&args.data_dir);
    let meta = layout
        .read_meta()?
        .with_context(|| format!("{} holds no Tribunal data (no meta.json)", args.data_dir.display()))?;
    let shard_count = meta.shard_count;
    let ledger = LedgerOnDisk::<Inventory>::read(&layout, shard_count)?;
    let markers = ledger.snapshot_markers();
    let all_outputs = ledger_outputs(&ledger);
    // The Warden's TTL does not change what is recovered, only what the Usher answers next.
    let usher = |partition| UsherConfig { partition, shard_count, warden: WardenConfig::default(), initial_version: 1 };
    let (_, recovered) = ledger.recover(shard_count, usher)?;
    let partitions = partition_reports(&recovered, &markers, all_outputs);
    let first = &partitions[0];
    assert_eq!(first.partition, 0, "partition 0 is always reported");
    let report = Report {
        shards: shard_count,
        durable_watermark: first.durable_watermark,
        snapshot_marker: first.snapshot_marker,
        state_digest: format!("{:032x}", combine_partition_digests(&[(0, partition_digest(&recovered, 0))])),
        outputs: first.outputs,
        outputs_digest: first.outputs_digest.clone(),
        replayed_entries: recovered.replayed_entries,
        would_cut: recovered
            .cuts
            .into_iter()
            .map(|c| CutReport { shard: c.shard, segment: c.segment, position: c.position, reason: c.reason })
            .collect(),
        stock: first.stock.clone(),
        partitions,
        federation: federation_report(&args.data_dir)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&args.data_dir, &report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The digest of every output in the Ledger, by partition and offset.
fn ledger_outputs(ledger: &LedgerOnDisk<Inventory>) -> BTreeMap<u32, BTreeMap<u64, u128>> {
    let mut all_outputs: BTreeMap<u32, BTreeMap<u64, u128>> = BTreeMap::new();
    for (partition, offset, output) in ledger.outputs() {
        all_outputs.entry(partition).or_default().insert(offset, output_digest(output));
    }
    all_outputs
}

/// Order-free sum of a partition's entity digests over every shard's Registrar.
fn partition_digest(recovered: &Recovered<Inventory>, partition: u32) -> u128 {
    recovered.arbiters.iter().fold(0u128, |acc, a| acc.wrapping_add(a.registrar().digest(partition)))
}

/// One report per partition with a watermark or a snapshot, and always partition 0
/// (first); each counts the outputs durable and after its snapshot marker.
fn partition_reports(
    recovered: &Recovered<Inventory>,
    markers: &BTreeMap<u32, u64>,
    mut all_outputs: BTreeMap<u32, BTreeMap<u64, u128>>,
) -> Vec<PartitionReport> {
    let partition_ids: std::collections::BTreeSet<u32> =
        recovered.watermarks.keys().chain(markers.keys()).copied().chain(std::iter::once(0)).collect();
    let mut partitions = Vec::new();
    for &partition in &partition_ids {
        let watermark = recovered.watermarks.get(&partition).copied();
        let marker = markers.get(&partition).copied();
        let mut outputs = all_outputs.remove(&partition).unwrap_or_default();
        // Outputs at or below a snapshot's marker left with the segments it replaced.
        outputs.retain(|offset, _| watermark.is_some_and(|w| *offset <= w) && marker.is_none_or(|m| *offset > m));
        partitions.push(PartitionReport {
            partition,
            durable_watermark: watermark,
            snapshot_marker: marker,
            partition_digest: format!("{:032x}", partition_digest(recovered, partition)),
            outputs: outputs.len() as u64,
            outputs_digest: format!("{:032x}", outputs_digest(outputs.into_iter())),
            stock: crate::cli::stock_table::rows(
                recovered.arbiters.iter().flat_map(|a| a.registrar().entities_sorted(partition)),
            ),
        });
    }
    partitions
}

/// Prints the report as text: partition 0, the cuts, the federation, then the
/// other partitions.
fn print_report(data_dir: &std::path::Path, report: &Report) {
    println!("data dir          {}", data_dir.display());
    println!("shards            {}", report.shards);
    match report.durable_watermark {
        Some(w) => println!("durable watermark {w}"),
        None => println!("durable watermark none (nothing durable yet)"),
    }
    if let Some(marker) = report.snapshot_marker {
        println!("snapshot at       {marker}");
    }
    println!("state digest      {}", report.state_digest);
    println!("outputs           {} (digest {})", report.outputs, report.outputs_digest);
    for cut in &report.would_cut {
        println!(
            "would cut         shard {} segment {} at byte {}: {}",
            cut.shard, cut.segment, cut.position, cut.reason
        );
    }
    print_federation(&report.federation);
    crate::cli::stock_table::print("stock", &report.stock);
    for partition in report.partitions.iter().skip(1) {
        println!();
        println!("partition         {}", partition.partition);
        match partition.durable_watermark {
            Some(w) => println!("durable watermark {w}"),
            None => println!("durable watermark none"),
        }
        println!("outputs           {} (digest {})", partition.outputs, partition.outputs_digest);
        crate::cli::stock_table::print("stock", &partition.stock);
    }
}

/// Prints the faults and quarantines the Clerk recorded.
fn print_federation(federation: &FederationReport) {
    println!("faults detected   {} (faults.jsonl)", federation.faults_detected);
    for fault in &federation.last_faults {
        println!("  {fault}");
    }
    if federation.self_quarantined {
        println!("quarantined       this instance (its copies are not counted by its peers)");
    }
    if !federation.quarantined_peers.is_empty() {
        println!("quarantines       instances {:?} (their copies are not counted here)", federation.quarantined_peers);
    }
}
