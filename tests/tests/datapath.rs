//! The kernel datapath on a local cluster with real agents, the real CNI plugin and
//! real clients: capture with exact original-destination recovery, pass-through,
//! STRICT and PERMISSIVE inbound enforcement with counters and flow events, per-port
//! modes that override the pod's, survival across agent restarts, a clean uninstall,
//! and same-node TCP spliced inside the kernel (or copied, when told) with every byte
//! counted.

use std::{
    collections::BTreeSet,
    process::{Command, Output, Stdio},
    time::Duration,
};

use weft_cluster::{Cluster, PodInfo, PodSpec};
use weft_common::InboundPort;
use weft_e2e::{
    TestCluster, agent_metrics, run_in_pod, running_agent, total, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(10);

/// Two meshed namespaces: `default` STRICT, `lax` PERMISSIVE.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: lax, labels: { weft.dev/mesh: enabled } }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mode: STRICT }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: lax }
spec: { mode: PERMISSIVE }
"#;
/// A port the mesh never captures.
const EXCLUDED_PORT: u16 = 9999;

/// Pod `namespace/name`, labelled `app=<name>`.
fn pod(cluster: &mut Cluster, namespace: &str, name: &str, node: &str, argv: &[&str]) -> PodInfo {
    let mut spec = PodSpec::new(name, node, argv);
    spec.namespace = namespace.to_owned();
    spec.labels.insert("app".to_owned(), name.to_owned());
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"))
}

fn echo() -> Vec<String> {
    vec![workspace_bin("weft-echo").display().to_string()]
}

fn banner(port: u16) -> Vec<String> {
    let bin = workspace_bin("weft-tcp-echo").display().to_string();
    vec![
        bin,
        "--mode".into(),
        "banner".into(),
        "--listen".into(),
        format!("0.0.0.0:{port}"),
    ]
}

fn strs(argv: &[String]) -> Vec<&str> {
    argv.iter().map(String::as_str).collect()
}

fn curl(cluster: &Cluster, namespace: &str, from: &str, url: &str) -> Output {
    cluster
        .pod_command(namespace, from, &["curl", "-sS", "--max-time", "3", url])
        .unwrap()
        .output()
        .unwrap()
}

/// The echo server's JSON answer to `url`, requested from pod `from`.
fn ask(cluster: &Cluster, from: &str, url: &str) -> serde_json::Value {
    let output = run_in_pod(cluster, from, &["curl", "-sS", "--max-time", "5", url]);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{url}: {err}: {}", String::from_utf8_lossy(&output.stdout)))
}

/// Waits until pod `from` gets an answer from `url`.
fn wait_for_http(cluster: &Cluster, namespace: &str, from: &str, url: &str) {
    wait_until(url, READY, || {
        curl(cluster, namespace, from, url).status.success()
    });
}

fn flows(cluster: &Cluster, node: &str) -> Vec<serde_json::Value> {
    let path = &cluster.topology().node(node).unwrap().flow_log;
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// How many flow events of `node` have this verdict, reason and destination.
fn flow_count(
    cluster: &Cluster,
    node: &str,
    verdict: &str,
    reason: &str,
    destination: &str,
) -> usize {
    flows(cluster, node)
        .iter()
        .filter(|flow| {
            flow["verdict"] == verdict
                && flow["reason"] == reason
                && flow["destination"] == destination
        })
        .count()
}

fn has_flow(cluster: &Cluster, node: &str, verdict: &str, reason: &str, destination: &str) -> bool {
    flow_count(cluster, node, verdict, reason, destination) > 0
}

#[test]
fn capture_sends_mesh_traffic_through_the_agent_and_leaves_the_rest_alone() {
    let mut cluster = TestCluster::with_mesh_excluding(2, MESH, &[EXCLUDED_PORT]);
    let remote = pod(&mut cluster, "default", "remote", "node1", &strs(&echo()));
    let local = pod(&mut cluster, "default", "local", "node0", &strs(&echo()));
    pod(&mut cluster, "default", "client", "node0", &[]);
    let outside = pod(
        &mut cluster,
        "outside",
        "plain",
        "node1",
        &strs(&banner(9000)),
    );
    let excluded = pod(
        &mut cluster,
        "lax",
        "excluded",
        "node1",
        &strs(&banner(EXCLUDED_PORT)),
    );
    cluster.settle();
    let remote_url = format!("http://{}:8080/remote", remote.ip);
    wait_for_http(&cluster, "default", "client", &remote_url);

    // To a meshed pod on the other node and on the same node, IPv4 and IPv4-mapped
    // IPv6: the agent recovered the original destination exactly (the answer comes
    // from that pod, for that address and port).
    let before = cluster.counters("node0");
    for (url, expected) in [
        (remote_url.clone(), &remote),
        (format!("http://{}:8080/local", local.ip), &local),
        (
            format!("http://[::ffff:{}]:8080/mapped", remote.ip),
            &remote,
        ),
    ] {
        let answer = ask(&cluster, "client", &url);
        assert_eq!(answer["pod"], expected.name.as_str(), "{url}: {answer}");
        let host = answer["host"].as_str().unwrap();
        assert!(
            host.ends_with(":8080") && host.contains(&expected.ip.to_string()),
            "{url}: {answer}"
        );
    }
    let after = cluster.counters("node0");
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(delta("redirected"), 3, "{after:?}");
    assert_eq!(delta("original_dst_recorded"), 3, "{after:?}");
    let remote_destination = format!("{}:8080", remote.ip);
    wait_until("the redirect's flow event", READY, || {
        has_flow(
            &cluster,
            "node0",
            "redirect",
            "mesh_destination",
            &remote_destination,
        )
    });

    // Outside the mesh, and an excluded port: straight to the server, which names itself.
    let before = cluster.counters("node0");
    for (pod, port) in [(&outside, 9000), (&excluded, EXCLUDED_PORT)] {
        let target = format!("TCP:{}:{port}", pod.ip);
        let output = run_in_pod(
            &cluster,
            "client",
            &["socat", "-T", "5", "-u", &target, "-"],
        );
        let line = String::from_utf8(output.stdout).unwrap();
        assert!(
            line.starts_with(&pod.name),
            "{} answered {line:?}",
            pod.name
        );
    }
    let after = cluster.counters("node0");
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(delta("redirected"), 0, "{after:?}");
    assert_eq!(delta("passed_excluded_port"), 1, "{after:?}");
    assert_eq!(delta("passed_not_mesh_destination"), 1, "{after:?}");

    // The node's own processes (where the agent runs) are never captured; with the
    // agent's mark they get into the STRICT pod as the agent does.
    let url = format!("http://{}:8080/", local.ip);
    let direct = cluster
        .node_command("node0", &["curl", "-sS", "--max-time", "5", &url])
        .unwrap()
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&direct.stdout).contains("\"pod\":\"local\""),
        "{direct:?}"
    );
    // SO_MARK must be set before connect(), which socat and curl cannot do.
    const MARKED_GET: &str = "import socket, sys\n\
        s = socket.socket()\n\
        s.setsockopt(socket.SOL_SOCKET, 36, 1337)\n\
        s.settimeout(5)\n\
        s.connect((sys.argv[1], 8080))\n\
        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
        print(s.recv(4096).decode())\n";
    let ip = local.ip.to_string();
    let before = cluster.counters("node0");
    let marked = cluster
        .node_command("node0", &["/usr/bin/python3", "-c", MARKED_GET, &ip])
        .unwrap()
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&marked.stdout).contains("\"pod\":\"local\""),
        "{marked:?}"
    );
    let after = cluster.counters("node0");
    assert_eq!(after["redirected"], before["redirected"], "{after:?}");
    assert!(
        after["inbound_from_agent"] > before["inbound_from_agent"],
        "{after:?}"
    );

    // The kernel's own log record reached the agent's log.
    let agent_log = running_agent(&cluster, "node0").log;
    wait_until("the kernel's aya-log record", READY, || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("redirect port 8080 to the agent")
    });
}

