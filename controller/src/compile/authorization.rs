//! AuthorizationPolicies, resolved to the workloads they select and sent only to the
//! nodes those workloads run on.
//!
//! Scope: a policy without a selector covers every meshed pod of its namespace (of the
//! mesh, in the root namespace); one with a selector, the matching pods of its
//! namespace (of every namespace, in the root namespace).
//!
//! The agents enforce all of a valid policy on mesh traffic. Its status says what it
//! applies to, and, when a rule has HTTP conditions and a selected pod serves a port
//! declared as TCP, what becomes of that rule there (Istio's behaviour: a DENY rule
//! denies the whole connection, an ALLOW rule matches nothing). Plaintext is judged in
//! the kernel by port (see the agent's `PlaintextPolicy`): a policy selecting pods that
//! take plaintext the kernel cannot judge by it (DISABLE, or PERMISSIVE with rules on
//! source addresses) is `NotEnforced`, naming them.

use std::collections::{BTreeMap, BTreeSet};

use weft_api::{
    authz,
    config::v1::{self as proto, PeerMode as WireMode},
    crd::DRY_RUN_ANNOTATION,
    protocol::Protocol,
};

use super::{Settings, applies_to, judge, membership::Mesh, selects};
use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, Statuses, Verdict},
};

/// The compiled policies by node.
pub fn compile(
    objects: &Objects,
    settings: &Settings,
    mesh: &Mesh,
    services: &BTreeMap<ObjectKey, proto::Service>,
    statuses: &mut Statuses,
) -> BTreeMap<String, Vec<proto::AuthorizationPolicy>> {
    let tcp_ports = tcp_ports(services);
    let mut by_node: BTreeMap<String, Vec<proto::AuthorizationPolicy>> = BTreeMap::new();
    for (key, policy) in &objects.authorization_policies {
        let dry_run = policy
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(DRY_RUN_ANNOTATION))
            .is_some_and(|value| value.eq_ignore_ascii_case("true"));
        let compiled = match policy.spec.compile(&key.namespace, &key.name, dry_run) {
            Ok(compiled) => compiled,
            Err(error) => {
                judge(
                    statuses,
                    Kind::AuthorizationPolicy,
                    key,
                    &policy.metadata,
                    Verdict::rejected(Reason::Invalid, error.to_string()),
                );
                continue;
            }
        };
        let mesh_wide = key.namespace == settings.root_namespace;
        let mut selected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut addresses = BTreeSet::new();
        let mut plaintext_unchecked: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
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
                addresses.extend(workload.ips.iter().map(String::as_str));
                let modes: BTreeSet<i32> = std::iter::once(workload.mode)
                    .chain(workload.port_modes.values().copied())
                    .collect();
                if modes.contains(&(WireMode::Disable as i32)) {
                    plaintext_unchecked
                        .entry("DISABLE")
                        .or_default()
                        .insert(workload_key.to_string());
                }
                if modes.contains(&(WireMode::Permissive as i32))
                    && compiled.names_source_addresses()
                {
                    plaintext_unchecked
                        .entry("PERMISSIVE")
                        .or_default()
                        .insert(workload_key.to_string());
                }
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
        let mut verdict = applies_to(count, &described);
        verdict.cautions = http_rules_on_tcp(&compiled, &addresses, &tcp_ports);
        for caution in &verdict.cautions {
            verdict.message = format!("{}; {caution}", verdict.message);
        }
        if !plaintext_unchecked.is_empty() && !compiled.dry_run {
            verdict = Verdict::rejected(
                Reason::NotEnforced,
                format!(
                    "{}; it applies to all mesh traffic to {described}",
                    unchecked_plaintext(&plaintext_unchecked)
                ),
            );
        }
        judge(
            statuses,
            Kind::AuthorizationPolicy,
            key,
            &policy.metadata,
            verdict,
        );
        for (node, workloads) in selected {
            let compiled = authz::Policy {
                workloads,
                ..compiled.clone()
            };
            by_node
                .entry(node.to_owned())
                .or_default()
                .push(proto::AuthorizationPolicy::from(&compiled));
        }
    }
    by_node
}

