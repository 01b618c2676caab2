//! The client of `weft-echo`'s gRPC and WebSocket echoes (the `weft-client` binary).
//!
//! The call shapes ([`Shape`]) write one JSON object per line: each reply as the server sent it (`pod`, `peer`, `message`,
//! `metadata`, and `index` or `count`), and a call that ended with a status other than OK
//! as a [`StatusLine`]. A call that asked for a status code ([`Ask::fail_with`]) and ended
//! with it went as asked; a call returns how many did not. All calls of one command
//! go over one tonic `Channel`, that is one HTTP/2 connection, which is what a mesh sees
//! of a real gRPC client.
//!
//! [`grpc_load`] puts unary calls on several connections, as fast as a number of callers
//! go (closed loop) or at a fixed rate (open loop), and reports a [`LoadReport`];
//! `cargo xtask bench` runs it. [`websocket`] checks that messages come back unchanged.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _, stream};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::echo_grpc::proto::echo_client::EchoClient;
use crate::echo_grpc::proto::{EchoRequest, ServerStreamRequest};
use crate::error_chain;

/// Something that kept a command from running; a call that ends with an unexpected
/// status is not one of these, it is reported as a [`StatusLine`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{target:?} is not a gRPC target: expected http://HOST:PORT")]
    Target { target: String },
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
    #[error("cannot open a WebSocket to {url}: {reason}")]
    WebSocketConnect { url: String, reason: String },
    #[error("the WebSocket to {url} failed: {reason}")]
    WebSocket { url: String, reason: String },
    #[error("no message from {url} within {timeout:?}")]
    WebSocketTimeout { url: String, timeout: Duration },
    #[error("{url} closed the WebSocket after {echoed} of {messages} echoes")]
    WebSocketClosed {
        url: String,
        echoed: u32,
        messages: u32,
    },
    #[error("{url} opened with {got:?}, not {{\"pod\":\"<name>\"}}")]
    WebSocketHello { url: String, got: String },
    #[error("{url} echoed message {index} as {got:?}; sent {sent:?}")]
    WebSocketMismatch {
        url: String,
        index: u32,
        sent: String,
        got: String,
    },
}

/// A `--metadata` argument that is not `key=value` with an ASCII key and value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("metadata must be key=value, got {0:?}")]
    NoEquals(String),
    #[error(
        "{0:?} is not a metadata key (lowercase letters, digits, '-', '_' and '.'; keys ending in -bin carry binary values, which this client does not send)"
    )]
    Key(String),
    #[error("the value of {0:?} must be visible ASCII")]
    Value(String),
}

/// Parses `key=value` into metadata to send with every call.
pub fn parse_metadata(text: &str) -> Result<(AsciiMetadataKey, AsciiMetadataValue), MetadataError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| MetadataError::NoEquals(text.to_owned()))?;
    let parsed_key =
        AsciiMetadataKey::from_bytes(key.as_bytes()).map_err(|_| MetadataError::Key(key.into()))?;
    let value =
        AsciiMetadataValue::try_from(value).map_err(|_| MetadataError::Value(key.into()))?;
    Ok((parsed_key, value))
}

/// What every message of a call asks the server for.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// The text to echo.
    pub message: String,
    /// The status code the call should end with instead of the last reply.
    pub fail_with: Option<Code>,
    /// The status message to go with it (the server writes one when empty).
    pub fail_message: String,
    /// Milliseconds the server waits before each reply.
    pub delay_ms: u32,
    /// Sent as request metadata.
    pub metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

impl Ask {
    /// The message to send; only the `last` message of a call carries the failure.
    fn echo_request(&self, last: bool) -> EchoRequest {
        let fail_with = self.fail_with.filter(|_| last);
        EchoRequest {
            message: self.message.clone(),
            fail_with_code: fail_with.map_or(0, |code| code as i32),
            fail_message: if fail_with.is_some() {
                self.fail_message.clone()
            } else {
                String::new()
            },
            delay_ms: self.delay_ms,
        }
    }

    /// `message` as a call with the metadata.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (key, value) in &self.metadata {
            request.metadata_mut().append(key.clone(), value.clone());
        }
        request
    }
}

