//! Distributed tracing of the requests the agent proxies: the trace context is read
//! from each request ([`extract`]), a span is started for the agent's hop
//! ([`Tracer::start`]) and the context is written for the next hop
//! ([`Span::propagate`]). Sampled spans are exported to an OpenTelemetry collector
//! over OTLP/gRPC by a background task fed through a bounded queue, so a slow or
//! absent collector costs dropped spans, never a blocked request.

mod context;
mod export;

use std::{
    borrow::Cow,
    time::{Instant, SystemTime},
};

use http::{HeaderMap, Uri};
use metrics::counter;
use tokio::sync::mpsc::{self, error::TrySendError};

pub use self::context::{Format, TraceContext, extract, inject};

/// How the agent traces (`weft-agent run` flags).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSettings {
    /// The OTLP/gRPC collector to export spans to, in plaintext (`http://…:4317`);
    /// `None` only propagates trace context.
    pub endpoint: Option<Uri>,
    /// The fraction of new traces to record, from 0 to 1. A request that arrives in a
    /// trace follows its caller's decision instead.
    pub sampling: f64,
    /// How many finished spans may wait for the exporter before new ones are dropped.
    pub queue: usize,
    /// The node's name, for the spans' `k8s.node.name` resource attribute.
    pub node: String,
}

/// Why the trace settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "the trace sampling ratio {0} is not a fraction from 0 to 1: give, say, 0.01 to record one new trace in a hundred"
    )]
    Sampling(f64),
    #[error("a trace span queue of 0 would drop every span: give at least 1, say 4096")]
    Queue,
    #[error(
        "{0} is not a plaintext OTLP/gRPC collector address such as http://otel-collector.observability:4317: the agent exports without TLS, so give http:// and a host"
    )]
    Endpoint(Uri),
}

/// Starts the spans of proxied requests; cheap to clone, one per agent.
#[derive(Clone, Debug)]
pub struct Tracer {
    sampling: f64,
    /// Where finished spans go; `None` when nothing is exported.
    queue: Option<mpsc::Sender<Finished>>,
}

/// Which side of a request a span stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// The agent sent the request on (outbound, towards the server).
    Client,
    /// The agent received the request (inbound, for the server).
    Server,
}

/// An attribute's value: OpenTelemetry's string, integer and boolean kinds.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    String(Cow<'static, str>),
    Int(i64),
    Bool(bool),
}

impl From<&'static str> for AttrValue {
    fn from(value: &'static str) -> Self {
        Self::String(Cow::Borrowed(value))
    }
}

impl From<String> for AttrValue {
    fn from(value: String) -> Self {
        Self::String(Cow::Owned(value))
    }
}

impl From<i64> for AttrValue {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

impl From<i32> for AttrValue {
    fn from(value: i32) -> Self {
        Self::Int(value.into())
    }
}

impl From<u16> for AttrValue {
    fn from(value: u16) -> Self {
        Self::Int(value.into())
    }
}

impl From<u32> for AttrValue {
    fn from(value: u32) -> Self {
        Self::Int(value.into())
    }
}

impl From<u64> for AttrValue {
    /// Saturates at `i64::MAX`, OTLP's largest integer.
    fn from(value: u64) -> Self {
        Self::Int(i64::try_from(value).unwrap_or(i64::MAX))
    }
}

impl From<bool> for AttrValue {
    fn from(value: bool) -> Self {
        Self::Bool(value)
    }
}

/// A span as the exporter sends it.
#[derive(Debug)]
struct Finished {
    /// Trace id, span id, parent span id and `tracestate`.
    context: TraceContext,
    name: String,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<(&'static str, AttrValue)>,
    /// `Some(message)` when the request failed.
    error: Option<String>,
}

/// What a recording span holds until it ends.
#[derive(Debug)]
struct Recording {
    queue: mpsc::Sender<Finished>,
    span: Finished,
    /// For the duration, which the wall clock may get wrong.
    started: Instant,
}

/// The agent's hop of one request. Ends when [`Span::end`] is called or when it is
/// dropped; if it was sampled and the tracer exports, it is queued for export then.
#[derive(Debug)]
pub struct Span {
    /// This span's context: the trace's id, its own span id, its parent's span id.
    context: TraceContext,
    /// What a span that is not recorded carries on to the next hop: the context the
    /// request arrived with, if any, with this hop's sampling decision if the tracer
    /// made one (a tracer that exports nothing leaves a deferred decision deferred).
    carried: Option<TraceContext>,
    recording: Option<Box<Recording>>,
}

impl Tracer {
    /// A tracer that exports sampled spans to `settings.endpoint` (if set) from a task
    /// spawned on the current tokio runtime (so it must be called inside one).
    pub fn new(settings: TraceSettings) -> Result<Self, SettingsError> {
        if !(0.0..=1.0).contains(&settings.sampling) {
            return Err(SettingsError::Sampling(settings.sampling));
        }
        if settings.queue == 0 {
            return Err(SettingsError::Queue);
        }
        let queue = match settings.endpoint {
            None => None,
            Some(endpoint) => {
                if endpoint.scheme() != Some(&http::uri::Scheme::HTTP) || endpoint.host().is_none()
                {
                    return Err(SettingsError::Endpoint(endpoint));
                }
                Some(export::spawn(endpoint, &settings.node, settings.queue))
            }
        };
        Ok(Self {
            sampling: settings.sampling,
            queue,
        })
    }

