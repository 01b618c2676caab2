//! The data path's one error type: why a connection or a request could not be carried.
//! Each error has a `reason()` (the label of `weft_connections_refused_total` and the
//! access log's `error`), Envoy's `response_flags` (what Istio's dashboards read), and
//! the HTTP status an HTTP client gets when its request fails on it.

use std::{io, net::SocketAddr, time::Duration};

use http::StatusCode;

use super::hbone::HboneError;
use crate::{datapath::DatapathError, identity::Identity};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no original destination recorded for {0}: it was not captured by weft, or the record was evicted"
    )]
    UnknownOriginalDestination(SocketAddr),
    #[error(
        "{peer} is not a workload of the mesh configuration, after waiting {waited:?} for it: \
         is the controller running, and does it see the pod?"
    )]
    UnknownSource { peer: SocketAddr, waited: Duration },
    #[error("{0} is neither a service nor a meshed workload of the mesh configuration")]
    UnknownDestination(SocketAddr),
    #[error("service {0} has no ready endpoint (check its selector and its pods' readiness)")]
    NoEndpoints(String),
    #[error("workload {0} has no node in the mesh configuration")]
    NoNode(String),
    #[error("node {0} is not in the mesh configuration")]
    UnknownNode(String),
    #[error(
        "no certificate for {identity} after waiting {waited:?} for one: is the controller's \
         CA reachable from this node (see weft_certificate_failures_total)?"
    )]
    NoCertificate {
        identity: Identity,
        waited: Duration,
    },
    #[error("reading the original destination failed: {0}")]
    Datapath(#[from] DatapathError),
    #[error("connecting to {target} failed: {source}")]
    Connect {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("HBONE to {agent} for {target} failed ({reason}): {source}")]
    Hbone {
        agent: SocketAddr,
        target: SocketAddr,
        /// [`HboneError::reason`], or the certificate problem the TLS handshake hit.
        reason: &'static str,
        #[source]
        source: Box<HboneError>,
    },
    #[error("the HTTP/{version} handshake with {target} failed: {source}")]
    UpstreamHandshake {
        target: SocketAddr,
        version: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("{target} reset or closed the request before it answered: {source}")]
    UpstreamReset {
        target: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{0} closed a new connection before the request could be sent")]
    UpstreamClosed(SocketAddr),
    #[error("upgrading the connection ({what}) failed: {source}")]
    Upgrade {
        what: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("copying bytes failed: {0}")]
    Copy(#[source] io::Error),
    #[error("denied by authorization policy ({by})")]
    Denied { by: String },
    #[error(
        "the agent at {agent} denied the tunnel to {target}: an authorization policy of the \
         destination refuses this caller (its agent's /authorization/explain says which)"
    )]
    DeniedByDestination {
        agent: SocketAddr,
        target: SocketAddr,
    },
    #[error("closed: the authorization policy changed and now denies it ({by})")]
    Revoked { by: String },
    #[error(
        "no rule of the routes attached to {service} matches the request (a routed service \
         answers only what its HTTPRoutes or GRPCRoutes match)"
    )]
    NoRoute { service: String },
    #[error(
        "rule {rule} of {route} chose a backend that does not resolve (its status says \
         ResolvedRefs False), or it has no backend with a weight"
    )]
    NoBackend { route: String, rule: String },
    #[error("the backend {backend} of a route is not a service of the mesh configuration")]
    UnknownBackend { backend: String },
    #[error("no response within the {which} timeout of {timeout:?}")]
    RequestTimeout {
        which: &'static str,
        timeout: Duration,
    },
    #[error(
        "the request's stream carried nothing, either way, for its idle timeout of \
         {timeout:?} (the service's TrafficPolicy timeouts.streamIdle, else the agent's \
         --idle-timeout)"
    )]
    StreamIdle { timeout: Duration },
    #[error(
        "the client sent nothing of the request body for {timeout:?} while the server \
         waited for it (--client-stall-timeout)"
    )]
    SlowBody { timeout: Duration },
    #[error("aborted by the FaultInjection of rule {rule} of {route}, as it asks")]
    FaultAbort {
        route: String,
        rule: String,
        status: StatusCode,
        grpc_status: u8,
    },
    #[error(
        "the circuit breaker of {service} is open: its TrafficPolicy \
         connectionLimits.{limit} is reached on this node (raise it, or add replicas)"
    )]
    Overflow {
        service: String,
        limit: &'static str,
    },
}

