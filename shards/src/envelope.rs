//! The versioned JSON envelope every command travels in, on the local log and on Kafka.
//!
//! `{"v":1,"key":"<idempotency key>","command":{"type":"transfer",...}}`
//!
//! JSON so that any Kafka tool can read the input topic. Decoding happens once, in the
//! Usher; a record that does not decode becomes a deterministic `Malformed` output for
//! its offset (spec: Usher.MalformedRecordRejected), never a crash. The output carries
//! [`DecodeError::code`], a fixed token (spec: Inventory.BoundsViolationIsMalformed);
//! the error's `Display` is a bounded human detail for logs and the CLI.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::{Domain, Invalid, Version};

/// The only envelope version this binary reads.
pub const ENVELOPE_VERSION: u32 = 1;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Largest record the Usher decodes; anything longer is malformed without being parsed.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most characters of parser text or echoed input a [`DecodeError`] message holds.
pub const MAX_DETAIL_CHARS: usize = 200;

/// Stable codes of the engine's decode failures: the reason of a `Malformed` output
/// (spec: Inventory.BoundsViolationIsMalformed). Never change one: outputs are compared byte
/// for byte across binary versions. The domain adds its own (`inventory::invalid`).
pub mod malformed {
    pub const RECORD_TOO_LARGE: &str = "record_too_large";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const UNSUPPORTED_ENVELOPE_VERSION: &str = "unsupported_envelope_version";
    pub const INVALID_KEY: &str = "invalid_key";
    pub const INVALID_COMMAND: &str = "invalid_command";
    pub const INVALID_VERSION: &str = "invalid_version";
}

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

/// Why a record does not decode. [`code`](Self::code) is what reaches the output; the
/// `Display` text is for humans, bounded (at most [`MAX_DETAIL_CHARS`] characters of parser
/// text or echoed input) and free of control characters.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record is {size_bytes} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { size_bytes: usize },
    /// The parser's message, already bounded by [`bounded_detail`].
    #[error("invalid JSON envelope: {0}")]
    Json(String),
    #[error("unsupported envelope version {0} (this binary reads version {ENVELOPE_VERSION})")]
    Version(u32),
    #[error("idempotency key must be 1..={MAX_KEY_BYTES} printable ASCII characters")]
    Key,
    /// The parser's message, already bounded by [`bounded_detail`].
    #[error("invalid command: {0}")]
    Command(String),
    #[error("activate_version: version must be at least 1, got {0}")]
    AdminVersion(Version),
    /// A domain bound ([`Domain::validate`]); the detail is already bounded.
    #[error("invalid command: {}", .0.detail)]
    Domain(Invalid),
}

impl DecodeError {
    /// The stable reason of the `Malformed` output: one of [`malformed`]'s codes, or the
    /// domain's code for a broken bound. A fixed ASCII token that never depends on the
    /// record's bytes (spec: Inventory.BoundsViolationIsMalformed).
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => malformed::RECORD_TOO_LARGE,
            DecodeError::Json(_) => malformed::INVALID_JSON,
            DecodeError::Version(_) => malformed::UNSUPPORTED_ENVELOPE_VERSION,
            DecodeError::Key => malformed::INVALID_KEY,
            DecodeError::Command(_) => malformed::INVALID_COMMAND,
            DecodeError::AdminVersion(_) => malformed::INVALID_VERSION,
            DecodeError::Domain(invalid) => invalid.code,
        }
    }
}

/// `text` made safe for a log line: characters other than printable ASCII are escaped
/// (`\n`, `\u{0}`, ...), and past [`MAX_DETAIL_CHARS`] output characters the rest is
/// cut and marked with `...`.
pub fn bounded_detail(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_DETAIL_CHARS) + 3);
    let mut chars = 0;
    for c in text.chars() {
        let start = out.len();
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
        // Escapes are ASCII, so bytes added = characters added.
        chars += out.len() - start;
        if chars > MAX_DETAIL_CHARS {
            out.truncate(start);
            out.push_str("...");
            break;
        }
    }
    out
}

fn json_error(error: serde_json::Error) -> DecodeError {
    DecodeError::Json(bounded_detail(&error.to_string()))
}

