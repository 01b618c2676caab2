//! Retries: which failed tries of a request (or of a TCP connection's connect) are
//! tried again, how long to wait first, and the budget that keeps an outage from
//! turning into a retry storm ([`budget`]).
//!
//! The decisions are pure ([`RetryPolicy::condition`], [`backoff`]); the HTTP and TCP
//! outbound paths run the loop. Retries are request-level settings: they follow the
//! service the client called (its TrafficPolicy `retries`), as `timeouts.request` does.

pub mod budget;

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use fastrand::Rng;
use http::Method;
use weft_api::retry::{DEFAULT_RETRY_ON, RetryOn};

pub use self::budget::{Budget, BudgetPolicy, Budgets};
use super::{balance, error::ProxyError};

/// The largest request body kept for a retry; a request with a larger one is not
/// retried once its body has started to go out.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// The first backoff's upper bound; each retry doubles it, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// How a service's failed requests are retried (its TrafficPolicy `retries`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    /// Requests of methods that are not idempotent are retried too.
    pub non_idempotent: bool,
    pub budget: BudgetPolicy,
}

/// How the requests of one captured connection's service are retried, and the budget
/// all of the node's clients of that service share.
#[derive(Clone, Debug)]
pub struct Retrying {
    pub policy: Arc<RetryPolicy>,
    pub budget: Arc<Budget>,
    /// The service's key, "namespace/name:port", for the metrics.
    pub service: String,
}

impl Retrying {
    /// The retries of `service` (its key) under `policy`, if any (the agent's default
    /// when `None`), with the budget from `budgets`.
    pub fn of(budgets: &Budgets, service: &str, policy: Option<&Arc<RetryPolicy>>) -> Self {
        static DEFAULT: LazyLock<Arc<RetryPolicy>> = LazyLock::new(Arc::default);
        let policy = Arc::clone(policy.unwrap_or(&DEFAULT));
        Self {
            budget: budgets.of(service, &policy.budget, |policy| Budget::new(*policy)),
            policy,
            service: service.to_owned(),
        }
    }
}

impl Default for RetryPolicy {
    /// Without a policy: a failed connection is retried once, on another endpoint
    /// (nothing was sent, so it is safe for any request).
    fn default() -> Self {
        Self {
            attempts: 1,
            per_try_timeout: None,
            retry_on: vec![RetryOn::ConnectFailure],
            non_idempotent: false,
            budget: BudgetPolicy::default(),
        }
    }
}

/// What went wrong with one try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: nothing was sent.
    Connect,
    /// Reset or closed before an answer.
    Reset,
    /// No answer within the per-try timeout.
    Timeout,
    /// An answer, with the gRPC status of its head (a trailers-only answer).
    Answer { status: u16, grpc: Option<u16> },
}

impl Failure {
    /// The retriable failure of a try that ended in `error`; None for the failures a
    /// retry cannot mend (no route, no endpoint, denied, a request timeout).
    pub fn of(error: &ProxyError) -> Option<Self> {
        match error {
            ProxyError::Connect { .. }
            | ProxyError::Hbone { .. }
            | ProxyError::UpstreamHandshake { .. }
            | ProxyError::UpstreamClosed(_) => Some(Failure::Connect),
            ProxyError::UpstreamReset { .. } => Some(Failure::Reset),
            ProxyError::RequestTimeout {
                which: PER_TRY_TIMEOUT,
                ..
            } => Some(Failure::Timeout),
            _ => None,
        }
    }
}

impl Failure {
    /// What the try's failure says of its endpoint (outlier detection): a failed
    /// connection, a gateway error (reset, timeout, 502–504) or another 5xx; nothing
    /// for an answer below 500.
    pub fn of_endpoint(self) -> Option<balance::Failure> {
        match self {
            Failure::Connect => Some(balance::Failure::Connect),
            Failure::Reset | Failure::Timeout => Some(balance::Failure::Gateway),
            Failure::Answer { status, .. } => balance::Failure::of_status(status),
        }
    }
}

/// What a failure on `error` says of the endpoint that was tried (outlier detection):
/// a failed connection, or a gateway error (a reset, a timeout); nothing for a denial,
/// which is a policy's doing.
pub fn endpoint_failure(error: &ProxyError) -> Option<balance::Failure> {
    match error {
        ProxyError::Denied { .. } | ProxyError::DeniedByDestination { .. } => None,
        _ => match Failure::of(error) {
            Some(failure) => failure.of_endpoint(),
            None => Some(balance::Failure::Gateway),
        },
    }
}

/// The `which` of a try that outlived the per-try timeout.
pub const PER_TRY_TIMEOUT: &str = "perTryTimeout";

impl RetryPolicy {
    /// The condition under which `failure` of a request with `method` is retried, if
    /// one is; not counting attempts or the budget. Only a failed connection is
    /// retried for a method that is not idempotent, unless the policy allows them.
    pub fn condition(&self, failure: Failure, method: &Method) -> Option<RetryOn> {
        let retry_on = if self.retry_on.is_empty() {
            &DEFAULT_RETRY_ON[..]
        } else {
            &self.retry_on[..]
        };
        let sent = failure != Failure::Connect;
        if sent && !self.non_idempotent && !idempotent(method) {
            return None;
        }
        retry_on
            .iter()
            .copied()
            .find(|condition| matches(*condition, failure))
    }
}

