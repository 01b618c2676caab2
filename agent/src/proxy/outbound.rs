//! Outbound: connections the kernel captured from local pods (port 15001).
//!
//! The original destination recorded by the capture programs decides the route: a
//! service VIP picks one of the service's endpoints (round robin), a meshed pod's
//! address is that pod. An endpoint on another node is reached through an HBONE tunnel
//! to that node's agent, in mutual TLS as the client workload; one on this node through
//! a direct connection carrying the agent's mark.
//!
//! A pod is captured from the moment it is enrolled, but the mesh configuration names
//! it only once the controller has seen its address, and its certificate comes after
//! that: a connection from a pod the configuration does not name yet waits for it (and
//! for the certificate a tunnel needs) up to `Settings::source_wait`, instead of being
//! refused — a new pod's first connection is often its most important one.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Method, Request};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_rustls::TlsConnector;

use super::{
    HBONE_PORT, PoolKey, Proxy,
    admission::{Admission, Permit},
    connect_marked, connect_within,
    hbone::HboneError,
    metrics::{self, Connection, Outcome, Peer, Reporter},
    relay::relay,
};
use crate::{
    identity::Identity,
    logging::{Throttle, held_back},
    mesh::{MeshConfig, Service},
    tls,
};

/// Accepts captured connections until the listener is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    super::accept(
        listener,
        proxy,
        "outbound",
        Admission::admit,
        |proxy, client, peer, permit| async move {
            handle(&proxy, client, peer, permit).await;
        },
    )
    .await;
}

/// Why an outbound connection is refused before it is carried.
#[derive(Debug, thiserror::Error)]
enum Refusal {
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
    #[error("service {0} has no endpoints")]
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
    Datapath(String),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::UnknownOriginalDestination(_) => "unknown_original_destination",
            Refusal::UnknownSource { .. } => "unknown_source",
            Refusal::UnknownDestination(_) => "unknown_destination",
            Refusal::NoEndpoints(_) => "no_endpoints",
            Refusal::NoNode(_) | Refusal::UnknownNode(_) => "unknown_node",
            Refusal::NoCertificate { .. } => "no_certificate",
            Refusal::Datapath(_) => "datapath",
        }
    }
}

/// Where a captured connection goes.
struct Route {
    target: SocketAddr,
    hop: Hop,
    connection: Connection,
    source_identity: Identity,
    /// How long the connection may carry nothing before it is closed.
    idle_timeout: Duration,
}

/// How the bytes get to the target.
#[derive(Debug, PartialEq, Eq)]
enum Hop {
    /// A meshed pod on this node: a direct connection carrying the agent's mark.
    Local,
    /// A meshed pod on another node: an HBONE tunnel to that node's agent, which must
    /// present `destination`'s certificate.
    Tunnel {
        agent: SocketAddr,
        destination: Identity,
    },
    /// A service endpoint outside the mesh (an opted-out pod, an address that is no
    /// workload): a plain connection, as the pod would have made itself.
    Passthrough,
}

async fn handle(proxy: &Arc<Proxy>, mut client: TcpStream, peer: SocketAddr, mut permit: Permit) {
    static REFUSED: Throttle = Throttle::new();
    static FAILED: Throttle = Throttle::new();
    let _tracked = proxy.track();
    let route = match route(proxy, peer).await {
        Ok(route) => route,
        Err(refusal) => {
            metrics::refused("outbound", refusal.reason());
            if let Some(held) = REFUSED.allow() {
                log::warn!(
                    "outbound connection from {peer} refused: {refusal}{}",
                    held_back(held)
                );
            }
            return;
        }
    };
    permit.authenticated();
    route.connection.opened();
    let _ = client.set_nodelay(true);
    let outcome = carry(proxy, &mut client, &route, peer).await;
    if let metrics::Ending::Failed(message) = &outcome.ending
        && let Some(held) = FAILED.allow()
    {
        log::warn!(
            "outbound {peer} -> {}: {message}{}",
            route.target,
            held_back(held)
        );
    }
    route.connection.closed(&outcome);
}

/// Carries the client's bytes along `route` until the connection ends.
async fn carry(proxy: &Proxy, client: &mut TcpStream, route: &Route, peer: SocketAddr) -> Outcome {
    let idle = Some(route.idle_timeout);
    let connect_timeout = proxy.settings.connect_timeout;
    match &route.hop {
        Hop::Local | Hop::Passthrough => {
            let connected = if route.hop == Hop::Local {
                connect_marked(route.target, connect_timeout).await
            } else {
                connect_within(connect_timeout, TcpStream::connect(route.target)).await
            };
            match connected {
                Ok(mut server) => relay(client, &mut server, idle).await.into(),
                Err(err) => Outcome::failed(format!("connect to {}: {err}", route.target)),
            }
        }
        Hop::Tunnel { agent, destination } => {
            match tunnel(
                proxy,
                &route.source_identity,
                destination,
                *agent,
                route.target,
                peer,
            )
            .await
            {
                Ok(mut tunnel) => relay(client, &mut tunnel, idle).await.into(),
                Err(err) => {
                    let reason = failure_reason(&err);
                    metrics::hbone_failure("outbound", reason);
                    Outcome::failed(format!(
                        "HBONE to {agent} for {} failed ({reason}): {err}",
                        route.target
                    ))
                }
            }
        }
    }
}

