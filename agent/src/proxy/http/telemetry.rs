//! Request telemetry: Istio's standard request series (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`) with the labels Istio's dashboards and Kiali read, and one
//! JSON access-log line per request.
//!
//! Each HTTP connection looks the handles of a label set up once and reuses them: the
//! 21 labels are built only the first time a (destination, status, gRPC status, flags)
//! combination is seen on the connection, and resolved only the first time the thread
//! sees them ([`series`]).

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::{Method, Version};
use metrics::{Counter, Histogram, Label, counter, histogram};
use serde::Serialize;
use tokio::time::Instant;
use weft_api::observe::{Event, kind, verdict};

use super::route::RuleName;
use crate::{
    logging, observe,
    proxy::metrics::{
        AccessLog, Connection, Peer, Reporter, observed_service, security, series, unix_seconds,
    },
    sync,
};

/// The request telemetry of one HTTP connection.
pub struct Requests {
    reporter: Reporter,
    source: Peer,
    service: Option<(String, String)>,
    log: AccessLog,
    handles: Mutex<HashMap<Key, Arc<Handles>>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    destination: Option<SocketAddr>,
    mutual_tls: bool,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<u16>,
    flags: &'static str,
}

struct Handles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// A request as it arrived, for its telemetry.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub started: Instant,
    pub start_time: SystemTime,
    pub method: Method,
    pub authority: Option<String>,
    pub path: String,
    pub version: Version,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub trace_id: Option<String>,
    /// The route rule that decided the request, if a route is attached to its service.
    pub route: Option<RuleName>,
    /// Its last try failed as its retry policy retries, but no retry was left (Envoy's
    /// `URX`).
    pub retries_exhausted: bool,
    /// A FaultInjection held it before it went on (`DI`).
    pub delay_injected: bool,
}

impl Exchange {
    /// The exchange of `request`; its trace id comes with its span.
    pub fn of<B>(request: &http::Request<B>) -> Self {
        Self {
            started: Instant::now(),
            start_time: SystemTime::now(),
            method: request.method().clone(),
            authority: super::headers::authority(request).map(|authority| authority.to_string()),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            version: request.version(),
            protocol: if super::headers::is_grpc(request.headers()) {
                "grpc"
            } else {
                "http"
            },
            trace_id: None,
            route: None,
            retries_exhausted: false,
            delay_injected: false,
        }
    }
}

/// How a request went.
#[derive(Debug)]
pub struct Record<'a> {
    pub exchange: &'a Exchange,
    /// Who answered, if an endpoint was chosen.
    pub destination: Option<&'a Peer>,
    pub mutual_tls: bool,
    pub answer: Answer,
    pub error: Option<String>,
}

/// What came back.
#[derive(Clone, Copy, Debug)]
pub struct Answer {
    pub status: u16,
    pub grpc_status: Option<u16>,
    /// Envoy's `response_flags`, `-` for none.
    pub flags: &'static str,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Answer {
    /// The verdict watchers see: `deny` when an authorization policy refused the
    /// request, `error` when the mesh failed it (a response flag) or the server did
    /// (5xx), `ok` otherwise.
    pub fn verdict(&self) -> &'static str {
        if self.flags.split(',').any(|flag| flag == "RBAC") {
            verdict::DENY
        } else if self.flags != "-" || self.status >= 500 {
            verdict::ERROR
        } else {
            verdict::OK
        }
    }
}

/// A request's access-log line.
#[derive(Serialize)]
struct RequestLine<'a> {
    start: f64,
    duration_ms: f64,
    reporter: Reporter,
    source: &'a Peer,
    destination: &'a Peer,
    upstream: Option<SocketAddr>,
    service: Option<&'a (String, String)>,
    request_protocol: &'static str,
    #[serde(serialize_with = "debug_form")]
    http_version: Version,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    response_code: u16,
    grpc_status: Option<u16>,
    response_flags: &'static str,
    bytes_received: u64,
    bytes_sent: u64,
    security: &'static str,
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// An HTTP version as the access log writes it, its `Debug` form (`HTTP/1.1`), without
/// building a string.
fn debug_form<S: serde::Serializer>(version: &Version, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{version:?}"))
}

impl Requests {
    pub fn new(
        reporter: Reporter,
        source: Peer,
        service: Option<(String, String)>,
        log: AccessLog,
    ) -> Self {
        Self {
            reporter,
            source,
            service,
            log,
            handles: Mutex::default(),
        }
    }

