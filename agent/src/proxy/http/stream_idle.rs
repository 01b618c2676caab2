//! The stream idle timeout (a service's TrafficPolicy `timeouts.streamIdle`, else the
//! agent's `--idle-timeout`): a request whose stream carries nothing, either way, for
//! that long is ended. Both bodies share
//! one [`Activity`]: the request's ([`Touching`]) and the response's ([`Guarded`]) mark
//! it on each frame. Before the response's head, [`Activity::idle`] ends the wait (the
//! client gets 504); after it, the response's body ends the stream — a gRPC call with
//! `DEADLINE_EXCEEDED` in its trailers, any other response with an error, which resets
//! the client's stream (or closes its HTTP/1.1 connection) and cancels the upstream one.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::BodyError;

/// When a request's stream last carried something.
#[derive(Clone)]
pub struct Activity(Arc<Shared>);

struct Shared {
    timeout: Duration,
    origin: Instant,
    /// Milliseconds from `origin` to the last frame either way.
    last: AtomicU64,
    expired: AtomicBool,
}

impl Activity {
    /// A stream that starts now and may stay quiet for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self(Arc::new(Shared {
            timeout,
            origin: Instant::now(),
            last: AtomicU64::new(0),
            expired: AtomicBool::new(false),
        }))
    }

    pub fn timeout(&self) -> Duration {
        self.0.timeout
    }

    /// Whether the stream was ended for being idle.
    pub fn expired(&self) -> bool {
        self.0.expired.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let since = self.0.origin.elapsed().as_millis() as u64;
        self.0.last.fetch_max(since, Ordering::Relaxed);
    }

    /// When the stream counts as idle unless something moves before.
    fn idle_at(&self) -> Instant {
        let last = Duration::from_millis(self.0.last.load(Ordering::Relaxed));
        self.0.origin + last + self.0.timeout
    }

    /// Checks `sleep` (set for the latest idle time seen): `Ready` once the stream has
    /// been idle for its timeout, marking it expired; else moves `sleep` on.
    fn poll_idle(&self, sleep: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(sleep.as_mut().poll(cx));
            let at = self.idle_at();
            if Instant::now() >= at {
                self.0.expired.store(true, Ordering::Relaxed);
                return Poll::Ready(());
            }
            sleep.as_mut().reset(at);
        }
    }

    /// Resolves once the stream has been idle for its timeout.
    pub async fn idle(&self) {
        let mut sleep = Box::pin(tokio::time::sleep_until(self.idle_at()));
        std::future::poll_fn(|cx| self.poll_idle(&mut sleep, cx)).await
    }
}

/// The error a non-gRPC response's body ends with when its stream went idle.
#[derive(Debug, thiserror::Error)]
#[error("the stream carried nothing for its idle timeout of {0:?} (timeouts.streamIdle)")]
pub struct StreamIdle(Duration);

/// A request's body, marking the stream's activity on each frame.
pub struct Touching<B> {
    inner: B,
    activity: Activity,
}

impl<B> Touching<B> {
    pub fn new(inner: B, activity: Activity) -> Self {
        Self { inner, activity }
    }
}

impl<B> Body for Touching<B>
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
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.activity.touch();
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

/// A response's body, marking the stream's activity on each frame and ending the
/// stream once it has been idle for the timeout.
pub struct Guarded<B> {
    inner: B,
    guard: Option<Guard>,
}

struct Guard {
    activity: Activity,
    sleep: Pin<Box<Sleep>>,
    grpc: bool,
    /// The stream was ended: nothing more comes.
    ended: bool,
}

impl<B> Guarded<B> {
    /// `activity`: `None` for a stream guarded elsewhere (a request from a tunnel: the
    /// client's agent guards it); `grpc`: the
    /// request is a gRPC call (it ends with trailers rather than an error).
    pub fn new(inner: B, activity: Option<Activity>, grpc: bool) -> Self {
        let guard = activity.map(|activity| Guard {
            sleep: Box::pin(tokio::time::sleep_until(activity.idle_at())),
            activity,
            grpc,
            ended: false,
        });
        Self { inner, guard }
    }
}

impl<B> Body for Guarded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(guard) = &mut this.guard else {
            return Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into);
        };
        if guard.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                guard.activity.touch();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(other) => {
                return Poll::Ready(other.map(|polled| polled.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        ready!(guard.activity.poll_idle(&mut guard.sleep, cx));
        guard.ended = true;
        let timeout = guard.activity.timeout();
        if guard.grpc {
            Poll::Ready(Some(Ok(Frame::trailers(deadline_exceeded()))))
        } else {
            Poll::Ready(Some(Err(StreamIdle(timeout).into())))
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.guard {
            Some(guard) if guard.ended => true,
            _ => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The trailers that end a gRPC call whose stream went idle.
fn deadline_exceeded() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("4"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("stream idle timeout"),
    );
    trailers
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt, channel::mpsc};
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    type Sent = Result<Frame<Bytes>, std::convert::Infallible>;

    /// A body whose frames the test sends.
    fn body() -> (mpsc::Sender<Sent>, StreamBody<mpsc::Receiver<Sent>>) {
        let (sender, receiver) = mpsc::channel(4);
        (sender, StreamBody::new(receiver))
    }

    fn data(text: &'static str) -> Sent {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    #[tokio::test(start_paused = true)]
    async fn frames_either_way_keep_the_stream_alive_and_silence_ends_it() {
        let activity = Activity::new(Duration::from_secs(10));
        let (mut upload, request) = body();
        let (mut download, response) = body();
        let mut request = Touching::new(request, activity.clone());
        let mut response = Guarded::new(response, Some(activity.clone()), false);
        let start = Instant::now();
        // The request's body moves at 8 s, the response's at 16 s: each pushes the end.
        tokio::time::sleep(Duration::from_secs(8)).await;
        upload.send(data("up")).await.unwrap();
        request.frame().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        download.send(data("down")).await.unwrap();
        assert!(response.frame().await.unwrap().unwrap().is_data());
        let error = response.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(26));
        assert!(error.to_string().contains("timeouts.streamIdle"), "{error}");
        assert!(activity.expired());
        assert!(response.is_end_stream());
        assert!(response.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_call_ends_with_deadline_exceeded_in_its_trailers() {
        let activity = Activity::new(Duration::from_secs(5));
        let (_download, response) = body();
        let mut response = Guarded::new(response, Some(activity.clone()), true);
        let trailers = response
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "4");
        assert!(activity.expired());
        assert!(response.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_the_last_frame_plus_the_timeout() {
        let activity = Activity::new(Duration::from_secs(3));
        let (mut upload, request) = body();
        let mut request = Touching::new(request, activity.clone());
        let start = Instant::now();
        let touching = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            upload.send(data("x")).await.unwrap();
            request.frame().await.unwrap().unwrap();
        };
        let ((), ()) = tokio::join!(touching, activity.idle());
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(activity.expired());
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_quiet_stream_is_left_alone() {
        let (mut download, response) = body();
        let mut response = Guarded::new(response, None, false);
        let later = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            download.send(data("late")).await.unwrap();
            drop(download);
        };
        let (frame, ()) = tokio::join!(response.frame(), later);
        assert!(frame.unwrap().unwrap().is_data());
        assert!(response.frame().await.is_none());
    }
}
