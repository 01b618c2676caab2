//! Hostile HTTP clients: what keeps one client's HTTP/2 or HTTP/1.1 abuse from costing
//! the agent's other clients, and the counter that names each abuse.
//!
//! h2 and hyper bound much of it on their own: header lists (decoded size), chains of
//! CONTINUATION frames, streams the client resets before they are accepted, streams it
//! provokes the server into resetting, floods of empty DATA frames, and HTTP/1.1 heads
//! too large or with too many fields. Each closes the connection; the GOAWAY frame h2
//! sends, or hyper's error, names the abuse. What they answer without a bound — PING,
//! SETTINGS and PRIORITY frames, and streams reset as soon as they are opened but after
//! they were accepted (each costs a request sent upstream) — [`Inspector`] budgets as
//! the bytes arrive, and [`Inspected`] ends the connection when a budget runs out.
//! Clients that keep the agent waiting are bounded in time: [`Inspected`] fails writes
//! the client takes nothing of and, on a pod's HTTP/2 connection, reads once a started
//! response has waited that long for the client to open a window; [`Pace`] finds a
//! request body that stalls. A peer agent's tunnels reset as soon as they are opened
//! are paced rather than punished ([`Pacing`]).
//!
//! Every abuse found counts in `weft_http_abuse_total{listener, reason}`.

use std::{
    error::Error as StdError,
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::Duration,
};

use metrics::{counter, describe_counter};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use crate::logging::{Throttle, held_back};

pub use self::{
    frames::Inspector,
    pace::{Pace, Paced},
    resets::{PEER_RESET_RATE, Pacing, PrematureResets, paced},
};

mod frames;
mod pace;
mod resets;
#[cfg(test)]
mod tests;
mod windows;

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
    /// Streams a client of this listener may reset before the agent accepts them.
    pub fn pending_resets(self) -> usize {
        match self {
            Listener::Outbound => MAX_PENDING_RESETS,
            Listener::Inbound | Listener::Hbone => PEER_PENDING_RESETS,
        }
    }

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
    #[error(
        "the client sent nothing of the request body the server waited for within the \
         client stall timeout (--client-stall-timeout; answered 408)"
    )]
    SlowBody,
    #[error(
        "the client took none of the bytes the agent wrote to it within the client stall \
         timeout (--client-stall-timeout)"
    )]
    StalledReader,
    #[error(
        "the client kept an HTTP/2 response's flow-control window closed for the client \
         stall timeout (--client-stall-timeout): it reads frames but takes no data"
    )]
    ZeroWindow,
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
            Abuse::SlowBody => "slow_body",
            Abuse::StalledReader => "stalled_reader",
            Abuse::ZeroWindow => "zero_window",
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
pub(crate) const YOUNG_STREAMS: usize = 4096;

/// The largest HTTP/1.1 request head the agent reads, as Envoy's default limit: larger
/// heads are answered 431 and close their connection.
pub const HEAD_LIMIT: usize = 60 * 1024;
/// The most header fields an HTTP/1.1 request may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The largest decoded HTTP/2 header list the agent accepts (SETTINGS_MAX_HEADER_LIST_SIZE):
/// larger ones are answered 431; far larger ones close the connection.
pub const MAX_HEADER_LIST: u32 = 60 * 1024;
/// Streams an HTTP/2 client may reset before the agent accepts them (h2's defence
/// against rapid reset when the resets arrive in one batch), on a pod's connection.
pub const MAX_PENDING_RESETS: usize = 20;
/// The same on a peer agent's connection (HBONE, or requests in a tunnel): a peer
/// passes on its clients' cancellations in bursts (a pod that resets twenty streams at
/// once makes its agent cancel twenty tunnels or requests), and closing the peer's
/// connection would fail its other clients' requests. Streams reset before they were
/// accepted cost no work, only their record, so the bound here is for memory.
pub const PEER_PENDING_RESETS: usize = 1000;

pub fn describe() {
    describe_counter!(
        "weft_http_abuse_total",
        "HTTP connections the agent closed because the client abused the protocol, by \
         listener (outbound, inbound, hbone) and reason (ping_flood, settings_flood, \
         priority_flood, rapid_reset, provoked_resets, continuation_flood, header_bomb, \
         empty_frames, head_too_large, slow_body, stalled_reader, zero_window)"
    );
    resets::describe();
}

/// Counts `abuse` on `listener`.
pub fn count(listener: Listener, abuse: Abuse) {
    counter!("weft_http_abuse_total", "listener" => listener.label(), "reason" => abuse.reason())
        .increment(1);
}

