//! The agent's small HTTP servers, on the control runtime away from the data plane:
//! Prometheus metrics (15020), readiness (15021), and admin on localhost (15000):
//! `GET /config_dump` (the mesh model, the subscription, the streamed policies and
//! routes, the enrolled pods), `GET /certs`, `GET /endpoints/ejected` (endpoints out of
//! rotation by outlier detection), `GET /authorization/explain?…` (why a
//! caller is allowed or denied; see [`weft_api::authz::query`]),
//! `POST /logging?filter=<env_logger filter>`, and the gRPC service
//! `weft.observe.v1.Observer` ([`crate::observe`]), which streams what the node sees.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{Method, Request, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::ServiceExt;
use weft_api::{
    admin,
    authz::query::{self, Query},
    endpoints::{self, Reply, json, prometheus, text},
    observe::v1::observer_server::{ObserverServer, SERVICE_NAME},
};

use crate::{
    datapath::{Pins, pinned},
    logging,
    mesh::MeshConfig,
    node::NodeHandle,
    observe,
    proxy::{Proxy, authorize::NodeDirectory},
    reload::Current,
    subscription,
    tls::CertStore,
};

pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READY_PORT: u16 = 15021;

/// What the endpoints report on.
#[derive(Debug)]
pub struct Admin {
    pub metrics: PrometheusHandle,
    pub pins: Pins,
    pub mesh: Arc<Current<MeshConfig>>,
    pub certs: Arc<Current<CertStore>>,
    pub node: NodeHandle,
    pub proxy: Arc<Proxy>,
    /// The subscription to the controller, with `--controller`.
    pub subscription: Option<Arc<Current<subscription::Status>>>,
}

/// An endpoint set: the function answering every request on one port.
type Route = fn(&Admin, &Request<Incoming>) -> Reply;

