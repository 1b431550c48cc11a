//! The run's report (spec: specs/loadgen.allium): the final table on the terminal, the
//! HdrHistogram `.hgrm` percentile file, one SVG with latency over time and the percentile
//! distribution, and the summary JSON that `loadgen run` writes and CI reads.
//!
//! Everything here is a pure function of the figures the run collected and the verifier's
//! result, so the report can be rebuilt or tested without a cluster. Latency is recorded in
//! microseconds (from each request's intended send time: no coordinated omission) and shown
//! in milliseconds, the unit wrk2 and the HdrHistogram plotter use.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::verify::{Check, Verification};

/// One second of the measured run (for the latency-over-time plot).
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t_s: u32,
    pub answered: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// What the run measured, gathered once so every report format shows the same numbers.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub targets: Vec<String>,
    pub rate_target_per_s: f64,
    /// Measured window (excludes warm-up).
    pub duration_s: f64,
    pub warmup_s: f64,
    pub connections: usize,
    /// Logical requests intended inside the measured window and answered.
    pub measured_requests: u64,
    pub achieved_rate_per_s: f64,
    /// µs, final answers of measured requests.
    pub histogram: Histogram<u64>,
    pub timeline: Vec<TimelinePoint>,
    /// Per attempt: "200", "422", "503", "504", "timeout", "connection_error", ...
    pub status_counts: BTreeMap<String, u64>,
    pub retries: u64,
    pub duplicates: u64,
    pub unresolved: u64,
    /// Echo of the workload configuration.
    pub workload: Value,
    /// CPU, context switches and fsyncs per request over the measured window.
    pub cost: Option<crate::cost::Cost>,
}

/// The histogram records microseconds; reports speak milliseconds (the `.hgrm` scaling ratio).
const US_PER_MS: f64 = 1000.0;

/// Percentile ticks per half distance for the `.hgrm` file and the distribution plot: the
/// value wrk2 and the Java `outputPercentileDistribution` default use.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Statuses that are a final, expected answer; everything else counts as an error in the
/// summary (5xx, timeouts, connection errors, and 409/400, which this workload never expects).
const NON_ERROR_STATUSES: [&str; 2] = ["200", "422"];

/// Width of the label column of the final table.
const LABEL_WIDTH: usize = 20;

/// Invariant examples shown per check in the table: enough to start debugging, few enough to
/// keep the table readable (the summary JSON keeps them all).
const TABLE_EXAMPLES: usize = 3;
const TABLE_EXAMPLE_CHARS: usize = 100;

const PLOT_WIDTH: u32 = 1000;
const PLOT_HEIGHT: u32 = 800;
/// Titles of the two panels; the tests look for them in the SVG.
const TIMELINE_TITLE: &str = "Latency over time (from intended send time)";
const DISTRIBUTION_TITLE: &str = "Latency by percentile";
/// Floor of the log-scale latency axis: 1 µs, the histogram's resolution, so a zero latency
/// (possible on a coarse clock) stays on the plot instead of at minus infinity.
const MIN_PLOT_MS: f64 = 0.001;

fn us_to_ms(us: u64) -> f64 {
    us as f64 / US_PER_MS
}

// ---------------------------------------------------------------------------------------
// Latency figures shared by the table and the summary
// ---------------------------------------------------------------------------------------

/// The headline latency figures in milliseconds. `None` from [`latency_ms`] when nothing was
/// measured, so an empty run reads as "no data" rather than as an implausibly fast zero.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LatencyMs {
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
    mean: f64,
}

fn latency_ms(histogram: &Histogram<u64>) -> Option<LatencyMs> {
    if histogram.is_empty() {
        return None;
    }
    let at = |q: f64| us_to_ms(histogram.value_at_quantile(q));
    Some(LatencyMs {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        p99_9: at(0.999),
        max: us_to_ms(histogram.max()),
        mean: histogram.mean() / US_PER_MS,
    })
}

/// The checks as reported. The spec makes an unresolved command a violation
/// (Loadgen.UnresolvedIsViolation); if the verifier did not report it as a check of its own,
/// one is added here so the table, the JSON and `invariants_ok` can never disagree with the
/// `unresolved` count printed next to them.
fn reported_checks(figures: &RunFigures, verification: &Verification) -> Vec<Check> {
    let mut checks = verification.checks.clone();
    let has_unresolved_check = checks.iter().any(|c| c.name == "unresolved");
    if figures.unresolved > 0 && !has_unresolved_check {
        checks.push(Check {
            name: "unresolved",
            ok: false,
            failures: figures.unresolved,
            examples: vec![format!("{} commands without a final answer at the drain deadline", figures.unresolved)],
        });
    }
    checks
}

