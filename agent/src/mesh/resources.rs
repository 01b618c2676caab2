//! The mesh configuration as the controller streams it: a set of protobuf resources
//! (`weft.config.v1`), kept up to date by snapshots and deltas, and turned into the
//! same [`MeshConfig`] the file gives.
//!
//! A large cluster streams a hundred thousand workloads, and a delta names one of them:
//! each workload and service resource keeps what it decoded to, so a new version
//! decodes only what the delta changed and shares the rest with the version before.

pub mod dump;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use bytes::Bytes;

use weft_api::{
    authz,
    config::v1::{
        self as proto, ConfigUpdate, Kind, LoadBalancing as WireBalancing, PeerMode as WireMode,
    },
    retry::RetryOn,
};

use crate::proxy::{
    balance::Outlier,
    breaker::Limits,
    retry::{BudgetPolicy, RetryPolicy},
};

use super::{
    HboneAddress, LoadBalancing, MeshConfig, MeshNamespace, Node, PeerMode, Service, ServicePort,
    TrustAnchor, Workload,
};

/// The resources a controller sent, by kind and name, as encoded on the wire. No kind
/// is left without a resource.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    resources: BTreeMap<String, BTreeMap<String, Entry>>,
    shared: SharedNames,
}

/// Two sets of resources are equal by their resources.
impl PartialEq for Resources {
    fn eq(&self, other: &Self) -> bool {
        self.resources == other.resources
    }
}

impl Eq for Resources {}

/// The names many workloads carry (namespaces, service accounts, nodes), held once.
#[derive(Clone, Debug, Default)]
struct SharedNames(HashSet<Arc<str>>);

impl SharedNames {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(name);
        self.0.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets the names no workload carries any more.
    fn forget_unused(&mut self) {
        self.0.retain(|name| Arc::strong_count(name) > 1);
    }
}

/// One resource as received, and what it decoded to the last time a configuration
/// was built from it.
#[derive(Clone, Debug)]
struct Entry {
    body: Bytes,
    decoded: Option<Decoded>,
}

/// Two entries are the same resource when their bodies are.
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
    }
}

impl Eq for Entry {}

/// What a resource contributes to the configuration, kept until it changes.
#[derive(Clone, Debug)]
enum Decoded {
    /// `None`: a pod without an address yet.
    Workload(Option<Arc<Workload>>),
    Service(Box<ServiceEntries>),
    TrafficPolicy(Arc<proto::TrafficPolicy>),
}

/// A service's entries (one per VIP), built with its TrafficPolicy as it was then.
#[derive(Clone, Debug)]
struct ServiceEntries {
    policy: Option<Bytes>,
    entries: Vec<Arc<Service>>,
}

impl Resources {
    /// Applies `update` (a snapshot replaces everything; a delta changes what it names).
    pub fn apply(&mut self, update: &ConfigUpdate) -> Result<(), String> {
        if update.snapshot {
            self.resources.clear();
        }
        for removal in &update.removals {
            if let Some(named) = self.resources.get_mut(&removal.kind) {
                named.remove(&removal.name);
                if named.is_empty() {
                    self.resources.remove(&removal.kind);
                }
            }
        }
        for (index, resource) in update.upserts.iter().enumerate() {
            let key = resource
                .key
                .as_ref()
                .ok_or_else(|| format!("upserts[{index}] has no key"))?;
            let entry = Entry {
                body: resource.body.clone(),
                decoded: None,
            };
            let named = match self.resources.get_mut(&key.kind) {
                Some(named) => named,
                None => self.resources.entry(key.kind.clone()).or_default(),
            };
            named.insert(key.name.clone(), entry);
        }
        Ok(())
    }

