//! `cargo xtask bench`: weft side by side with direct TCP and a reference mTLS tunnel
//! pair, on a two-node local cluster, with release binaries.
//!
//! Paths, all from a client pod on node0: *direct* to a pod on node1 in a namespace the
//! mesh leaves alone (the physical limit of this machine's four-namespace path); *weft*
//! to a meshed pod on node1 (captured by the kernel, carried by both agents in an HBONE
//! tunnel over mutual TLS); *weft same-node* to a meshed pod on node0 (one agent, no
//! TLS); and the references, *stunnel* and *HAProxy* pairs on the nodes carrying
//! the direct path's bytes in TLS 1.3 (see [`reference`]).
//!
//! Tests ([`TestId`]): iperf3 with 1, 4 and 8 streams; HTTP/1.1 keep-alive (h2load
//! `--h1`) and a new connection per request (weft-load), each at a fixed 1,000
//! requests/s (latency) and at saturation; HTTP/2 with prior knowledge, 10 connections
//! × 10 streams (h2load `-c 10 -m 10`), and unary gRPC calls over 10 connections
//! (`weft-client grpc load`), likewise. The servers are `weft-echo` (HTTP/1.1, h2c and
//! gRPC on one port, `?bytes=N` for the body's size) and iperf3, reached at their pod
//! addresses, never through a Service: no `appProtocol` or port name declares their
//! ports, so weft detects each connection's protocol from its first bytes and serves
//! the HTTP and gRPC tests per request (L7) and carries iperf3 as TCP (L4); each run
//! records the requests the client's agent counted, which shows the layer it took
//! ([`Layer`]).
//!
//! Every test runs on every path back to back, and the whole set `rounds` times, so
//! that a figure and its direct counterpart are measured seconds apart, on a machine
//! that may be noisy. CPU time of the agents (and of the reference proxies) is
//! read from `/proc/<pid>/stat` around the measured window of each run; their memory
//! from `/proc/<pid>/status`. Results go to `<target>/bench/<timestamp>/`
//! (`results.md`, `results.json` with every raw sample, `chart.png`, the tools' raw
//! output under `raw/`), see [`report`].

mod handshake;
mod instructions;
pub(crate) mod parse;
mod reference;
mod report;

use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddrV4,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use weft_cluster::{Cluster, PodSpec};

use crate::{cmd, setup};
use reference::{Certificates, End, Proxy, Tunnel};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A smoke run of about four minutes: one round of short runs. The figures are rough.
    #[arg(long)]
    quick: bool,
    /// Rounds of the whole test set (default 3; 1 with --quick). Figures are medians over
    /// rounds; latency percentiles pool the samples of every round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Only these paths (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    paths: Vec<PathId>,
    /// Only these tests (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    tests: Vec<TestId>,
    /// Where to write the results (default `<target>/bench/<timestamp>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the results table into docs/benchmarks.md.
    #[arg(long)]
    write_docs: bool,
    /// Leave the cluster and the reference proxies running afterwards (to profile by
    /// hand; remove it with `cargo xtask cluster down --name <name>`).
    #[arg(long)]
    keep: bool,
    /// Name of the benchmark's cluster.
    #[arg(long, default_value = "bench")]
    name: String,
    /// Select the weft paths' pods with this many AuthorizationPolicies of 10 rules
    /// each, only the very last rule admitting the client: what authorization costs a
    /// connection and a request at its worst (default none).
    #[arg(long, default_value_t = 0)]
    authorization_policies: usize,
    /// Run the release binaries in this directory instead of building them: to compare
    /// two builds, alternate runs with a saved copy of `target/release`'s `weft-*`.
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// Scrape every weft agent's metrics endpoint once a second during each run on the
    /// weft paths, as a Prometheus would: compare with a run without to see what being
    /// scraped costs under load.
    #[arg(long)]
    scrape: bool,
    /// After the timed runs, restart the agents under callgrind and count the
    /// instructions they execute per MiB, per request and per connection on the weft
    /// paths (a run without `--tests` always does).
    #[arg(long)]
    callgrind: bool,
}

/// A way from the client pod to a server.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum PathId {
    /// Pod to pod, no mesh: the limit of this machine.
    Direct,
    /// weft between nodes: both agents, HBONE over mutual TLS.
    Weft,
    /// weft within a node: one agent, no TLS.
    WeftSameNode,
    /// weft between nodes through a Service (no TrafficPolicy): the balancer and the
    /// default retry of a failed connection. Only when asked for (`--paths`).
    WeftService,
    /// As `weft-service`, with a TrafficPolicy that retries, limits and ejects (none of
    /// it tripping): what the resilience layers cost when nothing fails. Only when
    /// asked for.
    WeftResilient,
    /// weft between nodes through a Service with an HTTPRoute of 10 rules (only the
    /// last matches) to a pod of its own that an L7 AuthorizationPolicy (principal,
    /// method, path) selects: the request layer with routing and authorization in
    /// place. Only when asked for.
    WeftRouted,
    /// A stunnel4 pair, mutual TLS 1.3.
    Stunnel,
    /// An HAProxy pair (TCP mode), mutual TLS 1.3.
    Haproxy,
}

impl PathId {
    /// The paths measured by default.
    pub const ALL: [PathId; 5] = [
        PathId::Direct,
        PathId::Weft,
        PathId::WeftSameNode,
        PathId::Stunnel,
        PathId::Haproxy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PathId::Direct => "direct",
            PathId::Weft => "weft cross-node",
            PathId::WeftSameNode => "weft same-node",
            PathId::WeftService => "weft via a Service",
            PathId::WeftResilient => "weft via a Service, resilience policy",
            PathId::WeftRouted => "weft via a route and an L7 policy",
            PathId::Stunnel => "stunnel",
            PathId::Haproxy => "HAProxy",
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            PathId::Direct => "direct",
            PathId::Weft => "weft",
            PathId::WeftSameNode => "weft-same-node",
            PathId::WeftService => "weft-service",
            PathId::WeftResilient => "weft-resilient",
            PathId::WeftRouted => "weft-routed",
            PathId::Stunnel => "stunnel",
            PathId::Haproxy => "haproxy",
        }
    }

    /// The proxy processes whose CPU and memory count for this path.
    fn proxies(self) -> Option<Role> {
        match self {
            PathId::Direct => None,
            PathId::Weft
            | PathId::WeftSameNode
            | PathId::WeftService
            | PathId::WeftResilient
            | PathId::WeftRouted => Some(Role::Agent),
            PathId::Stunnel => Some(Role::Reference(Proxy::Stunnel)),
            PathId::Haproxy => Some(Role::Reference(Proxy::Haproxy)),
        }
    }
}

/// One measurement. The test's protocol decides which of weft's paths carries it (see
/// [`TestId::layer`]).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum TestId {
    /// iperf3, one stream.
    Iperf1,
    /// iperf3, four parallel streams.
    Iperf4,
    /// iperf3, eight parallel streams.
    Iperf8,
    /// h2load, HTTP/1.1 keep-alive, 1 KB responses at a fixed 1,000 requests/s.
    #[value(alias = "http1-rate")]
    KeepaliveRate,
    /// h2load, HTTP/1.1 keep-alive, 1 KB responses, 2 clients as fast as they go.
    #[value(alias = "http1-saturation")]
    KeepaliveSaturation,
    /// weft-load, a new connection per request, 1 KB responses at a fixed 1,000/s.
    NewconnRate,
    /// weft-load, a new connection per request, 2 clients as fast as they go.
    NewconnSaturation,
    /// `keepalive-saturation` with 16 clients.
    #[serde(rename = "keepalive-saturation-16")]
    #[value(name = "keepalive-saturation-16")]
    KeepaliveSaturation16,
    /// `keepalive-saturation` with 64 clients.
    #[serde(rename = "keepalive-saturation-64")]
    #[value(name = "keepalive-saturation-64")]
    KeepaliveSaturation64,
    /// `newconn-saturation` with 16 clients.
    #[serde(rename = "newconn-saturation-16")]
    #[value(name = "newconn-saturation-16")]
    NewconnSaturation16,
    /// `newconn-saturation` with 64 clients.
    #[serde(rename = "newconn-saturation-64")]
    #[value(name = "newconn-saturation-64")]
    NewconnSaturation64,
    /// h2load, HTTP/2 with prior knowledge, 10 connections × 10 streams, 1 KB responses
    /// at a fixed 1,000 requests/s.
    Http2Rate,
    /// h2load, HTTP/2 with prior knowledge, 10 connections × 10 streams, 1 KB responses,
    /// as fast as they go.
    Http2Saturation,
    /// weft-client, unary gRPC calls over 10 connections at a fixed 1,000 calls/s.
    GrpcRate,
    /// weft-client, unary gRPC calls over 10 connections, 50 callers as fast as they go.
    GrpcSaturation,
}

