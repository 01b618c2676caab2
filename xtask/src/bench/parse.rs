//! Reading what the measuring tools print (iperf3's JSON, h2load's summary and
//! per-request log, weft-load's JSON) and what `/proc` says about a process, and
//! percentiles of latency samples. Pure functions, so each has a unit test.

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// What one iperf3 run measured, from the client's `--json` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Iperf {
    /// Bits per second the receiver got over the measured time (omitted seconds excluded).
    pub bits_per_second: f64,
    /// Bytes the receiver got over the measured time.
    pub bytes: u64,
    /// Measured seconds.
    pub seconds: f64,
    /// TCP retransmissions the sender saw.
    pub retransmits: u64,
    /// Bits per second of every reporting interval (all streams together), omitted ones
    /// left out.
    pub intervals: Vec<f64>,
}

/// Reads `iperf3 --json` client output.
pub fn iperf(json: &str) -> anyhow::Result<Iperf> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("iperf3 printed something that is not JSON")?;
    if let Some(error) = value["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let received = &value["end"]["sum_received"];
    let number = |value: &serde_json::Value, what: &str| {
        value
            .as_f64()
            .with_context(|| format!("iperf3's JSON has no {what}"))
    };
    let intervals = value["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|interval| interval["sum"]["omitted"] != true)
        .filter_map(|interval| interval["sum"]["bits_per_second"].as_f64())
        .collect();
    Ok(Iperf {
        bits_per_second: number(
            &received["bits_per_second"],
            "end.sum_received.bits_per_second",
        )?,
        bytes: number(&received["bytes"], "end.sum_received.bytes")? as u64,
        seconds: number(&received["seconds"], "end.sum_received.seconds")?,
        retransmits: value["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0),
        intervals,
    })
}

/// The counts of an h2load run, from its summary on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct H2loadSummary {
    /// Requests a second over the measured time, as h2load computes it.
    pub requests_per_second: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Responses with a status other than 2xx.
    pub not_2xx: u64,
}

/// Reads h2load's summary: the `finished in …`, `requests: …` and `status codes: …`
/// lines.
pub fn h2load_summary(stdout: &str) -> anyhow::Result<H2loadSummary> {
    let mut summary = H2loadSummary::default();
    let mut seen = (false, false);
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 6.00s, 999.83 req/s, 1.09MB/s
            let rate = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .and_then(|rate| rate.trim().parse().ok())
                .with_context(|| format!("h2load's summary line is unreadable: {line:?}"))?;
            summary.requests_per_second = rate;
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: 6000 total, 6000 started, 6000 done, 6000 succeeded, 0 failed, 0 errored, 0 timeout
            for part in rest.split(", ") {
                let Some((count, what)) = part.split_once(' ') else {
                    continue;
                };
                let count = count
                    .parse()
                    .with_context(|| format!("h2load's requests line is unreadable: {line:?}"))?;
                match what {
                    "succeeded" => summary.succeeded = count,
                    "failed" => summary.failed = count,
                    "errored" => summary.errored = count,
                    "timeout" => summary.timeout = count,
                    _ => {}
                }
            }
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: 6000 2xx, 0 3xx, 0 4xx, 0 5xx
            summary.not_2xx = rest
                .split(", ")
                .filter_map(|part| part.split_once(' '))
                .filter(|(_, class)| *class != "2xx")
                .filter_map(|(count, _)| count.parse::<u64>().ok())
                .sum();
        }
    }
    if seen != (true, true) {
        bail!("h2load printed no summary (did it fail to connect?)");
    }
    Ok(summary)
}

/// One request of h2load's `--log-file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2loadRequest {
    /// When the request started, microseconds since the epoch.
    pub start_us: u64,
    pub status: u16,
    /// From the request's start to the end of its response.
    pub latency_us: u32,
}

/// Reads h2load's `--log-file`: tab-separated start time (µs since the epoch), status,
/// and microseconds to the end of the response; columns added later are ignored.
pub fn h2load_log(text: &str) -> anyhow::Result<Vec<H2loadRequest>> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut columns = line.split('\t');
            let mut next = || columns.next().map(str::trim);
            let parsed = (|| {
                Some(H2loadRequest {
                    start_us: next()?.parse().ok()?,
                    status: next()?.parse().ok()?,
                    latency_us: next()?.parse().ok()?,
                })
            })();
            parsed.with_context(|| format!("unreadable line in h2load's log: {line:?}"))
        })
        .collect()
}

/// What weft-load prints (`weft_workloads::load::Report`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    #[serde(default)]
    pub span_seconds: f64,
    pub latencies_us: Vec<u32>,
}

