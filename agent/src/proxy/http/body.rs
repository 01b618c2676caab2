//! A body that streams through unchanged while it counts its bytes and reads the
//! `grpc-status` of its trailers; when it ends, fails or is dropped, it hands what it
//! saw to a callback once (where the request is measured and its connection returned
//! to the pool).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::headers::grpc_status;

/// What a body carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub bytes: u64,
    /// From the trailers.
    pub grpc_status: Option<u16>,
    /// It reached its end (rather than failing or being dropped early).
    pub complete: bool,
}

type Done = Box<dyn FnOnce(Seen) + Send>;

pub struct Measured<B> {
    inner: B,
    seen: Seen,
    /// The body had ended before it was ever polled (an empty one).
    empty: bool,
    done: Option<Done>,
}

impl<B: Body> Measured<B> {
    pub fn new(inner: B, done: impl FnOnce(Seen) + Send + 'static) -> Self {
        Self {
            empty: inner.is_end_stream(),
            inner,
            seen: Seen::default(),
            done: Some(Box::new(done)),
        }
    }
}

impl<B> Measured<B> {
    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            self.seen.complete = complete;
            done(self.seen);
        }
    }
}

impl<B> Body for Measured<B>
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
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.seen.grpc_status = grpc_status(trailers);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
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

impl<B> Drop for Measured<B> {
    fn drop(&mut self) {
        // An empty body may be dropped without a poll: that is its end.
        self.finish(self.empty);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::HeaderMap;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn bytes_and_the_trailers_grpc_status_are_seen_once() {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(HeaderMap::from_iter([(
                http::HeaderName::from_static("grpc-status"),
                http::HeaderValue::from_static("5"),
            )]))),
        ];
        let seen = Arc::new(Mutex::new(Vec::new()));
        let body = Measured::new(StreamBody::new(tokio_stream::iter(frames)), {
            let seen = Arc::clone(&seen);
            move |what| seen.lock().unwrap().push(what)
        });
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(
            *seen.lock().unwrap(),
            [Seen {
                bytes: 11,
                grpc_status: Some(5),
                complete: true
            }]
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_incomplete() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut body = Measured::new(
            StreamBody::new(tokio_stream::iter(vec![
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"a"))),
                Ok(Frame::data(Bytes::from_static(b"b"))),
            ])),
            {
                let seen = Arc::clone(&seen);
                move |what| seen.lock().unwrap().push(what)
            },
        );
        body.frame().await.unwrap().unwrap();
        drop(body);
        let seen = seen.lock().unwrap();
        assert_eq!((seen.len(), seen[0].bytes, seen[0].complete), (1, 1, false));
        let full = Measured::new(Full::new(Bytes::from_static(b"xyz")), |_| {});
        assert!(!full.is_end_stream());
    }
}