#[test]
fn strict_pods_drop_plaintext_and_permissive_pods_count_it() {
    let mut cluster = TestCluster::with_mesh_excluding(2, MESH, &[EXCLUDED_PORT]);
    let strict = pod(&mut cluster, "default", "strict", "node1", &strs(&echo()));
    let lax = pod(&mut cluster, "lax", "lax", "node1", &strs(&echo()));
    pod(&mut cluster, "outside", "outsider", "node0", &[]);
    cluster.settle();
    // Health probes come from the node: they get in even to the STRICT pod.
    for target in [&strict, &lax] {
        let url = format!("http://{}:8080/healthz", target.ip);
        wait_until("the node's probe", READY, || {
            let probe = ["curl", "-sS", "--max-time", "1", &url];
            cluster
                .node_command("node1", &probe)
                .unwrap()
                .output()
                .unwrap()
                .status
                .success()
        });
    }
    assert!(cluster.counters("node1")["inbound_from_node"] >= 2);

    let refused = curl(
        &cluster,
        "outside",
        "outsider",
        &format!("http://{}:8080/", strict.ip),
    );
    assert!(
        !refused.status.success(),
        "plaintext got into a STRICT pod: {refused:?}"
    );
    let allowed = curl(
        &cluster,
        "outside",
        "outsider",
        &format!("http://{}:8080/", lax.ip),
    );
    assert!(
        allowed.status.success(),
        "plaintext was kept out of a PERMISSIVE pod: {allowed:?}"
    );

    let counters = cluster.counters("node1");
    assert!(counters["inbound_dropped_strict"] >= 1, "{counters:?}");
    assert_eq!(counters["inbound_plaintext"], 1, "{counters:?}");
    let strict_dst = format!("{}:8080", strict.ip);
    let lax_dst = format!("{}:8080", lax.ip);
    wait_until("the drop's flow event", READY, || {
        has_flow(&cluster, "node1", "drop", "strict_plaintext", &strict_dst)
    });
    wait_until("the plaintext flow event", READY, || {
        has_flow(&cluster, "node1", "pass", "permissive_plaintext", &lax_dst)
    });

    // Turning the namespace PERMISSIVE in the configuration lets plaintext in.
    cluster.set_mesh_yaml(&MESH.replace("mode: STRICT", "mode: PERMISSIVE"));
    cluster.settle();
    let url = format!("http://{}:8080/", strict.ip);
    assert!(curl(&cluster, "outside", "outsider", &url).status.success());
}

