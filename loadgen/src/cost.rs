//! What a request costs: CPU time (user + system), context switches and fsyncs per
//! request over the measured window, for the instances (from their `/metrics`), for
//! loadgen itself (`getrusage`), and for the whole box (`/proc/stat`). On a noisy machine
//! these stay stable where latency does not, so they are how two versions are compared
//! (spec: Loadgen.CostPerRequest).
//!
//! A sample is taken at the start and the end of the measured window; [`Cost::between`]
//! is a pure function of two samples and the requests answered between them.

use serde::Serialize;

/// One instance's counters, as its `/metrics` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceCounters {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub context_switches: u64,
    pub ledger_fsyncs: u64,
    pub log_fsyncs: u64,
    pub outputs_fsyncs: u64,
}

/// This process's CPU and context switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessCounters {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub context_switches: u64,
}

/// The whole machine, from `/proc/stat`: busy time in µs (every state but idle and
/// iowait), split user (user + nice) and system (the rest), and context switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BoxCounters {
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub context_switches: u64,
}

/// Everything at one moment; `instances[i]` is `None` when its `/metrics` did not answer.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub instances: Vec<Option<InstanceCounters>>,
    pub loadgen: ProcessCounters,
    pub machine: Option<BoxCounters>,
}

/// µs of CPU per request, split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuSplit {
    pub user: f64,
    pub system: f64,
}

