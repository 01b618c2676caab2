//! `cargo xtask demo`: weft carrying real traffic on a two-node local cluster.
//!
//! An echo service with three replicas across both nodes, a client pod on the first
//! node, a weft agent on each node. The client sends plain HTTP to the service's
//! virtual IP, fifty requests on each keep-alive connection; the kernel hands each
//! connection to its node's agent, which balances every request on its own (so one
//! connection reaches every replica) and carries those for the other node in an mTLS
//! HBONE tunnel. An AuthorizationPolicy lets only the client read: a POST from it and a
//! request from a `stranger` pod are denied, and the controller explains why. An
//! HTTPRoute sends the requests that carry `x-canary: yes` to one replica. The
//! summary shows who answered, the request metrics both agents report, which
//! identities they authenticated, the latency and the kernel's counters; `weftctl
//! check` ends it.

use std::{collections::BTreeMap, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use weft_cluster::{Cluster, PodSpec};

use crate::{
    cluster::{set_mesh, start_agent, workspace_binaries},
    cmd, setup,
};

/// The service's virtual IP and port, as Kubernetes would allocate them.
const SERVICE: &str = "10.96.0.10:80";
const REQUESTS: usize = 300;
/// The replica labelled track=canary, where route `echo-routes` sends `x-canary: yes`.
const CANARY: &str = "echo-2";
const CANARY_REQUESTS: usize = 20;
const BATCH: usize = 50;

/// The demo's mesh, as Kubernetes YAML: the default namespace is meshed (STRICT); the
/// echo service selects the pods labelled app=echo.
const MESH: &str = "deploy/examples/echo.yaml";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Leave the cluster running afterwards (remove it with `cargo xtask cluster down`).
    #[arg(long)]
    keep: bool,
    /// Name of the demo's cluster.
    #[arg(long, default_value = "demo")]
    name: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::ensure()?;
    if !weft_cluster::is_root() {
        bail!(
            "the demo loads kernel programs and creates network namespaces, so it needs root: run `sudo -E cargo xtask demo`"
        );
    }
    eprintln!("==> building weft and the sample workloads");
    cmd::build_binaries(&["weft-workloads"])?;

    crate::cluster::start_fresh(&args.name)?;

    let result = show(&args.name);
    if let Err(err) = &result {
        eprintln!(
            "\nThe mesh did not work: {err:#}\nAgent logs: /run/weft/{}/logs/",
            args.name
        );
    }
    if args.keep && result.is_ok() {
        eprintln!(
            "\nThe cluster keeps running. Try:\n  cargo xtask cluster status --name {0}\n  cargo xtask cluster exec --name {0} --pod client -- curl -s http://{SERVICE}/\n  target/debug/weftctl --local {0} check\n  target/debug/weftctl --local {0} status\nand remove it with:\n  cargo xtask cluster down --name {0}",
            args.name
        );
    } else {
        eprintln!("==> removing cluster {}", args.name);
        weft_cluster::down(&args.name)?;
    }
    result
}

