//! The mesh under pressure a first week brings, on a 2-node local cluster with real
//! clients: one pod's thousands of idle connections must not hold back another pod of
//! the same service account, idle connections close at the TrafficPolicy's timeout,
//! a host without a certificate flooding a node's HBONE port must not cost a real
//! client a single request, and neither must a hostile HTTP/2 or HTTP/1.1 client, from
//! a pod or from a host with a mesh certificate.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use weft_cluster::PodSpec;
use weft_e2e::{
    TestCa, TestCluster, agent_log, agent_metrics, running_agent, series, valid_now, wait_until,
    workspace_bin,
};

/// `both-0` on node1 serves HTTP on 8080 (service `echo`) and TCP echo on 9000
/// (service `tcp`): tunnels to either come from one pool of HBONE connections per
/// client identity.
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
  selector: { app: both }
  ports: [{ name: http, port: 80, targetPort: 8080 }]
---
apiVersion: v1
kind: Service
metadata: { name: tcp, namespace: default }
spec:
  clusterIP: 10.96.0.11
  selector: { app: both }
  ports: [{ name: tcp, port: 9000 }]
"#;

const IDLE_POLICY: &str = r#"
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: tcp, namespace: default }
spec:
  service: tcp
  timeouts: { idle: 3s }
"#;

/// Opens `count` connections to `ip:port` and sends nothing. `hold`: keeps them
/// until killed. `watch`: reports, once all have closed (or after 60 s), how many did
/// and the shortest and longest lifetime in seconds. `abandon`: closes its half of
/// each at once and reports how many bytes came back in all.
const IDLER: &str = r#"
import json, selectors, socket, sys, time
count, ip, port, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
opened = [(socket.create_connection((ip, port)), time.monotonic()) for _ in range(count)]
print(f"open {count}", flush=True)
if mode == "hold":
    while True:
        time.sleep(3600)
if mode == "abandon":
    received = 0
    for sock, _ in opened:
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(4096):
            received += len(chunk)
    print(json.dumps({"received": received}), flush=True)
    sys.exit(0)
selector = selectors.DefaultSelector()
for sock, started in opened:
    selector.register(sock, selectors.EVENT_READ, started)
lifetimes, deadline = [], time.monotonic() + 60
while len(lifetimes) < count and time.monotonic() < deadline:
    for key, _ in selector.select(timeout=1):
        try:
            data = key.fileobj.recv(1)
        except ConnectionError:
            data = b""
        if not data:
            lifetimes.append(time.monotonic() - key.data)
            selector.unregister(key.fileobj)
print(json.dumps({"closed": len(lifetimes), "shortest": min(lifetimes, default=0), "longest": max(lifetimes, default=0)}), flush=True)
"#;

fn cluster(agent_args: &[&str]) -> TestCluster {
    let mut cluster = TestCluster::with_mesh_and_agent_args(2, MESH, agent_args);
    let script = format!(
        "{} & exec {} --mode echo",
        workspace_bin("weft-echo").display(),
        workspace_bin("weft-tcp-echo").display()
    );
    let mut both = PodSpec::new("both-0", "node1", &["sh", "-c", &script]);
    both.labels.insert("app".into(), "both".into());
    both.service_account = "both".into();
    cluster.add_pod(both).unwrap_or_else(|err| panic!("{err}"));
    for (name, node) in [("idler", "node0"), ("client", "node0")] {
        let mut pod = PodSpec::new(name, node, &[]);
        pod.service_account = "client".into();
        cluster.add_pod(pod).unwrap_or_else(|err| panic!("{err}"));
    }
    cluster.settle();
    let server_log = cluster
        .topology()
        .pod("default", "both-0")
        .unwrap()
        .log
        .clone();
    for port in [8080, 9000] {
        let address = format!("10.244.1.2:{port}").parse().unwrap();
        cluster
            .wait_for_tcp(
                "default",
                "client",
                address,
                Duration::from_secs(10),
                &server_log,
            )
            .unwrap_or_else(|err| panic!("{err}"));
    }
    cluster
}

/// Starts the idler script in pod `pod` and waits until its connections are open.
fn idle_connections(
    cluster: &TestCluster,
    pod: &str,
    count: usize,
    mode: &str,
) -> (Child, BufReader<ChildStdout>) {
    let count = count.to_string();
    let mut child = cluster
        .pod_command(
            "default",
            pod,
            &["python3", "-c", IDLER, &count, "10.96.0.11", "9000", mode],
        )
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        format!("open {count}"),
        "the idler could not open its connections"
    );
    (child, out)
}

