//! `cargo xtask soak`: a long run that looks for what only time and churn bring out —
//! memory or file descriptors that grow with traffic, requests that fail while the
//! mesh changes around them.
//!
//! On a 2-node local cluster with release binaries, three client pods on node0 load a
//! Service whose pods run on both nodes, through an HTTPRoute and an L7 authorization
//! policy: one opens a new meshed connection per request (weft-load), one sends
//! HTTP/1.1 keep-alive requests and one HTTP/2 requests (h2load), in chunks, until the
//! connections and requests asked for are reached. Meanwhile the churn adds a pod and
//! removes the oldest churned one and rewrites the servers' policy every few seconds,
//! and certificates live minutes, so the agents renew them throughout. Every two
//! seconds each agent's RSS and open file descriptors are read from `/proc`.
//!
//! Before the load, a short chunk of each load warms the agents up (pools, caches) and
//! they settle; after it they settle again. Goals ([`Goals`]): RSS growth after
//! warm-up ≤ 5 %, no more open file descriptors after the load than before it, no
//! failed request. Results go to `<target>/soak/<timestamp>/`: `samples.csv`,
//! `results.json` and `chart.png`; the task fails when a goal is missed.

use std::{
    collections::VecDeque,
    fs::{self, File},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use weft_cluster::{Cluster, PodSpec};

use crate::{
    bench::{self, parse},
    cluster::{REMOVING, start_fresh},
    cmd, setup,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// New meshed connections to open, one request on each (weft-load).
    #[arg(long, default_value_t = 1_000_000)]
    connections: u64,
    /// Requests in all: those of the new connections, and HTTP/1.1 keep-alive and
    /// HTTP/2 requests (h2load) for the rest.
    #[arg(long, default_value_t = 10_000_000)]
    requests: u64,
    /// Seconds between churn steps; each adds a pod, removes the oldest churned pod
    /// beyond four, and rewrites the servers' authorization policy.
    #[arg(long, default_value_t = 10)]
    churn_every: u64,
    /// How long the certificates the mesh CA issues are valid (agents renew them at
    /// half-life).
    #[arg(long, default_value = "2m")]
    cert_ttl: String,
    /// Run the binaries in this directory instead of building release ones.
    #[arg(long)]
    binaries: Option<PathBuf>,
    /// Where to write the results (default `<target>/soak/<timestamp>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Name of the soak's cluster.
    #[arg(long, default_value = "soak")]
    name: String,
    /// Leave the cluster running afterwards.
    #[arg(long)]
    keep: bool,
}

const NAMESPACE: &str = "soak";
const SERVICE: &str = "10.96.9.1:8080";
const REQUEST_PATH: &str = "/?bytes=1024";
/// Clients of each load at once.
const NEW_CONNECTION_CLIENTS: u64 = 16;
const KEEPALIVE_CLIENTS: u64 = 16;
const HTTP2_CONNECTIONS: u64 = 8;
const HTTP2_STREAMS: u64 = 10;
/// Seconds of new-connection load per chunk, and requests per keep-alive and HTTP/2
/// chunk: each about 20 s on this machine, so a load's counts add up as it goes.
const NEW_CONNECTION_CHUNK_SECONDS: u64 = 20;
const KEEPALIVE_CHUNK: u64 = 100_000;
const HTTP2_CHUNK: u64 = 300_000;
/// A chunk running longer than this is stuck: the soak fails.
const CHUNK_LIMIT: Duration = Duration::from_secs(300);
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Churned pods alive at once.
const CHURNED: usize = 4;
/// Service accounts the churned pods take in turn: each is an identity to certify.
const CHURN_IDENTITIES: u64 = 8;
/// The agents have settled once their open file descriptors have not changed for this
/// long (idle pooled connections close after 30 s), or at the deadline.
const SETTLED_AFTER: Duration = Duration::from_secs(40);
const SETTLE_DEADLINE: Duration = Duration::from_secs(150);

const MESH: &str = "\
# cargo xtask soak: servers on both nodes behind one Service, reached through an
# HTTPRoute; the churned pods and the authorization policy are in policy.yaml and the
# cluster's own objects.
apiVersion: v1
kind: Namespace
metadata: { name: soak, labels: { weft.dev/mesh: enabled } }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: soak }
spec: { mode: STRICT }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: soak }
spec:
  clusterIP: 10.96.9.1
  selector: { soak: server }
  ports: [{ name: http, port: 8080 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: echo, namespace: soak }
spec:
  parentRefs: [{ group: \"\", kind: Service, name: echo, port: 8080 }]
  rules:
    - matches: [{ headers: [{ name: x-soak, value: canary }] }]
      backendRefs: [{ name: echo, port: 8080 }]
    - matches: [{ path: { type: PathPrefix, value: / } }]
      backendRefs: [{ name: echo, port: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: soak }
spec:
  service: echo
  timeouts: { request: 10s }
";

/// The servers' policy at churn step `step`: the clients may GET anything; the
/// identity of the step's churned pod a path of its own. Each step changes it, so the
/// controller recompiles it and streams it to both agents.
fn policy(step: u64) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{ name: servers, namespace: {NAMESPACE} }}\nspec:\n  \
         selector: {{ matchLabels: {{ soak: server }} }}\n  rules:\n    \
         - from: [{{ principals: [cluster.local/ns/{NAMESPACE}/sa/client] }}]\n      \
         to: [{{ ports: [8080], methods: [GET] }}]\n    \
         - from: [{{ principals: [cluster.local/ns/{NAMESPACE}/sa/{}] }}]\n      \
         to: [{{ ports: [8080], paths: [/churn/{step}] }}]\n",
        churn_identity(step)
    )
}

fn churn_identity(step: u64) -> String {
    format!("churn-{}", step % CHURN_IDENTITIES)
}

/// One of the three loads, each from its own client pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Load {
    NewConnections,
    KeepAlive,
    Http2,
}

