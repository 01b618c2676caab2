//! HBONE: HTTP/2 CONNECT tunnels between agents.
//!
//! Istio's HBONE carries each proxied TCP connection as one stream of an HTTP/2
//! connection (over mutual TLS, which the caller sets up; everything here is generic
//! over the IO). The client sends `CONNECT` with `:authority` = the original
//! destination `ip:port` plus `forwarded`/`baggage`/`traceparent` headers; the server
//! answers 200 and then bytes flow both ways in the stream's DATA frames until each
//! side ends its half with END_STREAM. Refusals are 400 (bad request), 401 (denied)
//! and 503 (destination unreachable).
//!
//! - [`Tunnel`]: one stream as `AsyncRead + AsyncWrite`, with HTTP/2 flow control,
//!   half-close and resets mapped onto tokio's IO traits.
//! - [`Pool`]: the client side; pooled HTTP/2 connections per key, each shared by up
//!   to a hundred tunnels.
//! - [`serve`]: the server side; validates CONNECT requests and hands each one to a
//!   handler as an [`Incoming`] that it accepts or refuses, pacing a peer that resets
//!   its tunnels as soon as they open.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::{Ping, Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use log::{debug, warn};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OnceCell;
use tokio::time::{Instant, timeout, timeout_at};

use super::abuse::{self, Listener, Pacing, PrematureResets};
use crate::sync;

#[cfg(test)]
mod tests;

/// HTTP/2 tuning shared by both ends of an HBONE connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Initial per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE): how many bytes
    /// of one tunnel the peer may have in flight before our reader consumes them.
    pub stream_window: u32,
    /// Connection-level receive window, shared by all tunnels of one connection.
    pub connection_window: u32,
    /// Largest DATA frame payload we accept (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_size: u32,
    /// Streams (tunnels) the peer may open concurrently on one connection we serve.
    pub max_concurrent_streams: u32,
    /// Tunnels the pool opens on one connection it dials before it dials another.
    pub max_streams_per_connection: u32,
    /// How long the pool keeps a connection that carries no tunnel (one per key at
    /// most; the others go as soon as they are idle).
    pub idle_release: Duration,
    /// Largest decoded header block we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// Budget for each of: dialing (TCP + mTLS, done by the caller's dial function),
    /// and the HTTP/2 handshake including one PING round trip.
    pub handshake_timeout: Duration,
}

impl Default for Settings {
    /// Tuned for throughput between nodes on a LAN.
    ///
    /// - `stream_window` 4 MiB: a tunnel can only go as fast as window / RTT. Between
    ///   nodes the RTT including TLS and proxy scheduling is ~0.2–1 ms, so 4 MiB lets a
    ///   single tunnel run at 30+ Gbit/s at 1 ms; h2's default of 64 KiB caps it at
    ///   ~0.5 Gbit/s. The window is a cap, not an allocation: memory is only used while a
    ///   reader lags.
    /// - `connection_window` 16 MiB: four full-speed tunnels at once per peer node, and
    ///   the bound on unread data buffered for one peer connection. Note that data a
    ///   slow *reader* leaves unread counts against this shared window too: four stalled
    ///   tunnels with full windows stall the other tunnels of that connection.
    /// - `max_frame_size` 256 KiB, not ztunnel's 1 MiB: per-frame overhead is 9 bytes,
    ///   already 0.003 % at 256 KiB, and reads/writes are bounded by TLS records (16 KiB)
    ///   and copy buffers anyway, so bigger frames buy nothing measurable. They do cost
    ///   latency: a frame is sent whole, so a bulk tunnel's 1 MiB frame holds a small RPC
    ///   on another tunnel of the same connection ~0.8 ms at 10 Gbit/s (0.2 ms at 256 KiB).
    /// - `max_concurrent_streams` 1000: what we let a peer open on one connection; our
    ///   own pool stops at `max_streams_per_connection`, but other HBONE speakers may
    ///   multiplex more.
    /// - `max_streams_per_connection` 100, as ztunnel: well below what peers allow, so
    ///   that one pod's thousand idle connections fill ten connections of their own
    ///   instead of one the next pod of the same identity then queues behind, and so
    ///   that busy tunnels spread over connections (each is one task, one TLS stream).
    /// - `idle_release` 5 min: a key that was busy keeps one warm connection for the
    ///   next burst; extra connections left over from a burst close once idle.
    /// - `max_header_list_size` 16 KiB: HBONE requests carry a handful of short headers
    ///   (forwarded, baggage, traceparent); anything bigger is abuse.
    /// - `handshake_timeout` 3 s: a handshake between agents takes a few milliseconds
    ///   (under 100 ms on a loaded 2-core node, see ARCHITECTURE.md); the deadline
    ///   bounds how long an unauthenticated peer holds a slot on the server, and makes
    ///   a black-holed peer an error an operator sees quickly.
    fn default() -> Self {
        Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_concurrent_streams: 1000,
            max_streams_per_connection: 100,
            idle_release: Duration::from_secs(300),
            max_header_list_size: 16 * 1024,
            handshake_timeout: Duration::from_secs(3),
        }
    }
}

