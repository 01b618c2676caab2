//! Inbound: HBONE tunnels from other nodes' agents and Istio's peers (port 15008, on
//! the node's address or a pod's own, [`super::in_pod`]).
//!
//! The TLS handshake presents the certificate of the workload the client named by SNI
//! or, without SNI, of the pod whose address it dialed, and requires a client
//! certificate from the mesh's trust anchors; until it completes
//! the connection is pending in [`super::admission`], and it must complete within the
//! HBONE handshake timeout. Each CONNECT on the connection must name a meshed pod on
//! this node running as that same workload identity — anything else is refused, so the
//! agent is never an open relay — and is then carried to the pod on a marked
//! connection: copied as TCP, or served request by request when the pod's port speaks
//! HTTP (declared by its service, or detected from the first bytes).
//!
//! Authorization: the pod's policies decide the tunnel before it is accepted (a denial
//! is answered 401, as ztunnel answers), decide again once detection finds TCP, and
//! close a TCP tunnel when a new configuration denies it; HTTP requests are decided
//! one by one ([`http::serve_inbound`]).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ::http::StatusCode;
use bytes::Bytes;
use tokio::{net::TcpStream, time::Instant};
use tokio_rustls::TlsAcceptor;
use weft_api::{authz::Traffic, observe::verdict};

use super::{
    Proxy,
    abuse::{self, Inspected, Listener},
    admission::{Admission, Permit},
    authorize::{self, Caller, Direction},
    baggage::Baggage,
    connect_marked,
    detect::{Detected, Rewind, detect},
    error::ProxyError,
    hbone::{self, Incoming},
    http::{self, Inbound},
    metrics::{self, Connection, Outcome, Peer, Reporter},
    relay::relay,
};
use crate::{
    identity::Identity,
    logging::{Throttle, held_back},
    mesh::{MeshConfig, Protocol, Workload},
    observe, tls,
};

/// Accepts HBONE connections until the listener is dropped.
pub async fn serve(listener: tokio::net::TcpListener, proxy: Arc<Proxy>) {
    super::accept(
        listener,
        proxy,
        "inbound",
        Admission::admit_handshake,
        connection,
    )
    .await;
}

async fn connection(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr, mut permit: Permit) {
    static REFUSED: Throttle = Throttle::new();
    let refused = |reason: &'static str, why: String| {
        metrics::hbone_failure("inbound", reason);
        observe::report(verdict::ERROR, || {
            let source = observe::peer_at_address(peer);
            observe::refusal("inbound", reason, why.clone(), source, None)
        });
        if let Some(held) = REFUSED.allow() {
            log::info!(
                "HBONE connection from {peer} refused ({reason}): {why}{}",
                held_back(held)
            );
        }
    };
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let limit = proxy.settings.hbone.handshake_timeout;
    let dialed = tcp.local_addr().ok().and_then(|local| {
        let mesh = proxy.mesh.get();
        let pod = local_pod(&mesh, &proxy.node, local.ip())?;
        Some((local.ip(), mesh.identity(pod)))
    });
    let dialed_identity = dialed.as_ref().map(|(_, identity)| identity);
    let acceptor = TlsAcceptor::from(proxy.certs.get().server_config(dialed_identity));
    let tls = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => return refused(tls::handshake_failure_reason(&err), err.to_string()),
        Err(_) => {
            return refused(
                "tls_handshake_timeout",
                format!("no TLS handshake within {limit:?}"),
            );
        }
    };
    let (_, session) = tls.get_ref();
    let client = session
        .peer_certificates()
        .ok_or(tls::TlsError::NoPeerCertificate)
        .and_then(tls::peer_identity);
    let server = match session.server_name() {
        Some(sni) => proxy
            .certs
            .get()
            .identities()
            .into_iter()
            .map(|info| info.identity)
            .find(|identity| identity.sni() == sni),
        None => dialed_identity.cloned(),
    };
    let (client, server) = match (client, server) {
        (Ok(client), Some(server)) => (client, server),
        (Err(err), _) => return refused("peer_identity", format!("no usable identity: {err}")),
        (_, None) => {
            return refused(
                "server_identity",
                "it named no identity of this node, and dialed no pod's address".to_owned(),
            );
        }
    };
    metrics::handshake(started.elapsed());
    permit.authenticated();
    let dialed_pod = dialed.map(|(ip, _)| ip);
    let handler = {
        let proxy = Arc::clone(&proxy);
        move |incoming: Incoming| {
            let proxy = Arc::clone(&proxy);
            let client = client.clone();
            let server = server.clone();
            async move { tunnel(&proxy, incoming, peer, dialed_pod, &client, &server).await }
        }
    };
    let (tls, verdict) = Inspected::new(tls, Listener::Hbone, proxy.settings.client_stall);
    let premature = tls.premature_resets();
    let served = hbone::serve(
        tls,
        &proxy.settings.hbone,
        premature,
        proxy.draining().started(),
        handler,
    )
    .await;
    let err = served.err();
    match verdict.of(err.as_ref().map(|err| err as _)) {
        Some(abuse) => abuse::closed(
            Listener::Hbone,
            abuse,
            format_args!("the HBONE connection from {peer}"),
        ),
        None => {
            if let Some(err) = &err {
                log::info!("HBONE connection from {peer} ended: {err}");
            }
        }
    }
    if let Some(err) = err {
        metrics::hbone_failure("inbound", err.reason());
    }
}

