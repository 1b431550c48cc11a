//! Ledger, sans-IO part: the record format of a shard's segments and the scan that
//! finds their valid prefix (spec: `specs/ledger.allium`, `specs/recovery.allium`).
//!
//! A record on disk is `[len: u32 LE][crc32c: u32 LE][payload: len bytes]`; the CRC
//! (Castagnoli) covers the length field and the payload, so a torn length is caught
//! too. The payload is postcard of [`LedgerRecord`]; an output inside it is the
//! canonical rkyv bytes, verbatim. The IO shell (glommio DMA files, group commit)
//! lives in the engine.
//!
//! The writer pads the last partial block with zeros when it syncs (Direct IO writes
//! whole blocks), and later syncs overwrite the padding. So a zero length field is the
//! clean end of a segment, not corruption: no real record has an empty payload.

use serde::{Deserialize, Serialize};

use crate::domain::Domain;
use crate::usher::UsherDelta;

/// Largest payload of one record. A batch journal of 8,192 records is about 260 KiB.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Bytes of the length and CRC fields.
pub const HEADER_BYTES: usize = 8;

/// One Ledger record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound(serialize = "", deserialize = ""))]
pub enum LedgerRecord<D: Domain> {
    /// The output of one offset, with the states of the entities it changed (empty
    /// unless accepted). A cross-shard event's record lives on its coordinator and
    /// holds every entity the event touched (spec: Ledger.RecordAppended).
    Entry {
        partition: u32,
        offset: u64,
        /// As bytes, not a sequence of `u8`: the same postcard encoding, one copy.
        #[serde(with = "serde_bytes")]
        output: Vec<u8>,
        deltas: Vec<(D::EntityKey, D::State)>,
    },
    /// Every record of the batch ending at `last_offset` is before this one. The home
    /// shard's marker carries the Usher's journal (spec: Ledger.BatchEndMarkerAppended).
    BatchEnd { partition: u32, last_offset: u64, usher: Option<UsherDelta>, snapshot: bool },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {size_bytes} bytes is over the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { size_bytes: usize },
}

