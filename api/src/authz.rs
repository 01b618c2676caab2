//! Authorization policies as the agents enforce them, and the one evaluator that
//! decides — and explains — who may reach a pod.
//!
//! The controller compiles each `AuthorizationPolicy` into a [`Policy`]: its rules
//! parsed once (patterns, IP blocks, condition keys), and the workloads it selects
//! resolved. The agent indexes them by the workloads they select and calls
//! [`evaluate`] for every connection and request; the admin endpoints call
//! [`explain`], which is [`evaluate`] put into words, so an answer to "why was this
//! denied?" is the data path's own decision.

mod evaluate;
pub mod query;

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use self::evaluate::{
    Caller, Decision, Explanation, Headers, Matched, Reason, Request, Target, Traffic, Verdict,
    evaluate, explain,
};

/// What a policy does with what its rules match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// A compiled AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub action: Action,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The workloads it selects, `<namespace>/<name>`.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// The policy matches what any rule matches; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `<namespace>/<name>`, as metrics and logs name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a rule looks at the caller's address (`ipBlocks`, `source.ip`).
    pub fn names_source_addresses(&self) -> bool {
        self.rules.iter().any(|rule| {
            rule.from
                .iter()
                .any(|source| !source.ip_blocks.is_empty() || !source.not_ip_blocks.is_empty())
                || rule
                    .when
                    .iter()
                    .any(|condition| condition.key == Key::SourceIp)
        })
    }

    /// The destination ports its rules name (`ports`, `notPorts`, `destination.port`).
    pub fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.rules.iter().flat_map(|rule| {
            let operations = rule
                .to
                .iter()
                .flat_map(|operation| operation.ports.iter().chain(&operation.not_ports));
            let conditions = rule.when.iter().flat_map(|condition| {
                [&condition.values, &condition.not_values]
                    .into_iter()
                    .flat_map(|values| match values {
                        Values::Ports(ports) => ports.as_slice(),
                        Values::Text(_) | Values::Addresses(_) => &[],
                    })
            });
            operations.chain(conditions).copied()
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// Principals are kept without `spiffe://`; service accounts as `<namespace>/<account>`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Source {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "principals"
    )]
    pub principals: Vec<Pattern>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "principals"
    )]
    pub not_principals: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<IpBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<IpBlock>,
}

/// Hosts are kept in lower case.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Pattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<Pattern>,
}

impl Operation {
    /// Whether it sets an HTTP condition, which TCP traffic cannot be checked against.
    pub fn is_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// `when`: the attribute `key` names has one of `values` (if any) and none of
/// `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "WrittenCondition", into = "WrittenCondition")]
pub struct Condition {
    pub key: Key,
    pub values: Values,
    pub not_values: Values,
}

/// A condition's values, typed by its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Values {
    Text(Vec<Pattern>),
    Addresses(Vec<IpBlock>),
    Ports(Vec<u16>),
}

impl Condition {
    /// Parses a condition as the CRD writes it; the error names what is wrong.
    pub fn parse(key: &str, values: &[String], not_values: &[String]) -> Result<Self, String> {
        let key: Key = key.parse()?;
        if values.is_empty() && not_values.is_empty() {
            return Err(format!("{key}: give values or notValues"));
        }
        let parse = |written: &[String]| -> Result<Values, String> {
            Ok(match key {
                Key::SourceIp | Key::DestinationIp => Values::Addresses(
                    written
                        .iter()
                        .map(|value| value.parse())
                        .collect::<Result<_, _>>()?,
                ),
                Key::DestinationPort => Values::Ports(
                    written
                        .iter()
                        .map(|value| {
                            value
                                .parse()
                                .ok()
                                .filter(|&port: &u16| port != 0)
                                .ok_or_else(|| format!("{value:?} is not a port"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Key::SourcePrincipal => Values::Text(
                    written
                        .iter()
                        .map(|value| principal(value))
                        .collect::<Result<_, _>>()?,
                ),
                Key::Header(_) | Key::SourceNamespace => Values::Text(
                    written
                        .iter()
                        .map(|value| value.parse())
                        .collect::<Result<_, _>>()?,
                ),
            })
        };
        Ok(Condition {
            values: parse(values)?,
            not_values: parse(not_values)?,
            key,
        })
    }
}

impl Values {
    fn written(&self) -> Vec<String> {
        match self {
            Values::Text(values) => values.iter().map(ToString::to_string).collect(),
            Values::Addresses(values) => values.iter().map(ToString::to_string).collect(),
            Values::Ports(values) => values.iter().map(ToString::to_string).collect(),
        }
    }
}

/// A [`Condition`] as written: strings.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WrittenCondition {
    key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_values: Vec<String>,
}

impl TryFrom<WrittenCondition> for Condition {
    type Error = String;

    fn try_from(written: WrittenCondition) -> Result<Self, String> {
        Condition::parse(&written.key, &written.values, &written.not_values)
    }
}

impl From<Condition> for WrittenCondition {
    fn from(condition: Condition) -> Self {
        WrittenCondition {
            key: condition.key.to_string(),
            values: condition.values.written(),
            not_values: condition.not_values.written(),
        }
    }
}

/// The attribute a [`Condition`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// `request.headers[<name>]`, the name in lower case.
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
}

impl Key {
    pub fn is_http(&self) -> bool {
        matches!(self, Key::Header(_))
    }
}

impl FromStr for Key {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, String> {
        Ok(match key {
            "source.ip" => Key::SourceIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "destination.ip" => Key::DestinationIp,
            "destination.port" => Key::DestinationPort,
            _ => {
                let name = key
                    .strip_prefix("request.headers[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .filter(|name| {
                        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                    })
                    .ok_or_else(|| {
                        format!(
                            "{key:?} is not a key weft knows: request.headers[<name>], source.ip, \
                             source.namespace, source.principal, destination.ip or destination.port"
                        )
                    })?;
                Key::Header(name.to_ascii_lowercase())
            }
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Header(name) => write!(f, "request.headers[{name}]"),
            Key::SourceIp => f.write_str("source.ip"),
            Key::SourceNamespace => f.write_str("source.namespace"),
            Key::SourcePrincipal => f.write_str("source.principal"),
            Key::DestinationIp => f.write_str("destination.ip"),
            Key::DestinationPort => f.write_str("destination.port"),
        }
    }
}

/// A string match as Istio writes it: `*` (anything, but something), `abc*`
/// (prefix), `*abc` (suffix), or exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(String),
    Suffix(String),
    Exact(String),
}

impl Pattern {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Pattern::Suffix(suffix) => value.ends_with(suffix.as_str()),
            Pattern::Exact(exact) => value == exact,
        }
    }

