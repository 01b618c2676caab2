//! The control plane end to end, on a 2-node local cluster: weft-controller reads the
//! test's manifests (and the cluster's nodes and pods) from files and streams every
//! agent its view. A policy changed while traffic flows reaches every agent without
//! a failed request; the agents keep serving, and restart, while the controller is
//! away and resync when it returns; an invalid policy or file is reported and changes
//! nothing.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use weft_cluster::{Cluster, PodInfo, PodSpec};
use weft_e2e::{
    TestCluster, controller_metrics, policy_verdict, samples, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(10);
const SERVICE_URL: &str = "http://10.96.0.10/";

/// The default namespace meshed with `mode`, the echo service, and `extra` manifests.
fn manifests(mode: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{ name: default, labels: {{ weft.dev/mesh: enabled }} }}
---
apiVersion: v1
kind: Service
metadata: {{ name: echo, namespace: default }}
spec:
  clusterIP: 10.96.0.10
  selector: {{ app: echo }}
  ports: [{{ name: http, port: 80, targetPort: 8080 }}]
---
# Round robin, so that a few requests reach every replica.
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {{ name: echo-balancing, namespace: default }}
spec: {{ service: echo, loadBalancer: {{ algorithm: ROUND_ROBIN }} }}
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {{ name: default, namespace: default }}
spec: {{ mode: {mode} }}
{extra}"#
    )
}

/// echo-0 on node0 and echo-1 on node1 behind the echo service, a meshed client on
/// node0, and an unmeshed pod on node0 to try plaintext from.
fn mesh(mode: &str) -> (TestCluster, Vec<PodInfo>) {
    let mut cluster = TestCluster::with_mesh(2, &manifests(mode, ""));
    let echo = workspace_bin("weft-echo").display().to_string();
    let replicas = [("echo-0", "node0"), ("echo-1", "node1")]
        .map(|(name, node)| {
            let mut spec = PodSpec::new(name, node, &[&echo]);
            spec.labels.insert("app".into(), "echo".into());
            spec.service_account = "echo".into();
            cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"))
        })
        .to_vec();
    cluster
        .add_pod(PodSpec::new("client", "node0", &[]))
        .unwrap_or_else(|err| panic!("{err}"));
    let mut outsider = PodSpec::new("outsider", "node0", &[]);
    outsider.namespace = "outside".into();
    cluster
        .add_pod(outsider)
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    wait_until("the echo service", READY, || service_answers(&cluster));
    (cluster, replicas)
}

/// The pod that answered a request from the client to the echo service, if one did.
fn answering_pod(cluster: &Cluster) -> Option<String> {
    let out = cluster
        .pod_command(
            "default",
            "client",
            &["curl", "-sf", "--max-time", "3", SERVICE_URL],
        )
        .unwrap()
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(answer["pod"].as_str()?.to_owned())
}

fn service_answers(cluster: &Cluster) -> bool {
    answering_pod(cluster).is_some()
}

/// Whether plaintext from the unmeshed pod gets into `target` (a meshed pod on node1,
/// so the connection crosses the node's inbound enforcement).
fn plaintext_gets_in(cluster: &Cluster, target: &PodInfo) -> bool {
    let url = format!("http://{}:8080/", target.ip);
    cluster
        .pod_command(
            "outside",
            "outsider",
            &[
                "curl",
                "-sf",
                "--connect-timeout",
                "1",
                "--max-time",
                "2",
                &url,
            ],
        )
        .unwrap()
        .output()
        .unwrap()
        .status
        .success()
}

/// wrk from the client pod against the service for `seconds`, new connections
/// included (`Connection: close` on half the threads' requests is not available in
/// wrk, so it runs keep-alive; the curl loop beside it opens a connection a request).
fn load(cluster: &Cluster, seconds: u64) -> (Child, Child) {
    let duration = format!("{seconds}s");
    let wrk = cluster
        .pod_command(
            "default",
            "client",
            &["wrk", "-t1", "-c4", "-d", &duration, SERVICE_URL],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "end=$((SECONDS+{seconds})); ok=0; failed=0; \
         while [ $SECONDS -lt $end ]; do \
           if curl -sf --max-time 3 -H 'Connection: close' {SERVICE_URL} >/dev/null; \
           then ok=$((ok+1)); else failed=$((failed+1)); fi; \
         done; echo \"$ok $failed\""
    );
    let curls = cluster
        .pod_command("default", "client", &["bash", "-c", &script])
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    (wrk, curls)
}

/// Waits for the load and panics unless every request succeeded.
fn assert_no_failures((wrk, curls): (Child, Child)) {
    let wrk = wrk.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&wrk.stdout);
    assert!(wrk.status.success(), "wrk failed: {report}");
    assert!(
        !report.contains("Socket errors") && !report.contains("Non-2xx"),
        "requests failed during the change: {report}"
    );
    let requests: u64 = report
        .lines()
        .find_map(|line| line.trim().split_once(" requests in ")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {report}"));
    assert!(requests > 0, "{report}");
    let curls = curls.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&curls.stdout);
    let (ok, failed) = counts.trim().split_once(' ').unwrap();
    assert_eq!(failed, "0", "curl loop: {ok} answered, {failed} failed");
    assert_ne!(ok, "0", "the curl loop sent nothing");
}

