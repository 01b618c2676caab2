//! Hostile HTTP clients: what keeps one client's HTTP/2 or HTTP/1.1 abuse from costing
//! the agent's other clients, and the counter that names each abuse.
//!
//! h2 and hyper bound much of it on their own: header lists (decoded size), chains of
//! CONTINUATION frames, streams the client resets before they are accepted, streams it
//! provokes the server into resetting, floods of empty DATA frames, and HTTP/1.1 heads
//! too large or with too many fields. Each closes the connection; the GOAWAY frame h2
//! sends, or hyper's error, names the abuse. What they answer without a bound — PING, SETTINGS
//! and PRIORITY frames, and streams reset as soon as they are opened but after they
//! were accepted (each costs a request sent upstream) — [`Inspector`] budgets as the
//! bytes arrive, and [`Inspected`] ends the connection when a budget runs out.
//!
//! Every abuse found counts in `weft_http_abuse_total{listener, reason}`.

use std::{
    collections::VecDeque,
    error::Error as StdError,
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::Duration,
};

use metrics::{counter, describe_counter};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use super::admission::Bucket;

#[cfg(test)]
mod tests;

/// Where an abusive connection arrived: `outbound` (a local pod's captured
/// connection), `inbound` (a request stream in an HBONE tunnel) or `hbone` (a
/// connection to the HBONE port itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Outbound,
    Inbound,
    Hbone,
}

impl Listener {
    fn label(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
            Listener::Hbone => "hbone",
        }
    }
}

/// An abuse of HTTP for which the agent closed a client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Abuse {
    #[error(
        "the client sent PING frames faster than {PING_RATE} a second; a client that \
         pings this often is broken or hostile"
    )]
    PingFlood,
    #[error(
        "the client sent SETTINGS frames faster than {SETTINGS_RATE} a second; settings \
         change a few times in a connection's life"
    )]
    SettingsFlood,
    #[error(
        "the client sent PRIORITY frames faster than {PRIORITY_RATE} a second; they change \
         nothing here"
    )]
    PriorityFlood,
    #[error(
        "the client reset streams within {PREMATURE:?} of opening them faster than \
         {RAPID_RESET_RATE} a second (HTTP/2 rapid reset); each costs a request sent on"
    )]
    RapidReset,
    #[error(
        "the client made the agent reset too many of its streams with invalid frames \
         (HTTP/2 \"made you reset\")"
    )]
    ProvokedResets,
    #[error("the client sent a header block in too many CONTINUATION frames")]
    ContinuationFlood,
    #[error(
        "the client sent a header list far larger than the agent accepts, once \
         decompressed (an HPACK bomb)"
    )]
    HeaderBomb,
    #[error("the client sent too many empty or tiny DATA frames")]
    EmptyFrames,
    #[error(
        "the client sent an HTTP/1.1 request head larger than {HEAD_LIMIT} bytes or with \
         more than {MAX_HEADERS} fields (answered 431)"
    )]
    HeadTooLarge,
}

impl Abuse {
    /// The `reason` label of `weft_http_abuse_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Abuse::PingFlood => "ping_flood",
            Abuse::SettingsFlood => "settings_flood",
            Abuse::PriorityFlood => "priority_flood",
            Abuse::RapidReset => "rapid_reset",
            Abuse::ProvokedResets => "provoked_resets",
            Abuse::ContinuationFlood => "continuation_flood",
            Abuse::HeaderBomb => "header_bomb",
            Abuse::EmptyFrames => "empty_frames",
            Abuse::HeadTooLarge => "head_too_large",
        }
    }
}

/// PING frames (not acknowledgements) a client may send a second, and twice that in a
/// burst: far above keep-alive and bandwidth probes, which wait for each answer.
pub const PING_RATE: u32 = 500;
/// SETTINGS frames (not acknowledgements) a client may send a second (twice in a burst).
pub const SETTINGS_RATE: u32 = 50;
/// PRIORITY frames a client may send a second (twice in a burst); browsers send a few
/// to build their priority tree.
pub const PRIORITY_RATE: u32 = 500;
/// Streams a client may reset within [`PREMATURE`] of opening them, a second (twice in
/// a burst): a client cancels a call now and then, a rapid-reset attack thousands of
/// times a second.
pub const RAPID_RESET_RATE: u32 = 100;
/// How young a stream must be for its reset to count as premature.
pub const PREMATURE: Duration = Duration::from_secs(1);
/// Streams remembered as young at most (the newest win): enough for a second of
/// streams at a rate no client keeps up.
const YOUNG_STREAMS: usize = 4096;

