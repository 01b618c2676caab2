//! `weftctl check`: each thing that must hold for the mesh to work, whether it does,
//! and what to do when it does not — for a running mesh ([`mesh`]) and, before an
//! install, for this machine ([`machine`]).

use serde::Serialize;
use weft_api::admin::Certificate;

use crate::{
    mesh::{NodeSnapshot, Snapshot},
    output::{Report, age, table},
};

/// A certificate with less of its lifetime left than this should have been renewed:
/// agents renew at 45–55 % of it (counted from when they got it).
const RENEWAL_OVERDUE_LEFT: f64 = 0.30;
/// A root with less time left than this needs a rotation planned.
const ROOT_EXPIRY_WARNING_SECONDS: i64 = 30 * 86_400;
/// Kernels older than this lack what the programs use (TCX links).
const MINIMUM_KERNEL: (u32, u32) = (6, 6);

/// Every check, in order.
#[derive(Debug, Serialize)]
pub struct Checks {
    pub checks: Vec<Check>,
}

/// One check.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What it is about: `controller`, `agent node0`, …
    pub subject: String,
    pub outcome: Outcome,
    /// What holds, or what is wrong.
    pub message: String,
    /// What to do about it, when it is not right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Works now, needs attention.
    Warn,
    /// Broken: `check` exits 1.
    Fail,
}

impl Check {
    fn new(subject: impl Into<String>, outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            outcome,
            message: message.into(),
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl Report for Checks {
    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|check| {
                let outcome = match check.outcome {
                    Outcome::Pass => "ok",
                    Outcome::Warn => "WARN",
                    Outcome::Fail => "FAIL",
                };
                let mut message = check.message.clone();
                if let Some(hint) = &check.hint {
                    message += &format!(" → {hint}");
                }
                vec![check.subject.clone(), outcome.to_owned(), message]
            })
            .collect();
        let failed = self
            .checks
            .iter()
            .filter(|check| check.outcome == Outcome::Fail)
            .count();
        let summary = match failed {
            0 => "every check passed\n".to_owned(),
            n => format!("{n} check(s) failed\n"),
        };
        table(&["CHECK", "RESULT", "DETAIL"], &rows) + &summary
    }

    fn passed(&self) -> bool {
        self.checks
            .iter()
            .all(|check| check.outcome != Outcome::Fail)
    }
}

/// The checks of a running mesh, from what it said in `snapshot`.
pub fn mesh(snapshot: &Snapshot) -> Checks {
    let mut checks = controller(snapshot);
    checks.extend(leader(snapshot));
    for node in &snapshot.nodes {
        checks.push(agent(node));
        checks.push(sync(snapshot, node));
        checks.push(certificates(snapshot, node));
    }
    Checks { checks }
}

/// Whether one of the controller's replicas leads (writes status, rotates the CA),
/// where they elect one.
fn leader(snapshot: &Snapshot) -> Option<Check> {
    let lease = match snapshot.leadership.as_ref()? {
        Ok(lease) => lease,
        Err(err) => {
            return Some(
                Check::new("leader", Outcome::Fail, err.clone())
                    .hint("the replicas elect a leader over the Lease weft-system/weft-controller"),
            );
        }
    };
    let Some(holder) = &lease.holder else {
        return Some(
            Check::new(
                "leader",
                Outcome::Fail,
                "no controller replica holds the Lease weft-system/weft-controller: \
                 nothing writes objects' status or rotates the CA",
            )
            .hint(
                "replicas elect a leader within seconds of starting: are they running \
                 (`kubectl -n weft-system get pods`)? Their logs say why they cannot take \
                 the Lease",
            ),
        );
    };
    let duration = lease.duration_seconds.unwrap_or(15);
    let age = lease
        .renewed_unix
        .map(|renewed| snapshot.unix_now() - renewed);
    Some(match age {
        // Compared across clocks (ours, the holder's): only a wide margin means much.
        Some(age) if age > 4 * duration => Check::new(
            "leader",
            Outcome::Warn,
            format!("{holder} last renewed the Lease {age} s ago (it lasts {duration} s)"),
        )
        .hint(
            "a leader that is gone is replaced within the Lease's duration; if this \
             stays, compare this machine's clock with the cluster's and read the \
             controllers' logs",
        ),
        _ => Check::new("leader", Outcome::Pass, format!("{holder} leads")),
    })
}