/// Two banner servers in one pod, on `ports`.
fn banners(ports: [u16; 2]) -> Vec<String> {
    let [first, second] = ports.map(|port| banner(port).join(" "));
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("{first} & exec {second}"),
    ]
}

/// The banner of `target` on `port` as pod `outside/from` gets it over plaintext, or
/// `None` when the connection does not get through.
fn plaintext_banner(cluster: &Cluster, from: &str, target: &PodInfo, port: u16) -> Option<String> {
    let address = format!("TCP:{}:{port},connect-timeout=2", target.ip);
    let output = cluster
        .pod_command("outside", from, &["socat", "-T", "1", "-u", &address, "-"])
        .unwrap()
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    (output.status.success() && line.starts_with(&target.name)).then_some(line)
}

/// `default` STRICT and `open` DISABLE, with the PeerAuthentications in `overrides`.
fn port_mode_mesh(overrides: &[(&str, &str, u16, &str)]) -> String {
    let mut mesh = String::from(
        r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: open, labels: { weft.dev/mesh: enabled } }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: open }
spec: { mode: DISABLE }
"#,
    );
    for (namespace, app, port, mode) in overrides {
        mesh.push_str(&format!(
            "---\napiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{ name: {app}-ports, namespace: {namespace} }}\nspec:\n  selector: {{ matchLabels: {{ app: {app} }} }}\n  portModes: [{{ port: {port}, mode: {mode} }}]\n"
        ));
    }
    mesh
}