fn last_line(out: &mut BufReader<ChildStdout>) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line:?}"))
}

fn metric(cluster: &TestCluster, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(&agent_metrics(cluster, node), name, labels).unwrap_or(0.0)
}

/// How many of node0's outbound connections ended with `outcome`.
fn outcomes(cluster: &TestCluster, outcome: &str) -> f64 {
    metric(
        cluster,
        "node0",
        "weft_connection_outcomes_total",
        &[("direction", "outbound"), ("outcome", outcome)],
    )
}

/// `weft-load` from pod `client`: `rate` new connections a second to the echo service
/// for `seconds`; returns its report.
fn load(cluster: &TestCluster, rate: u32, seconds: u32) -> serde_json::Value {
    let out = cluster
        .pod_command(
            "default",
            "client",
            &[
                workspace_bin("weft-load").display().to_string(),
                "--target".into(),
                "10.96.0.10:80".into(),
                "--rate".into(),
                rate.to_string(),
                "--duration".into(),
                seconds.to_string(),
                "--warmup".into(),
                "0".into(),
                "--timeout".into(),
                "10".into(),
            ],
        )
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.success(), "weft-load: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn idle_connections_neither_starve_their_service_account_nor_outlive_the_idle_timeout() {
    let cluster = cluster(&["--open-files=20000"]);
    let agents = ["node0", "node1"].map(|node| running_agent(&cluster, node).pid);
    let rss = || agents.map(resident_kib);
    let rss_before = rss();
    // 2,000 connections that send nothing, from one pod...
    let (mut idler, _) = idle_connections(&cluster, "idler", 2000, "hold");
    wait_until(
        "2000 tunnels to be carried",
        Duration::from_secs(60),
        || {
            metric(
                &cluster,
                "node0",
                "istio_tcp_connections_opened_total",
                &[("destination_service_name", "tcp")],
            ) >= 2000.0
        },
    );
    // The last tunnels may still be dialing when their connections are counted.
    wait_until(
        "2000 tunnels, at most 100 a connection: at least 20 connections",
        Duration::from_secs(30),
        || metric(&cluster, "node0", "weft_hbone_pool_connections", &[]) >= 20.0,
    );
    let pooled = metric(&cluster, "node0", "weft_hbone_pool_connections", &[]);
    // ... while another pod of the same service account makes 500 requests, each on a
    // connection (a tunnel) of its own.
    let report = load(&cluster, 100, 5);
    eprintln!(
        "beside 2000 idle connections of its service account: {} of {} requests answered, {pooled} pooled HBONE connections",
        report["requests"],
        report["requests"].as_u64().unwrap() + report["errors"].as_u64().unwrap()
    );
    assert_eq!(report["errors"], 0, "{}", report["first_error"]);
    assert!(report["requests"].as_u64().unwrap() >= 490, "{report}");
    let rss_idle = rss();
    idler.kill().unwrap();
    let _ = idler.wait();
    wait_until(
        "the idle connections to close",
        Duration::from_secs(30),
        || metric(&cluster, "node0", "weft_active_connections", &[]) == 0.0,
    );
    eprintln!(
        "agents' RSS (node0, node1): {rss_before:?} KiB before, {rss_idle:?} with 2000 idle connections, {:?} after",
        rss()
    );

    // With a TrafficPolicy's `timeouts.idle: 3s`, new idle connections to the service
    // close after 3 s, not before, and are logged as such.
    cluster.set_mesh_yaml(&format!("{MESH}{IDLE_POLICY}"));
    cluster.settle();
    let before = outcomes(&cluster, "idle_timeout");
    let (mut watcher, mut out) = idle_connections(&cluster, "idler", 200, "watch");
    let closed = last_line(&mut out);
    let _ = watcher.wait();
    eprintln!("idle for the TrafficPolicy's 3 s: {closed}");
    assert_eq!(closed["closed"], 200, "{closed}");
    let shortest = closed["shortest"].as_f64().unwrap();
    let longest = closed["longest"].as_f64().unwrap();
    assert!(shortest >= 3.0, "closed before the idle timeout: {closed}");
    assert!(
        longest < 30.0,
        "the idle timeout did not close them: {closed}"
    );
    let after = outcomes(&cluster, "idle_timeout");
    assert_eq!(after - before, 200.0);
    // The access log is written out in batches: its lines may follow the counters.
    let idle_lines = || {
        agent_log(&cluster, "node0")
            .lines()
            .filter(|line| {
                line.contains("weft::access") && line.contains("\"outcome\":\"idle_timeout\"")
            })
            .count()
    };
    wait_until(
        "each idle connection's access-log line, saying why it ended",
        Duration::from_secs(10),
        || idle_lines() >= 200,
    );
    assert_eq!(idle_lines(), 200, "one line for each idle connection");

    // A connection the server never answered is not `ok`.
    let before = outcomes(&cluster, "no_response");
    let (mut abandoner, mut out) = idle_connections(&cluster, "idler", 1, "abandon");
    assert_eq!(last_line(&mut out)["received"], 0);
    let _ = abandoner.wait();
    wait_until(
        "the abandoned connection's outcome",
        Duration::from_secs(10),
        || outcomes(&cluster, "no_response") == before + 1.0,
    );
}