/// A caller this mesh does not know (a peer of another mesh, such as Istio's), as
/// its `Forwarded` address and `baggage` describe it. Baggage that names a namespace
/// other than the certificate's describes no one.
fn described_source(forwarded: Option<IpAddr>, baggage: Baggage, client: &Identity) -> Peer {
    let honest = baggage
        .namespace
        .as_ref()
        .is_none_or(|namespace| *namespace == client.namespace);
    let mut peer = Peer {
        address: forwarded.map(|ip| SocketAddr::new(ip, 0)),
        principal: Some(client.to_string()),
        namespace: Some(client.namespace.clone()),
        ..Peer::default()
    };
    if honest {
        peer.workload = baggage.workload;
        peer.app = baggage.service;
        peer.version = baggage.version;
    }
    peer
}

/// The meshed pod of this node at `ip`.
fn local_pod<'a>(mesh: &'a MeshConfig, node: &str, ip: IpAddr) -> Option<&'a Workload> {
    mesh.workload_by_ip(ip)
        .filter(|workload| workload.node.as_deref() == Some(node) && mesh.is_meshed(workload))
}

/// Serves one CONNECT: checks the target, connects to the pod, carries the bytes. On a
/// connection dialed at a pod's own address (`dialed_pod`), the target must be that
/// pod, as Istio's HBONE servers require.
async fn tunnel(
    proxy: &Arc<Proxy>,
    incoming: Incoming,
    peer: SocketAddr,
    dialed_pod: Option<IpAddr>,
    client: &Identity,
    server: &Identity,
) {
    static REFUSED: Throttle = Throttle::new();
    let refuse = |incoming: Incoming, status, reason: &'static str, why: String| {
        metrics::refused("inbound", reason);
        let verdict = if status == StatusCode::UNAUTHORIZED {
            verdict::DENY
        } else {
            verdict::ERROR
        };
        observe::report(verdict, || {
            let mut source = observe::peer_at_address(peer);
            source.identity = client.to_string();
            let destination = observe::peer_at_address(&incoming.authority);
            observe::refusal("inbound", reason, why.clone(), source, Some(destination))
        });
        if let Some(held) = REFUSED.allow() {
            log::info!(
                "HBONE from {peer} ({client}) to {} refused: {why}{}",
                incoming.authority,
                held_back(held)
            );
        }
        incoming.refuse(status);
    };
    let _tracked = proxy.track();
    let _permit = match proxy.admission.admit_tunnel() {
        Ok(permit) => permit,
        Err(refused) => {
            return refuse(
                incoming,
                StatusCode::SERVICE_UNAVAILABLE,
                refused.reason(),
                refused.to_string(),
            );
        }
    };
    let target = incoming.authority;
    if let Some(dialed) = dialed_pod
        && dialed != target.ip()
    {
        let why = format!("the connection was dialed at pod {dialed}, not at the target");
        return refuse(incoming, StatusCode::BAD_REQUEST, "other_pod", why);
    }
    let mesh = proxy.mesh.get();
    let Some(workload) = local_pod(&mesh, &proxy.node, target.ip()) else {
        return refuse(
            incoming,
            StatusCode::UNAUTHORIZED,
            "not_local",
            "not a meshed pod on this node".to_owned(),
        );
    };
    if mesh.identity(workload) != *server {
        let why = format!(
            "the connection authenticated {server}, the pod runs as {}",
            mesh.identity(workload)
        );
        return refuse(incoming, StatusCode::UNAUTHORIZED, "identity_mismatch", why);
    }
    // The client's agent names the calling pod; believed only for a pod that runs as
    // the identity the client's certificate proves.
    let source = incoming.forwarded_for().and_then(|ip| {
        mesh.workload_by_ip(ip)
            .filter(|workload| mesh.identity(workload) == *client)
            .map(|workload| (workload, ip))
    });
    let caller = Caller::authenticated(client, source.map(|(_, ip)| ip));
    let source_peer = match source {
        Some((workload, ip)) => Peer::of(workload, Some(client), SocketAddr::new(ip, 0)),
        None => {
            let baggage = incoming.headers.get_all("baggage");
            let baggage = Baggage::parse(baggage.iter().filter_map(|value| value.to_str().ok()));
            described_source(incoming.forwarded_for(), baggage, client)
        }
    };
    let (service, protocol) = match mesh.service_of_endpoint(target) {
        Some((service, port)) => (
            Some((service.namespace.clone(), service.name.clone())),
            port.protocol(),
        ),
        None => (None, Protocol::Detect),
    };
    // HTTP conditions cannot decide before the protocol is known, or before a request.
    let traffic = match protocol {
        Protocol::Tcp => Traffic::Tcp,
        _ => Traffic::Unknown,
    };
    if let Err(denied) = authorize::connection(&mesh, Direction::Inbound, &caller, target, traffic)
    {
        let why = format!("denied by authorization policy ({})", denied.by);
        return refuse(
            incoming,
            StatusCode::UNAUTHORIZED,
            "authorization_denied",
            why,
        );
    }
    let mut connection = Connection::new(
        Reporter::Destination,
        source_peer,
        Peer::of(workload, Some(server), target),
    );
    connection.mutual_tls = true;
    let mut pod = match connect_marked(target, proxy.settings.connect_timeout).await {
        Ok(pod) => pod,
        Err(err) => {
            let why = format!("the pod is unreachable: {err}");
            return refuse(
                incoming,
                StatusCode::SERVICE_UNAVAILABLE,
                "pod_unreachable",
                why,
            );
        }
    };
    let tunnel = match incoming.accept() {
        Ok(tunnel) => tunnel,
        Err(err) => {
            log::info!("HBONE from {peer} to {target}: {err}");
            return;
        }
    };
    // The client's agent applies the service's idle timeout; this side only gives up
    // on a tunnel after the longest any client would keep.
    let idle = mesh
        .longest_idle_timeout()
        .map_or(proxy.settings.idle_timeout, |longest| {
            longest.max(proxy.settings.idle_timeout)
        });
    drop(mesh);
    // Declared HTTP may be either version: the HTTP server tells them apart.
    let (detected, mut tunnel) = match protocol {
        Protocol::Tcp => (Detected::Tcp, Rewind::new(Bytes::new(), tunnel)),
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
            (Detected::Http1, Rewind::new(Bytes::new(), tunnel))
        }
        Protocol::Detect => detect(tunnel, proxy.settings.detect_timeout).await,
    };
    if detected != Detected::Tcp {
        let inbound = Inbound {
            target,
            client: client.clone(),
            server: server.clone(),
            caller,
            source: connection.source,
            destination: connection.destination,
            service,
        };
        return http::serve_inbound(Arc::clone(proxy), inbound, tunnel, pod, idle).await;
    }
    connection.service = service;
    let open = connection.opened(&proxy.settings.access_log);
    let outcome = if protocol == Protocol::Detect
        && let Err(denied) = authorize::connection(
            &proxy.mesh.get(),
            Direction::Inbound,
            &caller,
            target,
            Traffic::Tcp,
        ) {
        // Detected as TCP, where a DENY rule's HTTP conditions count as met.
        Outcome::failed(ProxyError::Denied { by: denied.by })
    } else {
        metrics::relayed("copy");
        tokio::select! {
            relayed = relay(&mut tunnel, &mut pod, Some(idle), |received, sent| {
                open.progress(received, sent);
            }) => relayed.into(),
            by = authorize::revoked(proxy, Direction::Inbound, &caller, target) => {
                Outcome::failed(ProxyError::Revoked { by })
            }
        }
    };
    open.closed(&outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_callers_are_described_by_their_baggage_within_their_namespace() {
        let client: Identity = "spiffe://cluster.local/ns/shop/sa/ambient".parse().unwrap();
        let forwarded = Some(IpAddr::from([10, 250, 0, 9]));
        let baggage = |namespace: &str| {
            Baggage::parse([format!(
                "k8s.namespace.name={namespace},k8s.deployment.name=cart,service.name=cart,service.version=v2"
            )
            .as_str()])
        };
        let honest = described_source(forwarded, baggage("shop"), &client);
        assert_eq!(
            (
                honest.address,
                honest.workload.as_deref(),
                honest.namespace.as_deref(),
                honest.app.as_deref(),
                honest.version.as_deref(),
            ),
            (
                Some(SocketAddr::from(([10, 250, 0, 9], 0))),
                Some("cart"),
                Some("shop"),
                Some("cart"),
                Some("v2")
            )
        );
        assert_eq!(
            honest.principal.as_deref(),
            Some(client.to_string().as_str())
        );
        // Another namespace than the certificate's: the baggage names no one.
        let lying = described_source(forwarded, baggage("billing"), &client);
        assert_eq!(
            (lying.workload, lying.app, lying.namespace.as_deref()),
            (None, None, Some("shop"))
        );
        // No baggage, no address: the certificate alone.
        let bare = described_source(None, Baggage::default(), &client);
        assert_eq!((bare.address, bare.workload), (None, None));
    }
}
