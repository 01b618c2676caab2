//! `weft-tcp-echo`: the raw TCP workload that demo and test pods run.
//!
//! In `echo` mode it writes back every byte, in `sink` mode it reports how many bytes it
//! received once the client closes, and in `banner` mode it first writes `<name> <peer>`
//! and then echoes; see [`weft_workloads::tcp`]. It stops gracefully on SIGTERM or SIGINT.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use weft_workloads::tcp;

/// TCP echo / sink / banner server for weft demos and tests.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WEFT_TCP_LISTEN", default_value = "0.0.0.0:9000")]
    listen: SocketAddr,
    /// What to do with each connection.
    #[arg(long, env = "WEFT_TCP_MODE", value_enum, default_value_t = tcp::Mode::Echo)]
    mode: tcp::Mode,
    /// Pod name written in banner mode; defaults to the host name.
    #[arg(long, env = "POD_NAME", default_value_t = weft_workloads::default_pod_name())]
    name: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    weft_workloads::run_server(
        "weft-tcp-echo",
        args.listen,
        |listener, shutdown| async move {
            log::info!(
                "weft-tcp-echo {} serving TCP in {} mode on {} as {:?}",
                env!("CARGO_PKG_VERSION"),
                args.mode,
                listener.local_addr().unwrap_or(args.listen),
                args.name
            );
            tcp::serve(listener, tcp::Config::new(args.mode, args.name), shutdown).await;
        },
    )
}
