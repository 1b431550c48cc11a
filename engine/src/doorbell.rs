//! A doorbell: another thread wakes a task on a glommio executor, which then need not poll.
//!
//! Why: the Ushers and the local log's reader polled every millisecond when idle, and
//! three idle instances burned half of one of this host's two cores. glommio cannot wait
//! on a std channel or an inotify descriptor, but it can read a socket: the bell is one end
//! of a socketpair, and the door is the other end, read by the waiting task
//! (spec: LocalLog.AppendWakesReaders, KafkaLog.BridgeNeverBlocksExecutor).

use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncReadExt;

/// Rings bytes taken per wake at most; more pending rings make the next wait return at
/// once, which only costs one extra poll.
const RINGS_TAKEN: usize = 64;

/// Rings from any thread.
#[derive(Clone)]
pub struct Bell(Arc<StdUnixStream>);

impl Bell {
    /// Wakes the door's task. False once the door is gone (its task ended), so that a
    /// thread that only rings knows it may stop.
    pub fn ring(&self) -> bool {
        match (&*self.0).write(&[1]) {
            Ok(_) => true,
            // A full socket buffer: rings are pending already, none is lost.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }
}

/// The waiting end before it reaches its executor: a glommio socket belongs to the
/// executor that made it, so the door is opened there.
pub struct DoorKey {
    stream: StdUnixStream,
    idle_wait: Duration,
}

/// A bell and the key to its door, whose waits last `idle_wait` at most without a ring.
pub fn doorbell(idle_wait: Duration) -> io::Result<(Bell, DoorKey)> {
    let (bell, door) = StdUnixStream::pair()?;
    bell.set_nonblocking(true)?;
    Ok((Bell(Arc::new(bell)), DoorKey { stream: door, idle_wait }))
}

impl DoorKey {
    /// Opens the door on the calling executor.
    pub fn open(self) -> Door {
        // SAFETY: the descriptor is a connected socket that this key owned alone; glommio
        // takes it over and closes it.
        let stream = unsafe { glommio::net::UnixStream::from_raw_fd(self.stream.into_raw_fd()) };
        Door { stream, idle_wait: self.idle_wait, bells_gone: false }
    }
}

pub struct Door {
    stream: glommio::net::UnixStream,
    idle_wait: Duration,
    /// Every bell was dropped: reads would return at once, so only the timer is left.
    bells_gone: bool,
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
    /// Returns when rung (taking the rings pending) or after the idle wait, whichever is
    /// first. A wait never spins: without bells it is a plain sleep.
    pub async fn wait(&mut self) -> Woke {
        if self.bells_gone {
            glommio::timer::sleep(self.idle_wait).await;
            return Woke::IdleWaitPassed;
        }
        let mut rings = [0u8; RINGS_TAKEN];
        let stream = &mut self.stream;
        let rung = async {
            match stream.read(&mut rings).await {
                Ok(taken) if taken > 0 => Woke::Rung,
                _ => Woke::BellsGone,
            }
        };
        let timed_out = async {
            glommio::timer::sleep(self.idle_wait).await;
            Woke::IdleWaitPassed
        };
        let woke = futures_lite::future::or(rung, timed_out).await;
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
        // spec: LocalLog.AppendWakesReaders — the wake comes from the ring, not the timer
        // (the idle wait is ten minutes).
        let (bell, key) = doorbell(Duration::from_secs(600)).unwrap();
        let ringer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(bell.ring(), "the door is still there");
            bell
        });
        assert_eq!(waits_on_executor(key, 1), vec![Woke::Rung]);
        drop(ringer.join().unwrap());
    }

    #[test]
    fn rings_before_a_wait_are_not_lost_and_a_wait_without_rings_times_out() {
        let (bell, key) = doorbell(Duration::from_millis(20)).unwrap();
        for _ in 0..3 * RINGS_TAKEN {
            assert!(bell.ring());
        }
        // Three waits take the pending rings, the fourth finds none.
        let woke = waits_on_executor(key, 4);
        assert_eq!(woke, vec![Woke::Rung, Woke::Rung, Woke::Rung, Woke::IdleWaitPassed]);
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
    }
}
