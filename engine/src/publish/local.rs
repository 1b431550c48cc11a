//! The publisher sink for the embedded log: certified outputs are appended, as JSON with
//! their key inside, to the local log `DIR/outputs` (spec: Clerk.CertifiedOutputPublished).
//! Several instances may append during a hand-over (the log's appends are locked), so a
//! reader can see a key twice, always with the same bytes; readers dedupe by key.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tribunal_federation::publisher::Publisher;

use super::PublishBatch;
use crate::log::local::LocalLog;
use crate::pacing::Pacer;
use crate::publish::json::OutputJson;

/// Outputs appended per local-log commit at most.
const MAX_APPEND_RECORDS: usize = 8_192;
/// Appends to the outputs log start at most this often: each costs a sync (two before
/// format 3), and what is certified meanwhile joins the next (publication latency is not a
/// request's).
const APPEND_INTERVAL: Duration = Duration::from_millis(20);

pub fn outputs_dir(log_dir: &Path) -> PathBuf {
    log_dir.join("outputs")
}

/// The JSON record of one output on the outputs log: the output's JSON plus its key.
pub fn output_record(partition: u32, offset: u64, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut json =
        OutputJson::from_bytes(bytes).with_context(|| format!("output ({partition}, {offset}) does not decode"))?;
    json.key = Some(OutputJson::key(partition, offset));
    Ok(serde_json::to_vec(&json)?)
}

/// One past the last input offset published on the outputs log (0: none), from the key
/// of its last record.
pub fn published_end(log: &LocalLog) -> anyhow::Result<u64> {
    let end = log.end_offset()?;
    if end == 0 {
        return Ok(0);
    }
    let mut reader = log.reader(end - 1)?;
    let mut records = Vec::new();
    reader.poll(1, &mut records)?;
    let record = records.first().context("the outputs log's last record cannot be read")?;
    let value: serde_json::Value = serde_json::from_slice(&record.payload).context("the outputs log's last record")?;
    let key = value["key"].as_str().context("the outputs log's last record has no key")?;
    let (_, offset) = OutputJson::parse_key(key.as_bytes()).context("the outputs log's last key")?;
    Ok(offset + 1)
}

pub struct LocalSink {
    pub published: Arc<AtomicU64>,
    pub failure: Arc<Mutex<Option<String>>>,
    /// The outputs log's syncs, for `/metrics`.
    pub syncs: Arc<AtomicU64>,
}

pub fn spawn(log: LocalLog, start_end: u64, batches: Receiver<PublishBatch>) -> anyhow::Result<LocalSink> {
    let published = Arc::new(AtomicU64::new(start_end));
    let failure = Arc::new(Mutex::new(None));
    let (published_t, failure_t) = (published.clone(), failure.clone());
    let syncs = log.sync_counter();
    std::thread::Builder::new()
        .name("local-publisher".into())
        .spawn(move || {
            if let Err(error) = run(&log, start_end, &batches, &published_t) {
                tracing::error!("the local publisher stopped: {error:#}");
                *failure_t.lock().expect("not poisoned") = Some(format!("publishing outputs: {error:#}"));
            }
        })
        .context("starting the local publisher thread")?;
    Ok(LocalSink { published, failure, syncs })
}

fn run(log: &LocalLog, start_end: u64, batches: &Receiver<PublishBatch>, published: &AtomicU64) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(&[start_end]);
    let mut released = Vec::new();
    let mut payloads = Vec::new();
    let mut pacer = Pacer::new(APPEND_INTERVAL);
    // Blocks while nothing is certified: an idle publisher costs nothing.
    while let Ok(batch) = batches.recv() {
        take(log, &mut publisher, batch)?;
        // spec: Publisher.LocalAppendsPaced — what is certified meanwhile joins this append.
        std::thread::sleep(pacer.wait(Instant::now()));
        while let Ok(batch) = batches.try_recv() {
            take(log, &mut publisher, batch)?;
        }
        published.store(publisher.published_end(0), Ordering::Release);
        publisher.release(&mut released);
        if !released.is_empty() {
            pacer.started(Instant::now());
        }
        for chunk in released.chunks(MAX_APPEND_RECORDS) {
            payloads.clear();
            for release in chunk {
                payloads.push(output_record(release.partition, release.offset, &release.bytes)?);
            }
            log.append(&payloads).context("appending to the outputs log")?;
            let last = chunk.last().expect("chunks are not empty");
            publisher.acknowledged(last.partition, last.offset);
            published.store(publisher.published_end(0), Ordering::Release);
        }
        released.clear();
    }
    Ok(())
}

fn take(log: &LocalLog, publisher: &mut Publisher, batch: PublishBatch) -> anyhow::Result<()> {
    if !batch.skip_to.is_empty() {
        // spec: Publisher.TakeOverReadsTheSink — the log says exactly how far publication
        // got; the heartbeats the hand-over point came from may be a beat behind.
        let written = published_end(log).context("reading the outputs log at a take-over")?;
        publisher.skip_to(0, written);
    }
    for (partition, end) in batch.skip_to {
        publisher.skip_to(partition, end);
    }
    for output in batch.outputs {
        publisher.offer(output.partition, output.offset, output.bytes)?;
    }
    Ok(())
}
