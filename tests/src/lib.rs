//! Support for weft's privileged end-to-end tests: unique names, clusters that remove
//! themselves (also when a test panics), running commands inside pods, reading
//! metrics, and client certificates from the mesh CA (or a rogue one) for tests that
//! play a misbehaving peer.
//!
//! The tests themselves are in `tests/`. They need root and run under
//! `cargo xtask test`, which builds the workspace binaries they start first.

use std::{
    ffi::OsStr,
    fs,
    ops::{Deref, DerefMut, Range},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

use aya::maps::{HashMap, Map, MapData};
use weft_cluster::{Cluster, NodeProcess};
use weft_common::{InboundPort, names};
use weft_controller::ca::{self, Authority};

/// Panics with the way out unless the test runs as root.
pub fn require_root() {
    assert!(
        weft_cluster::is_root(),
        "this end-to-end test needs root (kernel programs, namespaces, cgroups): run `sudo -E cargo xtask test`"
    );
}

/// A name no other test in any concurrently running test process uses: a letter, the
/// process id and a counter, short enough for a cluster name.
pub fn unique_name(letter: char) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{letter}{:x}x{n:x}", std::process::id())
}

/// A TCP client for `python3 -c … ADDRESS PORT`: sends one line and prints what comes
/// back (`<closed>` when nothing does).
pub const TCP_LINE_CLIENT: &str = r#"
import socket, sys
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
connection.sendall(b"hello\n")
try:
    line = connection.makefile("rb").readline().decode().strip()
except OSError:
    line = ""
print(line or "<closed>")
"#;

/// A local cluster that is taken down when dropped, so a failing test leaves nothing.
#[derive(Debug)]
pub struct TestCluster(Cluster);

impl TestCluster {
    /// A cluster of `nodes`. Its agents and controller run as `deploy/install.yaml`
    /// runs them (capabilities, arguments, environment), so every end-to-end test is
    /// also a test of the manifest.
    pub fn up(nodes: usize) -> Self {
        require_root();
        let name = unique_name('t');
        Self(Cluster::up(&name, nodes).unwrap_or_else(|err| panic!("cluster {name}: {err}")))
    }

    /// A cluster whose nodes each run `weft-agent`, configured by `weft-controller`
    /// from `manifests` (Kubernetes YAML: meshed namespaces, services, policies) beside
    /// the cluster's own nodes and pods, and whose pods are enrolled through `weft-cni`.
    pub fn with_mesh(nodes: usize, manifests: &str) -> Self {
        Self::with_mesh_excluding(nodes, manifests, &[])
    }

    /// [`Self::with_mesh`], with destination ports the mesh never captures.
    pub fn with_mesh_excluding(nodes: usize, manifests: &str, exclude_ports: &[u16]) -> Self {
        Self::mesh(nodes, manifests, exclude_ports, &[], &[])
    }

    /// [`Self::with_mesh`], with extra arguments of `weft-controller run` (such as
    /// `--cert-ttl 10s`), which it also gets when a test restarts it.
    pub fn with_mesh_and_controller_args(
        nodes: usize,
        manifests: &str,
        controller_args: &[&str],
    ) -> Self {
        Self::mesh(nodes, manifests, &[], controller_args, &[])
    }

    /// [`Self::with_mesh`], with extra arguments of `weft-agent run` (such as
    /// `--drain-timeout=2`), which every agent the cluster starts gets, also when a
    /// test restarts one.
    pub fn with_mesh_and_agent_args(nodes: usize, manifests: &str, agent_args: &[&str]) -> Self {
        Self::mesh(nodes, manifests, &[], &[], agent_args)
    }

    /// [`Self::with_mesh`], where the nodes named `foreign` run no weft agent (and so
    /// enroll no pod): a test plays another mesh's node there.
    pub fn with_mesh_and_foreign_nodes(nodes: usize, manifests: &str, foreign: &[&str]) -> Self {
        Self::mesh_on(nodes, manifests, &[], &[], &[], foreign)
    }

    fn mesh(
        nodes: usize,
        manifests: &str,
        exclude_ports: &[u16],
        controller_args: &[&str],
        agent_args: &[&str],
    ) -> Self {
        Self::mesh_on(
            nodes,
            manifests,
            exclude_ports,
            controller_args,
            agent_args,
            &[],
        )
    }

