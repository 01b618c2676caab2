//! In-process tests of the gRPC echo on the HTTP echo's port (127.0.0.1), driven by the
//! generated client and by the `weft-client` binary (whose `ws` command is tried here
//! too).

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{POD, start, within};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;
use weft_workloads::echo_grpc::proto::echo_client::EchoClient;
use weft_workloads::echo_grpc::proto::{EchoRequest, ServerStreamRequest};

async fn connect(addr: SocketAddr) -> EchoClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

fn asking(message: &str, code: Code, fail_message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        fail_with_code: code as i32,
        fail_message: fail_message.to_owned(),
        delay_ms: 0,
    }
}

fn plain(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unary_reply_names_pod_peer_message_and_metadata() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    let mut peers = Vec::new();
    for n in 0..3 {
        let mut request = tonic::Request::new(plain(&format!("hello {n}")));
        request
            .metadata_mut()
            .insert("x-team", "blue".parse().unwrap());
        let response = within("a unary call", echo.echo(request)).await.unwrap();
        assert_eq!(response.metadata().get("x-weft-pod").unwrap(), POD);
        let reply = response.into_inner();
        assert_eq!(reply.pod, POD);
        assert_eq!(reply.message, format!("hello {n}"));
        assert_eq!(reply.index, 0);
        assert_eq!(reply.metadata["x-team"], "blue");
        assert_eq!(reply.metadata["content-type"], "application/grpc");
        assert_eq!(reply.metadata["te"], "trailers");
        peers.push(reply.peer);
    }
    let peer: SocketAddr = peers[0].parse().unwrap();
    assert_eq!(peer.ip(), addr.ip());
    assert_ne!(peer.port(), addr.port());
    assert!(
        peers.iter().all(|other| *other == peers[0]),
        "one channel, yet several connections: {peers:?}"
    );
}

#[tokio::test]
async fn requested_status_arrives_with_its_message_and_pod() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    for code in [
        Code::NotFound,
        Code::PermissionDenied,
        Code::Unavailable,
        Code::Internal,
    ] {
        let message = format!("asked for {code:?}");
        let status = within("a failing call", echo.echo(asking("x", code, &message)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code);
        assert_eq!(status.message(), message);
        assert_eq!(status.metadata().get("x-weft-pod").unwrap(), POD);
    }
    // The failures ended calls, not the connection.
    let reply = echo.echo(plain("still here")).await.unwrap().into_inner();
    assert_eq!(reply.message, "still here");
}

#[tokio::test]
async fn impossible_requests_are_invalid_arguments() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    let mut bad_code = plain("x");
    bad_code.fail_with_code = 17;
    let status = echo.echo(bad_code).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("got 17"), "{}", status.message());

    let mut too_slow = plain("x");
    too_slow.delay_ms = 60_001;
    let status = echo.echo(too_slow).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("60001"), "{}", status.message());

    let too_many = ServerStreamRequest {
        echo: Some(plain("x")),
        count: 100_001,
    };
    let status = echo.server_stream(too_many).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn delay_ms_holds_the_reply_back() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    let mut slow = plain("slow");
    slow.delay_ms = 250;
    let started = Instant::now();
    let reply = within("a delayed call", echo.echo(slow)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "answered after {waited:?}"
    );
    assert_eq!(reply.into_inner().message, "slow");
}

#[tokio::test]
async fn server_stream_sends_count_replies_then_the_status_in_trailers() {
    let addr = start().await;
    let mut echo = connect(addr).await;

    let request = ServerStreamRequest {
        echo: Some(plain("tick")),
        count: 5,
    };
    let mut replies = echo.server_stream(request).await.unwrap().into_inner();
    for index in 0..5 {
        let reply = within("a reply", replies.message()).await.unwrap().unwrap();
        assert_eq!((reply.index, reply.message.as_str()), (index, "tick"));
        assert_eq!(reply.pod, POD);
    }
    assert!(replies.message().await.unwrap().is_none());

    let request = ServerStreamRequest {
        echo: Some(asking("tick", Code::Unavailable, "going away")),
        count: 3,
    };
    let mut replies = echo.server_stream(request).await.unwrap().into_inner();
    for index in 0..3 {
        let reply = within("a reply", replies.message()).await.unwrap().unwrap();
        assert_eq!(reply.index, index);
    }
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "going away");
    // After data, the status can only have come in trailers, and the pod with it.
    assert_eq!(status.metadata().get("x-weft-pod").unwrap(), POD);
}

