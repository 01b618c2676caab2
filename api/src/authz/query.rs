//! "Why was this allowed or denied?": an explain query as the admin endpoints take it
//! (`GET /authorization/explain?…`), resolved against what an agent or the controller
//! knows of the mesh ([`Directory`]) and answered by [`explain`](super::explain) over
//! the same compiled policies the data path enforces.
//!
//! Parameters: one source, `source_pod=<ns>/<name>`, `source_principal=<spiffe id>`
//! or `source_ip=<ip>` (an IP alone is plaintext, unless it is a meshed pod's); one
//! destination, `destination_pod=<ns>/<name>`, `destination_ip=<ip>` or
//! `destination_service=<ns>/<name>` (each endpoint is explained); `port=` (the
//! service's port, or the pod's); for HTTP, `method=`, `path=`, `host=` and
//! `header=<name>:<value>` (repeatable). Without `method` and `path` the question is
//! about a TCP connection.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use super::{Caller, Explanation, Policy, Request, Target, Traffic, explain};

/// A pod as the explain query needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `<namespace>/<name>`.
    pub name: String,
    pub ip: IpAddr,
    /// The SPIFFE ID without `spiffe://`.
    pub principal: String,
}

/// What an agent or the controller knows of the mesh, for explaining.
pub trait Directory {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod>;
    fn pod_at(&self, ip: IpAddr) -> Option<Pod>;
    /// The endpoints (pod address, target port) of the service's `port`.
    fn service_endpoints(&self, namespace: &str, name: &str, port: u16) -> Option<Vec<SocketAddr>>;
    /// The policies that select the pod at `ip`; `Err` says why this directory cannot
    /// tell (an agent holds only the policies of its own node's pods).
    fn policies(&self, ip: IpAddr) -> Result<Vec<&Policy>, String>;
}

/// A parsed explain query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    source_pod: Option<String>,
    source_principal: Option<String>,
    source_ip: Option<IpAddr>,
    destination_pod: Option<String>,
    destination_ip: Option<IpAddr>,
    destination_service: Option<String>,
    port: Option<u16>,
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    headers: Vec<(String, String)>,
}

/// The answer: who was asked about, and each destination pod's decision.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    pub source: String,
    pub destinations: Vec<Destination>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Destination {
    /// `<namespace>/<name>`, or the address when no pod has it.
    pub pod: String,
    pub address: SocketAddr,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<Explanation>,
    /// Why there is no explanation here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<String>,
}

impl Query {
    /// Parses a URL query string; the error names the parameter and what is wrong.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut parsed = Query::default();
        for (name, value) in parameters(query)? {
            let name = name.as_str();
            let ip = |value: &str| {
                value
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{name}: {value:?} is not an IP"))
            };
            let named = |value: String| {
                if value
                    .split_once('/')
                    .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty())
                {
                    Ok(value)
                } else {
                    Err(format!("{name}: {value:?} is not <namespace>/<name>"))
                }
            };
            match name {
                "source_pod" => parsed.source_pod = Some(named(value)?),
                "source_principal" => {
                    parsed.source_principal =
                        Some(value.strip_prefix("spiffe://").unwrap_or(&value).to_owned());
                }
                "source_ip" => parsed.source_ip = Some(ip(&value)?),
                "destination_pod" => parsed.destination_pod = Some(named(value)?),
                "destination_ip" => parsed.destination_ip = Some(ip(&value)?),
                "destination_service" => parsed.destination_service = Some(named(value)?),
                "port" => {
                    parsed.port = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|&port: &u16| port != 0)
                            .ok_or_else(|| format!("port: {value:?} is not a port"))?,
                    );
                }
                "method" => parsed.method = Some(value),
                "path" => parsed.path = Some(value),
                "host" => parsed.host = Some(value),
                "header" => parsed.headers.push(header(&value)?),
                _ => return Err(format!("{name}: not a parameter ({})", PARAMETERS)),
            }
        }
        Ok(parsed)
    }
}

const PARAMETERS: &str = "source_pod, source_principal, source_ip, destination_pod, \
                          destination_ip, destination_service, port, method, path, host, header";

