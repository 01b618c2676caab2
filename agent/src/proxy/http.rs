//! The request layer: HTTP/1.1, HTTP/2 and gRPC proxied request by request.
//!
//! Outbound ([`serve_outbound`]), the client's agent serves the captured connection
//! as an HTTP server and sends each request on its own: the service's balancer picks
//! an endpoint per request, and the request rides a pooled upstream connection to it
//! ([`pool`]) — in an HBONE tunnel to another node, HTTP/2 multiplexed where the
//! backend speaks it. Inbound ([`serve_inbound`]), the destination agent serves the
//! tunnel's stream the same way and passes each request to the pod, so that it can
//! measure (and, later, authorize) every request. Bodies stream through; `Upgrade`
//! (WebSocket) switches both connections to a byte copy.

mod body;
mod headers;
mod inbound;
mod mirror;
mod outbound;
pub mod pool;
mod replay;
mod route;
mod stream_idle;
mod telemetry;

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};

use self::{
    body::Measured,
    pool::Sender,
    stream_idle::{Activity, Guarded},
    telemetry::{Answer, Exchange, Record, Requests},
};
pub use self::{
    inbound::{Inbound, serve as serve_inbound},
    outbound::serve as serve_outbound,
    pool::Pool,
};
use super::{
    Draining, Proxy,
    abuse::{self, Abuse, Inspected, Listener, Pace, Paced},
    connect::Upstream,
    error::ProxyError,
    metrics::Peer,
    relay::relay,
    trace::{self, Span, SpanKind},
};
use crate::logging::{Throttle, held_back};

/// Registers the help text of the request layer's series.
pub fn describe() {
    telemetry::describe();
    super::abuse::describe();
    mirror::describe();
    super::retry::describe();
    super::breaker::describe();
}

/// The body of every request and response the agent forwards or makes.
pub type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

