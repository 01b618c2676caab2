//! Authorization on a 2-node local cluster with real clients (curl, weft-client's gRPC
//! calls, raw TCP): identity, namespace and default-deny rules across nodes and on one
//! node, HTTP rules per request with 403 and gRPC `PERMISSION_DENIED`, dry run, plaintext
//! into a PERMISSIVE pod judged in the kernel, an established connection cut when a
//! policy change denies it, and `explain` answers on the agents' and the controller's
//! admin ports that match what the data path did.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use weft_cluster::{Cluster, PodSpec};
use weft_e2e::{
    TCP_LINE_CLIENT, TestCluster, agent_log, agent_metrics, samples, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(20);
const WEB: &str = "10.96.0.40";
const DB: &str = "10.96.0.41";

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: ops, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: open, labels: { weft.dev/mesh: enabled } }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: open, namespace: open }
spec: { mode: PERMISSIVE }
---
apiVersion: v1
kind: Namespace
metadata: { name: legacy }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.40
  selector: { app: web }
  ports:
    - { name: http, port: 80, targetPort: 8080 }
    - { name: grpc, port: 9090, targetPort: 8080 }
---
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec:
  clusterIP: 10.96.0.41
  selector: { app: db }
  ports: [{ name: tcp, port: 9000 }]
"#;

/// Sends `ping` lines on one connection every 100 ms, printing `open` after the first
/// echo and `closed <seconds since the first echo>` when the connection ends.
const HOLDER: &str = r#"
import socket, sys, time
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
reader = connection.makefile("rb")
opened = None
try:
    while True:
        connection.sendall(b"ping\n")
        if not reader.readline():
            break
        if opened is None:
            opened = time.monotonic()
            print("open", flush=True)
        time.sleep(0.1)
except OSError:
    pass
print(f"closed {time.monotonic() - (opened or time.monotonic()):.1f}", flush=True)
"#;