fn controller(snapshot: &Snapshot) -> Vec<Check> {
    let status = match &snapshot.controller {
        Ok(status) => status,
        Err(err) => {
            return vec![
                Check::new(
                    "controller",
                    Outcome::Fail,
                    format!("no answer on /status: {err}"),
                )
                .hint(
                    "is it running? (`kubectl -n weft-system get pods`; local: `cargo xtask \
                         cluster status`) Its log says why it is not",
                ),
            ];
        }
    };
    let mut checks = vec![Check::new(
        "controller",
        Outcome::Pass,
        format!("answers; configuration generation {}", status.generation),
    )];
    let now = snapshot.unix_now();
    checks.push(match &status.ca {
        None => Check::new("ca", Outcome::Warn, "has not reported yet").hint("check again shortly"),
        Some(ca) if ca.error.is_some() => Check::new(
            "ca",
            Outcome::Fail,
            format!("cannot sign: {}", ca.error.as_deref().unwrap_or_default()),
        )
        .hint(format!("check the CA's store ({})", ca.store)),
        Some(ca) => {
            let signing = ca
                .anchors
                .iter()
                .find(|anchor| anchor.subject == ca.signing_root);
            let left =
                signing.map(|anchor| i64::try_from(anchor.not_after).unwrap_or(i64::MAX) - now);
            let rotation = if ca.propagating {
                "; a new root is propagating to the agents"
            } else {
                ""
            };
            match left {
                None => Check::new(
                    "ca",
                    Outcome::Fail,
                    "its signing root is not among its anchors",
                ),
                Some(left) if left <= 0 => Check::new(
                    "ca",
                    Outcome::Fail,
                    format!("root {} expired {} ago", ca.signing_root, age(-left)),
                )
                .hint("rotate the root: `weft-controller ca rotate`"),
                Some(left) if left < ROOT_EXPIRY_WARNING_SECONDS => Check::new(
                    "ca",
                    Outcome::Warn,
                    format!(
                        "root {} expires in {}{rotation}",
                        ca.signing_root,
                        age(left)
                    ),
                )
                .hint("plan a rotation: `weft-controller ca rotate`"),
                Some(left) => Check::new(
                    "ca",
                    Outcome::Pass,
                    format!(
                        "signs under {}, valid for {}{rotation}",
                        ca.signing_root,
                        age(left)
                    ),
                ),
            }
        }
    });
    for (kind, problem) in &status.unread_kinds {
        checks.push(
            Check::new(
                format!("kind {kind}"),
                Outcome::Fail,
                format!("unread: {problem}"),
            )
            .hint("until the controller reads it, nothing of this kind applies"),
        );
    }
    for file in status.files.iter().flatten() {
        if let Some(error) = &file.error {
            checks.push(
                Check::new(
                    format!("file {}", file.path.display()),
                    Outcome::Warn,
                    format!("rejected: {error}"),
                )
                .hint("fix the file; its last good content keeps applying"),
            );
        }
    }
    for policy in status
        .policies
        .iter()
        .filter(|policy| !policy.verdict.accepted)
    {
        checks.push(
            Check::new(
                format!("{} {}/{}", policy.kind, policy.namespace, policy.name),
                Outcome::Warn,
                format!("{:?}: {}", policy.verdict.reason, policy.verdict.message),
            )
            .hint("fix the object; what it would decide does not apply"),
        );
    }
    checks
}

fn agent(node: &NodeSnapshot) -> Check {
    let subject = format!("agent {}", node.name);
    match &node.ready {
        Ok(()) => Check::new(subject, Outcome::Pass, "ready"),
        Err(answer) => Check::new(subject, Outcome::Fail, format!("not ready: {answer}")).hint(
            "its node's meshed pods cannot open new connections; look at the agent's log \
             (`kubectl -n weft-system logs` of the node's weft-agent pod; local: \
             `cargo xtask cluster agent start`)",
        ),
    }
}