impl Settings {
    /// The settings with every value moved into the range HTTP/2 (and h2, which
    /// panics on some out-of-range values) accepts.
    fn clamped(&self) -> Settings {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        const MIN_FRAME: u32 = 16 * 1024;
        const MAX_FRAME: u32 = (1 << 24) - 1;
        Settings {
            stream_window: self.stream_window.clamp(MIN_FRAME, MAX_WINDOW),
            connection_window: self.connection_window.clamp(65_535, MAX_WINDOW),
            max_frame_size: self.max_frame_size.clamp(MIN_FRAME, MAX_FRAME),
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            idle_release: self.idle_release,
            max_header_list_size: self.max_header_list_size.max(1024),
            handshake_timeout: self.handshake_timeout,
        }
    }

    fn client_builder(&self) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .enable_push(false);
        builder
    }

    fn server_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_pending_accept_reset_streams(Listener::Hbone.pending_resets());
        builder
    }
}

/// Why an HBONE connection or tunnel could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The caller's dial function (TCP connect + mTLS) failed or timed out.
    #[error(
        "could not reach the peer agent: {0}; check that the destination node is up, that \
         port 15008 is reachable between nodes (NetworkPolicy, firewall) and that both \
         sides trust the mesh CA"
    )]
    Dial(#[source] io::Error),
    /// The peer did not complete the HTTP/2 handshake (preface, SETTINGS, one PING round
    /// trip) in time.
    #[error(
        "HBONE handshake with the peer agent timed out after {0:?}; is port 15008 \
         reachable between nodes, and is the peer speaking HTTP/2 (ALPN h2)?"
    )]
    HandshakeTimeout(Duration),
    /// The peer sent something that is not an HTTP/2 handshake.
    #[error(
        "HBONE handshake with the peer failed: {0}; the peer is not speaking HTTP/2 as an \
         HBONE endpoint should (HTTP/2 over mTLS, ALPN h2, port 15008)"
    )]
    Handshake(#[source] h2::Error),
    /// The connection closed before it could carry a tunnel.
    #[error(
        "the HBONE connection closed before it could be used; the peer agent may be \
         restarting or overloaded (check its logs)"
    )]
    Closed,
    /// The peer answered the CONNECT with a status other than 200.
    #[error("the peer agent refused the tunnel with HTTP {0}: {hint}", hint = refusal_hint(*.0))]
    Refused(StatusCode),
    /// An established connection or stream failed: reset, GOAWAY, lost transport, or
    /// a protocol violation.
    #[error(
        "HTTP/2 error on the HBONE connection: {0}; the peer reset the tunnel, broke the \
         protocol, or the connection was lost (peer agent restarting? check both agents' logs)"
    )]
    Protocol(#[source] h2::Error),
    /// A concurrent connect to the same peer (which this call waited for instead of
    /// dialing again) failed with this error.
    #[error("{message} (outcome of a concurrent connection attempt to the same peer)")]
    ConcurrentFailure {
        /// The [`HboneError::reason`] of the original error.
        reason: &'static str,
        /// The original error's message.
        message: String,
    },
}

impl HboneError {
    /// A short snake_case label for metrics: `dial`, `handshake_timeout`, `handshake`,
    /// `closed`, `refused`, and for failures of an established connection `reset` (the
    /// peer sent RST_STREAM), `goaway` (the peer sent GOAWAY), `io` (transport lost) or
    /// `protocol` (anything else, including violations we detected).
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Dial(_) => "dial",
            HboneError::HandshakeTimeout(_) => "handshake_timeout",
            HboneError::Handshake(_) => "handshake",
            HboneError::Closed => "closed",
            HboneError::Refused(_) => "refused",
            HboneError::Protocol(e) if e.is_io() => "io",
            HboneError::Protocol(e) if e.is_remote() && e.is_reset() => "reset",
            HboneError::Protocol(e) if e.is_remote() && e.is_go_away() => "goaway",
            HboneError::Protocol(_) => "protocol",
            HboneError::ConcurrentFailure { reason, .. } => reason,
        }
    }
}

