//! The local cluster: pods on different nodes reach each other with real clients, pods
//! come and go while it runs, two clusters live side by side, and `down` removes every
//! trace, also after an interrupted `up`. With a mesh: one agent a node, ready when it
//! answers `/healthz/ready`; stopping one waits for its drain; `cluster wait`; flow
//! events in wall-clock time; and the command line's output to a closed pipe.

use std::{
    net::SocketAddrV4,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use weft_agent::datapath::flows::format_time;
use weft_cluster::{Cluster, ClusterError, PodInfo, PodSpec, process_running};
use weft_e2e::{
    TestCluster, agent_metrics, leftovers, require_root, run_in_pod, running_agent, series,
    unique_name, wait_until, workspace_bin,
};

const READY: Duration = Duration::from_secs(10);

/// Adds pod `name` on `node` running `argv` and, when `port` is given, waits until a
/// connection from pod `probe` to that port succeeds.
fn start(
    cluster: &mut Cluster,
    name: &str,
    node: &str,
    argv: &[&str],
    ready: Option<(&str, u16)>,
) -> PodInfo {
    let pod = cluster
        .add_pod(PodSpec::new(name, node, argv))
        .unwrap_or_else(|err| panic!("{err}"));
    if let Some((probe, port)) = ready {
        cluster
            .wait_for_tcp(
                "default",
                probe,
                SocketAddrV4::new(pod.ip, port),
                READY,
                &pod.log,
            )
            .unwrap_or_else(|err| panic!("{err}"));
    }
    pod
}

fn stdout(output: std::process::Output) -> String {
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn pods_on_different_nodes_talk_plain_with_curl_and_iperf3() {
    let mut cluster = TestCluster::up(2);
    let echo = workspace_bin("weft-echo");
    let echo = echo.to_str().unwrap();
    let client = start(&mut cluster, "client", "node0", &[], None);
    let server = start(
        &mut cluster,
        "echo",
        "node1",
        &[echo, "--listen", "0.0.0.0:8080"],
        Some(("client", 8080)),
    );
    let perf = start(
        &mut cluster,
        "perf",
        "node1",
        &["iperf3", "--server", "--port", "5201"],
        Some(("client", 5201)),
    );
    assert_ne!(client.node, server.node);

    let url = format!("http://{}:8080/plain", server.ip);
    for (version, flag) in [
        ("HTTP/1.1", "--http1.1"),
        ("HTTP/2.0", "--http2-prior-knowledge"),
    ] {
        let body = stdout(run_in_pod(
            &cluster,
            "client",
            &["curl", "-sS", "--max-time", "5", flag, &url],
        ));
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|err| panic!("{err}: {body}"));
        assert_eq!(answer["pod"], "echo", "{body}");
        assert_eq!(answer["version"], version, "{body}");
        let peer = answer["peer"].as_str().unwrap();
        assert!(
            peer.starts_with(&format!("{}:", client.ip)),
            "the server saw {peer}, not the client pod's own address {}",
            client.ip
        );
    }

    let report = stdout(run_in_pod(
        &cluster,
        "client",
        &[
            "iperf3",
            "--client",
            &perf.ip.to_string(),
            "--port",
            "5201",
            "--time",
            "1",
            "--json",
        ],
    ));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    let rate = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    assert!(received > 1_000_000, "iperf3 moved only {received} bytes");
    eprintln!("plain cross-node iperf3: {:.2} Gbit/s", rate / 1e9);
}

#[test]
fn tcp_workload_answers_across_nodes() {
    let mut cluster = TestCluster::up(2);
    let tcp = workspace_bin("weft-tcp-echo");
    let tcp = tcp.to_str().unwrap();
    start(&mut cluster, "client", "node1", &[], None);
    let sink = start(
        &mut cluster,
        "sink",
        "node0",
        &[tcp, "--mode", "sink", "--listen", "0.0.0.0:9000"],
        Some(("client", 9000)),
    );
    let script = format!(
        "head -c 100000 /dev/zero | socat -t 5 - TCP:{}:9000",
        sink.ip
    );
    let answer = stdout(run_in_pod(&cluster, "client", &["sh", "-c", &script]));
    assert_eq!(answer, "received 100000 bytes\n");
}

#[test]
fn pods_come_and_go_while_the_cluster_runs() {
    let mut cluster = TestCluster::up(2);
    let echo = workspace_bin("weft-echo");
    let echo = echo.to_str().unwrap();
    start(&mut cluster, "client", "node0", &[], None);
    let first = start(
        &mut cluster,
        "web",
        "node1",
        &[echo, "--listen", "0.0.0.0:8080"],
        Some(("client", 8080)),
    );
    let web = cluster.topology().pod("default", "web").unwrap().clone();
    let pid = web.pid.expect("the pod's command runs");

    cluster
        .del_pod("default", "web")
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(cluster.topology().pod("default", "web").is_none());
    assert!(!web.cgroup.exists(), "the pod's cgroup is left");
    assert!(
        !weft_cluster::process_running(pid),
        "the pod's process {pid} still runs"
    );
    let refused = cluster
        .pod_command(
            "default",
            "client",
            &[
                "curl",
                "-sS",
                "--max-time",
                "2",
                &format!("http://{}:8080/", first.ip),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a deleted pod still answers");

    // The name and the address are free again.
    let again = start(
        &mut cluster,
        "web",
        "node1",
        &[echo, "--listen", "0.0.0.0:8080"],
        Some(("client", 8080)),
    );
    assert_eq!(again.ip, first.ip);
    assert!(
        cluster.add_pod(PodSpec::new("web", "node0", &[])).is_err(),
        "a duplicate pod was accepted"
    );
    assert!(
        cluster.add_pod(PodSpec::new("x", "node9", &[])).is_err(),
        "a pod on a missing node was accepted"
    );
}

#[test]
fn two_clusters_with_the_same_addresses_live_side_by_side() {
    let echo = workspace_bin("weft-echo");
    let echo = echo.to_str().unwrap();
    let mut one = TestCluster::up(1);
    let mut two = TestCluster::up(1);
    for cluster in [&mut one, &mut two] {
        start(cluster, "client", "node0", &[], None);
        start(
            cluster,
            "web",
            "node0",
            &[echo, "--listen", "0.0.0.0:8080"],
            Some(("client", 8080)),
        );
    }
    let web_one = one.topology().pod("default", "web").unwrap().ip;
    let web_two = two.topology().pod("default", "web").unwrap().ip;
    assert_eq!(web_one, web_two, "both clusters use the same addressing");

    let two_name = two.layout().cluster().to_owned();
    drop(two);
    assert_eq!(leftovers(&two_name), Vec::<String>::new());
    // The first cluster is untouched by the second one's removal.
    let body = stdout(run_in_pod(
        &one,
        "client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            &format!("http://{web_one}:8080/"),
        ],
    ));
    assert!(body.contains("\"pod\":\"web\""), "{body}");
}

#[test]
fn down_removes_everything_also_after_an_interrupted_up() {
    require_root();
    let xtask = workspace_bin("xtask");
    // Interrupt `up` at different points; whatever it managed to create, `down` removes.
    for delay_ms in [20, 80, 200, 2_000] {
        let name = unique_name('i');
        let mut up = Command::new(&xtask);
        up.args(["cluster", "up", "--name", &name, "--nodes", "3"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group, which receives the "Ctrl-C" as a terminal's would.
            .process_group(0);
        let mut child = up.spawn().unwrap();
        thread::sleep(Duration::from_millis(delay_ms));
        let group = format!("-{}", child.id());
        let _ = Command::new("kill").args(["-INT", "--", &group]).status();
        child.wait().unwrap();

        weft_cluster::down(&name).unwrap_or_else(|err| panic!("down after {delay_ms} ms: {err}"));
        assert_eq!(
            leftovers(&name),
            Vec::<String>::new(),
            "left after interrupting up at {delay_ms} ms"
        );
    }
}

#[test]
fn down_finds_the_pieces_of_a_half_made_cluster_by_name() {
    require_root();
    let name = unique_name('h');
    let layout = weft_cluster::Layout::new(&name).unwrap();
    // What an `up` killed after its first node leaves: a namespace with a process in
    // it, a cgroup with a process in it, a pin directory and no saved topology.
    let node = layout.node_netns("node0");
    assert!(
        Command::new("ip")
            .args(["netns", "add", &node])
            .status()
            .unwrap()
            .success()
    );
    std::fs::create_dir_all(layout.pods_cgroup("node0")).unwrap();
    std::fs::create_dir_all(layout.node_bpffs("node0")).unwrap();
    let mut in_netns = Command::new("ip")
        .args(["netns", "exec", &node, "sleep", "600"])
        .spawn()
        .unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec sleep 600",
        layout.pods_cgroup("node0").display()
    );
    let mut in_cgroup = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(leftovers(&name).len(), 3, "{:?}", leftovers(&name));

    weft_cluster::down(&name).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(leftovers(&name), Vec::<String>::new());
    // Both processes were killed by `down`, not by this test.
    assert!(!in_netns.wait().unwrap().success());
    assert!(!in_cgroup.wait().unwrap().success());
}

/// The default namespace in the mesh, STRICT.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: default, labels: { weft.dev/mesh: enabled } }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: default, namespace: default }
spec: { mode: STRICT }
"#;

/// Node `node`'s answer to `GET :15021/healthz/ready`: body, then status code.
fn readiness(cluster: &Cluster, node: &str) -> String {
    let url = "http://127.0.0.1:15021/healthz/ready";
    let argv = ["curl", "-s", "--max-time", "3", "-w", "%{http_code}", url];
    stdout(cluster.node_command(node, &argv).unwrap().output().unwrap())
}

/// `cargo xtask cluster <args>`, as a user runs it.
fn xtask(args: &[&str]) -> Command {
    let mut command = Command::new(workspace_bin("xtask"));
    command.arg("cluster").args(args);
    command
}

#[test]
fn a_second_agent_on_a_node_is_refused_and_the_first_keeps_serving() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    // Started means ready, also with no meshed pod to hold a certificate for.
    assert_eq!(readiness(&cluster, "node0"), "ready\n200");
    let first = cluster.topology().node("node0").unwrap().agent.clone();
    let first = first.expect("the cluster started an agent");
    let agent_bin = workspace_bin("weft-agent");
    match cluster.start_agent("node0", &agent_bin) {
        Err(ClusterError::AgentRunning { node, pid, .. }) => {
            assert_eq!((node.as_str(), pid), ("node0", first.pid));
        }
        other => panic!("a second agent on node0: {other:?}"),
    }
    assert!(process_running(first.pid), "the running agent was stopped");
    cluster.refresh().unwrap();
    assert_eq!(
        cluster.topology().node("node0").unwrap().agent,
        Some(first.clone())
    );
    // The first agent still has its CNI socket: a pod joins the mesh through it.
    let echo = workspace_bin("weft-echo").display().to_string();
    cluster
        .add_pod(PodSpec::new("web", "node0", &[&echo]))
        .unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();
    assert_eq!(readiness(&cluster, "node0"), "ready\n200");

    // An agent the topology does not know of (as a second `agent start` used to leave
    // behind) is found in the node's cgroup: refused as well, and stopped by `stop`.
    let state = cluster.layout().state_dir().join("topology.json");
    let mut topology: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    topology["nodes"][0]["agent"] = serde_json::Value::Null;
    std::fs::write(&state, topology.to_string()).unwrap();
    cluster.refresh().unwrap();
    match cluster.start_agent("node0", &agent_bin) {
        Err(ClusterError::AgentRunning { pid, .. }) => assert_eq!(pid, first.pid),
        other => panic!("an agent beside an unknown one: {other:?}"),
    }
    cluster.stop_agent("node0").unwrap();
    assert!(!process_running(first.pid), "stop left the unknown agent");

    // Ready also means running: an agent that exits at start is reported, with its log.
    cluster
        .set_agent_args(vec!["--no-such-flag".to_owned()])
        .unwrap();
    match cluster.start_agent("node0", &agent_bin) {
        Err(ClusterError::AgentExited { log, .. }) => {
            let log = std::fs::read_to_string(log).unwrap();
            assert!(log.contains("--no-such-flag"), "{log}");
        }
        other => panic!("an agent with a bad flag: {other:?}"),
    }
    assert_eq!(cluster.topology().node("node0").unwrap().agent, None);
    cluster.set_agent_args(Vec::new()).unwrap();
    cluster.start_agent_on("node0");
    assert_eq!(readiness(&cluster, "node0"), "ready\n200");
}

#[test]
fn stopping_an_agent_drains_its_connections_and_refuses_new_ones() {
    const DRAIN: Duration = Duration::from_secs(7);
    let mut cluster = TestCluster::with_mesh_and_agent_args(1, MESH, &["--drain-timeout=7"]);
    assert_eq!(cluster.topology().agent_drain_timeout_ms, 7_000);
    let agent = running_agent(&cluster, "node0");
    let drain_flags: Vec<_> = agent
        .command
        .iter()
        .filter(|arg| arg.starts_with("--drain-timeout"))
        .collect();
    assert_eq!(drain_flags, ["--drain-timeout=7"], "{:?}", agent.command);

    let tcp = workspace_bin("weft-tcp-echo").display().to_string();
    let server = start(
        &mut cluster,
        "sink",
        "node0",
        &[&tcp, "--mode", "echo", "--listen", "0.0.0.0:9000"],
        None,
    );
    start(&mut cluster, "client", "node0", &[], None);
    cluster.settle();
    let target = SocketAddrV4::new(server.ip, 9000);
    cluster
        .wait_for_tcp("default", "client", target, READY, &server.log)
        .unwrap_or_else(|err| panic!("{err}"));
    let active = |cluster: &Cluster| {
        series(
            &agent_metrics(cluster, "node0"),
            "weft_active_connections",
            &[],
        )
    };
    wait_until("the probes' connections to close", READY, || {
        active(&cluster) == Some(0.0)
    });
    // A connection through the agent that outlasts the old 5 s grace and the drain.
    let script = format!("sleep 60 | socat - TCP:{target}");
    let mut held = cluster
        .pod_command("default", "client", &["sh", "-c", &script])
        .unwrap()
        .spawn()
        .unwrap();
    wait_until("the agent to carry the connection", READY, || {
        active(&cluster) == Some(1.0)
    });

    let started = Instant::now();
    let name = cluster.layout().cluster().to_owned();
    let stop = xtask(&["agent", "stop", "--name", &name, "--node", "node0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = cluster.layout().node_log("node0", "agent");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the agent to drain", READY, || {
        read_log().contains("draining 1 connection(s)")
    });
    // Capture stays attached while no agent listens: a new connection from the node's
    // meshed pod is refused, not let past the mesh.
    let probe = format!("exec 3<>/dev/tcp/{}/{}", target.ip(), target.port());
    wait_until("a new connection to be refused", READY, || {
        let out = cluster
            .pod_command("default", "client", &["bash", "-c", &probe])
            .unwrap()
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).contains("Connection refused")
    });

    let stopped = stop.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        String::from_utf8_lossy(&stopped.stderr).contains("up to 7s to finish"),
        "{stopped:?}"
    );
    assert!(
        took >= DRAIN,
        "the stop returned after {took:?}, before the drain deadline"
    );
    assert!(
        read_log().contains("closing 1 connection(s) still open after the drain deadline"),
        "the agent did not reach its own deadline:\n{}",
        read_log()
    );
    assert!(!process_running(agent.pid));
    cluster.refresh().unwrap();
    assert_eq!(cluster.topology().node("node0").unwrap().agent, None);
    let _ = held.kill();
    let _ = held.wait();
}

#[test]
fn cluster_wait_says_what_it_waits_for_and_output_to_a_closed_pipe_ends_quietly() {
    let cluster = TestCluster::with_mesh(1, MESH);
    let name = cluster.layout().cluster().to_owned();
    let settled = xtask(&["wait", "--name", &name, "--timeout", "20"])
        .output()
        .unwrap();
    assert!(settled.status.success(), "{settled:?}");

    // An agent that does not answer: the wait gives up on time, names it, and fails.
    let agent = running_agent(&cluster, "node0");
    let signal = |signal: &str| {
        let pid = agent.pid.to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let started = Instant::now();
    let stuck = xtask(&["wait", "--name", &name, "--timeout", "1"])
        .output()
        .unwrap();
    let took = started.elapsed();
    signal("-CONT");
    assert!(!stuck.status.success(), "{stuck:?}");
    let message = String::from_utf8_lossy(&stuck.stderr);
    assert!(
        message.contains("did not settle within 1s") && message.contains("node0"),
        "{message}"
    );
    assert!(took < Duration::from_secs(10), "the wait took {took:?}");

    // Output to a pipe nobody reads, as `status | head` leaves it: no panic message,
    // the exit status of a process that SIGPIPE ended.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = xtask(&["status", "--name", &name])
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(141), "{status:?}");
    assert_eq!(String::from_utf8_lossy(&status.stderr), "");
    // Both streams closed (`2>&1 | head`), and a command that reports on stderr.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let quiet = xtask(&["wait", "--name", &name])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(quiet.code(), Some(141), "{quiet:?}");
}

#[test]
fn plaintext_into_a_strict_pod_is_dropped_and_logged_in_wall_clock_time() {
    let mut cluster = TestCluster::with_mesh(1, MESH);
    let echo = workspace_bin("weft-echo").display().to_string();
    let web = start(&mut cluster, "web", "node0", &[&echo], None);
    // The README's `batch` pod: outside the mesh, so its plaintext is not welcome.
    let mut batch = PodSpec::new("batch", "node0", &[]);
    batch
        .annotations
        .insert("weft.dev/mesh".to_owned(), "disabled".to_owned());
    cluster.add_pod(batch).unwrap_or_else(|err| panic!("{err}"));
    cluster.settle();

    let before = format_time(SystemTime::now());
    let url = format!("http://{}:8080/", web.ip);
    let refused = cluster
        .pod_command("default", "batch", &["curl", "-s", "--max-time", "2", &url])
        .unwrap()
        .output()
        .unwrap();
    let after = format_time(SystemTime::now());
    assert!(!refused.status.success(), "plaintext got into a STRICT pod");

    let flow_log = cluster.topology().node("node0").unwrap().flow_log.clone();
    let destination = format!("{}:8080", web.ip);
    let mut dropped = serde_json::Value::Null;
    wait_until("the drop in flows.jsonl", READY, || {
        let text = std::fs::read_to_string(&flow_log).unwrap_or_default();
        dropped = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find(|flow| {
                flow["verdict"] == "drop"
                    && flow["reason"] == "strict_plaintext"
                    && flow["destination"] == destination.as_str()
            })
            .unwrap_or_default();
        !dropped.is_null()
    });
    let time = dropped["time"].as_str().expect("a wall-clock time");
    assert!(
        before.as_str() <= time && time <= after.as_str(),
        "the drop at {time} is not between {before} and {after}: {dropped}"
    );
    assert!(dropped["timestamp_ns"].as_u64().is_some(), "{dropped}");
}