/// The largest HTTP/1.1 request head the agent reads, as Envoy's default limit: larger
/// heads are answered 431 and close their connection.
pub const HEAD_LIMIT: usize = 60 * 1024;
/// The most header fields an HTTP/1.1 request may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The largest decoded HTTP/2 header list the agent accepts (SETTINGS_MAX_HEADER_LIST_SIZE):
/// larger ones are answered 431; far larger ones close the connection.
pub const MAX_HEADER_LIST: u32 = 60 * 1024;
/// Streams an HTTP/2 client may reset before the agent accepts them (h2's defence
/// against rapid reset when the resets arrive in one batch).
pub const MAX_PENDING_RESETS: usize = 20;

pub fn describe() {
    describe_counter!(
        "weft_http_abuse_total",
        "HTTP connections the agent closed because the client abused the protocol, by \
         listener (outbound, inbound, hbone) and reason (ping_flood, settings_flood, \
         priority_flood, rapid_reset, provoked_resets, continuation_flood, header_bomb, \
         empty_frames, head_too_large)"
    );
}

/// Counts `abuse` on `listener`.
pub fn count(listener: Listener, abuse: Abuse) {
    counter!("weft_http_abuse_total", "listener" => listener.label(), "reason" => abuse.reason())
        .increment(1);
}

/// The abuse for which hyper ended a connection with `err` (an HTTP/1.1 head too
/// large), found along its chain of causes. (h2 does not say why it closed a
/// connection; [`Inspector::sent`] reads it in the GOAWAY frame.)
fn found(err: &(dyn StdError + 'static)) -> Option<Abuse> {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(err) = err.downcast_ref::<hyper::Error>()
            && err.is_parse_too_large()
        {
            return Some(Abuse::HeadTooLarge);
        }
        cause = err.source();
    }
    None
}

/// The abuse h2 closed a connection for, by the debug data of the GOAWAY it sent with
/// ENHANCE_YOUR_CALM.
fn calmed_for(debug_data: &[u8]) -> Option<Abuse> {
    [
        (&b"too_many_resets"[..], Abuse::RapidReset),
        (b"too_many_internal_resets", Abuse::ProvokedResets),
        (b"too_many_continuations", Abuse::ContinuationFlood),
        (b"header_list_way_too_large", Abuse::HeaderBomb),
        (b"too_many_data_frames", Abuse::EmptyFrames),
    ]
    .into_iter()
    .find(|(data, _)| *data == debug_data)
    .map(|(_, abuse)| abuse)
}

/// The client connection preface of HTTP/2.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;

const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// Bytes of a GOAWAY payload kept: last stream id, error code and the longest debug
/// data h2 sends.
const GOAWAY_KEPT: usize = 8 + 32;

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    length: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Splits one direction of an HTTP/2 connection into frames: it reads each frame's
/// header, keeps the start of a payload when asked, and skips the rest.
#[derive(Debug)]
struct Framing {
    state: State,
    header: [u8; FRAME_HEADER],
    have: usize,
    kept: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Matching the preface; this many bytes of it matched.
    Preface(usize),
    /// Reading a frame header.
    Header,
    /// Keeping this many more bytes of a payload, then skipping the rest.
    Keep(Head, usize),
    /// Skipping this many bytes of a payload.
    Payload(usize),
    /// Not HTTP/2: nothing to inspect.
    Off,
}

impl Framing {
    /// The client's side: starts with the preface, or is not HTTP/2 at all.
    fn client() -> Self {
        Self::from(State::Preface(0))
    }

    /// The server's side, which starts with a frame.
    fn server() -> Self {
        Self::from(State::Header)
    }

    fn from(state: State) -> Self {
        Framing {
            state,
            header: [0; FRAME_HEADER],
            have: 0,
            kept: Vec::new(),
        }
    }

