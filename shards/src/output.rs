//! The output of one input record, and its one canonical encoding.
//!
//! Instances compare outputs byte for byte (docs/design.md §2 step 6), so an output has
//! exactly one encoding: rkyv (unaligned, little-endian, so no padding and readable
//! at any offset of a frame) of [`OutputRecord`]. Its digest is what peers and the
//! Clerk retain.
//!
//! Encoding is on the hot path, so it serialises borrowed data ([`VerdictRef`], the
//! body as a byte slice) into a reused buffer: one allocation per output, for the
//! bytes themselves. Decoding builds the owned [`Output`].

use rkyv::rancor::Error as RkyvError;
use rkyv::with::InlineAsBox;
use rkyv::{Archive, Serialize};

use crate::digest::output_digest;
use crate::domain::Version;

/// Why the output is what it is (owned form, for readers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Evaluated and applied under `version`.
    Accepted { version: Version },
    /// Evaluated under `version` and refused; nothing changed.
    Rejected { version: Version, code: String },
    /// The key was seen within the TTL with the same payload: the answer is the output
    /// at `original_offset` (spec: Warden.ReplayReturnsOriginal).
    Replay { original_offset: u64 },
    /// The key was seen within the TTL with another payload (spec: Warden.ConflictOnDifferentPayload).
    Conflict { original_offset: u64 },
    /// The record did not decode or broke a bound (spec: Usher.MalformedRecordRejected).
    Malformed { reason: String },
    /// The Warden held `max_entries` live keys (spec: Warden.CapacityBound).
    WardenFull,
    /// An `activate_version` command took effect (spec: Versioning.ActivateAtNextOffset).
    VersionActivated { version: Version },
}

/// Borrowed verdict: what is actually serialised.
#[derive(Debug, Clone, Copy, Archive, Serialize)]
pub enum VerdictRef<'a> {
    Accepted {
        version: Version,
    },
    Rejected {
        version: Version,
        #[rkyv(with = InlineAsBox)]
        code: &'a str,
    },
    Replay {
        original_offset: u64,
    },
    Conflict {
        original_offset: u64,
    },
    Malformed {
        #[rkyv(with = InlineAsBox)]
        reason: &'a str,
    },
    WardenFull,
    VersionActivated {
        version: Version,
    },
}

/// The canonical wire and Ledger form of an output.
#[derive(Debug, Archive, Serialize)]
pub struct OutputRecord<'a> {
    pub partition: u32,
    pub offset: u64,
    pub verdict: VerdictRef<'a>,
    /// The domain's own canonical encoding of its part (levels, events); empty for
    /// verdicts decided before evaluation.
    #[rkyv(with = InlineAsBox)]
    pub body: &'a [u8],
}

impl Verdict {
    /// Stable short name, for logs, metrics and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Accepted { .. } => "accepted",
            Verdict::Rejected { .. } => "rejected",
            Verdict::Replay { .. } => "replay",
            Verdict::Conflict { .. } => "conflict",
            Verdict::Malformed { .. } => "malformed",
            Verdict::WardenFull => "warden_full",
            Verdict::VersionActivated { .. } => "version_activated",
        }
    }

    pub fn as_ref(&self) -> VerdictRef<'_> {
        match self {
            Verdict::Accepted { version } => VerdictRef::Accepted { version: *version },
            Verdict::Rejected { version, code } => VerdictRef::Rejected { version: *version, code },
            Verdict::Replay { original_offset } => VerdictRef::Replay { original_offset: *original_offset },
            Verdict::Conflict { original_offset } => VerdictRef::Conflict { original_offset: *original_offset },
            Verdict::Malformed { reason } => VerdictRef::Malformed { reason },
            Verdict::WardenFull => VerdictRef::WardenFull,
            Verdict::VersionActivated { version } => VerdictRef::VersionActivated { version: *version },
        }
    }

    fn from_archived(archived: &ArchivedVerdictRef<'_>) -> Self {
        match archived {
            ArchivedVerdictRef::Accepted { version } => Verdict::Accepted { version: version.to_native() },
            ArchivedVerdictRef::Rejected { version, code } => {
                Verdict::Rejected { version: version.to_native(), code: code.as_ref().to_owned() }
            }
            ArchivedVerdictRef::Replay { original_offset } => {
                Verdict::Replay { original_offset: original_offset.to_native() }
            }
            ArchivedVerdictRef::Conflict { original_offset } => {
                Verdict::Conflict { original_offset: original_offset.to_native() }
            }
            ArchivedVerdictRef::Malformed { reason } => Verdict::Malformed { reason: reason.as_ref().to_owned() },
            ArchivedVerdictRef::WardenFull => Verdict::WardenFull,
            ArchivedVerdictRef::VersionActivated { version } => {
                Verdict::VersionActivated { version: version.to_native() }
            }
        }
    }
}

/// The output of the record at (`partition`, `offset`), decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub partition: u32,
    pub offset: u64,
    pub verdict: Verdict,
    pub body: Vec<u8>,
}

/// An output in its canonical encoding, with its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedOutput {
    pub partition: u32,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub digest: u128,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutputDecodeError {
    #[error("output bytes do not decode: {0}")]
    Invalid(String),
    /// The bytes decode, but they are not the one encoding of what they decode to (a
    /// junk prefix, stray bytes in an unused enum payload, ...). Accepting them would let
    /// two byte-different copies stand for one output.
    #[error("output bytes are not the canonical encoding")]
    NotCanonical,
}