impl TestId {
    pub const ALL: [TestId; 15] = [
        TestId::Iperf1,
        TestId::Iperf4,
        TestId::Iperf8,
        TestId::KeepaliveRate,
        TestId::KeepaliveSaturation,
        TestId::NewconnRate,
        TestId::NewconnSaturation,
        TestId::KeepaliveSaturation16,
        TestId::KeepaliveSaturation64,
        TestId::NewconnSaturation16,
        TestId::NewconnSaturation64,
        TestId::Http2Rate,
        TestId::Http2Saturation,
        TestId::GrpcRate,
        TestId::GrpcSaturation,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TestId::Iperf1 => "iperf3 1 stream",
            TestId::Iperf4 => "iperf3 4 streams",
            TestId::Iperf8 => "iperf3 8 streams",
            TestId::KeepaliveRate => "HTTP/1.1 keep-alive 1k rps",
            TestId::KeepaliveSaturation => "HTTP/1.1 keep-alive saturation",
            TestId::NewconnRate => "new connection 1k rps",
            TestId::NewconnSaturation => "new connection saturation",
            TestId::KeepaliveSaturation16 => "HTTP/1.1 keep-alive saturation, 16 clients",
            TestId::KeepaliveSaturation64 => "HTTP/1.1 keep-alive saturation, 64 clients",
            TestId::NewconnSaturation16 => "new connection saturation, 16 clients",
            TestId::NewconnSaturation64 => "new connection saturation, 64 clients",
            TestId::Http2Rate => "HTTP/2 1k rps",
            TestId::Http2Saturation => "HTTP/2 saturation",
            TestId::GrpcRate => "gRPC unary 1k rps",
            TestId::GrpcSaturation => "gRPC unary saturation",
        }
    }

    /// Which of weft's paths carries the test, on the weft paths. The servers are
    /// reached at their pod addresses, on a port no Service declares, so each client
    /// agent's connection is told by its first bytes ([`Layer`]).
    pub fn layer(self) -> Layer {
        match self {
            TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8 => Layer::L4,
            _ => Layer::L7,
        }
    }

    /// HTTP/1.1 with keep-alive, through h2load.
    fn keepalive(self) -> bool {
        matches!(
            self,
            TestId::KeepaliveRate
                | TestId::KeepaliveSaturation
                | TestId::KeepaliveSaturation16
                | TestId::KeepaliveSaturation64
        )
    }

    /// A new connection per request, through weft-load.
    fn newconn(self) -> bool {
        matches!(
            self,
            TestId::NewconnRate
                | TestId::NewconnSaturation
                | TestId::NewconnSaturation16
                | TestId::NewconnSaturation64
        )
    }

    /// The concurrent clients of a saturation test of HTTP/1.1.
    fn clients(self) -> usize {
        match self {
            TestId::KeepaliveSaturation16 | TestId::NewconnSaturation16 => 16,
            TestId::KeepaliveSaturation64 | TestId::NewconnSaturation64 => 64,
            _ => SATURATION_CLIENTS,
        }
    }

    /// A fixed-rate test (latency at 1,000 a second), else a saturation one.
    fn fixed_rate(self) -> bool {
        matches!(
            self,
            TestId::KeepaliveRate | TestId::NewconnRate | TestId::Http2Rate | TestId::GrpcRate
        )
    }
}

/// The layer a weft path serves a test at.
///
/// Every server is addressed by its pod IP, not a Service VIP, so no `appProtocol` or
/// port name declares what port 8080 or 5201 speaks and the agents detect it from the
/// first bytes the client sends (`agent/src/proxy/detect.rs`), on the client's node
/// and again on the server's: an HTTP/1.1 request line or the HTTP/2 preface is served
/// per request (L7: HTTP/1.1, h2c and gRPC over it), anything else is carried as TCP
/// (L4). iperf3 opens every connection with its 37-character cookie of lower-case
/// letters and digits, which no HTTP method nor the preface starts with, so it is
/// told TCP on its first byte. Each run records the requests the client's agent
/// counted (`Run::agent_requests`), so the report shows the layer each test took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Layer {
    /// TCP, copied byte for byte (in HBONE between nodes).
    L4,
    /// HTTP, served and balanced per request.
    L7,
}

/// The fixed request rate of the latency tests.
const RATE: u32 = 1000;
/// Connections h2load spreads the fixed rate over (each sends RATE / this a second).
const RATE_CONNECTIONS: u32 = 10;
/// Concurrent clients of the saturation tests.
const SATURATION_CLIENTS: usize = 2;
/// HTTP/2 connections of the `http2-*` and `grpc-*` tests, and the streams h2load keeps
/// open on each (`-m`).
const H2_CONNECTIONS: u32 = 10;
const H2_STREAMS: u32 = 10;
/// Callers of `grpc-saturation`, spread over its connections.
const GRPC_CALLERS: u32 = 50;
/// What every HTTP request asks for: 1 KB of body.
const REQUEST_PATH: &str = "/?bytes=1024";
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

/// How long each kind of run lasts.
#[derive(Clone, Copy, Debug, Serialize)]
struct Settings {
    /// A smoke run (`--quick`): short runs, and less work for the instruction counts.
    quick: bool,
    rounds: usize,
    /// iperf3 `-t` (measured) and `-O` (omitted at the start: slow start).
    iperf_seconds: u32,
    iperf_omit_seconds: u32,
    /// Measured seconds of the fixed-rate and saturation request runs.
    rate_seconds: f64,
    saturation_seconds: f64,
    /// Seconds of load before a request run's measurement starts.
    warmup_seconds: f64,
    /// AuthorizationPolicies selecting the weft paths' pods (`--authorization-policies`).
    authorization_policies: usize,
    /// Whether the agents are scraped every second during the runs (`--scrape`).
    scrape: bool,
}

impl Settings {
    fn new(quick: bool, rounds: Option<usize>, authorization_policies: usize) -> Self {
        let base = if quick {
            Settings {
                quick,
                rounds: 1,
                iperf_seconds: 2,
                iperf_omit_seconds: 0,
                rate_seconds: 2.0,
                saturation_seconds: 2.0,
                warmup_seconds: 0.5,
                authorization_policies,
                scrape: false,
            }
        } else {
            Settings {
                quick,
                rounds: 3,
                iperf_seconds: 3,
                iperf_omit_seconds: 1,
                rate_seconds: 6.0,
                saturation_seconds: 3.0,
                warmup_seconds: 1.0,
                authorization_policies,
                scrape: false,
            }
        };
        Settings {
            rounds: rounds.unwrap_or(base.rounds).max(1),
            ..base
        }
    }

    /// Seconds one run of `test` takes, with a little for starting the tool.
    fn estimate(&self, test: TestId) -> f64 {
        0.4 + match test {
            TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8 => {
                f64::from(self.iperf_seconds + self.iperf_omit_seconds) + 0.3
            }
            // weft-client has no warm-up: its connections open before the clock starts.
            TestId::GrpcRate => self.rate_seconds,
            TestId::GrpcSaturation => self.saturation_seconds,
            test if test.fixed_rate() => self.warmup_seconds + self.rate_seconds,
            _ => self.warmup_seconds + self.saturation_seconds,
        }
    }
}

/// What a watched process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Agent,
    Reference(Proxy),
}

/// A process whose CPU time and memory the benchmark reads.
#[derive(Clone, Debug)]
struct Watched {
    /// `agent node0`, `stunnel4 node1`, … (see [`report::counts_for`]).
    name: String,
    pid: u32,
}

/// Where a path's client sends its requests and streams.
#[derive(Clone, Debug)]
struct Endpoint {
    path: PathId,
    /// The client pod's namespace (its name is always `client`).
    client_namespace: &'static str,
    http: SocketAddrV4,
    iperf: SocketAddrV4,
}

/// The result of one run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub test: TestId,
    pub path: PathId,
    pub round: usize,
    /// CPU seconds of every watched process over the measured window.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// The largest VmRSS of every watched process seen during the run, bytes.
    pub peak_rss_bytes: BTreeMap<String, u64>,
    /// Seconds between the CPU readings.
    pub window_seconds: f64,
    /// On the weft paths, the HTTP requests the client's agent (node0's) served during
    /// the run as the client's side: none for a test weft carried at L4, about every
    /// request for one it served at L7 (see [`Layer`]).
    pub agent_requests: Option<u64>,
    pub result: Outcome,
}

