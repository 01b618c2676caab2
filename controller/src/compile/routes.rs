//! HTTPRoutes and GRPCRoutes attached to Services (Gateway API's mesh profile,
//! GAMMA): each (rule, match) becomes one entry of the parent service's routes, in
//! Gateway API precedence order. A route with any problem applies nowhere; its
//! status says which field. The agents do not route by them yet ([`enforcement`]):
//! valid routes are compiled and sent, and their verdict says `NotEnforced`.

use std::collections::BTreeMap;

use gateway_api::{
    grpcroutes::{
        GrpcRoute, GrpcRouteRulesMatches, GrpcRouteRulesMatchesHeadersType,
        GrpcRouteRulesMatchesMethodType,
    },
    httproutes::{
        HttpRoute, HttpRouteRulesFilters, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType,
        HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
    },
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use weft_api::{
    config::v1::{self as proto, route_match::PathKind},
    crd::parse_duration,
};

use super::{by_age, enforcement, judge};
use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, Statuses, Verdict},
};

/// The compiled routes by `<namespace>/<service>:<port>`.
pub fn compile(
    objects: &Objects,
    statuses: &mut Statuses,
) -> BTreeMap<String, proto::ServiceRoutes> {
    let mut routes: Vec<Route> = Vec::new();
    for (key, route) in by_age(
        objects.http_routes.iter().map(|(k, r)| (k, r.as_ref())),
        |r| &r.metadata,
    ) {
        if let Some(route) = from_http(key, route, objects, statuses) {
            routes.push(route);
        }
    }
    for (key, route) in by_age(
        objects.grpc_routes.iter().map(|(k, r)| (k, r.as_ref())),
        |r| &r.metadata,
    ) {
        if let Some(route) = from_grpc(key, route, objects, statuses) {
            routes.push(route);
        }
    }

    // Stable sort: equal precedence keeps route age, then rule and match order.
    let mut entries: Vec<(&Parent, Precedence, proto::RouteRule)> = Vec::new();
    for route in &routes {
        for parent in &route.parents {
            for rule in &route.rules {
                for matched in &rule.matches {
                    entries.push((
                        parent,
                        Precedence::of(matched),
                        proto::RouteRule {
                            route: route.name.clone(),
                            matches: vec![matched.clone()],
                            backends: rule.backends.clone(),
                            timeout_ms: rule.timeout_ms,
                            set_headers: rule.set_headers.clone(),
                        },
                    ));
                }
            }
        }
    }
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.1));

    let mut compiled: BTreeMap<String, proto::ServiceRoutes> = BTreeMap::new();
    for (parent, _, rule) in entries {
        let name = format!("{}/{}:{}", parent.namespace, parent.service, parent.port);
        compiled
            .entry(name)
            .or_insert_with(|| proto::ServiceRoutes {
                service: parent.service.clone(),
                namespace: parent.namespace.clone(),
                port: parent.port,
                rules: Vec::new(),
            })
            .rules
            .push(rule);
    }
    compiled
}

/// A route reduced to what both kinds share, once it has passed every check.
struct Route {
    /// `<Kind>/<namespace>/<name>`.
    name: String,
    parents: Vec<Parent>,
    rules: Vec<Rule>,
}

struct Parent {
    namespace: String,
    service: String,
    /// 0: every port of the service.
    port: u32,
}

struct Rule {
    matches: Vec<proto::RouteMatch>,
    backends: Vec<proto::WeightedBackend>,
    timeout_ms: u64,
    set_headers: BTreeMap<String, String>,
}

/// Gateway API precedence, greatest first: exact path, longer path, a method, more
/// header matches, more query parameter matches.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    exact: bool,
    path_length: usize,
    method: bool,
    headers: usize,
    query_params: usize,
}

impl Precedence {
    fn of(matched: &proto::RouteMatch) -> Self {
        Self {
            exact: matched.path_kind == PathKind::Exact as i32,
            path_length: matched.path.len(),
            method: !matched.method.is_empty(),
            headers: matched.headers.len(),
            query_params: matched.query_params.len(),
        }
    }
}