/// Reads weft-load's JSON report.
pub fn weft_load(json: &str) -> anyhow::Result<Load> {
    serde_json::from_str(json.trim()).context("weft-load printed something unreadable")
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted` by nearest rank; `None` when empty.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    // The small epsilon keeps 99.9 % of 1000 at rank 999, not 1000 (0.999 * 1000 is
    // 999.0000000000001 in floating point).
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `values` (the mean of the middle two for an even count); `None` when
/// empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

/// User plus system CPU time of a process, in clock ticks, from `/proc/<pid>/stat`.
pub fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count the
    // fields after its closing parenthesis. utime and stime are fields 14 and 15.
    let after = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .context("/proc/<pid>/stat has no command name")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("/proc/<pid>/stat has no field {n}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Busy and total clock ticks of all CPUs together, from the `cpu` line of
/// `/proc/stat` (idle and iowait are the not-busy ones).
pub fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|value| value.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already counted in user.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPERF: &str = r#"{
        "start": {"connected": []},
        "intervals": [
            {"streams": [], "sum": {"bits_per_second": 1.0e9, "omitted": true}},
            {"streams": [], "sum": {"bits_per_second": 2.0e10, "omitted": false}},
            {"streams": [], "sum": {"bits_per_second": 2.2e10, "omitted": false}}
        ],
        "end": {
            "sum_sent": {"bytes": 5250000000, "bits_per_second": 2.1e10, "retransmits": 3},
            "sum_received": {"seconds": 2.0004, "bytes": 5242880000, "bits_per_second": 2.0967e10}
        }
    }"#;

    #[test]
    fn reads_iperf3_json() {
        let run = iperf(IPERF).unwrap();
        assert_eq!(run.bytes, 5_242_880_000);
        assert_eq!(run.bits_per_second, 2.0967e10);
        assert_eq!(run.retransmits, 3);
        assert_eq!(
            run.intervals,
            vec![2.0e10, 2.2e10],
            "omitted interval left out"
        );
    }

    #[test]
    fn reports_iperf3_errors() {
        let err = iperf(r#"{"start": {}, "intervals": [], "end": {}, "error": "unable to connect to server: Connection refused"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("Connection refused"), "{err}");
        assert!(iperf("iperf3: error").is_err());
        assert!(iperf(r#"{"end": {}}"#).is_err());
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 1s of warm-up time and 6s of main duration for measurements.
Application protocol: http/1.1

finished in 7.00s, 999.83 req/s, 1.21MB/s
requests: 5999 total, 6009 started, 5999 done, 5990 succeeded, 9 failed, 0 errored, 0 timeout
status codes: 5990 2xx, 0 3xx, 9 4xx, 0 5xx
traffic: 7.28MB (7631728) total, 719.88KB (737164) headers (space savings 0.00%), 5.86MB (6142976) data
                     min         max         mean         sd        +/- sd
time for request:       98us      3.41ms       171us        77us    96.12%
";

    #[test]
    fn reads_h2load_summary() {
        let summary = h2load_summary(H2LOAD).unwrap();
        assert_eq!(
            summary,
            H2loadSummary {
                requests_per_second: 999.83,
                succeeded: 5990,
                failed: 9,
                errored: 0,
                timeout: 0,
                not_2xx: 9,
            }
        );
        let refused = "starting benchmark...\nclient could not connect to host\n";
        assert!(h2load_summary(refused).is_err());
    }

    #[test]
    fn reads_h2load_log() {
        let log = "1795941771768258\t200\t349\n1795941771768259\t503\t514\textra\n\n";
        let requests = h2load_log(log).unwrap();
        assert_eq!(requests.len(), 2);
        assert_eq!(
            requests[1],
            H2loadRequest {
                start_us: 1_795_941_771_768_259,
                status: 503,
                latency_us: 514
            }
        );
        assert!(h2load_log("1795941771768258\t200\n").is_err());
    }

    #[test]
    fn reads_weft_load_report() {
        let json = r#"{"requests":3,"errors":1,"first_error":"no answer","seconds":2.0,"span_seconds":2.5,"latencies_us":[120,95,4000]}"#;
        let report = weft_load(json).unwrap();
        assert_eq!(report.requests, 3);
        assert_eq!(report.first_error.as_deref(), Some("no answer"));
        assert_eq!(report.latencies_us, vec![120, 95, 4000]);
        assert_eq!(report.span_seconds, 2.5);
        assert!(weft_load("Error: connection refused").is_err());
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(500));
        assert_eq!(percentile(&sorted, 99.0), Some(990));
        assert_eq!(percentile(&sorted, 99.9), Some(999));
        assert_eq!(percentile(&sorted, 100.0), Some(1000));
        assert_eq!(percentile(&[7], 99.9), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
    }

    #[test]
    fn reads_proc_figures() {
        // A command name with spaces and parentheses must not shift the fields.
        let stat = "4242 (weft (agent) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 37 0 0 20 0 3 0 100 0 0";
        assert_eq!(cpu_ticks(stat).unwrap(), 187);
        assert!(cpu_ticks("4242 (x) S 1").is_err());
        let status = "Name:\tweft-agent\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_bytes(status, "VmRSS"), Some(10 * 1024 * 1024));
        assert_eq!(status_bytes(status, "VmHWM"), Some(20 * 1024 * 1024));
        assert_eq!(status_bytes(status, "VmSwap"), None);
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(cpu_times(stat), Some((160, 1000)));
        assert_eq!(cpu_times("intr 5\n"), None);
    }
}
