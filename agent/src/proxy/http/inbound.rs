//! The destination agent: the HTTP requests inside one HBONE tunnel are served, each
//! authorized by the pod's policies (a denied one is answered 403, a gRPC call
//! `PERMISSION_DENIED`), said to come from the tunnel's authenticated client
//! (`x-forwarded-client-cert`), passed to the pod on a connection of the tunnel's own,
//! and measured as the destination reporter.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    Pool, ProxyBody, forward, headers, pool, start_span,
    telemetry::{Exchange, Record, Requests},
};
use crate::{
    identity::Identity,
    proxy::{
        Proxy,
        abuse::Listener,
        authorize::{self, Caller, Direction},
        connect::Upstream,
        connect_marked,
        error::ProxyError,
        metrics::{Peer, Reporter},
        trace::{Span, SpanKind},
    },
    sync,
};

/// Who is at both ends of a tunnel.
pub struct Inbound {
    /// The pod's address.
    pub target: SocketAddr,
    pub client: Identity,
    pub server: Identity,
    /// The client as authorization policies see it.
    pub caller: Caller,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<(String, String)>,
}

struct Tunnel {
    proxy: Arc<Proxy>,
    inbound: Inbound,
    requests: Requests,
    /// The tunnel's connections to the pod: one for HTTP/1.1, whose requests come one
    /// at a time, and one HTTP/2 connection for all.
    pool: Pool,
    /// The connection made before the tunnel was accepted, used first.
    first: Mutex<Option<TcpStream>>,
}

/// Serves the tunnel's stream as HTTP until it closes, or carries no new request for
/// `idle`; `pod` is a connection to the pod already made.
pub async fn serve<IO>(
    proxy: Arc<Proxy>,
    inbound: Inbound,
    stream: IO,
    pod: TcpStream,
    idle: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let what = format!("inbound HTTP in a tunnel from {}", inbound.client);
    let requests = Requests::new(
        Reporter::Destination,
        inbound.source.clone(),
        inbound.service.clone(),
        proxy.settings.access_log,
    );
    let draining = proxy.draining();
    let client_stall = proxy.settings.client_stall;
    let tunnel = Arc::new(Tunnel {
        proxy,
        requests,
        pool: Pool::default(),
        first: Mutex::new(Some(pod)),
        inbound,
    });
    super::serve(
        stream,
        Listener::Inbound,
        &what,
        idle,
        client_stall,
        draining,
        move |request| Arc::clone(&tunnel).request(request),
    )
    .await;
}

impl Tunnel {
    async fn request(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let mut exchange = Exchange::of(&request);
        let span = start_span(&self.proxy, SpanKind::Server, &mut request, &mut exchange);
        let inbound = &self.inbound;
        let mesh = self.proxy.mesh.get();
        let decision = authorize::request(
            &mesh,
            Direction::Inbound,
            &inbound.caller,
            inbound.target,
            &request,
        );
        drop(mesh);
        if let Err(denied) = decision {
            let error = ProxyError::Denied { by: denied.by };
            return self.failed(&exchange, span, error);
        }
        headers::forwarding_inbound(request.headers_mut(), &inbound.client, &inbound.server);
        let version = if request.version() == http::Version::HTTP_2 {
            pool::Version::Http2
        } else {
            pool::Version::Http1
        };
        let key = pool::Key {
            source: None,
            endpoint: inbound.target,
            version,
            max_requests: None,
            idle: None,
        };
        let dial = || async {
            let first = sync::lock(&self.first).take();
            match first {
                Some(pod) => Ok(Upstream::Tcp(pod)),
                None => connect_marked(inbound.target, self.proxy.settings.connect_timeout)
                    .await
                    .map(Upstream::Tcp)
                    .map_err(|source| ProxyError::Connect {
                        target: inbound.target,
                        source,
                    }),
            }
        };
        let forwarded = match forward(
            &self.proxy,
            Listener::Inbound,
            &self.pool,
            key.clone(),
            dial,
            request,
        )
        .await
        {
            Ok(forwarded) => forwarded,
            Err(error) => return self.failed(&exchange, span, error),
        };
        let this = Arc::clone(&self);
        let upstream = inbound.target;
        super::measured(
            forwarded,
            span,
            exchange,
            upstream,
            None,
            move |sender, exchange, answer| {
                if let Some(sender) = sender {
                    this.pool.check_in(key, sender);
                }
                this.requests.record(Record {
                    exchange,
                    destination: Some(&this.inbound.destination),
                    mutual_tls: true,
                    answer,
                    error: None,
                });
            },
        )
    }

    fn failed(&self, exchange: &Exchange, span: Span, error: ProxyError) -> Response<ProxyBody> {
        let destination = Some((&self.inbound.destination, true));
        let client = &self.inbound.client;
        super::failed(&self.requests, client, exchange, span, destination, error)
    }
}