    fn mesh_on(
        nodes: usize,
        manifests: &str,
        exclude_ports: &[u16],
        controller_args: &[&str],
        agent_args: &[&str],
        foreign: &[&str],
    ) -> Self {
        let owned = |args: &[&str]| args.iter().map(|&arg| arg.to_owned()).collect();
        let mut cluster = Self::up(nodes);
        let path = cluster.manifests_file();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, manifests).unwrap();
        cluster
            .set_controller_args(owned(controller_args))
            .unwrap_or_else(|err| panic!("{err}"));
        cluster
            .set_agent_args(owned(agent_args))
            .unwrap_or_else(|err| panic!("{err}"));
        cluster
            .set_mesh(vec![path], exclude_ports.to_vec())
            .unwrap_or_else(|err| panic!("{err}"));
        cluster.run_controller();
        let bin_dir = workspace_bin("weft-cni").parent().unwrap().to_owned();
        cluster
            .set_cni(Some(bin_dir))
            .unwrap_or_else(|err| panic!("{err}"));
        for node in cluster.topology().node_names() {
            if !foreign.contains(&node.as_str()) {
                cluster.start_agent_on(&node);
            }
        }
        cluster
    }

    /// The file holding the test's manifests (in the cluster's state directory).
    pub fn manifests_file(&self) -> PathBuf {
        self.layout()
            .state_dir()
            .join("manifests")
            .join("test.yaml")
    }

    /// Starts the controller (unless it runs) and waits until it answers.
    pub fn run_controller(&mut self) {
        self.start_controller(&workspace_bin("weft-controller"))
            .unwrap_or_else(|err| panic!("{err}"));
    }

    pub fn start_agent_on(&mut self, node: &str) {
        self.start_agent(node, &workspace_bin("weft-agent"))
            .unwrap_or_else(|err| panic!("{err}"));
    }

    /// Replaces the test's manifests; the controller picks them up on its own.
    pub fn set_mesh_yaml(&self, manifests: &str) {
        let path = self.manifests_file();
        let partial = path.with_extension("partial");
        std::fs::write(&partial, manifests).unwrap();
        std::fs::rename(&partial, &path).unwrap();
    }

    /// Waits until the controller compiled the current manifests and every agent
    /// applied them.
    pub fn settle(&self) {
        self.wait_for_mesh(std::time::Duration::from_secs(10))
            .unwrap_or_else(|err| panic!("{err}"));
    }

    /// The node's kernel counters, by name.
    pub fn counters(&self, node: &str) -> std::collections::BTreeMap<&'static str, u64> {
        let info = self.topology().node(node).expect("the node exists");
        weft_agent::datapath::pinned::counters(&weft_agent::datapath::Pins::new(&info.bpffs))
            .unwrap_or_else(|err| panic!("{err}"))
            .into_iter()
            .map(|(counter, value)| (counter.name(), value))
            .collect()
    }

    /// The index of pod `namespace/name`'s host-side veth in its node's namespace: the
    /// key the kernel programs know the pod's inbound side by.
    pub fn host_ifindex(&self, namespace: &str, name: &str) -> u32 {
        let pod = self
            .topology()
            .pod(namespace, name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"));
        let show = ["ip", "-o", "link", "show", "dev", &pod.host_veth];
        let output = self
            .node_command(&pod.node, &show)
            .unwrap_or_else(|err| panic!("{err}"))
            .output()
            .unwrap_or_else(|err| panic!("cannot run `ip link`: {err}"));
        // "17: weft...@if2: <BROADCAST,...> ..."
        let text = String::from_utf8_lossy(&output.stdout);
        text.split(':')
            .next()
            .and_then(|index| index.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex for {}: {output:?}", pod.host_veth))
    }

    /// Node `node`'s pinned per-port inbound modes, opened the way an agent opens its
    /// maps, for tests that write them directly.
    pub fn port_modes(&self, node: &str) -> HashMap<MapData, InboundPort, u8> {
        let info = self.topology().node(node).expect("the node exists");
        let path = weft_agent::datapath::Pins::new(&info.bpffs).map(names::INBOUND_PORT_MODES);
        let data = MapData::from_pin(&path)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()));
        HashMap::try_from(Map::HashMap(data))
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
    }
}

impl Deref for TestCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let name = self.0.layout().cluster().to_owned();
        if let Err(err) = weft_cluster::down(&name) {
            // Panicking in drop during a panic would abort and hide the first failure.
            if std::thread::panicking() {
                eprintln!("cleaning up cluster {name} failed: {err}");
            } else {
                panic!("cleaning up cluster {name} failed: {err}");
            }
        }
    }
}