    /// A tracer that records nothing and starts no trace, but carries the context of
    /// requests that arrive in one.
    pub fn disabled() -> Self {
        Self {
            sampling: 0.0,
            queue: None,
        }
    }

    /// Starts the span of a request that arrived with `parent` (from [`extract`]), or
    /// of a new trace. It is sampled as its parent is, else with the tracer's sampling
    /// ratio.
    pub fn start(
        &self,
        kind: SpanKind,
        name: impl Into<String>,
        parent: Option<&TraceContext>,
    ) -> Span {
        let sampled = sample(parent, self.sampling, fastrand::f64);
        let context = TraceContext {
            trace_id: parent.map_or_else(
                || random_id(|| fastrand::u128(..)),
                |parent| parent.trace_id,
            ),
            span_id: random_id(|| fastrand::u128(..)),
            parent_span_id: parent.map(|parent| parent.span_id),
            sampled,
            deferred: false,
            tracestate: parent.and_then(|parent| parent.tracestate.clone()),
            format: parent.map(|parent| parent.format).unwrap_or_default(),
        };
        let recording = match &self.queue {
            Some(queue) if sampled => Some(Box::new(Recording {
                queue: queue.clone(),
                span: Finished {
                    context: context.clone(),
                    name: name.into(),
                    kind,
                    start: SystemTime::now(),
                    end: SystemTime::UNIX_EPOCH,
                    attributes: Vec::new(),
                    error: None,
                },
                started: Instant::now(),
            })),
            _ => None,
        };
        Span {
            context,
            carried: parent.map(|parent| match &self.queue {
                Some(_) => TraceContext {
                    sampled,
                    deferred: false,
                    ..parent.clone()
                },
                None => parent.clone(),
            }),
            recording,
        }
    }
}

/// The `traceparent` of a new sampled trace, for an HBONE CONNECT that no traced
/// request opened (a TCP connection's tunnel), as Istio's HBONE peers send one.
pub fn new_traceparent() -> String {
    let context = TraceContext {
        trace_id: random_id(|| fastrand::u128(..)),
        span_id: random_id(|| fastrand::u128(..)),
        parent_span_id: None,
        sampled: true,
        deferred: false,
        tracestate: None,
        format: Format::default(),
    };
    let mut headers = HeaderMap::new();
    inject(&context, &mut headers);
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Whether a span is sampled: as its parent decided, else by `draw()` (uniform in
/// `[0, 1)`) against `ratio`.
fn sample(parent: Option<&TraceContext>, ratio: f64, draw: impl FnOnce() -> f64) -> bool {
    match parent {
        Some(parent) if !parent.deferred => parent.sampled,
        _ => draw() < ratio,
    }
}

/// A random id of `N` bytes (the low ones of `random()`), never all zero.
fn random_id<const N: usize>(mut random: impl FnMut() -> u128) -> [u8; N] {
    loop {
        let bytes = random().to_be_bytes();
        let id: [u8; N] = bytes[16 - N..]
            .try_into()
            .expect("ids are at most 16 bytes");
        if id.iter().any(|byte| *byte != 0) {
            return id;
        }
    }
}

impl Span {
    /// This span's context: a next hop's span is its child. [`Span::propagate`]
    /// writes it into a request only when the span is recorded.
    pub fn context(&self) -> TraceContext {
        self.context.clone()
    }

    /// Whether the span will be exported; attributes of a span that is not are
    /// dropped, so a caller may skip computing them.
    pub fn is_recording(&self) -> bool {
        self.recording.is_some()
    }

    /// Writes the trace context for the next hop into its request's headers: this
    /// span's if it is recorded (so the next hop's span is its child), else the
    /// context the request arrived with, carried on unchanged but for this hop's
    /// sampling decision; and nothing for a request that arrived outside a trace and
    /// is not recorded, so that the applications' own sampling stays theirs.
    pub fn propagate(&self, headers: &mut HeaderMap) {
        if self.is_recording() {
            inject(&self.context, headers);
        } else if let Some(carried) = &self.carried {
            inject(carried, headers);
        }
    }

    /// Sets an attribute, such as `http.request.method` or `http.response.status_code`
    /// (OpenTelemetry's semantic conventions name them).
    pub fn set(&mut self, key: &'static str, value: impl Into<AttrValue>) {
        if let Some(recording) = &mut self.recording {
            let value = value.into();
            let attributes = &mut recording.span.attributes;
            match attributes.iter_mut().find(|(name, _)| *name == key) {
                Some((_, old)) => *old = value,
                None => attributes.push((key, value)),
            }
        }
    }

    /// Marks the span failed, with what went wrong.
    pub fn set_error(&mut self, message: impl Into<String>) {
        if let Some(recording) = &mut self.recording {
            recording.span.error = Some(message.into());
        }
    }

    /// Ends the span now (dropping it does too).
    pub fn end(self) {}
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(recording) = self.recording.take() else {
            return;
        };
        let Recording {
            queue,
            mut span,
            started,
        } = *recording;
        span.end = span.start + started.elapsed();
        match queue.try_send(span) {
            Ok(()) => {}
            // The exporter is behind (or gone with its runtime): drop the span rather
            // than make the request wait.
            Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                counter!("weft_spans_dropped_total").increment(1);
            }
        }
    }
}

/// Registers the help text of the tracing series.
pub fn describe() {
    metrics::describe_counter!(
        "weft_spans_dropped_total",
        "Finished spans dropped because the export queue was full"
    );
    metrics::describe_counter!(
        "weft_spans_exported_total",
        "Spans sent to the OTLP collector, by result (ok; error: the collector could not \
         be reached or refused them, and they were dropped)"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use opentelemetry_proto::tonic::{
        collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
        common::v1::any_value::Value,
    };
    use tokio::net::TcpListener;

    use super::*;

    fn parent(sampled: bool, deferred: bool) -> TraceContext {
        TraceContext {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: None,
            sampled,
            deferred,
            tracestate: None,
            format: Format::B3Multi,
        }
    }

    #[test]
    fn sampling_follows_the_parent_else_the_ratio() {
        let sampled = parent(true, false);
        let unsampled = parent(false, false);
        let deferred = parent(false, true);
        let cases = [
            // (parent, ratio, draw, sampled)
            (None, 0.0, 0.0, false),
            (None, 0.0, 0.999, false),
            (None, 1.0, 0.0, true),
            (None, 1.0, 0.999_999, true),
            (None, 0.25, 0.2, true),
            (None, 0.25, 0.3, false),
            (Some(&sampled), 0.0, 0.5, true),
            (Some(&unsampled), 1.0, 0.5, false),
            (Some(&deferred), 1.0, 0.5, true),
            (Some(&deferred), 0.0, 0.5, false),
        ];
        for (parent, ratio, draw, expected) in cases {
            assert_eq!(
                sample(parent, ratio, || draw),
                expected,
                "{parent:?} {ratio} {draw}"
            );
        }
    }

    fn settings(endpoint: Option<Uri>, sampling: f64, queue: usize) -> TraceSettings {
        TraceSettings {
            endpoint,
            sampling,
            queue,
            node: "node0".to_owned(),
        }
    }

    #[tokio::test]
    async fn settings_that_cannot_work_are_refused_with_what_to_give() {
        let uri = |text: &str| Some(text.parse::<Uri>().unwrap());
        for (settings, expected) in [
            (settings(None, 1.5, 1), SettingsError::Sampling(1.5)),
            (
                settings(None, f64::NAN, 1),
                SettingsError::Sampling(f64::NAN),
            ),
            (settings(None, 0.5, 0), SettingsError::Queue),
            (
                settings(uri("https://collector:4317"), 0.5, 1),
                SettingsError::Endpoint("https://collector:4317".parse().unwrap()),
            ),
            (
                settings(uri("/v1/traces"), 0.5, 1),
                SettingsError::Endpoint("/v1/traces".parse().unwrap()),
            ),
        ] {
            let err = Tracer::new(settings).unwrap_err();
            // NaN is not equal to itself: compare the messages.
            assert_eq!(err.to_string(), expected.to_string());
        }
        assert!(
            SettingsError::Endpoint("https://c".parse().unwrap())
                .to_string()
                .contains("http://")
        );
    }

    #[test]
    fn ids_are_random_and_never_zero() {
        let mut zero_then_one = [0_u128, 1 << 64, 1].into_iter();
        let id: [u8; 8] = random_id(|| zero_then_one.next().unwrap());
        assert_eq!(id, [0, 0, 0, 0, 0, 0, 0, 1]);
        let tracer = Tracer::disabled();
        let one = tracer.start(SpanKind::Server, "a", None).context();
        let two = tracer.start(SpanKind::Server, "b", None).context();
        assert_ne!(one.trace_id, two.trace_id);
        assert_ne!(one.span_id, two.span_id);
        assert!(one.trace_id.iter().any(|byte| *byte != 0));
    }

    #[test]
    fn a_new_traceparent_starts_a_sampled_trace_of_its_own() {
        let (one, two) = (new_traceparent(), new_traceparent());
        assert_ne!(one, two);
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", one.parse().unwrap());
        let context = extract(&headers).unwrap_or_else(|| panic!("{one} is well formed"));
        assert!(context.sampled && context.parent_span_id.is_none(), "{one}");
    }

    #[test]
    fn a_child_span_continues_its_parents_trace() {
        let tracer = Tracer::new(settings(None, 1.0, 1)).unwrap();
        let mut parent = parent(false, true);
        parent.tracestate = Some(http::HeaderValue::from_static("a=b"));
        let child = tracer
            .start(SpanKind::Client, "GET", Some(&parent))
            .context();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        assert_eq!(child.parent_span_id, Some(parent.span_id));
        assert_eq!(child.tracestate, parent.tracestate);
        assert_eq!(child.format, Format::B3Multi);
        // The deferred decision was drawn: ratio 1.
        assert!(child.sampled && !child.deferred);
        let root = tracer.start(SpanKind::Server, "GET", None).context();
        assert_eq!((root.parent_span_id, root.format), (None, Format::W3c));
        assert!(root.sampled);
    }

    #[test]
    fn a_span_that_is_not_recorded_carries_the_callers_context_unchanged() {
        let tracer = Tracer::disabled();
        let caller = parent(true, false);
        let span = tracer.start(SpanKind::Server, "GET", Some(&caller));
        assert!(!span.is_recording());
        let mut headers = HeaderMap::new();
        span.propagate(&mut headers);
        assert_eq!(extract(&headers), Some(caller));

        // A deferred decision stays the next hop's to make.
        let deferred = parent(false, true);
        let span = tracer.start(SpanKind::Server, "GET", Some(&deferred));
        let mut headers = HeaderMap::new();
        span.propagate(&mut headers);
        assert!(!headers.contains_key("x-b3-sampled"));
        assert_eq!(extract(&headers).unwrap().span_id, deferred.span_id);

        // A tracer that exports, but drew no sample, tells the next hop so.
        let (sender, _queue) = mpsc::channel(1);
        let exporting = Tracer {
            sampling: 0.0,
            queue: Some(sender),
        };
        let span = exporting.start(SpanKind::Server, "GET", Some(&deferred));
        assert!(!span.is_recording());
        let mut headers = HeaderMap::new();
        span.propagate(&mut headers);
        assert_eq!(headers["x-b3-sampled"], "0");
        assert_eq!(extract(&headers).unwrap().span_id, deferred.span_id);

        // Outside a trace it writes nothing: the applications decide.
        let span = tracer.start(SpanKind::Server, "GET", None);
        let mut headers = HeaderMap::new();
        span.propagate(&mut headers);
        assert!(headers.is_empty());
        assert!(!span.context().sampled);
    }

    /// A collector that hands every request it receives to the test.
    struct Collector(mpsc::UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let _ = self.0.send(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    async fn collector() -> (Uri, mpsc::UnboundedReceiver<ExportTraceServiceRequest>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Collector(sender)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (format!("http://{address}").parse().unwrap(), receiver)
    }

    fn string(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> Value {
        value.clone().unwrap().value.unwrap()
    }

    #[tokio::test]
    async fn sampled_spans_reach_the_collector_with_their_links_and_attributes() {
        let (endpoint, mut received) = collector().await;
        let tracer = Tracer::new(settings(Some(endpoint), 0.0, 16)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let caller = extract(&headers).unwrap();
        let mut server = tracer.start(SpanKind::Server, "GET /cart", Some(&caller));
        server.set("http.request.method", "GET");
        server.set("http.response.status_code", 503_u16);
        server.set("http.response.status_code", 200_u16);
        let mut client = tracer.start(SpanKind::Client, "GET", Some(&server.context()));
        client.set("server.address", "cart.shop".to_owned());
        client.set_error("upstream reset the stream");
        let mut next = HeaderMap::new();
        client.propagate(&mut next);
        assert_eq!(extract(&next).unwrap().span_id, client.context().span_id);
        client.end();
        server.end();
        // Not sampled (no parent, ratio 0): never sent.
        tracer.start(SpanKind::Server, "unsampled", None).end();
        drop(tracer);

        let mut spans = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while spans.len() < 2 {
            let request = tokio::time::timeout_at(deadline, received.recv())
                .await
                .expect("the spans within 10 s")
                .expect("the collector runs");
            for resource_spans in request.resource_spans {
                let resource = resource_spans.resource.unwrap();
                let attributes: Vec<(String, Value)> = resource
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), string(&kv.value)))
                    .collect();
                assert!(attributes.contains(&(
                    "service.name".to_owned(),
                    Value::StringValue("weft-agent".to_owned())
                )));
                assert!(attributes.contains(&(
                    "k8s.node.name".to_owned(),
                    Value::StringValue("node0".to_owned())
                )));
                for scope in resource_spans.scope_spans {
                    spans.extend(scope.spans);
                }
            }
        }
        assert_eq!(spans.len(), 2);
        let find = |name: &str| spans.iter().find(|span| span.name == name).unwrap();
        let (server, client) = (find("GET /cart"), find("GET"));
        assert_eq!(server.trace_id, caller.trace_id);
        assert_eq!(client.trace_id, caller.trace_id);
        assert_eq!(server.parent_span_id, caller.span_id);
        assert_eq!(client.parent_span_id, server.span_id);
        assert_eq!(server.kind, 2);
        assert_eq!(client.kind, 3);
        assert!(server.end_time_unix_nano >= server.start_time_unix_nano);
        let attribute = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
            let values: Vec<Value> = span
                .attributes
                .iter()
                .filter(|kv| kv.key == key)
                .map(|kv| string(&kv.value))
                .collect();
            assert_eq!(values.len(), 1, "{key}");
            values[0].clone()
        };
        assert_eq!(
            attribute(server, "http.request.method"),
            Value::StringValue("GET".to_owned())
        );
        assert_eq!(
            attribute(server, "http.response.status_code"),
            Value::IntValue(200)
        );
        assert_eq!(
            attribute(client, "server.address"),
            Value::StringValue("cart.shop".to_owned())
        );
        let status = client.status.clone().unwrap();
        assert_eq!(status.code, 2);
        assert_eq!(status.message, "upstream reset the stream");
        assert_eq!(server.status.clone().unwrap_or_default().code, 0);
    }

    #[test]
    fn spans_beyond_a_full_queue_are_dropped_and_counted() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        runtime.block_on(async {
            // The exporter task cannot run until this block yields: the queue of 2
            // holds the first two spans and the other three are dropped.
            let endpoint = "http://127.0.0.1:9".parse().unwrap();
            let tracer = Tracer::new(settings(Some(endpoint), 1.0, 2)).unwrap();
            metrics::with_local_recorder(&recorder, || {
                for _ in 0..5 {
                    tracer.start(SpanKind::Client, "GET", None).end();
                }
            });
        });
        let rendered = handle.render();
        assert!(
            rendered.contains("weft_spans_dropped_total 3"),
            "{rendered}"
        );
    }
}
