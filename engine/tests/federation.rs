//! Federations of real `tribunal run` processes on loopback: certification by comparing
//! output copies, SIGKILLs of instances and of the publisher, a paused certification with
//! one of two instances gone, bit-flip fault injection, and strangers on the federation
//! port. Every test ends by checking the published outputs and every instance's state
//! against the sequential reference interpreter.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::federation::{Federation, PATIENCE};
use support::{ok, tribunal};

mod support;

impl Federation {
    fn reference(&self) -> Value {
        serde_json::from_slice(&ok(tribunal().args(["evaluate", "--json", "--log", &self.log_arg()]))).unwrap()
    }

    /// Every instance's state equals the reference's, and the outputs log holds every
    /// input's certified output: each key at least once, copies byte-identical, and the
    /// outputs in offset order digest to the reference's outputs digest.
    fn check_against_reference(&self, ids: &[u32]) {
        let expected = self.reference();
        for id in ids {
            let engine: Value =
                serde_json::from_slice(&ok(tribunal().args(["inspect", "--json", "--data-dir"]).arg(self.data(*id))))
                    .unwrap();
            assert_eq!(engine["state_digest"], expected["state_digest"], "instance {id}'s state");
            assert_eq!(engine["outputs_digest"], expected["outputs_digest"], "instance {id}'s outputs");
        }
        let published = published_outputs(&self.log());
        let records = expected["records"].as_u64().unwrap();
        assert_eq!(published.len() as u64, records, "one published output per input offset");
        assert_eq!(*published.keys().next_back().unwrap(), records - 1);
        let digest = tribunal_shards::digest::outputs_digest(
            published
                .iter()
                .map(|(offset, json)| (*offset, u128::from_str_radix(json["digest"].as_str().unwrap(), 16).unwrap())),
        );
        assert_eq!(format!("{digest:032x}"), expected["outputs_digest"].as_str().unwrap(), "published outputs");
    }
}

/// The outputs log, deduplicated by key; a key published twice must have identical bytes.
fn published_outputs(log: &Path) -> BTreeMap<u64, Value> {
    let outputs = format!("local:{}", log.join("outputs").display());
    let lines = ok(tribunal().args(["log", "read", "--log", &outputs]));
    let mut by_offset: BTreeMap<u64, (String, Value)> = BTreeMap::new();
    for line in String::from_utf8(lines).unwrap().lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        let payload = record["payload"].as_str().unwrap().to_string();
        let json: Value = serde_json::from_str(&payload).unwrap();
        let (partition, offset) = json["key"].as_str().unwrap().split_once(':').unwrap();
        assert_eq!(partition, "0");
        let offset: u64 = offset.parse().unwrap();
        if let Some((earlier, _)) = by_offset.get(&offset) {
            assert_eq!(*earlier, payload, "a key published twice with different bytes");
        }
        by_offset.insert(offset, (payload, json));
    }
    by_offset.into_iter().map(|(o, (_, j))| (o, j)).collect()
}

