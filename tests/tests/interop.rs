//! HBONE as Istio speaks it, end to end, on a 3-node local cluster with real TLS and
//! the mesh CA. node0 and node1 run weft; node2 runs no weft agent and plays an
//! Istio ambient node: its pod `ambient` has `weft-test-istio-peer` listening on the
//! pod's own address, port 15008, as ztunnel does in each pod, and the same peer
//! dials weft-served pods as ztunnel does: at the pod's address, without a TLS server
//! name, with a quoted `Forwarded` that carries a port, and with its own baggage.
//!
//! Both directions carry traffic, with each side's identity verified; the weft side
//! authorizes and attributes the peer's callers, carries HTTP and plain TCP, and refuses
//! a CONNECT for another pod than the one dialed.

use std::{
    path::Path,
    process::{Child, Output, Stdio},
    time::Duration,
};

use weft_cluster::{Cluster, PodSpec, objects::TRUST_DOMAIN, process_running};
use weft_e2e::{
    TestCa, TestCluster, agent_log, agent_metrics, running_agent, series, valid_now, wait_until,
    workspace_bin,
};

const READY: Duration = Duration::from_secs(15);

/// Namespace default in the mesh (STRICT); web on node1 takes calls only from the
/// client and from the ambient workload.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: default }
spec:
  clusterIP: 10.96.0.10
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mode: STRICT }
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-callers, namespace: default }
spec:
  selector: { matchLabels: { app: web } }
  rules:
    - from: [{ principals: [cluster.local/ns/default/sa/client, cluster.local/ns/default/sa/ambient] }]
"#;

fn identity(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{service_account}")
}

/// Kills the process when the test ends, passed or failed.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cluster: client (node0), web (node1, weft-echo), ambient (node2, weft-echo
/// and the Istio-like peer on its own address), node2 annotated as a node whose pods
/// take HBONE on their own addresses.
struct Interop {
    cluster: TestCluster,
    certs: tempfile::TempDir,
    _peer: Killed,
}

impl Interop {
    fn start() -> Self {
        let mut cluster = TestCluster::with_mesh_and_foreign_nodes(3, MESH, &["node2"]);
        cluster
            .annotate_node("node2", "weft.dev/hbone-address", Some("pod"))
            .unwrap_or_else(|err| panic!("{err}"));
        let echo = workspace_bin("weft-echo").display().to_string();
        for (name, node, app) in [("web", "node1", "web"), ("ambient", "node2", "ambient")] {
            let mut spec = PodSpec::new(name, node, &[&echo]);
            spec.labels.insert("app".into(), app.into());
            spec.labels.insert("version".into(), "v1".into());
            spec.service_account = app.into();
            cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
        }
        // A plain TCP service, ztunnel's everyday traffic.
        let tcp_echo = workspace_bin("weft-tcp-echo").display().to_string();
        let mut db = PodSpec::new("db", "node1", &[&tcp_echo]);
        db.service_account = "db".into();
        cluster.add_pod(db).unwrap_or_else(|err| panic!("{err}"));
        let mut client = PodSpec::new("client", "node0", &[]);
        client.service_account = "client".into();
        client.labels.insert("app".into(), "client".into());
        cluster
            .add_pod(client)
            .unwrap_or_else(|err| panic!("{err}"));
        cluster.settle();

        let certs = tempfile::tempdir().unwrap();
        let ca = TestCa::mesh(&cluster.topology().ca_dir);
        std::fs::write(certs.path().join("roots.pem"), ca.roots_pem()).unwrap();
        for account in ["ambient", "intruder"] {
            ca.issue(&identity(account), valid_now(), certs.path(), account);
        }
        let ambient = pod_ip(&cluster, "ambient");
        let peer = cluster
            .pod_command(
                "default",
                "ambient",
                &peer_args(
                    certs.path(),
                    "server",
                    "ambient",
                    &[
                        "--listen",
                        &format!("{ambient}:15008"),
                        "--log",
                        &certs.path().join("connects.jsonl").display().to_string(),
                    ],
                ),
            )
            .unwrap()
            .stdout(Stdio::null())
            .spawn()
            .expect("the peer starts");
        let interop = Interop {
            cluster,
            certs,
            _peer: Killed(peer),
        };
        wait_until("the peer on ambient:15008", READY, || {
            interop
                .cluster
                .node_command(
                    "node2",
                    &["bash", "-c", &format!("exec 3<>/dev/tcp/{ambient}/15008")],
                )
                .unwrap()
                .status()
                .is_ok_and(|status| status.success())
        });
        interop
    }

