//! The on-disk side of quarantine (spec: Clerk.QuarantinePersisted, Clerk.QuarantineLifted,
//! Clerk.RebuiltPeerReadmitted).
//!
//! Three things live in the data directory:
//! - `incarnation`: a random number made with the directory. A wiped and rebuilt
//!   instance has a new one, which is how its peers tell a rebuild from a restart.
//! - `quarantine.json`: this instance's own quarantine and the peers it quarantined,
//!   rewritten atomically on every change, so a restart forgets nothing.
//! - `readmit/ID`: an operator's request to re-admit instance ID, left by `tribunal
//!   readmit` and taken (then deleted) by the Clerk's tick. Host access to the data
//!   directory is the authority; the Gateway's admin endpoint will take a bearer token.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tribunal_federation::clerk::{InstanceId, QuarantineState};

use crate::storage::write_atomically;

const INCARNATION_FILE: &str = "incarnation";
const QUARANTINE_FILE: &str = "quarantine.json";
const READMIT_DIR: &str = "readmit";
/// Requests taken per tick; more wait for the next one.
pub const MAX_READMITS_PER_TICK: usize = 16;

/// This data directory's incarnation, made on first use.
pub fn incarnation(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(INCARNATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            text.trim().parse().with_context(|| format!("{} does not hold an incarnation number", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("making an incarnation: {e}"))?;
            let incarnation = u64::from_le_bytes(bytes);
            std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            write_atomically(&path, incarnation.to_string().as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(incarnation)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[derive(Serialize, Deserialize)]
struct QuarantineFile {
    self_quarantined: bool,
    peers: Vec<QuarantinedPeer>,
}

#[derive(Serialize, Deserialize)]
struct QuarantinedPeer {
    instance_id: InstanceId,
    incarnation: Option<u64>,
}

pub fn read_quarantine(data_dir: &Path) -> anyhow::Result<QuarantineState> {
    let path = data_dir.join(QUARANTINE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let file: QuarantineFile = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a quarantine record", path.display()))?;
            Ok(QuarantineState {
                self_quarantined: file.self_quarantined,
                peers: file.peers.into_iter().map(|p| (p.instance_id, p.incarnation)).collect(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(QuarantineState::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn write_quarantine(data_dir: &Path, state: &QuarantineState) -> anyhow::Result<()> {
    let file = QuarantineFile {
        self_quarantined: state.self_quarantined,
        peers: state
            .peers
            .iter()
            .map(|&(instance_id, incarnation)| QuarantinedPeer { instance_id, incarnation })
            .collect(),
    };
    let path = data_dir.join(QUARANTINE_FILE);
    write_atomically(&path, &serde_json::to_vec_pretty(&file)?).with_context(|| format!("writing {}", path.display()))
}

/// A request found in `readmit/`: a valid instance id, or a file name that is not one.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadmitRequest {
    Instance(InstanceId),
    Malformed(String),
}

/// Lists up to [`MAX_READMITS_PER_TICK`] pending requests, each with its file. The caller
/// deletes a file only once its request is applied and persisted, so a crash in between
/// repeats the request (readmitting twice is harmless) instead of losing it. Entries
/// that are not plain files are skipped, so one odd entry cannot block the rest.
pub fn list_readmit_requests(data_dir: &Path) -> std::io::Result<Vec<(PathBuf, ReadmitRequest)>> {
    let dir = data_dir.join(READMIT_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut requests = Vec::new();
    for entry in entries.flatten() {
        if requests.len() == MAX_READMITS_PER_TICK {
            break;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue; // being written, or not a request
        }
        let request = match name.parse() {
            Ok(id) => ReadmitRequest::Instance(id),
            Err(_) => ReadmitRequest::Malformed(name),
        };
        requests.push((entry.path(), request));
    }
    Ok(requests)
}

/// Leaves a readmit request for the running instance (the CLI's and the admin API's way in).
pub fn request_readmit(data_dir: &Path, instance: InstanceId) -> anyhow::Result<()> {
    let path = request_path(data_dir, instance);
    let dir = path.parent().expect("a request has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomically(&path, b"").with_context(|| format!("writing {}", path.display()))
}

/// Where `tribunal readmit` leaves its request for `instance`.
pub fn request_path(data_dir: &Path, instance: InstanceId) -> PathBuf {
    data_dir.join(READMIT_DIR).join(instance.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_round_trips_and_a_missing_file_means_none() {
        // spec: Clerk.QuarantinePersisted
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_quarantine(dir.path()).unwrap(), QuarantineState::default());
        let state = QuarantineState { self_quarantined: true, peers: vec![(3, Some(42)), (4, None)] };
        write_quarantine(dir.path(), &state).unwrap();
        assert_eq!(read_quarantine(dir.path()).unwrap(), state);
        std::fs::write(dir.path().join(QUARANTINE_FILE), b"{not json").unwrap();
        let error = format!("{:#}", read_quarantine(dir.path()).unwrap_err());
        assert!(error.contains("is not a quarantine record"), "{error}");
    }

    #[test]
    fn an_incarnation_is_made_once_and_kept() {
        // spec: Clerk.RebuiltPeerReadmitted (a restart keeps it; a wipe makes another)
        let dir = tempfile::tempdir().unwrap();
        let first = incarnation(dir.path()).unwrap();
        assert_eq!(incarnation(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(incarnation(other.path()).unwrap(), first);
    }

    #[test]
    fn requests_are_listed_until_deleted_and_odd_entries_skipped() {
        // spec: Clerk.QuarantineLifted
        let dir = tempfile::tempdir().unwrap();
        assert!(list_readmit_requests(dir.path()).unwrap().is_empty());
        std::fs::create_dir_all(dir.path().join(READMIT_DIR).join("5")).unwrap();
        std::fs::write(request_path(dir.path(), 3), b"").unwrap();
        std::fs::write(dir.path().join(READMIT_DIR).join("three"), b"").unwrap();
        let mut listed: Vec<ReadmitRequest> =
            list_readmit_requests(dir.path()).unwrap().into_iter().map(|(_, r)| r).collect();
        listed.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(listed, vec![ReadmitRequest::Instance(3), ReadmitRequest::Malformed("three".into())]);
        for (path, _) in list_readmit_requests(dir.path()).unwrap() {
            std::fs::remove_file(path).unwrap();
        }
        assert!(list_readmit_requests(dir.path()).unwrap().is_empty(), "a directory is not a request");
    }
}
