//! HTTPRoutes and GRPCRoutes attached to Services (the Gateway API's mesh profile,
//! GAMMA), compiled into the agents' one route model ([`weft_api::routes`]).
//!
//! Both kinds are read through one written form ([`written`]): their specs share every
//! field but the matches, so one compiler serves both. Each rule lands in the routes
//! of every service port its route's parents name (a parent without a port: every
//! port), ordered by the Gateway API's precedence, equal matches by route age. A route
//! in another namespace than its parent Service is a consumer route: it applies to
//! that namespace's clients only.
//!
//! Status follows the Gateway API: `Accepted` (false with `NoMatchingParent` or
//! `UnsupportedValue`, naming the field, when the route applies nowhere) and
//! `ResolvedRefs` (false with `BackendNotFound`, `RefNotPermitted` or `InvalidKind`
//! when a backend does not resolve; the route still applies, and that backend's share
//! of requests is answered 500; `FilterNotFound` when an `ExtensionRef` names a
//! FaultInjection that does not resolve, whose rule's requests are answered 500).

mod written;

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use weft_api::{
    config::v1 as proto,
    crd::parse_duration,
    protocol::Protocol,
    routes::{
        Backend, BackendRef, Filters, HeaderModifier, Match, Mirror, PathMatch, PathModifier,
        Pattern, Precedence, Redirect, Rewrite, Rule, ServiceRoutes, Timeouts, ValueMatch,
        ValueMatchKind,
    },
};

use self::written::{Filter, NameValue, Reference, WrittenPath, WrittenRule, WrittenSpec};
use super::{by_age, faults, judge};
use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, References, RefusedParent, Statuses, Verdict},
};

/// The compiled routes by `<namespace>/<service>:<port>`.
pub fn compile(
    objects: &Objects,
    services: &BTreeMap<ObjectKey, proto::Service>,
    statuses: &mut Statuses,
) -> BTreeMap<String, proto::ServiceRoutes> {
    let mut candidates = Vec::new();
    for (key, route) in &objects.http_routes {
        candidates.push(Candidate::new(
            Kind::HttpRoute,
            key,
            &route.metadata,
            &route.spec,
        ));
    }
    for (key, route) in &objects.grpc_routes {
        candidates.push(Candidate::new(
            Kind::GrpcRoute,
            key,
            &route.metadata,
            &route.spec,
        ));
    }
    let candidates: Vec<(ObjectKey, Candidate)> = candidates
        .into_iter()
        .map(|candidate| (candidate.key.clone(), candidate))
        .collect();

    let mut entries: Vec<(String, Precedence, Rule)> = Vec::new();
    for (_, candidate) in by_age(candidates.iter().map(|(k, c)| (k, c)), |c| c.meta) {
        let Some(spec) = &candidate.spec else {
            judge(
                statuses,
                candidate.kind,
                candidate.key,
                candidate.meta,
                Verdict::rejected(Reason::UnsupportedValue, "spec: not a route weft can read"),
            );
            continue;
        };
        if !spec.parent_refs.iter().any(Reference::is_service) {
            // Attached to Gateways only: another controller's business.
            continue;
        }
        match compile_route(candidate, spec, services, objects) {
            Ok((compiled, verdict)) => {
                judge(
                    statuses,
                    candidate.kind,
                    candidate.key,
                    candidate.meta,
                    verdict,
                );
                for (parent, rule) in compiled {
                    for matched in &rule.matches {
                        let single = Rule {
                            matches: vec![matched.clone()],
                            ..rule.clone()
                        };
                        entries.push((parent.clone(), Precedence::of(matched), single));
                    }
                }
            }
            Err(verdict) => {
                judge(
                    statuses,
                    candidate.kind,
                    candidate.key,
                    candidate.meta,
                    *verdict,
                );
            }
        }
    }
    // Stable: equal precedence keeps route age, then rule and match order.
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.1));

    let mut compiled: BTreeMap<String, ServiceRoutes> = BTreeMap::new();
    for (parent, _, rule) in entries {
        let (service, port) = parent
            .rsplit_once(':')
            .expect("parents are <service>:<port>");
        let (namespace, name) = service.split_once('/').expect("services are <ns>/<name>");
        compiled
            .entry(parent.clone())
            .or_insert_with(|| ServiceRoutes {
                namespace: namespace.to_owned(),
                service: name.to_owned(),
                port: port.parse().unwrap_or_default(),
                rules: Vec::new(),
            })
            .rules
            .push(rule);
    }
    compiled
        .into_iter()
        .map(|(name, routes)| (name, proto::ServiceRoutes::from(&routes)))
        .collect()
}

