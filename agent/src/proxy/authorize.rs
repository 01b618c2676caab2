//! Authorization on the data path: the destination's policies ([`weft_api::authz`])
//! asked about a connection before a byte reaches the pod, and about each request on
//! an HTTP one; every decision counted (`weft_authorization_decisions_total`), every
//! DENY, AUDIT and dry-run match logged, and a denial turned into a refusal.
//!
//! The destination's agent decides for a tunnel from another node (`inbound`); for a
//! pod of its own node, the client's agent decides (`local`), with the caller's
//! identity from the kernel's record of the calling pod. [`NodeDirectory`] answers
//! the admin port's explain queries from the same configuration.

use std::{fmt, net::IpAddr, net::SocketAddr};

use http::{HeaderMap, Request, header};
use metrics::counter;
use weft_api::authz::{
    self, Decision, Reason, Traffic, Verdict,
    query::{Directory, Pod},
};

use super::Proxy;
use crate::{identity::Identity, mesh::MeshConfig};

/// Who decides: the destination's agent for a tunnel, or the client's agent for a pod
/// of its own node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Local,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Local => "local",
        }
    }
}

/// The caller of a connection, resolved once for its life. The agent only ever decides
/// for authenticated callers: plaintext is judged in the kernel (`PlaintextPolicy`).
#[derive(Clone, Debug)]
pub struct Caller {
    /// The SPIFFE ID without `spiffe://`, as policies match it.
    principal: String,
    ip: Option<IpAddr>,
}

impl Caller {
    /// A caller with a verified identity (a tunnel's client certificate, or a pod of
    /// this node), from `ip` when that is known and trusted.
    pub fn authenticated(identity: &Identity, ip: Option<IpAddr>) -> Self {
        Self {
            principal: identity.principal(),
            ip,
        }
    }

    fn view(&self) -> authz::Caller<'_> {
        authz::Caller {
            principal: Some(&self.principal),
            ip: self.ip,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal)?;
        match self.ip {
            Some(ip) => write!(f, " ({ip})"),
            None => Ok(()),
        }
    }
}

/// A denial: which policy decided (`<namespace>/<name>`), or `default deny`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub by: String,
}

/// Decides a connection from `caller` to the pod at `target`, carrying `traffic`
/// ([`Traffic::Unknown`] before its protocol is known, or for HTTP before its
/// requests): denied, or let in ([`Verdict::DependsOnRequest`]: each request decides).
pub fn connection(
    mesh: &MeshConfig,
    direction: Direction,
    caller: &Caller,
    target: SocketAddr,
    traffic: Traffic<'_>,
) -> Result<Verdict, Denied> {
    decide(mesh, direction, caller, target, traffic, &"connection")
}

/// Decides one HTTP request of `caller` to the pod at `target`.
pub fn request<B>(
    mesh: &MeshConfig,
    direction: Direction,
    caller: &Caller,
    target: SocketAddr,
    request: &Request<B>,
) -> Result<(), Denied> {
    let headers = HeaderView(request.headers());
    let host = request
        .uri()
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
        })
        .unwrap_or_default();
    let view = authz::Request {
        method: request.method().as_str(),
        path: request.uri().path(),
        host,
        headers: &headers,
    };
    let what = format_args!("{} {}{}", view.method, host, view.path);
    decide(mesh, direction, caller, target, Traffic::Http(view), &what).map(drop)
}

/// Resolves once a new configuration denies the TCP connection from `caller` to
/// `target` that the configuration of its start allowed, with what denied it: the
/// caller then closes the connection.
pub async fn revoked(
    proxy: &Proxy,
    direction: Direction,
    caller: &Caller,
    target: SocketAddr,
) -> String {
    let mut replaced = proxy.mesh.subscribe();
    replaced.borrow_and_update();
    while replaced.changed().await.is_ok() {
        let mesh = proxy.mesh.get();
        if let Err(denied) = connection(&mesh, direction, caller, target, Traffic::Tcp) {
            return denied.by;
        }
    }
    // The configuration is owned by the proxy, which outlives its connections.
    std::future::pending().await
}

/// The mesh as this node's agent knows it, for explain queries: every pod and
/// service, and the policies of this node's pods.
#[derive(Debug)]
pub struct NodeDirectory<'a> {
    pub mesh: &'a MeshConfig,
    pub node: &'a str,
}

impl NodeDirectory<'_> {
    fn pod_of(&self, workload: &crate::mesh::Workload) -> Pod {
        Pod {
            name: format!("{}/{}", workload.namespace, workload.name),
            ip: workload.ip,
            principal: self.mesh.identity(workload).principal(),
        }
    }
}