/// How a call that did not end with OK is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusLine {
    /// The gRPC status code.
    pub code: i32,
    /// The status message, with the causes of a status the client made up itself.
    pub message: String,
    /// The metadata that came with the status (the trailers, for a status the server
    /// sent), e.g. `x-weft-pod`.
    pub metadata: BTreeMap<String, String>,
}

impl From<&Status> for StatusLine {
    fn from(status: &Status) -> Self {
        let mut message = status.message().to_owned();
        if let Some(source) = std::error::Error::source(status) {
            let cause = error_chain(source);
            if !message.contains(&cause) {
                message = format!("{message}: {cause}");
            }
        }
        Self {
            code: status.code() as i32,
            message,
            metadata: crate::header_strings(&status.metadata().clone().into_headers()),
        }
    }
}

/// Opens one HTTP/2 connection (h2c) to `target`, `http://HOST:PORT`. Connecting and
/// each call time out after `timeout`.
pub async fn connect(target: &str, timeout: Duration) -> Result<EchoClient<Channel>, ClientError> {
    let bad_target = || ClientError::Target {
        target: target.to_owned(),
    };
    let endpoint = Endpoint::from_shared(target.to_owned()).map_err(|_| bad_target())?;
    if endpoint.uri().scheme_str() != Some("http") || endpoint.uri().host().is_none() {
        return Err(bad_target());
    }
    let channel = endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|err| ClientError::Connect {
            target: target.to_owned(),
            reason: error_chain(&err),
        })?;
    Ok(EchoClient::new(channel))
}

/// Writes `line` as one line of JSON and flushes it, so that a reader sees it at once.
pub fn emit(out: &mut impl Write, line: &impl Serialize) -> Result<(), ClientError> {
    serde_json::to_writer(&mut *out, line).map_err(io::Error::from)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// Writes the status a call ended with; returns whether it is the one asked for.
fn ended(out: &mut impl Write, ask: &Ask, status: &Status) -> Result<bool, ClientError> {
    emit(out, &StatusLine::from(status))?;
    Ok(ask.fail_with == Some(status.code()))
}

/// The four shapes of gRPC call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `count` unary calls, one after the other.
    Unary,
    /// One call asking for `count` replies (and then the status asked for).
    ServerStream,
    /// One call sending `count` messages, the last carrying the failure asked for.
    ClientStream,
    /// One call sending `count` messages in lockstep, each after the reply to the one
    /// before; the last carries the failure asked for.
    Bidi,
}

impl Shape {
    /// Makes the call(s) of this shape, writing replies and statuses to `out`. Returns how
    /// many calls did not end as asked, or (for streams) brought the wrong replies.
    pub async fn call(
        self,
        client: &mut EchoClient<Channel>,
        ask: &Ask,
        count: u32,
        out: &mut impl Write,
    ) -> Result<u32, ClientError> {
        match self {
            Self::Unary => unary(client, ask, count, out).await,
            Self::ServerStream => server_stream(client, ask, count, out).await,
            Self::ClientStream => client_stream(client, ask, count, out).await,
            Self::Bidi => bidi(client, ask, count, out).await,
        }
    }
}

async fn unary(
    client: &mut EchoClient<Channel>,
    ask: &Ask,
    count: u32,
    out: &mut impl Write,
) -> Result<u32, ClientError> {
    let mut unexpected = 0;
    for _ in 0..count {
        let as_asked = match client.echo(ask.request(ask.echo_request(true))).await {
            Ok(reply) => {
                emit(out, reply.get_ref())?;
                ask.fail_with.is_none()
            }
            Err(status) => ended(out, ask, &status)?,
        };
        unexpected += u32::from(!as_asked);
    }
    Ok(unexpected)
}

/// Fails (1) if the call did not end as asked or brought another number of replies.
async fn server_stream(
    client: &mut EchoClient<Channel>,
    ask: &Ask,
    count: u32,
    out: &mut impl Write,
) -> Result<u32, ClientError> {
    let request = ServerStreamRequest {
        echo: Some(ask.echo_request(true)),
        count,
    };
    let mut replies = match client.server_stream(ask.request(request)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(u32::from(!ended(out, ask, &status)?)),
    };
    let mut received = 0;
    let as_asked = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                emit(out, &reply)?;
                received += 1;
            }
            Ok(None) => break ask.fail_with.is_none(),
            Err(status) => break ended(out, ask, &status)?,
        }
    };
    Ok(u32::from(!as_asked || received != count))
}

