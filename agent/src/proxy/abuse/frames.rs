//! HTTP/2 frames as they pass: [`Framing`] splits a direction of a connection into
//! frames, [`Inspector`] keeps the budgets of what the client sends, follows the
//! windows the client grants the agent ([`Windows`]) and reads why h2 closed the
//! connection in the GOAWAY the agent sends.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{
    Abuse, Listener, PING_RATE, PREMATURE, PRIORITY_RATE, PrematureResets, RAPID_RESET_RATE,
    SETTINGS_RATE, YOUNG_STREAMS, calmed_for, windows::Windows,
};
use crate::proxy::admission::Bucket;
pub(super) use crate::proxy::detect::PREFACE;

const FRAME_HEADER: usize = 9;

pub(super) const DATA: u8 = 0x0;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PRIORITY: u8 = 0x2;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
pub(super) const WINDOW_UPDATE: u8 = 0x8;
pub(super) const ACK: u8 = 0x1;
pub(super) const END_STREAM: u8 = 0x1;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
/// Bytes of a SETTINGS payload kept: ten settings, more than any client sends at once.
const SETTINGS_KEPT: usize = 6 * 10;
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

    /// Takes the next bytes: `on` sees each frame's header and says how many bytes of
    /// its payload to keep, then sees them.
    fn feed<E>(
        &mut self,
        mut bytes: &[u8],
        mut on: impl FnMut(Seen<'_>) -> Result<usize, E>,
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
                        let keep = on(Seen::Head(head))?.min(head.length);
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
                        // In step first, as for a header.
                        self.state = match head.length - self.kept.len() {
                            0 => State::Header,
                            rest => State::Payload(rest),
                        };
                        on(Seen::Kept(head, &self.kept))?;
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

/// What [`Framing::feed`] shows of a frame: its header, then the payload bytes kept.
enum Seen<'a> {
    Head(Head),
    Kept(Head, &'a [u8]),
}

/// Watches both directions of a connection the agent serves: the frames the client
/// sends, against the budgets h2 does not keep; on a pod's connection, the windows it
/// grants against the data the agent sends; and the GOAWAY frame the agent sends, for
/// why h2 closed the connection. It sees frame headers and skips payloads, so it
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
    /// On a peer's HBONE connection: its premature resets, which are paced.
    premature: PrematureResets,
    /// On a pod's connection: the windows the client grants. A peer agent's streams
    /// carry other clients' tunnels and requests, which stall as their clients do;
    /// each client is bounded on its own agent's connection.
    windows: Option<Windows>,
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
            premature: PrematureResets::default(),
            windows: (listener == Listener::Outbound).then(Windows::new),
        }
    }

    /// Takes the next bytes the client sent.
    pub fn received(&mut self, bytes: &[u8]) -> Result<(), Abuse> {
        let mut received = std::mem::replace(&mut self.received, Framing::from(State::Off));
        let verdict = received.feed(bytes, |seen| match seen {
            Seen::Head(head) => self.frame(head),
            Seen::Kept(head, payload) => {
                self.granted(head, payload);
                Ok(0)
            }
        });
        self.received = received;
        verdict
    }

    /// Takes the next bytes the agent sent (nothing, unless the client spoke HTTP/2).
    pub fn sent(&mut self, bytes: &[u8]) {
        if matches!(self.received.state, State::Preface(_) | State::Off) {
            return;
        }
        let Inspector {
            sent,
            calmed,
            windows,
            ..
        } = self;
        let _ = sent.feed::<()>(bytes, |seen| match seen {
            Seen::Head(head) if head.kind == GOAWAY => Ok(GOAWAY_KEPT),
            Seen::Head(head) => {
                if let Some(windows) = windows {
                    let ends = head.flags & END_STREAM != 0;
                    match head.kind {
                        DATA => windows.sent(head.stream, head.length, Instant::now()),
                        HEADERS if !ends => windows.responded(head.stream, Instant::now()),
                        RST_STREAM => windows.ended(head.stream),
                        _ => {}
                    }
                    if ends && matches!(head.kind, DATA | HEADERS) {
                        windows.ended(head.stream);
                    }
                }
                Ok(0)
            }
            Seen::Kept(_, payload) => {
                let code = payload
                    .get(4..8)
                    .map(|code| u32::from_be_bytes(code.try_into().unwrap_or_default()));
                if code == Some(ENHANCE_YOUR_CALM) {
                    *calmed = calmed.or(calmed_for(&payload[8..]));
                }
                Ok(0)
            }
        });
    }

    /// The streams the client reset within [`PREMATURE`] of opening them (counted on
    /// a peer's HBONE connection only).
    pub fn premature_resets(&self) -> PrematureResets {
        self.premature.clone()
    }

    /// Why h2 closed the connection, if it sent a GOAWAY for an abuse.
    pub fn calmed(&self) -> Option<Abuse> {
        self.calmed
    }

    /// Since when a response the agent started has been waiting for the client to
    /// open a window (on a pod's connection).
    pub fn blocked_since(&self) -> Option<Instant> {
        self.windows.as_ref()?.blocked_since()
    }

    /// A kept payload of a frame the client sent: a WINDOW_UPDATE's increment or a
    /// SETTINGS frame's settings.
    fn granted(&mut self, head: Head, payload: &[u8]) {
        let Some(windows) = &mut self.windows else {
            return;
        };
        let now = Instant::now();
        if head.kind == WINDOW_UPDATE {
            if let Ok(increment) = <[u8; 4]>::try_from(payload) {
                windows.granted(
                    head.stream,
                    u32::from_be_bytes(increment) & 0x7fff_ffff,
                    now,
                );
            }
            return;
        }
        for setting in payload.chunks_exact(6) {
            if u16::from_be_bytes([setting[0], setting[1]]) == INITIAL_WINDOW_SIZE {
                let size = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                windows.initial_window(size, now);
            }
        }
    }

    /// Accounts for a frame the client sent, and says how much of its payload to keep.
    fn frame(&mut self, head: Head) -> Result<usize, Abuse> {
        // A peer agent passes on the cancellations of all its clients in one
        // connection (a tunnel or a request each), and has held each client to the
        // reset budget already: only a pod's own connection is budgeted. On a peer's
        // HBONE connection premature resets are counted, for the server to pace the
        // peer's tunnels by; requests in a tunnel are not followed at all.
        let pods = self.listener == Listener::Outbound;
        let streams = self.listener != Listener::Inbound;
        let abuse = match head.kind {
            PING if head.flags & ACK == 0 => Abuse::PingFlood,
            SETTINGS if head.flags & ACK == 0 => Abuse::SettingsFlood,
            PRIORITY => Abuse::PriorityFlood,
            HEADERS if streams => {
                self.opened(head.stream);
                return Ok(0);
            }
            RST_STREAM if streams => {
                if let Some(windows) = &mut self.windows {
                    windows.ended(head.stream);
                }
                if !self.is_young(head.stream) {
                    return Ok(0);
                }
                if !pods {
                    self.premature.add();
                    return Ok(0);
                }
                Abuse::RapidReset
            }
            WINDOW_UPDATE if pods => return Ok(4),
            _ => return Ok(0),
        };
        let now = Instant::now();
        let budgets = self.budgets.get_or_insert_with(|| Budgets::full(now));
        let (bucket, rate) = budgets.of(abuse);
        if !bucket.take(rate, now) {
            return Err(abuse);
        }
        Ok(match abuse {
            Abuse::SettingsFlood if pods => SETTINGS_KEPT,
            _ => 0,
        })
    }

    /// A HEADERS frame on `stream`: a new stream if its id is above every earlier one
    /// (the rest are trailers).
    fn opened(&mut self, stream: u32) {
        if stream <= self.newest {
            return;
        }
        self.newest = stream;
        if let Some(windows) = &mut self.windows {
            windows.opened(stream);
        }
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