    /// Everything as one snapshot (for the agent's cache).
    pub fn snapshot(&self, version: &str) -> ConfigUpdate {
        ConfigUpdate {
            version: version.to_owned(),
            snapshot: true,
            upserts: self
                .resources
                .iter()
                .flat_map(|(kind, named)| named.iter().map(move |entry| (kind, entry)))
                .map(|(kind, (name, entry))| proto::Resource {
                    key: Some(proto::ResourceKey {
                        kind: kind.clone(),
                        name: name.clone(),
                    }),
                    body: entry.body.clone(),
                })
                .collect(),
            removals: Vec::new(),
        }
    }

    /// How many resources of each kind there are.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.resources
            .iter()
            .map(|(kind, named)| (kind.clone(), named.len()))
            .collect()
    }

    fn decode<M: Kind>(&self) -> Result<Vec<(String, M)>, String> {
        self.resources
            .get(M::KIND)
            .into_iter()
            .flatten()
            .map(|(name, entry)| decode::<M>(name, &entry.body).map(|m| (name.clone(), m)))
            .collect()
    }

    /// How many resources of `kind` there are.
    fn count(&self, kind: &str) -> usize {
        self.resources.get(kind).map_or(0, BTreeMap::len)
    }

    /// The entries of `kind`, by name, to read and remember what they decode to.
    fn entries_mut(&mut self, kind: &str) -> impl Iterator<Item = (&String, &mut Entry)> {
        self.resources.get_mut(kind).into_iter().flatten()
    }

    /// Every workload with an address, decoded once per change.
    fn workloads(&mut self) -> Result<Vec<Arc<Workload>>, String> {
        let mut workloads = Vec::with_capacity(self.count(proto::Workload::KIND));
        let shared = &mut self.shared;
        let entries = self.resources.get_mut(proto::Workload::KIND);
        for (name, entry) in entries.into_iter().flatten() {
            let workload = match &entry.decoded {
                Some(Decoded::Workload(workload)) => workload.clone(),
                _ => {
                    let workload =
                        workload(name, &decode(name, &entry.body)?, shared)?.map(Arc::new);
                    entry.decoded = Some(Decoded::Workload(workload.clone()));
                    workload
                }
            };
            workloads.extend(workload);
        }
        shared.forget_unused();
        Ok(workloads)
    }

    /// The TrafficPolicies by the service they are for, with their bodies.
    fn traffic_policies(&mut self) -> Result<PoliciesByService, String> {
        let mut policies = PoliciesByService::new();
        for (name, entry) in self.entries_mut(proto::TrafficPolicy::KIND) {
            let policy = match &entry.decoded {
                Some(Decoded::TrafficPolicy(policy)) => Arc::clone(policy),
                _ => {
                    let policy = Arc::new(decode::<proto::TrafficPolicy>(name, &entry.body)?);
                    entry.decoded = Some(Decoded::TrafficPolicy(Arc::clone(&policy)));
                    policy
                }
            };
            policies
                .entry(policy.namespace.clone())
                .or_default()
                .insert(policy.service.clone(), (entry.body.clone(), policy));
        }
        Ok(policies)
    }

    /// Every service's entries (one per VIP), rebuilt when the service or its
    /// TrafficPolicy changed.
    fn services(&mut self) -> Result<Vec<Arc<Service>>, String> {
        let policies = self.traffic_policies()?;
        let mut services = Vec::with_capacity(self.count(proto::Service::KIND));
        for (name, entry) in self.entries_mut(proto::Service::KIND) {
            if let Some(Decoded::Service(built)) = &entry.decoded {
                let ServiceEntries { policy, entries } = &**built;
                let current = policy_of(&policies, &entries[0].namespace, &entries[0].name)
                    .map(|(body, _)| body);
                if policy.as_ref() == current {
                    services.extend(entries.iter().cloned());
                    continue;
                }
            }
            let service = decode::<proto::Service>(name, &entry.body)?;
            let policy = policy_of(&policies, &service.namespace, &service.name);
            let entries: Vec<Arc<Service>> =
                service_entries(name, &service, policy.map(|(_, policy)| &**policy))?
                    .into_iter()
                    .map(Arc::new)
                    .collect();
            services.extend(entries.iter().cloned());
            if !entries.is_empty() {
                entry.decoded = Some(Decoded::Service(Box::new(ServiceEntries {
                    policy: policy.map(|(body, _)| body.clone()),
                    entries,
                })));
            }
        }
        Ok(services)
    }

    /// The mesh configuration these resources describe, validated as a file would be.
    /// Of the traffic policies, the agent takes the balancing algorithm (one it does
    /// not know is its default), timeouts, retries, connection limits and outlier
    /// detection. An authorization policy, a route or a retry condition it cannot read
    /// makes the whole version invalid: enforcing the others without it could let in
    /// what it denies, or send requests where the route does not.
    pub fn mesh(&mut self) -> Result<MeshConfig, String> {
        if let Some((kind, named)) = self
            .resources
            .iter()
            .find(|(kind, _)| !proto::KINDS.contains(&kind.as_str()))
        {
            let name = named.keys().next().map_or("", String::as_str);
            return Err(format!(
                "{kind} {name}: a kind this agent does not know; is the agent older than the controller?"
            ));
        }
        let settings = self
            .decode::<proto::MeshSettings>()?
            .into_iter()
            .next()
            .map(|(_, settings)| settings)
            .unwrap_or_default();
        let mut config = MeshConfig {
            revision: 0,
            trust_domain: if settings.trust_domain.is_empty() {
                MeshConfig::default().trust_domain
            } else {
                settings.trust_domain
            },
            exclude_ports: settings
                .exclude_ports
                .iter()
                .map(|&port| port_number("MeshSettings mesh: exclude_ports", port))
                .collect::<Result<_, _>>()?,
            ..MeshConfig::default()
        };
        for (_, bundle) in self.decode::<proto::TrustBundle>()? {
            config.trust_anchors = bundle
                .anchors
                .into_iter()
                .map(|anchor| TrustAnchor {
                    certificate: anchor.certificate,
                    signing: anchor.signing,
                    retire_at: u64::try_from(anchor.retire_at)
                        .ok()
                        .filter(|&secs| secs > 0)
                        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs)),
                })
                .collect();
        }
        for (name, node) in self.decode::<proto::Node>()? {
            config.nodes.push(Node {
                address: node
                    .address
                    .parse()
                    .map_err(|_| format!("Node {name}: address {:?} is not an IP", node.address))?,
                hbone_address: match node.hbone_address() {
                    proto::HboneAddress::Node => HboneAddress::Node,
                    proto::HboneAddress::Pod => HboneAddress::Pod,
                },
                name: node.name,
                zone: Some(node.zone).filter(|zone| !zone.is_empty()),
            });
        }
        for (name, namespace) in self.decode::<proto::Namespace>()? {
            config.namespaces.push(MeshNamespace {
                mode: mode(namespace.mode).ok_or_else(|| format!("Namespace {name}: no mode"))?,
                name: namespace.name,
            });
        }
        config.workloads = self.workloads()?;
        config.services = self.services()?;
        for (name, routes) in self.decode::<proto::ServiceRoutes>()? {
            let routes = weft_api::routes::ServiceRoutes::try_from(&routes)
                .map_err(|problem| format!("ServiceRoutes {name}: {problem}"))?;
            config.routes.insert(name, routes);
        }
        for (name, policy) in self.decode::<proto::AuthorizationPolicy>()? {
            config.authorization_policies.push(
                authz::Policy::try_from(&policy)
                    .map_err(|problem| format!("AuthorizationPolicy {name}: {problem}"))?,
            );
        }
        config
            .validate()
            .map_err(|problem| format!("the streamed configuration is invalid: {problem}"))?;
        Ok(config)
    }
}