fn matches(condition: RetryOn, failure: Failure) -> bool {
    match (condition, failure) {
        (RetryOn::ConnectFailure, Failure::Connect) => true,
        (RetryOn::Reset | RetryOn::ServerError | RetryOn::GatewayError, Failure::Timeout) => true,
        (RetryOn::Reset, Failure::Reset) => true,
        (condition, Failure::Answer { status, grpc }) => match condition {
            RetryOn::ServerError => (500..600).contains(&status),
            RetryOn::GatewayError => matches!(status, 502..=504),
            RetryOn::Retriable4xx => status == 409,
            RetryOn::Status(code) => status == code,
            RetryOn::Grpc(code) => grpc == Some(code as u16),
            RetryOn::ConnectFailure | RetryOn::Reset => false,
        },
        _ => false,
    }
}

/// Methods that mean the same done twice as once (RFC 9110, 9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How long to wait before retry number `retry` (1 for the first): anywhere up to
/// 25 ms doubled for each retry before it, at most 250 ms ("full jitter": clients
/// that failed together do not retry together).
pub fn backoff(retry: u32, rng: &mut Rng) -> Duration {
    let doublings = retry.saturating_sub(1).min(16);
    let ceiling = BASE_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF);
    ceiling.mul_f64(rng.f64())
}

/// Why a try is retried, for the metrics: the `retryOn` condition it met, or
/// `per-try-timeout`.
pub fn reason(condition: RetryOn, failure: Failure) -> String {
    match failure {
        Failure::Timeout => "per-try-timeout".to_owned(),
        _ => condition.to_string(),
    }
}

/// Counts a retry of `service` for `reason`, and how it went (`result`: `success`,
/// `failure`, or `budget_exhausted` when the budget refused it).
pub fn count(service: &str, reason: String, result: &'static str) {
    metrics::counter!(
        "weft_retries_total",
        "service" => service.to_owned(),
        "reason" => reason,
        "result" => result,
    )
    .increment(1);
}

/// Registers the help text of the retry series.
pub fn describe() {
    metrics::describe_counter!(
        "weft_retries_total",
        "Retries by service, the retryOn condition that called for them (or per-try-timeout) and result: success (the retry was answered, or connected, and needs no further retry), failure (it failed again), budget_exhausted (not sent: the service's retry budget was spent)"
    );
}

#[cfg(test)]
mod tests {
    use weft_api::retry::GrpcCode;

    use super::*;

    fn answer(status: u16) -> Failure {
        Failure::Answer { status, grpc: None }
    }

    #[test]
    fn conditions_match_their_failures_and_only_safe_methods_are_retried_once_sent() {
        let listed = |retry_on: &[&str]| RetryPolicy {
            attempts: 2,
            retry_on: retry_on
                .iter()
                .map(|c| RetryOn::parse(c).unwrap())
                .collect(),
            ..RetryPolicy::default()
        };
        let grpc_unavailable = Failure::Answer {
            status: 200,
            grpc: Some(14),
        };
        let cases: [(RetryPolicy, Failure, Method, Option<RetryOn>); 16] = [
            // The agent's default: a failed connection, for any method.
            (
                RetryPolicy::default(),
                Failure::Connect,
                Method::POST,
                Some(RetryOn::ConnectFailure),
            ),
            (RetryPolicy::default(), Failure::Reset, Method::GET, None),
            (RetryPolicy::default(), answer(503), Method::GET, None),
            // A policy listing nothing: the default set.
            (
                listed(&[]),
                answer(503),
                Method::GET,
                Some(RetryOn::GatewayError),
            ),
            (listed(&[]), answer(500), Method::GET, None),
            (
                listed(&[]),
                Failure::Reset,
                Method::PUT,
                Some(RetryOn::Reset),
            ),
            (
                listed(&[]),
                grpc_unavailable,
                Method::GET,
                Some(RetryOn::Grpc(GrpcCode::Unavailable)),
            ),
            // Sent and not idempotent: never, unless the policy says so.
            (listed(&[]), answer(503), Method::POST, None),
            (listed(&[]), grpc_unavailable, Method::POST, None),
            (
                RetryPolicy {
                    non_idempotent: true,
                    ..listed(&[])
                },
                grpc_unavailable,
                Method::POST,
                Some(RetryOn::Grpc(GrpcCode::Unavailable)),
            ),
            // Listed conditions, in their order.
            (
                listed(&["5xx"]),
                answer(500),
                Method::GET,
                Some(RetryOn::ServerError),
            ),
            (
                listed(&["503", "5xx"]),
                answer(503),
                Method::GET,
                Some(RetryOn::Status(503)),
            ),
            (
                listed(&["retriable-4xx"]),
                answer(409),
                Method::DELETE,
                Some(RetryOn::Retriable4xx),
            ),
            (listed(&["gateway-error"]), answer(501), Method::GET, None),
            // A try past its per-try timeout is a reset or a gateway error.
            (
                listed(&["gateway-error"]),
                Failure::Timeout,
                Method::GET,
                Some(RetryOn::GatewayError),
            ),
            (
                listed(&["connect-failure"]),
                Failure::Timeout,
                Method::GET,
                None,
            ),
        ];
        for (policy, failure, method, expected) in cases {
            assert_eq!(
                policy.condition(failure, &method),
                expected,
                "{:?} {failure:?} {method}",
                policy.retry_on
            );
        }
    }

    #[test]
    fn backoff_stays_under_a_ceiling_that_doubles_up_to_250ms() {
        let mut rng = Rng::with_seed(7);
        for (retry, ceiling) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (40, 250)] {
            let waits: Vec<Duration> = (0..200).map(|_| backoff(retry, &mut rng)).collect();
            let longest = waits.iter().max().unwrap();
            assert!(
                *longest < Duration::from_millis(ceiling),
                "{retry}: {longest:?}"
            );
            assert!(
                *longest > Duration::from_millis(ceiling) * 3 / 4,
                "{retry}: jitter spans the range, {longest:?}"
            );
        }
    }
}
