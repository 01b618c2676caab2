//! The HTTP echo server behind `weft-echo`.
//!
//! One port speaks HTTP/1.1 and h2c (HTTP/2 with prior knowledge). Every request, whatever
//! its path, is answered with `200` and a JSON description of what the server saw: its pod
//! name, the peer address of the accepted socket, method, path, HTTP version, host and
//! headers. Two query parameters change that:
//!
//! - `?bytes=N` (at most [`MAX_FILLER_BYTES`]) answers with `N` bytes of filler instead of
//!   the JSON, for throughput tests;
//! - `?status=NNN` (200 to 599) sets the response status.
//!
//! Every response, including `400`s for bad parameters, carries `x-weft-pod` and
//! `x-weft-peer` headers so that tests can read them without parsing the body.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{DEFAULT_DRAIN_TIMEOUT, accept_loop};

/// The largest `?bytes=N` the server accepts: 64 MiB.
pub const MAX_FILLER_BYTES: u64 = 64 * 1024 * 1024;

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
}

impl Config {
    /// A config reporting `name`, with the default drain timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
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
    let pod = Arc::new(Pod::new(config.name));

    accept_loop(
        listener,
        shutdown,
        config.drain_timeout,
        move |stream, peer, closing| {
            let builder = Arc::clone(&builder);
            let pod = Arc::clone(&pod);
            async move { serve_connection(&builder, pod, stream, peer, closing).await }
        },
    )
    .await;
}

/// The pod name, once as text for the JSON and once as a ready header value.
#[derive(Debug)]
struct Pod {
    name: String,
    header: HeaderValue,
}

impl Pod {
    fn new(name: String) -> Self {
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
        Self { name, header }
    }
}

async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    pod: Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    mut closing: watch::Receiver<bool>,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&pod, peer, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
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
    }
}

type ResponseBody = Either<Full<Bytes>, Filler>;

/// Builds the response to one request. Never fails: bad parameters become a `400`.
fn respond<B>(pod: &Pod, peer: SocketAddr, request: &Request<B>) -> Response<ResponseBody> {
    let mut response = match Query::parse(request.uri().query()) {
        Ok(query) => {
            let mut response = match query.bytes {
                Some(len) => {
                    let mut response = Response::new(Either::Right(Filler { remaining: len }));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                    response
                }
                None => json_response(&Reply::new(pod, peer, request)),
            };
            if let Some(status) = query.status {
                *response.status_mut() = status;
            }
            response
        }
        Err(err) => {
            let mut response = json_response(&serde_json::json!({ "error": err.to_string() }));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(POD_HEADER, pod.header.clone());
    if let Ok(peer) = HeaderValue::try_from(peer.to_string()) {
        headers.insert(PEER_HEADER, peer);
    }
    response
}

fn json_response(value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|err| {
        // Only plain strings and maps go in, so this cannot happen; answer anyway.
        log::error!("cannot encode reply: {err}");
        b"{}".to_vec()
    });
    body.push(b'\n');
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
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
    headers: BTreeMap<&'a str, String>,
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
        let mut headers: BTreeMap<&str, String> = BTreeMap::new();
        for (name, value) in request.headers() {
            let value = String::from_utf8_lossy(value.as_bytes());
            headers
                .entry(name.as_str())
                .and_modify(|joined| {
                    joined.push_str(", ");
                    joined.push_str(&value);
                })
                .or_insert_with(|| value.into_owned());
        }
        Self {
            pod: &pod.name,
            peer: peer.to_string(),
            method: request.method().as_str(),
            path: request.uri().path(),
            version: version_str(request.version()),
            host,
            headers,
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
}

/// A query parameter the server cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum QueryError {
    #[error("bytes must be a whole number from 0 to {MAX_FILLER_BYTES} (64 MiB), got {0:?}")]
    Bytes(String),
    #[error("status must be a number from 200 to 599, got {0:?}")]
    Status(String),
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

/// `err: cause: cause`, since hyper's top-level messages alone are terse.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parses_known_parameters_and_ignores_others() {
        assert_eq!(Query::parse(None).unwrap(), Query::default());
        assert_eq!(
            Query::parse(Some("x=1&bytes=10&status=503&flag")).unwrap(),
            Query {
                bytes: Some(10),
                status: Some(StatusCode::SERVICE_UNAVAILABLE),
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
