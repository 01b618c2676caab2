//! The L4 copy: bytes both ways between a client and a server stream until both
//! directions are done, one fails, or no byte has moved either way for the idle
//! timeout. Bytes are counted as delivered, so a relay that ends in an error or a
//! timeout still says how much got through. Between two TCP sockets the bytes can
//! bypass user space ([`splice()`]).

mod splice;

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, copy_bidirectional_with_sizes},
    net::TcpStream,
    time::Instant,
};

/// The buffer of each direction. Tokio's default, 8 KiB, makes every 8 KiB a read, an
/// HTTP/2 DATA frame, a TLS record and a write; 64 KiB cut the agents' CPU per GiB by a
/// third in `cargo xtask bench`.
const BUFFER: usize = 64 << 10;

/// What a relay carried and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes delivered from the client to the server.
    pub received: u64,
    /// Bytes delivered from the server back to the client.
    pub sent: u64,
    pub end: End,
}

#[derive(Debug)]
pub enum End {
    /// Both directions ended (each side closed its half).
    Done,
    /// No byte moved either way for this long.
    IdleTimeout(Duration),
    /// Reading or writing one side failed.
    Failed(io::Error),
}

/// How often a relay reports the bytes it has carried so far: Istio's default TCP
/// reporting interval.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(15);

/// A client stream the relay may splice: its TCP socket, and the bytes already read
/// from it (to detect its protocol) that the server has yet to get. None for a stream
/// that is not a bare socket.
pub trait Spliceable {
    fn spliceable(&mut self) -> Option<(&[u8], &mut TcpStream)>;
}

impl Spliceable for TcpStream {
    fn spliceable(&mut self) -> Option<(&[u8], &mut TcpStream)> {
        Some((&[], self))
    }
}

/// Copies between `client` and `server` until both directions end; with `idle`, gives
/// up once nothing has moved for that long. Every [`PROGRESS_INTERVAL`] it calls
/// `progress` with the bytes delivered so far (received, sent).
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    idle: Option<Duration>,
    progress: impl FnMut(u64, u64),
) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let carried = Carried::new();
    let mut client = Watched::new(client, &carried.activity, &carried.sent);
    let mut server = Watched::new(server, &carried.activity, &carried.received);
    let copy = async {
        copy_bidirectional_with_sizes(&mut client, &mut server, BUFFER, BUFFER)
            .await
            .map(drop)
    };
    carried.watch(copy, idle, progress).await
}

/// [`relay`] between two TCP sockets with `splice(2)`: the server gets `prefix` first,
/// then every byte moves from socket to socket inside the kernel.
pub async fn splice(
    client: &mut TcpStream,
    prefix: &[u8],
    server: &mut TcpStream,
    idle: Option<Duration>,
    progress: impl FnMut(u64, u64),
) -> Relayed {
    let carried = Carried::new();
    let both = async {
        server.write_all(prefix).await?;
        carried
            .received
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        let (client, server) = (&*client, &*server);
        tokio::try_join!(
            splice::one_way(client, server, &carried.activity, &carried.received),
            splice::one_way(server, client, &carried.activity, &carried.sent),
        )
        .map(drop)
    };
    carried.watch(both, idle, progress).await
}

/// What a relay has carried so far: bytes each way and when the last one moved.
struct Carried {
    activity: Activity,
    received: AtomicU64,
    sent: AtomicU64,
}