/// A route of either kind, read into the written form they share.
struct Candidate<'a> {
    kind: Kind,
    key: &'a ObjectKey,
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    /// `None`: the spec does not read as a route (cannot happen with typed objects).
    spec: Option<WrittenSpec>,
}

impl<'a> Candidate<'a> {
    fn new(
        kind: Kind,
        key: &'a ObjectKey,
        meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        spec: &impl serde::Serialize,
    ) -> Self {
        let spec = serde_json::to_value(spec)
            .ok()
            .and_then(|value| serde_json::from_value(value).ok());
        Self {
            kind,
            key,
            meta,
            spec,
        }
    }
}

/// Why a route applies nowhere: the reason and the message naming the field.
type Refusal = (Reason, String);

/// A refused route's verdict (boxed: a verdict is large, and refusals are rare).
fn refuse(reason: Reason, message: String) -> Box<Verdict> {
    Box::new(Verdict::rejected(reason, message))
}

/// A route's rules by parent (`<namespace>/<service>:<port>`), and its verdict.
type CompiledRoute = (Vec<(String, Rule)>, Verdict);

/// The route's rules by parent, and its verdict.
fn compile_route(
    candidate: &Candidate,
    spec: &WrittenSpec,
    services: &BTreeMap<ObjectKey, proto::Service>,
    objects: &Objects,
) -> Result<CompiledRoute, Box<Verdict>> {
    let namespace = &candidate.key.namespace;
    if let Some(field) = spec.unknown.keys().next() {
        return Err(refuse(
            Reason::UnsupportedValue,
            format!("spec.{field}: weft does not support it"),
        ));
    }
    if !spec.hostnames.is_empty() {
        return Err(refuse(
            Reason::UnsupportedValue,
            "spec.hostnames: a mesh route applies by the Service's address, not by host names; \
             remove them (or route a Gateway with them)"
                .to_owned(),
        ));
    }
    // Parents: each Service port the route applies to.
    let mut parents: Vec<String> = Vec::new();
    let mut parent_services: Vec<ObjectKey> = Vec::new();
    let mut consumer = None;
    let mut refused_parents = Vec::new();
    for (index, parent) in spec.parent_refs.iter().enumerate() {
        if !parent.is_service() {
            continue;
        }
        let field = format!("spec.parentRefs[{index}]");
        let parent_namespace = parent.namespace.as_deref().unwrap_or(namespace);
        let key = ObjectKey::new(parent_namespace, &parent.name);
        let Some(service) = services.get(&key) else {
            refused_parents.push(RefusedParent {
                index,
                reason: Reason::NoMatchingParent,
                message: format!("{field}: there is no Service {key}"),
            });
            continue;
        };
        if parent.section_name.is_some() {
            return Err(refuse(
                Reason::UnsupportedValue,
                format!("{field}.sectionName: a Service parent is chosen by port, not section"),
            ));
        }
        // Routes apply to what the agents parse as HTTP: not to opaque TCP ports.
        let http = |port: &proto::ServicePort| {
            let declared = |text: &str| Some(text.to_owned()).filter(|text| !text.is_empty());
            Protocol::of(
                declared(&port.app_protocol).as_deref(),
                declared(&port.name).as_deref(),
            ) != Protocol::Tcp
        };
        let ports: Vec<u32> = match parent.port {
            None => service
                .ports
                .iter()
                .filter(|port| http(port))
                .map(|port| port.port)
                .collect(),
            Some(number) => match service
                .ports
                .iter()
                .find(|port| i64::from(port.port) == i64::from(number))
            {
                Some(port) if http(port) => vec![port.port],
                Some(_) => {
                    refused_parents.push(RefusedParent {
                        index,
                        reason: Reason::UnsupportedValue,
                        message: format!(
                            "{field}.port: port {number} of Service {key} carries opaque TCP \
                             (its appProtocol or name says so), which routes cannot match"
                        ),
                    });
                    continue;
                }
                None => {
                    refused_parents.push(RefusedParent {
                        index,
                        reason: Reason::NoMatchingParent,
                        message: format!("{field}.port: Service {key} has no port {number}"),
                    });
                    continue;
                }
            },
        };
        if parent_namespace != namespace {
            consumer = Some(namespace.clone());
        }
        parents.extend(ports.iter().map(|port| format!("{key}:{port}")));
        parent_services.push(key);
    }
    if parent_services.is_empty()
        && let Some(refused) = refused_parents.first()
    {
        // No parent takes the route: it applies nowhere.
        return Err(refuse(refused.reason, refused.message.clone()));
    }

    let mut resolution = Resolution::default();
    let context = Context {
        kind: candidate.kind,
        namespace,
        parents: &parent_services,
        services,
        objects,
    };
    let mut rules = Vec::new();
    for (index, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{index}]");
        let compiled = compile_rule(&context, rule, &field, &mut resolution)
            .map_err(|(reason, problem)| refuse(reason, format!("{field}.{problem}")))?;
        rules.push(Rule {
            route: format!("{}/{}", candidate.kind, candidate.key),
            name: rule.name.clone().unwrap_or_else(|| index.to_string()),
            consumer_namespace: consumer.clone(),
            ..compiled
        });
    }
    if rules.is_empty() {
        // No rules: the Gateway API's default, one rule for every request and no
        // backend, so that requests are answered 500.
        rules.push(Rule {
            route: format!("{}/{}", candidate.kind, candidate.key),
            name: "0".to_owned(),
            consumer_namespace: consumer.clone(),
            matches: vec![Match::default()],
            ..Rule::default()
        });
    }
    let targets: Vec<String> = parent_services.iter().map(ToString::to_string).collect();
    let clients = match &consumer {
        Some(namespace) => format!("for clients in namespace {namespace} (a consumer route)"),
        None => "for every client".to_owned(),
    };
    let verdict = Verdict::accepted(
        Reason::Accepted,
        format!(
            "routes requests to Service {} {clients}",
            targets.join(", ")
        ),
    )
    .with_references(resolution.finish());
    let verdict = Verdict {
        refused_parents,
        ..verdict
    };
    let compiled = parents
        .iter()
        .flat_map(|parent| rules.iter().map(move |rule| (parent.clone(), rule.clone())))
        .collect();
    Ok((compiled, verdict))
}

