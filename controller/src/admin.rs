//! The controller's HTTP endpoints (port 15014): `GET /metrics` (Prometheus),
//! `GET /status` (JSON: generation, objects, files, every node's sync state, every
//! policy's verdict) and `GET /healthz/ready` (ready once the first generation is out).

use std::{collections::BTreeMap, convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    objects::Objects,
    pipeline::Published,
    source::files::FileStatus,
    status::{Statuses, Verdict},
    stream::{NodeStatus, Nodes},
};

/// The port the endpoints listen on by default (Istio's istiod monitoring port).
pub const ADMIN_PORT: u16 = 15014;

/// What the endpoints report on.
#[derive(Debug)]
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub published: watch::Receiver<Published>,
    pub objects: watch::Receiver<Arc<Objects>>,
    pub statuses: watch::Receiver<Arc<Statuses>>,
    /// The file source's files; `None` with the Kubernetes source.
    pub files: Option<watch::Receiver<Vec<FileStatus>>>,
    pub nodes: Arc<Nodes>,
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The generation compiled last, and the sources it was compiled from.
    pub generation: u64,
    pub compiled_sources: BTreeMap<String, String>,
    pub objects: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileStatus>>,
    pub nodes: BTreeMap<String, NodeStatus>,
    pub policies: Vec<PolicyReport>,
}

#[derive(Debug, Serialize)]
pub struct PolicyReport {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

type Reply = Response<Full<Bytes>>;

impl Admin {
    /// Serves the endpoints on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let admin = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let reply = admin.answer(&request);
                    async move { Ok::<_, Infallible>(reply) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn answer(&self, request: &Request<Incoming>) -> Reply {
        if request.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match request.uri().path() {
            "/metrics" => {
                for (kind, count) in self.objects.borrow().counts() {
                    metrics::gauge!("weft_controller_objects", "kind" => kind.name())
                        .set(count as f64);
                }
                let mut reply = text(StatusCode::OK, &self.metrics.render());
                reply.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                reply
            }
            "/status" => json(&self.report()),
            "/healthz/ready" => {
                if self.published.borrow().generation > 0 {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no configuration compiled yet: is the source reachable?\n",
                    )
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: GET /metrics, GET /status, GET /healthz/ready\n",
            ),
        }
    }

    pub fn report(&self) -> StatusReport {
        let published = self.published.borrow().clone();
        StatusReport {
            generation: published.generation,
            compiled_sources: published.sources,
            objects: self
                .objects
                .borrow()
                .counts()
                .into_iter()
                .map(|(kind, count)| (kind.name().to_owned(), count))
                .collect(),
            files: self.files.as_ref().map(|files| files.borrow().clone()),
            nodes: self.nodes.snapshot(),
            policies: self
                .statuses
                .borrow()
                .iter()
                .map(|((kind, key), verdict)| PolicyReport {
                    kind: kind.name().to_owned(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    verdict: verdict.clone(),
                })
                .collect(),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_owned())));
    *reply.status_mut() = status;
    reply
}

fn json<T: Serialize>(value: &T) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    reply
}
