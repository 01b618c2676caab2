//! weft as a mesh, on a 2-node local cluster with real clients: service traffic spread
//! over endpoints on both nodes and carried between them in mutual TLS; refusals of
//! misdirected and hostile peers; metrics scraped by a real Prometheus; a graceful
//! drain on SIGTERM.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use weft_cluster::{Cluster, PodInfo, PodSpec, objects::TRUST_DOMAIN};
use weft_e2e::{
    Prometheus, TestCa, TestCluster, agent_metrics as metrics, assert_promtool_accepts,
    policy_verdict, run_in_pod, series, total, unique_name, valid_now, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(10);
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
---
apiVersion: v1
kind: Service
metadata: { name: tcp, namespace: default }
spec:
  clusterIP: 10.96.0.11
  selector: { app: tcp }
  ports: [{ port: 9000 }]
"#;

/// Service `echo` balanced round robin, so that a dozen requests reach every replica.
const ROUND_ROBIN: &str = r#"
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: echo, namespace: default }
spec: { service: echo, loadBalancer: { algorithm: ROUND_ROBIN } }
"#;

fn identity(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{service_account}")
}

fn add(cluster: &mut Cluster, name: &str, node: &str, app: Option<&str>, argv: &[&str]) -> PodInfo {
    let mut spec = PodSpec::new(name, node, argv);
    if let Some(app) = app {
        spec.labels.insert("app".into(), app.into());
        spec.service_account = app.into();
    } else {
        spec.service_account = name.into();
    }
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"))
}

/// A 2-node mesh: echo-0 on node0, echo-1 and echo-2 on node1 behind service echo, a
/// TCP echo behind service tcp on node1, and a client on node0.
fn echo_mesh() -> (TestCluster, Vec<PodInfo>) {
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{ROUND_ROBIN}"));
    let echo = workspace_bin("weft-echo").display().to_string();
    let tcp = workspace_bin("weft-tcp-echo").display().to_string();
    let replicas = [
        ("echo-0", "node0"),
        ("echo-1", "node1"),
        ("echo-2", "node1"),
    ]
    .map(|(name, node)| add(&mut cluster, name, node, Some("echo"), &[&echo]))
    .to_vec();
    add(&mut cluster, "tcp-0", "node1", Some("tcp"), &[&tcp]);
    add(&mut cluster, "client", "node0", None, &[]);
    cluster.settle();
    let url = format!("http://{SERVICE}/");
    wait_until("the service", READY, || {
        cluster
            .pod_command(
                "default",
                "client",
                &["curl", "-sf", "--max-time", "2", &url],
            )
            .unwrap()
            .output()
            .unwrap()
            .status
            .success()
    });
    (cluster, replicas)
}