    /// Takes the next bytes: `on_head` sees each frame's header and says how many bytes
    /// of its payload to keep; `on_kept` gets them.
    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut on_head: impl FnMut(Head) -> Result<usize, E>,
        mut on_kept: impl FnMut(Head, &[u8]),
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return Ok(()),
                State::Preface(matched) => {
                    let take = bytes.len().min(PREFACE.len() - matched);
                    if bytes[..take] != PREFACE[matched..matched + take] {
                        self.state = State::Off;
                        return Ok(());
                    }
                    bytes = &bytes[take..];
                    self.state = if matched + take == PREFACE.len() {
                        State::Header
                    } else {
                        State::Preface(matched + take)
                    };
                }
                State::Header => {
                    let take = bytes.len().min(FRAME_HEADER - self.have);
                    self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                    self.have += take;
                    bytes = &bytes[take..];
                    if self.have == FRAME_HEADER {
                        self.have = 0;
                        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = self.header;
                        let head = Head {
                            length: u32::from_be_bytes([0, l0, l1, l2]) as usize,
                            kind,
                            flags,
                            stream: u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]),
                        };
                        // Skip first, so that a caller that goes on after an error
                        // stays in step.
                        self.state = State::Payload(head.length);
                        let keep = on_head(head)?.min(head.length);
                        self.state = match (keep, head.length) {
                            (_, 0) => State::Header,
                            (0, length) => State::Payload(length),
                            (keep, _) => {
                                self.kept.clear();
                                State::Keep(head, keep)
                            }
                        };
                    }
                }
                State::Keep(head, left) => {
                    let take = bytes.len().min(left);
                    self.kept.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if take < left {
                        self.state = State::Keep(head, left - take);
                    } else {
                        on_kept(head, &self.kept);
                        self.state = match head.length - self.kept.len() {
                            0 => State::Header,
                            rest => State::Payload(rest),
                        };
                    }
                }
                State::Payload(left) => {
                    let take = bytes.len().min(left);
                    bytes = &bytes[take..];
                    self.state = match left - take {
                        0 => State::Header,
                        left => State::Payload(left),
                    };
                }
            }
        }
        Ok(())
    }
}

/// Watches both directions of a connection the agent serves: the frames the client
/// sends, against the budgets h2 does not keep, and the GOAWAY frame the agent sends,
/// for why h2 closed the connection. It sees frame headers and skips payloads, so it
/// costs a few operations per frame. A connection that does not start with the HTTP/2
/// preface (HTTP/1.1) is left alone.
#[derive(Debug)]
pub struct Inspector {
    listener: Listener,
    received: Framing,
    sent: Framing,
    budgets: Option<Budgets>,
    /// Streams opened lately (stream id, when), oldest first; ids only grow.
    young: VecDeque<(u32, Instant)>,
    /// The highest stream id opened yet: HEADERS on a stream at or below it are
    /// trailers (or a protocol error h2 answers).
    newest: u32,
    /// Why h2 closed the connection, when it was for an abuse.
    calmed: Option<Abuse>,
}

#[derive(Debug)]
struct Budgets {
    ping: Bucket,
    settings: Bucket,
    priority: Bucket,
    resets: Bucket,
}

impl Budgets {
    fn full(now: Instant) -> Self {
        Budgets {
            ping: Bucket::full(PING_RATE, now),
            settings: Bucket::full(SETTINGS_RATE, now),
            priority: Bucket::full(PRIORITY_RATE, now),
            resets: Bucket::full(RAPID_RESET_RATE, now),
        }
    }

    /// The bucket that `abuse` empties, and its rate (the rapid-reset one for the
    /// abuses h2 and hyper find, which have none here).
    fn of(&mut self, abuse: Abuse) -> (&mut Bucket, u32) {
        match abuse {
            Abuse::PingFlood => (&mut self.ping, PING_RATE),
            Abuse::SettingsFlood => (&mut self.settings, SETTINGS_RATE),
            Abuse::PriorityFlood => (&mut self.priority, PRIORITY_RATE),
            _ => (&mut self.resets, RAPID_RESET_RATE),
        }
    }
}

impl Inspector {
    pub fn new(listener: Listener) -> Self {
        Inspector {
            listener,
            received: Framing::client(),
            sent: Framing::server(),
            budgets: None,
            young: VecDeque::new(),
            newest: 0,
            calmed: None,
        }
    }

    /// Takes the next bytes the client sent.
    pub fn received(&mut self, bytes: &[u8]) -> Result<(), Abuse> {
        let mut received = std::mem::replace(&mut self.received, Framing::from(State::Off));
        let verdict = received.feed(bytes, |head| self.frame(head).map(|()| 0), |_, _| {});
        self.received = received;
        verdict
    }

    /// Takes the next bytes the agent sent (nothing, unless the client spoke HTTP/2).
    pub fn sent(&mut self, bytes: &[u8]) {
        if matches!(self.received.state, State::Preface(_) | State::Off) {
            return;
        }
        let calmed = &mut self.calmed;
        let _ = self.sent.feed::<()>(
            bytes,
            |head| Ok(if head.kind == GOAWAY { GOAWAY_KEPT } else { 0 }),
            |_, payload| {
                let code = payload
                    .get(4..8)
                    .map(|code| u32::from_be_bytes(code.try_into().unwrap_or_default()));
                if code == Some(ENHANCE_YOUR_CALM) {
                    *calmed = calmed.or(calmed_for(&payload[8..]));
                }
            },
        );
    }

