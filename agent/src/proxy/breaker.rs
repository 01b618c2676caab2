//! Circuit breaking (TrafficPolicy `connectionLimits`): what this node's clients may
//! have open or in flight to one service, and what happens past it — a TCP connection
//! is closed at once; an HTTP request waits among at most `maxPendingRequests` others
//! (within its timeout), else is answered 503 with `UO`.
//!
//! Limits hold per node and service (the agent carries all of the node's clients, and
//! the node's total is what the service feels), counted with semaphores: a request or
//! connection holds its slots ([`Admitted`]) until it ends. An HTTP/1.1 request holds a
//! connection slot too, as it holds an upstream connection while in flight.
//! `maxRequestsPerConnection` is the pool's ([`super::http::pool`]).

use std::sync::{
    Arc,
    atomic::{AtomicU32, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::per_service::PerService;

/// A service's limits; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

/// Every service's breaker on this node.
pub type Breakers = PerService<Limits, Breaker>;

/// The open connections and requests in flight of one service, against its limits.
#[derive(Debug)]
pub struct Breaker {
    /// The service's key, for the metrics.
    service: String,
    connections: Option<Arc<Semaphore>>,
    requests: Option<Arc<Semaphore>>,
    max_pending: u32,
    pending: AtomicU32,
}

/// The slots a connection or request holds while it is open.
#[derive(Debug)]
pub struct Admitted {
    _connection: Option<OwnedSemaphorePermit>,
    _request: Option<OwnedSemaphorePermit>,
}

/// The limit a refused connection or request met, as the policy names it.
pub type Limit = &'static str;

impl Breaker {
    pub fn new(service: &str, limits: &Limits) -> Self {
        let slots =
            |limit: Option<u32>| limit.map(|limit| Arc::new(Semaphore::new(limit as usize)));
        Self {
            service: service.to_owned(),
            connections: slots(limits.max_connections),
            requests: slots(limits.max_requests),
            max_pending: limits.max_pending_requests.unwrap_or(0),
            pending: AtomicU32::new(0),
        }
    }

    /// The service's key.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A TCP connection: a connection slot now, or never.
    pub fn connection(&self) -> Result<Admitted, Limit> {
        let connection = match &self.connections {
            None => None,
            Some(slots) => Some(take(slots).ok_or_else(|| self.overflow("maxConnections"))?),
        };
        Ok(Admitted {
            _connection: connection,
            _request: None,
        })
    }

    /// An HTTP request (an HTTP/1.1 one, `http1`, also holds a connection slot): its
    /// slots now, or after waiting as one of at most `maxPendingRequests`. The caller
    /// bounds the wait by the request's timeout.
    pub async fn request(&self, http1: bool) -> Result<Admitted, Limit> {
        let connections = self.connections.as_ref().filter(|_| http1);
        let now = (self.requests.as_ref().map(take), connections.map(take));
        let full = match now {
            (Some(None), _) => "maxRequests",
            (_, Some(None)) => "maxConnections",
            (request, connection) => {
                return Ok(Admitted {
                    _connection: connection.flatten(),
                    _request: request.flatten(),
                });
            }
        };
        // Whatever was taken goes back: the wait takes both in turn.
        drop(now);
        let Some(_waiting) = Pending::enter(&self.pending, self.max_pending) else {
            let limit = if self.max_pending == 0 {
                full
            } else {
                "maxPendingRequests"
            };
            return Err(self.overflow(limit));
        };
        let request = match &self.requests {
            Some(slots) => Some(wait(slots).await),
            None => None,
        };
        let connection = match connections {
            Some(slots) => Some(wait(slots).await),
            None => None,
        };
        Ok(Admitted {
            _connection: connection,
            _request: request,
        })
    }

    /// Counts a refusal on `limit`, and returns it.
    fn overflow(&self, limit: Limit) -> Limit {
        metrics::counter!(
            "weft_circuit_breaker_overflows_total",
            "service" => self.service.clone(),
            "limit" => limit,
        )
        .increment(1);
        limit
    }
}

/// A slot of `slots`, if one is free now.
fn take(slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    Arc::clone(slots).try_acquire_owned().ok()
}

/// A slot of `slots`, once one is free (in the order they were asked for).
async fn wait(slots: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("a breaker's semaphores are never closed")
}

/// One request among the pending ones, until it drops.
struct Pending<'a>(&'a AtomicU32);

impl<'a> Pending<'a> {
    fn enter(pending: &'a AtomicU32, max: u32) -> Option<Self> {
        pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now < max).then_some(now + 1)
            })
            .ok()
            .map(|_| Self(pending))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Registers the help text of the breaker's series.
pub fn describe() {
    metrics::describe_counter!(
        "weft_circuit_breaker_overflows_total",
        "Connections and requests refused by a service's connectionLimits on this node (UO), by service and the limit met: maxConnections, maxRequests, maxPendingRequests"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(connections: Option<u32>, requests: Option<u32>, pending: Option<u32>) -> Limits {
        Limits {
            max_connections: connections,
            max_requests: requests,
            max_pending_requests: pending,
            max_requests_per_connection: None,
        }
    }

    #[test]
    fn tcp_connections_past_the_limit_are_refused_until_one_closes() {
        let breaker = Breaker::new("shop/db:5432", &limits(Some(2), None, Some(10)));
        let first = breaker.connection().unwrap();
        let _second = breaker.connection().unwrap();
        assert_eq!(breaker.connection().unwrap_err(), "maxConnections");
        drop(first);
        assert!(breaker.connection().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_past_the_limit_wait_as_pending_and_past_that_are_refused() {
        let breaker = Arc::new(Breaker::new("shop/web:80", &limits(None, Some(1), Some(1))));
        let held = breaker.request(false).await.unwrap();
        let waiting = tokio::spawn({
            let breaker = Arc::clone(&breaker);
            async move { breaker.request(false).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            breaker.request(false).await.unwrap_err(),
            "maxPendingRequests",
            "one waits already"
        );
        assert!(!waiting.is_finished());
        drop(held);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_pending_the_full_limit_is_named_and_http1_needs_a_connection_too() {
        let breaker = Breaker::new("shop/web:80", &limits(Some(1), Some(5), None));
        let http2 = breaker.request(false).await.unwrap();
        let http1 = breaker.request(true).await.unwrap();
        assert_eq!(breaker.request(true).await.unwrap_err(), "maxConnections");
        assert!(
            breaker.request(false).await.is_ok(),
            "HTTP/2 holds no connection slot"
        );
        drop((http1, http2));
        assert!(breaker.request(true).await.is_ok());
        let unlimited = Breaker::new("shop/api:80", &Limits::default());
        let held: Vec<Admitted> =
            futures::future::join_all((0..100).map(|_| unlimited.request(true)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        assert_eq!(held.len(), 100);
    }
}
