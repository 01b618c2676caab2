//! The mesh as the agent knows it, read from a YAML file until the controller streams
//! the same model: the nodes (where their agents take HBONE), which namespaces are
//! meshed and how their pods take plaintext, the workloads of the whole cluster (pod
//! IP, node, namespace, service account, labels), the services (VIP, ports and their
//! protocols, target ports, endpoints and their weights, balancing, locality) and ports
//! never captured.
//!
//! ```yaml
//! trustDomain: cluster.local        # default
//! nodes:
//!   - { name: node0, address: 10.99.0.1, zone: zone-a }   # zone: optional
//!   - { name: node1, address: 10.99.0.2, hboneAddress: pod }  # node (default) | pod
//! namespaces:
//!   - name: default
//!     mode: STRICT                  # STRICT (default) | PERMISSIVE | DISABLE
//! workloads:
//!   - name: echo-0
//!     namespace: default
//!     serviceAccount: echo          # default: default
//!     node: node0
//!     ip: 10.244.0.2
//!     labels: { app: echo }
//!     mode: PERMISSIVE              # default: the namespace's
//!     portModes: { 9090: DISABLE }  # ports whose mode differs
//!   - { name: batch, namespace: default, node: node0, ip: 10.244.0.3, optedOut: true }
//! services:
//!   - name: echo
//!     namespace: default
//!     vip: 10.96.0.10
//!     ports:
//!       - { port: 80, targetPort: 8080 }       # targetPort defaults to port
//!       - { port: 81, name: grpc-api }         # name: `<protocol>[-<suffix>]` names it…
//!       - { port: 82, appProtocol: kubernetes.io/h2c }   # …unless appProtocol does
//!     endpoints: [10.244.0.2, 10.244.0.4]      # workload addresses
//!     weights: { 10.244.0.4: 3 }    # 0 to 1000; default 1, 0 drains
//!     loadBalancing: LEAST_REQUEST  # ROUND_ROBIN | RANDOM | LEAST_REQUEST | PEAK_EWMA (default)
//!     preferClose: true             # endpoints in the client's zone first; default false
//!     idleTimeout: 10m              # default: the agent's --idle-timeout
//! excludePorts: [22]
//! authorizationPolicies:            # compiled: the workloads each selects, resolved
//!   - name: allow-frontend
//!     namespace: default
//!     action: ALLOW                 # ALLOW | DENY | AUDIT; dryRun: true evaluates only
//!     workloads: [default/echo-0]
//!     rules:
//!       - from: [{ principals: [cluster.local/ns/default/sa/frontend] }]
//!         to: [{ methods: [GET], paths: ["/public*"] }]
//! ```
//!
//! A port's [`Protocol`] comes from its `appProtocol`, else its name, as in Istio
//! ([`ServicePort::protocol`]).
//!
//! Capture sends to the agent every service VIP:port and every address of a meshed
//! workload (those in the file, and the node's enrolled pods). A workload that opted
//! out of its meshed namespace is neither captured nor enforced; traffic to it, and to
//! service endpoints that are no workload at all, goes to it directly in plaintext.
//!
//! With `--controller`, the same model is assembled from the resources the controller
//! streams ([`resources`]).

pub mod labels;
pub mod resources;

