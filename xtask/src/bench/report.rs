//! Turning runs into figures: the summary rows (each figure on each path, with its
//! ratio to direct), the targets, and the files a run leaves behind:
//!
//! - `results.md`: the table, the targets, the machine;
//! - `results.json`: everything, with every raw sample ([`super::Results`]);
//! - `chart.png`: the figures drawn by `chart.py` with Debian's python3-matplotlib;
//! - `raw/`: what each tool printed, per run.
//!
//! With `--write-docs` the table also replaces the generated part of
//! `docs/benchmarks.md`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{
    Measured, Outcome, PathId, Results, Run, TestId, instructions::Workload, parse, serde_plain,
};

/// One figure on every path.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable name, e.g. `throughput.iperf1`, `latency.keepalive-rate.p99`.
    pub id: String,
    pub section: &'static str,
    pub label: String,
    pub unit: &'static str,
    /// Whether the ratio to direct means anything (it does not for CPU and memory,
    /// where direct has no proxy).
    pub ratio: bool,
    pub values: BTreeMap<PathId, f64>,
}

impl Row {
    fn new(
        id: String,
        section: &'static str,
        label: String,
        unit: &'static str,
        ratio: bool,
    ) -> Row {
        Row {
            id,
            section,
            label,
            unit,
            ratio,
            values: BTreeMap::new(),
        }
    }

    pub fn get(&self, path: PathId) -> Option<f64> {
        self.values.get(&path).copied()
    }

    fn ratio_of(&self, path: PathId) -> Option<f64> {
        let direct = self.get(PathId::Direct)?;
        (self.ratio && path != PathId::Direct && direct > 0.0)
            .then(|| self.get(path).map(|value| value / direct))
            .flatten()
    }
}

/// One of the targets and where weft stands.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: &'static str,
    pub target: &'static str,
    pub measured: Option<f64>,
    pub unit: &'static str,
    pub met: Option<bool>,
}

/// Whether the CPU and memory of the watched process `name` count for `path`.
pub fn counts_for(name: &str, path: PathId) -> bool {
    match path {
        PathId::Direct => false,
        PathId::Weft
        | PathId::WeftSameNode
        | PathId::WeftService
        | PathId::WeftResilient
        | PathId::WeftRouted => name.starts_with("agent "),
        PathId::Stunnel => name.starts_with("stunnel4 "),
        PathId::Haproxy => name.starts_with("haproxy "),
    }
}