/// PeerAuthentication port overrides reach the kernel through the controller and the
/// agents: a STRICT pod's port let plaintext in, a DISABLE pod's port keep it out.
#[test]
fn port_modes_override_the_pods_mode_both_ways() {
    const PORTS: [u16; 2] = [9001, 9002];
    let [a, b] = PORTS;
    let set_overrides = |cluster: &TestCluster, overrides: &[(&str, &str, u16, &str)]| {
        cluster.set_mesh_yaml(&port_mode_mesh(overrides));
        cluster.settle();
    };
    let mut cluster = TestCluster::with_mesh(2, &port_mode_mesh(&[]));
    let strict = pod(
        &mut cluster,
        "default",
        "strict",
        "node1",
        &strs(&banners(PORTS)),
    );
    let open = pod(
        &mut cluster,
        "open",
        "open",
        "node1",
        &strs(&banners(PORTS)),
    );
    pod(&mut cluster, "outside", "outsider", "node0", &[]);
    cluster.settle();
    // The node's own connections get into every port, whatever its mode.
    for target in [&strict, &open] {
        for port in PORTS {
            let address = format!("TCP:{}:{port},connect-timeout=1", target.ip);
            wait_until(&format!("{} on {port}", target.name), READY, || {
                let probe = ["socat", "-T", "1", "-u", &address, "-"];
                let output = cluster
                    .node_command("node1", &probe)
                    .unwrap()
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&output.stdout).starts_with(&target.name)
            });
        }
    }
    let try_plaintext =
        |target: &PodInfo, port| plaintext_banner(&cluster, "outsider", target, port);
    // Flow events of one kind so far, to wait for a new one after each attempt.
    let events = |verdict: &str, reason: &str, target: &PodInfo, port: u16| {
        let destination = format!("{}:{port}", target.ip);
        flow_count(&cluster, "node1", verdict, reason, &destination)
    };
    let drops = |target: &PodInfo, port| events("drop", "strict_plaintext", target, port);
    let passes = |target: &PodInfo, port| events("pass", "permissive_plaintext", target, port);
    let wait_for_more = |what: &str, count: &dyn Fn() -> usize, before: usize| {
        wait_until(what, READY, || count() > before);
    };

    // The STRICT pod as it is: both ports keep plaintext out.
    for port in PORTS {
        assert_eq!(
            try_plaintext(&strict, port),
            None,
            "plaintext got into STRICT port {port}"
        );
        wait_for_more("a drop event", &|| drops(&strict, port), 0);
    }

    // Port b PERMISSIVE: b lets plaintext in and counts it, a still drops it.
    set_overrides(&cluster, &[("default", "strict", b, "PERMISSIVE")]);
    let before = cluster.counters("node1");
    let (drops_a, drops_b) = (drops(&strict, a), drops(&strict, b));
    let passes_b = passes(&strict, b);
    assert_eq!(
        try_plaintext(&strict, a),
        None,
        "plaintext got into STRICT port {a}"
    );
    let got = try_plaintext(&strict, b);
    assert!(
        got.is_some(),
        "plaintext was kept out of PERMISSIVE port {b}"
    );
    let after = cluster.counters("node1");
    let delta = |name: &str| after[name] - before[name];
    assert!(delta("inbound_dropped_strict") >= 1, "{after:?}");
    assert_eq!(delta("inbound_plaintext"), 1, "{after:?}");
    wait_for_more("a drop event on port a", &|| drops(&strict, a), drops_a);
    wait_for_more("a pass event on port b", &|| passes(&strict, b), passes_b);
    assert_eq!(
        drops(&strict, b),
        drops_b,
        "port b dropped a SYN while PERMISSIVE"
    );

    // Without the override, b is the pod's again: STRICT.
    set_overrides(&cluster, &[]);
    let before = cluster.counters("node1");
    let drops_b = drops(&strict, b);
    assert_eq!(
        try_plaintext(&strict, b),
        None,
        "plaintext still gets into port {b}"
    );
    let after = cluster.counters("node1");
    assert!(
        after["inbound_dropped_strict"] > before["inbound_dropped_strict"],
        "{after:?}"
    );
    assert_eq!(
        after["inbound_plaintext"], before["inbound_plaintext"],
        "{after:?}"
    );
    wait_for_more("a drop event on port b", &|| drops(&strict, b), drops_b);

    // The DISABLE pod enforces only where a port says STRICT, and counts nothing else.
    set_overrides(&cluster, &[("open", "open", b, "STRICT")]);
    let before = cluster.counters("node1");
    let got = try_plaintext(&open, a);
    assert!(got.is_some(), "plaintext was kept out of DISABLE port {a}");
    let got = try_plaintext(&open, b);
    assert_eq!(
        got, None,
        "plaintext got into STRICT port {b} of a DISABLE pod"
    );
    let after = cluster.counters("node1");
    let delta = |name: &str| after[name] - before[name];
    assert!(delta("inbound_dropped_strict") >= 1, "{after:?}");
    assert_eq!(delta("inbound_plaintext"), 0, "{after:?}");
    wait_for_more("a drop event on the DISABLE pod", &|| drops(&open, b), 0);
    assert_eq!(drops(&open, a), 0, "the DISABLE port dropped a SYN");

    // Deleting a pod removes its port modes and only its own.
    set_overrides(
        &cluster,
        &[
            ("open", "open", b, "STRICT"),
            ("default", "strict", a, "PERMISSIVE"),
        ],
    );
    let strict_port = InboundPort::new(cluster.host_ifindex("default", "strict"), a);
    cluster.del_pod("open", "open").unwrap();
    let left: Vec<InboundPort> = cluster
        .port_modes("node1")
        .keys()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        left,
        [strict_port],
        "the agent's unenroll left these port modes"
    );
}

