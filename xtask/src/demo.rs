//! `cargo xtask demo`: a two-node local cluster running an echo service on both nodes
//! and a client pod, with cross-node traffic from the client to every replica.
//!
//! Until the agent exists this traffic flows plain, pod to pod, and the demo says so.

use std::{net::SocketAddrV4, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use weft_cluster::{Cluster, PodSpec};

use crate::{cluster::workspace_binaries, cmd, setup};

const ECHO_PORT: u16 = 8080;

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
            "the demo creates network namespaces and cgroups, so it needs root: run `sudo -E cargo xtask demo`"
        );
    }
    eprintln!("==> building the sample workloads");
    cmd::run(cmd::cargo().args(["build", "--quiet", "--package", "weft-workloads", "--bins"]))?;

    if Cluster::open(&args.name).is_ok() {
        eprintln!("==> removing cluster {} left by an earlier demo", args.name);
    }
    weft_cluster::down(&args.name)?;
    let name = args.name.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: removing cluster {name}");
        let _ = weft_cluster::down(&name);
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")?;

    let result = show(&args.name);
    if args.keep && result.is_ok() {
        eprintln!(
            "\nThe cluster keeps running. Try:\n  cargo xtask cluster status --name {0}\n  cargo xtask cluster exec --name {0} --pod client -- curl -s http://10.244.1.2:{ECHO_PORT}/\nand remove it with:\n  cargo xtask cluster down --name {0}",
            args.name
        );
    } else {
        eprintln!("==> removing cluster {}", args.name);
        weft_cluster::down(&args.name)?;
    }
    result
}

fn show(name: &str) -> anyhow::Result<()> {
    eprintln!("==> starting cluster {name}: 2 nodes");
    let mut cluster = Cluster::up(name, 2)?;
    let echo = workspace_binaries()?.join("weft-echo");
    let echo = echo
        .to_str()
        .context("the workspace path is not valid UTF-8")?;
    let listen = format!("0.0.0.0:{ECHO_PORT}");
    let mut replicas = Vec::new();
    for (pod, node) in [
        ("echo-0", "node0"),
        ("echo-1", "node1"),
        ("echo-2", "node1"),
    ] {
        let mut spec = PodSpec::new(pod, node, &[echo, "--listen", &listen]);
        spec.labels.insert("app".into(), "echo".into());
        replicas.push(cluster.add_pod(spec)?);
    }
    let client = cluster.add_pod(PodSpec::new("client", "node0", &[]))?;
    for replica in &replicas {
        cluster.wait_for_tcp(
            &client.namespace,
            &client.name,
            SocketAddrV4::new(replica.ip, ECHO_PORT),
            Duration::from_secs(10),
            &replica.log,
        )?;
    }

    let nodes: Vec<Vec<String>> = cluster
        .topology()
        .nodes
        .iter()
        .map(|node| {
            vec![
                node.name.clone(),
                node.ip.to_string(),
                node.pod_cidr.clone(),
                node.netns.clone(),
            ]
        })
        .collect();
    eprintln!("\nNodes");
    print_table(
        &["node", "address", "pod range", "network namespace"],
        &nodes,
    );

    let mut requests = Vec::new();
    for replica in &replicas {
        let url = format!("http://{}:{ECHO_PORT}/", replica.ip);
        let curl = [
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{time_total}",
            &url,
        ];
        let out = cluster
            .pod_command(&client.namespace, &client.name, &curl)?
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run curl")?;
        if !out.status.success() {
            bail!("curl {url} from pod client failed: the local cluster's network is broken");
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, seconds) = text.rsplit_once('\n').context("curl printed no timing")?;
        let answer: serde_json::Value = serde_json::from_str(body).with_context(|| {
            format!("{url} answered something that is not the echo JSON: {body}")
        })?;
        let millis = seconds.trim().parse::<f64>().unwrap_or(f64::NAN) * 1000.0;
        requests.push(vec![
            replica.name.clone(),
            replica.node.clone(),
            replica.ip.to_string(),
            answer["pod"].as_str().unwrap_or("?").to_owned(),
            answer["peer"].as_str().unwrap_or("?").to_owned(),
            format!("{millis:.2} ms"),
        ]);
    }
    eprintln!(
        "\nRequests from pod client ({} on {})",
        client.ip, client.node
    );
    print_table(
        &[
            "replica",
            "node",
            "address",
            "answered by",
            "peer it saw",
            "time",
        ],
        &requests,
    );
    eprintln!(
        "\nWhat is not there yet: this traffic went plain, pod to pod. weft's agent, eBPF capture,\n\
         mTLS (HBONE) between nodes, policy and metrics are not in the cluster yet; they arrive\n\
         with the kernel-datapath and agent issues. The topology as JSON:"
    );
    println!("{}", serde_json::to_string_pretty(cluster.topology())?);
    Ok(())
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