#[test]
fn a_policy_change_reaches_every_agent_while_traffic_flows() {
    let (cluster, replicas) = mesh("STRICT");
    let remote = &replicas[1];
    assert!(
        !plaintext_gets_in(&cluster, remote),
        "plaintext got into a STRICT pod"
    );

    let traffic = load(&cluster, 6);
    std::thread::sleep(Duration::from_secs(1));
    let changed = Instant::now();
    cluster.set_mesh_yaml(&manifests("PERMISSIVE", ""));
    cluster.settle();
    let converged = changed.elapsed();
    eprintln!(
        "convergence: {:.1} ms from writing the policy to every agent applying it",
        converged.as_secs_f64() * 1000.0
    );
    assert!(
        plaintext_gets_in(&cluster, remote),
        "the PERMISSIVE policy did not reach node1's kernel"
    );
    let status = cluster.controller_status().unwrap();
    for node in ["node0", "node1"] {
        assert_eq!(status["nodes"][node]["in_sync"], true, "{status:#}");
    }
    assert_no_failures(traffic);
}

#[test]
fn agents_keep_serving_without_the_controller_and_resync_when_it_returns() {
    let (mut cluster, replicas) = mesh("STRICT");
    cluster.stop_controller().unwrap();
    assert!(
        service_answers(&cluster),
        "traffic stopped with the controller"
    );

    // An agent restarted while the controller is away serves what it had.
    cluster.stop_agent("node1").unwrap();
    cluster.start_agent_on("node1");
    wait_until("the service after the restart", READY, || {
        service_answers(&cluster)
    });
    let answers: std::collections::BTreeSet<String> = (0..20)
        .map(|_| answering_pod(&cluster).expect("the service answers"))
        .collect();
    assert_eq!(
        answers.len(),
        2,
        "both replicas answer without a controller: {answers:?}"
    );

    // A change made while the controller is away applies once it is back, and not
    // before: with both agents cut off from the controller, nothing can bring it.
    wait_until("both agents to lose the controller", READY, || {
        NODES
            .iter()
            .all(|node| subscription(&cluster, node)["connected"] == false)
    });
    let served = NODES.map(|node| subscription(&cluster, node)["version"].clone());
    cluster.set_mesh_yaml(&manifests("PERMISSIVE", ""));
    assert!(
        !plaintext_gets_in(&cluster, &replicas[1]),
        "the change applied with no controller to compile it"
    );
    assert_eq!(
        NODES.map(|node| subscription(&cluster, node)["version"].clone()),
        served,
        "an agent changed its configuration with no controller"
    );
    cluster.run_controller();
    cluster.settle();
    assert!(
        plaintext_gets_in(&cluster, &replicas[1]),
        "the agents did not resync"
    );
    for (node, before) in NODES.iter().zip(&served) {
        assert_ne!(
            &subscription(&cluster, node)["version"],
            before,
            "{node} serves what it served before the change"
        );
    }
    assert!(service_answers(&cluster));
}

const NODES: [&str; 2] = ["node0", "node1"];

/// Node `node`'s agent's view of its subscription to the controller (from
/// `/config_dump`): `connected`, the `version` it serves, …
fn subscription(cluster: &Cluster, node: &str) -> serde_json::Value {
    let dump = cluster
        .agent_admin(node, "/config_dump")
        .unwrap_or_else(|err| panic!("{err}"));
    dump["controller"].clone()
}

