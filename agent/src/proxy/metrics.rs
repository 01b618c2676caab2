//! Telemetry of proxied connections: Istio's standard TCP metrics (so existing
//! dashboards and Kiali work), `weft_*` series for the proxy's own events, and one
//! JSON access-log line per connection. Request telemetry is in [`super::http`].

pub mod series;

use std::{
    cell::RefCell,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use metrics::{Counter, Label, counter, histogram};
use serde::Serialize;
use weft_api::observe::{self, Event, verdict};

use super::{
    baggage,
    error::ProxyError,
    relay::{End, Relayed},
};
use crate::{identity::Identity, logging, mesh::Workload};

/// Which side of the tunnel reports, as Istio's `reporter` label says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reporter {
    Source,
    Destination,
}

/// One end of a connection as telemetry names it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Peer {
    pub address: Option<SocketAddr>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub principal: Option<String>,
    #[serde(skip)]
    pub app: Option<String>,
    #[serde(skip)]
    pub version: Option<String>,
}

impl Peer {
    /// The peer as `weftctl observe` shows it.
    pub fn observed(&self) -> observe::Peer {
        observe::Peer {
            address: match self.address {
                Some(address) if address.port() == 0 => address.ip().to_string(),
                Some(address) => address.to_string(),
                None => String::new(),
            },
            workload: self.workload.clone().unwrap_or_default(),
            namespace: self.namespace.clone().unwrap_or_default(),
            identity: self.principal.clone().unwrap_or_default(),
        }
    }

    pub fn of(workload: &Workload, identity: Option<&Identity>, address: SocketAddr) -> Self {
        Self {
            address: Some(address),
            workload: Some(workload.name.clone()),
            namespace: Some(workload.namespace.to_string()),
            principal: identity.map(ToString::to_string),
            app: workload.labels.get("app").map(str::to_owned),
            version: workload.labels.get("version").map(str::to_owned),
        }
    }
}

/// A connection the proxy carries, for its metrics and access log.
#[derive(Clone, Debug, Serialize)]
pub struct Connection {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// `(namespace, name)` of the service the client addressed, if any.
    pub service: Option<(String, String)>,
    /// Whether the bytes crossed the network in mutual TLS.
    pub mutual_tls: bool,
    #[serde(skip)]
    pub started: SystemTime,
}

/// How a carried connection ended, for its metrics and access log.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes from the client towards the server.
    pub received: u64,
    /// Bytes from the server back to the client.
    pub sent: u64,
    pub ending: Ending,
}

#[derive(Debug, Default)]
pub enum Ending {
    /// Both sides closed their halves.
    #[default]
    Closed,
    /// Nothing moved either way for the idle timeout, so the agent closed it.
    IdleTimeout,
    /// The connection could not be carried to the end.
    Failed(ProxyError),
}

impl Outcome {
    pub fn failed(error: ProxyError) -> Self {
        Self {
            ending: Ending::Failed(error),
            ..Self::default()
        }
    }

    /// The verdict watchers see: `deny` when authorization ended it, `error` when
    /// anything else did, `ok` otherwise.
    pub fn verdict(&self) -> &'static str {
        match &self.ending {
            Ending::Failed(error) if error.is_denial() => verdict::DENY,
            Ending::Failed(_) => verdict::ERROR,
            Ending::Closed | Ending::IdleTimeout => verdict::OK,
        }
    }

    /// The `outcome` of the access log and `weft_connection_outcomes_total`: `ok`,
    /// `no_response` (closed normally, but the server never sent a byte back),
    /// `idle_timeout` or `error`.
    pub fn word(&self) -> &'static str {
        match self.ending {
            Ending::Closed if self.sent == 0 => "no_response",
            Ending::Closed => "ok",
            Ending::IdleTimeout => "idle_timeout",
            Ending::Failed(_) => "error",
        }
    }
}

impl From<Relayed> for Outcome {
    fn from(relayed: Relayed) -> Self {
        Self {
            received: relayed.received,
            sent: relayed.sent,
            ending: match relayed.end {
                End::Done => Ending::Closed,
                End::IdleTimeout(_) => Ending::IdleTimeout,
                End::Failed(err) => Ending::Failed(ProxyError::Copy(err)),
            },
        }
    }
}

impl Connection {
    pub fn new(reporter: Reporter, source: Peer, destination: Peer) -> Self {
        Self {
            reporter,
            source,
            destination,
            service: None,
            mutual_tls: false,
            started: SystemTime::now(),
        }
    }