fn invariants_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}

/// Attempts that did not end in an expected final answer (see [`NON_ERROR_STATUSES`]).
fn error_count(status_counts: &BTreeMap<String, u64>) -> u64 {
    status_counts
        .iter()
        .filter(|(status, _)| !NON_ERROR_STATUSES.contains(&status.as_str()))
        .fold(0u64, |sum, (_, n)| sum.saturating_add(*n))
}

// ---------------------------------------------------------------------------------------
// Final table
// ---------------------------------------------------------------------------------------

/// Prints the compact final table: what was asked, what was achieved, the latency, the
/// outcome counts and every invariant check, ending with the one line a human (or a grep in
/// CI) looks for: `invariants: OK` or `invariants: VIOLATED`.
pub fn print_table(out: &mut impl Write, figures: &RunFigures, verification: &Verification) -> io::Result<()> {
    write_run_lines(out, figures)?;
    write_latency_lines(out, &figures.histogram)?;
    write_cost_lines(out, figures.cost.as_ref())?;
    write_outcome_lines(out, figures)?;
    let checks = reported_checks(figures, verification);
    write_check_lines(out, &checks)?;
    let verdict = if invariants_ok(&checks) { "OK" } else { "VIOLATED" };
    writeln!(out, "invariants: {verdict}")
}

fn write_row(out: &mut impl Write, label: &str, value: impl std::fmt::Display) -> io::Result<()> {
    writeln!(out, "{label:<LABEL_WIDTH$}{value}")
}

fn write_run_lines(out: &mut impl Write, f: &RunFigures) -> io::Result<()> {
    let targets = if f.targets.is_empty() { "-".to_string() } else { f.targets.join(", ") };
    write_row(out, "targets", targets)?;
    write_row(
        out,
        "rate (req/s)",
        format_args!("target {:.1}, achieved {:.1}", f.rate_target_per_s, f.achieved_rate_per_s),
    )?;
    write_row(
        out,
        "window",
        format_args!("{:.1} s measured after {:.1} s warm-up, {} connections", f.duration_s, f.warmup_s, f.connections),
    )?;
    write_row(out, "measured requests", f.measured_requests)
}

fn write_latency_lines(out: &mut impl Write, histogram: &Histogram<u64>) -> io::Result<()> {
    const NAMES: [&str; 6] = ["p50", "p90", "p99", "p99.9", "max", "mean"];
    let cells: Vec<String> = match latency_ms(histogram) {
        Some(l) => [l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean].iter().map(|v| format!("{v:.3}")).collect(),
        None => NAMES.iter().map(|_| "-".to_string()).collect(),
    };
    let header: String = NAMES.iter().map(|n| format!("{n:>10}")).collect();
    let values: String = cells.iter().map(|c| format!("{c:>10}")).collect();
    write_row(out, "latency (ms)", header)?;
    write_row(out, "", values)
}

fn write_cost_lines(out: &mut impl Write, cost: Option<&crate::cost::Cost>) -> io::Result<()> {
    let Some(c) = cost else { return write_row(out, "cpu (µs/request)", "-") };
    let or_dash = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let cpu = &c.cpu_us_per_request;
    write_row(
        out,
        "cpu (µs/request)",
        format_args!("instances {}, loadgen {:.1}, box {}", or_dash(cpu.instances), cpu.loadgen, or_dash(cpu.machine)),
    )?;
    let switches = &c.context_switches_per_request;
    write_row(
        out,
        "context switches",
        format_args!(
            "instances {}, loadgen {:.1}, box {} per request",
            or_dash(switches.instances),
            switches.loadgen,
            or_dash(switches.machine)
        ),
    )?;
    let f = &c.fsyncs_per_request;
    write_row(
        out,
        "fsyncs",
        format_args!(
            "{} per request (Ledger {}, log {}, outputs {})",
            or_dash(f.total),
            or_dash(f.ledger),
            or_dash(f.log),
            or_dash(f.outputs)
        ),
    )
}

