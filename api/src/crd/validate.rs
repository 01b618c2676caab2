//! The rules every weft resource must follow, checked without looking at the rest of
//! the cluster: what the CRD schema says (ranges, patterns) and what it cannot say
//! (port overrides need a selector, principals are SPIFFE IDs, …). The API server
//! enforces the schema for Kubernetes users; the file source has no API server, so the
//! controller checks both itself.

use std::collections::HashSet;

use crate::duration::parse_duration;

use super::{
    Action, AuthorizationPolicySpec, DURATION_PATTERN, FaultInjectionSpec, Operation,
    PeerAuthenticationSpec, Rule, Source, TrafficPolicySpec, WorkloadSelector,
};
use crate::authz;

/// A field that breaks a rule: where (`spec.rules[0].from[1].principals[2]`) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A resource spec that can check itself.
pub trait Validate {
    fn validate(&self) -> Result<(), FieldError>;
}

impl Validate for PeerAuthenticationSpec {
    fn validate(&self) -> Result<(), FieldError> {
        if let Some(selector) = &self.selector {
            validate_selector("spec.selector", selector)?;
        }
        if !self.port_modes.is_empty() && self.selector.is_none() {
            return Err(invalid(
                "spec.portModes",
                "port overrides need a selector: ports are a pod's, not a namespace's",
            ));
        }
        if self.port_modes.len() > 64 {
            return Err(invalid("spec.portModes", "at most 64 entries"));
        }
        let mut seen = HashSet::new();
        for (index, entry) in self.port_modes.iter().enumerate() {
            let field = format!("spec.portModes[{index}].port");
            if !(1..=65535).contains(&entry.port) {
                return Err(invalid(field, format!("{} is not a port", entry.port)));
            }
            if !seen.insert(entry.port) {
                return Err(invalid(
                    field,
                    format!("port {} is listed twice", entry.port),
                ));
            }
        }
        Ok(())
    }
}

impl Validate for AuthorizationPolicySpec {
    fn validate(&self) -> Result<(), FieldError> {
        self.compile("default", "", false).map(drop)
    }
}

impl AuthorizationPolicySpec {
    /// The policy `namespace/name` as the agents enforce it, selecting no workload yet;
    /// `dry_run` also when Istio's annotation asks for it. The error names the field.
    pub fn compile(
        &self,
        namespace: &str,
        name: &str,
        dry_run: bool,
    ) -> Result<authz::Policy, FieldError> {
        if let Some(selector) = &self.selector {
            validate_selector("spec.selector", selector)?;
        }
        if self.rules.len() > 256 {
            return Err(invalid("spec.rules", "at most 256 rules"));
        }
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| compile_rule(&format!("spec.rules[{index}]"), rule, namespace))
            .collect::<Result<_, _>>()?;
        Ok(authz::Policy {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            action: match self.action {
                Action::Allow => authz::Action::Allow,
                Action::Deny => authz::Action::Deny,
                Action::Audit => authz::Action::Audit,
            },
            dry_run: self.dry_run || dry_run,
            workloads: Vec::new(),
            rules,
        })
    }
}

/// `parse` applied to each entry of the list at `field`; the error names the entry.
fn each<T, U>(
    field: &str,
    entries: &[T],
    parse: impl Fn(&T) -> Result<U, String>,
) -> Result<Vec<U>, FieldError> {
    authz::parse_each(field, entries, parse).map_err(|(entry, problem)| invalid(entry, problem))
}

fn compile_rule(field: &str, rule: &Rule, namespace: &str) -> Result<authz::Rule, FieldError> {
    let from = rule
        .from
        .iter()
        .enumerate()
        .map(|(index, source)| compile_source(&format!("{field}.from[{index}]"), source, namespace))
        .collect::<Result<_, _>>()?;
    let to = rule
        .to
        .iter()
        .enumerate()
        .map(|(index, operation)| compile_operation(&format!("{field}.to[{index}]"), operation))
        .collect::<Result<_, _>>()?;
    let when = rule
        .when
        .iter()
        .enumerate()
        .map(|(index, condition)| {
            authz::Condition::parse(&condition.key, &condition.values, &condition.not_values)
                .map_err(|problem| invalid(format!("{field}.when[{index}]"), problem))
        })
        .collect::<Result<_, _>>()?;
    Ok(authz::Rule { from, to, when })
}

/// What an entry of `from` or `to` that sets no field is told: it would match
/// everything, and the likeliest cause is Istio's nesting.
const EMPTY_ENTRY: &str = "sets no field, so it would match everything; weft's fields sit \
                           directly in the entry (`from: [{principals: [...]}]`, `to: \
                           [{methods: [...]}]`), not under Istio's `source:` and `operation:`";