fn refusal_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "the CONNECT request was malformed (authority not ip:port?)",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            "denied by authorization policy at the destination"
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            "the destination agent could not reach the workload (pod gone or not listening?)"
        }
        _ => "unexpected answer from the peer agent",
    }
}

// ===== Tunnel =====

/// One HBONE tunnel: an HTTP/2 stream after a successful CONNECT, as a byte stream.
///
/// - Reads return DATA frame payloads; the stream's flow-control credit is given back
///   to the peer as the reader consumes bytes, so a slow reader slows the sender
///   instead of buffering without bound. EOF is the peer's END_STREAM.
/// - Writes send DATA frames within the peer's flow-control window; a write returns
///   fewer bytes than offered when the window is short, and waits when it is empty.
/// - `poll_shutdown` ends our half (empty DATA frame with END_STREAM); the other half
///   keeps working.
/// - RST_STREAM and connection loss are `io::Error`s (`ConnectionReset`,
///   `BrokenPipe`, `ConnectionAborted`, or the transport's own error), never EOF.
///
/// Dropping a tunnel before both halves ended resets the stream (CANCEL).
#[derive(Debug)]
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes the reader has not taken yet. Their credit is released as they
    /// are consumed.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// A client tunnel's place on its pooled connection, given back when it drops.
    _lease: Option<Lease>,
}

impl Tunnel {
    fn new(send: SendStream<Bytes>, recv: RecvStream) -> Tunnel {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _lease: None,
        }
    }

    /// The error to report once the send half can no longer be used.
    fn send_closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => reset_error(reason),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE tunnel: the stream is closed for sending",
            ),
        }
    }
}

fn reset_error(reason: Reason) -> io::Error {
    let kind = if matches!(reason, Reason::NO_ERROR | Reason::CANCEL) {
        io::ErrorKind::BrokenPipe
    } else {
        io::ErrorKind::ConnectionReset
    };
    io::Error::new(kind, format!("HBONE tunnel reset by the peer ({reason})"))
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HBONE connection IO error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

impl AsyncRead for Tunnel {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                // Give the credit back only now that the reader has the bytes: h2 never
                // does it by itself, and without it the peer stalls once it has sent a
                // window's worth. Failure means the stream is already gone; the bytes
                // are still good and the next poll reports the error.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                // Empty DATA frames are legal; returning without filling `buf` would
                // read as EOF, so keep polling.
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.read_eof = true,
            }
        }
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HBONE tunnel: write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            // Capacity already assigned to the stream (by an earlier reservation, or
            // left over from one) is used first; `poll_capacity` only reports
            // *increases*, so polling it while capacity is available could wait forever.
            let available = this.send.capacity();
            if available > 0 {
                let n = available.min(buf.len());
                if this
                    .send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .is_err()
                {
                    return Poll::Ready(Err(this.send_closed_error(cx)));
                }
                return Poll::Ready(Ok(n));
            }
            // Reservations are totals, not increments: ask for exactly what this write
            // needs, so an idle tunnel does not hoard connection-level window.
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(this.send_closed_error(cx))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task; there is no per-stream
        // flush to wait for.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        // Don't keep a reservation for data that will never come.
        this.send.reserve_capacity(0);
        let result = this.send.send_data(Bytes::new(), true);
        this.write_closed = true;
        match result {
            Ok(()) => Poll::Ready(Ok(())),
            // The peer reset with NO_ERROR: it has everything it wants from us.
            Err(_) => match this.send.poll_reset(cx) {
                Poll::Ready(Ok(Reason::NO_ERROR)) => Poll::Ready(Ok(())),
                _ => Poll::Ready(Err(this.send_closed_error(cx))),
            },
        }
    }
}

// ===== client: Pool =====

/// HBONE client: opens tunnels over pooled HTTP/2 connections.
///
/// The key (for weft: source identity and certificate, destination identity, peer
/// agent) is opaque here. A key has as many connections as its tunnels need: a tunnel
/// goes on the oldest connection of its key that carries fewer than
/// `Settings::max_streams_per_connection`, or on a new one. Connections still being
/// established count, so concurrent first connects dial once and share the outcome,
/// success or failure. A connection stays pooled until the peer closes it, it fails,
/// it fails a send, or [`Pool::release_idle`] finds it idle.
pub struct Pool<K> {
    inner: Arc<PoolInner<K>>,
}

