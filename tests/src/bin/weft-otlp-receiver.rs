//! An OTLP/gRPC trace receiver for the end-to-end tests: it takes what agents export
//! and prints it for the test to read. Its first stdout line is `listening <addr>`;
//! then one JSON line per span, flushed at once: `{"trace_id", "span_id",
//! "parent_span_id" ("" for a root), "name", "kind", "attributes": {…}, "resource":
//! {…}}`, with ids in lowercase hex.
//!
//! Usage: `weft-otlp-receiver --listen ADDR:PORT` (port 0 picks a free one).

use std::{io::Write, net::SocketAddr};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::span::SpanKind,
};
use serde_json::{Map, json};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen: SocketAddr = match args.as_slice() {
        [flag, address] if flag == "--listen" => address.parse().unwrap_or_else(|err| {
            eprintln!("--listen {address}: {err}");
            std::process::exit(2);
        }),
        _ => {
            eprintln!("usage: weft-otlp-receiver --listen ADDR:PORT");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(listen).await.unwrap_or_else(|err| {
        eprintln!("cannot listen on {listen}: {err}");
        std::process::exit(1);
    });
    let out = Printer;
    out.line(&format!(
        "listening {}",
        listener
            .local_addr()
            .expect("a bound socket has an address")
    ));
    let served = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(out))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await;
    if let Err(err) = served {
        eprintln!("serving OTLP: {err}");
        std::process::exit(1);
    }
}

/// Writes whole lines to stdout, one at a time.
struct Printer;

impl Printer {
    fn line(&self, line: &str) {
        let mut stdout = std::io::stdout().lock();
        // The test stopped reading: nothing left to print for.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            std::process::exit(0);
        }
    }
}

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource_spans in request.into_inner().resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .map(|resource| resource.attributes)
                    .unwrap_or_default(),
            );
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    let kind = match SpanKind::try_from(span.kind) {
                        Ok(SpanKind::Internal) => "internal",
                        Ok(SpanKind::Server) => "server",
                        Ok(SpanKind::Client) => "client",
                        Ok(SpanKind::Producer) => "producer",
                        Ok(SpanKind::Consumer) => "consumer",
                        Ok(SpanKind::Unspecified) | Err(_) => "unspecified",
                    };
                    let line = json!({
                        "trace_id": hex(&span.trace_id),
                        "span_id": hex(&span.span_id),
                        "parent_span_id": hex(&span.parent_span_id),
                        "name": span.name,
                        "kind": kind,
                        "attributes": attributes(span.attributes),
                        "resource": resource,
                    });
                    self.line(&line.to_string());
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(attributes: Vec<KeyValue>) -> serde_json::Value {
    let map: Map<String, serde_json::Value> = attributes
        .into_iter()
        .map(|kv| (kv.key, kv.value.map_or(serde_json::Value::Null, value)))
        .collect();
    serde_json::Value::Object(map)
}

fn value(any: AnyValue) -> serde_json::Value {
    match any.value {
        None => serde_json::Value::Null,
        Some(Value::StringValue(text)) => text.into(),
        Some(Value::BoolValue(flag)) => flag.into(),
        Some(Value::IntValue(number)) => number.into(),
        Some(Value::DoubleValue(number)) => number.into(),
        Some(Value::BytesValue(bytes)) => hex(&bytes).into(),
        Some(Value::ArrayValue(array)) => array.values.into_iter().map(value).collect(),
        Some(Value::KvlistValue(list)) => attributes(list.values),
        // An index into a string table that only profiles carry.
        Some(Value::StringValueStrindex(index)) => index.into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
