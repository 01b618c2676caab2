//! The kernel datapath on a 2-node local cluster with real agents, the real CNI plugin
//! and real clients: capture and original-destination recovery, pass-through, STRICT
//! and PERMISSIVE inbound enforcement with counters and flow events, survival across
//! agent restarts, and a clean uninstall.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    process::{Command, Output},
    time::Duration,
};

use weft_cluster::{Cluster, PodInfo, PodSpec};
use weft_e2e::{TestCluster, run_in_pod, wait_until, workspace_bin};

const READY: Duration = Duration::from_secs(10);
/// Where the test's stand-in for the outbound proxy listens (the agent's port).
const OUTBOUND: &str = "0.0.0.0:15001";

fn mesh(extra_workloads: &str) -> String {
    format!(
        "namespaces:\n  - name: default\n    mode: STRICT\n  - name: lax\n    mode: PERMISSIVE\n\
         workloads:\n{extra_workloads}excludePorts: [9999]\n"
    )
}

fn pod(cluster: &mut Cluster, namespace: &str, name: &str, node: &str, argv: &[&str]) -> PodInfo {
    let mut spec = PodSpec::new(name, node, argv);
    spec.namespace = namespace.to_owned();
    cluster.add_pod(spec).unwrap_or_else(|err| panic!("{err}"))
}

fn echo(port: u16) -> Vec<String> {
    let bin = workspace_bin("weft-echo").display().to_string();
    vec![bin, "--listen".into(), format!("0.0.0.0:{port}")]
}