/// Appends one framed record to `out`.
pub fn encode_record<D: Domain>(record: &LedgerRecord<D>, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    let out_len_before = out.len();
    let written = postcard::to_io(record, &mut *out).map(|_| ());
    written.expect("serialising into a Vec cannot fail");
    let payload_len = out.len() - out_len_before;
    if payload_len > MAX_RECORD_BYTES {
        out.truncate(start);
        return Err(RecordError::TooLarge { size_bytes: payload_len });
    }
    let len = (payload_len as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &out[start + HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Why a scan stopped before the end of the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was a valid record, or the rest is the writer's zero padding.
    Clean,
    /// The valid prefix ends at `position`; what follows is torn or corrupt
    /// (spec: Recovery.TornTailTruncated).
    Invalid { position: usize, reason: String },
}

/// A valid record and the byte position just after it.
pub struct Scanned<D: Domain> {
    pub end_position: usize,
    pub record: LedgerRecord<D>,
}

/// Reads the valid prefix of a segment. Never panics, whatever the bytes.
pub fn scan<D: Domain>(bytes: &[u8]) -> (Vec<Scanned<D>>, ScanEnd) {
    let mut records = Vec::new();
    let mut position = 0usize;
    loop {
        let rest = &bytes[position..];
        if rest.is_empty() {
            return (records, ScanEnd::Clean);
        }
        if rest.len() < HEADER_BYTES {
            if rest.iter().all(|b| *b == 0) {
                return (records, ScanEnd::Clean);
            }
            return (records, ScanEnd::Invalid { position, reason: "short header".into() });
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len == 0 {
            if rest.iter().all(|b| *b == 0) {
                return (records, ScanEnd::Clean);
            }
            return (records, ScanEnd::Invalid { position, reason: "zero length before the end of the data".into() });
        }
        if len > MAX_RECORD_BYTES {
            return (records, ScanEnd::Invalid { position, reason: format!("length {len} over the limit") });
        }
        if rest.len() < HEADER_BYTES + len {
            return (
                records,
                ScanEnd::Invalid { position, reason: format!("record of {len} bytes runs past the end") },
            );
        }
        let payload = &rest[HEADER_BYTES..HEADER_BYTES + len];
        let expected = crc32c::crc32c_append(crc32c::crc32c(&rest[0..4]), payload);
        if crc != expected {
            return (records, ScanEnd::Invalid { position, reason: "CRC mismatch".into() });
        }
        match postcard::from_bytes::<LedgerRecord<D>>(payload) {
            Ok(record) => {
                position += HEADER_BYTES + len;
                records.push(Scanned { end_position: position, record });
            }
            Err(error) => {
                return (records, ScanEnd::Invalid { position, reason: format!("payload does not decode: {error}") });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, StockKey};

    fn records() -> Vec<LedgerRecord<Inventory>> {
        vec![
            LedgerRecord::Entry {
                partition: 0,
                offset: 0,
                output: vec![1, 2, 3],
                deltas: vec![(StockKey::new("W", "S"), 5)],
            },
            LedgerRecord::Entry { partition: 0, offset: 1, output: vec![4], deltas: vec![] },
            LedgerRecord::BatchEnd {
                partition: 0,
                last_offset: 1,
                usher: Some(UsherDelta::default()),
                snapshot: false,
            },
        ]
    }

    fn encoded() -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for r in records() {
            encode_record(&r, &mut bytes).unwrap();
            ends.push(bytes.len());
        }
        (bytes, ends)
    }

    #[test]
    fn round_trip_and_zero_padding_is_a_clean_end() {
        let (mut bytes, _) = encoded();
        bytes.extend_from_slice(&[0u8; 3000]);
        let (scanned, end) = scan::<Inventory>(&bytes);
        assert_eq!(end, ScanEnd::Clean);
        let decoded: Vec<_> = scanned.into_iter().map(|s| format!("{:?}", s.record)).collect();
        let expected: Vec<_> = records().iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn a_torn_tail_ends_the_valid_prefix_at_the_last_whole_record() {
        // spec: Recovery.TornTailTruncated
        let (bytes, ends) = encoded();
        for cut in ends[1] + 1..bytes.len() {
            let (scanned, end) = scan::<Inventory>(&bytes[..cut]);
            assert_eq!(scanned.len(), 2, "cut at {cut}");
            assert!(matches!(end, ScanEnd::Invalid { position, .. } if position == ends[1]), "cut at {cut}: {end:?}");
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_stops_the_scan_at_that_record() {
        // spec: Recovery.TornTailTruncated
        let (bytes, ends) = encoded();
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            let (scanned, end) = scan::<Inventory>(&flipped);
            let record = ends.iter().position(|e| i < *e).unwrap();
            assert_eq!(scanned.len(), record, "flip at {i}");
            let start = if record == 0 { 0 } else { ends[record - 1] };
            assert!(matches!(end, ScanEnd::Invalid { position, .. } if position == start), "flip at {i}: {end:?}");
        }
    }

    #[test]
    fn output_bytes_encode_like_a_sequence_of_u8() {
        // The on-disk format is postcard's for a sequence of u8; serde_bytes only
        // makes writing it faster.
        #[derive(Serialize)]
        struct AsSeq {
            output: Vec<u8>,
        }
        #[derive(Serialize)]
        struct AsBytes {
            #[serde(with = "serde_bytes")]
            output: Vec<u8>,
        }
        let output: Vec<u8> = (0..=255).collect();
        assert_eq!(
            postcard::to_stdvec(&AsSeq { output: output.clone() }).unwrap(),
            postcard::to_stdvec(&AsBytes { output }).unwrap()
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 1u64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect();
            let _ = scan::<Inventory>(&bytes);
        }
    }
}