    /// Why h2 closed the connection, if it sent a GOAWAY for an abuse.
    pub fn calmed(&self) -> Option<Abuse> {
        self.calmed
    }

    /// Accounts for a frame the client sent.
    fn frame(&mut self, head: Head) -> Result<(), Abuse> {
        let abuse = match head.kind {
            PING if head.flags & ACK == 0 => Abuse::PingFlood,
            SETTINGS if head.flags & ACK == 0 => Abuse::SettingsFlood,
            PRIORITY => Abuse::PriorityFlood,
            HEADERS => {
                self.opened(head.stream);
                return Ok(());
            }
            // A peer agent passes on the cancellations of all its clients in one
            // connection (a tunnel or a request each), and has held each client to
            // this budget already: only a pod's own connection is budgeted.
            RST_STREAM if self.listener == Listener::Outbound && self.is_young(head.stream) => {
                Abuse::RapidReset
            }
            _ => return Ok(()),
        };
        let now = Instant::now();
        let budgets = self.budgets.get_or_insert_with(|| Budgets::full(now));
        let (bucket, rate) = budgets.of(abuse);
        if bucket.take(rate, now) {
            Ok(())
        } else {
            Err(abuse)
        }
    }

    /// A HEADERS frame on `stream`: a new stream if its id is above every earlier one
    /// (the rest are trailers).
    fn opened(&mut self, stream: u32) {
        if stream <= self.newest {
            return;
        }
        self.newest = stream;
        let now = Instant::now();
        self.forget_old(now);
        if self.young.len() == YOUNG_STREAMS {
            self.young.pop_front();
        }
        self.young.push_back((stream, now));
    }

    fn is_young(&mut self, stream: u32) -> bool {
        if self.young.is_empty() {
            return false;
        }
        self.forget_old(Instant::now());
        self.young
            .binary_search_by_key(&stream, |(id, _)| *id)
            .is_ok()
    }

    fn forget_old(&mut self, now: Instant) {
        while self
            .young
            .front()
            .is_some_and(|(_, opened)| now.saturating_duration_since(*opened) > PREMATURE)
        {
            self.young.pop_front();
        }
    }
}

/// A connection the agent serves, its incoming bytes shown to an [`Inspector`]: once a
/// budget runs out, every read fails.
pub struct Inspected<IO> {
    io: IO,
    inspector: Inspector,
    verdict: Verdict,
}

impl<IO> Inspected<IO> {
    /// `io`, served on `listener`, inspected; and the verdict to ask once the
    /// connection has ended.
    pub fn new(io: IO, listener: Listener) -> (Self, Verdict) {
        let verdict = Verdict::default();
        let inspected = Inspected {
            io,
            inspector: Inspector::new(listener),
            verdict: verdict.clone(),
        };
        (inspected, verdict)
    }
}

/// Whether a connection was abusive: what its [`Inspected`] found, kept here because h2
/// passes a failed read on as its text only.
#[derive(Clone, Debug, Default)]
pub struct Verdict(Arc<OnceLock<Abuse>>);

impl Verdict {
    /// The abuse that ended the connection, with `err` if it ended in an error: the
    /// inspector's (h2 may close a connection whose read failed as if the client had
    /// closed it), or one that h2 or hyper found.
    pub fn of(&self, err: Option<&(dyn StdError + 'static)>) -> Option<Abuse> {
        self.0.get().copied().or_else(|| err.and_then(found))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Inspected<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(abuse) = this.verdict.0.get() {
            return Poll::Ready(Err(io::Error::other(*abuse)));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        match this.inspector.received(&buf.filled()[before..]) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(abuse) => {
                let _ = this.verdict.0.set(abuse);
                Poll::Ready(Err(io::Error::other(abuse)))
            }
        }
    }
}

impl<IO> Inspected<IO> {
    /// Shows the inspector the first `written` bytes of `bufs`, which the agent sent.
    fn sent(&mut self, bufs: &[&[u8]], mut written: usize) {
        for buf in bufs {
            let take = buf.len().min(written);
            self.inspector.sent(&buf[..take]);
            written -= take;
        }
        if let Some(abuse) = self.inspector.calmed() {
            let _ = self.verdict.0.set(abuse);
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Inspected<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.sent(&[buf], written);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let slices: Vec<&[u8]> = bufs.iter().map(|buf| &**buf).collect();
        this.sent(&slices, written);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