/// The TrafficPolicies' bodies and contents, by namespace and service.
type PoliciesByService = BTreeMap<String, BTreeMap<String, (Bytes, Arc<proto::TrafficPolicy>)>>;

fn policy_of<'a>(
    policies: &'a PoliciesByService,
    namespace: &str,
    service: &str,
) -> Option<&'a (Bytes, Arc<proto::TrafficPolicy>)> {
    policies.get(namespace)?.get(service)
}

fn decode<M: Kind>(name: &str, body: &Bytes) -> Result<M, String> {
    M::decode(body.as_ref()).map_err(|err| format!("{} {name}: {err}", M::KIND))
}

/// Workload resource `name`; `None` while it has no address.
fn workload(
    name: &str,
    workload: &proto::Workload,
    shared: &mut SharedNames,
) -> Result<Option<Workload>, String> {
    // A pod has no address until its network is set up: nothing to route yet.
    let Some(first) = workload.ips.first() else {
        return Ok(None);
    };
    let ip = first
        .parse()
        .map_err(|_| format!("Workload {name}: ips[0] {first:?} is not an IP"))?;
    let port_modes = workload
        .port_modes
        .iter()
        .map(|(&port, &wire)| {
            let port = port_number(&format!("Workload {name}: port_modes"), port)?;
            let mode = mode(wire)
                .ok_or_else(|| format!("Workload {name}: port_modes[{port}] has no mode"))?;
            Ok((port, mode))
        })
        .collect::<Result<_, String>>()?;
    Ok(Some(Workload {
        name: workload.name.clone(),
        namespace: shared.get(&workload.namespace),
        service_account: shared.get(&workload.service_account),
        node: Some(&workload.node)
            .filter(|node| !node.is_empty())
            .map(|node| shared.get(node)),
        ip,
        labels: workload
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        mode: mode(workload.mode),
        port_modes,
        opted_out: workload.opted_out,
    }))
}