/// CPU seconds of `path`'s proxies (both ends) over a run's measured window.
fn proxy_cpu(run: &Run) -> f64 {
    run.cpu_seconds
        .iter()
        .filter(|(name, _)| counts_for(name, run.path))
        .map(|(_, seconds)| seconds)
        .sum()
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// Every figure on every path.
pub fn summarize(measured: &Measured, paths: &[PathId], tests: &[TestId]) -> Vec<Row> {
    let runs_of = |test: TestId, path: PathId| {
        measured
            .runs
            .iter()
            .filter(move |run| run.test == test && run.path == path)
    };
    // The median over rounds of `figure`, for every path.
    let per_round = |row: &mut Row, test: TestId, figure: &dyn Fn(&Run) -> Option<f64>| {
        for &path in paths {
            let values: Vec<f64> = runs_of(test, path).filter_map(figure).collect();
            if let Some(median) = parse::median(&values) {
                row.values.insert(path, median);
            }
        }
    };
    let mut rows = Vec::new();

    for test in [TestId::Iperf1, TestId::Iperf4, TestId::Iperf8] {
        if !tests.contains(&test) {
            continue;
        }
        let mut row = Row::new(
            format!("throughput.{}", super::serde_plain(&test)),
            "Throughput (iperf3)",
            test.label().trim_start_matches("iperf3 ").to_owned(),
            "Gbit/s",
            true,
        );
        per_round(&mut row, test, &|run| match &run.result {
            Outcome::Iperf(iperf) => Some(iperf.bits_per_second / 1e9),
            Outcome::Requests { .. } | Outcome::Percentiles { .. } => None,
        });
        rows.push(row);
    }

    for test in [
        TestId::KeepaliveRate,
        TestId::NewconnRate,
        TestId::Http2Rate,
        TestId::GrpcRate,
        TestId::KeepaliveSaturation,
        TestId::NewconnSaturation,
        TestId::KeepaliveSaturation16,
        TestId::NewconnSaturation16,
        TestId::KeepaliveSaturation64,
        TestId::NewconnSaturation64,
        TestId::Http2Saturation,
        TestId::GrpcSaturation,
    ] {
        if !tests.contains(&test) {
            continue;
        }
        let name = super::serde_plain(&test);
        let section = match test {
            TestId::KeepaliveRate => {
                "Latency, HTTP/1.1 keep-alive, 1 KB responses, 1,000 requests/s (h2load)"
            }
            TestId::NewconnRate => {
                "Latency, a new connection per request, 1 KB responses, 1,000 requests/s (weft-load; connect to last byte)"
            }
            TestId::Http2Rate => {
                "Latency, HTTP/2 (h2c), 10 connections × 10 streams, 1 KB responses, 1,000 requests/s (h2load)"
            }
            TestId::GrpcRate => {
                "Latency, gRPC unary calls, 10 connections, 1,000 calls/s (weft-client; percentiles are medians over rounds)"
            }
            TestId::KeepaliveSaturation => "Saturation, HTTP/1.1 keep-alive, 2 clients (h2load)",
            TestId::KeepaliveSaturation16 => "Saturation, HTTP/1.1 keep-alive, 16 clients (h2load)",
            TestId::KeepaliveSaturation64 => "Saturation, HTTP/1.1 keep-alive, 64 clients (h2load)",
            TestId::NewconnSaturation16 => {
                "Saturation, a new connection per request, 16 clients (weft-load)"
            }
            TestId::NewconnSaturation64 => {
                "Saturation, a new connection per request, 64 clients (weft-load)"
            }
            TestId::Http2Saturation => {
                "Saturation, HTTP/2 (h2c), 10 connections × 10 streams, 1 KB responses (h2load)"
            }
            TestId::GrpcSaturation => {
                "Saturation, gRPC unary calls, 10 connections, 50 callers (weft-client; percentiles are medians over rounds)"
            }
            _ => "Saturation, a new connection per request, 2 clients (weft-load)",
        };
        let (label, unit) = match test {
            TestId::GrpcSaturation => ("calls per second", "calls/s"),
            TestId::GrpcRate => ("answered per second (1,000 offered)", "calls/s"),
            // Below 1,000 when the path could not keep up and requests queued.
            test if test.fixed_rate() => ("answered per second (1,000 offered)", "req/s"),
            test if test.newconn() => ("new connections per second", "conn/s"),
            _ => ("requests per second", "req/s"),
        };
        let mut row = Row::new(
            format!("rate.{name}"),
            section,
            label.to_owned(),
            unit,
            true,
        );
        per_round(&mut row, test, &|run| match &run.result {
            Outcome::Requests { rate, .. } | Outcome::Percentiles { rate, .. } => Some(*rate),
            Outcome::Iperf(_) => None,
        });
        rows.push(row);
        let mut pooled: BTreeMap<PathId, Vec<u32>> = BTreeMap::new();
        let mut errors: BTreeMap<PathId, f64> = BTreeMap::new();
        for &path in paths {
            for run in runs_of(test, path) {
                match &run.result {
                    Outcome::Requests {
                        latencies_us,
                        errors: failed,
                        ..
                    } => {
                        pooled.entry(path).or_default().extend(latencies_us);
                        *errors.entry(path).or_default() += *failed as f64;
                    }
                    Outcome::Percentiles { errors: failed, .. } => {
                        *errors.entry(path).or_default() += *failed as f64;
                    }
                    Outcome::Iperf(_) => {}
                }
            }
        }
        for samples in pooled.values_mut() {
            samples.sort_unstable();
        }
        if matches!(test, TestId::GrpcRate | TestId::GrpcSaturation) {
            // weft-client reports each run's percentiles, not its samples: the median
            // over rounds of each.
            for (label, percentile) in [("p50", 50), ("p99", 99)] {
                let mut row = Row::new(
                    format!("latency.{name}.{label}"),
                    section,
                    format!("latency {label}"),
                    "µs",
                    true,
                );
                per_round(&mut row, test, &|run| match &run.result {
                    Outcome::Percentiles { p50_us, p99_us, .. } => {
                        let value = if percentile == 50 { p50_us } else { p99_us };
                        value.map(f64::from)
                    }
                    _ => None,
                });
                rows.push(row);
            }
        }
        for (percentile, label) in [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")] {
            if pooled.is_empty() {
                break;
            }
            let mut row = Row::new(
                format!("latency.{name}.{label}"),
                section,
                format!("latency {label}"),
                "µs",
                true,
            );
            for (path, samples) in &pooled {
                if let Some(value) = parse::percentile(samples, percentile) {
                    row.values.insert(*path, f64::from(value));
                }
            }
            rows.push(row);
        }
        if errors.values().any(|&count| count > 0.0) {
            let mut row = Row::new(
                format!("errors.{name}"),
                section,
                "failed requests (all rounds)".to_owned(),
                "",
                false,
            );
            row.values = errors;
            rows.push(row);
        }
    }

    let cpu = "Proxy CPU, both ends together (agents; stunnel4 or HAProxy processes)";
    for (test, label) in [
        (TestId::Iperf1, "CPU seconds per GiB, 1 stream"),
        (TestId::Iperf8, "CPU seconds per GiB, 8 streams"),
    ] {
        if !tests.contains(&test) {
            continue;
        }
        let mut row = Row::new(
            format!("cpu.per-gib.{}", super::serde_plain(&test)),
            cpu,
            label.to_owned(),
            "s/GiB",
            false,
        );
        per_round(&mut row, test, &|run| match &run.result {
            Outcome::Iperf(iperf) if run.path != PathId::Direct && iperf.bytes > 0 => {
                Some(proxy_cpu(run) / (iperf.bytes as f64 / GIB))
            }
            _ => None,
        });
        rows.push(row);
    }
    for (test, label) in [
        (
            TestId::KeepaliveRate,
            "CPU seconds per 1k requests, keep-alive, 1k rps",
        ),
        (
            TestId::KeepaliveSaturation,
            "CPU seconds per 1k requests, keep-alive, saturation",
        ),
        (
            TestId::NewconnRate,
            "CPU seconds per 1k connections, 1k rps",
        ),
        (
            TestId::NewconnSaturation,
            "CPU seconds per 1k connections, saturation",
        ),
        (
            TestId::KeepaliveSaturation16,
            "CPU seconds per 1k requests, keep-alive, saturation, 16 clients",
        ),
        (
            TestId::KeepaliveSaturation64,
            "CPU seconds per 1k requests, keep-alive, saturation, 64 clients",
        ),
        (
            TestId::NewconnSaturation16,
            "CPU seconds per 1k connections, saturation, 16 clients",
        ),
        (
            TestId::NewconnSaturation64,
            "CPU seconds per 1k connections, saturation, 64 clients",
        ),
        (
            TestId::Http2Rate,
            "CPU seconds per 1k requests, HTTP/2, 1k rps",
        ),
        (
            TestId::Http2Saturation,
            "CPU seconds per 1k requests, HTTP/2, saturation",
        ),
        (TestId::GrpcRate, "CPU seconds per 1k calls, gRPC, 1k rps"),
        (
            TestId::GrpcSaturation,
            "CPU seconds per 1k calls, gRPC, saturation",
        ),
    ] {
        if !tests.contains(&test) {
            continue;
        }
        let mut row = Row::new(
            format!("cpu.per-1k.{}", super::serde_plain(&test)),
            cpu,
            label.to_owned(),
            "s/1k",
            false,
        );
        per_round(&mut row, test, &|run| match &run.result {
            Outcome::Requests { requests, .. } | Outcome::Percentiles { requests, .. }
                if run.path != PathId::Direct && *requests > 0 =>
            {
                Some(proxy_cpu(run) / (*requests as f64 / 1000.0))
            }
            _ => None,
        });
        rows.push(row);
    }
    if tests.contains(&TestId::KeepaliveRate) {
        let mut row = Row::new(
            "cpu.vcpu.keepalive-rate".to_owned(),
            cpu,
            "vCPU at 1k rps, keep-alive".to_owned(),
            "vCPU",
            false,
        );
        per_round(&mut row, TestId::KeepaliveRate, &|run| {
            (run.path != PathId::Direct && run.window_seconds > 0.0)
                .then(|| proxy_cpu(run) / run.window_seconds)
        });
        rows.push(row);
    }

    // Which of weft's paths each test took: the HTTP requests the client's agent served
    // (none at L4). Only rows for the weft paths, and only when they ran.
    let layer = "weft's path per test: HTTP requests the client's agent served (all rounds; 0 = L4, carried as TCP)";
    for &test in tests {
        let mut row = Row::new(
            format!("layer.{}", super::serde_plain(&test)),
            layer,
            format!("{} (expected {:?})", test.label(), test.layer()),
            "requests",
            false,
        );
        for &path in paths {
            let counts: Vec<u64> = runs_of(test, path)
                .filter_map(|run| run.agent_requests)
                .collect();
            if !counts.is_empty() {
                row.values.insert(path, counts.iter().sum::<u64>() as f64);
            }
        }
        if !row.values.is_empty() {
            rows.push(row);
        }
    }

    let memory = "Proxy memory, the larger of the two ends";
    let largest = |values: &BTreeMap<String, u64>, path: PathId| {
        values
            .iter()
            .filter(|(name, _)| counts_for(name, path))
            .map(|(_, bytes)| *bytes as f64 / MIB)
            .fold(None, |max: Option<f64>, value| {
                Some(max.map_or(value, |m| m.max(value)))
            })
    };
    for (id, label, source) in [
        (
            "memory.idle",
            "RSS idle (VmRSS before any load)",
            &measured.idle_rss,
        ),
        (
            "memory.idle-anonymous",
            "of which anonymous (RssAnon: heap and stacks)",
            &measured.idle_anonymous_rss,
        ),
        (
            "memory.startup-high-water",
            "RSS high-water while starting (VmHWM before any load)",
            &measured.idle_high_water_rss,
        ),
        (
            "memory.high-water",
            "RSS high-water under load (VmHWM, reset when the load starts)",
            &measured.high_water_rss,
        ),
    ] {
        let mut row = Row::new(id.to_owned(), memory, label.to_owned(), "MiB", false);
        for &path in paths {
            if let Some(value) = largest(source, path) {
                row.values.insert(path, value);
            }
        }
        rows.push(row);
    }
    let mut row = Row::new(
        "memory.peak-under-load".to_owned(),
        memory,
        "RSS under load (largest VmRSS sampled during the path's runs)".to_owned(),
        "MiB",
        false,
    );
    for &path in paths {
        let peak = measured
            .runs
            .iter()
            .filter(|run| run.path == path)
            .filter_map(|run| largest(&run.peak_rss_bytes, path))
            .fold(None, |max: Option<f64>, value| {
                Some(max.map_or(value, |m| m.max(value)))
            });
        if let Some(peak) = peak {
            row.values.insert(path, peak);
        }
    }
    rows.push(row);

    for workload in Workload::ALL {
        let mut row = Row::new(
            format!("instructions.{}", serde_plain(&workload)),
            "Instructions both agents executed (callgrind; fixed work, counted once)",
            workload.label().to_owned(),
            "instructions",
            false,
        );
        for count in measured
            .instructions
            .iter()
            .filter(|c| c.workload == workload)
        {
            row.values.insert(count.path, count.per_unit());
        }
        if !row.values.is_empty() {
            rows.push(row);
        }
    }
    rows
}

/// Where weft stands against the targets.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let row = |id: &str| rows.iter().find(|row| row.id == id);
    let weft = |id: &str| row(id).and_then(|row| row.get(PathId::Weft));
    let ratio = |id: &str| row(id).and_then(|row| row.ratio_of(PathId::Weft));
    let at_least = |value: Option<f64>, bound: f64| value.map(|v| v >= bound);
    let at_most = |value: Option<f64>, bound: f64| value.map(|v| v <= bound);
    let added_p99 = row("latency.keepalive-rate.p99")
        .and_then(|row| Some(row.get(PathId::Weft)? - row.get(PathId::Direct)?));
    let idle = weft("memory.idle");
    let high_water = weft("memory.high-water");
    vec![
        Target {
            what: "cross-node mTLS throughput, 1 stream",
            target: "≥ 0.65× direct",
            measured: ratio("throughput.iperf1"),
            unit: "× direct",
            met: at_least(ratio("throughput.iperf1"), 0.65),
        },
        Target {
            what: "cross-node mTLS throughput, 4 streams",
            target: "≥ 0.45× direct",
            measured: ratio("throughput.iperf4"),
            unit: "× direct",
            met: at_least(ratio("throughput.iperf4"), 0.45),
        },
        Target {
            what: "added round-trip p99, 1 KB request/response (keep-alive, 1k rps)",
            target: "≤ 35 µs",
            measured: added_p99,
            unit: "µs",
            met: at_most(added_p99, 35.0),
        },
        Target {
            what: "new meshed connections per second, 2 clients (cross-node)",
            target: "≥ 8,000/s",
            measured: weft("rate.newconn-saturation"),
            unit: "conn/s",
            met: at_least(weft("rate.newconn-saturation"), 8000.0),
        },
        Target {
            what: "agent CPU per GiB, both ends (1 stream)",
            target: "≤ 0.6 s/GiB",
            measured: weft("cpu.per-gib.iperf1"),
            unit: "s/GiB",
            met: at_most(weft("cpu.per-gib.iperf1"), 0.6),
        },
        Target {
            what: "agent RSS idle",
            target: "≤ 8 MiB",
            measured: idle,
            unit: "MiB",
            met: at_most(idle, 8.0),
        },
        Target {
            what: "agent RSS high-water under load",
            target: "≤ 24 MiB",
            measured: high_water,
            unit: "MiB",
            met: at_most(high_water, 24.0),
        },
    ]
}

