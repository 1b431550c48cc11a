//! The source thread: one `BaseConsumer` reading every partition with `assign()` at the
//! Ledger's offsets, decoding, and feeding each partition's Usher through a bounded
//! channel and a doorbell (spec: KafkaLog.BridgeNeverBlocksExecutor).

use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::usher::Decoded;

use super::{
    client_config, ClientHooks, KafkaConfig, KafkaShared, BACKOFF_MAX, BACKOFF_MIN, ERROR_PAUSE, METADATA_TIMEOUT,
    SOURCE_BATCH_RECORDS,
};
use crate::log::doorbell::Bell;

/// What the source thread hands an Usher.
pub enum Feed {
    Batch(Vec<Decoded<Inventory>>),
    /// The partition's end was reached (spec: KafkaLog.AtEndForStopAtEnd).
    AtEnd,
}

/// Starts the source thread: every partition from `start_offsets[p]`
/// (spec: KafkaLog.EveryInstanceReadsEveryPartition, KafkaLog.StartFromLedger).
pub fn spawn_source(
    config: &KafkaConfig,
    instance: &str,
    start_offsets: Vec<u64>,
    feeds: Vec<FeedSender>,
    shared: Arc<KafkaShared>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    assert_eq!(start_offsets.len(), feeds.len());
    let consumer: BaseConsumer<ClientHooks> = client_config(&config.brokers)
        // Required by the client; no group is joined and nothing is committed.
        .set("group.id", format!("tribunal-{instance}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // spec: KafkaLog.NoSilentReset
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "10")
        .set("queued.min.messages", "200000")
        .create_with_context(ClientHooks { shared: shared.clone() })
        .context("creating the Kafka consumer")?;
    let topic = config.commands_topic.clone();
    assign(&consumer, &topic, &start_offsets)?;
    info!(topic = %topic, start_offsets = ?start_offsets, "reading every partition from the Ledger's offsets");
    std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || {
            shared.run_thread("Kafka source", || source_loop(&consumer, &topic, start_offsets, &feeds, &shared))
        })
        .context("starting the Kafka source thread")
}

fn assign(consumer: &BaseConsumer<ClientHooks>, topic: &str, next_offsets: &[u64]) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    for (partition, &offset) in next_offsets.iter().enumerate() {
        assignment.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))?;
    }
    consumer.assign(&assignment).context("assigning the commands topic's partitions")
}

/// One partition's channel to its Usher, with the doorbell that wakes the Usher when
/// something was sent (spec: KafkaLog.BridgeNeverBlocksExecutor): the Usher waits on it
/// instead of polling the channel every millisecond.
pub struct FeedSender {
    tx: SyncSender<Feed>,
    bell: Bell,
}

impl FeedSender {
    pub fn new(tx: SyncSender<Feed>, bell: Bell) -> Self {
        Self { tx, bell }
    }

    /// Blocks while the channel is full; an error means the Usher is gone.
    fn send(&self, feed: Feed) -> Result<(), ()> {
        self.tx.send(feed).map_err(|_| ())?;
        self.bell.ring();
        Ok(())
    }
}

/// The source thread's side of the per-partition channels.
struct Feeds<'a> {
    senders: &'a [FeedSender],
    batches: Vec<Vec<Decoded<Inventory>>>,
    /// The partition's Usher is gone (it finished under `--stop-at-end`): drop its records.
    closed: Vec<bool>,
    /// Partitions with a non-empty batch.
    pending: usize,
}

impl Feeds<'_> {
    fn push(&mut self, partition: usize, record: Decoded<Inventory>) {
        if self.closed[partition] {
            return;
        }
        let batch = &mut self.batches[partition];
        if batch.is_empty() {
            self.pending += 1;
            batch.reserve(SOURCE_BATCH_RECORDS);
        }
        batch.push(record);
        if batch.len() >= SOURCE_BATCH_RECORDS {
            self.flush(partition);
        }
    }

    /// Hands the partition's batch to its Usher; blocks while its channel is full.
    fn flush(&mut self, partition: usize) {
        let batch = std::mem::take(&mut self.batches[partition]);
        if batch.is_empty() {
            return;
        }
        self.pending -= 1;
        if !self.closed[partition] && self.senders[partition].send(Feed::Batch(batch)).is_err() {
            self.closed[partition] = true;
        }
    }

    fn flush_all(&mut self) {
        for partition in 0..self.senders.len() {
            self.flush(partition);
        }
    }

    fn at_end(&mut self, partition: usize) {
        self.flush(partition);
        if !self.closed[partition] && self.senders[partition].send(Feed::AtEnd).is_err() {
            self.closed[partition] = true;
        }
    }

    fn all_closed(&self) -> bool {
        self.closed.iter().all(|c| *c)
    }
}