/// Starts the stand-in proxy on `node`, as the agent's outbound listener.
fn start_acceptor(cluster: &Cluster, node: &str) -> std::process::Child {
    let bpffs = cluster
        .topology()
        .node(node)
        .unwrap()
        .bpffs
        .display()
        .to_string();
    let bin = workspace_bin("weft-test-orig-dst").display().to_string();
    cluster
        .node_command(node, &[bin.as_str(), &bpffs, OUTBOUND])
        .unwrap()
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// What a TCP connection from pod `from` to `target` (socat address) reads back.
fn read_from(cluster: &Cluster, from: &str, target: &str) -> String {
    let output = run_in_pod(cluster, from, &["socat", "-T", "5", "-u", target, "-"]);
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn curl(cluster: &Cluster, namespace: &str, from: &str, url: &str) -> Output {
    cluster
        .pod_command(namespace, from, &["curl", "-sS", "--max-time", "2", url])
        .unwrap()
        .output()
        .unwrap()
}

fn flows(cluster: &Cluster, node: &str) -> Vec<serde_json::Value> {
    let path = &cluster.topology().node(node).unwrap().flow_log;
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn has_flow(cluster: &Cluster, node: &str, verdict: &str, reason: &str, destination: &str) -> bool {
    flows(cluster, node).iter().any(|flow| {
        flow["verdict"] == verdict && flow["reason"] == reason && flow["destination"] == destination
    })
}

#[test]
fn capture_sends_mesh_traffic_to_the_agent_and_leaves_the_rest_alone() {
    // The first pods on each node get .2, .3, …: the remote workload is listed by address.
    let mut cluster = TestCluster::with_mesh(
        2,
        &mesh(
            "  - { name: remote, namespace: default, ip: 10.244.1.2 }\n  - { name: excluded, namespace: lax, ip: 10.244.1.4 }\n",
        ),
    );
    let remote = pod(&mut cluster, "default", "remote", "node1", &[]);
    assert_eq!(remote.ip.to_string(), "10.244.1.2");
    let echo_local = echo(8080);
    let echo_local: Vec<&str> = echo_local.iter().map(String::as_str).collect();
    let local = pod(&mut cluster, "default", "local", "node0", &echo_local);
    let client = pod(&mut cluster, "default", "client", "node0", &[]);
    let tcp = workspace_bin("weft-tcp-echo").display().to_string();
    let banner = |listen| [tcp.as_str(), "--mode", "banner", "--listen", listen];
    let outside = pod(
        &mut cluster,
        "outside",
        "plain",
        "node1",
        &banner("0.0.0.0:9000"),
    );
    assert_eq!(outside.ip.to_string(), "10.244.1.3");
    // Excluded ports go plaintext, which only a PERMISSIVE pod lets in.
    let excluded = pod(
        &mut cluster,
        "lax",
        "excluded",
        "node1",
        &banner("0.0.0.0:9999"),
    );
    assert_eq!(excluded.ip.to_string(), "10.244.1.4");
    let mut acceptor = start_acceptor(&cluster, "node0");
    cluster
        .wait_for_tcp(
            "default",
            "client",
            SocketAddrV4::new("10.244.0.1".parse().unwrap(), 15001),
            READY,
            &cluster.topology().state_dir,
        )
        .unwrap();

    // To a meshed pod on the other node and on the same node, IPv4 and IPv4-mapped IPv6.
    for (target, expected) in [
        (
            format!("TCP:{}:8080", remote.ip),
            format!("{}:8080", remote.ip),
        ),
        (
            format!("TCP:{}:7070", local.ip),
            format!("{}:7070", local.ip),
        ),
        (
            format!("TCP6:[::ffff:{}]:8080", remote.ip),
            format!("{}:8080", remote.ip),
        ),
    ] {
        assert_eq!(
            read_from(&cluster, "client", &target),
            expected,
            "connecting to {target}"
        );
    }
    let counters = cluster.counters("node0");
    assert_eq!(counters["redirected"], 3, "{counters:?}");
    assert_eq!(counters["original_dst_recorded"], 3, "{counters:?}");
    assert!(has_flow(
        &cluster,
        "node0",
        "redirect",
        "mesh_destination",
        &format!("{}:8080", remote.ip)
    ));

    // Outside the mesh, and an excluded port: straight to the server, which names itself.
    let before = cluster.counters("node0");
    for (pod, port) in [(&outside, 9000), (&excluded, 9999)] {
        let line = read_from(&cluster, "client", &format!("TCP:{}:{port}", pod.ip));
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
    // agent's mark they also get into the STRICT pod.
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
    let marked = cluster
        .node_command("node0", &["/usr/bin/python3", "-c", MARKED_GET, &ip])
        .unwrap()
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&marked.stdout).contains("\"pod\":\"local\""),
        "{marked:?}"
    );
    let counters = cluster.counters("node0");
    assert_eq!(counters["redirected"], 3, "{counters:?}");
    assert!(counters["inbound_from_agent"] >= 1, "{counters:?}");

    // The kernel's own log record reached the agent's log.
    let agent_log = cluster
        .topology()
        .node("node0")
        .unwrap()
        .agent
        .clone()
        .unwrap()
        .log;
    wait_until("the kernel's aya-log record", READY, || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .contains("redirect port 8080 to the agent")
    });
    let _ = acceptor.kill();
    let _ = acceptor.wait();
    let _ = client;
}

#[test]
fn strict_pods_drop_plaintext_and_permissive_pods_count_it() {
    let mut cluster = TestCluster::with_mesh(2, &mesh(""));
    let server = echo(8080);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let strict = pod(&mut cluster, "default", "strict", "node1", &server);
    let lax = pod(&mut cluster, "lax", "lax", "node1", &server);
    pod(&mut cluster, "outside", "outsider", "node0", &[]);
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
    cluster.write_mesh(&mesh("").replace("mode: STRICT", "mode: PERMISSIVE"));
    wait_until("the new mode", READY, || {
        curl(
            &cluster,
            "outside",
            "outsider",
            &format!("http://{}:8080/", strict.ip),
        )
        .status
        .success()
    });
}

#[test]
fn capture_survives_agent_restarts_and_uninstall_removes_everything() {
    let mut cluster = TestCluster::with_mesh(1, &mesh(""));
    let server = echo(8080);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let web = pod(&mut cluster, "default", "web", "node0", &server);
    let gone = pod(&mut cluster, "default", "gone", "node0", &[]);
    pod(&mut cluster, "default", "client", "node0", &[]);
    let mut acceptor = start_acceptor(&cluster, "node0");
    let target = format!("TCP:{}:8080", web.ip);
    let expected = format!("{}:8080", web.ip);
    wait_until("the stand-in proxy", READY, || {
        cluster
            .pod_command(
                "default",
                "client",
                &["socat", "-T", "2", "-u", &target, "-"],
            )
            .unwrap()
            .status()
            .unwrap()
            .success()
    });
    assert_eq!(read_from(&cluster, "client", &target), expected);

    // No agent: capture and enforcement keep working from the pins.
    cluster.stop_agent("node0").unwrap();
    assert_eq!(read_from(&cluster, "client", &target), expected);
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
    assert_eq!(read_from(&cluster, "client", &target), expected);
    assert_eq!(
        pinned_links(&cluster).len(),
        5,
        "{:?}",
        pinned_links(&cluster)
    );

    // Uninstall with the agent stopped: nothing of ours stays attached or pinned.
    cluster.stop_agent("node0").unwrap();
    let _ = acceptor.kill();
    let _ = acceptor.wait();
    let node = cluster.topology().node("node0").unwrap().clone();
    let status = Command::new(workspace_bin("weft-agent"))
        .args(["uninstall", "--bpffs"])
        .arg(&node.bpffs)
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
    let line = stdout_of(run_in_pod(
        &cluster,
        "client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/", web.ip),
        ],
    ));
    assert!(line.contains("\"pod\":\"web\""), "{line}");
}

fn pinned_links(cluster: &Cluster) -> BTreeMap<String, ()> {
    let links = cluster
        .topology()
        .node("node0")
        .unwrap()
        .bpffs
        .join("links");
    std::fs::read_dir(links)
        .unwrap()
        .map(|entry| {
            (
                entry.unwrap().file_name().to_string_lossy().into_owned(),
                (),
            )
        })
        .collect()
}

fn stdout_of(output: Output) -> String {
    String::from_utf8(output.stdout).unwrap()
}
