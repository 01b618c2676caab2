//! Resilience on a 2-node local cluster, with curl:
//!
//! - timeouts: a service's TrafficPolicy `timeouts.request` and the client's own gRPC
//!   deadline (`grpc-timeout`) answer a slow request 504 and leave a quick one alone;
//!   the deadline goes on to the server reduced by the time already spent; a stream
//!   idle timeout ends quiet gRPC streams (before and after their head) and leaves a
//!   moving one alone, the service's or, where it sets none, the agent's idle timeout;
//!   replicas that never answer a connection cost the connect
//!   timeout; the controller accepts the policies as enforced;
//! - outlier detection: a replica that answers 503 to everything is ejected after its
//!   consecutive gateway errors, gets nothing while ejected (the gauge and the admin
//!   port say so), comes back, and is ejected again by its first failure on probation;
//! - retries: a broken replica's 503s and a slow replica's hang (past the per-try
//!   timeout) are retried on the others, and the client sees none of it, but a POST is
//!   not retried; a service down entirely gets retries only within its budget, and its
//!   answers say URX; a replica killed under HTTP/1.1 (wrk) and gRPC load costs no
//!   request;
//! - circuit breaking: requests past `maxRequests` wait as pending up to
//!   `maxPendingRequests` and past that get 503 UO at once; upstream connections retire
//!   after `maxRequestsPerConnection`; a TCP connection past `maxConnections` is
//!   closed at once, and one gets through once another closed;
//! - fault injection: route rules that reference a FaultInjection (ExtensionRef)
//!   abort with its HTTP or gRPC status, delay past the request timeout, abort about
//!   their share of requests, and a missing one answers 500 and is named in the
//!   route's status.

use std::{
    collections::BTreeMap,
    process::Stdio,
    time::{Duration, Instant},
};

use weft_cluster::PodSpec;
use weft_e2e::{
    TestCluster, agent_metrics, clean_wrk_report, grpc_load_report, plausible_share,
    policy_verdict, series, total, wait_until, workspace_bin,
};

const ECHO: &str = "10.96.2.10";

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: default }
spec:
  clusterIP: 10.96.2.10
  selector: { app: echo }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: default }
spec: { service: echo, timeouts: { request: 500ms, connect: 2s } }
---
apiVersion: v1
kind: Service
metadata: { name: flaky, namespace: default }
spec:
  clusterIP: 10.96.2.11
  selector: { app: flaky }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: flaky, namespace: default }
spec:
  service: flaky
  loadBalancer: { algorithm: ROUND_ROBIN }
  outlierDetection:
    consecutiveFailures: 10
    consecutiveGatewayErrors: 3
    baseEjectionTime: 4s
    maxEjectionPercent: 50
"#;

const FLAKY: &str = "10.96.2.11";

/// `hole`: replicas that never answer a connection, behind a short connect timeout;
/// `streams`: the echo again, with a stream idle timeout.
const QUIET: &str = r#"
---
apiVersion: v1
kind: Service
metadata: { name: hole, namespace: default }
spec:
  clusterIP: 10.96.2.19
  selector: { app: hole }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: hole, namespace: default }
spec: { service: hole, loadBalancer: { algorithm: ROUND_ROBIN }, timeouts: { connect: 300ms } }
---
apiVersion: v1
kind: Service
metadata: { name: streams, namespace: default }
spec:
  clusterIP: 10.96.2.20
  selector: { app: echo }
  ports: [{ name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: streams, namespace: default }
spec: { service: streams, timeouts: { streamIdle: 1s } }
---
apiVersion: v1
kind: Service
metadata: { name: lasting, namespace: default }
spec:
  clusterIP: 10.96.2.21
  selector: { app: echo }
  ports: [{ name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c }]
"#;

/// The `streams` service, with a stream idle timeout of its own (1 s).
const STREAMS: &str = "http://10.96.2.20:7070";
/// The `lasting` service, with none: the agent's idle timeout (3 s in the test below) applies.
const LASTING: &str = "http://10.96.2.21:7070";

/// Services whose clients retry: `retried` (a broken replica among good ones),
/// `sluggish` (a slow one among good ones, cut by the per-try timeout), `down` (every
/// replica broken, a small budget) and `steady` (HTTP and gRPC, a replica killed).
const RETRYING: &str = r#"
---
apiVersion: v1
kind: Service
metadata: { name: retried, namespace: default }
spec:
  clusterIP: 10.96.2.12
  selector: { app: retried }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: retried, namespace: default }
