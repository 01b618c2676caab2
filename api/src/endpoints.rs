//! The small HTTP servers agent and controller answer on (metrics, readiness, admin,
//! status): the accept loop and the replies they share.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{
    body::{Body, Incoming},
    service::{Service, service_fn},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, time::MissedTickBehavior};

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

/// How often [`keep_up`] runs: what metrics-exporter-prometheus's own exporter does.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Calls `upkeep` every `every` until the task is dropped. A recorder installed with
/// `PrometheusBuilder::install_recorder` keeps every histogram sample until something
/// drains it: a scrape does, and between scrapes (or on a node nobody scrapes) memory
/// grows with every request unless `PrometheusHandle::run_upkeep` runs.
pub async fn keep_up(every: Duration, upkeep: impl Fn()) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick completes at once; there is nothing to drain yet.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        upkeep();
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn upkeep_runs_once_a_period() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let task = tokio::spawn(keep_up(UPKEEP_EVERY, move || {
            counted.fetch_add(1, Ordering::Relaxed);
        }));
        tokio::time::sleep(UPKEEP_EVERY / 2).await;
        assert_eq!(runs.load(Ordering::Relaxed), 0, "not at once");
        tokio::time::sleep(UPKEEP_EVERY * 3).await;
        assert_eq!(runs.load(Ordering::Relaxed), 3);
        task.abort();
    }
}
