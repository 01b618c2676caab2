//! `weft-echo`: the echo workload that demo and test pods run.
//!
//! It answers HTTP/1.1 and h2c on one port with a JSON description of each request (pod
//! name, peer address as seen by the socket, method, path, version, host, headers); see
//! [`weft_workloads::echo_http`] for the query parameters. On the same port it serves a
//! gRPC echo ([`weft_workloads::echo_grpc`]) and a WebSocket echo at `/ws`
//! ([`weft_workloads::echo_ws`]). It stops gracefully on SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use weft_workloads::echo_http;

/// HTTP/1.1 + h2c echo server, with gRPC and WebSocket echoes on the same port, for weft
/// demos and tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WEFT_ECHO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Pod name to report; defaults to the host name.
    #[arg(long, env = "POD_NAME", default_value_t = weft_workloads::default_pod_name())]
    name: String,
    /// Milliseconds every JSON echo waits before it answers, unless its `?delay=` says
    /// otherwise: a slow replica.
    #[arg(long, env = "WEFT_ECHO_DELAY_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    delay_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    weft_workloads::run_server("weft-echo", args.listen, |listener, shutdown| async move {
        log::info!(
            "weft-echo {} serving HTTP/1.1, h2c, gRPC and WebSocket on {} as {:?}",
            env!("CARGO_PKG_VERSION"),
            listener.local_addr().unwrap_or(args.listen),
            args.name
        );
        let mut config = echo_http::Config::new(args.name);
        config.delay = std::time::Duration::from_millis(args.delay_ms);
        echo_http::serve(listener, config, shutdown).await;
    })
}
