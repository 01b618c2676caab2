//! `connect(Endpoint)`: one way to open a byte stream to a concrete endpoint, shared
//! by the TCP copy and the HTTP client — a marked socket to a pod of this node, an
//! HBONE tunnel (pooled, in mutual TLS as the source workload) to another node's
//! agent, or a plain connection to an address outside the mesh.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Method, Request, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{
    PoolKey, Proxy,
    baggage::{self, Baggage},
    connect_marked, connect_within,
    error::ProxyError,
    hbone::{HboneError, Tunnel},
    logical::{Endpoint, Hop, Source},
    metrics, trace,
};
use crate::{identity::Identity, mesh::MeshConfig, tls};

/// An open stream to an endpoint.
#[derive(Debug)]
pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(Box<Tunnel>),
}

/// Opens a stream to `endpoint` for `source`. A tunnel's CONNECT carries `traceparent`
/// (the trace of the request that needed it) or else a new trace.
pub async fn connect(
    proxy: &Proxy,
    endpoint: &Endpoint,
    source: &Source,
    traceparent: Option<String>,
) -> Result<Upstream, ProxyError> {
    let timeout = endpoint
        .connect_timeout
        .unwrap_or(proxy.settings.connect_timeout);
    let failed = |source| ProxyError::Connect {
        target: endpoint.address,
        source,
    };
    match &endpoint.hop {
        Hop::Local => connect_marked(endpoint.address, timeout)
            .await
            .map(Upstream::Tcp)
            .map_err(failed),
        Hop::Passthrough => {
            let tcp = connect_within(timeout, TcpStream::connect(endpoint.address))
                .await
                .map_err(failed)?;
            let _ = tcp.set_nodelay(true);
            Ok(Upstream::Tcp(tcp))
        }
        Hop::Tunnel { agent, destination } => {
            let request = connect_request(&proxy.mesh.get(), source, endpoint.address, traceparent);
            let opening = tunnel(proxy, &source.identity, destination, *agent, request);
            // A service's own connect timeout bounds the whole of it: the tunnel's
            // connection (pooled, so dialled with the agent's default) and the CONNECT.
            let opened = match endpoint.connect_timeout {
                Some(limit) => tokio::time::timeout(limit, opening)
                    .await
                    .map_err(|_| failed(io::ErrorKind::TimedOut.into()))?,
                None => opening.await,
            };
            opened
                .map(|tunnel| Upstream::Tunnel(Box::new(tunnel)))
                .map_err(|err| {
                    if let HboneError::Refused(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) =
                        err
                    {
                        // A denial, not a failure of the tunnel or of the upstream.
                        return ProxyError::DeniedByDestination {
                            agent: *agent,
                            target: endpoint.address,
                        };
                    }
                    let reason = failure_reason(&err);
                    metrics::hbone_failure("outbound", reason);
                    ProxyError::Hbone {
                        agent: *agent,
                        target: endpoint.address,
                        reason,
                        source: Box::new(err),
                    }
                })
        }
    }
}

/// Opens an HBONE tunnel through the agent at `agent`, on a pooled connection.
async fn tunnel(
    proxy: &Proxy,
    source: &Identity,
    destination: &Identity,
    agent: SocketAddr,
    request: Request<()>,
) -> Result<Tunnel, HboneError> {
    let certs = proxy.certs.get();
    let key = PoolKey {
        source: source.clone(),
        certificate: certs.serial(source).unwrap_or_default().to_owned(),
        destination: destination.clone(),
        agent,
    };
    let connect_timeout = proxy.settings.connect_timeout;
    let dial = || async move {
        let config = certs
            .client_config(source, destination)
            .map_err(io::Error::other)?;
        let tcp = connect_within(connect_timeout, TcpStream::connect(agent)).await?;
        tcp.set_nodelay(true)?;
        let name = tls::server_name(destination).map_err(io::Error::other)?;
        TlsConnector::from(config).connect(name, tcp).await
    };
    proxy.pool.here().connect(&key, dial, request).await
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
/// original client), `baggage` (the client workload, [`Baggage`]) and `traceparent`.
fn connect_request(
    mesh: &MeshConfig,
    source: &Source,
    target: SocketAddr,
    traceparent: Option<String>,
) -> Request<()> {
    let baggage = match mesh.workload_by_ip(source.address.ip()) {
        Some(workload) => {
            let zone = workload.node.as_deref().and_then(|node| mesh.zone(node));
            Baggage::of(workload, zone)
        }
        None => Baggage {
            cluster: Some(baggage::CLUSTER.to_owned()),
            namespace: Some(source.identity.namespace.clone()),
            ..Baggage::default()
        },
    }
    .render();
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("a socket address is a valid authority");
    let headers = request.headers_mut();
    let forwarded = match source.address.ip() {
        std::net::IpAddr::V4(ip) => format!("for={ip}"),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    for (name, value) in [
        ("forwarded", forwarded),
        ("baggage", baggage),
        (
            "traceparent",
            traceparent.unwrap_or_else(trace::new_traceparent),
        ),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    request
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Upstream::Tunnel(tunnel) => Pin::new(tunnel.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Upstream::Tunnel(tunnel) => Pin::new(tunnel.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Upstream::Tunnel(tunnel) => Pin::new(tunnel.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Upstream::Tunnel(tunnel) => Pin::new(tunnel.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
