//! In-process tests of the WebSocket echo on the HTTP echo's port (127.0.0.1).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{POD, start, start_until, within};
use futures::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weft_workloads::client;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the echo's WebSocket and checks its greeting.
async fn open(addr: SocketAddr) -> Socket {
    let (mut socket, response) = within(
        "the handshake",
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws")),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["x-weft-pod"], POD);
    let hello = next(&mut socket).await;
    let hello: serde_json::Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
    assert_eq!(hello, serde_json::json!({ "pod": POD }));
    socket
}

async fn next(socket: &mut Socket) -> Message {
    within("a message", socket.next()).await.unwrap().unwrap()
}

#[tokio::test]
async fn messages_come_back_exactly() {
    let addr = start().await;
    let mut socket = open(addr).await;
    let sent = [
        Message::text("hello"),
        Message::text(""),
        Message::text("{\"pod\":\"not me\"} ünïcödé"),
        Message::binary(vec![0u8, 255, 1, 2, 3]),
        Message::binary(vec![7u8; 100_000]),
    ];
    for message in sent {
        socket.send(message.clone()).await.unwrap();
        assert_eq!(next(&mut socket).await, message);
    }

    socket
        .send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut socket).await,
        Message::Pong("are you there".into())
    );

    socket.close(None).await.unwrap();
    loop {
        match within("the close", socket.next()).await {
            Some(Ok(Message::Close(_))) => {}
            None => break,
            other => panic!("expected the close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_closes_with_going_away() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = start_until(async {
        let _ = stopped.await;
    })
    .await;
    let mut socket = open(addr).await;
    socket.send(Message::text("before")).await.unwrap();
    assert_eq!(next(&mut socket).await, Message::text("before"));

    stop.send(()).unwrap();
    let Message::Close(Some(frame)) = next(&mut socket).await else {
        panic!("no close frame on shutdown");
    };
    assert_eq!(frame.code, CloseCode::Away);
    drop(socket);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server did not stop after the WebSocket closed")
        .unwrap();
}

#[tokio::test]
async fn a_plain_request_for_the_path_is_told_to_upgrade() {
    let addr = start().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = within(
        "a plain GET /ws",
        client.get(format!("http://{addr}/ws").parse().unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(response.headers()["x-weft-pod"], POD);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("Upgrade: websocket"),
        "{json}"
    );

    // Other paths still get the JSON echo.
    let response = client
        .get(format!("http://{addr}/wss").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_client_checks_every_echo() {
    let addr = start().await;
    let report = client::websocket(&format!("ws://{addr}/ws"), 20, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(report.pod, POD);
    assert_eq!(report.echoed, 20);

    let err = client::websocket(&format!("ws://{addr}/nope"), 1, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot open a WebSocket"), "{err}");
}
