//! `weftctl explain`: what the mesh does with a connection or request from one workload
//! to another — the authorization decision and the policy behind it, the route rule and
//! backends, the service's traffic policy, and for each destination pod its mode and
//! whether the path is same-node or an HBONE tunnel between nodes. The decisions come
//! from the controller, over the configuration it compiled for the agents
//! (`/authorization/explain`, `/routes/explain`); the rest from the agents' own views.

use std::net::IpAddr;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use crate::{
    mesh::{Mesh, Snapshot},
    output::{Report, table},
};

/// What the operator asks about.
#[derive(Debug, Default)]
pub struct Question {
    /// A pod `NS/NAME`, a SPIFFE ID, or an IP.
    pub from: String,
    /// A service or pod `NS/NAME`, or an IP; with `:PORT`.
    pub to: String,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `NAME=VALUE`.
    pub headers: Vec<String>,
}

/// The caller, resolved against the mesh.
#[derive(Debug, PartialEq, Eq)]
enum Source {
    Pod { namespace: String, name: String },
    Principal(String),
    Ip(IpAddr),
}

/// The destination, resolved against the mesh.
#[derive(Debug, PartialEq, Eq)]
enum Destination {
    Service(String),
    Pod(String),
    Ip(IpAddr),
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `pod default/client`, `principal spiffe://…` or `ip 10.0.0.1`.
    pub source: String,
    /// The source pod's node, when it is a meshed pod.
    pub source_node: Option<String>,
    /// `service default/echo:80`, `pod …` or `ip …`.
    pub destination: String,
    /// `GET /path`, for an HTTP request; none for a TCP connection.
    pub request: Option<String>,
    /// The controller's answer: every destination pod's decision, why, and the
    /// policies that apply.
    pub authorization: Value,
    /// The controller's answer on routes, for an HTTP request to a service.
    pub route: Option<Value>,
    /// The service's TrafficPolicy as the agents run it (balancing, timeouts,
    /// retries, limits, outlier detection); none when it has none.
    pub traffic_policy: Option<Value>,
    /// For each destination pod: its node, mode, and how the connection gets there.
    pub paths: Vec<PathLine>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct PathLine {
    pub pod: String,
    pub node: String,
    pub mode: String,
    /// `same node`, `HBONE node0 → node1`, or `from outside the mesh`.
    pub path: String,
}

pub fn explain(
    mesh: &dyn Mesh,
    snapshot: &Snapshot,
    question: &Question,
) -> anyhow::Result<Explanation> {
    let source = resolve_source(snapshot, &question.from)?;
    let (destination, port) = resolve_destination(snapshot, &question.to)?;
    let http = question.method.is_some() || question.path.is_some();
    let request = http.then(|| {
        format!(
            "{} {}",
            question.method.as_deref().unwrap_or("GET"),
            question.path.as_deref().unwrap_or("/")
        )
    });
    let headers: Vec<(String, String)> = question
        .headers
        .iter()
        .map(|header| {
            header
                .split_once('=')
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .with_context(|| format!("--header {header:?} is not NAME=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let ask = |path: String| -> anyhow::Result<Value> {
        let body = mesh
            .controller_get(&path)
            .map_err(|err| anyhow::anyhow!("the controller on {path}: {err}"))?;
        serde_json::from_str(&body).with_context(|| format!("the controller's answer to {path}"))
    };
    let authorization = ask(authorization_query(
        &source,
        &destination,
        port,
        question,
        &headers,
    ))?;
    let source_namespace = source_namespace(snapshot, &source);
    let route = match (&destination, http, &source_namespace) {
        (Destination::Service(service), true, Some(namespace)) => Some(ask(route_query(
            service, port, namespace, question, &headers,
        ))?),
        _ => None,
    };
    let traffic_policy = match &destination {
        Destination::Service(service) => snapshot
            .any_dump()
            .and_then(|dump| dump["policies"]["traffic"].get(service))
            .cloned(),
        _ => None,
    };
    let source_node = node_of(snapshot, &source);
    let paths = authorization["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|answer| answer["pod"].as_str())
        .filter_map(|pod| path_to(snapshot, source_node.as_deref(), pod))
        .collect();
    Ok(Explanation {
        source: match &source {
            Source::Pod { namespace, name } => format!("pod {namespace}/{name}"),
            Source::Principal(principal) => format!("principal {principal}"),
            Source::Ip(ip) => format!("ip {ip}"),
        },
        source_node,
        destination: match &destination {
            Destination::Service(service) => format!("service {service}:{port}"),
            Destination::Pod(pod) => format!("pod {pod}:{port}"),
            Destination::Ip(ip) => format!("ip {ip}:{port}"),
        },
        request,
        authorization,
        route,
        traffic_policy,
        paths,
    })
}

fn resolve_source(snapshot: &Snapshot, text: &str) -> anyhow::Result<Source> {
    if text.starts_with("spiffe://") {
        return Ok(Source::Principal(text.to_owned()));
    }
    if let Ok(ip) = text.parse() {
        return Ok(Source::Ip(ip));
    }
    let (namespace, name) = text
        .split_once('/')
        .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
        .with_context(|| format!("--from {text:?}: give a pod NS/NAME, a SPIFFE ID or an IP"))?;
    if workload(snapshot, text).is_none() {
        anyhow::bail!("--from {text}: no meshed pod of that name");
    }
    Ok(Source::Pod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn resolve_destination(snapshot: &Snapshot, text: &str) -> anyhow::Result<(Destination, u16)> {
    let (target, port) = text
        .rsplit_once(':')
        .and_then(|(target, port)| Some((target, port.parse::<u16>().ok().filter(|p| *p != 0)?)))
        .with_context(|| format!("--to {text:?}: give NS/NAME:PORT or IP:PORT"))?;
    if let Ok(ip) = target.trim_matches(['[', ']']).parse() {
        return Ok((Destination::Ip(ip), port));
    }
    if snapshot.has_service(target) {
        return Ok((Destination::Service(target.to_owned()), port));
    }
    if workload(snapshot, target).is_some() {
        return Ok((Destination::Pod(target.to_owned()), port));
    }
    anyhow::bail!("--to {text}: no service or meshed pod {target}")
}

/// The workload `<namespace>/<name>`.
fn workload<'s>(snapshot: &'s Snapshot, namespaced: &str) -> Option<&'s Value> {
    snapshot.workloads().into_iter().find(|workload| {
        format!(
            "{}/{}",
            workload["namespace"].as_str().unwrap_or_default(),
            workload["name"].as_str().unwrap_or_default()
        ) == namespaced
    })
}

fn workload_at(snapshot: &Snapshot, ip: IpAddr) -> Option<&Value> {
    let ip = ip.to_string();
    snapshot.workloads().into_iter().find(|workload| {
        workload["ip"] == ip.as_str()
            || workload["ips"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|each| *each == ip.as_str()))
    })
}

/// The caller's namespace, which decides its consumer routes.
fn source_namespace(snapshot: &Snapshot, source: &Source) -> Option<String> {
    match source {
        Source::Pod { namespace, .. } => Some(namespace.clone()),
        Source::Principal(principal) => {
            let (_, rest) = principal.split_once("/ns/")?;
            Some(rest.split('/').next()?.to_owned())
        }
        Source::Ip(ip) => workload_at(snapshot, *ip)
            .and_then(|workload| workload["namespace"].as_str())
            .map(str::to_owned),
    }
}

fn node_of(snapshot: &Snapshot, source: &Source) -> Option<String> {
    let workload = match source {
        Source::Pod { namespace, name } => workload(snapshot, &format!("{namespace}/{name}")),
        Source::Ip(ip) => workload_at(snapshot, *ip),
        Source::Principal(_) => None,
    }?;
    workload["node"].as_str().map(str::to_owned)
}

fn path_to(snapshot: &Snapshot, source_node: Option<&str>, pod: &str) -> Option<PathLine> {
    let destination = workload(snapshot, pod)?;
    let node = destination["node"].as_str()?.to_owned();
    let path = match source_node {
        Some(source) if source == node => "same node".to_owned(),
        Some(source) => format!("HBONE {source} → {node}"),
        None => "from outside the mesh, or a caller not placed on a node".to_owned(),
    };
    Some(PathLine {
        pod: pod.to_owned(),
        mode: destination["mode"].as_str().unwrap_or("-").to_owned(),
        node,
        path,
    })
}

fn authorization_query(
    source: &Source,
    destination: &Destination,
    port: u16,
    question: &Question,
    headers: &[(String, String)],
) -> String {
    let mut query = vec![match source {
        Source::Pod { namespace, name } => ("source_pod", format!("{namespace}/{name}")),
        Source::Principal(principal) => ("source_principal", principal.clone()),
        Source::Ip(ip) => ("source_ip", ip.to_string()),
    }];
    query.push(match destination {
        Destination::Service(service) => ("destination_service", service.clone()),
        Destination::Pod(pod) => ("destination_pod", pod.clone()),
        Destination::Ip(ip) => ("destination_ip", ip.to_string()),
    });
    query.push(("port", port.to_string()));
    request_parameters(&mut query, question, headers);
    format!("/authorization/explain?{}", encode(&query))
}

fn route_query(
    service: &str,
    port: u16,
    source_namespace: &str,
    question: &Question,
    headers: &[(String, String)],
) -> String {
    let mut query = vec![
        ("service", service.to_owned()),
        ("port", port.to_string()),
        ("source_namespace", source_namespace.to_owned()),
    ];
    request_parameters(&mut query, question, headers);
    format!("/routes/explain?{}", encode(&query))
}

fn request_parameters(
    query: &mut Vec<(&'static str, String)>,
    question: &Question,
    headers: &[(String, String)],
) {
    if question.method.is_some() || question.path.is_some() {
        query.push((
            "method",
            question.method.clone().unwrap_or_else(|| "GET".into()),
        ));
        query.push(("path", question.path.clone().unwrap_or_else(|| "/".into())));
    }
    for (name, value) in headers {
        query.push(("header", format!("{name}:{value}")));
    }
}

/// A URL query string of `pairs`, percent-encoded.
fn encode(pairs: &[(&str, String)]) -> String {
    let escape = |text: &str| -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z'
                | b'a'..=b'z'
                | b'0'..=b'9'
                | b'-'
                | b'.'
                | b'_'
                | b'~'
                | b'/'
                | b':' => char::from(byte).to_string(),
                _ => format!("%{byte:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={}", escape(value)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Report for Explanation {
    fn table(&self) -> String {
        let mut text = format!(
            "{}{} → {}{}\n\n",
            self.source,
            self.source_node
                .as_ref()
                .map(|node| format!(" (on {node})"))
                .unwrap_or_default(),
            self.destination,
            self.request
                .as_ref()
                .map(|request| format!(", {request}"))
                .unwrap_or_default()
        );
        let decisions: Vec<Vec<String>> = self.authorization["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|answer| {
                let text = |value: &Value| value.as_str().unwrap_or("-").to_owned();
                let policies: Vec<&str> = answer["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let reason = match answer["reason"].as_str() {
                    Some(reason) => reason.to_owned(),
                    None => text(&answer["unknown"]),
                };
                vec![
                    text(&answer["pod"]),
                    text(&answer["address"]),
                    text(&answer["decision"]),
                    reason,
                    if policies.is_empty() {
                        "-".into()
                    } else {
                        policies.join(", ")
                    },
                ]
            })
            .collect();
        text += "authorization\n";
        text += &table(
            &["POD", "ADDRESS", "DECISION", "WHY", "POLICIES"],
            &decisions,
        );
        if let Some(route) = &self.route {
            text += "\nroute: ";
            text += &match route["outcome"].as_str() {
                Some("routed") => {
                    let backends: Vec<String> = route["rule"]["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|backend| {
                            let target = &backend["target"];
                            let name = match target["service"].as_str() {
                                Some(service) => format!(
                                    "{}/{service}:{}",
                                    target["namespace"].as_str().unwrap_or_default(),
                                    target["port"]
                                ),
                                None => "unresolved (answered 500)".to_owned(),
                            };
                            format!("{name} (weight {})", backend["weight"])
                        })
                        .collect();
                    format!(
                        "{} rule {} → {}\n",
                        route["rule"]["route"].as_str().unwrap_or("-"),
                        route["rule"]["name"].as_str().unwrap_or("-"),
                        backends.join(", ")
                    )
                }
                Some("no_match") => "routes apply and none matches: the agent answers 404\n".into(),
                _ => "no route applies: the service's own endpoints\n".into(),
            };
        }
        if let Some(policy) = &self.traffic_policy {
            text += &format!("\ntraffic policy: {policy}\n");
        }
        let paths: Vec<Vec<String>> = self
            .paths
            .iter()
            .map(|line| {
                vec![
                    line.pod.clone(),
                    line.node.clone(),
                    line.mode.clone(),
                    line.path.clone(),
                ]
            })
            .collect();
        text += "\n";
        text += &table(&["POD", "NODE", "MODE", "PATH"], &paths);
        text
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mesh::tests::healthy;

    /// The healthy mesh with a client on node1 and the service shop/web.
    fn snapshot() -> Snapshot {
        let mut snapshot = healthy();
        let dump = snapshot.nodes[0].dump.as_mut().unwrap();
        dump["mesh"]["workloads"] = json!([
            {"namespace": "shop", "name": "web-1", "ip": "10.244.0.2", "node": "node0", "mode": "STRICT", "serviceAccount": "web"},
            {"namespace": "shop", "name": "client", "ip": "10.244.1.2", "node": "node1", "mode": "STRICT", "serviceAccount": "client"},
        ]);
        dump["mesh"]["services"] = json!([{"namespace": "shop", "name": "web"}]);
        snapshot
    }

    #[test]
    fn names_resolve_to_pods_services_principals_and_addresses() {
        let snapshot = snapshot();
        let pod = Source::Pod {
            namespace: "shop".into(),
            name: "client".into(),
        };
        assert_eq!(resolve_source(&snapshot, "shop/client").unwrap(), pod);
        assert_eq!(
            resolve_source(&snapshot, "spiffe://cluster.local/ns/shop/sa/client").unwrap(),
            Source::Principal("spiffe://cluster.local/ns/shop/sa/client".into())
        );
        assert!(resolve_source(&snapshot, "shop/ghost").is_err());
        assert_eq!(
            resolve_destination(&snapshot, "shop/web:80").unwrap(),
            (Destination::Service("shop/web".into()), 80)
        );
        assert_eq!(
            resolve_destination(&snapshot, "shop/web-1:8080").unwrap(),
            (Destination::Pod("shop/web-1".into()), 8080)
        );
        assert_eq!(
            resolve_destination(&snapshot, "10.244.0.2:8080").unwrap(),
            (Destination::Ip("10.244.0.2".parse().unwrap()), 8080)
        );
        assert!(resolve_destination(&snapshot, "shop/web").is_err());
        let ip = Source::Ip("10.244.1.2".parse().unwrap());
        assert_eq!(source_namespace(&snapshot, &ip).as_deref(), Some("shop"));
        assert_eq!(
            source_namespace(
                &snapshot,
                &Source::Principal("spiffe://td/ns/ops/sa/x".into())
            )
            .as_deref(),
            Some("ops")
        );
    }

    #[test]
    fn questions_become_the_controllers_queries() {
        let question = Question {
            method: Some("POST".into()),
            path: Some("/cart?id=1 2".into()),
            ..Question::default()
        };
        let headers = vec![("x-canary".to_owned(), "yes".to_owned())];
        let source = Source::Pod {
            namespace: "shop".into(),
            name: "client".into(),
        };
        assert_eq!(
            authorization_query(
                &source,
                &Destination::Service("shop/web".into()),
                80,
                &question,
                &headers
            ),
            "/authorization/explain?source_pod=shop/client&destination_service=shop/web&port=80\
             &method=POST&path=/cart%3Fid%3D1%202&header=x-canary:yes"
        );
        assert_eq!(
            route_query("shop/web", 80, "shop", &Question::default(), &[]),
            "/routes/explain?service=shop/web&port=80&source_namespace=shop"
        );
    }

    #[test]
    fn paths_are_same_node_or_hbone_between_nodes() {
        let snapshot = snapshot();
        let line = |from: Option<&str>| path_to(&snapshot, from, "shop/web-1").unwrap().path;
        assert_eq!(line(Some("node0")), "same node");
        assert_eq!(line(Some("node1")), "HBONE node1 → node0");
        assert!(line(None).starts_with("from outside"));
        assert_eq!(
            path_to(&snapshot, None, "shop/web-1").unwrap().mode,
            "STRICT"
        );
    }
}