spec: { service: retried, loadBalancer: { algorithm: ROUND_ROBIN }, retries: { attempts: 2 } }
---
apiVersion: v1
kind: Service
metadata: { name: sluggish, namespace: default }
spec:
  clusterIP: 10.96.2.13
  selector: { app: sluggish }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: sluggish, namespace: default }
spec:
  service: sluggish
  loadBalancer: { algorithm: ROUND_ROBIN }
  timeouts: { request: 10s }
  retries: { attempts: 2, perTryTimeout: 300ms }
---
apiVersion: v1
kind: Service
metadata: { name: down, namespace: default }
spec:
  clusterIP: 10.96.2.14
  selector: { app: down }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: down, namespace: default }
spec:
  service: down
  retries: { attempts: 3, budget: { percent: 10, minPerSecond: 1 } }
---
apiVersion: v1
kind: Service
metadata: { name: steady, namespace: default }
spec:
  clusterIP: 10.96.2.15
  selector: { app: steady }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c }
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: steady, namespace: default }
spec:
  service: steady
  retries: { attempts: 2, nonIdempotent: true }
  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 30s, maxEjectionPercent: 50 }
"#;

/// Services with circuit breakers: `guarded` (HTTP) and `narrow` (TCP).
const GUARDED: &str = r#"
---
apiVersion: v1
kind: Service
metadata: { name: guarded, namespace: default }
spec:
  clusterIP: 10.96.2.16
  selector: { app: guarded }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: guarded, namespace: default }
spec:
  service: guarded
  connectionLimits: { maxRequests: 2, maxPendingRequests: 1, maxRequestsPerConnection: 3 }
---
apiVersion: v1
kind: Service
metadata: { name: narrow, namespace: default }
spec:
  clusterIP: 10.96.2.17
  selector: { app: narrow }
  ports: [{ name: tcp, port: 9000 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: narrow, namespace: default }
spec: { service: narrow, connectionLimits: { maxConnections: 1 } }
"#;

/// A service whose HTTPRoute and GRPCRoute inject faults, chosen by a header.
const FAULTY: &str = r#"
---
apiVersion: v1
kind: Service
metadata: { name: faulty, namespace: default }
spec:
  clusterIP: 10.96.2.18
  selector: { app: faulty }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: grpc, port: 7070, targetPort: 8080, appProtocol: kubernetes.io/h2c }
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: { name: teapot, namespace: default }
spec: { abort: { httpStatus: 418, grpcStatus: 8 } }
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: { name: slow, namespace: default }
spec: { delay: { fixedDelay: 2s } }
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: { name: half, namespace: default }
spec: { abort: { httpStatus: 503, percent: 50 } }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: faulty, namespace: default }
spec:
  parentRefs: [{ group: "", kind: Service, name: faulty, port: 80 }]
  rules:
    - matches: [{ headers: [{ name: x-fault, value: abort }] }]
      filters: [{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection, name: teapot } }]
      backendRefs: [{ name: faulty, port: 80 }]
    - matches: [{ headers: [{ name: x-fault, value: delay }] }]
      filters: [{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection, name: slow } }]
      timeouts: { request: 500ms }
      backendRefs: [{ name: faulty, port: 80 }]
    - matches: [{ headers: [{ name: x-fault, value: half }] }]
      filters: [{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection, name: half } }]
      backendRefs: [{ name: faulty, port: 80 }]
    - matches: [{ headers: [{ name: x-fault, value: missing }] }]
      filters: [{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection, name: nowhere } }]
      backendRefs: [{ name: faulty, port: 80 }]
    - backendRefs: [{ name: faulty, port: 80 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: faulty-grpc, namespace: default }
spec:
  parentRefs: [{ group: "", kind: Service, name: faulty, port: 7070 }]
  rules:
    - filters: [{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection, name: teapot } }]
      backendRefs: [{ name: faulty, port: 7070 }]