fn sync(snapshot: &Snapshot, node: &NodeSnapshot) -> Check {
    let subject = format!("config {}", node.name);
    let Ok(status) = &snapshot.controller else {
        return Check::new(
            subject,
            Outcome::Warn,
            "unknown: the controller does not answer",
        );
    };
    let Some(state) = status
        .nodes
        .get(&node.name)
        .filter(|state| state.streams > 0)
    else {
        return Check::new(
            subject,
            Outcome::Fail,
            "the agent is not subscribed to the controller",
        )
        .hint("its log says why (address, CA, token)");
    };
    let acked = state.acked_generation.unwrap_or(0);
    if state.in_sync {
        return Check::new(
            subject,
            Outcome::Pass,
            format!("serves the current configuration ({})", state.version),
        );
    }
    let mut message = format!(
        "serves generation {acked}, the controller is at {} ({})",
        state.generation, state.version
    );
    if let Some((version, reason)) = &state.last_nack {
        message += &format!("; it refused {version}: {reason}");
    }
    Check::new(subject, Outcome::Fail, message)
        .hint("an agent refuses a configuration it cannot apply; its log names the resource")
}

fn certificates(snapshot: &Snapshot, node: &NodeSnapshot) -> Check {
    let subject = format!("certificates {}", node.name);
    let certs = match &node.certs {
        Ok(certs) => certs,
        // The agent's own check says why it does not answer.
        Err(err) => return Check::new(subject, Outcome::Warn, format!("unknown: {err}")),
    };
    let now = snapshot.unix_now();
    let mut worst = Check::new(
        subject.clone(),
        Outcome::Pass,
        match soonest(certs) {
            Some(cert) => format!(
                "{} valid; the soonest expires in {}",
                certs.len(),
                age(seconds(cert.not_after) - now)
            ),
            None => "none needed (no meshed pod on the node)".to_owned(),
        },
    );
    for cert in certs {
        let (start, end) = (seconds(cert.not_before), seconds(cert.not_after));
        // The CA backdates certificates for clock skew; their life starts at issue.
        let issued = (start + weft_controller::ca::CLOCK_SKEW.as_secs() as i64).min(end);
        let check = if end <= now {
            Check::new(
                subject.clone(),
                Outcome::Fail,
                format!("{} expired {} ago", cert.identity, age(now - end)),
            )
            .hint("its pods' connections fail; the agent's log says why renewal failed")
        } else if start > now {
            Check::new(
                subject.clone(),
                Outcome::Fail,
                format!("{} is valid only in {}", cert.identity, age(start - now)),
            )
            .hint("check the clocks of the node and the controller")
        } else if ((end - now) as f64) < RENEWAL_OVERDUE_LEFT * ((end - issued) as f64) {
            Check::new(
                subject.clone(),
                Outcome::Warn,
                format!(
                    "{} expires in {} and is not renewed yet",
                    cert.identity,
                    age(end - now)
                ),
            )
            .hint("agents renew at half a certificate's life; its log says why not")
        } else {
            continue;
        };
        if rank(check.outcome) > rank(worst.outcome) {
            worst = check;
        }
    }
    if worst.outcome == Outcome::Fail {
        return worst;
    }
    let held: Vec<&str> = certs
        .iter()
        .filter(|cert| seconds(cert.not_after) > now)
        .map(|cert| cert.identity.as_str())
        .collect();
    if let Some(missing) = node
        .identities()
        .into_iter()
        .find(|identity| !held.contains(&identity.as_str()))
    {
        return Check::new(
            subject,
            Outcome::Fail,
            format!("no valid certificate for {missing} (expired, or never issued)"),
        )
        .hint(
            "its pods' mutual TLS fails; the agent gets certificates from the controller's \
             CA: see the controller's check and the agent's log",
        );
    }
    worst
}

fn soonest(certs: &[Certificate]) -> Option<&Certificate> {
    certs.iter().min_by_key(|cert| cert.not_after)
}

fn seconds(unix: u64) -> i64 {
    i64::try_from(unix).unwrap_or(i64::MAX)
}

fn rank(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Pass => 0,
        Outcome::Warn => 1,
        Outcome::Fail => 2,
    }
}

/// What `check --pre` looks at on this machine.
#[derive(Debug)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    pub btf: bool,
    /// Where cgroup v2 is mounted, if it is.
    pub cgroup2: Option<String>,
    pub bpffs: bool,
    /// The primary CNI's configuration file weft chains itself into, or why there is
    /// none.
    pub cni: Result<String, String>,
}

impl Default for Machine {
    fn default() -> Self {
        Self {
            kernel: String::new(),
            btf: false,
            cgroup2: None,
            bpffs: false,
            cni: Err("not looked for".to_owned()),
        }
    }
}

