//! Slow request bodies: a client that announces a body and then sends it a byte now
//! and then (or never) holds a stream, and a connection to the server that waits for
//! it. [`Paced`] marks when the body kept its reader waiting; [`Pace::stalled`] ends
//! the wait for the response once that has lasted the client stall timeout.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// Whether a request's body keeps its reader waiting, and since when.
#[derive(Clone, Debug)]
pub struct Pace(Arc<Waiting>);

#[derive(Debug)]
struct Waiting {
    origin: Instant,
    /// Milliseconds from `origin` to when the reader began to wait, plus one; 0 while
    /// it does not wait.
    since: AtomicU64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace(Arc::new(Waiting {
            origin: Instant::now(),
            since: AtomicU64::new(0),
        }))
    }
}

impl Pace {
    fn waiting(&self) {
        let now = self.0.origin.elapsed().as_millis() as u64 + 1;
        let _ = self
            .0
            .since
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn moved(&self) {
        self.0.since.store(0, Ordering::Relaxed);
    }

    fn waiting_since(&self) -> Option<Instant> {
        match self.0.since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.0.origin + Duration::from_millis(since - 1)),
        }
    }

    /// Resolves once the body has kept its reader waiting for `stall` at a stretch.
    pub async fn stalled(&self, stall: Duration) {
        loop {
            let since = self.waiting_since();
            tokio::time::sleep_until(since.unwrap_or_else(Instant::now) + stall).await;
            if let Some(since) = self.waiting_since()
                && since + stall <= Instant::now()
            {
                return;
            }
        }
    }
}

/// A request's body, marking its [`Pace`].
#[derive(Debug)]
pub struct Paced<B> {
    inner: B,
    pace: Pace,
}

impl<B> Paced<B> {
    pub fn new(inner: B, pace: Pace) -> Self {
        Self { inner, pace }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            this.pace.waiting();
        } else {
            this.pace.moved();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