/// Opens `count` connections to `target` from the fabric (a host on the node network
/// with no certificate) and reopens each one the agent closes, sending nothing, until
/// its stdin closes; then reports how many it opened in all.
const FLOOD: &str = r#"
import errno, json, selectors, socket, sys, threading
count, ip, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
selector, opened, stop = selectors.DefaultSelector(), 0, threading.Event()
def open_one():
    global opened
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex((ip, port))
    selector.register(sock, selectors.EVENT_READ)
    opened += 1
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
for _ in range(count):
    open_one()
print("flooding", flush=True)
while not stop.is_set():
    for key, _ in selector.select(timeout=0.2):
        try:
            data = key.fileobj.recv(4096)
        except (ConnectionError, OSError):
            data = b""
        if not data:
            selector.unregister(key.fileobj)
            key.fileobj.close()
            open_one()
print(json.dumps({"opened": opened}), flush=True)
"#;

/// Starts TLS handshakes with `ip:port` on `threads` threads, one after the other,
/// naming `sni` but presenting no client certificate, until its stdin closes; then
/// reports how many it started.
const HANDSHAKE_FLOOD: &str = r#"
import json, socket, ssl, sys, threading
ip, port, sni, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.set_alpn_protocols(["h2"])
stop, started, lock = threading.Event(), [0], threading.Lock()
def flood():
    while not stop.is_set():
        with lock:
            started[0] += 1
        try:
            with socket.create_connection((ip, port), timeout=5) as sock:
                with context.wrap_socket(sock, server_hostname=sni) as tls:
                    tls.recv(1)
        except (OSError, ssl.SSLError):
            pass
workers = [threading.Thread(target=flood, daemon=True) for _ in range(threads)]
for worker in workers:
    worker.start()
print("flooding", flush=True)
sys.stdin.read()
stop.set()
print(json.dumps({"handshakes": started[0]}), flush=True)
"#;

/// Clock ticks of CPU the process `pid` used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Runs `command` with its stdin held open until `during` returns; waits for its
/// `flooding` line first and returns its last line after.
fn flooding<T>(mut command: Command, during: impl FnOnce() -> T) -> (T, serde_json::Value) {
    let mut flood = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "flooding", "the flood did not start");
    let result = during();
    drop(flood.stdin.take());
    let report = last_line(&mut out);
    let _ = flood.wait();
    (result, report)
}

/// The median latency of a `weft-load` report, in milliseconds.
fn median_ms(report: &serde_json::Value) -> f64 {
    percentile_ms(report, 0.5)
}

