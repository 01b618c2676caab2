//! Request timeouts on a 2-node local cluster, with curl: a service's TrafficPolicy
//! `timeouts.request` and the client's own gRPC deadline (`grpc-timeout`) answer a slow
//! request 504 and leave a quick one alone; the deadline goes on to the server reduced
//! by the time already spent; the controller accepts the policy as enforced.

use std::time::Duration;

use weft_cluster::PodSpec;
use weft_e2e::{TestCluster, policy_verdict, wait_until, workspace_bin};

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