use std::{
    collections::{BTreeMap, HashMap, HashSet, hash_map::Entry},
    hash::BuildHasher,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use weft_api::{
    authz,
    config::v1::{DEFAULT_ENDPOINT_WEIGHT, MAX_ENDPOINT_WEIGHT},
    routes,
};
use weft_common::{MeshDestination, Mode, SockAddr, destination};

use crate::{datapath::sock_addr, identity::Identity};

pub use self::labels::Labels;

pub use weft_api::protocol::Protocol;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshConfig {
    /// The writer's revision of this configuration, reported back by the agent
    /// (`/config_dump`, `weft_config_revision`) so the writer can tell when it applies.
    #[serde(default)]
    pub revision: u64,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub namespaces: Vec<MeshNamespace>,
    /// Shared with the versions before and after: a new version of a large mesh holds
    /// new copies of what changed only.
    #[serde(default)]
    pub workloads: Vec<Arc<Workload>>,
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    /// The AuthorizationPolicies that select workloads of this node, compiled.
    #[serde(default)]
    pub authorization_policies: Vec<authz::Policy>,
    /// The HTTPRoutes and GRPCRoutes of each service port, by `<namespace>/<service>:<port>`,
    /// streamed by the controller (a configuration file has none).
    #[serde(skip)]
    pub routes: BTreeMap<String, routes::ServiceRoutes>,
    /// The mesh CA's roots, streamed by the controller. A configuration file has none:
    /// with one, the agent reads its bundle from `--trust-bundle`.
    #[serde(skip)]
    pub trust_anchors: Vec<TrustAnchor>,
    /// Lookups by address, built by validation or on first use.
    #[serde(skip)]
    pub(crate) index: Index,
}

/// The configuration's lookups of the data path, by workload IP and by service
/// VIP:port, so that no connection or request scans the lists. Built when the
/// configuration is validated (read from a file, or assembled from streamed
/// resources), else on the first lookup: a configuration is not changed once validated
/// or published (a clone starts a new index, so a changed clone is safe).
#[derive(Debug, Default)]
pub(crate) struct Index {
    maps: OnceLock<Maps>,
    /// Workloads by namespace and name, for the node's pod syncs rather than the data
    /// path: built apart, when first asked.
    by_name: OnceLock<ByName>,
}

/// Workload positions by a hash of (namespace, name); a lookup checks the names, so
/// a hash two workloads share only sends the second to `collided`.
#[derive(Debug, Default)]
struct ByName {
    hasher: foldhash::fast::RandomState,
    first: FastMap<u64, usize>,
    collided: Vec<usize>,
}

/// The index's maps. Their keys are addresses and names from the configuration, so
/// a fast hash (randomly seeded per process) serves: a connection's lookups are most of
/// what it costs, and building them is most of what a new version of a large mesh does.
#[derive(Debug, Default)]
struct Maps {
    workloads: FastMap<IpAddr, usize>,
    /// The first workload whose address an earlier one has (a configuration with one
    /// is invalid).
    shared_address: Option<usize>,
    /// (VIP, port) → (service, port entry).
    services: FastMap<(IpAddr, u16), (usize, usize)>,
    /// (endpoint, target port) → the first (service, port entry) that leads there.
    endpoints: FastMap<(IpAddr, u16), (usize, usize)>,
    /// Workload address → the authorization policies that select it.
    policies: FastMap<IpAddr, Vec<usize>>,
    /// namespace → name → the service's first entry: where a route's backend goes.
    named: FastMap<String, FastMap<String, usize>>,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

impl Clone for Index {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Two configurations are equal by their content; the index is derived from it.
impl PartialEq for Index {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Index {}

impl Index {
    fn by_name(&self, config: &MeshConfig) -> &ByName {
        self.by_name.get_or_init(|| {
            let hasher = foldhash::fast::RandomState::default();
            let mut first =
                FastMap::with_capacity_and_hasher(config.workloads.len(), Default::default());
            let mut collided = Vec::new();
            for (position, workload) in config.workloads.iter().enumerate() {
                let hash = hasher.hash_one((&*workload.namespace, workload.name.as_str()));
                match first.entry(hash) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(position);
                    }
                    Entry::Occupied(_) => collided.push(position),
                }
            }
            ByName {
                hasher,
                first,
                collided,
            }
        })
    }

    fn maps(&self, config: &MeshConfig) -> &Maps {
        self.maps.get_or_init(|| {
            let mut workloads =
                FastMap::with_capacity_and_hasher(config.workloads.len(), Default::default());
            let mut shared_address = None;
            for (position, workload) in config.workloads.iter().enumerate() {
                if workloads.insert(workload.ip, position).is_some() {
                    shared_address = shared_address.or(Some(position));
                }
            }
            let ports: usize = config.services.iter().map(|entry| entry.ports.len()).sum();
            let endpoint_ports: usize = (config.services.iter())
                .map(|entry| entry.ports.len() * entry.endpoints.len())
                .sum();
            let mut services = FastMap::with_capacity_and_hasher(ports, Default::default());
            let mut endpoints =
                FastMap::with_capacity_and_hasher(endpoint_ports, Default::default());
            let mut named: FastMap<String, FastMap<String, usize>> = FastMap::default();
            for (service, entry) in config.services.iter().enumerate() {
                for (port, ports) in entry.ports.iter().enumerate() {
                    services.insert((entry.vip, ports.port), (service, port));
                    for ip in &entry.endpoints {
                        endpoints
                            .entry((*ip, ports.target()))
                            .or_insert((service, port));
                    }
                }
                let names = match named.get_mut(entry.namespace.as_str()) {
                    Some(names) => names,
                    None => named.entry(entry.namespace.clone()).or_default(),
                };
                if !names.contains_key(entry.name.as_str()) {
                    names.insert(entry.name.clone(), service);
                }
            }
            // Policies name the workloads they select as "namespace/name".
            let mut selected: FastMap<(&str, &str), Vec<usize>> = FastMap::default();
            for (index, policy) in config.authorization_policies.iter().enumerate() {
                for workload in &policy.workloads {
                    if let Some(name) = workload.split_once('/') {
                        selected.entry(name).or_default().push(index);
                    }
                }
            }
            let mut policies = FastMap::default();
            if !selected.is_empty() {
                for workload in &config.workloads {
                    let name = (&*workload.namespace, workload.name.as_str());
                    if let Some(indexes) = selected.get(&name) {
                        policies.insert(workload.ip, indexes.clone());
                    }
                }
            }
            Maps {
                workloads,
                shared_address,
                services,
                endpoints,
                policies,
                named,
            }
        })
    }
}

/// A root the mesh trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustAnchor {
    /// The root certificate, DER.
    pub certificate: Vec<u8>,
    /// The CA issues certificates under this root now.
    pub signing: bool,
    /// When a rotated-out root stops being trusted.
    pub retire_at: Option<std::time::SystemTime>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            revision: 0,
            trust_domain: default_trust_domain(),
            nodes: Vec::new(),
            namespaces: Vec::new(),
            workloads: Vec::new(),
            services: Vec::new(),
            exclude_ports: Vec::new(),
            authorization_policies: Vec::new(),
            routes: BTreeMap::new(),
            trust_anchors: Vec::new(),
            index: Index::default(),
        }
    }
}

