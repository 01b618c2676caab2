//! Upstream HTTP connections, pooled per (source identity, endpoint, HTTP version):
//! one HTTP/2 connection multiplexes every request to an endpoint; HTTP/1.1
//! connections carry one request at a time and wait idle in the pool between them.
//!
//! The source identity is part of the key because a connection to another node rides
//! an HBONE tunnel authenticated as the client workload: requests of two workloads
//! never share one. Connections to pods of this node and outside the mesh have none.

use std::{collections::HashMap, future::Future, net::SocketAddr, sync::Mutex, time::Duration};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use super::ProxyBody;
use crate::{
    identity::Identity,
    proxy::{connect::Upstream, error::ProxyError},
    sync,
};

/// How long an HTTP/1.1 connection may wait idle in the pool. Servers close idle
/// keep-alive connections too (Node.js after 5 s, hyper's header timeout after 30 s);
/// a request that finds its connection closed before it was sent is sent again on a
/// new one, so this only bounds what the pool holds.
const IDLE: Duration = Duration::from_secs(30);

/// Idle HTTP/1.1 connections kept per key; more are closed when their response ends.
const MAX_IDLE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub source: Option<Identity>,
    pub endpoint: SocketAddr,
    pub version: Version,
    /// Requests a connection carries before it is retired (the service's
    /// `connectionLimits.maxRequestsPerConnection`); `None`: no limit.
    pub max_requests: Option<u32>,
    /// How long an HTTP/1.1 connection may wait idle in the pool (the service's
    /// TrafficPolicy `timeouts.idle`); `None`: 30 s.
    pub idle: Option<Duration>,
}

#[derive(Debug, Default)]
pub struct Pool {
    slots: Mutex<HashMap<Key, Slot>>,
}

/// A key's connections, each with the requests it was given so far.
#[derive(Debug)]
enum Slot {
    Http2(http2::SendRequest<ProxyBody>, u32),
    Http1(Vec<(http1::SendRequest<ProxyBody>, Instant, u32)>),
}

/// A connection checked out for one request (an HTTP/1.1 one with the requests it
/// was given, this one included).
#[derive(Debug)]
pub enum Sender {
    Http1(http1::SendRequest<ProxyBody>, u32),
    Http2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    /// Sends `request` to `key`'s endpoint on a pooled connection (with `reuse`), or
    /// on a new one `dial` opens. Returns the response and the connection, to give
    /// back ([`Pool::check_in`]) once the response has been read.
    pub async fn send<F, Fut>(
        &self,
        key: &Key,
        dial: F,
        mut request: Request<ProxyBody>,
        reuse: bool,
    ) -> Result<(Response<Incoming>, Sender), ProxyError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Upstream, ProxyError>>,
    {
        // A pooled connection the server closed before our request went out gives the
        // request back: send it again on a new connection.
        if let Some(sender) = reuse.then(|| self.check_out(key)).flatten() {
            match try_send(sender, request, key.endpoint).await {
                Ok(sent) => return Ok(sent),
                Err(Unsent::Back(again)) => request = again,
                Err(Unsent::Failed(error)) => return Err(error),
            }
        }
        let sender = self.dial(key, dial).await?;
        match try_send(sender, request, key.endpoint).await {
            Ok(sent) => Ok(sent),
            Err(Unsent::Back(_)) => Err(ProxyError::UpstreamClosed(key.endpoint)),
            Err(Unsent::Failed(error)) => Err(error),
        }
    }

    /// Opens a connection; an HTTP/2 one is pooled at once, for every request.
    async fn dial<F, Fut>(&self, key: &Key, dial: F) -> Result<Sender, ProxyError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Upstream, ProxyError>>,
    {
        let io = TokioIo::new(dial().await?);
        let handshake_failed = |version, source| ProxyError::UpstreamHandshake {
            target: key.endpoint,
            version,
            source,
        };
        match key.version {
            Version::Http1 => {
                let (sender, connection) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|err| handshake_failed("1.1", err))?;
                tokio::spawn(async move {
                    // Errors reach the request that was on the connection.
                    let _ = connection.with_upgrades().await;
                });
                Ok(Sender::Http1(sender, 1))
            }
            Version::Http2 => {
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(|err| handshake_failed("2", err))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                // A connection allowed one request is not shared.
                if key.max_requests != Some(1) {
                    let slot = Slot::Http2(sender.clone(), 1);
                    sync::lock(&self.slots).insert(key.clone(), slot);
                }
                Ok(Sender::Http2(sender))
            }
        }
    }

    /// A pooled connection for one more request; an HTTP/2 one given its last allowed
    /// request leaves the pool (it closes once its streams end).
    fn check_out(&self, key: &Key) -> Option<Sender> {
        let mut slots = sync::lock(&self.slots);
        match slots.get_mut(key)? {
            Slot::Http2(sender, given) if !sender.is_closed() => {
                let sender = sender.clone();
                *given += 1;
                if key.max_requests.is_some_and(|max| *given >= max) {
                    slots.remove(key);
                }
                Some(Sender::Http2(sender))
            }
            Slot::Http2(..) => {
                slots.remove(key);
                None
            }
            Slot::Http1(idle) => {
                let now = Instant::now();
                while let Some((sender, since, given)) = idle.pop() {
                    if sender.is_ready() && now.duration_since(since) < key.idle.unwrap_or(IDLE) {
                        return Some(Sender::Http1(sender, given + 1));
                    }
                }
                None
            }
        }
    }

    /// Gives back an HTTP/1.1 connection whose response has been read, unless it has
    /// carried all the requests its key allows.
    pub fn check_in(&self, key: Key, sender: Sender) {
        let Sender::Http1(sender, given) = sender else {
            return;
        };
        if sender.is_closed() || key.max_requests.is_some_and(|max| given >= max) {
            return;
        }
        let mut slots = sync::lock(&self.slots);
        let slot = slots.entry(key).or_insert_with(|| Slot::Http1(Vec::new()));
        if let Slot::Http1(idle) = slot
            && idle.len() < MAX_IDLE
        {
            idle.push((sender, Instant::now(), given));
        }
    }

    /// Closes idle connections past their time and forgets closed ones.
    pub fn release_idle(&self) {
        let now = Instant::now();
        sync::lock(&self.slots).retain(|key, slot| match slot {
            Slot::Http2(sender, _) => !sender.is_closed(),
            Slot::Http1(idle) => {
                idle.retain(|(sender, since, _)| {
                    !sender.is_closed() && now.duration_since(*since) < key.idle.unwrap_or(IDLE)
                });
                !idle.is_empty()
            }
        });
    }
}