impl Load {
    const ALL: [Load; 3] = [Load::NewConnections, Load::KeepAlive, Load::Http2];

    fn pod(self) -> &'static str {
        match self {
            Load::NewConnections => "new-connections",
            Load::KeepAlive => "keep-alive",
            Load::Http2 => "http2",
        }
    }

    /// The command of one chunk, or of a tenth of one for the warm-up.
    fn argv(self, bin: &Path, warm_up: bool) -> Vec<String> {
        let tenth = |value: u64| if warm_up { value / 10 } else { value };
        let url = format!("http://{SERVICE}{REQUEST_PATH}");
        let strings = |args: &[&str]| args.iter().map(|arg| (*arg).to_owned()).collect();
        match self {
            Load::NewConnections => strings(&[
                &bin.join("weft-load").display().to_string(),
                "--target",
                SERVICE,
                "--path",
                REQUEST_PATH,
                "--clients",
                &NEW_CONNECTION_CLIENTS.to_string(),
                "--duration",
                &tenth(NEW_CONNECTION_CHUNK_SECONDS).to_string(),
                "--warmup",
                "0",
            ]),
            Load::KeepAlive => strings(&[
                "h2load",
                "--h1",
                "--threads=1",
                &format!("--clients={KEEPALIVE_CLIENTS}"),
                &format!("--requests={}", tenth(KEEPALIVE_CHUNK)),
                "--connection-inactivity-timeout=10s",
                &url,
            ]),
            Load::Http2 => strings(&[
                "h2load",
                "--threads=1",
                &format!("--clients={HTTP2_CONNECTIONS}"),
                &format!("--max-concurrent-streams={HTTP2_STREAMS}"),
                &format!("--requests={}", tenth(HTTP2_CHUNK)),
                "--connection-inactivity-timeout=10s",
                &url,
            ]),
        }
    }

    /// What a chunk did, from its tool's output.
    fn outcome(self, stdout: &str) -> anyhow::Result<Chunk> {
        Ok(match self {
            Load::NewConnections => {
                let report = parse::weft_load(stdout)?;
                Chunk {
                    connections: report.requests + report.errors,
                    requests: report.requests + report.errors,
                    failed: report.errors,
                    first_error: report.first_error,
                }
            }
            Load::KeepAlive | Load::Http2 => {
                // h2load's `failed` counts the errored and timed-out requests too;
                // `succeeded` counts every response, whatever its status.
                let summary = parse::h2load_summary(stdout)?;
                let failed = summary.failed + summary.not_2xx;
                Chunk {
                    connections: match self {
                        Load::KeepAlive => KEEPALIVE_CLIENTS,
                        _ => HTTP2_CONNECTIONS,
                    },
                    requests: summary.succeeded + summary.failed,
                    failed,
                    first_error: (failed > 0).then(|| format!("h2load: {summary:?}")),
                }
            }
        })
    }

    /// Whether the load has done its share: the new connections until there are
    /// enough of them, the others until there are enough requests.
    fn done(self, tally: &Tally, args: &Args) -> bool {
        match self {
            Load::NewConnections => {
                tally.new_connections.load(Ordering::Relaxed) >= args.connections
            }
            _ => tally.requests.load(Ordering::Relaxed) >= args.requests,
        }
    }
}

/// What one chunk of a load did.
#[derive(Debug, PartialEq)]
struct Chunk {
    connections: u64,
    requests: u64,
    failed: u64,
    first_error: Option<String>,
}

/// The counts of every load so far, shared by the load threads and the sampler.
#[derive(Default)]
struct Tally {
    new_connections: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    failed: AtomicU64,
    /// The first error of each chunk that had one, a few of them.
    errors: Mutex<Vec<String>>,
    /// Set when a thread fails: the others stop too.
    aborted: AtomicBool,
}

