//! The round trip to the node agent: one [`Request`] line out, one [`Reply`] line back,
//! on a fresh connection to the agent's enrollment socket ([`weft_api::enroll`]).

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::mpsc,
    thread,
    time::Duration,
};

use weft_api::enroll::{Reply, Request};

/// The longest reply line read from the agent; a real one is a few dozen bytes.
const MAX_REPLY: u64 = 64 * 1024;

/// Where the agent listens and how long one round trip may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The agent's Unix socket (`agentSocket` in the network configuration).
    pub socket: PathBuf,
    /// The bound on the whole round trip, connect included (`timeoutMs`).
    pub timeout: Duration,
}

/// Something that can ask the agent; the Unix socket in production ([`UnixAgent`]).
pub trait AgentClient {
    /// Sends `request` to the agent at `endpoint` and returns its reply.
    fn exchange(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, AgentError>;
}

/// Why no usable reply came back.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    #[error("cannot send the request")]
    Send(#[source] io::Error),
    #[error("cannot read the reply")]
    Receive(#[source] io::Error),
    #[error(
        "no reply within {} ms (timeoutMs in the network configuration)",
        .0.as_millis()
    )]
    TimedOut(Duration),
    #[error("the agent closed the connection without replying")]
    Closed,
    #[error("the reply is not an enrollment reply")]
    BadReply(#[source] serde_json::Error),
}

/// The agent over its Unix socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnixAgent;

impl AgentClient for UnixAgent {
    fn exchange(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, AgentError> {
        // std cannot bound connect() on a Unix socket (it blocks while the agent's accept
        // backlog is full), and stream timeouts bound each read, not the exchange. So the
        // exchange runs on a worker under one deadline; a worker that misses it is left
        // behind, and its own stream timeouts end it.
        let (done, outcome) = mpsc::channel();
        let (worker_endpoint, request) = (endpoint.clone(), request.clone());
        thread::spawn(move || {
            // The receiver is gone only when the deadline has passed: nobody to tell.
            let _ = done.send(round_trip(&worker_endpoint, &request));
        });
        outcome
            .recv_timeout(endpoint.timeout)
            .unwrap_or(Err(AgentError::TimedOut(endpoint.timeout)))
    }
}

fn round_trip(endpoint: &Endpoint, request: &Request) -> Result<Reply, AgentError> {
    let stream = UnixStream::connect(&endpoint.socket).map_err(AgentError::Connect)?;
    stream
        .set_read_timeout(Some(endpoint.timeout))
        .and_then(|()| stream.set_write_timeout(Some(endpoint.timeout)))
        .map_err(AgentError::Connect)?;

    let mut line = serde_json::to_vec(request).map_err(|e| AgentError::Send(e.into()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(AgentError::Send)?;

    let mut reply = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(AgentError::Receive)?;
    if reply.is_empty() {
        return Err(AgentError::Closed);
    }
    serde_json::from_slice(&reply).map_err(AgentError::BadReply)
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::net::UnixListener};

    use super::*;

    fn endpoint(socket: PathBuf, millis: u64) -> Endpoint {
        Endpoint {
            socket,
            timeout: Duration::from_millis(millis),
        }
    }

    fn del() -> Request {
        Request::Del {
            container_id: "c1".into(),
        }
    }

    #[test]
    fn reads_one_reply_line() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let agent = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            (&stream)
                .write_all(b"{\"status\":\"ok\",\"meshed\":false}\n")
                .unwrap();
            request
        });
        let reply = UnixAgent.exchange(&endpoint(socket, 5000), &del()).unwrap();
        assert_eq!(reply, Reply::Ok { meshed: false });
        assert_eq!(
            agent.join().unwrap(),
            "{\"op\":\"del\",\"container_id\":\"c1\"}\n"
        );
    }

    #[test]
    fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let _listener = UnixListener::bind(&socket).unwrap();
        // Bound but never accepting: connect() succeeds into the backlog, no reply comes.
        let error = UnixAgent
            .exchange(&endpoint(socket, 100), &del())
            .unwrap_err();
        assert!(
            matches!(error, AgentError::TimedOut(_) | AgentError::Receive(_)),
            "{error:?}"
        );
    }

    #[test]
    fn an_agent_hanging_up_is_closed_and_garbage_is_a_bad_reply() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let agent = thread::spawn(move || {
            for answer in [&b""[..], b"hello\n"] {
                let (stream, _) = listener.accept().unwrap();
                let mut request = String::new();
                BufReader::new(&stream).read_line(&mut request).unwrap();
                (&stream).write_all(answer).unwrap();
            }
        });
        let hung_up = UnixAgent.exchange(&endpoint(socket.clone(), 5000), &del());
        assert!(matches!(hung_up, Err(AgentError::Closed)), "{hung_up:?}");
        let garbage = UnixAgent.exchange(&endpoint(socket, 5000), &del());
        assert!(
            matches!(garbage, Err(AgentError::BadReply(_))),
            "{garbage:?}"
        );
        agent.join().unwrap();
    }
}
