//! The cluster's topology: what `cargo xtask cluster status` prints and what the
//! cluster keeps in its state directory. The schema is documented in README.md.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub name: String,
    /// The namespace holding the bridge that joins the nodes.
    pub fabric_netns: String,
    /// Address range of the nodes on the fabric.
    pub node_cidr: String,
    /// The cluster's cgroup; everything it runs lives below it.
    pub cgroup: PathBuf,
    /// The cluster's bpffs directory; each node pins below it.
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    /// When set, pods are enrolled through `weft-cni` from this directory, as a
    /// container runtime runs a chained CNI plugin.
    pub cni_bin_dir: Option<PathBuf>,
    /// The user's manifests (Kubernetes YAML files or directories: meshed namespaces,
    /// services, weft's policies, routes) once the cluster has a mesh.
    pub manifests: Option<Vec<PathBuf>>,
    /// Destination ports never captured (the controller's `--exclude-port`).
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    /// Extra arguments of `weft-controller run`, such as `--cert-ttl 10s`; the
    /// controller gets them every time it starts.
    #[serde(default)]
    pub controller_args: Vec<String>,
    /// Extra arguments of `weft-agent run`, such as `--workers 1`; every agent the
    /// cluster starts gets them.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// The agents' `--drain-timeout` in milliseconds: how long an agent lets open
    /// connections finish after SIGTERM, and so how long stopping one may take: the
    /// agent DaemonSet's `WEFT_DRAIN_TIMEOUT`, unless `agent_args` set another.
    #[serde(default = "default_agent_drain_timeout_ms")]
    pub agent_drain_timeout_ms: u64,
    /// The cluster's own objects (nodes and pods), as the controller reads them.
    pub objects: PathBuf,
    /// The controller's address on the fabric: config stream on 15010, `/status` and
    /// metrics on 15014.
    pub controller_address: Ipv4Addr,
    /// The controller, while it runs.
    pub controller: Option<NodeProcess>,
    /// Each node's token for the controller: `<dir>/<node>.token`.
    pub node_tokens: PathBuf,
    /// The mesh CA's directory (the controller's `--ca-dir`: `tls.crt`, `tls.key`,
    /// `ca.crt`, `previous-*` during a rotation), created by the controller on its first
    /// start.
    pub ca_dir: PathBuf,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    /// The node's address on the fabric.
    pub ip: Ipv4Addr,
    /// The node's zone: its Node object's label `topology.kubernetes.io/zone`. None
    /// until [`crate::Cluster::set_zone`] gives it one.
    #[serde(default)]
    pub zone: Option<String>,
    /// Its Node object's annotations, such as `weft.dev/hbone-address`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The range this node gives its pods.
    pub pod_cidr: String,
    /// The pods' default gateway: the node side of every pod's veth.
    pub pod_gateway: Ipv4Addr,
    pub cgroup: PathBuf,
    /// Parent cgroup of the node's pods (where capture programs attach).
    pub pods_cgroup: PathBuf,
    /// Cgroup for the node's own processes, such as the agent.
    pub system_cgroup: PathBuf,
    /// The node's bpffs pin directory.
    pub bpffs: PathBuf,
    /// The node's run directory (a node's `/run/weft`), holding the agent's CNI socket
    /// and state directory.
    pub run_dir: PathBuf,
    /// The node agent's CNI socket.
    pub agent_socket: PathBuf,
    /// The node's CNI network configuration directory (a node's `/etc/cni/net.d`): a
    /// list whose first plugin the cluster plays itself, which the agent chains
    /// weft-cni into.
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin directory (a node's `/opt/cni/bin`), where the agent
    /// places weft-cni.
    pub cni_plugin_dir: PathBuf,
    /// The node agent's state directory.
    pub agent_state_dir: PathBuf,
    /// Where the node agent writes flow events (JSON lines).
    pub flow_log: PathBuf,
    /// The node's agent, while one runs.
    pub agent: Option<NodeProcess>,
}

/// A process the cluster runs on a node, outside its pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProcess {
    pub command: Vec<String>,
    pub pid: u32,
    pub log: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub cgroup: PathBuf,
    /// The node side of the pod's veth pair, in the node's namespace.
    pub host_veth: String,
    /// The pod's command line (empty when the pod only has a network).
    pub command: Vec<String>,
    /// Process id of the command, when there is one.
    pub pid: Option<u32>,
    /// Where the command's stdout and stderr go.
    pub log: PathBuf,
}

/// The agent DaemonSet's `WEFT_DRAIN_TIMEOUT` (30 s), which the agents get.
pub(crate) const DEFAULT_AGENT_DRAIN_TIMEOUT_MS: u64 = 30_000;

fn default_agent_drain_timeout_ms() -> u64 {
    DEFAULT_AGENT_DRAIN_TIMEOUT_MS
}

impl Topology {
    pub fn node_names(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|node| node.name == name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|pod| pod.namespace == namespace && pod.name == name)
    }
}
