//! Who is in the mesh and how each pod takes plaintext.
//!
//! A namespace is meshed when it carries the label `weft.dev/mesh=enabled`; its pods
//! are, unless one carries the annotation `weft.dev/mesh=disabled`. A pod's mode comes
//! from the PeerAuthentications, most specific first: one selecting the pod, else its
//! namespace's (no selector), else the mesh's (no selector, in the root namespace),
//! else STRICT. Where two policies decide the same thing, the older wins.
//!
//! A pod's annotation `weft.dev/weight` (0 to 1000) weighs its addresses as service
//! endpoints; a value that is no such number gets the pod an `Invalid` verdict (logged,
//! and listed in the controller's `/status`) and the default weight, 1.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use weft_api::{
    config::v1::{self as proto, PeerMode as WireMode},
    crd::{
        self, MESH_DISABLED, MESH_ENABLED, MESH_LABEL, PeerAuthentication, Validate,
        WEIGHT_ANNOTATION,
    },
};

use super::{Settings, applies_to, by_age, judge, selects, some_names};
use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, Statuses, Verdict},
};

/// The meshed namespaces and pods.
#[derive(Debug, Default)]
pub struct Mesh {
    pub namespaces: BTreeMap<String, proto::Namespace>,
    /// Meshed pods, and pods of meshed namespaces that opted out (`opted_out`).
    pub workloads: BTreeMap<ObjectKey, proto::Workload>,
    /// Weights of those pods' addresses, where they differ from the default.
    pub weights: BTreeMap<String, u32>,
}

impl Mesh {
    /// The meshed (not opted-out) workloads.
    pub fn members(&self) -> impl Iterator<Item = (&ObjectKey, &proto::Workload)> {
        self.workloads
            .iter()
            .filter(|(_, workload)| !workload.opted_out)
    }
}

pub fn compile(objects: &Objects, settings: &Settings, statuses: &mut Statuses) -> Mesh {
    let policies = peer_authentications(objects, statuses);
    let (mesh_mode, namespace_modes) = defaults(&policies, settings, statuses);

    let mut mesh = Mesh::default();
    for (key, namespace) in &objects.namespaces {
        let labels = namespace.metadata.labels.as_ref();
        if labels
            .and_then(|labels| labels.get(MESH_LABEL))
            .map(String::as_str)
            == Some(MESH_ENABLED)
        {
            let mode = namespace_modes
                .get(key.name.as_str())
                .copied()
                .or(mesh_mode)
                .unwrap_or(crd::PeerMode::Strict);
            mesh.namespaces.insert(
                key.name.clone(),
                proto::Namespace {
                    name: key.name.clone(),
                    mode: wire(mode) as i32,
                },
            );
        }
    }

    // Pods selected by each workload policy, and the pods it lost to older ones.
    let mut selected: BTreeMap<&ObjectKey, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
    for (key, pod) in &objects.pods {
        let Some(namespace) = mesh.namespaces.get(&key.namespace) else {
            continue;
        };
        let Some(mut workload) = workload(key, pod) else {
            continue;
        };
        let annotation = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(WEIGHT_ANNOTATION));
        match annotation.map(|value| weight(value)) {
            Some(Ok(weight)) if weight != proto::DEFAULT_ENDPOINT_WEIGHT => {
                for ip in &workload.ips {
                    mesh.weights.insert(ip.clone(), weight);
                }
            }
            Some(Err(problem)) => judge(
                statuses,
                Kind::Pod,
                key,
                &pod.metadata,
                Verdict::rejected(
                    Reason::Invalid,
                    format!(
                        "metadata.annotations[\"{WEIGHT_ANNOTATION}\"]: {problem}; its endpoints keep weight {}",
                        proto::DEFAULT_ENDPOINT_WEIGHT
                    ),
                ),
            ),
            _ => {}
        }
        workload.mode = namespace.mode;
        let mut winner = None;
        for (policy_key, policy) in &policies {
            let Some(selector) = &policy.spec.selector else {
                continue;
            };
            if policy_key.namespace != key.namespace
                || !selects(selector, pod.metadata.labels.as_ref())
            {
                continue;
            }
            let entry = selected.entry(*policy_key).or_default();
            if winner.is_none() {
                winner = Some(*policy);
                entry.0.push(key.name.as_str());
            } else {
                entry.1.push(key.name.as_str());
            }
        }
        if let Some(policy) = winner {
            if let Some(mode) = policy.spec.mode {
                workload.mode = wire(mode) as i32;
            }
            workload.port_modes = policy
                .spec
                .port_modes
                .iter()
                .map(|entry| (entry.port, wire(entry.mode) as i32))
                .collect();
        }
        if workload.opted_out {
            workload.mode = WireMode::Unspecified as i32;
            workload.port_modes.clear();
        }
        mesh.workloads.insert(key.clone(), workload);
    }

    for (key, policy) in &policies {
        if policy.spec.selector.is_none() {
            continue;
        }
        let (applied, lost) = selected.remove(key).unwrap_or_default();
        let verdict = if applied.is_empty() && !lost.is_empty() {
            Verdict::rejected(
                Reason::Conflicted,
                format!(
                    "every pod spec.selector matches ({}) already follows an older PeerAuthentication that selects it",
                    some_names(lost)
                ),
            )
        } else {
            let mut verdict = applies_to(applied.len(), "the meshed pods spec.selector matches");
            if !lost.is_empty() {
                verdict.message.push_str(&format!(
                    "; pods {} follow an older PeerAuthentication that also selects them",
                    some_names(lost)
                ));
            }
            verdict
        };
        judge(
            statuses,
            Kind::PeerAuthentication,
            key,
            &policy.metadata,
            verdict,
        );
    }
    mesh
}

