//! The config compiler: the cluster's objects in, each node's view out, and a verdict
//! for every policy and route. Pure: no I/O, no clock, the same objects always give
//! the same views (and so the same versions). A verdict says `Accepted` only for what
//! the agents enforce ([`enforcement`]).
//!
//! What a node gets: the mesh settings, the trust bundle, every node's HBONE address and
//! zone, every meshed namespace and workload (any pod may be a destination), every
//! meshed service with its ready endpoints and their weights, traffic policies and
//! routes (clients apply them) — all shared by every node — and, for itself only, the
//! authorization policies that select its workloads.

mod authorization;
mod enforcement;
mod faults;
mod membership;
mod routes;
mod services;
mod traffic;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_api::{
    ZONE_LABEL,
    config::v1::{HboneAddress, MeshSettings, Node, TrustBundle},
    crd::{HBONE_ADDRESS_ANNOTATION, WorkloadSelector},
};

use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, Statuses, Verdict},
    view::{NodeView, ResourceSet, SharedChanges},
};

/// Mesh-wide settings that are not Kubernetes objects.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    /// Policies without a selector in this namespace apply to the whole mesh.
    pub root_namespace: String,
    /// Destination ports never captured.
    pub exclude_ports: Vec<u16>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".to_owned(),
            root_namespace: "weft-system".to_owned(),
            exclude_ports: Vec::new(),
        }
    }
}

/// The compiler's output.
#[derive(Clone, Debug, Default)]
pub struct Compiled {
    /// What every node gets.
    pub shared: Arc<ResourceSet>,
    /// What only one node gets, by node name.
    pub local: BTreeMap<String, Arc<ResourceSet>>,
    /// A verdict for every weft resource and route.
    pub statuses: Statuses,
    /// The changes of `shared` from an earlier generation's, once computed.
    pub shared_changes: SharedChanges,
}

impl Compiled {
    /// The view of node `node` (a node the compiler has not heard of gets the shared
    /// part only).
    pub fn view(&self, node: &str) -> NodeView {
        NodeView::new(
            Arc::clone(&self.shared),
            self.local.get(node).cloned().unwrap_or_default(),
        )
    }
}

/// Compiles `objects` into every node's view, with the mesh CA's `trust` bundle.
pub fn compile(objects: &Objects, settings: &Settings, trust: &TrustBundle) -> Compiled {
    let mut statuses = Statuses::new();
    let mut shared = ResourceSet::default();
    let mut local: BTreeMap<String, ResourceSet> = BTreeMap::new();

    shared.insert(
        "mesh",
        &MeshSettings {
            trust_domain: settings.trust_domain.clone(),
            exclude_ports: settings
                .exclude_ports
                .iter()
                .map(|&p| u32::from(p))
                .collect(),
        },
    );
    if !trust.anchors.is_empty() {
        shared.insert("mesh", trust);
    }
    for (key, node) in &objects.nodes {
        if let Some(address) = node_address(node) {
            shared.insert(
                key.name.clone(),
                &Node {
                    name: key.name.clone(),
                    address,
                    zone: node
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|labels| labels.get(ZONE_LABEL))
                        .cloned()
                        .unwrap_or_default(),
                    hbone_address: hbone_address(node).unwrap_or_else(|problem| {
                        let verdict = Verdict::rejected(Reason::Invalid, problem);
                        judge(&mut statuses, Kind::Node, key, &node.metadata, verdict);
                        HboneAddress::Node
                    }) as i32,
                },
            );
            local.entry(key.name.clone()).or_default();
        }
    }

    let mesh = membership::compile(objects, settings, &mut statuses);
    for namespace in mesh.namespaces.values() {
        shared.insert(namespace.name.clone(), namespace);
    }
    for (key, workload) in &mesh.workloads {
        shared.insert(key.to_string(), workload);
    }
    let traffic = traffic::compile(objects, &mut statuses);
    let services = services::compile(objects, &mesh, &traffic.prefer_close);
    for (key, service) in &services {
        shared.insert(key.to_string(), service);
    }
    for (key, policy) in traffic.policies {
        shared.insert(key.to_string(), &policy);
    }
    faults::compile(objects, &mut statuses);
    for (name, routes) in routes::compile(objects, &services, &mut statuses) {
        shared.insert(name, &routes);
    }
    for (node, policies) in
        authorization::compile(objects, settings, &mesh, &services, &mut statuses)
    {
        let set = local.entry(node).or_default();
        for policy in policies {
            set.insert(format!("{}/{}", policy.namespace, policy.name), &policy);
        }
    }
    Compiled {
        shared: Arc::new(shared),
        local: local
            .into_iter()
            .map(|(node, set)| (node, Arc::new(set)))
            .collect(),
        statuses,
        shared_changes: SharedChanges::default(),
    }
}

/// Where a node takes HBONE tunnels: on each pod's address when its annotation says
/// `pod`, on its own without one or when it says `node`. Anything else is the
/// annotation's problem, and the node's own address is used.
fn hbone_address(node: &k8s_openapi::api::core::v1::Node) -> Result<HboneAddress, String> {
    let value = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(HBONE_ADDRESS_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("node") => Ok(HboneAddress::Node),
        Some("pod") => Ok(HboneAddress::Pod),
        Some(other) => Err(format!(
            "metadata.annotations[\"{HBONE_ADDRESS_ANNOTATION}\"]: {other:?} is neither \"node\" nor \"pod\"; the node's HBONE peer is dialed at the node's address"
        )),
    }
}

/// The address a node's agent takes HBONE on: its InternalIP, else its ExternalIP.
fn node_address(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    ["InternalIP", "ExternalIP"].iter().find_map(|kind| {
        addresses
            .iter()
            .find(|address| address.type_ == *kind)
            .map(|address| address.address.clone())
    })
}

/// Whether `labels` carry every label `selector` asks for.
fn selects(selector: &WorkloadSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

/// Orders objects oldest first (creation time, then namespace and name): where two
/// objects decide the same thing, the older one wins, as in Istio and Gateway API.
fn by_age<'a, T>(
    objects: impl IntoIterator<Item = (&'a ObjectKey, &'a T)>,
    meta: impl Fn(&T) -> &ObjectMeta,
) -> Vec<(&'a ObjectKey, &'a T)>
where
    T: 'a,
{
    let mut sorted: Vec<_> = objects.into_iter().collect();
    sorted.sort_by(|(a_key, a), (b_key, b)| {
        let created = |object: &T| {
            meta(object)
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.as_second())
        };
        (created(a), *a_key).cmp(&(created(b), *b_key))
    });
    sorted
}

/// Records `verdict` for the object of `kind` with `meta`.
fn judge(
    statuses: &mut Statuses,
    kind: Kind,
    key: &ObjectKey,
    meta: &ObjectMeta,
    verdict: Verdict,
) {
    statuses.insert((kind, key.clone()), verdict.for_generation(meta.generation));
}

/// The verdict of a valid policy that selects `count` pods, described as `selected`.
/// The message leaves the count out: pods come and go, and every new message would be
/// a status write.
fn applies_to(count: usize, selected: &str) -> Verdict {
    if count == 0 {
        Verdict::accepted(
            Reason::NoMatchingPods,
            format!("applies to {selected}, and there are none yet"),
        )
    } else {
        Verdict::accepted(Reason::Accepted, format!("applies to {selected}"))
    }
}

/// Names of at most a few items, for a message.
fn some_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: BTreeSet<&str> = names.into_iter().collect();
    let mut shown: Vec<&str> = names.iter().copied().take(3).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        shown.push("…");
    }
    shown.join(", ")
}

#[cfg(test)]
mod tests;
