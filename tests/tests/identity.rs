//! Workload identity end to end, on a 2-node local cluster with real TLS and real
//! clients: the controller is the mesh CA and the agents get every certificate from it
//! (no certificate or key file is handed to them); HBONE refuses expired, not yet valid
//! and untrusted client certificates and counts why; short-lived certificates renew
//! under load without a failed request; a root rotation with an overlap keeps traffic
//! flowing between workloads whose certificates lead to the old and the new root; and
//! the CA refuses a node an identity none of its pods runs as.

use prost::Message as _;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use weft_api::ca::v1::SignRequest;

use weft_cluster::{Cluster, PodSpec, objects::TRUST_DOMAIN};
use weft_e2e::{
    TestCa, TestCluster, agent_metrics, controller_metrics, run_in_pod, samples, series, valid_now,
    wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(10);
const ECHO_URL: &str = "http://10.96.0.10/";
const FRESH_URL: &str = "http://10.96.0.12/";

/// The default namespace in the mesh (STRICT), service echo, and service fresh, whose
/// pod [`root_rotation_keeps_old_and_new_roots_talking`] adds after a rotation.
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
metadata: { name: fresh, namespace: default }
spec:
  clusterIP: 10.96.0.12
  selector: { app: fresh }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mode: STRICT }
"#;

fn identity(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{service_account}")
}

/// Adds `weft-echo` pod `name` on `node`, labelled `app=<app>`, running as service
/// account `app`.
fn add_server(cluster: &mut Cluster, name: &str, node: &str, app: &str) {
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut spec = PodSpec::new(name, node, &[&echo]);
    spec.labels.insert("app".into(), app.into());
    spec.service_account = app.into();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"));
}

/// A 2-node mesh whose controller gets `controller_args`: echo-1 (service account
/// echo) on node1 behind service echo, and a client (service account client) on node0,
/// so that every request crosses between the nodes in HBONE.
fn two_nodes(controller_args: &[&str]) -> TestCluster {
    let mut cluster = TestCluster::with_mesh_and_controller_args(2, MESH, controller_args);
    add_server(&mut cluster, "echo-1", "node1", "echo");
    let mut client = PodSpec::new("client", "node0", &[]);
    client.service_account = "client".into();
    cluster
        .add_pod(client)
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    wait_until("the echo service", READY, || {
        answering_pod(&cluster, ECHO_URL).is_some()
    });
    cluster
}

/// The pod that answered one request from the client to `url`, if one did.
fn answering_pod(cluster: &Cluster, url: &str) -> Option<String> {
    let out = cluster
        .pod_command(
            "default",
            "client",
            &["curl", "-sf", "--max-time", "3", url],
        )
        .unwrap()
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(answer["pod"].as_str()?.to_owned())
}

/// A certificate as an agent's `GET /certs` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cert {
    identity: String,
    serial: String,
    not_before: u64,
    not_after: u64,
    issuer: String,
    root: String,
}