/// After a consumption error: when to assign every partition again, the next delay, and
/// which partitions delivered since. Pure, so that its timing is tested without a broker.
///
/// The delay counts from the first error since the last re-assignment; errors while one is
/// pending do not postpone it. librdkafka queues several errors while a broker is away, and
/// a wait per queued error (the first design) kept instances not ready for about 25 s after
/// the broker came back from a 2 s outage. spec: KafkaLog.NoSilentReset
struct ErrorRecovery {
    backoff: Duration,
    reassign_at: Option<Instant>,
    delivered_since: Option<Vec<bool>>,
}

impl ErrorRecovery {
    fn new() -> Self {
        Self { backoff: BACKOFF_MIN, reassign_at: None, delivered_since: None }
    }

    /// A consumption error: the error lasts until every partition delivers again. Returns
    /// the re-assignment it scheduled, or None if one was already pending.
    fn failed(&mut self, now: Instant, partitions: usize) -> Option<Instant> {
        self.delivered_since = Some(vec![false; partitions]);
        if self.reassign_at.is_some() {
            return None;
        }
        let at = now + self.backoff;
        self.reassign_at = Some(at);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Some(at)
    }

    /// True once, when the pending re-assignment is due.
    fn reassign_due(&mut self, now: Instant) -> bool {
        match self.reassign_at {
            Some(at) if now >= at => {
                self.reassign_at = None;
                true
            }
            _ => false,
        }
    }

    /// A record or end of partition arrived. True when that ended the error: every
    /// partition has delivered since it; the pending re-assignment is no longer needed.
    fn delivered(&mut self, partition: usize) -> bool {
        let Some(seen) = &mut self.delivered_since else { return false };
        seen[partition] = true;
        if !seen.iter().all(|s| *s) {
            return false;
        }
        self.delivered_since = None;
        self.reassign_at = None;
        self.backoff = BACKOFF_MIN;
        true
    }
}

