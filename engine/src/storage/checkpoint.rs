//! The certified checkpoint, `certified.json`: per partition, an end below which every
//! offset was certified (spec: Clerk.CertifiedCheckpointPersisted). Recovery caps it by
//! the durable watermark.

use std::path::PathBuf;

use anyhow::Context;

use super::Layout;

/// Where the certified checkpoint lives: per partition, an end every offset below which
/// was certified (spec: Clerk.CertifiedCheckpointPersisted).
pub fn certified_path(layout: &Layout) -> PathBuf {
    layout.status_path().with_file_name("certified.json")
}

/// spec: Clerk.CertifiedCheckpointPersisted
pub fn write_certified(layout: &Layout, ends: &[u64]) -> anyhow::Result<()> {
    super::write_atomically(&certified_path(layout), &serde_json::to_vec(ends)?)
        .context("writing the certified checkpoint")
}

pub fn read_certified(layout: &Layout, partitions: u32) -> anyhow::Result<Vec<u64>> {
    let path = certified_path(layout);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let ends: Vec<u64> = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a list of certified ends", path.display()))?;
            Ok((0..partitions as usize).map(|p| ends.get(p).copied().unwrap_or(0)).collect())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![0; partitions as usize]),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}
