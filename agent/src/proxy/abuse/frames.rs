//! HTTP/2 frames as they pass: [`Framing`] splits a direction of a connection into
//! frames, [`Inspector`] keeps the budgets of what the client sends and reads why h2
//! closed the connection in the GOAWAY the agent sends.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::{
    Abuse, Listener, PING_RATE, PREMATURE, PRIORITY_RATE, RAPID_RESET_RATE, SETTINGS_RATE,
    YOUNG_STREAMS, calmed_for,
};
use crate::proxy::admission::Bucket;
pub(super) use crate::proxy::detect::PREFACE;

const FRAME_HEADER: usize = 9;

pub(super) const HEADERS: u8 = 0x1;
pub(super) const PRIORITY: u8 = 0x2;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
pub(super) const ACK: u8 = 0x1;
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
        // A peer agent passes on the cancellations of all its clients in one
        // connection (a tunnel or a request each), and has held each client to the
        // reset budget already: only a pod's own connection is budgeted, so only there
        // are streams remembered as young.
        let resets = self.listener == Listener::Outbound;
        let abuse = match head.kind {
            PING if head.flags & ACK == 0 => Abuse::PingFlood,
            SETTINGS if head.flags & ACK == 0 => Abuse::SettingsFlood,
            PRIORITY => Abuse::PriorityFlood,
            HEADERS if resets => {
                self.opened(head.stream);
                return Ok(());
            }
            RST_STREAM if resets && self.is_young(head.stream) => Abuse::RapidReset,
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