#[test]
fn three_instances_certify_a_mixed_log_through_sigkills_of_a_peer_and_the_publisher() {
    // spec: Clerk.OffsetCertified, Clerk.CertifiedOutputPublished, Clerk.PublisherHandOver,
    // spec: Clerk.LaggingPeerCatchesUp, Recovery.NoWatermarkBeforeReady
    let mut fed = Federation::new(3, 2);
    fed.append(6_000, 1);
    for id in 1..=3 {
        fed.spawn(id, false, &[]);
    }
    fed.wait_until("instance 2 to certify", |f| f.certified(2) >= 1_000);
    fed.kill(2);
    // Seeds repeat: replays and conflicts of earlier keys, not only new ones.
    fed.append(6_000, 2);
    fed.wait_until("1 and 3 to certify without 2", |f| f.certified(1) >= 11_999 && f.certified(3) >= 11_999);
    // A stale checkpoint from before a crash (or a foreign one) claims far more than is
    // durable: it must be capped, never advertised (peers would skip what 2 lacks).
    std::fs::write(fed.data(2).join("certified.json"), "[1000000000]").unwrap();
    fed.spawn(2, false, &[]);
    fed.append(6_000, 1);
    fed.wait_until("2 to catch up", |f| f.certified(2) >= 17_999);
    assert!(fed.instance_log(2).contains("capping it"), "the stale checkpoint was capped");
    // Now the publisher (the lowest id) goes.
    assert_eq!(fed.status(1)["federation"]["publisher"], true);
    fed.kill(1);
    fed.append(6_000, 3);
    fed.wait_until("2 to take over publishing", |f| f.status(2)["federation"]["publisher"] == true);
    fed.wait_until("2 and 3 to certify and publish without 1", |f| {
        (2..=3).all(|id| f.status(id)["partitions"][0]["published_watermark"].as_i64() == Some(23_999))
    });
    fed.spawn(1, false, &[]);
    fed.wait_until("everyone to agree to the end", |f| (1..=3).all(|id| f.certified(id) == 23_999));
    for id in 1..=3 {
        let status = fed.status(id);
        assert_eq!(status["federation"]["faults_total"], 0, "instance {id}: no fault");
        fed.kill(id);
    }
    fed.check_against_reference(&[1, 2, 3]);
}

#[test]
fn two_instances_pause_certification_while_one_is_gone() {
    // spec: Clerk.CertifiedHasEnoughCopies, Clerk.CopyWindowBackpressure
    let mut fed = Federation::new(2, 2);
    fed.append(5_000, 1);
    fed.spawn(1, false, &[]);
    fed.spawn(2, false, &[]);
    fed.wait_until("both to certify the first part", |f| f.certified(1) == 4_999 && f.certified(2) == 4_999);
    fed.kill(2);
    fed.append(5_000, 2);
    fed.wait_until("1 to make the rest durable", |f| {
        f.status(1)["partitions"][0]["durable_watermark"].as_i64() == Some(9_999)
    });
    // Give any certification a chance to (wrongly) happen, then look.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fed.certified(1), 4_999, "nothing certifies with one copy");
    let published = published_outputs(&fed.log());
    assert_eq!(published.keys().next_back(), Some(&4_999), "nothing uncertified is published");
    fed.spawn(2, true, &[]);
    fed.wait_until("1 to certify everything", |f| f.certified(1) == 9_999);
    fed.kill(1);
    fed.wait_all_exit();
    fed.check_against_reference(&[1, 2]);
}

#[test]
fn after_a_crash_of_every_instance_one_with_an_older_checkpoint_catches_up() {
    // spec: Clerk.CertifiedDigestsResent, Clerk.LaggingPeerCatchesUp — checkpoints are
    // written every second, so after both instances die they disagree on how far they
    // certified; the one further behind needs certified digests from below the other's
    // checkpoint, which the other seeds from its Ledger at start-up.
    let mut fed = Federation::new(2, 2);
    fed.append(5_000, 1);
    fed.spawn(1, false, &[]);
    fed.spawn(2, false, &[]);
    fed.wait_until("both to certify", |f| f.certified(1) == 4_999 && f.certified(2) == 4_999);
    fed.kill(1);
    fed.kill(2);
    // Instance 1's checkpoint is an old one (legitimately: it only lags).
    std::fs::write(fed.data(1).join("certified.json"), "[1000]").unwrap();
    fed.append(1_000, 2);
    fed.spawn(1, true, &[]);
    fed.spawn(2, true, &[]);
    fed.wait_all_exit();
    for id in 1..=2 {
        assert_eq!(fed.certified(id), 5_999, "instance {id} certified everything");
    }
    fed.check_against_reference(&[1, 2]);
}

/// The offsets whose outputs instance `id` flipped (its status lists them).
fn flipped_by(fed: &Federation, id: u32) -> std::collections::BTreeSet<u64> {
    let status = fed.status(id);
    let flipped = status["federation"]["injected_faults"]["flipped"].as_array().cloned().unwrap_or_default();
    flipped.iter().map(|f| f[1].as_u64().unwrap()).collect()
}

