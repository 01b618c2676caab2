//! A request body that a retry can send again.
//!
//! The first try streams the client's body through while keeping its frames (up to
//! [`MAX_REPLAY_BYTES`]); a retry's body ([`Replay::again`]) plays back what was kept
//! and then goes on reading the client's body where the earlier try stopped, so a
//! server that answered before reading everything still gets all of it from the retry.
//! The tries share one state: a newer try supersedes the older ones, whose bodies end.
//!
//! A body past the bound is not kept: its request is retried only if no frame of it
//! had been read (a failed connection). With `keep` off (a policy that retries only
//! failed connections) nothing is ever kept.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::{BodyError, ProxyBody};
use crate::{proxy::retry::MAX_REPLAY_BYTES, sync};

/// One try's view of the shared body.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
    /// Which try this is: only the newest reads.
    generation: u64,
    /// The next kept frame to play back.
    position: usize,
    trailers_sent: bool,
}

struct Shared {
    /// The client's body, until it ends.
    source: Option<ProxyBody>,
    /// Its size hint before anything was read.
    hint: SizeHint,
    frames: Vec<Bytes>,
    bytes: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    keep: bool,
    /// Something was read and not kept: the body cannot be played back.
    lost: bool,
    generation: u64,
}

impl Replay {
    /// The first try's body.
    pub fn new(source: ProxyBody, keep: bool) -> Self {
        let hint = source.size_hint();
        let ended = source.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!ended).then_some(source),
                hint,
                frames: Vec::new(),
                bytes: 0,
                trailers: None,
                ended,
                keep,
                lost: false,
                generation: 0,
            })),
            generation: 0,
            position: 0,
            trailers_sent: false,
        }
    }

    /// What makes the next tries' bodies, once this one is on its way.
    pub fn replays(&self) -> Replays {
        Replays {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Makes the bodies of retries.
pub struct Replays {
    shared: Arc<Mutex<Shared>>,
}

impl Replays {
    /// Whether [`Replays::again`] can make a body: all that was read was kept.
    pub fn replayable(&self) -> bool {
        !sync::lock(&self.shared).lost
    }

    /// The body of the next try, superseding every earlier one; None when what the
    /// earlier tries read was not kept.
    pub fn again(&self) -> Option<Replay> {
        let mut shared = sync::lock(&self.shared);
        if shared.lost {
            return None;
        }
        shared.generation += 1;
        Some(Replay {
            shared: Arc::clone(&self.shared),
            generation: shared.generation,
            position: 0,
            trailers_sent: false,
        })
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut shared = sync::lock(&this.shared);
        if shared.generation != this.generation {
            return Poll::Ready(None);
        }
        if let Some(data) = shared.frames.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if shared.ended {
            if !this.trailers_sent
                && let Some(trailers) = shared.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = shared.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                shared.source = None;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(error))) => {
                // What is left of the body is gone with the error.
                shared.lost = true;
                shared.source = None;
                return Poll::Ready(Some(Err(error)));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(trailers) = frame.trailers_ref() {
            shared.trailers = Some(trailers.clone());
            shared.ended = true;
            shared.source = None;
            this.trailers_sent = true;
        } else if let Some(data) = frame.data_ref() {
            let fits = shared.bytes + data.len() <= MAX_REPLAY_BYTES;
            if shared.keep && !shared.lost && fits {
                shared.bytes += data.len();
                shared.frames.push(data.clone());
                this.position = shared.frames.len();
            } else {
                shared.lost = true;
                shared.frames = Vec::new();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    /// Says so as soon as the client's body does (after its last frame, not at the
    /// next poll): an HTTP/2 request's END_STREAM then rides its last DATA frame, as
    /// the client sent it. Sent as an empty frame after it, servers' connections broke
    /// under load (ARCHITECTURE.md, "Retries").
    fn is_end_stream(&self) -> bool {
        let shared = sync::lock(&self.shared);
        if shared.generation != self.generation {
            return true;
        }
        if self.position < shared.frames.len() {
            return false;
        }
        match &shared.source {
            _ if shared.ended => self.trailers_sent || shared.trailers.is_none(),
            Some(source) => source.is_end_stream(),
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let shared = sync::lock(&self.shared);
        if self.position == 0 && shared.ended && shared.trailers.is_none() {
            // All of it kept: a retry plays back exactly this.
            SizeHint::with_exact(shared.bytes as u64)
        } else {
            shared.hint
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    fn streamed(chunks: &[&[u8]], trailers: bool) -> ProxyBody {
        let mut frames: Vec<Result<Frame<Bytes>, BodyError>> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .collect();
        if trailers {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", "0".parse().unwrap());
            frames.push(Ok(Frame::trailers(map)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    /// The data and the trailers' presence of one read of `body` to its end.
    async fn read(body: &mut Replay) -> (String, bool) {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().is_some();
        let data = collected.to_bytes().to_vec();
        (String::from_utf8(data).unwrap(), trailers)
    }

    #[tokio::test]
    async fn a_retry_plays_back_the_whole_body_with_its_trailers() {
        let mut first = Replay::new(streamed(&[b"one ", b"two"], true), true);
        assert_eq!(read(&mut first).await, ("one two".to_owned(), true));
        let mut second = first.replays().again().unwrap();
        assert_eq!(read(&mut second).await, ("one two".to_owned(), true));
        let mut third = second.replays().again().unwrap();
        assert_eq!(read(&mut third).await, ("one two".to_owned(), true));
    }

    #[tokio::test]
    async fn a_retry_goes_on_where_an_earlier_try_stopped_reading() {
        let mut first = Replay::new(streamed(&[b"a", b"b", b"c"], false), true);
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "a");
        let mut second = first.replays().again().unwrap();
        // The superseded try reads no more.
        assert!(first.frame().await.is_none());
        assert_eq!(read(&mut second).await, ("abc".to_owned(), false));
    }

    #[tokio::test]
    async fn past_the_bound_or_without_keeping_nothing_can_be_replayed_once_read() {
        let big = vec![b'x'; MAX_REPLAY_BYTES];
        let mut body = Replay::new(streamed(&[b"x", &big], false), true);
        while body.frame().await.is_some() {}
        assert!(
            body.replays().again().is_none(),
            "more than the bound was read"
        );

        let unread = Replay::new(streamed(&[b"a"], false), false);
        let mut retry = unread
            .replays()
            .again()
            .expect("nothing read yet: a failed connection");
        retry.frame().await.unwrap().unwrap();
        assert!(retry.replays().again().is_none(), "read and not kept");
    }

    #[tokio::test]
    async fn an_empty_body_stays_empty_and_a_kept_one_has_an_exact_size() {
        let empty = Replay::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
            true,
        );
        assert!(empty.is_end_stream());
        assert!(empty.replays().again().unwrap().is_end_stream());

        let body = Replay::new(streamed(&[b"abc", b"de"], false), true);
        let mut retry = body.replays().again().unwrap();
        assert_eq!(read(&mut retry).await.0, "abcde");
        assert_eq!(
            retry.replays().again().unwrap().size_hint().exact(),
            Some(5)
        );
    }
}
