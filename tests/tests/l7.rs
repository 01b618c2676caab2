//! The request layer on a 2-node local cluster, with real clients: HTTP/1.1 and HTTP/2
//! connections whose requests spread over every replica, gRPC calls and WebSocket
//! upgrades through the mesh, balancers that follow latency, weights and locality,
//! protocol detection that never holds up a server-speaks-first protocol, request
//! metrics from both agents scraped by a real Prometheus, and spans of both hops at a
//! real OTLP receiver.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use weft_cluster::{Cluster, PodSpec};
use weft_e2e::{
    Prometheus, TestCluster, agent_metrics as metrics, assert_promtool_accepts, run_in_pod,
    samples, series, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(20);
/// Service `echo`: HTTP on port 80, gRPC on 9090 (one weft-echo port serves both).
const ECHO: &str = "10.96.0.20";

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: default }
spec:
  clusterIP: 10.96.0.20
  selector: { app: echo }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: grpc, port: 9090, targetPort: 8080 }
    - { port: 8000, targetPort: 8080 }
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: default }
spec: { service: echo, loadBalancer: { algorithm: ROUND_ROBIN }, timeouts: { idle: 2s } }
---
apiVersion: v1
kind: Service
metadata: { name: latency, namespace: default }
spec:
  clusterIP: 10.96.0.21
  selector: { app: latency }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: weighted, namespace: default }
spec:
  clusterIP: 10.96.0.22
  selector: { app: weighted }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: weighted, namespace: default }
spec: { service: weighted, loadBalancer: { algorithm: ROUND_ROBIN } }
---
apiVersion: v1
kind: Service
metadata: { name: close, namespace: default }
spec:
  clusterIP: 10.96.0.23
  selector: { app: close }
  trafficDistribution: PreferClose
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: greeter, namespace: default }
spec:
  clusterIP: 10.96.0.24
  selector: { app: greeter }
  ports: [{ port: 3306 }]
---
apiVersion: v1
kind: Service
metadata: { name: tcp, namespace: default }
spec:
  clusterIP: 10.96.0.25
  selector: { app: tcp }
  ports: [{ port: 9000 }]
"#;

/// A server that speaks first, as MySQL and SMTP do: a greeting line on every accepted
/// connection, then it echoes one line.
const GREETER: &str = r#"
import socket
server = socket.create_server(("0.0.0.0", 3306))
while True:
    connection, _ = server.accept()
    connection.sendall(b"220 weft greeter\n")
    line = connection.makefile("rb").readline()
    connection.sendall(line)
    connection.close()
"#;

/// Connects to `sys.argv[1]:sys.argv[2]`, says nothing, and prints the first line the
/// server sends with the seconds it took.
const SILENT_CLIENT: &str = r#"
import socket, sys, time
started = time.monotonic()
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
greeting = connection.makefile("rb").readline().decode().strip()
print(f"{greeting}|{time.monotonic() - started:.3f}")
"#;