impl ProxyError {
    /// A short machine-readable name, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::UnknownOriginalDestination(_) => "unknown_original_destination",
            ProxyError::UnknownSource { .. } => "unknown_source",
            ProxyError::UnknownDestination(_) => "unknown_destination",
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::NoNode(_) | ProxyError::UnknownNode(_) => "unknown_node",
            ProxyError::NoCertificate { .. } => "no_certificate",
            ProxyError::Datapath(_) => "datapath",
            ProxyError::Connect { source, .. } if source.kind() == io::ErrorKind::TimedOut => {
                "connect_timeout"
            }
            ProxyError::Connect { .. } => "connect",
            ProxyError::Hbone { reason, .. } => reason,
            ProxyError::UpstreamHandshake { .. } => "upstream_handshake",
            ProxyError::UpstreamReset { .. } => "upstream_reset",
            ProxyError::UpstreamClosed(_) => "upstream_closed",
            ProxyError::Upgrade { .. } => "upgrade",
            ProxyError::Copy(_) => "copy",
            ProxyError::Denied { .. } | ProxyError::DeniedByDestination { .. } => {
                "authorization_denied"
            }
            ProxyError::Revoked { .. } => "authorization_revoked",
            ProxyError::NoRoute { .. } => "route_not_found",
            ProxyError::NoBackend { .. } | ProxyError::UnknownBackend { .. } => "backend_not_found",
            ProxyError::RequestTimeout { .. } => "request_timeout",
            ProxyError::StreamIdle { .. } => "stream_idle_timeout",
            ProxyError::SlowBody { .. } => "slow_body",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::FaultAbort { .. } => "fault_injected",
        }
    }

    /// Whether an authorization policy refused or cut off what failed.
    pub fn is_denial(&self) -> bool {
        matches!(
            self,
            ProxyError::Denied { .. }
                | ProxyError::DeniedByDestination { .. }
                | ProxyError::Revoked { .. }
        )
    }

    /// Envoy's `response_flags` for the failure: `NR` no route, `UH` no healthy
    /// upstream, `UF` upstream connection failure, `UC` upstream connection
    /// termination, `DC` downstream connection termination, `UO` upstream overflow
    /// (circuit breaking), `FI` a fault injected, `SI` a stream idle timeout (the
    /// client's too: a slow request body); and `RBAC`, denied by an
    /// authorization policy (Envoy sets no flag there, only its response details).
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::UnknownOriginalDestination(_)
            | ProxyError::NoRoute { .. }
            | ProxyError::NoBackend { .. }
            | ProxyError::UnknownBackend { .. }
            | ProxyError::UnknownSource { .. }
            | ProxyError::UnknownDestination(_)
            | ProxyError::NoNode(_)
            | ProxyError::UnknownNode(_)
            | ProxyError::Datapath(_) => "NR",
            ProxyError::NoEndpoints(_) => "UH",
            ProxyError::NoCertificate { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Hbone { .. }
            | ProxyError::UpstreamHandshake { .. } => "UF",
            ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamClosed(_)
            | ProxyError::Upgrade { .. } => "UC",
            ProxyError::Copy(_) => "DC",
            ProxyError::Denied { .. }
            | ProxyError::DeniedByDestination { .. }
            | ProxyError::Revoked { .. } => "RBAC",
            ProxyError::RequestTimeout { .. } => "UT",
            ProxyError::StreamIdle { .. } | ProxyError::SlowBody { .. } => "SI",
            ProxyError::Overflow { .. } => "UO",
            ProxyError::FaultAbort { .. } => "FI",
        }
    }

    /// The `response_flags` when the failure came after retries ran out: the failure's
    /// with `URX` added, as Envoy writes them.
    pub fn response_flags_retried(&self) -> &'static str {
        match self.response_flags() {
            "UF" => "UF,URX",
            "UC" => "UC,URX",
            "UT" => "UT,URX",
            _ => "URX",
        }
    }

    /// The status an HTTP client gets for a request that failed on this.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::FaultAbort { status, .. } => *status,
            ProxyError::Connect { source, .. } if source.kind() == io::ErrorKind::TimedOut => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::UnknownDestination(_) | ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoBackend { .. } | ProxyError::UnknownBackend { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::RequestTimeout { .. } | ProxyError::StreamIdle { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::SlowBody { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Denied { .. }
            | ProxyError::DeniedByDestination { .. }
            | ProxyError::Revoked { .. } => StatusCode::FORBIDDEN,
            ProxyError::UpstreamReset { .. }
            | ProxyError::UpstreamClosed(_)
            | ProxyError::Upgrade { .. } => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status a gRPC client gets instead (`UNAVAILABLE`, `DEADLINE_EXCEEDED`,
    /// `UNIMPLEMENTED` for no route, `PERMISSION_DENIED`), as gRPC maps HTTP statuses.
    pub fn grpc_status(&self) -> u8 {
        match self {
            ProxyError::FaultAbort { grpc_status, .. } => *grpc_status,
            _ => grpc_status_for(self.status()),
        }
    }
}

/// The gRPC status that stands for HTTP `status` (as gRPC maps them, roughly).
pub fn grpc_status_for(status: StatusCode) -> u8 {
    match status {
        StatusCode::GATEWAY_TIMEOUT => 4,
        StatusCode::FORBIDDEN => 7,
        StatusCode::NOT_FOUND => 12,
        StatusCode::INTERNAL_SERVER_ERROR => 13,
        _ => 14,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_a_reason_flags_and_a_status() {
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let table = [
            (
                ProxyError::NoEndpoints("shop/web".into()),
                ("no_endpoints", "UH", 503, 14),
            ),
            (
                ProxyError::Connect {
                    target,
                    source: io::ErrorKind::ConnectionRefused.into(),
                },
                ("connect", "UF", 503, 14),
            ),
            (
                ProxyError::Connect {
                    target,
                    source: io::ErrorKind::TimedOut.into(),
                },
                ("connect_timeout", "UF", 504, 4),
            ),
            (
                ProxyError::UnknownDestination(target),
                ("unknown_destination", "NR", 404, 12),
            ),
            (
                ProxyError::Hbone {
                    agent: target,
                    target,
                    reason: "certificate_expired",
                    source: Box::new(HboneError::Closed),
                },
                ("certificate_expired", "UF", 503, 14),
            ),
            (
                ProxyError::Denied {
                    by: "shop/deny-admin".into(),
                },
                ("authorization_denied", "RBAC", 403, 7),
            ),
            (
                ProxyError::DeniedByDestination {
                    agent: target,
                    target,
                },
                ("authorization_denied", "RBAC", 403, 7),
            ),
            (
                ProxyError::NoRoute {
                    service: "shop/web:80".into(),
                },
                ("route_not_found", "NR", 404, 12),
            ),
            (
                ProxyError::NoBackend {
                    route: "HTTPRoute/shop/web".into(),
                    rule: "0".into(),
                },
                ("backend_not_found", "NR", 500, 13),
            ),
            (
                ProxyError::RequestTimeout {
                    which: "request",
                    timeout: Duration::from_millis(100),
                },
                ("request_timeout", "UT", 504, 4),
            ),
            (
                ProxyError::StreamIdle {
                    timeout: Duration::from_secs(300),
                },
                ("stream_idle_timeout", "SI", 504, 4),
            ),
            (
                ProxyError::SlowBody {
                    timeout: Duration::from_secs(60),
                },
                ("slow_body", "SI", 408, 14),
            ),
            (
                ProxyError::Overflow {
                    service: "shop/web:80".into(),
                    limit: "maxRequests",
                },
                ("overflow", "UO", 503, 14),
            ),
            (
                ProxyError::FaultAbort {
                    route: "HTTPRoute/shop/web".into(),
                    rule: "0".into(),
                    status: StatusCode::IM_A_TEAPOT,
                    grpc_status: 8,
                },
                ("fault_injected", "FI", 418, 8),
            ),
        ];
        for (error, (reason, flags, status, grpc)) in table {
            assert_eq!(
                (
                    error.reason(),
                    error.response_flags(),
                    error.status().as_u16(),
                    error.grpc_status()
                ),
                (reason, flags, status, grpc),
                "{error}"
            );
        }
    }

    #[test]
    fn retries_run_out_adds_urx_to_the_failures_flags() {
        let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let refused = ProxyError::Connect {
            target,
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        let timed_out = ProxyError::RequestTimeout {
            which: "perTryTimeout",
            timeout: Duration::from_millis(100),
        };
        let denied = ProxyError::Denied {
            by: "shop/deny".into(),
        };
        assert_eq!(refused.response_flags_retried(), "UF,URX");
        assert_eq!(timed_out.response_flags_retried(), "UT,URX");
        assert_eq!(denied.response_flags_retried(), "URX");
    }
}