fn write_outcome_lines(out: &mut impl Write, f: &RunFigures) -> io::Result<()> {
    if f.status_counts.is_empty() {
        write_row(out, "status", "-")?;
    }
    for (status, n) in &f.status_counts {
        write_row(out, &format!("status {status}"), format_args!("{n:>10}"))?;
    }
    write_row(out, "retries", format_args!("{:>10}", f.retries))?;
    write_row(out, "duplicates", format_args!("{:>10}", f.duplicates))?;
    write_row(out, "unresolved", format_args!("{:>10}", f.unresolved))
}

fn write_check_lines(out: &mut impl Write, checks: &[Check]) -> io::Result<()> {
    writeln!(out, "invariant checks")?;
    if checks.is_empty() {
        writeln!(out, "  (none run)")?;
    }
    let name_width = checks.iter().map(|c| c.name.len() + 1).max().unwrap_or(0).max(LABEL_WIDTH - 2);
    for check in checks {
        let status = if check.ok { "OK" } else { "FAILED" };
        let examples = table_examples(&check.examples);
        let examples = if examples.is_empty() { String::new() } else { format!("  e.g. {examples}") };
        writeln!(
            out,
            "  {name:<name_width$}{status:<8}{failures:>8} failures{examples}",
            name = check.name,
            failures = check.failures
        )?;
    }
    Ok(())
}

/// The first few examples, each cut short, on one line.
fn table_examples(examples: &[String]) -> String {
    examples.iter().take(TABLE_EXAMPLES).map(|e| truncate_chars(e, TABLE_EXAMPLE_CHARS)).collect::<Vec<_>>().join(" | ")
}

/// Cuts on a character boundary: examples may quote SKU names in any script.
fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// .hgrm percentile distribution
// ---------------------------------------------------------------------------------------

/// Writes the classic HdrHistogram percentile distribution (Java `outputPercentileDistribution`
/// with scaling ratio 1000, as wrk2 `--latency` prints it), so the file can be dropped into the
/// HdrHistogram online plotter and compared with other tools' runs.
pub fn write_hgrm(path: &Path, histogram: &Histogram<u64>) -> io::Result<()> {
    let mut out = BufWriter::new(File::create(path)?);
    write_hgrm_to(&mut out, histogram)?;
    out.flush()
}

fn write_hgrm_to(out: &mut impl Write, histogram: &Histogram<u64>) -> io::Result<()> {
    writeln!(out, "{:>12} {:>14} {:>10} {:>14}", "Value", "Percentile", "TotalCount", "1/(1-Percentile)")?;
    writeln!(out)?;
    if !histogram.is_empty() {
        write_hgrm_rows(out, histogram)?;
    }
    write_hgrm_footer(out, histogram)
}

/// One row per percentile tick; the count column is cumulative. The 100% row has no
/// `1/(1-Percentile)` column (it would be infinite), exactly as the Java format does.
fn write_hgrm_rows(out: &mut impl Write, histogram: &Histogram<u64>) -> io::Result<()> {
    let mut total: u64 = 0;
    for step in histogram.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total = total.saturating_add(step.count_since_last_iteration());
        let value = us_to_ms(step.value_iterated_to());
        let q = step.quantile_iterated_to();
        if q < 1.0 {
            writeln!(out, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q))?;
        } else {
            writeln!(out, "{value:12.3} {q:2.12} {total:10}")?;
        }
    }
    Ok(())
}

fn write_hgrm_footer(out: &mut impl Write, histogram: &Histogram<u64>) -> io::Result<()> {
    let (mean, stdev, max) = if histogram.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (histogram.mean() / US_PER_MS, histogram.stdev() / US_PER_MS, us_to_ms(histogram.max()))
    };
    writeln!(out, "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]")?;
    writeln!(out, "#[Max     = {max:12.3}, Total count    = {:12}]", histogram.len())?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        histogram.buckets(),
        sub_bucket_count(histogram.sigfig())
    )
}

/// The sub-bucket count is not exposed by the `hdrhistogram` crate; it follows from the
/// significant digits the same way in every implementation (the smallest power of two that
/// resolves `2 * 10^sigfig` single units).
fn sub_bucket_count(sigfig: u8) -> u64 {
    let single_unit_range = 10u64.saturating_pow(u32::from(sigfig)).saturating_mul(2);
    single_unit_range.checked_next_power_of_two().unwrap_or(u64::MAX).max(2)
}