#[tokio::test]
async fn client_stream_counts_the_messages() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    let messages: Vec<_> = (0..4).map(|n| plain(&format!("m{n}"))).collect();
    let reply = within(
        "a client stream",
        echo.client_stream(futures::stream::iter(messages)),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(reply.count, 4);
    assert_eq!(reply.message, "m3");
    assert_eq!(reply.pod, POD);

    let messages = vec![plain("a"), asking("b", Code::Aborted, "stop"), plain("c")];
    let status = echo
        .client_stream(futures::stream::iter(messages))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "stop");
}

#[tokio::test]
async fn bidi_answers_each_message_as_it_arrives() {
    use futures::SinkExt as _;

    let addr = start().await;
    let mut echo = connect(addr).await;
    let (mut sender, messages) = futures::channel::mpsc::channel(1);
    let mut replies = echo.bidi(messages).await.unwrap().into_inner();
    // Lockstep: the next message goes only once the last was answered.
    for index in 0..3 {
        sender.send(plain(&format!("ping {index}"))).await.unwrap();
        let reply = within("a bidi reply", replies.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("ping {index}"));
        assert_eq!(reply.index, index);
    }
    sender
        .send(asking("last", Code::ResourceExhausted, "enough"))
        .await
        .unwrap();
    let status = within("the bidi status", replies.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(status.metadata().get("x-weft-pod").unwrap(), POD);
}

#[tokio::test]
async fn plain_http_keeps_the_json_echo_on_the_same_port() {
    let addr = start().await;
    let mut echo = connect(addr).await;
    assert_eq!(
        echo.echo(plain("grpc")).await.unwrap().into_inner().pod,
        POD
    );

    for http2 in [false, true] {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build_http();
        let request = Request::post(format!("http://{addr}/api/thing"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = within("an HTTP request", client.request(request))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let version = response.version();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["pod"], POD);
        assert_eq!(json["method"], "POST");
        assert_eq!(json["path"], "/api/thing");
        let expected = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        assert_eq!(version, expected);
    }
}

/// What a run of `weft-client` gave.
struct Run {
    success: bool,
    lines: Vec<Value>,
    stderr: String,
}

/// Runs the `weft-client` binary (off the runtime's threads) and parses its stdout.
async fn weft_client(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_weft-client"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
        .collect();
    Run {
        success: output.status.success(),
        lines,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_client_prints_replies_and_expected_statuses() {
    let addr = start().await;
    let target = format!("http://{addr}");

    let run = weft_client(&[
        "grpc",
        "unary",
        "--target",
        &target,
        "--count",
        "2",
        "--message",
        "hi",
        "--metadata",
        "x-team=blue",
    ])
    .await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.lines.len(), 2);
    for line in &run.lines {
        assert_eq!(line["pod"], POD);
        assert_eq!(line["message"], "hi");
        assert_eq!(line["metadata"]["x-team"], "blue");
    }
    assert_eq!(
        run.lines[0]["peer"], run.lines[1]["peer"],
        "two connections"
    );

    let run = weft_client(&[
        "grpc",
        "unary",
        "--target",
        &target,
        "--count",
        "3",
        "--fail-with-code",
        "5",
        "--fail-message",
        "gone",
    ])
    .await;
    assert!(
        run.success,
        "an asked-for failure failed the run: {}",
        run.stderr
    );
    assert_eq!(run.lines.len(), 3);
    for line in &run.lines {
        assert_eq!(line["code"], 5);
        assert_eq!(line["message"], "gone");
        assert_eq!(line["metadata"]["x-weft-pod"], POD);
    }

    let run = weft_client(&[
        "grpc",
        "server-stream",
        "--target",
        &target,
        "--count",
        "2",
        "--fail-with-code",
        "14",
    ])
    .await;
    assert!(run.success, "{}", run.stderr);
    let indexes: Vec<_> = run.lines[..2].iter().map(|line| &line["index"]).collect();
    assert_eq!(indexes, [0, 1]);
    assert_eq!(run.lines[2]["code"], 14);
    assert_eq!(run.lines.len(), 3);

    let run = weft_client(&["grpc", "client-stream", "--target", &target, "--count", "3"]).await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.lines.len(), 1);
    assert_eq!(run.lines[0]["count"], 3);

    let run = weft_client(&["grpc", "bidi", "--target", &target, "--count", "3"]).await;
    assert!(run.success, "{}", run.stderr);
    let indexes: Vec<_> = run.lines.iter().map(|line| &line["index"]).collect();
    assert_eq!(indexes, [0, 1, 2]);

    // The same binary, the same port, the WebSocket echo.
    let url = format!("ws://{addr}/ws");
    let run = weft_client(&["ws", "--url", &url, "--messages", "4"]).await;
    assert!(run.success, "{}", run.stderr);
    assert_eq!(run.lines, [serde_json::json!({ "pod": POD, "echoed": 4 })]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_client_fails_on_what_was_not_asked_for() {
    let addr = start().await;
    let target = format!("http://{addr}");

    // The server refuses the delay: INVALID_ARGUMENT, which nobody asked for.
    let run = weft_client(&["grpc", "unary", "--target", &target, "--delay-ms", "60001"]).await;
    assert!(!run.success);
    assert_eq!(run.lines.len(), 1);
    assert_eq!(run.lines[0]["code"], Code::InvalidArgument as i32);
    assert!(
        run.stderr.contains("did not end as asked"),
        "{}",
        run.stderr
    );

    // Asked to fail with 9, but the server refuses the request with 3 first.
    let run = weft_client(&[
        "grpc",
        "bidi",
        "--target",
        &target,
        "--fail-with-code",
        "9",
        "--delay-ms",
        "60001",
    ])
    .await;
    assert!(!run.success);

    // Nothing listens on the port of a closed listener.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let run = weft_client(&["grpc", "unary", "--target", &nowhere]).await;
    assert!(!run.success);
    assert!(run.lines.is_empty());
    assert!(run.stderr.contains("cannot connect to"), "{}", run.stderr);

    let run = weft_client(&["grpc", "unary", "--target", &addr.to_string()]).await;
    assert!(!run.success);
    assert!(
        run.stderr.contains("expected http://HOST:PORT"),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_client_load_summarises_a_run() {
    let addr = start().await;
    let target = format!("http://{addr}");
    for shape in [&["--concurrency", "4"][..], &["--rate", "200"][..]] {
        let mut args = vec![
            "grpc",
            "load",
            "--target",
            &target,
            "--connections",
            "2",
            "--duration",
            "0.5",
        ];
        args.extend_from_slice(shape);
        let run = weft_client(&args).await;
        assert!(run.success, "{shape:?}: {}", run.stderr);
        assert_eq!(run.lines.len(), 1);
        let summary = &run.lines[0];
        assert_eq!(summary["errors"], 0, "{shape:?}: {summary}");
        let requests = summary["requests"].as_u64().unwrap();
        assert!(requests >= 20, "{shape:?}: {summary}");
        let rps = summary["rps"].as_f64().unwrap();
        assert!((rps - requests as f64 / 0.5).abs() < 1e-6, "{summary}");
        let (p50, p99) = (
            summary["p50_us"].as_u64().unwrap(),
            summary["p99_us"].as_u64().unwrap(),
        );
        assert!(0 < p50 && p50 <= p99, "{summary}");
    }
}
