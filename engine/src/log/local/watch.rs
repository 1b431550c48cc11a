//! How an idle local log reader waits for an appender in any process to commit
//! (spec: LocalLog.AppendWakesReaders, LocalLog.ReaderWaits).
//!
//! Appenders and readers share nothing but the log's directory, so the kernel tells: an
//! inotify watch on the directory sees every write of the head (the commit point) and
//! every new or renamed file. A thread blocks on the watch and rings the reader's
//! doorbell. A wake is a hint, never data: a spurious one costs one poll, a missed one at
//! most the idle wait.
//!
//! Why a watch only while idle: a watch held all the time woke a thread in every
//! instance at every commit (11,782 context switches in about 14 s at 8,000 req/s,
//! against 119 armed only when idle), competing with the pinned shards. A reader that just found records polls instead (the log is busy, a poll
//! finds something soon); after `BUSY_POLLS` empty polls it arms a fresh watch, which
//! lives until its first change.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use inotify::{Inotify, WatchMask};
use tracing::{debug, warn};

use crate::log::doorbell::{doorbell, Door, DoorKey, Woke};

/// Bytes read from a watch; one event is enough, the rest is dropped with the watch.
const EVENT_BUFFER_BYTES: usize = 4096;
/// Armed watches on their way to the thread: a reader arms again only after a ring, so
/// one is in flight at most, and one more may be being closed.
const ARMS_IN_FLIGHT: usize = 2;
/// After records, empty polls this far apart, `BUSY_POLLS` of them, before waiting.
const BUSY_POLL: Duration = Duration::from_millis(1);
const BUSY_POLLS: u32 = 10;
/// A waiting reader polls again this soon at the latest.
pub const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The reader's side of its watch thread.
struct Watcher {
    dir: PathBuf,
    arms: mpsc::SyncSender<Inotify>,
}

impl Watcher {
    /// Starts the thread that rings `bell` at the first change under each armed watch.
    fn spawn(dir: &Path, bell: crate::log::doorbell::Bell) -> io::Result<Watcher> {
        let (arms, armed) = mpsc::sync_channel::<Inotify>(ARMS_IN_FLIGHT);
        let thread_dir = dir.to_owned();
        std::thread::Builder::new().name("log-watch".into()).spawn(move || {
            let mut events = vec![0u8; EVENT_BUFFER_BYTES];
            // Ends when the reader drops its Watcher.
            for mut watch in armed {
                loop {
                    match watch.read_events_blocking(&mut events) {
                        Ok(_) => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // The reader sees no ring and falls back to its idle wait.
                            warn!(dir = %thread_dir.display(), "watching the local log failed: {e}");
                            return;
                        }
                    }
                }
                if !bell.ring() {
                    debug!(dir = %thread_dir.display(), "the log's reader is gone; its watch stops");
                    return;
                }
            }
        })?;
        Ok(Watcher { dir: dir.to_owned(), arms })
    }

    /// A fresh watch, so that nothing from before it (a busy period) is queued in it.
    fn arm(&self) -> io::Result<()> {
        let watch = Inotify::init()?;
        watch.watches().add(&self.dir, WatchMask::MODIFY | WatchMask::CREATE | WatchMask::MOVED_TO)?;
        self.arms.try_send(watch).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => io::Error::other("more watches armed than a reader can have"),
            mpsc::TrySendError::Disconnected(_) => io::Error::other("the watch thread stopped"),
        })
    }
}

/// What a reader needs to wait, before it reaches its executor.
pub struct TailWaitKey {
    watcher: Option<Watcher>,
    door: DoorKey,
}

/// Sets up the watch thread of a reader of the log in `dir`. Without inotify (its limits,
/// a file system without it) the reader polls every `BUSY_POLL`, as it did before waits.
pub fn tail_wait(dir: &Path) -> io::Result<TailWaitKey> {
    tail_wait_with(dir, IDLE_WAIT)
}

fn tail_wait_with(dir: &Path, idle_wait: Duration) -> io::Result<TailWaitKey> {
    let (bell, door) = doorbell(idle_wait)?;
    let watcher = match Watcher::spawn(dir, bell) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            warn!(dir = %dir.display(), "cannot watch the local log ({e}); its reader polls every {BUSY_POLL:?}");
            None
        }
    };
    Ok(TailWaitKey { watcher, door })
}

impl TailWaitKey {
    /// On the reader's executor.
    pub fn open(self) -> TailWait {
        TailWait {
            watcher: self.watcher,
            door: self.door.open(),
            armed: false,
            empty_polls: 0,
            arm_failure_logged: false,
        }
    }
}

/// Where a reader is between polls: busy (poll soon) or idle (wait for a wake).
pub struct TailWait {
    watcher: Option<Watcher>,
    door: Door,
    /// A watch is armed and has not rung.
    armed: bool,
    /// Empty polls since the last records.
    empty_polls: u32,
    /// An arm failed and was logged; later failures are not.
    arm_failure_logged: bool,
}

impl TailWait {
    /// After a poll that returned records: the next poll comes at once.
    pub fn found_records(&mut self) {
        self.empty_polls = 0;
    }