fn show(name: &str) -> anyhow::Result<()> {
    eprintln!(
        "==> starting cluster {name}: 2 nodes, the controller reading {MESH}, a weft agent on each node"
    );
    let mut cluster = Cluster::up(name, 2)?;
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?;
    set_mesh(&mut cluster, vec![workspace.join(MESH)], Vec::new())?;
    for node in cluster.topology().node_names() {
        start_agent(&mut cluster, &node)?;
    }
    let echo = workspace_binaries()?.join("weft-echo");
    let echo = echo
        .to_str()
        .context("the workspace path is not valid UTF-8")?;
    for (pod, node) in [
        ("echo-0", "node0"),
        ("echo-1", "node1"),
        ("echo-2", "node1"),
    ] {
        let mut spec = PodSpec::new(pod, node, &[echo]);
        spec.labels.insert("app".into(), "echo".into());
        if pod == CANARY {
            spec.labels.insert("track".into(), "canary".into());
        }
        spec.service_account = "echo".into();
        cluster.add_pod(spec)?;
    }
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    let client = cluster.add_pod(client)?;
    let mut stranger = PodSpec::new("stranger", "node0", &[]);
    stranger.service_account = "stranger".into();
    cluster.add_pod(stranger)?;
    cluster.wait_for_mesh(Duration::from_secs(15))?;
    print_nodes_and_pods(&cluster);

    eprintln!(
        "\n==> {REQUESTS} requests from pod client ({}) to service echo at {SERVICE}, {BATCH} on each keep-alive connection",
        client.ip
    );
    let url = format!("http://{SERVICE}/");
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(REQUESTS);
    let mut failures = 0;
    for batch in 0..REQUESTS / BATCH {
        let mut argv = vec!["curl", "-s", "--max-time", "5", "-w", "\t%{time_total}\n"];
        argv.extend(std::iter::repeat_n(url.as_str(), BATCH));
        let out = cluster
            .pod_command("default", "client", &argv)?
            .stderr(Stdio::null())
            .output()
            .context("cannot run curl in pod client")?;
        // Each request prints its body (the echo's JSON line, nothing when it failed),
        // then a line with a tab and its time.
        let text = String::from_utf8_lossy(&out.stdout);
        let mut body = None;
        let mut finished = 0;
        for line in text.lines() {
            let Some(seconds) = line.strip_prefix('\t') else {
                body = Some(line);
                continue;
            };
            finished += 1;
            match body.take().map(serde_json::from_str::<serde_json::Value>) {
                Some(Ok(answer)) => {
                    let pod = answer["pod"].as_str().unwrap_or("?").to_owned();
                    *answers.entry(pod).or_default() += 1;
                    latencies.push(seconds.trim().parse::<f64>().unwrap_or(f64::NAN) * 1000.0);
                }
                _ => failures += 1,
            }
        }
        failures += BATCH.saturating_sub(finished);
        eprintln!(
            "  {:>3}/{REQUESTS} sent, {} answered",
            (batch + 1) * BATCH,
            latencies.len()
        );
    }

    eprintln!("\nAnswers per replica (each request balanced on its own)");
    let replicas: Vec<Vec<String>> = cluster
        .topology()
        .pods
        .iter()
        .filter(|pod| pod.labels.get("app").map(String::as_str) == Some("echo"))
        .map(|pod| {
            vec![
                pod.name.clone(),
                pod.node.clone(),
                pod.ip.to_string(),
                answers.get(&pod.name).copied().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    print_table(&["replica", "node", "address", "requests"], &replicas);

    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    eprintln!(
        "\nLatency (curl, request + response): p50 {:.2} ms, p99 {:.2} ms over {} requests; {failures} failed",
        percentile(0.50),
        percentile(0.99),
        latencies.len()
    );

    eprintln!("\nRequest metrics (istio_requests_total on each agent's /metrics)");
    print_table(
        &["node", "reporter", "destination", "code", "requests"],
        &request_metrics(&cluster)?,
    );
    let tunnels = access_log_summary(&cluster)?;
    eprintln!("\nRequests the agents carried (from their access logs)");
    print_table(
        &[
            "reporter",
            "source identity",
            "destination identity",
            "security",
            "requests",
            "bytes",
        ],
        &tunnels,
    );
    eprintln!("\nKernel counters (weft_ebpf_events_total on each agent's /metrics)");
    let mut counters = Vec::new();
    for node in cluster.topology().node_names() {
        let ip = cluster.topology().node(&node).context("node")?.ip;
        let metrics = cluster
            .node_command(
                &node,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "3",
                    &format!("http://{ip}:15020/metrics"),
                ],
            )?
            .output()
            .context("cannot run curl")?;
        for line in String::from_utf8_lossy(&metrics.stdout).lines() {
            if let Some(rest) = line.strip_prefix("weft_ebpf_events_total{event=\"")
                && let Some((event, value)) = rest.split_once("\"} ")
                && value.trim() != "0"
            {
                counters.push(vec![
                    node.clone(),
                    event.to_owned(),
                    value.trim().to_owned(),
                ]);
            }
        }
    }
    print_table(&["node", "event", "count"], &counters);

    let status = cluster
        .controller_status()
        .map_err(|what| anyhow::anyhow!("no answer from the controller: waiting for {what}"))?;
    eprintln!(
        "\nThe controller (generation {}): every agent's view of the mesh",
        status["generation"]
    );
    let synced: Vec<Vec<String>> = status["nodes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(node, state)| {
            vec![
                node.clone(),
                state["version"].as_str().unwrap_or("-").to_owned(),
                state["acked_version"].as_str().unwrap_or("-").to_owned(),
                state["in_sync"].to_string(),
            ]
        })
        .collect();
    print_table(
        &["node", "version sent", "version applied", "in sync"],
        &synced,
    );

    let signing_root = status["ca"]["signing_root"].as_str().unwrap_or("-");
    eprintln!(
        "\nWorkload certificates (each agent's /certs), issued by the controller's CA under\n  {signing_root}"
    );
    let mut certificates = Vec::new();
    for node in cluster.topology().node_names() {
        let certs = cluster
            .agent_admin(&node, "/certs")
            .map_err(|what| anyhow::anyhow!("no answer: waiting for {what}"))?;
        for cert in certs.as_array().into_iter().flatten() {
            let expires_in = cert["not_after"].as_u64().map_or("-".to_owned(), |at| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs());
                format!("{:.1} h", at.saturating_sub(now) as f64 / 3600.0)
            });
            certificates.push(vec![
                node.clone(),
                cert["identity"].as_str().unwrap_or("-").to_owned(),
                cert["serial"].as_str().unwrap_or("-").to_owned(),
                expires_in,
            ]);
        }
    }
    print_table(&["node", "identity", "serial", "expires in"], &certificates);

    let denials = authorization(&cluster)?;
    let canary = routing(&cluster)?;

    let unanswered: Vec<&Vec<String>> = replicas.iter().filter(|row| row[3] == "0").collect();
    if failures > 0 || !unanswered.is_empty() {
        bail!(
            "{failures} request(s) failed and {} replica(s) never answered",
            unanswered.len()
        );
    }
    if !tunnels.iter().any(|row| row[3] == "mutual_tls") {
        bail!("no connection crossed between the nodes in mutual TLS");
    }
    if canary.get(CANARY) != Some(&CANARY_REQUESTS) {
        bail!("route echo-routes did not send every x-canary request to {CANARY}: {canary:?}");
    }
    if let Some(row) = denials.iter().find(|row| row[3] != "403") {
        bail!(
            "{} {} from {} got {}, not 403",
            row[1],
            row[2],
            row[0],
            row[3]
        );
    }
    eprintln!(
        "\nEvery replica answered; the traffic to node1 crossed in mutual TLS (HBONE), that to\n\
         echo-0 stayed on node0, and the agents run the configuration the controller compiled\n\
         from {MESH}, on certificates from the controller's CA.\n\
         Each request was balanced on its own (peak EWMA favours the replica on the client's\n\
         node) and measured by both agents. Policy echo-readers let the client read and\n\
         denied the rest (403), and the controller explained why. Route echo-routes sent\n\
         the requests carrying x-canary: yes to the canary replica, the rest to all of them."
    );
    weftctl_check(name)
}