"#;

/// A TCP client: holds one connection open (echoed), then opens a second and prints
/// whether it was echoed, closes the first, and prints whether a third is echoed.
const TCP_CLIENT: &str = r#"
import socket, time
def echoed(conn):
    try:
        conn.sendall(b"ping\n")
        conn.settimeout(5)
        return conn.recv(16) == b"ping\n"
    except OSError:
        return False
first = socket.create_connection(("10.96.2.17", 9000))
print("first", echoed(first))
second = socket.create_connection(("10.96.2.17", 9000))
print("second", echoed(second))
second.close()
first.close()
# The first's slot comes back once its connection has closed both ways, through the
# server on the other node: poll for it, within a deadline.
deadline = time.monotonic() + 10
while True:
    third = socket.create_connection(("10.96.2.17", 9000))
    if echoed(third):
        print("third", True)
        break
    third.close()
    if time.monotonic() > deadline:
        print("third", False)
        break
    time.sleep(0.05)
"#;

/// A server that takes 5 s over every answer, as a replica in trouble may.
const SLOW: &str = r#"
import http.server, time
class Slow(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        time.sleep(5)
        body = b'{"pod": "slow"}\n'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Slow).serve_forever()
"#;

/// A server that answers 503 to every request, as a replica in trouble does.
const BROKEN: &str = r#"
import http.server
class Broken(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b'{"pod": "broken"}\n'
        self.send_response(503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.do_GET()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Broken).serve_forever()
"#;

/// Status, `x-weft-error` and the echo's JSON of one GET of `path` with `headers`.
fn get(cluster: &TestCluster, path: &str, headers: &[&str]) -> (u16, String, serde_json::Value) {
    let url = format!("http://{ECHO}{path}");
    let mut argv = vec!["curl", "-s", "--max-time", "10", "-D", "/dev/stderr"];
    for header in headers {
        argv.extend(["-H", header]);
    }
    argv.push(&url);
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&output.stderr);
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let error = head
        .lines()
        .find_map(|line| line.strip_prefix("x-weft-error: "))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let echo = serde_json::from_slice(&output.stdout).unwrap_or_default();
    (status, error, echo)
}

/// What one `weft-client grpc <call>` of the service at `target` got: its replies,
/// and the status code it ended with (0: OK).
fn stream_call(
    cluster: &TestCluster,
    target: &str,
    call: &str,
    count: u32,
    delay_ms: u32,
) -> (usize, i64) {
    let client = workspace_bin("weft-client").display().to_string();
    let (count, delay_ms) = (count.to_string(), delay_ms.to_string());
    let argv = [
        client.as_str(),
        "grpc",
        call,
        "--target",
        target,
        "--count",
        &count,
        "--delay-ms",
        &delay_ms,
    ];
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let code = lines.iter().find_map(|line| line["code"].as_i64());
    let replies = lines
        .iter()
        .filter(|line| line.get("code").is_none())
        .count();
    (replies, code.unwrap_or(0))
}

