//! The Clerk's part of `status.json` (`federation`): certified watermarks, peers, faults,
//! quarantines, links and injected faults.
//!
//! Fields are declared in alphabetical order: the status was a `serde_json::Value`,
//! whose map sorts its keys, so `status.json` keeps the same bytes.

use serde::Serialize;
use serde_json::Value;
use tribunal_federation::clerk::{ClerkStatus, InstanceId};

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FederationStatus {
    pub certified: u64,
    /// "recovering" or "ready".
    pub clerk: &'static str,
    pub copies_outside_window: u64,
    pub copies_received: u64,
    pub copies_sent: u64,
    pub expected_copies: u32,
    /// The most recent fault lines (as in `faults.jsonl`), newest first.
    pub faults: Vec<Value>,
    pub faults_total: u64,
    pub incarnation: u64,
    /// Null unless faults are injected.
    pub injected_faults: Option<InjectedFaultsStatus>,
    pub instance_id: InstanceId,
    pub late_copies_checked: u64,
    /// Null without peer links.
    pub links: Option<LinksStatus>,
    pub partitions: Vec<PartitionStatus>,
    pub peers: Vec<PeerStatus>,
    pub publisher: bool,
    pub quarantined: bool,
}

/// The Clerk's state as status shows it.
pub fn clerk_state(status: ClerkStatus) -> &'static str {
    match status {
        ClerkStatus::Recovering => "recovering",
        ClerkStatus::Ready => "ready",
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PartitionStatus {
    pub certified_watermark: Option<u64>,
    pub contested_at: Option<u64>,
    /// Certified outputs held for a hand-over.
    pub handover_buffer: usize,
    pub partition: u32,
    pub published_watermark: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerStatus {
    /// Per partition, its advertised certified watermark (null until it advertises).
    pub certified_watermarks: Vec<Option<u64>>,
    pub incarnation: Option<u64>,
    pub instance_id: InstanceId,
    pub link_up: bool,
    pub may_publish: bool,
    pub published_ends: Vec<u64>,
    pub quarantined: bool,
    pub quarantined_incarnation: Option<u64>,
    pub queued_copies: usize,
    pub ready: bool,
    pub says_quarantined: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LinksStatus {
    pub bytes_sent: u64,
    pub copies_dropped: u64,
    pub frames_received: u64,
    pub frames_sent: u64,
    pub handshakes_rejected: u64,
    pub invalid_frames: u64,
    pub last_rejection: Option<String>,
    pub writes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InjectedFaultsStatus {
    pub bitflip_rate: Option<f64>,
    pub bitflips: u64,
    pub delay_ms: Option<u64>,
    /// (partition, offset) of each flipped output, the first ones.
    pub flipped: Vec<(u32, u64)>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn full() -> FederationStatus {
        FederationStatus {
            certified: 10,
            clerk: clerk_state(ClerkStatus::Ready),
            copies_outside_window: 1,
            copies_received: 20,
            copies_sent: 21,
            expected_copies: 2,
            faults: vec![json!({"partition": 0, "offset": 3})],
            faults_total: 1,
            incarnation: 77,
            injected_faults: Some(InjectedFaultsStatus {
                bitflip_rate: Some(0.25),
                bitflips: 1,
                delay_ms: None,
                flipped: vec![(0, 3)],
            }),
            instance_id: 1,
            late_copies_checked: 4,
            links: Some(LinksStatus {
                bytes_sent: 100,
                copies_dropped: 0,
                frames_received: 5,
                frames_sent: 6,
                handshakes_rejected: 0,
                invalid_frames: 0,
                last_rejection: None,
                writes: 3,
            }),
            partitions: vec![PartitionStatus {
                certified_watermark: Some(9),
                contested_at: None,
                handover_buffer: 2,
                partition: 0,
                published_watermark: None,
            }],
            peers: vec![PeerStatus {
                certified_watermarks: vec![None],
                incarnation: Some(12),
                instance_id: 2,
                link_up: true,
                may_publish: true,
                published_ends: vec![0],
                quarantined: false,
                quarantined_incarnation: None,
                queued_copies: 0,
                ready: false,
                says_quarantined: false,
            }],
            publisher: true,
            quarantined: false,
        }
    }

    #[test]
    fn the_typed_status_serialises_as_the_json_it_replaces() {
        // What the shell built with json! before the status was typed.
        let expected = json!({
            "instance_id": 1,
            "clerk": "ready",
            "quarantined": false,
            "incarnation": 77,
            "publisher": true,
            "expected_copies": 2,
            "partitions": [{
                "partition": 0,
                "certified_watermark": 9,
                "published_watermark": null,
                "contested_at": null,
                "handover_buffer": 2,
            }],
            "peers": [{
                "instance_id": 2,
                "link_up": true,
                "ready": false,
                "quarantined": false,
                "says_quarantined": false,
                "incarnation": 12,
                "quarantined_incarnation": null,
                "may_publish": true,
                "certified_watermarks": [null],
                "published_ends": [0],
                "queued_copies": 0,
            }],
            "faults_total": 1,
            "faults": [{"partition": 0, "offset": 3}],
            "certified": 10,
            "copies_received": 20,
            "copies_sent": 21,
            "copies_outside_window": 1,
            "late_copies_checked": 4,
            "links": {
                "frames_sent": 6,
                "frames_received": 5,
                "writes": 3,
                "bytes_sent": 100,
                "copies_dropped": 0,
                "invalid_frames": 0,
                "handshakes_rejected": 0,
                "last_rejection": null,
            },
            "injected_faults": {"bitflip_rate": 0.25, "delay_ms": null, "bitflips": 1, "flipped": [[0, 3]]},
        });
        let typed = full();
        assert_eq!(serde_json::to_value(&typed).unwrap(), expected);
        // The same bytes too: the old map sorted its keys, the struct declares them so.
        assert_eq!(serde_json::to_string(&typed).unwrap(), serde_json::to_string(&expected).unwrap());
    }

    #[test]
    fn links_and_injected_faults_are_null_when_absent() {
        let typed = FederationStatus { links: None, injected_faults: None, ..full() };
        let json = serde_json::to_value(&typed).unwrap();
        assert_eq!(json["links"], Value::Null);
        assert_eq!(json["injected_faults"], Value::Null);
        assert!(json.as_object().unwrap().contains_key("links"), "present, as null");
        assert!(json.as_object().unwrap().contains_key("injected_faults"), "present, as null");
    }
}
