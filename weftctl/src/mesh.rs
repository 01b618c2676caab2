//! What weftctl reads: a [`Mesh`] is where the controller's and the agents' endpoints
//! answer, and a [`Snapshot`] is everything they said at one moment, which the
//! commands then decide over.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::SystemTime,
};

use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_api::{admin::Certificate, exposition};
use weft_cluster::AgentPort;
use weft_controller::admin::StatusReport;

/// An agent endpoint weftctl reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/healthz/ready`: 200 once programs, configuration and certificates are in.
    Ready,
    /// `/metrics`, Prometheus text.
    Metrics,
    /// `/config_dump`: the mesh model the agent runs, its subscription, its pods.
    ConfigDump,
    /// `/certs`: the workload certificates it holds.
    Certs,
}

impl Endpoint {
    /// The agent's port that serves it, and its path.
    pub fn port_and_path(self) -> (AgentPort, &'static str) {
        match self {
            Endpoint::Ready => (AgentPort::Ready, "/healthz/ready"),
            Endpoint::Metrics => (AgentPort::Metrics, "/metrics"),
            Endpoint::ConfigDump => (AgentPort::Admin, "/config_dump"),
            Endpoint::Certs => (AgentPort::Admin, "/certs"),
        }
    }
}

/// A connection to an agent's admin port, however it was made (inside a node's
/// network namespace, through a port-forward).
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

/// Which controller replica leads, by the Lease they elect a leader with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leadership {
    pub holder: Option<String>,
    /// When the holder last renewed it (by its clock).
    pub renewed_unix: Option<i64>,
    pub duration_seconds: Option<i64>,
}

/// A mesh weftctl can read.
pub trait Mesh {
    /// The nodes that should each run an agent.
    fn nodes(&self) -> Vec<String>;
    /// The body of a 200 from the controller's admin endpoint `path` (with its query),
    /// or what it answered instead.
    fn controller_get(&self, path: &str) -> Result<String, String>;
    /// The body of a 200 from `node`'s agent at `endpoint`, or what it answered instead.
    fn agent_get(&self, node: &str, endpoint: Endpoint) -> Result<String, String>;
    /// A connection to `node`'s agent admin port, for its gRPC streams; called on an
    /// async runtime.
    fn agent_connect(&self, node: &str) -> Result<Box<dyn Connection>, String>;
    /// The objects the controller reads now, as manifests `analyze` reads: (a name
    /// for where they came from, their text).
    fn manifests(&self) -> anyhow::Result<Vec<(PathBuf, String)>>;
    /// Who leads the controller's replicas, where they elect a leader (`None` where one
    /// controller runs alone, as in the local cluster).
    fn leadership(&self) -> Option<Result<Leadership, String>> {
        None
    }
}

/// What the controller and every agent said, and when.
#[derive(Debug)]
pub struct Snapshot {
    pub now: SystemTime,
    pub controller: Result<StatusReport, String>,
    pub leadership: Option<Result<Leadership, String>>,
    pub nodes: Vec<NodeSnapshot>,
}

/// What one node's agent said.
#[derive(Debug)]
pub struct NodeSnapshot {
    pub name: String,
    pub ready: Result<(), String>,
    pub certs: Result<Vec<Certificate>, String>,
    pub dump: Result<Value, String>,
    pub metrics: Result<String, String>,
}

impl Snapshot {
    pub fn take(mesh: &dyn Mesh, now: SystemTime) -> Self {
        let nodes = mesh
            .nodes()
            .into_iter()
            .map(|name| {
                let get = |endpoint| mesh.agent_get(&name, endpoint);
                let json = |endpoint| {
                    get(endpoint).and_then(|body| {
                        serde_json::from_str(&body).map_err(|err| format!("not JSON: {err}"))
                    })
                };
                NodeSnapshot {
                    ready: get(Endpoint::Ready).map(drop),
                    certs: json(Endpoint::Certs)
                        .and_then(|value| serde_json::from_value(value).map_err(|e| e.to_string())),
                    dump: json(Endpoint::ConfigDump),
                    metrics: get(Endpoint::Metrics),
                    name,
                }
            })
            .collect();
        let controller = mesh.controller_get("/status").and_then(|body| {
            serde_json::from_str(&body).map_err(|err| format!("unreadable /status: {err}"))
        });
        Self {
            now,
            controller,
            leadership: mesh.leadership(),
            nodes,
        }
    }

    /// Seconds since the Unix epoch, now.
    pub fn unix_now(&self) -> i64 {
        self.now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            })
    }

    /// Every workload of the mesh, as the agents know them (each knows all).
    pub fn workloads(&self) -> Vec<&Value> {
        self.any_dump()
            .and_then(|dump| dump["mesh"]["workloads"].as_array())
            .map(|workloads| workloads.iter().collect())
            .unwrap_or_default()
    }

    /// Whether the mesh has service `<namespace>/<name>`.
    pub fn has_service(&self, namespaced: &str) -> bool {
        self.any_dump()
            .and_then(|dump| dump["mesh"]["services"].as_array())
            .into_iter()
            .flatten()
            .any(|service| {
                format!(
                    "{}/{}",
                    service["namespace"].as_str().unwrap_or_default(),
                    service["name"].as_str().unwrap_or_default()
                ) == namespaced
            })
    }

    /// The configuration of a node whose agent answered.
    pub fn any_dump(&self) -> Option<&Value> {
        self.nodes.iter().find_map(|node| node.dump.as_ref().ok())
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&NodeSnapshot> {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.nodes.iter().map(|node| node.name.as_str()).collect();
                anyhow::anyhow!("no node {name}; the nodes are {}", names.join(", "))
            })
    }
}

