//! In-process tests of the HTTP echo server over HTTP/1.1 and h2c on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{POD, start, start_until, within};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

struct Reply {
    status: StatusCode,
    version: Version,
    headers: hyper::HeaderMap,
    body: Bytes,
    /// The client's own end of the connection, to compare with what the server saw.
    local: SocketAddr,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

/// Sends one HTTP/1.1 request for `path_and_query` on a fresh connection.
async fn get_http1(addr: SocketAddr, path_and_query: &str) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get(path_and_query)
        .header("host", format!("echo.test:{}", addr.port()))
        .header("x-test", "one")
        .header("X-Multi", "a")
        .header("x-multi", "b")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        local,
    }
}

#[tokio::test]
async fn http1_request_gets_json_with_pod_and_peer() {
    let addr = start().await;
    let reply = get_http1(addr, "/some/path?x=1").await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version, Version::HTTP_11);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("x-weft-pod"), POD);
    assert_eq!(reply.header("x-weft-peer"), reply.local.to_string());
    let json = reply.json();
    assert_eq!(json["pod"], POD);
    assert_eq!(json["peer"], reply.local.to_string());
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/some/path");
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(json["host"], format!("echo.test:{}", addr.port()));
    assert_eq!(json["headers"]["x-test"], "one");
    assert_eq!(json["headers"]["x-multi"], "a, b");
}

#[tokio::test]
async fn h2c_prior_knowledge_request_reports_http2() {
    let addr = start().await;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri: hyper::Uri = format!("http://{addr}/h2/path").parse().unwrap();

    let response = client.get(uri).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.headers()["x-weft-pod"], POD);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();

    assert_eq!(json["pod"], POD);
    assert_eq!(json["version"], "HTTP/2.0");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/h2/path");
    // No Host header over HTTP/2: the host comes from :authority.
    assert_eq!(json["host"], addr.to_string());
    let peer: SocketAddr = json["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), addr.ip());
    assert_ne!(peer.port(), addr.port());
}

#[tokio::test]
async fn bytes_query_returns_exactly_that_many_bytes() {
    let addr = start().await;
    let reply = get_http1(addr, "/?bytes=1000").await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 1000);
    assert_eq!(reply.header("content-length"), "1000");
    assert_eq!(reply.header("x-weft-pod"), POD);
    assert_eq!(reply.header("x-weft-peer"), reply.local.to_string());

    // Larger than one chunk, over HTTP/2 this time.
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let uri = format!("http://{addr}/?bytes=200000").parse().unwrap();
    let body = client
        .get(uri)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 200_000);
}

#[tokio::test]
async fn bad_bytes_query_is_rejected_with_400() {
    let addr = start().await;
    for bad in ["too-big", "67108865"] {
        let reply = get_http1(addr, &format!("/?bytes={bad}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "bytes={bad}");
        assert_eq!(reply.header("x-weft-pod"), POD);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("bytes must be"), "unclear error: {error}");
        assert!(
            error.contains(bad),
            "error does not name the value: {error}"
        );
    }
}

#[tokio::test]
async fn status_query_sets_the_status() {
    let addr = start().await;
    let reply = get_http1(addr, "/?status=503").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["pod"], POD);
}

#[tokio::test]
async fn delay_query_holds_the_response_back() {
    let addr = start().await;
    let started = Instant::now();
    let reply = within("the delayed reply", get_http1(addr, "/late?delay=300")).await;
    let waited = started.elapsed();

    assert!(
        waited >= Duration::from_millis(300),
        "answered after {waited:?}"
    );
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["path"], "/late");

    let refused = get_http1(addr, "/?delay=60001").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let error = refused.json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("delay must be") && error.contains("60001"),
        "{error}"
    );
}

#[tokio::test]
async fn malformed_request_closes_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let addr = start().await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"NOT HTTP AT ALL\r\n\x00\x01\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // Whatever the server answers, it must close the connection.
    let _ = stream.read_to_end(&mut rest).await;

    let reply = get_http1(addr, "/").await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn serve_returns_after_shutdown() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = start_until(async {
        let _ = stopped.await;
    })
    .await;
    assert_eq!(get_http1(addr, "/").await.status, StatusCode::OK);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server did not stop within 5s of the shutdown signal")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