/// The certificates `node`'s agent holds.
fn certs(cluster: &Cluster, node: &str) -> Vec<Cert> {
    let listed = cluster
        .agent_admin(node, "/certs")
        .unwrap_or_else(|err| panic!("waiting for {err}"));
    let field = |cert: &serde_json::Value, name: &str| -> String {
        cert[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {cert}"))
            .to_owned()
    };
    let time = |cert: &serde_json::Value, name: &str| -> u64 {
        cert[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {cert}"))
    };
    listed
        .as_array()
        .unwrap_or_else(|| panic!("/certs is no list: {listed}"))
        .iter()
        .map(|cert| Cert {
            identity: field(cert, "identity"),
            serial: field(cert, "serial"),
            not_before: time(cert, "not_before"),
            not_after: time(cert, "not_after"),
            issuer: field(cert, "issuer"),
            root: field(cert, "root"),
        })
        .collect()
}

/// The controller's `/status` `ca` section.
fn ca_status(cluster: &Cluster) -> serde_json::Value {
    let status = cluster
        .controller_status()
        .unwrap_or_else(|err| panic!("waiting for {err}"));
    let ca = status["ca"].clone();
    assert!(ca.is_object(), "no ca in /status: {status:#}");
    ca
}

fn signing_root(ca: &serde_json::Value) -> String {
    ca["signing_root"]
        .as_str()
        .unwrap_or_else(|| panic!("no signing_root: {ca:#}"))
        .to_owned()
}

fn anchor_subjects(ca: &serde_json::Value) -> Vec<String> {
    ca["anchors"]
        .as_array()
        .unwrap_or_else(|| panic!("no anchors: {ca:#}"))
        .iter()
        .map(|anchor| anchor["subject"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Every file under `dir` whose name ends in `.key`.
fn key_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            found.extend(key_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "key") {
            found.push(path);
        }
    }
    found
}

#[test]
fn the_controller_issues_every_workload_certificate_and_traffic_flows_on_them() {
    let cluster = two_nodes(&[]);
    let topology = cluster.topology().clone();

    // Traffic crosses between the nodes in mutual TLS, on certificates the agents got
    // from the controller: no certificate, key or trust bundle was handed to them.
    for node in &topology.nodes {
        let agent = node.agent.as_ref().expect("the agent runs");
        for (flag, variable) in [
            ("--certs", "WEFT_CERTS="),
            ("--trust-bundle", "WEFT_TRUST_BUNDLE="),
            ("--mesh-config", "WEFT_MESH_CONFIG="),
        ] {
            assert!(
                !agent
                    .command
                    .iter()
                    .any(|arg| arg == flag || arg.starts_with(variable)),
                "{}'s agent got {flag}: {:?}",
                node.name,
                agent.command
            );
        }
    }
    let mut argv = vec!["curl", "-sf", "--max-time", "5", "-H", "Connection: close"];
    argv.extend(["-w", "\n"]);
    argv.extend(std::iter::repeat_n(ECHO_URL, 6));
    let out = run_in_pod(&cluster, "client", &argv);
    let answers = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        answers
            .lines()
            .filter(|line| line.contains("echo-1"))
            .count(),
        6,
        "{answers}"
    );
    let opened = series(
        &agent_metrics(&cluster, "node0"),
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", &identity("client")),
            ("destination_principal", &identity("echo")),
        ],
    );
    assert!(opened.unwrap_or(0.0) >= 6.0, "{opened:?}");

    // Each agent holds exactly its pods' identities, issued under the controller's
    // signing root.
    let ca = ca_status(&cluster);
    let root = signing_root(&ca);
    assert!(!root.is_empty(), "{ca:#}");
    assert_eq!(ca["propagating"], false, "{ca:#}");
    assert!(ca["error"].is_null(), "{ca:#}");
    assert_eq!(anchor_subjects(&ca), [root.as_str()], "{ca:#}");
    let now = unix_now();
    for (node, expected) in [("node0", identity("client")), ("node1", identity("echo"))] {
        let held = certs(&cluster, node);
        let identities: Vec<&str> = held.iter().map(|cert| cert.identity.as_str()).collect();
        assert_eq!(identities, [expected.as_str()], "{node}: {held:#?}");
        let cert = &held[0];
        assert_eq!(cert.root, root, "{node}: {cert:#?}");
        // weft's own root signs directly.
        assert_eq!(cert.issuer, root, "{node}: {cert:#?}");
        assert!(
            cert.not_before <= now && now < cert.not_after,
            "{node}: not valid now ({now}): {cert:#?}"
        );
        // The default lifetime is a day (plus the backdating for clock skew).
        assert!(
            cert.not_after <= now + 86_400 + 60 && cert.not_after > now + 86_400 - 3600,
            "{node}: {cert:#?}"
        );
        let metrics = agent_metrics(&cluster, node);
        let expiry = series(
            &metrics,
            "weft_certificate_expiry_seconds",
            &[("identity", &expected)],
        );
        assert_eq!(expiry, Some(cert.not_after as f64), "{node}");
        let ttl = series(
            &metrics,
            "weft_certificate_ttl_seconds",
            &[("identity", &expected)],
        );
        assert!(ttl.is_some_and(|ttl| ttl > 0.0), "{node}: ttl {ttl:?}");
        let issued = series(
            &metrics,
            "weft_certificate_requests_total",
            &[("result", "issued")],
        );
        assert!(issued.unwrap_or(0.0) >= 1.0, "{node}: {issued:?}");
    }
    let issued = series(
        &controller_metrics(&cluster),
        "weft_controller_certificates_issued_total",
        &[],
    );
    assert!(issued.unwrap_or(0.0) >= 2.0, "{issued:?}");

    // Private keys exist only where the CA keeps its own and in the agents' state.
    let ca_dir = &topology.ca_dir;
    assert!(ca_dir.join("tls.key").is_file(), "the CA has no tls.key");
    let allowed = |path: &Path| {
        path.starts_with(ca_dir)
            || topology
                .nodes
                .iter()
                .any(|node| path.starts_with(&node.agent_state_dir))
    };
    let stray: Vec<PathBuf> = key_files(&topology.state_dir)
        .into_iter()
        .filter(|path| !allowed(path))
        .collect();
    assert!(
        stray.is_empty(),
        "private keys outside the CA and the agents: {stray:?}"
    );
}

/// Node `node`'s `weft_hbone_failures_total{direction="inbound"}`, by reason.
fn inbound_failures(cluster: &Cluster, node: &str) -> BTreeMap<String, f64> {
    samples(&agent_metrics(cluster, node), "weft_hbone_failures_total")
        .into_iter()
        .filter(|(labels, _)| labels.get("direction").map(String::as_str) == Some("inbound"))
        .map(|(labels, value)| (labels.get("reason").cloned().unwrap_or_default(), value))
        .collect()
}

/// What changed between two counts: reason and increase.
fn increase(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(reason, value)| {
            let delta = value - before.get(reason).copied().unwrap_or(0.0);
            (delta != 0.0).then(|| (reason.clone(), delta))
        })
        .collect()
}