/// Per request, over the measured window. `None` where a sample was missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    pub requests: u64,
    /// The headline figures: instances (all of them), loadgen, and the whole box.
    pub cpu_us_per_request: CpuPerRequest,
    /// Beside it: each instance, and user/system splits.
    pub cpu_breakdown_us_per_request: CpuBreakdown,
    pub context_switches_per_request: PerRequest,
    /// From the engines' own counters: Ledger group commits, input-log commits, outputs-log commits.
    pub fsyncs_per_request: FsyncsPerRequest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuPerRequest {
    pub instances: Option<f64>,
    pub loadgen: f64,
    #[serde(rename = "box")]
    pub machine: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuBreakdown {
    pub instances: Vec<Option<CpuSplit>>,
    pub loadgen: CpuSplit,
    #[serde(rename = "box")]
    pub machine: Option<CpuSplit>,
    /// The box's CPU that is neither an instance's nor loadgen's (the kernel's threads,
    /// a broker, anything else running).
    pub other: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PerRequest {
    pub instances: Option<f64>,
    pub loadgen: f64,
    #[serde(rename = "box")]
    pub machine: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FsyncsPerRequest {
    pub ledger: Option<f64>,
    pub log: Option<f64>,
    pub outputs: Option<f64>,
    pub total: Option<f64>,
}

impl Cost {
    /// The cost of the `requests` answered between `before` and `after`.
    pub fn between(before: &Sample, after: &Sample, requests: u64) -> Cost {
        let per = |total: u64| total as f64 / requests.max(1) as f64;
        let instances: Vec<Option<InstanceCounters>> = before
            .instances
            .iter()
            .zip(&after.instances)
            .map(|(b, a)| b.zip(*a).map(|(b, a)| instance_delta(&b, &a)))
            .collect();
        let all = instances.iter().copied().collect::<Option<Vec<_>>>().filter(|v| !v.is_empty());
        let sum = |f: fn(&InstanceCounters) -> u64| all.as_ref().map(|v| v.iter().map(f).sum::<u64>());
        let loadgen = process_delta(&before.loadgen, &after.loadgen);
        let machine = before.machine.zip(after.machine).map(|(b, a)| box_delta(&b, &a));
        let instances_cpu = sum(|c| c.cpu_user_us + c.cpu_system_us);
        let loadgen_cpu = loadgen.cpu_user_us + loadgen.cpu_system_us;
        let machine_cpu = machine.map(|m| m.cpu_user_us + m.cpu_system_us);
        let fsync = |f: fn(&InstanceCounters) -> u64| sum(f).map(per);
        let fsyncs_total = sum(|c| c.ledger_fsyncs + c.log_fsyncs + c.outputs_fsyncs).map(per);
        Cost {
            requests,
            cpu_us_per_request: CpuPerRequest {
                instances: instances_cpu.map(per),
                loadgen: per(loadgen_cpu),
                machine: machine_cpu.map(per),
            },
            cpu_breakdown_us_per_request: CpuBreakdown {
                instances: instances
                    .iter()
                    .map(|c| c.map(|c| CpuSplit { user: per(c.cpu_user_us), system: per(c.cpu_system_us) }))
                    .collect(),
                loadgen: CpuSplit { user: per(loadgen.cpu_user_us), system: per(loadgen.cpu_system_us) },
                machine: machine.map(|m| CpuSplit { user: per(m.cpu_user_us), system: per(m.cpu_system_us) }),
                other: machine_cpu.zip(instances_cpu).map(|(m, i)| per(m.saturating_sub(i + loadgen_cpu))),
            },
            context_switches_per_request: PerRequest {
                instances: sum(|c| c.context_switches).map(per),
                loadgen: per(loadgen.context_switches),
                machine: machine.map(|m| per(m.context_switches)),
            },
            fsyncs_per_request: FsyncsPerRequest {
                ledger: fsync(|c| c.ledger_fsyncs),
                log: fsync(|c| c.log_fsyncs),
                outputs: fsync(|c| c.outputs_fsyncs),
                total: fsyncs_total,
            },
        }
    }
}

fn instance_delta(b: &InstanceCounters, a: &InstanceCounters) -> InstanceCounters {
    InstanceCounters {
        cpu_user_us: a.cpu_user_us.saturating_sub(b.cpu_user_us),
        cpu_system_us: a.cpu_system_us.saturating_sub(b.cpu_system_us),
        context_switches: a.context_switches.saturating_sub(b.context_switches),
        ledger_fsyncs: a.ledger_fsyncs.saturating_sub(b.ledger_fsyncs),
        log_fsyncs: a.log_fsyncs.saturating_sub(b.log_fsyncs),
        outputs_fsyncs: a.outputs_fsyncs.saturating_sub(b.outputs_fsyncs),
    }
}

fn process_delta(b: &ProcessCounters, a: &ProcessCounters) -> ProcessCounters {
    ProcessCounters {
        cpu_user_us: a.cpu_user_us.saturating_sub(b.cpu_user_us),
        cpu_system_us: a.cpu_system_us.saturating_sub(b.cpu_system_us),
        context_switches: a.context_switches.saturating_sub(b.context_switches),
    }
}

fn box_delta(b: &BoxCounters, a: &BoxCounters) -> BoxCounters {
    BoxCounters {
        cpu_user_us: a.cpu_user_us.saturating_sub(b.cpu_user_us),
        cpu_system_us: a.cpu_system_us.saturating_sub(b.cpu_system_us),
        context_switches: a.context_switches.saturating_sub(b.context_switches),
    }
}

/// The counters an instance's `/metrics` text carries; `None` if any is missing.
pub fn parse_metrics(text: &str) -> Option<InstanceCounters> {
    let value = |name: &str| -> Option<u64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok().map(|v| v as u64)).flatten()
        })
    };
    Some(InstanceCounters {
        cpu_user_us: value("tribunal_process_cpu_microseconds_total{mode=\"user\"}")?,
        cpu_system_us: value("tribunal_process_cpu_microseconds_total{mode=\"system\"}")?,
        context_switches: value("tribunal_process_context_switches_total")?,
        ledger_fsyncs: value("tribunal_ledger_fsyncs_total")?,
        log_fsyncs: value("tribunal_log_fsyncs_total")?,
        outputs_fsyncs: value("tribunal_outputs_fsyncs_total")?,
    })
}

/// This process's CPU and context switches (every thread), from `getrusage`.
pub fn this_process() -> ProcessCounters {
    // SAFETY: getrusage writes into the struct we own; RUSAGE_SELF covers every thread.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    ProcessCounters {
        cpu_user_us: us(usage.ru_utime),
        cpu_system_us: us(usage.ru_stime),
        context_switches: (usage.ru_nvcsw + usage.ru_nivcsw) as u64,
    }
}