/// Runs `argv` in pod `default/pod` and returns its output, panicking with the
/// command's stderr when it fails.
pub fn run_in_pod<S: AsRef<OsStr>>(cluster: &Cluster, pod: &str, argv: &[S]) -> Output {
    let output = cluster
        .pod_command("default", pod, argv)
        .unwrap_or_else(|err| panic!("{err}"))
        .output()
        .unwrap_or_else(|err| panic!("cannot start a command in pod {pod}: {err}"));
    let shown: Vec<_> = argv
        .iter()
        .map(|arg| arg.as_ref().to_string_lossy())
        .collect();
    assert!(
        output.status.success(),
        "`{}` in pod {pod} failed ({}): {}",
        shown.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Polls `done` every 20 ms until it holds or `timeout` passes; panics naming `what`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `count` of `total` independent draws is a plausible outcome when each draw
/// hits with probability `share` (a weighted split): within 4.5 standard deviations of
/// the binomial mean. A right split fails this about once in 150,000 runs; one 20
/// points off over 500 draws practically never passes.
pub fn plausible_share(count: usize, total: usize, share: f64) -> bool {
    let total = total as f64;
    let deviation = (total * share * (1.0 - share)).sqrt();
    (count as f64 - total * share).abs() <= 4.5 * deviation
}

/// Path of workspace binary `name` in the target directory of this test build
/// (`cargo xtask test` builds them before running the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// What of cluster `name` still exists on this machine: its network namespaces and
/// its cgroup, bpffs and state directories. Empty once the cluster is fully gone.
pub fn leftovers(name: &str) -> Vec<String> {
    let layout = weft_cluster::Layout::new(name).unwrap_or_else(|err| panic!("{err}"));
    let mut found: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|netns| netns.starts_with(&layout.netns_prefix()))
        .map(|netns| format!("netns {netns}"))
        .collect();
    for dir in [layout.cgroup(), layout.bpffs(), layout.state_dir()] {
        if dir.exists() {
            found.push(dir.display().to_string());
        }
    }
    found
}

/// Node `node`'s running agent: its pid, command and log.
pub fn running_agent(cluster: &Cluster, node: &str) -> NodeProcess {
    cluster
        .topology()
        .node(node)
        .and_then(|info| info.agent.clone())
        .unwrap_or_else(|| panic!("no agent runs on {node}"))
}

/// What node `node`'s agent has logged so far.
pub fn agent_log(cluster: &Cluster, node: &str) -> String {
    let log = running_agent(cluster, node).log;
    fs::read_to_string(&log).unwrap_or_else(|err| panic!("{}: {err}", log.display()))
}

/// The controller's verdict on the policy or route `kind` `name`, from its `/status`.
pub fn policy_verdict(status: &serde_json::Value, kind: &str, name: &str) -> serde_json::Value {
    status["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|policy| policy["kind"] == kind && policy["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no verdict for {kind} {name} in {status:#}"))
}

/// Node `node`'s agent metrics (`GET :15020/metrics`, Prometheus text).
pub fn agent_metrics(cluster: &Cluster, node: &str) -> String {
    let ip = cluster.topology().node(node).expect("the node exists").ip;
    scrape(cluster, Some(node), &format!("http://{ip}:15020/metrics"))
}

/// The controller's metrics (`GET :15014/metrics`, Prometheus text).
pub fn controller_metrics(cluster: &Cluster) -> String {
    let address = cluster.topology().controller_address;
    scrape(cluster, None, &format!("http://{address}:15014/metrics"))
}

/// `GET url` from node `node` (`None`: the fabric), panicking unless it answers.
fn scrape(cluster: &Cluster, node: Option<&str>, url: &str) -> String {
    let argv = ["curl", "-sf", "--max-time", "3", url];
    let command = match node {
        Some(node) => cluster.node_command(node, &argv),
        None => cluster.fabric_command(&argv),
    };
    let out = command
        .unwrap_or_else(|err| panic!("{err}"))
        .output()
        .unwrap_or_else(|err| panic!("cannot run curl: {err}"));
    assert!(out.status.success(), "GET {url}: {out:?}");
    String::from_utf8(out.stdout).expect("metrics are UTF-8")
}

pub use weft_api::exposition::samples;

/// The value of the first sample of `name` whose labels include every `labels` pair.
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(found, _)| {
            labels
                .iter()
                .all(|(key, value)| found.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|(_, value)| value)
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
pub fn total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(found, _)| {
            labels
                .iter()
                .all(|(key, value)| found.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|(_, value)| value)
        .sum()
}

/// The report of a finished `wrk` run, checked: it ran, and saw no non-2xx answer and
/// no socket error.
pub fn clean_wrk_report(output: &Output) -> String {
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("wrk: {report}");
    assert!(report.contains("requests in"), "{report}");
    assert!(
        !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "wrk saw failures: {report}"
    );
    report
}

/// The summary line of a finished `weft-client grpc load` run.
pub fn grpc_load_report(output: &Output) -> serde_json::Value {
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "{err}: {} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    eprintln!("gRPC load: {report}");
    report
}

/// A certificate authority for test clients that play a peer the mesh's agents do not
/// expect: the mesh CA itself, read from the controller's CA directory, to issue
/// certificates the agents would never ask for (expired, not yet valid, any identity),
/// or a rogue CA nobody in the mesh trusts. Both sign exactly as the controller does
/// (`weft_controller::ca::Authority`).
#[derive(Debug)]
pub struct TestCa {
    authority: Authority,
    /// PEM roots the CA's certificates lead to (`ca.crt`).
    roots: String,
}

impl TestCa {
    /// The mesh CA kept in `ca_dir` (the controller's `--ca-dir`: `tls.crt`, `tls.key`,
    /// `ca.crt`); it signs with the key the controller signs with now.
    pub fn mesh(ca_dir: &Path) -> TestCa {
        let material = [ca::SIGNING_CERT, ca::SIGNING_KEY, ca::ROOTS]
            .into_iter()
            .map(|name| {
                let path = ca_dir.join(name);
                let bytes = fs::read(&path).unwrap_or_else(|err| {
                    panic!("cannot read the mesh CA's {}: {err}", path.display())
                });
                (name.to_owned(), bytes)
            })
            .collect();
        TestCa::from_material(material)
    }

    /// A self-signed root no agent trusts.
    pub fn rogue() -> TestCa {
        TestCa::from_material(Authority::generate_root(SystemTime::now()).expect("a root"))
    }

    fn from_material(material: ca::Material) -> TestCa {
        let authority = Authority::load(&material, SystemTime::now())
            .unwrap_or_else(|err| panic!("the test CA: {err}"));
        let roots = String::from_utf8_lossy(&material[ca::ROOTS]).into_owned();
        TestCa { authority, roots }
    }

    /// The roots (PEM) this CA's certificates lead to.
    pub fn roots_pem(&self) -> &str {
        &self.roots
    }

    /// Issues a certificate for `spiffe_id`, valid over `validity`, and writes
    /// `dir/<stem>.crt` (the leaf, then any intermediates) and `dir/<stem>.key` (its
    /// PKCS#8 key, mode 0600). Returns their paths.
    pub fn issue(
        &self,
        spiffe_id: &str,
        validity: Range<SystemTime>,
        dir: &Path,
        stem: &str,
    ) -> (PathBuf, PathBuf) {
        let (key, csr) = weft_api::ca::signing_request(spiffe_id)
            .unwrap_or_else(|err| panic!("{spiffe_id}: {err}"));
        // The CA starts certificates CLOCK_SKEW before the time it signs at.
        let start = validity.start + ca::CLOCK_SKEW;
        let lifetime = validity
            .end
            .duration_since(start)
            .expect("a validity that ends after it starts");
        let issued = self
            .authority
            .sign(&csr, start, lifetime, true, |_| Ok(()))
            .unwrap_or_else(|err| panic!("cannot sign {spiffe_id}: {err}"))
            .expect("the test CA signs any identity");
        fs::create_dir_all(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        fs::write(&cert_path, ca::pem(&issued.chain))
            .unwrap_or_else(|err| panic!("{}: {err}", cert_path.display()));
        let _ = fs::remove_file(&key_path);
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .and_then(|mut file| {
                std::io::Write::write_all(&mut file, key.serialize_pem().as_bytes())
            })
            .unwrap_or_else(|err| panic!("{}: {err}", key_path.display()));
        (cert_path, key_path)
    }
}

/// The validity of a certificate that is valid now: from an hour ago for a day.
pub fn valid_now() -> Range<SystemTime> {
    let now = SystemTime::now();
    now - Duration::from_secs(3600)..now + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_is_plausible_within_its_noise_only() {
        for (count, total, share, plausible) in [
            (350, 500, 0.7, true),
            (380, 500, 0.7, true),
            (320, 500, 0.7, true),
            (300, 500, 0.7, false),
            (250, 500, 0.7, false),
            (450, 500, 0.7, false),
            (0, 400, 0.0, true),
            (1, 400, 0.0, false),
            (400, 400, 1.0, true),
        ] {
            assert_eq!(
                plausible_share(count, total, share),
                plausible,
                "{count} of {total} at {share}"
            );
        }
    }

    #[test]
    fn reads_prometheus_samples() {
        let text = "# TYPE weft_hbone_failures_total counter\n\
            weft_hbone_failures_total{direction=\"inbound\",reason=\"certificate_expired\"} 2\n\
            weft_hbone_failures_total_other{direction=\"inbound\"} 9\n\
            weft_controller_certificates_issued_total 5\n";
        let found = samples(text, "weft_hbone_failures_total");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0["reason"], "certificate_expired");
        assert_eq!(
            series(
                text,
                "weft_hbone_failures_total",
                &[("direction", "inbound")]
            ),
            Some(2.0)
        );
        assert_eq!(
            series(text, "weft_controller_certificates_issued_total", &[]),
            Some(5.0)
        );
        assert_eq!(
            series(text, "weft_hbone_failures_total", &[("reason", "x")]),
            None
        );
    }
}

/// Istio's request-duration series keeps the name Istio's dashboards read, in
/// milliseconds, which promtool's lint prefers in seconds: the one finding tolerated.
const ISTIO_MILLISECONDS: &str =
    "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";

/// `promtool check metrics` on `text`, panicking with what it says unless it passes
/// (but for the lint of Istio's standard duration name).
pub fn assert_promtool_accepts(text: &str) {
    use std::io::Write as _;
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run promtool: {err}"));
    check
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let only_istio_names = said
        .lines()
        .filter(|line| !line.trim().is_empty())
        .all(|line| line.contains(ISTIO_MILLISECONDS));
    assert!(
        out.status.success() || only_istio_names,
        "promtool check metrics: {said}"
    );
}

/// A real Prometheus on node0 of a cluster, scraping every node's agent and the
/// controller each second; stopped when dropped.
#[derive(Debug)]
pub struct Prometheus<'a> {
    cluster: &'a Cluster,
    server: std::process::Child,
}

impl<'a> Prometheus<'a> {
    /// Starts it and waits until it scrapes every agent.
    pub fn start(cluster: &'a Cluster) -> Self {
        let state = cluster.topology().state_dir.clone();
        let targets: Vec<String> = cluster
            .topology()
            .nodes
            .iter()
            .map(|node| format!("'{}:15020'", node.ip))
            .collect();
        let config = state.join("prometheus.yml");
        // Job names as a PodMonitor gives them, which the alerts match.
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weft-system/weft-agent\n    static_configs:\n      - targets: [{}]\n  - job_name: weft-system/weft-controller\n    static_configs:\n      - targets: ['{}:15014']\n",
                targets.join(", "),
                cluster.topology().controller_address
            ),
        )
        .unwrap();
        let argv = [
            "prometheus".to_owned(),
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", state.join("prometheus").display()),
            "--web.listen-address=127.0.0.1:19090".to_owned(),
        ];
        let server = cluster
            .node_command("node0", &argv)
            .unwrap_or_else(|err| panic!("{err}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start prometheus: {err}"));
        let prometheus = Self { cluster, server };
        let nodes = cluster.topology().nodes.len().to_string();
        wait_until(
            "Prometheus scraping every agent",
            Duration::from_secs(30),
            || {
                let agents = "sum(up{job=\"weft-system/weft-agent\"})";
                prometheus.query(agents)["data"]["result"][0]["value"][1] == nodes.as_str()
            },
        );
        prometheus
    }

    /// The answer to PromQL `promql` (`/api/v1/query`), or null.
    pub fn query(&self, promql: &str) -> serde_json::Value {
        let query = format!("query={promql}");
        let argv = [
            "curl",
            "-s",
            "--max-time",
            "2",
            "-G",
            "--data-urlencode",
            &query,
            "http://127.0.0.1:19090/api/v1/query",
        ];
        let out = self
            .cluster
            .node_command("node0", &argv)
            .unwrap_or_else(|err| panic!("{err}"))
            .output()
            .unwrap_or_else(|err| panic!("cannot run curl: {err}"));
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Waits until `promql` has at least one series, and returns them.
    pub fn wait_for_series(&self, promql: &str) -> Vec<serde_json::Value> {
        let mut found = Vec::new();
        wait_until(promql, Duration::from_secs(30), || {
            found = self.query(promql)["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            !found.is_empty()
        });
        found
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