/// What compiling a rule needs to know about its route.
struct Context<'a> {
    kind: Kind,
    namespace: &'a str,
    /// The route's parent Services: always valid backends, in any namespace.
    parents: &'a [ObjectKey],
    services: &'a BTreeMap<ObjectKey, proto::Service>,
    /// For the ReferenceGrants that let a route reach into another namespace.
    objects: &'a Objects,
}

impl Context<'_> {
    /// Whether a ReferenceGrant in `backend`'s namespace lets this route's namespace
    /// refer to it: from this route's kind, to Services (all of them, or this one).
    fn granted(&self, backend: &ObjectKey) -> bool {
        self.objects
            .reference_grants
            .iter()
            .filter(|(key, _)| key.namespace == backend.namespace)
            .any(|(_, grant)| {
                let from = grant.spec.from.iter().any(|from| {
                    from.group == GATEWAY_GROUP
                        && from.kind == self.kind.name()
                        && from.namespace == self.namespace
                });
                let to = grant.spec.to.iter().any(|to| {
                    matches!(to.group.as_str(), "" | "core")
                        && to.kind == "Service"
                        && to.name.as_ref().is_none_or(|name| *name == backend.name)
                });
                from && to
            })
    }
}

/// The Gateway API's group, as a ReferenceGrant names the kinds it lets in.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// The references that did not resolve: the condition's reason is the first one's,
/// its message names them all.
#[derive(Default)]
struct Resolution {
    problems: Vec<(Reason, String)>,
}

