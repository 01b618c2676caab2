//! Bringing a cluster up and down, and adding and removing its pods.
//!
//! Addressing: node `i` is `10.99.0.(i+1)/24` on the fabric bridge and owns pod range
//! `10.244.i.0/24`. Pods get `/32` addresses and a default route via `10.244.i.1`,
//! which every host-side veth of that node carries (the point-to-point layout of
//! Calico-style CNIs); the node routes each pod's `/32` to its veth and every other
//! node's range via that node's fabric address.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs::{self, File, OpenOptions},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    ClusterError, Layout, NodeInfo, NodeProcess, PodInfo, Topology, agent, cni, controller, host,
    layout::validate_dns_label, objects, topology::DEFAULT_AGENT_DRAIN_TIMEOUT_MS,
};

/// The controller's address on the fabric bridge.
const CONTROLLER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
/// The controller's config stream and status ports.
pub(crate) const CONTROLLER_GRPC_PORT: u16 = 15010;
pub(crate) const CONTROLLER_ADMIN_PORT: u16 = 15014;
/// The controller's namespace: its certificate for the agents is that of
/// `spiffe://<trust domain>/ns/<this>/sa/weft-controller`.
pub(crate) const CONTROL_PLANE_NAMESPACE: &str = "weft-system";
/// The agent's process name (`comm`).
const AGENT_PROCESS: &str = "weft-agent";
/// The name `weft-agent hold` gives itself.
const HOLDER_PROCESS: &str = "weft-hold";
/// The agent's HTTP ports, on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentPort {
    /// The admin endpoint (`/config_dump`, `/certs`, …), on the node's localhost only.
    Admin = 15000,
    /// Prometheus metrics.
    Metrics = 15020,
    /// Readiness (`/healthz/ready`).
    Ready = 15021,
}

/// How long after its drain deadline a stopping agent may take to exit before it is
/// killed.
const AGENT_STOP_MARGIN: Duration = Duration::from_secs(5);

/// Upper bound on nodes: each owns a /24 of 10.244.0.0/16 and a fabric address.
pub const MAX_NODES: usize = 64;
/// Longest pod name accepted (a DNS label, short enough for every path it appears in).
const MAX_POD_NAME: usize = 63;
/// Longest namespace name, as in Kubernetes.
const MAX_NAMESPACE: usize = 63;
/// Longest zone name (a label value, as in Kubernetes).
const MAX_ZONE: usize = 63;

fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, index as u8 + 1)
}

fn pod_gateway(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, index as u8, 1)
}

/// What to run as a pod.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The pod's command; empty for a pod that only has a network.
    pub command: Vec<String>,
    /// Extra environment for the command, beside the `POD_*` variables every pod gets.
    pub env: Vec<(String, String)>,
}

impl PodSpec {
    /// A pod named `name` in namespace `default` on `node`, running `command`.
    pub fn new(name: &str, node: &str, command: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            node: node.to_owned(),
            service_account: "default".to_owned(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            command: command.iter().map(|arg| (*arg).to_owned()).collect(),
            env: Vec::new(),
        }
    }
}

/// A running local cluster.
#[derive(Debug)]
pub struct Cluster {
    layout: Layout,
    topology: Topology,
}

