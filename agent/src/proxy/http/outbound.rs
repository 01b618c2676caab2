//! The client's agent: each request of a captured HTTP connection is routed on its own
//! (when routes are attached to its service), balanced over the chosen service's
//! endpoints and sent on a pooled upstream connection; one to a pod of this node is
//! first authorized here by that pod's policies. A try that fails as the service's
//! retry policy says is tried again on another endpoint ([`Outbound::tries`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use weft_api::{
    retry::RetryOn,
    routes::{BackendRef, Fault, HeaderModifier, Timeouts},
};

use super::{
    Forwarded, ProxyBody, forward, headers, mirror, pool,
    replay::Replay,
    route::{self, Routed, RuleName, Target},
    start_span,
    stream_idle::{Activity, Touching},
    telemetry::{Exchange, Record, Requests},
    traceparent,
};
use crate::{
    mesh::Protocol,
    proxy::{
        Proxy,
        abuse::Listener,
        authorize::{self, Caller, Direction},
        balance::{self, Pick},
        breaker::{Admitted, Breaker},
        connect::connect,
        error::{ProxyError, grpc_status_for},
        logical::{Destination, Endpoint, Hop, Logical},
        metrics::{Peer, Reporter},
        outbound::{breaker, choose, choose_backend, idle_timeout, retrying},
        retry::{self, Failure, PER_TRY_TIMEOUT, Retrying, endpoint_failure},
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
    super::serve(
        client,
        Listener::Outbound,
        &what,
        idle,
        proxy.settings.client_stall,
        proxy.draining(),
        move |request| Arc::clone(&outbound).request(request),
    )
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
        let backend = match routed.as_ref().map(|routed| &routed.target) {
            None => None,
            Some(Target::Backend(backend)) => Some(backend),
            Some(Target::Redirect { status, location }) => {
                let response_headers = routed.as_ref().map(|r| r.response_headers.as_slice());
                return self.redirect(&exchange, span, *status, location, response_headers);
            }
        };
        headers::forwarding_outbound(request.headers_mut());
        let settings = self.settings(routed.as_ref());
        let grpc = headers::grpc_timeout(request.headers());
        let limits = Limits {
            deadline: deadline(&settings.timeouts, grpc, exchange.started.elapsed())
                .map(|(which, timeout, left)| (which, timeout, Instant::now() + left)),
            per_try: per_try_timeout(&settings.timeouts, settings.retrying.as_ref()),
            grpc: grpc.map(|timeout| exchange.started + timeout),
            max_requests_per_connection: settings.max_requests_per_connection,
            pooled_idle: settings.pooled_idle,
        };
        if let Some(routed) = &routed
            && let Some(fault) = &routed.fault
            && let Err(error) = inject(fault, &routed.name, &limits, &mut exchange).await
        {
            return self.failed(&exchange, span, None, error);
        }
        // Held until the response ends.
        let admitted = match &settings.breaker {
            None => None,
            Some(breaker) => {
                let http1 = self.upstream_version(&request) == pool::Version::Http1;
                match Self::admit(breaker, http1, &limits).await {
                    Ok(admitted) => Some(admitted),
                    Err(error) => return self.failed(&exchange, span, None, error),
                }
            }
        };
        let stream_idle = Activity::new(settings.stream_idle);
        let request = self.mirrored(request, routed.as_ref(), stream_idle.clone());
        let carried = traceparent(&span);
        let retrying = settings.retrying;
        let tries = self.tries(request, backend, retrying, limits, carried, &mut exchange);
        let tried = tokio::select! {
            tried = tries => tried,
            () = stream_idle.idle() => Err(ProxyError::StreamIdle {
                timeout: stream_idle.timeout(),
            }),
        };
        let (tried, outcome) = match tried {
            Ok(last) => last,
            Err(error) => return self.failed(&exchange, span, None, error),
        };
        let Tried {
            endpoint,
            pick,
            key,
        } = tried;
        let mutual_tls = endpoint.hop.mutual_tls();
        let mut forwarded = match outcome {
            Ok(forwarded) => forwarded,
            Err(error) => {
                if let Some(pick) = &pick
                    && let Some(failure) = endpoint_failure(&error)
                {
                    pick.failed(failure);
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
        let local = endpoint.hop == Hop::Local;
        let this = Arc::clone(&self);
        super::measured(
            forwarded,
            span,
            exchange,
            upstream,
            Some(stream_idle),
            move |sender, exchange, answer| {
                drop(admitted);
                // A server error counts against the endpoint (outlier detection).
                if let Some(pick) = pick {
                    match balance::Failure::of_status(answer.status) {
                        Some(failure) => drop(pick.failed(failure)),
                        None => pick.succeeded(),
                    }
                }
                if let Some(sender) = sender {
                    this.proxy.http_pool.here().check_in(key, sender);
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

    /// Sends `request` until a try is not retriable, or retries run out (the policy's
    /// attempts, its budget, or a body too large to keep): each retry to another
    /// endpoint when there is one, after a backoff, all within `limits`. Returns the
    /// last try's endpoint and outcome, or why no try could be made (no endpoint, or
    /// the deadline passed during a backoff); a try retried is counted against its
    /// endpoint and dropped. Marks the exchange when retries ran out on a failure they
    /// were meant for (`URX`).
    async fn tries(
        &self,
        request: Request<ProxyBody>,
        backend: Option<&BackendRef>,
        retrying: Option<Retrying>,
        limits: Limits,
        carried: Option<String>,
        exchange: &mut Exchange,
    ) -> Result<(Tried, Result<Forwarded, ProxyError>), ProxyError> {
        let upgrade = headers::wants_upgrade(&request);
        let pick_endpoint = |avoid: &[SocketAddr]| match backend {
            None => choose(&self.proxy, &self.logical, avoid),
            Some(backend) => choose_backend(&self.proxy, backend, avoid),
        };
        let pass_on_grpc_deadline = |head: &mut http::request::Parts| {
            if let Some(deadline) = limits.grpc {
                let left = deadline.saturating_duration_since(Instant::now());
                headers::set_grpc_timeout(&mut head.headers, left);
            }
        };
        let Some(retrying) = retrying.filter(|retrying| retrying.policy.attempts > 0 && !upgrade)
        else {
            // One try: the request goes as it is.
            let (endpoint, pick) = pick_endpoint(&[])?;
            let (mut head, body) = request.into_parts();
            pass_on_grpc_deadline(&mut head);
            let request = Request::from_parts(head, body);
            let (key, outcome) = self.try_once(&endpoint, request, &limits, &carried).await;
            let tried = Tried {
                endpoint,
                pick,
                key,
            };
            return Ok((tried, outcome));
        };
        let (head, body) = request.into_parts();
        // Each retry starts from a copy of the request as it arrived.
        let template = copy_head(&head);
        // A policy that retries only failed connections needs nothing kept: such a try
        // read nothing of the body.
        let policy = &retrying.policy;
        let keep = policy.retry_on.is_empty()
            || policy
                .retry_on
                .iter()
                .any(|condition| *condition != RetryOn::ConnectFailure);
        let (mut head, mut body) = (head, Replay::new(body, keep));
        retrying.budget.deposit();
        let mut avoid = Vec::new();
        let mut retried: Option<String> = None;
        let mut rng = fastrand::Rng::new();
        let mut attempt = 0;
        loop {
            let (endpoint, pick) = pick_endpoint(&avoid)?;
            pass_on_grpc_deadline(&mut head);
            let replays = body.replays();
            let request = Request::from_parts(head, body);
            let (key, outcome) = self.try_once(&endpoint, request, &limits, &carried).await;
            let failure = match &outcome {
                Ok(forwarded) => Some(Failure::Answer {
                    status: forwarded.response.status().as_u16(),
                    grpc: headers::grpc_status(forwarded.response.headers()),
                }),
                Err(error) => Failure::of(error),
            };
            let tried = Tried {
                endpoint,
                pick,
                key,
            };
            let condition =
                failure.and_then(|failure| retrying.policy.condition(failure, &exchange.method));
            if let Some(previous) = retried.take() {
                let answered = outcome.is_ok() && condition.is_none();
                let result = if answered { "success" } else { "failure" };
                retry::count(&retrying.service, previous, result);
            }
            let (Some(condition), Some(failure)) = (condition, failure) else {
                return Ok((tried, outcome));
            };
            let reason = retry::reason(condition, failure);
            let attempts_left = attempt < retrying.policy.attempts;
            if !attempts_left || !replays.replayable() {
                // Out of attempts (URX), or the body was not kept.
                exchange.retries_exhausted = !attempts_left;
                return Ok((tried, outcome));
            }
            if !retrying.budget.withdraw() {
                retry::count(&retrying.service, reason, "budget_exhausted");
                exchange.retries_exhausted = true;
                return Ok((tried, outcome));
            }
            let Some(replay) = replays.again() else {
                return Ok((tried, outcome));
            };
            // The try retried is not answered: its endpoint is told now.
            if let Some(pick) = &tried.pick
                && let Some(failure) = failure.of_endpoint()
            {
                pick.failed(failure);
            }
            avoid.push(tried.endpoint.address);
            drop((tried, outcome));
            attempt += 1;
            let backoff = retry::backoff(attempt, &mut rng);
            if let Some((which, timeout, deadline)) = limits.deadline
                && Instant::now() + backoff >= deadline
            {
                tokio::time::sleep_until(deadline).await;
                return Err(ProxyError::RequestTimeout { which, timeout });
            }
            tokio::time::sleep(backoff).await;
            retried = Some(reason);
            (head, body) = (copy_head(&template), replay);
        }
    }

    /// One try of `request` at `endpoint`, within the per-try timeout and the
    /// request's deadline; a request to a pod of this node is first authorized.
    async fn try_once<B>(
        &self,
        endpoint: &Endpoint,
        request: Request<B>,
        limits: &Limits,
        carried: &Option<String>,
    ) -> (pool::Key, Result<Forwarded, ProxyError>)
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<super::BodyError>,
    {
        let key = pool::Key {
            source: endpoint
                .hop
                .mutual_tls()
                .then(|| self.logical.source.identity.clone()),
            endpoint: endpoint.address,
            version: self.upstream_version(&request),
            max_requests: limits.max_requests_per_connection,
            idle: limits.pooled_idle,
        };
        if endpoint.hop == Hop::Local {
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
                return (key, Err(ProxyError::Denied { by: denied.by }));
            }
        }
        let dial = || connect(&self.proxy, endpoint, &self.logical.source, carried.clone());
        let forwarding = forward(
            &self.proxy,
            Listener::Outbound,
            self.proxy.http_pool.here(),
            key.clone(),
            dial,
            request,
        );
        let now = Instant::now();
        let per_try = limits
            .per_try
            .map(|timeout| (PER_TRY_TIMEOUT, timeout, now + timeout));
        let nearest = [limits.deadline, per_try]
            .into_iter()
            .flatten()
            .min_by_key(|(_, _, at)| *at);
        let outcome = match nearest {
            None => forwarding.await,
            Some((which, timeout, at)) => tokio::time::timeout_at(at, forwarding)
                .await
                .unwrap_or(Err(ProxyError::RequestTimeout { which, timeout })),
        };
        (key, outcome)
    }

    /// `request` with its body boxed (marking `stream_idle` as it moves), and a copy
    /// of it sent to each of its route's mirrors.
    fn mirrored(
        &self,
        request: Request<Incoming>,
        routed: Option<&Routed>,
        stream_idle: Activity,
    ) -> Request<ProxyBody> {
        let request = request.map(|body| Touching::new(body, stream_idle));
        let boxed = |body: Touching<Incoming>| body.map_err(Into::into).boxed_unsync();
        match routed.filter(|routed| !routed.mirrors.is_empty()) {
            None => request.map(boxed),
            Some(routed) => {
                let context = mirror::Mirrors {
                    proxy: &self.proxy,
                    source: &self.logical.source,
                    caller: &self.caller,
                    name: &routed.name,
                };
                mirror::start(context, &routed.mirrors, request)
                    .map(|body| body.map_err(Into::into).boxed_unsync())
            }
        }
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

    /// What applies to a request besides its route: its timeouts — the route's, with
    /// the service's TrafficPolicy `timeouts.request` where the route sets none, and
    /// the service's `timeouts.streamIdle` (else the agent's `--idle-timeout`) — how it
    /// is retried (by the service the client called; none for a pod addressed
    /// directly), and the limits of the service it goes to (a route's backend, or the
    /// one called).
    fn settings(&self, routed: Option<&Routed>) -> Settings {
        let route_timeouts = routed.map(|routed| routed.timeouts).unwrap_or_default();
        let mesh = self.proxy.mesh.get();
        let called = match &self.logical.destination {
            Destination::Service(target) => mesh
                .service_at(target.vip, target.port)
                .map(|(service, _)| (service, target.key.as_str())),
            Destination::Pod(_) => None,
        };
        let timeouts = Timeouts {
            request: route_timeouts
                .request
                .or(called.and_then(|(service, _)| service.request_timeout)),
            ..route_timeouts
        };
        let backend = match routed.map(|routed| &routed.target) {
            Some(Target::Backend(backend)) => mesh
                .service_named(&backend.namespace, &backend.service, backend.port)
                .map(|(service, _)| (service, backend.to_string())),
            _ => called.map(|(service, key)| (service, key.to_owned())),
        };
        let limits = backend.as_ref().and_then(|(service, _)| service.limits);
        let pooled_idle = backend
            .as_ref()
            .and_then(|(service, _)| service.idle_timeout);
        Settings {
            stream_idle: called
                .and_then(|(service, _)| service.stream_idle_timeout)
                .unwrap_or(self.proxy.settings.idle_timeout),
            timeouts,
            retrying: retrying(&self.proxy, &mesh, &self.logical),
            breaker: backend.and_then(|(service, key)| breaker(&self.proxy, service, &key)),
            max_requests_per_connection: limits
                .and_then(|limits| limits.max_requests_per_connection),
            pooled_idle,
        }
    }

    /// The HTTP version `request` goes upstream in: HTTP/2 for a port that declares
    /// it (or gRPC), else the client's.
    fn upstream_version<B>(&self, request: &Request<B>) -> pool::Version {
        match self.logical.protocol {
            Protocol::Http2 | Protocol::Grpc => pool::Version::Http2,
            _ if request.version() == http::Version::HTTP_2 => pool::Version::Http2,
            _ => pool::Version::Http1,
        }
    }

    /// Waits (within the request's deadline) for `breaker` to let a request in.
    async fn admit(
        breaker: &Breaker,
        http1: bool,
        limits: &Limits,
    ) -> Result<Admitted, ProxyError> {
        let overflow = |limit| ProxyError::Overflow {
            service: breaker.service().to_owned(),
            limit,
        };
        let admitting = breaker.request(http1);
        match limits.deadline {
            None => admitting.await.map_err(overflow),
            Some((which, timeout, at)) => match tokio::time::timeout_at(at, admitting).await {
                Ok(admitted) => admitted.map_err(overflow),
                Err(_) => Err(ProxyError::RequestTimeout { which, timeout }),
            },
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

/// Injects `fault` (a route rule's FaultInjection) into a request: holds it for the
/// delay, if this request is among those delayed (within its deadline), and fails it
/// as asked, if it is among those aborted.
async fn inject(
    fault: &Fault,
    rule: &RuleName,
    limits: &Limits,
    exchange: &mut Exchange,
) -> Result<(), ProxyError> {
    let injected = fault.decide(|| fastrand::u32(..100));
    if let Some(delay) = injected.delay {
        exchange.delay_injected = true;
        let until = Instant::now() + delay;
        match limits.deadline {
            Some((which, timeout, deadline)) if deadline <= until => {
                tokio::time::sleep_until(deadline).await;
                return Err(ProxyError::RequestTimeout { which, timeout });
            }
            _ => tokio::time::sleep_until(until).await,
        }
    }
    let Some(abort) = injected.abort else {
        return Ok(());
    };
    // Only a gRPC status: an HTTP client gets 500.
    let status = abort
        .http_status
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Err(ProxyError::FaultAbort {
        route: rule.route.clone(),
        rule: rule.rule.clone(),
        status,
        grpc_status: abort.grpc_status.unwrap_or(grpc_status_for(status)),
    })
}

/// What bounds the tries of a request.
struct Limits {
    /// The nearest of the request's deadlines ([`deadline`]): which, how long, when.
    deadline: Option<(&'static str, Duration, Instant)>,
    /// Each try's ([`per_try_timeout`]).
    per_try: Option<Duration>,
    /// The client's gRPC deadline, passed on as what is left of it.
    grpc: Option<Instant>,
    /// The service's `connectionLimits.maxRequestsPerConnection`.
    max_requests_per_connection: Option<u32>,
    /// The service's `timeouts.idle`, for its pooled connections.
    pooled_idle: Option<Duration>,
}

/// What applies to a request besides its route ([`Outbound::settings`]).
struct Settings {
    timeouts: Timeouts,
    /// The called service's `timeouts.streamIdle`, else the agent's idle timeout.
    stream_idle: Duration,
    retrying: Option<Retrying>,
    breaker: Option<Arc<Breaker>>,
    max_requests_per_connection: Option<u32>,
    pooled_idle: Option<Duration>,
}

/// The last try of a request: where it went.
struct Tried {
    endpoint: Endpoint,
    pick: Option<Pick>,
    key: pool::Key,
}

/// How long the request may take in all, tries and backoffs, before it is answered
/// 504, with which limit that is and its length: the nearer of the request timeout
/// (the route's `timeouts.request`, else the service's TrafficPolicy
/// `timeouts.request`) and the client's own gRPC deadline `grpc`, both counted from
/// the request's start `elapsed` ago; and how long is left of it.
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
        grpc.map(|timeout| from_start("grpc-timeout", timeout)),
    ]
    .into_iter()
    .flatten()
    .min_by_key(|(_, _, left)| *left)
}

/// How long one try may take: the nearer of the route's `timeouts.backendRequest`
/// (the Gateway API's per-request-to-a-backend limit) and the retry policy's
/// `perTryTimeout`.
fn per_try_timeout(timeouts: &Timeouts, retrying: Option<&Retrying>) -> Option<Duration> {
    let policy = retrying.and_then(|retrying| retrying.policy.per_try_timeout);
    [timeouts.backend_request, policy]
        .into_iter()
        .flatten()
        .min()
}

/// A copy of a request's head for another try: method, target, version and fields
/// (the extensions, such as an upgrade's, stay with the first).
fn copy_head(head: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::retry::{Budget, BudgetPolicy, RetryPolicy};

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
            // A backend request timeout bounds each try, not the whole.
            (
                timeouts(Some(1000), Some(500)),
                None,
                0,
                Some(("request", 1000, 1000)),
            ),
            (timeouts(None, Some(500)), None, 0, None),
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

    #[test]
    fn each_try_gets_the_nearer_of_the_backend_request_and_per_try_timeouts() {
        let ms = Duration::from_millis;
        let retrying = |per_try: Option<u64>| Retrying {
            policy: Arc::new(RetryPolicy {
                per_try_timeout: per_try.map(ms),
                ..RetryPolicy::default()
            }),
            budget: Arc::new(Budget::new(BudgetPolicy::default())),
            service: "shop/web:80".into(),
        };
        let timeouts = |backend: Option<u64>| Timeouts {
            request: Some(ms(5000)),
            backend_request: backend.map(ms),
        };
        let cases = [
            (timeouts(None), None, None),
            (timeouts(Some(300)), None, Some(300)),
            (timeouts(None), Some(retrying(Some(200))), Some(200)),
            (timeouts(Some(300)), Some(retrying(Some(200))), Some(200)),
            (timeouts(Some(100)), Some(retrying(Some(200))), Some(100)),
            (timeouts(Some(100)), Some(retrying(None)), Some(100)),
        ];
        for (timeouts, retrying, expected) in cases {
            assert_eq!(
                per_try_timeout(&timeouts, retrying.as_ref()),
                expected.map(ms),
                "{timeouts:?}"
            );
        }
    }
}
