//! RequestMirror: a copy of a routed request goes to another service, fire and forget.
//! The copy's answer is read and dropped; the client never waits for it.
//!
//! The request body streams to the backend unchanged while a [`Tee`] hands each frame
//! to the copies through small queues. A copy that cannot keep up (its queue is full)
//! is abandoned rather than allowed to slow the client's request: its upstream request
//! is cancelled mid-body, so the mirror's server sees a reset, never a truncated body
//! passed off as whole. Outcomes are counted in `weft_route_mirrors_total{route,rule,
//! result}` (`sent`, `failed`, `abandoned`, `denied`).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, request::Parts};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use metrics::counter;
use tokio::sync::{Notify, mpsc};
use weft_api::routes::Mirror;

use super::{BodyError, ProxyBody, headers, pool, route::RuleName};
use crate::proxy::{
    Proxy,
    authorize::{self, Caller, Direction},
    connect::connect,
    logical::{Hop, Source},
    outbound::choose_backend,
};

/// Frames a copy may fall behind the request before it is abandoned.
const QUEUE: usize = 32;

/// One copy's end of the tee.
struct Branch {
    frames: mpsc::Sender<Frame<Bytes>>,
    cut: Arc<Cut>,
}

/// Tells a copy it was abandoned.
#[derive(Default)]
struct Cut {
    abandoned: AtomicBool,
    notify: Notify,
}

impl Cut {
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// The request body, passed through while its frames are copied to the branches.
pub struct Tee<B> {
    inner: B,
    branches: Vec<Branch>,
    ended: bool,
}

/// The body of a copy: what the tee hands it.
pub struct Copy {
    frames: mpsc::Receiver<Frame<Bytes>>,
    cut: Arc<Cut>,
}

impl<B> Tee<B> {
    /// `inner` with `count` copies.
    fn new(inner: B, count: usize) -> (Self, Vec<Copy>) {
        let mut branches = Vec::with_capacity(count);
        let mut copies = Vec::with_capacity(count);
        for _ in 0..count {
            let (sender, receiver) = mpsc::channel(QUEUE);
            let cut = Arc::new(Cut::default());
            branches.push(Branch {
                frames: sender,
                cut: Arc::clone(&cut),
            });
            copies.push(Copy {
                frames: receiver,
                cut,
            });
        }
        let tee = Self {
            inner,
            branches,
            ended: false,
        };
        (tee, copies)
    }

    fn copy(&mut self, frame: &Frame<Bytes>) {
        self.branches.retain(|branch| {
            let copied = if let Some(data) = frame.data_ref() {
                Frame::data(data.clone())
            } else if let Some(trailers) = frame.trailers_ref() {
                Frame::trailers(trailers.clone())
            } else {
                return true;
            };
            let sent = branch.frames.try_send(copied).is_ok();
            if !sent {
                branch.cut.abandon();
            }
            sent
        });
    }
}

impl<B> Body for Tee<B>
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
                this.copy(frame);
                if this.inner.is_end_stream() {
                    this.ended = true;
                    this.branches.clear();
                }
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.branches.clear();
            }
            Poll::Ready(Some(Err(_))) => {}
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

impl<B> Drop for Tee<B> {
    fn drop(&mut self) {
        // The request's body ended early (the client went away, or the request
        // failed): its copies must not pass for whole requests.
        if !self.ended {
            for branch in &self.branches {
                branch.cut.abandon();
            }
        }
    }
}

impl Body for Copy {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match this.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            // An abandoned copy never ends: its sender cancels it.
            Poll::Ready(None) if this.cut.abandoned.load(Ordering::Acquire) => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What sending copies of one request needs besides the request.
pub struct Mirrors<'a> {
    pub proxy: &'a Arc<Proxy>,
    pub source: &'a Source,
    pub caller: &'a Caller,
    pub name: &'a RuleName,
}