#[test]
fn slow_requests_get_504_at_the_nearest_deadline_and_grpc_deadlines_go_on_reduced() {
    let manifests = format!("{MESH}{RETRYING}{QUIET}");
    let mut cluster =
        TestCluster::with_mesh_and_agent_args(2, &manifests, &["--idle-timeout", "3s"]);
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut server = PodSpec::new("echo-0", "node1", &[&echo]);
    server.labels.insert("app".into(), "echo".into());
    server.service_account = "echo".into();
    cluster.add_pod(server).unwrap();
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    wait_until("echo answers", Duration::from_secs(20), || {
        get(&cluster, "/", &[]).0 == 200
    });

    // The service's request timeout (500 ms): a slow answer is cut, a quick one passes.
    let (status, error, _) = get(&cluster, "/?delay=3000", &[]);
    assert_eq!((status, error.as_str()), (504, "request_timeout"));
    assert_eq!(get(&cluster, "/?delay=10", &[]).0, 200);

    // The client's own deadline, nearer than the service's, cuts first.
    let (status, error, _) = get(&cluster, "/?delay=400", &["grpc-timeout: 100m"]);
    assert_eq!((status, error.as_str()), (504, "request_timeout"));
    // A farther one leaves the service's in charge, and goes on reduced.
    let (status, _, echo) = get(&cluster, "/?delay=10", &["grpc-timeout: 5S"]);
    assert_eq!(status, 200, "{echo}");
    let passed_on = echo["headers"]["grpc-timeout"].as_str().unwrap_or_default();
    let nanos: u64 = passed_on
        .strip_suffix('n')
        .or_else(|| passed_on.strip_suffix('u'))
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("grpc-timeout passed on as {passed_on:?}"));
    let unit = if passed_on.ends_with('n') { 1 } else { 1000 };
    let left = Duration::from_nanos(nanos * unit);
    assert!(
        left < Duration::from_secs(5) && left > Duration::from_secs(4),
        "passed on: {passed_on}"
    );

    // The stream idle timeout (1 s) leaves a stream that keeps moving alone, however
    // long it lasts ...
    assert_eq!(
        stream_call(&cluster, STREAMS, "server-stream", 4, 400),
        (4, 0)
    );
    // ... ends one that goes quiet after its head with DEADLINE_EXCEEDED ...
    assert_eq!(
        stream_call(&cluster, STREAMS, "server-stream", 2, 2500),
        (0, 4)
    );
    // ... and a call whose head does not come, as a request timeout would; both are
    // counted as ended idle (`SI`).
    assert_eq!(stream_call(&cluster, STREAMS, "unary", 1, 2500), (0, 4));
    // Where the service sets none, the agent's idle timeout (3 s) bounds a stream as it
    // bounds a TCP connection: a quiet client or server cannot hold one for ever.
    assert_eq!(
        stream_call(&cluster, LASTING, "server-stream", 3, 1500),
        (3, 0)
    );
    assert_eq!(
        stream_call(&cluster, LASTING, "server-stream", 2, 5000),
        (0, 4)
    );
    wait_until(
        "the three idle streams are counted",
        Duration::from_secs(10),
        || {
            let metrics = agent_metrics(&cluster, "node0");
            total(
                &metrics,
                "istio_requests_total",
                &[("response_flags", "SI")],
            ) == 3.0
        },
    );

    // Replicas that never answer a connection (their link is down), on this node and
    // across, cost the service's connect timeout (300 ms) each, not the agent's 10 s:
    // the try and its retry fail, and the client gets 504.
    let echo_server = workspace_bin("weft-echo").display().to_string();
    for (name, node) in [("hole-0", "node0"), ("hole-1", "node1")] {
        add_replica(&mut cluster, name, node, "hole", &[&echo_server]);
    }
    cluster.settle();
    // Before any connection to them is made (a pooled one would need no connect).
    for name in ["hole-0", "hole-1"] {
        let down = cluster
            .pod_command("default", name, &["ip", "link", "set", "eth0", "down"])
            .unwrap()
            .status()
            .unwrap();
        assert!(down.success());
    }
    let url = "http://10.96.2.19/";
    let argv = ["curl", "-s", "--max-time", "8", "-D", "/dev/stderr", url];
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&output.stderr);
    assert!(head.starts_with("HTTP/1.1 504"), "{output:?}");
    assert!(head.contains("x-weft-error: connect_timeout"), "{head}");

    // Every field the policies set is enforced, so they are accepted.
    let status = cluster.controller_status().unwrap();
    for name in ["echo", "hole", "streams"] {
        let verdict = policy_verdict(&status, "TrafficPolicy", name);
        assert_eq!(
            (&verdict["accepted"], &verdict["reason"]),
            (&serde_json::json!(true), &serde_json::json!("Accepted")),
            "{verdict}"
        );
    }
}

/// The statuses of `count` requests to the flaky service on one keep-alive connection.
fn statuses(cluster: &TestCluster, count: usize) -> Vec<u16> {
    statuses_of(cluster, FLAKY, count, &[])
}

