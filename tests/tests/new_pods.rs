//! A new pod's first connection, on a 2-node local cluster: a pod is captured from the
//! moment the CNI plugin enrolls it, before the controller has told the agents about
//! it. Its first request must wait for the mesh configuration (and for its new
//! service account's certificate) instead of failing; a pod the configuration never
//! names is refused once the wait is over, with a reason that says so.

use std::{fs, time::Duration};

use weft_cluster::{PodInfo, PodSpec};
use weft_e2e::{TestCluster, agent_log, agent_metrics, samples, series, wait_until, workspace_bin};

const SERVICE: &str = "10.96.0.10";

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: default }
spec:
  clusterIP: 10.96.0.10
  selector: { app: echo }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
"#;

/// A cluster whose service `echo` has its one replica on node1: clients on node1 reach
/// it on their node, clients on node0 through an HBONE tunnel.
fn cluster() -> TestCluster {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut server = PodSpec::new("echo-0", "node1", &[&echo]);
    server.labels.insert("app".into(), "echo".into());
    server.service_account = "echo".into();
    cluster
        .add_pod(server)
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    cluster
}

/// A pod whose command's first action is one request to the service; it prints the
/// HTTP status (`000` when there was no answer) and the seconds the request took.
fn first_request_pod(name: &str, node: &str, service_account: &str) -> PodSpec {
    let url = format!("http://{SERVICE}/");
    let mut spec = PodSpec::new(
        name,
        node,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "-w",
            "first request: %{http_code} %{time_total}\n",
            &url,
        ],
    );
    spec.service_account = service_account.into();
    spec
}

/// The `(status, seconds)` the pod's first request printed, once it has.
fn first_request(pod: &PodInfo) -> Option<(String, f64)> {
    let log = fs::read_to_string(&pod.log).ok()?;
    let line = log
        .lines()
        .find_map(|line| line.strip_prefix("first request: "))?;
    let (status, seconds) = line.split_once(' ')?;
    Some((status.to_owned(), seconds.parse().ok()?))
}

fn waits(cluster: &TestCluster, node: &str, what: &str, result: &str) -> f64 {
    let metrics = agent_metrics(cluster, node);
    series(
        &metrics,
        "weft_outbound_waits_total",
        &[("for", what), ("result", result)],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_hundred_new_pods_in_a_row_each_get_an_answer_to_their_first_request() {
    let mut cluster = cluster();
    // Every pod has a service account of its own, so its node's agent also has to get
    // a certificate for it before a tunnel can leave as that identity.
    let pods: Vec<PodInfo> = (0..100)
        .map(|index| {
            let node = if index % 2 == 0 { "node0" } else { "node1" };
            let spec =
                first_request_pod(&format!("first-{index}"), node, &format!("first-{index}"));
            cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"))
        })
        .collect();
    wait_until(
        "every pod's first request to end",
        Duration::from_secs(120),
        || pods.iter().all(|pod| first_request(pod).is_some()),
    );
    let failed: Vec<String> = pods
        .iter()
        .filter_map(|pod| {
            let (status, seconds) = first_request(pod).expect("every request ended");
            (status != "200")
                .then(|| format!("{} on {}: {status} after {seconds}s", pod.name, pod.node))
        })
        .collect();
    let slowest = pods
        .iter()
        .filter_map(first_request)
        .map(|(_, seconds)| seconds)
        .fold(0.0, f64::max);
    let waited: f64 = ["node0", "node1"]
        .iter()
        .map(|node| waits(&cluster, node, "workload", "found"))
        .sum();
    let timed_out: f64 = ["node0", "node1"]
        .iter()
        .flat_map(|node| {
            ["workload", "certificate"].map(|what| waits(&cluster, node, what, "timed_out"))
        })
        .sum();
    eprintln!(
        "first requests: {} of 100 answered 200 (slowest {slowest:.3} s); {waited} waited for the configuration",
        100 - failed.len()
    );
    assert!(
        failed.is_empty(),
        "first requests without an answer: {failed:#?}"
    );
    assert_eq!(timed_out, 0.0, "no wait may have run out");
    assert!(
        waited > 0.0,
        "the pods connected before the configuration named them, so some must have waited"
    );
    assert!(
        waits(&cluster, "node0", "certificate", "found") > 0.0,
        "pods on node0 reach echo-0 on node1 in tunnels, which needed their new certificates"
    );
    // What the HBONE handshakes of 50 new identities took on node1, for the handshake
    // deadline's sake (ARCHITECTURE.md).
    let metrics = agent_metrics(&cluster, "node1");
    let buckets: Vec<String> = samples(&metrics, "weft_hbone_handshake_seconds_bucket")
        .into_iter()
        .map(|(labels, count)| format!("<= {} s: {count}", labels["le"]))
        .collect();
    eprintln!("inbound handshakes on node1: {}", buckets.join(", "));
}

#[test]
fn a_pod_the_configuration_never_names_is_refused_after_the_wait_with_the_reason() {
    let mut cluster = cluster();
    // Without the controller, the agents never hear of the new pod; its node's agent
    // enrolls it all the same (the namespace is meshed), so its traffic is captured.
    cluster
        .stop_controller()
        .unwrap_or_else(|err| panic!("{err}"));
    let ghost = cluster
        .add_pod(first_request_pod("ghost", "node0", "ghost"))
        .unwrap_or_else(|err| panic!("{err}"));
    wait_until(
        "the ghost's request to end",
        Duration::from_secs(30),
        || first_request(&ghost).is_some(),
    );
    let (status, seconds) = first_request(&ghost).unwrap();
    eprintln!("a pod the configuration never names: HTTP {status} after {seconds:.3} s");
    assert_eq!(status, "000", "no answer: the connection is refused");
    assert!(
        seconds >= 5.0,
        "refused only after the 5 s wait, not at once ({seconds} s)"
    );
    let metrics = agent_metrics(&cluster, "node0");
    let refused = series(
        &metrics,
        "weft_connections_refused_total",
        &[("direction", "outbound"), ("reason", "unknown_source")],
    );
    assert_eq!(refused, Some(1.0), "{metrics}");
    assert_eq!(waits(&cluster, "node0", "workload", "timed_out"), 1.0);
    let log = agent_log(&cluster, "node0");
    let reason = format!("outbound connection from {}:", ghost.ip);
    let line = log
        .lines()
        .find(|line| line.contains(&reason) && line.contains("refused"))
        .unwrap_or_else(|| panic!("no refusal of {} in the agent's log", ghost.ip));
    assert!(
        line.contains("is not a workload of the mesh configuration, after waiting 5s")
            && line.contains("is the controller running"),
        "{line}"
    );
}