    /// Istio's labels of the connection's series, for `protocol` (`tcp`, `http`,
    /// `grpc`) and `flags` (Envoy's `response_flags`, `-` for none).
    pub fn labels(&self, protocol: &'static str, flags: &'static str) -> Vec<Label> {
        let value = |value: &Option<String>| value.clone().unwrap_or_else(|| "unknown".to_owned());
        let (service_namespace, service_name) = self
            .service
            .clone()
            .unwrap_or_else(|| ("unknown".to_owned(), "unknown".to_owned()));
        let service_host = match &self.service {
            Some((namespace, name)) => format!("{name}.{namespace}.svc.cluster.local"),
            None => "unknown".to_owned(),
        };
        vec![
            Label::new("reporter", self.reporter.word()),
            Label::new("source_workload", value(&self.source.workload)),
            Label::new("source_workload_namespace", value(&self.source.namespace)),
            Label::new("source_principal", value(&self.source.principal)),
            Label::new("source_app", value(&self.source.app)),
            Label::new("source_version", value(&self.source.version)),
            Label::new("source_cluster", baggage::CLUSTER),
            Label::new("destination_workload", value(&self.destination.workload)),
            Label::new(
                "destination_workload_namespace",
                value(&self.destination.namespace),
            ),
            Label::new("destination_principal", value(&self.destination.principal)),
            Label::new("destination_app", value(&self.destination.app)),
            Label::new("destination_version", value(&self.destination.version)),
            Label::new("destination_service", service_host),
            Label::new("destination_service_name", service_name),
            Label::new("destination_service_namespace", service_namespace),
            Label::new("destination_cluster", baggage::CLUSTER),
            Label::new("request_protocol", protocol),
            Label::new("response_flags", flags),
            Label::new("connection_security_policy", self.security()),
        ]
    }

    /// The connection at its end, as watchers see it.
    fn observed(&self, outcome: &Outcome) -> Event {
        let failure = match &outcome.ending {
            Ending::Failed(error) => Some(error),
            _ => None,
        };
        Event {
            kind: observe::kind::CONNECTION.to_owned(),
            reason: failure
                .map_or(outcome.word(), ProxyError::reason)
                .to_owned(),
            detail: failure.map(ToString::to_string).unwrap_or_default(),
            source: Some(self.source.observed()),
            destination: Some(self.destination.observed()),
            direction: self.reporter.direction().to_owned(),
            service: observed_service(self.service.as_ref()),
            flags: failure.map_or("-", ProxyError::response_flags).to_owned(),
            duration_micros: self.started.elapsed().unwrap_or(Duration::ZERO).as_micros() as u64,
            bytes_received: outcome.received,
            bytes_sent: outcome.sent,
            ..Event::default()
        }
    }

    fn security(&self) -> &'static str {
        security(self.mutual_tls)
    }

    /// Counts the connection as opened; the returned handles count its bytes while it
    /// is open and its end.
    pub fn opened(self, log: &AccessLog) -> OpenConnection {
        let series = TCP_SERIES.with_borrow_mut(|cache| {
            cache.get(self.labels("tcp", "-"), |labels| TcpSeries {
                opened: counter!("istio_tcp_connections_opened_total", labels.clone()),
                closed: counter!("istio_tcp_connections_closed_total", labels.clone()),
                received: counter!("istio_tcp_received_bytes_total", labels.clone()),
                sent: counter!("istio_tcp_sent_bytes_total", labels),
            })
        });
        series.opened.increment(1);
        OpenConnection {
            closed: series.closed,
            received: series.received,
            sent: series.sent,
            reported: (AtomicU64::new(0), AtomicU64::new(0)),
            log: log.connections(),
            connection: self,
        }
    }
}

/// Istio's series of TCP connections with one label set.
#[derive(Clone)]
struct TcpSeries {
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

thread_local! {
    static TCP_SERIES: RefCell<series::Cache<TcpSeries>> = RefCell::default();
}

/// An open connection's series, resolved once.
#[derive(Debug)]
pub struct OpenConnection {
    connection: Connection,
    closed: Counter,
    received: Counter,
    sent: Counter,
    /// Bytes already counted, each way.
    reported: (AtomicU64, AtomicU64),
    log: bool,
}

impl OpenConnection {
    /// Counts the bytes carried so far (`received` and `sent` are totals), so that a
    /// long-lived connection shows its traffic while it is open.
    pub fn progress(&self, received: u64, sent: u64) {
        let previous = self.reported.0.swap(received, Ordering::Relaxed);
        self.received.increment(received.saturating_sub(previous));
        let previous = self.reported.1.swap(sent, Ordering::Relaxed);
        self.sent.increment(sent.saturating_sub(previous));
    }