/// What the kernel lets in unchecked, by the mode that makes it so.
fn unchecked_plaintext(by_mode: &BTreeMap<&str, BTreeSet<String>>) -> String {
    by_mode
        .iter()
        .map(|(mode, pods)| {
            let pods = super::some_names(pods.iter().map(String::as_str));
            match *mode {
                "DISABLE" => format!(
                    "plaintext into pods or ports whose mode is DISABLE ({pods}) is not checked: \
                     DISABLE turns inbound enforcement off"
                ),
                _ => format!(
                    "plaintext into PERMISSIVE pods or ports ({pods}) is let in unchecked: the \
                     kernel decides plaintext by port alone, and the rules name source \
                     addresses (ipBlocks, notIpBlocks or source.ip)"
                ),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The TCP-declared ports of service endpoints: endpoint address → (target port,
/// `<namespace>/<service>:<port>`).
fn tcp_ports(services: &BTreeMap<ObjectKey, proto::Service>) -> BTreeMap<&str, Vec<(u16, String)>> {
    let mut ports: BTreeMap<&str, Vec<(u16, String)>> = BTreeMap::new();
    for (key, service) in services {
        for port in &service.ports {
            let app_protocol = Some(port.app_protocol.as_str()).filter(|p| !p.is_empty());
            let name = Some(port.name.as_str()).filter(|n| !n.is_empty());
            if Protocol::of(app_protocol, name) != Protocol::Tcp {
                continue;
            }
            let target = u16::try_from(port.target_port).unwrap_or_default();
            for endpoint in &service.endpoints {
                ports
                    .entry(endpoint.as_str())
                    .or_default()
                    .push((target, format!("{key}:{}", port.port)));
            }
        }
    }
    ports
}

/// What becomes of `policy`'s rules with HTTP conditions on the TCP-declared ports of
/// the pods at `addresses`, one note per rule that reaches one.
fn http_rules_on_tcp(
    policy: &authz::Policy,
    addresses: &BTreeSet<&str>,
    tcp_ports: &BTreeMap<&str, Vec<(u16, String)>>,
) -> Vec<String> {
    let tcp: BTreeSet<&(u16, String)> = addresses
        .iter()
        .filter_map(|address| tcp_ports.get(address))
        .flatten()
        .collect();
    let mut notes = Vec::new();
    for (index, rule) in policy.rules.iter().enumerate() {
        let http = rule.to.iter().any(authz::Operation::is_http)
            || rule.when.iter().any(|condition| condition.key.is_http());
        if !http {
            continue;
        }
        let reaches = |port: u16| {
            rule.to.is_empty()
                || rule.to.iter().any(|operation| {
                    (operation.ports.is_empty() || operation.ports.contains(&port))
                        && !operation.not_ports.contains(&port)
                })
        };
        let ports: BTreeSet<&str> = tcp
            .iter()
            .filter(|(port, _)| reaches(*port))
            .map(|(_, service)| service.as_str())
            .collect();
        if ports.is_empty() {
            continue;
        }
        let outcome = match policy.action {
            authz::Action::Deny => {
                "denies every connection there, as its HTTP conditions cannot be checked"
            }
            authz::Action::Allow | authz::Action::Audit => {
                "never matches there, as its HTTP conditions cannot be checked"
            }
        };
        notes.push(format!(
            "spec.rules[{index}] has HTTP conditions and reaches ports declared TCP ({}): it {outcome}",
            super::some_names(ports)
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_rules_reaching_tcp_ports_say_what_becomes_of_them() {
        let service = proto::Service {
            name: "db".into(),
            namespace: "shop".into(),
            ports: vec![
                proto::ServicePort {
                    port: 5432,
                    target_port: 5432,
                    name: "tcp-postgres".into(),
                    app_protocol: String::new(),
                },
                proto::ServicePort {
                    port: 80,
                    target_port: 8080,
                    name: "http".into(),
                    app_protocol: String::new(),
                },
            ],
            endpoints: vec!["10.244.0.7".into()],
            ..Default::default()
        };
        let services = BTreeMap::from([(ObjectKey::new("shop", "db"), service)]);
        let tcp = tcp_ports(&services);
        let selected = BTreeSet::from(["10.244.0.7"]);
        let policy = |yaml: &str| -> authz::Policy { serde_yaml::from_str(yaml).unwrap() };
        let deny_paths = policy(
            "{name: p, namespace: shop, action: DENY, rules: [{to: [{paths: ['/admin*']}]}]}",
        );
        assert_eq!(
            http_rules_on_tcp(&deny_paths, &selected, &tcp),
            [
                "spec.rules[0] has HTTP conditions and reaches ports declared TCP \
                 (shop/db:5432): it denies every connection there, as its HTTP conditions \
                 cannot be checked"
            ]
        );
        let allow_get = policy("{name: p, namespace: shop, rules: [{to: [{methods: [GET]}]}]}");
        assert!(
            http_rules_on_tcp(&allow_get, &selected, &tcp)[0]
                .ends_with("it never matches there, as its HTTP conditions cannot be checked")
        );
        // Rules bound to the HTTP port, and rules without HTTP conditions, say nothing.
        let http_port =
            policy("{name: p, namespace: shop, rules: [{to: [{ports: [8080], methods: [GET]}]}]}");
        assert!(http_rules_on_tcp(&http_port, &selected, &tcp).is_empty());
        let l4 = policy("{name: p, namespace: shop, rules: [{from: [{namespaces: [shop]}]}]}");
        assert!(http_rules_on_tcp(&l4, &selected, &tcp).is_empty());
        assert!(http_rules_on_tcp(&deny_paths, &BTreeSet::new(), &tcp).is_empty());
    }
}
