use std::future::Future;

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex},
    time::Instant,
};

use super::{
    frames::{ACK, HEADERS, PING, PREFACE, PRIORITY, RST_STREAM, SETTINGS},
    *,
};

const DATA: u8 = 0x0;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ping() -> Vec<u8> {
    frame(PING, 0, 0, &[0; 8])
}

/// `GET /` on `stream`, in HPACK's static table.
fn get(stream: u32) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &[0x82, 0x86, 0x84],
    )
}

fn reset(stream: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())
}

/// The preface and an empty SETTINGS frame, then `frames`.
fn connection(frames: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(SETTINGS, 0, 0, &[]));
    bytes.extend(frames.into_iter().flatten());
    bytes
}

/// What the inspector finds in `bytes`, fed `chunk` bytes at a time.
fn inspect(bytes: &[u8], chunk: usize) -> Result<(), Abuse> {
    let mut inspector = Inspector::new(Listener::Outbound);
    bytes
        .chunks(chunk)
        .try_for_each(|chunk| inspector.received(chunk))
}

#[tokio::test(start_paused = true)]
async fn budgets_allow_a_burst_of_twice_the_rate_and_find_the_frame_after_it() {
    let settings = || frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let priority = || frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]);
    // The connection's own first SETTINGS frame takes one of the settings budget.
    for (what, one, burst, abuse) in [
        (
            "ping",
            &ping as &dyn Fn() -> Vec<u8>,
            2 * PING_RATE,
            Abuse::PingFlood,
        ),
        (
            "settings",
            &settings,
            2 * SETTINGS_RATE - 1,
            Abuse::SettingsFlood,
        ),
        (
            "priority",
            &priority,
            2 * PRIORITY_RATE,
            Abuse::PriorityFlood,
        ),
    ] {
        for chunk in [1, 7, 4096] {
            let within = connection((0..burst).map(|_| one()));
            assert_eq!(inspect(&within, chunk), Ok(()), "{what}, chunks of {chunk}");
            let beyond = connection((0..=burst).map(|_| one()));
            assert_eq!(
                inspect(&beyond, chunk),
                Err(abuse),
                "{what}, chunks of {chunk}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_budget_refills_at_its_rate() {
    let mut inspector = Inspector::new(Listener::Outbound);
    inspector.received(&connection([])).unwrap();
    let pings = |count| (0..count).flat_map(|_| ping()).collect::<Vec<u8>>();
    inspector
        .received(&pings(2 * PING_RATE as usize))
        .expect("a full burst");
    tokio::time::advance(Duration::from_millis(100)).await;
    inspector
        .received(&pings(PING_RATE as usize / 10))
        .expect("a tenth of a second's worth");
    assert_eq!(inspector.received(&ping()), Err(Abuse::PingFlood));
}

#[tokio::test(start_paused = true)]
async fn acknowledgements_and_payloads_that_look_like_frames_cost_nothing() {
    let acks = (0..10_000).flat_map(|_| frame(PING, ACK, 0, &[0; 8]));
    let settings_acks = (0..10_000).flat_map(|_| frame(SETTINGS, ACK, 0, &[]));
    // A DATA frame whose payload is itself a thousand PING frames.
    let disguised = frame(
        DATA,
        0,
        1,
        &(0..1000).flat_map(|_| ping()).collect::<Vec<_>>(),
    );
    let bytes = connection([
        get(1),
        acks.collect(),
        settings_acks.collect(),
        disguised.clone(),
        disguised,
    ]);
    assert_eq!(inspect(&bytes, 1000), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn http1_is_left_alone() {
    let mut bytes = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_vec();
    bytes.extend((0..10_000).flat_map(|_| ping()));
    assert_eq!(inspect(&bytes, 1), Ok(()));
    // A near miss of the preface is HTTP/1.1 too.
    let mut near = PREFACE[..20].to_vec();
    near.extend(b"XX\r\n");
    near.extend((0..10_000).flat_map(|_| ping()));
    assert_eq!(inspect(&near, 3), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn only_resets_of_young_streams_count_as_rapid() {
    let burst = 2 * RAPID_RESET_RATE;
    let rapid = |count: u32| (0..count).flat_map(|n| [get(2 * n + 1), reset(2 * n + 1)]);
    assert_eq!(inspect(&connection(rapid(burst)), 64), Ok(()));
    assert_eq!(
        inspect(&connection(rapid(burst + 1)), 64),
        Err(Abuse::RapidReset)
    );
    // From a peer agent, which passes on its own clients' cancellations.
    for listener in [Listener::Inbound, Listener::Hbone] {
        let mut peer = Inspector::new(listener);
        assert_eq!(peer.received(&connection(rapid(10 * burst))), Ok(()));
    }

    // Resets of streams never opened, or opened more than a second ago, are not rapid.
    let mut inspector = Inspector::new(Listener::Outbound);
    let opened: Vec<u8> = (0..burst * 2).flat_map(|n| get(2 * n + 1)).collect();
    inspector.received(&connection([opened])).unwrap();
    tokio::time::advance(PREMATURE + Duration::from_millis(1)).await;
    let late: Vec<u8> = (0..burst * 2).flat_map(|n| reset(2 * n + 1)).collect();
    let strangers: Vec<u8> = (0..burst * 2)
        .flat_map(|n| reset(100_001 + 2 * n))
        .collect();
    assert_eq!(inspector.received(&late), Ok(()));
    assert_eq!(inspector.received(&strangers), Ok(()));
    // Trailers (HEADERS on an open stream) do not make a stream young again.
    let trailers: Vec<u8> = (0..burst * 2).flat_map(|n| get(2 * n + 1)).collect();
    inspector.received(&trailers).unwrap();
    assert_eq!(inspector.received(&late), Ok(()));
}

/// A client that writes `bytes` to a server that runs `serve`, and what the server's
/// connection ended with.
async fn against<F, Fut, T>(bytes: Vec<u8>, serve: F) -> T
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = T>,
{
    let (mut client, server) = duplex(1 << 20);
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&bytes).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    });
    let ended = serve(server).await;
    writer.abort();
    ended
}

/// Serves HTTP/2 with h2 as the HBONE port does, never answering, until the
/// connection ends; returns the abuse found if it ended in an error.
async fn h2_server(io: DuplexStream) -> Option<Result<Abuse, String>> {
    let (io, verdict) = Inspected::new(io, Listener::Hbone, Duration::from_secs(60));
    let mut builder = h2::server::Builder::new();
    builder.max_header_list_size(16 * 1024);
    let ended = |err: h2::Error| Some(verdict.of(Some(&err)).ok_or(err.to_string()));
    let mut connection = match builder.handshake::<_, Bytes>(io).await {
        Ok(connection) => connection,
        Err(err) => return ended(err),
    };
    let mut held = Vec::new();
    while let Some(next) = connection.accept().await {
        match next {
            Ok(stream) => held.push(stream),
            Err(err) => return ended(err),
        }
    }
    verdict.of(None).map(Ok)
}

#[tokio::test(start_paused = true)]
async fn the_abuse_that_ends_a_connection_is_found_in_its_error() {
    let pings = connection((0..=2 * PING_RATE).map(|_| ping()));
    // A header block (one 3,000-byte field name) in a HEADERS frame and thirty
    // CONTINUATION frames of 100 bytes.
    let mut block = vec![0x82, 0x86, 0x84, 0x00, 0x7f, 0xb9, 0x16];
    block.extend(std::iter::repeat_n(b'x', 3000));
    block.extend([0x01, b'v']);
    let mut continued = vec![frame(HEADERS, END_STREAM, 1, &block[..100])];
    let chunks: Vec<&[u8]> = block[100..].chunks(100).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        let flags = if n + 1 == chunks.len() {
            END_HEADERS
        } else {
            0
        };
        continued.push(frame(CONTINUATION, flags, 1, chunk));
    }
    // An HPACK bomb: one 4,000-byte field put in the dynamic table, then named by its
    // index a hundred times: 4 KiB on the wire, 400 KiB decoded.
    let mut bomb = vec![0x82, 0x86, 0x84, 0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
    bomb.extend(std::iter::repeat_n(b'v', 4000));
    bomb.extend(std::iter::repeat_n(0xbe, 100));
    let bomb = vec![frame(HEADERS, END_HEADERS | END_STREAM, 1, &bomb)];
    // Streams reset as soon as opened, all in one write: h2 finds them before the
    // server accepts them.
    let resets = (0..=MAX_PENDING_RESETS as u32).flat_map(|n| {
        let stream = 2 * n + 1;
        [
            frame(HEADERS, END_HEADERS, stream, &[0x82, 0x86, 0x84]),
            reset(stream),
        ]
    });
    // A stream that never ends, fed empty DATA frames.
    let mut empty = vec![frame(HEADERS, END_HEADERS, 1, &[0x83, 0x86, 0x84])];
    empty.extend((0..1000).map(|_| frame(DATA, 0, 1, &[])));
    for (what, bytes, abuse) in [
        ("pings", pings, Abuse::PingFlood),
        ("batched resets", connection(resets), Abuse::RapidReset),
        ("empty frames", connection(empty), Abuse::EmptyFrames),
        (
            "continuations",
            connection(continued),
            Abuse::ContinuationFlood,
        ),
        ("header bomb", connection(bomb), Abuse::HeaderBomb),
    ] {
        let ended = against(bytes, h2_server).await;
        assert_eq!(ended, Some(Ok(abuse)), "{what}");
    }

    // A well-behaved connection's end is no abuse.
    let calm = connection((0..10).map(|n| get(2 * n + 1)));
    let ended = against(calm, h2_server).await;
    assert!(!matches!(ended, Some(Ok(_))), "{ended:?}");
}

#[tokio::test]
async fn an_http1_head_with_too_many_fields_is_answered_431_and_found() {
    let mut head = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
    for n in 0..MAX_HEADERS {
        head.extend(format!("x-{n}: y\r\n").as_bytes());
    }
    head.extend(b"\r\n");
    let (mut client, server) = duplex(1 << 20);
    client.write_all(&head).await.unwrap();
    let served = hyper::server::conn::http1::Builder::new()
        .max_buf_size(HEAD_LIMIT)
        .max_headers(MAX_HEADERS)
        .serve_connection(
            hyper_util::rt::TokioIo::new(
                Inspected::new(server, Listener::Outbound, Duration::from_secs(60)).0,
            ),
            hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
            }),
        )
        .await;
    let err = served.expect_err("too many fields");
    assert_eq!(found(&err), Some(Abuse::HeadTooLarge));
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_no_byte_for_the_stall_timeout_is_cut_off() {
    const STALL: Duration = Duration::from_secs(60);
    let (mut client, server) = duplex(1024);
    let (mut inspected, verdict) = Inspected::new(server, Listener::Outbound, STALL);
    // A slow client, which takes a byte every 50 s, and then none.
    let reader = tokio::spawn(async move {
        let mut byte = [0u8; 1];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            client.read_exact(&mut byte).await.unwrap();
        }
        client
    });
    let started = Instant::now();
    let err = loop {
        if let Err(err) = inspected.write_all(&[0; 64]).await {
            break err;
        }
    };
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(250) + STALL && waited < Duration::from_secs(251) + STALL,
        "cut off after {waited:?}: {err}"
    );
    assert_eq!(verdict.of(None), Some(Abuse::StalledReader));
    drop(reader);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_keeps_its_reader_waiting_for_the_stall_timeout_is_found() {
    use futures::{SinkExt, channel::mpsc};
    use http_body_util::{BodyExt, StreamBody};

    const STALL: Duration = Duration::from_secs(60);
    let (mut sender, receiver) =
        mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    let pace = Pace::default();
    let mut body = Paced::new(StreamBody::new(receiver), pace.clone());
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
    // A byte every 50 s keeps the body going; then it stops.
    let writer = tokio::spawn(async move {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            sender
                .send(Ok(hyper::body::Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
        }
        sender
    });
    let started = Instant::now();
    pace.stalled(STALL).await;
    assert_eq!(started.elapsed(), Duration::from_secs(150) + STALL);
    reader.abort();
    drop(writer);
}

/// Serves HTTP/2 with hyper as the request layer does, on a pod's connection with a
/// 60 s stall timeout, answering every request with 1 MiB; returns the abuse found
/// when the connection ends.
async fn h2_server_of_pods(io: DuplexStream) -> Option<Abuse> {
    let (io, verdict) = Inspected::new(io, Listener::Outbound, Duration::from_secs(60));
    let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper::service::service_fn(|_| async {
                let body = http_body_util::Full::new(Bytes::from(vec![0u8; 1 << 20]));
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            }),
        )
        .await;
    verdict.of(served.as_ref().err().map(|err| err as _))
}

/// A client that sends `first`, then `later` after `wait`, reading everything the
/// server sends; returns the bytes it read when the server closed.
fn windowed_client(
    mut client: DuplexStream,
    first: Vec<u8>,
    wait: Duration,
    later: Vec<u8>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        client.write_all(&first).await.unwrap();
        let mut read = 0;
        let mut buf = vec![0; 1 << 16];
        let granted = tokio::time::sleep(wait);
        tokio::pin!(granted);
        let mut later = Some(later);
        loop {
            tokio::select! {
                n = client.read(&mut buf) => match n {
                    Ok(0) | Err(_) => return read,
                    Ok(n) => read += n,
                },
                () = &mut granted, if later.is_some() => {
                    let _ = client.write_all(&later.take().unwrap()).await;
                }
            }
        }
    })
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(0x8, 0, stream, &increment.to_be_bytes())
}