#[test]
fn capture_survives_agent_restarts_and_uninstall_removes_everything() {
    let mut cluster = TestCluster::with_mesh_excluding(1, MESH, &[EXCLUDED_PORT]);
    let web = pod(&mut cluster, "default", "web", "node0", &strs(&echo()));
    let gone = pod(&mut cluster, "default", "gone", "node0", &[]);
    pod(&mut cluster, "default", "client", "node0", &[]);
    cluster.settle();
    let url = format!("http://{}:8080/", web.ip);
    wait_for_http(&cluster, "default", "client", &url);

    // No agent: the programs stay attached and keep capturing, so the connection goes
    // to the (absent) agent and fails rather than slipping past the mesh.
    cluster.stop_agent("node0").unwrap();
    let before = cluster.counters("node0")["redirected"];
    assert!(
        !curl(&cluster, "default", "client", &url).status.success(),
        "traffic bypassed the stopped agent"
    );
    assert_eq!(cluster.counters("node0")["redirected"], before + 1);
    // A pod deleted while the agent is away is forgotten when it comes back.
    cluster.del_pod("default", "gone").unwrap();
    let records = cluster
        .topology()
        .node("node0")
        .unwrap()
        .agent_state_dir
        .join("pods");
    let record = records.join(format!("{}.json", gone.netns));
    assert!(record.exists(), "the agent had no record of pod gone");

    cluster.start_agent_on("node0");
    assert!(
        !record.exists(),
        "the restarted agent kept the record of a deleted pod"
    );
    wait_for_http(&cluster, "default", "client", &url);
    let links: BTreeSet<String> = std::fs::read_dir(
        cluster
            .topology()
            .node("node0")
            .unwrap()
            .bpffs
            .join("links"),
    )
    .unwrap()
    .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
    .collect();
    assert_eq!(
        links.len(),
        5,
        "cgroup links and one inbound link per meshed pod: {links:?}"
    );

    // Uninstall with the agent stopped: nothing of ours stays attached or pinned.
    cluster.stop_agent("node0").unwrap();
    let node = cluster.topology().node("node0").unwrap().clone();
    let status = Command::new(workspace_bin("weft-agent"))
        .args(["uninstall", "--bpffs"])
        .arg(&node.bpffs)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read_dir(&node.bpffs).unwrap().count(),
        0,
        "pins are left"
    );
    let cgroup = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&node.pods_cgroup)
        .output()
        .unwrap();
    let cgroup = String::from_utf8_lossy(&cgroup.stdout);
    assert!(
        !cgroup.contains("weft_"),
        "still attached to the pods' cgroup:\n{cgroup}"
    );
    let net = cluster
        .node_command("node0", &["bpftool", "net", "show"])
        .unwrap()
        .output()
        .unwrap();
    let net = String::from_utf8_lossy(&net.stdout);
    assert!(
        !net.contains("weft_inbound"),
        "still attached to a veth:\n{net}"
    );
    // And so the client reaches the server directly again.
    let answer = ask(&cluster, "client", &url);
    assert_eq!(answer["pod"], "web", "{answer}");
}

