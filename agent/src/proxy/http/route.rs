//! The routing stage of an outbound request to a service with HTTPRoutes or GRPCRoutes
//! attached: the rule that matches ([`routes::ServiceRoutes::select`]), its filters
//! applied to the request, and the backend its weights choose. What comes out is a
//! [`Routed`]: a redirect to answer, or the backend service port to balance over, with
//! what the response and the attempt still need (response headers, timeouts).

use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, header};
use weft_api::routes::{
    self, BackendRef, Fault, Filters, HeaderModifier, Mirror, Origin, Rewrite, Selected, Timeouts,
};

use crate::proxy::{authorize::HeaderView, error::ProxyError};

/// The route and rule that decided a request, for metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleName {
    /// `<Kind>/<namespace>/<name>`.
    pub route: String,
    /// The rule's name, or its index.
    pub rule: String,
}

/// What the routes decided for one request.
#[derive(Debug)]
pub struct Routed {
    pub name: RuleName,
    pub target: Target,
    /// The rule's and then the backend's response header changes.
    pub response_headers: Vec<HeaderModifier>,
    pub timeouts: Timeouts,
    /// Services that get a copy of the request (the rule's and the backend's).
    pub mirrors: Vec<Mirror>,
    /// The rule's FaultInjection, if it references one.
    pub fault: Option<Fault>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// Answer with this status and `Location`.
    Redirect { status: u16, location: String },
    /// Forward to this service port.
    Backend(BackendRef),
}

/// Routes `request`, sent by a client in `client_namespace`: selects the rule, applies
/// its filters (and then the chosen backend's) to the request. `roll` draws a point in
/// `0..total` for the weighted split.
pub fn route<B>(
    routes: &routes::ServiceRoutes,
    client_namespace: &str,
    request: &mut Request<B>,
    roll: impl FnOnce(u64) -> u64,
) -> Result<Routed, ProxyError> {
    let service = || format!("{}/{}:{}", routes.namespace, routes.service, routes.port);
    let headers = HeaderView(request.headers());
    let view = routes::Request {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        headers: &headers,
    };
    let Selected { rule, matched } = routes
        .select(client_namespace, &view)
        .ok_or_else(|| ProxyError::NoRoute { service: service() })?;
    let name = RuleName {
        route: rule.route.clone(),
        rule: rule.name.clone(),
    };
    let prefix = matched.prefix();
    if let Some(redirect) = &rule.filters.redirect {
        let authority = super::headers::authority(request);
        let origin = Origin {
            scheme: "http",
            host: authority
                .as_ref()
                .map_or(routes.service.as_str(), |a| a.host()),
            port: routes.port,
            path: request.uri().path(),
            query: request.uri().query(),
        };
        let location = redirect.location(&origin, prefix);
        return Ok(Routed {
            name,
            target: Target::Redirect {
                status: redirect.status,
                location,
            },
            response_headers: rule.filters.response_headers.iter().cloned().collect(),
            timeouts: rule.timeouts,
            mirrors: Vec::new(),
            fault: None,
        });
    }
    let no_backend = || ProxyError::NoBackend {
        route: rule.route.clone(),
        rule: rule.name.clone(),
    };
    let total = rule.total_weight();
    if total == 0 {
        return Err(no_backend());
    }
    let backend = rule.backend_at(roll(total)).ok_or_else(no_backend)?;
    let target = backend.target.clone().ok_or_else(no_backend)?;
    apply(&rule.filters, request, prefix);
    apply(&backend.filters, request, prefix);
    let both = [&rule.filters, &backend.filters];
    let response_headers = both
        .iter()
        .filter_map(|filters| filters.response_headers.clone())
        .collect();
    let mirrors = both
        .iter()
        .flat_map(|filters| filters.mirrors.iter().cloned())
        .collect();
    Ok(Routed {
        name,
        target: Target::Backend(target),
        response_headers,
        timeouts: rule.timeouts,
        mirrors,
        fault: rule.filters.fault,
    })
}

/// Applies the request filters of `filters` (header changes, then the rewrite).
fn apply<B>(filters: &Filters, request: &mut Request<B>, prefix: Option<&str>) {
    if let Some(modifier) = &filters.request_headers {
        modify(request.headers_mut(), modifier);
    }
    if let Some(rewrite) = &filters.rewrite {
        rewrite_uri(request, rewrite, prefix);
    }
}