impl Tally {
    fn add(&self, load: Load, chunk: Chunk) {
        if load == Load::NewConnections {
            self.new_connections
                .fetch_add(chunk.connections, Ordering::Relaxed);
        }
        self.connections
            .fetch_add(chunk.connections, Ordering::Relaxed);
        self.requests.fetch_add(chunk.requests, Ordering::Relaxed);
        self.failed.fetch_add(chunk.failed, Ordering::Relaxed);
        if let Some(error) = chunk.first_error {
            let mut errors = self.errors.lock().expect("no thread panics holding it");
            if errors.len() < 10 {
                errors.push(format!("{}: {error}", load.pod()));
            }
        }
    }
}

/// One reading of one agent.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    seconds: f64,
    node: String,
    rss_bytes: u64,
    /// Read from the agent's metrics every fifth sample.
    heap_bytes: Option<u64>,
    fds: u64,
    new_connections: u64,
    requests: u64,
    failed: u64,
}

/// A churn step, when it happened.
#[derive(Clone, Debug, Serialize)]
struct Event {
    seconds: f64,
    what: String,
}

/// The soak's figures against its goals.
#[derive(Debug, Serialize, PartialEq)]
struct Goals {
    /// Per agent: its median RSS just after warm-up and over the last tenth of the
    /// load, and the growth between them (goal ≤ 5 %).
    rss: Vec<Growth>,
    /// The same of the memory its allocator has handed out (`weft_process_heap_in_use_bytes`,
    /// read every 10 s): RSS that grows while this does not is memory the allocator
    /// keeps, not a leak. Shown, not a goal.
    heap: Vec<Growth>,
    /// Per agent, at rest: after the warm-up and after the load, each time once the
    /// agent settled (goal: no more file descriptors after than before).
    rest: Vec<Rest>,
    failed_requests: u64,
}

/// An agent at rest before and after the load.
#[derive(Debug, Serialize, PartialEq)]
struct Rest {
    node: String,
    fds_before: u64,
    fds_after: u64,
    rss_before_bytes: u64,
    rss_after_bytes: u64,
    /// Series in the agent's metrics: series that pile up with churn are memory too.
    series_before: u64,
    series_after: u64,
}

#[derive(Debug, Serialize, PartialEq)]
struct Growth {
    node: String,
    after_warmup_bytes: u64,
    at_end_bytes: u64,
    percent: f64,
}

impl Goals {
    const MAX_RSS_GROWTH_PERCENT: f64 = 5.0;

    /// What is not met, one line each.
    fn missed(&self) -> Vec<String> {
        let mut missed = Vec::new();
        for growth in &self.rss {
            if growth.percent > Self::MAX_RSS_GROWTH_PERCENT {
                missed.push(format!(
                    "the agent on {} grew {:.1} % after warm-up (goal ≤ {} %)",
                    growth.node,
                    growth.percent,
                    Self::MAX_RSS_GROWTH_PERCENT
                ));
            }
        }
        for rest in &self.rest {
            if rest.fds_after > rest.fds_before {
                missed.push(format!(
                    "the agent on {} holds {} file descriptors after the load, {} before it",
                    rest.node, rest.fds_after, rest.fds_before
                ));
            }
        }
        if self.failed_requests > 0 {
            missed.push(format!("{} requests failed", self.failed_requests));
        }
        missed
    }
}

