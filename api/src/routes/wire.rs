//! Routes on the configuration stream: the controller writes [`ServiceRoutes`] as a
//! `weft.config.v1.ServiceRoutes`, the agent reads it back, checking every entry again
//! (a bad regular expression or an unknown filter refuses the message, never half of it).

use std::time::Duration;

use crate::config::v1::{
    self as proto, path_modifier::Path as WirePath, route_filter::Filter as WireFilter,
    route_match::PathKind,
};

use super::{
    Abort, Backend, BackendRef, Fault, Filters, HeaderModifier, Match, Mirror, PathMatch,
    PathModifier, Pattern, Redirect, Rewrite, Rule, ServiceRoutes, Timeouts, ValueMatch,
    ValueMatchKind,
};

impl From<&ServiceRoutes> for proto::ServiceRoutes {
    fn from(routes: &ServiceRoutes) -> Self {
        proto::ServiceRoutes {
            service: routes.service.clone(),
            namespace: routes.namespace.clone(),
            port: u32::from(routes.port),
            rules: routes.rules.iter().map(rule_to_wire).collect(),
        }
    }
}

fn rule_to_wire(rule: &Rule) -> proto::RouteRule {
    let millis = |timeout: Option<Duration>| timeout.map_or(0, |t| t.as_millis() as u64);
    proto::RouteRule {
        route: rule.route.clone(),
        rule: rule.name.clone(),
        consumer_namespace: rule.consumer_namespace.clone().unwrap_or_default(),
        matches: rule.matches.iter().map(match_to_wire).collect(),
        filters: filters_to_wire(&rule.filters),
        backends: rule
            .backends
            .iter()
            .map(|backend| {
                let (service, port) = match &backend.target {
                    Some(target) => (
                        format!("{}/{}", target.namespace, target.service),
                        u32::from(target.port),
                    ),
                    None => (String::new(), 0),
                };
                proto::WeightedBackend {
                    service,
                    port,
                    weight: backend.weight,
                    filters: filters_to_wire(&backend.filters),
                }
            })
            .collect(),
        timeout_ms: millis(rule.timeouts.request),
        backend_timeout_ms: millis(rule.timeouts.backend_request),
    }
}

fn match_to_wire(matched: &Match) -> proto::RouteMatch {
    let (kind, path) = match &matched.path {
        PathMatch::Exact(path) => (PathKind::Exact, path.clone()),
        PathMatch::Prefix(path) => (PathKind::Prefix, path.clone()),
        PathMatch::RegularExpression(pattern) => (PathKind::Regex, pattern.as_str().to_owned()),
    };
    let values = |entries: &[ValueMatch]| {
        entries
            .iter()
            .map(|entry| {
                let (value, regex) = match &entry.value {
                    ValueMatchKind::Exact(value) => (value.clone(), false),
                    ValueMatchKind::RegularExpression(pattern) => {
                        (pattern.as_str().to_owned(), true)
                    }
                };
                proto::HeaderMatch {
                    name: entry.name.clone(),
                    value,
                    regex,
                }
            })
            .collect()
    };
    proto::RouteMatch {
        path_kind: kind as i32,
        path,
        method: matched.method.clone().unwrap_or_default(),
        headers: values(&matched.headers),
        query_params: values(&matched.query_params),
    }
}

fn filters_to_wire(filters: &Filters) -> Vec<proto::RouteFilter> {
    let modifier = |modifier: &HeaderModifier| proto::HeaderModifier {
        set: modifier.set.iter().cloned().collect(),
        add: modifier.add.iter().cloned().collect(),
        remove: modifier.remove.clone(),
    };
    let mut wire = Vec::new();
    let mut push = |filter| {
        wire.push(proto::RouteFilter {
            filter: Some(filter),
        })
    };
    if let Some(headers) = &filters.request_headers {
        push(WireFilter::RequestHeaders(modifier(headers)));
    }
    if let Some(headers) = &filters.response_headers {
        push(WireFilter::ResponseHeaders(modifier(headers)));
    }
    if let Some(redirect) = &filters.redirect {
        push(WireFilter::Redirect(proto::Redirect {
            scheme: redirect.scheme.clone().unwrap_or_default(),
            hostname: redirect.hostname.clone().unwrap_or_default(),
            port: redirect.port.map_or(0, u32::from),
            path: redirect.path.as_ref().map(path_to_wire),
            status: u32::from(redirect.status),
        }));
    }
    if let Some(rewrite) = &filters.rewrite {
        push(WireFilter::Rewrite(proto::Rewrite {
            hostname: rewrite.hostname.clone().unwrap_or_default(),
            path: rewrite.path.as_ref().map(path_to_wire),
        }));
    }
    for mirror in &filters.mirrors {
        push(WireFilter::Mirror(proto::Mirror {
            service: format!("{}/{}", mirror.backend.namespace, mirror.backend.service),
            port: u32::from(mirror.backend.port),
            numerator: mirror.numerator,
            denominator: mirror.denominator,
        }));
    }
    if let Some(fault) = &filters.fault {
        push(WireFilter::Fault(proto::Fault {
            delay: fault.delay.map(|(delay, percent)| proto::FaultDelay {
                delay_ms: delay.as_millis() as u64,
                percent,
            }),
            abort: fault.abort.map(|(abort, percent)| proto::FaultAbort {
                http_status: abort.http_status.map_or(0, u32::from),
                grpc_status: abort.grpc_status.map_or(0, u32::from),
                percent,
            }),
        }));
    }
    wire
}

