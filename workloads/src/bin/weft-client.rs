//! `weft-client`: drives `weft-echo`'s gRPC and WebSocket echoes and prints what came
//! back as one JSON object per line on stdout (see [`weft_workloads::client`]), for tests
//! to parse. It exits non-zero when a call did not end as asked, an echo came back
//! different, or it could not run at all (the reason goes to stderr).

#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tonic::Code;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use weft_workloads::client::{self, Ask, LoadPlan, Shape};

/// Client of weft-echo's gRPC and WebSocket echoes; one JSON object per line on stdout.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Calls the gRPC echo service (weft.echo.v1.Echo); all calls but load's go over one
    /// HTTP/2 connection.
    Grpc {
        #[command(subcommand)]
        call: GrpcCommand,
    },
    /// Checks that a WebSocket echo sends every message back unchanged; prints
    /// {"pod":..,"echoed":N}.
    Ws {
        /// The echo's URL.
        #[arg(long)]
        url: String,
        /// Text messages to send, one at a time.
        #[arg(long, default_value_t = 1)]
        messages: u32,
        /// Seconds to wait for the connection and for each message.
        #[arg(long, default_value = "10", value_parser = seconds)]
        timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum GrpcCommand {
    /// COUNT unary calls, one after the other; one line per reply or status.
    Unary(CallArgs),
    /// One call asking for COUNT replies; one line per reply, then one if it failed.
    ServerStream(CallArgs),
    /// One call sending COUNT messages (the last carries --fail-with-code); one line for its reply.
    ClientStream(CallArgs),
    /// One call sending COUNT messages in lockstep with their replies (the last asks to
    /// fail); one line per reply, then one if it failed.
    Bidi(CallArgs),
    /// Unary calls over several connections for a while; prints one summary line,
    /// {"requests":..,"errors":..,"rps":..,"p50_us":..,"p99_us":..,"first_error":..}.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
struct CallArgs {
    /// The echo server, http://HOST:PORT.
    #[arg(long)]
    target: String,
    /// Calls (unary) or messages (streams).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// The text to echo.
    #[arg(long, default_value = "hello")]
    message: String,
    /// Ask the server to end the call with this gRPC status code (1 to 16); ending so
    /// is then what is expected.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=16))]
    fail_with_code: Option<i32>,
    /// The status message to ask for with --fail-with-code.
    #[arg(long, default_value = "", requires = "fail_with_code")]
    fail_message: String,
    /// Milliseconds the server waits before each reply (at most 60000).
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    /// Request metadata, KEY=VALUE; may be repeated.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = client::parse_metadata)]
    metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    /// Seconds to wait for the connection and for each call.
    #[arg(long, default_value = "10", value_parser = seconds)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The echo server, http://HOST:PORT.
    #[arg(long)]
    target: String,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,
    /// Callers, each calling again as soon as its last call ended; with --rate, the most
    /// calls in flight (a call due beyond that counts as an error). Default: 1, or 1000
    /// with --rate.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: Option<u32>,
    /// Calls a second over all connections, each started on schedule however long the
    /// others take, instead of as fast as the callers go.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rate: Option<u32>,
    /// Seconds to start calls for.
    #[arg(long, default_value = "5", value_parser = seconds)]
    duration: Duration,
    /// Seconds after which a call fails.
    #[arg(long, default_value = "10", value_parser = seconds)]
    timeout: Duration,
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

impl LoadArgs {
    fn plan(&self) -> LoadPlan {
        LoadPlan {
            target: self.target.clone(),
            connections: self.connections,
            concurrency: self
                .concurrency
                .unwrap_or(if self.rate.is_some() { 1000 } else { 1 }),
            rate: self.rate,
            duration: self.duration,
            timeout: self.timeout,
        }
    }
}

impl CallArgs {
    fn ask(&self) -> Ask {
        Ask {
            message: self.message.clone(),
            fail_with: self.fail_with_code.map(Code::from_i32),
            fail_message: self.fail_message.clone(),
            delay_ms: self.delay_ms,
            metadata: self.metadata.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: the client should cost the same on every path it measures.
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weft-client: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let (shape, args) = match command {
        Command::Ws {
            url,
            messages,
            timeout,
        } => {
            let report = client::websocket(&url, messages, timeout).await?;
            return Ok(client::emit(&mut out, &report)?);
        }
        Command::Grpc { call } => match call {
            GrpcCommand::Load(args) => {
                let report = client::grpc_load(&args.plan()).await?;
                return Ok(client::emit(&mut out, &report)?);
            }
            GrpcCommand::Unary(args) => (Shape::Unary, args),
            GrpcCommand::ServerStream(args) => (Shape::ServerStream, args),
            GrpcCommand::ClientStream(args) => (Shape::ClientStream, args),
            GrpcCommand::Bidi(args) => (Shape::Bidi, args),
        },
    };
    let mut echo = client::connect(&args.target, args.timeout).await?;
    let unexpected = shape
        .call(&mut echo, &args.ask(), args.count, &mut out)
        .await?;
    if unexpected > 0 {
        anyhow::bail!(
            "{unexpected} call(s) to {} did not end as asked (see the lines on stdout)",
            args.target
        );
    }
    Ok(())
}