enum Unsent {
    /// The connection closed before the request went out: here it is again.
    Back(Request<ProxyBody>),
    Failed(ProxyError),
}

async fn try_send(
    sender: Sender,
    request: Request<ProxyBody>,
    target: SocketAddr,
) -> Result<(Response<Incoming>, Sender), Unsent> {
    let failed =
        |mut err: hyper::client::conn::TrySendError<Request<ProxyBody>>| match err.take_message() {
            Some(request) => Unsent::Back(request),
            None => Unsent::Failed(ProxyError::UpstreamReset {
                target,
                source: err.into_error(),
            }),
        };
    match sender {
        Sender::Http1(mut sender, given) => {
            if sender.ready().await.is_err() {
                return Err(Unsent::Back(request));
            }
            let response = sender.try_send_request(request).await.map_err(failed)?;
            Ok((response, Sender::Http1(sender, given)))
        }
        Sender::Http2(mut sender) => {
            if sender.ready().await.is_err() {
                return Err(Unsent::Back(request));
            }
            let response = sender.try_send_request(request).await.map_err(failed)?;
            Ok((response, Sender::Http2(sender)))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// An HTTP/1.1 server on loopback that answers every request; with `close`, it
    /// closes each connection after its first answer.
    async fn server(close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let answer = service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(!close)
                        .serve_connection(TokioIo::new(tcp), answer)
                        .await;
                });
            }
        });
        address
    }

    fn request() -> Request<ProxyBody> {
        Request::get("/")
            .header("host", "test")
            .body(
                Empty::new()
                    .map_err(|never: std::convert::Infallible| match never {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    /// A connection to `address`, counted in `dials`.
    async fn counted_dial(
        address: SocketAddr,
        dials: &AtomicUsize,
    ) -> Result<Upstream, ProxyError> {
        dials.fetch_add(1, Ordering::Relaxed);
        TcpStream::connect(address)
            .await
            .map(Upstream::Tcp)
            .map_err(|source| ProxyError::Connect {
                target: address,
                source,
            })
    }

    /// Sends `count` requests one after the other, giving each connection back once
    /// its answer is read, each connection to carry at most `max_requests`; returns how
    /// many connections were dialed.
    async fn dials_for(count: usize, close: bool, max_requests: Option<u32>) -> usize {
        let address = server(close).await;
        let pool = Pool::default();
        let key = Key {
            source: None,
            endpoint: address,
            version: Version::Http1,
            max_requests,
            idle: None,
        };
        let dials = AtomicUsize::new(0);
        let dial = || counted_dial(address, &dials);
        for _ in 0..count {
            let (response, sender) = pool.send(&key, dial, request(), true).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "ok");
            pool.check_in(key.clone(), sender);
        }
        dials.into_inner()
    }

    #[tokio::test]
    async fn http1_connections_are_reused_and_a_closed_one_is_replaced() {
        assert_eq!(
            dials_for(5, false, None).await,
            1,
            "one keep-alive connection"
        );
        assert_eq!(
            dials_for(5, true, None).await,
            5,
            "a connection the server closed is never used again, and no request fails"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_reused_only_within_its_keys_idle_timeout() {
        let address = server(false).await;
        let pool = Pool::default();
        let key = Key {
            source: None,
            endpoint: address,
            version: Version::Http1,
            max_requests: None,
            idle: Some(Duration::from_secs(5)),
        };
        let dials = AtomicUsize::new(0);
        let dial = || counted_dial(address, &dials);
        for wait in [4, 6] {
            let (response, sender) = pool.send(&key, dial, request(), true).await.unwrap();
            response.into_body().collect().await.unwrap();
            pool.check_in(key.clone(), sender);
            tokio::time::advance(Duration::from_secs(wait)).await;
        }
        pool.send(&key, dial, request(), true).await.unwrap();
        assert_eq!(dials.into_inner(), 2, "reused after 4 s, not after 6 s");
    }

    #[tokio::test]
    async fn a_connection_retires_after_the_requests_it_may_carry() {
        assert_eq!(dials_for(6, false, Some(2)).await, 3);
        assert_eq!(dials_for(3, false, Some(1)).await, 3);
    }
}
