//! The WebSocket echo that `weft-echo` serves at [`PATH`] on the port of its HTTP echo.
//!
//! An HTTP/1.1 `GET /ws` with `Upgrade: websocket` is answered with
//! `101 Switching Protocols`. The server then sends one text message, `{"pod":"<name>"}`,
//! so that a client sees which pod answered, and sends back every text or binary message
//! exactly as it came. On shutdown it closes the socket with `1001 Going Away`. A request
//! for [`PATH`] that is not a WebSocket handshake gets a JSON error instead.

use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use hyper::header::{
    CONNECTION, HeaderMap, HeaderName, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::echo_http::Pod;

/// The path of the WebSocket echo.
pub const PATH: &str = "/ws";

/// A request for [`PATH`] that does not open a WebSocket.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HandshakeError {
    #[error(
        "{PATH} speaks WebSocket only: send a GET with `Connection: upgrade` and `Upgrade: websocket`"
    )]
    NotUpgrade,
    #[error("a WebSocket handshake must be a GET, got {0}")]
    Method(Method),
    #[error("a WebSocket handshake needs HTTP/1.1, got {0:?}")]
    Version(Version),
    #[error("Sec-WebSocket-Version must be 13, got {0:?}")]
    WebSocketVersion(String),
    #[error("the WebSocket handshake has no Sec-WebSocket-Key header")]
    NoKey,
}

impl HandshakeError {
    /// The status to answer with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::NotUpgrade => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks that `request` opens a WebSocket. If it does, gives back the `101` answering
/// it and the upgrade to hand to [`session`] once the response is sent.
pub(crate) fn accept<B>(
    request: &mut Request<B>,
) -> Result<(Response<()>, OnUpgrade), HandshakeError> {
    let headers = request.headers();
    if !has_token(headers, &CONNECTION, "upgrade") || !has_token(headers, &UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if request.method() != Method::GET {
        return Err(HandshakeError::Method(request.method().clone()));
    }
    if request.version() != Version::HTTP_11 {
        return Err(HandshakeError::Version(request.version()));
    }
    let version = headers.get(SEC_WEBSOCKET_VERSION);
    if version.is_none_or(|version| version != "13") {
        let version = version.map_or_else(String::new, |version| {
            String::from_utf8_lossy(version.as_bytes()).into_owned()
        });
        return Err(HandshakeError::WebSocketVersion(version));
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .ok_or(HandshakeError::NoKey)?;
    let accept = HeaderValue::try_from(derive_accept_key(key.as_bytes()))
        .expect("an accept key is base64, which a header can carry");

    let mut response = Response::new(());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    Ok((response, hyper::upgrade::on(request)))
}

/// Whether the comma-separated header `name` lists `token` (case-insensitively).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// A WebSocket session that ended badly.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("the connection was not handed over after the 101 response: {0}")]
    Upgrade(hyper::Error),
    #[error("WebSocket failed: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// Echoes messages on the upgraded connection until the client closes it, or, once
/// `closing` flips to `true`, closes it with `1001 Going Away`.
pub(crate) async fn session(
    pod: &Pod,
    upgrade: OnUpgrade,
    mut closing: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let upgraded = upgrade.await.map_err(SessionError::Upgrade)?;
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let hello = serde_json::json!({ "pod": pod.name }).to_string();
    socket.send(Message::text(hello)).await?;

    let mut close_sent = false;
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    socket.send(message).await?;
                }
                // tungstenite answers pings and closes itself.
                Some(Ok(_)) => {}
                None | Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(()),
                Some(Err(err)) => return Err(err.into()),
            },
            // Mapped to `()`: the guard `wait_for` gives must not live across the close.
            () = closing.wait_for(|closing| *closing).map(drop), if !close_sent => {
                close_sent = true;
                socket
                    .close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: "server shutting down".into(),
                    }))
                    .await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake() -> hyper::http::request::Builder {
        Request::get(PATH)
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "WebSocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    #[test]
    fn accepts_a_handshake_with_the_rfc_6455_key() {
        let mut request = handshake().body(()).unwrap();
        let (response, _upgrade) = accept(&mut request).unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            response.headers()[SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(response.headers()[UPGRADE], "websocket");
    }

    #[test]
    fn refuses_what_is_not_a_handshake() {
        let mut plain = Request::get(PATH).body(()).unwrap();
        let err = accept(&mut plain).unwrap_err();
        assert_eq!(err, HandshakeError::NotUpgrade);
        assert_eq!(err.status(), StatusCode::UPGRADE_REQUIRED);

        let mut post = handshake().method(Method::POST).body(()).unwrap();
        assert_eq!(
            accept(&mut post).unwrap_err(),
            HandshakeError::Method(Method::POST)
        );
        let mut old = handshake().body(()).unwrap();
        old.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("8"));
        assert_eq!(
            accept(&mut old).unwrap_err(),
            HandshakeError::WebSocketVersion("8".into())
        );
        let mut keyless = handshake().body(()).unwrap();
        keyless.headers_mut().remove("sec-websocket-key");
        let err = accept(&mut keyless).unwrap_err();
        assert_eq!(err, HandshakeError::NoKey);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }
}