/// What the tool of a run measured.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    Iperf(parse::Iperf),
    Requests {
        /// Requests answered with a 2xx in the measured window.
        requests: u64,
        errors: u64,
        first_error: Option<String>,
        seconds: f64,
        /// Requests answered per second: below the offered rate when the path fell
        /// behind.
        rate: f64,
        /// Every answered request's latency, microseconds.
        latencies_us: Vec<u32>,
    },
    /// A tool that reports percentiles, not samples (`weft-client grpc load`).
    Percentiles {
        /// Calls answered with OK.
        requests: u64,
        errors: u64,
        first_error: Option<String>,
        seconds: f64,
        /// Calls answered per second.
        rate: f64,
        p50_us: Option<u32>,
        p99_us: Option<u32>,
    },
}

/// The whole benchmark's data, as written to `results.json`.
#[derive(Debug, Serialize)]
pub struct Results {
    pub started: String,
    pub command: String,
    pub quick: bool,
    pub seconds: f64,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub paths: Vec<PathId>,
    pub tests: Vec<TestId>,
    /// VmRSS of every watched process after setup, before any load, bytes.
    pub idle_rss_bytes: BTreeMap<String, u64>,
    /// RssAnon of every watched process before any load (heap and stacks), bytes.
    pub idle_anonymous_rss_bytes: BTreeMap<String, u64>,
    /// VmHWM of every watched process before any load (what starting took), bytes.
    pub idle_high_water_rss_bytes: BTreeMap<String, u64>,
    /// VmHWM of every watched process after the last run, reset when the load
    /// started (`clear_refs`), bytes.
    pub high_water_rss_bytes: BTreeMap<String, u64>,
    /// What each TLS path negotiated, read from its ServerHello on the wire.
    pub tls: BTreeMap<PathId, handshake::Negotiated>,
    pub runs: Vec<Run>,
    /// Instructions both agents executed per workload under callgrind.
    pub instructions: Vec<instructions::Count>,
    pub summary: Vec<report::Row>,
    pub targets: Vec<report::Target>,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub weft_commit: String,
    pub tools: BTreeMap<String, String>,
    /// Other processes (builds, test suites) running at the start and at the end.
    pub busy_at_start: Vec<String>,
    pub busy_at_end: Vec<String>,
    /// Share of both cores busy over two seconds before the cluster starts and after it
    /// is gone: what else runs on the machine.
    pub cpu_busy_before: f64,
    pub cpu_busy_after: f64,
    pub load_average_at_start: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::ensure()?;
    if !weft_cluster::is_root() {
        bail!(
            "the benchmark loads kernel programs and creates network namespaces, so it needs root: run `sudo -E cargo xtask bench`"
        );
    }
    let started_at = Instant::now();
    let settings = Settings {
        scrape: args.scrape,
        ..Settings::new(args.quick, args.rounds, args.authorization_policies)
    };
    let paths: Vec<PathId> = if args.paths.is_empty() {
        PathId::ALL.to_vec()
    } else {
        let mut paths = args.paths.clone();
        paths.sort();
        paths.dedup();
        paths
    };
    let tests: Vec<TestId> = if args.tests.is_empty() {
        TestId::ALL.to_vec()
    } else {
        let mut tests = args.tests.clone();
        tests.sort();
        tests.dedup();
        tests
    };

