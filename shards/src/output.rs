//! The output of one input record, and its one canonical encoding.
//!
//! Instances compare outputs byte for byte (DESIGN.md §2 step 6), so an output has
//! exactly one encoding: rkyv of [`Output`], whose fields are all owned, sized and free
//! of floats and maps. Its digest is what peers and the Clerk retain.

use rkyv::{Archive, Deserialize, Serialize};

use crate::digest::output_digest;
use crate::domain::Version;

/// Why the output is what it is.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
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
}

/// The output of the record at (`partition`, `offset`).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[rkyv(derive(Debug))]
pub struct Output {
    pub partition: u32,
    pub offset: u64,
    pub verdict: Verdict,
    /// The domain's own canonical encoding of its part (levels, events); empty for
    /// verdicts decided before evaluation.
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

#[derive(Debug, thiserror::Error)]
#[error("output bytes do not decode: {0}")]
pub struct OutputDecodeError(String);

impl Output {
    pub fn encode(&self) -> EncodedOutput {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .expect("an in-memory output always encodes")
            .into_vec();
        let digest = output_digest(&bytes);
        EncodedOutput { partition: self.partition, offset: self.offset, bytes, digest }
    }

    /// Decodes bytes from outside (a peer, the Ledger), validating them first.
    pub fn decode(bytes: &[u8]) -> Result<Self, OutputDecodeError> {
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(bytes).map_err(|e| OutputDecodeError(e.to_string()))
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
        // Dirty the allocator with other data between the two encodings, so that
        // uninitialised padding, if rkyv left any, would show up as a difference.
        let noise: Vec<Vec<u8>> = (0..64).map(|i| vec![0xA5u8 ^ i as u8; 64 + i]).collect();
        drop(noise);
        let b = output.clone().encode();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.digest, b.digest);
        assert_eq!(Output::decode(&a.bytes).unwrap(), output);
    }

    #[test]
    fn garbage_bytes_are_an_error_not_a_panic() {
        assert!(Output::decode(&[]).is_err());
        assert!(Output::decode(&[0xFF; 7]).is_err());
        let mut bytes = Output { partition: 0, offset: 1, verdict: Verdict::WardenFull, body: vec![] }.encode().bytes;
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        // Either it fails validation or it decodes to something else; it never panics.
        let _ = Output::decode(&bytes);
    }
}