    /// Runs the peer as a client from node2 (where ztunnel runs) with `account`'s
    /// certificate, dialing pod `dialed`'s own address and asking for `authority`;
    /// the server must prove `expected`'s identity.
    fn peer_client(
        &self,
        account: &str,
        dialed: &str,
        expected: &str,
        authority: &str,
        extra: &[&str],
    ) -> String {
        let expected = identity(expected);
        let dial = format!("{}:15008", pod_ip(&self.cluster, dialed));
        let mut args = vec![
            "--expect",
            &expected,
            "--dial",
            &dial,
            "--authority",
            authority,
        ];
        args.extend_from_slice(extra);
        let output: Output = self
            .cluster
            .node_command(
                "node2",
                &peer_args(self.certs.path(), "client", account, &args),
            )
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The CONNECTs the peer's server logged, one JSON object each.
    fn connects(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.certs.path().join("connects.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }
}

/// `weft-test-istio-peer <mode>` with `account`'s certificate and the mesh's roots.
fn peer_args(dir: &Path, mode: &str, account: &str, rest: &[&str]) -> Vec<String> {
    let file = |name: String| -> String { dir.join(name).display().to_string() };
    let mut args = vec![
        workspace_bin("weft-test-istio-peer").display().to_string(),
        mode.to_owned(),
        "--roots".to_owned(),
        file("roots.pem".to_owned()),
        "--cert".to_owned(),
        file(format!("{account}.crt")),
        "--key".to_owned(),
        file(format!("{account}.key")),
    ];
    args.extend(rest.iter().map(|arg| (*arg).to_owned()));
    args
}

fn pod_ip(cluster: &Cluster, name: &str) -> String {
    cluster
        .topology()
        .pod("default", name)
        .expect("the pod exists")
        .ip
        .to_string()
}

/// The number of requests node1's agent counted as destination with `labels`.
fn requests_to_web(cluster: &Cluster, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("reporter", "destination"), ("destination_workload", "web")];
    all.extend_from_slice(labels);
    series(
        &agent_metrics(cluster, "node1"),
        "istio_requests_total",
        &all,
    )
    .unwrap_or(0.0)
}

#[test]
fn weft_and_an_istio_like_peer_carry_each_others_traffic() {
    let interop = Interop::start();
    let cluster = &interop.cluster;
    let (web, ambient, client) = (
        pod_ip(cluster, "web"),
        pod_ip(cluster, "ambient"),
        pod_ip(cluster, "client"),
    );

    // weft → peer: the client's agent dials the ambient pod's own address (node2 says
    // so), and the peer verifies the client's certificate.
    let url = format!("http://{ambient}:8080/hello");
    let mut answer = serde_json::Value::Null;
    wait_until("the client reaches ambient through the peer", READY, || {
        let out = cluster
            .pod_command(
                "default",
                "client",
                &[
                    "curl",
                    "-sf",
                    "--max-time",
                    "3",
                    "-H",
                    "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    &url,
                ],
            )
            .unwrap()
            .output()
            .unwrap();
        answer = serde_json::from_slice(&out.stdout).unwrap_or_default();
        answer["pod"] == "ambient"
    });
    let connects = interop.connects();
    let connect = connects
        .iter()
        .find(|connect| connect["authority"] == format!("{ambient}:8080"))
        .unwrap_or_else(|| panic!("the peer logged no CONNECT to ambient: {connects:?}"));
    assert_eq!(connect["client_identity"], identity("client"), "{connect}");
    assert_eq!(connect["local"], format!("{ambient}:15008"), "{connect}");
    assert_eq!(connect["status"], 200, "{connect}");
    assert_eq!(connect["forwarded"], format!("for={client}"), "{connect}");
    let baggage = connect["baggage"].as_str().unwrap_or_default();
    for member in [
        "k8s.namespace.name=default",
        "k8s.pod.name=client",
        "service.name=client",
        "service.version=latest",
    ] {
        assert!(
            baggage.split(',').any(|m| m == member),
            "{member} in {baggage}"
        );
    }
    // The request's trace goes on in the tunnel's CONNECT.
    let traceparent = connect["traceparent"].as_str().unwrap_or_default();
    assert!(
        traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{connect}"
    );

    // peer → weft: dialed at web's own address, without SNI; web's certificate is
    // presented and checked, the caller is attributed and authorized.
    let dump = cluster.agent_admin("node1", "/config_dump").unwrap();
    let pods = dump["pods"].as_array().cloned().unwrap_or_default();
    let web_pod = pods.iter().find(|pod| pod["pod"]["name"] == "web");
    assert_eq!(
        web_pod.map(|pod| &pod["attachment"]["hbone_in_pod"]),
        Some(&serde_json::Value::Bool(true)),
        "node1's agent listens in web: {pods:?}"
    );
    let hbone_before = cluster.counters("node1")["inbound_hbone"];
    let before = requests_to_web(cluster, &[("source_workload", "ambient")]);
    let forwarded = format!("{ambient}:53766");
    let out = interop.peer_client(
        "ambient", "web",
        "web",
        &format!("{web}:8080"),
        &[
            "--forwarded-for",
            &forwarded,
            "--baggage",
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=ambient,service.name=ambient,service.version=v1",
            "--path",
            "/from-ambient",
        ],
    );
    assert!(out.starts_with("status 200\n"), "{out}");
    assert!(out.contains("\"pod\":\"web\""), "web answers: {out}");
    assert!(
        cluster.counters("node1")["inbound_hbone"] > hbone_before,
        "the kernel counted the pod-addressed HBONE connection as mesh traffic"
    );
    wait_until("node1 counts the request from ambient", READY, || {
        requests_to_web(
            cluster,
            &[
                ("source_workload", "ambient"),
                ("source_principal", &identity("ambient")),
                ("source_app", "ambient"),
                ("source_version", "v1"),
                ("connection_security_policy", "mutual_tls"),
            ],
        ) > before
    });

    // A caller the mesh does not know (another cluster's pod): its baggage names it.
    let out = interop.peer_client(
        "ambient", "web",
        "web",
        &format!("{web}:8080"),
        &[
            "--forwarded-for",
            "10.250.0.9:40000",
            "--baggage",
            "k8s.namespace.name=default,k8s.deployment.name=elsewhere,service.name=far-away,service.version=v9",
        ],
    );
    assert!(out.starts_with("status 200\n"), "{out}");
    wait_until("node1 attributes the caller by its baggage", READY, || {
        requests_to_web(
            cluster,
            &[
                ("source_workload", "elsewhere"),
                ("source_app", "far-away"),
                ("source_version", "v9"),
                ("source_principal", &identity("ambient")),
            ],
        ) > 0.0
    });
    // The access log names it too (once it is written out).
    wait_until("node1's access log attributes the caller", READY, || {
        agent_log(cluster, "node1").lines().any(|line| {
            line.contains("weft::access")
                && line.contains(
                    r#""address":"10.250.0.9:0","workload":"elsewhere","namespace":"default""#,
                )
        })
    });

    // An identity web's policy does not allow: refused before the pod is dialled.
    let out = interop.peer_client("intruder", "web", "web", &format!("{web}:8080"), &[]);
    assert_eq!(out.trim(), "status 401", "{out}");

    // A CONNECT for another pod than the one dialed is refused, as ztunnel does.
    let out = interop.peer_client("ambient", "web", "web", &format!("{client}:8080"), &[]);
    assert_eq!(out.trim(), "status 400", "{out}");

    // A certificate the peer does not expect: the peer refuses web's.
    let out = interop.peer_client("ambient", "web", "other", &format!("{web}:8080"), &[]);
    assert!(out.starts_with("error"), "{out}");

    // TCP, half-closed after the bytes: they come back, and the tunnel ends.
    let db = pod_ip(cluster, "db");
    let out = interop.peer_client(
        "ambient",
        "db",
        "db",
        &format!("{db}:9000"),
        &["--tcp-echo", "carried as bytes"],
    );
    assert_eq!(out, "status 200\necho carried as bytes\n");
}

#[test]
fn weft_nodes_can_take_tunnels_on_pod_addresses_too() {
    let mut interop = Interop::start();
    let before = interop.cluster.counters("node1")["inbound_hbone"];
    // The client's agent dials web's own address, with its SNI as always.
    interop
        .cluster
        .annotate_node("node1", "weft.dev/hbone-address", Some("pod"))
        .unwrap_or_else(|err| panic!("{err}"));
    interop.cluster.settle();
    let url = format!("http://{}:8080/", pod_ip(&interop.cluster, "web"));
    wait_until("web answers through its own address", READY, || {
        let out = interop
            .cluster
            .pod_command(
                "default",
                "client",
                &["curl", "-sf", "--max-time", "3", &url],
            )
            .unwrap()
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|answer| answer["pod"] == "web")
    });
    assert!(
        interop.cluster.counters("node1")["inbound_hbone"] > before,
        "the tunnel came in on web's own address"
    );
}

/// The inodes of the sockets listening on port 15008 inside pod `name`.
fn hbone_listeners_in(cluster: &Cluster, name: &str) -> Vec<String> {
    let out = cluster
        .pod_command("default", name, &["ss", "-Hltne", "sport = :15008"])
        .unwrap()
        .output()
        .unwrap();
    let mut inodes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|field| field.strip_prefix("ino:").map(str::to_owned))
        .collect();
    inodes.sort();
    inodes
}

#[test]
fn an_upgrade_hands_the_pod_listeners_over() {
    let mut interop = Interop::start();
    let before = hbone_listeners_in(&interop.cluster, "web");
    assert_eq!(before.len(), 1, "one listener in web: {before:?}");
    let old = running_agent(&interop.cluster, "node1").pid;
    interop
        .cluster
        .restart_agent("node1", &workspace_bin("weft-agent"))
        .unwrap_or_else(|err| panic!("{err}"));
    wait_until("node1's old agent to exit", READY, || !process_running(old));
    // The same socket, with its queue: the new agent took it over rather than opening
    // its own beside it.
    assert_eq!(hbone_listeners_in(&interop.cluster, "web"), before);
    let web = pod_ip(&interop.cluster, "web");
    wait_until("the peer reaches web after the upgrade", READY, || {
        interop
            .peer_client("ambient", "web", "web", &format!("{web}:8080"), &[])
            .starts_with("status 200")
    });
}
