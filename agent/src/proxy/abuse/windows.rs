//! The agent's send windows on a pod's HTTP/2 connection, as the client grants them. A
//! client that reads every frame but never opens a window again (a zero-window stall)
//! holds a response, and all that serves it upstream, for as long as it likes: the
//! agent's writes succeed, so only the windows show it.
//!
//! A response is blocked while it has started (its HEADERS went without END_STREAM)
//! and its stream's window, or the connection's, is closed: the client has taken none
//! of what it was sent for that long, as an HTTP/1.1 client that reads nothing.

use std::collections::HashMap;

use tokio::time::Instant;

/// The window every stream starts with until the client's SETTINGS say otherwise, and
/// the connection's (RFC 9113, 6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

#[derive(Debug)]
pub(super) struct Windows {
    /// SETTINGS_INITIAL_WINDOW_SIZE as the client last set it.
    initial: i64,
    connection: i64,
    /// Since when the connection's window has been closed.
    connection_closed: Option<Instant>,
    /// The open streams, by id.
    streams: HashMap<u32, Stream>,
    /// Started responses: while there are none, nothing is blocked.
    responding: usize,
    /// Streams whose response is blocked by their own window.
    blocked: usize,
}

#[derive(Debug, Default)]
struct Stream {
    /// What the client granted beyond the initial window, less what the agent sent:
    /// the window is `initial + credit`.
    credit: i64,
    responding: bool,
    /// Since when the response has been blocked by this stream's window.
    blocked: Option<Instant>,
}

impl Windows {
    pub(super) fn new() -> Self {
        Windows {
            initial: DEFAULT_WINDOW,
            connection: DEFAULT_WINDOW,
            connection_closed: None,
            streams: HashMap::new(),
            responding: 0,
            blocked: 0,
        }
    }

    /// The client opened `stream`.
    pub(super) fn opened(&mut self, stream: u32) {
        self.streams.entry(stream).or_default();
    }

    /// The agent started the response on `stream`, a body to follow.
    pub(super) fn responded(&mut self, stream: u32, now: Instant) {
        let initial = self.initial;
        self.change(stream, |open| {
            open.responding = true;
            open.update(initial, now);
        });
    }

    /// `stream` ended: the agent ended its side, or either side reset it.
    pub(super) fn ended(&mut self, stream: u32) {
        if let Some(ended) = self.streams.remove(&stream) {
            self.responding -= usize::from(ended.responding);
            self.blocked -= usize::from(ended.blocked.is_some());
        }
    }

    /// The client set SETTINGS_INITIAL_WINDOW_SIZE, which moves every stream's window.
    pub(super) fn initial_window(&mut self, size: u32, now: Instant) {
        self.initial = i64::from(size);
        self.blocked = 0;
        for stream in self.streams.values_mut() {
            stream.update(self.initial, now);
            self.blocked += usize::from(stream.blocked.is_some());
        }
    }

    /// The agent sent `length` bytes of DATA on `stream`.
    pub(super) fn sent(&mut self, stream: u32, length: usize, now: Instant) {
        let length = i64::try_from(length).unwrap_or(i64::MAX);
        self.connection -= length;
        if self.connection <= 0 {
            self.connection_closed.get_or_insert(now);
        }
        let initial = self.initial;
        self.change(stream, |open| {
            open.credit -= length;
            open.update(initial, now);
        });
    }

    /// The client opened the window of `stream` (0: the connection's) by `increment`.
    pub(super) fn granted(&mut self, stream: u32, increment: u32, now: Instant) {
        let increment = i64::from(increment);
        if stream == 0 {
            self.connection += increment;
            if self.connection > 0 {
                self.connection_closed = None;
            }
            return;
        }
        let initial = self.initial;
        self.change(stream, |open| {
            open.credit += increment;
            open.update(initial, now);
        });
    }

    /// Since when a started response has been blocked by a closed window: the longest
    /// blocked one's.
    pub(super) fn blocked_since(&self) -> Option<Instant> {
        if self.responding == 0 {
            return None;
        }
        let stream = (self.blocked > 0)
            .then(|| self.streams.values().filter_map(|s| s.blocked).min())
            .flatten();
        match (self.connection_closed, stream) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Changes the open `stream` (if it is) and keeps the counts.
    fn change(&mut self, stream: u32, change: impl FnOnce(&mut Stream)) {
        let Some(open) = self.streams.get_mut(&stream) else {
            return;
        };
        let (responding, blocked) = (open.responding, open.blocked.is_some());
        change(open);
        self.responding = self.responding + usize::from(open.responding) - usize::from(responding);
        self.blocked = self.blocked + usize::from(open.blocked.is_some()) - usize::from(blocked);
    }
}

impl Stream {
    fn update(&mut self, initial: i64, now: Instant) {
        if self.responding && initial + self.credit <= 0 {
            self.blocked.get_or_insert(now);
        } else {
            self.blocked = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_response_is_blocked_while_its_window_is_closed() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(5);
        let mut windows = Windows::new();
        windows.opened(1);
        windows.opened(3);
        assert_eq!(windows.blocked_since(), None);
        windows.responded(1, t0);
        windows.sent(1, 65_535, t0);
        assert_eq!(
            windows.blocked_since(),
            Some(t0),
            "stream and connection closed"
        );
        windows.granted(0, 100_000, later);
        assert_eq!(
            windows.blocked_since(),
            Some(t0),
            "the stream's window is still closed"
        );
        windows.granted(1, 10, later);
        assert_eq!(windows.blocked_since(), None);
        windows.sent(1, 10, later);
        assert_eq!(windows.blocked_since(), Some(later));
        windows.ended(1);
        assert_eq!(windows.blocked_since(), None, "nothing left to send");
        assert_eq!((windows.responding, windows.blocked), (0, 0));
    }

    #[test]
    fn a_closed_initial_window_blocks_a_response_once_it_starts() {
        let t0 = Instant::now();
        let mut windows = Windows::new();
        windows.initial_window(0, t0);
        windows.opened(1);
        assert_eq!(windows.blocked_since(), None, "no response started yet");
        windows.responded(1, t0);
        assert_eq!(windows.blocked_since(), Some(t0));
        windows.initial_window(1_000, t0);
        assert_eq!(windows.blocked_since(), None);
        windows.ended(1);
        windows.ended(1);
        assert_eq!((windows.responding, windows.blocked), (0, 0));
    }

    #[test]
    fn the_connection_window_blocks_only_started_responses() {
        let t0 = Instant::now();
        let mut windows = Windows::new();
        windows.initial_window(1 << 20, t0);
        windows.opened(1);
        windows.responded(1, t0);
        windows.sent(1, 65_535, t0);
        assert_eq!(windows.blocked_since(), Some(t0));
        windows.ended(1);
        assert_eq!(windows.blocked_since(), None, "no response waits");
        // Frames on streams the agent does not know of change nothing.
        windows.granted(9, 5, t0);
        windows.sent(9, 5, t0);
        assert!(windows.streams.is_empty());
    }
}