struct PoolInner<K> {
    settings: Settings,
    slots: Mutex<HashMap<K, Vec<Arc<Slot>>>>,
    /// Source of slot and connection ids.
    next_id: AtomicU64,
    /// Idle times are kept as milliseconds since this instant.
    epoch: Instant,
}

/// One connection (or connection attempt) of a key. Every connect leased onto it
/// awaits the same cell.
struct Slot {
    id: u64,
    conn: OnceCell<Result<Conn, SharedFailure>>,
    /// Tunnels open or being opened on the connection. Only raised under the pool's
    /// lock, so a connection never gets more than its share.
    streams: AtomicUsize,
    /// When its last tunnel ended, in milliseconds since the pool's epoch.
    idle_since: AtomicU64,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Set by the connection task when the connection ends.
    closed: Arc<AtomicBool>,
}

#[derive(Clone)]
struct SharedFailure {
    reason: &'static str,
    message: String,
}

/// A tunnel's place on a pooled connection; dropping it frees the place.
struct Lease {
    slot: Arc<Slot>,
    epoch: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let now = millis_since(self.epoch);
        self.slot.idle_since.store(now, Ordering::Relaxed);
        self.slot.streams.fetch_sub(1, Ordering::Release);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("slot", &self.slot.id)
            .finish()
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Slot {
    /// A slot that can no longer produce a usable connection.
    fn is_stale(&self) -> bool {
        match self.conn.get() {
            None => false,
            Some(Ok(conn)) => conn.closed.load(Ordering::Acquire),
            Some(Err(_)) => true,
        }
    }

    fn is_live(&self) -> bool {
        matches!(self.conn.get(), Some(Ok(conn)) if !conn.closed.load(Ordering::Acquire))
    }

    fn holds(&self, conn_id: u64) -> bool {
        matches!(self.conn.get(), Some(Ok(conn)) if conn.id == conn_id)
    }
}

impl<K: Hash + Eq + Clone> PoolInner<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Vec<Arc<Slot>>>> {
        sync::lock(&self.slots)
    }

    /// A place for one tunnel of `key`: on the oldest usable connection with room, or
    /// on a new, empty slot.
    fn lease(&self, key: &K) -> Lease {
        let limit = self.settings.max_streams_per_connection as usize;
        let mut slots = self.lock();
        let list = slots.entry(key.clone()).or_default();
        list.retain(|slot| !slot.is_stale());
        let roomy = list
            .iter()
            .find(|slot| slot.streams.load(Ordering::Acquire) < limit);
        let slot = match roomy {
            Some(slot) => Arc::clone(slot),
            None => {
                let slot = Arc::new(Slot {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    conn: OnceCell::new(),
                    streams: AtomicUsize::new(0),
                    idle_since: AtomicU64::new(millis_since(self.epoch)),
                });
                list.push(Arc::clone(&slot));
                slot
            }
        };
        slot.streams.fetch_add(1, Ordering::AcqRel);
        Lease {
            slot,
            epoch: self.epoch,
        }
    }

    /// Forgets the key's slots that `forget` picks.
    fn forget(&self, key: &K, forget: impl Fn(&Slot) -> bool) {
        let mut slots = self.lock();
        if let Some(list) = slots.get_mut(key) {
            list.retain(|slot| !forget(slot));
            if list.is_empty() {
                slots.remove(key);
            }
        }
    }
}

/// How opening a stream on a pooled connection failed.
enum OpenError {
    /// The connection is unusable and no request reached the peer's application;
    /// retrying on a fresh connection is safe.
    Connection(h2::Error),
    /// The stream failed for a reason a fresh connection would not fix.
    Stream(h2::Error),
    Refused(StatusCode),
}

