//! In-process tests of the TCP echo server's three modes on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use weft_workloads::tcp;

const POD: &str = "tcp-test-0";

async fn start(mode: tcp::Mode) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tcp::serve(
        listener,
        tcp::Config::new(mode, POD),
        std::future::pending(),
    ));
    addr
}

/// Fails the test instead of hanging it when the server does not answer.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test]
async fn echo_mode_echoes_every_byte() {
    let addr = start(tcp::Mode::Echo).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

    // Write and read at once so neither side's buffers fill up.
    let to_send = sent.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&to_send).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut received = Vec::new();
    within("echo", reader.read_to_end(&mut received))
        .await
        .unwrap();
    writing.await.unwrap();

    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "echoed bytes differ from the ones sent");
}

#[tokio::test]
async fn echo_mode_serves_connections_concurrently() {
    let addr = start(tcp::Mode::Echo).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 6];

    // The first connection stays open while the second is served.
    second.write_all(b"second").await.unwrap();
    within("second", second.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"second");
    first.write_all(b"first!").await.unwrap();
    within("first", first.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"first!");
}

#[tokio::test]
async fn sink_mode_reports_the_byte_count() {
    let addr = start(tcp::Mode::Sink).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&[7u8; 12_345]).await.unwrap();
    stream.shutdown().await.unwrap();

    let mut reply = String::new();
    within("sink reply", stream.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, "received 12345 bytes\n");
}

#[tokio::test]
async fn banner_mode_sends_the_banner_then_echoes() {
    let addr = start(tcp::Mode::Banner).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let mut stream = BufReader::new(stream);

    let mut banner = String::new();
    within("banner", stream.read_line(&mut banner))
        .await
        .unwrap();
    assert_eq!(banner, format!("{POD} {local}\n"));

    stream.get_mut().write_all(b"ping\n").await.unwrap();
    let mut echoed = String::new();
    within("echo after banner", stream.read_line(&mut echoed))
        .await
        .unwrap();
    assert_eq!(echoed, "ping\n");
}

#[tokio::test]
async fn serve_returns_after_shutdown_even_with_an_idle_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut config = tcp::Config::new(tcp::Mode::Echo, POD);
    config.drain_timeout = Duration::from_millis(200);
    let server = tokio::spawn(tcp::serve(listener, config, async {
        let _ = stopped.await;
    }));

    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    within("echo", idle.read_exact(&mut buf)).await.unwrap();

    stop.send(()).unwrap();
    within("server to stop", server).await.unwrap();
    // The connection that outlived the drain timeout was closed.
    let mut rest = Vec::new();
    let read = within("close after drain", idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "idle connection still open: {read:?}"
    );
}

#[tokio::test]
async fn bind_failure_names_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = weft_workloads::bind(addr).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(message.contains("another process"), "{message}");
}