/// A figure with as many digits as it deserves.
fn number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 999.5 {
        let whole = format!("{:.0}", value);
        // Thousands separators: 12345 -> 12,345.
        let digits: Vec<char> = whole.chars().collect();
        let mut out = String::new();
        for (i, c) in digits.iter().enumerate() {
            if i > 0
                && (digits.len() - i).is_multiple_of(3)
                && c.is_ascii_digit()
                && digits[i - 1].is_ascii_digit()
            {
                out.push(',');
            }
            out.push(*c);
        }
        out
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 0.1 || magnitude == 0.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// The results as markdown: machine, targets, then every figure with its ratio.
pub fn markdown(results: &Results) -> String {
    let machine = &results.machine;
    let mut md = String::new();
    let others = machine.busy_at_start.len() + machine.busy_at_end.len();
    let busy = machine.cpu_busy_before.max(machine.cpu_busy_after);
    let quiet = if others == 0 && busy < 0.1 {
        "quiet"
    } else {
        "**busy** (figures are noisy)"
    };
    let _ = writeln!(
        md,
        "Machine: {}, {} cores, {:.0} GiB, Linux {}; weft {}.  \n\
         Command: `{}` ({} round(s), {} in all).  \n\
         The machine was {quiet}: {:.0} % of the CPU busy in the 2 s before the cluster \
         started and {:.0} % in the 2 s after it was gone; {others} compiler, build or test \
         process(es) running at the start or the end.  ",
        machine.cpu,
        machine.cores,
        machine.memory_gib,
        machine.kernel,
        machine.weft_commit,
        results.command,
        results.settings["rounds"],
        super::minutes(results.seconds),
        machine.cpu_busy_before * 100.0,
        machine.cpu_busy_after * 100.0,
    );
    if !results.tls.is_empty() {
        md.push_str("TLS as negotiated (read from each ServerHello on the wire):");
        for (i, (path, tls)) in results.tls.iter().enumerate() {
            let _ = write!(
                md,
                "{} {} {} {} with {}",
                if i == 0 { "" } else { ";" },
                path.label(),
                tls.version,
                tls.cipher_suite,
                tls.group
            );
        }
        md.push_str(".\n");
    }
    md.push('\n');

    if !results.targets.is_empty() {
        md.push_str("| target (weft cross-node) | goal | measured | |\n|---|---|---:|---|\n");
        for target in &results.targets {
            let measured = target.measured.map_or("—".to_owned(), |value| {
                format!("{} {}", number(value), target.unit)
            });
            let met = match target.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {measured} | {met} |",
                target.what, target.target
            );
        }
        md.push('\n');
    }

    md.push_str(
        "Each cell: the figure, and in parentheses its ratio to direct. Throughput, rates and CPU \
         are medians over the rounds; latency percentiles pool every round's samples.\n\n",
    );
    let _ = write!(md, "| figure |");
    for path in &results.paths {
        let _ = write!(md, " {} |", path.label());
    }
    md.push_str("\n|---|");
    for _ in &results.paths {
        md.push_str("---:|");
    }
    md.push('\n');
    let mut section = "";
    for row in &results.summary {
        if row.section != section {
            section = row.section;
            let _ = write!(md, "| **{section}** |");
            for _ in &results.paths {
                md.push_str(" |");
            }
            md.push('\n');
        }
        let unit = if row.unit.is_empty() {
            String::new()
        } else {
            format!(" ({})", row.unit)
        };
        let _ = write!(md, "| {}{unit} |", row.label);
        for &path in &results.paths {
            let cell = match (row.get(path), row.ratio_of(path)) {
                (None, _) => "—".to_owned(),
                (Some(value), Some(ratio)) => format!("{} ({ratio:.2}×)", number(value)),
                (Some(value), None) => number(value),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

/// Writes `results.json`, `results.md` and `chart.png` into `out`, prints the table,
/// and with `write_docs` puts it into docs/benchmarks.md.
pub fn write(results: &Results, out: &Path, write_docs: bool) -> anyhow::Result<()> {
    let json = out.join("results.json");
    std::fs::write(&json, serde_json::to_vec(results)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    let table = markdown(results);
    let md = out.join("results.md");
    std::fs::write(
        &md,
        format!("# weft benchmark, {}\n\n{table}", results.started),
    )
    .with_context(|| format!("cannot write {}", md.display()))?;
    println!("{table}");

    let chart = out.join("chart.png");
    match super::draw_chart(include_str!("chart.py"), &json, &chart) {
        Ok(()) => eprintln!("==> chart: {}", chart.display()),
        // The figures are written already; a missing chart should not lose them.
        Err(err) => eprintln!("warning: no chart: {err:#}"),
    }
    if write_docs {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask lives in the workspace")?
            .join("docs/benchmarks.md");
        let text = std::fs::read_to_string(&docs)
            .with_context(|| format!("cannot read {}", docs.display()))?;
        let generated = format!(
            "Latest run: {}. Raw results of a run: `results.json` beside `results.md`.\n\n{table}",
            results.started
        );
        let updated = replace_generated(&text, &generated)
            .with_context(|| format!("in {}", docs.display()))?;
        std::fs::write(&docs, updated)
            .with_context(|| format!("cannot write {}", docs.display()))?;
        eprintln!("==> wrote the table into {}", docs.display());
    }
    Ok(())
}

const BEGIN: &str = "<!-- bench:begin (cargo xtask bench --write-docs writes what follows) -->";
const END: &str = "<!-- bench:end -->";

/// `text` with what lies between the generated-section markers replaced by `generated`.
fn replace_generated(text: &str, generated: &str) -> anyhow::Result<String> {
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no generated section: the markers `{BEGIN}` and `{END}` are missing");
    };
    if end < begin {
        bail!("the generated section's end marker comes before its start");
    }
    Ok(format!(
        "{}{BEGIN}\n{}\n{}",
        &text[..begin],
        generated.trim_end(),
        &text[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_significant_digits() {
        assert_eq!(number(12345.6), "12,346");
        assert_eq!(number(1000.0), "1,000");
        assert_eq!(number(999.7), "1,000");
        assert_eq!(number(123.4), "123");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.0123), "0.012");
        assert_eq!(number(0.0), "0.00");
    }

    #[test]
    fn ratios_only_where_they_mean_something() {
        let mut row = Row::new("x".into(), "s", "x".into(), "Gbit/s", true);
        row.values.insert(PathId::Direct, 20.0);
        row.values.insert(PathId::Weft, 13.0);
        assert_eq!(row.ratio_of(PathId::Weft), Some(0.65));
        assert_eq!(row.ratio_of(PathId::Direct), None);
        assert_eq!(row.ratio_of(PathId::Stunnel), None);
        row.ratio = false;
        assert_eq!(row.ratio_of(PathId::Weft), None);
    }

    #[test]
    fn targets_read_the_rows() {
        let mut throughput = Row::new("throughput.iperf1".into(), "s", "1".into(), "Gbit/s", true);
        throughput.values.insert(PathId::Direct, 20.0);
        throughput.values.insert(PathId::Weft, 12.0);
        let mut p99 = Row::new(
            "latency.keepalive-rate.p99".into(),
            "s",
            "p99".into(),
            "µs",
            true,
        );
        p99.values.insert(PathId::Direct, 100.0);
        p99.values.insert(PathId::Weft, 160.0);
        let targets = targets(&[throughput, p99]);
        assert_eq!(targets[0].measured, Some(0.6));
        assert_eq!(targets[0].met, Some(false));
        assert_eq!(targets[2].measured, Some(60.0));
        assert_eq!(targets[2].met, Some(false));
        assert_eq!(targets[1].met, None, "not measured");
    }

    #[test]
    fn replaces_only_the_generated_section() {
        let text = format!("# Benchmarks\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Findings\n");
        let updated = replace_generated(&text, "new table\n").unwrap();
        assert_eq!(
            updated,
            format!("# Benchmarks\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\n## Findings\n")
        );
        assert!(replace_generated("no markers", "x").is_err());
    }

    #[test]
    fn http2_and_grpc_rows_with_their_ratio_and_layer() {
        let run = |test, path, result, agent_requests| Run {
            test,
            path,
            round: 1,
            cpu_seconds: BTreeMap::from([("agent node0".to_owned(), 0.5)]),
            peak_rss_bytes: BTreeMap::new(),
            window_seconds: 3.0,
            agent_requests,
            result,
        };
        let h2 = |rate: f64, latency: u32| Outcome::Requests {
            requests: (rate * 3.0) as u64,
            errors: 0,
            first_error: None,
            seconds: 3.0,
            rate,
            latencies_us: vec![latency; 10],
        };
        let grpc = |rate: f64, p50, p99| Outcome::Percentiles {
            requests: (rate * 3.0) as u64,
            errors: 0,
            first_error: None,
            seconds: 3.0,
            rate,
            p50_us: Some(p50),
            p99_us: Some(p99),
        };
        let measured = Measured {
            runs: vec![
                run(
                    TestId::Http2Saturation,
                    PathId::Direct,
                    h2(40_000.0, 200),
                    None,
                ),
                run(
                    TestId::Http2Saturation,
                    PathId::Weft,
                    h2(10_000.0, 800),
                    Some(30_000),
                ),
                run(
                    TestId::GrpcSaturation,
                    PathId::Direct,
                    grpc(20_000.0, 2000, 5000),
                    None,
                ),
                run(
                    TestId::GrpcSaturation,
                    PathId::Weft,
                    grpc(5_000.0, 9000, 20_000),
                    Some(15_000),
                ),
            ],
            idle_rss: BTreeMap::new(),
            idle_anonymous_rss: BTreeMap::new(),
            idle_high_water_rss: BTreeMap::new(),
            high_water_rss: BTreeMap::new(),
            tls: BTreeMap::new(),
            instructions: vec![super::super::instructions::Count {
                path: PathId::Weft,
                workload: Workload::Http2,
                units: 1_000.0,
                instructions: 250_000_000,
            }],
        };
        let tests = [TestId::Http2Saturation, TestId::GrpcSaturation];
        let rows = summarize(&measured, &[PathId::Direct, PathId::Weft], &tests);
        let row = |id: &str| {
            rows.iter()
                .find(|row| row.id == id)
                .unwrap_or_else(|| panic!("no row {id}"))
        };
        assert_eq!(
            row("rate.http2-saturation").ratio_of(PathId::Weft),
            Some(0.25)
        );
        assert_eq!(
            row("latency.http2-saturation.p99").get(PathId::Weft),
            Some(800.0)
        );
        assert_eq!(
            row("rate.grpc-saturation").ratio_of(PathId::Weft),
            Some(0.25)
        );
        assert_eq!(
            row("latency.grpc-saturation.p50").ratio_of(PathId::Weft),
            Some(4.5)
        );
        assert_eq!(
            row("latency.grpc-saturation.p99").get(PathId::Direct),
            Some(5000.0)
        );
        assert!(
            rows.iter()
                .all(|row| row.id != "latency.grpc-saturation.p90"),
            "weft-client reports no p90"
        );
        let cpu = row("cpu.per-1k.grpc-saturation").get(PathId::Weft).unwrap();
        assert!((cpu - 0.5 / 15.0).abs() < 1e-9, "{cpu}");
        let layer = row("layer.grpc-saturation");
        assert_eq!(layer.get(PathId::Weft), Some(15_000.0));
        assert_eq!(
            layer.get(PathId::Direct),
            None,
            "no agent on the direct path"
        );
        let instructions = row("instructions.http2");
        assert_eq!(instructions.get(PathId::Weft), Some(250_000.0));
        assert_eq!(instructions.ratio_of(PathId::Weft), None);
        assert!(
            rows.iter().all(|row| row.id != "instructions.bulk"),
            "no row for a workload that was not counted"
        );
    }

    #[test]
    fn proxies_count_for_their_own_paths() {
        assert!(counts_for("agent node0", PathId::Weft));
        assert!(counts_for("agent node1", PathId::WeftSameNode));
        assert!(!counts_for("agent node0", PathId::Stunnel));
        assert!(counts_for("stunnel4 node1", PathId::Stunnel));
        assert!(counts_for("haproxy node0", PathId::Haproxy));
        assert!(!counts_for("agent node0", PathId::Direct));
    }
}
