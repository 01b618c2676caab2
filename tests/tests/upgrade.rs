//! Replacing the agents under load on a 2-node local cluster, as a DaemonSet upgrade
//! does: the new agent takes the old one's listening sockets over and the old one
//! drains. HTTP/1.1 keep-alive (wrk), a new connection per request (weft-load), gRPC
//! calls on long-lived HTTP/2 connections (weft-client) and one long TCP stream
//! (iperf3) run through both agents while each is replaced in turn; not one
//! connection may be refused or reset, and not one request fail. And a crash: after
//! `kill -9`, a new connection waits in the accept queue the node's socket holder
//! keeps open until the next agent serves it, rather than being refused.

use std::{
    process::{Child, Output, Stdio},
    time::Duration,
};

use weft_cluster::{PodSpec, process_running};
use weft_e2e::{
    TestCluster, agent_log, agent_metrics, clean_wrk_report, grpc_load_report, running_agent,
    total, wait_until, workspace_bin,
};

/// Service `echo`: HTTP on 80, gRPC on 9090; `perf`: iperf3 on 5201.
const ECHO: &str = "10.96.3.10";
const PERF: &str = "10.96.3.11";
/// How long each load runs: both agents are replaced within it.
const LOAD_SECONDS: u32 = 20;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: default }
spec:
  clusterIP: 10.96.3.10
  selector: { app: echo }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: grpc, port: 9090, targetPort: 8080 }
---
apiVersion: v1
kind: Service
metadata: { name: perf, namespace: default }
spec:
  clusterIP: 10.96.3.11
  selector: { app: perf }
  ports: [{ name: tcp-perf, port: 5201 }]
"#;