/// A reference in a route, as both kinds spell it.
struct Reference<'a> {
    group: Option<&'a str>,
    kind: Option<&'a str>,
    name: &'a str,
    namespace: Option<&'a str>,
    port: Option<i32>,
}

/// The [`Reference`] of a parentRef or backendRef, of whichever route kind's type.
macro_rules! reference {
    ($item:expr) => {
        Reference {
            group: $item.group.as_deref(),
            kind: $item.kind.as_deref(),
            name: &$item.name,
            namespace: $item.namespace.as_deref(),
            port: $item.port,
        }
    };
}

impl Reference<'_> {
    fn is_service(&self, default_kind: &str) -> bool {
        matches!(self.group, None | Some("" | "core"))
            && self.kind.unwrap_or(default_kind) == "Service"
    }
}

/// A rule's backends, their weights, and the rest of the rule (or what is wrong with
/// it, as a field path below the rule).
type RuleParts<'a> = (Vec<Reference<'a>>, Vec<i32>, Result<Rule, String>);

/// Checks the parents and backends shared by both kinds and assembles the route.
/// `None` (with the verdict recorded) for a route that is not ours or has a problem.
#[allow(clippy::too_many_arguments)]
fn assemble(
    kind: Kind,
    key: &ObjectKey,
    meta: &ObjectMeta,
    spec: &impl Serialize,
    parents: Vec<Reference<'_>>,
    rules: Vec<RuleParts<'_>>,
    objects: &Objects,
    statuses: &mut Statuses,
) -> Option<Route> {
    let service_parents: Vec<(usize, &Reference)> = parents
        .iter()
        .enumerate()
        .filter(|(_, parent)| parent.is_service("Gateway"))
        .collect();
    if service_parents.is_empty() {
        // Attached to Gateways only: another controller's business.
        return None;
    }
    let outcome = (|| -> Result<Route, Verdict> {
        let mut compiled_parents = Vec::new();
        for (index, parent) in service_parents {
            let namespace = parent.namespace.unwrap_or(&key.namespace);
            if !objects
                .services
                .contains_key(&ObjectKey::new(namespace, parent.name))
            {
                return Err(Verdict::rejected(
                    Reason::ServiceNotFound,
                    format!(
                        "spec.parentRefs[{index}]: there is no Service {} in namespace {namespace}",
                        parent.name
                    ),
                ));
            }
            compiled_parents.push(Parent {
                namespace: namespace.to_owned(),
                service: parent.name.to_owned(),
                port: parent
                    .port
                    .and_then(|port| u32::try_from(port).ok())
                    .unwrap_or(0),
            });
        }
        let mut compiled_rules = Vec::new();
        for (rule_index, (backends, weights, rule)) in rules.into_iter().enumerate() {
            let mut rule = rule.map_err(|problem| {
                Verdict::rejected(
                    Reason::Invalid,
                    format!("spec.rules[{rule_index}].{problem}"),
                )
            })?;
            for (index, (backend, weight)) in backends.iter().zip(weights).enumerate() {
                let field = format!("spec.rules[{rule_index}].backendRefs[{index}]");
                if !backend.is_service("Service") {
                    return Err(Verdict::rejected(
                        Reason::Invalid,
                        format!("{field}: only Services can be backends in the mesh"),
                    ));
                }
                let namespace = backend.namespace.unwrap_or(&key.namespace);
                if !objects
                    .services
                    .contains_key(&ObjectKey::new(namespace, backend.name))
                {
                    return Err(Verdict::rejected(
                        Reason::ServiceNotFound,
                        format!(
                            "{field}: there is no Service {} in namespace {namespace}",
                            backend.name
                        ),
                    ));
                }
                let Some(port) = backend.port.and_then(|port| u32::try_from(port).ok()) else {
                    return Err(Verdict::rejected(
                        Reason::Invalid,
                        format!("{field}.port: a Service backend needs a port"),
                    ));
                };
                rule.backends.push(proto::WeightedBackend {
                    service: format!("{namespace}/{}", backend.name),
                    port,
                    weight: u32::try_from(weight).unwrap_or(0),
                });
            }
            compiled_rules.push(rule);
        }
        Ok(Route {
            name: format!("{kind}/{key}"),
            parents: compiled_parents,
            rules: compiled_rules,
        })
    })();
    match outcome {
        Ok(route) => {
            let services: Vec<String> = route
                .parents
                .iter()
                .map(|parent| format!("{}/{}", parent.namespace, parent.service))
                .collect();
            let target = format!("Service {}", services.join(", "));
            let accepted =
                Verdict::accepted(Reason::Accepted, format!("routes requests to {target}"));
            judge(
                statuses,
                kind,
                key,
                meta,
                enforcement::verdict(kind, spec, &target, accepted),
            );
            Some(route)
        }
        Err(verdict) => {
            judge(statuses, kind, key, meta, verdict);
            None
        }
    }
}