/// Starts a copy of `request` to each of `mirrors` that draws its share, and gives
/// back the request with its body teed to them.
pub fn start<B>(context: Mirrors<'_>, mirrors: &[Mirror], request: Request<B>) -> Request<Tee<B>> {
    let chosen: Vec<&Mirror> = mirrors
        .iter()
        .filter(|mirror| fastrand::u32(..mirror.denominator) < mirror.numerator)
        .collect();
    let (parts, body) = request.into_parts();
    let (tee, copies) = Tee::new(body, chosen.len());
    for (mirror, copy) in chosen.into_iter().zip(copies) {
        let head = head_of(&parts);
        let cut = Arc::clone(&copy.cut);
        let proxy = Arc::clone(context.proxy);
        let source = context.source.clone();
        let caller = context.caller.clone();
        let name = context.name.clone();
        let backend = mirror.backend.clone();
        let tracked = proxy.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            let request = Request::from_parts(head, copy.boxed_unsync());
            let result = tokio::select! {
                result = deliver(&proxy, &source, &caller, &backend, request) => result,
                () = cut.notify.notified() => "abandoned",
            };
            count(&name, result);
        });
    }
    Request::from_parts(parts, tee)
}

/// A copy of the request's head.
fn head_of(parts: &Parts) -> Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    builder
        .body(())
        .expect("a copied head is valid")
        .into_parts()
        .0
}

/// Sends one copy to an endpoint of `backend` and reads its answer to the end.
async fn deliver(
    proxy: &Arc<Proxy>,
    source: &Source,
    caller: &Caller,
    backend: &weft_api::routes::BackendRef,
    mut request: Request<ProxyBody>,
) -> &'static str {
    let Ok((endpoint, _pick)) = choose_backend(proxy, backend, &[]) else {
        return "failed";
    };
    if endpoint.hop == Hop::Local {
        let mesh = proxy.mesh.get();
        let decision =
            authorize::request(&mesh, Direction::Local, caller, endpoint.address, &request);
        if decision.is_err() {
            return "denied";
        }
    }
    let version = if request.version() == http::Version::HTTP_2 {
        pool::Version::Http2
    } else {
        pool::Version::Http1
    };
    headers::prepare_request(&mut request, version, false);
    let key = pool::Key {
        source: endpoint.hop.mutual_tls().then(|| source.identity.clone()),
        endpoint: endpoint.address,
        version,
        max_requests: None,
        idle: None,
    };
    let dial = || connect(proxy, &endpoint, source, None);
    match proxy.http_pool.here().send(&key, dial, request, true).await {
        Ok((response, sender)) => {
            if response.into_body().collect().await.is_ok() {
                proxy.http_pool.here().check_in(key, sender);
            }
            "sent"
        }
        Err(_) => "failed",
    }
}

fn count(name: &RuleName, result: &'static str) {
    counter!(
        "weft_route_mirrors_total",
        "route" => name.route.clone(),
        "rule" => name.rule.clone(),
        "result" => result,
    )
    .increment(1);
}

/// Registers the help text of the mirror counter.
pub fn describe() {
    metrics::describe_counter!(
        "weft_route_mirrors_total",
        "Copies of requests a RequestMirror filter sent, by route, rule and result \
         (sent, failed, abandoned: it fell behind the request, denied: by the mirror's \
         authorization policies)"
    );
}

#[cfg(test)]
mod tests {
    use http_body_util::{Full, StreamBody};

    use super::*;

    #[tokio::test]
    async fn the_request_body_streams_whole_to_the_backend_and_to_each_copy() {
        let (tee, copies) = Tee::new(Full::new(Bytes::from_static(b"hello")), 2);
        let forwarded = tee.collect().await.unwrap().to_bytes();
        assert_eq!(forwarded, "hello");
        for copy in copies {
            assert_eq!(copy.collect().await.unwrap().to_bytes(), "hello");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_falls_behind_is_abandoned_and_never_ends() {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..QUEUE + 1)
            .map(|_| Ok(Frame::data(Bytes::from_static(b"x"))))
            .collect();
        let (tee, mut copies) = Tee::new(StreamBody::new(tokio_stream::iter(frames)), 1);
        let forwarded = tee.collect().await.unwrap().to_bytes();
        assert_eq!(forwarded.len(), QUEUE + 1, "the request itself is whole");
        let mut copy = copies.pop().unwrap();
        assert!(copy.cut.abandoned.load(Ordering::Acquire));
        for _ in 0..QUEUE {
            assert!(copy.frame().await.is_some());
        }
        let end = tokio::time::timeout(std::time::Duration::from_millis(50), copy.frame()).await;
        assert!(end.is_err(), "an abandoned copy does not end as if whole");
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_end_abandons_its_copies() {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ];
        let (mut tee, copies) = Tee::new(StreamBody::new(tokio_stream::iter(frames)), 1);
        tee.frame().await.unwrap().unwrap();
        drop(tee);
        assert!(copies[0].cut.abandoned.load(Ordering::Acquire));
    }
}
