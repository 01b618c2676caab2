//! weftctl against running local clusters, as an operator runs it: `check`, `status`,
//! `certs` and `config` describe a healthy mesh from what its controller and agents
//! say, their JSON and YAML parse, `check` fails naming the cause when an agent stops
//! or a pod's certificate expires, `explain` agrees with what the data path did
//! for an allowed, a denied and an unrouted request, and `observe` shows a STRICT drop
//! and a denial as they happen while a stalled watcher slows no traffic. Through a
//! Kubernetes API server (the fake, its pods mirroring a local cluster's), weftctl
//! reads the same mesh as an operator bound to the install's roles, and is refused
//! with what to bind before.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, mpsc},
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use weft_cluster::{AgentPort, Cluster, PodSpec};
use weft_e2e::{
    TestCluster, agent_metrics, clean_wrk_report, run_in_pod, total, wait_until, workspace_bin,
};
use weft_fake_api::{FakeApi, Subject};

/// The default namespace meshed in STRICT mode with the echo service.
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
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mode: STRICT }
---
# The client may read, nothing else.
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: default }
spec:
  selector: { matchLabels: { app: echo } }
  action: ALLOW
  rules:
    - from: [{ principals: [cluster.local/ns/default/sa/client] }]
      to: [{ methods: [GET] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: echo, namespace: default }
spec:
  parentRefs: [{ group: "", kind: Service, name: echo, port: 80 }]
  rules:
    - name: api
      matches: [{ path: { type: PathPrefix, value: /api } }]
      backendRefs: [{ name: echo, port: 80 }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: default }
spec: { service: echo, loadBalancer: { algorithm: ROUND_ROBIN } }
"#;

/// Runs `weftctl TARGET ARGS`, where TARGET names the mesh (`--local NAME`,
/// `--kubeconfig FILE`): whether it exited 0, and what it printed. Exit code 2 (it
/// could not run at all) fails the test.
fn weftctl_at(target: &[&str], args: &[&str]) -> (bool, String) {
    let output = Command::new(workspace_bin("weftctl"))
        .args(target)
        .args(args)
        .output()
        .expect("weftctl runs");
    assert_ne!(
        output.status.code(),
        Some(2),
        "weftctl {target:?} {args:?}: {output:?}"
    );
    (
        output.status.success(),
        String::from_utf8(output.stdout).expect("weftctl prints UTF-8"),
    )
}

/// Runs `weftctl --local <cluster> ARGS` (see [`weftctl_at`]).
fn weftctl(cluster: &TestCluster, args: &[&str]) -> (bool, String) {
    weftctl_at(&["--local", &cluster.topology().name], args)
}

/// `weftctl check -o json`: whether it passed, and each check by subject.
fn check(cluster: &TestCluster) -> (bool, Vec<(String, String, String)>) {
    check_at(&["--local", &cluster.topology().name])
}

/// `weftctl TARGET check -o json` (see [`weftctl_at`]).
fn check_at(target: &[&str]) -> (bool, Vec<(String, String, String)>) {
    let (passed, json) = weftctl_at(target, &["check", "-o", "json"]);
    let report: Value = serde_json::from_str(&json).expect("check -o json is JSON");
    let checks = report["checks"]
        .as_array()
        .expect("a list of checks")
        .iter()
        .map(|check| {
            let text = |key: &str| check[key].as_str().unwrap_or_default().to_owned();
            (text("subject"), text("outcome"), text("message"))
        })
        .collect();
    (passed, checks)
}

fn outcome_of(checks: &[(String, String, String)], subject: &str) -> (String, String) {
    checks
        .iter()
        .find(|(found, _, _)| found == subject)
        .map(|(_, outcome, message)| (outcome.clone(), message.clone()))
        .unwrap_or_else(|| panic!("no check {subject} in {checks:?}"))
}

/// The echo pod (service account `echo`) on the last node and a client on node0.
fn pods(cluster: &mut TestCluster) {
    let last = format!("node{}", cluster.topology().nodes.len() - 1);
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut spec = PodSpec::new("echo", &last, &[&echo]);
    spec.labels.insert("app".into(), "echo".into());
    spec.service_account = "echo".into();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster
        .add_pod(client)
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
}

/// The status code of `curl -X METHOD url` from the client pod.
fn request(cluster: &TestCluster, method: &str, url: &str) -> String {
    let argv = [
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
        url,
    ];
    let output = cluster
        .pod_command("default", "client", &argv)
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `weftctl explain -o json` of a request from the client to the echo service.
fn explain(cluster: &TestCluster, from: &str, method: &str, path: &str) -> Value {
    let args = [
        "explain",
        "--from",
        from,
        "--to",
        "default/echo:80",
        "--method",
        method,
        "--path",
        path,
        "-o",
        "json",
    ];
    let (passed, json) = weftctl(cluster, &args);
    assert!(passed, "{json}");
    serde_json::from_str(&json).expect("explain -o json is JSON")
}

#[test]
fn weftctl_explain_agrees_with_what_the_data_path_does() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pods(&mut cluster);
    let client = "default/client";
    let principal = "spiffe://cluster.local/ns/default/sa/client";
    wait_until(
        "the echo service to answer",
        Duration::from_secs(10),
        || request(&cluster, "GET", "http://10.96.0.10/api/x") == "200",
    );

    // Allowed: the data path answers 200, explain says ALLOW by the policy's rule.
    let allowed = explain(&cluster, client, "GET", "/api/x");
    let decision = &allowed["authorization"]["destinations"][0];
    assert_eq!(decision["pod"], "default/echo", "{allowed:#}");
    assert_eq!(decision["decision"], "ALLOW", "{allowed:#}");
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("default/readers"),
        "{allowed:#}"
    );
    assert_eq!(allowed["route"]["outcome"], "routed", "{allowed:#}");
    assert_eq!(allowed["route"]["rule"]["name"], "api", "{allowed:#}");
    assert_eq!(
        allowed["traffic_policy"]["loadBalancing"], "ROUND_ROBIN",
        "{allowed:#}"
    );
    assert_eq!(
        allowed["paths"],
        serde_json::json!([{ "pod": "default/echo", "node": "node1", "mode": "STRICT", "path": "HBONE node0 → node1" }])
    );

    // Denied: 403 on the wire; explain, asked with the access log's fields (the
    // caller's principal), says DENY and names the policy.
    assert_eq!(request(&cluster, "POST", "http://10.96.0.10/api/x"), "403");
    let denied = explain(&cluster, principal, "POST", "/api/x");
    let decision = &denied["authorization"]["destinations"][0];
    assert_eq!(decision["decision"], "DENY", "{denied:#}");
    assert_eq!(
        decision["policies"],
        serde_json::json!(["default/readers (ALLOW)"])
    );

    // No rule of the route matches /home: 404 on the wire, `no_match` in explain.
    assert_eq!(request(&cluster, "GET", "http://10.96.0.10/home"), "404");
    let unrouted = explain(&cluster, client, "GET", "/home");
    assert_eq!(unrouted["route"]["outcome"], "no_match", "{unrouted:#}");

    let (_, table) = weftctl(
        &cluster,
        &[
            "explain",
            "--from",
            client,
            "--to",
            "default/echo:80",
            "--method",
            "GET",
            "--path",
            "/api",
        ],
    );
    assert!(
        table.contains("route: HTTPRoute/default/echo rule api → default/echo:80 (weight 1)"),
        "{table}"
    );
}