/// The latency of a `weft-load` report at `quantile`, in milliseconds.
fn percentile_ms(report: &serde_json::Value, quantile: f64) -> f64 {
    let mut latencies: Vec<u64> = report["latencies_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|latency| latency.as_u64().unwrap())
        .collect();
    latencies.sort_unstable();
    let at = ((latencies.len() as f64 * quantile) as usize).min(latencies.len().saturating_sub(1));
    latencies.get(at).map_or(f64::NAN, |us| *us as f64 / 1000.0)
}

fn open_files(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

fn resident_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

#[test]
fn a_flood_of_twice_the_descriptor_limit_from_one_host_costs_a_real_client_nothing() {
    const OPEN_FILES: usize = 1024;
    let cluster = cluster(&[&format!("--open-files={OPEN_FILES}")]);
    let agent = running_agent(&cluster, "node1");
    let rss_before = resident_kib(agent.pid);
    let calm = load(&cluster, 50, 3);
    let node1 = cluster.topology().node("node1").unwrap().ip.to_string();
    let refused = |cluster: &TestCluster, reason| {
        metric(
            cluster,
            "node1",
            "weft_connections_refused_total",
            &[("direction", "inbound"), ("reason", reason)],
        )
    };
    // Silent connections, each reopened as soon as the agent closes it.
    let flood_started = Instant::now();
    let mut busiest = 0;
    let (report, opened) = flooding(
        cluster
            .fabric_command(&[
                "python3",
                "-c",
                FLOOD,
                &(2 * OPEN_FILES).to_string(),
                &node1,
                "15008",
            ])
            .unwrap(),
        || {
            wait_until("the flood to be refused", Duration::from_secs(30), || {
                refused(&cluster, "source_pending_limit") > 0.0
            });
            // A real client on node0 reaches node1's pod through HBONE meanwhile.
            std::thread::scope(|scope| {
                let load = scope.spawn(|| load(&cluster, 50, 6));
                while !load.is_finished() {
                    busiest = busiest.max(open_files(agent.pid));
                    std::thread::sleep(Duration::from_millis(100));
                }
                load.join().unwrap()
            })
        },
    );
    let flooded = flood_started.elapsed();
    let rss_during = resident_kib(agent.pid);
    let refusals = refused(&cluster, "source_pending_limit");
    eprintln!(
        "flood of {} connections from one host (opened {} in all, {refusals} refused for its pending limit): \
         real client {} answered, {} failed, median {:.2} ms (without a flood {:.2} ms); agent at most {busiest} \
         of {OPEN_FILES} descriptors, RSS {rss_before} -> {rss_during} KiB",
        2 * OPEN_FILES,
        opened["opened"],
        report["requests"],
        report["errors"],
        median_ms(&report),
        median_ms(&calm)
    );
    assert_eq!(report["errors"], 0, "{}", report["first_error"]);
    assert!(report["requests"].as_u64().unwrap() >= 290, "{report}");
    assert!(busiest < OPEN_FILES, "the agent held {busiest} descriptors");
    // Refusals are counted one by one but logged at most once a second.
    let log = agent_log(&cluster, "node1");
    let logged = log
        .lines()
        .filter(|line| {
            line.contains("inbound connection from 10.99.0.254") && line.contains("refused")
        })
        .count();
    assert!(logged >= 1, "the refusals are logged");
    assert!(
        logged as f64 <= flooded.as_secs_f64() + 2.0,
        "{logged} lines for {refusals} refusals in {flooded:?}"
    );
    assert!(
        refusals > 10.0 * logged as f64,
        "{logged} lines for {refusals} refusals"
    );

    // Handshakes that name a real identity, so that each costs the agent a key
    // exchange and a signature before it finds no client certificate.
    let ticks_before = cpu_ticks(agent.pid);
    let tls_started = Instant::now();
    let (report, started) = flooding(
        cluster
            .fabric_command(&[
                "python3",
                "-c",
                HANDSHAKE_FLOOD,
                &node1,
                "15008",
                "both.default.cluster.local.spiffe.invalid",
                "4",
            ])
            .unwrap(),
        || load(&cluster, 50, 6),
    );
    let cpu =
        (cpu_ticks(agent.pid) - ticks_before) as f64 / 100.0 / tls_started.elapsed().as_secs_f64();
    let rate_refused = refused(&cluster, "source_handshake_rate");
    eprintln!(
        "TLS handshake flood from one host ({} started, {rate_refused} refused for its handshake rate): \
         real client {} answered, {} failed, median {:.2} ms; agent CPU {:.0} % of a core, RSS after {} KiB",
        started["handshakes"],
        report["requests"],
        report["errors"],
        median_ms(&report),
        cpu * 100.0,
        resident_kib(agent.pid)
    );
    assert_eq!(report["errors"], 0, "{}", report["first_error"]);
    assert!(rate_refused > 0.0, "the handshake rate was never reached");
    let missing = metric(
        &cluster,
        "node1",
        "weft_hbone_failures_total",
        &[("direction", "inbound"), ("reason", "peer_identity")],
    ) + metric(
        &cluster,
        "node1",
        "weft_hbone_failures_total",
        &[("direction", "inbound"), ("reason", "tls_handshake")],
    );
    assert!(
        missing > 0.0,
        "handshakes without a client certificate are counted"
    );
}

/// A hostile HTTP client: `attack ip port [cert key sni authority]` opens a connection
/// (mTLS with ALPN h2 when given a certificate, for the HBONE port), sends the attack
/// until the agent closes the connection, and opens the next, until its stdin closes.
/// Reports how many connections it opened and how many the agent closed.
const H2_ABUSE: &str = r#"
import json, select, socket, ssl, struct, sys, threading, time
attack, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
tls = sys.argv[4:]
def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def literal(index, value):
    return bytes([index, len(value)]) + value
def head(stream, flags):
    if tls:
        block = literal(2, b"CONNECT") + literal(1, tls[3].encode())
    else:
        block = b"\x82\x86\x84" + literal(1, b"echo")
    return frame(1, 0x4 | flags, stream, block)
def batch(n):
    first = 2 * 20 * n + 1
    if attack == "ping":
        return frame(6, 0, 0, b"\0" * 8) * 200
    if attack == "settings":
        return frame(4, 0, 0, struct.pack(">HI", 3, 100)) * 50
    if attack == "priority":
        return frame(2, 0, first, struct.pack(">IB", 0, 16)) * 200
    if attack == "rapid_reset":
        return b"".join(head(s, 0) + frame(3, 0, s, struct.pack(">I", 8)) for s in range(first, first + 40, 2))
    if attack == "continuation":
        name = b"\x00\x7f\xb9\x16" + b"x" * 3000
        return frame(1, 0, first, name[:100]) + b"".join(frame(9, 0, first, name[i:i + 100]) for i in range(100, 3000, 100))
    if attack == "header_bomb":
        block = b"\x82\x86\x84\x40\x01x\x7f\xa1\x1e" + b"v" * 4000 + b"\xbe" * 100
        return frame(1, 0x5, first, block)
    if attack == "empty_frames":
        return head(first, 0) + frame(0, 0, first) * 200
    if attack == "h1_head":
        return b"GET / HTTP/1.1\r\nhost: echo\r\nx-big: " + b"a" * 100000 + b"\r\n\r\n"
    if attack == "h1_fields":
        return b"GET / HTTP/1.1\r\nhost: echo\r\n" + b"".join(b"x-%d: y\r\n" % i for i in range(150)) + b"\r\n"
    if attack == "slow_body":
        # The echo server answers after 30 s: until then the agent sends it the body.
        return b"POST /?delay=30000 HTTP/1.1\r\nhost: echo\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 10
    if attack == "stalled_reader":
        return b"GET /?bytes=67108864 HTTP/1.1\r\nhost: echo\r\n\r\n"
    if attack == "zero_window":
        # Every stream's window closed (SETTINGS_INITIAL_WINDOW_SIZE 0), then a GET.
        return frame(4, 0, 0, struct.pack(">HI", 4, 0)) + head(first, 0x1)
    raise SystemExit(f"unknown attack {attack}")
context = None
if tls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(tls[0], tls[1])
stop, counts = threading.Event(), {"connections": 0, "closed": 0}
def closed(sock):
    while select.select([sock], [], [], 0)[0]:
        if not sock.recv(65536):
            return True
    return False
def established(sock):
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 1
def hostile():
    while not stop.is_set():
        counts["connections"] += 1
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            sock.connect((ip, port))
            if context:
                sock = context.wrap_socket(sock, server_hostname=tls[2])
            if attack == "slow_body":
                # Sent once; then the client sends nothing more (and waits for the end).
                sock.sendall(batch(0))
                while not stop.is_set() and established(sock):
                    time.sleep(0.05)
                if stop.is_set():
                    continue
                raise OSError("closed")
            if attack == "stalled_reader":
                # The client reads nothing for twice the agent's stall timeout, then
                # finds the rest of the response cut off.
                sock.sendall(batch(0))
                stop.wait(4)
                received = 0
                sock.settimeout(10)
                while chunk := sock.recv(1 << 20):
                    received += len(chunk)
                if received >= 67108864:
                    continue
                raise OSError("cut off")
            if not attack.startswith("h1"):
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0))
            if attack == "zero_window":
                # Sent once; then the client reads all it gets and never opens a window.
                sock.sendall(batch(0))
                sock.settimeout(10)
                while sock.recv(65536):
                    pass
                raise OSError("closed")
            n = 0
            while not stop.is_set():
                sock.sendall(batch(n))
                n += 1
                if closed(sock):
                    break
            else:
                continue
        except (OSError, ssl.SSLError):
            pass
        counts["closed"] += 1
