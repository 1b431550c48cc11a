//! Adaptive pacing of a repeated operation (a group commit, a socket write, a log append):
//! the next one starts at once when the last one is at least `min_interval` old, and
//! otherwise waits until it is. An idle path adds no delay; under load the operations run
//! at most `1 / min_interval` times a second and each carries what arrived meanwhile, so
//! the cost of a sync, a wake-up or a write is shared by everything in it (docs/design.md
//! §10, "Serving under load"). Sans-IO: the caller brings the clock and does the waiting.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    min_interval: Duration,
    last_start: Option<Instant>,
}

impl Pacer {
    pub fn new(min_interval: Duration) -> Self {
        Self { min_interval, last_start: None }
    }

    /// How long to wait, at `now`, before the next operation may start (zero: at once).
    pub fn wait(&self, now: Instant) -> Duration {
        match self.last_start {
            Some(last) => (last + self.min_interval).saturating_duration_since(now),
            None => Duration::ZERO,
        }
    }

    /// An operation starts at `now`.
    pub fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_path_waits_for_nothing_and_a_busy_one_for_the_rest_of_the_interval() {
        let mut pacer = Pacer::new(Duration::from_millis(2));
        let t0 = Instant::now();
        assert_eq!(pacer.wait(t0), Duration::ZERO, "the first operation goes at once");
        pacer.started(t0);
        assert_eq!(pacer.wait(t0 + Duration::from_micros(500)), Duration::from_micros(1_500));
        assert_eq!(pacer.wait(t0 + Duration::from_millis(2)), Duration::ZERO);
        assert_eq!(pacer.wait(t0 + Duration::from_secs(1)), Duration::ZERO, "idle: no delay");
    }
}