fn command_error(error: serde_json::Error) -> DecodeError {
    DecodeError::Command(bounded_detail(&error.to_string()))
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

/// What the Usher accepts as an idempotency key (the Gateway checks the same).
pub fn valid_key(key: &str) -> bool {
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
        let raw: RawEnvelope<'_> = serde_json::from_slice(bytes).map_err(json_error)?;
        if raw.v != ENVELOPE_VERSION {
            return Err(DecodeError::Version(raw.v));
        }
        if !valid_key(&raw.key) {
            return Err(DecodeError::Key);
        }
        let kind: CommandType<'_> = serde_json::from_str(raw.command.get()).map_err(command_error)?;
        let command = if kind.kind == "activate_version" {
            let admin: AdminCommand = serde_json::from_str(raw.command.get()).map_err(command_error)?;
            let AdminCommand::ActivateVersion { version } = admin;
            // spec: Inventory.VersionBound — version 0 would halt every instance for good.
            if version < 1 {
                return Err(DecodeError::AdminVersion(version));
            }
            Command::Admin(admin)
        } else {
            let command: D::Command = serde_json::from_str(raw.command.get()).map_err(command_error)?;
            D::validate(&command).map_err(|invalid| {
                DecodeError::Domain(Invalid { detail: bounded_detail(&invalid.detail), ..invalid })
            })?;
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
    use crate::inventory::{invalid, Inventory, InventoryCommand};

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

    const TRANSFER: &str = r#""type":"transfer","sku":"S","from_warehouse":"A","to_warehouse":"B""#;

    fn code_of(bytes: &[u8]) -> &'static str {
        Env::decode(bytes).unwrap_err().code()
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

    #[test]
    fn every_failure_class_has_its_stable_code() {
        // spec: Inventory.BoundsViolationIsMalformed
        // spec: Inventory.MalformedCodeStable
        let kit = |body: &str| {
            format!(r#"{{"v":1,"key":"k","command":{{"type":"assemble_kit","warehouse":"W","kit_sku":"K",{body}}}}}"#)
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![b' '; MAX_RECORD_BYTES + 1], malformed::RECORD_TOO_LARGE),
            (b"{not json".to_vec(), malformed::INVALID_JSON),
            (br#"{"v":1,"key":"k"}"#.to_vec(), malformed::INVALID_JSON),
            (br#"{"v":2,"key":"k","command":{"type":"adjust"}}"#.to_vec(), malformed::UNSUPPORTED_ENVELOPE_VERSION),
            (br#"{"v":1,"key":"","command":{"type":"adjust"}}"#.to_vec(), malformed::INVALID_KEY),
            (br#"{"v":1,"key":"k","command":{"type":"teleport"}}"#.to_vec(), malformed::INVALID_COMMAND),
            (br#"{"v":1,"key":"k","command":{"type":"activate_version","version":0}}"#.to_vec(), malformed::INVALID_VERSION),
            (format!(r#"{{"v":1,"key":"k","command":{{{TRANSFER},"qty":0}}}}"#).into_bytes(), invalid::QUANTITY_OUT_OF_RANGE),
            (br#"{"v":1,"key":"k","command":{"type":"transfer","sku":"S S","from_warehouse":"A","to_warehouse":"B","qty":1}}"#.to_vec(), invalid::INVALID_NAME),
            (br#"{"v":1,"key":"k","command":{"type":"adjust","sku":"S","warehouse":"W","delta":1,"reason":"a\u0000b"}}"#.to_vec(), invalid::INVALID_REASON),
            (kit(r#""qty":1,"components":[]"#).into_bytes(), invalid::INVALID_KIT),
        ];
        for (bytes, expected) in &cases {
            assert_eq!(code_of(bytes), *expected, "{:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(120)]));
        }
    }

    #[test]
    fn the_code_does_not_depend_on_the_parser_text() {
        // spec: Inventory.MalformedCodeStable
        let pairs: &[(&[u8], &[u8], &str)] = &[
            (b"{not json", br#"{"v":1,"key":"k","command":{"type":"adjust"},"extra":1}"#, malformed::INVALID_JSON),
            (
                br#"{"v":1,"key":"k","command":{"type":"teleport"}}"#,
                br#"{"v":1,"key":"k","command":{"type":"transfer","sku":"S"}}"#,
                malformed::INVALID_COMMAND,
            ),
        ];
        for (a, b, code) in pairs {
            let (a, b) = (Env::decode(a).unwrap_err(), Env::decode(b).unwrap_err());
            assert_ne!(a.to_string(), b.to_string(), "the details differ");
            assert_eq!((a.code(), b.code()), (*code, *code));
        }
    }

    #[test]
    fn a_huge_unknown_type_gives_a_bounded_reason() {
        // spec: Inventory.MalformedCodeStable
        let kind = "x".repeat(60_000);
        let bytes = format!(r#"{{"v":1,"key":"k","command":{{"type":"{kind}"}}}}"#);
        assert!(bytes.len() <= MAX_RECORD_BYTES);
        let error = Env::decode(bytes.as_bytes()).unwrap_err();
        assert_eq!(error.code(), malformed::INVALID_COMMAND);
        let detail = error.to_string();
        assert!(detail.len() <= "invalid command: ".len() + MAX_DETAIL_CHARS + 3, "{} chars", detail.len());
        assert!(detail.ends_with("..."), "{detail}");
    }

    #[test]
    fn control_characters_in_echoed_input_are_escaped() {
        // The JSON escape \u0001 reaches serde's "unknown variant" message as a raw byte.
        let error = Env::decode(br#"{"v":1,"key":"k","command":{"type":"a\u0001\nb"}}"#).unwrap_err();
        assert_eq!(error.code(), malformed::INVALID_COMMAND);
        let detail = error.to_string();
        assert!(!detail.chars().any(char::is_control), "{detail:?}");
        assert!(detail.contains(r"a\u{1}\nb"), "{detail}");
    }

    #[test]
    fn details_are_cut_at_the_limit_and_escaped() {
        let exact = "y".repeat(MAX_DETAIL_CHARS);
        assert_eq!(bounded_detail(&exact), exact);
        let long = bounded_detail(&"y".repeat(MAX_DETAIL_CHARS + 1));
        assert_eq!(long, format!("{}...", "y".repeat(MAX_DETAIL_CHARS)));
        // An escape is never split: it is kept whole or dropped whole.
        let escaped = bounded_detail(&format!("{}\u{7}", "y".repeat(MAX_DETAIL_CHARS - 2)));
        assert_eq!(escaped, format!("{}...", "y".repeat(MAX_DETAIL_CHARS - 2)));
        assert_eq!(bounded_detail("caf\u{e9} \0"), r"caf\u{e9} \u{0}");
    }

    #[test]
    fn idempotency_key_is_1_to_128_printable_ascii_bytes() {
        // spec: Inventory.IdentifierBounds
        let record = |key: &str| {
            let key = serde_json::to_string(key).unwrap();
            format!(r#"{{"v":1,"key":{key},"command":{{{TRANSFER},"qty":1}}}}"#).into_bytes()
        };
        assert!(Env::decode(&record(&"k".repeat(MAX_KEY_BYTES))).is_ok());
        assert!(Env::decode(&record("order 17 ~!")).is_ok(), "spaces and punctuation are printable");
        for bad in ["", &"k".repeat(MAX_KEY_BYTES + 1), "k\u{e9}", "k\t", "k\n", "k\0", "k\u{7f}"] {
            assert_eq!(code_of(&record(bad)), malformed::INVALID_KEY, "{bad:?}");
        }
    }

    #[test]
    fn activate_version_zero_is_malformed() {
        // spec: Inventory.VersionBound
        let record = |v: u32| format!(r#"{{"v":1,"key":"k","command":{{"type":"activate_version","version":{v}}}}}"#);
        let error = Env::decode(record(0).as_bytes()).unwrap_err();
        assert_eq!(error, DecodeError::AdminVersion(0));
        assert_eq!(error.code(), malformed::INVALID_VERSION);
        let activate = Env::decode(record(1).as_bytes()).unwrap();
        assert_eq!(activate.command, Command::Admin(AdminCommand::ActivateVersion { version: 1 }));
    }
}