/// The route of the connection from `peer`: its original destination, then the plan
/// for it, waiting (up to `source_wait`) for a configuration that names the source and
/// for the certificate of the source's identity.
async fn route(proxy: &Proxy, peer: SocketAddr) -> Result<Route, Refusal> {
    let original = proxy
        .original_destinations
        .take(peer)
        .map_err(|err| Refusal::Datapath(err.to_string()))?
        .ok_or(Refusal::UnknownOriginalDestination(peer))?;
    let waited = proxy.settings.source_wait;
    let deadline = Instant::now() + waited;
    let plan_now = |mesh: &MeshConfig| match plan(mesh, &proxy.node, peer, original, |service| {
        proxy.pick(&service.namespace, &service.name, &service.endpoints)
    }) {
        Err(Refusal::UnknownSource { .. }) => None,
        planned => Some(planned.map(|mut route| {
            route.idle_timeout = route
                .connection
                .service
                .as_ref()
                .and_then(|(namespace, name)| mesh.idle_timeout(namespace, name))
                .unwrap_or(proxy.settings.idle_timeout);
            route
        })),
    };
    let route = match plan_now(&proxy.mesh.get()) {
        Some(planned) => planned?,
        None => {
            let found = waiting("workload", proxy.mesh.wait_for(deadline, plan_now)).await;
            found.unwrap_or(Err(Refusal::UnknownSource { peer, waited }))?
        }
    };
    if matches!(route.hop, Hop::Tunnel { .. })
        && proxy.certs.get().serial(&route.source_identity).is_none()
    {
        let has_certificate =
            |certs: &tls::CertStore| certs.serial(&route.source_identity).map(drop);
        let found = waiting(
            "certificate",
            proxy.certs.wait_for(deadline, has_certificate),
        )
        .await;
        found.ok_or_else(|| Refusal::NoCertificate {
            identity: route.source_identity.clone(),
            waited,
        })?;
    }
    Ok(route)
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

/// Where the connection from `peer` to `original` goes, by the mesh configuration, as
/// seen from node `node`; `pick` chooses a service's endpoint. The idle timeout is
/// left at zero for the caller to fill.
fn plan(
    mesh: &MeshConfig,
    node: &str,
    peer: SocketAddr,
    original: SocketAddr,
    pick: impl FnOnce(&Service) -> Option<std::net::IpAddr>,
) -> Result<Route, Refusal> {
    let source = mesh
        .workload_by_ip(peer.ip())
        .ok_or(Refusal::UnknownSource {
            peer,
            waited: Duration::ZERO,
        })?;
    let (target, service) = match mesh.service_at(original.ip(), original.port()) {
        Some((service, port)) => {
            let endpoint = pick(service).ok_or_else(|| {
                Refusal::NoEndpoints(format!("{}/{}", service.namespace, service.name))
            })?;
            (
                SocketAddr::new(endpoint, port.target()),
                Some((service.namespace.clone(), service.name.clone())),
            )
        }
        None => (original, None),
    };
    let source_identity = mesh.identity(source);
    let source_peer = Peer::of(source, Some(&source_identity), peer);
    let destination = mesh
        .workload_by_ip(target.ip())
        .filter(|workload| mesh.is_meshed(workload));
    let Some(destination) = destination else {
        // Only a service may lead outside the mesh; a pod address was captured
        // because it was meshed.
        if service.is_none() {
            return Err(Refusal::UnknownDestination(target));
        }
        let destination_peer = match mesh.workload_by_ip(target.ip()) {
            Some(workload) => Peer::of(workload, None, target),
            None => Peer {
                address: Some(target),
                ..Peer::default()
            },
        };
        let mut connection = Connection::new(Reporter::Source, source_peer, destination_peer);
        connection.service = service;
        return Ok(Route {
            target,
            hop: Hop::Passthrough,
            connection,
            source_identity,
            idle_timeout: Duration::ZERO,
        });
    };
    let destination_node = destination
        .node
        .as_deref()
        .ok_or_else(|| Refusal::NoNode(destination.name.clone()))?;
    let destination_identity = mesh.identity(destination);
    let destination_peer = Peer::of(destination, Some(&destination_identity), target);
    let hop = if destination_node == node {
        Hop::Local
    } else {
        let address = mesh
            .node(destination_node)
            .ok_or_else(|| Refusal::UnknownNode(destination_node.to_owned()))?
            .address;
        Hop::Tunnel {
            agent: SocketAddr::new(address, HBONE_PORT),
            destination: destination_identity,
        }
    };
    let mut connection = Connection::new(Reporter::Source, source_peer, destination_peer);
    connection.service = service;
    // Between nodes the bytes travel in an HBONE tunnel; on one node they stay local.
    connection.mutual_tls = matches!(hop, Hop::Tunnel { .. });
    Ok(Route {
        target,
        hop,
        connection,
        source_identity,
        idle_timeout: Duration::ZERO,
    })
}

/// Opens an HBONE tunnel to `target` through the agent at `agent`.
async fn tunnel(
    proxy: &Proxy,
    source: &Identity,
    destination: &Identity,
    agent: SocketAddr,
    target: SocketAddr,
    client: SocketAddr,
) -> Result<super::hbone::Tunnel, HboneError> {
    let certs = proxy.certs.get();
    let key = PoolKey {
        source: source.clone(),
        certificate: certs.serial(source).unwrap_or_default().to_owned(),
        destination: destination.clone(),
        agent,
    };
    let request = connect_request(&proxy.mesh.get(), source, target, client);
    let connect_timeout = proxy.settings.connect_timeout;
    let dial = || async move {
        let config = certs
            .client_config(source, destination)
            .map_err(std::io::Error::other)?;
        let tcp = connect_within(connect_timeout, TcpStream::connect(agent)).await?;
        tcp.set_nodelay(true)?;
        let name = tls::server_name(destination).map_err(std::io::Error::other)?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    proxy.pool.connect(&key, dial, request).await
}

/// The `weft_hbone_failures_total` reason of a failed tunnel: when the TLS handshake
/// with the peer agent failed on a certificate, which problem
/// ([`tls::handshake_failure_reason`]); otherwise the HBONE error's own reason (`dial`
/// for any other failure to connect, TLS included).
///
/// Two cases keep the generic reason. The peer's refusal of *our* certificate: in TLS
/// 1.3 the client's handshake completes before the server checks the client
/// certificate, so the alert arrives during the HTTP/2 handshake, whose error keeps
/// only its text (`handshake`). And callers that waited for another caller's dial to
/// the same peer: they get the reason the pool recorded (`dial`).
fn failure_reason(err: &HboneError) -> &'static str {
    match err {
        HboneError::Dial(io) => match tls::handshake_failure_reason(io) {
            "tls_handshake" => err.reason(),
            certificate => certificate,
        },
        _ => err.reason(),
    }
}

/// The CONNECT request, with the headers Istio's HBONE peers send: `Forwarded` (the
/// original client), `baggage` (the client workload) and `traceparent` (a new trace).
fn connect_request(
    mesh: &MeshConfig,
    source: &Identity,
    target: SocketAddr,
    client: SocketAddr,
) -> Request<()> {
    let workload = mesh.workload_by_ip(client.ip());
    let mut baggage = format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={},service.name={}",
        source.namespace,
        workload
            .and_then(|workload| workload.labels.get("app"))
            .map_or(source.service_account.as_str(), String::as_str)
    );
    if let Some(workload) = workload {
        baggage.push_str(&format!(",k8s.pod.name={}", workload.name));
    }
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("a socket address is a valid authority");
    let headers = request.headers_mut();
    let forwarded = match client.ip() {
        std::net::IpAddr::V4(ip) => format!("for={ip}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    for (name, value) in [
        ("forwarded", forwarded),
        ("baggage", baggage),
        ("traceparent", traceparent()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    request
}

/// A W3C `traceparent` for a new sampled trace. The ids only need to be unique, not
/// secret: they mix the clock, the process and a counter through the standard hasher,
/// whose keys are random per process.
fn traceparent() -> String {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(Default::default);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let id = |salt: u64| {
        let mut hasher = keys.build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.write_u64(salt);
        hasher.finish()
    };
    format!("00-{:016x}{:016x}-{:016x}-01", id(1), id(2), id(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
nodes: [{ name: a, address: 10.99.0.1 }, { name: b, address: 10.99.0.2 }]
namespaces: [{ name: shop }]
workloads:
  - { name: client, namespace: shop, serviceAccount: client, node: a, ip: 10.244.0.2 }
  - { name: web-a, namespace: shop, serviceAccount: web, node: a, ip: 10.244.0.3, labels: { app: web } }
  - { name: web-b, namespace: shop, serviceAccount: web, node: b, ip: 10.244.1.3 }
  - { name: outsider, namespace: other, node: b, ip: 10.244.1.9 }
  - { name: batch, namespace: shop, node: b, ip: 10.244.1.8, optedOut: true }
services:
  - { name: web, namespace: shop, vip: 10.96.0.10, ports: [{ port: 80, targetPort: 8080 }], endpoints: [10.244.0.3, 10.244.1.3] }
  - { name: empty, namespace: shop, vip: 10.96.0.11, ports: [{ port: 80 }] }
"#;

    fn mesh() -> MeshConfig {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("weft-plan-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, MESH).unwrap();
        let mesh = MeshConfig::load(&path).unwrap_or_else(|err| panic!("{err}"));
        std::fs::remove_file(&path).unwrap();
        mesh
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn services_pick_an_endpoint_and_map_the_port() {
        let mesh = mesh();
        let client = addr("10.244.0.2:40000");
        let pick_b = |_: &Service| Some("10.244.1.3".parse().unwrap());
        let route = plan(&mesh, "a", client, addr("10.96.0.10:80"), pick_b).unwrap();
        assert_eq!(route.target, addr("10.244.1.3:8080"));
        let Hop::Tunnel { agent, destination } = &route.hop else {
            panic!("another node: HBONE to its agent, not {:?}", route.hop);
        };
        assert_eq!(*agent, addr("10.99.0.2:15008"));
        assert!(route.connection.mutual_tls);
        assert_eq!(
            route.source_identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        assert_eq!(
            destination.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            route.connection.service,
            Some(("shop".into(), "web".into()))
        );

        let pick_a = |_: &Service| Some("10.244.0.3".parse().unwrap());
        let local = plan(&mesh, "a", client, addr("10.96.0.10:80"), pick_a).unwrap();
        assert_eq!(
            (local.target, &local.hop),
            (addr("10.244.0.3:8080"), &Hop::Local)
        );
        assert!(!local.connection.mutual_tls, "same node: no tunnel");
    }

    #[test]
    fn a_pod_address_is_that_pod() {
        let route = plan(
            &mesh(),
            "a",
            addr("10.244.0.2:40000"),
            addr("10.244.1.3:9000"),
            |_| None,
        )
        .unwrap();
        assert_eq!(route.target, addr("10.244.1.3:9000"));
        assert!(matches!(route.hop, Hop::Tunnel { agent, .. } if agent == addr("10.99.0.2:15008")));
        assert_eq!(route.connection.service, None);
    }

    #[test]
    fn service_endpoints_outside_the_mesh_are_reached_directly() {
        let mesh = mesh();
        let client = addr("10.244.0.2:40000");
        for outside in ["10.244.1.9", "10.244.1.8", "192.0.2.7"] {
            let pick = |_: &Service| Some(outside.parse().unwrap());
            let route = plan(&mesh, "a", client, addr("10.96.0.10:80"), pick).unwrap();
            assert_eq!(route.hop, Hop::Passthrough, "{outside}");
            assert_eq!(route.target.port(), 8080);
            assert!(!route.connection.mutual_tls);
        }
    }

    #[test]
    fn what_the_mesh_does_not_know_is_refused() {
        let mesh = mesh();
        let client = addr("10.244.0.2:40000");
        let reason = |peer, original| {
            plan(&mesh, "a", peer, original, |_| None)
                .err()
                .map(|refusal| refusal.reason())
        };
        assert_eq!(
            reason(addr("10.244.0.77:1"), addr("10.244.1.3:80")),
            Some("unknown_source")
        );
        assert_eq!(
            reason(client, addr("10.244.1.9:80")),
            Some("unknown_destination"),
            "an unmeshed pod"
        );
        assert_eq!(
            reason(client, addr("192.0.2.1:80")),
            Some("unknown_destination")
        );
        assert_eq!(reason(client, addr("10.96.0.11:80")), Some("no_endpoints"));
    }

    #[test]
    fn failed_dials_name_the_certificate_problem() {
        use std::io::{Error, ErrorKind};

        use rustls::{CertificateError, Error as RustlsError};

        let tls = |error: RustlsError| HboneError::Dial(Error::new(ErrorKind::InvalidData, error));
        assert_eq!(
            failure_reason(&tls(CertificateError::Expired.into())),
            "certificate_expired"
        );
        assert_eq!(
            failure_reason(&tls(CertificateError::UnknownIssuer.into())),
            "certificate_untrusted"
        );
        // Other TLS failures, and failures to connect at all, stay `dial`.
        assert_eq!(failure_reason(&tls(RustlsError::DecryptError)), "dial");
        let refused = HboneError::Dial(Error::from(ErrorKind::ConnectionRefused));
        assert_eq!(failure_reason(&refused), "dial");
        assert_eq!(failure_reason(&HboneError::Closed), "closed");
    }

    #[test]
    fn traceparents_are_well_formed_and_distinct() {
        let one = traceparent();
        let two = traceparent();
        assert_ne!(one, two);
        let parts: Vec<&str> = one.split('-').collect();
        assert_eq!(parts.len(), 4, "{one}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "01")
        );
    }
}
