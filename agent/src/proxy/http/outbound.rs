//! The client's agent: each request of a captured HTTP connection is balanced on its
//! own over the service's endpoints and sent on a pooled upstream connection.

use std::sync::{Arc, atomic::Ordering};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ProxyBody,
    body::{Measured, Seen},
    end_span, failure, forward, headers, pool, start_span,
    telemetry::{Exchange, Record, Requests},
    traceparent,
};
use crate::{
    logging::{Throttle, held_back},
    mesh::Protocol,
    proxy::{
        Proxy,
        connect::connect,
        error::ProxyError,
        logical::{Hop, Logical},
        metrics::{Peer, Reporter},
        outbound::choose,
        trace::{Span, SpanKind},
    },
};

/// What every request of one captured connection shares.
struct Outbound {
    proxy: Arc<Proxy>,
    logical: Logical,
    requests: Requests,
    /// Requests to a pod of this node never reach a destination agent: this agent
    /// reports them for that side too.
    local: Requests,
}

/// Serves the captured connection `client` as HTTP until it closes.
pub async fn serve<IO>(proxy: Arc<Proxy>, logical: Logical, client: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    static FAILED: Throttle = Throttle::new();
    let peer = logical.source.address;
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
        proxy: Arc::clone(&proxy),
        logical,
    });
    let served = super::serve(client, move |request| {
        Arc::clone(&outbound).request(request)
    })
    .await;
    if let Err(err) = served
        && let Some(held) = FAILED.allow()
    {
        log::info!(
            "outbound HTTP connection from {peer} ended: {err}{}",
            held_back(held)
        );
    }
}

impl Outbound {
    async fn request(self: Arc<Self>, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let mut exchange = Exchange::of(&request);
        let span = start_span(&self.proxy, SpanKind::Client, &mut request, &mut exchange);
        let (endpoint, pick) = match choose(&self.proxy, &self.logical) {
            Ok(chosen) => chosen,
            Err(error) => return self.failed(&exchange, span, None, error),
        };
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
        let status = forwarded.response.status().as_u16();
        let header_grpc_status = headers::grpc_status(forwarded.response.headers());
        let local = endpoint.hop == Hop::Local;
        let this = Arc::clone(&self);
        let done = move |seen: Seen| {
            drop(pick);
            if seen.complete
                && let Some(sender) = forwarded.sender
            {
                this.proxy.http_pool.check_in(key, sender);
            }
            let grpc_status = seen.grpc_status.or(header_grpc_status);
            end_span(span, status, grpc_status, Some(endpoint.address));
            let record = || Record {
                exchange: &exchange,
                destination: Some(&endpoint.peer),
                mutual_tls,
                status,
                grpc_status,
                flags: if seen.complete { "-" } else { "DC" },
                error: None,
                request_bytes: forwarded.request_bytes.load(Ordering::Relaxed),
                response_bytes: seen.bytes,
            };
            this.requests.record(record());
            if local {
                this.local.record(record());
            }
        };
        forwarded
            .response
            .map(|body| Measured::new(body, done).boxed_unsync())
    }

    fn failed(
        &self,
        exchange: &Exchange,
        span: Span,
        destination: Option<(&Peer, bool)>,
        error: ProxyError,
    ) -> Response<ProxyBody> {
        static FAILED: Throttle = Throttle::new();
        if let Some(held) = FAILED.allow() {
            log::warn!(
                "outbound {} {} from {}: {error}{}",
                exchange.method,
                exchange.path,
                self.logical.source.address,
                held_back(held)
            );
        }
        let response = failure(&error, exchange.protocol == "grpc");
        end_span(
            span,
            response.status().as_u16(),
            headers::grpc_status(response.headers()),
            None,
        );
        self.requests.record(Record {
            exchange,
            destination: destination.map(|(peer, _)| peer),
            mutual_tls: destination.is_some_and(|(_, mutual_tls)| mutual_tls),
            status: response.status().as_u16(),
            grpc_status: headers::grpc_status(response.headers()),
            flags: error.response_flags(),
            error: Some(error.to_string()),
            request_bytes: 0,
            response_bytes: 0,
        });
        response
    }
}