/// Applies `modifier` to `headers`: set replaces, add appends, remove deletes. (Names
/// and values were checked on their way in, `HeaderModifier::check`.)
pub fn modify(headers: &mut HeaderMap, modifier: &HeaderModifier) {
    let parse = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    for (name, value) in &modifier.set {
        if let Some((name, value)) = parse(name, value) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &modifier.add {
        if let Some((name, value)) = parse(name, value) {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

/// Rewrites the request's host and path; the query stays.
fn rewrite_uri<B>(request: &mut Request<B>, rewrite: &Rewrite, prefix: Option<&str>) {
    if let Some(hostname) = &rewrite.hostname
        && let Ok(host) = HeaderValue::from_str(hostname)
    {
        request.headers_mut().insert(header::HOST, host);
        let mut parts = request.uri().clone().into_parts();
        if parts.authority.is_some() {
            parts.authority = hostname.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    if let Some(modifier) = &rewrite.path {
        let path = modifier.apply(request.uri().path(), prefix);
        let target = match request.uri().query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let mut parts = request.uri().clone().into_parts();
        if let Ok(path_and_query) = target.parse() {
            parts.path_and_query = Some(path_and_query);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_api::routes::{Backend, Match, PathMatch, PathModifier, Redirect, Rule};

    use super::*;

    fn backend(service: &str, weight: u32) -> Backend {
        Backend {
            target: Some(BackendRef {
                namespace: "shop".into(),
                service: service.into(),
                port: 8080,
            }),
            weight,
            filters: Filters::default(),
        }
    }

    fn routes(rules: Vec<Rule>) -> routes::ServiceRoutes {
        routes::ServiceRoutes {
            namespace: "shop".into(),
            service: "web".into(),
            port: 80,
            rules,
        }
    }

    fn prefix_rule(prefix: &str, filters: Filters, backends: Vec<Backend>) -> Rule {
        Rule {
            route: "HTTPRoute/shop/web".into(),
            name: prefix.into(),
            matches: vec![Match {
                path: PathMatch::Prefix(prefix.into()),
                ..Match::default()
            }],
            filters,
            backends,
            ..Rule::default()
        }
    }

    fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap()
    }

    #[test]
    fn filters_change_the_request_and_the_weights_choose_the_backend() {
        let filters = Filters {
            request_headers: Some(HeaderModifier {
                set: vec![("x-set".into(), "new".into())],
                add: vec![("x-add".into(), "second".into())],
                remove: vec!["x-remove".into()],
            }),
            rewrite: Some(Rewrite {
                hostname: Some("elsewhere".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            }),
            response_headers: Some(HeaderModifier {
                set: vec![("x-routed".into(), "yes".into())],
                ..HeaderModifier::default()
            }),
            ..Filters::default()
        };
        let routes = routes(vec![prefix_rule(
            "/api",
            filters,
            vec![backend("v1", 1), backend("v2", 3)],
        )]);
        let mut request = get(
            "http://web/api/items?page=2",
            &[
                ("host", "web"),
                ("x-set", "old"),
                ("x-add", "first"),
                ("x-remove", "x"),
            ],
        );
        let routed = route(&routes, "client", &mut request, |total| total - 1).unwrap();
        assert_eq!(routed.name.rule, "/api");
        let Target::Backend(target) = &routed.target else {
            panic!("{routed:?}")
        };
        assert_eq!(target.service, "v2");
        assert_eq!(routed.response_headers.len(), 1);
        let headers = request.headers();
        assert_eq!(headers["x-set"], "new");
        let added: Vec<_> = headers.get_all("x-add").iter().collect();
        assert_eq!(added, ["first", "second"]);
        assert!(!headers.contains_key("x-remove"));
        assert_eq!(headers["host"], "elsewhere");
        assert_eq!(request.uri().path_and_query().unwrap(), "/v2/items?page=2");
        assert_eq!(request.uri().host(), Some("elsewhere"));
    }

    #[test]
    fn redirects_unmatched_requests_and_unresolved_backends_are_answered_not_forwarded() {
        let redirect = Filters {
            redirect: Some(Redirect {
                scheme: Some("https".into()),
                hostname: None,
                port: None,
                path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
                status: 301,
            }),
            ..Filters::default()
        };
        let unresolved = Backend {
            target: None,
            ..backend("gone", 1)
        };
        let routes = routes(vec![
            prefix_rule("/old", redirect, Vec::new()),
            prefix_rule("/gone", Filters::default(), vec![unresolved]),
            prefix_rule("/none", Filters::default(), vec![backend("v1", 0)]),
        ]);
        let mut request = get("/old/page?q=1", &[("host", "web:80")]);
        let routed = route(&routes, "client", &mut request, |_| 0).unwrap();
        assert_eq!(
            routed.target,
            Target::Redirect {
                status: 301,
                location: "https://web/new/page?q=1".into()
            }
        );
        for (path, reason) in [
            ("/gone", "backend_not_found"),
            ("/none", "backend_not_found"),
            ("/other", "route_not_found"),
        ] {
            let error = route(&routes, "client", &mut get(path, &[]), |_| 0).unwrap_err();
            assert_eq!(error.reason(), reason, "{path}");
        }
    }
}