/// Fails (1) if the call did not end as asked or the server counted another number of
/// messages.
async fn client_stream(
    client: &mut EchoClient<Channel>,
    ask: &Ask,
    count: u32,
    out: &mut impl Write,
) -> Result<u32, ClientError> {
    let messages: Vec<_> = (0..count)
        .map(|index| ask.echo_request(index + 1 == count))
        .collect();
    let as_asked = match client
        .client_stream(ask.request(stream::iter(messages)))
        .await
    {
        Ok(reply) => {
            let reply = reply.into_inner();
            emit(out, &reply)?;
            ask.fail_with.is_none() && reply.count == count
        }
        Err(status) => ended(out, ask, &status)?,
    };
    Ok(u32::from(!as_asked))
}

/// Fails (1) if the call did not end as asked or a reply did not echo its message in
/// order.
async fn bidi(
    client: &mut EchoClient<Channel>,
    ask: &Ask,
    count: u32,
    out: &mut impl Write,
) -> Result<u32, ClientError> {
    let (mut sender, messages) = futures::channel::mpsc::channel(1);
    let mut replies = match client.bidi(ask.request(messages)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(u32::from(!ended(out, ask, &status)?)),
    };
    let mut in_order = true;
    for index in 0..count {
        // A failed send means the call is over; what ended it comes as the next reply.
        let _ = sender.send(ask.echo_request(index + 1 == count)).await;
        match replies.message().await {
            Ok(Some(reply)) => {
                emit(out, &reply)?;
                in_order &= reply.index == index && reply.message == ask.message;
            }
            Ok(None) => return Ok(1),
            Err(status) => return Ok(u32::from(!(ended(out, ask, &status)? && in_order))),
        }
    }
    drop(sender);
    let as_asked = match replies.message().await {
        Ok(None) => ask.fail_with.is_none(),
        Ok(Some(reply)) => {
            emit(out, &reply)?;
            false
        }
        Err(status) => ended(out, ask, &status)?,
    };
    Ok(u32::from(!(as_asked && in_order)))
}

/// One `grpc load` run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// `http://HOST:PORT`.
    pub target: String,
    /// HTTP/2 connections the calls are spread over.
    pub connections: u32,
    /// Closed loop: callers, each calling again as soon as its last call ended. Open
    /// loop: the most calls in flight; a call due beyond that counts as an error.
    pub concurrency: u32,
    /// Open loop: calls a second over all connections.
    pub rate: Option<u32>,
    /// How long calls are started.
    pub duration: Duration,
    /// A call not answered within this fails.
    pub timeout: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Calls answered with OK.
    pub requests: u64,
    /// Calls that failed (or, open loop, were not started because too many were in
    /// flight).
    pub errors: u64,
    /// Calls answered a second over the run.
    pub rps: f64,
    /// Median latency of the answered calls, in microseconds.
    pub p50_us: Option<u32>,
    /// 99th percentile latency of the answered calls, in microseconds.
    pub p99_us: Option<u32>,
    /// The first failure, to tell what went wrong.
    pub first_error: Option<String>,
    /// Calls sent a second time because they never reached the server: queued on a
    /// connection that closed (after the server's GOAWAY) before they were sent.
    pub retried: u64,
}

/// Outcomes of calls, kept by each caller and merged at the end.
#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    retried: u64,
}

/// One call's outcome, and whether it was sent again.
struct Call {
    outcome: Result<Duration, String>,
    retried: bool,
}

impl From<Result<Duration, String>> for Call {
    fn from(outcome: Result<Duration, String>) -> Self {
        Self {
            outcome,
            retried: false,
        }
    }
}