#[test]
fn service_traffic_reaches_every_endpoint_in_mutual_tls_between_nodes() {
    let (cluster, replicas) = echo_mesh();
    let url = format!("http://{SERVICE}/");

    // curl, a new connection each time: round robin reaches all three replicas.
    let mut argv = vec![
        "curl",
        "-s",
        "--max-time",
        "5",
        "-H",
        "Connection: close",
        "-w",
        "\n",
    ];
    argv.extend(std::iter::repeat_n(url.as_str(), 12));
    let out = run_in_pod(&cluster, "client", &argv);
    let answered: BTreeSet<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let answer: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line}"));
            answer["pod"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = replicas.iter().map(|pod| pod.name.clone()).collect();
    assert_eq!(answered, expected);

    // wrk over keep-alive connections: no errors.
    let out = run_in_pod(&cluster, "client", &["wrk", "-t1", "-c6", "-d2s", &url]);
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "{report}"
    );
    let requests: u64 = report
        .lines()
        .find_map(|line| {
            line.trim()
                .split_once(" requests in ")
                .map(|(count, _)| count.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no request count in {report}"));
    assert!(requests > 100, "{report}");

    // Telemetry on both sides, with Istio's labels.
    let source = metrics(&cluster, "node0");
    let destination = metrics(&cluster, "node1");
    let tls = [("connection_security_policy", "mutual_tls")];
    let client_id = identity("client");
    let echo_id = identity("echo");
    let labels = |reporter| {
        [
            ("reporter", reporter),
            ("source_principal", client_id.as_str()),
            ("destination_principal", echo_id.as_str()),
            ("destination_service_name", "echo"),
            tls[0],
        ]
    };
    // Port `http` is HTTP: every request is measured, by both agents.
    let requests =
        |text: &str, labels: &[(&str, &str)]| total(text, "istio_requests_total", labels);
    assert!(requests(&source, &labels("source")) >= 100.0, "{source}");
    assert!(
        requests(&destination, &[("reporter", "destination"), tls[0]]) >= 50.0,
        "{destination}"
    );
    assert!(series(&source, "istio_response_bytes_sum", &labels("source")).unwrap_or(0.0) > 0.0);
    assert!(
        series(
            &source,
            "weft_ebpf_events_total",
            &[("event", "redirected")]
        )
        .unwrap_or(0.0)
            >= 12.0
    );
    for text in [&source, &destination] {
        assert_promtool_accepts(text);
    }

    // Readiness, and the admin endpoints on the node's localhost.
    let node0 = cluster.topology().node("node0").unwrap().ip;
    let get = |argv: &[&str]| -> String {
        let out = cluster
            .node_command("node0", argv)
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ready = format!("http://{node0}:15021/healthz/ready");
    assert_eq!(get(&["curl", "-s", "--max-time", "3", &ready]), "ready\n");
    let certs: serde_json::Value = serde_json::from_str(&get(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        "http://127.0.0.1:15000/certs",
    ]))
    .unwrap();
    let identities: BTreeSet<&str> = certs
        .as_array()
        .unwrap()
        .iter()
        .map(|cert| cert["identity"].as_str().unwrap())
        .collect();
    assert!(
        identities.contains(echo_id.as_str()) && identities.contains(client_id.as_str()),
        "{certs}"
    );
    assert!(certs[0]["not_after"].as_u64().unwrap() > certs[0]["not_before"].as_u64().unwrap());
    let set = get(&[
        "curl",
        "-s",
        "-X",
        "POST",
        "--max-time",
        "3",
        "http://127.0.0.1:15000/logging?filter=info,weft_agent=debug",
    ]);
    assert_eq!(set, "log filter is now info,weft_agent=debug\n");
    let missing = get(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "http://127.0.0.1:15000/logging",
    ]);
    assert_eq!(missing, "400");

    // A real Prometheus scrapes both agents and finds the series.
    let prometheus = Prometheus::start(&cluster);
    prometheus.wait_for_series(
        "istio_requests_total{reporter=\"source\",connection_security_policy=\"mutual_tls\",destination_service_name=\"echo\"}",
    );
}

#[test]
fn bytes_between_nodes_are_tls_on_the_wire() {
    let (mut cluster, _) = echo_mesh();
    // A positive control: plaintext between two unmeshed pods on different nodes.
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut plain = PodSpec::new("plain", "node1", &[&echo]);
    plain.namespace = "outside".into();
    let plain = cluster.add_pod(plain).unwrap();
    let mut outsider = PodSpec::new("outsider", "node0", &[]);
    outsider.namespace = "outside".into();
    cluster.add_pod(outsider).unwrap();
    let plain_url = format!("http://{}:8080/", plain.ip);
    wait_until("the plaintext server", READY, || {
        cluster
            .pod_command(
                "outside",
                "outsider",
                &["curl", "-sf", "--max-time", "1", &plain_url],
            )
            .unwrap()
            .output()
            .unwrap()
            .status
            .success()
    });

    let capture = cluster.topology().state_dir.join("wire.pcap");
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &cluster.topology().fabric_netns,
            "tcpdump",
            // Without it packets wait in the kernel's buffer and miss the capture.
            "--immediate-mode",
            // node0's port on the fabric bridge: bridged packets never show on br0.
            "-i",
            "n0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&capture)
        .arg("tcp")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("tcpdump", READY, || {
        capture.metadata().is_ok_and(|meta| meta.len() > 0)
    });
    let secret = unique_name('s');
    let meshed_url = format!("http://{SERVICE}/meshed-{secret}");
    for _ in 0..6 {
        run_in_pod(
            &cluster,
            "client",
            &[
                "curl",
                "-sf",
                "--max-time",
                "5",
                "-H",
                "Connection: close",
                &meshed_url,
            ],
        );
    }
    let plain_url = format!("http://{}:8080/plain-{secret}", plain.ip);
    let out = cluster
        .pod_command(
            "outside",
            "outsider",
            &["curl", "-sf", "--max-time", "5", &plain_url],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success());
    thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();

    let wire = std::fs::read(&capture).unwrap();
    let contains = |needle: &str| {
        wire.windows(needle.len())
            .any(|window| window == needle.as_bytes())
    };
    assert!(
        contains(&format!("plain-{secret}")),
        "the capture misses the plaintext control, so it proves nothing"
    );
    assert!(
        !contains(&format!("meshed-{secret}")),
        "meshed traffic crossed between nodes in plaintext"
    );
    // And it did cross: TLS 1.3 application data records on port 15008.
    let hbone = 15008u16.to_be_bytes();
    assert!(
        wire.windows(2).any(|window| window == hbone),
        "no HBONE packets in the capture"
    );
    assert!(
        wire.windows(3).any(|window| window == [0x17, 0x03, 0x03]),
        "no TLS records in the capture"
    );
}

#[test]
fn misdirected_and_hostile_peers_are_refused() {
    let (cluster, replicas) = echo_mesh();
    let state = cluster.topology().state_dir.clone();
    // Client certificates issued by the mesh CA, and by a CA nobody trusts.
    let certs = state.join("test-client");
    let ca = TestCa::mesh(&cluster.topology().ca_dir);
    ca.issue(&identity("client"), valid_now(), &certs, "client");
    let rogue_certs = state.join("test-rogue");
    let rogue = TestCa::rogue();
    rogue.issue(&identity("client"), valid_now(), &rogue_certs, "client");

    let node1 = cluster.topology().node("node1").unwrap().ip;
    let agent = format!("{node1}:15008");
    // The rogue client trusts the real servers (and its own CA, to load its certificate).
    let both = state.join("both-roots.crt");
    std::fs::write(&both, [ca.roots_pem(), rogue.roots_pem()].concat()).unwrap();
    let hbone = |certs: &Path, sni: &str, expected: &str, target: String| -> String {
        let bin = workspace_bin("weft-test-hbone").display().to_string();
        let bundle = both.display().to_string();
        let certs = certs.display().to_string();
        let argv = [
            bin.as_str(),
            &bundle,
            &certs,
            &identity("client"),
            sni,
            expected,
            &agent,
            &target,
        ];
        let out = cluster
            .node_command("node0", &argv)
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let echo_id = identity("echo");
    let echo_1 = replicas.iter().find(|pod| pod.name == "echo-1").unwrap();
    let echo_0 = replicas.iter().find(|pod| pod.name == "echo-0").unwrap();

    let ok = hbone(&certs, &echo_id, &echo_id, format!("{}:8080", echo_1.ip));
    assert!(
        ok.starts_with("status 200") && ok.contains("echo-1"),
        "a proper tunnel failed: {ok}"
    );
    // The server presents echo's identity, the client wanted another: refused.
    let wrong = hbone(
        &certs,
        &echo_id,
        &identity("impostor"),
        format!("{}:8080", echo_1.ip),
    );
    assert!(
        wrong.starts_with("error"),
        "a wrong server identity was accepted: {wrong}"
    );
    // A client certificate from an untrusted CA: the handshake fails.
    let untrusted = hbone(
        &rogue_certs,
        &echo_id,
        &echo_id,
        format!("{}:8080", echo_1.ip),
    );
    assert!(
        untrusted.starts_with("error"),
        "an untrusted client was accepted: {untrusted}"
    );
    // Never an open relay: a pod on another node, an address outside the mesh.
    assert_eq!(
        hbone(&certs, &echo_id, &echo_id, format!("{}:8080", echo_0.ip)),
        "refused 401"
    );
    assert_eq!(
        hbone(&certs, &echo_id, &echo_id, "10.99.0.1:22".into()),
        "refused 401"
    );
    // A local pod with nothing listening on the port: unreachable.
    assert_eq!(
        hbone(&certs, &echo_id, &echo_id, format!("{}:9", echo_1.ip)),
        "refused 503"
    );

    // Plaintext and garbage to 15008 are closed and counted; the agent keeps serving.
    let plaintext = cluster
        .node_command(
            "node0",
            &["curl", "-s", "--max-time", "3", &format!("http://{agent}/")],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(
        !plaintext.status.success(),
        "plaintext HTTP got an answer from 15008"
    );
    let garbage = format!("head -c 4096 /dev/urandom | socat -T 3 - TCP:{agent}");
    let _ = cluster
        .node_command("node0", &["sh", "-c", &garbage])
        .unwrap()
        .output()
        .unwrap();
    let failures = series(
        &metrics(&cluster, "node1"),
        "weft_hbone_failures_total",
        &[("direction", "inbound"), ("reason", "tls_handshake")],
    );
    assert!(failures.unwrap_or(0.0) >= 2.0, "{failures:?}");
    let again = hbone(&certs, &echo_id, &echo_id, format!("{}:8080", echo_1.ip));
    assert!(again.starts_with("status 200"), "{again}");

    // A meshed pod connecting straight to the outbound port (at the node's address,
    // where captured connections go) has no original destination: closed and counted.
    let node_address = cluster.topology().node("node0").unwrap().ip;
    let _ = cluster
        .pod_command(
            "default",
            "client",
            &[
                "curl",
                "-s",
                "--max-time",
                "3",
                &format!("http://{node_address}:15001/"),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    let refused = series(
        &metrics(&cluster, "node0"),
        "weft_connections_refused_total",
        &[("reason", "unknown_original_destination")],
    );
    assert!(refused.unwrap_or(0.0) >= 1.0, "{refused:?}");
}

#[test]
fn sigterm_drains_open_connections() {
    let (mut cluster, _) = echo_mesh();
    // A long-lived connection through the mesh: it keeps talking across the agent's
    // SIGTERM and finishes.
    const CONVERSATION: &str = "import socket, sys, time\n\
        s = socket.create_connection((sys.argv[1], 9000), timeout=10)\n\
        s.sendall(b'before\\n'); print(s.recv(100).decode().strip(), flush=True)\n\
        time.sleep(2)\n\
        s.sendall(b'during\\n'); print(s.recv(100).decode().strip(), flush=True)\n\
        s.close()\n";
    let talk = cluster
        .pod_command(
            "default",
            "client",
            &["/usr/bin/python3", "-c", CONVERSATION, "10.96.0.11"],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    let started = std::time::Instant::now();
    cluster.stop_agent("node0").unwrap();
    let out = talk.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "before\nduring\n",
        "the connection did not survive the drain"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the agent did not wait for the connection"
    );
    let log = std::fs::read_to_string(cluster.layout().node_log("node0", "agent")).unwrap();
    assert!(log.contains("draining 1 connection(s)"), "{log}");
}

#[test]
fn agents_dump_the_streamed_policies_and_the_controller_says_what_they_enforce() {
    let policies = format!(
        r#"---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {{ name: echo, namespace: default }}
spec:
  service: echo
  timeouts: {{ idle: 30s }}
  retries: {{ attempts: 2, retryOn: [5xx] }}
  outlierDetection: {{ consecutiveFailures: 5, interval: 10s }}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{ name: echo-from-client, namespace: default }}
spec:
  selector: {{ matchLabels: {{ app: echo }} }}
  rules: [{{ from: [{{ principals: ["{client}"] }}], to: [{{ ports: [8080] }}] }}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: echo, namespace: default }}
spec:
  parentRefs: [{{ kind: Service, name: echo, port: 80 }}]
  rules: [{{ backendRefs: [{{ name: echo, port: 80 }}] }}]
"#,
        client = identity("client")
    );
    let mut cluster = TestCluster::with_mesh(2, &format!("{MESH}{policies}"));
    add(&mut cluster, "echo-0", "node1", Some("echo"), &[]);
    cluster.settle();

    let dump = |node: &str| -> serde_json::Value {
        let dump = cluster
            .agent_admin(node, "/config_dump")
            .unwrap_or_else(|err| panic!("{err}"));
        dump["policies"].clone()
    };
    let (node0, node1) = (dump("node0"), dump("node1"));
    for policies in [&node0, &node1] {
        let traffic = &policies["traffic"]["default/echo"];
        assert_eq!(traffic["idleTimeoutMs"], 30_000, "{policies:#}");
        assert_eq!(traffic["retries"]["attempts"], 2, "{policies:#}");
        assert_eq!(traffic["loadBalancing"], "LOAD_BALANCING_UNSPECIFIED");
        let rule = &policies["routes"]["default/echo:80"]["rules"][0];
        assert_eq!(rule["route"], "HTTPRoute/default/echo", "{policies:#}");
        assert_eq!(rule["backends"][0]["service"], "default/echo");
    }
    assert_eq!(
        node0["authorization"],
        serde_json::json!({}),
        "no pod of node0 is selected"
    );
    let authorization = &node1["authorization"]["default/echo-from-client"];
    assert_eq!(authorization["action"], "ALLOW", "{node1:#}");
    assert_eq!(
        authorization["workloads"],
        serde_json::json!(["default/echo-0"])
    );
    // Principals travel as Istio writes them, without the scheme.
    assert_eq!(
        authorization["rules"][0]["from"][0]["principals"],
        serde_json::json!([identity("client").trim_start_matches("spiffe://")])
    );

    let status = cluster
        .controller_status()
        .unwrap_or_else(|err| panic!("{err}"));
    let enforced = policy_verdict(&status, "AuthorizationPolicy", "echo-from-client");
    assert_eq!(
        (&enforced["accepted"], &enforced["message"]),
        (
            &serde_json::json!(true),
            &serde_json::json!("applies to the meshed pods spec.selector matches")
        ),
        "{enforced:#}"
    );
    let traffic = policy_verdict(&status, "TrafficPolicy", "echo");
    assert_eq!(
        (
            &traffic["accepted"],
            &traffic["reason"],
            &traffic["message"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!("NotEnforced"),
            &serde_json::json!(
                "the agents do not enforce spec.outlierDetection.interval yet and ignore \
                 it; spec.outlierDetection.consecutiveFailures, spec.retries, \
                 spec.timeouts apply to clients of Service echo"
            )
        ),
        "{traffic:#}"
    );
    // Routes are enforced: accepted, with their references resolved.
    let route = policy_verdict(&status, "HTTPRoute", "echo");
    assert_eq!(
        (
            &route["accepted"],
            &route["reason"],
            &route["references"]["reason"]
        ),
        (
            &serde_json::json!(true),
            &serde_json::json!("Accepted"),
            &serde_json::json!("ResolvedRefs")
        ),
        "{route:#}"
    );
}