#[test]
fn expired_early_and_untrusted_client_certificates_are_refused_and_counted() {
    let cluster = two_nodes(&[]);
    let state = cluster.topology().state_dir.clone();
    let node1 = cluster.topology().node("node1").unwrap().ip;
    let roots = cluster.topology().ca_dir.join("ca.crt");
    let mesh_ca = TestCa::mesh(&cluster.topology().ca_dir);
    let client = identity("client");
    let dir = state.join("test-clients");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    mesh_ca.issue(&client, valid_now(), &dir, "valid");
    mesh_ca.issue(&client, now - 2 * hour..now - hour, &dir, "expired");
    mesh_ca.issue(&client, now + hour..now + 2 * hour, &dir, "early");
    TestCa::rogue().issue(&client, valid_now(), &dir, "untrusted");

    // Straight to node1's HBONE port from node0, as another node's agent would come,
    // asking for echo's certificate by its server name.
    let sni = format!("echo.default.{TRUST_DOMAIN}.spiffe.invalid");
    let url = format!("https://{sni}:15008/");
    let resolve = format!("{sni}:15008:{node1}");
    let curl = |stem: &str, verify_server: bool| -> Output {
        let cert = dir.join(format!("{stem}.crt")).display().to_string();
        let key = dir.join(format!("{stem}.key")).display().to_string();
        let roots = roots.display().to_string();
        let mut argv = vec![
            "curl",
            "-s",
            "-S",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cert",
            &cert,
            "--key",
            &key,
            "--resolve",
            &resolve,
        ];
        if verify_server {
            argv.extend(["--cacert", &roots]);
        } else {
            argv.push("--insecure");
        }
        argv.push(&url);
        cluster
            .node_command("node0", &argv)
            .unwrap()
            .output()
            .unwrap()
    };

    // The control: a good certificate from the mesh CA gets through the handshake to
    // an HTTP answer. (Without --insecure curl would stop at the server's certificate,
    // which names a SPIFFE ID, not the host name.) The agent judges a client
    // certificate during the handshake, before it can answer, so had it counted this
    // one as bad, the count would show by now.
    let start = inbound_failures(&cluster, "node1");
    // Refused certificates and identities counted since the start (how a connection
    // ends after its handshake is another matter).
    let certificate_failures = || {
        let mut counted = increase(&start, &inbound_failures(&cluster, "node1"));
        counted
            .retain(|reason, _| reason.starts_with("certificate") || reason.ends_with("identity"));
        counted
    };
    let out = curl("valid", false);
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        code != "000" && !code.is_empty(),
        "the handshake with a good certificate failed: {out:?}"
    );
    assert_eq!(
        certificate_failures(),
        BTreeMap::new(),
        "a good certificate was counted as bad"
    );

    // Each refused certificate is counted once, under its reason, and no other is:
    // the counts since the start always equal the refusals so far.
    let mut refused = BTreeMap::new();
    for (stem, reason) in [
        ("expired", "certificate_expired"),
        ("early", "certificate_not_yet_valid"),
        ("untrusted", "certificate_untrusted"),
    ] {
        let out = curl(stem, true);
        assert!(
            !out.status.success(),
            "curl with the {stem} certificate succeeded: {out:?}"
        );
        *refused.entry(reason.to_owned()).or_insert(0.0) += 1.0;
        let mut counted = BTreeMap::new();
        wait_until(
            &format!("node1 to count the {stem} certificate"),
            READY,
            || {
                counted = certificate_failures();
                counted.values().sum::<f64>() >= refused.values().sum::<f64>()
            },
        );
        assert_eq!(
            counted,
            refused,
            "the {stem} certificate was counted wrong; curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The agent still serves, and counted nothing more meanwhile.
    assert_eq!(answering_pod(&cluster, ECHO_URL).as_deref(), Some("echo-1"));
    assert_eq!(certificate_failures(), refused);
}

/// Each identity's serials in every `/certs` of both nodes while `until` runs.
fn serials_while(
    cluster: &Cluster,
    mut until: impl FnMut() -> bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while !until() {
        for node in ["node0", "node1"] {
            for cert in certs(cluster, node) {
                seen.entry(cert.identity).or_default().insert(cert.serial);
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    seen
}

fn issued_requests(cluster: &Cluster, node: &str) -> f64 {
    series(
        &agent_metrics(cluster, node),
        "weft_certificate_requests_total",
        &[("result", "issued")],
    )
    .unwrap_or(0.0)
}

#[test]
fn short_lived_certificates_renew_under_load_without_a_failed_request() {
    const SECONDS: u64 = 25;
    let cluster = two_nodes(&["--cert-ttl", "10s"]);
    let now = unix_now();
    for node in ["node0", "node1"] {
        for cert in certs(&cluster, node) {
            assert!(
                cert.not_after <= now + 11,
                "{node}: not a 10 s certificate: {cert:#?}"
            );
        }
    }
    let issued_before: Vec<f64> = ["node0", "node1"]
        .map(|node| issued_requests(&cluster, node))
        .to_vec();
    let controller_before = series(
        &controller_metrics(&cluster),
        "weft_controller_certificates_issued_total",
        &[],
    )
    .unwrap_or(0.0);

    // A new connection, hence a new tunnel and handshake, for every request.
    let duration = format!("{SECONDS}s");
    let mut wrk = cluster
        .pod_command(
            "default",
            "client",
            &[
                "wrk",
                "-t2",
                "-c4",
                "-d",
                &duration,
                "--timeout",
                "3s",
                "-H",
                "Connection: close",
                ECHO_URL,
            ],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let serials = serials_while(&cluster, || wrk.try_wait().unwrap().is_some());
    let ran = started.elapsed();
    let wrk = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&wrk.stdout);
    assert!(wrk.status.success(), "wrk failed: {report}");
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "requests failed while certificates renewed: {report}"
    );
    let requests: u64 = report
        .lines()
        .find_map(|line| line.trim().split_once(" requests in ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {report}"));
    assert!(requests > 100, "{report}");
    eprintln!("{requests} requests in {ran:?}; serials seen: {serials:#?}");

    // Renewed at about half-life: at least twice in 25 s of 10 s certificates, and no
    // storm of renewals either.
    for service_account in ["client", "echo"] {
        let id = identity(service_account);
        let count = serials.get(&id).map_or(0, BTreeSet::len);
        assert!(
            (3..=10).contains(&count),
            "{id} had {count} certificates in {ran:?} (expected a renewal every ~5 s): {serials:#?}"
        );
    }
    for (node, before) in ["node0", "node1"].into_iter().zip(issued_before) {
        let after = issued_requests(&cluster, node);
        assert!(after >= before + 2.0, "{node}: issued {before} -> {after}");
    }
    let controller_after = series(
        &controller_metrics(&cluster),
        "weft_controller_certificates_issued_total",
        &[],
    )
    .unwrap_or(0.0);
    assert!(
        controller_after >= controller_before + 4.0,
        "{controller_before} -> {controller_after}"
    );
}

/// A curl loop in the client pod, a new connection per request, until [`Self::stop`].
struct CurlLoop {
    child: Child,
    stop: PathBuf,
}

impl CurlLoop {
    fn start(cluster: &Cluster, url: &str) -> CurlLoop {
        let stop = cluster.topology().state_dir.join("stop-curl-loop");
        let script = format!(
            "ok=0; failed=0; \
             while [ ! -e {stop} ]; do \
               if out=$(curl -sS -f --max-time 3 -H 'Connection: close' {url} 2>&1 >/dev/null); \
               then ok=$((ok+1)); else failed=$((failed+1)); echo \"$(date +%s.%N) $out\" >&2; fi; \
             done; echo \"$ok $failed\"",
            stop = stop.display()
        );
        let child = cluster
            .pod_command("default", "client", &["bash", "-c", &script])
            .unwrap()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        CurlLoop { child, stop }
    }

    /// Stops the loop; returns how many requests it made and its failures (time and
    /// curl's message, a line each).
    fn stop(self) -> (u64, String) {
        std::fs::write(&self.stop, "").unwrap();
        let out = self.child.wait_with_output().unwrap();
        let counts = String::from_utf8_lossy(&out.stdout);
        let (ok, failed) = counts
            .trim()
            .split_once(' ')
            .unwrap_or_else(|| panic!("the curl loop printed {counts:?}"));
        let failures = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            failed, "0",
            "the curl loop failed {failed} time(s):\n{failures}"
        );
        (ok.parse().unwrap(), failures)
    }
}

#[test]
fn root_rotation_keeps_old_and_new_roots_talking() {
    const OVERLAP: Duration = Duration::from_secs(40);
    let mut cluster = two_nodes(&[]);
    let old_root = signing_root(&ca_status(&cluster));
    for node in ["node0", "node1"] {
        for cert in certs(&cluster, node) {
            assert_eq!(cert.root, old_root, "{node}: {cert:#?}");
        }
    }
    let traffic = CurlLoop::start(&cluster, ECHO_URL);

    let ca_dir = cluster.topology().ca_dir.display().to_string();
    let rotate = std::process::Command::new(workspace_bin("weft-controller"))
        .args(["ca", "rotate", "--ca-dir", &ca_dir, "--overlap", "40s"])
        .output()
        .unwrap();
    let rotated_at = Instant::now();
    assert!(rotate.status.success(), "ca rotate: {rotate:?}");

    // The controller trusts both roots, and signs with the new one once both agents
    // trust it.
    let mut ca = serde_json::Value::Null;
    wait_until("the new root to propagate and sign", READY, || {
        ca = ca_status(&cluster);
        ca["propagating"] == false && signing_root(&ca) != old_root
    });
    let new_root = signing_root(&ca);
    eprintln!(
        "the new root signs {:?} after the rotation",
        rotated_at.elapsed()
    );
    let anchors = anchor_subjects(&ca);
    assert!(
        anchors.contains(&old_root) && anchors.contains(&new_root),
        "{ca:#}"
    );
    assert!(ca["error"].is_null(), "{ca:#}");
    let retire_at = ca["anchors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|anchor| anchor["subject"] == old_root.as_str())
        .and_then(|anchor| anchor["retire_at"].as_u64())
        .unwrap_or_else(|| panic!("the old root has no retire_at: {ca:#}"));

    // A workload that arrives now gets its certificate from the new root; the client,
    // still on the old root, talks to it.
    add_server(&mut cluster, "fresh-1", "node1", "fresh");
    cluster.settle();
    let fresh = identity("fresh");
    let fresh_cert = certs(&cluster, "node1")
        .into_iter()
        .find(|cert| cert.identity == fresh)
        .unwrap_or_else(|| panic!("node1 holds no certificate of {fresh}"));
    assert_eq!(fresh_cert.root, new_root, "{fresh_cert:#?}");
    let client_root = |cluster: &Cluster| {
        certs(cluster, "node0")
            .into_iter()
            .find(|cert| cert.identity == identity("client"))
            .map(|cert| cert.root)
    };
    assert_eq!(
        client_root(&cluster).as_deref(),
        Some(old_root.as_str()),
        "the client renewed before this step could run ({:?} after the rotation)",
        rotated_at.elapsed()
    );
    wait_until("the client to reach the new workload", READY, || {
        answering_pod(&cluster, FRESH_URL).as_deref() == Some("fresh-1")
    });
    assert_eq!(
        client_root(&cluster).as_deref(),
        Some(old_root.as_str()),
        "the client renewed before it talked to the new workload; the step proved nothing"
    );
    eprintln!(
        "the client on the old root reached the workload on the new root {:?} after the rotation",
        rotated_at.elapsed()
    );

    // Before the overlap ends, every certificate leads to the new root...
    wait_until("every certificate to lead to the new root", OVERLAP, || {
        ["node0", "node1"].iter().all(|node| {
            certs(&cluster, node)
                .iter()
                .all(|cert| cert.root == new_root)
        })
    });
    assert!(
        unix_now() < retire_at,
        "certificates moved to the new root only after the old one retired"
    );
    eprintln!(
        "every certificate leads to the new root {:?} after the rotation",
        rotated_at.elapsed()
    );
    // ...and when it ends, the old root is gone.
    let retired = Duration::from_secs(retire_at.saturating_sub(unix_now())) + READY;
    wait_until("the old root to retire", retired, || {
        let ca = ca_status(&cluster);
        !anchor_subjects(&ca).contains(&old_root)
    });
    assert_eq!(anchor_subjects(&ca_status(&cluster)), [new_root.as_str()]);
    // Traffic keeps flowing on the new root alone.
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        answering_pod(&cluster, FRESH_URL).as_deref(),
        Some("fresh-1")
    );
    let (requests, _) = traffic.stop();
    eprintln!(
        "{requests} requests without a failure over {:?} of rotation",
        rotated_at.elapsed()
    );
    assert!(requests > 20, "the curl loop hardly ran: {requests}");
}

/// A `weft.ca.v1.CertificateAuthority/Sign` call made by hand, as node `node` with its
/// own token, asking for `spiffe_id`: gRPC with curl from the node. (It does not check
/// the controller's certificate, which names a SPIFFE ID curl cannot match; every
/// agent does.) Returns the response headers (a refusal's `grpc-status` is among them)
/// and body.
fn sign_as(cluster: &Cluster, node: &str, spiffe_id: &str) -> (String, Vec<u8>) {
    let (_, csr) = weft_api::ca::signing_request(spiffe_id).unwrap();
    let message = SignRequest {
        node: node.to_owned(),
        csr,
    }
    .encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let dir = cluster.topology().state_dir.join("test-sign");
    std::fs::create_dir_all(&dir).unwrap();
    let request = dir.join("request");
    let body = dir.join("body");
    std::fs::write(&request, frame).unwrap();
    let token_file = cluster.topology().node_tokens.join(format!("{node}.token"));
    let token = std::fs::read_to_string(token_file).unwrap();
    let url = format!(
        "https://{}:15010/weft.ca.v1.CertificateAuthority/Sign",
        cluster.topology().controller_address
    );
    let authorization = format!("authorization: Bearer {}", token.trim());
    let data = format!("@{}", request.display());
    let body_path = body.display().to_string();
    let out = cluster
        .node_command(
            node,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--http2",
                "--insecure",
                "-D",
                "-",
                "-o",
                &body_path,
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-H",
                &authorization,
                "--data-binary",
                &data,
                &url,
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "the Sign call failed: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).to_ascii_lowercase(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

fn refusals(cluster: &Cluster, reason: &str) -> f64 {
    series(
        &controller_metrics(cluster),
        "weft_controller_certificate_refusals_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_node_is_refused_an_identity_it_does_not_host() {
    let cluster = two_nodes(&[]);
    // node0 runs the client, node1 runs echo.
    let refused_before = refusals(&cluster, "foreign_identity");
    let (headers, _) = sign_as(&cluster, "node0", &identity("echo"));
    assert!(
        headers.contains("grpc-status: 7"),
        "node0 got echo's identity signed (expected PERMISSION_DENIED): {headers}"
    );
    assert_eq!(refusals(&cluster, "foreign_identity"), refused_before + 1.0);
    // The control: the same call for an identity node0 runs is signed.
    let (headers, body) = sign_as(&cluster, "node0", &identity("client"));
    assert!(
        String::from_utf8_lossy(&body).contains("-----BEGIN CERTIFICATE-----"),
        "node0 did not get its own identity signed: {headers}"
    );
    assert_eq!(refusals(&cluster, "foreign_identity"), refused_before + 1.0);
}