#[test]
fn weftctl_describes_a_healthy_mesh_and_names_a_stopped_agent() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pods(&mut cluster);

    let (passed, checks) = check(&cluster);
    assert!(passed, "{checks:?}");
    let subjects: Vec<&str> = checks
        .iter()
        .map(|(subject, ..)| subject.as_str())
        .collect();
    assert_eq!(
        subjects,
        [
            "controller",
            "ca",
            "agent node0",
            "config node0",
            "certificates node0",
            "agent node1",
            "config node1",
            "certificates node1"
        ]
    );
    assert!(
        checks.iter().all(|(_, outcome, _)| outcome == "pass"),
        "{checks:?}"
    );
    assert!(
        outcome_of(&checks, "certificates node1")
            .1
            .starts_with("1 valid"),
        "{checks:?}"
    );
    let (_, table) = weftctl(&cluster, &["check"]);
    assert!(table.ends_with("every check passed\n"), "{table}");

    let (_, json) = weftctl(&cluster, &["status", "-o", "json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["agent"], "ready", "{status:#}");
        assert_eq!(node["in_sync"], true, "{status:#}");
        assert_eq!(node["pods"], 1, "{status:#}");
    }
    assert_eq!(
        status["namespaces"],
        serde_json::json!([{ "namespace": "default", "mode": "STRICT", "pods": 2 }])
    );

    let (_, json) = weftctl(&cluster, &["certs", "--node", "node1", "-o", "json"]);
    let certs: Value = serde_json::from_str(&json).unwrap();
    let node1 = &certs["nodes"][0];
    assert_eq!(node1["node"], "node1");
    assert_eq!(
        node1["certificates"][0]["identity"],
        "spiffe://cluster.local/ns/default/sa/echo"
    );
    assert!(
        node1["certificates"][0]["expires_in_seconds"]
            .as_i64()
            .unwrap()
            > 3_600
    );
    assert!(
        certs["ca"]["signing_root"]
            .as_str()
            .unwrap()
            .contains("weft mesh root")
    );

    let (_, yaml) = weftctl(
        &cluster,
        &[
            "config",
            "--node",
            "node1",
            "--kind",
            "workloads",
            "-o",
            "yaml",
        ],
    );
    let config: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("config -o yaml is YAML");
    assert_eq!(config["in_sync"], serde_yaml::Value::Bool(true));
    assert_eq!(config["applied_version"], config["current_version"]);
    let workloads = config["resources"]["workloads"].as_sequence().unwrap();
    assert!(
        workloads
            .iter()
            .any(|workload| workload["name"] == "echo" && workload["node"] == "node1"),
        "{yaml}"
    );

    // An agent stops: check fails, naming the node and what it lacks.
    cluster.stop_agent("node1").unwrap();
    wait_until(
        "check to see node1's agent gone",
        Duration::from_secs(10),
        || {
            let (passed, checks) = check(&cluster);
            !passed
                && outcome_of(&checks, "agent node1")
                    == ("fail".into(), "not ready: no answer".into())
                && outcome_of(&checks, "config node1")
                    == (
                        "fail".into(),
                        "the agent is not subscribed to the controller".into(),
                    )
                && outcome_of(&checks, "agent node0").0 == "pass"
        },
    );
    let (passed, table) = weftctl(&cluster, &["check"]);
    assert!(!passed);
    assert!(
        table.contains("agent node1         FAIL    not ready: no answer →"),
        "{table}"
    );
    assert!(table.ends_with("2 check(s) failed\n"), "{table}");
}

/// A kubeconfig for the fake API server at `url`, as user `alice` with `token`.
fn kubeconfig(url: &str, token: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "fake", "cluster": { "server": url } }],
        "users": [{ "name": "alice", "user": { "token": token } }],
        "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": "alice" } }],
        "current-context": "fake",
    });
    std::fs::write(file.path(), config.to_string()).unwrap();
    file
}