/// The statuses of `count` requests to `service` on one keep-alive connection, curl
/// given `options` too.
fn statuses_of(cluster: &TestCluster, service: &str, count: usize, options: &[&str]) -> Vec<u16> {
    let url = format!("http://{service}/");
    let mut argv = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "60",
        "-w",
        "%{http_code}\n",
    ];
    argv.extend(options);
    argv.extend(std::iter::repeat_n(url.as_str(), count));
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

#[test]
fn a_replica_answering_503_is_ejected_kept_out_and_back_on_probation() {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{RETRYING}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    for (name, node) in [("good-0", "node1"), ("good-1", "node1")] {
        let mut server = PodSpec::new(name, node, &[&echo]);
        server.labels.insert("app".into(), "flaky".into());
        cluster.add_pod(server).unwrap();
    }
    let mut broken = PodSpec::new("broken", "node1", &["python3", "-c", BROKEN]);
    broken.labels.insert("app".into(), "flaky".into());
    cluster.add_pod(broken).unwrap();
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    // Each replica, addressed as a pod (no service, so no outlier accounting), answers.
    for (name, status) in [("good-0", 200), ("good-1", 200), ("broken", 503)] {
        wait_for_replica(&cluster, name, status);
    }
    let ejections = || {
        series(
            &agent_metrics(&cluster, "node0"),
            "weft_endpoint_ejections_total",
            &[],
        )
        .unwrap_or(0.0)
    };
    let before = ejections();

    // Round robin sends the broken replica every third request, until its third
    // failure in a row; then nothing while it is out.
    let answered = statuses(&cluster, 30);
    assert_eq!(answered.len(), 30, "{answered:?}");
    let failed = answered.iter().filter(|&&status| status == 503).count();
    assert_eq!(
        failed, 3,
        "ejected at its third gateway error in a row: {answered:?}"
    );
    assert!(
        answered[answered.len() - 15..]
            .iter()
            .all(|&status| status == 200),
        "nothing reaches it while ejected: {answered:?}"
    );
    assert_eq!(ejections() - before, 1.0);
    // Out now: the gauge and the admin port say which.
    let ejected = series(
        &agent_metrics(&cluster, "node0"),
        "weft_endpoints_ejected",
        &[],
    );
    assert_eq!(ejected, Some(1.0));
    let listed = cluster.agent_admin("node0", "/endpoints/ejected").unwrap();
    assert_eq!(listed[0]["workload"], "default/broken", "{listed}");
    assert_eq!(listed[0]["ejections_in_a_row"], 1, "{listed}");

    // Back after its ejection (4 s), it is on probation: its first failure ejects it
    // again, for twice as long.
    wait_until("the broken replica back", Duration::from_secs(20), || {
        statuses(&cluster, 3).contains(&503)
    });
    assert_eq!(ejections() - before, 2.0, "one failure on probation ejects");
    let answered = statuses(&cluster, 30);
    assert!(
        answered.iter().all(|&status| status == 200),
        "out again: {answered:?}"
    );
}

/// Adds pod `name` on `node` with label `app: <app>`, running `command`.
fn add_replica(cluster: &mut TestCluster, name: &str, node: &str, app: &str, command: &[&str]) {
    let mut pod = PodSpec::new(name, node, command);
    pod.labels.insert("app".into(), app.into());
    cluster.add_pod(pod).unwrap();
}

/// Waits until pod `name`, addressed directly on port 8080, answers `status` itself:
/// a 503 the agent makes up while the server does not listen yet (it carries
/// `x-weft-error`) does not count, or the replica's first requests through the service
/// would be connection failures, retried elsewhere and counted against it.
fn wait_for_replica(cluster: &TestCluster, name: &str, status: u16) {
    let ip = cluster
        .topology()
        .pods
        .iter()
        .find(|pod| pod.name == name)
        .map(|pod| pod.ip)
        .unwrap();
    let url = format!("http://{ip}:8080/");
    wait_until(name, Duration::from_secs(20), || {
        let argv = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "-w",
            "%{http_code} %header{x-weft-error}",
            url.as_str(),
        ];
        let output = cluster
            .pod_command("default", "client", &argv)
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim_end() == status.to_string()
    });
}