impl Tally {
    fn record(&mut self, call: impl Into<Call>) {
        let Call { outcome, retried } = call.into();
        self.retried += u64::from(retried);
        match outcome {
            Ok(latency) => self
                .latencies_us
                .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX)),
            Err(err) => {
                self.errors += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.retried += other.retried;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn report(mut self, duration: Duration) -> LoadReport {
        self.latencies_us.sort_unstable();
        let requests = self.latencies_us.len() as u64;
        LoadReport {
            requests,
            errors: self.errors,
            rps: requests as f64 / duration.as_secs_f64().max(f64::EPSILON),
            p50_us: percentile(&self.latencies_us, 50),
            p99_us: percentile(&self.latencies_us, 99),
            first_error: self.first_error,
            retried: self.retried,
        }
    }
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[u32], percent: usize) -> Option<u32> {
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// One timed unary call. A call that never reached the server is sent once more, as
/// gRPC's own clients do (their "transparent retry"; tonic leaves it to its caller):
/// one queued on a connection that closed before it was sent, which is what a server
/// going away with GOAWAY leaves behind.
async fn timed_call(mut client: EchoClient<Channel>) -> Call {
    let started = Instant::now();
    let request = EchoRequest {
        message: "load".to_owned(),
        ..Default::default()
    };
    let mut retried = false;
    loop {
        let outcome = match client.echo(request.clone()).await {
            Ok(_) => Ok(started.elapsed()),
            Err(status) if !retried && never_sent(&status) => {
                retried = true;
                continue;
            }
            Err(status) => Err(StatusLine::from(&status).message),
        };
        return Call { outcome, retried };
    }
}

/// Whether a call failed before it left the client: hyper cancelled it because its
/// connection closed first.
fn never_sent(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Opens the connections of `plan`, then puts unary calls on them for its duration.
pub async fn grpc_load(plan: &LoadPlan) -> Result<LoadReport, ClientError> {
    let mut clients = Vec::new();
    for _ in 0..plan.connections.max(1) {
        clients.push(connect(&plan.target, plan.timeout).await?);
    }
    let concurrency = plan.concurrency.max(1) as usize;
    let end = Instant::now() + plan.duration;
    let mut tally = Tally::default();
    match plan.rate {
        Some(rate) => {
            let mut ticks =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
            // Catch up after a late tick: the schedule, not the last answer, sets the pace.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut calls = JoinSet::new();
            for client in clients.iter().cycle() {
                if ticks.tick().await >= end {
                    break;
                }
                while let Some(joined) = calls.try_join_next() {
                    tally.record(joined.unwrap_or_else(|err| Err(err.to_string()).into()));
                }
                if calls.len() >= concurrency {
                    tally.record(Err::<Duration, _>(format!(
                        "more than {concurrency} calls in flight: the server does not keep up with {rate}/s"
                    )));
                    continue;
                }
                calls.spawn(timed_call(client.clone()));
            }
            while let Some(joined) = calls.join_next().await {
                tally.record(joined.unwrap_or_else(|err| Err(err.to_string()).into()));
            }
        }
        None => {
            let mut callers = JoinSet::new();
            for client in clients.iter().cycle().take(concurrency) {
                let client = client.clone();
                callers.spawn(async move {
                    let mut tally = Tally::default();
                    while Instant::now() < end {
                        tally.record(timed_call(client.clone()).await);
                    }
                    tally
                });
            }
            while let Some(joined) = callers.join_next().await {
                match joined {
                    Ok(caller) => tally.merge(caller),
                    Err(err) => tally.record(Err::<Duration, _>(err.to_string())),
                }
            }
        }
    }
    Ok(tally.report(plan.duration))
}

/// What [`websocket`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebSocketReport {
    /// The pod named by the server's first message.
    pub pod: String,
    /// How many messages came back unchanged.
    pub echoed: u32,
}

/// Opens a WebSocket to `url`, reads the server's `{"pod":..}` greeting, sends `messages`
/// text messages one at a time and checks that each comes back unchanged, then closes.
/// Each wait for the server is bounded by `timeout`.
pub async fn websocket(
    url: &str,
    messages: u32,
    timeout: Duration,
) -> Result<WebSocketReport, ClientError> {
    let (socket, _) = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url))
        .await
        .map_err(|_| ClientError::WebSocketTimeout {
            url: url.to_owned(),
            timeout,
        })?
        .map_err(|err| ClientError::WebSocketConnect {
            url: url.to_owned(),
            reason: error_chain(&err),
        })?;
    let mut session = WebSocketSession {
        url,
        timeout,
        socket,
        messages,
    };

