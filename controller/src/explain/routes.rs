//! "Which route takes this request?", answered from the compiled routes with the
//! matcher the agents run ([`ServiceRoutes::select`]): `GET /routes/explain?…` on the
//! controller's admin port.
//!
//! Parameters: `service=<namespace>/<name>` and `port=` (the service's port), the
//! client's namespace `source_namespace=` (its consumer routes apply to it), and the
//! request: `method=` (`GET` if not given), `path=` (with its query; `/` if not
//! given), `header=<name>:<value>` (repeatable).

use serde::Serialize;
use weft_api::{
    authz::query::{header, parameters},
    config::v1 as proto,
    routes::{Match, Request, Rule, ServiceRoutes},
};

use crate::compile::Compiled;

/// A parsed route question.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteQuery {
    /// `<namespace>/<name>`.
    pub service: String,
    pub port: u16,
    pub client_namespace: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// The answer: the service port, the client's namespace, and what decides.
#[derive(Clone, Debug, Serialize)]
pub struct RouteAnswer {
    /// `<namespace>/<name>:<port>`.
    pub service: String,
    pub client_namespace: String,
    #[serde(flatten)]
    pub decision: RouteDecision,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RouteDecision {
    /// No route applies to the client: the request goes to the service's own
    /// endpoints.
    Unrouted,
    /// This rule takes the request, by this match.
    Routed {
        rule: Box<Rule>,
        matched: Box<Match>,
    },
    /// Routes apply to the client and none matches: the agent answers 404.
    NoMatch,
}

impl RouteQuery {
    /// Parses a URL query string; the error names the parameter and what is wrong.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut parsed = RouteQuery {
            method: "GET".to_owned(),
            path: "/".to_owned(),
            ..RouteQuery::default()
        };
        for (name, value) in parameters(query)? {
            match name.as_str() {
                "service"
                    if value
                        .split_once('/')
                        .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty()) =>
                {
                    parsed.service = value;
                }
                "service" => return Err(format!("service: {value:?} is not <namespace>/<name>")),
                "port" => {
                    parsed.port = value
                        .parse()
                        .ok()
                        .filter(|&port: &u16| port != 0)
                        .ok_or_else(|| format!("port: {value:?} is not a port"))?;
                }
                "source_namespace" => parsed.client_namespace = value,
                "method" => parsed.method = value,
                "path" => parsed.path = value,
                "header" => parsed.headers.push(header(&value)?),
                _ => {
                    return Err(format!(
                        "{name}: not a parameter (service, port, source_namespace, method, \
                         path, header)"
                    ));
                }
            }
        }
        if parsed.service.is_empty() || parsed.port == 0 || parsed.client_namespace.is_empty() {
            return Err("service, port and source_namespace are required".to_owned());
        }
        Ok(parsed)
    }
}

/// Which rule of the compiled routes takes the request `query` describes.
pub fn explain(compiled: &Compiled, query: &RouteQuery) -> Result<RouteAnswer, String> {
    let exists = compiled
        .shared
        .all::<proto::Service>()
        .into_values()
        .any(|service| format!("{}/{}", service.namespace, service.name) == query.service);
    if !exists {
        return Err(format!("no service {} in the mesh", query.service));
    }
    let key = format!("{}:{}", query.service, query.port);
    let routes = compiled
        .shared
        .get::<proto::ServiceRoutes>(&key)
        .map(|wire| ServiceRoutes::try_from(&wire))
        .transpose()?;
    let decision = match routes {
        Some(routes) if routes.applies_to(&query.client_namespace) => {
            let (path, query_string) = match query.path.split_once('?') {
                Some((path, rest)) => (path, Some(rest)),
                None => (query.path.as_str(), None),
            };
            let request = Request {
                method: &query.method,
                path,
                query: query_string,
                headers: &query.headers,
            };
            match routes.select(&query.client_namespace, &request) {
                Some(selected) => RouteDecision::Routed {
                    rule: Box::new(selected.rule.clone()),
                    matched: Box::new(selected.matched.clone()),
                },
                None => RouteDecision::NoMatch,
            }
        }
        _ => RouteDecision::Unrouted,
    };
    Ok(RouteAnswer {
        service: key,
        client_namespace: query.client_namespace.clone(),
        decision,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        compile::{Settings, compile},
        objects::Objects,
        source::files,
    };

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, selector: { app: web }, ports: [{ port: 80 }, { name: admin, port: 81 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web-canary, namespace: shop }
spec: { clusterIP: 10.96.0.11, selector: { app: canary }, ports: [{ port: 80 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: canary, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - name: testers
      matches: [{ headers: [{ name: x-canary, value: "yes" }] }]
      backendRefs: [{ name: web-canary, port: 80 }]
    - name: api
      matches: [{ path: { type: PathPrefix, value: /api } }]
      backendRefs: [{ name: web, port: 80 }]
"#;

    fn compiled() -> Compiled {
        let mut objects = Objects::default();
        for object in files::parse(Path::new("mesh.yaml"), MESH).expect("fixture parses") {
            objects.upsert(object);
        }
        let settings = Settings {
            trust_domain: "cluster.local".into(),
            root_namespace: "weft-system".into(),
            exclude_ports: Vec::new(),
        };
        compile(&objects, &settings, &Default::default())
    }

    #[test]
    fn requests_are_explained_by_the_rule_that_takes_them() {
        let compiled = compiled();
        let ask = |query: &str| {
            let answer = explain(&compiled, &RouteQuery::parse(query).unwrap()).unwrap();
            match answer.decision {
                RouteDecision::Routed { rule, .. } => format!("{} {}", rule.route, rule.name),
                RouteDecision::Unrouted => "unrouted".to_owned(),
                RouteDecision::NoMatch => "404".to_owned(),
            }
        };
        let base = "service=shop/web&source_namespace=shop";
        for (request, expected) in [
            ("&port=80&path=/api/cart", "HTTPRoute/shop/canary api"),
            (
                "&port=80&path=/home&header=X-Canary:yes",
                "HTTPRoute/shop/canary testers",
            ),
            // A path prefix outranks a header match (the Gateway API's precedence).
            (
                "&port=80&path=/api&header=X-Canary:yes",
                "HTTPRoute/shop/canary api",
            ),
            ("&port=80&path=/home", "404"),
            ("&port=81&path=/api", "unrouted"),
        ] {
            assert_eq!(ask(&format!("{base}{request}")), expected, "{request}");
        }
    }

    #[test]
    fn bad_questions_are_named() {
        let compiled = compiled();
        for (query, expected) in [
            (
                "service=shop&port=80&source_namespace=shop",
                "service: \"shop\"",
            ),
            (
                "service=shop/web&port=0&source_namespace=shop",
                "port: \"0\"",
            ),
            ("service=shop/web&port=80", "required"),
            (
                "service=shop/web&port=80&source_namespace=shop&verb=GET",
                "verb: not a parameter",
            ),
        ] {
            let err = RouteQuery::parse(query).unwrap_err();
            assert!(err.contains(expected), "{query}: {err}");
        }
        let unknown = RouteQuery::parse("service=shop/gone&port=80&source_namespace=shop").unwrap();
        assert!(
            explain(&compiled, &unknown)
                .unwrap_err()
                .contains("no service shop/gone")
        );
    }
}