/// Where the container runtime reads CNI configuration on a node.
const CNI_CONF_DIR: &str = "/etc/cni/net.d";

/// The checks of this machine before an install.
pub fn machine() -> Checks {
    let facts = Machine {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        cgroup2: weft_cluster::cgroup2_mount()
            .ok()
            .map(|dir| dir.display().to_string()),
        bpffs: weft_cluster::bpffs_mounted().unwrap_or(false),
        cni: weft_cni::install::primary(std::path::Path::new(CNI_CONF_DIR))
            .map(|path| path.display().to_string())
            .map_err(|err| err.to_string()),
    };
    machine_checks(&facts)
}

/// What the API server says of a node, for `check --pre` on a cluster.
#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    /// `status.nodeInfo.kernelVersion`.
    pub kernel: String,
    /// `status.nodeInfo.operatingSystem`.
    pub os: String,
    /// Its `Ready` condition: `Err` with the kubelet's message when it is not (a node
    /// without a working CNI is not ready, and says so).
    pub ready: Result<(), String>,
}

/// The checks of a cluster's nodes before an install, from what the API server says
/// of them: each is ready (a node without a working primary CNI is not) and runs
/// Linux with a kernel new enough. (BTF, cgroup v2 and bpffs are not in the API: the
/// agent checks them at start, and is not ready without them.)
pub fn nodes(nodes: &[NodeInfo]) -> Checks {
    let checks = nodes
        .iter()
        .map(|node| {
            let subject = format!("node {}", node.name);
            if let Err(why) = &node.ready {
                return Check::new(subject, Outcome::Fail, format!("not ready: {why}")).hint(
                    "weft chains itself after the cluster's CNI and needs ready nodes: \
                     `kubectl describe node` says what the kubelet lacks",
                );
            }
            if node.os != "linux" {
                return Check::new(
                    subject,
                    Outcome::Fail,
                    format!("runs {:?}, not Linux", node.os),
                )
                .hint(
                    "weft's agent runs on Linux nodes only; its DaemonSet tolerates every \
                     taint, so keep it off this node with a nodeAffinity",
                );
            }
            kernel(subject, &node.kernel)
        })
        .collect();
    Checks { checks }
}

/// Whether kernel `release` is new enough, as check `subject`.
fn kernel(subject: String, release: &str) -> Check {
    let (major, minor) = MINIMUM_KERNEL;
    match kernel_version(release) {
        Some(version) if version >= MINIMUM_KERNEL => {
            Check::new(subject, Outcome::Pass, format!("kernel {release}"))
        }
        _ => Check::new(
            subject,
            Outcome::Fail,
            format!("kernel {release:?} is older than {major}.{minor}"),
        )
        .hint(format!(
            "weft's programs need Linux {major}.{minor} or later (TCX links)"
        )),
    }
}

