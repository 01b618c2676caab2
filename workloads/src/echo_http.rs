//! The echo server behind `weft-echo`.
//!
//! One port speaks HTTP/1.1 and h2c (HTTP/2 with prior knowledge), and three echoes share
//! it. Requests whose content type is `application/grpc*` go to the gRPC echo service
//! ([`echo_grpc`](crate::echo_grpc)); requests for [`/ws`](crate::echo_ws::PATH) open a
//! WebSocket echo ([`echo_ws`](crate::echo_ws)). Every other request, whatever its path,
//! is answered with `200` and a JSON description of what the server saw: its pod name,
//! the peer address of the accepted socket, method, path, HTTP version, host and headers.
//! Three query parameters change that:
//!
//! - `?bytes=N` (at most [`MAX_FILLER_BYTES`]) answers with `N` bytes of filler instead of
//!   the JSON, for throughput tests;
//! - `?status=NNN` (200 to 599) sets the response status;
//! - `?delay=MS` (at most [`MAX_DELAY_MS`], one minute) sends the response that many
//!   milliseconds late.
//!
//! Every response, gRPC ones and `400`s for bad parameters included, carries `x-weft-pod`
//! and `x-weft-peer` headers so that tests can read them without parsing the body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::server::TcpConnectInfo;
use tower::Service as _;

use crate::echo_grpc::{self, EchoService, proto::echo_server::EchoServer};
use crate::{DEFAULT_DRAIN_TIMEOUT, accept_loop, echo_ws, error_chain};

/// The largest `?bytes=N` the server accepts: 64 MiB.
pub const MAX_FILLER_BYTES: u64 = 64 * 1024 * 1024;

/// The longest delay, in milliseconds, that `?delay=MS` or a gRPC `delay_ms` may ask for.
pub const MAX_DELAY_MS: u32 = 60_000;

/// Response header carrying the pod name.
pub const POD_HEADER: HeaderName = HeaderName::from_static("x-weft-pod");
/// Response header carrying the peer address as the server's socket saw it.
pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-weft-peer");

/// How long an HTTP/1 client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Filler bodies are sent in chunks of this size, all slices of one static buffer.
const FILLER_CHUNK: usize = 64 * 1024;
static FILLER: [u8; FILLER_CHUNK] = [b'x'; FILLER_CHUNK];

/// What the server needs to know besides its listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Reported as `pod` in the JSON and in `x-weft-pod`.
    pub name: String,
    /// How long to wait for open connections after the shutdown signal.
    pub drain_timeout: Duration,
    /// How long every JSON echo waits before it answers unless `?delay=` says otherwise:
    /// a slow replica, for balancing tests.
    pub delay: Duration,
}

impl Config {
    /// A config reporting `name`, with the default drain timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            delay: Duration::ZERO,
        }
    }
}

/// Serves HTTP/1.1 and h2c on `listener` until `shutdown` resolves, then closes
/// connections gracefully (HTTP/2 `GOAWAY`, HTTP/1 close after the current response).
///
/// Connection errors, malformed requests included, are logged and close only that
/// connection.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let pod = Arc::new(Pod {
        delay: config.delay,
        ..Pod::new(config.name)
    });
    let grpc = echo_grpc::server(Arc::clone(&pod));

    accept_loop(
        listener,
        shutdown,
        config.drain_timeout,
        move |stream, peer, closing| {
            let builder = Arc::clone(&builder);
            let connection = Arc::new(Connection {
                pod: Arc::clone(&pod),
                peer,
                local: stream.local_addr().ok(),
                grpc: grpc.clone(),
                upgrade: Mutex::new(None),
            });
            async move { serve_connection(&builder, connection, stream, closing).await }
        },
    )
    .await;
}

/// The pod name, once as text for the JSON and once as a ready header value.
#[derive(Debug)]
pub(crate) struct Pod {
    pub(crate) name: String,
    pub(crate) header: HeaderValue,
    /// How long every JSON echo waits unless its `?delay=` says otherwise.
    pub(crate) delay: Duration,
}

impl Pod {
    pub(crate) fn new(name: String) -> Self {
        // Pod names are DNS labels; anything a header cannot carry is replaced, not fatal.
        let printable: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let header = HeaderValue::try_from(printable)
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            name,
            header,
            delay: Duration::ZERO,
        }
    }
}

/// What the requests of one connection share.
#[derive(Debug)]
struct Connection {
    pod: Arc<Pod>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    grpc: EchoServer<EchoService>,
    /// A WebSocket handshake's upgrade, run once hyper has let go of the connection.
    upgrade: Mutex<Option<OnUpgrade>>,
}

