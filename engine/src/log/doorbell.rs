//! A doorbell: another thread wakes a task on a glommio executor, which then need not poll.
//!
//! Why: the Ushers and the local log's reader polled every millisecond when idle, and
//! three idle instances burned half of one of this host's two cores. glommio cannot wait
//! on a std channel or an inotify descriptor, but it can read a socket: the bell is one end
//! of a socketpair, and the door is the other end, read by the waiting task
//! (spec: LocalLog.AppendWakesReaders, KafkaLog.BridgeNeverBlocksExecutor).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncReadExt;

/// What the bells and the door share.
struct Shared {
    /// A ring is in the socket, or the door woke and has not polled yet: further rings
    /// need not write. So at most one byte is pending, however many rings came while the
    /// task was busy, and a task that stops being busy is not woken once per old ring.
    rung: AtomicBool,
    /// False once the door (or its unopened key) is dropped: ringing is pointless then.
    door_open: AtomicBool,
}

/// Rings from any thread.
#[derive(Clone)]
pub struct Bell {
    stream: Arc<StdUnixStream>,
    shared: Arc<Shared>,
}

impl Bell {
    /// Wakes the door's task: its next wait, or the one under way, returns. Call it after
    /// making visible what the task should see. False once the door is gone (its task
    /// ended), so that a thread that only rings knows it may stop.
    pub fn ring(&self) -> bool {
        if !self.shared.door_open.load(Ordering::SeqCst) {
            return false;
        }
        if self.shared.rung.swap(true, Ordering::SeqCst) {
            return true;
        }
        loop {
            // send, not write: MSG_NOSIGNAL, so a door closed meanwhile is EPIPE, never a
            // SIGPIPE that would end the process.
            // SAFETY: a one-byte buffer that lives across the call, on a socket we own.
            let sent = unsafe {
                libc::send(self.stream.as_raw_fd(), [1u8].as_ptr().cast(), 1, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if sent == 1 {
                return true;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                // A full socket buffer: bytes are pending already (a ring raced with a
                // wake), so the door will wake.
                io::ErrorKind::WouldBlock => return true,
                _ => return false,
            }
        }
    }
}

/// The waiting end before it reaches its executor: a glommio socket belongs to the
/// executor that made it, so the door is opened there.
pub struct DoorKey {
    stream: Option<StdUnixStream>,
    shared: Arc<Shared>,
    idle_wait: Duration,
}

/// A bell and the key to its door, whose waits last `idle_wait` at most without a ring.
pub fn doorbell(idle_wait: Duration) -> io::Result<(Bell, DoorKey)> {
    let (bell, door) = StdUnixStream::pair()?;
    bell.set_nonblocking(true)?;
    let shared = Arc::new(Shared { rung: AtomicBool::new(false), door_open: AtomicBool::new(true) });
    Ok((Bell { stream: Arc::new(bell), shared: shared.clone() }, DoorKey { stream: Some(door), shared, idle_wait }))
}

impl DoorKey {
    /// Opens the door on the calling executor.
    pub fn open(mut self) -> Door {
        let stream = self.stream.take().expect("a key opens once");
        // SAFETY: the descriptor is a connected socket that this key owned alone; glommio
        // takes it over and closes it.
        let stream = unsafe { glommio::net::UnixStream::from_raw_fd(stream.into_raw_fd()) };
        Door { stream, shared: self.shared.clone(), idle_wait: self.idle_wait, bells_gone: false }
    }
}

impl Drop for DoorKey {
    fn drop(&mut self) {
        if self.stream.is_some() {
            self.shared.door_open.store(false, Ordering::SeqCst);
        }
    }
}

pub struct Door {
    stream: glommio::net::UnixStream,
    shared: Arc<Shared>,
    idle_wait: Duration,
    /// Every bell was dropped: reads would return at once, so only the timer is left.
    bells_gone: bool,
}

impl Drop for Door {
    fn drop(&mut self) {
        self.shared.door_open.store(false, Ordering::SeqCst);
    }
}

/// Why a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woke {
    Rung,
    IdleWaitPassed,
    /// The last bell was dropped just now; later waits are plain sleeps.
    BellsGone,
}

impl Door {
    /// Returns when rung or after the idle wait, whichever is first; the caller then polls
    /// whatever it waits for. A wait never spins: without bells it is a plain sleep.
    pub async fn wait(&mut self) -> Woke {
        if self.bells_gone {
            glommio::timer::sleep(self.idle_wait).await;
            return Woke::IdleWaitPassed;
        }
        // More than one byte is pending only when a ring raced with a wake.
        let mut rings = [0u8; 16];
        let stream = &mut self.stream;
        let rung = async {
            match stream.read(&mut rings).await {
                Ok(0) => Woke::BellsGone,
                Ok(_) => Woke::Rung,
                Err(e) => {
                    // Never a retry loop: a read that keeps failing would spin.
                    tracing::warn!("reading a doorbell failed ({e}); its waits are plain sleeps now");
                    Woke::BellsGone
                }
            }
        };
        let timed_out = async {
            glommio::timer::sleep(self.idle_wait).await;
            Woke::IdleWaitPassed
        };
        let woke = futures_lite::future::or(rung, timed_out).await;
        if woke == Woke::Rung {
            // Before the caller polls: a ring from now on writes again, and whatever was
            // made visible before an earlier ring is seen by that poll. A swap, not a
            // store: it reads the ringer's swap, which orders the ringer's send before
            // the caller's poll.
            self.shared.rung.swap(false, Ordering::SeqCst);
        }
        self.bells_gone = woke == Woke::BellsGone;
        woke
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `waits` on a fresh executor thread (a door opens on the executor that waits).
    fn waits_on_executor(key: DoorKey, waits: usize) -> Vec<Woke> {
        std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut door = key.open();
                let mut woke = Vec::new();
                for _ in 0..waits {
                    woke.push(door.wait().await);
                }
                woke
            })
        })
        .join()
        .expect("the executor thread")
    }

    #[test]
    fn a_ring_from_another_thread_ends_a_wait() {
        // spec: LocalLog.AppendWakesReaders — the wake comes from the ring, not the timer.
        let (bell, key) = doorbell(Duration::from_secs(10)).unwrap();
        let ringer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(bell.ring(), "the door is still there");
            bell
        });
        assert_eq!(waits_on_executor(key, 1), vec![Woke::Rung]);
        drop(ringer.join().unwrap());
    }

    #[test]
    fn rings_before_a_wait_are_not_lost_and_many_rings_wake_once() {
        let (bell, key) = doorbell(Duration::from_millis(20)).unwrap();
        for _ in 0..1_000 {
            assert!(bell.ring());
        }
        // The thousand rings came while the task was busy: one wake, then nothing pending.
        let woke = waits_on_executor(key, 2);
        assert_eq!(woke, vec![Woke::Rung, Woke::IdleWaitPassed]);
        drop(bell);
    }

    #[test]
    fn a_ring_after_a_wake_wakes_again() {
        // Each ring comes before its wait: a broken door fails after the idle wait.
        let (bell, key) = doorbell(Duration::from_secs(5)).unwrap();
        assert!(bell.ring());
        let ringer = bell.clone();
        let woke = std::thread::spawn(move || {
            glommio::LocalExecutor::default().run(async move {
                let mut door = key.open();
                let first = door.wait().await;
                // Rung again after the first wake: the second wait must not miss it.
                assert!(ringer.ring());
                (first, door.wait().await)
            })
        })
        .join()
        .unwrap();
        assert_eq!(woke, (Woke::Rung, Woke::Rung));
        drop(bell);
    }

    #[test]
    fn without_bells_waits_sleep_and_a_ring_into_a_dropped_door_says_so() {
        let (bell, key) = doorbell(Duration::from_millis(20)).unwrap();
        drop(bell);
        // Noticed once; after that the door is a timer, never a read that returns at once.
        assert_eq!(waits_on_executor(key, 3), vec![Woke::BellsGone, Woke::IdleWaitPassed, Woke::IdleWaitPassed]);

        let (bell, key) = doorbell(Duration::from_millis(20)).unwrap();
        drop(key);
        assert!(!bell.ring(), "a ring into a dropped door says so");
        let (bell, key) = doorbell(Duration::from_millis(20)).unwrap();
        waits_on_executor(key, 0);
        assert!(!bell.ring(), "a ring into a door dropped after opening says so");
    }
}