    /// After a poll that returned nothing: until the next poll is worth doing. Says why a
    /// wait ended, if it waited.
    pub async fn after_empty_poll(&mut self) -> Option<Woke> {
        if self.empty_polls < BUSY_POLLS {
            self.empty_polls += 1;
            glommio::timer::sleep(BUSY_POLL).await;
            return None;
        }
        let Some(watcher) = &self.watcher else {
            glommio::timer::sleep(BUSY_POLL).await;
            return None;
        };
        if !self.armed {
            match watcher.arm() {
                // Poll once more before waiting: a commit between the last poll and the
                // watch is seen by it.
                Ok(()) => {
                    self.armed = true;
                    return None;
                }
                // No watch (the inotify limits, say): the wait below only times out, and
                // the next idle poll tries again.
                Err(e) => {
                    if !self.arm_failure_logged {
                        warn!(dir = %watcher.dir.display(), "cannot watch the local log ({e}); its reader polls every {IDLE_WAIT:?} while it cannot");
                        self.arm_failure_logged = true;
                    }
                }
            }
        }
        let woke = self.door.wait().await;
        if woke != Woke::IdleWaitPassed {
            // Rung: that watch is closed. (Bells gone: the thread stopped; arming again
            // fails and the reader polls.)
            self.armed = false;
        }
        Some(woke)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::local::LocalLog;

    #[test]
    fn an_idle_reader_is_woken_by_a_commit_from_another_handle_and_polls_the_record() {
        // spec: LocalLog.AppendWakesReaders, LocalLog.ReaderWaits — the reader goes idle
        // (busy polls, an armed watch, a wait), and only then does another handle commit.
        // The idle wait is ten seconds: a wait that says Rung was ended by the watch.
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        let mut reader = log.reader(0).unwrap();
        let appender = LocalLog::open(dir.path()).unwrap();
        let key = tail_wait_with(dir.path(), Duration::from_secs(10)).unwrap();
        let (armed_tx, armed_rx) = mpsc::channel::<bool>();
        let appended = std::thread::spawn(move || {
            // Commits only once the reader has armed its watch.
            armed_rx.recv().unwrap().then(|| appender.append(&[b"{}".to_vec()]).unwrap())
        });
        let (waits, records) = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut tail = key.open();
                let mut records = Vec::new();
                let mut waits = Vec::new();
                // Busy polls, the arm, the extra poll, then waits; bounded, so a reader
                // that never arms fails here rather than hanging.
                for _ in 0..BUSY_POLLS + 1 {
                    reader.poll(16, &mut records).unwrap();
                    assert!(tail.after_empty_poll().await.is_none(), "no wait before the watch");
                }
                let _ = armed_tx.send(tail.armed);
                assert!(tail.armed, "armed after the busy polls");
                while records.is_empty() && waits.len() < 8 {
                    reader.poll(16, &mut records).unwrap();
                    if records.is_empty() {
                        waits.extend(tail.after_empty_poll().await);
                    }
                }
                (waits, records.into_iter().map(|r| (r.offset, r.payload)).collect::<Vec<_>>())
            })
        })
        .join()
        .unwrap();
        // A wake may come from the segment's write, before the commit: then the reader
        // re-arms and waits again. Every wait was ended by a ring.
        assert!(waits.iter().all(|w| *w == Woke::Rung), "{waits:?}");
        assert_eq!(records, vec![(0, b"{}".to_vec())]);
        assert_eq!(appended.join().unwrap(), Some(0..1));
    }

    #[test]
    fn waits_that_time_out_keep_their_watch_and_a_later_commit_rings_it() {
        // spec: LocalLog.ReaderWaits — an idle wait that times out does not re-arm.
        let dir = tempfile::tempdir().unwrap();
        LocalLog::open(dir.path()).unwrap();
        let appender = LocalLog::open(dir.path()).unwrap();
        let key = tail_wait_with(dir.path(), Duration::from_millis(5)).unwrap();
        let (timed_out_tx, timed_out_rx) = mpsc::channel::<()>();
        let appended = std::thread::spawn(move || {
            timed_out_rx.recv().unwrap();
            appender.append(&[b"{}".to_vec()]).unwrap()
        });
        let woke = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut tail = key.open();
                let mut woke = Vec::new();
                for _ in 0..BUSY_POLLS + 1 {
                    woke.extend(tail.after_empty_poll().await);
                }
                for _ in 0..3 {
                    woke.extend(tail.after_empty_poll().await);
                }
                let still_armed = tail.armed;
                let _ = timed_out_tx.send(());
                // The commit rings the same watch: Rung within a few waits.
                while woke.last() != Some(&Woke::Rung) && woke.len() < 2_000 {
                    woke.extend(tail.after_empty_poll().await);
                }
                (still_armed, woke)
            })
        })
        .join()
        .unwrap();
        assert!(woke.0, "still armed after waits that timed out");
        assert_eq!(&woke.1[..3], &[Woke::IdleWaitPassed; 3]);
        assert_eq!(woke.1.last(), Some(&Woke::Rung), "{:?}", woke.1);
        assert_eq!(appended.join().unwrap(), 0..1);
    }

    #[test]
    fn a_reader_that_found_records_polls_again_before_it_arms_a_watch() {
        // spec: LocalLog.AppendWakesReaders — busy polls first: no watch, no wait.
        let dir = tempfile::tempdir().unwrap();
        LocalLog::open(dir.path()).unwrap();
        let key = tail_wait_with(dir.path(), Duration::from_secs(10)).unwrap();
        let (armed_after, woke) = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut tail = key.open();
                let mut woke = Vec::new();
                for _ in 0..BUSY_POLLS {
                    woke.extend(tail.after_empty_poll().await);
                }
                let busy_armed = tail.armed;
                tail.found_records();
                woke.extend(tail.after_empty_poll().await);
                (busy_armed || tail.armed, woke)
            })
        })
        .join()
        .unwrap();
        assert!(!armed_after, "no watch while the log is busy");
        assert!(woke.is_empty(), "no wait while the log is busy: {woke:?}");
    }
}
