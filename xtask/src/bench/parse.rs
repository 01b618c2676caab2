//! Reading what the measuring tools print (iperf3's JSON, h2load's summary and
//! per-request log for HTTP/1.1 and HTTP/2, weft-load's JSON, `weft-client grpc load`'s
//! JSON line), what an agent's metrics count, and what `/proc` says about a process, and
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

/// The counts of an h2load run, from its summary on stdout. HTTP/1.1 (`--h1`) and
/// HTTP/2 runs print the same summary; only the application protocol differs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct H2loadSummary {
    /// What h2load spoke: `http/1.1`, or `h2c` for HTTP/2 with prior knowledge.
    pub protocol: Option<String>,
    /// Requests a second over the measured time, as h2load computes it.
    pub requests_per_second: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Responses with a status other than 2xx.
    pub not_2xx: u64,
}

/// Reads h2load's summary: the `Application protocol: …`, `finished in …`,
/// `requests: …` and `status codes: …` lines.
pub fn h2load_summary(stdout: &str) -> anyhow::Result<H2loadSummary> {
    let mut summary = H2loadSummary::default();
    let mut seen = (false, false);
    for line in stdout.lines() {
        if let Some(protocol) = line.strip_prefix("Application protocol: ") {
            summary.protocol = Some(protocol.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("finished in ") {
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

/// What `weft-client grpc load` prints (`weft_workloads::client::LoadReport`): one JSON
/// line, with the percentiles of the run but not its samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcLoad {
    /// Calls answered with OK.
    pub requests: u64,
    /// Calls that failed, or (at a fixed rate) were not started because too many were in
    /// flight.
    pub errors: u64,
    /// Calls answered a second over the run's duration.
    pub rps: f64,
    pub p50_us: Option<u32>,
    pub p99_us: Option<u32>,
    pub first_error: Option<String>,
}

/// Reads `weft-client grpc load`'s JSON line (the last non-empty line of its stdout).
pub fn weft_client_load(stdout: &str) -> anyhow::Result<GrpcLoad> {
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("weft-client printed nothing")?;
    serde_json::from_str(line.trim())
        .with_context(|| format!("weft-client printed something unreadable: {line:?}"))
}

/// HTTP requests an agent served as the client's side (`istio_requests_total` with
/// `reporter="source"`, summed over every series) in its Prometheus text: more of them
/// after a run than before means the run went through weft's L7 (per-request) path.
pub fn source_requests(metrics: &str) -> u64 {
    sum_series(metrics, "istio_requests_total", |labels| {
        labels
            .split(',')
            .any(|label| label == "reporter=\"source\"")
    })
}

/// The sum of every series of metric `name` whose labels (the text between the braces,
/// empty for a series without labels) `keep` accepts, in a Prometheus text exposition.
pub fn sum_series(metrics: &str, name: &str, keep: impl Fn(&str) -> bool) -> u64 {
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name))
        .filter_map(|rest| match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} "),
            None => rest.strip_prefix(' ').map(|value| ("", value)),
        })
        .filter(|(labels, _)| keep(labels))
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
        .sum()
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
                protocol: Some("http/1.1".to_owned()),
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

    /// `h2load -c 10 -m 10 --threads=1 --duration=3000ms --warm-up-time=1000ms
    /// --log-file=… http://…/?bytes=1024`: HTTP/2 with prior knowledge.
    const H2LOAD_H2C: &str = "starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 1s of warm-up time and 3s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
progress: 20% of clients started
progress: 30% of clients started
progress: 40% of clients started
progress: 50% of clients started
progress: 60% of clients started
progress: 70% of clients started
progress: 80% of clients started
progress: 90% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 4.01s, 21534.67 req/s, 23.38MB/s
requests: 64604 total, 64704 started, 64604 done, 64604 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 64604 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 70.15MB (73556862) total, 946.84KB (969566) headers (space savings 95.01%), 63.09MB (66154496) data
                     min         max         mean         sd        +/- sd
time for request:      212us     13.80ms      4.61ms      1.02ms    74.81%
time for connect:      298us       972us       610us       214us    60.00%
time to 1st byte:     1.97ms      3.05ms      2.49ms       379us    60.00%
req/s           :    2142.21     2165.86     2153.45        8.02    60.00%
";

    #[test]
    fn reads_h2load_http2_summary() {
        let summary = h2load_summary(H2LOAD_H2C).unwrap();
        assert_eq!(
            summary,
            H2loadSummary {
                protocol: Some("h2c".to_owned()),
                requests_per_second: 21534.67,
                succeeded: 64604,
                failed: 0,
                errored: 0,
                timeout: 0,
                not_2xx: 0,
            }
        );
        // The `req/s` statistics line of the table is not the summary's rate.
        assert!(
            !H2LOAD_H2C
                .lines()
                .any(|line| line.starts_with("finished in 2"))
        );
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
    fn reads_weft_client_load_line() {
        let json = r#"{"requests":29876,"errors":0,"rps":9958.67,"p50_us":4712,"p99_us":9120,"first_error":null}"#;
        let report = weft_client_load(&format!("{json}\n")).unwrap();
        assert_eq!(
            report,
            GrpcLoad {
                requests: 29876,
                errors: 0,
                rps: 9958.67,
                p50_us: Some(4712),
                p99_us: Some(9120),
                first_error: None,
            }
        );
        let failed = r#"{"requests":0,"errors":1000,"rps":0.0,"p50_us":null,"p99_us":null,"first_error":"status: Unavailable, message: \"error trying to connect\""}"#;
        let report = weft_client_load(failed).unwrap();
        assert_eq!((report.requests, report.p50_us), (0, None));
        assert!(report.first_error.unwrap().contains("Unavailable"));
        assert!(weft_client_load("").is_err());
        assert!(weft_client_load("weft-client: cannot connect").is_err());
    }

    #[test]
    fn counts_requests_the_client_side_served() {
        let metrics = "\
# TYPE istio_requests_total counter
istio_requests_total{reporter=\"source\",source_workload=\"client\",request_protocol=\"http\",response_code=\"200\"} 6000
istio_requests_total{reporter=\"source\",source_workload=\"client\",request_protocol=\"grpc\",response_code=\"200\"} 12
istio_requests_total{reporter=\"destination\",source_workload=\"client\",request_protocol=\"http\",response_code=\"200\"} 6000
istio_tcp_connections_opened_total{reporter=\"source\",request_protocol=\"tcp\"} 9
";
        assert_eq!(source_requests(metrics), 6012);
        assert_eq!(source_requests("# no requests yet\n"), 0);
        let certificates = "weft_certificate_requests_total{result=\"issued\"} 3\n\
                            weft_certificate_requests_total{result=\"failed\"} 1\n\
                            weft_certificate_requests_totals 100\n\
                            weft_config_updates_total 7\n";
        assert_eq!(
            sum_series(certificates, "weft_certificate_requests_total", |_| true),
            4
        );
        assert_eq!(
            sum_series(certificates, "weft_config_updates_total", |_| true),
            7
        );
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
