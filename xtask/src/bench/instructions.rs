//! Instructions the agents execute per MiB, per request and per connection, counted by
//! callgrind. Wall-clock figures on this shared VM move by half between runs; an
//! instruction count moves by a few percent, so a regression on the data path shows
//! even when the rates cannot tell it from noise.
//!
//! After the timed runs both agents restart under `valgrind --tool=callgrind`. Each
//! workload runs a fixed amount of work on each weft path, with the agents' counters
//! zeroed before it and dumped after it (`callgrind_control`); every dump stays in
//! `callgrind/` for `callgrind_annotate`. The figure is both agents' instructions
//! divided by the work done: fixed costs such as the first connection are spread over
//! thousands of units. valgrind hides AVX-512 from the program, so aws-lc runs its AVX2
//! code here; the counts compare builds, not machines.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use weft_cluster::Cluster;

use super::{Endpoint, GRPC_CALLERS, H2_CONNECTIONS, H2_STREAMS, PathId, REQUEST_PATH, parse};

/// A fixed amount of one kind of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// iperf3, one stream of a fixed number of bytes: per MiB.
    Bulk,
    /// h2load, HTTP/1.1 keep-alive, 2 connections: per request.
    Keepalive,
    /// weft-load, a new connection per request, 2 clients: per connection.
    Newconn,
    /// h2load, HTTP/2 with prior knowledge, 10 connections × 10 streams: per request.
    Http2,
    /// weft-client, unary gRPC calls over 10 connections, 50 callers: per call.
    Grpc,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Bulk,
        Workload::Keepalive,
        Workload::Newconn,
        Workload::Http2,
        Workload::Grpc,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Workload::Bulk => "per MiB, iperf3 1 stream",
            Workload::Keepalive => "per request, HTTP/1.1 keep-alive, 2 clients",
            Workload::Newconn => "per request on a new connection, 2 clients",
            Workload::Http2 => "per request, HTTP/2, 10 connections × 10 streams",
            Workload::Grpc => "per call, gRPC unary, 10 connections, 50 callers",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Keepalive => "keepalive",
            Workload::Newconn => "newconn",
            Workload::Http2 => "http2",
            Workload::Grpc => "grpc",
        }
    }

    /// The client's command line: a fixed count where the tool takes one, a fixed
    /// time where it does not (the count is then read from what it printed).
    fn argv(self, endpoint: &Endpoint, bin: &Path, quick: bool) -> Vec<String> {
        let scale = |full: u32, smoke: u32| if quick { smoke } else { full };
        let url = format!("http://{}{REQUEST_PATH}", endpoint.http);
        let strings = |items: &[&str]| items.iter().map(|&s| s.to_owned()).collect::<Vec<_>>();
        match self {
            Workload::Bulk => {
                let mut argv = iperf(endpoint, &format!("{}M", bulk_mib(quick)));
                argv.push("--json".into());
                argv
            }
            Workload::Keepalive => strings(&[
                "h2load",
                "--h1",
                "--threads=1",
                "--clients=2",
                &format!("--requests={}", scale(10_000, 1_000)),
                &url,
            ]),
            Workload::Http2 => strings(&[
                "h2load",
                "--threads=1",
                &format!("--clients={H2_CONNECTIONS}"),
                &format!("--max-concurrent-streams={H2_STREAMS}"),
                &format!("--requests={}", scale(10_000, 1_000)),
                &url,
            ]),
            Workload::Newconn => strings(&[
                &bin.join("weft-load").display().to_string(),
                "--target",
                &endpoint.http.to_string(),
                "--path",
                REQUEST_PATH,
                "--clients",
                "2",
                "--warmup",
                "0",
                "--duration",
                &scale(10, 2).to_string(),
            ]),
            Workload::Grpc => strings(&[
                &bin.join("weft-client").display().to_string(),
                "grpc",
                "load",
                "--target",
                &format!("http://{}", endpoint.http),
                "--connections",
                &H2_CONNECTIONS.to_string(),
                "--concurrency",
                &GRPC_CALLERS.to_string(),
                "--duration",
                &scale(10, 2).to_string(),
            ]),
        }
    }

    /// The work the tool reports done (MiB, requests, calls); an error if any of it
    /// failed, since failures cost other instructions than successes.
    fn units(self, stdout: &str, quick: bool) -> anyhow::Result<f64> {
        let (done, failed) = match self {
            Workload::Bulk => {
                parse::iperf(stdout)?;
                return Ok(f64::from(bulk_mib(quick)));
            }
            Workload::Keepalive | Workload::Http2 => {
                let summary = parse::h2load_summary(stdout)?;
                // h2load's `failed` includes the errored and timed-out requests.
                (summary.succeeded, summary.failed.max(summary.not_2xx))
            }
            Workload::Newconn => {
                let load = parse::weft_load(stdout)?;
                (load.requests, load.errors)
            }
            Workload::Grpc => {
                let load = parse::weft_client_load(stdout)?;
                (load.requests, load.errors)
            }
        };
        if failed > 0 || done == 0 {
            bail!("{done} succeeded and {failed} failed: every unit must succeed to be counted");
        }
        Ok(done as f64)
    }
}