/// What a Kubernetes API server knows of `cluster` once weft is installed: its nodes,
/// an agent pod on each (as the DaemonSet makes them), a controller pod that holds
/// the Lease; port-forwards to those pods reach the cluster's agents and controller.
fn mirror_in_api_server(cluster: &TestCluster, fake: &FakeApi) {
    let labels = |name: &str| serde_json::json!({ "app.kubernetes.io/name": name });
    let ready = serde_json::json!({ "conditions": [{ "type": "Ready", "status": "True" }] });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for node in cluster.topology().node_names() {
        fake.create(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": { "name": node },
            "status": {
                "nodeInfo": { "kernelVersion": kernel.trim(), "operatingSystem": "linux" },
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        }));
        fake.create(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": format!("weft-agent-{node}"), "namespace": "weft-system",
                "labels": labels("weft-agent"),
            },
            "spec": { "nodeName": node },
            "status": ready,
        }));
    }
    fake.create(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "weft-controller-0", "namespace": "weft-system",
            "labels": labels("weft-controller"),
        },
        "status": ready,
    }));
    fake.create(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "weft-controller", "namespace": "weft-system" },
        "spec": {
            "holderIdentity": "weft-controller-0",
            "leaseDurationSeconds": 15,
            "renewTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        },
    }));
    let handle = Cluster::open(&cluster.topology().name).unwrap();
    fake.set_dialer(Arc::new(move |pod: &Value, port| {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let connected = match name.strip_prefix("weft-agent-") {
            Some(node) => {
                let port = match port {
                    15000 => AgentPort::Admin,
                    15020 => AgentPort::Metrics,
                    15021 => AgentPort::Ready,
                    other => return Err(std::io::Error::other(format!("no agent port {other}"))),
                };
                handle.agent_connect(node, port)
            }
            None => handle.controller_connect(),
        };
        connected.map_err(std::io::Error::other)
    }));
}

