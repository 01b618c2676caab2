//! The client's agent: each request of a captured HTTP connection is routed on its own
//! (when routes are attached to its service), balanced over the chosen service's
//! endpoints and sent on a pooled upstream connection; one to a pod of this node is
//! first authorized here by that pod's policies.

use std::{future::Future, sync::Arc, time::Duration};

use futures::future::Either;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_api::routes::{HeaderModifier, Timeouts};

use super::{
    Forwarded, ProxyBody, forward, headers, mirror, pool,
    route::{self, Routed, RuleName, Target},
    start_span,
    telemetry::{Exchange, Record, Requests},
    traceparent,
};
use crate::{
    mesh::Protocol,
    proxy::{
        Proxy,
        authorize::{self, Caller, Direction},
        connect::{Upstream, connect},
        error::ProxyError,
        logical::{Destination, Hop, Logical},
        metrics::{Peer, Reporter},
        outbound::{choose, choose_backend, idle_timeout},
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
        let routed = match self.route(&mut request) {
            Ok(routed) => routed,
            Err(error) => {
                if let ProxyError::NoBackend { route, rule } = &error {
                    exchange.route = Some(RuleName {
                        route: route.clone(),
                        rule: rule.clone(),
                    });
                }
                return self.failed(&exchange, span, None, error);
            }
        };
        exchange.route = routed.as_ref().map(|routed| routed.name.clone());
        let chosen = match routed.as_ref().map(|routed| &routed.target) {
            None => choose(&self.proxy, &self.logical),
            Some(Target::Backend(backend)) => choose_backend(&self.proxy, backend),
            Some(Target::Redirect { status, location }) => {
                let response_headers = routed.as_ref().map(|r| r.response_headers.as_slice());
                return self.redirect(&exchange, span, *status, location, response_headers);
            }
        };
        let (endpoint, pick) = match chosen {
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
        let outcome = self
            .send(key.clone(), dial, request, routed.as_ref(), &exchange)
            .await;
        let mut forwarded = match outcome {
            Ok(forwarded) => forwarded,
            Err(error) => {
                if let Some(pick) = &pick {
                    pick.failed();
                }
                return self.failed(&exchange, span, Some((&endpoint.peer, mutual_tls)), error);
            }
        };
        for modifier in routed.iter().flat_map(|routed| &routed.response_headers) {
            route::modify(forwarded.response.headers_mut(), modifier);
        }
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
                // A server error counts against the endpoint (outlier detection).
                if let Some(pick) = pick {
                    if answer.status >= 500 {
                        pick.failed();
                    } else {
                        pick.succeeded();
                    }
                }
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

    /// The routes of the service the client addressed decide `request`: `None` when it
    /// has none that apply to this client.
    fn route(&self, request: &mut Request<Incoming>) -> Result<Option<Routed>, ProxyError> {
        let Destination::Service(target) = &self.logical.destination else {
            return Ok(None);
        };
        let mesh = self.proxy.mesh.get();
        let namespace = self
            .logical
            .source
            .peer
            .namespace
            .as_deref()
            .unwrap_or_default();
        let Some(routes) = mesh
            .routes_of(&target.key)
            .filter(|routes| routes.applies_to(namespace))
        else {
            return Ok(None);
        };
        route::route(routes, namespace, request, |total| fastrand::u64(..total)).map(Some)
    }

    /// Forwards `request` (and a copy to each of its route's mirrors) within its
    /// deadline ([`deadline`]), passing the client's gRPC deadline on as what is left.
    async fn send<F, Fut>(
        &self,
        key: pool::Key,
        dial: F,
        mut request: Request<Incoming>,
        routed: Option<&Routed>,
        exchange: &Exchange,
    ) -> Result<Forwarded, ProxyError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Upstream, ProxyError>>,
    {
        let timeouts = self.timeouts(routed);
        let grpc = headers::grpc_timeout(request.headers());
        let deadline = deadline(&timeouts, grpc, exchange.started.elapsed());
        if let Some(grpc) = grpc {
            let left = grpc.saturating_sub(exchange.started.elapsed());
            headers::set_grpc_timeout(request.headers_mut(), left);
        }
        let pool = &self.proxy.http_pool;
        let forwarding = match routed.filter(|routed| !routed.mirrors.is_empty()) {
            None => Either::Left(forward(&self.proxy, pool, key, dial, request)),
            Some(routed) => {
                let context = mirror::Mirrors {
                    proxy: &self.proxy,
                    source: &self.logical.source,
                    caller: &self.caller,
                    name: &routed.name,
                };
                let request = mirror::start(context, &routed.mirrors, request);
                Either::Right(forward(&self.proxy, pool, key, dial, request))
            }
        };
        match deadline {
            None => forwarding.await,
            Some((which, timeout, left)) => tokio::time::timeout(left, forwarding)
                .await
                .unwrap_or(Err(ProxyError::RequestTimeout { which, timeout })),
        }
    }

    /// The timeouts of a request: its route's, with the service's TrafficPolicy
    /// `timeouts.request` where the route sets no request timeout.
    fn timeouts(&self, routed: Option<&Routed>) -> Timeouts {
        let routed = routed.map(|routed| routed.timeouts).unwrap_or_default();
        let service = match &self.logical.destination {
            Destination::Service(target) => self
                .proxy
                .mesh
                .get()
                .service_at(target.vip, target.port)
                .and_then(|(service, _)| service.request_timeout),
            Destination::Pod(_) => None,
        };
        Timeouts {
            request: routed.request.or(service),
            ..routed
        }
    }

    /// Answers a request a rule redirects, and measures it.
    fn redirect(
        &self,
        exchange: &Exchange,
        span: Span,
        status: u16,
        location: &str,
        response_headers: Option<&[HeaderModifier]>,
    ) -> Response<ProxyBody> {
        let mut response = Response::new(super::empty());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
        if let Ok(location) = HeaderValue::from_str(location) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        for modifier in response_headers.into_iter().flatten() {
            route::modify(response.headers_mut(), modifier);
        }
        super::answered(&self.requests, exchange, span, status);
        response
    }
}

/// How long the forwarded request may take before it is answered 504, with which
/// limit that is and its length: the nearest of the request timeout (the route's
/// `timeouts.request`, else the service's TrafficPolicy `timeouts.request`), counted
/// from the request's start `elapsed` ago; the route's `timeouts.backendRequest`; and
/// the client's own gRPC deadline `grpc`.
fn deadline(
    timeouts: &Timeouts,
    grpc: Option<Duration>,
    elapsed: Duration,
) -> Option<(&'static str, Duration, Duration)> {
    let from_start = |which, timeout: Duration| (which, timeout, timeout.saturating_sub(elapsed));
    [
        timeouts
            .request
            .map(|timeout| from_start("request", timeout)),
        timeouts
            .backend_request
            .map(|timeout| ("backendRequest", timeout, timeout)),
        grpc.map(|timeout| from_start("grpc-timeout", timeout)),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(_, _, left)| *left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_limit_decides_counted_from_where_each_starts() {
        let ms = Duration::from_millis;
        let timeouts = |request: Option<u64>, backend: Option<u64>| Timeouts {
            request: request.map(ms),
            backend_request: backend.map(ms),
        };
        let cases = [
            (timeouts(None, None), None, 0, None),
            (
                timeouts(Some(1000), None),
                None,
                300,
                Some(("request", 1000, 700)),
            ),
            (
                timeouts(Some(1000), Some(500)),
                None,
                0,
                Some(("backendRequest", 500, 500)),
            ),
            (
                timeouts(Some(1000), Some(800)),
                None,
                300,
                Some(("request", 1000, 700)),
            ),
            (
                timeouts(Some(1000), None),
                Some(400),
                100,
                Some(("grpc-timeout", 400, 300)),
            ),
            (
                timeouts(None, None),
                Some(400),
                500,
                Some(("grpc-timeout", 400, 0)),
            ),
        ];
        for (timeouts, grpc, elapsed, expected) in cases {
            let found =
                deadline(&timeouts, grpc.map(ms), ms(elapsed)).map(|(which, timeout, left)| {
                    (which, timeout.as_millis() as u64, left.as_millis() as u64)
                });
            assert_eq!(found, expected, "{timeouts:?} {grpc:?} {elapsed}");
        }
    }
}