impl<K> Pool<K>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Debug + 'static,
{
    /// An empty pool whose connections use `settings`.
    pub fn new(settings: Settings) -> Self {
        let clamped = settings.clamped();
        if clamped != settings {
            warn!("HBONE settings {settings:?} are out of range for HTTP/2; using {clamped:?}");
        }
        Pool {
            inner: Arc::new(PoolInner {
                settings: clamped,
                slots: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Forgets every connection whose key `keep` refuses. Tunnels open on it carry on;
    /// the connection closes when the last of them ends.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.inner.lock().retain(|key, _| keep(key));
    }

    /// Live pooled connections (for a gauge).
    pub fn connections(&self) -> usize {
        self.inner
            .lock()
            .values()
            .flatten()
            .filter(|slot| slot.is_live())
            .count()
    }

    /// Forgets idle connections: of those carrying no tunnel, each key keeps the one
    /// used last if that was within `Settings::idle_release`. A forgotten connection
    /// closes (HTTP/2 ends it once no handle is left); the agent calls this
    /// periodically.
    pub fn release_idle(&self) {
        let now = millis_since(self.inner.epoch);
        let keep_for =
            u64::try_from(self.inner.settings.idle_release.as_millis()).unwrap_or(u64::MAX);
        let mut slots = self.inner.lock();
        slots.retain(|_, list| {
            list.retain(|slot| !slot.is_stale());
            let idle =
                |slot: &Arc<Slot>| slot.is_live() && slot.streams.load(Ordering::Acquire) == 0;
            let warm = list
                .iter()
                .filter(|slot| idle(slot))
                .max_by_key(|slot| slot.idle_since.load(Ordering::Relaxed))
                .filter(|slot| {
                    now.saturating_sub(slot.idle_since.load(Ordering::Relaxed)) < keep_for
                })
                .map(|slot| slot.id);
            list.retain(|slot| !idle(slot) || Some(slot.id) == warm);
            !list.is_empty()
        });
    }

    /// Open a tunnel to `key`'s peer: on a pooled connection with room, otherwise on a
    /// new one from `dial` (TCP + mTLS, the caller's business) followed by the HTTP/2
    /// handshake, each under the handshake timeout.
    ///
    /// `request` is the CONNECT the caller built (`:authority` = destination `ip:port`,
    /// HBONE headers). If a pooled connection turns out to be dead when used (GOAWAY,
    /// lost transport), it is dropped and the request retried once on a fresh dial.
    /// Any answer other than 200 is [`HboneError::Refused`].
    ///
    /// No timeout applies to the CONNECT's answer, which includes the peer agent's own
    /// connect to the workload; wrap the call in `tokio::time::timeout` to bound it.
    pub async fn connect<F, Fut, IO>(
        &self,
        key: &K,
        dial: F,
        request: Request<()>,
    ) -> Result<Tunnel, HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        debug_assert_eq!(
            request.method(),
            Method::CONNECT,
            "HBONE requests are CONNECT"
        );
        let mut dial = Some(dial);
        let (parts, ()) = request.into_parts();
        let mut retried = false;
        loop {
            let (lease, conn) = self.checkout(key, &mut dial).await?;
            match open(&conn, Request::from_parts(parts.clone(), ())).await {
                Ok(mut tunnel) => {
                    tunnel._lease = Some(lease);
                    return Ok(tunnel);
                }
                Err(OpenError::Refused(status)) => return Err(HboneError::Refused(status)),
                Err(OpenError::Stream(e)) => return Err(HboneError::Protocol(e)),
                Err(OpenError::Connection(e)) => {
                    let id = lease.slot.id;
                    self.inner.forget(key, |slot| slot.id == id);
                    // A retry needs a dial of our own: if ours was spent on this very
                    // connection, it was fresh and a second one is unlikely to fare better.
                    if retried || dial.is_none() {
                        return Err(HboneError::Protocol(e));
                    }
                    debug!("HBONE connection for {key:?} failed when reused ({e}); dialing anew");
                    retried = true;
                }
            }
        }
    }

    /// A place on a live connection for `key`, dialing with `dial` if the place is on
    /// a connection nobody is establishing yet.
    async fn checkout<F, Fut, IO>(
        &self,
        key: &K,
        dial: &mut Option<F>,
    ) -> Result<(Lease, Conn), HboneError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<IO>>,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Twice at most: a connection can die between being established and being
        // checked out; after that, report it.
        for _ in 0..2 {
            let lease = self.inner.lease(key);
            let slot = Arc::clone(&lease.slot);
            let mut own_error = None;
            let outcome = slot
                .conn
                .get_or_init(|| {
                    // Only runs if this call is the one establishing the connection;
                    // if it is cancelled, the next waiter runs its own closure.
                    let dial = dial.take();
                    let own_error = &mut own_error;
                    let inner = &self.inner;
                    async move {
                        let result = match dial {
                            Some(dial) => establish(inner, key, dial).await,
                            None => Err(HboneError::Closed),
                        };
                        result.map_err(|e| {
                            let shared = SharedFailure {
                                reason: e.reason(),
                                message: e.to_string(),
                            };
                            *own_error = Some(e);
                            shared
                        })
                    }
                })
                .await;
            match outcome {
                Ok(conn) if !conn.closed.load(Ordering::Acquire) => {
                    return Ok((lease, conn.clone()));
                }
                Ok(_) => self.inner.forget(key, |other| other.id == slot.id),
                Err(shared) => {
                    self.inner.forget(key, |other| other.id == slot.id);
                    return Err(own_error.unwrap_or_else(|| HboneError::ConcurrentFailure {
                        reason: shared.reason,
                        message: shared.message.clone(),
                    }));
                }
            }
        }
        Err(HboneError::Closed)
    }
}

/// Dial, run the HTTP/2 client handshake and spawn the connection task.
async fn establish<K, F, Fut, IO>(
    inner: &Arc<PoolInner<K>>,
    key: &K,
    dial: F,
) -> Result<Conn, HboneError>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Debug + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &inner.settings;
    let limit = settings.handshake_timeout;
    let io = match timeout(limit, dial()).await {
        Ok(io) => io.map_err(HboneError::Dial)?,
        Err(_) => {
            return Err(HboneError::Dial(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {limit:?}"),
            )));
        }
    };

    let deadline = Instant::now() + limit;
    let (send, mut connection) = match timeout_at(
        deadline,
        settings.client_builder().handshake::<_, Bytes>(io),
    )
    .await
    {
        Ok(handshake) => handshake.map_err(HboneError::Handshake)?,
        Err(_) => return Err(HboneError::HandshakeTimeout(limit)),
    };
    let ping = connection.ping_pong();

    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let closed = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn({
        let closed = closed.clone();
        let pool = Arc::downgrade(inner);
        let key = key.clone();
        async move {
            let result = connection.await;
            closed.store(true, Ordering::Release);
            match result {
                Ok(()) => debug!("HBONE connection for {key:?} closed"),
                Err(e) => debug!("HBONE connection for {key:?} ended: {e}"),
            }
            if let Some(pool) = Weak::upgrade(&pool) {
                pool.forget(&key, |slot| slot.holds(id));
            }
        }
    });

    // h2's client handshake only writes our preface; a PING round trip proves the peer
    // has answered with its own and speaks HTTP/2, before tunnels queue on it.
    if let Some(mut ping) = ping {
        let outcome = timeout_at(deadline, ping.ping(Ping::opaque())).await;
        let error = match outcome {
            Ok(Ok(_pong)) => None,
            Ok(Err(e)) => Some(HboneError::Handshake(e)),
            Err(_) => Some(HboneError::HandshakeTimeout(limit)),
        };
        if let Some(error) = error {
            driver.abort();
            return Err(error);
        }
    }
    debug!("HBONE connection for {key:?} established");
    Ok(Conn { id, send, closed })
}

