//! The raw TCP server behind `weft-tcp-echo`.
//!
//! Each accepted connection is handled in one of three [`Mode`]s: `echo` writes back every
//! byte, `sink` swallows everything and reports the count at EOF, `banner` first names the
//! pod and the peer it sees, then echoes. Having the server tell the peer address lets
//! L4 tests check what the mesh did to the source address without any HTTP in the way.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, copy, sink};
use tokio::net::{TcpListener, TcpStream};

use crate::{DEFAULT_DRAIN_TIMEOUT, accept_loop};

/// What the server does with each connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Write back every byte received.
    #[default]
    Echo,
    /// Read and discard; at EOF write `received N bytes\n` and close.
    Sink,
    /// Write `<name> <peer>\n`, then echo.
    Banner,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Echo => "echo",
            Self::Sink => "sink",
            Self::Banner => "banner",
        })
    }
}

/// What the server needs to know besides its listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// What to do with each connection.
    pub mode: Mode,
    /// The pod name written by [`Mode::Banner`].
    pub name: String,
    /// How long to wait for open connections after the shutdown signal.
    pub drain_timeout: Duration,
}

impl Config {
    /// A config for `mode` reporting `name`, with the default drain timeout.
    pub fn new(mode: Mode, name: impl Into<String>) -> Self {
        Self {
            mode,
            name: name.into(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Serves connections on `listener` until `shutdown` resolves, then stops accepting and
/// lets open connections finish for up to the drain timeout.
///
/// A failing connection is logged and closed; it never stops the server.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let mode = config.mode;
    let name: Arc<str> = config.name.into();
    accept_loop(
        listener,
        shutdown,
        config.drain_timeout,
        move |stream, peer, _closing| {
            let name = Arc::clone(&name);
            async move {
                if let Err(err) = handle(stream, peer, mode, &name).await {
                    log::warn!("{mode} connection from {peer} failed: {err}");
                }
            }
        },
    )
    .await;
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, mode: Mode, name: &str) -> io::Result<()> {
    let (mut reader, mut writer) = stream.split();
    match mode {
        Mode::Echo => {
            copy(&mut reader, &mut writer).await?;
        }
        Mode::Sink => {
            let received = copy(&mut reader, &mut sink()).await?;
            writer
                .write_all(format!("received {received} bytes\n").as_bytes())
                .await?;
        }
        Mode::Banner => {
            writer
                .write_all(format!("{name} {peer}\n").as_bytes())
                .await?;
            copy(&mut reader, &mut writer).await?;
        }
    }
    // Send our FIN; the peer already sent its own, which is what ended the copy.
    writer.shutdown().await
}
