//! What the echo server's tests share: a server on an ephemeral loopback port.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use weft_workloads::echo_http;

/// The pod name the test servers report.
pub const POD: &str = "echo-test-0";

/// Starts a server on an ephemeral port; it runs until `shutdown` resolves or the test's
/// runtime ends. Gives its address and the task serving it.
pub async fn start_until(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(echo_http::serve(
        listener,
        echo_http::Config::new(POD),
        shutdown,
    ));
    (addr, server)
}

/// Starts a server that runs until the test's runtime ends.
pub async fn start() -> SocketAddr {
    start_until(std::future::pending()).await.0
}

/// Fails the test instead of hanging it when the server does not answer.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}