/// `weftctl check` on the demo's cluster, printed as an operator sees it; the demo
/// fails when a check does.
fn weftctl_check(name: &str) -> anyhow::Result<()> {
    eprintln!("\n==> weftctl --local {name} check");
    let weftctl = workspace_binaries()?.join("weftctl");
    let output = std::process::Command::new(&weftctl)
        .args(["--local", name, "check"])
        .output()
        .with_context(|| format!("cannot run {}", weftctl.display()))?;
    eprint!("{}", String::from_utf8_lossy(&output.stdout));
    if !output.status.success() {
        bail!(
            "weftctl check failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Header-based routing: route `echo-routes` sends the client's requests that carry
/// `x-canary: yes` to Service `echo-canary` (its one pod, [`CANARY`]). Returns which
/// pods answered them.
fn routing(cluster: &Cluster) -> anyhow::Result<BTreeMap<String, usize>> {
    eprintln!(
        "\n==> {CANARY_REQUESTS} requests from pod client to {SERVICE} with header x-canary: yes (HTTPRoute echo-routes)"
    );
    let url = format!("http://{SERVICE}/");
    let mut argv = vec![
        "curl",
        "-s",
        "--max-time",
        "5",
        "-H",
        "x-canary: yes",
        "-w",
        "\n",
    ];
    argv.extend(std::iter::repeat_n(url.as_str(), CANARY_REQUESTS));
    let out = cluster
        .pod_command("default", "client", &argv)?
        .stderr(Stdio::null())
        .output()
        .context("cannot run curl in pod client")?;
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(answer) = serde_json::from_str::<serde_json::Value>(line) {
            let pod = answer["pod"].as_str().unwrap_or("?").to_owned();
            *answers.entry(pod).or_default() += 1;
        }
    }
    let rows: Vec<Vec<String>> = answers
        .iter()
        .map(|(pod, count)| vec![pod.clone(), count.to_string()])
        .collect();
    print_table(&["replica", "requests with x-canary: yes"], &rows);
    Ok(answers)
}

/// What AuthorizationPolicy `echo-readers` denies: a POST from the client and a GET from
/// pod `stranger`, each answered 403 by the agents; with the controller's explanation
/// of the stranger's denial. Returns the rows (pod, method, URL, status).
fn authorization(cluster: &Cluster) -> anyhow::Result<Vec<Vec<String>>> {
    eprintln!(
        "\nAuthorization (policy echo-readers: only the client's identity, only GET and HEAD)"
    );
    let url = format!("http://{SERVICE}/");
    let mut rows = Vec::new();
    for (pod, method) in [("client", "POST"), ("stranger", "GET")] {
        let out = cluster
            .pod_command(
                "default",
                pod,
                &[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    "-X",
                    method,
                    &url,
                ],
            )?
            .output()
            .with_context(|| format!("cannot run curl in pod {pod}"))?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        rows.push(vec![pod.to_owned(), method.to_owned(), url.clone(), code]);
    }
    print_table(&["pod", "method", "url", "status"], &rows);
    let port = SERVICE.rsplit_once(':').map_or("80", |(_, port)| port);
    let answer = cluster
        .controller_admin(&format!(
            "/authorization/explain?source_pod=default/stranger&destination_service=default/echo&port={port}&method=GET&path=/"
        ))
        .map_err(anyhow::Error::msg)?;
    let reason = answer["destinations"][0]["reason"].as_str().unwrap_or("?");
    eprintln!("Why was the stranger denied? The controller's /authorization/explain: {reason}");
    Ok(rows)
}

fn print_nodes_and_pods(cluster: &Cluster) {
    let nodes: Vec<Vec<String>> = cluster
        .topology()
        .nodes
        .iter()
        .map(|node| {
            vec![
                node.name.clone(),
                node.ip.to_string(),
                node.pod_cidr.clone(),
            ]
        })
        .collect();
    eprintln!("\nNodes");
    print_table(&["node", "address", "pod range"], &nodes);
    let pods: Vec<Vec<String>> = cluster
        .topology()
        .pods
        .iter()
        .map(|pod| {
            vec![
                pod.name.clone(),
                pod.node.clone(),
                pod.ip.to_string(),
                format!(
                    "spiffe://cluster.local/ns/{}/sa/{}",
                    pod.namespace, pod.service_account
                ),
            ]
        })
        .collect();
    eprintln!("\nPods");
    print_table(&["pod", "node", "address", "identity"], &pods);
}

/// Connections per (reporter, source identity, destination identity, security) from
/// the agents' access logs, with their bytes.
fn access_log_summary(cluster: &Cluster) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows: BTreeMap<(String, String, String, String), (u64, u64)> = BTreeMap::new();
    for node in &cluster.topology().nodes {
        let Some(agent) = &node.agent else { continue };
        let log = std::fs::read_to_string(&agent.log)
            .with_context(|| format!("cannot read {}", agent.log.display()))?;
        for line in log.lines().filter(|line| line.contains("weft::access")) {
            let Some(json) = line.find('{').map(|start| &line[start..]) else {
                continue;
            };
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(json) else {
                continue;
            };
            let text = |value: &serde_json::Value| value.as_str().unwrap_or("unknown").to_owned();
            // A TCP connection's line nests who was at its ends; a request's does not.
            let connection = match &entry["connection"] {
                serde_json::Value::Null => &entry,
                connection => connection,
            };
            let key = (
                text(&connection["reporter"]),
                text(&connection["source"]["principal"]),
                text(&connection["destination"]["principal"]),
                text(&entry["security"]),
            );
            let bytes = entry["bytes_received"].as_u64().unwrap_or(0)
                + entry["bytes_sent"].as_u64().unwrap_or(0);
            let row = rows.entry(key).or_default();
            row.0 += 1;
            row.1 += bytes;
        }
    }
    Ok(rows
        .into_iter()
        .map(
            |((reporter, source, destination, security), (count, bytes))| {
                vec![
                    reporter,
                    source,
                    destination,
                    security,
                    count.to_string(),
                    bytes.to_string(),
                ]
            },
        )
        .collect())
}

/// `istio_requests_total` of every agent, a row per (reporter, destination workload,
/// response code).
fn request_metrics(cluster: &Cluster) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    for node in cluster.topology().node_names() {
        let ip = cluster.topology().node(&node).context("node")?.ip;
        let url = format!("http://{ip}:15020/metrics");
        let metrics = cluster
            .node_command(&node, &["curl", "-s", "--max-time", "3", &url])?
            .output()
            .context("cannot run curl")?;
        for line in String::from_utf8_lossy(&metrics.stdout).lines() {
            let Some(rest) = line.strip_prefix("istio_requests_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .map_or("?", |value| value.trim_end_matches('"'))
                    .to_owned()
            };
            rows.push(vec![
                node.clone(),
                label("reporter"),
                label("destination_workload"),
                label("response_code"),
                value.trim().to_owned(),
            ]);
        }
    }
    Ok(rows)
}

/// Prints `rows` under `headers` to stderr, each column as wide as its widest cell.
fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|column| {
            rows.iter()
                .map(|row| row[column].len())
                .chain([headers[column].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        eprintln!("  {}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
