//! The CNI plugin against a real agent, invoked as a container runtime invokes it:
//! ADD, CHECK, DEL and VERSION with valid and malformed input give spec-shaped answers
//! and leave nothing half-done; with the agent down, ADD fails and the pod is not
//! started unmeshed. The agent installs the plugin: it chains it into the node's
//! network configuration before it is ready, chains it again when the primary CNI
//! rewrites the file, and `weft-agent uninstall` takes it out.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use weft_cluster::{ClusterError, PodSpec, cni};
use weft_e2e::{TestCluster, workspace_bin};

const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata: { name: default, labels: { weft.dev/mesh: enabled } }\n";

/// Runs the plugin with `env` and `stdin`, as a runtime does.
fn plugin(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(workspace_bin(cni::PLUGIN))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// The error the plugin printed: `(code, msg)`, after checking the spec's shape.
fn cni_error(output: &Output) -> (u64, String) {
    assert!(!output.status.success(), "the plugin succeeded: {output:?}");
    let error: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("not a CNI error ({err}): {output:?}"));
    assert!(error["cniVersion"].is_string(), "{error}");
    let code = error["code"].as_u64().expect("a numeric code");
    let msg = error["msg"].as_str().expect("a message").to_owned();
    (code, msg)
}

fn records(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("pods")).map_or(0, |entries| entries.count())
}

fn config(socket: &Path, prev_result: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"weft-local","type":"weft-cni","agentSocket":"{}","prevResult":{prev_result}}}"#,
        socket.display()
    )
}

#[test]
fn the_plugin_speaks_cni_to_a_real_agent() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    let node = cluster.topology().node("node0").unwrap().clone();
    let web = cluster.add_pod(PodSpec::new("web", "node0", &[])).unwrap();
    assert_eq!(records(&node.agent_state_dir), 1, "ADD left no record");

    cni::invoke("CHECK", &node, &web).unwrap_or_else(|err| panic!("CHECK: {err}"));
    let version = plugin(&[("CNI_COMMAND", "VERSION")], "");
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&"1.0.0".into()),
        "{version}"
    );

    // Malformed input: a spec-shaped error, and the agent never hears of the pod.
    let netns = format!("/run/netns/{}", web.netns);
    let good_env = |command| {
        vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "ctr-malformed"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=malformed",
            ),
        ]
    };
    let prev = format!(
        r#"{{"cniVersion":"1.0.0","interfaces":[{{"name":"{}"}},{{"name":"eth0","sandbox":"{netns}"}}],"ips":[{{"address":"{}/32","gateway":"{}","interface":1}}]}}"#,
        web.host_veth, web.ip, node.pod_gateway
    );
    let (code, _) = cni_error(&plugin(&good_env("ADD"), "{ not json"));
    assert_eq!(code, 6);
    let mut no_id = good_env("ADD");
    no_id.retain(|(key, _)| *key != "CNI_CONTAINERID");
    let (code, msg) = cni_error(&plugin(&no_id, &config(&node.agent_socket, &prev)));
    assert_eq!(code, 4);
    assert!(msg.contains("CNI_CONTAINERID"), "{msg}");
    let mut unknown_netns = good_env("ADD");
    unknown_netns[2] = ("CNI_NETNS", "/run/netns/weft-no-such-namespace");
    let (code, msg) = cni_error(&plugin(&unknown_netns, &config(&node.agent_socket, &prev)));
    assert_eq!(code, 4);
    assert!(msg.contains("weft-no-such-namespace"), "{msg}");
    let (code, _) = cni_error(&plugin(
        &good_env("ADD"),
        &config(&node.agent_socket, "null"),
    ));
    assert_eq!(code, 7, "ADD without prevResult");
    assert_eq!(
        records(&node.agent_state_dir),
        1,
        "a malformed ADD left a record"
    );

    // DEL forgets the pod; a second DEL is fine; CHECK then fails.
    cni::invoke("DEL", &node, &web).unwrap_or_else(|err| panic!("DEL: {err}"));
    cni::invoke("DEL", &node, &web).unwrap_or_else(|err| panic!("second DEL: {err}"));
    assert_eq!(records(&node.agent_state_dir), 0);
    match cni::invoke("CHECK", &node, &web) {
        Err(ClusterError::Cni { code, message, .. }) => {
            assert_eq!(code, 100);
            assert!(message.contains("unknown container"), "{message}");
        }
        other => panic!("CHECK of a deleted pod: {other:?}"),
    }
}