fn compile_source(
    field: &str,
    source: &Source,
    namespace: &str,
) -> Result<authz::Source, FieldError> {
    if *source == Source::default() {
        return Err(invalid(field, EMPTY_ENTRY));
    }
    let principals = |name, entries: &[String]| {
        each(&format!("{field}.{name}"), entries, |entry| {
            authz::principal(entry)
        })
    };
    let patterns =
        |name, entries: &[String]| each(&format!("{field}.{name}"), entries, |entry| entry.parse());
    let accounts = |name, entries: &[String]| {
        each(&format!("{field}.{name}"), entries, |entry| {
            authz::service_account(entry, namespace)
        })
    };
    let blocks =
        |name, entries: &[String]| each(&format!("{field}.{name}"), entries, |entry| entry.parse());
    Ok(authz::Source {
        principals: principals("principals", &source.principals)?,
        not_principals: principals("notPrincipals", &source.not_principals)?,
        namespaces: patterns("namespaces", &source.namespaces)?,
        not_namespaces: patterns("notNamespaces", &source.not_namespaces)?,
        service_accounts: accounts("serviceAccounts", &source.service_accounts)?,
        not_service_accounts: accounts("notServiceAccounts", &source.not_service_accounts)?,
        ip_blocks: blocks("ipBlocks", &source.ip_blocks)?,
        not_ip_blocks: blocks("notIpBlocks", &source.not_ip_blocks)?,
    })
}

fn compile_operation(field: &str, operation: &Operation) -> Result<authz::Operation, FieldError> {
    if *operation == Operation::default() {
        return Err(invalid(field, EMPTY_ENTRY));
    }
    let ports = |name, entries: &[u16]| {
        each(&format!("{field}.{name}"), entries, |&port| {
            if port == 0 {
                Err("0 is not a port".to_owned())
            } else {
                Ok(port)
            }
        })
    };
    let methods = |name, entries: &[String]| {
        each(&format!("{field}.{name}"), entries, |method| {
            let token = !method.is_empty()
                && method
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte));
            if token {
                method.parse()
            } else {
                Err(format!("{method:?} is not an HTTP method"))
            }
        })
    };
    let paths = |name, entries: &[String]| {
        each(&format!("{field}.{name}"), entries, |path| {
            if path.starts_with(['/', '*']) {
                path.parse()
            } else {
                Err(format!("{path:?} must start with '/' (or '*')"))
            }
        })
    };
    let hosts = |name, entries: &[String]| {
        each(&format!("{field}.{name}"), entries, |host| {
            host.parse().map(authz::Pattern::lowercase)
        })
    };
    Ok(authz::Operation {
        hosts: hosts("hosts", &operation.hosts)?,
        not_hosts: hosts("notHosts", &operation.not_hosts)?,
        ports: ports("ports", &operation.ports)?,
        not_ports: ports("notPorts", &operation.not_ports)?,
        methods: methods("methods", &operation.methods)?,
        not_methods: methods("notMethods", &operation.not_methods)?,
        paths: paths("paths", &operation.paths)?,
        not_paths: paths("notPaths", &operation.not_paths)?,
    })
}