/// The valid PeerAuthentications, oldest first; the invalid ones are judged here.
fn peer_authentications<'a>(
    objects: &'a Objects,
    statuses: &mut Statuses,
) -> Vec<(&'a ObjectKey, &'a PeerAuthentication)> {
    by_age(
        objects
            .peer_authentications
            .iter()
            .map(|(key, policy)| (key, policy.as_ref())),
        |policy| &policy.metadata,
    )
    .into_iter()
    .filter(|(key, policy)| match policy.spec.validate() {
        Ok(()) => true,
        Err(error) => {
            judge(
                statuses,
                Kind::PeerAuthentication,
                key,
                &policy.metadata,
                Verdict::rejected(Reason::Invalid, error.to_string()),
            );
            false
        }
    })
    .collect()
}

/// The mesh's default mode and each namespace's, from the policies without a
/// selector; judges those policies.
fn defaults<'a>(
    policies: &[(&'a ObjectKey, &'a PeerAuthentication)],
    settings: &Settings,
    statuses: &mut Statuses,
) -> (Option<crd::PeerMode>, BTreeMap<&'a str, crd::PeerMode>) {
    let mut mesh_mode = None;
    let mut modes: BTreeMap<&str, crd::PeerMode> = BTreeMap::new();
    let mut decided_by: BTreeMap<&str, &ObjectKey> = BTreeMap::new();
    for (key, policy) in policies {
        if policy.spec.selector.is_some() {
            continue;
        }
        let namespace = key.namespace.as_str();
        let scope = if namespace == settings.root_namespace {
            "the mesh".to_owned()
        } else {
            format!("namespace {namespace}")
        };
        let verdict = if let Some(older) = decided_by.get(namespace) {
            Verdict::rejected(
                Reason::Conflicted,
                format!(
                    "the default mode of {scope} is already set by PeerAuthentication {}, which is older",
                    older.name
                ),
            )
        } else {
            decided_by.insert(namespace, key);
            if let Some(mode) = policy.spec.mode {
                if namespace == settings.root_namespace {
                    mesh_mode = Some(mode);
                } else {
                    modes.insert(namespace, mode);
                }
            }
            Verdict::accepted(
                Reason::Accepted,
                match policy.spec.mode {
                    Some(mode) => format!("sets the default mode of {scope} to {mode:?}"),
                    None => format!("{scope} keeps the default mode it inherits"),
                },
            )
        };
        judge(
            statuses,
            Kind::PeerAuthentication,
            key,
            &policy.metadata,
            verdict,
        );
    }
    (mesh_mode, modes)
}

/// The workload of a pod of a meshed namespace, or `None` for a pod that is not (or
/// no longer) running on a node: not scheduled, finished, or on the host's network.
fn workload(key: &ObjectKey, pod: &Pod) -> Option<proto::Workload> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|status| status.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let mut ips: Vec<String> = status
        .and_then(|status| status.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if let Some(ip) = status.and_then(|status| status.pod_ip.clone())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    let opted_out = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(MESH_LABEL))
        .map(String::as_str)
        == Some(MESH_DISABLED);
    Some(proto::Workload {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        node,
        ips,
        labels: pod
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        mode: WireMode::Unspecified as i32,
        port_modes: Default::default(),
        opted_out,
    })
}

/// The endpoint weight an annotation value gives.
fn weight(value: &str) -> Result<u32, String> {
    value
        .parse()
        .ok()
        .filter(|weight| *weight <= proto::MAX_ENDPOINT_WEIGHT)
        .ok_or_else(|| {
            format!(
                "{value:?} is not a weight (a whole number from 0 to {})",
                proto::MAX_ENDPOINT_WEIGHT
            )
        })
}

fn wire(mode: crd::PeerMode) -> WireMode {
    match mode {
        crd::PeerMode::Strict => WireMode::Strict,
        crd::PeerMode::Permissive => WireMode::Permissive,
        crd::PeerMode::Disable => WireMode::Disable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_whole_numbers_up_to_1000() {
        let cases = [
            ("0", Some(0)),
            ("1", Some(1)),
            ("1000", Some(1000)),
            ("1001", None),
            ("-1", None),
            ("2.5", None),
            (" 3", None),
            ("", None),
            ("heavy", None),
        ];
        for (value, expected) in cases {
            assert_eq!(weight(value).ok(), expected, "{value:?}");
        }
        assert_eq!(
            weight("heavy").unwrap_err(),
            "\"heavy\" is not a weight (a whole number from 0 to 1000)"
        );
    }
}
