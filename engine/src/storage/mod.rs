//! The data directory (`--data-dir`): its layout, the Ledger's segments and their DMA
//! writer, snapshots and their manifest, the certified checkpoint and the quarantine
//! record (spec: `specs/ledger.allium`, `specs/recovery.allium`).
//!
//! Reading at recovery uses std IO on the main thread before the shards start: it is
//! one sequential pass, and nothing else runs yet. Writing the Ledger uses glommio's
//! `DmaFile` (O_DIRECT through io_uring) on the shard's own core.

pub mod checkpoint;
pub mod loader;
pub mod quarantine;
pub mod segments;
pub mod snapshots;

pub use segments::{apply_cut, delete_segments_below, read_logs, settle_io_probe, SegmentWriter, MAX_SEGMENT_BYTES};
pub use snapshots::{
    create_part_dir, delete_older_snapshots, read_manifest, read_part, read_snapshot, write_part, Manifest,
    PartitionManifest,
};

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tribunal_shards::router::ShardId;

/// Paths inside `--data-dir`.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// What a data directory was created for; a restart with another shard count would
/// put entities on other shards than the Ledger recorded, so it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub shard_count: u16,
}

const FORMAT: u32 = 1;

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn shard_dir(&self, shard: ShardId) -> PathBuf {
        self.root.join("ledger").join(format!("shard-{shard:03}"))
    }

    pub fn segment_path(&self, shard: ShardId, segment: u64) -> PathBuf {
        self.shard_dir(shard).join(format!("{segment:010}.seg"))
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    fn meta_path(&self) -> PathBuf {
        self.root.join("meta.json")
    }

    /// Reads `meta.json`; `None` for a directory never used.
    pub fn read_meta(&self) -> anyhow::Result<Option<Meta>> {
        match fs::read(self.meta_path()) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", self.meta_path().display()))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", self.meta_path().display())),
        }
    }

    /// Creates the directories and `meta.json`, or checks them against `shard_count`.
    pub fn prepare(&self, shard_count: u16) -> anyhow::Result<()> {
        match self.read_meta()? {
            Some(meta) if meta.format != FORMAT => {
                anyhow::bail!("{} has data format {}, this binary writes {FORMAT}", self.root.display(), meta.format)
            }
            Some(meta) if meta.shard_count != shard_count => anyhow::bail!(
                "{} was written by {} shard(s); run with {} core(s) (--cores) or use a fresh --data-dir",
                self.root.display(),
                meta.shard_count,
                meta.shard_count
            ),
            Some(_) => {}
            None => {
                fs::create_dir_all(&self.root)?;
                let meta = Meta { format: FORMAT, shard_count };
                write_atomically(&self.meta_path(), &serde_json::to_vec_pretty(&meta)?)?;
            }
        }
        for shard in 0..shard_count {
            fs::create_dir_all(self.shard_dir(shard))?;
        }
        Ok(())
    }

    /// Segment numbers of a shard, ascending.
    pub fn segments(&self, shard: ShardId) -> io::Result<Vec<u64>> {
        let mut segments = Vec::new();
        let dir = match fs::read_dir(self.shard_dir(shard)) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(segments),
            Err(e) => return Err(e),
        };
        for entry in dir {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(number) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                segments.push(number);
            }
        }
        segments.sort_unstable();
        Ok(segments)
    }
}

/// Writes a small file so that it is either wholly old or wholly new after a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Replaces a small file so that a reader sees it wholly old or wholly new, without making
/// it durable: for files that are rewritten every few hundred milliseconds and worthless
/// after a crash (`status.json`). Two fsyncs each time cost the disk that the Ledger and the
/// log need (about 30 fsyncs/s for a 3-instance cluster on one host).
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}
