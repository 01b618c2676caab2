//! HTTP/1.1 load in which every request opens a new TCP connection, for measuring what
//! connection setup costs on a path (the `weft-load` binary; `cargo xtask bench` runs it
//! inside a client pod).
//!
//! Debian's load generators all start their clock once the connection is up (wrk,
//! h2load) or round to 100 µs (hey), so none of them shows what a mesh adds to a
//! *new* connection: for a captured connection the connect() completes at the local
//! agent at once, and the tunnel to the other node is set up while the request waits.
//! Here a request's latency runs from just before `connect()` to the last byte of the
//! response body.
//!
//! Two shapes of load: open loop at a fixed rate ([`Load::Rate`]: each request starts on
//! its own schedule, whatever happened to the others, so a slow answer never delays the
//! next one), and closed loop ([`Load::Clients`]: N clients, each sending its next
//! request as soon as the last one is answered — saturation). Requests carry
//! `Connection: close`, so the server closes first and keeps the `TIME_WAIT`, not the
//! client, whose ports would otherwise run out at a few thousand connections a second.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
    time::MissedTickBehavior,
};

/// At most this many requests in flight in open-loop mode; a request due while as many
/// are still waiting is counted as an error instead of piling up without bound.
pub const MAX_IN_FLIGHT: usize = 4096;

/// How the requests are paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Open loop: this many requests a second, each on its own schedule.
    Rate(u32),
    /// Closed loop: this many clients, each sending as soon as its last request ended.
    Clients(usize),
}

/// One load run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub target: SocketAddr,
    /// The request target, e.g. `/?bytes=1024`.
    pub path: String,
    pub load: Load,
    /// Requests started in this window (after the warm-up) are measured.
    pub duration: Duration,
    /// Requests started before the measured window are sent but not recorded.
    pub warmup: Duration,
    /// A request not answered within this is an error.
    pub timeout: Duration,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Requests started in the measured window and answered with a 2xx.
    pub requests: u64,
    /// Requests started in the measured window that failed (or were not sent because
    /// too many were in flight).
    pub errors: u64,
    /// The first failure, to tell the user what went wrong.
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub seconds: f64,
    /// From the start of the measured window to the end of its last answered request:
    /// longer than `seconds` when the path fell behind the rate (requests queued).
    pub span_seconds: f64,
    /// Latency of every answered request, connect to last body byte, in microseconds,
    /// in the order they finished.
    pub latencies_us: Vec<u32>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connect to {target} failed: {source}")]
    Connect {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("connection to {target} failed: {source}")]
    Io {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("{target} closed the connection before the response was complete")]
    Truncated { target: SocketAddr },
    #[error("{target} answered with an unreadable response: {head:?}")]
    Malformed { target: SocketAddr, head: String },
    #[error("{target} answered {status}")]
    Status { target: SocketAddr, status: u16 },
    #[error("no answer from {target} within {timeout:?}")]
    Timeout {
        target: SocketAddr,
        timeout: Duration,
    },
    #[error("more than {MAX_IN_FLIGHT} requests in flight: the path cannot keep up")]
    Overloaded,
}

/// The results so far, shared by the request tasks.
#[derive(Debug)]
struct Tally {
    report: Report,
    measure_from: Instant,
}