threading.Thread(target=hostile, daemon=True).start()
print("flooding", flush=True)
sys.stdin.read()
stop.set()
print(json.dumps(counts), flush=True)
"#;

/// What a hostile client's attack, sent to `listener` on `node`, is counted as.
struct Attack {
    name: &'static str,
    reason: &'static str,
}

const fn attack(name: &'static str, reason: &'static str) -> Attack {
    Attack { name, reason }
}

/// Runs each attack with `hostile` (given the attack's name) against `node`'s
/// `listener` until the agent has closed a connection for it, and a real client's load
/// meanwhile, which must lose nothing.
fn under_attack(
    cluster: &TestCluster,
    node: &str,
    listener: &str,
    attacks: &[Attack],
    hostile: impl Fn(&str) -> Command,
) {
    let abused = |reason| {
        metric(
            cluster,
            node,
            "weft_http_abuse_total",
            &[("listener", listener), ("reason", reason)],
        )
    };
    for attack in attacks {
        let before = abused(attack.reason);
        let (report, hostile) = flooding(hostile(attack.name), || {
            wait_until(
                &format!("the agent to close {} connections", attack.name),
                Duration::from_secs(30),
                || abused(attack.reason) > before,
            );
            load(cluster, 50, 3)
        });
        eprintln!(
            "{listener} {}: the agent closed {} of the {} connections the attack opened \
             ({} counted as {}); meanwhile a real client: {} answered, {} failed, \
             p50 {:.2} ms, p99 {:.2} ms",
            attack.name,
            hostile["closed"],
            hostile["connections"],
            abused(attack.reason) - before,
            attack.reason,
            report["requests"],
            report["errors"],
            median_ms(&report),
            percentile_ms(&report, 0.99),
        );
        assert_eq!(
            report["errors"], 0,
            "{}: {}",
            attack.name, report["first_error"]
        );
        assert_eq!(report["requests"], 150, "{}: {report}", attack.name);
        assert!(
            hostile["closed"].as_u64().unwrap() >= 1,
            "{}: {hostile}",
            attack.name
        );
    }
}