impl Admin {
    /// Serves `route` on `listener` until the task is dropped; with `observer`, also
    /// the gRPC service that streams what the node sees.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, route: Route, observer: bool) {
        if !observer {
            return endpoints::serve(listener, move |request| route(&self, request)).await;
        }
        let observer = ObserverServer::new(observe::Service::new(self.proxy.node.clone()));
        endpoints::serve_each(listener, move || {
            let admin = Arc::clone(&self);
            let observer = observer.clone();
            service_fn(move |request: Request<Incoming>| {
                let observer = observer.clone();
                let reply = (!is_observer_call(&request))
                    .then(|| route(&admin, &request).map(tonic::body::Body::new));
                async move {
                    match reply {
                        Some(reply) => Ok(reply),
                        None => observer.oneshot(request).await,
                    }
                }
            })
        })
        .await;
    }

    /// `GET /metrics`: the Prometheus text format, kernel counters and the process's
    /// CPU, memory and files refreshed first.
    pub fn metrics(&self, request: &Request<Incoming>) -> Reply {
        if (request.method(), request.uri().path()) != (&Method::GET, "/metrics") {
            return text(StatusCode::NOT_FOUND, "try GET /metrics\n");
        }
        match pinned::counters(&self.pins) {
            Ok(counters) => {
                for (counter, value) in counters {
                    metrics::counter!("weft_ebpf_events_total", "event" => counter.name())
                        .absolute(value);
                }
            }
            Err(err) => log::warn!("cannot read the kernel counters: {err}"),
        }
        crate::process::record();
        metrics::gauge!("weft_active_connections").set(self.proxy.active() as f64);
        metrics::gauge!("weft_config_revision").set(self.mesh.get().revision as f64);
        let pooled: usize = self.proxy.pool.iter().map(|pool| pool.connections()).sum();
        metrics::gauge!("weft_hbone_pool_connections").set(pooled as f64);
        metrics::gauge!("weft_endpoints_ejected").set(self.proxy.balancers.ejected().len() as f64);
        let (held, _) = self.proxy.admission.counts();
        metrics::gauge!("weft_admission_connections", "state" => "pending")
            .set(held.pending as f64);
        metrics::gauge!("weft_admission_connections", "state" => "established")
            .set(held.established as f64);
        let limits = self.proxy.admission.limits();
        for (limit, value) in [
            ("total", limits.total),
            ("pending", limits.pending),
            ("per_source", limits.per_source),
            ("pending_per_source", limits.pending_per_source),
            (
                "handshakes_per_source",
                limits.handshakes_per_source as usize,
            ),
        ] {
            metrics::gauge!("weft_admission_limit", "limit" => limit).set(value as f64);
        }
        let certs = self.certs.get();
        for cert in certs.identities() {
            let expiry = cert
                .not_after
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let identity = cert.identity.to_string();
            let left = cert
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs_f64();
            metrics::gauge!("weft_certificate_expiry_seconds", "identity" => identity.clone())
                .set(expiry);
            metrics::gauge!("weft_certificate_ttl_seconds", "identity" => identity).set(left);
        }
        prometheus(self.metrics.render())
    }

    /// `GET /healthz/ready`: the port only opens once programs are attached and the
    /// configuration is loaded, so answering is being ready, as long as the agent
    /// holds a certificate for every identity of the node's meshed pods. A node
    /// without meshed pods needs none.
    pub fn ready(&self, request: &Request<Incoming>) -> Reply {
        if request.uri().path() != "/healthz/ready" {
            return text(StatusCode::NOT_FOUND, "try GET /healthz/ready\n");
        }
        let held = self.certs.get().identities();
        let missing = crate::certificates::local_identities(&self.mesh.get(), &self.proxy.node)
            .into_iter()
            .find(|identity| !held.iter().any(|cert| cert.identity == *identity));
        match missing {
            Some(identity) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no certificate yet for {identity}\n"),
            ),
            None => text(StatusCode::OK, "ready\n"),
        }
    }

    /// The admin endpoints (bound to localhost only).
    pub fn admin(&self, request: &Request<Incoming>) -> Reply {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/config_dump") => {
                let subscription = self.subscription.as_ref().map(|status| status.get());
                json(&serde_json::json!({
                    "pid": std::process::id(),
                    "mesh": *self.mesh.get(),
                    "controller": subscription.as_deref(),
                    "policies": subscription.as_ref().map(|status| status.policies.as_ref()),
                    "pods": *self.node.pods(),
                    "active_connections": self.proxy.active(),
                }))
            }
            (&Method::GET, "/endpoints/ejected") => {
                let mesh = self.mesh.get();
                let ejected: Vec<_> = self
                    .proxy
                    .balancers
                    .ejected()
                    .into_iter()
                    .map(|ejection| {
                        let workload = mesh
                            .workload_by_ip(ejection.address.ip())
                            .map(|workload| format!("{}/{}", workload.namespace, workload.name));
                        serde_json::json!({
                            "address": ejection.address.to_string(),
                            "workload": workload,
                            "seconds_left": ejection.left.as_secs_f64(),
                            "ejections_in_a_row": ejection.ejections,
                        })
                    })
                    .collect();
                json(&ejected)
            }
            (&Method::GET, "/certs") => {
                let certs: Vec<_> = self
                    .certs
                    .get()
                    .identities()
                    .into_iter()
                    .map(|cert| admin::Certificate {
                        identity: cert.identity.to_string(),
                        serial: cert.serial,
                        not_before: unix(cert.not_before),
                        not_after: unix(cert.not_after),
                        issuer: cert.issuer,
                        root: cert.root,
                    })
                    .collect();
                json(&certs)
            }
            (&Method::GET, "/authorization/explain") => {
                let mesh = self.mesh.get();
                let directory = NodeDirectory {
                    mesh: &mesh,
                    node: &self.proxy.node,
                };
                let query = request.uri().query().unwrap_or_default();
                match Query::parse(query).and_then(|query| query::answer(&directory, &query)) {
                    Ok(answer) => json(&answer),
                    Err(problem) => text(StatusCode::BAD_REQUEST, &format!("{problem}\n")),
                }
            }
            (&Method::POST, "/logging") => {
                let filter = request.uri().query().and_then(|query| {
                    query
                        .split('&')
                        .find_map(|pair| pair.strip_prefix("filter="))
                        .map(str::to_owned)
                });
                match filter {
                    Some(filter) => {
                        logging::set_filter(&filter);
                        text(StatusCode::OK, &format!("log filter is now {filter}\n"))
                    }
                    None => text(
                        StatusCode::BAD_REQUEST,
                        "give the new filter as ?filter=info,weft_agent=debug\n",
                    ),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: GET /config_dump, GET /certs, GET /endpoints/ejected, \
                 GET /authorization/explain?..., \
                 POST /logging?filter=...\n",
            ),
        }
    }
}

fn unix(time: std::time::SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Whether `request` is a call of the observer's gRPC service.
fn is_observer_call(request: &Request<Incoming>) -> bool {
    request
        .uri()
        .path()
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .is_some_and(|(service, _)| service == SERVICE_NAME)
}

/// The addresses the three servers bind, what they answer, and whether they also
/// stream what the node sees (the admin port, on localhost only).
pub fn addresses() -> [(SocketAddr, Route, bool); 3] {
    [
        (
            SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)),
            Admin::metrics,
            false,
        ),
        (
            SocketAddr::from(([0, 0, 0, 0], READY_PORT)),
            Admin::ready,
            false,
        ),
        (
            SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            Admin::admin,
            true,
        ),
    ]
}