impl Resolution {
    fn record(&mut self, reason: Reason, message: String) {
        self.problems.push((reason, message));
    }

    fn finish(self) -> References {
        match self.problems.first() {
            None => References {
                resolved: true,
                reason: Reason::ResolvedRefs,
                message: "every backend resolves".to_owned(),
            },
            Some((reason, _)) => References {
                resolved: false,
                reason: *reason,
                message: self
                    .problems
                    .iter()
                    .map(|(_, message)| message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        }
    }
}

/// The rule at `rule_field`; a refusal's field is written below it.
fn compile_rule(
    context: &Context,
    rule: &WrittenRule,
    rule_field: &str,
    resolution: &mut Resolution,
) -> Result<Rule, Refusal> {
    if let Some(field) = rule.unknown.keys().next() {
        return Err((
            Reason::UnsupportedValue,
            format!("{field}: weft does not support it"),
        ));
    }
    let matches = if rule.matches.is_empty() {
        vec![Match::default()]
    } else {
        rule.matches
            .iter()
            .enumerate()
            .map(|(index, matched)| {
                let compiled = match context.kind {
                    Kind::GrpcRoute => grpc_match(matched),
                    _ => http_match(matched),
                };
                compiled.map_err(|problem| {
                    (
                        Reason::UnsupportedValue,
                        format!("matches[{index}].{problem}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    let filters = compile_filters(context, &rule.filters, rule_field, "filters", resolution)
        .map_err(|(r, p)| (r, format!("filters{p}")))?;
    let mut backends = Vec::new();
    for (index, backend) in rule.backend_refs.iter().enumerate() {
        let field = format!("backendRefs[{index}]");
        let weight = backend.weight.unwrap_or(1);
        let weight = u32::try_from(weight).map_err(|_| {
            (
                Reason::UnsupportedValue,
                format!("{field}.weight: {weight} is negative"),
            )
        })?;
        let backend_filters = compile_filters(
            context,
            &backend.filters,
            rule_field,
            &format!("{field}.filters"),
            resolution,
        )
        .map_err(|(r, p)| (r, format!("{field}.filters{p}")))?;
        if backend_filters.redirect.is_some() || backend_filters.fault.is_some() {
            return Err((
                Reason::UnsupportedValue,
                format!(
                    "{field}.filters: a redirect or a FaultInjection belongs to the rule, not \
                     to one backend"
                ),
            ));
        }
        let target = resolve(context, backend, rule_field, &field, weight, resolution)?;
        backends.push(Backend {
            target,
            weight,
            filters: backend_filters,
        });
    }
    let timeouts = rule
        .timeouts
        .as_ref()
        .map_or(Ok(Timeouts::default()), |timeouts| {
            Ok(Timeouts {
                request: duration(timeouts.request.as_deref(), "timeouts.request")?,
                backend_request: duration(
                    timeouts.backend_request.as_deref(),
                    "timeouts.backendRequest",
                )?,
            })
        })?;
    if let (Some(request), Some(backend)) = (timeouts.request, timeouts.backend_request)
        && backend > request
    {
        return Err((
            Reason::UnsupportedValue,
            "timeouts.backendRequest: longer than timeouts.request".to_owned(),
        ));
    }
    Ok(Rule {
        matches,
        filters,
        backends,
        timeouts,
        ..Rule::default()
    })
}

/// A Gateway API duration; `0s` (or none) means no timeout.
fn duration(text: Option<&str>, field: &str) -> Result<Option<Duration>, Refusal> {
    let Some(text) = text else {
        return Ok(None);
    };
    let parsed = parse_duration(text).ok_or_else(|| {
        (
            Reason::UnsupportedValue,
            format!("{field}: {text:?} is not a duration"),
        )
    })?;
    Ok(Some(parsed).filter(|duration| !duration.is_zero()))
}

/// The service port backend `field` of the rule at `rule_field` names, or `None`
/// (recorded in `resolution`) when it does not resolve. A weight-0 backend that does
/// not resolve is never sent anything and is not reported.
fn resolve(
    context: &Context,
    reference: &Reference,
    rule_field: &str,
    field: &str,
    weight: u32,
    resolution: &mut Resolution,
) -> Result<Option<BackendRef>, Refusal> {
    let namespace = reference.namespace.as_deref().unwrap_or(context.namespace);
    let key = ObjectKey::new(namespace, &reference.name);
    let mut unresolved = |reason, message: String| {
        if weight > 0 {
            resolution.record(reason, format!("{rule_field}.{field}: {message}"));
        }
        Ok(None)
    };
    if !reference.is_backend_service() {
        return unresolved(
            Reason::InvalidKind,
            format!(
                "{} is not a Service; only Services can be backends in the mesh",
                reference.name
            ),
        );
    }
    if namespace != context.namespace && !context.parents.contains(&key) && !context.granted(&key) {
        return unresolved(
            Reason::RefNotPermitted,
            format!(
                "Service {key} is in another namespace, and no ReferenceGrant there lets {}s \
                 of namespace {} refer to it",
                context.kind, context.namespace
            ),
        );
    }
    if !context.services.contains_key(&key) {
        return unresolved(
            Reason::BackendNotFound,
            format!("there is no Service {key}"),
        );
    }
    let Some(port) = reference
        .port
        .and_then(|port| u16::try_from(port).ok())
        .filter(|&p| p > 0)
    else {
        return Err((
            Reason::UnsupportedValue,
            format!("{field}.port: a Service backend needs a port"),
        ));
    };
    Ok(Some(BackendRef {
        namespace: namespace.to_owned(),
        service: reference.name.clone(),
        port,
    }))
}

/// The filters of a rule or backend. The problem is written below `filters`.
/// The filters at `field` (`filters` of the rule at `rule_field`, or of one of its
/// backends). A refusal's field is written below `filters`.
fn compile_filters(
    context: &Context,
    written: &[Filter],
    rule_field: &str,
    field: &str,
    resolution: &mut Resolution,
) -> Result<Filters, Refusal> {
    let mut compiled = Filters::default();
    for (index, filter) in written.iter().enumerate() {
        let at = format!("[{index}]");
        let unsupported = |what: &str| (Reason::UnsupportedValue, format!("{at}: {what}"));
        let twice = || unsupported(&format!("a second {} filter", filter.kind));
        match filter.kind.as_str() {
            "RequestHeaderModifier" => {
                let modifier = filter.request_header_modifier.as_ref().ok_or_else(|| {
                    unsupported("RequestHeaderModifier without requestHeaderModifier")
                })?;
                let modifier = header_modifier(modifier)
                    .map_err(|problem| unsupported(&format!("requestHeaderModifier: {problem}")))?;
                once(&mut compiled.request_headers, modifier).ok_or_else(twice)?;
            }
            "ResponseHeaderModifier" => {
                let modifier = filter.response_header_modifier.as_ref().ok_or_else(|| {
                    unsupported("ResponseHeaderModifier without responseHeaderModifier")
                })?;
                let modifier = header_modifier(modifier).map_err(|problem| {
                    unsupported(&format!("responseHeaderModifier: {problem}"))
                })?;
                once(&mut compiled.response_headers, modifier).ok_or_else(twice)?;
            }
            "RequestRedirect" => {
                let redirect = filter
                    .request_redirect
                    .as_ref()
                    .ok_or_else(|| unsupported("RequestRedirect without requestRedirect"))?;
                let port = match redirect.port {
                    None => None,
                    Some(port) => Some(
                        u16::try_from(port)
                            .ok()
                            .filter(|&p| p > 0)
                            .ok_or_else(|| unsupported(&format!("requestRedirect.port {port}")))?,
                    ),
                };
                let status = match redirect.status_code {
                    None => 302,
                    Some(code @ (301 | 302 | 303 | 307 | 308)) => code as u16,
                    Some(code) => {
                        return Err(unsupported(&format!(
                            "requestRedirect.statusCode {code}: use 301, 302, 303, 307 or 308"
                        )));
                    }
                };
                let path = path_modifier(redirect.path.as_ref())
                    .map_err(|problem| unsupported(&format!("requestRedirect.path: {problem}")))?;
                let redirect = Redirect {
                    scheme: redirect.scheme.clone(),
                    hostname: redirect.hostname.clone(),
                    port,
                    path,
                    status,
                };
                once(&mut compiled.redirect, redirect).ok_or_else(twice)?;
            }
            "URLRewrite" => {
                let rewrite = filter
                    .url_rewrite
                    .as_ref()
                    .ok_or_else(|| unsupported("URLRewrite without urlRewrite"))?;
                let path = path_modifier(rewrite.path.as_ref())
                    .map_err(|problem| unsupported(&format!("urlRewrite.path: {problem}")))?;
                let rewrite = Rewrite {
                    hostname: rewrite.hostname.clone(),
                    path,
                };
                once(&mut compiled.rewrite, rewrite).ok_or_else(twice)?;
            }
            "RequestMirror" => {
                let mirror = filter
                    .request_mirror
                    .as_ref()
                    .ok_or_else(|| unsupported("RequestMirror without requestMirror"))?;
                let (numerator, denominator) = match (&mirror.fraction, mirror.percent) {
                    (Some(fraction), _) => {
                        (fraction.numerator, fraction.denominator.unwrap_or(100))
                    }
                    (None, Some(percent)) => (percent, 100),
                    (None, None) => (100, 100),
                };
                let share = u32::try_from(numerator)
                    .ok()
                    .zip(u32::try_from(denominator).ok())
                    .filter(|&(n, d)| d > 0 && n <= d)
                    .ok_or_else(|| {
                        unsupported(&format!(
                            "requestMirror: {numerator}/{denominator} is not a share of requests"
                        ))
                    })?;
                let reference = format!("{field}[{index}].requestMirror.backendRef");
                let backend = resolve(
                    context,
                    &mirror.backend_ref,
                    rule_field,
                    &reference,
                    1,
                    resolution,
                )?;
                // A mirror that does not resolve is reported and sends nothing.
                if let Some(backend) = backend {
                    compiled.mirrors.push(Mirror {
                        backend,
                        numerator: share.0,
                        denominator: share.1,
                    });
                }
            }
            "ExtensionRef" => {
                let reference = filter
                    .extension_ref
                    .as_ref()
                    .ok_or_else(|| unsupported("ExtensionRef without extensionRef"))?;
                if (reference.group.as_str(), reference.kind.as_str())
                    != ("weft.dev", "FaultInjection")
                {
                    return Err(unsupported(&format!(
                        "extensionRef: {}/{} is not a filter weft knows (weft.dev/FaultInjection \
                         is)",
                        reference.group, reference.kind
                    )));
                }
                let key = ObjectKey::new(context.namespace, &reference.name);
                let found = context.objects.fault_injections.get(&key);
                let fault = match found.map(|fault| faults::fault_of(&fault.spec)) {
                    Some(Ok(fault)) => fault,
                    unresolved => {
                        let why = match unresolved {
                            Some(Err(problem)) => {
                                format!("FaultInjection {key} is invalid: {problem}")
                            }
                            _ => format!("there is no FaultInjection {key}"),
                        };
                        resolution.record(
                            Reason::FilterNotFound,
                            format!(
                                "{rule_field}.{field}{at}.extensionRef: {why}, so the rule's \
                                 requests are answered 500"
                            ),
                        );
                        faults::unresolved()
                    }
                };
                once(&mut compiled.fault, fault).ok_or_else(twice)?;
            }
            other => {
                return Err(unsupported(&format!(
                    "{other} filters are not supported by weft (RequestHeaderModifier, \
                     ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror and \
                     ExtensionRef to a weft.dev FaultInjection are)"
                )));
            }
        }
    }
    if compiled.redirect.is_some() && compiled.rewrite.is_some() {
        return Err((
            Reason::UnsupportedValue,
            ": a redirect and a URL rewrite cannot share a rule".to_owned(),
        ));
    }
    Ok(compiled)
}

/// Fills `slot`; `None` if it was filled already (a filter the Gateway API allows once
/// per rule, given twice).
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    match slot {
        Some(_) => None,
        None => {
            *slot = Some(value);
            Some(())
        }
    }
}

/// A header modifier with its names in lower case, checked.
fn header_modifier(written: &written::Modifier) -> Result<HeaderModifier, String> {
    let pairs = |entries: &[NameValue]| {
        entries
            .iter()
            .map(|entry| (entry.name.to_ascii_lowercase(), entry.value.clone()))
            .collect()
    };
    let modifier = HeaderModifier {
        set: pairs(&written.set),
        add: pairs(&written.add),
        remove: written
            .remove
            .iter()
            .map(|name| name.to_ascii_lowercase())
            .collect(),
    };
    modifier.check().map(|()| modifier)
}

fn path_modifier(written: Option<&WrittenPath>) -> Result<Option<PathModifier>, String> {
    let Some(path) = written else {
        return Ok(None);
    };
    match path.kind.as_str() {
        "ReplaceFullPath" => Ok(Some(PathModifier::ReplaceFullPath(
            path.replace_full_path
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
        ))),
        "ReplacePrefixMatch" => Ok(Some(PathModifier::ReplacePrefixMatch(
            path.replace_prefix_match
                .clone()
                .unwrap_or_else(|| "/".to_owned()),
        ))),
        other => Err(format!(
            "type {other:?} is not ReplaceFullPath or ReplacePrefixMatch"
        )),
    }
}

fn value_matches(
    entries: &[written::ValueMatch],
    field: &str,
    lower_case: bool,
) -> Result<Vec<ValueMatch>, String> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let value = match entry.kind.as_deref() {
                None | Some("Exact") => ValueMatchKind::Exact(entry.value.clone()),
                Some("RegularExpression") => ValueMatchKind::RegularExpression(
                    Pattern::new(&entry.value)
                        .map_err(|err| format!("{field}[{index}].value: {err}"))?,
                ),
                Some(other) => {
                    return Err(format!("{field}[{index}].type: {other:?} is not supported"));
                }
            };
            let name = if lower_case {
                entry.name.to_ascii_lowercase()
            } else {
                entry.name.clone()
            };
            Ok(ValueMatch { name, value })
        })
        .collect()
}

fn http_match(written: &Value) -> Result<Match, String> {
    let matched: written::HttpMatch =
        serde_json::from_value(written.clone()).map_err(|err| format!(": {err}"))?;
    let mut compiled = Match::default();
    if let Some(path) = &matched.path {
        let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
        compiled.path = match path.kind.as_deref() {
            Some("Exact") => PathMatch::Exact(value),
            Some("PathPrefix") | None => PathMatch::Prefix(value),
            Some("RegularExpression") => PathMatch::RegularExpression(
                Pattern::new(&value).map_err(|err| format!("path.value: {err}"))?,
            ),
            Some(other) => return Err(format!("path.type: {other:?} is not supported")),
        };
        if let PathMatch::Exact(value) | PathMatch::Prefix(value) = &compiled.path
            && !value.starts_with('/')
        {
            return Err(format!("path.value: {value:?} must start with '/'"));
        }
    }
    compiled.method = matched.method;
    compiled.headers = value_matches(&matched.headers, "headers", true)?;
    compiled.query_params = value_matches(&matched.query_params, "queryParams", false)?;
    Ok(compiled)
}

/// A gRPC method match as the HTTP/2 path it names: `/<service>/<method>`.
fn grpc_match(written: &Value) -> Result<Match, String> {
    let matched: written::GrpcMatch =
        serde_json::from_value(written.clone()).map_err(|err| format!(": {err}"))?;
    let mut compiled = Match::default();
    if let Some(method) = &matched.method {
        let service = method.service.as_deref();
        let name = method.method.as_deref();
        compiled.path = match (method.kind.as_deref(), service, name) {
            (None | Some("Exact"), Some(service), Some(name)) => {
                PathMatch::Exact(format!("/{service}/{name}"))
            }
            (None | Some("Exact"), Some(service), None) => PathMatch::Prefix(format!("/{service}")),
            (None | Some("Exact"), None, Some(name)) => PathMatch::RegularExpression(
                Pattern::new(&format!("/[^/]+/{}", regex::escape(name)))
                    .map_err(|err| format!("method.method: {err}"))?,
            ),
            (Some("RegularExpression"), service, name) => PathMatch::RegularExpression(
                Pattern::new(&format!(
                    "/(?:{})/(?:{})",
                    service.unwrap_or("[^/]+"),
                    name.unwrap_or("[^/]+")
                ))
                .map_err(|err| format!("method: {err}"))?,
            ),
            (None | Some("Exact"), None, None) => PathMatch::Prefix("/".to_owned()),
            (Some(other), _, _) => return Err(format!("method.type: {other:?} is not supported")),
        };
    }
    compiled.headers = value_matches(&matched.headers, "headers", true)?;
    Ok(compiled)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn grpc_method_matches_become_the_paths_they_name() {
        let path = |method: Value| grpc_match(&json!({ "method": method })).unwrap().path;
        let matches = |method: Value, request: &str| path(method).matches(request);
        let cases = [
            (
                json!({ "service": "shop.Cart", "method": "Add" }),
                "/shop.Cart/Add",
                true,
            ),
            (
                json!({ "service": "shop.Cart", "method": "Add" }),
                "/shop.Cart/Addx",
                false,
            ),
            (json!({ "service": "shop.Cart" }), "/shop.Cart/Remove", true),
            (
                json!({ "service": "shop.Cart" }),
                "/shop.CartX/Remove",
                false,
            ),
            (json!({ "method": "Add" }), "/any.Service/Add", true),
            (json!({ "method": "A.d" }), "/any.Service/Aad", false),
            (
                json!({ "type": "RegularExpression", "service": "shop\\..*", "method": "Get.*" }),
                "/shop.Cart/GetItems",
                true,
            ),
            (
                json!({ "type": "RegularExpression", "service": "shop\\..*" }),
                "/other.Cart/Get",
                false,
            ),
        ];
        for (method, request, expected) in cases {
            assert_eq!(
                matches(method.clone(), request),
                expected,
                "{method} {request}"
            );
        }
        assert!(matches!(
            path(json!({ "service": "shop.Cart", "method": "Add" })),
            PathMatch::Exact(_)
        ));
        let unknown = grpc_match(&json!({ "method": { "type": "Prefix" } })).unwrap_err();
        assert_eq!(unknown, "method.type: \"Prefix\" is not supported");
    }
}