// ---------------------------------------------------------------------------------------
// SVG plot
// ---------------------------------------------------------------------------------------

/// Draws latency over time (top) and the latency percentile distribution (bottom) into one
/// SVG: the first shows *when* the tail happened (a stall, a failover), the second *how bad*
/// the tail is. Empty input gives empty axes with a note rather than an error, so a failed
/// run still leaves a report behind.
pub fn write_plot_svg(path: &Path, figures: &RunFigures) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(PLOT_HEIGHT / 2);
    draw_timeline(&top, &figures.timeline)?;
    draw_distribution(&bottom, &figures.histogram)?;
    root.present()?;
    Ok(())
}

type Panel<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// One line of the timeline: its legend label, colour and the figure it plots.
type TimelineSeries = (&'static str, RGBColor, fn(&TimelinePoint) -> u64);

const TIMELINE_SERIES: [TimelineSeries; 3] =
    [("p50", BLUE, |p| p.p50_us), ("p99", RED, |p| p.p99_us), ("max", RGBColor(90, 90, 90), |p| p.max_us)];

fn draw_timeline(area: &Panel<'_>, timeline: &[TimelinePoint]) -> anyhow::Result<()> {
    let x_end = timeline.iter().map(|p| p.t_s).max().map_or(1.0, |t| f64::from(t) + 1.0);
    let values_ms = timeline.iter().flat_map(|p| TIMELINE_SERIES.map(|(_, _, pick)| us_to_ms(pick(p))));
    let (y_lo, y_hi) = log_axis_bounds(values_ms);
    let mut chart = ChartBuilder::on(area)
        .caption(TIMELINE_TITLE, ("sans-serif", 20))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, (y_lo..y_hi).log_scale().with_key_points(log_key_points(y_lo, y_hi)))?;
    chart
        .configure_mesh()
        .x_desc("time since end of warm-up (s)")
        .x_label_formatter(&|t| trim_decimal(*t, 1))
        .y_desc("latency (ms, log scale)")
        .y_label_formatter(&|v| trim_decimal(*v, 3))
        .draw()?;
    if timeline.is_empty() {
        return draw_note(area, "no measured seconds");
    }
    for (label, colour, pick) in TIMELINE_SERIES {
        let points = timeline.iter().map(|p| (f64::from(p.t_s), us_to_ms(pick(p)).max(y_lo)));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    Ok(())
}

fn draw_distribution(area: &Panel<'_>, histogram: &Histogram<u64>) -> anyhow::Result<()> {
    let points = distribution_points(histogram);
    let x_end = percentile_axis_end(points.last().map_or(1.0, |p| p.0));
    let max_ms = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let y_end = if max_ms > 0.0 { max_ms * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(DISTRIBUTION_TITLE, ("sans-serif", 20))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..x_end).log_scale().with_key_points(percentile_key_points(x_end)), 0.0..y_end)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|v| trim_decimal(*v, 3))
        .draw()?;
    if points.is_empty() {
        return draw_note(area, "no measured requests");
    }
    let label = format!("latency (max {:.3} ms)", us_to_ms(histogram.max()));
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))?
        .label(label)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Writes a note in the middle of an empty panel, so "no data" is not mistaken for a
/// rendering failure.
fn draw_note(area: &Panel<'_>, text: &str) -> anyhow::Result<()> {
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from(("sans-serif", 18).into_font()).color(&RED);
    let x = i32::try_from(w / 2).unwrap_or(0) - 80;
    let y = i32::try_from(h / 2).unwrap_or(0);
    area.draw_text(text, &style, (x, y))?;
    Ok(())
}

/// Bounds for a log-scale ms axis around the given values, with a little headroom, never
/// below [`MIN_PLOT_MS`] and never an empty range (a log axis cannot show 0 or a single value).
fn log_axis_bounds(values_ms: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values_ms
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi <= 0.0 {
        return (0.1, 10.0);
    }
    let lo = (lo * 0.8).max(MIN_PLOT_MS);
    let hi = (hi * 1.25).max(lo * 10.0);
    (lo, hi)
}

/// Ticks at 1, 2 and 5 times each power of ten inside the range: the log crate default labels
/// only powers of ten, which leaves a one-decade plot with a single number on its axis.
fn log_key_points(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo) {
        return Vec::new();
    }
    let mut points = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        points.extend([1.0, 2.0, 5.0].iter().map(|m| m * decade).filter(|v| (lo..=hi).contains(v)));
        decade *= 10.0;
    }
    points
}

