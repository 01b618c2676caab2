//! The exporter task: takes finished spans off the bounded queue in batches (up to
//! [`BATCH`] spans, or what arrived within [`INTERVAL`] of a batch's first span) and
//! sends each to the collector as an OTLP `ExportTraceServiceRequest` over gRPC. A
//! batch the collector does not take is logged, counted and dropped; the channel
//! connects again on the next batch.

use std::time::{Duration, SystemTime};

use http::Uri;
use metrics::counter;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{self as otlp, ResourceSpans, ScopeSpans, span, status},
};
use tokio::{sync::mpsc, time::Instant};
use tonic::transport::{Channel, Endpoint};

use super::{AttrValue, Finished, SpanKind};
use crate::logging::{Throttle, held_back};

/// The most spans one export request carries.
const BATCH: usize = 512;
/// How long the first span of a batch waits for more.
const INTERVAL: Duration = Duration::from_secs(1);

/// Why a batch of spans did not reach the collector.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "the OTLP collector at {endpoint} cannot be reached ({code:?}: {message}): check the trace endpoint's host and port (OTLP/gRPC is usually 4317), that the collector runs, and that it takes plaintext gRPC"
    )]
    Unreachable {
        endpoint: Uri,
        code: tonic::Code,
        message: String,
    },
    #[error(
        "the OTLP collector at {endpoint} refused the spans ({code:?}: {message}): check that it has an OTLP gRPC receiver in a traces pipeline, and its log"
    )]
    Refused {
        endpoint: Uri,
        code: tonic::Code,
        message: String,
    },
    #[error(
        "the OTLP collector at {endpoint} rejected {rejected} of the spans ({message}): check its log and limits"
    )]
    Partial {
        endpoint: Uri,
        rejected: u64,
        message: String,
    },
}

/// Spawns the exporter of spans to `endpoint` on the current runtime; it ends when
/// every sender of the queue it returns is gone, after sending what is left.
pub(super) fn spawn(endpoint: Uri, node: &str, queue: usize) -> mpsc::Sender<Finished> {
    let (sender, receiver) = mpsc::channel(queue);
    let channel = Endpoint::from(endpoint.clone())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let exporter = Exporter {
        client: TraceServiceClient::new(channel),
        endpoint,
        resource: resource(node),
    };
    tokio::spawn(run(receiver, exporter));
    sender
}

async fn run(mut queue: mpsc::Receiver<Finished>, mut exporter: Exporter) {
    static FAILED: Throttle = Throttle::new();
    while let Some(batch) = next_batch(&mut queue).await {
        let count = batch.len() as u64;
        let rejected = match exporter.export(batch).await {
            Ok(()) => 0,
            Err(err) => {
                let rejected = match &err {
                    ExportError::Partial { rejected, .. } => (*rejected).min(count),
                    _ => count,
                };
                if let Some(held) = FAILED.allow() {
                    log::warn!("dropped {rejected} spans: {err}{}", held_back(held));
                }
                rejected
            }
        };
        counter!("weft_spans_exported_total", "result" => "ok").increment(count - rejected);
        counter!("weft_spans_exported_total", "result" => "error").increment(rejected);
    }
}