/// Encodes an output, using `scratch` as the serialiser's buffer.
pub fn encode_output(
    partition: u32,
    offset: u64,
    verdict: VerdictRef<'_>,
    body: &[u8],
    scratch: &mut Vec<u8>,
) -> EncodedOutput {
    encode_into(partition, offset, verdict, body, scratch);
    let bytes = scratch.as_slice().to_vec();
    let digest = output_digest(&bytes);
    EncodedOutput { partition, offset, bytes, digest }
}

/// Replaces the contents of `out` with the canonical encoding.
fn encode_into(partition: u32, offset: u64, verdict: VerdictRef<'_>, body: &[u8], out: &mut Vec<u8>) {
    let record = OutputRecord { partition, offset, verdict, body };
    out.clear();
    rkyv::util::with_arena(|arena| {
        rkyv::api::low::to_bytes_in_with_alloc::<_, _, RkyvError>(&record, &mut *out, arena.acquire())
            .expect("an in-memory output always encodes");
    });
}

impl Output {
    pub fn encode(&self) -> EncodedOutput {
        encode_output(self.partition, self.offset, self.verdict.as_ref(), &self.body, &mut Vec::new())
    }

    /// Decodes bytes from outside (a peer, the Ledger), validating them first. Never
    /// panics, whatever the bytes. Only the canonical encoding decodes: re-encoding the
    /// result must give exactly `bytes` (spec: Arbiter.OutputCanonical).
    pub fn decode(bytes: &[u8]) -> Result<Self, OutputDecodeError> {
        let archived = rkyv::access::<ArchivedOutputRecord<'_>, RkyvError>(bytes)
            .map_err(|e| OutputDecodeError::Invalid(e.to_string()))?;
        let output = Self {
            partition: archived.partition.to_native(),
            offset: archived.offset.to_native(),
            verdict: Verdict::from_archived(&archived.verdict),
            body: archived.body.as_ref().to_vec(),
        };
        let mut canonical = Vec::with_capacity(bytes.len());
        encode_into(output.partition, output.offset, output.verdict.as_ref(), &output.body, &mut canonical);
        if canonical != bytes {
            return Err(OutputDecodeError::NotCanonical);
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_canonical_and_round_trips() {
        // spec: Arbiter.OutputCanonical
        let output = Output {
            partition: 3,
            offset: 99,
            verdict: Verdict::Rejected { version: 1, code: "insufficient_stock".into() },
            body: vec![1, 2, 3],
        };
        let a = output.encode();
        let mut dirty = vec![0xA5u8; 4096];
        let b = encode_output(3, 99, output.verdict.as_ref(), &output.body, &mut dirty);
        assert_eq!(a.bytes, b.bytes, "a dirty scratch buffer leaves no trace");
        assert_eq!(a.digest, b.digest);
        assert_eq!(Output::decode(&a.bytes).unwrap(), output);
        for verdict in [
            Verdict::Accepted { version: 2 },
            Verdict::Replay { original_offset: 5 },
            Verdict::Conflict { original_offset: 6 },
            Verdict::Malformed { reason: "bad".into() },
            Verdict::WardenFull,
            Verdict::VersionActivated { version: 2 },
        ] {
            let o = Output { partition: 0, offset: 1, verdict, body: vec![] };
            assert_eq!(Output::decode(&o.encode().bytes).unwrap(), o);
        }
    }

    #[test]
    fn decodes_at_any_alignment() {
        let o = Output { partition: 1, offset: 2, verdict: Verdict::Accepted { version: 1 }, body: vec![9; 5] };
        let bytes = o.encode().bytes;
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(Output::decode(&shifted[1..]).unwrap(), o);
    }

    #[test]
    fn only_the_canonical_encoding_decodes() {
        // spec: Arbiter.OutputCanonical
        let output = Output { partition: 1, offset: 2, verdict: Verdict::WardenFull, body: vec![7; 3] };
        let bytes = output.encode().bytes;
        assert_eq!(Output::decode(&bytes).unwrap(), output);
        let mut prefixed = vec![0xC3; 16];
        prefixed.extend_from_slice(&bytes);
        assert_eq!(Output::decode(&prefixed).unwrap_err(), OutputDecodeError::NotCanonical);
        // WardenFull carries no payload, so the bytes reserved for the largest variant's
        // payload are unused: rkyv's validation accepts any value there.
        let mut stray = 0;
        for i in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[i] ^= 0x10;
            if rkyv::access::<ArchivedOutputRecord<'_>, RkyvError>(&changed).is_ok() {
                match Output::decode(&changed) {
                    Err(error) => {
                        assert_eq!(error, OutputDecodeError::NotCanonical);
                        stray += 1;
                    }
                    Ok(decoded) => assert_ne!(decoded, output, "byte {i}"),
                }
            }
        }
        assert!(stray > 0, "some byte changes pass rkyv's validation and only the canonical check refuses them");
    }

    #[test]
    fn garbage_bytes_are_an_error_not_a_panic() {
        assert!(Output::decode(&[]).is_err());
        assert!(Output::decode(&[0xFF; 7]).is_err());
        let bytes =
            Output { partition: 0, offset: 1, verdict: Verdict::Malformed { reason: "x".into() }, body: vec![] }
                .encode()
                .bytes;
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                // Either it fails validation or decodes to something else; never a panic.
                let _ = Output::decode(&flipped);
            }
        }
    }
}