/// Growth per agent of a figure of its samples (`bytes`; samples without it are left
/// out) between those just after warm-up (the first tenth of the load, at least a
/// minute, is warm-up; the next tenth is the baseline) and the last tenth of the load.
fn growth(
    samples: &[Sample],
    load_seconds: f64,
    bytes: impl Fn(&Sample) -> Option<u64>,
) -> Vec<Growth> {
    let tenth = load_seconds / 10.0;
    let warm = tenth.max(60.0).min(load_seconds / 2.0);
    let mut nodes: Vec<&str> = samples.iter().map(|s| s.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
        .into_iter()
        .filter_map(|node| {
            let median_in = |from: f64, to: f64| {
                let values: Vec<f64> = samples
                    .iter()
                    .filter(|s| s.node == node && (from..=to).contains(&s.seconds))
                    .filter_map(|s| Some(bytes(s)? as f64))
                    .collect();
                parse::median(&values)
            };
            let baseline = median_in(warm, warm + tenth)?;
            let end = median_in(load_seconds - tenth, load_seconds)?;
            Some(Growth {
                node: node.to_owned(),
                after_warmup_bytes: baseline as u64,
                at_end_bytes: end as u64,
                percent: (end / baseline - 1.0) * 100.0,
            })
        })
        .collect()
}

/// Everything a finished soak writes.
#[derive(Serialize)]
struct Results {
    command: String,
    started: String,
    connections: u64,
    new_connections: u64,
    requests: u64,
    failed: u64,
    errors: Vec<String>,
    load_seconds: f64,
    certificates_issued: u64,
    config_updates: u64,
    goals: Goals,
    missed: Vec<String>,
    events: Vec<Event>,
    samples: Vec<Sample>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::ensure()?;
    if !weft_cluster::is_root() {
        bail!(
            "the soak loads kernel programs and creates network namespaces, so it needs root: run `sudo -E cargo xtask soak`"
        );
    }
    let bin = match &args.binaries {
        Some(dir) => fs::canonicalize(dir)
            .with_context(|| format!("--binaries {}: no such directory", dir.display()))?,
        None => {
            eprintln!("==> building release binaries (agent, controller, CNI plugin, workloads)");
            cmd::build_release(&["weft-controller", "weft-cni", "weft-workloads"])?;
            cmd::target_dir()?.join("release")
        }
    };
    let out = match &args.out {
        Some(out) => out.clone(),
        None => cmd::target_dir()?
            .join("soak")
            .join(bench::timestamp("+%Y%m%d-%H%M%S")?),
    };
    fs::create_dir_all(out.join("raw"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    eprintln!("==> results go to {}", out.display());
    start_fresh(&args.name)?;
    let mut soak = Soak {
        cluster: None,
        name: args.name.clone(),
        keep: args.keep,
    };
    let started = bench::timestamp("-Iseconds")?;
    let results = soak.run(&args, &bin, &out);
    soak.finish()?;
    let results = Results {
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        started,
        ..results?
    };
    write(&results, &out)?;
    if !results.missed.is_empty() {
        bail!("goals not met:\n  {}", results.missed.join("\n  "));
    }
    eprintln!("==> every goal met");
    Ok(())
}

/// The soak's cluster, removed when the soak ends however it ends (Ctrl-C has its own
/// handler).
struct Soak {
    cluster: Option<Cluster>,
    name: String,
    keep: bool,
}

impl Soak {
    fn run(&mut self, args: &Args, bin: &Path, out: &Path) -> anyhow::Result<Results> {
        let agents = self.start(args, bin, out)?;
        let cluster = self.cluster.as_ref().expect("started");
        let metrics = |name: &str| -> u64 {
            agents
                .iter()
                .filter_map(|(node, ip, _)| bench::agent_metrics(cluster, node, *ip))
                .map(|text| parse::sum_series(&text, name, |_| true))
                .sum()
        };
        let certificates_before = metrics("weft_certificate_requests_total");
        let updates_before = metrics("weft_config_updates_total");
        let tally = Tally::default();
        eprintln!("==> warm-up: a short chunk of each load, then the agents settle");
        for load in Load::ALL {
            let raw = out.join("raw").join(format!("{}-warm-up", load.pod()));
            let stdout = run_chunk(cluster, load, &load.argv(bin, true), &raw)?;
            tally.add(load, load.outcome(&stdout)?);
        }
        let series = || -> Vec<u64> {
            agents
                .iter()
                .map(|(node, ip, _)| {
                    bench::agent_metrics(cluster, node, *ip).map_or(0, |text| {
                        text.lines()
                            .filter(|line| !line.is_empty() && !line.starts_with('#'))
                            .count() as u64
                    })
                })
                .collect()
        };
        let before = settle(&agents);
        let series_before = series();

        eprintln!(
            "==> load: {} new connections and {} requests in all, from node0 to a Service on both nodes; churn every {} s, certificates valid {}",
            args.connections, args.requests, args.churn_every, args.cert_ttl
        );
        let clock = Instant::now();
        let (stop_churn, churn_stopped) = mpsc::channel::<()>();
        let (stop_sampling, sampling_stopped) = mpsc::channel::<()>();
        let name = self.name.as_str();
        let (load_result, churn_result, sample_result) = std::thread::scope(|scope| {
            let churn =
                scope.spawn(|| churn(name, bin, args.churn_every, out, clock, churn_stopped));
            let sampler =
                scope.spawn(|| sample(name, &agents, &tally, clock, args, sampling_stopped));
            let loads: Vec<_> = Load::ALL
                .into_iter()
                .map(|load| {
                    let tally = &tally;
                    scope.spawn(move || drive(name, load, bin, out, args, tally))
                })
                .collect();
            let load_result = loads
                .into_iter()
                .map(|load| load.join().expect("a load thread panicked"))
                .collect::<anyhow::Result<Vec<()>>>();
            drop(stop_churn);
            drop(stop_sampling);
            (
                load_result,
                churn.join().expect("the churn thread panicked"),
                sampler.join().expect("the sampler panicked"),
            )
        });
        let load_seconds = clock.elapsed().as_secs_f64();
        let events = churn_result?;
        let samples = sample_result?;
        if let Err(err) = load_result {
            // What was sampled until the load stopped still tells how memory went.
            write_samples(&samples, out)?;
            return Err(err.context(format!(
                "the load stopped after {}; the samples until then are in {}",
                bench::minutes(load_seconds),
                out.join("samples.csv").display()
            )));
        }

        eprintln!(
            "==> load over after {}; the agents settle",
            bench::minutes(load_seconds)
        );
        let after = settle(&agents);
        let series_after = series();
        let goals = Goals {
            rss: growth(&samples, load_seconds, |s| Some(s.rss_bytes)),
            heap: growth(&samples, load_seconds, |s| s.heap_bytes),
            rest: agents
                .iter()
                .zip(before.iter().zip(&after))
                .zip(series_before.iter().zip(&series_after))
                .map(|(((node, _, _), (before, after)), series)| Rest {
                    node: node.clone(),
                    fds_before: before.0,
                    fds_after: after.0,
                    rss_before_bytes: before.1,
                    rss_after_bytes: after.1,
                    series_before: *series.0,
                    series_after: *series.1,
                })
                .collect(),
            failed_requests: tally.failed.load(Ordering::Relaxed),
        };
        let missed = goals.missed();
        Ok(Results {
            command: String::new(),
            started: String::new(),
            connections: tally.connections.load(Ordering::Relaxed),
            new_connections: tally.new_connections.load(Ordering::Relaxed),
            requests: tally.requests.load(Ordering::Relaxed),
            failed: tally.failed.load(Ordering::Relaxed),
            errors: tally
                .errors
                .into_inner()
                .expect("no thread panicked holding it"),
            load_seconds,
            certificates_issued: metrics("weft_certificate_requests_total")
                .saturating_sub(certificates_before),
            config_updates: metrics("weft_config_updates_total").saturating_sub(updates_before),
            goals,
            missed,
            events,
            samples,
        })
    }

    /// Brings the cluster up with its mesh, agents, servers and client pods, and
    /// returns each agent's node, address and pid.
    fn start(
        &mut self,
        args: &Args,
        bin: &Path,
        out: &Path,
    ) -> anyhow::Result<Vec<(String, std::net::Ipv4Addr, u32)>> {
        eprintln!(
            "==> starting cluster {}: 2 nodes, the controller, an agent on each node",
            self.name
        );
        let cluster = self.cluster.insert(Cluster::up(&self.name, 2)?);
        let mesh = out.join("mesh.yaml");
        fs::write(&mesh, MESH).with_context(|| format!("cannot write {}", mesh.display()))?;
        let policy_file = out.join("policy.yaml");
        fs::write(&policy_file, policy(0))
            .with_context(|| format!("cannot write {}", policy_file.display()))?;
        cluster.set_mesh(vec![mesh, policy_file], Vec::new())?;
        cluster.set_controller_args(vec![format!("--cert-ttl={}", args.cert_ttl)])?;
        cluster.start_controller(&bin.join("weft-controller"))?;
        cluster.set_cni(Some(bin.to_owned()))?;
        let mut agents = Vec::new();
        for node in cluster.topology().nodes.clone() {
            let agent =
                cluster.start_agent_with_log(&node.name, &bin.join("weft-agent"), "info")?;
            agents.push((node.name, node.ip, agent.pid));
        }
        let echo = bin.join("weft-echo").display().to_string();
        let command = [echo.as_str(), "--listen", "0.0.0.0:8080"];
        let mut servers = Vec::new();
        for (name, node) in [
            ("server-0", "node1"),
            ("server-1", "node1"),
            ("server-2", "node0"),
        ] {
            servers.push(cluster.add_pod(pod_spec(name, node, "server", "server", &command))?);
        }
        for load in Load::ALL {
            cluster.add_pod(pod_spec(load.pod(), "node0", "client", "client", &[]))?;
        }
        cluster.wait_for_mesh(Duration::from_secs(60))?;
        let client = Load::KeepAlive.pod();
        for server in &servers {
            let address = std::net::SocketAddrV4::new(server.ip, 8080);
            cluster.wait_for_tcp(
                NAMESPACE,
                client,
                address,
                Duration::from_secs(30),
                &server.log,
            )?;
        }
        let url = format!("http://{SERVICE}{REQUEST_PATH}");
        let output = cluster
            .pod_command(
                NAMESPACE,
                client,
                &["curl", "-sf", "--max-time", "5", "-o", "/dev/null", &url],
            )?
            .output()
            .context("cannot run curl")?;
        if !output.status.success() {
            bail!(
                "GET {url} through the mesh failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(agents)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let _removing = REMOVING.lock();
        if self.cluster.take().is_none() {
            return Ok(());
        }
        if self.keep {
            eprintln!(
                "==> the cluster keeps running; remove it with `cargo xtask cluster down --name {}`",
                self.name
            );
            return Ok(());
        }
        eprintln!("==> removing cluster {}", self.name);
        weft_cluster::down(&self.name)?;
        Ok(())
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A pod of the soak's namespace; `role` (label `soak`) is `server`, `client` or
/// `churn`.
fn pod_spec(
    name: &str,
    node: &str,
    role: &str,
    service_account: &str,
    command: &[&str],
) -> PodSpec {
    let mut spec = PodSpec::new(name, node, command);
    spec.namespace = NAMESPACE.to_owned();
    spec.service_account = service_account.to_owned();
    spec.env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
    spec.labels.insert("soak".to_owned(), role.to_owned());
    spec
}

/// Runs `load` chunk after chunk until it has done its share or another thread failed.
fn drive(
    name: &str,
    load: Load,
    bin: &Path,
    out: &Path,
    args: &Args,
    tally: &Tally,
) -> anyhow::Result<()> {
    let result = (|| {
        let cluster = Cluster::open(name)?;
        let argv = load.argv(bin, false);
        let raw = out.join("raw").join(load.pod());
        while !load.done(tally, args) && !tally.aborted.load(Ordering::Relaxed) {
            let stdout = run_chunk(&cluster, load, &argv, &raw)?;
            let chunk = load
                .outcome(&stdout)
                .with_context(|| format!("{}: {}", load.pod(), raw.display()))?;
            tally.add(load, chunk);
        }
        Ok(())
    })();
    if result.is_err() {
        tally.aborted.store(true, Ordering::Relaxed);
    }
    result
}

/// Runs one chunk of `load` in its pod; its output goes to `raw`.out and .err (the
/// last chunk's are kept), and stdout is returned.
fn run_chunk(cluster: &Cluster, load: Load, argv: &[String], raw: &Path) -> anyhow::Result<String> {
    let stdout_path = raw.with_extension("out");
    let stderr_path = raw.with_extension("err");
    let mut child = cluster
        .pod_command(NAMESPACE, load.pod(), argv)?
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&stderr_path)?)
        .spawn()
        .with_context(|| format!("cannot start {}", argv.join(" ")))?;
    let deadline = Instant::now() + CHUNK_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not finish within {} s",
                argv[0],
                CHUNK_LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    if !status.success() {
        let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
        bail!(
            "{} failed ({status}): {}{}",
            argv[0],
            stdout.trim(),
            stderr.trim()
        );
    }
    Ok(stdout)
}

/// Every `every` seconds until told to stop: adds a pod (on each node in turn), removes
/// the oldest churned pod beyond [`CHURNED`], and rewrites the servers' policy.
fn churn(
    name: &str,
    bin: &Path,
    every: u64,
    out: &Path,
    clock: Instant,
    stop: mpsc::Receiver<()>,
) -> anyhow::Result<Vec<Event>> {
    let mut cluster = Cluster::open(name)?;
    let echo = bin.join("weft-echo").display().to_string();
    let mut churned = VecDeque::new();
    let mut events = Vec::new();
    let mut step = 0;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(Duration::from_secs(every)) {
        step += 1;
        let pod = format!("churn-{step}");
        let node = format!("node{}", step % 2);
        let command = [echo.as_str(), "--listen", "0.0.0.0:8080"];
        cluster.add_pod(pod_spec(
            &pod,
            &node,
            "churn",
            &churn_identity(step),
            &command,
        ))?;
        churned.push_back(pod.clone());
        let mut what = format!("added {pod} on {node}");
        if churned.len() > CHURNED {
            let oldest = churned.pop_front().expect("more than CHURNED");
            cluster.del_pod(NAMESPACE, &oldest)?;
            what.push_str(&format!(", removed {oldest}"));
        }
        let policy_file = out.join("policy.yaml");
        fs::write(&policy_file, policy(step))
            .with_context(|| format!("cannot write {}", policy_file.display()))?;
        what.push_str(", policy rewritten");
        events.push(Event {
            seconds: clock.elapsed().as_secs_f64(),
            what,
        });
    }
    Ok(events)
}

/// Reads every agent's RSS and open file descriptors every [`SAMPLE_EVERY`] (and the
/// memory its allocator handed out, from its metrics, every fifth time) and prints the
/// progress, until told to stop; fails when an agent is gone.
fn sample(
    name: &str,
    agents: &[(String, std::net::Ipv4Addr, u32)],
    tally: &Tally,
    clock: Instant,
    args: &Args,
    stop: mpsc::Receiver<()>,
) -> anyhow::Result<Vec<Sample>> {
    let cluster = Cluster::open(name)?;
    let mut samples = Vec::new();
    let mut printed = Instant::now();
    let mut round = 0u64;
    loop {
        round += 1;
        let seconds = clock.elapsed().as_secs_f64();
        for (node, ip, pid) in agents {
            let Some(rss_bytes) = bench::read_status(*pid, "VmRSS") else {
                tally.aborted.store(true, Ordering::Relaxed);
                bail!(
                    "the agent on {node} (pid {pid}) is gone after {}",
                    bench::minutes(seconds)
                );
            };
            samples.push(Sample {
                seconds,
                node: node.clone(),
                rss_bytes,
                heap_bytes: (round % 5 == 1)
                    .then(|| bench::agent_metrics(&cluster, node, *ip))
                    .flatten()
                    .map(|text| {
                        parse::sum_series(&text, "weft_process_heap_in_use_bytes", |_| true)
                    })
                    .filter(|bytes| *bytes > 0),
                fds: open_fds(*pid),
                new_connections: tally.new_connections.load(Ordering::Relaxed),
                requests: tally.requests.load(Ordering::Relaxed),
                failed: tally.failed.load(Ordering::Relaxed),
            });
        }
        if printed.elapsed() >= Duration::from_secs(30) {
            printed = Instant::now();
            let last = &samples[samples.len() - agents.len()..];
            eprintln!(
                "  [{}] {} / {} new connections, {} / {} requests, {} failed; {}",
                bench::minutes(seconds),
                last[0].new_connections,
                args.connections,
                last[0].requests,
                args.requests,
                last[0].failed,
                last.iter()
                    .map(|s| format!(
                        "{}: {:.1} MiB, {} fds",
                        s.node,
                        s.rss_bytes as f64 / 1048576.0,
                        s.fds
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if let Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) = stop.recv_timeout(SAMPLE_EVERY)
        {
            return Ok(samples);
        }
    }
}

/// Waits until no agent's count of open file descriptors has changed for
/// [`SETTLED_AFTER`] (at most [`SETTLE_DEADLINE`]), and returns each agent's count and
/// RSS.
fn settle(agents: &[(String, std::net::Ipv4Addr, u32)]) -> Vec<(u64, u64)> {
    let count = || -> Vec<u64> { agents.iter().map(|(_, _, pid)| open_fds(*pid)).collect() };
    let deadline = Instant::now() + SETTLE_DEADLINE;
    let (mut last, mut since) = (count(), Instant::now());
    while since.elapsed() < SETTLED_AFTER && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        let now = count();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    agents
        .iter()
        .zip(last)
        .map(|((_, _, pid), fds)| (fds, bench::read_status(*pid, "VmRSS").unwrap_or(0)))
        .collect()
}

fn open_fds(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64)
}

/// Writes `samples` into `out` as `samples.csv` (the heap column is empty where it was
/// not read).
fn write_samples(samples: &[Sample], out: &Path) -> anyhow::Result<()> {
    let mut csv =
        String::from("seconds,node,rss_bytes,heap_bytes,fds,new_connections,requests,failed\n");
    for s in samples {
        let heap = s
            .heap_bytes
            .map(|bytes| bytes.to_string())
            .unwrap_or_default();
        csv.push_str(&format!(
            "{:.1},{},{},{heap},{},{},{},{}\n",
            s.seconds, s.node, s.rss_bytes, s.fds, s.new_connections, s.requests, s.failed
        ));
    }
    let path = out.join("samples.csv");
    fs::write(&path, csv).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `results.json`, `samples.csv` and `chart.png` into `out` and prints the
/// summary.
fn write(results: &Results, out: &Path) -> anyhow::Result<()> {
    let json = out.join("results.json");
    fs::write(&json, serde_json::to_string_pretty(results)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    write_samples(&results.samples, out)?;
    let chart = out.join("chart.png");
    match bench::draw_chart(include_str!("soak/chart.py"), &json, &chart) {
        Ok(()) => eprintln!("==> chart: {}", chart.display()),
        Err(err) => eprintln!("warning: no chart: {err:#}"),
    }
    eprintln!(
        "==> {} new connections, {} connections in all, {} requests, {} failed, in {}; {} certificates issued, {} configuration updates applied",
        results.new_connections,
        results.connections,
        results.requests,
        results.failed,
        bench::minutes(results.load_seconds),
        results.certificates_issued,
        results.config_updates
    );
    for (what, growths) in [
        ("RSS", &results.goals.rss),
        ("heap in use", &results.goals.heap),
    ] {
        for growth in growths {
            eprintln!(
                "    agent on {}: {what} {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1} %)",
                growth.node,
                growth.after_warmup_bytes as f64 / 1048576.0,
                growth.at_end_bytes as f64 / 1048576.0,
                growth.percent
            );
        }
    }
    for rest in &results.goals.rest {
        eprintln!(
            "    agent on {} at rest: {} file descriptors, {:.1} MiB and {} metric series before the load; {}, {:.1} MiB and {} after",
            rest.node,
            rest.fds_before,
            rest.rss_before_bytes as f64 / 1048576.0,
            rest.series_before,
            rest.fds_after,
            rest.rss_after_bytes as f64 / 1048576.0,
            rest.series_after
        );
    }
    for error in &results.errors {
        eprintln!("    error: {error}");
    }
    eprintln!("==> results: {}", json.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seconds: f64, node: &str, mib: u64) -> Sample {
        Sample {
            seconds,
            node: node.to_owned(),
            rss_bytes: mib << 20,
            heap_bytes: (!(100.0..=900.0).contains(&seconds)).then_some(mib << 19),
            fds: 0,
            new_connections: 0,
            requests: 0,
            failed: 0,
        }
    }

    #[test]
    fn growth_is_measured_after_warm_up_against_the_last_tenth() {
        // 1,000 s: warm-up to 100 s, baseline 100–200 s, end 900–1,000 s. Node0 grows
        // while warming up only; node1 keeps growing.
        let samples: Vec<Sample> = (0..=500)
            .flat_map(|i| {
                let t = f64::from(i) * 2.0;
                let warming = if t < 100.0 { (t / 10.0) as u64 } else { 10 };
                [
                    sample(t, "node0", 20 + warming),
                    sample(t, "node1", 20 + (t / 50.0) as u64),
                ]
            })
            .collect();
        let rss = growth(&samples, 1000.0, |s| Some(s.rss_bytes));
        assert_eq!(rss.len(), 2);
        assert_eq!((rss[0].node.as_str(), rss[0].percent), ("node0", 0.0));
        assert_eq!(rss[1].after_warmup_bytes, 23 << 20);
        assert_eq!(rss[1].at_end_bytes, 39 << 20);
        // Figures sampled now and then count where they are: heap sampled only during
        // the warm-up and the last tenth has no baseline.
        assert!(growth(&samples, 1000.0, |s| s.heap_bytes).is_empty());
        let goals = Goals {
            rss,
            heap: Vec::new(),
            rest: [("node0", 40), ("node1", 41)]
                .map(|(node, fds_after)| Rest {
                    node: node.into(),
                    fds_before: 40,
                    fds_after,
                    rss_before_bytes: 20 << 20,
                    rss_after_bytes: 30 << 20,
                    series_before: 100,
                    series_after: 100,
                })
                .into(),
            failed_requests: 0,
        };
        let missed = goals.missed();
        assert_eq!(missed.len(), 2, "{missed:?}");
        assert!(missed[0].contains("node1 grew 69.6 %"), "{missed:?}");
        assert!(
            missed[1].contains("41 file descriptors after the load, 40 before"),
            "{missed:?}"
        );
    }

    #[test]
    fn a_short_soak_warms_up_for_half_its_load() {
        let samples: Vec<Sample> = (0..=30)
            .map(|i| sample(f64::from(i) * 2.0, "node0", 30))
            .collect();
        let rss = growth(&samples, 60.0, |s| Some(s.rss_bytes));
        assert_eq!(rss[0].after_warmup_bytes, 30 << 20);
        assert_eq!(rss[0].percent, 0.0);
        assert!(growth(&[], 60.0, |s| Some(s.rss_bytes)).is_empty());
    }

    #[test]
    fn chunks_are_read_from_the_tools() {
        let load = r#"{"requests":990,"errors":10,"first_error":"connect: refused","seconds":20.0,"latencies_us":[]}"#;
        assert_eq!(
            Load::NewConnections.outcome(load).unwrap(),
            Chunk {
                connections: 1000,
                requests: 1000,
                failed: 10,
                first_error: Some("connect: refused".into())
            }
        );
        let h2load = "finished in 10.00s, 10000.00 req/s, 1.00MB/s\n\
                      requests: 100000 total, 100000 started, 100000 done, 99990 succeeded, 10 failed, 10 errored, 0 timeout\n\
                      status codes: 99990 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let chunk = Load::Http2.outcome(h2load).unwrap();
        assert_eq!(
            (chunk.connections, chunk.requests, chunk.failed),
            (HTTP2_CONNECTIONS, 100_000, 10)
        );
        assert!(
            Load::KeepAlive
                .outcome("h2load: connection refused")
                .is_err()
        );
    }

    #[test]
    fn the_policy_changes_every_step_and_stays_valid() {
        let (one, two) = (policy(1), policy(2));
        assert_ne!(one, two);
        for text in [one, two] {
            let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            assert_eq!(value["kind"], "AuthorizationPolicy");
            assert_eq!(value["spec"]["rules"].as_sequence().unwrap().len(), 2);
        }
    }
}
