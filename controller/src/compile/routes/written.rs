//! The written form HTTPRoutes and GRPCRoutes share: the generated types of the two
//! kinds differ in name only (and in their matches, kept as JSON here and read by
//! kind), so both specs are read through these. Fields weft does not know land in
//! `unknown`, so that a route using them is refused by name instead of half-applied.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenSpec {
    #[serde(default)]
    pub parent_refs: Vec<Reference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<WrittenRule>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// A parentRef, backendRef or mirror backendRef.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub section_name: Option<String>,
    pub weight: Option<i32>,
    #[serde(default)]
    pub filters: Vec<Filter>,
}

impl Reference {
    /// A parent that is a Service (a parent's kind defaults to Gateway).
    pub fn is_service(&self) -> bool {
        self.in_core_group() && self.kind.as_deref() == Some("Service")
    }

    /// A backend that is a Service (a backend's kind defaults to Service).
    pub fn is_backend_service(&self) -> bool {
        self.in_core_group() && self.kind.as_deref().unwrap_or("Service") == "Service"
    }

    fn in_core_group(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("" | "core"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenRule {
    pub name: Option<String>,
    /// An HTTPRoute's or a GRPCRoute's matches, read by kind.
    #[serde(default)]
    pub matches: Vec<Value>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<Reference>,
    pub timeouts: Option<WrittenTimeouts>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenTimeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<Modifier>,
    pub response_header_modifier: Option<Modifier>,
    pub request_redirect: Option<WrittenRedirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<WrittenRewrite>,
    pub request_mirror: Option<WrittenMirror>,
    pub extension_ref: Option<ExtensionRef>,
}

/// A filter of an implementation's own kind.
#[derive(Debug, Deserialize)]
pub struct ExtensionRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct Modifier {
    #[serde(default)]
    pub set: Vec<NameValue>,
    #[serde(default)]
    pub add: Vec<NameValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<WrittenPath>,
    pub port: Option<i32>,
    pub status_code: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenRewrite {
    pub hostname: Option<String>,
    pub path: Option<WrittenPath>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenPath {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WrittenMirror {
    pub backend_ref: Reference,
    pub percent: Option<i32>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Deserialize)]
pub struct Fraction {
    pub numerator: i32,
    pub denominator: Option<i32>,
}

/// An HTTPRoute match.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A GRPCRoute match.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    pub method: Option<GrpcMethod>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Deserialize)]
pub struct GrpcMethod {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub service: Option<String>,
    pub method: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Deserialize)]
pub struct ValueMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}
