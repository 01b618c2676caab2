//! Protocol detection for ports whose protocol no `appProtocol` or port name declares:
//! the first bytes the client sends tell HTTP/1.x (a request line's method) and HTTP/2
//! (the connection preface) from anything else, which is carried as TCP.
//!
//! Detection is bounded in size (the 24 bytes of the HTTP/2 preface at most) and in
//! time: it ends as soon as the bytes decide, and when the client is silent for
//! `Settings::detect_timeout` (100 ms by default) — a server-speaks-first protocol
//! (MySQL, SMTP) waits that long once per connection, never more. Linkerd waits up to
//! 10 s. The bytes read are replayed to whatever serves the connection ([`Rewind`]), so
//! nothing is lost.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::relay::Spliceable;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Tcp,
}

pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods an HTTP/1.x request line may start with. CONNECT is left out: a captured
/// connection is already at its destination.
const METHODS: [&[u8]; 8] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// What `prefix` says, or `None` while more bytes could still change the answer.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    let could_be = |whole: &[u8]| whole.starts_with(prefix) || prefix.starts_with(whole);
    if prefix.starts_with(PREFACE) {
        return Some(Detected::Http2);
    }
    if METHODS.iter().any(|method| prefix.starts_with(method)) {
        return Some(Detected::Http1);
    }
    if could_be(PREFACE) || METHODS.iter().any(|method| could_be(method)) {
        return None;
    }
    Some(Detected::Tcp)
}

/// Reads from `io` until its first bytes decide, the client is silent for `timeout`,
/// or it closes; returns the answer with the stream rewound to its start.
pub async fn detect<IO: AsyncRead + Unpin>(
    mut io: IO,
    timeout: Duration,
) -> (Detected, Rewind<IO>) {
    let mut prefix = BytesMut::with_capacity(PREFACE.len());
    let detected = loop {
        let read = tokio::time::timeout(timeout, io.read_buf(&mut prefix)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {
                if let Some(detected) = classify(&prefix) {
                    break detected;
                }
                if prefix.len() >= PREFACE.len() {
                    break Detected::Tcp;
                }
            }
            // Silent, closed or failed: whatever serves the connection sees the rest.
            _ => break Detected::Tcp,
        }
    };
    (detected, Rewind::new(prefix.freeze(), io))
}

/// A stream whose first bytes were already read: they are read again first.
#[derive(Debug)]
pub struct Rewind<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Rewind<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }
}

impl Spliceable for Rewind<TcpStream> {
    fn spliceable(&mut self) -> Option<(&[u8], &mut TcpStream)> {
        Some((&self.prefix, &mut self.io))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, duplex};

    use super::*;

    #[test]
    fn first_bytes_decide() {
        let table: [(&[u8], Option<Detected>); 12] = [
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"POST ", Some(Detected::Http1)),
            (b"PATCH /x", Some(Detected::Http1)),
            (b"G", None),
            (b"DEL", None),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (PREFACE, Some(Detected::Http2)),
            (b"PRI * HTTP/1.1", Some(Detected::Tcp)),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Tcp)),
            (b"CONNECT host:443", Some(Detected::Tcp)),
            (b"GETX", Some(Detected::Tcp)),
        ];
        for (prefix, expected) in table {
            assert_eq!(
                classify(prefix),
                expected,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_read_to_decide_are_replayed() {
        let (mut client, server) = duplex(1024);
        client.write_all(b"GE").await.unwrap();
        let detecting = tokio::spawn(detect(server, Duration::from_millis(100)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"T / HTTP/1.1\r\n").await.unwrap();
        let (detected, mut rewound) = detecting.await.unwrap();
        assert_eq!(detected, Detected::Http1);
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_tcp_after_the_bound_and_not_later() {
        let (_client, server) = duplex(1024);
        let started = tokio::time::Instant::now();
        let (detected, _) = detect(server, Duration::from_millis(100)).await;
        assert_eq!(detected, Detected::Tcp);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