/// The offsets instances 1 and 2 reported faults at (faults.jsonl).
fn detected_faults(fed: &Federation) -> std::collections::BTreeSet<u64> {
    let mut detected = std::collections::BTreeSet::new();
    for id in 1..=2 {
        let faults = std::fs::read_to_string(fed.data(id).join("faults.jsonl")).unwrap_or_default();
        for line in faults.lines() {
            if let Ok(fault) = serde_json::from_str::<Value>(line) {
                detected.extend(fault["offset"].as_u64());
            }
        }
    }
    detected
}

#[test]
fn a_bit_flipping_instance_is_caught_and_quarantined_and_nothing_flipped_is_published() {
    // spec: Clerk.MismatchDetected, Clerk.MinorityQuarantined, Clerk.OwnCopyInMinority,
    // spec: Clerk.LateCopyChecked, Clerk.FaultReported, Clerk.QuarantinePersisted,
    // spec: Clerk.QuarantineLifted, Clerk.ReadmitReceived
    let mut fed = Federation::new(3, 2);
    fed.append(25_000, 1);
    fed.append(25_000, 2);
    // 1 and 2 run until every flip is detected: a copy from a quarantined peer is checked
    // when it arrives (Clerk.LateCopyChecked), but `--stop-at-end` does not wait for a
    // quarantined peer (Clerk.StopAtEnd), so copies of the last flips could arrive after
    // 1 and 2 had stopped. 3 stops at the end, once 1 and 2 have certified it.
    fed.spawn(1, false, &[]);
    fed.spawn(2, false, &[]);
    fed.spawn(3, true, &["--inject-fault", "bitflip:0.002"]);
    fed.wait_until("instance 3 to have flipped", |f| {
        f.status(3)["federation"]["injected_faults"]["bitflips"].as_u64().unwrap_or(0) > 0
    });
    fed.wait_until("3 to stop, every flip to be detected and every output published", |f| {
        f.status(3)["phase"] == "stopped"
            && detected_faults(f).is_superset(&flipped_by(f, 3))
            && published_outputs(&f.log()).len() == 50_000
    });
    fed.kill(1);
    fed.kill(2);
    fed.wait_all_exit();
    let faulty = fed.status(3);
    let flipped = flipped_by(&fed, 3);
    assert!(flipped.len() >= 10, "a rate of 0.002 over 50,000 outputs flips about 100: {}", flipped.len());
    assert!(fed.instance_log(3).contains("INJECTED FAULT"), "fault injection is loud");
    assert_eq!(faulty["federation"]["quarantined"], true, "the faulty instance knows it is in the minority");
    let mut detected = std::collections::BTreeSet::new();
    for id in 1..=2 {
        let status = fed.status(id);
        let view = status["federation"]["peers"].as_array().unwrap().iter().find(|p| p["instance_id"] == 3).unwrap();
        assert_eq!(view["quarantined"], true, "instance {id} quarantined 3");
        let faults = std::fs::read_to_string(fed.data(id).join("faults.jsonl")).unwrap();
        for line in faults.lines() {
            let fault: Value = serde_json::from_str(line).unwrap();
            assert_eq!(fault["differing"], serde_json::json!([3]), "only 3 differs: {fault}");
            assert!(!fault["differing_fields"].is_null());
            detected.insert(fault["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(detected, flipped, "every flipped output is detected, and nothing else");
    let inspected: Value =
        serde_json::from_slice(&ok(tribunal().args(["inspect", "--json", "--data-dir"]).arg(fed.data(1)))).unwrap();
    assert!(inspected["federation"]["faults_detected"].as_u64().unwrap() >= 1, "inspect shows faults: {inspected}");
    assert_eq!(inspected["federation"]["quarantined_peers"], serde_json::json!([3]));
    // Nothing flipped was published: the outputs log equals the reference's outputs.
    fed.check_against_reference(&[1, 2, 3]);

    // Restarts forget no quarantine (spec: Clerk.QuarantinePersisted): 3 restarts without
    // the fault and 2 restarts; 1 stays down, so the new events need 3's copies at 2.
    fed.append(2_000, 3);
    fed.spawn(2, false, &[]);
    fed.spawn(3, false, &[]);
    fed.wait_until("3 to certify the new events with 2's copies", |f| f.certified(3) == 51_999);
    fed.wait_until("2 to have 3's copies", |f| {
        f.status(2)["federation"]["copies_received"].as_u64().unwrap_or(0) >= 2_000
    });
    assert_eq!(fed.status(3)["federation"]["quarantined"], true, "3 is still quarantined after its restart");
    assert_eq!(fed.certified(2), 49_999, "2 still does not count 3's copies after its restart");
    // An operator re-admits 3 through 2 (spec: Clerk.QuarantineLifted, Clerk.ReadmitReceived).
    let readmit = tribunal().args(["readmit", "--instance", "3", "--data-dir"]).arg(fed.data(2)).output().unwrap();
    assert!(readmit.status.success(), "{}", String::from_utf8_lossy(&readmit.stderr));
    fed.wait_until("2 to certify with 3's copies", |f| f.certified(2) == 51_999);
    fed.wait_until("3 to lift its own quarantine", |f| f.status(3)["federation"]["quarantined"] == false);
    assert!(fed.instance_log(2).contains("OPERATOR READMIT"));
    let record: Value = serde_json::from_slice(&std::fs::read(fed.data(3).join("quarantine.json")).unwrap()).unwrap();
    assert_eq!(record["self_quarantined"], false, "the lifted quarantine is recorded: {record}");
    fed.wait_until("2 to publish the new events", |f| {
        f.status(2)["partitions"][0]["published_watermark"].as_i64() == Some(51_999)
    });
    fed.kill(2);
    fed.kill(3);
    fed.check_against_reference(&[2, 3]);
}

/// A well-formed handshake hello (magic, protocol version 1, instance id, nonce).
fn hello(instance_id: u32, nonce_byte: u8) -> Vec<u8> {
    let mut hello = b"TRBF".to_vec();
    hello.extend_from_slice(&1u16.to_le_bytes());
    hello.extend_from_slice(&instance_id.to_le_bytes());
    hello.extend_from_slice(&[nonce_byte; 32]);
    hello
}

#[test]
fn strangers_on_the_federation_port_are_rejected_without_disturbing_certification() {
    // spec: Federation.HandshakeRejected, Handshake.MutualProof, PeerWire.NoUnauthenticatedEffect
    let mut fed = Federation::new(2, 2);
    fed.append(20_000, 1);
    fed.spawn(1, true, &[]);
    fed.spawn(2, true, &[]);
    let address = format!("127.0.0.1:{}", fed.ports[0]);
    let start = Instant::now();
    let connect = || loop {
        match TcpStream::connect(&address) {
            Ok(stream) => return stream,
            Err(_) if start.elapsed() < PATIENCE => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("the federation port never opened: {e}"),
        }
    };
    // Garbage instead of a hello.
    let mut garbage = connect();
    let _ = garbage.write_all(&[0xAB; 4_096]);
    // A well-formed hello claiming to be instance 2, without the key: its proof is junk.
    let mut impostor = connect();
    impostor.write_all(&hello(2, 7)).unwrap();
    let mut reply = [0u8; 42 + 32];
    impostor.read_exact(&mut reply).unwrap();
    let _ = impostor.write_all(&[0u8; 32]);
    // An unknown instance id.
    let mut unknown = connect();
    let _ = unknown.write_all(&hello(9, 9));
    fed.wait_until("the strangers to be rejected", |f| {
        f.status(1)["federation"]["links"]["handshakes_rejected"].as_u64().unwrap_or(0) >= 3
            || !f.data(1).join("status.json").exists()
    });
    fed.wait_all_exit();
    let status = fed.status(1);
    assert!(status["federation"]["links"]["handshakes_rejected"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(status["federation"]["faults_total"], 0);
    fed.check_against_reference(&[1, 2]);
}
