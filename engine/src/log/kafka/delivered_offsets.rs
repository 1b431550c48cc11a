//! Which offsets in a Kafka producer's delivery reports are real, sans-IO
//! (spec: KafkaLog.DeliveredOffsetTrusted, KafkaLog.DeliveredOffsetUnknown).
//!
//! Why this exists: when a retried batch was already written, the broker answers
//! DUPLICATE_SEQUENCE_NUMBER with base offset -1 (tansu 0.6.0 does so for every batch that
//! was in flight when it restarted). librdkafka reports the batch as delivered and numbers
//! its records from that base: -1, 0, 1, 2, ... Those numbers are other commands' offsets,
//! and answering from them hands a client another command's outcome. The record is in the
//! log; only its offset is unknown.
//!
//! What is used to tell: an idempotent producer's records land in order on a partition, so
//! its real offsets only grow; an invented run starts below zero and goes up by one per
//! record of the batch, and one batch's reports arrive together.

/// The position of one delivered record, as far as it can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    At(u64),
    Unknown(Why),
}

/// Why a delivered record's offset is unknown; only the logging differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Below zero: a duplicate-sequence batch's first record (-1), or a record acknowledged
    /// implicitly by a later batch's success (librdkafka leaves those at -1001).
    NoOffset,
    /// The rest of a duplicate-sequence batch: -1, 0, 1, ... counted on from its first.
    InventedRun,
    /// Below the last real offset: real offsets of one producer only grow, so the broker's
    /// log went back (truncated or recreated).
    BelowRealEnd { real_end: u64 },
}

#[derive(Debug, Clone, Copy, Default)]
struct PartitionReports {
    /// One past the highest real offset reported on the partition (0: none yet).
    real_end: u64,
    /// Inside an invented run: the number its next record would get.
    invented_next: Option<i64>,
}

/// Per partition of one producer. Bounded by the topic's partition count.
#[derive(Debug)]
pub struct DeliveredOffsets {
    partitions: Vec<PartitionReports>,
}

impl DeliveredOffsets {
    pub fn new(partitions: u32) -> Self {
        Self { partitions: vec![PartitionReports::default(); partitions as usize] }
    }

    /// Classifies one successful delivery report, in the order librdkafka gave them.
    pub fn delivered(&mut self, partition: u32, reported_offset: i64) -> Delivered {
        let index = partition as usize;
        if index >= self.partitions.len() {
            // A partition count that grew since start: track it rather than guess.
            self.partitions.resize(index + 1, PartitionReports::default());
        }
        let reports = &mut self.partitions[index];
        if reported_offset < 0 || reports.invented_next == Some(reported_offset) {
            let why = if reported_offset < 0 { Why::NoOffset } else { Why::InventedRun };
            reports.invented_next = Some(reported_offset.saturating_add(1));
            return Delivered::Unknown(why);
        }
        reports.invented_next = None;
        let offset = reported_offset as u64;
        if offset < reports.real_end {
            return Delivered::Unknown(Why::BelowRealEnd { real_end: reports.real_end });
        }
        reports.real_end = offset + 1;
        Delivered::At(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_offset_trusted_while_real_offsets_grow() {
        // spec: KafkaLog.DeliveredOffsetTrusted
        let mut offsets = DeliveredOffsets::new(2);
        assert_eq!(offsets.delivered(0, 7000), Delivered::At(7000));
        assert_eq!(offsets.delivered(0, 7001), Delivered::At(7001));
        assert_eq!(offsets.delivered(1, 3), Delivered::At(3), "partitions are tracked apart");
        assert_eq!(offsets.delivered(0, 7400), Delivered::At(7400), "other producers' records in between");
    }

    #[test]
    fn delivered_offset_unknown_for_a_duplicate_sequence_batch_then_the_next_real_batch_is_trusted() {
        // spec: KafkaLog.DeliveredOffsetUnknown — what librdkafka reported in the chaos
        // run that answered keys with offsets 0, 1, 2, ... after a broker restart.
        let mut offsets = DeliveredOffsets::new(1);
        assert_eq!(offsets.delivered(0, 3340), Delivered::At(3340));
        assert_eq!(offsets.delivered(0, -1), Delivered::Unknown(Why::NoOffset));
        for invented in 0..=5 {
            assert_eq!(offsets.delivered(0, invented), Delivered::Unknown(Why::InventedRun), "invented {invented}");
        }
        assert_eq!(offsets.delivered(0, 3350), Delivered::At(3350));
        assert_eq!(offsets.delivered(0, 3351), Delivered::At(3351));
    }

    #[test]
    fn delivered_offset_unknown_for_an_invented_run_on_a_fresh_producer() {
        // spec: KafkaLog.DeliveredOffsetUnknown — the first report after start may be one.
        let mut offsets = DeliveredOffsets::new(1);
        for invented in -1..=3 {
            assert!(matches!(offsets.delivered(0, invented), Delivered::Unknown(_)));
        }
        assert_eq!(offsets.delivered(0, 120), Delivered::At(120));
    }

    #[test]
    fn delivered_offset_unknown_below_the_last_real_one() {
        // spec: KafkaLog.DeliveredOffsetUnknown — real offsets of one producer only grow.
        let mut offsets = DeliveredOffsets::new(1);
        assert_eq!(offsets.delivered(0, 50), Delivered::At(50));
        assert_eq!(offsets.delivered(0, 10), Delivered::Unknown(Why::BelowRealEnd { real_end: 51 }));
        assert_eq!(
            offsets.delivered(0, 50),
            Delivered::Unknown(Why::BelowRealEnd { real_end: 51 }),
            "one offset is never given twice"
        );
        assert_eq!(offsets.delivered(0, 51), Delivered::At(51));
    }

    #[test]
    fn delivered_offset_unknown_for_two_invented_runs_back_to_back() {
        // spec: KafkaLog.DeliveredOffsetUnknown — each run restarts at -1.
        let mut offsets = DeliveredOffsets::new(1);
        for reported in [-1, 0, 1, -1, 0] {
            assert!(matches!(offsets.delivered(0, reported), Delivered::Unknown(_)));
        }
        assert_eq!(offsets.delivered(0, 900), Delivered::At(900));
    }

    #[test]
    fn delivered_offset_unknown_for_implicitly_acknowledged_records() {
        // spec: KafkaLog.DeliveredOffsetUnknown — a later batch's success acknowledges
        // earlier records implicitly; librdkafka leaves them at RD_KAFKA_OFFSET_INVALID.
        let mut offsets = DeliveredOffsets::new(1);
        assert_eq!(offsets.delivered(0, 40), Delivered::At(40));
        for _ in 0..3 {
            assert_eq!(offsets.delivered(0, -1001), Delivered::Unknown(Why::NoOffset));
        }
        assert_eq!(offsets.delivered(0, 44), Delivered::At(44));
    }

    #[test]
    fn a_partition_beyond_the_count_at_start_is_tracked() {
        let mut offsets = DeliveredOffsets::new(1);
        assert_eq!(offsets.delivered(3, 4), Delivered::At(4));
        assert_eq!(offsets.delivered(3, 2), Delivered::Unknown(Why::BelowRealEnd { real_end: 5 }));
    }
}