/// What [`same_node_tcp_is_carried`] sends: 20.9 MB of numbered lines, so that a lost,
/// doubled or reordered chunk changes the checksum.
const NUMBERED: &str = "seq 1 3000000";

/// A real client (socat) sends [`NUMBERED`] to an echo server on a meshed pod of its
/// own node and reads it back whole, through an agent started with `agent_args`: the
/// connection is carried by `mode` (`splice` or `copy`), and the agent counts every
/// byte each way.
fn same_node_tcp_is_carried(agent_args: &[&str], mode: &str) {
    let mut cluster = TestCluster::with_mesh_and_agent_args(1, MESH, agent_args);
    let echo_bin = workspace_bin("weft-tcp-echo").display().to_string();
    let echo = pod(
        &mut cluster,
        "default",
        "echo",
        "node0",
        &[&echo_bin, "--listen", "0.0.0.0:7000"],
    );
    pod(&mut cluster, "default", "client", "node0", &[]);
    cluster.settle();
    let checksum = |script: &str| {
        let out = Command::new("sh").args(["-c", script]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let expected = checksum(&format!("{NUMBERED} | sha256sum"));
    let length: u64 = checksum(&format!("{NUMBERED} | wc -c"))
        .trim()
        .parse()
        .unwrap();
    let round_trip = format!(
        "{NUMBERED} | socat -t 30 - TCP:{}:7000 | sha256sum",
        echo.ip
    );
    let mut got = String::new();
    wait_until("the numbers back through the agent", READY, || {
        let out = cluster
            .pod_command("default", "client", &["sh", "-c", &round_trip])
            .unwrap()
            .output()
            .unwrap();
        got = String::from_utf8_lossy(&out.stdout).into_owned();
        got == expected
    });
    let metric = |name: &str, labels: &[(&str, &str)]| {
        total(&agent_metrics(&cluster, "node0"), name, labels) as u64
    };
    let echo_labels = [("destination_app", "echo"), ("request_protocol", "tcp")];
    wait_until("the connection's end to be counted", READY, || {
        metric("weft_tcp_relays_total", &[("mode", mode)]) >= 1
            && metric("istio_tcp_sent_bytes_total", &echo_labels) >= length
    });
    let other = if mode == "splice" { "copy" } else { "splice" };
    assert_eq!(metric("weft_tcp_relays_total", &[("mode", other)]), 0);
    for name in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        assert_eq!(metric(name, &echo_labels), length, "{name}");
    }
}

#[test]
fn same_node_tcp_is_spliced_inside_the_kernel_and_counted() {
    same_node_tcp_is_carried(&[], "splice");
}

#[test]
fn same_node_tcp_is_copied_when_splicing_is_off_and_counted() {
    same_node_tcp_is_carried(&["--splice=false"], "copy");
}
