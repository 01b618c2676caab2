//! The small HTTP servers agent and controller answer on (metrics, readiness, admin,
//! status): the accept loop and the replies they share.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{
    body::{Body, Incoming},
    service::{Service, service_fn},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type Reply = Response<Full<Bytes>>;

/// Answers every request on `listener` (HTTP/1.1 and h2c) with `answer`, until the
/// task is dropped.
pub async fn serve<F>(listener: TcpListener, answer: F)
where
    F: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    serve_each(listener, move || {
        let answer = Arc::clone(&answer);
        service_fn(move |request: Request<Incoming>| {
            let reply = answer(&request);
            async move { Ok::<_, Infallible>(reply) }
        })
    })
    .await;
}

/// Serves each connection on `listener` (HTTP/1.1 and h2c) with a service `service`
/// makes, until the task is dropped: for servers whose answers stream.
pub async fn serve_each<M, S, B>(listener: TcpListener, service: M)
where
    M: Fn() -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = service();
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

pub fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_owned())));
    *reply.status_mut() = status;
    reply
}

pub fn json<T: serde::Serialize>(value: &T) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

/// A Prometheus text exposition.
pub fn prometheus(body: String) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    reply
}