fn default_trust_domain() -> String {
    "cluster.local".to_owned()
}

fn default_service_account() -> Arc<str> {
    Arc::from("default")
}

/// A node and the address its agent takes HBONE tunnels on (port 15008).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    pub address: IpAddr,
    /// The node's zone (its label `topology.kubernetes.io/zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Where the node takes HBONE tunnels.
    #[serde(default, skip_serializing_if = "HboneAddress::is_node")]
    pub hbone_address: HboneAddress,
}

/// The address a node's HBONE peer is dialed at, on port 15008.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HboneAddress {
    /// The node's address, where a weft agent takes every pod's tunnels.
    #[default]
    Node,
    /// The destination pod's own address, as Istio's ztunnel requires.
    Pod,
}

impl HboneAddress {
    fn is_node(&self) -> bool {
        *self == HboneAddress::Node
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshNamespace {
    pub name: String,
    #[serde(default)]
    pub mode: PeerMode,
}

/// How a meshed pod accepts plaintext (the PeerAuthentication modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerMode {
    #[default]
    Strict,
    Permissive,
    Disable,
}

impl From<PeerMode> for Mode {
    fn from(mode: PeerMode) -> Mode {
        match mode {
            PeerMode::Strict => Mode::Strict,
            PeerMode::Permissive => Mode::Permissive,
            PeerMode::Disable => Mode::Disable,
        }
    }
}

/// Which plaintext connections into a pod its authorization policies deny whatever
/// their source: such connections need an identity plaintext cannot have, so the
/// kernel drops them even where the pod is PERMISSIVE. Plaintext is judged as TCP
/// (the kernel sees no request). Policies that name source addresses make no port
/// denied here: the kernel cannot tell sources apart, and lets PERMISSIVE plaintext in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PlaintextPolicy {
    /// Plaintext to a port no policy names is denied.
    #[serde(default)]
    pub denied: bool,
    /// The ports policies name, and whether plaintext to each is denied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, bool>,
}

