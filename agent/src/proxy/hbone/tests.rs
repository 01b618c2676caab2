//! HBONE over plain HTTP/2 on loopback TCP and in-memory pipes.

use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, mpsc};
use tokio::task::{JoinHandle, JoinSet};

use super::*;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes (xorshift), so corruption or reordering shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn connect_request(target: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header("forwarded", "for=\"10.0.0.1\"")
        .header("baggage", "k8s.namespace.name=default")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(())
        .unwrap()
}

/// An HBONE server on 127.0.0.1; aborting the returned task closes its listener
/// and every connection it serves.
async fn start_server<H, Fut>(settings: Settings, handler: H) -> (SocketAddr, JoinHandle<()>)
where
    H: Fn(Incoming) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let handler = handler.clone();
            connections.spawn(async move {
                if let Err(e) = serve(
                    tcp,
                    &settings,
                    PrematureResets::default(),
                    std::future::pending(),
                    handler,
                )
                .await
                {
                    debug!("test server: {e}");
                }
            });
        }
    });
    (addr, task)
}

/// A TCP echo server that half-closes after echoing everything.
async fn start_tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// The inbound agent's job: connect to the destination and splice.
async fn forward_to_destination(incoming: Incoming) {
    match TcpStream::connect(incoming.authority).await {
        Ok(mut upstream) => {
            let mut tunnel = incoming.accept().unwrap();
            tokio::io::copy_bidirectional(&mut tunnel, &mut upstream)
                .await
                .unwrap();
        }
        Err(_) => incoming.refuse(StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// Echo the tunnel into itself, then end our half; a client that drops its tunnel
/// (a reset) ends it early.
async fn echo_back(incoming: Incoming) {
    let tunnel = incoming.accept().unwrap();
    let (mut r, mut w) = tokio::io::split(tunnel);
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        w.shutdown().await.unwrap();
    }
}

type TcpDial = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

fn dial_tcp(addr: SocketAddr) -> TcpDial {
    Box::pin(TcpStream::connect(addr))
}

fn tcp_dial(addr: SocketAddr) -> impl FnOnce() -> TcpDial {
    move || dial_tcp(addr)
}

/// Write `data`, end our half, and read everything that comes back concurrently.
async fn exchange(tunnel: Tunnel, data: Vec<u8>) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(tunnel);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_10mb_both_directions_through_tcp_splices() {
    within(async {
        let destination = start_tcp_echo().await;
        let (peer_agent, _server) = start_server(Settings::default(), forward_to_destination).await;
        let pool = Pool::new(Settings::default());

        // The outbound side: an application connects to the local agent, which splices
        // its socket into a tunnel, as the agent's 15001 listener will.
        let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outbound_addr = outbound.local_addr().unwrap();
        let proxy = tokio::spawn({
            let pool = pool.clone();
            async move {
                let (mut app, _) = outbound.accept().await.unwrap();
                let mut tunnel = pool
                    .connect(
                        &"peer",
                        tcp_dial(peer_agent),
                        connect_request(&destination.to_string()),
                    )
                    .await
                    .unwrap();
                tokio::io::copy_bidirectional(&mut app, &mut tunnel)
                    .await
                    .unwrap()
            }
        });

        let data = pattern(10 * 1024 * 1024, 1);
        let (mut r, mut w) = TcpStream::connect(outbound_addr)
            .await
            .unwrap()
            .into_split();
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            }
        });
        let mut back = Vec::with_capacity(data.len());
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
        let (up, down) = proxy.await.unwrap();
        assert_eq!((up, down), (data.len() as u64, data.len() as u64));
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiny_windows_and_small_reads_still_move_megabytes() {
    within(async {
        // Windows far below the data size: only works if consumed bytes are released
        // at both the stream and the connection level.
        let settings = Settings {
            stream_window: 65_535,
            connection_window: 65_535,
            max_frame_size: 16_384,
            ..Settings::default()
        };
        let (addr, _server) = start_server(settings, echo_back).await;
        let pool = Pool::new(settings);
        for round in 0..3 {
            let tunnel = pool
                .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
                .await
                .unwrap();
            let data = pattern(1024 * 1024, round);
            let (mut r, mut w) = tokio::io::split(tunnel);
            let writer = tokio::spawn({
                let data = data.clone();
                async move {
                    w.write_all(&data).await.unwrap();
                    w.shutdown().await.unwrap();
                }
            });
            // 1000-byte reads of 16 KiB frames exercise the partially consumed chunk.
            let mut back = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert!(back == data, "round {round}: echoed bytes differ");
        }
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn client_half_close_reaches_server_which_still_answers() {
    within(async {
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let handler = move |incoming: Incoming| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut tunnel = incoming.accept().unwrap();
                let mut request = Vec::new();
                // Returns only on the client's END_STREAM.
                tunnel.read_to_end(&mut request).await.unwrap();
                seen_tx.send(request).unwrap();
                tunnel.write_all(b"response after your EOF").await.unwrap();
                tunnel.shutdown().await.unwrap();
            }
        };
        let (addr, _server) = start_server(Settings::default(), handler).await;
        let pool = Pool::new(Settings::default());
        let mut tunnel = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        tunnel.write_all(b"request").await.unwrap();
        tunnel.shutdown().await.unwrap();
        assert_eq!(seen_rx.recv().await.unwrap(), b"request");
        let mut response = Vec::new();
        tunnel.read_to_end(&mut response).await.unwrap();
        assert_eq!(response, b"response after your EOF");
        // Writing after shutdown is an error, not silently dropped data.
        assert_eq!(
            tunnel.write(b"late").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    })
    .await;
}

#[tokio::test]
async fn server_half_close_reaches_client_which_still_sends() {
    within(async {
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let handler = move |incoming: Incoming| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut tunnel = incoming.accept().unwrap();
                tunnel.write_all(b"banner").await.unwrap();
                tunnel.shutdown().await.unwrap();
                let mut rest = Vec::new();
                tunnel.read_to_end(&mut rest).await.unwrap();
                seen_tx.send(rest).unwrap();
            }
        };
        let (addr, _server) = start_server(Settings::default(), handler).await;
        let pool = Pool::new(Settings::default());
        let mut tunnel = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        let mut banner = Vec::new();
        tunnel.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner");
        tunnel.write_all(b"sent after your EOF").await.unwrap();
        tunnel.shutdown().await.unwrap();
        assert_eq!(seen_rx.recv().await.unwrap(), b"sent after your EOF");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_tunnels_share_one_connection() {
    within(async {
        let (addr, _server) = start_server(Settings::default(), echo_back).await;
        let pool = Pool::new(Settings::default());
        let dials = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(50));
        let mut tasks = JoinSet::new();
        for i in 0..50 {
            let (pool, dials, barrier) = (pool.clone(), dials.clone(), barrier.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                let dial = move || {
                    dials.fetch_add(1, Ordering::SeqCst);
                    dial_tcp(addr)
                };
                let tunnel = pool
                    .connect(&"peer", dial, connect_request("10.0.0.1:80"))
                    .await
                    .unwrap();
                let data = pattern(256 * 1024, i);
                assert!(exchange(tunnel, data.clone()).await == data, "tunnel {i}");
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "concurrent connects dialed twice"
        );
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn refused_connect_returns_the_status() {
    within(async {
        let handler = |incoming: Incoming| async move {
            match incoming.authority.port() {
                1 => incoming.refuse(StatusCode::UNAUTHORIZED),
                _ => drop(incoming), // unanswered: serve's Drop answers 503
            }
        };
        let (addr, _server) = start_server(Settings::default(), handler).await;
        let pool = Pool::new(Settings::default());

        let err = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HboneError::Refused(StatusCode::UNAUTHORIZED)),
            "{err:?}"
        );
        assert_eq!(err.reason(), "refused");
        assert!(err.to_string().contains("authorization policy"), "{err}");

        let err = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:2"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HboneError::Refused(StatusCode::SERVICE_UNAVAILABLE)),
            "{err:?}"
        );
        // A refusal is about the stream, not the connection.
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

/// `serve` on one end of an in-memory pipe, counting handler calls.
fn serve_pipe(
    settings: Settings,
) -> (
    DuplexStream,
    JoinHandle<Result<(), HboneError>>,
    Arc<AtomicUsize>,
) {
    let (client, server) = tokio::io::duplex(1024 * 1024);
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        move |incoming: Incoming| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { incoming.refuse(StatusCode::UNAUTHORIZED) }
        }
    };
    let task = tokio::spawn(async move {
        serve(
            server,
            &settings,
            PrematureResets::default(),
            std::future::pending(),
            handler,
        )
        .await
    });
    (client, task, calls)
}

#[tokio::test]
async fn bad_requests_get_400_from_serve_without_the_handler() {
    within(async {
        let (client, server, calls) = serve_pipe(Settings::default());
        let (mut h2, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);

        let bad = [
            Request::get("http://10.0.0.1:80/").body(()).unwrap(),
            Request::post("http://10.0.0.1:80/").body(()).unwrap(),
            connect_request("example.com:443"),
            connect_request("10.0.0.1"),
        ];
        for request in bad {
            let what = format!("{} {}", request.method(), request.uri());
            let (response, _) = h2.send_request(request, false).unwrap();
            let status = response.await.unwrap().status();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // A good one on the same connection still reaches the handler.
        let (response, _) = h2
            .send_request(connect_request("[::1]:8080"), false)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // The client going away ends `serve` cleanly.
        drop(h2);
        server.await.unwrap().unwrap();
    })
    .await;
}

#[test]
fn connect_target_accepts_only_ip_port_authorities() {
    let target = |uri: &str| connect_target(&connect_request(uri));
    assert_eq!(
        target("10.1.2.3:8080"),
        Ok("10.1.2.3:8080".parse().unwrap())
    );
    assert_eq!(
        target("[fd00::1]:443"),
        Ok("[fd00::1]:443".parse().unwrap())
    );
    assert!(target("pod.default.svc:80").is_err());
    assert!(target("10.1.2.3").is_err());
    let get = Request::get("http://10.1.2.3:80/").body(()).unwrap();
    assert!(connect_target(&get).is_err());
}

/// Feed `bytes` to `serve` and return its verdict, which must come on the garbage
/// itself: run with a paused clock, a verdict that waited for the handshake timeout
/// shows as time passed.
async fn serve_raw(bytes: &[u8]) -> Result<(), HboneError> {
    let settings = Settings::default();
    let (mut client, server, calls) = serve_pipe(settings);
    client.write_all(bytes).await.unwrap();
    let started = Instant::now();
    let verdict = server.await.expect("serve panicked");
    assert!(
        started.elapsed() < settings.handshake_timeout,
        "serve waited {:?} instead of failing on the garbage",
        started.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    drop(client);
    verdict
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(start_paused = true)]
async fn garbage_makes_serve_fail_fast_without_panicking() {
    within(async {
        let err = serve_raw(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "handshake", "{err:?}");
        assert!(err.to_string().contains("HTTP/2"), "{err}");

        let err = serve_raw(&pattern(4096, 7)).await.unwrap_err();
        assert_eq!(err.reason(), "handshake", "{err:?}");

        // A valid preface, then a frame header claiming 16 MiB.
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 0]);
        let err = serve_raw(&bytes).await.unwrap_err();
        assert_eq!(err.reason(), "protocol", "{err:?}");

        // A valid preface and SETTINGS, then DATA on stream 0 (a protocol error).
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0x4, 0x0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 4, 0x0, 0x0, 0, 0, 0, 0, 1, 2, 3, 4]);
        let err = serve_raw(&bytes).await.unwrap_err();
        assert_eq!(err.reason(), "protocol", "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn oversized_headers_are_rejected_without_panicking() {
    within(async {
        let (client, server, calls) = serve_pipe(Settings::default());
        let (mut h2, connection) = h2::client::handshake(client).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut request = connect_request("10.0.0.1:80");
        let big = "x".repeat(64 * 1024);
        request
            .headers_mut()
            .insert("x-big", http::HeaderValue::from_str(&big).unwrap());
        let (response, _) = h2.send_request(request, false).unwrap();
        // h2 answers a header block 4x over the limit with GOAWAY(ENHANCE_YOUR_CALM)
        // (merely oversized ones get 431 on the stream).
        response.await.unwrap_err();
        let err = timeout(Duration::from_secs(5), server)
            .await
            .expect("serve hung")
            .expect("serve panicked")
            .unwrap_err();
        assert!(matches!(err, HboneError::Protocol(_)), "{err:?}");
        assert_eq!(err.reason(), "protocol");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        drop(h2);
        let _ = connection.await;
    })
    .await;
}

#[tokio::test]
async fn serve_times_out_slow_or_silent_clients() {
    within(async {
        let settings = Settings {
            handshake_timeout: Duration::from_millis(300),
            ..Settings::default()
        };
        for sent in [&PREFACE[..10], PREFACE] {
            let (mut client, server, _) = serve_pipe(settings);
            client.write_all(sent).await.unwrap();
            let started = std::time::Instant::now();
            let err = timeout(Duration::from_secs(5), server)
                .await
                .expect("no handshake timeout")
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(err, HboneError::HandshakeTimeout(_)),
                "{} bytes: {err:?}",
                sent.len()
            );
            assert!(started.elapsed() >= Duration::from_millis(250));
            drop(client);
        }
    })
    .await;
}

#[tokio::test]
async fn client_handshake_times_out_when_the_peer_is_silent() {
    within(async {
        let pool = Pool::new(Settings {
            handshake_timeout: Duration::from_millis(300),
            ..Settings::default()
        });
        let (ours, _silent_peer) = tokio::io::duplex(64 * 1024);
        let started = std::time::Instant::now();
        let err = pool
            .connect(
                &"silent",
                || std::future::ready(Ok(ours)),
                connect_request("10.0.0.1:80"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, HboneError::HandshakeTimeout(_)), "{err:?}");
        assert_eq!(err.reason(), "handshake_timeout");
        assert!(started.elapsed() < Duration::from_secs(5));
        let message = err.to_string();
        assert!(
            message.contains("timed out after 300ms") && message.contains("15008"),
            "{message}"
        );
        assert_eq!(pool.connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn client_rejects_a_peer_that_is_not_http2() {
    within(async {
        let pool = Pool::new(Settings::default());
        let (ours, mut peer) = tokio::io::duplex(64 * 1024);
        peer.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let err = pool
            .connect(
                &"http1",
                || std::future::ready(Ok(ours)),
                connect_request("10.0.0.1:80"),
            )
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "handshake", "{err:?}");
        assert_eq!(pool.connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn dead_pooled_connection_is_replaced() {
    within(async {
        let target = Arc::new(Mutex::new(None));
        let dials = Arc::new(AtomicUsize::new(0));
        let dial = || {
            let (target, dials) = (target.clone(), dials.clone());
            move || {
                dials.fetch_add(1, Ordering::SeqCst);
                dial_tcp(target.lock().unwrap().expect("no server"))
            }
        };
        let pool = Pool::new(Settings::default());

        let (first, first_server) = start_server(Settings::default(), echo_back).await;
        *target.lock().unwrap() = Some(first);
        for i in 0..2 {
            let tunnel = pool
                .connect(&"peer", dial(), connect_request("10.0.0.1:80"))
                .await
                .unwrap();
            assert_eq!(exchange(tunnel, b"before".to_vec()).await, b"before", "{i}");
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "the connection was not reused"
        );
        assert_eq!(pool.connections(), 1);

        // The peer agent dies (its listener and connections close) and comes back
        // elsewhere.
        first_server.abort();
        assert!(first_server.await.unwrap_err().is_cancelled());
        let (second, _second_server) = start_server(Settings::default(), echo_back).await;
        *target.lock().unwrap() = Some(second);

        let tunnel = pool
            .connect(&"peer", dial(), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        assert_eq!(exchange(tunnel, b"after".to_vec()).await, b"after");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

/// A bare h2 server that refuses streams with RST_STREAM(REFUSED_STREAM), as an
/// overloaded or draining peer does; with `open_first`, the first tunnel of each
/// connection is opened instead (sending "first" and ending it).
async fn start_refusing_server(open_first: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(tcp).await.unwrap();
                let mut first = open_first;
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    if first {
                        let ok = status_only(StatusCode::OK);
                        let mut send = respond.send_response(ok, false).unwrap();
                        send.send_data(Bytes::from_static(b"first"), true).unwrap();
                        first = false;
                    } else {
                        respond.send_reset(Reason::REFUSED_STREAM);
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn refused_stream_on_a_pooled_connection_retries_once_on_a_fresh_dial() {
    within(async {
        let refusing = start_refusing_server(true).await;
        let (healthy, _server) = start_server(Settings::default(), echo_back).await;
        let dials = Arc::new(AtomicUsize::new(0));
        let dial = |addr| {
            let dials = dials.clone();
            move || {
                dials.fetch_add(1, Ordering::SeqCst);
                dial_tcp(addr)
            }
        };
        let pool = Pool::new(Settings::default());

        let mut tunnel = pool
            .connect(&"peer", dial(refusing), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"first");

        // The pooled connection refuses the stream: dropped, and one fresh dial.
        let tunnel = pool
            .connect(&"peer", dial(healthy), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        assert_eq!(exchange(tunnel, b"retried".to_vec()).await, b"retried");
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(pool.connections(), 1);

        // A refusal on a connection this call dialed itself is final: no second dial.
        let refuse_all = start_refusing_server(false).await;
        let pool = Pool::new(Settings::default());
        let err = pool
            .connect(&"peer", dial(refuse_all), connect_request("10.0.0.1:80"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "reset", "{err:?}");
        assert_eq!(dials.load(Ordering::SeqCst), 3);

        // Pooled connection refuses, the retry's fresh one refuses too: one retry only.
        let mut tunnel = pool
            .connect(&"peer", dial(refusing), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        tunnel.read_to_end(&mut Vec::new()).await.unwrap();
        assert_eq!(dials.load(Ordering::SeqCst), 4);
        let err = pool
            .connect(&"peer", dial(refuse_all), connect_request("10.0.0.1:80"))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "reset", "{err:?}");
        assert_eq!(dials.load(Ordering::SeqCst), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_share_one_failed_dial() {
    within(async {
        let pool = Pool::new(Settings::default());
        let dials = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(10));
        let mut tasks = JoinSet::new();
        for _ in 0..10 {
            let (pool, dials, barrier) = (pool.clone(), dials.clone(), barrier.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                let dial = move || {
                    dials.fetch_add(1, Ordering::SeqCst);
                    async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err::<TcpStream, _>(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            "connection refused",
                        ))
                    }
                };
                pool.connect(&"down", dial, connect_request("10.0.0.1:80"))
                    .await
                    .unwrap_err()
            });
        }
        let mut originals = 0;
        while let Some(err) = tasks.join_next().await {
            let err = err.unwrap();
            assert_eq!(err.reason(), "dial", "{err:?}");
            assert!(err.to_string().contains("connection refused"), "{err}");
            if matches!(err, HboneError::Dial(_)) {
                originals += 1;
            }
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(originals, 1);
        assert_eq!(pool.connections(), 0);

        // The failure is not cached: the next connect dials again.
        let again = pool
            .connect(
                &"down",
                || std::future::ready(Err::<TcpStream, _>(io::ErrorKind::ConnectionRefused.into())),
                connect_request("10.0.0.1:80"),
            )
            .await
            .unwrap_err();
        assert!(matches!(again, HboneError::Dial(_)), "{again:?}");
    })
    .await;
}

#[tokio::test]
async fn dropped_tunnel_is_a_reset_not_an_eof() {
    within(async {
        let handler = |incoming: Incoming| async move {
            let mut tunnel = incoming.accept().unwrap();
            tunnel.write_all(b"partial").await.unwrap();
            // Dropped without shutdown: the peer must not mistake this for a clean end.
        };
        let (addr, _server) = start_server(Settings::default(), handler).await;
        let pool = Pool::new(Settings::default());
        let mut tunnel = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        let mut got = Vec::new();
        let err = tunnel.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // Writes fail too once the stream is reset.
        let err = tunnel.write_all(b"x").await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
        assert_eq!(pool.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn writer_waits_for_a_stalled_reader() {
    within(async {
        let settings = Settings {
            stream_window: 65_535,
            ..Settings::default()
        };
        let (tunnels_tx, mut tunnels_rx) = mpsc::unbounded_channel();
        let handler = move |incoming: Incoming| {
            let tunnels_tx = tunnels_tx.clone();
            async move {
                // Accept but don't read yet.
                tunnels_tx.send(incoming.accept().unwrap()).unwrap();
            }
        };
        let (addr, _server) = start_server(settings, handler).await;
        let pool = Pool::new(settings);
        let mut tunnel = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        let data = pattern(512 * 1024, 3);
        let mut written = 0;
        while let Ok(n) = timeout(
            Duration::from_millis(300),
            tunnel.write(&data[written..written + 8192]),
        )
        .await
        {
            written += n.unwrap();
            assert!(
                written < 256 * 1024,
                "no backpressure from a stalled reader"
            );
        }
        // Exactly the peer's stream window went out, nothing more buffered.
        assert_eq!(written, 65_535);

        let mut peer = tunnels_rx.recv().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        tunnel.write_all(&data[written..]).await.unwrap();
        tunnel.shutdown().await.unwrap();
        assert!(reader.await.unwrap() == data);
    })
    .await;
}

#[tokio::test]
async fn out_of_range_settings_are_clamped_not_panics() {
    within(async {
        let settings = Settings {
            stream_window: u32::MAX,
            connection_window: 0,
            max_frame_size: 0,
            max_concurrent_streams: 0,
            max_streams_per_connection: 0,
            idle_release: Duration::ZERO,
            max_header_list_size: 0,
            handshake_timeout: Duration::from_secs(5),
        };
        let (addr, _server) = start_server(settings, echo_back).await;
        let pool = Pool::new(settings);
        let tunnel = pool
            .connect(&"peer", tcp_dial(addr), connect_request("10.0.0.1:80"))
            .await
            .unwrap();
        let data = pattern(200 * 1024, 9);
        assert!(exchange(tunnel, data.clone()).await == data);
    })
    .await;
}

#[test]
fn errors_tell_the_operator_what_to_check() {
    let timeout = HboneError::HandshakeTimeout(Duration::from_secs(10));
    assert_eq!(timeout.reason(), "handshake_timeout");
    assert!(timeout.to_string().starts_with(
        "HBONE handshake with the peer agent timed out after 10s; is port 15008 reachable"
    ));
    let refused = HboneError::Refused(StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        refused.to_string().contains("503 Service Unavailable"),
        "{refused}"
    );
    let dial = HboneError::Dial(io::ErrorKind::ConnectionRefused.into());
    assert_eq!(dial.reason(), "dial");
    assert!(dial.to_string().contains("15008"));
}

type ServerTask = JoinHandle<Result<(), HboneError>>;
type PipeDial = Pin<Box<dyn Future<Output = io::Result<DuplexStream>> + Send>>;

/// A dial for `pool.connect` that serves each new connection in memory with
/// `echo_back`, counting dials and keeping the server tasks.
#[derive(Clone)]
struct PipeDialer {
    settings: Settings,
    dials: Arc<AtomicUsize>,
    servers: Arc<std::sync::Mutex<Vec<ServerTask>>>,
}

impl PipeDialer {
    fn new(settings: Settings) -> Self {
        Self {
            settings,
            dials: Arc::default(),
            servers: Arc::default(),
        }
    }

    fn dial(&self) -> impl FnOnce() -> PipeDial {
        let this = self.clone();
        move || {
            Box::pin(async move {
                this.dials.fetch_add(1, Ordering::SeqCst);
                let (client, server) = tokio::io::duplex(64 * 1024);
                let settings = this.settings;
                let task = tokio::spawn(async move {
                    serve(
                        server,
                        &settings,
                        PrematureResets::default(),
                        std::future::pending(),
                        echo_back,
                    )
                    .await
                });
                this.servers.lock().unwrap().push(task);
                Ok(client)
            })
        }
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }

    /// Waits until the server side of the `index`th connection has ended.
    async fn server_ended(&self, index: usize) {
        let task = {
            let mut servers = self.servers.lock().unwrap();
            std::mem::replace(&mut servers[index], tokio::spawn(async { Ok(()) }))
        };
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_connection_makes_the_pool_dial_another_and_idle_ones_are_released() {
    within(async {
        let settings = Settings {
            max_streams_per_connection: 3,
            idle_release: Duration::from_secs(10),
            ..Settings::default()
        };
        let pool = Pool::new(settings);
        let dialer = PipeDialer::new(settings);
        let open = || pool.connect(&"peer", dialer.dial(), connect_request("10.0.0.1:80"));
        let mut first = Vec::new();
        for _ in 0..3 {
            first.push(open().await.unwrap());
        }
        assert_eq!((dialer.dials(), pool.connections()), (1, 1));

        // A fourth tunnel of the same key does not queue behind the full connection.
        let fourth = open().await.unwrap();
        assert_eq!((dialer.dials(), pool.connections()), (2, 2));
        assert_eq!(exchange(fourth, b"ping".to_vec()).await, b"ping");
        // Its place is free again, and taken without a dial.
        drop(open().await.unwrap());
        assert_eq!(dialer.dials(), 2);

        // Idle, the second connection is the key's one warm connection: it stays.
        pool.release_idle();
        assert_eq!(pool.connections(), 2);
        // Once the first is idle too and was used last, the second goes, and closes.
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(first);
        pool.release_idle();
        assert_eq!(pool.connections(), 1);
        dialer.server_ended(1).await;
        // The warm one goes after `idle_release` without a tunnel.
        tokio::time::advance(Duration::from_secs(10)).await;
        pool.release_idle();
        assert_eq!(pool.connections(), 0);
        dialer.server_ended(0).await;
        // And the next tunnel dials anew.
        drop(open().await.unwrap());
        assert_eq!((dialer.dials(), pool.connections()), (3, 1));
    })
    .await;
}

/// A peer that resets each tunnel as soon as it is open gets its burst (twice the
/// budget) at once and its next tunnels only as fast as the budget refills, one a
/// millisecond; a tunnel it keeps is still served. (Without the pacing, the paused
/// clock would not move at all.)
#[tokio::test(start_paused = true)]
async fn a_peer_that_resets_its_tunnels_at_once_is_paced() {
    use crate::proxy::abuse::{Inspected, PEER_RESET_RATE};

    within(async {
        let (client, server) = tokio::io::duplex(1024 * 1024);
        let (server, _) = Inspected::new(server, Listener::Hbone, Duration::from_secs(60));
        let premature = server.premature_resets();
        let settings = Settings::default();
        let served = tokio::spawn(async move {
            serve(
                server,
                &settings,
                premature,
                std::future::pending(),
                echo_back,
            )
            .await
        });
        let (mut h2, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);

        let burst = 2 * PEER_RESET_RATE as usize;
        let paid = 500;
        let started = Instant::now();
        for _ in 0..burst + paid {
            h2 = h2.ready().await.unwrap();
            let (response, mut stream) = h2
                .send_request(connect_request("10.0.0.1:80"), false)
                .unwrap();
            assert_eq!(response.await.unwrap().status(), StatusCode::OK);
            stream.send_reset(Reason::CANCEL);
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(paid as u64 - 5),
            "{paid} resets beyond the burst took {took:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");

        // Once the resets are paid for, a tunnel the peer keeps carries its bytes.
        h2 = h2.ready().await.unwrap();
        let (response, mut stream) = h2
            .send_request(connect_request("10.0.0.1:80"), false)
            .unwrap();
        let mut body = response.await.unwrap().into_body();
        stream.send_data(Bytes::from_static(b"ping"), true).unwrap();
        let echoed = body.data().await.unwrap().unwrap();
        assert_eq!(&echoed[..], b"ping");

        drop((h2, stream, body));
        served.await.unwrap().unwrap();
    })
    .await;
}

/// A CONNECT the client resets before the server takes it reaches no handler (no pod
/// is dialled for it); the next one does.
#[tokio::test]
async fn a_connect_reset_before_it_is_taken_reaches_no_handler() {
    within(async {
        let (client, server, calls) = serve_pipe(Settings::default());
        let (mut h2, connection) = h2::client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        // Both frames leave in one write: the server reads the reset with the CONNECT.
        let (_, mut withdrawn) = h2
            .send_request(connect_request("10.0.0.1:80"), false)
            .unwrap();
        withdrawn.send_reset(Reason::CANCEL);

        h2 = h2.ready().await.unwrap();
        let (response, _) = h2
            .send_request(connect_request("10.0.0.1:80"), false)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        drop((h2, withdrawn));
        server.await.unwrap().unwrap();
    })
    .await;
}

#[test]
fn forwarded_for_reads_rfc_7239_as_agents_and_ztunnel_write_it() {
    let v4 = |ip: &str| Some(IpAddr::V4(ip.parse().unwrap()));
    let v6 = |ip: &str| Some(IpAddr::V6(ip.parse().unwrap()));
    for (header, expected) in [
        // weft's agents
        ("for=10.0.0.5", v4("10.0.0.5")),
        ("for=\"[fd00::5]\"", v6("fd00::5")),
        // Istio's ztunnel: quoted, with the client's port
        ("for=\"10.0.0.5:53766\"", v4("10.0.0.5")),
        ("for=\"[fd00::5]:80\"", v6("fd00::5")),
        // parameters in any order and case, the first element is the client's
        ("proto=https;For=10.0.0.5;by=10.0.0.9", v4("10.0.0.5")),
        ("for=10.0.0.5, for=10.0.0.6", v4("10.0.0.5")),
        ("by=\"a;b,c\";for=10.0.0.5", v4("10.0.0.5")),
        (" for = 10.0.0.5 ", v4("10.0.0.5")),
        // names no address
        ("for=unknown", None),
        ("for=_hidden", None),
        ("for=\"10.0.0.5:_port\"", None),
        ("for=\"10.0.0.5:123456\"", None),
        ("for=10.0.0.5:", None),
        ("for=\"[fd00::5]x\"", None),
        ("for=fd00::5", None),
        ("for=\"10.0.0.5", None),
        ("for=\"10.0.0.\\5\"", None),
        ("by=10.0.0.9", None),
        ("proto=http, for=10.0.0.5", None),
        ("", None),
    ] {
        assert_eq!(forwarded_for(header), expected, "{header:?}");
    }
}