fn pod(cluster: &mut Cluster, namespace: &str, name: &str, node: &str, app: &str, argv: &[&str]) {
    let mut spec = PodSpec::new(name, node, argv);
    spec.namespace = namespace.into();
    if !app.is_empty() {
        spec.labels.insert("app".into(), app.into());
        spec.service_account = app.into();
    }
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

/// The mesh of every test: two web replicas (HTTP and gRPC) on two nodes, a TCP echo
/// `db` on node1, a `client` of `shop` and an `intruder` of `ops` on node0, the
/// PERMISSIVE `open/api` on node1 and the unmeshed `legacy/outsider` on node0.
fn authz_cluster(policies: &str) -> TestCluster {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{policies}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    let tcp_echo = workspace_bin("weft-tcp-echo").display().to_string();
    pod(&mut cluster, "shop", "web-0", "node0", "web", &[&echo]);
    pod(&mut cluster, "shop", "web-1", "node1", "web", &[&echo]);
    pod(&mut cluster, "shop", "db-0", "node1", "db", &[&tcp_echo]);
    pod(&mut cluster, "open", "api", "node1", "api", &[&echo]);
    pod(&mut cluster, "shop", "client", "node0", "client", &[]);
    pod(&mut cluster, "ops", "intruder", "node0", "intruder", &[]);
    pod(&mut cluster, "legacy", "outsider", "node0", "", &[]);
    cluster.settle();
    for ip in [ip(&cluster, "shop", "web-0"), ip(&cluster, "shop", "web-1")] {
        wait_until(&format!("web at {ip}"), READY, || {
            curl(
                &cluster,
                "shop",
                "client",
                &[&format!("http://{ip}:8080/public")],
            )
            .0 == 200
        });
    }
    cluster
}

fn ip(cluster: &Cluster, namespace: &str, name: &str) -> String {
    cluster
        .topology()
        .pod(namespace, name)
        .unwrap_or_else(|| panic!("pod {namespace}/{name}"))
        .ip
        .to_string()
}

/// The status code and body of a curl from pod `namespace/name` (0: no answer).
fn curl(cluster: &Cluster, namespace: &str, name: &str, args: &[&str]) -> (u16, String) {
    let mut argv = vec!["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}"];
    argv.extend(args);
    let out = cluster
        .pod_command(namespace, name, &argv)
        .unwrap()
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// What `weft-client grpc <call>` got, one entry per line: `0` for a reply, the status
/// code for a call that did not end OK.
fn grpc(cluster: &Cluster, namespace: &str, name: &str, call: &str, target: &str) -> Vec<i64> {
    let client = workspace_bin("weft-client").display().to_string();
    let argv = [&client, "grpc", call, "--target", target, "--count", "2"];
    let out = cluster
        .pod_command(namespace, name, &argv)
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|line| line["code"].as_i64().unwrap_or(0))
        .collect()
}

/// What one line sent to `address:port` from pod `namespace/name` got back.
fn line(cluster: &Cluster, namespace: &str, name: &str, address: &str, port: u16) -> String {
    let out = cluster
        .pod_command(
            namespace,
            name,
            &["python3", "-c", TCP_LINE_CLIENT, address, &port.to_string()],
        )
        .unwrap()
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The sum of `weft_authorization_decisions_total` on `node` over the series whose
/// labels include `labels`.
fn decisions(cluster: &Cluster, node: &str, labels: &[(&str, &str)]) -> f64 {
    samples(
        &agent_metrics(cluster, node),
        "weft_authorization_decisions_total",
    )
    .into_iter()
    .filter(|(have, _)| {
        labels
            .iter()
            .all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
    })
    .map(|(_, value)| value)
    .sum()
}

/// The decision `explain` gives on `node`'s agent for `query`, per destination pod.
fn explain_on_agent(cluster: &Cluster, node: &str, query: &str) -> serde_json::Value {
    cluster
        .agent_admin(node, &format!("/authorization/explain?{query}"))
        .unwrap_or_else(|err| panic!("{query}: {err}"))
}

fn decision(answer: &serde_json::Value, destination: usize) -> (String, String) {
    let destination = &answer["destinations"][destination];
    (
        destination["decision"].as_str().unwrap_or("?").to_owned(),
        destination["policy"]
            .as_str()
            .unwrap_or("default")
            .to_owned(),
    )
}

#[test]
fn identity_and_namespace_rules_decide_across_nodes_and_on_one_node() {
    let cluster = authz_cluster(
        r#"
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-from-client, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  rules: [{ from: [{ principals: [cluster.local/ns/shop/sa/client] }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-ops-to-tcp, namespace: weft-system }
spec:
  action: DENY
  rules: [{ from: [{ namespaces: [ops] }], to: [{ ports: [9000] }] }]
"#,
    );
    let (web0, web1) = (ip(&cluster, "shop", "web-0"), ip(&cluster, "shop", "web-1"));
    // web-0 shares node0 with both callers (the client's agent decides); web-1 is
    // across nodes (its agent decides on the tunnel).
    for target in [&web0, &web1, &WEB.to_owned()] {
        let port = if target == WEB { 80 } else { 8080 };
        let url = format!("http://{target}:{port}/");
        assert_eq!(
            curl(&cluster, "shop", "client", &[&url]).0,
            200,
            "client to {url}"
        );
        let (code, body) = curl(&cluster, "ops", "intruder", &[&url]);
        assert_eq!(code, 403, "intruder to {url}: {body}");
        assert!(
            !body.contains("shop/"),
            "the denial names no policy: {body}"
        );
    }
    // TCP: the mesh-wide DENY closes the intruder's connection before a byte reaches db.
    assert_eq!(line(&cluster, "shop", "client", DB, 9000), "hello");
    assert_eq!(line(&cluster, "ops", "intruder", DB, 9000), "<closed>");

    // Decided where they should be, and counted.
    let allowed = [("policy", "shop/web-from-client"), ("result", "allowed")];
    assert!(
        decisions(
            &cluster,
            "node0",
            &[("direction", "local"), allowed[0], allowed[1]]
        ) >= 1.0
    );
    assert!(
        decisions(
            &cluster,
            "node1",
            &[("direction", "inbound"), allowed[0], allowed[1]]
        ) >= 1.0
    );
    let default_deny = [
        ("policy", "default"),
        ("action", "none"),
        ("result", "denied"),
    ];
    for (node, direction) in [("node0", "local"), ("node1", "inbound")] {
        let mut labels = default_deny.to_vec();
        labels.push(("direction", direction));
        assert!(
            decisions(&cluster, node, &labels) >= 1.0,
            "{node}: default deny counted"
        );
    }
    let tcp_denied = [
        ("policy", "weft-system/no-ops-to-tcp"),
        ("action", "DENY"),
        ("result", "denied"),
    ];
    assert!(decisions(&cluster, "node1", &tcp_denied) >= 1.0);
    // A denial is a 403 with flag RBAC in Istio's metrics, never a success.
    let denied_requests: f64 = samples(&agent_metrics(&cluster, "node0"), "istio_requests_total")
        .into_iter()
        .filter(|(labels, _)| {
            labels["source_workload"] == "intruder" && labels["reporter"] == "source"
        })
        .map(|(labels, value)| {
            assert_eq!(
                (
                    labels["response_code"].as_str(),
                    labels["response_flags"].as_str()
                ),
                ("403", "RBAC"),
                "{labels:?}"
            );
            value
        })
        .sum();
    assert!(denied_requests >= 3.0, "{denied_requests}");
    assert!(
        agent_log(&cluster, "node1")
            .contains("authorization DENY: spiffe://cluster.local/ns/ops/sa/intruder")
    );

    // explain gives the data path's answers, on the deciding agent and the controller.
    let ask = "source_pod=ops/intruder&destination_pod=shop/web-1&port=8080&method=GET&path=/";
    assert_eq!(
        decision(&explain_on_agent(&cluster, "node1", ask), 0),
        ("DENY".into(), "default".into())
    );
    let elsewhere = explain_on_agent(&cluster, "node0", ask);
    assert!(
        elsewhere["destinations"][0]["unknown"]
            .as_str()
            .unwrap()
            .contains("node1"),
        "{elsewhere}"
    );
    let cluster_wide = cluster
        .controller_admin(
            "/authorization/explain?source_pod=shop/client&destination_service=shop/web&port=80",
        )
        .unwrap();
    for index in 0..2 {
        assert_eq!(
            decision(&cluster_wide, index),
            ("ALLOW".into(), "shop/web-from-client".into()),
            "{cluster_wide}"
        );
    }
    let tcp = cluster
        .controller_admin(
            "/authorization/explain?source_pod=ops/intruder&destination_service=shop/db&port=9000",
        )
        .unwrap();
    assert_eq!(
        decision(&tcp, 0),
        ("DENY".into(), "weft-system/no-ops-to-tcp".into())
    );
}

#[test]
fn http_rules_decide_each_request_and_each_grpc_call() {
    let cluster = authz_cluster(
        r#"
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-api, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  rules:
    - from: [{ namespaces: [shop] }]
      to: [{ methods: [GET], paths: ["/public*"] }]
    - from: [{ namespaces: [shop] }]
      to: [{ methods: [POST], paths: ["/weft.echo.v1.Echo/*"] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-streams, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  action: DENY
  rules: [{ to: [{ paths: [/weft.echo.v1.Echo/ServerStream] }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: would-deny-dry, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  action: DENY
  dryRun: true
  rules: [{ to: [{ paths: [/public/dry] }] }]
"#,
    );
    for (web, node) in [("web-0", "node0"), ("web-1", "node1")] {
        let address = ip(&cluster, "shop", web);
        let url = |path: &str| format!("http://{address}:8080{path}");
        assert_eq!(
            curl(&cluster, "shop", "client", &[&url("/public/a")]).0,
            200
        );
        let h2 = curl(
            &cluster,
            "shop",
            "client",
            &["--http2-prior-knowledge", &url("/public")],
        );
        assert_eq!(h2.0, 200, "HTTP/2 to {web}");
        for args in [
            vec!["-X", "POST"],
            vec!["--http2-prior-knowledge", "-X", "POST"],
        ] {
            let mut args = args;
            let admin = url("/admin");
            args.push(&admin);
            let (code, body) = curl(&cluster, "shop", "client", &args);
            assert_eq!(code, 403, "POST /admin to {web} ({args:?}): {body}");
            assert!(
                !body.contains("web-api") && !body.contains("shop"),
                "{body}"
            );
        }
        let target = format!("http://{address}:8080");
        assert_eq!(
            grpc(&cluster, "shop", "client", "unary", &target),
            [0, 0],
            "unary to {web}"
        );
        assert_eq!(
            grpc(&cluster, "shop", "client", "server-stream", &target),
            [7],
            "a denied stream is PERMISSION_DENIED ({web})"
        );
        // Dry run: evaluated, counted and logged, never enforced.
        assert_eq!(
            curl(&cluster, "shop", "client", &[&url("/public/dry")]).0,
            200
        );
        let dry = [
            ("policy", "shop/would-deny-dry"),
            ("result", "dry_run_denied"),
        ];
        assert!(
            decisions(&cluster, node, &dry) >= 1.0,
            "{node}: dry run counted"
        );
        assert!(agent_log(&cluster, node).contains("DRY-RUN DENY (not enforced)"));

        // explain agrees with each answer above.
        let ask = |method: &str, path: &str| {
            let query = format!(
                "source_pod=shop/client&destination_pod=shop/{web}&port=8080&method={method}&path={path}"
            );
            decision(&explain_on_agent(&cluster, node, &query), 0)
        };
        assert_eq!(
            ask("GET", "/public/a"),
            ("ALLOW".into(), "shop/web-api".into())
        );
        assert_eq!(ask("POST", "/admin"), ("DENY".into(), "default".into()));
        assert_eq!(
            ask("POST", "/weft.echo.v1.Echo/Echo"),
            ("ALLOW".into(), "shop/web-api".into())
        );
        assert_eq!(
            ask("POST", "/weft.echo.v1.Echo/ServerStream"),
            ("DENY".into(), "shop/no-streams".into())
        );
    }
}

#[test]
fn plaintext_is_judged_in_the_kernel_and_denied_connections_are_cut() {
    let cluster = authz_cluster("");
    let api = format!("http://{}:8080/", ip(&cluster, "open", "api"));
    // PERMISSIVE and no policy: plaintext from an unmeshed pod gets in.
    assert_eq!(curl(&cluster, "legacy", "outsider", &[&api]).0, 200);

    // A connection that is open when a policy starts to deny it.
    let holder = hold(&cluster, DB, 9000);
    let policies = r#"
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: api-from-shop, namespace: open }
spec:
  selector: { matchLabels: { app: api } }
  rules: [{ from: [{ principals: ["cluster.local/ns/shop/*"] }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: freeze-db, namespace: shop }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules: [{ from: [{ namespaces: [shop] }] }]
"#;
    cluster.set_mesh_yaml(&format!("{MESH}{policies}"));
    cluster.settle();
    let applied = Instant::now();
    let closed = holder.next("closed", Duration::from_secs(10));
    assert!(
        closed.is_some(),
        "the connection is cut within 10 s of the agents applying the policy"
    );
    drop(holder);
    println!(
        "cut {:?} after the agents applied the policy",
        applied.elapsed()
    );
    // Cut for the policy, by the destination's agent, which says why.
    assert!(
        agent_log(&cluster, "node1")
            .contains("the authorization policy changed and now denies it (shop/freeze-db)"),
        "the access log names the revocation"
    );
    assert_eq!(line(&cluster, "shop", "client", DB, 9000), "<closed>");

    // The policy asks for an identity: plaintext is dropped in the kernel, counted; the
    // meshed client still gets in (over mTLS).
    let before = cluster.counters("node1")["inbound_dropped_policy"];
    let (code, _) = curl(
        &cluster,
        "legacy",
        "outsider",
        &["--connect-timeout", "2", &api],
    );
    assert_eq!(
        code, 0,
        "plaintext to a policy that names principals gets nothing"
    );
    assert!(cluster.counters("node1")["inbound_dropped_policy"] > before);
    assert_eq!(curl(&cluster, "shop", "client", &[&api]).0, 200);
    let ask = format!(
        "source_ip={}&destination_pod=open/api&port=8080",
        ip(&cluster, "legacy", "outsider")
    );
    let answer = cluster
        .controller_admin(&format!("/authorization/explain?{ask}"))
        .unwrap();
    assert!(
        answer["source"].as_str().unwrap().starts_with("plaintext"),
        "{answer}"
    );
    assert_eq!(decision(&answer, 0), ("DENY".into(), "default".into()));
}

/// [`HOLDER`] running in the client pod, its output lines forwarded.
struct Holder {
    child: Child,
    lines: Receiver<String>,
}

impl Holder {
    /// The next line starting with `prefix`, within `timeout`.
    fn next(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts [`HOLDER`] in the client pod against `address:port`, once it holds an open,
/// echoing connection.
fn hold(cluster: &Cluster, address: &str, port: u16) -> Holder {
    let mut child = cluster
        .pod_command(
            "shop",
            "client",
            &["python3", "-c", HOLDER, address, &port.to_string()],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let holder = Holder { child, lines };
    assert!(holder.next("open", READY).is_some(), "the holder connects");
    holder
}