/// `weft_retries_total` of `service` on node0's agent, of one `result` or all.
fn retries(cluster: &TestCluster, service: &str, result: Option<&str>) -> f64 {
    let mut labels = vec![("service", service)];
    labels.extend(result.map(|result| ("result", result)));
    total(
        &agent_metrics(cluster, "node0"),
        "weft_retries_total",
        &labels,
    )
}

#[test]
fn retries_go_around_broken_and_slow_replicas_but_not_for_posts_and_stop_at_the_budget() {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{RETRYING}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    for (name, app) in [
        ("retried-0", "retried"),
        ("retried-1", "retried"),
        ("sluggish-0", "sluggish"),
    ] {
        add_replica(&mut cluster, name, "node1", app, &[&echo]);
    }
    let broken = ["python3", "-c", BROKEN];
    add_replica(&mut cluster, "retried-broken", "node1", "retried", &broken);
    let slow = ["python3", "-c", SLOW];
    add_replica(&mut cluster, "sluggish-slow", "node1", "sluggish", &slow);
    add_replica(&mut cluster, "down-0", "node1", "down", &broken);
    add_replica(&mut cluster, "down-1", "node1", "down", &broken);
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    for (name, status) in [
        ("retried-0", 200),
        ("retried-broken", 503),
        ("sluggish-0", 200),
        ("down-0", 503),
        ("down-1", 503),
    ] {
        wait_for_replica(&cluster, name, status);
    }
    let retried = "10.96.2.12";

    // Round robin sends every third GET to the broken replica; each is retried on a
    // good one, and the client sees only 200s.
    let answered = statuses_of(&cluster, retried, 30, &[]);
    assert_eq!(answered, vec![200; 30], "{answered:?}");
    let mended = retries(&cluster, "default/retried:80", Some("success"));
    assert!(mended >= 5.0, "{mended} retries of 503s succeeded");
    // A POST may have been acted on: its 503 comes back as it is.
    let posted = statuses_of(&cluster, retried, 6, &["-X", "POST", "-d", "order=1"]);
    assert_eq!(
        posted.iter().filter(|&&status| status == 503).count(),
        2,
        "{posted:?}"
    );

    // The slow replica holds every try 5 s; the per-try timeout (300 ms) moves it on.
    let started = Instant::now();
    let answered = statuses_of(&cluster, "10.96.2.13", 10, &[]);
    eprintln!("sluggish: 10 requests in {:?}", started.elapsed());
    assert_eq!(answered, vec![200; 10], "{answered:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no request waited for the slow replica: {:?}",
        started.elapsed()
    );
    let metrics = agent_metrics(&cluster, "node0");
    let cut = series(
        &metrics,
        "weft_retries_total",
        &[
            ("service", "default/sluggish:80"),
            ("reason", "per-try-timeout"),
            ("result", "success"),
        ],
    );
    assert!(cut.unwrap_or(0.0) >= 3.0, "{cut:?}");

    // Every replica of `down` fails: retries stop at the budget (10 % of the requests
    // and 1 a second), not at 3 per request, and the answers say URX.
    let started = Instant::now();
    let answered = statuses_of(&cluster, "10.96.2.14", 200, &[]);
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(answered, vec![503; 200], "{answered:?}");
    let sent = retries(&cluster, "default/down:80", None)
        - retries(&cluster, "default/down:80", Some("budget_exhausted"));
    let budget = 0.1 * 200.0 + 1.0 * (seconds + 10.0);
    eprintln!("down: {sent} retries sent for 200 requests in {seconds:.1} s (budget {budget:.0})");
    assert!(
        sent > 0.0 && sent <= budget,
        "{sent} retries, budget {budget}"
    );
    assert!(retries(&cluster, "default/down:80", Some("budget_exhausted")) > 0.0);
    let metrics = agent_metrics(&cluster, "node0");
    let exhausted = total(
        &metrics,
        "istio_requests_total",
        &[
            ("destination_service_name", "down"),
            ("response_code", "503"),
            ("response_flags", "URX"),
        ],
    );
    assert_eq!(exhausted, 200.0, "every answer says retries ran out");
}