#[test]
fn weftctl_reads_a_kubernetes_cluster_through_its_api_server() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pods(&mut cluster);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeApi::start());
    mirror_in_api_server(&cluster, &fake);
    fake.add_token(
        "alice-token",
        &[],
        serde_json::json!({ "username": "alice" }),
    );
    let config = kubeconfig(fake.url(), "alice-token");
    let kube = ["--kubeconfig", config.path().to_str().unwrap()];

    // Without the operator's roles: a refusal that says what to bind.
    let refused = Command::new(workspace_bin("weftctl"))
        .args(kube)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(
        stderr.contains("does not let you list the nodes")
            && stderr.contains("weft-operator ClusterRole"),
        "{stderr}"
    );
    assert!(!fake.take_forbidden().is_empty());

    fake.bind(
        Subject::User("alice".into()),
        "ClusterRole",
        "weft-operator",
        None,
    );
    fake.bind(
        Subject::User("alice".into()),
        "Role",
        "weft-operator",
        Some("weft-system"),
    );
    // Before an install: each node's kernel and OS, as the API server reports them.
    let (passed, json) = weftctl_at(&kube, &["check", "--pre", "-o", "json"]);
    let report: Value = serde_json::from_str(&json).unwrap();
    assert!(passed, "{report:#}");
    let subjects: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["node node0", "node node1"]);

    // The same checks as the local cluster's, with the same outcomes, and the leader.
    let (passed, checks) = check_at(&kube);
    assert!(passed, "{checks:?}");
    let (_, local) = check(&cluster);
    let without_leader: Vec<(&str, &str)> = checks
        .iter()
        .filter(|(subject, ..)| subject != "leader")
        .map(|(subject, outcome, _)| (subject.as_str(), outcome.as_str()))
        .collect();
    let local: Vec<(&str, &str)> = local
        .iter()
        .map(|(subject, outcome, _)| (subject.as_str(), outcome.as_str()))
        .collect();
    assert_eq!(without_leader, local);
    assert_eq!(
        outcome_of(&checks, "leader"),
        ("pass".into(), "weft-controller-0 leads".into())
    );
    assert!(
        fake.requests(
            "create",
            "/api/v1/namespaces/weft-system/pods/weft-agent-node1/portforward"
        ) > 0
    );

    let (_, json) = weftctl_at(&kube, &["status", "-o", "json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["agent"], "ready", "{status:#}");
        assert_eq!(node["in_sync"], true, "{status:#}");
    }
    assert_eq!(
        status["namespaces"],
        serde_json::json!([{ "namespace": "default", "mode": "STRICT", "pods": 2 }])
    );

    let identity = |target: &[&str]| {
        let (_, json) = weftctl_at(target, &["certs", "--node", "node1", "-o", "json"]);
        let certs: Value = serde_json::from_str(&json).unwrap();
        certs["nodes"][0]["certificates"][0]["identity"].clone()
    };
    assert_eq!(identity(&kube), "spiffe://cluster.local/ns/default/sa/echo");
    let version = |target: &[&str]| {
        let (_, json) = weftctl_at(target, &["config", "--node", "node0", "-o", "json"]);
        let config: Value = serde_json::from_str(&json).unwrap();
        config["applied_version"].clone()
    };
    assert_eq!(
        version(&kube),
        version(&["--local", &cluster.topology().name])
    );

    // A denied request, seen by the agent's observer through the port-forward.
    assert_eq!(request(&cluster, "POST", "http://10.96.0.10/api/x"), "403");
    let (passed, json) = weftctl_at(&kube, &["observe", "--verdict", "deny", "-o", "json"]);
    let observed: Value = serde_json::from_str(&json).unwrap();
    assert!(passed, "{observed:#}");
    assert!(
        observed["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["method"] == "POST" && event["status"] == 403),
        "{observed:#}"
    );
    // analyze over what the API server holds (a route shadowed by an older one), then
    // with a file applied on top (a policy weft refuses).
    fake.create(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "shop", "labels": { "weft.dev/mesh": "enabled" } },
    }));
    fake.create(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "clusterIP": "10.96.0.20", "selector": { "app": "web" },
                  "ports": [{ "name": "http", "port": 80 }] },
    }));
    for route in ["a-first", "b-second"] {
        fake.create(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": route, "namespace": "shop" },
            "spec": {
                "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }],
                "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": "/" } }],
                            "backendRefs": [{ "name": "web", "port": 80 }] }],
            },
        }));
    }
    let findings = |args: &[&str]| {
        let (passed, json) = weftctl_at(&kube, args);
        let analysis: Value = serde_json::from_str(&json).unwrap();
        let found: Vec<(String, String, String)> = analysis["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|finding| {
                let text = |key: &str| finding[key].as_str().unwrap_or_default().to_owned();
                (text("file"), text("object"), text("reason"))
            })
            .collect();
        (passed, found)
    };
    let shadowed = (
        "cluster/HTTPRoute".to_owned(),
        "HTTPRoute shop/b-second".to_owned(),
        "Shadowed".to_owned(),
    );
    let (passed, found) = findings(&["analyze", "-o", "json"]);
    assert!(passed && found.contains(&shadowed), "{found:?}");
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: { name: everyone, namespace: shop }\n\
         spec: { rules: [{ from: [{}] }] }\n",
    )
    .unwrap();
    let file = policy.path().to_str().unwrap();
    let (passed, found) = findings(&["analyze", "--cluster", "-f", file, "-o", "json"]);
    assert!(!passed);
    assert!(found.contains(&shadowed), "{found:?}");
    assert!(
        found.contains(&(
            file.to_owned(),
            "AuthorizationPolicy shop/everyone".to_owned(),
            "Invalid".to_owned()
        )),
        "{found:?}"
    );
    // The local cluster's own objects, the same way: all of them apply.
    let (passed, json) = weftctl(&cluster, &["analyze"]);
    assert!(passed, "{json}");

    // A node whose agent pod is gone: named, with where to look.
    fake.delete("Pod", "weft-system", "weft-agent-node1");
    let (passed, checks) = check_at(&kube);
    assert!(!passed);
    let (outcome, message) = outcome_of(&checks, "agent node1");
    assert_eq!(outcome, "fail");
    assert!(
        message.contains("no weft-agent pod runs on node node1"),
        "{message}"
    );
}

