//! Policies on the configuration stream: the controller writes a [`Policy`] as a
//! `weft.config.v1.AuthorizationPolicy`, the agent reads it back, checking every entry
//! again (a message from an older or broken controller is refused, not half-applied).

use crate::config::v1::{self as proto, authorization_policy::Action as WireAction};

use super::{Action, Condition, IpBlock, Operation, Pattern, Policy, Rule, Source, principal};

impl From<&Policy> for proto::AuthorizationPolicy {
    fn from(policy: &Policy) -> Self {
        let strings = |entries: &[Pattern]| entries.iter().map(ToString::to_string).collect();
        let blocks = |entries: &[IpBlock]| entries.iter().map(ToString::to_string).collect();
        let ports = |entries: &[u16]| entries.iter().map(|&port| u32::from(port)).collect();
        proto::AuthorizationPolicy {
            name: policy.name.clone(),
            namespace: policy.namespace.clone(),
            action: match policy.action {
                Action::Allow => WireAction::Allow,
                Action::Deny => WireAction::Deny,
                Action::Audit => WireAction::Audit,
            } as i32,
            workloads: policy.workloads.clone(),
            dry_run: policy.dry_run,
            rules: policy
                .rules
                .iter()
                .map(|rule| proto::AuthorizationRule {
                    from: rule
                        .from
                        .iter()
                        .map(|source| proto::AuthorizationSource {
                            principals: strings(&source.principals),
                            not_principals: strings(&source.not_principals),
                            namespaces: strings(&source.namespaces),
                            not_namespaces: strings(&source.not_namespaces),
                            service_accounts: source.service_accounts.clone(),
                            not_service_accounts: source.not_service_accounts.clone(),
                            ip_blocks: blocks(&source.ip_blocks),
                            not_ip_blocks: blocks(&source.not_ip_blocks),
                        })
                        .collect(),
                    to: rule
                        .to
                        .iter()
                        .map(|operation| proto::AuthorizationOperation {
                            ports: ports(&operation.ports),
                            not_ports: ports(&operation.not_ports),
                            methods: strings(&operation.methods),
                            not_methods: strings(&operation.not_methods),
                            paths: strings(&operation.paths),
                            not_paths: strings(&operation.not_paths),
                            hosts: strings(&operation.hosts),
                            not_hosts: strings(&operation.not_hosts),
                        })
                        .collect(),
                    when: rule
                        .when
                        .iter()
                        .map(|condition| proto::AuthorizationCondition {
                            key: condition.key.to_string(),
                            values: condition.values.written(),
                            not_values: condition.not_values.written(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&proto::AuthorizationPolicy> for Policy {
    type Error = String;

    /// The error names the field, as in `rules[0].from[1].ip_blocks[2]: …`.
    fn try_from(wire: &proto::AuthorizationPolicy) -> Result<Self, String> {
        let action = match WireAction::try_from(wire.action) {
            Ok(WireAction::Allow) => Action::Allow,
            Ok(WireAction::Deny) => Action::Deny,
            Ok(WireAction::Audit) => Action::Audit,
            Err(_) => {
                return Err(format!(
                    "action {} is not one this agent knows",
                    wire.action
                ));
            }
        };
        let rules = wire
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| read_rule(rule).map_err(|err| format!("rules[{index}].{err}")))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            name: wire.name.clone(),
            namespace: wire.namespace.clone(),
            action,
            dry_run: wire.dry_run,
            workloads: wire.workloads.clone(),
            rules,
        })
    }
}

fn read_rule(rule: &proto::AuthorizationRule) -> Result<Rule, String> {
    Ok(Rule {
        from: each("from", &rule.from, read_source)?,
        to: each("to", &rule.to, read_operation)?,
        when: each("when", &rule.when, |condition| {
            Condition::parse(&condition.key, &condition.values, &condition.not_values)
        })?,
    })
}

fn read_source(source: &proto::AuthorizationSource) -> Result<Source, String> {
    let patterns = |field, entries: &[String]| each(field, entries, |entry| entry.parse());
    let principals = |field, entries: &[String]| each(field, entries, |entry| principal(entry));
    let blocks = |field, entries: &[String]| each(field, entries, |entry| entry.parse());
    Ok(Source {
        principals: principals("principals", &source.principals)?,
        not_principals: principals("not_principals", &source.not_principals)?,
        namespaces: patterns("namespaces", &source.namespaces)?,
        not_namespaces: patterns("not_namespaces", &source.not_namespaces)?,
        service_accounts: source.service_accounts.clone(),
        not_service_accounts: source.not_service_accounts.clone(),
        ip_blocks: blocks("ip_blocks", &source.ip_blocks)?,
        not_ip_blocks: blocks("not_ip_blocks", &source.not_ip_blocks)?,
    })
}

fn read_operation(operation: &proto::AuthorizationOperation) -> Result<Operation, String> {
    let patterns = |field, entries: &[String]| each(field, entries, |entry| entry.parse());
    let hosts = |field, entries: &[String]| {
        each(field, entries, |entry| {
            entry.parse().map(Pattern::lowercase)
        })
    };
    let ports = |field, entries: &[u32]| {
        each(field, entries, |&port| {
            u16::try_from(port)
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| format!("{port} is not a port"))
        })
    };
    Ok(Operation {
        hosts: hosts("hosts", &operation.hosts)?,
        not_hosts: hosts("not_hosts", &operation.not_hosts)?,
        ports: ports("ports", &operation.ports)?,
        not_ports: ports("not_ports", &operation.not_ports)?,
        methods: patterns("methods", &operation.methods)?,
        not_methods: patterns("not_methods", &operation.not_methods)?,
        paths: patterns("paths", &operation.paths)?,
        not_paths: patterns("not_paths", &operation.not_paths)?,
    })
}

/// `read` applied to each entry of the list `field`; the error names the entry.
fn each<T, U>(
    field: &str,
    entries: &[T],
    read: impl Fn(&T) -> Result<U, String>,
) -> Result<Vec<U>, String> {
    super::parse_each(field, entries, read)
        .map_err(|(entry, problem)| format!("{entry}: {problem}"))
}
