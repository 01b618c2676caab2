//! The gRPC echo service (`weft.echo.v1.Echo`, defined in
//! `proto/weft/echo/v1/echo.proto`) that `weft-echo` serves on the port of its HTTP echo:
//! [`echo_http`](crate::echo_http) hands it every request whose content type is
//! `application/grpc*`.
//!
//! Each reply names the pod, the peer address the server's socket saw, the message it
//! echoes and the request metadata the server received. A request can ask for a status
//! code instead of a reply (`fail_with_code`, with `fail_message`); that status carries an
//! `x-weft-pod` trailer, so that a test can tell the server's status from one a proxy made
//! up. It can also ask for a delay before the reply (`delay_ms`, at most
//! [`MAX_DELAY_MS`](crate::echo_http::MAX_DELAY_MS)).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _, stream};
use hyper::HeaderMap;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::echo_http::{MAX_DELAY_MS, POD_HEADER, Pod};

/// The messages, client and server generated from the proto.
pub mod proto {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("weft.echo.v1");
}

use proto::echo_server::{Echo, EchoServer};
use proto::{ClientStreamReply, EchoReply, EchoRequest, ServerStreamRequest};

/// The most replies one `ServerStream` call may ask for.
pub const MAX_STREAM_REPLIES: u32 = 100_000;

/// The status message of a requested failure whose request gave none.
pub const DEFAULT_FAIL_MESSAGE: &str = "failure requested by the client";

/// The service, ready to be called as a tower `Service` for each gRPC request.
pub(crate) fn server(pod: Arc<Pod>) -> EchoServer<EchoService> {
    EchoServer::new(EchoService { pod })
}

/// Answers the calls of `weft.echo.v1.Echo` as the pod it was made for.
#[derive(Debug, Clone)]
pub(crate) struct EchoService {
    pod: Arc<Pod>,
}

/// A request field the server cannot honour; the call fails with `INVALID_ARGUMENT`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum RequestError {
    #[error("fail_with_code must be a gRPC status code from 1 to 16 (or 0 for none), got {0}")]
    Code(i32),
    #[error("delay_ms must be at most {MAX_DELAY_MS}, got {0}")]
    Delay(u32),
    #[error("count must be at most {MAX_STREAM_REPLIES}, got {0}")]
    Count(u32),
}

impl From<RequestError> for Status {
    fn from(err: RequestError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

/// What an [`EchoRequest`] asks for besides its message, checked.
#[derive(Debug)]
struct Asked {
    delay: Duration,
    failure: Option<Status>,
}

impl EchoService {
    fn asked(&self, request: &EchoRequest) -> Result<Asked, RequestError> {
        if request.delay_ms > MAX_DELAY_MS {
            return Err(RequestError::Delay(request.delay_ms));
        }
        let failure = match request.fail_with_code {
            0 => None,
            code @ 1..=16 => {
                let message = if request.fail_message.is_empty() {
                    DEFAULT_FAIL_MESSAGE
                } else {
                    &request.fail_message
                };
                let mut trailers = HeaderMap::new();
                trailers.insert(POD_HEADER, self.pod.header.clone());
                Some(Status::with_metadata(
                    Code::from_i32(code),
                    message,
                    MetadataMap::from_headers(trailers),
                ))
            }
            code => return Err(RequestError::Code(code)),
        };
        Ok(Asked {
            delay: Duration::from_millis(request.delay_ms.into()),
            failure,
        })
    }

    /// Waits as `request` asks, then gives back its message to echo or the status it
    /// asked for.
    async fn answer(&self, request: EchoRequest) -> Result<String, Status> {
        let asked = self.asked(&request)?;
        tokio::time::sleep(asked.delay).await;
        match asked.failure {
            Some(status) => Err(status),
            None => Ok(request.message),
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Caller {
        Caller {
            pod: self.pod.name.clone(),
            peer: request
                .remote_addr()
                .map_or_else(String::new, |peer| peer.to_string()),
            metadata: crate::header_strings(&request.metadata().clone().into_headers()),
        }
    }
}

/// What every reply of one call repeats.
#[derive(Debug, Clone)]
struct Caller {
    pod: String,
    peer: String,
    metadata: BTreeMap<String, String>,
}

impl Caller {
    fn reply(&self, message: String, index: u32) -> EchoReply {
        EchoReply {
            pod: self.pod.clone(),
            peer: self.peer.clone(),
            message,
            metadata: self.metadata.clone(),
            index,
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let caller = self.caller(&request);
        let message = self.answer(request.into_inner()).await?;
        Ok(Response::new(caller.reply(message, 0)))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<ServerStreamRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let caller = self.caller(&request);
        let ServerStreamRequest { echo, count } = request.into_inner();
        let echo = echo.unwrap_or_default();
        let Asked { delay, failure } = self.asked(&echo)?;
        if count > MAX_STREAM_REPLIES {
            return Err(RequestError::Count(count).into());
        }
        let replies = stream::iter(0..count)
            .then(move |index| {
                let reply = caller.reply(echo.message.clone(), index);
                async move {
                    tokio::time::sleep(delay).await;
                    Ok(reply)
                }
            })
            .chain(stream::iter(failure.map(Err)));
        Ok(Response::new(Box::pin(replies)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ClientStreamReply>, Status> {
        let Caller {
            pod,
            peer,
            metadata,
        } = self.caller(&request);
        let mut messages = request.into_inner();
        let mut count = 0;
        let mut last = String::new();
        while let Some(message) = messages.message().await? {
            last = self.answer(message).await?;
            count += 1;
        }
        Ok(Response::new(ClientStreamReply {
            pod,
            peer,
            message: last,
            metadata,
            count,
        }))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let caller = self.caller(&request);
        let service = self.clone();
        // tonic ends the response at the first error, so a requested failure is the last
        // thing the client receives.
        let replies = request
            .into_inner()
            .zip(stream::iter(0..))
            .then(move |(message, index)| {
                let (service, caller) = (service.clone(), caller.clone());
                async move {
                    let message = service.answer(message?).await?;
                    Ok(caller.reply(message, index))
                }
            });
        Ok(Response::new(Box::pin(replies)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> EchoService {
        EchoService {
            pod: Arc::new(Pod::new("grpc-0".into())),
        }
    }

    #[test]
    fn requested_failures_carry_code_message_and_pod() {
        let asked = service()
            .asked(&EchoRequest {
                fail_with_code: Code::PermissionDenied as i32,
                fail_message: "no".into(),
                delay_ms: 5,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(asked.delay, Duration::from_millis(5));
        let status = asked.failure.unwrap();
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "no");
        assert_eq!(status.metadata().get("x-weft-pod").unwrap(), "grpc-0");

        let unset = service()
            .asked(&EchoRequest {
                fail_with_code: Code::Unavailable as i32,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(unset.failure.unwrap().message(), DEFAULT_FAIL_MESSAGE);
        assert!(
            service()
                .asked(&EchoRequest::default())
                .unwrap()
                .failure
                .is_none()
        );
    }

    #[test]
    fn impossible_requests_are_refused() {
        for code in [-1, 17] {
            let request = EchoRequest {
                fail_with_code: code,
                ..Default::default()
            };
            assert_eq!(
                service().asked(&request).unwrap_err(),
                RequestError::Code(code)
            );
        }
        let request = EchoRequest {
            delay_ms: 60_001,
            ..Default::default()
        };
        let err = service().asked(&request).unwrap_err();
        assert_eq!(err, RequestError::Delay(60_001));
        assert_eq!(err.to_string(), "delay_ms must be at most 60000, got 60001");
    }
}