    let bin = match &args.binaries {
        Some(dir) => std::fs::canonicalize(dir)
            .with_context(|| format!("--binaries {}: no such directory", dir.display()))?,
        None => {
            eprintln!("==> building release binaries (agent, controller, CNI plugin, workloads)");
            build_release()?;
            cmd::target_dir()?.join("release")
        }
    };
    let out = match &args.out {
        Some(out) => out.clone(),
        None => cmd::target_dir()?
            .join("bench")
            .join(timestamp("+%Y%m%d-%H%M%S")?),
    };
    std::fs::create_dir_all(out.join("raw"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!("==> results go to {}", out.display());
    decision_costs(&out)?;

    let busy_at_start = busy_processes();
    let load_average_at_start = load_average();
    let cpu_busy_before = cpu_busy(Duration::from_secs(2));
    if !busy_at_start.is_empty() || cpu_busy_before > 0.1 {
        eprintln!(
            "warning: other work runs on this machine ({:.0} % of the CPU busy), so the figures will be noisy:\n  {}",
            cpu_busy_before * 100.0,
            busy_at_start.join("\n  ")
        );
    }

    crate::cluster::start_fresh(&args.name)?;

    let mut bench = Bench {
        cluster: None,
        proxies: Vec::new(),
        keep: args.keep,
        name: args.name.clone(),
    };
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let started = timestamp("-Iseconds")?;
    let callgrind = args.callgrind || args.tests.is_empty();
    let measured = bench.measure(&bin, &out, settings, &paths, &tests, callgrind);
    let cleanup = bench.finish();
    let measured = measured?;
    cleanup?;
    let machine = Machine {
        busy_at_start,
        busy_at_end: busy_processes(),
        cpu_busy_before,
        cpu_busy_after: cpu_busy(Duration::from_secs(2)),
        load_average_at_start,
        ..machine()?
    };
    let summary = report::summarize(&measured, &paths, &tests);
    let results = Results {
        started,
        command: format!("cargo xtask {command}"),
        quick: args.quick,
        seconds: started_at.elapsed().as_secs_f64(),
        machine,
        settings: serde_json::to_value(settings)?,
        targets: report::targets(&summary),
        summary,
        paths: paths.clone(),
        tests: tests.clone(),
        idle_rss_bytes: measured.idle_rss,
        idle_anonymous_rss_bytes: measured.idle_anonymous_rss,
        idle_high_water_rss_bytes: measured.idle_high_water_rss,
        high_water_rss_bytes: measured.high_water_rss,
        tls: measured.tls,
        runs: measured.runs,
        instructions: measured.instructions,
    };
    report::write(&results, &out, args.write_docs)?;
    eprintln!(
        "==> done in {}; results in {}",
        minutes(started_at.elapsed().as_secs_f64()),
        out.display()
    );
    Ok(())
}

/// The cluster and the reference proxies, removed when the benchmark ends however it
/// ends (an error, a panic; Ctrl-C has its own handler).
struct Bench {
    cluster: Option<Cluster>,
    proxies: Vec<Child>,
    keep: bool,
    name: String,
}

/// A running cluster's paths, the processes to watch, and what TLS its paths negotiated.
struct Started {
    endpoints: Vec<Endpoint>,
    watched: Vec<Watched>,
    tls: BTreeMap<PathId, handshake::Negotiated>,
}

/// What the runs measured, before it is summarized.
pub struct Measured {
    pub runs: Vec<Run>,
    pub idle_rss: BTreeMap<String, u64>,
    /// RssAnon before any load: heap and stacks, without the binary's pages.
    pub idle_anonymous_rss: BTreeMap<String, u64>,
    /// VmHWM before any load: what starting up took.
    pub idle_high_water_rss: BTreeMap<String, u64>,
    /// VmHWM after the last run, counted from the start of the load.
    pub high_water_rss: BTreeMap<String, u64>,
    pub tls: BTreeMap<PathId, handshake::Negotiated>,
    pub instructions: Vec<instructions::Count>,
}

impl Bench {
    fn measure(
        &mut self,
        bin: &Path,
        out: &Path,
        settings: Settings,
        paths: &[PathId],
        tests: &[TestId],
        callgrind: bool,
    ) -> anyhow::Result<Measured> {
        let Started {
            endpoints,
            watched,
            tls,
        } = self.start(bin, out, paths, tests, settings.authorization_policies)?;
        let cluster = self.cluster.as_ref().expect("started");

        eprintln!("==> idle: reading the proxies' memory before any load");
        std::thread::sleep(Duration::from_secs(2));
        let idle_rss = watched
            .iter()
            .filter_map(|w| Some((w.name.clone(), read_status(w.pid, "VmRSS")?)))
            .collect();
        let idle_anonymous_rss = watched
            .iter()
            .filter_map(|w| Some((w.name.clone(), read_status(w.pid, "RssAnon")?)))
            .collect();
        let idle_high_water_rss = watched
            .iter()
            .filter_map(|w| Some((w.name.clone(), read_status(w.pid, "VmHWM")?)))
            .collect();
        // Reset the high-water marks (and nothing else): from here on they are the
        // peak under load, not what starting up took (the agent's comes from aya
        // parsing the kernel's BTF while it loads its programs).
        for process in &watched {
            let path = format!("/proc/{}/clear_refs", process.pid);
            std::fs::write(&path, "5").with_context(|| format!("cannot reset {path}"))?;
        }

        let total = settings.rounds * tests.len() * endpoints.len();
        let per_round: f64 = tests
            .iter()
            .map(|&test| settings.estimate(test) * endpoints.len() as f64)
            .sum();
        eprintln!(
            "==> {total} runs: {} round(s) of {} test(s) on {} path(s), about {}",
            settings.rounds,
            tests.len(),
            endpoints.len(),
            minutes(per_round * settings.rounds as f64)
        );
        let runner = Runner {
            cluster,
            bin,
            settings: &settings,
            watched: &watched,
        };
        let clock = Instant::now();
        let mut runs = Vec::with_capacity(total);
        let mut planned_left = per_round * settings.rounds as f64;
        for round in 1..=settings.rounds {
            for &test in tests {
                for endpoint in &endpoints {
                    let index = runs.len() + 1;
                    eprint!(
                        "  [{index:>3}/{total} {} elapsed, ~{} left] round {round} · {:<30} · {:<15} ",
                        minutes(clock.elapsed().as_secs_f64()),
                        minutes(planned_left),
                        test.label(),
                        endpoint.path.label(),
                    );
                    let raw = out.join("raw").join(format!(
                        "{}-{}-{round}",
                        serde_plain(&test),
                        endpoint.path.key()
                    ));
                    let run = run_one(&runner, test, endpoint, round, &raw).with_context(|| {
                        format!("{} on path {} failed", test.label(), endpoint.path.label())
                    })?;
                    eprintln!("{}", describe(&run, endpoint.path));
                    planned_left -= settings.estimate(test);
                    runs.push(run);
                }
            }
        }
        let high_water_rss = watched
            .iter()
            .filter_map(|w| Some((w.name.clone(), read_status(w.pid, "VmHWM")?)))
            .collect();
        let weft: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|endpoint| endpoint.path.proxies() == Some(Role::Agent))
            .collect();
        let instructions = if callgrind && !weft.is_empty() {
            let cluster = self.cluster.as_mut().expect("started");
            instructions::count(cluster, bin, &weft, out, settings.quick)?
        } else {
            Vec::new()
        };
        Ok(Measured {
            runs,
            idle_rss,
            idle_anonymous_rss,
            idle_high_water_rss,
            high_water_rss,
            tls,
            instructions,
        })
    }

    /// Brings the cluster up with its pods, agents and reference proxies, and checks
    /// that every path answers (in HTTP/2 and gRPC too when `tests` need them).
    fn start(
        &mut self,
        bin: &Path,
        out: &Path,
        paths: &[PathId],
        tests: &[TestId],
        authorization_policies: usize,
    ) -> anyhow::Result<Started> {
        eprintln!(
            "==> starting cluster {}: 2 nodes, the controller, a weft agent on each node (log level info)",
            self.name
        );
        let cluster = self.cluster.insert(Cluster::up(&self.name, 2)?);
        let manifests = out.join("mesh.yaml");
        let mesh = format!(
            "{MESH}{}{}",
            routed(),
            worst_case_policies(authorization_policies)
        );
        std::fs::write(&manifests, mesh)
            .with_context(|| format!("cannot write {}", manifests.display()))?;
        cluster.set_mesh(vec![manifests], Vec::new())?;
        cluster.start_controller(&bin.join("weft-controller"))?;
        cluster.set_cni(Some(bin.to_owned()))?;
        let mut watched = Vec::new();
        for node in cluster.topology().node_names() {
            let agent = cluster.start_agent_with_log(&node, &bin.join("weft-agent"), "info")?;
            watched.push(Watched {
                name: format!("agent {node}"),
                pid: agent.pid,
            });
        }

        eprintln!(
            "==> pods: clients on node0; servers (weft-echo on :{HTTP_PORT}, iperf3 on :{IPERF_PORT}) on node1 and node0"
        );
        let echo = bin.join("weft-echo");
        let server_command = format!(
            "iperf3 --server --port {IPERF_PORT} >/dev/null 2>&1 & exec {} --listen 0.0.0.0:{HTTP_PORT}",
            echo.display()
        );
        let mut pod = |name: &str, namespace: &str, node: &str, server: bool| {
            let command: Vec<&str> = if server {
                vec!["sh", "-c", &server_command]
            } else {
                Vec::new()
            };
            let mut spec = PodSpec::new(name, node, &command);
            spec.namespace = namespace.to_owned();
            spec.service_account = if server { "server" } else { "client" }.to_owned();
            spec.env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
            spec.labels.insert("bench-pod".to_owned(), name.to_owned());
            cluster.add_pod(spec)
        };
        let plain_server = pod("server", PLAIN, "node1", true)?;
        pod("client", PLAIN, "node0", false)?;
        // The Services of the weft-service paths select it by its `bench-pod` label.
        let remote = pod("remote", MESHED, "node1", true)?;
        if paths.contains(&PathId::WeftRouted) {
            // Selected by the routed Service and the L7 policy (`ROUTED`).
            pod("routed", MESHED, "node1", true)?;
        }
        let local = pod("local", MESHED, "node0", true)?;
        pod("client", MESHED, "node0", false)?;
        cluster.wait_for_mesh(Duration::from_secs(30))?;

        let node_ips: Vec<std::net::Ipv4Addr> = cluster
            .topology()
            .nodes
            .iter()
            .map(|node| node.ip)
            .collect();
        let node_ip = |index: usize| node_ips[index];
        let at = |ip, port| SocketAddrV4::new(ip, port);
        let mut endpoints = Vec::new();
        for &path in paths {
            let (client_namespace, http, iperf) = match path {
                PathId::Direct => (
                    PLAIN,
                    at(plain_server.ip, HTTP_PORT),
                    at(plain_server.ip, IPERF_PORT),
                ),
                PathId::Weft => (MESHED, at(remote.ip, HTTP_PORT), at(remote.ip, IPERF_PORT)),
                PathId::WeftSameNode => (MESHED, at(local.ip, HTTP_PORT), at(local.ip, IPERF_PORT)),
                PathId::WeftService => (MESHED, at(SERVICE, HTTP_PORT), at(SERVICE, IPERF_PORT)),
                PathId::WeftResilient => (
                    MESHED,
                    at(RESILIENT_SERVICE, HTTP_PORT),
                    at(RESILIENT_SERVICE, IPERF_PORT),
                ),
                PathId::WeftRouted => (
                    MESHED,
                    at(ROUTED_SERVICE, HTTP_PORT),
                    at(ROUTED_SERVICE, IPERF_PORT),
                ),
                PathId::Stunnel => (PLAIN, at(node_ip(0), 17080), at(node_ip(0), 17201)),
                PathId::Haproxy => (PLAIN, at(node_ip(0), 18080), at(node_ip(0), 18201)),
            };
            endpoints.push(Endpoint {
                path,
                client_namespace,
                http,
                iperf,
            });
        }

        let references: Vec<Proxy> = paths
            .iter()
            .filter_map(|path| match path.proxies() {
                Some(Role::Reference(proxy)) => Some(proxy),
                _ => None,
            })
            .collect();
        if !references.is_empty() {
            let certs = reference::certificates(&out.join("tls"))?;
            for proxy in references {
                let (entry_base, relay_base) = match proxy {
                    Proxy::Stunnel => (17000, 17443),
                    Proxy::Haproxy => (18000, 18443),
                };
                let tunnels = [
                    Tunnel {
                        name: "http",
                        entry: at(node_ip(0), entry_base + 80),
                        relay: at(node_ip(1), relay_base),
                        upstream: at(plain_server.ip, HTTP_PORT),
                    },
                    Tunnel {
                        name: "iperf",
                        entry: at(node_ip(0), entry_base + 201),
                        relay: at(node_ip(1), relay_base + 1),
                        upstream: at(plain_server.ip, IPERF_PORT),
                    },
                ];
                for (end, node) in [(End::Server, "node1"), (End::Client, "node0")] {
                    let pid = self.start_reference(proxy, end, node, &tunnels, &certs, out)?;
                    watched.push(Watched {
                        name: format!("{} {node}", proxy.program()),
                        pid,
                    });
                }
            }
        }
        let cluster = self.cluster.as_ref().expect("started");

        // The first connection of every TLS path is made by the checks below: capture
        // its handshake between the nodes, on node0's port of the fabric bridge (the
        // bridge device itself does not see what it forwards between its ports).
        let pcap = out.join("handshakes.pcap");
        let mut tcpdump = cluster
            .fabric_command(&[
                "tcpdump",
                "-i",
                "n0",
                "--immediate-mode",
                "-U",
                "-s",
                "4096",
                "-w",
                &pcap.display().to_string(),
                "tcp and (port 15008 or portrange 17443-17444 or portrange 18443-18444)",
            ])?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start tcpdump")?;
        std::thread::sleep(Duration::from_millis(500));

        eprintln!("==> checking every path end to end");
        for endpoint in &endpoints {
            for addr in [endpoint.http, endpoint.iperf] {
                let log = cluster.layout().state_dir().join("logs");
                cluster.wait_for_tcp(
                    endpoint.client_namespace,
                    "client",
                    addr,
                    Duration::from_secs(15),
                    &log,
                )?;
            }
            let url = format!("http://{}{REQUEST_PATH}", endpoint.http);
            let output = cluster
                .pod_command(
                    endpoint.client_namespace,
                    "client",
                    &[
                        "curl",
                        "-sf",
                        "--max-time",
                        "5",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{size_download}",
                        &url,
                    ],
                )?
                .output()
                .context("cannot run curl")?;
            let size = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() || size.trim() != "1024" {
                bail!(
                    "path {}: GET {url} failed ({}, {size} bytes): {}",
                    endpoint.path.label(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            let mut checks: Vec<(&str, Vec<String>)> = Vec::new();
            if tests
                .iter()
                .any(|test| matches!(test, TestId::Http2Rate | TestId::Http2Saturation))
            {
                checks.push((
                    "GET over HTTP/2 with prior knowledge",
                    ["curl", "-sf", "--http2-prior-knowledge", "--max-time", "5"]
                        .into_iter()
                        .map(str::to_owned)
                        .chain(["-o", "/dev/null", &url].map(str::to_owned))
                        .collect(),
                ));
            }
            if tests
                .iter()
                .any(|test| matches!(test, TestId::GrpcRate | TestId::GrpcSaturation))
            {
                checks.push((
                    "a unary gRPC call",
                    vec![
                        bin.join("weft-client").display().to_string(),
                        "grpc".into(),
                        "unary".into(),
                        "--target".into(),
                        format!("http://{}", endpoint.http),
                        "--timeout".into(),
                        "5".into(),
                    ],
                ));
            }
            for (what, argv) in checks {
                let output = cluster
                    .pod_command(endpoint.client_namespace, "client", &argv)?
                    .output()
                    .with_context(|| format!("cannot run {}", argv[0]))?;
                if !output.status.success() {
                    bail!(
                        "path {}: {what} to {} failed ({}): {}{}",
                        endpoint.path.label(),
                        endpoint.http,
                        output.status,
                        String::from_utf8_lossy(&output.stdout).trim(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
            }
        }
        // SIGINT, so that tcpdump writes out what it has.
        let _ = Command::new("kill")
            .args(["-INT", &tcpdump.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while tcpdump.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = tcpdump.kill();
        let _ = tcpdump.wait();
        let hellos = handshake::server_hellos(&std::fs::read(&pcap).unwrap_or_default());
        let mut tls = BTreeMap::new();
        for (port, negotiated) in hellos {
            let path = match port {
                15008 => PathId::Weft,
                17443 | 17444 => PathId::Stunnel,
                18443 | 18444 => PathId::Haproxy,
                _ => continue,
            };
            tls.entry(path).or_insert(negotiated);
        }
        for (path, negotiated) in &tls {
            eprintln!(
                "  {} negotiated {} {} with {}",
                path.label(),
                negotiated.version,
                negotiated.cipher_suite,
                negotiated.group
            );
        }
        for process in &watched {
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", process.pid)).unwrap_or_default();
            eprintln!(
                "  {} is pid {} ({})",
                process.name,
                process.pid,
                comm.trim()
            );
        }
        Ok(Started {
            endpoints,
            watched,
            tls,
        })
    }

    /// Starts one end of a reference tunnel pair on `node`; returns its pid once it
    /// listens.
    fn start_reference(
        &mut self,
        proxy: Proxy,
        end: End,
        node: &str,
        tunnels: &[Tunnel],
        certs: &Certificates,
        out: &Path,
    ) -> anyhow::Result<u32> {
        let cluster = self.cluster.as_ref().expect("started");
        let stem = format!("{}-{node}", proxy.program());
        let log = out.join(format!("{stem}.log"));
        let config = out.join(format!("{stem}.conf"));
        let (text, argv) = match proxy {
            Proxy::Stunnel => (
                reference::stunnel_config(end, tunnels, certs, &log),
                vec!["stunnel4".to_owned(), config.display().to_string()],
            ),
            Proxy::Haproxy => (
                reference::haproxy_config(end, tunnels, certs),
                vec![
                    "haproxy".to_owned(),
                    "-db".to_owned(),
                    "-f".to_owned(),
                    config.display().to_string(),
                ],
            ),
        };
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let output = File::options()
            .create(true)
            .append(true)
            .open(out.join(format!("{stem}.out")))?;
        let child = cluster
            .node_command(node, &argv)?
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            // Its own process group: Ctrl-C is for the benchmark, which removes it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", argv.join(" ")))?;
        let pid = child.id();
        self.proxies.push(child);
        let listen = match end {
            End::Client => tunnels.iter().map(|t| t.entry).collect::<Vec<_>>(),
            End::Server => tunnels.iter().map(|t| t.relay).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in listen {
            loop {
                let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
                let up = cluster
                    .node_command(node, &["bash", "-c", &probe])?
                    .stderr(Stdio::null())
                    .status()?
                    .success();
                if up {
                    break;
                }
                if !weft_cluster::process_running(pid) || Instant::now() > deadline {
                    bail!(
                        "{} did not listen on {addr} on {node}; see {} and {}",
                        proxy.program(),
                        out.join(format!("{stem}.out")).display(),
                        log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(pid)
    }

    /// Stops the reference proxies and removes the cluster, unless asked to keep them.
    fn finish(&mut self) -> anyhow::Result<()> {
        let _removing = crate::cluster::REMOVING.lock();
        if self.keep {
            if self.cluster.take().is_some() {
                eprintln!(
                    "==> the cluster keeps running (with the reference proxies); remove it with `cargo xtask cluster down --name {}`",
                    self.name
                );
            }
            self.proxies.clear();
            return Ok(());
        }
        for child in &mut self.proxies {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.proxies.clear();
        if self.cluster.take().is_some() {
            eprintln!("==> removing cluster {}", self.name);
        }
        weft_cluster::down(&self.name)?;
        Ok(())
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if self.cluster.is_some() && !self.keep {
            let _ = self.finish();
        }
    }
}

/// The meshed namespace (STRICT) and the one the mesh leaves alone.
const MESHED: &str = "bench";
const PLAIN: &str = "plain";

const MESH: &str = "\
# cargo xtask bench: the client and servers of the weft paths live in a meshed
# namespace; those of the direct and reference paths in one the mesh leaves alone.
apiVersion: v1
kind: Namespace
metadata:
  name: bench
  labels:
    weft.dev/mesh: enabled
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: default
  namespace: bench
spec:
  mode: STRICT
---
apiVersion: v1
kind: Service
metadata: { name: remote, namespace: bench }
spec:
  clusterIP: 10.96.8.1
  selector: { bench-pod: remote }
  ports: [{ name: http, port: 8080 }, { name: iperf, port: 5201 }]
---
apiVersion: v1
kind: Service
metadata: { name: resilient, namespace: bench }
spec:
  clusterIP: 10.96.8.2
  selector: { bench-pod: remote }
  ports: [{ name: http, port: 8080 }, { name: iperf, port: 5201 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: resilient, namespace: bench }
spec:
  service: resilient
  timeouts: { request: 10s }
  retries: { attempts: 2, perTryTimeout: 5s }
  connectionLimits: { maxConnections: 100000, maxRequests: 100000, maxPendingRequests: 1000 }
  outlierDetection: { consecutiveFailures: 5 }
";

/// The weft-service paths' Services (in `MESH`).
const SERVICE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 8, 1);
const RESILIENT_SERVICE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 8, 2);
const ROUTED_SERVICE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 8, 3);

/// The weft-routed path's Service, its HTTPRoute and the L7 policy of its pod. The
/// route's first nine rules want a header the benchmark never sends and outrank the
/// tenth (a header match is more specific), so every request is checked against all
/// ten; the policy admits the client's identity for GET (HTTP/1.1, HTTP/2) and POST
/// (gRPC) on the HTTP port, and for the iperf3 port as TCP.
fn routed() -> String {
    let backend = format!("backendRefs: [{{ name: routed, port: {HTTP_PORT} }}]");
    let mut rules: Vec<String> = (0..9)
        .map(|tenant| {
            format!(
                "    - matches: [{{ path: {{ type: PathPrefix, value: / }}, headers: [{{ name: x-tenant, value: tenant-{tenant} }}] }}]\n      {backend}\n"
            )
        })
        .collect();
    rules.push(format!(
        "    - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]\n      {backend}\n"
    ));
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: routed, namespace: {MESHED} }}\n\
         spec:\n  clusterIP: {ROUTED_SERVICE}\n  selector: {{ bench-pod: routed }}\n  \
         ports: [{{ name: http, port: {HTTP_PORT} }}, {{ name: iperf, port: {IPERF_PORT} }}]\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{ name: routed, namespace: {MESHED} }}\nspec:\n  \
         parentRefs: [{{ group: \"\", kind: Service, name: routed, port: {HTTP_PORT} }}]\n  rules:\n{}\
         ---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{ name: routed, namespace: {MESHED} }}\nspec:\n  \
         selector: {{ matchLabels: {{ bench-pod: routed }} }}\n  rules:\n    \
         - from: [{{ principals: [cluster.local/ns/{MESHED}/sa/client] }}]\n      \
         to: [{{ ports: [{HTTP_PORT}], methods: [GET, POST] }}]\n    \
         - from: [{{ principals: [cluster.local/ns/{MESHED}/sa/client] }}]\n      \
         to: [{{ ports: [{IPERF_PORT}] }}]\n",
        rules.concat()
    )
}

/// `count` ALLOW policies of 10 rules selecting every pod of the meshed namespace, of
/// which only the last rule of the last policy admits the client: every decision
/// checks every rule.
fn worst_case_policies(count: usize) -> String {
    (0..count)
        .map(|policy| {
            let rules: Vec<String> = (0..10)
                .map(|rule| {
                    let source = if policy + 1 == count && rule == 9 {
                        format!("principals: [cluster.local/ns/{MESHED}/sa/client]")
                    } else {
                        format!("namespaces: [team-{policy}-{rule}]")
                    };
                    format!("{{ from: [{{ {source} }}], to: [{{ ports: [{HTTP_PORT}, {IPERF_PORT}] }}] }}")
                })
                .collect();
            format!(
                "---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {{ name: worst-case-{policy}, namespace: {MESHED} }}\n\
                 spec: {{ rules: [{}] }}\n",
                rules.join(", ")
            )
        })
        .collect()
}

/// What every run needs: the cluster, the release binaries, the settings, and the
/// processes whose CPU and memory it reads.
struct Runner<'a> {
    cluster: &'a Cluster,
    bin: &'a Path,
    settings: &'a Settings,
    watched: &'a [Watched],
}

/// Runs `test` once on `endpoint`, reading the watched processes' CPU time around the
/// measured window and their memory while it runs; the tool's output goes to `raw.*`.
fn run_one(
    runner: &Runner<'_>,
    test: TestId,
    endpoint: &Endpoint,
    round: usize,
    raw: &Path,
) -> anyhow::Result<Run> {
    let Runner {
        cluster,
        bin,
        settings,
        watched,
    } = *runner;
    let stdout_path = raw.with_extension("out");
    let log_path = raw.with_extension("log");
    // h2load takes whole units: 500ms, not 0.5s.
    let seconds = |value: f64| format!("{}ms", (value * 1000.0).round());
    let (argv, warmup): (Vec<String>, f64) = match test {
        TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8 => {
            let streams = match test {
                TestId::Iperf1 => 1,
                TestId::Iperf4 => 4,
                _ => 8,
            };
            (
                vec![
                    "iperf3".into(),
                    "--client".into(),
                    endpoint.iperf.ip().to_string(),
                    "--port".into(),
                    endpoint.iperf.port().to_string(),
                    "--time".into(),
                    settings.iperf_seconds.to_string(),
                    "--omit".into(),
                    settings.iperf_omit_seconds.to_string(),
                    "--parallel".into(),
                    streams.to_string(),
                    "--json".into(),
                ],
                // The omitted seconds and the control connection's setup.
                f64::from(settings.iperf_omit_seconds) + 0.1,
            )
        }
        test if test.keepalive() => {
            let mut argv: Vec<String> = vec![
                "h2load".into(),
                "--h1".into(),
                "--threads=1".into(),
                format!("--duration={}", seconds(settings_seconds(settings, test))),
                format!("--warm-up-time={}", seconds(settings.warmup_seconds)),
                format!("--log-file={}", log_path.display()),
            ];
            if test == TestId::KeepaliveRate {
                argv.push(format!("--clients={RATE_CONNECTIONS}"));
                argv.push(format!("--rps={}", RATE / RATE_CONNECTIONS));
            } else {
                argv.push(format!("--clients={}", test.clients()));
            }
            argv.push(format!("http://{}{REQUEST_PATH}", endpoint.http));
            (argv, settings.warmup_seconds)
        }
        TestId::Http2Rate | TestId::Http2Saturation => {
            // Without --h1 (nor TLS to negotiate with), h2load speaks HTTP/2 with prior
            // knowledge (h2c); --rps is per connection.
            let mut argv: Vec<String> = vec![
                "h2load".into(),
                "--threads=1".into(),
                format!("--clients={H2_CONNECTIONS}"),
                format!("--max-concurrent-streams={H2_STREAMS}"),
                format!("--duration={}", seconds(settings_seconds(settings, test))),
                format!("--warm-up-time={}", seconds(settings.warmup_seconds)),
                format!("--log-file={}", log_path.display()),
            ];
            if test == TestId::Http2Rate {
                argv.push(format!("--rps={}", RATE / H2_CONNECTIONS));
            }
            argv.push(format!("http://{}{REQUEST_PATH}", endpoint.http));
            (argv, settings.warmup_seconds)
        }
        TestId::GrpcRate | TestId::GrpcSaturation => {
            // weft-echo serves weft.echo.v1.Echo on its HTTP port. The connections open
            // before the calls start: there is no warm-up, the measured window is the
            // tool's whole run.
            let mut argv: Vec<String> = vec![
                bin.join("weft-client").display().to_string(),
                "grpc".into(),
                "load".into(),
                "--target".into(),
                format!("http://{}", endpoint.http),
                "--connections".into(),
                H2_CONNECTIONS.to_string(),
                "--duration".into(),
                settings_seconds(settings, test).to_string(),
            ];
            if test == TestId::GrpcRate {
                argv.extend(["--rate".into(), RATE.to_string()]);
            } else {
                argv.extend(["--concurrency".into(), GRPC_CALLERS.to_string()]);
            }
            (argv, 0.0)
        }
        _ => {
            let mut argv: Vec<String> = vec![
                bin.join("weft-load").display().to_string(),
                "--target".into(),
                endpoint.http.to_string(),
                "--path".into(),
                REQUEST_PATH.into(),
                "--duration".into(),
                settings_seconds(settings, test).to_string(),
                "--warmup".into(),
                settings.warmup_seconds.to_string(),
            ];
            if test == TestId::NewconnRate {
                argv.extend(["--rate".into(), RATE.to_string()]);
            } else {
                argv.extend(["--clients".into(), test.clients().to_string()]);
            }
            (argv, settings.warmup_seconds)
        }
    };

    // The client's agent counts the HTTP requests it serves: read before and after the
    // run, outside its measured window.
    let client_agent = (endpoint.path.proxies() == Some(Role::Agent)).then(|| {
        let node0 = &cluster.topology().nodes[0];
        (node0.name.clone(), node0.ip)
    });
    let served = || {
        client_agent
            .as_ref()
            .and_then(|(node, ip)| agent_requests(cluster, node, *ip))
    };
    let served_before = served();
    let stdout = File::create(&stdout_path)
        .with_context(|| format!("cannot create {}", stdout_path.display()))?;
    let stderr = File::create(raw.with_extension("err"))?;
    let mut child = cluster
        .pod_command(endpoint.client_namespace, "client", &argv)?
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", argv.join(" ")))?;
    let spawned = Instant::now();
    let mut before: Option<(Instant, Vec<u64>)> = None;
    let mut peak: BTreeMap<String, u64> = BTreeMap::new();
    let mut scraper = Scraper::new(
        cluster,
        settings.scrape && endpoint.path.proxies() == Some(Role::Agent),
    );
    let status = loop {
        scraper.tick()?;
        if before.is_none() && spawned.elapsed().as_secs_f64() >= warmup {
            before = Some((Instant::now(), cpu_snapshot(watched)));
        }
        for process in watched {
            if let Some(rss) = read_status(process.pid, "VmRSS") {
                let entry = peak.entry(process.name.clone()).or_default();
                *entry = (*entry).max(rss);
            }
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if spawned.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            bail!("{} did not finish within 2 minutes", argv[0]);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = (Instant::now(), cpu_snapshot(watched));
    scraper.finish()?;
    let agent_requests = served_before
        .zip(served())
        .map(|(before, after)| after.saturating_sub(before));
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    if !status.success() && !matches!(test, TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8) {
        let stderr = std::fs::read_to_string(raw.with_extension("err")).unwrap_or_default();
        bail!(
            "{} failed ({status}): {}{}",
            argv[0],
            stdout.trim(),
            stderr.trim()
        );
    }
    let Some(before) = before else {
        bail!(
            "{} ended after {:.1} s, before its measurement started: {}",
            argv[0],
            spawned.elapsed().as_secs_f64(),
            stdout.trim()
        );
    };
    let ticks = clock_ticks();
    let cpu_seconds = watched
        .iter()
        .zip(before.1.iter().zip(&after.1))
        .map(|(process, (b, a))| (process.name.clone(), a.saturating_sub(*b) as f64 / ticks))
        .collect();

    let result = match test {
        TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8 => Outcome::Iperf(parse::iperf(&stdout)?),
        test if test.keepalive() || matches!(test, TestId::Http2Rate | TestId::Http2Saturation) => {
            let summary = parse::h2load_summary(&stdout)?;
            let expected = if test.keepalive() { "http/1.1" } else { "h2c" };
            // h2load names the protocol of its first connection on stdout.
            if let Some(spoken) = summary.protocol.as_deref().filter(|p| *p != expected) {
                bail!("h2load spoke {spoken} instead of {expected}");
            }
            let log = std::fs::read_to_string(&log_path)
                .with_context(|| format!("h2load wrote no log at {}", log_path.display()))?;
            let requests = parse::h2load_log(&log)?;
            let latencies_us: Vec<u32> = requests
                .iter()
                .filter(|request| (200..300).contains(&request.status))
                .map(|request| request.latency_us)
                .collect();
            let errors = summary.failed + summary.errored + summary.timeout + summary.not_2xx;
            let seconds = settings_seconds(settings, test);
            Outcome::Requests {
                requests: latencies_us.len() as u64,
                errors,
                first_error: (errors > 0).then(|| format!("h2load: {summary:?}")),
                seconds,
                rate: latencies_us.len() as f64 / seconds,
                latencies_us,
            }
        }
        TestId::GrpcRate | TestId::GrpcSaturation => {
            let report = parse::weft_client_load(&stdout)?;
            Outcome::Percentiles {
                requests: report.requests,
                errors: report.errors,
                first_error: report.first_error,
                seconds: settings_seconds(settings, test),
                rate: report.rps,
                p50_us: report.p50_us,
                p99_us: report.p99_us,
            }
        }
        _ => {
            let report = parse::weft_load(&stdout)?;
            Outcome::Requests {
                requests: report.requests,
                errors: report.errors,
                first_error: report.first_error,
                seconds: report.seconds,
                rate: report.requests as f64 / report.seconds.max(report.span_seconds),
                latencies_us: report.latencies_us,
            }
        }
    };
    Ok(Run {
        test,
        path: endpoint.path,
        round,
        cpu_seconds,
        peak_rss_bytes: peak,
        window_seconds: (after.0 - before.0).as_secs_f64(),
        agent_requests,
        result,
    })
}

fn settings_seconds(settings: &Settings, test: TestId) -> f64 {
    if test.fixed_rate() {
        settings.rate_seconds
    } else {
        settings.saturation_seconds
    }
}

/// One line on what a run measured, for the progress output.
fn describe(run: &Run, path: PathId) -> String {
    let cpu: f64 = run
        .cpu_seconds
        .iter()
        .filter(|(name, _)| report::counts_for(name, path))
        .map(|(_, seconds)| seconds)
        .sum();
    let cpu = if path.proxies().is_some() {
        format!(", proxies {cpu:.2} s CPU")
    } else {
        String::new()
    };
    let layer = match run.agent_requests {
        Some(0) => ", weft L4".to_owned(),
        Some(requests) => format!(", weft L7 ({requests} requests)"),
        None => String::new(),
    };
    match &run.result {
        Outcome::Iperf(iperf) => format!("{:6.2} Gbit/s{cpu}{layer}", iperf.bits_per_second / 1e9),
        Outcome::Requests {
            rate,
            errors,
            latencies_us,
            ..
        } => {
            let mut sorted = latencies_us.clone();
            sorted.sort_unstable();
            let p = |q| parse::percentile(&sorted, q).unwrap_or(0);
            let errors = if *errors > 0 {
                format!(", {errors} errors")
            } else {
                String::new()
            };
            format!(
                "{rate:7.0} req/s, p50 {} µs, p99 {} µs{errors}{cpu}{layer}",
                p(50.0),
                p(99.0)
            )
        }
        Outcome::Percentiles {
            rate,
            errors,
            p50_us,
            p99_us,
            ..
        } => {
            let errors = if *errors > 0 {
                format!(", {errors} errors")
            } else {
                String::new()
            };
            format!(
                "{rate:7.0} req/s, p50 {} µs, p99 {} µs{errors}{cpu}{layer}",
                p50_us.unwrap_or(0),
                p99_us.unwrap_or(0)
            )
        }
    }
}

/// HTTP requests the agent on `node` (at `ip`) served as the client's side so far,
/// from its metrics (`:15020/metrics`); `None` when they cannot be read.
fn agent_requests(cluster: &Cluster, node: &str, ip: std::net::Ipv4Addr) -> Option<u64> {
    agent_metrics(cluster, node, ip).map(|metrics| parse::source_requests(&metrics))
}

/// The Prometheus text of `node`'s agent (at `ip`), fetched with curl in the node's
/// network namespace; `None` when it does not answer.
pub(crate) fn agent_metrics(
    cluster: &Cluster,
    node: &str,
    ip: std::net::Ipv4Addr,
) -> Option<String> {
    let url = format!("http://{ip}:15020/metrics");
    let output = cluster
        .node_command(node, &["curl", "-sf", "--max-time", "3", &url])
        .ok()?
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Scrapes every agent's metrics once a second, as Prometheus would, with `curl` in
/// each node's network namespace; the scrapes run beside the load, never waited for
/// until the run ends.
struct Scraper<'a> {
    cluster: &'a Cluster,
    /// The node and URL of each agent to scrape; none when not scraping.
    targets: Vec<(String, String)>,
    last: Option<Instant>,
    running: Vec<Child>,
}

impl<'a> Scraper<'a> {
    const INTERVAL: Duration = Duration::from_secs(1);

    fn new(cluster: &'a Cluster, scrape: bool) -> Self {
        let targets = if scrape {
            cluster
                .topology()
                .nodes
                .iter()
                .filter(|node| node.agent.is_some())
                .map(|node| {
                    (
                        node.name.clone(),
                        format!("http://{}:15020/metrics", node.ip),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        Scraper {
            cluster,
            targets,
            last: None,
            running: Vec::new(),
        }
    }

    /// Starts the next scrapes when a second has passed, and reaps those done.
    fn tick(&mut self) -> anyhow::Result<()> {
        if !self.targets.is_empty() && self.last.is_none_or(|at| at.elapsed() >= Self::INTERVAL) {
            self.last = Some(Instant::now());
            for (node, url) in &self.targets {
                let scrape = self
                    .cluster
                    .node_command(
                        node,
                        &["curl", "-sf", "--max-time", "3", "-o", "/dev/null", url],
                    )?
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("cannot scrape {url}"))?;
                self.running.push(scrape);
            }
        }
        self.reap(false)
    }

    /// Waits for the scrapes still running.
    fn finish(mut self) -> anyhow::Result<()> {
        self.reap(true)
    }

    fn reap(&mut self, wait: bool) -> anyhow::Result<()> {
        let mut failed = None;
        self.running.retain_mut(|scrape| {
            let status = if wait {
                scrape.wait().ok()
            } else {
                scrape.try_wait().ok().flatten()
            };
            match status {
                Some(status) if !status.success() => failed = Some(status),
                Some(_) => {}
                None => return true,
            }
            false
        });
        match failed {
            Some(status) => bail!("scraping an agent's metrics failed: curl {status}"),
            None => Ok(()),
        }
    }
}

/// User plus system clock ticks of every watched process, in order (0 when gone).
fn cpu_snapshot(watched: &[Watched]) -> Vec<u64> {
    watched
        .iter()
        .map(|process| {
            std::fs::read_to_string(format!("/proc/{}/stat", process.pid))
                .ok()
                .and_then(|stat| parse::cpu_ticks(&stat).ok())
                .unwrap_or(0)
        })
        .collect()
}

/// A `/proc/<pid>/status` memory figure, bytes.
pub(crate) fn read_status(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse::status_bytes(&status, key)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
fn clock_ticks() -> f64 {
    cmd::capture(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Builds the binaries the benchmark runs, optimised.
fn build_release() -> anyhow::Result<()> {
    cmd::build_release(&["weft-controller", "weft-cni", "weft-workloads"])
}

/// What deciding a request costs, from the optimised micro-benchmarks of `weft-api`:
/// authorization with 100 policies of 10 rules selecting the destination
/// (`api/benches/authz.rs`, kept as `authz.txt`) and routing with up to 100 rules
/// (`api/benches/routes.rs`, kept as `routes.txt`); and the cipher's single-core
/// ceiling (`agent/benches/cipher.rs`, kept as `cipher.txt`); all shown.
fn decision_costs(out: &Path) -> anyhow::Result<()> {
    for (package, bench, what) in [
        (
            "weft-api",
            "authz",
            "authorization cost (100 policies x 10 rules, nanoseconds per decision)",
        ),
        (
            "weft-api",
            "routes",
            "routing cost (rule selection and split, nanoseconds per request)",
        ),
        (
            "weft-agent",
            "cipher",
            "the cipher's ceiling (one core, Gbit/s of 16 KiB TLS records)",
        ),
    ] {
        eprintln!("==> {what}");
        let mut command = cmd::cargo();
        command.args(["bench", "--quiet", "--package", package, "--bench", bench]);
        let figures = cmd::capture(&mut command)?;
        eprintln!("{}", figures.trim_end());
        let file = out.join(format!("{bench}.txt"));
        std::fs::write(&file, &figures)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

/// Draws `png` from `json` with the matplotlib program `script` (written beside `json`
/// as `chart.py`) and Debian's python3-matplotlib.
pub(crate) fn draw_chart(script: &str, json: &Path, png: &Path) -> anyhow::Result<()> {
    let file = json.with_file_name("chart.py");
    std::fs::write(&file, script).with_context(|| format!("cannot write {}", file.display()))?;
    // Debian's interpreter, which has python3-matplotlib, whatever python3 PATH finds.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    cmd::capture(Command::new(python).arg(&file).arg(json).arg(png)).map(drop)
}

/// `date <format>`, local time.
pub(crate) fn timestamp(format: &str) -> anyhow::Result<String> {
    Ok(cmd::capture(Command::new("date").arg(format))?
        .trim()
        .to_owned())
}

/// `m:ss`.
pub(crate) fn minutes(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    format!("{}:{:02}", seconds / 60, seconds % 60)
}

/// The serde name of a unit variant (`iperf1`, `keepalive-rate`, …).
fn serde_plain<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Other processes that would make the figures noisy: compilers, builds, test suites.
fn busy_processes() -> Vec<String> {
    let me = std::process::id();
    let mut busy = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return busy;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if is_busy(&cmdline) {
            let shown: String = cmdline.trim().chars().take(100).collect();
            busy.push(format!("{pid}: {shown}"));
        }
    }
    busy
}

/// Whether a command line is one of the noisy neighbours [`busy_processes`] looks for.
fn is_busy(cmdline: &str) -> bool {
    let program = cmdline.split_whitespace().next().unwrap_or("");
    let name = program.rsplit('/').next().unwrap_or("");
    name == "rustc"
        || cmdline.contains("cargo test")
        || cmdline.contains("cargo build")
        || cmdline.contains("cargo clippy")
        || name.starts_with("weft-e2e")
        || cmdline.contains("/deps/")
}

/// The share of all CPUs busy (not idle, not waiting for IO) over `period`, from
/// `/proc/stat`.
fn cpu_busy(period: Duration) -> f64 {
    let read = || {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| parse::cpu_times(&stat))
    };
    let Some(before) = read() else { return 0.0 };
    std::thread::sleep(period);
    let Some(after) = read() else { return 0.0 };
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total > 0.0 { busy / total } else { 0.0 }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The CPU, cores, memory and kernel of this machine, the weft commit, tool versions.
fn machine() -> anyhow::Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib =
        parse::status_bytes(&meminfo, "MemTotal").unwrap_or(0) as f64 / (1u64 << 30) as f64;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?;
    let git = |args: &[&str]| {
        cmd::capture(Command::new("git").args(args).current_dir(workspace))
            .map(|out| out.trim().to_owned())
            .unwrap_or_default()
    };
    let dirty = if git(&["status", "--porcelain"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    let weft_commit = format!("{}{dirty}", git(&["rev-parse", "--short=12", "HEAD"]));
    let version = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .ok()
            .map(|out| {
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                // The first line naming the tool (stunnel4 starts with a note about
                // inetd mode), else the first line.
                let name = argv[0].trim_end_matches('4').to_lowercase();
                let lines = || text.lines().map(str::trim).filter(|line| !line.is_empty());
                lines()
                    .find(|line| line.to_lowercase().contains(&name))
                    .or_else(|| lines().next())
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let tools = [
        ("iperf3", version(&["iperf3", "--version"])),
        ("h2load", version(&["h2load", "--version"])),
        ("stunnel4", version(&["stunnel4", "-version"])),
        ("haproxy", version(&["haproxy", "-v"])),
        ("openssl", version(&["openssl", "version"])),
    ]
    .into_iter()
    .map(|(tool, version)| (tool.to_owned(), version))
    .collect();
    Ok(Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib,
        kernel,
        weft_commit,
        tools,
        busy_at_start: Vec::new(),
        busy_at_end: Vec::new(),
        cpu_busy_before: 0.0,
        cpu_busy_after: 0.0,
        load_average_at_start: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routed_path_checks_every_rule_and_an_l7_policy() {
        let documents: Vec<serde_yaml::Value> = routed()
            .split("\n---\n")
            .map(|document| serde_yaml::from_str(document.trim_start_matches("---\n")).unwrap())
            .collect();
        let kinds: Vec<&str> = documents
            .iter()
            .map(|document| document["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["Service", "HTTPRoute", "AuthorizationPolicy"]);
        let rules = documents[1]["spec"]["rules"].as_sequence().unwrap();
        assert_eq!(rules.len(), 10);
        let headers =
            |rule: &serde_yaml::Value| rule["matches"][0]["headers"].as_sequence().is_some();
        assert!(
            rules[..9].iter().all(headers),
            "nine rules outrank the last"
        );
        assert!(
            !headers(&rules[9]),
            "only the last matches the benchmark's requests"
        );
        let policy = &documents[2]["spec"];
        assert_eq!(policy["selector"]["matchLabels"]["bench-pod"], "routed");
        assert_eq!(policy["rules"][0]["to"][0]["methods"][1], "POST");
        assert_eq!(
            policy["rules"][1]["to"][0]["ports"][0],
            u64::from(IPERF_PORT)
        );
    }

    #[test]
    fn spots_noisy_neighbours() {
        assert!(is_busy(
            "/root/.rustup/toolchains/stable/bin/rustc --crate-name x"
        ));
        assert!(is_busy("/root/.cargo/bin/cargo test --workspace"));
        assert!(is_busy(
            "/work/target/debug/deps/weft_e2e-1234 --test-threads 2"
        ));
        assert!(!is_busy(
            "/usr/bin/cargo run --quiet --package xtask -- bench"
        ));
        assert!(!is_busy("bash"));
    }

    #[test]
    fn tests_are_named_on_the_command_line() {
        use clap::ValueEnum as _;
        for (name, test) in [
            ("keepalive-rate", TestId::KeepaliveRate),
            ("http1-rate", TestId::KeepaliveRate),
            ("http1-saturation", TestId::KeepaliveSaturation),
            ("keepalive-saturation-64", TestId::KeepaliveSaturation64),
            ("newconn-saturation-16", TestId::NewconnSaturation16),
            ("http2-rate", TestId::Http2Rate),
            ("http2-saturation", TestId::Http2Saturation),
            ("grpc-rate", TestId::GrpcRate),
            ("grpc-saturation", TestId::GrpcSaturation),
        ] {
            assert_eq!(TestId::from_str(name, false), Ok(test), "{name}");
        }
        // Only iperf3 is carried at L4; every HTTP and gRPC test goes through weft's L7.
        for test in TestId::ALL {
            let l4 = matches!(test, TestId::Iperf1 | TestId::Iperf4 | TestId::Iperf8);
            assert_eq!(test.layer() == Layer::L4, l4, "{test:?}");
        }
    }

    #[test]
    fn quick_runs_are_short() {
        let quick = Settings::new(true, None, 0);
        let per_round: f64 =
            TestId::ALL.iter().map(|&t| quick.estimate(t)).sum::<f64>() * PathId::ALL.len() as f64;
        assert!(per_round < 240.0, "a quick run measures for {per_round} s");
        let full = Settings::new(false, None, 0);
        let total: f64 = TestId::ALL.iter().map(|&t| full.estimate(t)).sum::<f64>()
            * PathId::ALL.len() as f64
            * full.rounds as f64;
        assert!(total < 20.0 * 60.0, "a full run measures for {total} s");
    }

    #[test]
    fn names_runs_by_their_serde_names() {
        assert_eq!(serde_plain(&TestId::KeepaliveRate), "keepalive-rate");
        assert_eq!(serde_plain(&TestId::Http2Saturation), "http2-saturation");
        assert_eq!(serde_plain(&TestId::GrpcRate), "grpc-rate");
        assert_eq!(serde_plain(&PathId::WeftSameNode), "weft-same-node");
        assert_eq!(minutes(125.4), "2:05");
    }
}
