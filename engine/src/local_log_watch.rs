//! Wakes an idle local log reader when an appender in any process commits
//! (spec: LocalLog.AppendWakesReaders).
//!
//! Appenders and readers share nothing but the log's directory, so the kernel tells: an
//! inotify watch on the directory sees every write of the head (the commit point) and
//! every new or renamed file. A thread blocks on the watch and rings the reader's
//! doorbell. Any change wakes the reader, which then polls: a wake is a hint, never data,
//! so a spurious one costs one poll and a missed one costs at most the idle wait.

use std::path::Path;

use inotify::{EventMask, Inotify, WatchMask};
use tracing::{debug, warn};

use crate::doorbell::Bell;

/// Bytes read per wake; several events fit, and a larger burst is read on the next turn.
const EVENT_BUFFER_BYTES: usize = 4096;

/// Starts the watch on `dir` and its thread. An error (the host's inotify limits, a file
/// system without inotify) leaves the reader to its idle wait.
pub fn spawn(dir: &Path, bell: Bell) -> std::io::Result<()> {
    let mut inotify = Inotify::init()?;
    inotify.watches().add(dir, WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MOVED_TO)?;
    let dir = dir.to_owned();
    std::thread::Builder::new().name("log-watch".into()).spawn(move || {
        let mut events = vec![0u8; EVENT_BUFFER_BYTES];
        loop {
            match inotify.read_events_blocking(&mut events) {
                Ok(read) => {
                    // The directory was removed or unmounted: no event will come again.
                    let ignored = read.into_iter().any(|event| event.mask.contains(EventMask::IGNORED));
                    if !bell.ring() {
                        debug!(dir = %dir.display(), "the log's reader is gone; its watch stops");
                        return;
                    }
                    if ignored {
                        warn!(dir = %dir.display(), "the local log's directory is no longer watched; its reader falls back to its idle wait");
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The reader's idle wait still bounds its latency.
                    warn!(dir = %dir.display(), "watching the local log failed; its reader falls back to its idle wait: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::{doorbell, Woke};
    use crate::local_log::LocalLog;
    use std::time::Duration;

    #[test]
    fn a_commit_from_another_handle_wakes_the_reader_and_its_poll_finds_the_record() {
        // spec: LocalLog.AppendWakesReaders — the reader waits only on the watch (a broken
        // watch fails after the 10 s idle wait), and after the wakes the record is there.
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        let mut reader = log.reader(0).unwrap();
        let appender = LocalLog::open(dir.path()).unwrap();
        let (bell, key) = doorbell(Duration::from_secs(10)).unwrap();
        spawn(dir.path(), bell).unwrap();
        let appended = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            appender.append(&[b"{}".to_vec()]).unwrap()
        });
        let (wakes, records) = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut door = key.open();
                let mut records = Vec::new();
                let mut wakes = Vec::new();
                // A wake may come from the segment's write, before the commit: poll again
                // after each, a few at most.
                while records.is_empty() && wakes.len() < 8 {
                    wakes.push(door.wait().await);
                    reader.poll(16, &mut records).unwrap();
                }
                (wakes, records.into_iter().map(|r| (r.offset, r.payload)).collect::<Vec<_>>())
            })
        })
        .join()
        .unwrap();
        assert!(wakes.iter().all(|w| *w == Woke::Rung), "only rings, never the idle wait: {wakes:?}");
        assert_eq!(records, vec![(0, b"{}".to_vec())]);
        assert_eq!(appended.join().unwrap(), 0..1);
    }
}