fn path_to_wire(path: &PathModifier) -> proto::PathModifier {
    proto::PathModifier {
        path: Some(match path {
            PathModifier::ReplaceFullPath(full) => WirePath::Full(full.clone()),
            PathModifier::ReplacePrefixMatch(prefix) => WirePath::Prefix(prefix.clone()),
        }),
    }
}

impl TryFrom<&proto::ServiceRoutes> for ServiceRoutes {
    type Error = String;

    /// The error names the rule and field that is wrong.
    fn try_from(wire: &proto::ServiceRoutes) -> Result<Self, String> {
        Ok(ServiceRoutes {
            namespace: wire.namespace.clone(),
            service: wire.service.clone(),
            port: port(wire.port).ok_or_else(|| format!("port {} is not a port", wire.port))?,
            rules: wire
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| {
                    rule_from_wire(rule).map_err(|problem| format!("rules[{index}]: {problem}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

fn rule_from_wire(wire: &proto::RouteRule) -> Result<Rule, String> {
    let millis = |millis: u64| (millis > 0).then(|| Duration::from_millis(millis));
    Ok(Rule {
        route: wire.route.clone(),
        name: wire.rule.clone(),
        consumer_namespace: Some(wire.consumer_namespace.clone()).filter(|ns| !ns.is_empty()),
        matches: wire
            .matches
            .iter()
            .enumerate()
            .map(|(index, matched)| {
                match_from_wire(matched).map_err(|problem| format!("matches[{index}]: {problem}"))
            })
            .collect::<Result<_, _>>()?,
        filters: filters_from_wire(&wire.filters)
            .map_err(|problem| format!("filters: {problem}"))?,
        backends: wire
            .backends
            .iter()
            .enumerate()
            .map(|(index, backend)| {
                let filters = filters_from_wire(&backend.filters)
                    .map_err(|problem| format!("backends[{index}].filters: {problem}"))?;
                let target = if backend.service.is_empty() {
                    None
                } else {
                    Some(
                        backend_ref(&backend.service, backend.port)
                            .map_err(|problem| format!("backends[{index}]: {problem}"))?,
                    )
                };
                Ok(Backend {
                    target,
                    weight: backend.weight,
                    filters,
                })
            })
            .collect::<Result<_, String>>()?,
        timeouts: Timeouts {
            request: millis(wire.timeout_ms),
            backend_request: millis(wire.backend_timeout_ms),
        },
    })
}

fn match_from_wire(wire: &proto::RouteMatch) -> Result<Match, String> {
    let path = match PathKind::try_from(wire.path_kind) {
        Ok(PathKind::Exact) => PathMatch::Exact(wire.path.clone()),
        Ok(PathKind::Prefix) => PathMatch::Prefix(wire.path.clone()),
        Ok(PathKind::Regex) => PathMatch::RegularExpression(Pattern::new(&wire.path)?),
        _ => return Err(format!("path kind {} is not known", wire.path_kind)),
    };
    let values = |entries: &[proto::HeaderMatch]| -> Result<Vec<ValueMatch>, String> {
        entries
            .iter()
            .map(|entry| {
                Ok(ValueMatch {
                    name: entry.name.clone(),
                    value: if entry.regex {
                        ValueMatchKind::RegularExpression(Pattern::new(&entry.value)?)
                    } else {
                        ValueMatchKind::Exact(entry.value.clone())
                    },
                })
            })
            .collect()
    };
    Ok(Match {
        path,
        method: Some(wire.method.clone()).filter(|method| !method.is_empty()),
        headers: values(&wire.headers)?,
        query_params: values(&wire.query_params)?,
    })
}

fn filters_from_wire(wire: &[proto::RouteFilter]) -> Result<Filters, String> {
    let modifier = |modifier: &proto::HeaderModifier| {
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let modifier = HeaderModifier {
            set: pairs(&modifier.set),
            add: pairs(&modifier.add),
            remove: modifier.remove.clone(),
        };
        modifier.check().map(|()| modifier)
    };
    let once = |slot: bool, what: &str| {
        if slot {
            Err(format!("{what} appears twice"))
        } else {
            Ok(())
        }
    };
    let mut filters = Filters::default();
    for (index, filter) in wire.iter().enumerate() {
        match &filter.filter {
            Some(WireFilter::RequestHeaders(headers)) => {
                once(
                    filters.request_headers.is_some(),
                    "a request header modifier",
                )?;
                filters.request_headers =
                    Some(modifier(headers).map_err(|problem| format!("[{index}]: {problem}"))?);
            }
            Some(WireFilter::ResponseHeaders(headers)) => {
                once(
                    filters.response_headers.is_some(),
                    "a response header modifier",
                )?;
                filters.response_headers =
                    Some(modifier(headers).map_err(|problem| format!("[{index}]: {problem}"))?);
            }
            Some(WireFilter::Redirect(redirect)) => {
                once(filters.redirect.is_some(), "a redirect")?;
                filters.redirect = Some(Redirect {
                    scheme: Some(redirect.scheme.clone()).filter(|s| !s.is_empty()),
                    hostname: Some(redirect.hostname.clone()).filter(|h| !h.is_empty()),
                    port: match redirect.port {
                        0 => None,
                        wire => Some(port(wire).ok_or_else(|| format!("[{index}]: port {wire}"))?),
                    },
                    path: path_from_wire(redirect.path.as_ref()),
                    status: u16::try_from(redirect.status)
                        .ok()
                        .filter(|status| matches!(status, 301 | 302 | 303 | 307 | 308))
                        .ok_or_else(|| {
                            format!("[{index}]: {} is not a redirect status", redirect.status)
                        })?,
                });
            }
            Some(WireFilter::Rewrite(rewrite)) => {
                once(filters.rewrite.is_some(), "a rewrite")?;
                filters.rewrite = Some(Rewrite {
                    hostname: Some(rewrite.hostname.clone()).filter(|h| !h.is_empty()),
                    path: path_from_wire(rewrite.path.as_ref()),
                });
            }
            Some(WireFilter::Mirror(mirror)) => {
                if mirror.denominator == 0 || mirror.numerator > mirror.denominator {
                    return Err(format!(
                        "[{index}]: {}/{} is not a share of requests",
                        mirror.numerator, mirror.denominator
                    ));
                }
                filters.mirrors.push(Mirror {
                    backend: backend_ref(&mirror.service, mirror.port)
                        .map_err(|problem| format!("[{index}]: {problem}"))?,
                    numerator: mirror.numerator,
                    denominator: mirror.denominator,
                });
            }
            Some(WireFilter::Fault(fault)) => {
                once(filters.fault.is_some(), "a fault")?;
                filters.fault = Some(
                    fault_from_wire(fault).map_err(|problem| format!("[{index}]: {problem}"))?,
                );
            }
            None => return Err(format!("[{index}]: a filter this agent does not know")),
        }
    }
    Ok(filters)
}

fn fault_from_wire(wire: &proto::Fault) -> Result<Fault, String> {
    let percent = |percent: u32| {
        (percent <= 100)
            .then_some(percent)
            .ok_or_else(|| format!("{percent} is more than 100 percent"))
    };
    let abort = match &wire.abort {
        None => None,
        Some(written) => {
            let http_status = match written.http_status {
                0 => None,
                status @ 200..=599 => Some(status as u16),
                status => return Err(format!("{status} is not an HTTP status")),
            };
            let grpc_status = match written.grpc_status {
                0 => None,
                status @ 1..=16 => Some(status as u8),
                status => return Err(format!("{status} is not a gRPC status")),
            };
            if http_status.is_none() && grpc_status.is_none() {
                return Err("an abort without a status".to_owned());
            }
            let abort = Abort {
                http_status,
                grpc_status,
            };
            Some((abort, percent(written.percent)?))
        }
    };
    Ok(Fault {
        delay: match &wire.delay {
            None => None,
            Some(delay) => Some((
                Duration::from_millis(delay.delay_ms),
                percent(delay.percent)?,
            )),
        },
        abort,
    })
}

fn path_from_wire(wire: Option<&proto::PathModifier>) -> Option<PathModifier> {
    match wire?.path.as_ref()? {
        WirePath::Full(full) => Some(PathModifier::ReplaceFullPath(full.clone())),
        WirePath::Prefix(prefix) => Some(PathModifier::ReplacePrefixMatch(prefix.clone())),
    }
}

fn backend_ref(service: &str, wire_port: u32) -> Result<BackendRef, String> {
    let (namespace, name) = service
        .split_once('/')
        .ok_or_else(|| format!("{service:?} is not <namespace>/<service>"))?;
    Ok(BackendRef {
        namespace: namespace.to_owned(),
        service: name.to_owned(),
        port: port(wire_port)
            .ok_or_else(|| format!("{service}: port {wire_port} is not a port"))?,
    })
}

fn port(wire: u32) -> Option<u16> {
    u16::try_from(wire).ok().filter(|&port| port > 0)
}
