//! The conditions a TrafficPolicy's `retries.retryOn` lists, in one grammar for the
//! controller (which validates them) and the agents (which retry on them).

use std::fmt;

/// One condition under which a failed request is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// `connect-failure`: no connection to the endpoint (refused, timed out, the tunnel
    /// or its CONNECT failed). Nothing was sent, so any method is retried.
    ConnectFailure,
    /// `reset`: the endpoint reset or closed the connection before it answered, or it
    /// did not answer within the per-try timeout.
    Reset,
    /// `5xx`: any answer from 500 to 599.
    ServerError,
    /// `gateway-error`: 502, 503 or 504.
    GatewayError,
    /// `retriable-4xx`: 409 (a conflict, which a retry may not meet).
    Retriable4xx,
    /// A status code, such as `503`.
    Status(u16),
    /// A gRPC status of the response's head (a trailers-only answer):
    /// `cancelled`, `deadline-exceeded`, `resource-exhausted` or `unavailable`.
    Grpc(GrpcCode),
}

/// The gRPC statuses a retry may be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrpcCode {
    Cancelled = 1,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Unavailable = 14,
}

/// The conditions when a policy lists none: failures after which the request was
/// most likely not processed (no connection, a reset, a gateway that found no healthy
/// upstream, gRPC's `UNAVAILABLE`), but not the application's own 500s.
pub const DEFAULT_RETRY_ON: [RetryOn; 4] = [
    RetryOn::ConnectFailure,
    RetryOn::Reset,
    RetryOn::GatewayError,
    RetryOn::Grpc(GrpcCode::Unavailable),
];

const NAMED: [(&str, RetryOn); 9] = [
    ("connect-failure", RetryOn::ConnectFailure),
    ("reset", RetryOn::Reset),
    ("5xx", RetryOn::ServerError),
    ("gateway-error", RetryOn::GatewayError),
    ("retriable-4xx", RetryOn::Retriable4xx),
    ("cancelled", RetryOn::Grpc(GrpcCode::Cancelled)),
    (
        "deadline-exceeded",
        RetryOn::Grpc(GrpcCode::DeadlineExceeded),
    ),
    (
        "resource-exhausted",
        RetryOn::Grpc(GrpcCode::ResourceExhausted),
    ),
    ("unavailable", RetryOn::Grpc(GrpcCode::Unavailable)),
];

impl RetryOn {
    /// Parses one entry of `retryOn`; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some((_, condition)) = NAMED.iter().find(|(name, _)| *name == text) {
            return Ok(*condition);
        }
        match text.parse::<u16>() {
            Ok(code) if (100..=599).contains(&code) => Ok(RetryOn::Status(code)),
            _ => Err(format!(
                "{text:?} is none of {}, or a status code from 100 to 599",
                NAMED.map(|(name, _)| name).join(", ")
            )),
        }
    }
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryOn::Status(code) => write!(f, "{code}"),
            named => {
                let name = NAMED
                    .iter()
                    .find(|(_, condition)| condition == named)
                    .map_or("?", |(name, _)| name);
                f.write_str(name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_condition_reads_back_as_written_and_nonsense_is_named() {
        for text in [
            "connect-failure",
            "reset",
            "5xx",
            "gateway-error",
            "retriable-4xx",
            "cancelled",
            "deadline-exceeded",
            "resource-exhausted",
            "unavailable",
            "503",
        ] {
            assert_eq!(RetryOn::parse(text).unwrap().to_string(), text);
        }
        for bad in ["sometimes", "600", "99", "", "Reset"] {
            let error = RetryOn::parse(bad).unwrap_err();
            assert!(error.contains("connect-failure"), "{error}");
        }
    }
}
