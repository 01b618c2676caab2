//! The HBONE port as a peer's bytes drive it: what arrives on 15008 once TLS is done
//! (the HTTP/2 preface, SETTINGS, PINGs, CONNECTs, DATA, resets, in any order and cut
//! anywhere) goes through the abuse inspector and `hbone::serve` as the inbound
//! serves it, to a handler that reads each CONNECT's headers and accepts (echoing the
//! tunnel's bytes) or refuses. Every input ends in a closed connection, never a panic
//! or a hang. The first byte sets how the rest is cut into reads.
#![no_main]

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use weft_agent::proxy::{
    abuse::{Inspected, Listener},
    hbone::{self, Incoming, Settings},
};

fuzz_target!(|input: &[u8]| {
    let Some((&cut, bytes)) = input.split_first() else {
        return;
    };
    let peer = Peer {
        bytes: bytes.to_vec(),
        read: 0,
        cut: usize::from(cut) + 1,
        yielded: false,
        lingering: LINGER,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let (io, verdict) = Inspected::new(peer, Listener::Hbone, Duration::from_secs(60));
        let premature = io.premature_resets();
        let served = hbone::serve(
            io,
            &Settings::default(),
            premature,
            std::future::pending(),
            handle,
        )
        .await;
        let _ = verdict.of(served.as_ref().err().map(|err| err as _));
    });
});

/// What the inbound does first with a CONNECT: who the client says is calling, then
/// a tunnel or a refusal (by the port, so that inputs choose).
async fn handle(incoming: Incoming) {
    let _ = incoming.forwarded_for();
    if incoming.authority.port() % 2 == 1 {
        return incoming.refuse(StatusCode::UNAUTHORIZED);
    }
    let Ok(mut tunnel) = incoming.accept() else {
        return;
    };
    let mut buffer = [0; 512];
    while let Ok(read @ 1..) = tunnel.read(&mut buffer).await {
        if tunnel.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
    let _ = tunnel.shutdown().await;
}

/// Turns the peer waits once its bytes are all sent before it closes the connection:
/// h2 hands out no request that arrived with the end of the connection, and the
/// tunnels' tasks need turns to echo.
const LINGER: u32 = 32;

/// The peer: its bytes, `cut` at a time, each read after a turn for the tunnels'
/// tasks; then [`LINGER`] turns of silence and the end of the connection. What the
/// agent writes is taken and dropped.
struct Peer {
    bytes: Vec<u8>,
    read: usize,
    cut: usize,
    yielded: bool,
    lingering: u32,
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let lingers = self.read == self.bytes.len() && self.lingering > 0;
        if lingers {
            self.lingering -= 1;
        }
        if !self.yielded || lingers {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        let end = self
            .bytes
            .len()
            .min(self.read + self.cut.min(buf.remaining()));
        buf.put_slice(&self.bytes[self.read..end]);
        self.read = end;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