fn from_http(
    key: &ObjectKey,
    route: &HttpRoute,
    objects: &Objects,
    statuses: &mut Statuses,
) -> Option<Route> {
    let parents = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .map(|parent| reference!(parent))
        .collect();
    let rules = route
        .spec
        .rules
        .iter()
        .flatten()
        .map(|rule| {
            let (backends, weights) = rule
                .backend_refs
                .iter()
                .flatten()
                .map(|backend| (reference!(backend), backend.weight.unwrap_or(1)))
                .unzip();
            let compiled = (|| {
                let matches = match rule.matches.as_deref() {
                    None | Some([]) => vec![everything()],
                    Some(matches) => matches
                        .iter()
                        .enumerate()
                        .map(|(index, matched)| {
                            http_match(matched)
                                .map_err(|problem| format!("matches[{index}]{problem}"))
                        })
                        .collect::<Result<_, _>>()?,
                };
                let timeout_ms = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
                    None => 0,
                    Some(text) => parse_duration(text)
                        .ok_or_else(|| format!("timeouts.request: {text:?} is not a duration"))?
                        .as_millis() as u64,
                };
                let set_headers = http_filters(rule.filters.as_deref().unwrap_or_default())?;
                Ok(Rule {
                    matches,
                    backends: Vec::new(),
                    timeout_ms,
                    set_headers,
                })
            })();
            (backends, weights, compiled)
        })
        .collect();
    assemble(
        Kind::HttpRoute,
        key,
        &route.metadata,
        &route.spec,
        parents,
        rules,
        objects,
        statuses,
    )
}

/// The match of a rule without matches: every request.
fn everything() -> proto::RouteMatch {
    proto::RouteMatch {
        path_kind: PathKind::Prefix as i32,
        path: "/".to_owned(),
        ..Default::default()
    }
}

fn http_match(matched: &HttpRouteRulesMatches) -> Result<proto::RouteMatch, String> {
    let mut compiled = everything();
    if let Some(path) = &matched.path {
        compiled.path_kind = match path.r#type {
            Some(HttpRouteRulesMatchesPathType::Exact) => PathKind::Exact,
            Some(HttpRouteRulesMatchesPathType::RegularExpression) => PathKind::Regex,
            Some(HttpRouteRulesMatchesPathType::PathPrefix) | None => PathKind::Prefix,
        } as i32;
        compiled.path = path.value.clone().unwrap_or_else(|| "/".to_owned());
        if compiled.path_kind != PathKind::Regex as i32 && !compiled.path.starts_with('/') {
            return Err(format!(
                ".path.value: {:?} must start with '/'",
                compiled.path
            ));
        }
    }
    if let Some(method) = &matched.method {
        compiled.method = serde_json::to_value(method)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default();
    }
    compiled.headers = matched
        .headers
        .iter()
        .flatten()
        .map(|header| proto::HeaderMatch {
            name: header.name.to_ascii_lowercase(),
            value: header.value.clone(),
            regex: header.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression),
        })
        .collect();
    compiled.query_params = matched
        .query_params
        .iter()
        .flatten()
        .map(|param| proto::HeaderMatch {
            name: param.name.clone(),
            value: param.value.clone(),
            regex: param.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression),
        })
        .collect();
    Ok(compiled)
}