impl Cluster {
    /// Creates cluster `name` with `nodes` nodes. On failure whatever was created is
    /// removed again before the error is returned.
    pub fn up(name: &str, nodes: usize) -> Result<Self, ClusterError> {
        if !host::is_root() {
            return Err(ClusterError::NotRoot);
        }
        let layout = Layout::new(name)?;
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(ClusterError::NodeCount {
                asked: nodes,
                max: MAX_NODES,
            });
        }
        let exists = layout.state_dir().exists()
            || layout.cgroup().exists()
            || !host::netns_with_prefix(&layout.netns_prefix())?.is_empty();
        if exists {
            return Err(ClusterError::Exists(name.to_owned()));
        }
        let topology = Topology {
            name: name.to_owned(),
            fabric_netns: layout.fabric_netns(),
            node_cidr: "10.99.0.0/24".to_owned(),
            cgroup: layout.cgroup(),
            bpffs: layout.bpffs(),
            state_dir: layout.state_dir(),
            cni_bin_dir: None,
            manifests: None,
            exclude_ports: Vec::new(),
            controller_args: Vec::new(),
            agent_args: Vec::new(),
            agent_drain_timeout_ms: DEFAULT_AGENT_DRAIN_TIMEOUT_MS,
            objects: layout.state_dir().join("objects.json"),
            controller_address: CONTROLLER_ADDRESS,
            controller: None,
            node_tokens: layout.state_dir().join("control-plane").join("tokens"),
            ca_dir: layout.ca_dir(),
            nodes: (0..nodes)
                .map(|index| {
                    let node = format!("node{index}");
                    NodeInfo {
                        netns: layout.node_netns(&node),
                        ip: node_ip(index),
                        zone: None,
                        annotations: BTreeMap::new(),
                        pod_cidr: format!("10.244.{index}.0/24"),
                        pod_gateway: pod_gateway(index),
                        cgroup: layout.node_cgroup(&node),
                        pods_cgroup: layout.pods_cgroup(&node),
                        system_cgroup: layout.system_cgroup(&node),
                        bpffs: layout.node_bpffs(&node),
                        run_dir: layout.node_state(&node),
                        agent_socket: layout.node_state(&node).join("cni.sock"),
                        cni_conf_dir: layout.node_state(&node).join("cni").join("net.d"),
                        cni_plugin_dir: layout.node_state(&node).join("cni").join("bin"),
                        agent_state_dir: layout.node_state(&node).join("agent"),
                        flow_log: layout.node_state(&node).join("flows.jsonl"),
                        agent: None,
                        name: node,
                    }
                })
                .collect(),
            pods: Vec::new(),
        };
        let cluster = Self { layout, topology };
        if let Err(err) = cluster.build() {
            if let Err(cleanup) = down(name) {
                log::warn!("cleaning up after the failed start also failed: {cleanup}");
            }
            return Err(err);
        }
        Ok(cluster)
    }

    fn build(&self) -> Result<(), ClusterError> {
        let layout = &self.layout;
        host::create_dir(&layout.state_dir().join("logs"))?;
        self.save()?;
        host::ensure_bpffs()?;

        let fabric = layout.fabric_netns();
        host::ip(&["netns", "add", &fabric])?;
        host::ip_in(&fabric, &["link", "set", "lo", "up"])?;
        host::ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        host::ip_in(&fabric, &["link", "set", "br0", "up"])?;
        // The control plane sits on the fabric, reachable from every node.
        host::ip_in(
            &fabric,
            &[
                "addr",
                "add",
                &format!("{CONTROLLER_ADDRESS}/24"),
                "dev",
                "br0",
            ],
        )?;
        host::create_dir(&layout.control_plane_cgroup())?;

        for (index, node) in self.topology.nodes.iter().enumerate() {
            host::create_dir(&node.pods_cgroup)?;
            host::create_dir(&node.system_cgroup)?;
            host::create_dir(&node.bpffs)?;
            host::create_dir(&node.agent_state_dir)?;
            host::create_dir(&node.cni_plugin_dir)?;
            cni::write_primary(&node.cni_conf_dir)?;

            let uplink = format!("n{index}");
            host::ip(&["netns", "add", &node.netns])?;
            host::add_veth(&fabric, &uplink, &node.netns)?;
            host::ip_in(&fabric, &["link", "set", &uplink, "master", "br0", "up"])?;
            host::ip_in(&node.netns, &["link", "set", "lo", "up"])?;
            host::ip_in(
                &node.netns,
                &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
            )?;
            host::ip_in(&node.netns, &["link", "set", "eth0", "up"])?;
            host::sysctl_in(&node.netns, "net.ipv4.ip_forward", "1")?;
        }
        for node in &self.topology.nodes {
            for peer in self
                .topology
                .nodes
                .iter()
                .filter(|peer| peer.name != node.name)
            {
                host::ip_in(
                    &node.netns,
                    &["route", "add", &peer.pod_cidr, "via", &peer.ip.to_string()],
                )?;
            }
        }
        Ok(())
    }

    /// Opens the running cluster `name`.
    pub fn open(name: &str) -> Result<Self, ClusterError> {
        let layout = Layout::new(name)?;
        let topology = load(&layout)?;
        Ok(Self { layout, topology })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The topology as of the last change made through this handle or [`Self::refresh`].
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Rereads the topology, which other processes may have changed.
    pub fn refresh(&mut self) -> Result<(), ClusterError> {
        self.topology = load(&self.layout)?;
        Ok(())
    }

    /// Adds a pod: its namespace, veth pair, address, routes and cgroup, then starts
    /// its command (if any) inside them, in the background, logging to [`PodInfo::log`].
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<PodInfo, ClusterError> {
        validate_dns_label("pod name", &spec.name, MAX_POD_NAME)?;
        validate_dns_label("namespace", &spec.namespace, MAX_NAMESPACE)?;
        validate_dns_label("service account", &spec.service_account, MAX_NAMESPACE)?;
        let _lock = self.lock()?;
        self.refresh()?;
        let pod_key = format!("{}/{}", spec.namespace, spec.name);
        if self.topology.pod(&spec.namespace, &spec.name).is_some() {
            return Err(ClusterError::PodExists {
                cluster: self.topology.name.clone(),
                pod: pod_key,
            });
        }
        let (node_index, node) = self
            .topology
            .nodes
            .iter()
            .enumerate()
            .find(|(_, node)| node.name == spec.node)
            .ok_or_else(|| ClusterError::NoSuchNode {
                cluster: self.topology.name.clone(),
                node: spec.node.clone(),
            })?;
        let taken: Vec<Ipv4Addr> = self
            .topology
            .pods
            .iter()
            .filter(|pod| pod.node == node.name)
            .map(|pod| pod.ip)
            .collect();
        let ip = (2..=254)
            .map(|host| Ipv4Addr::new(10, 244, node_index as u8, host))
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| ClusterError::NodeFull {
                node: node.name.clone(),
            })?;
        let mut pod = PodInfo {
            netns: self.layout.pod_netns(&spec.namespace, &spec.name),
            ip,
            cgroup: self
                .layout
                .pod_cgroup(&node.name, &spec.namespace, &spec.name),
            host_veth: format!("wv{}", ip.octets()[3]),
            log: self.layout.pod_log(&spec.namespace, &spec.name),
            name: spec.name,
            namespace: spec.namespace,
            node: node.name.clone(),
            service_account: spec.service_account,
            labels: spec.labels,
            annotations: spec.annotations,
            command: spec.command,
            pid: None,
        };
        let node = node.clone();
        let cni_on = self.topology.cni_bin_dir.is_some();
        let started = wire_pod(&node, &pod)
            .and_then(|()| match cni_on {
                true => cni::invoke("ADD", &node, &pod),
                false => Ok(()),
            })
            .and_then(|()| {
                if pod.command.is_empty() {
                    return Ok(None);
                }
                let mut command = pod_command(&pod, &pod.command);
                command.envs(spec.env);
                spawn_logged(command, &pod.command, &pod.log).map(Some)
            });
        match started {
            Ok(pid) => pod.pid = pid,
            Err(err) => {
                let cleanup = match cni_on {
                    true => cni::invoke("DEL", &node, &pod),
                    false => Ok(()),
                }
                .and_then(|()| unwire_pod(&node, &pod));
                if let Err(cleanup) = cleanup {
                    log::warn!("removing the half-made pod {pod_key} failed: {cleanup}");
                }
                return Err(err);
            }
        }
        self.topology.pods.push(pod.clone());
        // As in Kubernetes, the pod object shows its address once its network is up.
        self.write_objects()?;
        self.save()?;
        Ok(pod)
    }

    /// Gives the cluster a mesh: `manifests` are the user's Kubernetes YAML files or
    /// directories (meshed namespaces, services, weft's policies, routes), which the
    /// controller reads beside the cluster's own objects and rereads when they change;
    /// connections to `exclude_ports` are never captured. Creates the node tokens on
    /// first use; the controller creates the mesh CA in [`Topology::ca_dir`] on its
    /// first start. A running controller takes new ports when it restarts.
    pub fn set_mesh(
        &mut self,
        manifests: Vec<PathBuf>,
        exclude_ports: Vec<u16>,
    ) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        let manifests = manifests
            .iter()
            .map(|path| fs::canonicalize(path).map_err(ClusterError::io(path)))
            .collect::<Result<Vec<_>, _>>()?;
        host::create_dir(&self.topology.node_tokens)?;
        for node in self.topology.node_names() {
            let token = self.topology.node_tokens.join(format!("{node}.token"));
            if !token.exists() {
                fs::write(&token, host::random_hex(16)?).map_err(ClusterError::io(&token))?;
            }
        }
        self.topology.manifests = Some(manifests);
        self.topology.exclude_ports = exclude_ports;
        self.write_objects()?;
        self.save()
    }

    /// Puts `node` in `zone` (a DNS label such as `zone-a`), or in none: the label
    /// `topology.kubernetes.io/zone` of its Node object, which the controller reads
    /// (at once when the cluster has a mesh), so that clients of a service that
    /// prefers close endpoints prefer those of their own node's zone.
    pub fn set_zone(&mut self, node: &str, zone: Option<&str>) -> Result<(), ClusterError> {
        if let Some(zone) = zone {
            validate_dns_label("zone", zone, MAX_ZONE)?;
        }
        let _lock = self.lock()?;
        self.refresh()?;
        self.node_mut(node)?.zone = zone.map(str::to_owned);
        self.write_objects()?;
        self.save()
    }

    /// Sets annotation `key` of `node`'s Node object to `value`, or removes it: the
    /// controller reads it at once when the cluster has a mesh.
    pub fn annotate_node(
        &mut self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        let annotations = &mut self.node_mut(node)?.annotations;
        match value {
            Some(value) => annotations.insert(key.to_owned(), value.to_owned()),
            None => annotations.remove(key),
        };
        self.write_objects()?;
        self.save()
    }

    /// Waits until the controller has compiled the current content of every file it
    /// reads (the cluster's objects and the user's manifests) and every running agent
    /// has applied the result and holds a certificate from the mesh CA for every
    /// identity of its meshed pods.
    pub fn wait_for_mesh(&self, timeout: Duration) -> Result<(), ClusterError> {
        if self.topology.manifests.is_none() {
            return Err(ClusterError::NoMesh(self.topology.name.clone()));
        }
        if self.topology.controller.is_none() {
            return Err(ClusterError::NoController(self.topology.name.clone()));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let Err(waiting_for) = self.mesh_settled() else {
                return Ok(());
            };
            if Instant::now() > deadline {
                return Err(ClusterError::MeshNotApplied {
                    waiting_for,
                    timeout,
                    logs: self.layout.state_dir().join("logs"),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Ok` once the mesh has settled, otherwise what it still waits for.
    fn mesh_settled(&self) -> Result<(), String> {
        let status = self.controller_status()?;
        let files = self.mesh_files();
        let reported = status["files"].as_array().cloned().unwrap_or_default();
        for path in &files {
            let name = path.display().to_string();
            let digest = fs::read(path).map(|bytes| weft_api::digest::of(&bytes));
            let Ok(digest) = digest else {
                continue;
            };
            let seen = reported.iter().any(|file| {
                file["path"] == name.as_str()
                    && (file["digest"] == digest.as_str()
                        || file["rejected_digest"] == digest.as_str())
            });
            if !seen {
                return Err(format!("the controller to read {name}"));
            }
        }
        for file in &reported {
            let path = file["path"].as_str().unwrap_or_default();
            if status["compiled_sources"][path] != file["digest"] {
                return Err(format!("the controller to compile {path}"));
            }
        }
        let generation = status["generation"].as_u64().unwrap_or(0);
        for node in self
            .topology
            .nodes
            .iter()
            .filter(|node| node.agent.is_some())
        {
            let state = &status["nodes"][&node.name];
            let acked = state["acked_generation"].as_u64().unwrap_or(0);
            if state["in_sync"] != true || acked < generation {
                return Err(format!(
                    "node {} to apply generation {generation} (it serves {acked})",
                    node.name
                ));
            }
            self.certificates_loaded(node)?;
        }
        Ok(())
    }

    /// `Ok` once `node`'s agent holds a certificate for the identity of every pod of
    /// the node that its configuration (already the current one) meshes; it asks the
    /// mesh CA for them on its own schedule.
    fn certificates_loaded(&self, node: &NodeInfo) -> Result<(), String> {
        let dump = self.agent_admin(&node.name, "/config_dump")?;
        let meshed = |pod: &PodInfo| {
            dump["mesh"]["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|workload| {
                    workload["namespace"] == pod.namespace.as_str()
                        && workload["name"] == pod.name.as_str()
                        && workload["optedOut"] != true
                })
        };
        let loaded = self.agent_admin(&node.name, "/certs")?;
        let loaded = loaded.as_array().map(Vec::as_slice).unwrap_or_default();
        for pod in self
            .topology
            .pods
            .iter()
            .filter(|pod| pod.node == node.name && meshed(pod))
        {
            let identity = identity(pod);
            if !loaded
                .iter()
                .any(|cert| cert["identity"] == identity.as_str())
            {
                return Err(format!(
                    "the agent on {} to load the certificate of {identity}",
                    node.name
                ));
            }
        }
        Ok(())
    }

    /// A `GET` of `path` on `node`'s agent admin endpoint (`127.0.0.1:15000` in the
    /// node's namespace: `/certs`, `/config_dump`), as JSON.
    pub fn agent_admin(&self, node: &str, path: &str) -> Result<serde_json::Value, String> {
        let answer = self
            .agent_get(node, AgentPort::Admin, path)
            .map_err(|err| format!("the agent on {node} to answer on {path} ({err})"))?;
        serde_json::from_str(&answer)
            .map_err(|_| format!("the agent on {node} to answer on {path} in JSON"))
    }

    /// A TCP connection to `node`'s agent at `port` on the node's localhost, made from
    /// inside the node's network namespace (where it stays): for a stream, such as the
    /// admin port's gRPC observer.
    pub fn agent_connect(&self, node: &str, port: AgentPort) -> Result<TcpStream, String> {
        let info = self
            .topology
            .node(node)
            .ok_or_else(|| format!("no node {node} in cluster {}", self.topology.name))?;
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port as u16));
        connect_in(&info.netns, address).map_err(|err| {
            format!(
                "no connection to the agent on {node} at port {}: {err}",
                port as u16
            )
        })
    }

    /// A TCP connection to the controller's admin port, made from the fabric where it
    /// runs.
    pub fn controller_connect(&self) -> Result<TcpStream, String> {
        let address = SocketAddr::from((self.topology.controller_address, CONTROLLER_ADMIN_PORT));
        connect_in(&self.topology.fabric_netns, address)
            .map_err(|err| format!("no connection to the controller at {address}: {err}"))
    }

    /// A `GET` of `path` on `node`'s agent at `port` on the node's localhost: the body
    /// of a 200, otherwise the status and body (`503 not ready: …`) or `no answer`.
    pub fn agent_get(&self, node: &str, port: AgentPort, path: &str) -> Result<String, String> {
        let url = format!("http://127.0.0.1:{}{path}", port as u16);
        http_get(self.node_command(node, &curl(&url)))
    }

    /// The controller's `/status`, as JSON.
    pub fn controller_status(&self) -> Result<serde_json::Value, String> {
        self.controller_admin("/status")
    }

    /// What the controller's endpoint `path` (with its query) answers, as JSON.
    pub fn controller_admin(&self, path: &str) -> Result<serde_json::Value, String> {
        let answer = self
            .controller_get(path)
            .map_err(|err| format!("the controller to answer on {path} ({err})"))?;
        serde_json::from_str(&answer)
            .map_err(|_| format!("the controller to answer on {path} in JSON"))
    }

    /// A `GET` of `path` (with its query) on the controller's admin port: the body of a
    /// 200, otherwise the status and body (`400 port: …`) or `no answer`.
    pub fn controller_get(&self, path: &str) -> Result<String, String> {
        let url = format!(
            "http://{}:{CONTROLLER_ADMIN_PORT}{path}",
            self.topology.controller_address
        );
        http_get(self.fabric_command(&curl(&url)))
    }

    /// Every manifest file the controller reads: the cluster's objects and the YAML and
    /// JSON files under the user's manifests.
    pub fn mesh_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.topology.objects.clone()];
        files.extend(weft_api::manifests::files(
            self.topology.manifests.as_deref().unwrap_or_default(),
        ));
        files
    }

    /// Writes the cluster's own objects for the controller, if the cluster has a mesh.
    fn write_objects(&self) -> Result<(), ClusterError> {
        if self.topology.manifests.is_none() {
            return Ok(());
        }
        let path = &self.topology.objects;
        let partial = path.with_extension("partial");
        let text = serde_json::to_vec_pretty(&objects::render(&self.topology))
            .expect("JSON values serialise");
        fs::write(&partial, text).map_err(ClusterError::io(&partial))?;
        fs::rename(&partial, path).map_err(ClusterError::io(path))
    }

    /// Stops a pod's processes and removes its namespace, veth pair and cgroup.
    pub fn del_pod(&mut self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        let pod = self.pod(namespace, name)?.clone();
        let node = self.node(&pod.node)?;
        if self.topology.cni_bin_dir.is_some() {
            // A runtime retries a failed DEL; the cluster tears the pod down anyway, and
            // the agent forgets pods whose namespace is gone.
            if let Err(err) = cni::invoke("DEL", node, &pod) {
                log::warn!("{err}");
            }
        }
        unwire_pod(node, &pod)?;
        self.topology
            .pods
            .retain(|other| (other.namespace.as_str(), other.name.as_str()) != (namespace, name));
        self.write_objects()?;
        self.save()
    }

    /// A command that runs `argv` inside pod `namespace/name` (its network namespace
    /// and cgroup), with the pod's `POD_*` environment.
    pub fn pod_command<S: AsRef<OsStr>>(
        &self,
        namespace: &str,
        name: &str,
        argv: &[S],
    ) -> Result<Command, ClusterError> {
        Ok(pod_command(self.pod(namespace, name)?, argv))
    }

    /// A command that runs `argv` on node `node`: in its network namespace and its
    /// system cgroup, outside the pods' subtree (where the agent runs).
    pub fn node_command<S: AsRef<OsStr>>(
        &self,
        node: &str,
        argv: &[S],
    ) -> Result<Command, ClusterError> {
        let info = self
            .topology
            .node(node)
            .ok_or_else(|| ClusterError::NoSuchNode {
                cluster: self.topology.name.clone(),
                node: node.to_owned(),
            })?;
        let mut command = enter(Enter::Node, &info.system_cgroup, &info.netns, argv);
        command.env("NODE_NAME", &info.name);
        Ok(command)
    }

    /// A command that runs `argv` on the fabric, where the control plane runs, in the
    /// control plane's cgroup.
    pub fn fabric_command<S: AsRef<OsStr>>(&self, argv: &[S]) -> Result<Command, ClusterError> {
        Ok(enter(
            Enter::Node,
            &self.layout.control_plane_cgroup(),
            &self.topology.fabric_netns,
            argv,
        ))
    }

    /// Starts `weft-controller` (the binary at `controller_bin`) on the fabric, reading
    /// the cluster's objects and the user's manifests, and waits until it is ready.
    pub fn start_controller(&mut self, controller_bin: &Path) -> Result<NodeProcess, ClusterError> {
        const READY: Duration = Duration::from_secs(15);
        let _lock = self.lock()?;
        self.refresh()?;
        let Some(manifests) = self.topology.manifests.clone() else {
            return Err(ClusterError::NoMesh(self.topology.name.clone()));
        };
        if let Some(running) = &self.topology.controller
            && host::process_running(running.pid)
        {
            return Ok(running.clone());
        }
        let argv = controller::command_line(controller_bin, &self.topology, &manifests)?;
        let log = self.layout.node_log("control-plane", "controller");
        let pid = spawn_logged(self.fabric_command(&argv)?, &argv, &log)?;
        let process = NodeProcess {
            command: argv,
            pid,
            log,
        };
        let deadline = Instant::now() + READY;
        while self.controller_status().is_err() {
            if !host::process_running(pid) || Instant::now() > deadline {
                return Err(ClusterError::ControllerNotReady {
                    timeout: READY,
                    log: process.log,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.topology.controller = Some(process.clone());
        self.save()?;
        Ok(process)
    }

    /// Sets extra arguments of `weft-controller run` (such as `--cert-ttl 10s`), kept in
    /// the topology; the controller gets them from its next start on.
    pub fn set_controller_args(&mut self, args: Vec<String>) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        self.topology.controller_args = args;
        self.save()
    }

    /// Stops the controller (SIGTERM, then SIGKILL after 5 s). The agents keep serving
    /// the configuration they have.
    pub fn stop_controller(&mut self) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        if let Some(controller) = self.topology.controller.take() {
            host::stop_process(controller.pid, Duration::from_secs(5))?;
        }
        self.save()
    }

    /// Waits until `addr` accepts TCP connections from inside pod `namespace/name`.
    /// `server_log` is named in the error, to point at why the server is not up.
    pub fn wait_for_tcp(
        &self,
        namespace: &str,
        name: &str,
        addr: SocketAddrV4,
        timeout: Duration,
        server_log: &Path,
    ) -> Result<(), ClusterError> {
        let probe = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        let deadline = Instant::now() + timeout;
        loop {
            let status = self
                .pod_command(namespace, name, &["bash", "-c", &probe])?
                .stderr(Stdio::null())
                .status()
                .map_err(|source| ClusterError::Spawn {
                    command: probe.clone(),
                    source,
                })?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady {
                    addr,
                    pod: format!("{namespace}/{name}"),
                    timeout,
                    log: server_log.to_owned(),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// From now on, run the nodes' CNI plugins for each pod: agents started after this
    /// place `weft-cni` (from `bin_dir`) in their node's plugin directory and chain it
    /// into its network configuration (`None`: stop).
    pub fn set_cni(&mut self, bin_dir: Option<PathBuf>) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        self.topology.cni_bin_dir = bin_dir;
        self.save()
    }

    /// Starts `weft-agent` (the binary at `agent_bin`) on `node`, subscribed to the
    /// controller over TLS checked against the mesh CA's roots (the controller streams
    /// its configuration and signs its pods' certificates), with the cluster's extra
    /// agent arguments, and waits until it is ready.
    pub fn start_agent(
        &mut self,
        node: &str,
        agent_bin: &Path,
    ) -> Result<NodeProcess, ClusterError> {
        // Kernel programs' own log records, at debug level, into the agent's log.
        self.start_agent_with_log(node, agent_bin, "info,weft_ebpf=debug")
    }

    /// [`Self::start_agent`] with the agent's log filter (`--log`, env_logger syntax)
    /// instead of the cluster's `info,weft_ebpf=debug`: `info` is what a production
    /// agent runs with, which is what benchmarks measure. An agent's own `--log` in
    /// [`Topology::agent_args`] wins over both.
    ///
    /// Refuses while an agent runs on the node: a second one would take its listening
    /// sockets over, which is [`Self::restart_agent`]'s work. Ready means the process
    /// runs and answers 200 on `/healthz/ready`.
    pub fn start_agent_with_log(
        &mut self,
        node: &str,
        agent_bin: &Path,
        log_filter: &str,
    ) -> Result<NodeProcess, ClusterError> {
        const READY: Duration = Duration::from_secs(15);
        let _lock = self.lock()?;
        self.refresh()?;
        if self.topology.manifests.is_none() {
            return Err(ClusterError::NoMesh(self.topology.name.clone()));
        }
        let info = self.node(node)?.clone();
        if let Some(pid) = running_agent(&info) {
            return Err(ClusterError::AgentRunning {
                cluster: self.topology.name.clone(),
                node: info.name,
                pid,
            });
        }
        self.ensure_holder(&info, agent_bin)?;
        let process = self.spawn_agent(&info, agent_bin, log_filter)?;
        let pid = process.pid;
        let deadline = Instant::now() + READY;
        while let Err(answer) = self.agent_ready(node) {
            if !host::process_running(pid) {
                return Err(ClusterError::AgentExited {
                    node: node.to_owned(),
                    log: process.log,
                });
            }
            if Instant::now() > deadline {
                // Not left running behind the error, unknown to the topology.
                host::stop_process(pid, AGENT_STOP_MARGIN)?;
                return Err(ClusterError::AgentNotReady {
                    node: node.to_owned(),
                    timeout: READY,
                    answer,
                    log: process.log,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.node_mut(node)?.agent = Some(process.clone());
        self.save()?;
        Ok(process)
    }

    /// Starts the node's socket holder (`weft-agent hold`, as the DaemonSet's `sockets`
    /// container runs it) unless one runs, and waits until it listens: the agents
    /// leave their listening sockets with it, so that after an agent's crash new
    /// connections wait for the next one. It lives until the cluster goes.
    fn ensure_holder(&self, info: &NodeInfo, agent_bin: &Path) -> Result<(), ClusterError> {
        const LISTENING: Duration = Duration::from_secs(5);
        if host::process_named(&info.system_cgroup, HOLDER_PROCESS).is_some() {
            return Ok(());
        }
        let socket = info.agent_state_dir.join("holder.sock");
        // Left by a holder that is gone: the wait below is for the new one's.
        let _ = std::fs::remove_file(&socket);
        let argv = agent::holder_command_line(agent_bin, &self.topology, info)?;
        let log = self.layout.node_log(&info.name, "holder");
        let pid = spawn_logged(self.node_command(&info.name, &argv)?, &argv, &log)?;
        let deadline = Instant::now() + LISTENING;
        while !socket.exists() {
            if !host::process_running(pid) || Instant::now() > deadline {
                return Err(ClusterError::HolderNotListening {
                    node: info.name.clone(),
                    socket,
                    log,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts `weft-agent` on the node `info`, logging into the node's agent log.
    fn spawn_agent(
        &self,
        info: &NodeInfo,
        agent_bin: &Path,
        log_filter: &str,
    ) -> Result<NodeProcess, ClusterError> {
        let argv = agent::command_line(agent_bin, &self.topology, info, log_filter)?;
        let log = self.layout.node_log(&info.name, "agent");
        let pid = spawn_logged(self.node_command(&info.name, &argv)?, &argv, &log)?;
        Ok(NodeProcess {
            command: argv,
            pid,
            log,
        })
    }

    /// Replaces `node`'s agent with a new one (from `agent_bin`) as an upgrade does,
    /// without refusing a connection: the new agent takes the running one's listening
    /// sockets over, and the old one stops accepting, drains and exits on its own (at
    /// the latest at its drain deadline). Returns once the new one serves and is ready;
    /// starts one if none runs. If the new agent exits or is not ready in time, it is
    /// stopped and the old one serves on.
    pub fn restart_agent(
        &mut self,
        node: &str,
        agent_bin: &Path,
    ) -> Result<NodeProcess, ClusterError> {
        const READY: Duration = Duration::from_secs(15);
        let lock = self.lock()?;
        self.refresh()?;
        if self.topology.manifests.is_none() {
            return Err(ClusterError::NoMesh(self.topology.name.clone()));
        }
        let info = self.node(node)?.clone();
        if running_agent(&info).is_none() {
            drop(lock);
            return self.start_agent(node, agent_bin);
        }
        self.ensure_holder(&info, agent_bin)?;
        let process = self.spawn_agent(&info, agent_bin, "info,weft_ebpf=debug")?;
        let deadline = Instant::now() + READY;
        loop {
            if !host::process_running(process.pid) {
                return Err(ClusterError::AgentExited {
                    node: node.to_owned(),
                    log: process.log,
                });
            }
            // Both agents answer on the ports until the old one lets go: the new one's
            // answers say its pid.
            let serving = self
                .agent_admin(node, "/config_dump")
                .is_ok_and(|dump| dump["pid"] == process.pid);
            let answer = if serving {
                self.agent_ready(node)
            } else {
                Err("the agent running before answers".to_owned())
            };
            match answer {
                Ok(()) => break,
                Err(answer) if Instant::now() > deadline => {
                    host::stop_process(process.pid, AGENT_STOP_MARGIN)?;
                    return Err(ClusterError::AgentNotReady {
                        node: node.to_owned(),
                        timeout: READY,
                        answer,
                        log: process.log,
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
        self.node_mut(node)?.agent = Some(process.clone());
        self.save()?;
        Ok(process)
    }

    /// `Ok` once `node`'s agent answers 200 on `/healthz/ready`, otherwise what it
    /// answered.
    fn agent_ready(&self, node: &str) -> Result<(), String> {
        self.agent_get(node, AgentPort::Ready, "/healthz/ready")
            .map(drop)
    }

    /// Sets extra arguments of `weft-agent run` (such as `--workers 1`), kept in the
    /// topology; agents get them from their next start on. They may not set what ties
    /// an agent to its node; a `--drain-timeout` among them replaces the cluster's
    /// (the agent's default, 30 s), and stopping an agent waits for it.
    pub fn set_agent_args(&mut self, args: Vec<String>) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        self.topology.agent_drain_timeout_ms =
            agent::check_agent_args(&args)?.unwrap_or(DEFAULT_AGENT_DRAIN_TIMEOUT_MS);
        self.topology.agent_args = args;
        self.save()
    }

    /// The pid of the agent running on `node`, if one does (also one the topology
    /// does not know of: left over, or started by hand in the node's system cgroup).
    pub fn running_agent(&self, node: &str) -> Result<Option<u32>, ClusterError> {
        Ok(running_agent(self.node(node)?))
    }

    /// Stops `node`'s agent, also one the topology does not know of (left over or
    /// started by hand): SIGTERM, then SIGKILL only if it still runs a moment after its
    /// drain deadline ([`Topology::agent_drain_timeout_ms`]). Meanwhile it lets open
    /// connections finish and other changes to the cluster wait. Capture and
    /// enforcement stay attached, so the node's meshed pods fail closed until an agent
    /// runs again: that is what the agent's pins are for.
    pub fn stop_agent(&mut self, node: &str) -> Result<(), ClusterError> {
        let _lock = self.lock()?;
        self.refresh()?;
        let grace = Duration::from_millis(self.topology.agent_drain_timeout_ms) + AGENT_STOP_MARGIN;
        let info = self.node_mut(node)?;
        if let Some(pid) = running_agent(info) {
            host::stop_process(pid, grace)?;
        }
        info.agent = None;
        self.save()
    }

    fn node(&self, name: &str) -> Result<&NodeInfo, ClusterError> {
        self.topology
            .node(name)
            .ok_or_else(|| ClusterError::NoSuchNode {
                cluster: self.topology.name.clone(),
                node: name.to_owned(),
            })
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeInfo, ClusterError> {
        let cluster = self.topology.name.clone();
        self.topology
            .nodes
            .iter_mut()
            .find(|node| node.name == name)
            .ok_or_else(|| ClusterError::NoSuchNode {
                cluster,
                node: name.to_owned(),
            })
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<&PodInfo, ClusterError> {
        self.topology
            .pod(namespace, name)
            .ok_or_else(|| ClusterError::NoSuchPod {
                cluster: self.topology.name.clone(),
                pod: format!("{namespace}/{name}"),
            })
    }

    /// Serialises changes to the cluster between processes.
    fn lock(&self) -> Result<File, ClusterError> {
        let path = self.layout.lock_file();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ClusterError::io(&path))?;
        file.lock().map_err(ClusterError::io(&path))?;
        Ok(file)
    }

    fn save(&self) -> Result<(), ClusterError> {
        let path = self.layout.topology_file();
        let partial = path.with_extension("json.partial");
        let json = serde_json::to_vec_pretty(&self.topology).expect("topology serialises");
        fs::write(&partial, json).map_err(ClusterError::io(&partial))?;
        fs::rename(&partial, &path).map_err(ClusterError::io(&path))
    }
}

/// The agent running on `node`: the one the cluster started, or else one it does not
/// know of in the node's system cgroup.
fn running_agent(node: &NodeInfo) -> Option<u32> {
    node.agent
        .as_ref()
        .map(|agent| agent.pid)
        .filter(|&pid| host::process_running(pid))
        .or_else(|| host::process_named(&node.system_cgroup, AGENT_PROCESS))
}

/// The SPIFFE identity `pod` runs as.
fn identity(pod: &PodInfo) -> String {
    format!(
        "spiffe://{}/ns/{}/sa/{}",
        objects::TRUST_DOMAIN,
        pod.namespace,
        pod.service_account
    )
}

fn load(layout: &Layout) -> Result<Topology, ClusterError> {
    let path = layout.topology_file();
    let json = match fs::read(&path) {
        Ok(json) => json,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(ClusterError::Missing(layout.cluster().to_owned()));
        }
        Err(err) => return Err(ClusterError::io(path)(err)),
    };
    serde_json::from_slice(&json).map_err(|source| ClusterError::State { path, source })
}

/// Creates the pod's network namespace, veth pair, addresses, routes and cgroup.
fn wire_pod(node: &NodeInfo, pod: &PodInfo) -> Result<(), ClusterError> {
    let gateway = node.pod_gateway.to_string();
    let address = format!("{}/32", pod.ip);
    host::ip(&["netns", "add", &pod.netns])?;
    host::add_veth(&node.netns, &pod.host_veth, &pod.netns)?;
    host::ip_in(
        &node.netns,
        &[
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &pod.host_veth,
        ],
    )?;
    host::ip_in(&node.netns, &["link", "set", &pod.host_veth, "up"])?;
    host::ip_in(
        &node.netns,
        &["route", "add", &address, "dev", &pod.host_veth],
    )?;
    host::ip_in(&pod.netns, &["link", "set", "lo", "up"])?;
    host::ip_in(&pod.netns, &["addr", "add", &address, "dev", "eth0"])?;
    host::ip_in(&pod.netns, &["link", "set", "eth0", "up"])?;
    host::ip_in(
        &pod.netns,
        &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
    )?;
    host::ip_in(
        &pod.netns,
        &["route", "add", "default", "via", &gateway, "dev", "eth0"],
    )?;
    host::create_dir(&pod.cgroup)
}

/// Undoes [`wire_pod`] and stops the pod's processes; parts already gone are skipped.
fn unwire_pod(node: &NodeInfo, pod: &PodInfo) -> Result<(), ClusterError> {
    host::kill_cgroup(&pod.cgroup)?;
    host::remove_cgroup_tree(&pod.cgroup)?;
    // The namespace's own teardown is asynchronous: delete the veth pair (and with it
    // the node's route) now, so that a new pod can take its name at once.
    if host::link_exists(&node.netns, &pod.host_veth) {
        host::ip_in(&node.netns, &["link", "del", &pod.host_veth])?;
    }
    if host::netns_exists(&pod.netns) {
        host::delete_netns(&pod.netns)?;
    }
    Ok(())
}

fn pod_command<S: AsRef<OsStr>>(pod: &PodInfo, argv: &[S]) -> Command {
    let mut command = enter(Enter::Pod, &pod.cgroup, &pod.netns, argv);
    command
        .env("POD_NAME", &pod.name)
        .env("POD_NAMESPACE", &pod.namespace)
        .env("POD_IP", pod.ip.to_string())
        .env("NODE_NAME", &pod.node);
    command
}

/// `curl` fetching `url` within a second, then printing the status code on a line of
/// its own.
fn curl(url: &str) -> [&str; 7] {
    ["curl", "-s", "--max-time", "1", "-w", "\n%{http_code}", url]
}

/// Runs a [`curl`] command: the body of a 200, otherwise the status and body, or `no
/// answer`.
fn http_get(command: Result<Command, ClusterError>) -> Result<String, String> {
    let output = command
        .map_err(|err| err.to_string())?
        .output()
        .map_err(|err| format!("curl: {err}"))?;
    let answer = String::from_utf8_lossy(&output.stdout);
    match answer.rsplit_once('\n') {
        Some((body, "200")) => Ok(body.to_owned()),
        Some((body, code)) if code != "000" => Err(format!("{code} {}", body.trim())),
        _ => Err("no answer".to_owned()),
    }
}

/// A TCP connection to `address` made from inside the named network namespace by a
/// short-lived thread (the connection stays in that namespace).
fn connect_in(netns: &str, address: SocketAddr) -> std::io::Result<TcpStream> {
    let netns = File::open(Path::new("/run/netns").join(netns))?;
    let connect = move || -> std::io::Result<TcpStream> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpStream::connect(address)
    };
    thread::spawn(connect)
        .join()
        .map_err(|_| std::io::Error::other("the thread connecting in the namespace panicked"))?
}

/// Starts `command` in the background, its stdout and stderr appended to `log`, in its
/// own process group so that a Ctrl-C meant for the caller spares it.
fn spawn_logged(mut command: Command, argv: &[String], log: &Path) -> Result<u32, ClusterError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ClusterError::io(log))?;
    let err = out.try_clone().map_err(ClusterError::io(log))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|source| ClusterError::Spawn {
            command: argv.join(" "),
            source,
        })?;
    Ok(child.id())
}

/// How a command enters a namespace.
#[derive(Clone, Copy)]
enum Enter {
    /// `ip netns exec`: the network namespace plus a private /sys showing it, as a
    /// container sees.
    Pod,
    /// `nsenter --net`: only the network namespace; the host's mounts (bpffs, cgroup)
    /// stay visible, as a node agent with host mounts sees them.
    Node,
}

/// A command that joins `cgroup` (before it execs anything, so no child escapes it)
/// and then runs `argv` in network namespace `netns`.
fn enter<S: AsRef<OsStr>>(how: Enter, cgroup: &Path, netns: &str, argv: &[S]) -> Command {
    const POD: &str =
        r#"echo $$ > "$1/cgroup.procs" && netns=$2 && shift 2 && exec ip netns exec "$netns" "$@""#;
    const NODE: &str = r#"echo $$ > "$1/cgroup.procs" && netns=$2 && shift 2 && exec nsenter --net="/run/netns/$netns" -- "$@""#;
    let script = match how {
        Enter::Pod => POD,
        Enter::Node => NODE,
    };
    let mut command = Command::new("sh");
    command
        .args(["-c", script, "weft-enter"])
        .arg(cgroup)
        .arg(netns)
        .args(argv);
    command
}

/// Removes everything of cluster `name`: processes, network namespaces (and with them
/// every link and address), cgroups, bpffs pins and the state directory. It finds
/// them by name, not from the saved state, so it also cleans up after a crashed `up`;
/// it keeps going past errors and reports the first.
pub fn down(name: &str) -> Result<(), ClusterError> {
    if !host::is_root() {
        return Err(ClusterError::NotRoot);
    }
    let layout = Layout::new(name)?;
    let mut first_error = None;
    let mut note = |result: Result<(), ClusterError>| {
        if let Err(err) = result {
            log::warn!("{err}");
            first_error.get_or_insert(err);
        }
    };
    // Processes first, so that nothing keeps a namespace or cgroup alive.
    note(host::kill_cgroup(&layout.cgroup()));
    match host::netns_with_prefix(&layout.netns_prefix()) {
        Ok(namespaces) => namespaces
            .iter()
            .for_each(|netns| note(host::delete_netns(netns))),
        Err(err) => note(Err(err)),
    }
    note(host::remove_cgroup_tree(&layout.cgroup()));
    note(host::remove_tree(&layout.bpffs()));
    note(host::remove_tree(&layout.state_dir()));
    if let Some(parent) = layout.state_dir().parent() {
        // Shared with other clusters: only removed once the last one is gone.
        let _ = fs::remove_dir(parent);
    }
    first_error.map_or(Ok(()), Err)
}
