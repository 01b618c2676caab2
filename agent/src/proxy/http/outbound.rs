//! The client's agent: each request of a captured HTTP connection is balanced on its
//! own over the service's endpoints and sent on a pooled upstream connection; one to a
//! pod of this node is first authorized here by that pod's policies.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ProxyBody, forward, headers, pool, start_span,
    telemetry::{Exchange, Record, Requests},
    traceparent,
};
use crate::{
    mesh::Protocol,
    proxy::{
        Proxy,
        authorize::{self, Caller, Direction},
        connect::connect,
        error::ProxyError,
        logical::{Hop, Logical},
        metrics::{Peer, Reporter},
        outbound::{choose, idle_timeout},
        trace::{Span, SpanKind},
    },
};

/// What every request of one captured connection shares.
struct Outbound {
    proxy: Arc<Proxy>,
    logical: Logical,
    requests: Requests,
    /// Requests to a pod of this node never reach a destination agent: this agent
    /// reports them for that side too, and authorizes them by the pod's policies.
    local: Requests,
    caller: Caller,
}

/// Serves the captured connection `client` as HTTP until it closes.
pub async fn serve<IO>(proxy: Arc<Proxy>, logical: Logical, client: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let what = format!("outbound HTTP connection from {}", logical.source.address);
    let idle = idle_timeout(&proxy, &logical);
    let requests = |reporter| {
        Requests::new(
            reporter,
            logical.source.peer.clone(),
            logical.service(),
            proxy.settings.access_log,
        )
    };
    let outbound = Arc::new(Outbound {
        requests: requests(Reporter::Source),
        local: requests(Reporter::Destination),
        caller: Caller::authenticated(&logical.source.identity, Some(logical.source.address.ip())),
        proxy: Arc::clone(&proxy),
        logical,
    });
    super::serve(client, &what, idle, move |request| {
        Arc::clone(&outbound).request(request)
    })
    .await;
}

impl Outbound {
    async fn request(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let mut exchange = Exchange::of(&request);
        let span = start_span(&self.proxy, SpanKind::Client, &mut request, &mut exchange);
        let (endpoint, pick) = match choose(&self.proxy, &self.logical) {
            Ok(chosen) => chosen,
            Err(error) => return self.failed(&exchange, span, None, error),
        };
        let local = endpoint.hop == Hop::Local;
        if local {
            let mesh = self.proxy.mesh.get();
            let decision = authorize::request(
                &mesh,
                Direction::Local,
                &self.caller,
                endpoint.address,
                &request,
            );
            drop(mesh);
            if let Err(denied) = decision {
                let error = ProxyError::Denied { by: denied.by };
                return self.failed(&exchange, span, Some((&endpoint.peer, false)), error);
            }
        }
        headers::forwarding_outbound(request.headers_mut());
        let version = match self.logical.protocol {
            Protocol::Http2 | Protocol::Grpc => pool::Version::Http2,
            _ if request.version() == http::Version::HTTP_2 => pool::Version::Http2,
            _ => pool::Version::Http1,
        };
        let mutual_tls = endpoint.hop.mutual_tls();
        let key = pool::Key {
            source: mutual_tls.then(|| self.logical.source.identity.clone()),
            endpoint: endpoint.address,
            version,
        };
        let carried = traceparent(&span);
        let dial = || {
            connect(
                &self.proxy,
                &endpoint,
                &self.logical.source,
                carried.clone(),
            )
        };
        let forwarded = match forward(
            &self.proxy,
            &self.proxy.http_pool,
            key.clone(),
            dial,
            request,
        )
        .await
        {
            Ok(forwarded) => forwarded,
            Err(error) => {
                return self.failed(&exchange, span, Some((&endpoint.peer, mutual_tls)), error);
            }
        };
        if let Some(pick) = &pick {
            pick.observe(exchange.started.elapsed());
        }
        let upstream = endpoint.address;
        let this = Arc::clone(&self);
        super::measured(
            forwarded,
            span,
            exchange,
            upstream,
            move |sender, exchange, answer| {
                drop(pick);
                if let Some(sender) = sender {
                    this.proxy.http_pool.check_in(key, sender);
                }
                let record = || Record {
                    exchange,
                    destination: Some(&endpoint.peer),
                    mutual_tls,
                    answer,
                    error: None,
                };
                this.requests.record(record());
                if local {
                    this.local.record(record());
                }
            },
        )
    }

    fn failed(
        &self,
        exchange: &Exchange,
        span: Span,
        destination: Option<(&Peer, bool)>,
        error: ProxyError,
    ) -> Response<ProxyBody> {
        let client = self.logical.source.address;
        super::failed(&self.requests, &client, exchange, span, destination, error)
    }
}