/// The next batch: the spans that arrive within [`INTERVAL`] of the first, at most
/// [`BATCH`]; `None` once the queue is closed and empty.
async fn next_batch(queue: &mut mpsc::Receiver<Finished>) -> Option<Vec<Finished>> {
    let mut batch = Vec::new();
    if queue.recv_many(&mut batch, BATCH).await == 0 {
        return None;
    }
    let deadline = Instant::now() + INTERVAL;
    while batch.len() < BATCH {
        let room = BATCH - batch.len();
        tokio::select! {
            received = queue.recv_many(&mut batch, room) => if received == 0 {
                break;
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Some(batch)
}

#[derive(Debug)]
struct Exporter {
    client: TraceServiceClient<Channel>,
    endpoint: Uri,
    resource: Resource,
}

impl Exporter {
    async fn export(&mut self, batch: Vec<Finished>) -> Result<(), ExportError> {
        let request = request(self.resource.clone(), batch);
        let response = self.client.export(request).await.map_err(|status| {
            let (endpoint, code) = (self.endpoint.clone(), status.code());
            let message = status.message().to_owned();
            match code {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    ExportError::Unreachable {
                        endpoint,
                        code,
                        message,
                    }
                }
                _ => ExportError::Refused {
                    endpoint,
                    code,
                    message,
                },
            }
        })?;
        match response.into_inner().partial_success {
            Some(partial) if partial.rejected_spans > 0 => Err(ExportError::Partial {
                endpoint: self.endpoint.clone(),
                rejected: partial.rejected_spans.unsigned_abs(),
                message: partial.error_message,
            }),
            _ => Ok(()),
        }
    }
}

/// The agent's resource: `service.name` `weft-agent` and `k8s.node.name`.
fn resource(node: &str) -> Resource {
    Resource {
        attributes: vec![
            key_value("service.name", AttrValue::from("weft-agent")),
            key_value("k8s.node.name", AttrValue::from(node.to_owned())),
        ],
        ..Resource::default()
    }
}

/// The export request of a batch of spans, all from one resource and scope.
fn request(resource: Resource, batch: Vec<Finished>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "weft-agent".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..InstrumentationScope::default()
                }),
                spans: batch.into_iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn span(finished: Finished) -> otlp::Span {
    let context = finished.context;
    let kind = match finished.kind {
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Server => span::SpanKind::Server,
    };
    let status = finished.error.map(|message| otlp::Status {
        message,
        code: status::StatusCode::Error.into(),
    });
    otlp::Span {
        trace_id: context.trace_id.to_vec(),
        span_id: context.span_id.to_vec(),
        parent_span_id: context
            .parent_span_id
            .map(|parent| parent.to_vec())
            .unwrap_or_default(),
        trace_state: context
            .tracestate
            .and_then(|state| state.to_str().ok().map(str::to_owned))
            .unwrap_or_default(),
        // The W3C trace flags: sampled, as every exported span is.
        flags: u32::from(context.sampled),
        name: finished.name,
        kind: kind.into(),
        start_time_unix_nano: unix_nanos(finished.start),
        end_time_unix_nano: unix_nanos(finished.end),
        attributes: finished
            .attributes
            .into_iter()
            .map(|(key, value)| key_value(key, value))
            .collect(),
        status,
        ..otlp::Span::default()
    }
}

fn key_value(key: &str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::String(text) => any_value::Value::StringValue(text.into_owned()),
        AttrValue::Int(number) => any_value::Value::IntValue(number),
        AttrValue::Bool(flag) => any_value::Value::BoolValue(flag),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::trace::{Format, TraceContext};

    fn finished(name: &str) -> Finished {
        Finished {
            context: TraceContext {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent_span_id: None,
                sampled: true,
                deferred: false,
                tracestate: None,
                format: Format::W3c,
            },
            name: name.to_owned(),
            kind: SpanKind::Server,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
            attributes: vec![("http.request.method", "GET".into())],
            error: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_sent_when_full_or_a_second_after_its_first_span() {
        let (sender, mut queue) = mpsc::channel(2048);
        for index in 0..600 {
            sender.try_send(finished(&index.to_string())).unwrap();
        }
        let start = Instant::now();
        let full = next_batch(&mut queue).await.unwrap();
        assert_eq!(full.len(), BATCH);
        assert_eq!(start.elapsed(), Duration::ZERO);
        let rest = next_batch(&mut queue).await.unwrap();
        assert_eq!(rest.len(), 88);
        assert_eq!(start.elapsed(), INTERVAL);

        // A span that arrives within the second joins the batch; one after, the next.
        let start = Instant::now();
        let later = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            later.try_send(finished("in time")).unwrap();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            later.try_send(finished("late")).unwrap();
        });
        sender.try_send(finished("first")).unwrap();
        let batch = next_batch(&mut queue).await.unwrap();
        let names: Vec<&str> = batch.iter().map(|span| span.name.as_str()).collect();
        assert_eq!(names, ["first", "in time"]);
        assert_eq!(start.elapsed(), INTERVAL);
        let batch = next_batch(&mut queue).await.unwrap();
        assert_eq!(batch[0].name, "late");

        // A closed queue gives what is left at once, then nothing.
        sender.try_send(finished("last")).unwrap();
        drop(sender);
        let start = Instant::now();
        assert_eq!(next_batch(&mut queue).await.unwrap()[0].name, "last");
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(next_batch(&mut queue).await.is_none());
    }

    #[test]
    fn a_finished_span_becomes_an_otlp_span() {
        let mut with_error = finished("GET");
        with_error.context.parent_span_id = Some([3; 8]);
        with_error.context.tracestate = Some(http::HeaderValue::from_static("a=b"));
        with_error.kind = SpanKind::Client;
        with_error.error = Some("connect refused".to_owned());
        with_error.attributes.push(("server.port", 8080_u16.into()));
        with_error.attributes.push(("retried", false.into()));
        let request = request(resource("node7"), vec![finished("GET /"), with_error]);
        let resource_spans = &request.resource_spans[0];
        let keys: Vec<&str> = resource_spans
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        assert_eq!(keys, ["service.name", "k8s.node.name"]);
        let spans = &resource_spans.scope_spans[0].spans;
        assert_eq!(spans[0].parent_span_id, Vec::<u8>::new());
        assert_eq!(spans[0].status, None);
        assert_eq!(spans[0].start_time_unix_nano, 1_000_000_000);
        assert_eq!(spans[0].end_time_unix_nano, 1_500_000_000);
        assert_eq!(spans[0].kind, i32::from(span::SpanKind::Server));
        let span = &spans[1];
        assert_eq!(span.trace_id, vec![1; 16]);
        assert_eq!(span.span_id, vec![2; 8]);
        assert_eq!(span.parent_span_id, vec![3; 8]);
        assert_eq!(span.trace_state, "a=b");
        assert_eq!(span.flags, 1);
        assert_eq!(span.kind, i32::from(span::SpanKind::Client));
        let values: Vec<any_value::Value> = span
            .attributes
            .iter()
            .map(|kv| kv.value.clone().unwrap().value.unwrap())
            .collect();
        assert_eq!(
            values,
            [
                any_value::Value::StringValue("GET".to_owned()),
                any_value::Value::IntValue(8080),
                any_value::Value::BoolValue(false),
            ]
        );
        let status = span.status.clone().unwrap();
        assert_eq!(status.code, i32::from(status::StatusCode::Error));
        assert_eq!(status.message, "connect refused");
    }

    #[tokio::test]
    async fn a_collector_that_is_not_there_is_reported_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let mut exporter = Exporter {
            client: TraceServiceClient::new(Endpoint::from(endpoint.clone()).connect_lazy()),
            endpoint: endpoint.clone(),
            resource: resource("node0"),
        };
        let err = exporter.export(vec![finished("GET")]).await.unwrap_err();
        assert!(matches!(err, ExportError::Unreachable { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&endpoint.to_string()), "{message}");
        assert!(message.contains("4317"), "{message}");
    }
}