/// Answers `query` from `directory`.
pub fn answer(directory: &impl Directory, query: &Query) -> Result<Answer, String> {
    let (principal, ip, source) =
        match (&query.source_pod, &query.source_principal, query.source_ip) {
            (Some(name), None, None) => {
                let (namespace, name) = name.split_once('/').unwrap_or_default();
                let pod = directory
                    .pod(namespace, name)
                    .ok_or_else(|| format!("source_pod: no meshed pod {namespace}/{name}"))?;
                let described = format!("pod {} (spiffe://{})", pod.name, pod.principal);
                (Some(pod.principal), Some(pod.ip), described)
            }
            (None, Some(principal), None) => (
                Some(principal.clone()),
                None,
                format!("spiffe://{principal}"),
            ),
            (None, None, Some(ip)) => match directory.pod_at(ip) {
                Some(pod) => {
                    let described = format!("pod {} (spiffe://{})", pod.name, pod.principal);
                    (Some(pod.principal), Some(ip), described)
                }
                None => (None, Some(ip), format!("plaintext from {ip}")),
            },
            _ => {
                return Err(
                    "give exactly one of source_pod, source_principal, source_ip".to_owned(),
                );
            }
        };
    let port = query.port;
    let need_port = || "port: give the destination's port".to_owned();
    let targets: Vec<SocketAddr> = match (
        &query.destination_pod,
        query.destination_ip,
        &query.destination_service,
    ) {
        (Some(name), None, None) => {
            let (namespace, name) = name.split_once('/').unwrap_or_default();
            let pod = directory
                .pod(namespace, name)
                .ok_or_else(|| format!("destination_pod: no meshed pod {namespace}/{name}"))?;
            vec![SocketAddr::new(pod.ip, port.ok_or_else(need_port)?)]
        }
        (None, Some(ip), None) => vec![SocketAddr::new(ip, port.ok_or_else(need_port)?)],
        (None, None, Some(name)) => {
            let (namespace, name) = name.split_once('/').unwrap_or_default();
            let port = port.ok_or_else(need_port)?;
            directory
                .service_endpoints(namespace, name, port)
                .ok_or_else(|| {
                    format!("destination_service: no service {namespace}/{name} with port {port}")
                })?
        }
        _ => {
            return Err(
                "give exactly one of destination_pod, destination_ip, destination_service"
                    .to_owned(),
            );
        }
    };
    let caller = Caller {
        principal: principal.as_deref(),
        ip,
    };
    let request = match (&query.method, &query.path) {
        (Some(method), Some(path)) => Some(Request {
            method,
            path: path.split('?').next().unwrap_or(path),
            host: query.host.as_deref().unwrap_or_default(),
            headers: &query.headers,
        }),
        (None, None) => None,
        _ => return Err("give method and path together (or neither, for TCP)".to_owned()),
    };
    let destinations = targets
        .into_iter()
        .map(|address| {
            let target = Target {
                ip: address.ip(),
                port: address.port(),
            };
            let traffic = match request {
                Some(request) => Traffic::Http(request),
                None => Traffic::Tcp,
            };
            let policies = directory.policies(address.ip());
            Destination {
                pod: directory
                    .pod_at(address.ip())
                    .map_or_else(|| address.ip().to_string(), |pod| pod.name),
                address,
                explanation: policies
                    .as_ref()
                    .ok()
                    .map(|policies| explain(policies.iter().copied(), &caller, target, traffic)),
                unknown: policies.err(),
            }
        })
        .collect();
    Ok(Answer {
        source,
        destinations,
    })
}

/// The parameters of a URL query string, in order, their values percent-decoded; the
/// error names a parameter whose value does not decode.
pub fn parameters(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value).ok_or_else(|| format!("{name}: bad percent-encoding"))?;
            Ok((name.to_owned(), value))
        })
        .collect()
}

/// A `header=<name>:<value>` parameter's value: the header's name in lowercase, and
/// its value.
pub fn header(value: &str) -> Result<(String, String), String> {
    let (name, text) = value
        .split_once(':')
        .ok_or_else(|| format!("header: {value:?} is not <name>:<value>"))?;
    Ok((name.trim().to_ascii_lowercase(), text.trim().to_owned()))
}

/// Percent-decoding of a query value (`+` is a space).
fn decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
                decoded.push(u8::from_str_radix(hex, 16).ok()?);
                index += 3;
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}