/// The distribution as (1/(1-p), ms): on a log axis this spreads 90%, 99%, 99.9% ... evenly,
/// which is where the interesting part of a latency distribution lives. The 100% step has no
/// finite position and is left out (its value is the max, named in the legend).
fn distribution_points(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    histogram
        .iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .filter(|step| step.quantile_iterated_to() < 1.0)
        .map(|step| (1.0 / (1.0 - step.quantile_iterated_to()), us_to_ms(step.value_iterated_to())))
        .collect()
}

/// The percentile axis reaches at least 99.99% and one decade past the data, up to 99.99999%.
fn percentile_axis_end(last_x: f64) -> f64 {
    let decades = if last_x.is_finite() && last_x > 1.0 { last_x.log10().ceil() } else { 0.0 };
    10f64.powf(decades.clamp(4.0, 7.0))
}

/// Ticks at 0%, 50% and every further nine: 1/(1-p) = 1, 2, 10, 100, ...
fn percentile_key_points(x_end: f64) -> Vec<f64> {
    let mut points = vec![1.0, 2.0];
    let mut x = 10.0;
    while x <= x_end * 1.000_001 {
        points.push(x);
        x *= 10.0;
    }
    points
}

/// Labels an x of 1/(1-p) with its percentile: 10 -> "90%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    if !(x.is_finite() && x >= 1.0) {
        return String::new();
    }
    format!("{}%", trim_decimal(100.0 - 100.0 / x, 6))
}