    let hello = session.next_data(0).await?;
    let pod = hello
        .to_text()
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|json| json.get("pod")?.as_str().map(str::to_owned))
        .ok_or_else(|| ClientError::WebSocketHello {
            url: url.to_owned(),
            got: String::from_utf8_lossy(&hello.into_data()).into_owned(),
        })?;
    for index in 0..messages {
        let sent = format!("weft-client message {index}");
        session
            .socket
            .send(Message::text(sent.clone()))
            .await
            .map_err(|err| session.failed(err))?;
        let got = session.next_data(index).await?;
        if got.to_text().ok() != Some(sent.as_str()) {
            return Err(ClientError::WebSocketMismatch {
                url: url.to_owned(),
                index,
                sent,
                got: String::from_utf8_lossy(&got.into_data()).into_owned(),
            });
        }
    }
    session.close().await?;
    Ok(WebSocketReport {
        pod,
        echoed: messages,
    })
}

/// An open WebSocket and what its errors name.
struct WebSocketSession<'a> {
    url: &'a str,
    timeout: Duration,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    messages: u32,
}

impl WebSocketSession<'_> {
    fn failed(&self, err: tungstenite::Error) -> ClientError {
        ClientError::WebSocket {
            url: self.url.to_owned(),
            reason: error_chain(&err),
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::WebSocketTimeout {
            url: self.url.to_owned(),
            timeout: self.timeout,
        }
    }

    /// The next text or binary message, `echoed` messages into the session.
    async fn next_data(&mut self, echoed: u32) -> Result<Message, ClientError> {
        loop {
            let message = tokio::time::timeout(self.timeout, self.socket.next())
                .await
                .map_err(|_| self.timed_out())?;
            match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => return Ok(message),
                Some(Ok(Message::Close(_))) | None => {
                    return Err(ClientError::WebSocketClosed {
                        url: self.url.to_owned(),
                        echoed,
                        messages: self.messages,
                    });
                }
                // Pings are answered by tungstenite.
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(self.failed(err)),
            }
        }
    }

    /// Sends a close frame and waits for the server's.
    async fn close(mut self) -> Result<(), ClientError> {
        self.socket
            .close(None)
            .await
            .map_err(|err| self.failed(err))?;
        loop {
            let message = tokio::time::timeout(self.timeout, self.socket.next())
                .await
                .map_err(|_| self.timed_out())?;
            match message {
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(self.failed(err)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u32> = (1..=200).collect();
        assert_eq!(percentile(&values, 50), Some(100));
        assert_eq!(percentile(&values, 99), Some(198));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn metadata_arguments_are_checked() {
        let (key, value) = parse_metadata("x-team=blue=green").unwrap();
        assert_eq!(key, "x-team");
        assert_eq!(value, "blue=green");
        assert_eq!(
            parse_metadata("x-team"),
            Err(MetadataError::NoEquals("x-team".into()))
        );
        assert_eq!(
            parse_metadata("bad key=1"),
            Err(MetadataError::Key("bad key".into()))
        );
        assert_eq!(
            parse_metadata("trace-bin=AAEC"),
            Err(MetadataError::Key("trace-bin".into()))
        );
        assert_eq!(
            parse_metadata("x-line=a\nb"),
            Err(MetadataError::Value("x-line".into()))
        );
    }

    #[test]
    fn only_the_last_message_asks_to_fail() {
        let ask = Ask {
            message: "hi".into(),
            fail_with: Some(Code::Aborted),
            fail_message: "stop".into(),
            delay_ms: 3,
            metadata: Vec::new(),
        };
        let last = ask.echo_request(true);
        assert_eq!(last.fail_with_code, Code::Aborted as i32);
        assert_eq!(last.fail_message, "stop");
        let before = ask.echo_request(false);
        assert_eq!(before.fail_with_code, 0);
        assert_eq!(before.fail_message, "");
        assert_eq!((before.message.as_str(), before.delay_ms), ("hi", 3));
    }
}