impl Carried {
    fn new() -> Self {
        Self {
            activity: Activity::new(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    fn bytes(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        )
    }

    /// Runs `copy` (both directions) to its end, reporting progress and ending it at
    /// the idle timeout.
    async fn watch(
        &self,
        copy: impl Future<Output = io::Result<()>>,
        idle: Option<Duration>,
        mut progress: impl FnMut(u64, u64),
    ) -> Relayed {
        let end = {
            tokio::pin!(copy);
            let mut report =
                tokio::time::interval_at(Instant::now() + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
            loop {
                let idle_deadline = idle.map(|idle| self.activity.last() + idle);
                tokio::select! {
                    result = copy.as_mut() => break ended(result),
                    _ = report.tick() => {
                        let (received, sent) = self.bytes();
                        progress(received, sent);
                    }
                    () = sleep_until_some(idle_deadline) => {
                        // Something may have moved while this timer ran: wait for the rest.
                        let idle = idle.unwrap_or_default();
                        if self.activity.last() + idle <= Instant::now() {
                            break End::IdleTimeout(idle);
                        }
                    }
                }
            }
        };
        let (received, sent) = self.bytes();
        Relayed {
            received,
            sent,
            end,
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn ended(result: io::Result<()>) -> End {
    match result {
        Ok(()) => End::Done,
        Err(err) => End::Failed(err),
    }
}

/// When a byte last moved, shared by both directions: milliseconds since `epoch`.
struct Activity {
    epoch: Instant,
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let since = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// One side of the relay: reads mark activity, writes are counted.
struct Watched<'a, T: ?Sized> {
    io: &'a mut T,
    activity: &'a Activity,
    written: &'a AtomicU64,
}

impl<'a, T: ?Sized> Watched<'a, T> {
    fn new(io: &'a mut T, activity: &'a Activity, written: &'a AtomicU64) -> Self {
        Self {
            io,
            activity,
            written,
        }
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const IDLE: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn both_directions_are_carried_and_counted_until_both_close() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut server_side, mut server) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut server_side, Some(IDLE), |_, _| {}).await
        });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"hello");
        server.write_all(b"answer!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer!");
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Done), "{relayed:?}");
        assert_eq!((relayed.received, relayed.sent), (5, 7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_at_the_idle_timeout_and_not_before() {
        let (_client, mut client_side) = duplex(1024);
        let (mut server_side, _server) = duplex(1024);
        let started = Instant::now();
        let relayed = relay(&mut client_side, &mut server_side, Some(IDLE), |_, _| {}).await;
        assert!(matches!(relayed.end, End::IdleTimeout(IDLE)), "{relayed:?}");
        assert_eq!(started.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn every_byte_either_way_restarts_the_idle_clock() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut server_side, mut server) = duplex(1024);
        let started = Instant::now();
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut server_side, Some(IDLE), |_, _| {}).await
        });
        // A byte every 2 s, alternating directions, for 10 s: never 3 s of silence.
        for round in 0..5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut byte = [0];
            if round % 2 == 0 {
                client.write_all(b"c").await.unwrap();
                server.read_exact(&mut byte).await.unwrap();
            } else {
                server.write_all(b"s").await.unwrap();
                client.read_exact(&mut byte).await.unwrap();
            }
        }
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::IdleTimeout(_)), "{relayed:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(10) + IDLE);
        assert_eq!((relayed.received, relayed.sent), (3, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_idle_timeout_silence_is_kept() {
        let (client, mut client_side) = duplex(1024);
        let (mut server_side, server) = duplex(1024);
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut server_side, None, |_, _| {}).await
        });
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!relay.is_finished());
        drop((client, server));
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Done), "{relayed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_connection_reports_its_bytes_while_it_is_open() {
        let (mut client, mut client_side) = duplex(1024);
        let (mut server_side, mut server) = duplex(1024);
        let (reports, reported) = std::sync::mpsc::channel();
        let relay = tokio::spawn(async move {
            relay(
                &mut client_side,
                &mut server_side,
                None,
                |received, sent| {
                    reports.send((received, sent)).unwrap();
                },
            )
            .await
        });
        client.write_all(b"abc").await.unwrap();
        let mut three = [0; 3];
        server.read_exact(&mut three).await.unwrap();
        tokio::time::sleep(PROGRESS_INTERVAL + Duration::from_millis(1)).await;
        assert_eq!(reported.try_recv(), Ok((3, 0)));
        server.write_all(b"de").await.unwrap();
        let mut two = [0; 2];
        client.read_exact(&mut two).await.unwrap();
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        assert_eq!(reported.try_recv(), Ok((3, 2)));
        drop((client, server));
        let relayed = relay.await.unwrap();
        assert_eq!((relayed.received, relayed.sent), (3, 2));
    }

    /// A connected pair of loopback sockets: (the end a test drives, the end a relay gets).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outside = TcpStream::connect(listener.local_addr().unwrap());
        let (outside, inside) = tokio::join!(outside, listener.accept());
        (outside.unwrap(), inside.unwrap().0)
    }

    /// A client and a server socket with [`splice`] running between them, the server
    /// getting `prefix` first.
    async fn spliced(
        prefix: &'static [u8],
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Relayed>) {
        let (client, mut client_side) = socket_pair().await;
        let (mut server_side, server) = socket_pair().await;
        let relay = tokio::spawn(async move {
            let idle = Some(IDLE);
            splice(&mut client_side, prefix, &mut server_side, idle, |_, _| {}).await
        });
        (client, server, relay)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[tokio::test]
    async fn splice_carries_the_prefix_then_both_directions_and_counts_them() {
        let (mut client, mut server, relay) = spliced(b"first:").await;
        // Megabytes each way at once: many chunks, both pipes busy together.
        let request = pattern(5 << 20, 0x5a);
        let answer = pattern(3 << 20, 0xa5);
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let send_request = async {
            client_write.write_all(&request).await.unwrap();
            client_write.shutdown().await.unwrap();
        };
        let send_answer = async {
            server_write.write_all(&answer).await.unwrap();
            server_write.shutdown().await.unwrap();
        };
        let mut received = Vec::new();
        let mut sent = Vec::new();
        let (_, _, got_request, got_answer) = tokio::join!(
            send_request,
            send_answer,
            server_read.read_to_end(&mut received),
            client_read.read_to_end(&mut sent),
        );
        got_request.unwrap();
        got_answer.unwrap();
        assert_eq!(&received[..6], b"first:");
        assert!(received[6..] == request[..], "the request arrived altered");
        assert!(sent == answer, "the answer arrived altered");
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Done), "{relayed:?}");
        assert_eq!(
            (relayed.received, relayed.sent),
            (request.len() as u64 + 6, answer.len() as u64)
        );
        // Both pipes came back empty to this thread's pool, and no more were kept.
        assert!(matches!(splice::pooled(), 1..=2), "{}", splice::pooled());
    }

    #[tokio::test]
    async fn splice_keeps_one_direction_open_after_the_other_closes() {
        let (mut client, mut server, relay) = spliced(b"").await;
        client.write_all(b"question").await.unwrap();
        client.shutdown().await.unwrap();
        let mut question = Vec::new();
        server.read_to_end(&mut question).await.unwrap();
        assert_eq!(question, b"question");
        // The client's half is closed; the answer still flows back.
        server.write_all(b"answer").await.unwrap();
        let mut answer = [0; 6];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");
        assert!(!relay.is_finished());
        drop(server);
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Done), "{relayed:?}");
        assert_eq!((relayed.received, relayed.sent), (8, 6));
    }

    #[tokio::test]
    async fn a_reset_ends_the_splice_as_a_failure_with_what_got_through() {
        let (mut client, mut server, relay) = spliced(b"").await;
        client.write_all(b"abc").await.unwrap();
        let mut three = [0; 3];
        server.read_exact(&mut three).await.unwrap();
        // Closing with a zero linger time sends a reset.
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Failed(_)), "{relayed:?}");
        assert_eq!((relayed.received, relayed.sent), (3, 0));
    }
}