fn pod(cluster: &mut TestCluster, name: &str, node: &str, app: &str, argv: &[&str]) {
    let mut spec = PodSpec::new(name, node, argv);
    spec.labels.insert("app".into(), app.into());
    spec.service_account = app.into();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

/// A load from the client pod, running in the background.
fn spawn(cluster: &TestCluster, argv: &[String]) -> Child {
    cluster
        .pod_command("default", "client", argv)
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn strings(argv: &[&str]) -> Vec<String> {
    argv.iter().map(|arg| (*arg).to_owned()).collect()
}

/// Adds the client pod on node0, and waits until the mesh has settled and `echo`
/// answers it.
fn client_once_echo_answers(cluster: &mut TestCluster) {
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster
        .add_pod(client)
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    let url = format!("http://{ECHO}/");
    wait_until(
        "echo answers through the mesh",
        Duration::from_secs(20),
        || {
            cluster
                .pod_command(
                    "default",
                    "client",
                    &["curl", "-sf", "--max-time", "2", &url],
                )
                .unwrap()
                .output()
                .is_ok_and(|out| out.status.success())
        },
    );
}

/// Requests to `echo` that node0's agent (whichever runs) has answered.
fn echo_requests(cluster: &TestCluster) -> f64 {
    total(
        &agent_metrics(cluster, "node0"),
        "istio_requests_total",
        &[("reporter", "source"), ("destination_service_name", "echo")],
    )
}

fn finished(child: Child, what: &str) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn agents_replaced_under_load_refuse_reset_and_fail_nothing() {
    let mut cluster = TestCluster::with_mesh_and_agent_args(2, MESH, &["--drain-timeout=60"]);
    let echo = workspace_bin("weft-echo").display().to_string();
    pod(&mut cluster, "echo-0", "node1", "echo", &[&echo]);
    pod(&mut cluster, "echo-1", "node1", "echo", &[&echo]);
    pod(
        &mut cluster,
        "perf",
        "node1",
        "perf",
        &["iperf3", "--server", "--port", "5201"],
    );
    client_once_echo_answers(&mut cluster);

    let seconds = LOAD_SECONDS.to_string();
    let wrk = spawn(
        &cluster,
        &strings(&[
            "wrk",
            "-t",
            "1",
            "-c",
            "4",
            "-d",
            &format!("{seconds}s"),
            &format!("http://{ECHO}/"),
        ]),
    );
    let new_connections = spawn(
        &cluster,
        &strings(&[
            &workspace_bin("weft-load").display().to_string(),
            "--target",
            &format!("{ECHO}:80"),
            "--rate",
            "100",
            "--duration",
            &seconds,
            "--warmup",
            "0",
            "--timeout",
            "10",
        ]),
    );
    let grpc = spawn(
        &cluster,
        &strings(&[
            &workspace_bin("weft-client").display().to_string(),
            "grpc",
            "load",
            "--target",
            &format!("http://{ECHO}:9090"),
            "--connections",
            "2",
            "--rate",
            "200",
            "--duration",
            &seconds,
        ]),
    );
    let stream = spawn(
        &cluster,
        &strings(&[
            "iperf3",
            "--client",
            PERF,
            "--port",
            "5201",
            "--time",
            &seconds,
            "--bitrate",
            "100M",
            "--json",
        ]),
    );
    let before = echo_requests(&cluster);
    wait_until("the load to flow", Duration::from_secs(10), || {
        echo_requests(&cluster) > before + 500.0
    });

    // The client's node first, then the server's, each while the load runs.
    let mut replaced = Vec::new();
    for node in ["node0", "node1"] {
        let old = running_agent(&cluster, node).pid;
        let new = cluster
            .restart_agent(node, &workspace_bin("weft-agent"))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_ne!(new.pid, old);
        let served = echo_requests(&cluster);
        wait_until(
            &format!("requests through {node}'s new agent"),
            Duration::from_secs(10),
            || echo_requests(&cluster) > served + 200.0,
        );
        replaced.push((node, old));
    }

    let wrk = clean_wrk_report(&finished(wrk, "wrk"));
    assert!(wrk.contains("requests in"), "{wrk}");
    let load: serde_json::Value =
        serde_json::from_slice(&finished(new_connections, "weft-load").stdout).unwrap();
    let (requests, errors) = (&load["requests"], &load["errors"]);
    eprintln!("weft-load: {requests} requests, {errors} errors");
    assert_eq!(
        *errors, 0,
        "new connections refused or failed, the first: {}",
        load["first_error"]
    );
    assert!(requests.as_u64() > Some(1000), "{requests} requests");
    let grpc = grpc_load_report(&finished(grpc, "weft-client grpc load"));
    assert_eq!(grpc["errors"], 0, "gRPC calls failed: {grpc}");
    let stream: serde_json::Value =
        serde_json::from_slice(&finished(stream, "iperf3").stdout).unwrap();
    assert!(stream.get("error").is_none(), "iperf3: {}", stream["error"]);
    let received = stream["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(received > 10_000_000, "the stream moved {received} bytes");

    // The old agents drained and left once their last connection (the stream) ended.
    for (node, old) in replaced {
        wait_until(
            &format!("{node}'s old agent (pid {old}) to exit"),
            Duration::from_secs(30),
            || !process_running(old),
        );
        let log = agent_log(&cluster, node);
        assert!(
            log.contains("took over") && log.contains("stops accepting and drains"),
            "{log}"
        );
    }
}

/// Connections waiting in the accept queues of `port`'s listening sockets on `node`
/// (`ss`'s Recv-Q of a listening socket).
fn queued(cluster: &TestCluster, node: &str, port: u16) -> u64 {
    let out = cluster
        .node_command(node, &["ss", "-Hltn", &format!("sport = :{port}")])
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn after_a_crash_new_connections_wait_for_the_next_agent_instead_of_being_refused() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    let echo = workspace_bin("weft-echo").display().to_string();
    pod(&mut cluster, "echo-0", "node0", "echo", &[&echo]);
    client_once_echo_answers(&mut cluster);
    let url = format!("http://{ECHO}/");
    let get = || {
        cluster
            .pod_command(
                "default",
                "client",
                &["curl", "-sf", "--max-time", "30", &url],
            )
            .unwrap()
    };

    // Keep-alive load across the crash, to count what a crash costs established
    // connections (a figure, not a pass or fail: those are lost by design).
    let wrk = spawn(
        &cluster,
        &strings(&["wrk", "-t", "1", "-c", "4", "-d", "10s", &url]),
    );
    let before = echo_requests(&cluster);
    wait_until("the load to flow", Duration::from_secs(10), || {
        echo_requests(&cluster) > before + 100.0
    });
    let crashed = running_agent(&cluster, "node0").pid;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &crashed.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_until("the agent to be gone", Duration::from_secs(10), || {
        !process_running(crashed)
    });
    // Captured to the outbound port, where no agent accepts now.
    let waiting = get()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the new connection to wait in the outbound port's queue",
        Duration::from_secs(10),
        || queued(&cluster, "node0", 15001) >= 1,
    );

    cluster.start_agent_on("node0");
    let answer = waiting.wait_with_output().unwrap();
    assert!(
        answer.status.success(),
        "the waiting connection was not served: {}",
        String::from_utf8_lossy(&answer.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert_eq!(answer["pod"], "echo-0", "{answer}");
    let log = agent_log(&cluster, "node0");
    assert!(
        log.contains("back from the node's socket holder"),
        "the new agent did not take the held sockets: {log}"
    );
    let wrk = finished(wrk, "wrk");
    let report = String::from_utf8_lossy(&wrk.stdout);
    let lost = report
        .lines()
        .find(|line| line.contains("Socket errors"))
        .unwrap_or("Socket errors: none");
    eprintln!("keep-alive load across the crash: {lost}");
}