#[test]
fn with_the_agent_down_add_fails_and_no_pod_runs_unmeshed() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    cluster.stop_agent("node0").unwrap();
    let echo = workspace_bin("weft-echo").display().to_string();
    match cluster.add_pod(PodSpec::new("web", "node0", &[echo.as_str()])) {
        Err(ClusterError::Cni { code, message, .. }) => {
            assert_eq!(code, 11, "{message}");
            assert!(message.contains("not running"), "{message}");
        }
        other => panic!("ADD with the agent down: {other:?}"),
    }
    assert!(cluster.topology().pod("default", "web").is_none());
    let prefix = format!("{}default.web", cluster.layout().netns_prefix());
    assert!(
        !Path::new("/run/netns").join(&prefix).exists(),
        "the failed pod's namespace was left behind"
    );
    // With the agent back, the runtime's retry succeeds.
    cluster.start_agent_on("node0");
    cluster
        .add_pod(PodSpec::new("web", "node0", &[echo.as_str()]))
        .unwrap();
}

#[test]
fn the_agent_chains_the_plugin_into_the_nodes_configuration_and_uninstall_removes_it() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    let node = cluster.topology().node("node0").unwrap().clone();
    let conflist = node.cni_conf_dir.join("10-weft-local.conflist");
    let types = || -> Vec<String> {
        let text = std::fs::read_to_string(&conflist).unwrap_or_default();
        let list: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        list["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|plugin| plugin["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Chained before the agent said it was ready, and the plugin placed beside it:
    // a pod is enrolled through the list alone.
    assert_eq!(types(), [cni::PRIMARY, cni::PLUGIN]);
    assert!(node.cni_plugin_dir.join(cni::PLUGIN).is_file());
    cluster.add_pod(PodSpec::new("web", "node0", &[])).unwrap();
    assert_eq!(
        records(&node.agent_state_dir),
        1,
        "the chained plugin enrolled the pod"
    );

    // The primary CNI rewrites its file: the agent chains the plugin again.
    let writes = || {
        weft_e2e::total(
            &weft_e2e::agent_metrics(&cluster, "node0"),
            "weft_cni_configuration_writes_total",
            &[],
        )
    };
    let before = writes();
    cni::write_primary(&node.cni_conf_dir).unwrap();
    assert_eq!(types(), [cni::PRIMARY]);
    weft_e2e::wait_until(
        "the plugin is chained again, once",
        Duration::from_secs(20),
        || types() == [cni::PRIMARY, cni::PLUGIN] && writes() == before + 1.0,
    );

    // Uninstalling refuses while the node's agent runs; once it stopped, it takes the
    // plugin out and removes it.
    let agent = workspace_bin("weft-agent").display().to_string();
    let path = |path: &Path| path.display().to_string();
    let argv = [
        agent,
        "uninstall".to_owned(),
        "--bpffs".to_owned(),
        path(&node.bpffs),
        "--cni-conf-dir".to_owned(),
        path(&node.cni_conf_dir),
        "--cni-bin-dir".to_owned(),
        path(&node.cni_plugin_dir),
    ];
    let uninstall = |cluster: &TestCluster| {
        cluster
            .node_command("node0", &argv)
            .unwrap()
            .output()
            .unwrap()
    };
    let refused = uninstall(&cluster);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("an agent still runs on this node"), "{said}");
    assert_eq!(types(), [cni::PRIMARY, cni::PLUGIN], "nothing was undone");
    cluster.stop_agent("node0").unwrap();
    let uninstall = uninstall(&cluster);
    assert!(uninstall.status.success(), "{uninstall:?}");
    assert_eq!(types(), [cni::PRIMARY]);
    assert!(!node.cni_plugin_dir.join(cni::PLUGIN).exists());
}