/// Kills replica `name` with SIGKILL, as the kernel's OOM killer would.
fn kill(cluster: &TestCluster, name: &str) {
    let pid = cluster
        .topology()
        .pods
        .iter()
        .find(|pod| pod.name == name)
        .and_then(|pod| pod.pid)
        .unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[test]
fn a_replica_killed_under_load_costs_no_request_with_retries() {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{RETRYING}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    for (name, node) in [
        ("steady-0", "node1"),
        ("steady-1", "node1"),
        ("steady-2", "node0"),
    ] {
        add_replica(&mut cluster, name, node, "steady", &[&echo]);
    }
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    for name in ["steady-0", "steady-1", "steady-2"] {
        wait_for_replica(&cluster, name, 200);
    }
    let spawn = |argv: &[&str]| {
        cluster
            .pod_command("default", "client", argv)
            .unwrap()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wrk = spawn(&[
        "wrk",
        "-t",
        "1",
        "-c",
        "4",
        "-d",
        "6s",
        "http://10.96.2.15/",
    ]);
    let client = workspace_bin("weft-client").display().to_string();
    let grpc = spawn(&[
        &client,
        "grpc",
        "load",
        "--target",
        "http://10.96.2.15:7070",
        "--connections",
        "2",
        "--rate",
        "400",
        "--duration",
        "6",
    ]);
    // Once both loads are under way, one replica of the other node dies.
    let served = || {
        series(
            &agent_metrics(&cluster, "node0"),
            "istio_requests_total",
            &[
                ("destination_workload", "steady-0"),
                ("response_code", "200"),
            ],
        )
        .unwrap_or(0.0)
    };
    wait_until("load reaches steady-0", Duration::from_secs(10), || {
        served() > 300.0
    });
    kill(&cluster, "steady-0");

    clean_wrk_report(&wrk.wait_with_output().unwrap());
    let load = grpc_load_report(&grpc.wait_with_output().unwrap());
    assert_eq!(load["errors"], 0, "{load}");
    assert!(load["requests"].as_u64().unwrap_or(0) > 1000, "{load}");
    let mended = retries(&cluster, "default/steady:80", Some("success"))
        + retries(&cluster, "default/steady:7070", Some("success"));
    eprintln!("retries that mended a failure: {mended}");
    assert!(mended > 0.0, "the killed replica's requests were retried");
}

#[test]
fn circuit_breakers_queue_refuse_and_retire_connections() {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{GUARDED}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    let tcp_echo = workspace_bin("weft-tcp-echo").display().to_string();
    add_replica(&mut cluster, "guarded-0", "node0", "guarded", &[&echo]);
    add_replica(&mut cluster, "narrow-0", "node1", "narrow", &[&tcp_echo]);
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    wait_for_replica(&cluster, "guarded-0", 200);

    // Six slow requests at once: two in flight, one pending (answered once a slot
    // frees), three refused at once.
    let url = "http://10.96.2.16/?delay=2000";
    let mut argv = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "30",
        "-w",
        "%{http_code}\n",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "6",
    ];
    argv.extend(std::iter::repeat_n(url, 6));
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let mut answered: Vec<u16> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, [200, 200, 200, 503, 503, 503], "{output:?}");
    let metrics = agent_metrics(&cluster, "node0");
    let overflows = total(
        &metrics,
        "weft_circuit_breaker_overflows_total",
        &[
            ("service", "default/guarded:80"),
            ("limit", "maxPendingRequests"),
        ],
    );
    assert_eq!(overflows, 3.0);
    let flagged = total(
        &metrics,
        "istio_requests_total",
        &[
            ("destination_service_name", "guarded"),
            ("response_code", "503"),
            ("response_flags", "UO"),
        ],
    );
    assert_eq!(flagged, 3.0);

    // Nine requests on one client connection ride upstream connections of at most
    // three requests each (one left idle by the requests above may be among them).
    let url = "http://10.96.2.16/";
    let mut argv = vec!["curl", "-s", "-o", "/dev/null", "-D", "-"];
    argv.extend(std::iter::repeat_n(url, 9));
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    let mut carried: BTreeMap<String, usize> = BTreeMap::new();
    for peer in String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.strip_prefix("x-weft-peer: "))
    {
        *carried.entry(peer.trim().to_owned()).or_default() += 1;
    }
    assert_eq!(carried.values().sum::<usize>(), 9, "{output:?}");
    assert!(
        carried.len() >= 3 && carried.values().all(|&requests| requests <= 3),
        "{carried:?}"
    );

    // TCP: a second connection past maxConnections (1) is closed at once; once the
    // first closes, a new one gets through.
    let output = cluster
        .pod_command("default", "client", &["python3", "-c", TCP_CLIENT])
        .unwrap()
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        report.lines().collect::<Vec<_>>(),
        ["first True", "second False", "third True"],
        "{output:?}"
    );
    let refused = total(
        &agent_metrics(&cluster, "node0"),
        "weft_circuit_breaker_overflows_total",
        &[
            ("service", "default/narrow:9000"),
            ("limit", "maxConnections"),
        ],
    );
    assert!(refused >= 1.0, "{refused}");
}

