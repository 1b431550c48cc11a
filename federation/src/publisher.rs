//! The Publisher's decisions, sans-IO: which outputs may go to the outputs topic, in
//! which order, and how far publication has been acknowledged.
//!
//! Outputs are offered as they are certified, and again after a hand-over, so the
//! publisher does not rely on the order it is offered them in. Readers of the outputs topic, and the
//! restart logic (spec: Publisher.ResumeFromOutputTopic), rely on each output partition
//! holding the outputs in input-offset order with no holes: the last record of output
//! partition p then says how far p was published. So an output waits here until every
//! earlier offset of its partition has been released (spec: Publisher.InOffsetOrder).
//!
//! The IO shells (engine/src/publish/: the Kafka publisher thread and the local outputs
//! log) offer certified outputs, write what is released, and report acknowledgements.

use std::collections::BTreeMap;

/// Outputs that may wait for an earlier offset, over all partitions. The Usher stops
/// reading while more records than this are unacknowledged (spec: Publisher.BoundedBacklog),
/// so reaching it means that gate is broken.
pub const MAX_WAITING_OUTPUTS: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublisherError {
    #[error("partition {partition} is not published by this instance ({partitions} partitions)")]
    UnknownPartition { partition: u32, partitions: usize },
    #[error("output ({partition}, {offset}) offered twice with different bytes")]
    DifferentCopy { partition: u32, offset: u64 },
    #[error("{MAX_WAITING_OUTPUTS} outputs wait for earlier offsets; the backlog gate is broken")]
    Full,
}

/// What [`Publisher::offer`] did with an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// It waits for release (or for an earlier offset first).
    Queued,
    /// Its offset was already released, or was on the topic when this instance
    /// started: it is dropped and will never be acknowledged.
    AlreadyPublished,
}

/// An output ready to be produced, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub partition: u32,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug)]
struct PartitionQueue {
    /// The next offset to release: everything below it was released (or was already
    /// published when this instance started).
    next_offset: u64,
    /// Outputs at or after `next_offset` that arrived before an earlier one.
    waiting: BTreeMap<u64, Vec<u8>>,
    /// One past the highest offset the broker acknowledged (0: none).
    acked_end: u64,
}

#[derive(Debug)]
pub struct Publisher {
    partitions: Vec<PartitionQueue>,
    waiting_total: usize,
}

impl Publisher {
    /// `published_end[p]` is one past the last offset of partition p already on the
    /// outputs topic (0 when it holds none), read from the topic at start.
    pub fn new(published_end: &[u64]) -> Self {
        let partitions = published_end
            .iter()
            .map(|&end| PartitionQueue { next_offset: end, waiting: BTreeMap::new(), acked_end: end })
            .collect();
        Self { partitions, waiting_total: 0 }
    }

    /// Takes a durable output (spec: Publisher.OnlyDurableOutputs). One already released
    /// or already on the topic is dropped: after a restart the Ledger offers again what
    /// the topic may hold, and an identical duplicate is not published twice from here.
    pub fn offer(&mut self, partition: u32, offset: u64, bytes: Vec<u8>) -> Result<Offered, PublisherError> {
        let partitions = self.partitions.len();
        let queue = self
            .partitions
            .get_mut(partition as usize)
            .ok_or(PublisherError::UnknownPartition { partition, partitions })?;
        if offset < queue.next_offset {
            return Ok(Offered::AlreadyPublished);
        }
        if let Some(existing) = queue.waiting.get(&offset) {
            return if *existing == bytes {
                Ok(Offered::AlreadyPublished)
            } else {
                Err(PublisherError::DifferentCopy { partition, offset })
            };
        }
        if self.waiting_total >= MAX_WAITING_OUTPUTS {
            return Err(PublisherError::Full);
        }
        queue.waiting.insert(offset, bytes);
        self.waiting_total += 1;
        Ok(Offered::Queued)
    }

    /// Moves every output that is next in its partition into `out`, in offset order per
    /// partition (spec: Publisher.InOffsetOrder).
    pub fn release(&mut self, out: &mut Vec<Release>) {
        for (partition, queue) in self.partitions.iter_mut().enumerate() {
            while let Some(entry) = queue.waiting.first_entry() {
                if *entry.key() != queue.next_offset {
                    // Offsets below next_offset were dropped by offer, so a first key
                    // above it is a hole that an earlier output has yet to fill.
                    debug_assert!(*entry.key() > queue.next_offset);
                    break;
                }
                let bytes = entry.remove();
                self.waiting_total -= 1;
                out.push(Release { partition: partition as u32, offset: queue.next_offset, bytes });
                queue.next_offset += 1;
            }
        }
    }