/// Send the CONNECT on `conn` and wait for the answer's head.
async fn open(conn: &Conn, request: Request<()>) -> Result<Tunnel, OpenError> {
    let dead = |e: h2::Error| {
        let retryable = e.is_go_away()
            || e.is_io()
            || e.reason() == Some(Reason::REFUSED_STREAM)
            || conn.closed.load(Ordering::Acquire);
        if retryable {
            OpenError::Connection(e)
        } else {
            OpenError::Stream(e)
        }
    };
    // `ready` fails only when the connection is gone.
    let mut send = conn
        .send
        .clone()
        .ready()
        .await
        .map_err(OpenError::Connection)?;
    let (response, stream) = send.send_request(request, false).map_err(dead)?;
    let response = response.await.map_err(dead)?;
    if response.status() != StatusCode::OK {
        return Err(OpenError::Refused(response.status()));
    }
    Ok(Tunnel::new(stream, response.into_body()))
}

impl<K> Clone for Pool<K> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<K> fmt::Debug for Pool<K>
where
    K: Hash + Eq + Clone + Send + Sync + fmt::Debug + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.inner.settings)
            .field("connections", &self.connections())
            .finish()
    }
}

// ===== server =====

/// A valid CONNECT received by [`serve`], waiting to be accepted or refused.
///
/// Dropping it unanswered refuses it with 503.
pub struct Incoming {
    /// The destination the client asked for (`:authority`).
    pub authority: SocketAddr,
    /// The request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub headers: http::HeaderMap,
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
}

impl Incoming {
    /// Answer 200 and return the tunnel.
    pub fn accept(mut self) -> Result<Tunnel, HboneError> {
        let (Some(mut respond), Some(body)) = (self.respond.take(), self.body.take()) else {
            return Err(HboneError::Closed);
        };
        let send = respond
            .send_response(status_only(StatusCode::OK), false)
            .map_err(HboneError::Protocol)?;
        Ok(Tunnel::new(send, body))
    }

