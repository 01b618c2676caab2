//! The controller's HTTP endpoints (port 15014): `GET /metrics` (Prometheus),
//! `GET /status` (JSON: generation, objects, files, every node's sync state, every
//! policy's verdict), `GET /healthz/ready` (ready once the first generation is out),
//! `GET /authorization/explain?…` (why a caller is allowed or denied, over every
//! node's compiled policies; see [`weft_api::authz::query`]) and `GET
//! /routes/explain?…` (which route rule takes a request; see [`routes`]).

use std::{collections::BTreeMap, sync::Arc};

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::watch};
use weft_api::{
    authz::query::{self, Query},
    endpoints::{self, Reply, json, prometheus, text},
};

use crate::{
    ca::runtime::CaStatus,
    explain::{
        ClusterDirectory,
        routes::{self, RouteQuery},
    },
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
    /// The kinds the Kubernetes source cannot read; `None` with the file source.
    pub unread: Option<watch::Receiver<BTreeMap<String, String>>>,
    pub nodes: Arc<Nodes>,
    /// The CA, once its runtime reported.
    pub ca: watch::Receiver<Option<CaStatus>>,
}

/// The `/status` document (also what `weftctl` reads).
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// The generation compiled last, and the sources it was compiled from.
    pub generation: u64,
    pub compiled_sources: BTreeMap<String, String>,
    pub objects: BTreeMap<String, usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileStatus>>,
    pub nodes: BTreeMap<String, NodeStatus>,
    pub ca: Option<CaStatus>,
    pub policies: Vec<PolicyReport>,
    /// Kinds the source cannot read now (not installed, forbidden), and why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unread_kinds: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl Admin {
    /// Serves the endpoints on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        endpoints::serve(listener, move |request| self.answer(request)).await;
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
                prometheus(self.metrics.render())
            }
            "/status" => json(&self.report()),
            "/authorization/explain" => {
                let compiled = std::sync::Arc::clone(&self.published.borrow().compiled);
                let directory = ClusterDirectory::new(&compiled);
                let query = request.uri().query().unwrap_or_default();
                match Query::parse(query).and_then(|query| query::answer(&directory, &query)) {
                    Ok(answer) => json(&answer),
                    Err(problem) => text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
                }
            }
            "/routes/explain" => {
                let compiled = std::sync::Arc::clone(&self.published.borrow().compiled);
                let query = request.uri().query().unwrap_or_default();
                match RouteQuery::parse(query).and_then(|query| routes::explain(&compiled, &query))
                {
                    Ok(answer) => json(&answer),
                    Err(problem) => text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
                }
            }
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
                "endpoints: GET /metrics, GET /status, GET /healthz/ready, \
                 GET /authorization/explain?..., GET /routes/explain?...\n",
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
            ca: self.ca.borrow().clone(),
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
            unread_kinds: self
                .unread
                .as_ref()
                .map(|unread| unread.borrow().clone())
                .unwrap_or_default(),
        }
    }
}