#[test]
fn weftctl_check_names_an_expired_certificate() {
    let mut cluster = TestCluster::with_mesh_and_controller_args(1, MESH, &["--cert-ttl", "8s"]);
    pods(&mut cluster);
    let (passed, checks) = check(&cluster);
    assert!(passed, "{checks:?}");
    // Without the CA, the agent cannot renew; its certificate runs out.
    cluster.stop_controller().unwrap();
    wait_until(
        "check to name the expired certificate",
        Duration::from_secs(30),
        || {
            let (passed, checks) = check(&cluster);
            let (outcome, message) = outcome_of(&checks, "certificates node0");
            // The agent lets an expired certificate go: what is missing is named.
            !passed
                && outcome == "fail"
                && message
                    .starts_with("no valid certificate for spiffe://cluster.local/ns/default/sa/")
        },
    );
}

/// `weftctl observe --follow -o json ARGS` in the background, each event it prints
/// handed over with the wall-clock time it was read.
struct Follower {
    child: Child,
    events: mpsc::Receiver<(SystemTime, Value)>,
}

impl Follower {
    fn start(cluster: &TestCluster, args: &[&str]) -> Self {
        let mut child = Command::new(workspace_bin("weftctl"))
            .args(["--local", &cluster.topology().name, "observe", "--follow"])
            .args(["-o", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("weftctl runs");
        let stdout = child.stdout.take().unwrap();
        let (sender, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str(&line).expect("observe prints JSON lines");
                if sender.send((SystemTime::now(), event)).is_err() {
                    break;
                }
            }
        });
        Self { child, events }
    }