/// Sends one HTTP/1.1 request on a keep-alive connection, reads the answer, then waits
/// for the connection to close and prints how long it stayed open after the answer.
const IDLE_CLIENT: &str = r#"
import socket, sys, time
connection = socket.create_connection((sys.argv[1], 80), timeout=25)
connection.sendall(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
answer = connection.recv(65536)
assert answer.startswith(b"HTTP/1.1 200"), answer
answered = time.monotonic()
while connection.recv(65536):
    pass
print(f"{time.monotonic() - answered:.3f}")
"#;

/// Sends one line that is not HTTP and prints what comes back.
const LINE_CLIENT: &str = r#"
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
connection.sendall(b"\x00\x01 not http\n")
print(connection.makefile("rb").readline().decode().strip())
"#;

fn pod(cluster: &mut Cluster, name: &str, node: &str, app: &str, argv: &[&str]) {
    let mut spec = PodSpec::new(name, node, argv);
    spec.labels.insert("app".into(), app.into());
    spec.service_account = app.into();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

fn client(cluster: &mut Cluster) {
    let mut spec = PodSpec::new("client", "node0", &[]);
    spec.service_account = "client".into();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

fn echo() -> String {
    workspace_bin("weft-echo").display().to_string()
}

fn weft_client() -> String {
    workspace_bin("weft-client").display().to_string()
}

/// Waits until every replica behind `vip` answers: a dozen requests from the client
/// pod, all answered by an echo (pods start their servers after the configuration
/// names them).
fn wait_for(cluster: &Cluster, vip: &str) {
    wait_until(vip, READY, || {
        let counts = many(cluster, vip, 12);
        !counts.is_empty() && counts.keys().all(|pod| !pod.starts_with("error"))
    });
}

/// The pods that answered, one per JSON line of `stdout`, counted; a line that is no
/// echo (an agent's error) counts as `error: <line>`.
fn answers(stdout: &[u8]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let answer: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let key = match answer["pod"].as_str() {
            Some(pod) => pod.to_owned(),
            None => format!("error: {line}"),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Requests node0's agent counted (reporter source) per destination workload of
/// service `service`.
fn requests_by_workload(cluster: &Cluster, service: &str) -> BTreeMap<String, f64> {
    let mut counts = BTreeMap::new();
    for (labels, value) in samples(&metrics(cluster, "node0"), "istio_requests_total") {
        if labels.get("reporter").map(String::as_str) == Some("source")
            && labels.get("destination_service_name").map(String::as_str) == Some(service)
        {
            let workload = labels["destination_workload"].clone();
            *counts.entry(workload).or_default() += value;
        }
    }
    counts
}

/// What `count` requests to `vip` on one keep-alive connection got: pods and counts.
fn many(cluster: &Cluster, vip: &str, count: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{vip}/");
    let mut argv = vec!["curl", "-s", "--max-time", "60", "-w", "\n"];
    argv.extend(std::iter::repeat_n(url.as_str(), count));
    let out = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    answers(&out.stdout)
}

fn assert_even(counts: &BTreeMap<String, usize>, replicas: usize, total: usize, what: &str) {
    assert_eq!(counts.len(), replicas, "{what}: {counts:?}");
    let even = total as f64 / replicas as f64;
    for (pod, count) in counts {
        let share = *count as f64 / even;
        assert!(
            (0.8..=1.2).contains(&share),
            "{what}: {pod} answered {count} of {total}, not within 20% of even: {counts:?}"
        );
    }
}

/// The cluster most tests share the shape of: three echo replicas on two nodes behind
/// `echo`, and a client on node0.
fn echo_cluster(agent_args: &[&str]) -> TestCluster {
    let mut cluster = TestCluster::with_mesh_and_agent_args(2, MESH, agent_args);
    for (name, node) in [
        ("echo-0", "node0"),
        ("echo-1", "node1"),
        ("echo-2", "node1"),
    ] {
        pod(&mut cluster, name, node, "echo", &[&echo()]);
    }
    client(&mut cluster);
    cluster.settle();
    wait_for(&cluster, ECHO);
    cluster
}

#[test]
fn one_keep_alive_or_http2_connection_spreads_its_requests_over_every_replica() {
    let cluster = echo_cluster(&[]);

    // curl with 30 URLs sends them all on one HTTP/1.1 keep-alive connection.
    for url in [format!("http://{ECHO}/"), format!("http://{ECHO}:8000/")] {
        let mut argv = vec!["curl", "-s", "--max-time", "20", "-w", "\n"];
        argv.extend(std::iter::repeat_n(url.as_str(), 30));
        let out = run_in_pod(&cluster, "client", &argv);
        assert!(out.status.success(), "{out:?}");
        // Port 8000 declares nothing: detection finds HTTP/1.1 and balances it too.
        assert_even(&answers(&out.stdout), 3, 30, &url);
    }

    // h2load: one HTTP/2 connection (prior knowledge), 60 requests.
    let before = requests_by_workload(&cluster, "echo");
    let url = format!("http://{ECHO}/");
    let out = run_in_pod(
        &cluster,
        "client",
        &["h2load", "-c", "1", "-m", "1", "-n", "60", &url],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("60 succeeded"), "{report}");
    let after = requests_by_workload(&cluster, "echo");
    let served: BTreeMap<String, usize> = after
        .iter()
        .map(|(pod, count)| {
            let delta = count - before.get(pod).copied().unwrap_or(0.0);
            (pod.clone(), delta as usize)
        })
        .filter(|(_, delta)| *delta > 0)
        .collect();
    assert_even(&served, 3, 60, "h2load -c1");

    // The service's idle timeout (2 s) closes a keep-alive connection that sends no
    // new request; the echo server itself would wait 30 s.
    let out = run_in_pod(&cluster, "client", &["python3", "-c", IDLE_CLIENT, ECHO]);
    let open: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        (1.5..20.0).contains(&open),
        "closed {open} s after the answer"
    );
}

#[test]
fn grpc_calls_and_websockets_cross_the_mesh_with_their_statuses_and_trailers() {
    let cluster = echo_cluster(&[]);
    let target = format!("http://{ECHO}:9090");
    let grpc = |args: &[&str]| {
        let mut argv = vec![weft_client(), "grpc".to_owned()];
        argv.extend(args.iter().map(|arg| (*arg).to_owned()));
        argv.extend(["--target".to_owned(), target.clone()]);
        run_in_pod(&cluster, "client", &argv)
    };

    // 30 unary calls on one HTTP/2 connection: spread over all three replicas.
    let out = grpc(&["unary", "--count", "30", "--metadata", "x-test=kept"]);
    assert!(out.status.success(), "{out:?}");
    assert_even(&answers(&out.stdout), 3, 30, "gRPC unary");
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["metadata"]["x-test"], "kept", "{first}");

    // A status the server returns comes back intact, with its message.
    let out = grpc(&["unary", "--count", "1", "--fail-with-code", "5"]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let failed: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|err| panic!("{err}: {line} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(failed["code"], 5, "{failed}");

    // Streams in every direction: one call stays with one replica.
    for shape in ["server-stream", "client-stream", "bidi"] {
        let out = grpc(&[shape, "--count", "5"]);
        assert!(
            out.status.success(),
            "{shape}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let counts = answers(&out.stdout);
        assert_eq!(counts.len(), 1, "{shape}: {counts:?}");
    }

    // WebSocket: the upgrade goes through and messages come back.
    let url = format!("ws://{ECHO}/ws");
    let out = run_in_pod(
        &cluster,
        "client",
        &[&weft_client(), "ws", "--url", &url, "--messages", "5"],
    );
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(report["echoed"], 5, "{report}");

    // Both agents measured the gRPC calls with their statuses.
    let source = metrics(&cluster, "node0");
    let labels = [
        ("reporter", "source"),
        ("request_protocol", "grpc"),
        ("destination_service_name", "echo"),
    ];
    let mut failed = labels.to_vec();
    failed.push(("grpc_response_status", "5"));
    assert!(
        series(&source, "istio_requests_total", &failed).is_some(),
        "{source}"
    );
    let destination = metrics(&cluster, "node1");
    assert!(
        series(
            &destination,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "0")
            ]
        )
        .is_some(),
        "{destination}"
    );
}

#[test]
fn balancers_follow_latency_weights_and_locality() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    let echo = echo();
    // `latency`: two fast replicas and one that answers after 150 ms.
    pod(&mut cluster, "fast-0", "node0", "latency", &[&echo]);
    pod(&mut cluster, "fast-1", "node1", "latency", &[&echo]);
    pod(
        &mut cluster,
        "slow-2",
        "node1",
        "latency",
        &[&echo, "--delay-ms", "150"],
    );
    // `weighted`: weights 1 and 3.
    for (name, weight) in [("light", "1"), ("heavy", "3")] {
        let mut spec = PodSpec::new(name, "node1", &[&echo]);
        spec.labels.insert("app".into(), "weighted".into());
        spec.annotations
            .insert("weft.dev/weight".into(), weight.into());
        cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
    }
    // `close`: PreferClose, one replica on each node.
    pod(&mut cluster, "near", "node0", "close", &[&echo]);
    pod(&mut cluster, "far", "node1", "close", &[&echo]);
    client(&mut cluster);
    cluster.settle();
    for vip in ["10.96.0.21", "10.96.0.22", "10.96.0.23"] {
        wait_for(&cluster, vip);
    }

    // Peak EWMA: the slow replica gets few of the requests once it has been measured.
    let counts = many(&cluster, "10.96.0.21", 60);
    let slow = counts.get("slow-2").copied().unwrap_or(0);
    assert!(
        slow <= 6,
        "the slow replica answered {slow} of 60: {counts:?}"
    );
    assert!(
        counts.contains_key("fast-0") && counts.contains_key("fast-1"),
        "{counts:?}"
    );

    // Round robin over weights 1:3.
    let counts = many(&cluster, "10.96.0.22", 40);
    assert_eq!(
        (counts.get("light"), counts.get("heavy")),
        (Some(&10), Some(&30)),
        "{counts:?}"
    );

    // PreferClose: the replica on the client's node while it exists, then the other.
    let counts = many(&cluster, "10.96.0.23", 20);
    assert_eq!(counts.get("near"), Some(&20), "{counts:?}");
    cluster
        .del_pod("default", "near")
        .unwrap_or_else(|err| panic!("{err}"));
    wait_until("failover to the far replica", READY, || {
        many(&cluster, "10.96.0.23", 1).contains_key("far")
    });
    let counts = many(&cluster, "10.96.0.23", 10);
    assert_eq!(counts.get("far"), Some(&10), "{counts:?}");
}

#[test]
fn detection_never_holds_up_a_server_that_speaks_first_nor_a_client_that_is_not_http() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pod(
        &mut cluster,
        "greeter",
        "node1",
        "greeter",
        &["python3", "-c", GREETER],
    );
    let tcp = workspace_bin("weft-tcp-echo").display().to_string();
    pod(&mut cluster, "tcp-0", "node1", "tcp", &[&tcp]);
    client(&mut cluster);
    cluster.settle();

    // The client says nothing: the greeting must come, after at most the detection
    // bound of each agent (100 ms), far from a hang or Linkerd's 10 s.
    let mut greeting = String::new();
    wait_until("the greeter's greeting", READY, || {
        let out = cluster
            .pod_command(
                "default",
                "client",
                &["python3", "-c", SILENT_CLIENT, "10.96.0.24", "3306"],
            )
            .unwrap()
            .output()
            .unwrap();
        greeting = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        greeting.starts_with("220 weft greeter|")
    });
    let seconds: f64 = greeting.rsplit('|').next().unwrap().parse().unwrap();
    assert!(seconds < 2.0, "the greeting took {seconds} s");

    // Bytes that are not HTTP on an undeclared port are carried as they are.
    let out = run_in_pod(
        &cluster,
        "client",
        &["python3", "-c", LINE_CLIENT, "10.96.0.25", "9000"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "\u{0}\u{1} not http"
    );
}

#[test]
fn request_metrics_from_both_agents_reach_prometheus_and_spans_reach_a_collector() {
    let mut cluster = echo_cluster(&[]);
    // A real OTLP receiver on node0; both agents export their spans to it.
    let node0 = cluster.topology().node("node0").unwrap().ip;
    let listen = format!("{node0}:4317");
    let mut receiver = cluster
        .node_command(
            "node0",
            &[
                workspace_bin("weft-otlp-receiver").display().to_string(),
                "--listen".into(),
                listen.clone(),
            ],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut spans = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let first = spans.next().unwrap().unwrap();
    assert!(first.starts_with("listening"), "{first}");
    let endpoint = format!("--trace-endpoint=http://{listen}");
    cluster
        .set_agent_args(vec![endpoint, "--trace-sampling=1".into()])
        .unwrap_or_else(|err| panic!("{err}"));
    for node in ["node0", "node1"] {
        cluster
            .stop_agent(node)
            .unwrap_or_else(|err| panic!("{err}"));
        cluster.start_agent_on(node);
    }
    wait_for(&cluster, ECHO);

    // Traffic: successes, a 503 the server chose, and a traced request.
    for path in ["/", "/?status=503", "/?status=503", "/"] {
        let url = format!("http://{ECHO}{path}");
        run_in_pod(&cluster, "client", &["curl", "-s", "--max-time", "5", &url]);
    }
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let url = format!("http://{ECHO}/traced");
    let out = run_in_pod(
        &cluster,
        "client",
        &["curl", "-s", "--max-time", "5", "-H", &traceparent, &url],
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen = answer["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(seen.contains(trace), "the pod got the trace: {answer}");

    // Both hops' spans, one trace, the server span a child of the client span.
    let mut hops: Vec<serde_json::Value> = Vec::new();
    let deadline = Instant::now() + READY;
    while hops.len() < 2 && Instant::now() < deadline {
        let Some(Ok(line)) = spans.next() else { break };
        let span: serde_json::Value = serde_json::from_str(&line).unwrap();
        if span["trace_id"] == trace {
            hops.push(span);
        }
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
    assert_eq!(hops.len(), 2, "{hops:?}");
    let client = hops
        .iter()
        .find(|span| span["kind"] == "client")
        .expect("a client span");
    let server = hops
        .iter()
        .find(|span| span["kind"] == "server")
        .expect("a server span");
    assert_eq!(client["parent_span_id"], "00f067aa0ba902b7", "{client}");
    assert_eq!(server["parent_span_id"], client["span_id"], "{server}");
    assert_eq!(
        server["attributes"]["http.response.status_code"], 200,
        "{server}"
    );

    // Request metrics of both reporters, with the server's 503s.
    let source = metrics(&cluster, "node0");
    let destination = metrics(&cluster, "node1");
    let failed = |reporter| {
        [
            ("reporter", reporter),
            ("destination_service_name", "echo"),
            ("response_code", "503"),
            ("request_protocol", "http"),
        ]
    };
    assert!(
        series(&source, "istio_requests_total", &failed("source")).unwrap_or(0.0) >= 1.0,
        "{source}"
    );
    let all_503: f64 = [&source, &destination]
        .iter()
        .flat_map(|text| samples(text, "istio_requests_total"))
        .filter(|(labels, _)| labels.get("response_code").map(String::as_str) == Some("503"))
        .map(|(_, value)| value)
        .sum();
    assert!(all_503 >= 2.0, "the two 503s, at least one reporter each");
    for text in [&source, &destination] {
        assert!(
            !samples(text, "istio_request_duration_milliseconds_bucket").is_empty(),
            "durations: {text}"
        );
        assert_promtool_accepts(text);
    }
    let prometheus = Prometheus::start(&cluster);
    prometheus.wait_for_series(
        "istio_requests_total{reporter=\"destination\",response_code=\"503\",destination_workload=~\"echo-.*\"}",
    );
}
