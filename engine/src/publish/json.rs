//! The JSON form of an output: what the outputs topic carries (spec: Publisher.KeyedByInput)
//! and, later, what the Gateway answers. Any Kafka tool can read it; the digest of the
//! canonical rkyv bytes lets a reader compare it with what peers certified.

use serde::Serialize;
use tribunal_shards::digest::output_digest;
use tribunal_shards::inventory::{InventoryBody, InventoryEvent, StockLevel};
use tribunal_shards::output::{Output, OutputDecodeError, Verdict};

#[derive(Debug, Serialize)]
pub struct OutputJson {
    /// On the local outputs log, which has no record keys, the key travels inside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub partition: u32,
    pub offset: u64,
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<StockLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<InventoryEvent>,
    /// xxh3-128 of the canonical encoding, hex.
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputJsonError {
    #[error(transparent)]
    Output(#[from] OutputDecodeError),
    #[error(transparent)]
    Body(#[from] tribunal_shards::inventory::BodyDecodeError),
}

impl OutputJson {
    /// Decodes canonical output bytes (validated: they may come from disk).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OutputJsonError> {
        let output = Output::decode(bytes)?;
        let body = if output.body.is_empty() { None } else { Some(InventoryBody::decode(&output.body)?) };
        let (mut version, mut code, mut original_offset, mut reason) = (None, None, None, None);
        match &output.verdict {
            Verdict::Accepted { version: v } | Verdict::VersionActivated { version: v } => version = Some(*v),
            Verdict::Rejected { version: v, code: c } => (version, code) = (Some(*v), Some(c.clone())),
            Verdict::Replay { original_offset: o } | Verdict::Conflict { original_offset: o } => {
                original_offset = Some(*o)
            }
            Verdict::Malformed { reason: r } => reason = Some(r.clone()),
            Verdict::WardenFull => {}
        }
        let (levels, event) = body.map_or((Vec::new(), None), |b| (b.levels, b.event));
        Ok(Self {
            key: None,
            partition: output.partition,
            offset: output.offset,
            verdict: output.verdict.name(),
            version,
            code,
            original_offset,
            reason,
            levels,
            event,
            digest: format!("{:032x}", output_digest(bytes)),
        })
    }

    /// The Kafka key of the output of input (`partition`, `offset`).
    pub fn key(partition: u32, offset: u64) -> String {
        format!("{partition}:{offset}")
    }

    /// Parses a key made by [`OutputJson::key`].
    pub fn parse_key(key: &[u8]) -> Option<(u32, u64)> {
        let (partition, offset) = std::str::from_utf8(key).ok()?.split_once(':')?;
        Some((partition.parse().ok()?, offset.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_junk_keys_do_not_parse() {
        assert_eq!(OutputJson::parse_key(OutputJson::key(2, 17).as_bytes()), Some((2, 17)));
        for junk in [&b""[..], b"2", b"a:1", b"1:-3", b"\xff:1", b"1:2:3"] {
            assert_eq!(OutputJson::parse_key(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn garbage_bytes_are_an_error_not_a_panic() {
        assert!(OutputJson::from_bytes(b"not an output").is_err());
        assert!(OutputJson::from_bytes(&[]).is_err());
    }
}