    /// Counts the connection's end and last bytes, and writes its access-log line.
    pub fn closed(self, outcome: &Outcome) {
        self.progress(outcome.received, outcome.sent);
        self.closed.increment(1);
        let connection = &self.connection;
        let direction = connection.reporter.direction();
        counter!("weft_connection_outcomes_total", "direction" => direction, "outcome" => outcome.word())
            .increment(1);
        crate::observe::report(outcome.verdict(), || connection.observed(outcome));
        if !self.log {
            return;
        }
        let failure = match &outcome.ending {
            Ending::Failed(error) => Some(error),
            _ => None,
        };
        logging::access::write(&ConnectionLine {
            start: unix_seconds(connection.started),
            duration_ms: connection
                .started
                .elapsed()
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
                * 1000.0,
            connection,
            request_protocol: "tcp",
            bytes_received: outcome.received,
            bytes_sent: outcome.sent,
            security: connection.security(),
            outcome: outcome.word(),
            error: failure.map(ToString::to_string),
            response_flags: failure.map(ProxyError::response_flags),
        });
    }
}

/// A TCP connection's access-log line.
#[derive(Serialize)]
struct ConnectionLine<'a> {
    start: f64,
    duration_ms: f64,
    connection: &'a Connection,
    request_protocol: &'static str,
    bytes_received: u64,
    bytes_sent: u64,
    security: &'static str,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_flags: Option<&'static str>,
}

impl Reporter {
    pub fn word(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    /// Which way the reporter carries traffic: `outbound` from its client, `inbound`
    /// to its server.
    pub fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// Which access-log lines the agent writes (`--access-log`) and what share of them
/// (`--access-log-sampling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccessLog {
    pub mode: AccessLogMode,
    /// 0 to 1: the share of lines written.
    pub sampling: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLogMode {
    /// One line per HTTP request and one per TCP connection.
    #[default]
    Request,
    /// One line per connection, HTTP ones included.
    Connection,
    /// No access log.
    Off,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            mode: AccessLogMode::Request,
            sampling: 1.0,
        }
    }
}

impl AccessLog {
    fn sampled(&self) -> bool {
        self.sampling >= 1.0 || (self.sampling > 0.0 && fastrand::f64() < self.sampling)
    }

    /// Whether this TCP connection gets a line.
    pub fn connections(&self) -> bool {
        self.mode != AccessLogMode::Off && self.sampled()
    }

    /// Whether this HTTP request gets a line.
    pub fn requests(&self) -> bool {
        self.mode == AccessLogMode::Request && self.sampled()
    }
}

/// A service `(namespace, name)` as watchers see it: `namespace/name`, or empty.
pub fn observed_service(service: Option<&(String, String)>) -> String {
    service
        .map(|(namespace, name)| format!("{namespace}/{name}"))
        .unwrap_or_default()
}

