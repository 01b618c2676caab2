//! The controller's permissions as `deploy/install.yaml` grants them, enforced by the
//! fake API server as the real one's RBAC authorizer does: a request is allowed when a
//! rule of the ClusterRole, or of the Role in its namespace, names its API group, its
//! resource (`plural`, or `plural/status` for the status subresource), its verb and,
//! when the rule lists names, its object's name. A create names no object, so a rule
//! with names never allows one.

use std::path::Path;

use serde::Deserialize as _;
use serde_yaml::Value;

/// One rule of a role; a Role's rules hold in its namespace only.
#[derive(Debug, Clone)]
struct Rule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub verb: &'a str,
    /// `""` for the core group.
    pub group: &'a str,
    /// `plural`, or `plural/status`.
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Rbac {
    rules: Vec<Rule>,
    /// The user the messages name, as the real server's do.
    user: String,
}

impl Rbac {
    /// The rules of the ClusterRole and Role bound to the controller's service account
    /// in `deploy/install.yaml`.
    pub fn of_install_manifest() -> Rbac {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|document| Value::deserialize(document).ok())
            .collect();
        let account = ("weft-system", "weft-controller");
        let bound = |binding_kind: &str| -> Vec<(String, Option<String>)> {
            objects
                .iter()
                .filter(|object| object["kind"] == binding_kind)
                .filter(|binding| {
                    binding["subjects"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|subject| {
                            subject["kind"] == "ServiceAccount"
                                && subject["namespace"] == account.0
                                && subject["name"] == account.1
                        })
                })
                .map(|binding| {
                    let role = binding["roleRef"]["name"].as_str().unwrap_or_default();
                    let namespace = binding["metadata"]["namespace"].as_str().map(str::to_owned);
                    (role.to_owned(), namespace)
                })
                .collect()
        };
        let mut rules = Vec::new();
        for (kind, binding_kind) in [
            ("ClusterRole", "ClusterRoleBinding"),
            ("Role", "RoleBinding"),
        ] {
            for (role, namespace) in bound(binding_kind) {
                let object = objects
                    .iter()
                    .find(|object| {
                        object["kind"] == kind
                            && object["metadata"]["name"] == role.as_str()
                            && object["metadata"]["namespace"].as_str() == namespace.as_deref()
                    })
                    .unwrap_or_else(|| panic!("{binding_kind} refers to a missing {kind} {role}"));
                for rule in object["rules"].as_sequence().into_iter().flatten() {
                    let strings = |field: &str| -> Vec<String> {
                        rule[field]
                            .as_sequence()
                            .into_iter()
                            .flatten()
                            .filter_map(|value| value.as_str().map(str::to_owned))
                            .collect()
                    };
                    rules.push(Rule {
                        namespace: namespace.clone(),
                        groups: strings("apiGroups"),
                        resources: strings("resources"),
                        verbs: strings("verbs"),
                        names: strings("resourceNames"),
                    });
                }
            }
        }
        assert!(
            !rules.is_empty(),
            "no role is bound to the controller's service account"
        );
        Rbac {
            rules,
            user: format!("system:serviceaccount:{}:{}", account.0, account.1),
        }
    }

    /// Whether a rule allows `access`.
    pub fn allows(&self, access: Access<'_>) -> bool {
        self.rules.iter().any(|rule| {
            let has = |list: &[String], wanted: &str| list.iter().any(|item| item == wanted);
            rule.namespace
                .as_deref()
                .is_none_or(|namespace| access.namespace == Some(namespace))
                && has(&rule.groups, access.group)
                && has(&rule.resources, access.resource)
                && has(&rule.verbs, access.verb)
                && (rule.names.is_empty() || access.name.is_some_and(|name| has(&rule.names, name)))
        })
    }

    /// The message of the real server's `403 Forbidden` for `access`.
    pub fn forbidden(&self, access: Access<'_>) -> String {
        let (plural, subresource) = match access.resource.split_once('/') {
            Some((plural, subresource)) => (plural, format!("/{subresource}")),
            None => (access.resource, String::new()),
        };
        let what = match access.name {
            Some(name) => format!("{plural} \"{name}\""),
            None => plural.to_owned(),
        };
        let scope = match access.namespace {
            Some(namespace) => format!(" in the namespace \"{namespace}\""),
            None => " at the cluster scope".to_owned(),
        };
        format!(
            "{what} is forbidden: User \"{}\" cannot {} resource \"{plural}{subresource}\" in API group \"{}\"{scope}",
            self.user, access.verb, access.group
        )
    }
}
