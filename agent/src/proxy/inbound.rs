//! Inbound: HBONE tunnels from other nodes' agents (port 15008).
//!
//! The TLS handshake presents the certificate of the workload the client named by SNI
//! and requires a client certificate from the mesh's trust anchors. Each CONNECT on the
//! connection must name a meshed pod on this node running as that same workload
//! identity — anything else is refused, so the agent is never an open relay — and is
//! then carried to the pod on a marked connection.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use tokio::{
    io::copy_bidirectional_with_sizes,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use super::{
    COPY_BUFFER, Proxy, connect_marked,
    hbone::{self, Incoming},
    metrics::{self, Connection, Outcome, Peer, Reporter},
};
use crate::{identity::Identity, tls};

/// How long a peer may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts HBONE connections until the listener is dropped.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let proxy = Arc::clone(&proxy);
                tokio::spawn(async move { connection(proxy, tcp, peer).await });
            }
            Err(err) => {
                log::warn!("inbound accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(proxy: Arc<Proxy>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let acceptor = TlsAcceptor::from(proxy.certs.get().server_config());
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let reason = tls::handshake_failure_reason(&err);
            log::info!("TLS handshake with {peer} failed ({reason}): {err}");
            metrics::hbone_failure("inbound", reason);
            return;
        }
        Err(_) => {
            log::info!("TLS handshake with {peer} timed out after {TLS_HANDSHAKE_TIMEOUT:?}");
            metrics::hbone_failure("inbound", "tls_handshake_timeout");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let client = session
        .peer_certificates()
        .ok_or(tls::TlsError::NoPeerCertificate)
        .and_then(tls::peer_identity);
    let server = session.server_name().and_then(|sni| {
        proxy
            .certs
            .get()
            .identities()
            .into_iter()
            .map(|info| info.identity)
            .find(|identity| identity.sni() == sni)
    });
    let (client, server) = match (client, server) {
        (Ok(client), Some(server)) => (client, server),
        (Err(err), _) => {
            log::info!("HBONE peer {peer} has no usable identity: {err}");
            metrics::hbone_failure("inbound", "peer_identity");
            return;
        }
        (_, None) => {
            metrics::hbone_failure("inbound", "server_identity");
            return;
        }
    };
    let handler = {
        let proxy = Arc::clone(&proxy);
        move |incoming: Incoming| {
            let proxy = Arc::clone(&proxy);
            let client = client.clone();
            let server = server.clone();
            async move { tunnel(&proxy, incoming, peer, &client, &server).await }
        }
    };
    if let Err(err) = hbone::serve(tls, &proxy.settings, handler).await {
        log::info!("HBONE connection from {peer} ended: {err}");
        metrics::hbone_failure("inbound", err.reason());
    }
}

/// Serves one CONNECT: checks the target, connects to the pod, carries the bytes.
async fn tunnel(
    proxy: &Arc<Proxy>,
    incoming: Incoming,
    peer: SocketAddr,
    client: &Identity,
    server: &Identity,
) {
    let _tracked = proxy.track();
    let target = incoming.authority;
    let mesh = proxy.mesh.get();
    let workload = mesh.workload_by_ip(target.ip()).filter(|workload| {
        workload.node.as_deref() == Some(proxy.node.as_str()) && mesh.is_meshed(workload)
    });
    let Some(workload) = workload else {
        log::info!(
            "HBONE from {peer} ({client}) to {target} refused: not a meshed pod on this node"
        );
        metrics::refused("inbound", "not_local");
        incoming.refuse(StatusCode::UNAUTHORIZED);
        return;
    };
    if mesh.identity(workload) != *server {
        log::info!(
            "HBONE from {peer} ({client}) to {target} refused: the connection authenticated {server}, the pod runs as {}",
            mesh.identity(workload)
        );
        metrics::refused("inbound", "identity_mismatch");
        incoming.refuse(StatusCode::UNAUTHORIZED);
        return;
    }
    let source = forwarded_for(&incoming)
        .and_then(|ip| mesh.workload_by_ip(ip).map(|workload| (workload, ip)));
    let source_peer = match source {
        Some((workload, ip)) => Peer::of(workload, Some(client), SocketAddr::new(ip, 0)),
        None => Peer {
            principal: Some(client.to_string()),
            ..Peer::default()
        },
    };
    let mut connection = Connection::new(
        Reporter::Destination,
        source_peer,
        Peer::of(workload, Some(server), target),
    );
    connection.mutual_tls = true;
    let mut pod = match connect_marked(target).await {
        Ok(pod) => pod,
        Err(err) => {
            log::info!("HBONE from {peer} to {target}: the pod is unreachable: {err}");
            metrics::refused("inbound", "pod_unreachable");
            incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let mut tunnel = match incoming.accept() {
        Ok(tunnel) => tunnel,
        Err(err) => {
            log::info!("HBONE from {peer} to {target}: {err}");
            return;
        }
    };
    connection.opened();
    let result =
        copy_bidirectional_with_sizes(&mut tunnel, &mut pod, COPY_BUFFER, COPY_BUFFER).await;
    let error = result.as_ref().err().map(ToString::to_string);
    let (received, sent) = result.unwrap_or_default();
    connection.closed(Outcome {
        received,
        sent,
        error: error.as_deref(),
    });
}

/// The original client address from the `Forwarded: for=` header, if well formed.
fn forwarded_for(incoming: &Incoming) -> Option<std::net::IpAddr> {
    let value = incoming.headers.get("forwarded")?.to_str().ok()?;
    value
        .split(';')
        .flat_map(|part| part.split(','))
        .find_map(|part| {
            let address = part.trim().strip_prefix("for=")?.trim_matches('"');
            let address = address.trim_start_matches('[').trim_end_matches(']');
            address.parse().ok()
        })
}