    pub fn record(&self, record: Record<'_>) {
        let (exchange, answer) = (record.exchange, record.answer);
        let key = Key {
            destination: record.destination.and_then(|peer| peer.address),
            mutual_tls: record.mutual_tls,
            protocol: exchange.protocol,
            status: answer.status,
            grpc_status: answer.grpc_status,
            flags: answer.flags,
        };
        let handles = self.handles(key, record.destination);
        let elapsed = exchange.started.elapsed();
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64() * 1000.0);
        handles.request_bytes.record(answer.request_bytes as f64);
        handles.response_bytes.record(answer.response_bytes as f64);
        if let Some(route) = &exchange.route {
            counter!(
                "weft_route_requests_total",
                "route" => route.route.clone(),
                "rule" => route.rule.clone(),
                "response_code" => answer.status.to_string(),
            )
            .increment(1);
        }
        observe::report(answer.verdict(), || self.observed(&record, elapsed));
        if !self.log.requests() {
            return;
        }
        let unknown = Peer::default();
        let destination = record.destination.unwrap_or(&unknown);
        logging::access::write(&RequestLine {
            start: unix_seconds(exchange.start_time),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            reporter: self.reporter,
            source: &self.source,
            destination,
            upstream: destination.address,
            service: self.service.as_ref(),
            request_protocol: exchange.protocol,
            http_version: exchange.version,
            method: exchange.method.as_str(),
            authority: exchange.authority.as_deref(),
            path: &exchange.path,
            response_code: answer.status,
            grpc_status: answer.grpc_status,
            response_flags: answer.flags,
            bytes_received: answer.request_bytes,
            bytes_sent: answer.response_bytes,
            security: security(record.mutual_tls),
            trace_id: exchange.trace_id.as_deref(),
            route: exchange.route.as_ref().map(|route| route.route.as_str()),
            rule: exchange.route.as_ref().map(|route| route.rule.as_str()),
            error: record.error.as_deref(),
        });
    }

    /// The request at its end, `elapsed` after it began, as watchers see it.
    fn observed(&self, record: &Record<'_>, elapsed: Duration) -> Event {
        let (exchange, answer) = (record.exchange, record.answer);
        Event {
            kind: kind::REQUEST.to_owned(),
            reason: match answer.verdict() {
                verdict::OK => String::new(),
                _ => answer.flags.to_owned(),
            },
            detail: record.error.clone().unwrap_or_default(),
            source: Some(self.source.observed()),
            destination: record.destination.map(Peer::observed),
            direction: self.reporter.direction().to_owned(),
            service: observed_service(self.service.as_ref()),
            route: exchange
                .route
                .as_ref()
                .map(|route| format!("{}/{}", route.route, route.rule))
                .unwrap_or_default(),
            method: exchange.method.to_string(),
            authority: exchange.authority.clone().unwrap_or_default(),
            path: exchange.path.clone(),
            status: answer.status.into(),
            flags: answer.flags.to_owned(),
            duration_micros: elapsed.as_micros() as u64,
            bytes_received: answer.request_bytes,
            bytes_sent: answer.response_bytes,
            ..Event::default()
        }
    }

    fn handles(&self, key: Key, destination: Option<&Peer>) -> Arc<Handles> {
        let mut handles = sync::lock(&self.handles);
        if let Some(found) = handles.get(&key) {
            return Arc::clone(found);
        }
        let mut connection = Connection::new(
            self.reporter,
            self.source.clone(),
            destination.cloned().unwrap_or_default(),
        );
        connection.service = self.service.clone();
        connection.mutual_tls = key.mutual_tls;
        let mut labels = connection.labels(key.protocol, key.flags);
        labels.push(Label::new("response_code", key.status.to_string()));
        labels.push(Label::new(
            "grpc_response_status",
            key.grpc_status
                .map_or_else(String::new, |status| status.to_string()),
        ));
        let resolved = REQUEST_SERIES.with_borrow_mut(|cache| {
            cache.get(labels, |labels| {
                Arc::new(Handles {
                    requests: counter!("istio_requests_total", labels.clone()),
                    duration: histogram!("istio_request_duration_milliseconds", labels.clone()),
                    request_bytes: histogram!("istio_request_bytes", labels.clone()),
                    response_bytes: histogram!("istio_response_bytes", labels),
                })
            })
        });
        handles.insert(key, Arc::clone(&resolved));
        resolved
    }
}

thread_local! {
    /// Shared by the connections of a thread, behind each connection's own cache.
    static REQUEST_SERIES: RefCell<series::Cache<Arc<Handles>>> = RefCell::default();
}

/// Registers the help text of the request series.
pub fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        "istio_requests_total",
        "HTTP and gRPC requests (Istio standard)"
    );
    describe_counter!(
        "weft_route_requests_total",
        "Requests decided by an HTTPRoute or GRPCRoute rule, by route, rule and response code"
    );
    describe_histogram!(
        "istio_request_duration_milliseconds",
        metrics::Unit::Milliseconds,
        "Request durations, to the end of the response (Istio standard)"
    );
    describe_histogram!(
        "istio_request_bytes",
        metrics::Unit::Bytes,
        "Request body sizes (Istio standard)"
    );
    describe_histogram!(
        "istio_response_bytes",
        metrics::Unit::Bytes,
        "Response body sizes (Istio standard)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_names_http_versions_as_before() {
        #[derive(Serialize)]
        struct Line {
            #[serde(serialize_with = "debug_form")]
            http_version: Version,
        }
        for (version, word) in [
            (Version::HTTP_10, "HTTP/1.0"),
            (Version::HTTP_11, "HTTP/1.1"),
            (Version::HTTP_2, "HTTP/2.0"),
        ] {
            let line = serde_json::to_string(&Line {
                http_version: version,
            })
            .unwrap();
            assert_eq!(line, format!("{{\"http_version\":\"{word}\"}}"));
        }
    }

    #[test]
    fn verdicts_of_answers() {
        let answer = |status, flags| Answer {
            status,
            grpc_status: None,
            flags,
            request_bytes: 0,
            response_bytes: 0,
        };
        let cases = [
            (200, "-", "ok"),
            (404, "-", "ok"),
            (503, "-", "error"),
            (403, "RBAC", "deny"),
            (404, "NR", "error"),
            (200, "DI", "error"),
            (503, "UF,URX", "error"),
        ];
        for (status, flags, verdict) in cases {
            assert_eq!(answer(status, flags).verdict(), verdict, "{status} {flags}");
        }
    }
}