impl Connection {
    /// Hands `request` to the echo it is for and answers with what that echo says.
    async fn handle(&self, mut request: Request<Incoming>) -> Response<ResponseBody> {
        let mut response = if is_grpc(&request) {
            // Where tonic's own server would put the peer address; the service reads it.
            request.extensions_mut().insert(TcpConnectInfo {
                local_addr: self.local,
                remote_addr: Some(self.peer),
            });
            let Ok(response) = self.grpc.clone().call(request).await;
            response.map(Either::Right)
        } else if request.uri().path() == echo_ws::PATH {
            match echo_ws::accept(&mut request) {
                Ok((response, upgrade)) => {
                    *self.upgrade.lock().unwrap_or_else(PoisonError::into_inner) = Some(upgrade);
                    response.map(|()| Either::Left(Either::Left(Full::default())))
                }
                Err(err) => error_response(err.status(), &err),
            }
        } else {
            echo(&self.pod, self.peer, request).await
        };
        let headers = response.headers_mut();
        headers.insert(POD_HEADER, self.pod.header.clone());
        if let Ok(peer) = HeaderValue::try_from(self.peer.to_string()) {
            headers.insert(PEER_HEADER, peer);
        }
        response
    }
}

/// Whether `request` is a gRPC call (`application/grpc`, `application/grpc+proto`, ...).
fn is_grpc<B>(request: &Request<B>) -> bool {
    request
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    state: Arc<Connection>,
    stream: TcpStream,
    mut closing: watch::Receiver<bool>,
) {
    let peer = state.peer;
    let service = {
        let state = Arc::clone(&state);
        service_fn(move |request: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(state.handle(request).await) }
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let mut closing_seen = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = closing.wait_for(|closing| *closing), if !closing_seen => {
                closing_seen = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(err) = result {
        log::warn!("connection from {peer} failed: {}", error_chain(&*err));
        return;
    }
    // The connection ends without error right after a `101`, handing over the socket.
    let upgrade = state
        .upgrade
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(upgrade) = upgrade
        && let Err(err) = echo_ws::session(&state.pod, upgrade, closing).await
    {
        log::warn!("WebSocket from {peer} failed: {err}");
    }
}

/// The body of every response: JSON or empty, filler, or a gRPC body from tonic.
type ResponseBody = Either<Either<Full<Bytes>, Filler>, tonic::body::Body>;

/// The JSON echo (or filler) for `request`, sent after the delay it asks for. Never fails:
/// bad parameters become a `400`, at once.
async fn echo<B>(pod: &Pod, peer: SocketAddr, request: Request<B>) -> Response<ResponseBody> {
    let query = match Query::parse(request.uri().query()) {
        Ok(query) => query,
        Err(err) => return error_response(StatusCode::BAD_REQUEST, &err),
    };
    let mut response = match query.bytes {
        Some(len) => {
            let mut response =
                Response::new(Either::Left(Either::Right(Filler { remaining: len })));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => json_response(&Reply::new(pod, peer, &request)),
    };
    if let Some(status) = query.status {
        *response.status_mut() = status;
    }
    let delay = query.delay.unwrap_or(pod.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

fn error_response(status: StatusCode, err: &dyn Display) -> Response<ResponseBody> {
    let mut response = json_response(&serde_json::json!({ "error": err.to_string() }));
    *response.status_mut() = status;
    response
}

fn json_response(value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|err| {
        // Only plain strings and maps go in, so this cannot happen; answer anyway.
        log::error!("cannot encode reply: {err}");
        b"{}".to_vec()
    });
    body.push(b'\n');
    let mut response = Response::new(Either::Left(Either::Left(Full::new(Bytes::from(body)))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The JSON body of a normal reply.
#[derive(Debug, Serialize)]
struct Reply<'a> {
    pod: &'a str,
    peer: String,
    method: &'a str,
    path: &'a str,
    version: &'static str,
    host: Option<&'a str>,
    headers: BTreeMap<String, String>,
}

impl<'a> Reply<'a> {
    fn new<B>(pod: &'a Pod, peer: SocketAddr, request: &'a Request<B>) -> Self {
        let host = request
            .headers()
            .get(HOST)
            .and_then(|host| host.to_str().ok())
            .or_else(|| {
                request
                    .uri()
                    .authority()
                    .map(|authority| authority.as_str())
            });
        Self {
            pod: &pod.name,
            peer: peer.to_string(),
            method: request.method().as_str(),
            path: request.uri().path(),
            version: version_str(request.version()),
            host,
            headers: crate::header_strings(request.headers()),
        }
    }
}

fn version_str(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// The query parameters the server understands; others are ignored.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    bytes: Option<u64>,
    status: Option<StatusCode>,
    delay: Option<Duration>,
}

/// A query parameter the server cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum QueryError {
    #[error("bytes must be a whole number from 0 to {MAX_FILLER_BYTES} (64 MiB), got {0:?}")]
    Bytes(String),
    #[error("status must be a number from 200 to 599, got {0:?}")]
    Status(String),
    #[error("delay must be a whole number of milliseconds from 0 to {MAX_DELAY_MS}, got {0:?}")]
    Delay(String),
}

impl Query {
    fn parse(query: Option<&str>) -> Result<Self, QueryError> {
        let mut parsed = Self::default();
        for pair in query.unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "bytes" => {
                    let bytes = value
                        .parse::<u64>()
                        .ok()
                        .filter(|bytes| *bytes <= MAX_FILLER_BYTES)
                        .ok_or_else(|| QueryError::Bytes(value.to_owned()))?;
                    parsed.bytes = Some(bytes);
                }
                "status" => {
                    let status = value
                        .parse::<u16>()
                        .ok()
                        .filter(|code| (200..=599).contains(code))
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .ok_or_else(|| QueryError::Status(value.to_owned()))?;
                    parsed.status = Some(status);
                }
                "delay" => {
                    let millis = value
                        .parse::<u32>()
                        .ok()
                        .filter(|millis| *millis <= MAX_DELAY_MS)
                        .ok_or_else(|| QueryError::Delay(value.to_owned()))?;
                    parsed.delay = Some(Duration::from_millis(millis.into()));
                }
                _ => {}
            }
        }
        Ok(parsed)
    }
}

/// A body of `remaining` filler bytes, streamed in chunks of one static buffer so that a
/// 64 MiB reply costs no allocation.
#[derive(Debug)]
struct Filler {
    remaining: u64,
}

impl Body for Filler {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(FILLER_CHUNK, |r| r.min(FILLER_CHUNK));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILLER[..len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parses_known_parameters_and_ignores_others() {
        assert_eq!(Query::parse(None).unwrap(), Query::default());
        assert_eq!(
            Query::parse(Some("x=1&bytes=10&status=503&flag&delay=250")).unwrap(),
            Query {
                bytes: Some(10),
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
                delay: Some(Duration::from_millis(250)),
            }
        );
        assert_eq!(
            Query::parse(Some(&format!("bytes={MAX_FILLER_BYTES}")))
                .unwrap()
                .bytes,
            Some(MAX_FILLER_BYTES)
        );
    }

    #[test]
    fn query_rejects_bad_values() {
        let too_big = (MAX_FILLER_BYTES + 1).to_string();
        for bad in ["too-big", "-1", "", too_big.as_str()] {
            assert_eq!(
                Query::parse(Some(&format!("bytes={bad}"))),
                Err(QueryError::Bytes(bad.to_owned()))
            );
        }
        for bad in ["99", "600", "abc", "101"] {
            assert_eq!(
                Query::parse(Some(&format!("status={bad}"))),
                Err(QueryError::Status(bad.to_owned()))
            );
        }
        for bad in ["60001", "-1", "1.5", ""] {
            assert_eq!(
                Query::parse(Some(&format!("delay={bad}"))),
                Err(QueryError::Delay(bad.to_owned()))
            );
        }
    }

    /// On a paused clock: the response is ready exactly when the delay is over.
    #[tokio::test(start_paused = true)]
    async fn delay_holds_the_response_back() {
        let pod = Pod::new("slow-0".into());
        let peer: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let request = || Request::get("/?delay=1500&status=202").body(()).unwrap();

        let early =
            tokio::time::timeout(Duration::from_millis(1499), echo(&pod, peer, request())).await;
        assert!(early.is_err(), "answered before the delay was over");

        let started = tokio::time::Instant::now();
        let response = echo(&pod, peer, request()).await;
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
        assert_eq!(response.status(), StatusCode::ACCEPTED);

        let started = tokio::time::Instant::now();
        let refused = echo(&pod, peer, Request::get("/?delay=60001").body(()).unwrap()).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert_eq!(started.elapsed(), Duration::ZERO, "a refusal waited");
    }

    #[test]
    fn bad_pod_names_still_make_a_header() {
        assert_eq!(Pod::new("web-0".into()).header, "web-0");
        assert_eq!(Pod::new("wéb\n".into()).header, "w?b?");
    }

    #[test]
    fn filler_counts_down_exactly() {
        let mut filler = Filler {
            remaining: FILLER_CHUNK as u64 + 5,
        };
        let mut total = 0;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut filler).poll_frame(&mut cx) {
            total += frame.into_data().unwrap().len();
        }
        assert_eq!(total, FILLER_CHUNK + 5);
        assert!(filler.is_end_stream());
    }
}