#[tokio::test(start_paused = true)]
async fn a_response_the_client_opens_no_window_for_is_cut_off_at_the_stall_timeout() {
    // The client closes every stream's window (SETTINGS_INITIAL_WINDOW_SIZE 0), asks,
    // reads the response's head and then nothing more: it never opens a window.
    let mut first = PREFACE.to_vec();
    first.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    first.extend(get(1));
    let (client, server) = duplex(1 << 20);
    let client = windowed_client(client, first, Duration::MAX, Vec::new());
    let started = Instant::now();
    let found = h2_server_of_pods(server).await;
    let waited = started.elapsed();
    assert_eq!(found, Some(Abuse::ZeroWindow));
    assert!(
        waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
        "cut off after {waited:?}"
    );
    assert!(client.await.unwrap() < 1000, "the head only");

    // A client that opens the windows within the timeout gets the whole body, and its
    // connection ends as it closes it, for no abuse.
    let mut first = PREFACE.to_vec();
    first.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0]));
    first.extend(get(1));
    let mut later = window_update(0, 1 << 21);
    later.extend(window_update(1, 1 << 21));
    later.extend(frame(0x7, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]));
    let (client, server) = duplex(1 << 22);
    let client = windowed_client(client, first, Duration::from_secs(50), later);
    let found = h2_server_of_pods(server).await;
    assert_eq!(found, None);
    assert!(client.await.unwrap() > 1 << 20, "the whole body");
}