/// The whole machine, from `/proc/stat`; `None` where it cannot be read (not Linux).
pub fn whole_box() -> Option<BoxCounters> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?, clock_ticks_per_s())
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// `cpu user nice system idle iowait irq softirq steal ...` and `ctxt N`.
pub fn parse_proc_stat(text: &str, ticks_per_s: u64) -> Option<BoxCounters> {
    let cpu: Vec<u64> = text
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let ctxt = text.lines().find_map(|l| l.strip_prefix("ctxt ")?.trim().parse::<u64>().ok())?;
    let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
    let to_us = |ticks: u64| ticks * 1_000_000 / ticks_per_s.max(1);
    let user = field(0) + field(1);
    let system = field(2) + field(5) + field(6) + field(7);
    Some(BoxCounters { cpu_user_us: to_us(user), cpu_system_us: to_us(system), context_switches: ctxt })
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP x\n\
        tribunal_process_cpu_microseconds_total{mode=\"user\"} 1000\n\
        tribunal_process_cpu_microseconds_total{mode=\"system\"} 500\n\
        tribunal_process_context_switches_total 40\n\
        tribunal_ledger_fsyncs_total 7\n\
        tribunal_log_fsyncs_total 3\n\
        tribunal_outputs_fsyncs_total 2\n";

    #[test]
    fn an_instance_s_counters_are_read_from_its_metrics() {
        let c = parse_metrics(METRICS).unwrap();
        assert_eq!((c.cpu_user_us, c.cpu_system_us, c.context_switches), (1000, 500, 40));
        assert_eq!((c.ledger_fsyncs, c.log_fsyncs, c.outputs_fsyncs), (7, 3, 2));
        assert_eq!(parse_metrics("tribunal_ledger_fsyncs_total 7\n"), None, "a missing counter is no sample");
    }

    #[test]
    fn the_box_is_read_from_proc_stat() {
        let stat = "cpu  100 20 50 9000 30 5 5 0 0 0\ncpu0 1 2 3 4\nctxt 12345\nbtime 1\n";
        let b = parse_proc_stat(stat, 100).unwrap();
        assert_eq!(b.cpu_user_us, 1_200_000, "user + nice");
        assert_eq!(b.cpu_system_us, 600_000, "system + irq + softirq + steal; idle and iowait are not busy");
        assert_eq!(b.context_switches, 12345);
    }

    #[test]
    fn cost_per_request_is_the_window_s_deltas_over_its_requests() {
        // spec: Loadgen.CostPerRequest
        let counters = |cpu: u64, fsyncs: u64| InstanceCounters {
            cpu_user_us: cpu,
            cpu_system_us: cpu / 2,
            context_switches: cpu / 10,
            ledger_fsyncs: fsyncs,
            log_fsyncs: fsyncs,
            outputs_fsyncs: 0,
        };
        let before = Sample {
            instances: vec![Some(counters(1_000, 10)), Some(counters(2_000, 10))],
            loadgen: ProcessCounters { cpu_user_us: 100, cpu_system_us: 100, context_switches: 5 },
            machine: Some(BoxCounters { cpu_user_us: 10_000, cpu_system_us: 10_000, context_switches: 100 }),
        };
        let after = Sample {
            instances: vec![Some(counters(3_000, 20)), Some(counters(4_000, 30))],
            loadgen: ProcessCounters { cpu_user_us: 300, cpu_system_us: 200, context_switches: 15 },
            machine: Some(BoxCounters { cpu_user_us: 16_000, cpu_system_us: 14_000, context_switches: 300 }),
        };
        let cost = Cost::between(&before, &after, 100);
        assert_eq!(cost.cpu_us_per_request.instances, Some(60.0), "(2000+1000)*2 µs over 100 requests");
        assert_eq!(cost.cpu_us_per_request.loadgen, 3.0);
        assert_eq!(cost.cpu_us_per_request.machine, Some(100.0));
        assert_eq!(cost.cpu_breakdown_us_per_request.other, Some(37.0));
        assert_eq!(cost.fsyncs_per_request.ledger, Some(0.3));
        assert_eq!(cost.fsyncs_per_request.total, Some(0.6));
        assert_eq!(cost.context_switches_per_request.machine, Some(2.0));
        let missing = Sample { instances: vec![None, Some(counters(4_000, 30))], ..after.clone() };
        assert_eq!(Cost::between(&before, &missing, 100).cpu_us_per_request.instances, None);
    }
}
