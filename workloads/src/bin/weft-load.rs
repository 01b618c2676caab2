//! `weft-load`: HTTP/1.1 load with a new TCP connection for every request, at a fixed
//! rate or as fast as N clients go, printing every latency as JSON on stdout (see
//! [`weft_workloads::load`]). `cargo xtask bench` runs it inside client pods.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use weft_workloads::load::{self, Load, Plan};

/// HTTP/1.1 load generator: one new connection per request, latency from connect() to
/// the last byte of the response.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The server's address.
    #[arg(long)]
    target: SocketAddr,
    /// The request target.
    #[arg(long, default_value = "/")]
    path: String,
    /// Open loop: requests per second, each on its own schedule.
    #[arg(long, conflicts_with = "clients", required_unless_present = "clients")]
    rate: Option<u32>,
    /// Closed loop: this many clients, each sending its next request when the last ends.
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before the measurement starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds after which an unanswered request counts as failed.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seconds = |value: f64, what: &str| {
        Duration::try_from_secs_f64(value)
            .map_err(|_| format!("--{what} {value} is not a duration"))
    };
    let plan = (|| {
        Ok::<_, String>(Plan {
            target: args.target,
            path: args.path.clone(),
            load: match (args.rate, args.clients) {
                (Some(rate), _) => Load::Rate(rate),
                (None, clients) => Load::Clients(clients.unwrap_or(1)),
            },
            duration: seconds(args.duration, "duration")?,
            warmup: seconds(args.warmup, "warmup")?,
            timeout: seconds(args.timeout, "timeout")?,
        })
    })();
    let plan = match plan {
        Ok(plan) => plan,
        Err(err) => {
            eprintln!("weft-load: {err}");
            return ExitCode::FAILURE;
        }
    };
    // One thread: the client should cost the same on every path it measures.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("weft-load: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(load::run(plan));
    match serde_json::to_string(&report) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("weft-load: cannot encode the report: {err}");
            ExitCode::FAILURE
        }
    }
}
