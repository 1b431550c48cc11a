//! Wakes an idle local log reader when an appender in any process commits
//! (spec: LocalLog.AppendWakesReaders).
//!
//! Appenders and readers share nothing but the log's directory, so the kernel tells: an
//! inotify watch on the directory sees every write of the head (the commit point) and
//! every new or renamed file. A thread blocks on the watch and rings the reader's
//! doorbell. Any change wakes the reader, which then polls: a wake is a hint, never data,
//! so a spurious one costs one poll and a missed one costs at most the idle wait.

use std::path::Path;

use inotify::{Inotify, WatchMask};
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
                Ok(_) => {
                    if !bell.ring() {
                        debug!(dir = %dir.display(), "the log's reader is gone; its watch stops");
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The reader's idle wait still bounds its latency.
                    warn!(dir = %dir.display(), "watching the local log failed; its reader polls instead: {e}");
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
    fn an_append_from_another_handle_rings_the_readers_bell() {
        // spec: LocalLog.AppendWakesReaders — the idle wait is ten minutes, so only the
        // watch can end the wait.
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        let (bell, key) = doorbell(Duration::from_secs(600)).unwrap();
        spawn(dir.path(), bell).unwrap();
        let appender = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || {
                std::thread::sleep(Duration::from_millis(50));
                LocalLog::open(&dir).unwrap().append(&[b"{}".to_vec()]).unwrap()
            }
        });
        let woke =
            std::thread::spawn(move || glommio::LocalExecutor::default().run(async move { key.open().wait().await }))
                .join()
                .unwrap();
        assert_eq!(woke, Woke::Rung);
        assert_eq!(appender.join().unwrap(), 0..1);
        drop(log);
    }
}