impl Validate for TrafficPolicySpec {
    fn validate(&self) -> Result<(), FieldError> {
        validate_dns_label("spec.service", &self.service)?;
        if let Some(timeouts) = &self.timeouts {
            for (name, value) in [
                ("connect", &timeouts.connect),
                ("idle", &timeouts.idle),
                ("request", &timeouts.request),
                ("streamIdle", &timeouts.stream_idle),
            ] {
                check_duration(&format!("spec.timeouts.{name}"), value.as_deref())?;
            }
        }
        if let Some(retries) = &self.retries {
            if retries.attempts > 10 {
                return Err(invalid(
                    "spec.retries.attempts",
                    format!("{} is more than 10", retries.attempts),
                ));
            }
            check_duration(
                "spec.retries.perTryTimeout",
                retries.per_try_timeout.as_deref(),
            )?;
            for (index, condition) in retries.retry_on.iter().enumerate() {
                crate::retry::RetryOn::parse(condition).map_err(|problem| {
                    invalid(format!("spec.retries.retryOn[{index}]"), problem)
                })?;
            }
            if let Some(budget) = &retries.budget
                && budget.percent > 100
            {
                return Err(invalid(
                    "spec.retries.budget.percent",
                    format!("{} is more than 100", budget.percent),
                ));
            }
        }
        if let Some(limits) = &self.connection_limits {
            for (name, value) in [
                ("maxConnections", limits.max_connections),
                ("maxRequests", limits.max_requests),
                ("maxPendingRequests", limits.max_pending_requests),
                (
                    "maxRequestsPerConnection",
                    limits.max_requests_per_connection,
                ),
            ] {
                if value == Some(0) {
                    return Err(invalid(
                        format!("spec.connectionLimits.{name}"),
                        "must be at least 1",
                    ));
                }
            }
        }
        if let Some(outlier) = &self.outlier_detection {
            for (name, value) in [
                ("consecutiveFailures", Some(outlier.consecutive_failures)),
                (
                    "consecutiveGatewayErrors",
                    outlier.consecutive_gateway_errors,
                ),
                (
                    "consecutiveConnectFailures",
                    outlier.consecutive_connect_failures,
                ),
            ] {
                if value == Some(0) {
                    return Err(invalid(
                        format!("spec.outlierDetection.{name}"),
                        "must be at least 1",
                    ));
                }
            }
            check_duration(
                "spec.outlierDetection.interval",
                outlier.interval.as_deref(),
            )?;
            check_duration(
                "spec.outlierDetection.baseEjectionTime",
                outlier.base_ejection_time.as_deref(),
            )?;
            if outlier
                .max_ejection_percent
                .is_some_and(|percent| percent > 100)
            {
                return Err(invalid(
                    "spec.outlierDetection.maxEjectionPercent",
                    "must be at most 100",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for FaultInjectionSpec {
    fn validate(&self) -> Result<(), FieldError> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err(invalid("spec", "sets neither delay nor abort"));
        }
        let percent = |field: &str, percent: Option<u32>| match percent {
            Some(percent) if percent > 100 => {
                Err(invalid(field, format!("{percent} is more than 100")))
            }
            _ => Ok(()),
        };
        if let Some(delay) = &self.delay {
            check_duration("spec.delay.fixedDelay", Some(&delay.fixed_delay))?;
            percent("spec.delay.percent", delay.percent)?;
        }
        if let Some(abort) = &self.abort {
            match (abort.http_status, abort.grpc_status) {
                (None, None) => {
                    return Err(invalid(
                        "spec.abort",
                        "sets neither httpStatus nor grpcStatus",
                    ));
                }
                (Some(status), _) if !(200..=599).contains(&status) => {
                    return Err(invalid(
                        "spec.abort.httpStatus",
                        format!("{status} is not from 200 to 599"),
                    ));
                }
                (_, Some(status)) if !(1..=16).contains(&status) => {
                    return Err(invalid(
                        "spec.abort.grpcStatus",
                        format!("{status} is not a gRPC status from 1 to 16"),
                    ));
                }
                _ => {}
            }
            percent("spec.abort.percent", abort.percent)?;
        }
        Ok(())
    }
}

fn check_duration(field: &str, value: Option<&str>) -> Result<(), FieldError> {
    match value {
        Some(text) if parse_duration(text).is_none() => Err(invalid(
            field,
            format!(
                "{text:?} is not a duration such as 500ms, 15s, 1m30s (pattern {DURATION_PATTERN})"
            ),
        )),
        _ => Ok(()),
    }
}

fn validate_selector(field: &str, selector: &WorkloadSelector) -> Result<(), FieldError> {
    for (key, value) in &selector.match_labels {
        if key.is_empty() || key.len() > 253 {
            return Err(invalid(
                format!("{field}.matchLabels"),
                format!("{key:?} is not a label key"),
            ));
        }
        if value.len() > 63 {
            return Err(invalid(
                format!("{field}.matchLabels.{key}"),
                "label values are at most 63 characters",
            ));
        }
    }
    Ok(())
}

fn validate_dns_label(field: &str, value: &str) -> Result<(), FieldError> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value:?} is not a Service name (a DNS label)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PeerMode, PortMode, Retries, Timeouts};

    #[test]
    fn peer_authentication_rules_name_the_field() {
        let mut spec = PeerAuthenticationSpec {
            mode: Some(PeerMode::Strict),
            port_modes: vec![PortMode {
                port: 8080,
                mode: PeerMode::Permissive,
            }],
            ..Default::default()
        };
        assert_eq!(spec.validate().unwrap_err().field, "spec.portModes");
        spec.selector = Some(WorkloadSelector {
            match_labels: [("app".into(), "web".into())].into(),
        });
        spec.validate().unwrap();
        spec.port_modes.push(PortMode {
            port: 8080,
            mode: PeerMode::Disable,
        });
        assert_eq!(spec.validate().unwrap_err().field, "spec.portModes[1].port");
        spec.port_modes[1].port = 70000;
        assert!(spec.validate().unwrap_err().problem.contains("70000"));
    }

    #[test]
    fn authorization_rules_name_the_field() {
        let policy = |source: Source, operation: Operation| AuthorizationPolicySpec {
            rules: vec![
                Rule::default(),
                Rule {
                    from: vec![source],
                    to: vec![operation],
                    when: Vec::new(),
                },
            ],
            ..Default::default()
        };
        let good = policy(
            Source {
                principals: vec![
                    "spiffe://cluster.local/ns/a/sa/b".into(),
                    "spiffe://cluster.local/ns/a/*".into(),
                    "cluster.local/ns/c/sa/d".into(),
                    "*".into(),
                ],
                namespaces: vec!["prod-*".into()],
                ..Default::default()
            },
            Operation {
                ports: vec![8080],
                methods: vec!["GET".into()],
                paths: vec!["/api/*".into()],
                ..Default::default()
            },
        );
        good.validate().unwrap();

        let error = |spec: AuthorizationPolicySpec| spec.validate().unwrap_err().to_string();
        let not_spiffe = error(policy(
            Source {
                principals: vec!["spiffe://cluster.local/a/b".into()],
                ..Default::default()
            },
            Operation::default(),
        ));
        assert!(
            not_spiffe.starts_with("spec.rules[1].from[0].principals[0]: "),
            "{not_spiffe}"
        );
        let star = error(policy(
            Source {
                not_namespaces: vec!["a*b".into()],
                ..Default::default()
            },
            Operation::default(),
        ));
        assert!(
            star.starts_with("spec.rules[1].from[0].notNamespaces[0]"),
            "{star}"
        );
        let anyone = || Source {
            principals: vec!["*".into()],
            ..Default::default()
        };
        let port = error(policy(
            anyone(),
            Operation {
                not_ports: vec![0],
                ..Default::default()
            },
        ));
        assert!(
            port.starts_with("spec.rules[1].to[0].notPorts[0]"),
            "{port}"
        );
        let path = error(policy(
            anyone(),
            Operation {
                paths: vec!["api".into()],
                ..Default::default()
            },
        ));
        assert!(path.starts_with("spec.rules[1].to[0].paths[0]"), "{path}");
        // An entry with no field (Istio's `source:` nesting, which weft's types do not
        // know) would match everything: refused, naming the entry.
        let empty_from = error(policy(Source::default(), Operation::default()));
        assert!(
            empty_from.starts_with("spec.rules[1].from[0]: sets no field"),
            "{empty_from}"
        );
        let empty_to = error(policy(anyone(), Operation::default()));
        assert!(
            empty_to.starts_with("spec.rules[1].to[0]: sets no field")
                && empty_to.contains("operation:"),
            "{empty_to}"
        );
    }

    #[test]
    fn traffic_policy_rules_name_the_field() {
        let mut spec = TrafficPolicySpec {
            service: "echo".into(),
            timeouts: Some(Timeouts {
                connect: Some("1s".into()),
                ..Default::default()
            }),
            retries: Some(Retries {
                attempts: 2,
                retry_on: vec!["5xx".into(), "503".into(), "unavailable".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        spec.validate().unwrap();
        spec.timeouts.as_mut().unwrap().idle = Some("10 minutes".into());
        assert_eq!(spec.validate().unwrap_err().field, "spec.timeouts.idle");
        spec.timeouts = None;
        spec.retries
            .as_mut()
            .unwrap()
            .retry_on
            .push("sometimes".into());
        assert_eq!(
            spec.validate().unwrap_err().field,
            "spec.retries.retryOn[3]"
        );
        spec.retries = None;
        spec.service = "Echo".into();
        assert_eq!(spec.validate().unwrap_err().field, "spec.service");
    }

    #[test]
    fn fault_injection_rules_name_the_field() {
        use crate::crd::{FaultAbort, FaultDelay};
        let mut spec = FaultInjectionSpec {
            delay: Some(FaultDelay {
                fixed_delay: "2s".into(),
                percent: Some(50),
            }),
            abort: Some(FaultAbort {
                http_status: Some(503),
                grpc_status: Some(14),
                percent: None,
            }),
        };
        spec.validate().unwrap();
        type Breaking = fn(&mut FaultInjectionSpec);
        let cases: [(Breaking, &str); 5] = [
            (
                |spec| spec.delay.as_mut().unwrap().fixed_delay = "soon".into(),
                "spec.delay.fixedDelay",
            ),
            (
                |spec| spec.delay.as_mut().unwrap().percent = Some(101),
                "spec.delay.percent",
            ),
            (
                |spec| spec.abort.as_mut().unwrap().http_status = Some(99),
                "spec.abort.httpStatus",
            ),
            (
                |spec| spec.abort.as_mut().unwrap().grpc_status = Some(17),
                "spec.abort.grpcStatus",
            ),
            (|spec| *spec = FaultInjectionSpec::default(), "spec"),
        ];
        for (break_it, field) in cases {
            let mut broken = spec.clone();
            break_it(&mut broken);
            assert_eq!(broken.validate().unwrap_err().field, field);
        }
        spec.abort.as_mut().unwrap().http_status = None;
        spec.abort.as_mut().unwrap().grpc_status = None;
        assert_eq!(spec.validate().unwrap_err().field, "spec.abort");
    }
}
