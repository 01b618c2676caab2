//! Outbound: connections the kernel captured from local pods (port 15001).
//!
//! The original destination recorded by the capture programs and the calling pod make
//! the connection's [`Logical`] target. Its protocol decides what follows: TCP is
//! balanced per connection and copied ([`super::tcp`]); HTTP is served and balanced
//! per request ([`super::http`]); an undeclared protocol is detected from the first
//! bytes ([`super::detect`]).
//!
//! A pod is captured from the moment it is enrolled, but the mesh configuration names
//! it only once the controller has seen its address, and its certificate comes after
//! that: a connection from a pod the configuration does not name yet waits for it (and
//! for the certificate a tunnel needs) up to `Settings::source_wait`, instead of being
//! refused — a new pod's first connection is often its most important one.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

use super::{
    Proxy,
    admission::{Admission, Permit},
    balance::Pick,
    breaker::Breaker,
    detect::{Detected, detect},
    error::ProxyError,
    http,
    logical::{self, Destination, Endpoint, Logical},
    metrics,
    retry::Retrying,
    tcp,
};
use crate::{
    logging::{Throttle, held_back},
    mesh::{MeshConfig, Protocol, Service, ServicePort},
    observe, tls,
};
use weft_api::{observe::verdict, routes::BackendRef};

/// Accepts captured connections until the listener is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    super::accept(
        listener,
        proxy,
        "outbound",
        Admission::admit,
        |proxy, client, peer, permit| async move {
            handle(proxy, client, peer, permit).await;
        },
    )
    .await;
}

async fn handle(proxy: Arc<Proxy>, client: TcpStream, peer: SocketAddr, mut permit: Permit) {
    let _tracked = proxy.track();
    let logical = match route(&proxy, peer).await {
        Ok(logical) => logical,
        Err(refusal) => return refused(peer, &refusal),
    };
    permit.authenticated();
    let _ = client.set_nodelay(true);
    // The carrying futures are boxed: kilobytes of state each (an HTTP connection's
    // most of all), which would otherwise be copied whenever this one is moved, and
    // tokio moves a task's future several times while spawning it.
    match logical.protocol {
        Protocol::Tcp => Box::pin(tcp::carry(&proxy, client, &logical)).await,
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
            Box::pin(http::serve_outbound(proxy, logical, client)).await;
        }
        Protocol::Detect => {
            let (detected, client) = detect(client, proxy.settings.detect_timeout).await;
            match detected {
                Detected::Tcp => Box::pin(tcp::carry(&proxy, client, &logical)).await,
                Detected::Http1 | Detected::Http2 => {
                    Box::pin(http::serve_outbound(proxy, logical, client)).await;
                }
            }
        }
    }
}

/// How long a connection to `logical` may carry nothing (a TCP connection: no byte
/// either way; an HTTP/1.1 one: no new request): its service's TrafficPolicy
/// `timeouts.idle`, or the agent's default.
pub fn idle_timeout(proxy: &Proxy, logical: &Logical) -> Duration {
    let service_timeout = match &logical.destination {
        Destination::Service(target) => proxy
            .mesh
            .get()
            .service_at(target.vip, target.port)
            .and_then(|(service, _)| service.idle_timeout),
        Destination::Pod(_) => None,
    };
    service_timeout.unwrap_or(proxy.settings.idle_timeout)
}

/// How requests and connections to `logical` are retried, by the configuration `mesh`:
/// its service's TrafficPolicy `retries`, or the agent's default; None for a pod
/// addressed directly (there is nothing else to try).
pub fn retrying(proxy: &Proxy, mesh: &MeshConfig, logical: &Logical) -> Option<Retrying> {
    let Destination::Service(target) = &logical.destination else {
        return None;
    };
    let policy = mesh
        .service_at(target.vip, target.port)
        .and_then(|(service, _)| service.retries.as_ref());
    Some(Retrying::of(&proxy.budgets, &target.key, policy))
}

/// The circuit breaker of `service` (its key), when its TrafficPolicy sets
/// `connectionLimits`.
pub fn breaker(proxy: &Proxy, service: &Service, key: &str) -> Option<Arc<Breaker>> {
    let limits = service.limits.as_ref()?;
    Some(
        proxy
            .breakers
            .of(key, limits, |limits| Breaker::new(key, limits)),
    )
}

/// Counts and logs (at most once a second) a captured connection refused before it
/// was carried.
pub fn refused(peer: SocketAddr, refusal: &ProxyError) {
    static REFUSED: Throttle = Throttle::new();
    metrics::refused("outbound", refusal.reason());
    let verdict = if refusal.is_denial() {
        verdict::DENY
    } else {
        verdict::ERROR
    };
    observe::report(verdict, || {
        let source = observe::peer_at_address(peer);
        observe::refusal(
            "outbound",
            refusal.reason(),
            refusal.to_string(),
            source,
            None,
        )
    });
    if let Some(held) = REFUSED.allow() {
        log::warn!(
            "outbound connection from {peer} refused: {refusal}{}",
            held_back(held)
        );
    }
}