/// The statuses of `count` requests to the faulty service with `x-fault: <fault>`.
fn faulted(cluster: &TestCluster, fault: &str, count: usize) -> Vec<u16> {
    let header = format!("x-fault: {fault}");
    statuses_of(cluster, "10.96.2.18", count, &["-H", &header])
}

#[test]
fn route_rules_inject_the_faults_they_reference() {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{FAULTY}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    add_replica(&mut cluster, "faulty-0", "node1", "faulty", &[&echo]);
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    wait_for_replica(&cluster, "faulty-0", 200);
    wait_until("the routes apply", Duration::from_secs(20), || {
        faulted(&cluster, "abort", 1) == [418]
    });

    assert_eq!(
        faulted(&cluster, "none", 3),
        [200; 3],
        "no fault, no change"
    );
    assert_eq!(faulted(&cluster, "abort", 3), [418; 3]);
    // Held 2 s, past the rule's 500 ms timeout: the delay happened.
    assert_eq!(faulted(&cluster, "delay", 2), [504; 2]);
    let half = faulted(&cluster, "half", 200);
    let aborted = half.iter().filter(|&&status| status == 503).count();
    let answered = half.iter().filter(|&&status| status == 200).count();
    assert_eq!(aborted + answered, 200, "{half:?}");
    assert!(
        plausible_share(aborted, 200, 0.5),
        "about half of 200: {aborted}"
    );
    // A FaultInjection that does not exist fails the rule's requests.
    assert_eq!(faulted(&cluster, "missing", 2), [500; 2]);

    let metrics = agent_metrics(&cluster, "node0");
    let flagged = |flags: &str, code: &str| {
        total(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("response_code", code),
                ("response_flags", flags),
            ],
        )
    };
    assert!(flagged("FI", "418") >= 3.0);
    assert_eq!(flagged("FI", "503"), aborted as f64);
    assert!(flagged("UT", "504") >= 2.0);

    // gRPC: the abort's gRPC status.
    let output = cluster
        .pod_command(
            "default",
            "client",
            &[
                workspace_bin("weft-client").display().to_string().as_str(),
                "grpc",
                "unary",
                "--target",
                "http://10.96.2.18:7070",
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    assert_eq!(line["code"], 8, "RESOURCE_EXHAUSTED: {output:?}");

    // Status: the FaultInjections are accepted; the route names the missing one.
    let status = cluster.controller_status().unwrap();
    let teapot = policy_verdict(&status, "FaultInjection", "teapot");
    assert_eq!(teapot["accepted"], true, "{teapot}");
    let route = policy_verdict(&status, "HTTPRoute", "faulty");
    assert_eq!(route["references"]["reason"], "FilterNotFound", "{route}");
    let message = route["references"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no FaultInjection default/nowhere"),
        "{message}"
    );
}