impl Tally {
    fn record(&mut self, outcome: Result<Duration, LoadError>) {
        match outcome {
            Ok(latency) => {
                self.report.requests += 1;
                let span = self.measure_from.elapsed().as_secs_f64();
                self.report.span_seconds = self.report.span_seconds.max(span);
                let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
                self.report.latencies_us.push(micros);
            }
            Err(err) => {
                self.report.errors += 1;
                self.report
                    .first_error
                    .get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// Runs `plan` on the current tokio runtime and reports what it measured.
pub async fn run(plan: Plan) -> Report {
    let request = Arc::<[u8]>::from(request_bytes(&plan.target, &plan.path));
    let (target, timeout) = (plan.target, plan.timeout);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let tally = Arc::new(Mutex::new(Tally {
        report: Report::default(),
        measure_from,
    }));
    let end = measure_from + plan.duration;
    let mut tasks = JoinSet::new();
    match plan.load {
        Load::Rate(rate) => {
            let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut ticks = tokio::time::interval(period);
            // Catch up after a late tick: the schedule, not the last request, sets the pace.
            ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
            loop {
                ticks.tick().await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                while tasks.try_join_next().is_some() {}
                let measured = now >= measure_from;
                if tasks.len() >= MAX_IN_FLIGHT {
                    if measured {
                        lock(&tally).record(Err(LoadError::Overloaded));
                    }
                    continue;
                }
                let (request, tally) = (request.clone(), tally.clone());
                tasks.spawn(async move {
                    let outcome = timed(target, &request, timeout).await;
                    if measured {
                        lock(&tally).record(outcome);
                    }
                });
            }
        }
        Load::Clients(clients) => {
            for _ in 0..clients.max(1) {
                let (request, tally) = (request.clone(), tally.clone());
                tasks.spawn(async move {
                    loop {
                        let started = Instant::now();
                        if started >= end {
                            break;
                        }
                        let outcome = timed(target, &request, timeout).await;
                        if started >= measure_from {
                            lock(&tally).record(outcome);
                        }
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut report = std::mem::take(&mut lock(&tally).report);
    report.seconds = plan.duration.as_secs_f64();
    report
}

fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A panicking request task cannot leave the tally half-written: recording is a
    // push and two additions.
    tally
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The request: a GET of `path` that asks the server to close the connection after it.
pub fn request_bytes(target: &SocketAddr, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: weft-load\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// One request on a new connection, timed from before connect() to the last body byte;
/// then the connection is read to its end (untimed), so that the server closes first.
async fn timed(
    target: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<Duration, LoadError> {
    let started = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(target)
            .await
            .map_err(|source| LoadError::Connect { target, source })?;
        let io = |source| LoadError::Io { target, source };
        stream.set_nodelay(true).map_err(io)?;
        stream.write_all(request).await.map_err(io)?;
        let mut buffer = Vec::with_capacity(2048);
        let mut chunk = [0u8; 16 * 1024];
        let mut expected = None;
        loop {
            if expected.is_none() {
                expected = response_length(&buffer)
                    .map_err(|head| LoadError::Malformed { target, head })?;
            }
            if let Some(Response { status, length }) = expected
                && buffer.len() >= length
            {
                let done = started.elapsed();
                // Read to the end: the server closes first (we asked it to).
                while stream.read(&mut chunk).await.map_err(io)? > 0 {}
                if !(200..300).contains(&status) {
                    return Err(LoadError::Status { target, status });
                }
                return Ok(done);
            }
            let read = stream.read(&mut chunk).await.map_err(io)?;
            if read == 0 {
                return Err(LoadError::Truncated { target });
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(LoadError::Timeout { target, timeout }))
}

/// A response head that has been read: the status and how many bytes the whole response
/// (head and body) takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub length: usize,
}

/// Reads the head at the start of `buffer`: `Ok(None)` while it is incomplete, the
/// response's status and total length once it is there, or the head itself when it is
/// not an HTTP/1.x response with a `Content-Length` (which `weft-echo` always sends).
pub fn response_length(buffer: &[u8]) -> Result<Option<Response>, String> {
    let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return if buffer.len() > 64 * 1024 {
            Err("a response head over 64 KiB".to_owned())
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&buffer[..end]);
    let bad = || head.chars().take(200).collect::<String>();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1."))
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(bad)?;
    let body = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .ok_or_else(bad)?;
    Ok(Some(Response {
        status,
        length: end + 4 + body,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_length_of_a_response() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: x\r\nContent-Length: 1024\r\n\r\nabc";
        let response = response_length(head).unwrap().unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.length, head.len() - 3 + 1024);
        assert_eq!(
            response_length(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(),
            None
        );
        let status =
            response_length(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(status.unwrap().unwrap().status, 503);
    }

    #[test]
    fn refuses_responses_it_cannot_measure() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(response_length(chunked).unwrap_err().contains("chunked"));
        assert!(response_length(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn asks_the_server_to_close() {
        let target: SocketAddr = "10.244.1.2:8080".parse().unwrap();
        let request = String::from_utf8(request_bytes(&target, "/?bytes=1")).unwrap();
        assert!(request.starts_with("GET /?bytes=1 HTTP/1.1\r\nHost: 10.244.1.2:8080\r\n"));
        assert!(request.ends_with("Connection: close\r\n\r\n"));
    }

    /// A server on loopback: both shapes of load get answers and time them.
    #[test]
    fn measures_against_a_local_server() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let target = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        let mut buffer = [0u8; 1024];
                        let mut seen = Vec::new();
                        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = stream.read(&mut buffer).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            seen.extend_from_slice(&buffer[..n]);
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                            .await;
                    });
                }
            });
            for load in [Load::Rate(200), Load::Clients(2)] {
                let report = run(Plan {
                    target,
                    path: "/".to_owned(),
                    load,
                    duration: Duration::from_millis(300),
                    warmup: Duration::from_millis(50),
                    timeout: Duration::from_secs(2),
                })
                .await;
                assert_eq!(report.errors, 0, "{load:?}: {:?}", report.first_error);
                assert!(report.requests >= 20, "{load:?}: {report:?}");
                assert_eq!(report.latencies_us.len() as u64, report.requests);
                assert!(report.span_seconds >= 0.25, "{load:?}: {report:?}");
            }
        });
    }
}