/// The logical target of the connection from `peer`: its original destination and
/// source, waiting (up to `source_wait`) for a configuration that names the source and
/// for the certificate of the source's identity when a tunnel may be needed.
async fn route(proxy: &Proxy, peer: SocketAddr) -> Result<Logical, ProxyError> {
    let original = proxy
        .original_destinations
        .take(peer)?
        .ok_or(ProxyError::UnknownOriginalDestination(peer))?;
    let waited = proxy.settings.source_wait;
    let deadline = Instant::now() + waited;
    let logical_now = |mesh: &MeshConfig| match logical::logical(mesh, peer, original) {
        Err(ProxyError::UnknownSource { .. }) => None,
        found => Some(found.map(|logical| {
            let tunnel = logical::may_tunnel(mesh, &proxy.node, &logical.destination);
            (logical, tunnel)
        })),
    };
    let (logical, may_tunnel) = match logical_now(&proxy.mesh.get()) {
        Some(found) => found?,
        None => {
            let found = waiting("workload", proxy.mesh.wait_for(deadline, logical_now)).await;
            found.unwrap_or(Err(ProxyError::UnknownSource { peer, waited }))?
        }
    };
    let identity = &logical.source.identity;
    if may_tunnel && proxy.certs.get().serial(identity).is_none() {
        let has_certificate = |certs: &tls::CertStore| certs.serial(identity).map(drop);
        let found = waiting(
            "certificate",
            proxy.certs.wait_for(deadline, has_certificate),
        )
        .await;
        found.ok_or_else(|| ProxyError::NoCertificate {
            identity: identity.clone(),
            waited,
        })?;
    }
    Ok(logical)
}

/// Awaits `wait`, counting it by `what` it waited for and whether that came.
async fn waiting<T>(
    what: &'static str,
    wait: impl std::future::Future<Output = Option<T>>,
) -> Option<T> {
    let started = Instant::now();
    let found = wait.await;
    metrics::waited(what, found.is_some(), started.elapsed());
    found
}

/// The endpoint a new connection (TCP) or request (HTTP) to `logical` goes to, by the
/// configuration of the moment: a service's is chosen by its balancer, and the pick
/// counts as in flight until it drops. A retry `avoid`s the endpoints tried before,
/// while the service has others.
pub fn choose(
    proxy: &Proxy,
    logical: &Logical,
    avoid: &[SocketAddr],
) -> Result<(Endpoint, Option<Pick>), ProxyError> {
    let mesh = proxy.mesh.get();
    match &logical.destination {
        Destination::Pod(address) => Ok((
            logical::endpoint(&mesh, &proxy.node, *address, false)?,
            None,
        )),
        Destination::Service(target) => {
            let (service, port) = mesh.service_at(target.vip, target.port).ok_or_else(|| {
                ProxyError::NoEndpoints(format!("{}/{}", target.namespace, target.name))
            })?;
            pick(proxy, &mesh, &target.key, service, port, avoid)
        }
    }
}

/// The endpoint a request routed to `backend` goes to, chosen by that service's
/// balancer (avoiding those tried before, as [`choose`] does).
pub fn choose_backend(
    proxy: &Proxy,
    backend: &BackendRef,
    avoid: &[SocketAddr],
) -> Result<(Endpoint, Option<Pick>), ProxyError> {
    let mesh = proxy.mesh.get();
    let (service, port) = mesh
        .service_named(&backend.namespace, &backend.service, backend.port)
        .ok_or_else(|| ProxyError::UnknownBackend {
            backend: backend.to_string(),
        })?;
    pick(proxy, &mesh, &backend.to_string(), service, port, avoid)
}

/// One of `service`'s endpoints on `port` but those to `avoid` (unless they are all
/// it has), by its balancer (`key`).
fn pick(
    proxy: &Proxy,
    mesh: &MeshConfig,
    key: &str,
    service: &Service,
    port: &ServicePort,
    avoid: &[SocketAddr],
) -> Result<(Endpoint, Option<Pick>), ProxyError> {
    let no_endpoints =
        || ProxyError::NoEndpoints(format!("{}/{}", service.namespace, service.name));
    let candidates = logical::candidates(mesh, &proxy.node, service, port.target());
    let pick = proxy
        .balancers
        .pick(key, logical::policy(service), &candidates, avoid)
        .ok_or_else(no_endpoints)?;
    let endpoint = Endpoint {
        connect_timeout: service.connect_timeout,
        ..logical::endpoint(mesh, &proxy.node, pick.address(), true)?
    };
    Ok((endpoint, Some(pick)))
}
