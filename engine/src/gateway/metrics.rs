//! `/metrics`: Prometheus text through `prometheus-client` (spec: Gateway.MetricsExposed).
//!
//! Request latencies are recorded as requests finish. Everything else (watermarks, faults,
//! fsyncs, log lag) already lives in atomics and status the node keeps, so it is read at
//! scrape time by a collector instead of being mirrored on the hot path.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

/// Node figures read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    /// Per partition.
    pub certified_end: Vec<u64>,
    pub durable_end: Vec<u64>,
    /// Per partition, the log's end as known here.
    pub log_end: Vec<u64>,
    pub ledger_fsyncs: u64,
    pub faults_detected: u64,
    pub ready: bool,
    pub waiting_requests: u64,
    /// Ledger entries the last recovery replayed (spec: Recovery.RecoveryReported).
    pub recovery_replayed_entries: u64,
    /// Syncs of the input log by this instance's appends, and of the outputs log by its
    /// publisher (the local log only).
    pub log_fsyncs: u64,
    pub outputs_fsyncs: u64,
    /// This process, every thread: CPU time and context switches.
    pub process: ProcessFigures,
}

/// A process's resource use so far (`getrusage`), every thread included.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessFigures {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub context_switches: u64,
}

impl ProcessFigures {
    /// This process now.
    pub fn now() -> Self {
        // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF covers every thread.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        Self {
            cpu_user_us: us(usage.ru_utime),
            cpu_system_us: us(usage.ru_stime),
            context_switches: (usage.ru_nvcsw + usage.ru_nivcsw) as u64,
        }
    }
}

pub type FiguresFn = Arc<dyn Fn() -> Figures + Send + Sync>;