/// The checks of a machine with `facts`.
pub fn machine_checks(facts: &Machine) -> Checks {
    let kernel = kernel("kernel".to_owned(), &facts.kernel);
    let btf = if facts.btf {
        Check::new("btf", Outcome::Pass, "/sys/kernel/btf/vmlinux is there")
    } else {
        Check::new("btf", Outcome::Fail, "/sys/kernel/btf/vmlinux is missing")
            .hint("use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    };
    let cgroup = match &facts.cgroup2 {
        Some(dir) => Check::new("cgroup v2", Outcome::Pass, format!("mounted at {dir}")),
        None => Check::new(
            "cgroup v2",
            Outcome::Fail,
            "no cgroup2 hierarchy is mounted",
        )
        .hint("boot with systemd.unified_cgroup_hierarchy=1"),
    };
    let cni = match &facts.cni {
        Ok(path) => Check::new(
            "cni",
            Outcome::Pass,
            format!("primary configuration {path}"),
        ),
        Err(why) => Check::new("cni", Outcome::Fail, why.clone())
            .hint("install the cluster's CNI first: weft chains itself after it"),
    };
    let bpffs = if facts.bpffs {
        Check::new("bpffs", Outcome::Pass, "mounted at /sys/fs/bpf")
    } else {
        Check::new("bpffs", Outcome::Fail, "nothing is mounted at /sys/fs/bpf")
            .hint("mount -t bpf bpf /sys/fs/bpf (systemd mounts it on most distributions)")
    };
    Checks {
        checks: vec![kernel, btf, cgroup, bpffs, cni],
    }
}

/// `6.18.0-1-amd64` → `(6, 18)`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{
        Leadership,
        tests::{certificate, healthy},
    };

    /// The identity of node0's pod in [`healthy`].
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn outcomes(checks: &Checks) -> Vec<(String, Outcome)> {
        checks
            .checks
            .iter()
            .map(|check| (check.subject.clone(), check.outcome))
            .collect()
    }

    fn find<'a>(checks: &'a Checks, subject: &str) -> &'a Check {
        checks
            .checks
            .iter()
            .find(|check| check.subject == subject)
            .unwrap_or_else(|| panic!("no check {subject}: {checks:#?}"))
    }

    #[test]
    fn a_healthy_mesh_passes_every_check() {
        let checks = mesh(&healthy());
        assert!(checks.passed(), "{checks:#?}");
        assert!(
            outcomes(&checks)
                .iter()
                .all(|(_, outcome)| *outcome == Outcome::Pass)
        );
        assert_eq!(
            find(&checks, "certificates node0").message,
            "1 valid; the soonest expires in 12h0m"
        );
        assert!(checks.table().ends_with("every check passed\n"));
    }

    fn lease(holder: Option<&str>, renewed_unix: Option<i64>) -> Leadership {
        Leadership {
            holder: holder.map(str::to_owned),
            renewed_unix,
            duration_seconds: Some(15),
        }
    }

    #[test]
    fn a_leader_that_renews_passes_and_a_lone_controller_has_no_leader_check() {
        assert!(
            mesh(&healthy())
                .checks
                .iter()
                .all(|check| check.subject != "leader")
        );
        let mut snapshot = healthy();
        // Renewed a little "after" our clock: the holder's clock runs ahead.
        snapshot.leadership = Some(Ok(lease(Some("c-1"), Some(1_000_000 + 3))));
        let checks = mesh(&snapshot);
        let check = find(&checks, "leader");
        assert_eq!(
            (check.outcome, check.message.as_str()),
            (Outcome::Pass, "c-1 leads")
        );
    }

    #[test]
    fn each_fault_fails_or_warns_the_check_it_belongs_to() {
        type Fault = fn(&mut Snapshot);
        let cases: [(Fault, &str, Outcome, &str); 13] = [
            (
                |s| s.leadership = Some(Err("forbidden".into())),
                "leader",
                Outcome::Fail,
                "forbidden",
            ),
            (
                |s| s.leadership = Some(Ok(lease(None, None))),
                "leader",
                Outcome::Fail,
                "no controller replica holds the Lease weft-system/weft-controller: nothing \
                 writes objects' status or rotates the CA",
            ),
            (
                |s| s.leadership = Some(Ok(lease(Some("c-0"), Some(1_000_000 - 100)))),
                "leader",
                Outcome::Warn,
                "c-0 last renewed the Lease 100 s ago (it lasts 15 s)",
            ),
            (
                |s| s.nodes[1].ready = Err("503 not ready: programs".into()),
                "agent node1",
                Outcome::Fail,
                "not ready: 503 not ready: programs",
            ),
            (
                |s| s.nodes[1].ready = Err("no answer".into()),
                "agent node1",
                Outcome::Fail,
                "not ready: no answer",
            ),
            (
                |s| {
                    let status = s.controller.as_mut().unwrap();
                    let node = status.nodes.get_mut("node0").unwrap();
                    node.in_sync = false;
                    node.acked_generation = Some(2);
                    node.last_nack = Some(("v9".into(), "bad route".into()));
                },
                "config node0",
                Outcome::Fail,
                "serves generation 2, the controller is at 3 (v0); it refused v9: bad route",
            ),
            (
                |s| {
                    s.controller
                        .as_mut()
                        .unwrap()
                        .nodes
                        .get_mut("node1")
                        .unwrap()
                        .streams = 0
                },
                "config node1",
                Outcome::Fail,
                "the agent is not subscribed to the controller",
            ),
            (
                |s| {
                    s.nodes[0].certs = Ok(vec![
                        serde_json::from_value(certificate(WEB, 999_000)).unwrap(),
                    ])
                },
                "certificates node0",
                Outcome::Fail,
                "spiffe://cluster.local/ns/shop/sa/web expired 16m40s ago",
            ),
            (
                |s| {
                    s.nodes[0].certs = Ok(vec![
                        serde_json::from_value(certificate(WEB, 1_000_000 + 3_600)).unwrap(),
                    ])
                },
                "certificates node0",
                Outcome::Warn,
                "spiffe://cluster.local/ns/shop/sa/web expires in 1h0m and is not renewed yet",
            ),
            (
                |s| s.nodes[0].certs = Ok(Vec::new()),
                "certificates node0",
                Outcome::Fail,
                "no valid certificate for spiffe://cluster.local/ns/shop/sa/web (expired, or never issued)",
            ),
            (
                |s| {
                    s.controller.as_mut().unwrap().ca.as_mut().unwrap().anchors[0].not_after =
                        1_000_000 + 86_400
                },
                "ca",
                Outcome::Warn,
                "root CN=root expires in 1d0h",
            ),
            (
                |s| {
                    let status = s.controller.as_mut().unwrap();
                    status
                        .unread_kinds
                        .insert("HTTPRoute".into(), "not served".into());
                },
                "kind HTTPRoute",
                Outcome::Fail,
                "unread: not served",
            ),
            (
                |s| s.controller = Err("no answer".into()),
                "controller",
                Outcome::Fail,
                "no answer on /status: no answer",
            ),
        ];
        for (fault, subject, outcome, message) in cases {
            let mut snapshot = healthy();
            fault(&mut snapshot);
            let checks = mesh(&snapshot);
            let check = find(&checks, subject);
            assert_eq!((check.outcome, check.message.as_str()), (outcome, message));
            assert!(check.hint.is_some(), "{check:?} says what to do");
            assert_eq!(checks.passed(), outcome != Outcome::Fail, "{subject}");
        }
    }

    #[test]
    fn machines_are_checked_for_what_the_programs_need() {
        let good = Machine {
            kernel: "6.18.0-1-amd64".into(),
            btf: true,
            cgroup2: Some("/sys/fs/cgroup".into()),
            bpffs: true,
            cni: Ok("/etc/cni/net.d/10-calico.conflist".into()),
        };
        assert!(machine_checks(&good).passed());
        let old = Machine {
            kernel: "5.15.0-91-generic".into(),
            ..good
        };
        let checks = machine_checks(&old);
        assert!(!checks.passed());
        assert_eq!(find(&checks, "kernel").outcome, Outcome::Fail);
        let bare = machine_checks(&Machine::default());
        assert_eq!(
            outcomes(&bare)
                .iter()
                .filter(|(_, o)| *o == Outcome::Fail)
                .count(),
            5
        );
    }

    #[test]
    fn a_clusters_nodes_are_checked_from_what_the_api_server_says() {
        let node = |name: &str, kernel: &str, os: &str| NodeInfo {
            name: name.into(),
            kernel: kernel.into(),
            os: os.into(),
            ready: Ok(()),
        };
        let no_cni = NodeInfo {
            ready: Err("container runtime network not ready: cni plugin not initialized".into()),
            ..node("e", "6.8.0", "linux")
        };
        let checks = nodes(&[
            node("a", "6.8.0-1015-aws", "linux"),
            node("b", "5.15.0-91-generic", "linux"),
            node("c", "10.0.20348.2113", "windows"),
            node("d", "", "linux"),
            no_cni,
        ]);
        let summary: Vec<(&str, Outcome, &str)> = checks
            .checks
            .iter()
            .map(|check| {
                (
                    check.subject.as_str(),
                    check.outcome,
                    check.message.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("node a", Outcome::Pass, "kernel 6.8.0-1015-aws"),
                (
                    "node b",
                    Outcome::Fail,
                    "kernel \"5.15.0-91-generic\" is older than 6.6"
                ),
                ("node c", Outcome::Fail, "runs \"windows\", not Linux"),
                ("node d", Outcome::Fail, "kernel \"\" is older than 6.6"),
                (
                    "node e",
                    Outcome::Fail,
                    "not ready: container runtime network not ready: cni plugin not initialized"
                ),
            ]
        );
        assert!(!checks.passed());
        assert!(nodes(&[node("a", "6.6.1", "linux")]).passed());
    }
}
