//! Resilience on a 2-node local cluster, with curl:
//!
//! - timeouts: a service's TrafficPolicy `timeouts.request` and the client's own gRPC
//!   deadline (`grpc-timeout`) answer a slow request 504 and leave a quick one alone;
//!   the deadline goes on to the server reduced by the time already spent; the
//!   controller accepts the policy as enforced;
//! - outlier detection: a replica that answers 503 to everything is ejected after its
//!   consecutive failures, gets nothing while ejected, comes back, and is ejected again
//!   by its first failure on probation.

use std::time::Duration;

use weft_cluster::PodSpec;
use weft_e2e::{TestCluster, agent_metrics, policy_verdict, series, wait_until, workspace_bin};

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
  outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 2s, maxEjectionPercent: 50 }
"#;

const FLAKY: &str = "10.96.2.11";

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

#[test]
fn slow_requests_get_504_at_the_nearest_deadline_and_grpc_deadlines_go_on_reduced() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
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

    // Every field the policy sets is enforced, so it is accepted.
    let status = cluster.controller_status().unwrap();
    let verdict = policy_verdict(&status, "TrafficPolicy", "echo");
    assert_eq!(
        (&verdict["accepted"], &verdict["reason"]),
        (&serde_json::json!(true), &serde_json::json!("Accepted")),
        "{verdict}"
    );
}

/// The statuses of `count` requests to the flaky service on one keep-alive connection.
fn statuses(cluster: &TestCluster, count: usize) -> Vec<u16> {
    let url = format!("http://{FLAKY}/");
    let mut argv = vec![
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "20",
        "-w",
        "%{http_code}\n",
    ];
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
    let mut cluster = TestCluster::with_mesh(2, MESH);
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
    let pods: Vec<(String, u16)> = cluster
        .topology()
        .pods
        .iter()
        .filter(|pod| pod.labels.get("app").map(String::as_str) == Some("flaky"))
        .map(|pod| {
            let status = if pod.name == "broken" { 503 } else { 200 };
            (format!("http://{}:8080/", pod.ip), status)
        })
        .collect();
    for (url, status) in &pods {
        wait_until(url, Duration::from_secs(20), || {
            let argv = [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url.as_str(),
            ];
            let output = cluster
                .pod_command("default", "client", &argv)
                .unwrap()
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout) == status.to_string()
        });
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
        "ejected at its third failure in a row: {answered:?}"
    );
    assert!(
        answered[answered.len() - 15..]
            .iter()
            .all(|&status| status == 200),
        "nothing reaches it while ejected: {answered:?}"
    );
    assert_eq!(ejections() - before, 1.0);

    // Back after its ejection (2 s), it is on probation: its first failure ejects it
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