    /// Answer `status` (400, 401, 503, ...) and end the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let status = if status.is_success() {
            warn!(
                "HBONE: refusing {} with {status} would open the tunnel; sending 503",
                self.authority
            );
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            status
        };
        self.answer(status);
    }

    /// The calling pod's address, as the client's `Forwarded: for=` names it
    /// ([`forwarded_for`]; who may believe it is the caller's to decide).
    pub fn forwarded_for(&self) -> Option<IpAddr> {
        forwarded_for(self.headers.get("forwarded")?.to_str().ok()?)
    }

    fn answer(&mut self, status: StatusCode) {
        if let Some(mut respond) = self.respond.take()
            && let Err(e) = respond.send_response(status_only(status), true)
        {
            debug!(
                "HBONE: could not refuse {} with {status}: {e}",
                self.authority
            );
        }
        // Dropping the body tells the client to stop sending (RST_STREAM NO_ERROR).
        self.body = None;
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.respond.is_some() {
            debug!(
                "HBONE: CONNECT to {} dropped unanswered; refusing with 503",
                self.authority
            );
            self.answer(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("authority", &self.authority)
            .field("headers", &self.headers)
            .field("answered", &self.respond.is_none())
            .finish()
    }
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Serve one inbound HBONE connection: HTTP/2 server handshake, then every valid
/// CONNECT goes to `handler` on a task of its own, until the client goes away.
///
/// The handshake (client preface, then one PING round trip, which a client only
/// answers after its SETTINGS) must finish within `settings.handshake_timeout`.
/// Requests that are not CONNECT, or whose authority is not an `ip:port`, are
/// answered 400 here without calling `handler`.
///
/// Once `shutdown` resolves, the connection says GOAWAY: the client opens its next
/// tunnels elsewhere (on a new connection, to whichever process accepts it), and the
/// tunnels open finish.
///
/// While the client's `premature` resets (tunnels reset as soon as opened, counted by
/// the connection's inspector) outrun their budget, new tunnels wait ([`Pacing`]): the
/// connection goes on, but the handler, which dials a pod for each, is not called.
///
/// Returns `Ok` when the client closes cleanly, and an error saying what went wrong
/// otherwise (timeout, garbage, protocol violation, lost transport).
pub async fn serve<IO, H, Fut>(
    io: IO,
    settings: &Settings,
    premature: PrematureResets,
    shutdown: impl Future<Output = ()>,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Incoming) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let settings = settings.clamped();
    let limit = settings.handshake_timeout;
    let deadline = Instant::now() + limit;
    let mut connection = match timeout_at(
        deadline,
        settings.server_builder().handshake::<_, Bytes>(io),
    )
    .await
    {
        Ok(handshake) => handshake.map_err(HboneError::Handshake)?,
        Err(_) => return Err(HboneError::HandshakeTimeout(limit)),
    };

    let mut ping = connection.ping_pong();
    let pong = async move {
        match ping.as_mut() {
            Some(ping) => ping.ping(Ping::opaque()).await.map(drop),
            None => Ok(()),
        }
    };
    tokio::pin!(pong);
    let expiry = tokio::time::sleep_until(deadline);
    tokio::pin!(expiry);
    let mut handshaking = true;
    let (mut accepted, mut rejected, mut withdrawn) = (0u64, 0u64, 0u64);
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    let mut pacing = Pacing::new(Instant::now());
    let mut held_back = false;

    loop {
        let paced = pacing.wait(premature.count(), Instant::now());
        if paced.is_some() && !held_back {
            abuse::paced();
        }
        held_back = paced.is_some();
        let resume = async {
            match paced {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = next_tunnel(&mut connection, paced.is_none()) => match next {
                None if handshaking => return Err(HboneError::Closed),
                None => break,
                Some(Err(e)) => {
                    debug!("HBONE connection failed after {accepted} tunnels: {e}");
                    return Err(HboneError::Protocol(e));
                }
                Some(Ok(connect)) => match take(connect, &handler) {
                    Taken::Handled => accepted += 1,
                    Taken::Refused => rejected += 1,
                    Taken::Withdrawn => withdrawn += 1,
                },
            },
            pong = &mut pong, if handshaking => {
                pong.map_err(HboneError::Handshake)?;
                handshaking = false;
            }
            () = &mut expiry, if handshaking => return Err(HboneError::HandshakeTimeout(limit)),
            () = &mut shutdown, if !shutting_down => {
                connection.graceful_shutdown();
                shutting_down = true;
            }
            () = resume => {}
        }
    }
    debug!(
        "HBONE connection closed by the client: {accepted} tunnels, {rejected} bad requests, \
         {withdrawn} reset before they were taken"
    );
    Ok(())
}

/// What [`serve`] did with a CONNECT h2 handed over.
enum Taken {
    Handled,
    Refused,
    Withdrawn,
}

/// Hands a valid CONNECT to `handler` on a task of its own and answers 400 to one that
/// is not; one the client has reset already is dropped: it waits for no answer, and
/// no pod is dialled for it.
fn take<H, Fut>((request, mut respond): Connect, handler: &H) -> Taken
where
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let waker = std::task::Waker::noop();
    if respond
        .poll_reset(&mut Context::from_waker(waker))
        .is_ready()
    {
        return Taken::Withdrawn;
    }
    match connect_target(&request) {
        Ok(authority) => {
            let (parts, body) = request.into_parts();
            let incoming = Incoming {
                authority,
                headers: parts.headers,
                respond: Some(respond),
                body: Some(body),
            };
            tokio::spawn(handler(incoming));
            Taken::Handled
        }
        Err(why) => {
            debug!(
                "HBONE: answering 400 to {} {}: {why}",
                request.method(),
                request.uri()
            );
            if let Err(e) = respond.send_response(status_only(StatusCode::BAD_REQUEST), true) {
                debug!("HBONE: could not answer 400: {e}");
            }
            Taken::Refused
        }
    }
}

/// A CONNECT as h2 hands it over: the request, and where to answer it.
type Connect = (Request<RecvStream>, SendResponse<Bytes>);

/// The next CONNECT on `connection`, if `accepting`; else only the connection's
/// progress (h2 keeps the CONNECTs that arrive meanwhile for later), ending with it.
fn next_tunnel<IO>(
    connection: &mut h2::server::Connection<IO, Bytes>,
    accepting: bool,
) -> impl Future<Output = Option<Result<Connect, h2::Error>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(move |cx| {
        if accepting {
            connection.poll_accept(cx)
        } else {
            connection
                .poll_closed(cx)
                .map(|closed| closed.err().map(Err))
        }
    })
}