/// Why a body failed: hyper's error, or the agent's own (a stream ended for being idle).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 or HTTP/2 (told by the connection preface) on `io` until the client
/// closes it, each request answered by `handle`; a connection that ends in an error is
/// logged (at most once a second) as `what`, and counted if it ends for an abuse of the
/// protocol ([`abuse`]) on `listener`. An HTTP/1.1 client that sends no new
/// request for `idle` is disconnected, and any client that takes none of the bytes
/// written to it for `client_stall`. Once the proxy drains, HTTP/1.1 answers say
/// `Connection: close`, and after [`DRAIN_GRACE`] the connection shuts down gracefully
/// (GOAWAY for HTTP/2; an HTTP/1.1 connection closes after the request it carries).
async fn serve<IO, H, Fut>(
    io: IO,
    listener: Listener,
    what: &str,
    idle: Duration,
    client_stall: Duration,
    draining: Draining,
    handle: H,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let handle = Arc::new(handle);
    let service = {
        let draining = draining.clone();
        service_fn(move |request| {
            let handle = Arc::clone(&handle);
            let http1 = request.version() < http::Version::HTTP_2;
            let draining = draining.clone();
            async move {
                let mut response = handle(request).await;
                if http1 && draining.now() {
                    closing(&mut response);
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    static FAILED: Throttle = Throttle::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timeout runs from the moment it waits for a request's head, so
    // between requests too: the keep-alive idle timeout.
    builder
        .http1()
        // A tunnel's client may end its side once it has sent its request (an HBONE
        // peer passes on its client's half-close): the answer still goes back.
        .half_close(listener == Listener::Inbound)
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(abuse::HEAD_LIMIT)
        .max_headers(abuse::MAX_HEADERS);
    builder
        .http2()
        .max_header_list_size(abuse::MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(listener.pending_resets());
    let (io, verdict) = Inspected::new(io, listener, client_stall);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = async {
            draining.started().await;
            tokio::time::sleep(DRAIN_GRACE).await;
        } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    let err = served.err();
    match verdict.of(err.as_deref().map(|err| err as _)) {
        Some(abuse) => abuse::closed(listener, abuse, what),
        None => {
            if let Some(err) = err
                && let Some(held) = FAILED.allow()
            {
                log::info!("{what} ended: {err}{}", held_back(held));
            }
        }
    }
}

/// How long a draining proxy leaves a connection that carries requests before it
/// shuts it down: long enough for a busy HTTP/1.1 client's next request, whose answer
/// says `Connection: close`, so that only connections idle this long are closed
/// between requests (which HTTP/1.1 clients expect of an idle connection).
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Marks an HTTP/1.1 answer as the connection's last (unless it switches protocols,
/// which keeps the connection for the new one).
fn closing(response: &mut Response<ProxyBody>) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Starts the span of `request` on this hop (`kind`), a child of the trace the request
/// arrived in, and passes the span's context on in the request's headers. Also gives
/// the exchange its trace id, for the access log.
fn start_span(
    proxy: &Proxy,
    kind: SpanKind,
    request: &mut Request<Incoming>,
    exchange: &mut Exchange,
) -> Span {
    let parent = trace::extract(request.headers());
    let name = match &exchange.authority {
        Some(authority) => format!("{} {authority}", exchange.method),
        None => exchange.method.to_string(),
    };
    let mut span = proxy.tracer.start(kind, name, parent.as_ref());
    if span.is_recording() {
        span.set("http.request.method", exchange.method.to_string());
        span.set("url.path", exchange.path.clone());
        span.set("url.scheme", "http");
        if let Some(authority) = &exchange.authority {
            span.set("server.address", authority.clone());
        }
        let version = match exchange.version {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        span.set("network.protocol.version", version);
        exchange.trace_id = Some(span.context().trace_id_hex());
    }
    span.propagate(request.headers_mut());
    span
}

/// Ends `span` with the request's outcome.
fn end_span(
    mut span: Span,
    status: u16,
    grpc_status: Option<u16>,
    peer: Option<std::net::SocketAddr>,
) {
    span.set("http.response.status_code", status);
    if let Some(grpc_status) = grpc_status {
        span.set("rpc.grpc.status_code", grpc_status);
    }
    if let Some(peer) = peer {
        span.set("network.peer.address", peer.ip().to_string());
        span.set("network.peer.port", peer.port());
    }
    if status >= 500 {
        span.set_error(format!("HTTP status {status}"));
    }
    span.end();
}

/// The `traceparent` that carries `span` to the next hop, for an HBONE CONNECT.
fn traceparent(span: &Span) -> Option<String> {
    let mut headers = http::HeaderMap::new();
    span.propagate(&mut headers);
    headers.get("traceparent")?.to_str().ok().map(str::to_owned)
}

/// A forwarded request's response, with what its measurement needs.
struct Forwarded {
    response: Response<Incoming>,
    /// The HTTP/1.1 connection to give back once the response is read (not for an
    /// upgraded one).
    sender: Option<Sender>,
    request_bytes: Arc<AtomicU64>,
}

/// Sends `request` to `key`'s endpoint: hop-by-hop fields removed, the target in the
/// upstream version's form, the body counted. A request that upgrades its connection
/// gets a connection of its own, spliced to the client's once the server agrees.
async fn forward<F, Fut, B>(
    proxy: &Arc<Proxy>,
    listener: Listener,
    pool: &Pool,
    mut key: pool::Key,
    dial: F,
    mut request: Request<B>,
) -> Result<Forwarded, ProxyError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Upstream, ProxyError>>,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BodyError>,
{
    let upgrade = headers::wants_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    if upgrade {
        key.version = pool::Version::Http1;
    }
    headers::prepare_request(&mut request, key.version, upgrade);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let pace = Pace::default();
    let request = request.map(|body| {
        let counted = Arc::clone(&request_bytes);
        Measured::new(Paced::new(body, pace.clone()), move |seen| {
            counted.store(seen.bytes, Ordering::Relaxed);
        })
        .map_err(Into::into)
        .boxed_unsync()
    });
    // Until the response starts, the server may be waiting for the rest of the body:
    // a client that keeps it waiting too long is cut off. (After, a silent client
    // may be one end of a bidirectional stream.)
    let stall = proxy.settings.client_stall;
    let (mut response, sender) = tokio::select! {
        sent = pool.send(&key, dial, request, !upgrade) => sent?,
        () = pace.stalled(stall) => {
            abuse::count(listener, Abuse::SlowBody);
            return Err(ProxyError::SlowBody { timeout: stall });
        }
    };
    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let Some(client_upgrade) = client_upgrade
        && switched
    {
        let server_upgrade = hyper::upgrade::on(&mut response);
        let tracked = proxy.track();
        let idle = proxy.settings.idle_timeout;
        tokio::spawn(async move {
            let _tracked = tracked;
            if let (Ok(client), Ok(server)) = tokio::join!(client_upgrade, server_upgrade) {
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                relay(&mut client, &mut server, Some(idle), |_, _| {}).await;
            }
        });
    }
    headers::strip_hop_by_hop(response.headers_mut(), switched);
    Ok(Forwarded {
        response,
        sender: (!upgrade).then_some(sender),
        request_bytes,
    })
}

/// The response of a forwarded request, measured: when its body ends (or is dropped),
/// the span ends and `done` gets the connection to give back (if the response was read
/// to its end) and the answer.
fn measured(
    forwarded: Forwarded,
    span: Span,
    exchange: Exchange,
    upstream: std::net::SocketAddr,
    stream_idle: Option<Activity>,
    done: impl FnOnce(Option<Sender>, &Exchange, Answer) + Send + 'static,
) -> Response<ProxyBody> {
    let Forwarded {
        response,
        sender,
        request_bytes,
    } = forwarded;
    let status = response.status().as_u16();
    let header_grpc_status = headers::grpc_status(response.headers());
    let grpc = exchange.protocol == "grpc";
    let went_idle = stream_idle.clone();
    response.map(|body| {
        let body = Guarded::new(body, stream_idle, grpc);
        Measured::new(body, move |seen| {
            let grpc_status = seen.grpc_status.or(header_grpc_status);
            end_span(span, status, grpc_status, Some(upstream));
            let idle = went_idle.is_some_and(|activity| activity.expired());
            let answer = Answer {
                status,
                grpc_status,
                flags: match (seen.complete, exchange.retries_exhausted) {
                    _ if idle => "SI",
                    (false, _) => "DC",
                    (true, true) => "URX",
                    (true, false) if exchange.delay_injected => "DI",
                    (true, false) => "-",
                },
                request_bytes: request_bytes.load(Ordering::Relaxed),
                response_bytes: seen.bytes,
            };
            done(sender.filter(|_| seen.complete), &exchange, answer);
        })
        .boxed_unsync()
    })
}

/// Answers a request that failed on `error` (see [`failure`]), and ends its span, logs
/// (at most once a second) and measures it. `client` names the caller in the log.
fn failed(
    requests: &Requests,
    client: &dyn std::fmt::Display,
    exchange: &Exchange,
    span: Span,
    destination: Option<(&Peer, bool)>,
    error: ProxyError,
) -> Response<ProxyBody> {
    static FAILED: Throttle = Throttle::new();
    if let Some(held) = FAILED.allow() {
        log::warn!(
            "{} {} from {client} failed: {error}{}",
            exchange.method,
            exchange.path,
            held_back(held)
        );
    }
    let response = failure(&error, exchange.protocol == "grpc");
    let answer = Answer {
        status: response.status().as_u16(),
        grpc_status: headers::grpc_status(response.headers()),
        flags: if exchange.retries_exhausted {
            error.response_flags_retried()
        } else {
            error.response_flags()
        },
        request_bytes: 0,
        response_bytes: 0,
    };
    end_span(span, answer.status, answer.grpc_status, None);
    requests.record(Record {
        exchange,
        destination: destination.map(|(peer, _)| peer),
        mutual_tls: destination.is_some_and(|(_, mutual_tls)| mutual_tls),
        answer,
        error: Some(error.to_string()),
    });
    response
}

/// Ends the span of, logs and measures a request the agent answered itself with
/// `status` (a route's redirect).
fn answered(requests: &Requests, exchange: &Exchange, span: Span, status: u16) {
    end_span(span, status, None, None);
    requests.record(Record {
        exchange,
        destination: None,
        mutual_tls: false,
        answer: Answer {
            status,
            grpc_status: None,
            flags: "-",
            request_bytes: 0,
            response_bytes: 0,
        },
        error: None,
    });
}

/// The answer to a request that failed on `error`: its HTTP status with the reason in
/// the body, or for gRPC a trailers-only response with the matching gRPC status.
fn failure(error: &ProxyError, grpc: bool) -> Response<ProxyBody> {
    let reason = error.reason();
    let mut response = if grpc {
        let mut response = Response::new(empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(error.grpc_status())),
        );
        headers.insert("grpc-message", HeaderValue::from_static(reason));
        response
    } else {
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{reason}\n")))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = error.status();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    response
        .headers_mut()
        .insert("x-weft-error", HeaderValue::from_static(reason));
    response
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;
    use hyper::client::conn::{http1, http2};

    use super::*;

    fn request() -> Request<Full<Bytes>> {
        Request::builder()
            .uri("http://echo/")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    /// Serves `server` as the proxy does, answering every request with an empty 200.
    fn serve_test(
        server: tokio::io::DuplexStream,
        draining: Draining,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve(
            server,
            Listener::Outbound,
            "test",
            Duration::from_secs(600),
            Duration::from_secs(600),
            draining,
            |_| async { Response::new(empty()) },
        ))
    }

    /// Once the proxy drains, an HTTP/1.1 connection's next answer says
    /// `Connection: close` and the connection ends after it.
    #[tokio::test(start_paused = true)]
    async fn a_draining_proxy_closes_http1_after_the_next_answer() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (start, draining) = Draining::of_test();
        let served = serve_test(server, draining);
        let (mut sender, connection) = http1::handshake(TokioIo::new(client)).await.unwrap();
        let connection = tokio::spawn(connection);

        let first = sender.send_request(request()).await.unwrap();
        assert_eq!(first.headers().get(header::CONNECTION), None);
        first.into_body().collect().await.unwrap();

        start.send_replace(true);
        let last = sender.send_request(request()).await.unwrap();
        assert_eq!(last.status(), StatusCode::OK);
        assert_eq!(last.headers()[header::CONNECTION], "close");
        last.into_body().collect().await.unwrap();
        connection.await.unwrap().unwrap();
        served.await.unwrap();
    }

    /// An HTTP/2 connection gets GOAWAY once the drain's grace has passed, and ends
    /// cleanly; the answers before it carry no connection header.
    #[tokio::test(start_paused = true)]
    async fn a_draining_proxy_sends_http2_away_after_the_grace() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (start, draining) = Draining::of_test();
        let served = serve_test(server, draining);
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(client))
            .await
            .unwrap();
        let connection = tokio::spawn(connection);

        start.send_replace(true);
        let answer = sender.send_request(request()).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers().get(header::CONNECTION), None);
        let started = tokio::time::Instant::now();
        connection.await.unwrap().unwrap();
        served.await.unwrap();
        assert!(started.elapsed() >= DRAIN_GRACE - Duration::from_millis(10));
    }
}