#[test]
fn invalid_policies_and_files_are_reported_and_change_nothing() {
    let (cluster, replicas) = mesh("STRICT");
    // Semantically invalid: port overrides without a selector. It would open the pod.
    let invalid = r#"---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: open-everything, namespace: default }
spec:
  mode: DISABLE
  portModes: [{ port: 8080, mode: DISABLE }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: ghost, namespace: default }
spec: { service: ghost }
"#;
    cluster.set_mesh_yaml(&manifests("STRICT", invalid));
    cluster.settle();
    let status = cluster.controller_status().unwrap();
    let verdict = policy_verdict(&status, "PeerAuthentication", "open-everything");
    assert_eq!(verdict["accepted"], false, "{verdict:#}");
    assert_eq!(verdict["reason"], "Invalid");
    assert!(
        verdict["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.portModes: "),
        "{verdict:#}"
    );
    let ghost = policy_verdict(&status, "TrafficPolicy", "ghost");
    assert_eq!(
        (&ghost["accepted"], &ghost["reason"]),
        (
            &serde_json::json!(false),
            &serde_json::json!("ServiceNotFound")
        )
    );
    assert!(
        !plaintext_gets_in(&cluster, &replicas[1]),
        "the invalid policy applied"
    );

    // A file that does not parse keeps its last good content, and says where.
    let path = cluster.manifests_file();
    cluster.set_mesh_yaml(&manifests("LOOSE", ""));
    cluster.settle();
    let status = cluster.controller_status().unwrap();
    let file = status["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|file| file["path"] == path.display().to_string())
        .unwrap_or_else(|| panic!("{} not in {status:#}", path.display()));
    let error = file["error"].as_str().unwrap_or_else(|| panic!("{file:#}"));
    assert!(
        error.contains("PeerAuthentication default/default") && error.contains("LOOSE"),
        "{error}"
    );
    assert!(error.contains("test.yaml:"), "{error}");
    assert!(
        !plaintext_gets_in(&cluster, &replicas[1]),
        "the broken file changed the mode"
    );
    assert!(service_answers(&cluster));
    // The invalid policy's verdict is still there: the last good content applies.
    let status = cluster.controller_status().unwrap();
    assert_eq!(
        policy_verdict(&status, "PeerAuthentication", "open-everything")["reason"],
        "Invalid"
    );
}

/// An agent whose credential is not its node's is refused, and says why.
#[test]
fn an_agent_without_its_nodes_token_is_refused() {
    let (cluster, _) = mesh("STRICT");
    let node = cluster.topology().node("node1").unwrap().clone();
    let wrong_token = cluster.topology().node_tokens.join("node0.token");
    // Reaching the controller as the real agents do (its address, the roots and the
    // identity it is checked with).
    let running = &node.agent.as_ref().expect("node1's agent runs").command;
    // The running agent has each setting as a flag, or in its environment.
    let same = |flag: &str| -> [String; 2] {
        let variable = format!("WEFT_{}=", flag[2..].to_uppercase().replace('-', "_"));
        let value = match running.iter().position(|arg| arg == flag) {
            Some(at) => running[at + 1].clone(),
            None => running
                .iter()
                .find_map(|arg| arg.strip_prefix(&variable))
                .unwrap_or_else(|| panic!("node1's agent runs without {flag}: {running:?}"))
                .to_owned(),
        };
        [flag.to_owned(), value]
    };
    let state = tempfile::tempdir().unwrap();
    // A second agent process for node1 with node0's token. It runs on the fabric: on
    // node1 it would find the real agent's ports taken before it even subscribed.
    let mut argv = vec![
        workspace_bin("weft-agent").display().to_string(),
        "run".into(),
        "--node".into(),
        "node1".into(),
        "--bpffs".into(),
        state.path().join("bpffs").display().to_string(),
        "--pod-cgroup".into(),
        node.pods_cgroup.display().to_string(),
        "--capture-address".into(),
        node.ip.to_string(),
        "--cni-socket".into(),
        state.path().join("cni.sock").display().to_string(),
        "--state-dir".into(),
        state.path().display().to_string(),
        "--controller-token-file".into(),
        wrong_token.display().to_string(),
    ];
    for flag in ["--controller", "--controller-ca", "--controller-identity"] {
        argv.extend(same(flag));
    }
    let log_path = state.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = cluster
        .fabric_command(&argv)
        .unwrap()
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("the refusal in the controller's metrics", READY, || {
        metric(&cluster, "weft_controller_subscriptions_refused_total") >= 1.0
    });
    wait_until("the refusal in the agent's log", READY, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("refused the subscription") && log.contains("not node node1's")
    });
    let status = cluster.controller_status().unwrap();
    assert_eq!(
        status["nodes"]["node1"]["streams"], 1,
        "only the real agent is subscribed: {status:#}"
    );
    let _ = Command::new("kill").arg(agent.id().to_string()).status();
    let _ = agent.wait();
}

/// The sum of every sample of the controller's metric `name`.
fn metric(cluster: &Cluster, name: &str) -> f64 {
    samples(&controller_metrics(cluster), name)
        .into_iter()
        .map(|(_, value)| value)
        .sum()
}

/// A pod annotated `weft.dev/mesh=disabled` in a meshed namespace is left alone: no
/// enforcement on its way in, and as a service endpoint it is reached directly.
#[test]
fn a_pod_annotated_out_of_the_mesh_is_left_alone() {
    let (mut cluster, _) = mesh("STRICT");
    let echo = workspace_bin("weft-echo").display().to_string();
    let mut legacy = PodSpec::new("legacy", "node1", &[&echo]);
    legacy.labels.insert("app".into(), "echo".into());
    legacy
        .annotations
        .insert("weft.dev/mesh".into(), "disabled".into());
    let legacy = cluster.add_pod(legacy).unwrap();
    cluster.settle();
    wait_until("plaintext into the opted-out pod", READY, || {
        plaintext_gets_in(&cluster, &legacy)
    });
    let status = cluster.controller_status().unwrap();
    assert_eq!(status["nodes"]["node1"]["in_sync"], true);
    // Round robin over three endpoints: some of 12 requests reach the opted-out pod.
    let reached_legacy = (0..12)
        .map(|_| answering_pod(&cluster).expect("the service answers"))
        .filter(|pod| pod == "legacy")
        .count();
    assert!(
        reached_legacy > 0,
        "the service never reached its opted-out endpoint"
    );
}