impl Directory for NodeDirectory<'_> {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.mesh
            .workload_named(namespace, name)
            .filter(|workload| self.mesh.is_meshed(workload))
            .map(|workload| self.pod_of(workload))
    }

    fn pod_at(&self, ip: IpAddr) -> Option<Pod> {
        self.mesh
            .workload_by_ip(ip)
            .filter(|workload| self.mesh.is_meshed(workload))
            .map(|workload| self.pod_of(workload))
    }

    fn service_endpoints(&self, namespace: &str, name: &str, port: u16) -> Option<Vec<SocketAddr>> {
        let (service, port) = self.mesh.service_named(namespace, name, port)?;
        Some(
            service
                .endpoints
                .iter()
                .map(|ip| SocketAddr::new(*ip, port.target()))
                .collect(),
        )
    }

    fn policies(&self, ip: IpAddr) -> Result<Vec<&authz::Policy>, String> {
        match self.mesh.workload_by_ip(ip) {
            Some(workload) if workload.node.as_deref() == Some(self.node) => {
                Ok(self.mesh.policies_for(ip).collect())
            }
            Some(workload) => Err(format!(
                "{}/{} runs on node {}, whose agent decides: ask it, or the controller",
                workload.namespace,
                workload.name,
                workload.node.as_deref().unwrap_or("(none)")
            )),
            None => Err(format!(
                "{ip} is no pod of the mesh: no policy applies to it"
            )),
        }
    }
}

/// A request's headers as policies and route matches read them: the first value of a
/// name.
#[derive(Debug)]
pub struct HeaderView<'a>(pub &'a HeaderMap);

impl authz::Headers for HeaderView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|value| value.to_str().ok())
    }
}

fn decide(
    mesh: &MeshConfig,
    direction: Direction,
    caller: &Caller,
    target: SocketAddr,
    traffic: Traffic<'_>,
    what: &dyn fmt::Display,
) -> Result<Verdict, Denied> {
    let policies = mesh.policies_for(target.ip());
    if policies.clone().next().is_none() {
        return Ok(Verdict::Allow);
    }
    let view = authz::Target {
        ip: target.ip(),
        port: target.port(),
    };
    let decision = authz::evaluate(policies, &caller.view(), view, traffic);
    report(&decision, direction, caller, target, what);
    match decision.verdict {
        Verdict::Deny => Err(Denied {
            by: decision.decided_by(),
        }),
        verdict => Ok(verdict),
    }
}

/// Counts and logs `decision`; a pending one is neither (its requests will be).
fn report(
    decision: &Decision<'_>,
    direction: Direction,
    caller: &Caller,
    target: SocketAddr,
    what: &dyn fmt::Display,
) {
    let count = |reason: &Reason<'_>, result: &'static str| {
        let action = match reason {
            Reason::Matched(matched) => matched.policy.action.as_str(),
            _ => "none",
        };
        let policy = match reason {
            Reason::Matched(matched) => matched.policy.key(),
            _ => "default".to_owned(),
        };
        counter!(
            "weft_authorization_decisions_total",
            "direction" => direction.as_str(),
            "action" => action,
            "policy" => policy,
            "result" => result,
        )
        .increment(1);
    };
    let rule = |reason: &Reason<'_>| match reason {
        Reason::Matched(matched) => format!(" rules[{}]", matched.rule),
        _ => String::new(),
    };
    match decision.verdict {
        Verdict::Allow => count(&decision.reason, "allowed"),
        Verdict::Deny => {
            count(&decision.reason, "denied");
            log::info!(
                "authorization DENY: {caller} -> {target} {what}: {}{}",
                decision.decided_by(),
                rule(&decision.reason)
            );
        }
        Verdict::DependsOnRequest => {}
    }
    for matched in &decision.audited {
        count(&Reason::Matched(*matched), "audited");
        log::info!(
            "authorization AUDIT: {caller} -> {target} {what}: {} rules[{}]",
            matched.policy.key(),
            matched.rule
        );
    }
    if let Some((verdict, reason)) = &decision.dry_run {
        let result = match verdict {
            Verdict::Allow => "dry_run_allowed",
            Verdict::Deny => "dry_run_denied",
            Verdict::DependsOnRequest => return,
        };
        count(reason, result);
        if *verdict == Verdict::Deny {
            log::info!(
                "authorization DRY-RUN DENY (not enforced): {caller} -> {target} {what}: {}{}",
                reason.decided_by(),
                rule(reason)
            );
        }
    }
}