/// iperf3 sending `bytes` (such as `1M`) to `endpoint`'s iperf3 server.
fn iperf(endpoint: &Endpoint, bytes: &str) -> Vec<String> {
    [
        "iperf3",
        "--client",
        &endpoint.iperf.ip().to_string(),
        "--port",
        &endpoint.iperf.port().to_string(),
        "--bytes",
        bytes,
    ]
    .map(str::to_owned)
    .into()
}

fn bulk_mib(quick: bool) -> u32 {
    if quick { 64 } else { 256 }
}

/// One workload on one path: both agents' instructions and the work they did.
#[derive(Clone, Debug, Serialize)]
pub struct Count {
    pub path: PathId,
    pub workload: Workload,
    pub units: f64,
    pub instructions: u64,
}

impl Count {
    pub fn per_unit(&self) -> f64 {
        self.instructions as f64 / self.units
    }
}

/// Restarts every node's agent under callgrind and counts each workload on each of
/// `endpoints` (the weft paths). The agents keep running under callgrind afterwards:
/// the cluster is removed next (or kept with `--keep`, profiled).
pub fn count(
    cluster: &mut Cluster,
    bin: &Path,
    endpoints: &[&Endpoint],
    out: &Path,
    quick: bool,
) -> anyhow::Result<Vec<Count>> {
    let dir = out.join("callgrind");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let wrapper = write_wrapper(&dir, &bin.join("weft-agent"))?;
    eprintln!(
        "==> instructions: restarting both agents under callgrind ({} workloads on {} path(s), about {})",
        Workload::ALL.len(),
        endpoints.len(),
        super::minutes(endpoints.len() as f64 * if quick { 40.0 } else { 110.0 })
    );
    let mut agents = Vec::new();
    for node in cluster.topology().node_names() {
        cluster.stop_agent(&node)?;
        let agent = cluster.start_agent_with_log(&node, &wrapper, "info")?;
        agents.push((node, agent.pid));
    }
    cluster.wait_for_mesh(Duration::from_secs(60))?;
    // valgrind translates code the first time it runs, so an agent's first tunnel
    // takes seconds: open one for each path (and each kind of traffic) before the
    // counting starts.
    for endpoint in endpoints {
        let url = format!("http://{}{REQUEST_PATH}", endpoint.http);
        let curl = ["curl", "-sf", "--max-time", "20", "-o", "/dev/null", &url].map(str::to_owned);
        for argv in [curl.to_vec(), iperf(endpoint, "1M")] {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let output = cluster
                    .pod_command(endpoint.client_namespace, "client", &argv)?
                    .output()
                    .with_context(|| format!("cannot run {}", argv[0]))?;
                if output.status.success() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} on {} still fails after 2 minutes under callgrind: {}",
                        argv[0],
                        endpoint.path.label(),
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    let mut counts = Vec::new();
    for endpoint in endpoints {
        for workload in Workload::ALL {
            eprint!(
                "  {:<48} · {:<15} ",
                workload.label(),
                endpoint.path.label()
            );
            let name = format!("{}-{}", endpoint.path.key(), workload.key());
            for (_, pid) in &agents {
                callgrind_control(&["--zero", &pid.to_string()])?;
            }
            let argv = workload.argv(endpoint, bin, quick);
            let output = cluster
                .pod_command(endpoint.client_namespace, "client", &argv)?
                .output()
                .with_context(|| format!("cannot run {}", argv[0]))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            std::fs::write(dir.join(format!("{name}.out")), stdout.as_bytes())?;
            let units = workload
                .units(&stdout, quick)
                .with_context(|| format!("{} on {}", argv[0], endpoint.path.label()))?;
            let mut instructions = 0;
            for (node, pid) in &agents {
                let dump = dump(&dir, *pid, &format!("{name}-{node}"))?;
                instructions += totals(&std::fs::read_to_string(&dump)?)
                    .with_context(|| format!("no totals in {}", dump.display()))?;
            }
            let count = Count {
                path: endpoint.path,
                workload,
                units,
                instructions,
            };
            eprintln!("{:.0} instructions", count.per_unit());
            counts.push(count);
        }
    }
    Ok(counts)
}

/// A script that runs the agent under callgrind, its dumps in `dir`.
fn write_wrapper(dir: &Path, agent: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let wrapper = dir.join("weft-agent");
    let script = format!(
        "#!/bin/sh\nexec valgrind --tool=callgrind --dump-instr=no --callgrind-out-file={}/agent.%p {} \"$@\"\n",
        dir.display(),
        agent.display()
    );
    std::fs::write(&wrapper, script)
        .with_context(|| format!("cannot write {}", wrapper.display()))?;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

fn callgrind_control(args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new("callgrind_control")
        .args(args)
        .output()
        .context("cannot run callgrind_control (Debian package valgrind)")?;
    if !output.status.success() {
        bail!(
            "callgrind_control {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Has the agent `pid` dump its counters since the last zeroing (which zeroes them),
/// and renames the dump `<name>.callgrind`.
fn dump(dir: &Path, pid: u32, name: &str) -> anyhow::Result<PathBuf> {
    let prefix = format!("agent.{pid}.");
    let dumps = || -> anyhow::Result<Vec<PathBuf>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if file.starts_with(&prefix) {
                found.push(path);
            }
        }
        Ok(found)
    };
    let before = dumps()?;
    callgrind_control(&[&format!("--dump={name}"), &pid.to_string()])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // A dump is complete once its totals line is written, the last one.
        let written = dumps()?.into_iter().find(|path| {
            !before.contains(path)
                && std::fs::read_to_string(path).is_ok_and(|text| totals(&text).is_some())
        });
        if let Some(path) = written {
            let named = dir.join(format!("{name}.callgrind"));
            std::fs::rename(&path, &named)?;
            return Ok(named);
        }
        if Instant::now() > deadline {
            bail!(
                "agent {pid} wrote no callgrind dump into {} within 30 s",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The instructions a callgrind dump counted: its `totals:` line (or `summary:`, which
/// older versions write instead).
fn totals(dump: &str) -> Option<u64> {
    dump.lines()
        .filter_map(|line| {
            line.strip_prefix("totals:")
                .or_else(|| line.strip_prefix("summary:"))
        })
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_the_last_line_of_a_dump() {
        let dump = "# callgrind format\nversion: 1\nevents: Ir\nfn=(1) main\n3 12\ntotals: 4711\n";
        assert_eq!(totals(dump), Some(4711));
        assert_eq!(totals("events: Ir\nsummary: 99\n"), Some(99));
        assert_eq!(
            totals("events: Ir\nfn=(1) main\n3 12\n"),
            None,
            "not written yet"
        );
    }

    #[test]
    fn failed_work_is_not_counted() {
        let h2load = "finished in 1.00s, 100.00 req/s, 1KB/s\n\
                      requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout\n\
                      status codes: 98 2xx, 0 3xx, 0 4xx, 2 5xx\n";
        let error = Workload::Keepalive.units(h2load, false).unwrap_err();
        assert!(error.to_string().contains("2 failed"), "{error}");
        let good = h2load
            .replace("98 succeeded, 2 failed", "100 succeeded, 0 failed")
            .replace(
                "98 2xx, 0 3xx, 0 4xx, 2 5xx",
                "100 2xx, 0 3xx, 0 4xx, 0 5xx",
            );
        assert_eq!(Workload::Keepalive.units(&good, false).unwrap(), 100.0);
    }
}