#[test]
fn a_hostile_http_client_is_cut_off_and_costs_a_real_client_nothing() {
    let cluster = cluster(&["--client-stall-timeout=2s"]);
    // From a meshed pod, to its node's request layer.
    under_attack(
        &cluster,
        "node0",
        "outbound",
        &[
            attack("ping", "ping_flood"),
            attack("settings", "settings_flood"),
            attack("priority", "priority_flood"),
            attack("rapid_reset", "rapid_reset"),
            attack("continuation", "continuation_flood"),
            attack("header_bomb", "header_bomb"),
            attack("empty_frames", "empty_frames"),
            attack("h1_head", "head_too_large"),
            attack("h1_fields", "head_too_large"),
            attack("slow_body", "slow_body"),
            attack("stalled_reader", "stalled_reader"),
            attack("zero_window", "zero_window"),
        ],
        |name| {
            cluster
                .pod_command(
                    "default",
                    "idler",
                    &["python3", "-c", H2_ABUSE, name, "10.96.0.10", "80"],
                )
                .unwrap()
        },
    );
    // From a host with a mesh certificate, to the other node's HBONE port.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = TestCa::mesh(&cluster.topology().ca_dir).issue(
        "spiffe://cluster.local/ns/default/sa/intruder",
        valid_now(),
        dir.path(),
        "intruder",
    );
    let node1 = cluster.topology().node("node1").unwrap().ip.to_string();
    under_attack(
        &cluster,
        "node1",
        "hbone",
        &[
            attack("ping", "ping_flood"),
            attack("settings", "settings_flood"),
            attack("continuation", "continuation_flood"),
            // Tunnels reset as they open are dropped before a pod is dialled for
            // them, until h2 closes the connection for the resets that pile up.
            attack("rapid_reset", "rapid_reset"),
        ],
        |name| {
            cluster
                .fabric_command(&[
                    "python3",
                    "-c",
                    H2_ABUSE,
                    name,
                    &node1,
                    "15008",
                    &cert.display().to_string(),
                    &key.display().to_string(),
                    "both.default.cluster.local.spiffe.invalid",
                    "10.244.1.2:8080",
                ])
                .unwrap()
        },
    );
}