    /// The pattern with its text in lower case (hosts match case-insensitively).
    pub fn lowercase(self) -> Self {
        match self {
            Pattern::Prefix(text) => Pattern::Prefix(text.to_ascii_lowercase()),
            Pattern::Suffix(text) => Pattern::Suffix(text.to_ascii_lowercase()),
            Pattern::Exact(text) => Pattern::Exact(text.to_ascii_lowercase()),
            Pattern::Any => Pattern::Any,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    /// Non-empty, with `*` only as the whole value, its first or its last character.
    fn from_str(value: &str) -> Result<Self, String> {
        if value.is_empty() {
            return Err("empty; use \"*\" for any".to_owned());
        }
        let pattern = if value == "*" {
            Pattern::Any
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.to_owned())
        } else if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.to_owned())
        } else {
            Pattern::Exact(value.to_owned())
        };
        match &pattern {
            Pattern::Prefix(text) | Pattern::Suffix(text) | Pattern::Exact(text)
                if text.contains('*') =>
            {
                Err(format!(
                    "{value:?}: '*' may only be the first or the last character"
                ))
            }
            _ => Ok(pattern),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
            Pattern::Suffix(suffix) => write!(f, "*{suffix}"),
            Pattern::Exact(exact) => f.write_str(exact),
        }
    }
}

/// A principal as a pattern over the SPIFFE ID without `spiffe://`: `*`, a prefix or
/// suffix, or `<trust-domain>/ns/<namespace>/sa/<account>` (with or without the
/// scheme, as Istio writes principals without it).
pub fn principal(value: &str) -> Result<Pattern, String> {
    let not_spiffe = || {
        format!(
            "{value:?} is not a SPIFFE ID (<trust-domain>/ns/<namespace>/sa/<service-account>, \
             optionally with spiffe://)"
        )
    };
    let pattern: Pattern = value.strip_prefix("spiffe://").unwrap_or(value).parse()?;
    match &pattern {
        Pattern::Exact(id) => match id.split('/').collect::<Vec<_>>().as_slice() {
            [domain, "ns", namespace, "sa", account]
                if !domain.is_empty() && !namespace.is_empty() && !account.is_empty() =>
            {
                Ok(pattern)
            }
            _ => Err(not_spiffe()),
        },
        Pattern::Any | Pattern::Prefix(_) | Pattern::Suffix(_) => Ok(pattern),
    }
}

/// Principals as written, with or without `spiffe://`.
fn principals<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Pattern>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|entry| principal(entry).map_err(serde::de::Error::custom))
        .collect()
}

/// A service account entry as `<namespace>/<account>`; a bare `<account>` is of
/// `namespace`.
pub fn service_account(value: &str, namespace: &str) -> Result<String, String> {
    let valid = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match value.split_once('/') {
        Some((ns, account)) if valid(ns) && valid(account) => Ok(value.to_owned()),
        None if valid(value) => Ok(format!("{namespace}/{value}")),
        _ => Err(format!(
            "{value:?} is not a service account (<namespace>/<account> or <account>)"
        )),
    }
}

/// An address block: an IP, or a CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let invalid = || format!("{value:?} is not an IP address or CIDR block (10.0.0.0/8)");
        let (address, prefix) = match value.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (value, None),
        };
        let network: IpAddr = address.parse().map_err(|_| invalid())?;
        let network = network.to_canonical();
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|&prefix| prefix <= bits)
                .ok_or_else(invalid)?,
            None => bits,
        };
        Ok(IpBlock { network, prefix })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `parse` applied to each entry of the list `field`; the error is the entry's path
/// (`field[index]`) and what is wrong with it.
#[cfg(any(feature = "config", feature = "crd"))]
pub(crate) fn parse_each<T, U>(
    field: &str,
    entries: &[T],
    parse: impl Fn(&T) -> Result<U, String>,
) -> Result<Vec<U>, (String, String)> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            parse(entry).map_err(|problem| (format!("{field}[{index}]"), problem))
        })
        .collect()
}

/// The types above that read and write themselves as strings.
macro_rules! as_string {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

as_string!(Pattern, IpBlock);

#[cfg(feature = "config")]
mod wire;

#[cfg(test)]
mod tests;