/// Seconds since the Unix epoch, with milliseconds.
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Registers the help text of every series the agent exports.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "weft_endpoint_ejections_total",
        "Endpoints ejected by outlier detection (TrafficPolicy outlierDetection): after their consecutive failures, or a failure on probation"
    );
    describe_counter!(
        "weft_authorization_decisions_total",
        "Authorization decisions, by where they were made (direction: inbound on a tunnel, local for a pod of this node), the deciding policy's action and name (none/default when a default decided) and result (allowed, denied, audited, dry_run_allowed, dry_run_denied)"
    );
    describe_counter!(
        "istio_tcp_connections_opened_total",
        "TCP connections opened (Istio standard)"
    );
    describe_counter!(
        "istio_tcp_connections_closed_total",
        "TCP connections closed (Istio standard)"
    );
    describe_counter!(
        "istio_tcp_received_bytes_total",
        "Bytes from the client towards the server (Istio standard)"
    );
    describe_counter!(
        "istio_tcp_sent_bytes_total",
        "Bytes from the server back to the client (Istio standard)"
    );
    describe_counter!(
        "weft_observe_events_lost_total",
        "Events of the admin port's observe stream that a watcher too slow to read them lost (traffic never waits for a watcher)"
    );
    describe_counter!(
        "weft_connections_refused_total",
        "Connections refused before they were carried, by direction and reason"
    );
    describe_counter!(
        "weft_connection_outcomes_total",
        "Carried connections by direction and how they ended: ok, no_response (closed \
         before the server sent a byte), idle_timeout, error"
    );
    describe_counter!(
        "weft_outbound_waits_total",
        "Captured connections from a pod the mesh configuration did not name yet that \
         waited for it (for=workload) or for the pod's certificate (for=certificate), by \
         result (found, timed_out)"
    );
    describe_histogram!(
        "weft_outbound_wait_seconds",
        metrics::Unit::Seconds,
        "How long those connections waited"
    );
    describe_histogram!(
        "weft_hbone_handshake_seconds",
        metrics::Unit::Seconds,
        "TLS handshakes of inbound HBONE connections, from accept to a verified peer"
    );
    describe_gauge!(
        "weft_admission_connections",
        "Connections (and inbound tunnels) the agent holds, by state (pending: not yet \
         authenticated; established)"
    );
    describe_gauge!(
        "weft_admission_limit",
        "The most the agent takes on, by limit (total, pending, per_source, \
         pending_per_source: connections, derived from its open-file limit; \
         handshakes_per_source: a second)"
    );
    describe_counter!(
        "weft_hbone_failures_total",
        "Failed HBONE handshakes and tunnels, by direction and reason; a TLS handshake \
         failed on a certificate counts as certificate_expired, certificate_not_yet_valid, \
         certificate_untrusted, wrong_identity (not the expected SPIFFE ID) or \
         certificate_rejected_by_peer (the peer refused ours)"
    );
    describe_counter!(
        "weft_ebpf_events_total",
        "Events counted by the kernel programs, by event"
    );
    describe_gauge!(
        "weft_active_connections",
        "Connections the proxy is carrying now"
    );
    describe_gauge!(
        "weft_hbone_pool_connections",
        "Pooled HBONE connections to other nodes' agents"
    );
    describe_gauge!(
        "weft_endpoints_ejected",
        "Endpoints out of rotation now by outlier detection (listed on the admin port, GET /endpoints/ejected)"
    );
    describe_gauge!(
        "weft_certificate_expiry_seconds",
        "When each workload certificate expires, in Unix seconds"
    );
    describe_gauge!(
        "weft_certificate_ttl_seconds",
        "Seconds until each workload certificate expires"
    );
    describe_counter!(
        "weft_certificate_requests_total",
        "Certificate requests to the mesh CA, by result (issued, failed)"
    );
    describe_counter!(
        "weft_certificate_failures_total",
        "Failed certificate requests, by reason (unreachable, refused, invalid_response, local)"
    );
    describe_counter!(
        "weft_tcp_relays_total",
        "TCP connections carried, outbound and inbound, by how their bytes moved (splice: socket to socket inside the kernel; copy: through the agent)"
    );
    describe_gauge!(
        "weft_config_revision",
        "Revision of the mesh configuration the agent applies"
    );
}

/// A captured connection waited for the mesh configuration to name its source pod
/// (`what` = `workload`) or for that pod's certificate (`certificate`).
pub fn waited(what: &'static str, found: bool, elapsed: Duration) {
    let result = if found { "found" } else { "timed_out" };
    counter!("weft_outbound_waits_total", "for" => what, "result" => result).increment(1);
    histogram!("weft_outbound_wait_seconds", "for" => what).record(elapsed.as_secs_f64());
}

/// Istio's `connection_security_policy` of a connection: `mutual_tls` or `none`.
pub fn security(mutual_tls: bool) -> &'static str {
    if mutual_tls { "mutual_tls" } else { "none" }
}

/// A TCP connection carried by `mode`: `splice` or `copy` ([`super::relay`]).
pub fn relayed(mode: &'static str) {
    counter!("weft_tcp_relays_total", "mode" => mode).increment(1);
}

/// How long an inbound TLS handshake took, from accept() to a verified peer.
pub fn handshake(elapsed: Duration) {
    histogram!("weft_hbone_handshake_seconds", "direction" => "inbound")
        .record(elapsed.as_secs_f64());
}

/// A connection the proxy refused before carrying it, by reason.
pub fn refused(direction: &'static str, reason: &'static str) {
    counter!("weft_connections_refused_total", "direction" => direction, "reason" => reason)
        .increment(1);
}

/// A failed HBONE handshake or tunnel, by reason. A TLS handshake that failed on a
/// certificate counts as [`crate::tls::handshake_failure_reason`] says
/// (`certificate_expired`, `certificate_not_yet_valid`, `certificate_untrusted`,
/// `wrong_identity`, `certificate_rejected_by_peer`); any other TLS failure as
/// `tls_handshake` inbound, as `dial` (like a failure to connect) outbound.
pub fn hbone_failure(direction: &'static str, reason: &'static str) {
    counter!("weft_hbone_failures_total", "direction" => direction, "reason" => reason)
        .increment(1);
}
