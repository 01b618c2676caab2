//! The Grafana dashboards in `deploy/monitoring/dashboards/` against a real Prometheus
//! scraping a 2-node local cluster that carries HTTP and TCP traffic: every PromQL
//! expression of every panel evaluates without error, and the panels an operator
//! looks at first return data.

use std::{path::Path, time::Duration};

use weft_cluster::PodSpec;
use weft_e2e::{Prometheus, TCP_LINE_CLIENT, TestCluster, wait_until, workspace_bin};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: echo, namespace: default }
spec:
  clusterIP: 10.96.5.10
  selector: { app: echo }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: tcp-echo, port: 9000, targetPort: 9000 }
"#;

/// Panels that must show data on a mesh carrying requests.
const KEY_PANELS: [&str; 11] = [
    "Requests per second",
    "Success rate (not 5xx)",
    "Latency p50 and p99",
    "Responses by code",
    "Configuration age",
    "Nodes in sync with the controller",
    "Shortest certificate time left",
    "Kernel events",
    "Connections carried",
    "Agent CPU",
    "Agent memory (resident)",
];

/// Every panel's expressions: (dashboard, panel title, PromQL with Grafana's variables
/// set as a dashboard would set them: every namespace, a 30 s rate window).
fn expressions() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let name = dashboard["title"].as_str().unwrap_or_default().to_owned();
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_default()
                    .replace("$__rate_interval", "30s")
                    .replace("$namespace", ".*");
                found.push((name.clone(), title.clone(), expr));
            }
        }
    }
    found
}

#[test]
fn every_dashboard_expression_evaluates_and_the_key_panels_show_data() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    let echo = workspace_bin("weft-echo").display().to_string();
    let tcp_echo = workspace_bin("weft-tcp-echo").display().to_string();
    let server = format!("{tcp_echo} --listen 0.0.0.0:9000 & exec {echo}");
    let mut pod = PodSpec::new("echo-0", "node1", &["sh", "-c", &server]);
    pod.labels.insert("app".into(), "echo".into());
    pod.service_account = "echo".into();
    cluster.add_pod(pod).unwrap();
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster.add_pod(client).unwrap();
    cluster.settle();
    let curl = |path: &str| {
        let url = format!("http://10.96.5.10{path}");
        let argv = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &url,
        ];
        let output = cluster
            .pod_command("default", "client", &argv)
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    wait_until("echo answers", Duration::from_secs(20), || {
        curl("/") == "200"
    });

    let prometheus = Prometheus::start(&cluster);
    let expressions = expressions();
    let titles: Vec<&str> = expressions
        .iter()
        .map(|(_, title, _)| title.as_str())
        .collect();
    for panel in KEY_PANELS {
        assert!(
            titles.contains(&panel),
            "no panel {panel:?} in the dashboards"
        );
    }
    // Traffic while Prometheus scrapes, so rates have two samples: requests (some of
    // them 503) and TCP connections.
    let mut answered = 0;
    wait_until(
        "every key panel shows data",
        Duration::from_secs(60),
        || {
            answered += u32::from(curl("/") == "200");
            curl("/?status=503");
            let _ = cluster
                .pod_command(
                    "default",
                    "client",
                    &["python3", "-c", TCP_LINE_CLIENT, "10.96.5.10", "9000"],
                )
                .unwrap()
                .output();
            expressions.iter().all(|(_, title, expr)| {
                let answer = prometheus.query(expr);
                assert_eq!(answer["status"], "success", "{title}: {expr}: {answer}");
                let empty = answer["data"]["result"]
                    .as_array()
                    .is_none_or(Vec::is_empty);
                !(KEY_PANELS.contains(&title.as_str()) && empty)
            })
        },
    );
    assert!(answered > 0);
}