/// The entries of service resource `name` (one per VIP), with what its TrafficPolicy
/// sets.
fn service_entries(
    name: &str,
    service: &proto::Service,
    policy: Option<&proto::TrafficPolicy>,
) -> Result<Vec<Service>, String> {
    let ports: Vec<ServicePort> = service
        .ports
        .iter()
        .map(|port| {
            Ok(ServicePort {
                port: port_number(&format!("Service {name}: ports"), port.port)?,
                target_port: Some(port_number(
                    &format!("Service {name}: target_port"),
                    port.target_port,
                )?),
                name: Some(port.name.clone()).filter(|name| !name.is_empty()),
                // Older controllers sent "TCP" for a port without one.
                app_protocol: Some(port.app_protocol.clone())
                    .filter(|protocol| !protocol.is_empty() && protocol != "TCP"),
            })
        })
        .collect::<Result<_, String>>()?;
    let endpoints = service
        .endpoints
        .iter()
        .map(|endpoint| {
            endpoint
                .parse()
                .map_err(|_| format!("Service {name}: endpoint {endpoint:?} is not an IP"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = service
        .endpoint_weights
        .iter()
        .map(|(endpoint, &weight)| {
            let ip = endpoint.parse().map_err(|_| {
                format!("Service {name}: endpoint_weights: {endpoint:?} is not an IP")
            })?;
            Ok((ip, weight))
        })
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    let timeout = |millis: fn(&proto::TrafficPolicy) -> u64| {
        policy
            .map(millis)
            .filter(|&millis| millis > 0)
            .map(Duration::from_millis)
    };
    let idle_timeout = timeout(|policy| policy.idle_timeout_ms);
    let connect_timeout = timeout(|policy| policy.connect_timeout_ms);
    let request_timeout = timeout(|policy| policy.request_timeout_ms);
    let stream_idle_timeout = timeout(|policy| policy.stream_idle_timeout_ms);
    let load_balancing = policy.and_then(|policy| balancing(policy.load_balancing));
    let outlier = policy
        .and_then(|policy| policy.outlier_detection.as_ref())
        .map(|outlier| Outlier {
            consecutive_failures: outlier.consecutive_failures.max(1),
            consecutive_gateway_errors: Some(outlier.consecutive_gateway_errors)
                .filter(|&count| count > 0),
            consecutive_connect_failures: Some(outlier.consecutive_connect_failures)
                .filter(|&count| count > 0),
            base_ejection: Some(outlier.base_ejection_ms)
                .filter(|&millis| millis > 0)
                .map_or(DEFAULT_BASE_EJECTION, Duration::from_millis),
            max_ejection_percent: match outlier.max_ejection_percent {
                0 => DEFAULT_MAX_EJECTION_PERCENT,
                percent => percent.min(100),
            },
        });
    let retries = policy
        .and_then(|policy| policy.retries.as_ref())
        .map(retry_policy)
        .transpose()
        .map_err(|problem| format!("Service {name}: TrafficPolicy retries: {problem}"))?
        .map(Arc::new);
    let limits = policy
        .and_then(|policy| policy.limits.as_ref())
        .map(|limits| {
            let set = |limit: u32| Some(limit).filter(|&limit| limit > 0);
            Limits {
                max_connections: set(limits.max_connections),
                max_requests: set(limits.max_requests),
                max_pending_requests: set(limits.max_pending_requests),
                max_requests_per_connection: set(limits.max_requests_per_connection),
            }
        });
    // One service entry per VIP (dual-stack services have two).
    service
        .vips
        .iter()
        .map(|vip| {
            Ok(Service {
                name: service.name.clone(),
                namespace: service.namespace.clone(),
                vip: vip
                    .parse()
                    .map_err(|_| format!("Service {name}: VIP {vip:?} is not an IP"))?,
                ports: ports.clone(),
                endpoints: endpoints.clone(),
                idle_timeout,
                connect_timeout,
                request_timeout,
                stream_idle_timeout,
                load_balancing,
                prefer_close: service.prefer_close,
                weights: weights.clone(),
                outlier,
                retries: retries.clone(),
                limits,
            })
        })
        .collect()
}

/// How long an endpoint is first ejected when the policy does not say (Envoy's default).
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// The share of a service's endpoints that may be out at once when the policy does not
/// say (Envoy's and Istio's default; at least one may always be).
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// A service's retries as its TrafficPolicy sets them.
fn retry_policy(retries: &proto::Retries) -> Result<RetryPolicy, String> {
    let retry_on = retries
        .retry_on
        .iter()
        .map(|condition| RetryOn::parse(condition))
        .collect::<Result<_, _>>()?;
    Ok(RetryPolicy {
        attempts: retries.attempts.min(10),
        per_try_timeout: Some(retries.per_try_timeout_ms)
            .filter(|&millis| millis > 0)
            .map(Duration::from_millis),
        retry_on,
        non_idempotent: retries.non_idempotent,
        budget: if retries.budget_set {
            BudgetPolicy {
                percent: retries.budget_percent.min(100),
                min_per_second: retries.budget_min_per_second,
            }
        } else {
            BudgetPolicy::default()
        },
    })
}

fn mode(wire: i32) -> Option<PeerMode> {
    match WireMode::try_from(wire).ok()? {
        WireMode::Strict => Some(PeerMode::Strict),
        WireMode::Permissive => Some(PeerMode::Permissive),
        WireMode::Disable => Some(PeerMode::Disable),
        WireMode::Unspecified => None,
    }
}

/// The algorithm a policy names; `None` when it names none, or one this agent does
/// not know (a newer controller's): the agent's default balances then.
fn balancing(wire: i32) -> Option<LoadBalancing> {
    match WireBalancing::try_from(wire).ok()? {
        WireBalancing::RoundRobin => Some(LoadBalancing::RoundRobin),
        WireBalancing::Random => Some(LoadBalancing::Random),
        WireBalancing::LeastRequest => Some(LoadBalancing::LeastRequest),
        WireBalancing::PeakEwma => Some(LoadBalancing::PeakEwma),
        WireBalancing::Unspecified => None,
    }
}

fn port_number(field: &str, port: u32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("{field}: {port} is not a port"))
}

#[cfg(test)]
mod tests {
    use weft_api::config::v1::{Resource, ResourceKey};

    use super::*;
    use crate::mesh::Protocol;

    pub(super) fn resource<M: Kind>(name: &str, message: &M) -> Resource {
        Resource {
            key: Some(ResourceKey {
                kind: M::KIND.to_owned(),
                name: name.to_owned(),
            }),
            body: message.encode_to_vec().into(),
        }
    }

    fn snapshot() -> ConfigUpdate {
        ConfigUpdate {
            version: "v1".into(),
            snapshot: true,
            upserts: vec![
                resource(
                    "mesh",
                    &proto::MeshSettings {
                        trust_domain: "example.org".into(),
                        exclude_ports: vec![22],
                    },
                ),
                resource(
                    "mesh",
                    &proto::TrustBundle {
                        anchors: vec![
                            proto::TrustAnchor {
                                certificate: b"new root".to_vec(),
                                signing: true,
                                retire_at: 0,
                            },
                            proto::TrustAnchor {
                                certificate: b"old root".to_vec(),
                                signing: false,
                                retire_at: 1_900_000_000,
                            },
                        ],
                    },
                ),
                resource(
                    "node0",
                    &proto::Node {
                        name: "node0".into(),
                        address: "10.99.0.1".into(),
                        zone: "zone-a".into(),
                        hbone_address: proto::HboneAddress::Pod as i32,
                    },
                ),
                resource(
                    "shop",
                    &proto::Namespace {
                        name: "shop".into(),
                        mode: WireMode::Permissive as i32,
                    },
                ),
                resource(
                    "shop/web",
                    &proto::Workload {
                        name: "web".into(),
                        namespace: "shop".into(),
                        service_account: "web".into(),
                        node: "node0".into(),
                        ips: vec!["10.244.0.2".into()],
                        mode: WireMode::Strict as i32,
                        port_modes: [(9090, WireMode::Disable as i32)].into(),
                        ..Default::default()
                    },
                ),
                resource(
                    "shop/pending",
                    &proto::Workload {
                        name: "pending".into(),
                        namespace: "shop".into(),
                        node: "node0".into(),
                        ..Default::default()
                    },
                ),
                resource(
                    "shop/web",
                    &proto::Service {
                        name: "web".into(),
                        namespace: "shop".into(),
                        vips: vec!["10.96.0.10".into(), "fd00::10".into()],
                        ports: vec![
                            proto::ServicePort {
                                port: 80,
                                target_port: 8080,
                                name: "http".into(),
                                app_protocol: "kubernetes.io/h2c".into(),
                            },
                            proto::ServicePort {
                                port: 81,
                                target_port: 8081,
                                name: "grpc-api".into(),
                                // As older controllers sent a port without appProtocol.
                                app_protocol: "TCP".into(),
                            },
                            proto::ServicePort {
                                port: 82,
                                target_port: 8082,
                                ..Default::default()
                            },
                        ],
                        endpoints: vec!["10.244.0.2".into(), "10.244.9.9".into()],
                        prefer_close: true,
                        endpoint_weights: [("10.244.9.9".into(), 0)].into(),
                    },
                ),
                resource(
                    "shop/web",
                    &proto::TrafficPolicy {
                        service: "web".into(),
                        namespace: "shop".into(),
                        idle_timeout_ms: 3000,
                        load_balancing: WireBalancing::LeastRequest as i32,
                        retries: Some(proto::Retries::default()),
                        ..Default::default()
                    },
                ),
            ],
            removals: vec![],
        }
    }

    #[test]
    fn snapshots_and_deltas_make_the_file_model() {
        let mut resources = Resources::default();
        resources.apply(&snapshot()).unwrap();
        let mesh = resources.mesh().unwrap();
        assert_eq!(mesh.trust_domain, "example.org");
        assert_eq!(mesh.exclude_ports, [22]);
        assert_eq!(
            mesh.trust_anchors,
            [
                TrustAnchor {
                    certificate: b"new root".to_vec(),
                    signing: true,
                    retire_at: None,
                },
                TrustAnchor {
                    certificate: b"old root".to_vec(),
                    signing: false,
                    retire_at: Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000)),
                },
            ]
        );
        assert_eq!(mesh.mode_of("shop"), Some(PeerMode::Permissive));
        assert_eq!(mesh.workloads.len(), 1, "a pod without an address waits");
        let (pod_mode, ports) = mesh.pod_modes("shop", "web").unwrap();
        assert_eq!(
            (pod_mode, ports.get(&9090)),
            (PeerMode::Strict, Some(&PeerMode::Disable))
        );
        assert_eq!(
            mesh.pod_modes("shop", "pending").unwrap().0,
            PeerMode::Permissive,
            "unlisted pods take the namespace's mode"
        );
        assert_eq!(mesh.services.len(), 2, "one entry per VIP");
        assert!(
            mesh.services
                .iter()
                .all(|service| service.idle_timeout == Some(Duration::from_secs(3))),
            "the TrafficPolicy's idle timeout applies"
        );
        assert_eq!(mesh.longest_idle_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(mesh.zone("node0"), Some("zone-a"));
        assert_eq!(
            mesh.node("node0").map(|node| node.hbone_address),
            Some(HboneAddress::Pod)
        );
        let web = &mesh.services[1];
        assert_eq!(web.vip.to_string(), "fd00::10");
        assert_eq!(
            (web.balancing(), web.prefer_close),
            (LoadBalancing::LeastRequest, true),
            "the TrafficPolicy's algorithm, the Service's locality"
        );
        let weight = |ip: &str| web.weight(ip.parse().unwrap());
        assert_eq!((weight("10.244.0.2"), weight("10.244.9.9")), (1, 0));
        let ports: Vec<_> = web
            .ports
            .iter()
            .map(|port| (port.name.as_deref(), port.protocol()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("http"), Protocol::Http2),
                (Some("grpc-api"), Protocol::Grpc),
                (None, Protocol::Detect)
            ],
            "\"TCP\" from an older controller is no appProtocol"
        );
        assert_eq!(resources.counts()["weft.config.v1.TrafficPolicy"], 1);

        let delta = ConfigUpdate {
            version: "v2".into(),
            snapshot: false,
            upserts: vec![],
            removals: vec![ResourceKey {
                kind: proto::Service::KIND.into(),
                name: "shop/web".into(),
            }],
        };
        resources.apply(&delta).unwrap();
        assert!(resources.mesh().unwrap().services.is_empty());
        let mut copy = Resources::default();
        copy.apply(&resources.snapshot("v2")).unwrap();
        assert_eq!(copy, resources);
    }

    #[test]
    fn a_delta_rebuilds_what_it_changed_and_shares_the_rest() {
        let delta = |upserts: Vec<Resource>, removals: Vec<ResourceKey>| ConfigUpdate {
            version: "next".into(),
            snapshot: false,
            upserts,
            removals,
        };
        let web = |ip: &str| proto::Workload {
            name: "web".into(),
            namespace: "shop".into(),
            node: "node0".into(),
            ips: vec![ip.into()],
            ..Default::default()
        };
        let policy = |idle_timeout_ms| proto::TrafficPolicy {
            service: "web".into(),
            namespace: "shop".into(),
            idle_timeout_ms,
            ..Default::default()
        };
        let mut resources = Resources::default();
        resources.apply(&snapshot()).unwrap();
        let first = resources.mesh().unwrap();

        // A new pod and a changed policy: the old pod is shared, the services rebuilt.
        let api = proto::Workload {
            name: "api".into(),
            ..web("10.244.0.3")
        };
        resources
            .apply(&delta(
                vec![
                    resource("shop/api", &api),
                    resource("shop/web", &policy(5000)),
                ],
                vec![],
            ))
            .unwrap();
        let second = resources.mesh().unwrap();
        assert_eq!(second.workloads.len(), 2);
        assert!(Arc::ptr_eq(&first.workloads[0], &second.workloads[1]));
        assert_eq!(second.workloads[0].name, "api");
        assert!(second.services.iter().all(|service| {
            service.idle_timeout == Some(Duration::from_secs(5)) && service.retries.is_none()
        }));

        // A pod moved: it alone is new; the services are those of the version before.
        resources
            .apply(&delta(
                vec![resource("shop/web", &web("10.244.0.4"))],
                vec![],
            ))
            .unwrap();
        let third = resources.mesh().unwrap();
        assert!(Arc::ptr_eq(&second.workloads[0], &third.workloads[0]));
        assert_eq!(third.workloads[1].ip.to_string(), "10.244.0.4");
        assert!(
            third
                .workload_by_ip("10.244.0.2".parse().unwrap())
                .is_none()
        );
        assert!(
            (second.services.iter().zip(&third.services))
                .all(|(before, after)| Arc::ptr_eq(before, after))
        );

        // The policy gone: the services are back to the defaults.
        let policy_key = ResourceKey {
            kind: proto::TrafficPolicy::KIND.into(),
            name: "shop/web".into(),
        };
        resources.apply(&delta(vec![], vec![policy_key])).unwrap();
        let fourth = resources.mesh().unwrap();
        assert!(
            fourth
                .services
                .iter()
                .all(|service| service.idle_timeout.is_none()
                    && service.balancing() == LoadBalancing::default())
        );
        // Built afresh from the same resources, the same configuration.
        let mut fresh = Resources::default();
        fresh.apply(&resources.snapshot("again")).unwrap();
        assert_eq!(fresh.mesh().unwrap(), fourth);
    }

    #[test]
    fn algorithms_this_agent_does_not_know_are_its_default() {
        let cases = [
            (WireBalancing::Unspecified as i32, None),
            (
                WireBalancing::RoundRobin as i32,
                Some(LoadBalancing::RoundRobin),
            ),
            (WireBalancing::Random as i32, Some(LoadBalancing::Random)),
            (
                WireBalancing::LeastRequest as i32,
                Some(LoadBalancing::LeastRequest),
            ),
            (
                WireBalancing::PeakEwma as i32,
                Some(LoadBalancing::PeakEwma),
            ),
            (99, None),
        ];
        for (wire, algorithm) in cases {
            assert_eq!(balancing(wire), algorithm, "{wire}");
        }
    }

    #[test]
    fn bad_resources_are_named() {
        let mut resources = Resources::default();
        let mut update = snapshot();
        update.upserts.push(resource(
            "node1",
            &proto::Node {
                name: "node1".into(),
                address: "nowhere".into(),
                ..Default::default()
            },
        ));
        resources.apply(&update).unwrap();
        let error = resources.mesh().unwrap_err();
        assert!(error.starts_with("Node node1: address"), "{error}");

        let mut resources = Resources::default();
        let mut update = snapshot();
        update.upserts.push(Resource {
            key: Some(ResourceKey {
                kind: "weft.config.v9.Teleporter".into(),
                name: "x".into(),
            }),
            body: Bytes::new(),
        });
        resources.apply(&update).unwrap();
        assert!(resources.mesh().unwrap_err().contains("does not know"));

        let mut resources = Resources::default();
        let mut update = snapshot();
        update.upserts[2].body = Bytes::from_static(&[0xff, 0xff, 0xff]);
        resources.apply(&update).unwrap();
        assert!(
            resources
                .mesh()
                .unwrap_err()
                .starts_with("weft.config.v1.Node node0")
        );
    }
}