impl NodeSnapshot {
    /// Packets and connections the node's kernel programs dropped, by reason
    /// (`weft_ebpf_events_total{event="inbound_dropped_<reason>"}`).
    pub fn kernel_drops(&self) -> BTreeMap<String, u64> {
        let Ok(metrics) = &self.metrics else {
            return BTreeMap::new();
        };
        exposition::samples(metrics, "weft_ebpf_events_total")
            .into_iter()
            .filter_map(|(labels, value)| {
                let reason = labels.get("event")?.strip_prefix("inbound_dropped_")?;
                // Counters are whole numbers.
                Some((reason.to_owned(), value as u64))
            })
            .collect()
    }

    /// The identities the node's agent needs a certificate for: those of the meshed
    /// workloads its configuration places on the node.
    pub fn identities(&self) -> BTreeSet<String> {
        let Ok(dump) = &self.dump else {
            return BTreeSet::new();
        };
        let trust_domain = dump["mesh"]["trustDomain"]
            .as_str()
            .unwrap_or("cluster.local");
        dump["mesh"]["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|workload| {
                workload["node"] == self.name.as_str() && workload["optedOut"] != true
            })
            .filter_map(|workload| {
                Some(format!(
                    "spiffe://{trust_domain}/ns/{}/sa/{}",
                    workload["namespace"].as_str()?,
                    workload["serviceAccount"].as_str()?
                ))
            })
            .collect()
    }

    /// The pods the agent enrolled, with their namespace, name and mode.
    pub fn pods(&self) -> Vec<(String, String, String)> {
        let Ok(dump) = &self.dump else {
            return Vec::new();
        };
        dump["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                let text = |value: &Value| value.as_str().unwrap_or("-").to_owned();
                (
                    text(&entry["pod"]["namespace"]),
                    text(&entry["pod"]["name"]),
                    text(&entry["attachment"]["mode"]),
                )
            })
            .collect()
    }
}

#[cfg(test)]
pub mod tests {
    //! A mesh made of fixed answers, for the commands' tests.

    use std::time::Duration;

    use super::*;

    /// A snapshot of two healthy nodes at 1,000,000 s after the epoch: node0 runs a
    /// STRICT pod with a certificate valid for 12 more hours, node1 nothing.
    pub fn healthy() -> Snapshot {
        let status = serde_json::json!({
            "generation": 3,
            "compiled_sources": {},
            "objects": {},
            "nodes": {
                "node0": node_status("v0"),
                "node1": node_status("v1"),
            },
            "ca": {
                "store": "directory /ca",
                "signing_root": "CN=root",
                "propagating": false,
                "anchors": [{"subject": "CN=root", "not_after": 1_000_000 + 400 * 86_400, "retire_at": null}],
                "error": null,
            },
            "policies": [],
        });
        let node = |name: &str, certs: Value, pods: Value| NodeSnapshot {
            name: name.to_owned(),
            ready: Ok(()),
            certs: Ok(serde_json::from_value(certs).unwrap()),
            dump: Ok(serde_json::json!({
                "pods": pods,
                "mesh": {
                    "trustDomain": "cluster.local",
                    "workloads": [{"namespace": "shop", "name": "web-1", "node": "node0", "serviceAccount": "web"}],
                },
            })),
            metrics: Ok(
                "weft_ebpf_events_total{event=\"inbound_dropped_strict\"} 2\n\
                         weft_ebpf_events_total{event=\"redirected\"} 7\n"
                    .to_owned(),
            ),
        };
        Snapshot {
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            controller: Ok(serde_json::from_value(status).unwrap()),
            leadership: None,
            nodes: vec![
                node(
                    "node0",
                    serde_json::json!([certificate(
                        "spiffe://cluster.local/ns/shop/sa/web",
                        1_000_000 + 12 * 3_600
                    )]),
                    serde_json::json!([{
                        "pod": {"namespace": "shop", "name": "web-1"},
                        "attachment": {"mode": "STRICT"},
                    }]),
                ),
                node("node1", serde_json::json!([]), serde_json::json!([])),
            ],
        }
    }

    /// A certificate of `identity` issued a day before it expires at `not_after`
    /// (and backdated, as weft's CA does).
    pub fn certificate(identity: &str, not_after: u64) -> Value {
        serde_json::json!({
            "identity": identity,
            "serial": "1f",
            "not_before": not_after - 86_400 - 300,
            "not_after": not_after,
            "issuer": "CN=root",
            "root": "CN=root",
        })
    }

    fn node_status(version: &str) -> Value {
        serde_json::json!({
            "streams": 1,
            "agent_version": "0.1.0",
            "version": version,
            "generation": 3,
            "acked_version": version,
            "acked_generation": 3,
            "in_sync": true,
            "last_nack": null,
            "last_change": 999_000.0,
        })
    }

    #[test]
    fn nodes_report_their_pods_and_kernel_drops() {
        let snapshot = healthy();
        let node0 = snapshot.node("node0").unwrap();
        assert_eq!(
            node0.pods(),
            [("shop".into(), "web-1".into(), "STRICT".into())]
        );
        assert_eq!(
            node0.kernel_drops(),
            BTreeMap::from([("strict".to_owned(), 2)])
        );
        assert_eq!(
            node0.identities(),
            BTreeSet::from(["spiffe://cluster.local/ns/shop/sa/web".to_owned()])
        );
        assert!(snapshot.node("node1").unwrap().identities().is_empty());
        let missing = snapshot.node("node9").unwrap_err().to_string();
        assert!(missing.contains("node0, node1"), "{missing}");
    }
}