/// The address in the `for` parameter of a `Forwarded` header's first element, as
/// RFC 7239 writes it: a token or a quoted string, an IPv4 address or a bracketed
/// IPv6 one, with or without a port (`for=10.0.0.5`, `for="10.0.0.5:53766"`,
/// `for="[fd00::5]:80"`; weft's agents send the first form, Istio's ztunnel the
/// second). The first element is the original client; `unknown`, an obfuscated name
/// or anything malformed names no address.
pub fn forwarded_for(value: &str) -> Option<IpAddr> {
    let first = split_unquoted(value, ',').next()?;
    let node = split_unquoted(first, ';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim())
    })?;
    // An address needs no escapes: a quoted one with any is malformed.
    let node = match node.strip_prefix('"') {
        Some(quoted) => quoted
            .strip_suffix('"')
            .filter(|inner| !inner.contains('\\'))?,
        None => node,
    };
    if let Some(bracketed) = node.strip_prefix('[') {
        let (ip, rest) = bracketed.split_once(']')?;
        if !rest.is_empty() && !rest.strip_prefix(':').is_some_and(is_port) {
            return None;
        }
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let ip = match node.split_once(':') {
        Some((ip, port)) if is_port(port) => ip,
        Some(_) => return None,
        None => node,
    };
    ip.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Whether `port` is a port as RFC 7239 writes one: up to five digits (obfuscated
/// ports, `_abc`, name none).
fn is_port(port: &str) -> bool {
    (1..=5).contains(&port.len()) && port.bytes().all(|byte| byte.is_ascii_digit())
}

/// `value` split at each `separator` outside a quoted string.
fn split_unquoted(value: &str, separator: char) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut escaped = false;
    value.split(move |c: char| {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ => return c == separator && !quoted,
        }
        false
    })
}

/// The destination of a valid HBONE CONNECT, or why it is not one.
fn connect_target<B>(request: &Request<B>) -> Result<SocketAddr, &'static str> {
    if request.method() != Method::CONNECT {
        return Err("not a CONNECT");
    }
    let authority = request
        .uri()
        .authority()
        .ok_or("CONNECT without :authority")?;
    authority
        .as_str()
        .parse()
        .map_err(|_| ":authority is not an ip:port")
}