    /// The broker acknowledged `(partition, offset)` (spec: Publisher.MarkAdvancesOnAck).
    /// The idempotent producer acknowledges a partition in order; taking the maximum
    /// keeps the mark monotonic whatever the callback order.
    pub fn acknowledged(&mut self, partition: u32, offset: u64) {
        if let Some(queue) = self.partitions.get_mut(partition as usize) {
            assert!(offset < queue.next_offset, "only released outputs are acknowledged");
            queue.acked_end = queue.acked_end.max(offset + 1);
        }
    }

    /// Another instance published `partition` below `end` (its heartbeats say so): this
    /// one, taking over, starts there (spec: Clerk.PublisherHandOver). Waiting outputs
    /// below `end` are dropped; released, unacknowledged ones still get their acks.
    pub fn skip_to(&mut self, partition: u32, end: u64) {
        let Some(queue) = self.partitions.get_mut(partition as usize) else { return };
        if end <= queue.next_offset {
            return;
        }
        let kept = queue.waiting.split_off(&end);
        self.waiting_total -= queue.waiting.len();
        queue.waiting = kept;
        queue.next_offset = end;
        queue.acked_end = queue.acked_end.max(end);
    }

    /// One past the last acknowledged offset of `partition` (0: none).
    pub fn published_end(&self, partition: u32) -> u64 {
        self.partitions.get(partition as usize).map_or(0, |q| q.acked_end)
    }

    /// Outputs released but not yet acknowledged, over all partitions.
    pub fn unacknowledged(&self) -> u64 {
        self.partitions.iter().map(|q| q.next_offset.saturating_sub(q.acked_end)).sum()
    }

    pub fn waiting(&self) -> usize {
        self.waiting_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released(publisher: &mut Publisher) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        publisher.release(&mut out);
        out.into_iter().map(|r| (r.partition, r.offset)).collect()
    }

    #[test]
    fn early_outputs_wait_for_the_hole_before_them() {
        // spec: Publisher.InOffsetOrder
        let mut publisher = Publisher::new(&[0, 0]);
        publisher.offer(0, 2, vec![2]).unwrap();
        publisher.offer(0, 1, vec![1]).unwrap();
        publisher.offer(1, 0, vec![9]).unwrap();
        assert_eq!(released(&mut publisher), vec![(1, 0)]);
        assert_eq!(publisher.waiting(), 2);
        publisher.offer(0, 0, vec![0]).unwrap();
        assert_eq!(released(&mut publisher), vec![(0, 0), (0, 1), (0, 2)]);
        assert_eq!(publisher.waiting(), 0);
        assert!(released(&mut publisher).is_empty());
    }

    #[test]
    fn outputs_already_on_the_topic_are_not_released_again() {
        // spec: Publisher.ResumeFromOutputTopic
        let mut publisher = Publisher::new(&[5]);
        for offset in 0..7 {
            let expected = if offset < 5 { Offered::AlreadyPublished } else { Offered::Queued };
            assert_eq!(publisher.offer(0, offset, vec![offset as u8]), Ok(expected));
        }
        assert_eq!(released(&mut publisher), vec![(0, 5), (0, 6)]);
        assert_eq!(publisher.published_end(0), 5);
        assert_eq!(publisher.unacknowledged(), 2);
    }

    #[test]
    fn the_mark_advances_only_on_acknowledgement() {
        // spec: Publisher.MarkAdvancesOnAck
        let mut publisher = Publisher::new(&[0]);
        publisher.offer(0, 0, vec![0]).unwrap();
        publisher.offer(0, 1, vec![1]).unwrap();
        assert_eq!(released(&mut publisher).len(), 2);
        assert_eq!(publisher.published_end(0), 0);
        publisher.acknowledged(0, 1);
        publisher.acknowledged(0, 0);
        assert_eq!(publisher.published_end(0), 2);
        assert_eq!(publisher.unacknowledged(), 0);
    }

    #[test]
    fn a_different_second_copy_is_an_error_and_an_unknown_partition_too() {
        let mut publisher = Publisher::new(&[0]);
        assert_eq!(publisher.offer(0, 3, vec![1]), Ok(Offered::Queued));
        assert_eq!(publisher.offer(0, 3, vec![1]), Ok(Offered::AlreadyPublished));
        assert_eq!(publisher.offer(0, 3, vec![2]), Err(PublisherError::DifferentCopy { partition: 0, offset: 3 }));
        assert_eq!(
            publisher.offer(4, 0, vec![]),
            Err(PublisherError::UnknownPartition { partition: 4, partitions: 1 })
        );
        assert_eq!(publisher.waiting(), 1);
    }
}