impl PlaintextPolicy {
    /// The kernel's mode of `port` (`None`: of the pod) whose PeerAuthentication mode
    /// is `mode`.
    pub fn kernel_mode(&self, mode: PeerMode, port: Option<u16>) -> Mode {
        let denied = port
            .and_then(|port| self.ports.get(&port).copied())
            .unwrap_or(self.denied);
        match mode {
            PeerMode::Permissive if denied => Mode::Deny,
            mode => mode.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub name: String,
    pub namespace: Arc<str>,
    #[serde(default = "default_service_account")]
    pub service_account: Arc<str>,
    /// The node the pod runs on; without it the workload can be captured but not
    /// reached through the mesh.
    #[serde(default)]
    pub node: Option<Arc<str>>,
    pub ip: IpAddr,
    #[serde(default)]
    pub labels: Labels,
    /// How the pod takes plaintext; `None`: its namespace's mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PeerMode>,
    /// Ports whose mode differs from the pod's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_modes: BTreeMap<u16, PeerMode>,
    /// The pod opted out of its meshed namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opted_out: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub ports: Vec<ServicePort>,
    /// Addresses of the ready endpoints: meshed workloads are reached through the
    /// mesh, any other address directly.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
    /// How long a connection to the service may carry nothing, either way, before the
    /// agent closes it (the service's TrafficPolicy `timeouts.idle`); `None`: the
    /// agent's default.
    #[serde(
        default,
        rename = "idleTimeout",
        skip_serializing_if = "Option::is_none",
        with = "gateway_duration"
    )]
    pub idle_timeout: Option<Duration>,
    /// How long clients wait for a connection to one of the service's endpoints (the
    /// TrafficPolicy's `timeouts.connect`); `None`: the agent's default.
    #[serde(
        default,
        rename = "connectTimeout",
        skip_serializing_if = "Option::is_none",
        with = "gateway_duration"
    )]
    pub connect_timeout: Option<Duration>,
    /// How long an HTTP request to the service may wait for its response's head (the
    /// TrafficPolicy's `timeouts.request`; a route's `timeouts` take precedence);
    /// `None`: no limit.
    #[serde(
        default,
        rename = "requestTimeout",
        skip_serializing_if = "Option::is_none",
        with = "gateway_duration"
    )]
    pub request_timeout: Option<Duration>,
    /// How long an HTTP request's stream may carry nothing, either way, before the
    /// client's agent ends it (the TrafficPolicy's `timeouts.streamIdle`); `None`: the
    /// agent's idle timeout.
    #[serde(
        default,
        rename = "streamIdleTimeout",
        skip_serializing_if = "Option::is_none",
        with = "gateway_duration"
    )]
    pub stream_idle_timeout: Option<Duration>,
    /// How clients pick an endpoint (the TrafficPolicy's `loadBalancer.algorithm`);
    /// `None`: the agent's default ([`Service::balancing`]).
    #[serde(
        default,
        rename = "loadBalancing",
        skip_serializing_if = "Option::is_none"
    )]
    pub load_balancing: Option<LoadBalancing>,
    /// Clients prefer endpoints in their own zone while it has any (the Service's
    /// `spec.trafficDistribution: PreferClose`, or its TrafficPolicy's).
    #[serde(
        default,
        rename = "preferClose",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub prefer_close: bool,
    /// Endpoint weights other than 1 ([`Service::weight`]), 0 to 1000; 0 drains.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<IpAddr, u32>,
    /// Failing endpoints ejected (the TrafficPolicy's `outlierDetection`); only the
    /// controller streams it.
    #[serde(skip)]
    pub outlier: Option<crate::proxy::balance::Outlier>,
    /// How clients retry failed requests (the TrafficPolicy's `retries`); `None`: the
    /// agent's default. Only the controller streams it.
    #[serde(skip)]
    pub retries: Option<std::sync::Arc<crate::proxy::retry::RetryPolicy>>,
    /// Circuit breaking (the TrafficPolicy's `connectionLimits`); only the controller
    /// streams it.
    #[serde(skip)]
    pub limits: Option<crate::proxy::breaker::Limits>,
}

impl Service {
    /// How clients pick one of the service's endpoints.
    pub fn balancing(&self) -> LoadBalancing {
        self.load_balancing.unwrap_or_default()
    }

    /// The weight of endpoint `ip`.
    pub fn weight(&self, ip: IpAddr) -> u32 {
        self.weights
            .get(&ip)
            .copied()
            .unwrap_or(DEFAULT_ENDPOINT_WEIGHT)
    }
}

/// How clients pick one of a service's endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    RoundRobin,
    /// Any endpoint, at random.
    Random,
    /// The less loaded of two endpoints picked at random.
    LeastRequest,
    /// The faster of two endpoints picked at random (peak EWMA latency, as Linkerd).
    #[default]
    PeakEwma,
}