/// Counts the close of `connection` on `listener` for `abuse`, and logs it (at most
/// once a second).
pub fn closed(listener: Listener, abuse: Abuse, connection: impl std::fmt::Display) {
    static CLOSED: Throttle = Throttle::new();
    count(listener, abuse);
    if let Some(held) = CLOSED.allow() {
        log::warn!("closed {connection}: {abuse}{}", held_back(held));
    }
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
pub(crate) fn calmed_for(debug_data: &[u8]) -> Option<Abuse> {
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

/// A connection the agent serves, its bytes both ways shown to an [`Inspector`]: once a
/// budget runs out, or a started response has waited for the client to open a window
/// for the stall timeout, every read fails. Its writes fail too once the client has
/// taken none of them for the stall timeout.
pub struct Inspected<IO> {
    io: IO,
    inspector: Inspector,
    verdict: Verdict,
    stall: Duration,
    /// When a write that waits for the client to take bytes gives up (kept between
    /// waits, so that a busy connection sets its timer rather than allocating one).
    stalled: Option<Pin<Box<Sleep>>>,
    /// Whether a write waits now.
    waiting: bool,
    /// When a response blocked by a closed window gives up (kept likewise).
    blocked: Option<Pin<Box<Sleep>>>,
}

impl<IO> std::fmt::Debug for Inspected<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspected")
            .field("verdict", &self.verdict)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

impl<IO> Inspected<IO> {
    /// `io`, served on `listener`, inspected, its writes waiting at most `stall`; and
    /// the verdict to ask once the connection has ended.
    pub fn new(io: IO, listener: Listener, stall: Duration) -> (Self, Verdict) {
        let verdict = Verdict::default();
        let inspected = Inspected {
            io,
            inspector: Inspector::new(listener),
            verdict: verdict.clone(),
            stall,
            stalled: None,
            waiting: false,
            blocked: None,
        };
        (inspected, verdict)
    }

    /// The streams the client resets within [`PREMATURE`] of opening them, counted as
    /// they pass (on a peer's HBONE connection, where they are paced rather than
    /// budgeted: [`Pacing`]).
    pub fn premature_resets(&self) -> PrematureResets {
        self.inspector.premature_resets()
    }

    /// Passes on a write's (or flush's) outcome, or fails it once writes have waited
    /// for the client for the stall timeout.
    fn waited<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let deadline = Instant::now() + self.stall;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            self.waiting = true;
            sleep.as_mut().reset(deadline);
        }
        ready!(sleep.as_mut().poll(cx));
        let _ = self.verdict.0.set(Abuse::StalledReader);
        Poll::Ready(Err(io::Error::other(Abuse::StalledReader)))
    }

    /// Whether a response has waited for the client to open a window for the stall
    /// timeout; if not yet, `cx` is woken when it will have.
    fn blocked_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(since) = self.inspector.blocked_since() else {
            return false;
        };
        let deadline = since + self.stall;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Shows the inspector the first `written` bytes of `bufs`, which the agent sent.
    /// What they hold may leave a response blocked: its timer is armed here, with the
    /// connection's task (the reads that check it may wait for nothing else).
    fn sent<'a>(
        &mut self,
        bufs: impl IntoIterator<Item = &'a [u8]>,
        mut written: usize,
        cx: &mut Context<'_>,
    ) {
        for buf in bufs {
            let take = buf.len().min(written);
            self.inspector.sent(&buf[..take]);
            written -= take;
        }
        if let Some(abuse) = self.inspector.calmed() {
            let _ = self.verdict.0.set(abuse);
        }
        if self.blocked_too_long(cx) {
            // The next read fails with it.
            let _ = self.verdict.0.set(Abuse::ZeroWindow);
            cx.waker().wake_by_ref();
        }
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
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let mut found = None;
        if let Poll::Ready(Ok(())) = polled {
            found = this.inspector.received(&buf.filled()[before..]).err();
        }
        if found.is_none() && this.blocked_too_long(cx) {
            found = Some(Abuse::ZeroWindow);
        }
        match found {
            None => polled,
            Some(abuse) => {
                let _ = this.verdict.0.set(abuse);
                Poll::Ready(Err(io::Error::other(abuse)))
            }
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
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        let written = ready!(this.waited(polled, cx))?;
        this.sent([buf], written, cx);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        let written = ready!(this.waited(polled, cx))?;
        this.sent(bufs.iter().map(|buf| &**buf), written, cx);
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.waited(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