struct NodeCollector {
    figures: FiguresFn,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn per_partition(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[u64],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (partition, value) in values.iter().enumerate() {
        let labels = [("partition", partition.to_string())];
        ConstGauge::new(*value as i64).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f = (self.figures)();
        per_partition(
            &mut encoder,
            "tribunal_certified_watermark",
            "One past the last certified offset, per input partition",
            &f.certified_end,
        )?;
        per_partition(
            &mut encoder,
            "tribunal_durable_watermark",
            "One past the last durable offset, per input partition",
            &f.durable_end,
        )?;
        let lag: Vec<u64> = f.log_end.iter().zip(&f.durable_end).map(|(l, d)| l.saturating_sub(*d)).collect();
        per_partition(
            &mut encoder,
            "tribunal_log_lag_records",
            "Records in the input log not yet durable here (log end as known to this instance)",
            &lag,
        )?;
        let fsyncs = ConstCounter::new(f.ledger_fsyncs);
        fsyncs.encode(encoder.encode_descriptor(
            "tribunal_ledger_fsyncs",
            "Ledger group commits made durable (fdatasync), all shards",
            None,
            fsyncs.metric_type(),
        )?)?;
        let faults = ConstCounter::new(f.faults_detected);
        faults.encode(encoder.encode_descriptor(
            "tribunal_faults_detected",
            "Detected faults: offsets where copies of an output differed (mismatches)",
            None,
            faults.metric_type(),
        )?)?;
        let ready = ConstGauge::new(i64::from(f.ready));
        ready.encode(encoder.encode_descriptor(
            "tribunal_ready",
            "1 when the instance serves",
            None,
            ready.metric_type(),
        )?)?;
        let replayed = ConstGauge::new(f.recovery_replayed_entries as i64);
        replayed.encode(encoder.encode_descriptor(
            "tribunal_recovery_replayed_entries",
            "Ledger entries the last recovery replayed past the snapshot markers (at most --snapshot-every plus one batch per partition)",
            None,
            replayed.metric_type(),
        )?)?;
        encode_process(&mut encoder, &f)?;
        let waiting = ConstGauge::new(f.waiting_requests as i64);
        waiting.encode(encoder.encode_descriptor(
            "tribunal_gateway_waiting_requests",
            "Movement requests waiting for their certified output",
            None,
            waiting.metric_type(),
        )?)?;
        Ok(())
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

/// What a request costs this process: CPU, context switches and syncs (loadgen reads them
/// at both ends of its measured window; spec: Loadgen.CostPerRequest).
fn encode_process(encoder: &mut DescriptorEncoder, f: &Figures) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "tribunal_process_cpu_microseconds",
        "CPU time of this process, every thread, by mode (getrusage)",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (mode, value) in [("user", f.process.cpu_user_us), ("system", f.process.cpu_system_us)] {
        ConstCounter::new(value).encode(family.encode_family(&[("mode", mode)])?)?;
    }
    counter(
        encoder,
        "tribunal_process_context_switches",
        "Voluntary and involuntary context switches of this process, every thread",
        f.process.context_switches,
    )?;
    counter(encoder, "tribunal_log_fsyncs", "Syncs of the local input log by this instance's appends", f.log_fsyncs)?;
    counter(
        encoder,
        "tribunal_outputs_fsyncs",
        "Syncs of the local outputs log by this instance's publisher",
        f.outputs_fsyncs,
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Histogram>,
    /// Where a movement's time goes on this instance: `append` (validated to acknowledged by
    /// the log) and `certify` (acknowledged to its certified answer). Held directly, so the
    /// hot path takes no family lookup.
    pub stage_append: Histogram,
    pub stage_certify: Histogram,
}

impl Metrics {
    pub fn new(figures: FiguresFn) -> Self {
        let mut registry = Registry::default();
        // 250 µs .. about 16 s.
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
        });
        registry.register(
            "tribunal_http_request_duration_seconds",
            "Gateway request latency, measured at the server from the request's arrival to its answer",
            requests.clone(),
        );
        let stages = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
        });
        registry.register(
            "tribunal_movement_stage_duration_seconds",
            "Time a movement spends in each stage at the server: append (validated to acknowledged by the log), \
             certify (acknowledged to its certified answer)",
            stages.clone(),
        );
        let stage_append = stages.get_or_create(&StageLabels { stage: "append" }).clone();
        let stage_certify = stages.get_or_create(&StageLabels { stage: "certify" }).clone();
        registry.register_collector(Box::new(NodeCollector { figures }));
        Self { registry, requests, stage_append, stage_certify }
    }

    pub fn observe(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RequestLabels { route, status }).observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_carries_every_figure() {
        // spec: Gateway.MetricsExposed
        let figures = Figures {
            certified_end: vec![7],
            durable_end: vec![9],
            log_end: vec![12],
            ledger_fsyncs: 3,
            faults_detected: 2,
            ready: true,
            waiting_requests: 1,
            recovery_replayed_entries: 42,
            log_fsyncs: 5,
            outputs_fsyncs: 6,
            process: ProcessFigures { cpu_user_us: 1_000, cpu_system_us: 500, context_switches: 9 },
        };
        let metrics = Metrics::new(Arc::new(move || figures.clone()));
        metrics.observe("post_movements", 200, 0.004);
        metrics.stage_append.observe(0.001);
        let text = metrics.render();
        for line in [
            "tribunal_certified_watermark{partition=\"0\"} 7",
            "tribunal_durable_watermark{partition=\"0\"} 9",
            "tribunal_log_lag_records{partition=\"0\"} 3",
            "tribunal_ledger_fsyncs_total 3",
            "tribunal_faults_detected_total 2",
            "tribunal_recovery_replayed_entries 42",
            "tribunal_process_cpu_microseconds_total{mode=\"user\"} 1000",
            "tribunal_process_cpu_microseconds_total{mode=\"system\"} 500",
            "tribunal_process_context_switches_total 9",
            "tribunal_log_fsyncs_total 5",
            "tribunal_outputs_fsyncs_total 6",
            "tribunal_http_request_duration_seconds_count{route=\"post_movements\",status=\"200\"} 1",
            "tribunal_movement_stage_duration_seconds_count{stage=\"append\"} 1",
            "tribunal_movement_stage_duration_seconds_count{stage=\"certify\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