/// An optional duration written as the Gateway API writes durations (`1h`, `30s`).
mod gateway_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use weft_api::duration::{format_duration, parse_duration};

    pub fn serialize<S: Serializer>(
        duration: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match duration {
            Some(duration) => serializer.serialize_str(&format_duration(*duration)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map(Some).ok_or_else(|| {
            D::Error::custom(format!(
                "{text:?} is not a duration such as 30s, 10m or 1h30m"
            ))
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    /// The endpoints' port; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port's `appProtocol` (`http`, `kubernetes.io/h2c`, `grpc`, `tcp`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }

    /// What the port speaks: its `appProtocol` decides, else its name.
    pub fn protocol(&self) -> Protocol {
        Protocol::of(self.app_protocol.as_deref(), self.name.as_deref())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("cannot read the mesh configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the mesh configuration {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("the mesh configuration {path} is invalid: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl MeshConfig {
    pub fn load(path: &Path) -> Result<Self, MeshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|err| match err {
            Problem::Yaml(source) => MeshConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            Problem::Invalid(problem) => MeshConfigError::Invalid {
                path: path.to_owned(),
                problem,
            },
        })
    }

    fn parse(text: &str) -> Result<Self, Problem> {
        let config: MeshConfig = serde_yaml::from_str(text).map_err(Problem::Yaml)?;
        config.validate().map_err(Problem::Invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let mut nodes = FastSet::default();
        for (index, node) in self.nodes.iter().enumerate() {
            if !nodes.insert(node.name.as_str()) {
                return Err(format!("nodes[{index}]: {} is listed twice", node.name));
            }
            if node.zone.as_deref() == Some("") {
                return Err(format!(
                    "nodes[{index}].zone: empty; leave it out for a node without one"
                ));
            }
        }
        // The index finds what it needs to find anyway, and is then ready.
        if let Some(index) = self.index.maps(self).shared_address {
            let workload = &self.workloads[index];
            return Err(format!(
                "workloads[{index}] ({}): address {} belongs to another workload too",
                workload.name, workload.ip
            ));
        }
        for (index, workload) in self.workloads.iter().enumerate() {
            if let Some(node) = &workload.node
                && !nodes.contains(&**node)
            {
                return Err(format!("workloads[{index}].node: {node} is not in nodes"));
            }
            if let Some(port) = workload.port_modes.keys().find(|port| **port == 0) {
                return Err(format!(
                    "workloads[{index}].portModes: port {port} is not a port"
                ));
            }
        }
        let mut namespaces = FastSet::default();
        for (index, namespace) in self.namespaces.iter().enumerate() {
            if !namespaces.insert(&namespace.name) {
                return Err(format!(
                    "namespaces[{index}]: {} is listed twice",
                    namespace.name
                ));
            }
        }
        for (index, service) in self.services.iter().enumerate() {
            if service.ports.is_empty() {
                return Err(format!(
                    "services[{index}] ({}): ports is empty",
                    service.name
                ));
            }
            if let Some(position) = service
                .ports
                .iter()
                .position(|port| port.port == 0 || port.target_port == Some(0))
            {
                return Err(format!(
                    "services[{index}].ports[{position}]: port 0 is not a port"
                ));
            }
            if let Some((ip, weight)) = service
                .weights
                .iter()
                .find(|(_, weight)| **weight > MAX_ENDPOINT_WEIGHT)
            {
                return Err(format!(
                    "services[{index}].weights[{ip}]: {weight} is more than {MAX_ENDPOINT_WEIGHT}"
                ));
            }
        }
        if let Some(position) = self.exclude_ports.iter().position(|port| *port == 0) {
            return Err(format!("excludePorts[{position}]: port 0 is not a port"));
        }
        Ok(())
    }

    /// The inbound mode of pods in `namespace`, or `None` when it is not meshed.
    pub fn mode_of(&self, namespace: &str) -> Option<PeerMode> {
        self.namespaces
            .iter()
            .find(|candidate| candidate.name == namespace)
            .map(|namespace| namespace.mode)
    }

    /// Whether `workload` is in the mesh: its namespace is, and it did not opt out.
    pub fn is_meshed(&self, workload: &Workload) -> bool {
        !workload.opted_out && self.mode_of(&workload.namespace).is_some()
    }

    /// How pod `namespace/name` takes plaintext (its mode and per-port overrides), or
    /// `None` when it is not in the mesh. A pod the configuration does not list yet
    /// (it has just been created) gets its namespace's mode.
    pub fn pod_modes(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(PeerMode, BTreeMap<u16, PeerMode>)> {
        let namespace_mode = self.mode_of(namespace)?;
        match self.workload_named(namespace, name) {
            Some(workload) if workload.opted_out => None,
            Some(workload) => Some((
                workload.mode.unwrap_or(namespace_mode),
                workload.port_modes.clone(),
            )),
            None => Some((namespace_mode, BTreeMap::new())),
        }
    }

    /// What pod `namespace/name`'s authorization policies say of plaintext.
    pub fn plaintext_policy(&self, namespace: &str, name: &str) -> PlaintextPolicy {
        let Some(workload) = self.workload_named(namespace, name) else {
            return PlaintextPolicy::default();
        };
        let policies = self.policies_for(workload.ip);
        let enforced = policies.clone().filter(|policy| !policy.dry_run);
        if enforced.clone().next().is_none()
            || enforced.clone().any(authz::Policy::names_source_addresses)
        {
            return PlaintextPolicy::default();
        }
        let denied = |port: u16| {
            let target = authz::Target {
                ip: workload.ip,
                port,
            };
            let plaintext = authz::Caller::default();
            authz::evaluate(policies.clone(), &plaintext, target, authz::Traffic::Tcp).denied()
        };
        PlaintextPolicy {
            // No policy names port 0: it stands for every port none names.
            denied: denied(0),
            ports: enforced
                .flat_map(authz::Policy::named_ports)
                .map(|port| (port, denied(port)))
                .collect(),
        }
    }

    /// What capture sends to the agent: every service VIP:port, and every address of a
    /// meshed workload — those in the file and `local_pods`, the node's enrolled pods.
    pub fn destinations(
        &self,
        local_pods: impl IntoIterator<Item = IpAddr>,
    ) -> HashMap<SockAddr, MeshDestination> {
        let pod = MeshDestination {
            kind: destination::POD,
        };
        let service = MeshDestination {
            kind: destination::SERVICE,
        };
        let workloads = self
            .workloads
            .iter()
            .filter(|workload| self.is_meshed(workload))
            .map(|workload| workload.ip)
            .chain(local_pods)
            .map(|ip| (sock_addr(ip, 0), pod));
        let services = self.services.iter().flat_map(|svc| {
            svc.ports
                .iter()
                .map(move |port| (sock_addr(svc.vip, port.port), service))
        });
        workloads.chain(services).collect()
    }

    /// Workload `namespace/name` (the first listed, should two have the name).
    pub fn workload_named(&self, namespace: &str, name: &str) -> Option<&Workload> {
        let by_name = self.index.by_name(self);
        let named = |position: &&usize| {
            let workload = &self.workloads[**position];
            &*workload.namespace == namespace && workload.name == name
        };
        let hash = by_name.hasher.hash_one((namespace, name));
        let position = (by_name.first.get(&hash).filter(named))
            .or_else(|| by_name.collided.iter().find(named))?;
        Some(&self.workloads[*position])
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        let position = *self.index.maps(self).workloads.get(&ip.to_canonical())?;
        self.workloads.get(position).map(|workload| &**workload)
    }

    /// The service behind `vip:port`, with the port entry that matched.
    pub fn service_at(&self, vip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let (service, entry) = *self
            .index
            .maps(self)
            .services
            .get(&(vip.to_canonical(), port))?;
        let service = self.services.get(service)?;
        Some((service, service.ports.get(entry)?))
    }

    /// The service `namespace/name`, with its port entry for `port`.
    pub fn service_named(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Option<(&Service, &ServicePort)> {
        let index = *self.index.maps(self).named.get(namespace)?.get(name)?;
        let service = self.services.get(index)?;
        Some((service, service.ports.iter().find(|p| p.port == port)?))
    }

    /// The routes of the service port `key` (`<namespace>/<service>:<port>`), if any
    /// route is attached to it.
    pub fn routes_of(&self, key: &str) -> Option<&routes::ServiceRoutes> {
        self.routes.get(key)
    }

    /// A service, and its port entry, that leads to the endpoint `address` (the
    /// destination side of a tunnel knows the pod, not the service the client chose).
    pub fn service_of_endpoint(&self, address: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let (service, entry) = *self
            .index
            .maps(self)
            .endpoints
            .get(&(address.ip().to_canonical(), address.port()))?;
        let service = self.services.get(service)?;
        Some((service, service.ports.get(entry)?))
    }

    /// The authorization policies that select the workload at `ip`.
    pub fn policies_for(&self, ip: IpAddr) -> impl Iterator<Item = &authz::Policy> + Clone {
        let selecting = self
            .index
            .maps(self)
            .policies
            .get(&ip.to_canonical())
            .map(Vec::as_slice)
            .unwrap_or_default();
        selecting
            .iter()
            .map(|&index| &self.authorization_policies[index])
    }

    /// Every service endpoint with its target port: what balancers keep state for.
    pub fn endpoint_addresses(&self) -> HashSet<SocketAddr> {
        self.services
            .iter()
            .flat_map(|service| {
                service.ports.iter().flat_map(|port| {
                    service
                        .endpoints
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, port.target()))
                })
            })
            .collect()
    }

    /// The longest idle timeout any service sets: the destination side of a tunnel
    /// does not know which service the client addressed, so it waits at least that
    /// long before it gives up on a silent tunnel.
    pub fn longest_idle_timeout(&self) -> Option<Duration> {
        self.services
            .iter()
            .filter_map(|service| service.idle_timeout)
            .max()
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// The zone of node `name`, if it is known and has one.
    pub fn zone(&self, name: &str) -> Option<&str> {
        self.node(name)?.zone.as_deref()
    }

    /// The SPIFFE identity `workload` runs as.
    pub fn identity(&self, workload: &Workload) -> Identity {
        Identity {
            trust_domain: self.trust_domain.clone(),
            namespace: workload.namespace.to_string(),
            service_account: workload.service_account.to_string(),
        }
    }
}

enum Problem {
    Yaml(serde_yaml::Error),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
namespaces:
  - name: default
  - name: shop
    mode: PERMISSIVE
workloads:
  - { name: echo-0, namespace: default, ip: 10.244.1.2 }
  - { name: legacy, namespace: outside, ip: 10.244.1.9 }
services:
  - name: echo
    namespace: default
    vip: 10.96.0.10
    ports: [{ port: 8080 }, { port: 9090, targetPort: 9000 }]
    endpoints: [10.244.1.2]
excludePorts: [22]
"#;

    #[test]
    fn modes_and_destinations() {
        let config = MeshConfig::parse(EXAMPLE).unwrap_or_else(|_| panic!("example parses"));
        assert_eq!(config.mode_of("default"), Some(PeerMode::Strict));
        assert_eq!(config.mode_of("shop"), Some(PeerMode::Permissive));
        assert_eq!(config.mode_of("outside"), None);

        let local: IpAddr = "10.244.0.5".parse().unwrap();
        let destinations = config.destinations([local]);
        let has = |ip: &str, port| destinations.contains_key(&sock_addr(ip.parse().unwrap(), port));
        assert!(has("10.244.1.2", 0), "a meshed workload");
        assert!(has("10.244.0.5", 0), "a local enrolled pod");
        assert!(!has("10.244.1.9", 0), "a workload of an unmeshed namespace");
        assert!(has("10.96.0.10", 8080) && has("10.96.0.10", 9090));
        let (service, port) = config
            .service_at("10.96.0.10".parse().unwrap(), 9090)
            .unwrap();
        assert_eq!((service.name.as_str(), port.target()), ("echo", 9000));
        let echo = config
            .workload_by_ip("10.244.1.2".parse().unwrap())
            .unwrap();
        assert_eq!(
            config.identity(echo).to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert!(!has("10.96.0.10", 0), "a VIP is only captured on its ports");
        assert_eq!(destinations.len(), 4);
    }

    #[test]
    fn workloads_are_found_by_namespace_and_name() {
        let config = MeshConfig::parse(
            "nodes: [{ name: a, address: 10.99.0.1 }]\n\
             workloads:\n\
             - { name: web, namespace: shop, node: a, ip: 10.244.0.2 }\n\
             - { name: web, namespace: blog, node: a, ip: 10.244.0.3 }\n\
             - { name: shop, namespace: web, node: a, ip: 10.244.0.4 }\n",
        )
        .unwrap_or_else(|_| panic!("parses"));
        let ip = |namespace: &str, name: &str| {
            config
                .workload_named(namespace, name)
                .map(|workload| workload.ip.to_string())
        };
        assert_eq!(ip("shop", "web").as_deref(), Some("10.244.0.2"));
        assert_eq!(ip("blog", "web").as_deref(), Some("10.244.0.3"));
        assert_eq!(ip("web", "shop").as_deref(), Some("10.244.0.4"));
        assert_eq!(ip("shop", "api"), None);
        assert_eq!(ip("shop/web", ""), None);
    }

    #[test]
    fn services_say_how_to_balance_and_ports_what_they_speak() {
        let text = r#"
nodes:
  - { name: node0, address: 10.99.0.1, zone: zone-a }
  - { name: node1, address: 10.99.0.2 }
services:
  - name: echo
    namespace: default
    vip: 10.96.0.10
    ports:
      - { port: 80, targetPort: 8080 }
      - { port: 81, name: grpc-api }
      - { port: 82, name: http, appProtocol: kubernetes.io/h2c }
    endpoints: [10.244.0.2, 10.244.0.4]
    weights: { 10.244.0.4: 3 }
    loadBalancing: LEAST_REQUEST
    preferClose: true
  - { name: plain, namespace: default, vip: 10.96.0.11, ports: [{ port: 80 }] }
"#;
        let config = MeshConfig::parse(text).unwrap_or_else(|_| panic!("parses"));
        assert_eq!(
            (config.zone("node0"), config.zone("node1"), config.zone("x")),
            (Some("zone-a"), None, None)
        );
        let echo = &config.services[0];
        let protocols: Vec<Protocol> = echo.ports.iter().map(ServicePort::protocol).collect();
        assert_eq!(
            protocols,
            [Protocol::Detect, Protocol::Grpc, Protocol::Http2]
        );
        let weight = |ip: &str| echo.weight(ip.parse().unwrap());
        assert_eq!((weight("10.244.0.2"), weight("10.244.0.4")), (1, 3));
        assert_eq!(
            (echo.balancing(), echo.prefer_close),
            (LoadBalancing::LeastRequest, true)
        );
        let plain = &config.services[1];
        assert_eq!(
            (plain.balancing(), plain.prefer_close, plain.load_balancing),
            (LoadBalancing::PeakEwma, false, None),
            "the defaults"
        );

        // `/config_dump` shows the model as JSON; a file writes it as YAML.
        let dump = serde_json::to_value(&config).unwrap();
        assert_eq!(
            dump["services"][0]["weights"],
            serde_json::json!({ "10.244.0.4": 3 })
        );
        assert_eq!(dump["services"][0]["loadBalancing"], "LEAST_REQUEST");
        assert_eq!(
            dump["services"][0]["ports"][2]["appProtocol"],
            "kubernetes.io/h2c"
        );
        let again = serde_yaml::to_string(&config).unwrap();
        assert_eq!(
            MeshConfig::parse(&again).unwrap_or_else(|_| panic!("{again}")),
            config
        );
    }

    #[test]
    fn bad_files_say_where() {
        let message = |text: &str| match MeshConfig::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(Problem::Yaml(err)) => err.to_string(),
            Err(Problem::Invalid(problem)) => problem,
        };
        let unknown = message("namespaces:\n  - name: a\n    mood: STRICT\n");
        assert!(
            unknown.contains("mood") && unknown.contains("line 3"),
            "{unknown}"
        );
        let bad_mode = message("namespaces:\n  - name: a\n    mode: LOOSE\n");
        assert!(bad_mode.contains("LOOSE"), "{bad_mode}");
        let bad_ip = message("workloads:\n  - { name: a, namespace: b, ip: 10.0.0.300 }\n");
        assert!(bad_ip.contains("line 2"), "{bad_ip}");
        let twice = message("namespaces:\n  - name: a\n  - name: a\n");
        assert!(twice.contains("namespaces[1]"), "{twice}");
        let port =
            message("services:\n  - { name: s, namespace: n, vip: 10.96.0.1, ports: [0] }\n");
        assert!(port.contains("services[0].ports[0]"), "{port}");
        let weight = message(
            "services:\n  - { name: s, namespace: n, vip: 10.96.0.1, ports: [{ port: 80 }], weights: { 10.0.0.1: 1001 } }\n",
        );
        assert_eq!(
            weight,
            "services[0].weights[10.0.0.1]: 1001 is more than 1000"
        );
        let zone = message("nodes:\n  - { name: a, address: 10.0.0.1, zone: \"\" }\n");
        assert!(zone.starts_with("nodes[0].zone: empty"), "{zone}");
        let algorithm = message(
            "services:\n  - { name: s, namespace: n, vip: 10.96.0.1, ports: [{ port: 80 }], loadBalancing: FASTEST }\n",
        );
        assert!(algorithm.contains("FASTEST"), "{algorithm}");
    }

    #[test]
    fn plaintext_is_denied_in_the_kernel_where_only_identities_are_let_in() {
        let config = |policies: &str| -> MeshConfig {
            serde_yaml::from_str(&format!(
                "namespaces: [{{ name: shop, mode: PERMISSIVE }}]\n\
                 workloads: [{{ name: api, namespace: shop, ip: 10.244.1.2 }}]\n\
                 authorizationPolicies: {policies}"
            ))
            .unwrap()
        };
        let plaintext = |policies: &str| config(policies).plaintext_policy("shop", "api");
        let allow_shop = "[{ name: a, namespace: shop, workloads: [shop/api], \
                          rules: [{ from: [{ namespaces: [shop] }] }] }]";
        assert_eq!(
            plaintext(allow_shop),
            PlaintextPolicy {
                denied: true,
                ports: BTreeMap::new()
            }
        );
        let deny_anonymous_on_9000 = "[{ name: d, namespace: shop, action: DENY, \
            workloads: [shop/api], rules: [{ from: [{ notPrincipals: ['*'] }], to: [{ ports: [9000] }] }] }]";
        assert_eq!(
            plaintext(deny_anonymous_on_9000),
            PlaintextPolicy {
                denied: false,
                ports: [(9000, true)].into()
            }
        );
        // Source addresses decide: the kernel cannot, so nothing is denied there.
        let by_address = "[{ name: a, namespace: shop, workloads: [shop/api], \
                          rules: [{ from: [{ ipBlocks: [10.0.0.0/8] }] }] }]";
        assert_eq!(plaintext(by_address), PlaintextPolicy::default());
        let dry_run = "[{ name: a, namespace: shop, dryRun: true, workloads: [shop/api] }]";
        assert_eq!(plaintext(dry_run), PlaintextPolicy::default());
        assert_eq!(plaintext("[]"), PlaintextPolicy::default());

        let policy = plaintext(deny_anonymous_on_9000);
        assert_eq!(
            policy.kernel_mode(PeerMode::Permissive, Some(9000)),
            Mode::Deny
        );
        assert_eq!(
            policy.kernel_mode(PeerMode::Permissive, Some(80)),
            Mode::Permissive
        );
        assert_eq!(
            policy.kernel_mode(PeerMode::Permissive, None),
            Mode::Permissive
        );
        assert_eq!(
            policy.kernel_mode(PeerMode::Strict, Some(9000)),
            Mode::Strict
        );
        assert_eq!(
            policy.kernel_mode(PeerMode::Disable, Some(9000)),
            Mode::Disable
        );
    }
}