    /// The first event `wanted` picks, read within `deadline`, and when it was read.
    fn find(
        &self,
        what: &str,
        deadline: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> (SystemTime, Value) {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((read, event)) if wanted(&event) => return (read, event),
                Ok(_) => {}
                Err(_) => panic!("observe --follow showed no {what} within {deadline:?}"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long after `event` happened it was read.
fn delay(read: SystemTime, event: &Value) -> Duration {
    let happened = SystemTime::UNIX_EPOCH
        + Duration::from_nanos(event["timeUnixNanos"].as_i64().expect("a time") as u64);
    read.duration_since(happened).unwrap_or_default()
}

#[test]
fn weftctl_observe_follows_a_strict_drop_and_a_denial_as_they_happen() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pods(&mut cluster);
    // Outside the mesh: its plaintext into the STRICT echo pod is dropped in the kernel.
    let mut batch = PodSpec::new("batch", "node0", &[]);
    batch
        .annotations
        .insert("weft.dev/mesh".to_owned(), "disabled".to_owned());
    cluster.add_pod(batch).unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    let echo = cluster.topology().pod("default", "echo").unwrap().ip;

    let follower = Follower::start(&cluster, &[]);
    // Following once the client's allowed requests show up.
    wait_until("observe to follow", Duration::from_secs(20), || {
        request(&cluster, "GET", "http://10.96.0.10/api/x") == "200"
            && follower
                .events
                .recv_timeout(Duration::from_millis(500))
                .is_ok_and(|(_, event)| event["kind"] == "request" && event["verdict"] == "ok")
    });

    let url = format!("http://{echo}:8080/");
    let mut plaintext = cluster
        .pod_command("default", "batch", &["curl", "-s", "--max-time", "3", &url])
        .unwrap()
        .spawn()
        .unwrap();
    let destination = format!("{echo}:8080");
    let (read, drop) = follower.find("STRICT drop", Duration::from_secs(10), |event| {
        event["kind"] == "kernel"
            && event["verdict"] == "drop"
            && event["reason"] == "strict_plaintext"
            && event["destination"]["address"] == destination.as_str()
    });
    assert_eq!(drop["node"], "node1", "{drop}");
    assert_eq!(drop["destination"]["workload"], "echo", "{drop}");
    assert!(
        delay(read, &drop) < Duration::from_secs(1),
        "the drop showed {:?} after it happened",
        delay(read, &drop)
    );
    assert!(!plaintext.wait().unwrap().success(), "plaintext got in");

    assert_eq!(request(&cluster, "POST", "http://10.96.0.10/api/x"), "403");
    // The kernel's redirect of that connection names the client, whose network
    // namespace made it, though connect() had no source address yet.
    let (_, redirect) = follower.find("outbound redirect", Duration::from_secs(10), |event| {
        event["kind"] == "kernel"
            && event["verdict"] == "redirect"
            && event["destination"]["address"] == "10.96.0.10:80"
    });
    assert_eq!(redirect["source"]["workload"], "client", "{redirect}");
    let (read, denied) = follower.find("denial", Duration::from_secs(10), |event| {
        event["kind"] == "request" && event["verdict"] == "deny"
    });
    assert_eq!(denied["status"], 403, "{denied}");
    assert_eq!(denied["method"], "POST", "{denied}");
    assert_eq!(denied["flags"], "RBAC", "{denied}");
    assert_eq!(denied["source"]["workload"], "client", "{denied}");
    assert_eq!(
        denied["source"]["identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert!(
        delay(read, &denied) < Duration::from_secs(1),
        "the denial showed {:?} after it happened",
        delay(read, &denied)
    );

    // Without --follow: the recent drops and denials, filtered by the agents.
    let (passed, json) = weftctl(&cluster, &["observe", "--verdict", "deny", "-o", "json"]);
    assert!(passed, "{json}");
    let recent: Value = serde_json::from_str(&json).unwrap();
    let events = recent["events"].as_array().unwrap();
    assert!(!events.is_empty(), "{recent:#}");
    assert!(
        events.iter().all(|event| event["verdict"] == "deny"),
        "{recent:#}"
    );
    let (_, json) = weftctl(
        &cluster,
        &[
            "observe",
            "--to",
            &echo.to_string(),
            "--verdict",
            "drop",
            "-o",
            "json",
        ],
    );
    let recent: Value = serde_json::from_str(&json).unwrap();
    assert!(
        recent["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["reason"] == "strict_plaintext"),
        "{recent:#}"
    );
    let (_, json) = weftctl(
        &cluster,
        &[
            "observe",
            "--from",
            "default/echo",
            "--verdict",
            "deny",
            "-o",
            "json",
        ],
    );
    let recent: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(recent["events"], serde_json::json!([]), "{recent:#}");
    // status lists the newest drops beside the counters.
    let (_, json) = weftctl(&cluster, &["status", "-o", "json"]);
    let status: Value = serde_json::from_str(&json).unwrap();
    assert!(
        status["recent_drops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|drop| drop["reason"] == "strict_plaintext" && drop["node"] == "node1"),
        "{status:#}"
    );
    let (_, table) = weftctl(&cluster, &["observe"]);
    assert!(
        table.contains("request     deny      default/client -> default/echo  POST"),
        "{table}"
    );
}

/// The request rate wrk reports.
fn requests_per_second(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|rate| rate.trim().parse().ok())
        .unwrap_or_else(|| panic!("no rate in {report}"))
}

#[test]
fn a_stalled_observer_loses_events_rather_than_slowing_traffic() {
    let mut cluster = TestCluster::with_mesh(2, MESH);
    pods(&mut cluster);
    wait_until(
        "the echo service to answer",
        Duration::from_secs(10),
        || request(&cluster, "GET", "http://10.96.0.10/api/x") == "200",
    );
    let load = || {
        let wrk = ["wrk", "-t1", "-c4", "-d3s", "http://10.96.0.10/api/x"];
        requests_per_second(&clean_wrk_report(&run_in_pod(&cluster, "client", &wrk)))
    };
    // The better of two runs: the other end-to-end tests load these two cores at
    // times of their own, and a single run can fall into one of their bursts.
    let best_of_two = || load().max(load());
    let alone = best_of_two();

    // A watcher of everything that never reads: its pipe fills, then its stream.
    let mut stalled = Command::new(workspace_bin("weftctl"))
        .args(["--local", &cluster.topology().name, "observe", "--follow"])
        .args(["-o", "json"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("weftctl runs");
    let lost = |node: &str| {
        total(
            &agent_metrics(&cluster, node),
            "weft_observe_events_lost_total",
            &[],
        )
    };
    // Each round carries thousands of requests, each an event on both nodes.
    wait_until(
        "the stalled watcher to lose events",
        Duration::from_secs(30),
        || {
            load();
            lost("node0") > 0.0
        },
    );
    let watched = best_of_two();
    let _ = stalled.kill();
    let _ = stalled.wait();
    eprintln!("requests/s: {alone:.0} without a watcher, {watched:.0} beside a stalled one");
    assert!(
        watched > alone / 2.0,
        "a stalled watcher slowed traffic: {watched:.0}/s against {alone:.0}/s"
    );
}