/// Fixed decimals without trailing zeros: axis labels read "0.25" and "20", not "20.000".
fn trim_decimal(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------
// Summary JSON
// ---------------------------------------------------------------------------------------

/// The machine-readable summary: the same figures as the table plus the timeline and the
/// workload echo, so a run can be compared with another or checked in CI without parsing
/// text. `invariants_ok` is the field that decides the exit code (Loadgen.ExitNonZeroOnViolation).
pub fn summary_json(figures: &RunFigures, verification: &Verification) -> Value {
    let checks = reported_checks(figures, verification);
    json!({
        "targets": figures.targets,
        "rate_target_per_s": figures.rate_target_per_s,
        "achieved_rate_per_s": figures.achieved_rate_per_s,
        "duration_s": figures.duration_s,
        "warmup_s": figures.warmup_s,
        "connections": figures.connections,
        "measured_requests": figures.measured_requests,
        "latency_ms": latency_json(&figures.histogram),
        "status_counts": figures.status_counts,
        "errors": error_count(&figures.status_counts),
        "retries": figures.retries,
        "duplicates": figures.duplicates,
        "unresolved": figures.unresolved,
        "timeline": figures.timeline.iter().map(timeline_json).collect::<Vec<_>>(),
        "workload": figures.workload,
        "cost": figures.cost,
        "cpu_us_per_request": figures.cost.as_ref().map(|c| c.cpu_us_per_request),
        "invariants_ok": invariants_ok(&checks),
        "invariants": checks.iter().map(check_json).collect::<Vec<_>>(),
    })
}

fn latency_json(histogram: &Histogram<u64>) -> Value {
    match latency_ms(histogram) {
        Some(l) => json!({
            "p50": l.p50, "p90": l.p90, "p99": l.p99, "p99_9": l.p99_9, "max": l.max, "mean": l.mean,
        }),
        None => json!({
            "p50": null, "p90": null, "p99": null, "p99_9": null, "max": null, "mean": null,
        }),
    }
}

fn timeline_json(p: &TimelinePoint) -> Value {
    json!({
        "t_s": p.t_s, "answered": p.answered, "errors": p.errors,
        "p50_us": p.p50_us, "p99_us": p.p99_us, "max_us": p.max_us,
    })
}

fn check_json(c: &Check) -> Value {
    json!({ "name": c.name, "ok": c.ok, "failures": c.failures, "examples": c.examples })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_1_to_1000_us() -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        h
    }

    fn figures(histogram: Histogram<u64>, timeline: Vec<TimelinePoint>) -> RunFigures {
        let status_counts = [("200", 900u64), ("422", 100), ("503", 3), ("timeout", 1)]
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        RunFigures {
            targets: vec!["http://127.0.0.1:8080".into(), "http://127.0.0.1:8081".into()],
            rate_target_per_s: 1000.0,
            duration_s: 1.0,
            warmup_s: 0.5,
            connections: 8,
            measured_requests: histogram.len(),
            achieved_rate_per_s: 999.5,
            histogram,
            timeline,
            status_counts,
            retries: 4,
            duplicates: 0,
            unresolved: 0,
            workload: json!({"skus": 100}),
            cost: None,
        }
    }

    fn timeline() -> Vec<TimelinePoint> {
        (0..10)
            .map(|t| TimelinePoint {
                t_s: t,
                answered: 100,
                errors: u64::from(t % 3 == 0),
                p50_us: 400 + u64::from(t) * 10,
                p99_us: 900 + u64::from(t) * 50,
                max_us: if t == 5 { 0 } else { 2000 + u64::from(t) * 1000 },
            })
            .collect()
    }

    fn verification(ok: bool) -> Verification {
        Verification {
            checks: vec![
                Check { name: "totals", ok: true, failures: 0, examples: vec![] },
                Check {
                    name: "non_negative",
                    ok,
                    failures: u64::from(!ok) * 2,
                    examples: if ok { vec![] } else { vec!["w1/sku-7 = -3".into(), "w2/sku-9 = -1".into()] },
                },
            ],
        }
    }

    /// (value ms, percentile, total count) of each data row.
    fn parse_hgrm(text: &str) -> Vec<(f64, f64, u64)> {
        text.lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                assert!(cols.len() == 3 || cols.len() == 4, "row {l:?}");
                (cols[0].parse().unwrap(), cols[1].parse().unwrap(), cols[2].parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn hgrm_parses_back_monotone_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.hgrm");
        write_hgrm(&path, &histogram_1_to_1000_us()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert_eq!(lines.next(), Some(""));

        let rows = parse_hgrm(&text);
        assert!(rows.len() > 20);
        for pair in rows.windows(2) {
            assert!(pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1 && pair[0].2 <= pair[1].2, "{pair:?}");
        }
        let last = rows.last().unwrap();
        assert_eq!(last.1, 1.0);
        assert_eq!(last.2, 1000);
        assert_eq!(last.0, 1.0);
        assert!((rows[0].0 - 0.001).abs() < 1e-9);
        assert!(text.contains("#[Mean    =        0.500, StdDeviation   =        0.289]"), "{text}");
        assert!(text.contains("#[Max     =        1.000, Total count    =         1000]"), "{text}");
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
    }

    #[test]
    fn hgrm_of_empty_histogram_is_header_and_footer() {
        let mut out = Vec::new();
        write_hgrm_to(&mut out, &Histogram::<u64>::new(3).unwrap()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(parse_hgrm(&text).is_empty());
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("Total count    =            0]"));
    }

    #[test]
    fn summary_has_latency_figures_and_counts() {
        let summary = summary_json(&figures(histogram_1_to_1000_us(), timeline()), &verification(true));
        let l = &summary["latency_ms"];
        assert_eq!(l["p50"], json!(0.5));
        assert_eq!(l["p90"], json!(0.9));
        assert_eq!(l["p99"], json!(0.99));
        assert_eq!(l["p99_9"], json!(0.999));
        assert_eq!(l["max"], json!(1.0));
        assert!((l["mean"].as_f64().unwrap() - 0.5005).abs() < 1e-9);
        assert_eq!(summary["errors"], json!(4));
        assert_eq!(summary["measured_requests"], json!(1000));
        assert_eq!(summary["timeline"].as_array().unwrap().len(), 10);
        assert_eq!(summary["timeline"][1]["p99_us"], json!(950));
        assert_eq!(summary["workload"], json!({"skus": 100}));
        assert_eq!(summary["invariants_ok"], json!(true));
        assert_eq!(summary["invariants"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn summary_reports_failed_check() {
        let summary = summary_json(&figures(histogram_1_to_1000_us(), vec![]), &verification(false));
        assert_eq!(summary["invariants_ok"], json!(false));
        let failed = &summary["invariants"][1];
        assert_eq!(failed["name"], json!("non_negative"));
        assert_eq!(failed["ok"], json!(false));
        assert_eq!(failed["failures"], json!(2));
        assert_eq!(failed["examples"][0], json!("w1/sku-7 = -3"));
    }

    #[test]
    fn summary_counts_unresolved_as_violation() {
        let mut f = figures(histogram_1_to_1000_us(), vec![]);
        f.unresolved = 3;
        let summary = summary_json(&f, &verification(true));
        assert_eq!(summary["invariants_ok"], json!(false));
        assert_eq!(summary["invariants"][2]["name"], json!("unresolved"));
        assert_eq!(summary["invariants"][2]["failures"], json!(3));
    }

    #[test]
    fn summary_of_empty_histogram_has_null_latency() {
        let summary = summary_json(&figures(Histogram::new(3).unwrap(), vec![]), &verification(true));
        assert_eq!(summary["latency_ms"]["p99"], Value::Null);
        assert_eq!(summary["latency_ms"]["mean"], Value::Null);
    }

    fn plot_text(figures: &RunFigures) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.svg");
        write_plot_svg(&path, figures).unwrap();
        std::fs::read_to_string(&path).unwrap()
    }

    #[test]
    fn plot_is_an_svg_with_titles_and_labels() {
        let text = plot_text(&figures(histogram_1_to_1000_us(), timeline()));
        assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
        assert!(text.trim_end().ends_with("</svg>"));
        for needle in [TIMELINE_TITLE, DISTRIBUTION_TITLE, "p50", "p99", "99.9%", "percentile", "<polyline"] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }

    #[test]
    fn plot_of_empty_run_has_axes_and_notes() {
        let text = plot_text(&figures(Histogram::new(3).unwrap(), vec![]));
        assert!(text.starts_with("<svg"));
        for needle in [TIMELINE_TITLE, DISTRIBUTION_TITLE, "no measured seconds", "no measured requests"] {
            assert!(text.contains(needle), "missing {needle}");
        }
    }

    #[test]
    fn table_says_ok_or_violated() {
        let f = figures(histogram_1_to_1000_us(), timeline());
        let mut out = Vec::new();
        print_table(&mut out, &f, &verification(true)).unwrap();
        let ok = String::from_utf8(out).unwrap();
        assert!(ok.trim_end().ends_with("invariants: OK"), "{ok}");
        assert!(ok.contains("0.500") && ok.contains("0.990") && ok.contains("status 503"), "{ok}");

        let mut out = Vec::new();
        print_table(&mut out, &f, &verification(false)).unwrap();
        let bad = String::from_utf8(out).unwrap();
        assert!(bad.trim_end().ends_with("invariants: VIOLATED"), "{bad}");
        assert!(bad.contains("FAILED") && bad.contains("w1/sku-7 = -3"), "{bad}");
    }

    #[test]
    fn table_of_empty_histogram_prints_dashes() {
        let mut f = figures(Histogram::new(3).unwrap(), vec![]);
        f.status_counts.clear();
        f.targets.clear();
        let mut out = Vec::new();
        print_table(&mut out, &f, &Verification { checks: vec![] }).unwrap();
        let text = String::from_utf8(out).unwrap();
        let latency_values = text.lines().skip_while(|l| !l.starts_with("latency")).nth(1).unwrap();
        assert_eq!(latency_values.split_whitespace().collect::<Vec<_>>(), vec!["-"; 6]);
        assert!(text.trim_end().ends_with("invariants: OK"), "{text}");
    }

    #[test]
    fn percentile_labels_and_key_points() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(10000.0), "99.99%");
        assert_eq!(percentile_key_points(percentile_axis_end(3.0)), vec![1.0, 2.0, 10.0, 100.0, 1000.0, 10000.0]);
        assert_eq!(percentile_axis_end(123_456.0), 1e6);
    }

    #[test]
    fn log_key_points_follow_one_two_five() {
        assert_eq!(log_key_points(0.3, 60.0), vec![0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        assert!(log_key_points(0.0, 1.0).is_empty());
        assert!(log_key_points(2.0, 1.0).is_empty());
    }

    #[test]
    fn log_axis_bounds_survive_zeros_and_single_values() {
        assert_eq!(log_axis_bounds([0.0, 0.0].into_iter()), (0.1, 10.0));
        let (lo, hi) = log_axis_bounds([2.0].into_iter());
        assert!(lo > 0.0 && hi >= lo * 10.0);
        assert_eq!(log_axis_bounds([0.0000001].into_iter()).0, MIN_PLOT_MS);
    }
}