/// The headers a rule's filters set; other filters are refused, not ignored.
fn http_filters(filters: &[HttpRouteRulesFilters]) -> Result<BTreeMap<String, String>, String> {
    let mut set = BTreeMap::new();
    for (index, filter) in filters.iter().enumerate() {
        let modifier = filter
            .request_header_modifier
            .as_ref()
            .filter(|modifier| modifier.add.is_none() && modifier.remove.is_none());
        let Some(modifier) = modifier else {
            return Err(format!(
                "filters[{index}]: weft supports only RequestHeaderModifier with `set` so far"
            ));
        };
        for header in modifier.set.iter().flatten() {
            set.insert(header.name.to_ascii_lowercase(), header.value.clone());
        }
    }
    Ok(set)
}

fn from_grpc(
    key: &ObjectKey,
    route: &GrpcRoute,
    objects: &Objects,
    statuses: &mut Statuses,
) -> Option<Route> {
    let parents = route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .map(|parent| reference!(parent))
        .collect();
    let rules = route
        .spec
        .rules
        .iter()
        .flatten()
        .map(|rule| {
            let (backends, weights) = rule
                .backend_refs
                .iter()
                .flatten()
                .map(|backend| (reference!(backend), backend.weight.unwrap_or(1)))
                .unzip();
            let compiled = if rule
                .filters
                .as_ref()
                .is_some_and(|filters| !filters.is_empty())
            {
                Err("filters: weft supports no GRPCRoute filters so far".to_owned())
            } else {
                let matches = match rule.matches.as_deref() {
                    None | Some([]) => vec![everything()],
                    Some(matches) => matches.iter().map(grpc_match).collect(),
                };
                Ok(Rule {
                    matches,
                    backends: Vec::new(),
                    timeout_ms: 0,
                    set_headers: BTreeMap::new(),
                })
            };
            (backends, weights, compiled)
        })
        .collect();
    assemble(
        Kind::GrpcRoute,
        key,
        &route.metadata,
        &route.spec,
        parents,
        rules,
        objects,
        statuses,
    )
}

/// A gRPC method match as the HTTP/2 path it is: `/<service>/<method>`.
fn grpc_match(matched: &GrpcRouteRulesMatches) -> proto::RouteMatch {
    let mut compiled = everything();
    if let Some(method) = &matched.method {
        let service = method.service.as_deref();
        let name = method.method.as_deref();
        let regex = method.r#type == Some(GrpcRouteRulesMatchesMethodType::RegularExpression);
        let (kind, path) = match (regex, service, name) {
            (false, Some(service), Some(name)) => (PathKind::Exact, format!("/{service}/{name}")),
            (false, Some(service), None) => (PathKind::Prefix, format!("/{service}/")),
            (false, None, Some(name)) => (PathKind::Regex, format!("/[^/]+/{}", escape(name))),
            (true, service, name) => (
                PathKind::Regex,
                format!(
                    "/{}/{}",
                    service.unwrap_or("[^/]+"),
                    name.unwrap_or("[^/]+")
                ),
            ),
            (false, None, None) => (PathKind::Prefix, "/".to_owned()),
        };
        compiled.path_kind = kind as i32;
        compiled.path = path;
    }
    compiled.method = "POST".to_owned();
    compiled.headers = matched
        .headers
        .iter()
        .flatten()
        .map(|header| proto::HeaderMatch {
            name: header.name.to_ascii_lowercase(),
            value: header.value.clone(),
            regex: header.r#type == Some(GrpcRouteRulesMatchesHeadersType::RegularExpression),
        })
        .collect();
    compiled
}

/// `text` with regular-expression metacharacters escaped.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if "\\.+*?()|[]{}^$".contains(character) {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}
