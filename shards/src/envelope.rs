//! The versioned JSON envelope every command travels in, on the local log and on Kafka.
//!
//! `{"v":1,"key":"<idempotency key>","command":{"type":"transfer",...}}`
//!
//! JSON so that any Kafka tool can read the input topic. Decoding happens once, in the
//! Usher; a record that does not decode becomes a deterministic `Malformed` output for
//! its offset (spec: Usher.MalformedRecordRejected), never a crash.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::{Domain, Version};

/// The only envelope version this binary reads.
pub const ENVELOPE_VERSION: u32 = 1;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Largest record the Usher decodes; anything longer is malformed without being parsed.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Commands that belong to the engine rather than to the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminCommand {
    /// Switch the domain logic to `version` from the next offset on (spec: Versioning).
    ActivateVersion { version: Version },
}

#[derive(Debug)]
pub enum Command<D: Domain> {
    Admin(AdminCommand),
    Domain(D::Command),
}

impl<D: Domain> PartialEq for Command<D> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Command::Admin(a), Command::Admin(b)) => a == b,
            (Command::Domain(a), Command::Domain(b)) => a == b,
            _ => false,
        }
    }
}

// Manual impls: a derive would demand `D: Clone`, but only `D::Command` is cloned.
impl<D: Domain> Clone for Command<D> {
    fn clone(&self) -> Self {
        match self {
            Command::Admin(a) => Command::Admin(a.clone()),
            Command::Domain(c) => Command::Domain(c.clone()),
        }
    }
}

/// A decoded and validated input record.
#[derive(Debug)]
pub struct Envelope<D: Domain> {
    pub key: String,
    pub command: Command<D>,
}

impl<D: Domain> Clone for Envelope<D> {
    fn clone(&self) -> Self {
        Self { key: self.key.clone(), command: self.command.clone() }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {size_bytes} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { size_bytes: usize },
    #[error("invalid JSON envelope: {0}")]
    Json(String),
    #[error("unsupported envelope version {0} (this binary reads version {ENVELOPE_VERSION})")]
    Version(u32),
    #[error("idempotency key must be 1..={MAX_KEY_BYTES} printable ASCII characters")]
    Key,
    #[error("invalid command: {0}")]
    Command(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvelope<'a> {
    v: u32,
    key: String,
    #[serde(borrow)]
    command: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct CommandType<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, C: Serialize> {
    v: u32,
    key: &'a str,
    command: &'a C,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

impl<D: Domain> Envelope<D> {
    pub fn domain(key: impl Into<String>, command: D::Command) -> Self {
        Self { key: key.into(), command: Command::Domain(command) }
    }

    pub fn admin(key: impl Into<String>, command: AdminCommand) -> Self {
        Self { key: key.into(), command: Command::Admin(command) }
    }

    /// Decodes and validates one record. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(DecodeError::TooLarge { size_bytes: bytes.len() });
        }
        let raw: RawEnvelope<'_> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        if raw.v != ENVELOPE_VERSION {
            return Err(DecodeError::Version(raw.v));
        }
        if !valid_key(&raw.key) {
            return Err(DecodeError::Key);
        }
        let kind: CommandType<'_> =
            serde_json::from_str(raw.command.get()).map_err(|e| DecodeError::Command(e.to_string()))?;
        let command = if kind.kind == "activate_version" {
            let admin: AdminCommand =
                serde_json::from_str(raw.command.get()).map_err(|e| DecodeError::Command(e.to_string()))?;
            Command::Admin(admin)
        } else {
            let command: D::Command =
                serde_json::from_str(raw.command.get()).map_err(|e| DecodeError::Command(e.to_string()))?;
            D::validate(&command).map_err(DecodeError::Command)?;
            Command::Domain(command)
        };
        Ok(Self { key: raw.key, command })
    }

    /// Encodes the envelope as one line of JSON (no trailing newline).
    pub fn encode(&self) -> Vec<u8> {
        let result = match &self.command {
            Command::Admin(c) => serde_json::to_vec(&EnvelopeOut { v: ENVELOPE_VERSION, key: &self.key, command: c }),
            Command::Domain(c) => serde_json::to_vec(&EnvelopeOut { v: ENVELOPE_VERSION, key: &self.key, command: c }),
        };
        result.expect("serialising an in-memory envelope cannot fail")
    }

    /// Digest of the canonical payload: what the Warden compares to tell a replay from
    /// a conflicting reuse of the key.
    pub fn payload_digest(&self) -> u64 {
        match &self.command {
            Command::Domain(c) => D::command_digest(c),
            Command::Admin(AdminCommand::ActivateVersion { version }) => {
                crate::digest::CanonicalHasher::new().tag(0xAD).u64(u64::from(*version)).finish64()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, InventoryCommand};

    type Env = Envelope<Inventory>;

    #[test]
    fn round_trip() {
        let env = Env::domain(
            "k-1",
            InventoryCommand::Transfer {
                sku: "S".into(),
                from_warehouse: "A".into(),
                to_warehouse: "B".into(),
                qty: 3,
            },
        );
        let bytes = env.encode();
        let back = Env::decode(&bytes).unwrap();
        assert_eq!(back.key, "k-1");
        assert_eq!(back.command, env.command);
        let admin = Env::admin("a", AdminCommand::ActivateVersion { version: 2 });
        assert_eq!(Env::decode(&admin.encode()).unwrap().command, admin.command);
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        // spec: Usher.MalformedRecordRejected
        let cases: &[(&[u8], &str)] = &[
            (b"", "invalid JSON"),
            (b"{not json", "invalid JSON"),
            (b"\xff\xfe", "invalid JSON"),
            (br#"{"v":2,"key":"k","command":{"type":"adjust"}}"#, "unsupported envelope version"),
            (br#"{"v":1,"key":"","command":{"type":"adjust"}}"#, "idempotency key"),
            (br#"{"v":1,"key":"k","command":{"type":"teleport"}}"#, "invalid command"),
            (br#"{"v":1,"key":"k","command":{"type":"transfer","sku":"S","from_warehouse":"A","to_warehouse":"B","qty":0}}"#, "qty must be"),
            (br#"{"v":1,"key":"k","command":{"type":"transfer","sku":"S","from_warehouse":"A","to_warehouse":"B","qty":-1}}"#, "invalid command"),
            (br#"{"v":1,"key":"k","command":[]}"#, "invalid command"),
            (br#"{"v":1,"key":"k","command":{"type":"adjust"},"x":1}"#, "invalid JSON"),
        ];
        for (bytes, expected) in cases {
            let err = Env::decode(bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{:?}: {err}", String::from_utf8_lossy(bytes));
        }
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        assert!(matches!(Env::decode(&huge), Err(DecodeError::TooLarge { .. })));
    }
}
