//! RBAC as `deploy/install.yaml` grants it, enforced as the real API server's
//! authorizer does: a subject may do what a rule allows of a role bound to it — a
//! ClusterRoleBinding's role everywhere, a RoleBinding's in its namespace. A rule
//! allows a request when it names the request's API group, its resource (`plural`, or
//! `plural/subresource`), its verb and, when the rule lists names, its object's name.
//! A create names no object, so a rule with names never allows one.
//!
//! The roles and bindings are the manifest's; a test adds the bindings an operator
//! would create (`kubectl create rolebinding …`) with [`Rbac::bind`].

use std::path::Path;

use serde::Deserialize as _;
use serde_yaml::Value;

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    ServiceAccount { namespace: String, name: String },
    User(String),
}

impl Subject {
    /// The controller's service account, as the manifest names it.
    pub fn controller() -> Subject {
        Subject::ServiceAccount {
            namespace: "weft-system".to_owned(),
            name: "weft-controller".to_owned(),
        }
    }

    /// The subject of an authenticated user name (`system:serviceaccount:NS:NAME`
    /// for service accounts).
    pub fn of_username(username: &str) -> Subject {
        match username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        {
            Some((namespace, name)) => Subject::ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            None => Subject::User(username.to_owned()),
        }
    }

    /// The user name the server's messages give.
    fn username(&self) -> String {
        match self {
            Subject::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
            Subject::User(name) => name.clone(),
        }
    }
}

/// One rule of a role.
#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

/// A Role (with its namespace) or a ClusterRole.
#[derive(Debug, Clone)]
struct Role {
    kind: String,
    name: String,
    namespace: Option<String>,
    rules: Vec<Rule>,
}

/// A subject holding a role, everywhere (`namespace: None`) or in one namespace.
#[derive(Debug, Clone)]
struct Binding {
    subject: Subject,
    role_kind: String,
    role: String,
    namespace: Option<String>,
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub verb: &'a str,
    /// `""` for the core group.
    pub group: &'a str,
    /// `plural`, or `plural/subresource`.
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

#[derive(Debug, Clone)]
pub struct Rbac {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
}

impl Rbac {
    /// The roles and bindings of `deploy/install.yaml`.
    pub fn of_install_manifest() -> Rbac {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/install.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|document| Value::deserialize(document).ok())
            .collect();
        let string = |value: &Value| value.as_str().map(str::to_owned);
        let roles = objects
            .iter()
            .filter(|object| object["kind"] == "Role" || object["kind"] == "ClusterRole")
            .map(|role| Role {
                kind: string(&role["kind"]).unwrap_or_default(),
                name: string(&role["metadata"]["name"]).unwrap_or_default(),
                namespace: string(&role["metadata"]["namespace"]),
                rules: role["rules"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(|rule| {
                        let strings = |field: &str| -> Vec<String> {
                            rule[field]
                                .as_sequence()
                                .into_iter()
                                .flatten()
                                .filter_map(string)
                                .collect()
                        };
                        Rule {
                            groups: strings("apiGroups"),
                            resources: strings("resources"),
                            verbs: strings("verbs"),
                            names: strings("resourceNames"),
                        }
                    })
                    .collect(),
            })
            .collect();
        let mut rbac = Rbac {
            roles,
            bindings: Vec::new(),
        };
        for binding in objects.iter().filter(|object| {
            object["kind"] == "RoleBinding" || object["kind"] == "ClusterRoleBinding"
        }) {
            let namespace = string(&binding["metadata"]["namespace"]);
            let role_kind = string(&binding["roleRef"]["kind"]).unwrap_or_default();
            let role = string(&binding["roleRef"]["name"]).unwrap_or_default();
            for entry in binding["subjects"].as_sequence().into_iter().flatten() {
                let subject = match string(&entry["kind"]).as_deref() {
                    Some("ServiceAccount") => Subject::ServiceAccount {
                        namespace: string(&entry["namespace"]).unwrap_or_default(),
                        name: string(&entry["name"]).unwrap_or_default(),
                    },
                    _ => Subject::User(string(&entry["name"]).unwrap_or_default()),
                };
                rbac.bind(subject, &role_kind, &role, namespace.as_deref());
            }
        }
        assert!(
            rbac.rules_of(&Subject::controller()).next().is_some(),
            "no role is bound to the controller's service account"
        );
        rbac
    }

    /// Binds `role` (a `Role` in `namespace`, or a `ClusterRole`) to `subject`, in
    /// `namespace` only when it is given, as `kubectl create (cluster)rolebinding`
    /// does. Panics when the manifest has no such role: the test names one the
    /// install does not ship.
    pub fn bind(&mut self, subject: Subject, role_kind: &str, role: &str, namespace: Option<&str>) {
        assert!(
            self.role(role_kind, role, namespace).is_some(),
            "deploy/install.yaml has no {role_kind} {role} (namespace {namespace:?})"
        );
        self.bindings.push(Binding {
            subject,
            role_kind: role_kind.to_owned(),
            role: role.to_owned(),
            namespace: namespace.map(str::to_owned),
        });
    }

    fn role(&self, kind: &str, name: &str, namespace: Option<&str>) -> Option<&Role> {
        self.roles.iter().find(|role| {
            role.kind == kind
                && role.name == name
                && (kind == "ClusterRole" || role.namespace.as_deref() == namespace)
        })
    }

    /// The rules `subject` holds, each with the namespace it is limited to.
    fn rules_of<'a>(
        &'a self,
        subject: &'a Subject,
    ) -> impl Iterator<Item = (Option<&'a str>, &'a Rule)> + 'a {
        self.bindings
            .iter()
            .filter(move |binding| binding.subject == *subject)
            .filter_map(|binding| {
                let role = self.role(
                    &binding.role_kind,
                    &binding.role,
                    binding.namespace.as_deref(),
                )?;
                Some(
                    role.rules
                        .iter()
                        .map(|rule| (binding.namespace.as_deref(), rule)),
                )
            })
            .flatten()
    }

    /// Whether `subject` may do `access`.
    pub fn allows(&self, subject: &Subject, access: Access<'_>) -> bool {
        self.rules_of(subject).any(|(namespace, rule)| {
            let has = |list: &[String], wanted: &str| list.iter().any(|item| item == wanted);
            namespace.is_none_or(|namespace| access.namespace == Some(namespace))
                && has(&rule.groups, access.group)
                && has(&rule.resources, access.resource)
                && has(&rule.verbs, access.verb)
                && (rule.names.is_empty() || access.name.is_some_and(|name| has(&rule.names, name)))
        })
    }

    /// The message of the real server's `403 Forbidden` for `access` by `subject`.
    pub fn forbidden(subject: &Subject, access: Access<'_>) -> String {
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
            subject.username(),
            access.verb,
            access.group
        )
    }
}
