//! Sample workloads that the local weft cluster runs inside pods for demos and tests.
//!
//! Two servers live here, each behind a thin binary: [`echo_http`] (`weft-echo`) answers
//! every HTTP/1.1 or h2c request with a JSON description of what it saw, gRPC requests
//! on the same port with [`echo_grpc`] and WebSocket upgrades with [`echo_ws`]; [`tcp`]
//! (`weft-tcp-echo`) echoes, swallows or greets raw TCP connections. Both report the peer
//! address exactly as the accepted socket saw it, which is what mesh tests assert on: it
//! shows whether the traffic was redirected, NATed or passed through untouched. Two
//! clients live here too: [`load`] (`weft-load`), the new-connection-per-request load
//! generator of `cargo xtask bench`, and [`client`] (`weft-client`), which drives the
//! gRPC and WebSocket echoes and puts gRPC load on long-lived HTTP/2 connections.
//!
//! The `serve` functions take an already bound listener so that tests can bind
//! `127.0.0.1:0` and drive them in-process; [`run_server`] and [`default_pod_name`] are
//! what both binaries share.

#![forbid(unsafe_code)]

pub mod client;
pub mod echo_grpc;
pub mod echo_http;
pub mod echo_ws;
pub mod load;
pub mod tcp;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use hyper::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long a server waits for open connections to finish after a shutdown signal before
/// it cuts them off. Well below Kubernetes' default 30 s termination grace period.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket could not be opened.
///
/// The kernel's error is part of the message (not a separate `source`) so that one line
/// tells the operator everything.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {error}{}", bind_hint(.error.kind()))]
pub struct BindError {
    /// The address that was asked for.
    pub addr: SocketAddr,
    /// What the kernel said.
    pub error: io::Error,
}

fn bind_hint(kind: io::ErrorKind) -> &'static str {
    match kind {
        io::ErrorKind::AddrInUse => " (is another process already listening on that port?)",
        io::ErrorKind::AddrNotAvailable => " (that address is not assigned to this host)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

/// Binds a TCP listener on `addr`, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| BindError { addr, error })
}

/// The pod name to report when `--name`/`POD_NAME` is not given: the host name (which
/// Kubernetes sets to the pod name), or `"unknown"`.
pub fn default_pod_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A future that resolves when the process is asked to stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The whole life of a workload binary: logging to stderr (`info` unless `RUST_LOG`
/// says otherwise), a tokio runtime, SIGTERM/SIGINT handlers, a listener on `listen`,
/// then `serve` until shutdown. A failure prints as `program: what went wrong` and
/// makes the exit code non-zero.
pub fn run_server<F, Fut>(program: &str, listen: SocketAddr, serve: F) -> ExitCode
where
    F: FnOnce(TcpListener, Shutdown) -> Fut,
    Fut: Future<Output = ()>,
{
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = tokio::runtime::Runtime::new()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                let shutdown =
                    shutdown_signal().context("cannot install SIGTERM/SIGINT handlers")?;
                let listener = bind(listen).await?;
                serve(listener, Box::pin(shutdown)).await;
                anyhow::Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{program}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs SIGTERM and SIGINT handlers now and returns a future that resolves on the
/// first of either. Installing up front means a failure shows at startup, not at shutdown.
fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM received, shutting down"),
            _ = int.recv() => log::info!("SIGINT received, shutting down"),
        }
    })
}

/// Accepts connections on `listener` and runs `handle` for each on its own task until
/// `shutdown` resolves. Then it stops accepting, tells the connections through the
/// `closing` receiver (which flips to `true`), and waits up to `drain_timeout` for them to
/// finish before dropping the rest.
async fn accept_loop<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
    mut handle: H,
) where
    H: FnMut(TcpStream, SocketAddr, watch::Receiver<bool>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |addr| addr.to_string());
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(joined) = connections.join_next() => report_panic(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Latency matters more than packet count for echo traffic.
                    if let Err(err) = stream.set_nodelay(true) {
                        log::debug!("{peer}: cannot set TCP_NODELAY: {err}");
                    }
                    connections.spawn(handle(stream, peer, closing_rx.clone()));
                }
                Err(err) => {
                    // Usually out of file descriptors; back off instead of spinning.
                    log::warn!("accept on {local} failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    closing_tx.send_replace(true);
    let open = connections.len();
    if open > 0 {
        log::info!("waiting up to {drain_timeout:?} for {open} open connection(s)");
    }
    let drained = tokio::time::timeout(drain_timeout, async {
        while let Some(joined) = connections.join_next().await {
            report_panic(joined);
        }
    })
    .await;
    if drained.is_err() {
        log::warn!(
            "closing {} connection(s) still open after {drain_timeout:?}",
            connections.len()
        );
    }
}

fn report_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && err.is_panic()
    {
        log::error!("connection task panicked: {err}");
    }
}

/// Headers as text by name, for echoing: values that are not UTF-8 are shown lossily and
/// repeated names are joined with `", "`.
pub(crate) fn header_strings(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut strings: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        strings
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    strings
}

/// `err: cause: cause`, since the top-level messages of hyper and tonic alone are terse.
/// A cause whose message is already there (some errors repeat their source's) is left out.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            let _ = write!(text, ": {message}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Terse(#[source] io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Repeats(#[source] io::Error);

    #[test]
    fn error_chain_names_each_cause_once() {
        let refused = || io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(error_chain(&Terse(refused())), "wrapper: refused");
        assert_eq!(error_chain(&Repeats(refused())), "outer: refused");
    }
}