fn source_loop(
    consumer: &BaseConsumer<ClientHooks>,
    topic: &str,
    mut next_offsets: Vec<u64>,
    senders: &[FeedSender],
    shared: &KafkaShared,
) -> anyhow::Result<()> {
    let partitions = senders.len();
    let mut feeds = Feeds {
        senders,
        batches: (0..partitions).map(|_| Vec::new()).collect(),
        closed: vec![false; partitions],
        pending: 0,
    };
    let mut probe = BrokerProbe { backoff: BACKOFF_MIN, last: Instant::now() };
    let mut errors = ErrorRecovery::new();
    while !shared.stop.load(Ordering::Relaxed) && !feeds.all_closed() {
        if errors.reassign_due(Instant::now()) {
            info!(next_offsets = ?next_offsets, "reading every partition again from this instance's offsets");
            assign(consumer, topic, &next_offsets)?;
        }
        let timeout = if feeds.pending > 0 { Duration::ZERO } else { Duration::from_millis(100) };
        match consumer.poll(timeout) {
            None => {
                feeds.flush_all();
                probe.probe_if_due(consumer, topic, shared);
            }
            Some(Ok(message)) => {
                shared.connected();
                let Some(partition) = usize::try_from(message.partition()).ok().filter(|p| *p < partitions) else {
                    warn!(partition = message.partition(), "a record from a partition that is not assigned");
                    continue;
                };
                let offset = message.offset() as u64;
                feeds.push(partition, decode(&message));
                next_offsets[partition] = offset + 1;
                if errors.delivered(partition) {
                    shared.set_source_error(None);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                shared.connected();
                let Some(partition) = usize::try_from(partition).ok().filter(|p| *p < partitions) else { continue };
                feeds.at_end(partition);
                if errors.delivered(partition) {
                    shared.set_source_error(None);
                }
            }
            Some(Err(error)) => fetch_failed(&error, &mut feeds, &mut errors, &next_offsets, shared),
        }
    }
    Ok(())
}

/// spec: KafkaLog.StrangerRecordRejected — any bytes (or none) decode to an Envelope
/// or to a DecodeError, which the Usher turns into a `malformed` output.
fn decode(message: &BorrowedMessage<'_>) -> Decoded<Inventory> {
    Decoded {
        offset: message.offset() as u64,
        timestamp_ms: message.timestamp().to_millis().map_or(0, |t| t.max(0) as u64),
        envelope: Envelope::<Inventory>::decode(message.payload().unwrap_or_default()),
    }
}

/// spec: KafkaLog.NoSilentReset — an offset out of range, or any other fetch error:
/// not ready until every partition delivers again; wait, then read again from this
/// instance's own positions. Never skip.
fn fetch_failed(
    error: &KafkaError,
    feeds: &mut Feeds<'_>,
    errors: &mut ErrorRecovery,
    next_offsets: &[u64],
    shared: &KafkaShared,
) {
    feeds.flush_all();
    shared.set_source_error(Some(error.to_string()));
    let now = Instant::now();
    match errors.failed(now, feeds.senders.len()) {
        Some(at) => warn!(
            %error, next_offsets = ?next_offsets, retry_in_ms = (at - now).as_millis() as u64,
            "consuming the commands topic failed; reading again from this instance's offsets"
        ),
        None => debug!(%error, "consuming the commands topic failed again; a re-read is pending"),
    }
    // Bounds a loop on an error librdkafka repeats at once; never a wait per error.
    std::thread::sleep(ERROR_PAUSE);
}

/// While the broker is not connected, asks it for the topic's metadata now and then
/// (doubling the wait after each failure), so that a reachable broker is noticed.
struct BrokerProbe {
    backoff: Duration,
    last: Instant,
}

impl BrokerProbe {
    /// Probes the broker if it is not connected and the backoff has passed.
    fn probe_if_due(&mut self, consumer: &BaseConsumer<ClientHooks>, topic: &str, shared: &KafkaShared) {
        if !shared.broker_connected.load(Ordering::Relaxed) && self.last.elapsed() >= self.backoff {
            self.last = Instant::now();
            match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                Ok(_) => {
                    shared.connected();
                    self.backoff = BACKOFF_MIN;
                }
                Err(_) => self.backoff = (self.backoff * 2).min(BACKOFF_MAX),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_while_a_reread_is_pending_do_not_postpone_it() {
        // spec: KafkaLog.NoSilentReset — a burst of queued errors (a broker that was away)
        // costs one backoff, not one per error.
        let t0 = Instant::now();
        let mut errors = ErrorRecovery::new();
        assert_eq!(errors.failed(t0, 2), Some(t0 + BACKOFF_MIN));
        for later_ms in [1, 20, 99] {
            assert_eq!(errors.failed(t0 + Duration::from_millis(later_ms), 2), None);
        }
        assert!(!errors.reassign_due(t0 + Duration::from_millis(99)));
        assert!(errors.reassign_due(t0 + BACKOFF_MIN));
        assert!(!errors.reassign_due(t0 + BACKOFF_MIN), "due once");
        // Still failing after the re-read: the next delay doubles, up to BACKOFF_MAX.
        let t1 = t0 + Duration::from_millis(150);
        assert_eq!(errors.failed(t1, 2), Some(t1 + 2 * BACKOFF_MIN));
        let mut now = t1;
        for _ in 0..10 {
            now += BACKOFF_MAX;
            assert!(errors.reassign_due(now));
            let at = errors.failed(now, 2).expect("none pending");
            assert!(at - now <= BACKOFF_MAX);
        }
        assert_eq!(errors.backoff, BACKOFF_MAX);
    }

    #[test]
    fn the_error_ends_only_when_every_partition_delivered_and_that_cancels_the_reread() {
        // spec: KafkaLog.NoSilentReset, KafkaLog.SourceHealthy
        let t0 = Instant::now();
        let mut errors = ErrorRecovery::new();
        assert!(!errors.delivered(0), "no error, nothing to end");
        errors.failed(t0, 3);
        errors.failed(t0, 3);
        assert!(!errors.delivered(0));
        assert!(!errors.delivered(0), "the same partition twice is not every partition");
        assert!(!errors.delivered(2));
        assert!(errors.delivered(1));
        assert!(!errors.reassign_due(t0 + BACKOFF_MAX), "the pending re-read was cancelled");
        assert_eq!(errors.failed(t0, 3), Some(t0 + BACKOFF_MIN), "the backoff was reset");
        // A new error after a partial delivery needs every partition again.
        assert!(!errors.delivered(0));
        assert!(!errors.delivered(1));
        errors.failed(t0, 3);
        assert!(!errors.delivered(2));
    }
}
