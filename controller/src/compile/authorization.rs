//! AuthorizationPolicies, resolved to the workloads they select and sent only to the
//! nodes those workloads run on.
//!
//! Scope: a policy without a selector covers every meshed pod of its namespace (of the
//! mesh, in the root namespace); one with a selector, the matching pods of its
//! namespace (of every namespace, in the root namespace).
//!
//! The agents do not enforce them yet ([`enforcement`]): they are compiled and sent,
//! and their verdict says `NotEnforced`.

use std::collections::BTreeMap;

use weft_api::{
    config::v1::{self as proto, authorization_policy::Action as WireAction},
    crd::{self, AuthorizationPolicy, Validate},
};

use super::{Settings, applies_to, enforcement, judge, membership::Mesh, selects};
use crate::{
    objects::{Kind, Objects},
    status::{Reason, Statuses, Verdict},
};

/// The compiled policies by node.
pub fn compile(
    objects: &Objects,
    settings: &Settings,
    mesh: &Mesh,
    statuses: &mut Statuses,
) -> BTreeMap<String, Vec<proto::AuthorizationPolicy>> {
    let mut by_node: BTreeMap<String, Vec<proto::AuthorizationPolicy>> = BTreeMap::new();
    for (key, policy) in &objects.authorization_policies {
        if let Err(error) = policy.spec.validate() {
            judge(
                statuses,
                Kind::AuthorizationPolicy,
                key,
                &policy.metadata,
                Verdict::rejected(Reason::Invalid, error.to_string()),
            );
            continue;
        }
        let mesh_wide = key.namespace == settings.root_namespace;
        let mut selected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut count = 0;
        for (workload_key, workload) in mesh.members() {
            let in_scope = mesh_wide || workload_key.namespace == key.namespace;
            let matches = policy
                .spec
                .selector
                .as_ref()
                .is_none_or(|selector| selects(selector, Some(&workload.labels)));
            if in_scope && matches {
                count += 1;
                selected
                    .entry(workload.node.as_str())
                    .or_default()
                    .push(workload_key.to_string());
            }
        }
        let described = match (&policy.spec.selector, mesh_wide) {
            (Some(_), false) => "the meshed pods spec.selector matches".to_owned(),
            (Some(_), true) => {
                "the meshed pods spec.selector matches in every namespace".to_owned()
            }
            (None, false) => format!("every meshed pod of namespace {}", key.namespace),
            (None, true) => "every meshed pod".to_owned(),
        };
        let target = if count == 0 {
            format!("{described} (there are none yet)")
        } else {
            described.clone()
        };
        judge(
            statuses,
            Kind::AuthorizationPolicy,
            key,
            &policy.metadata,
            enforcement::verdict(
                Kind::AuthorizationPolicy,
                &policy.spec,
                &target,
                applies_to(count, &described),
            ),
        );
        for (node, workloads) in selected {
            by_node
                .entry(node.to_owned())
                .or_default()
                .push(compile_policy(&key.namespace, &key.name, policy, workloads));
        }
    }
    by_node
}

fn compile_policy(
    namespace: &str,
    name: &str,
    policy: &AuthorizationPolicy,
    workloads: Vec<String>,
) -> proto::AuthorizationPolicy {
    proto::AuthorizationPolicy {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        action: match policy.spec.action {
            crd::Action::Allow => WireAction::Allow,
            crd::Action::Deny => WireAction::Deny,
        } as i32,
        workloads,
        rules: policy
            .spec
            .rules
            .iter()
            .map(|rule| proto::AuthorizationRule {
                from: rule
                    .from
                    .iter()
                    .map(|source| proto::AuthorizationSource {
                        principals: source.principals.clone(),
                        not_principals: source.not_principals.clone(),
                        namespaces: source.namespaces.clone(),
                        not_namespaces: source.not_namespaces.clone(),
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|operation| proto::AuthorizationOperation {
                        ports: operation.ports.iter().map(|&p| u32::from(p)).collect(),
                        not_ports: operation.not_ports.iter().map(|&p| u32::from(p)).collect(),
                        methods: operation.methods.clone(),
                        paths: operation.paths.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
