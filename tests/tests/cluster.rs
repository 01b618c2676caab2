//! The local cluster: pods on different nodes reach each other with real clients, pods
//! come and go while it runs, two clusters live side by side, and `down` removes every
//! trace, also after an interrupted `up`.

use std::{
    net::SocketAddrV4, os::unix::process::CommandExt, process::Command, thread, time::Duration,
};

use weft_cluster::{Cluster, PodInfo, PodSpec};
use weft_e2e::{TestCluster, leftovers, require_root, run_in_pod, unique_name, workspace_bin};

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
